"""adb and the phones it sees: the ``adb`` executable with timeouts and one-line errors, device discovery and
description (``adb devices -l`` + ``getprop``), CPU frequencies, big-core masks, battery state and a binary's ABI.
Used by :mod:`kcompress.bench.android` (the benchmark runs). Imports no TensorFlow."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

from kcompress.errors import KcompressError, UsageError

__all__ = ["AdbError", "Adb", "DeviceInfo", "find_adb", "last_line", "parse_devices", "parse_getprop", "list_devices",
           "select_device", "cpu_max_freqs", "big_cores", "cpu_mask", "battery_status", "binary_abi"]

_STATE_HELP = {
    "unauthorized": "unlock the phone and accept the 'Allow USB debugging?' prompt, then retry",
    "offline": "reconnect the USB cable (or run `adb kill-server`), then retry",
    "no permissions": "the USB device is not accessible: add a udev rule for it (see android_bench/README.md)",
    "recovery": "the device is in recovery mode: reboot it into Android",
    "sideload": "the device is in sideload mode: reboot it into Android",
    "bootloader": "the device is in the bootloader: reboot it into Android",
}


class AdbError(KcompressError):
    """adb is missing, timed out, or a device is absent or not usable."""


def find_adb(adb: Optional[str] = None) -> str:
    """The adb executable: ``adb`` as given (path or name on PATH), else ``adb`` on PATH, else
    ``$ANDROID_HOME/platform-tools/adb`` (or ``$ANDROID_SDK_ROOT``)."""
    if adb:
        found = shutil.which(adb) if os.sep not in adb else (adb if os.access(adb, os.X_OK) else None)
        if not found or os.path.isdir(found):
            raise AdbError(f"adb not found at {adb!r} (--adb must point to the adb executable of platform-tools)")
        return found
    found = shutil.which("adb")
    if found:
        return found
    for var in ("ANDROID_HOME", "ANDROID_SDK_ROOT"):
        root = os.environ.get(var)
        candidate = os.path.join(root, "platform-tools", "adb") if root else ""
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AdbError("adb not found: install Android platform-tools and put adb on PATH, set ANDROID_HOME, "
                   "or pass --adb PATH")


@dataclass(frozen=True)
class Adb:
    """Runs adb as a subprocess, optionally against one device (``serial``). Every call has a timeout."""

    path: str
    serial: Optional[str] = None
    timeout_s: float = 60.0

    def for_device(self, serial: str) -> "Adb":
        return replace(self, serial=serial)

    def run(self, *args: str, timeout_s: Optional[float] = None, check: bool = True) -> subprocess.CompletedProcess:
        """``adb [-s SERIAL] ARGS``; raises AdbError when adb cannot run, times out, or (``check``) exits non-zero."""
        cmd = [self.path] + (["-s", self.serial] if self.serial else []) + list(args)
        shown = "adb " + " ".join(args)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise AdbError(f"adb not found at {self.path!r}") from None
        except PermissionError:
            raise AdbError(f"adb at {self.path!r} is not executable") from None
        except subprocess.TimeoutExpired:
            raise AdbError(f"`{shown}` timed out after {timeout:g} s") from None
        if check and proc.returncode != 0:
            raise AdbError(f"`{shown}` failed (exit {proc.returncode}): {last_line(proc.stderr or proc.stdout)}")
        return proc

    def shell(self, command: str, timeout_s: Optional[float] = None, check: bool = True) -> subprocess.CompletedProcess:
        """Runs ``command`` in the device's shell (one string: the device shell parses it)."""
        return self.run("shell", command, timeout_s=timeout_s, check=check)

    def push(self, local: str, remote: str) -> None:
        self.run("push", local, remote, timeout_s=max(self.timeout_s, 300.0))

    def pull(self, remote: str, local: str) -> None:
        self.run("pull", remote, local, timeout_s=max(self.timeout_s, 300.0))


def last_line(text: str) -> str:
    lines = [x.strip() for x in (text or "").splitlines() if x.strip()]
    return lines[-1] if lines else "no output"


@dataclass(frozen=True)
class DeviceInfo:
    """One device as adb sees it. Fields other than serial/state are ``None`` unless the state is ``device``."""

    serial: str
    state: str  # device, unauthorized, offline, no permissions, recovery, ...
    model: Optional[str] = None
    manufacturer: Optional[str] = None
    soc: Optional[str] = None
    board: Optional[str] = None
    abi: Optional[str] = None
    abilist: tuple[str, ...] = ()
    cpu_cores: Optional[int] = None
    android_version: Optional[str] = None
    sdk: Optional[int] = None
    fingerprint: Optional[str] = None
    transport: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.state == "device"

    def target(self) -> dict[str, Any]:
        """The schema's ``target`` (``kind: android``)."""
        return {
            "kind": "android",
            "serial": self.serial,
            "model": self.model,
            "manufacturer": self.manufacturer,
            "soc": self.soc,
            "board": self.board,
            "abi": self.abi,
            "abilist": list(self.abilist),
            "cpu_cores": self.cpu_cores,
            "android_version": self.android_version,
            "sdk": self.sdk,
            "fingerprint": self.fingerprint,
        }


def parse_devices(text: str) -> list[tuple[str, str, dict[str, str]]]:
    """``adb devices -l`` output -> ``[(serial, state, {"usb": .., "model": .., "transport_id": ..}), ...]``."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("*") or line.startswith("List of devices"):
            continue
        serial, _, rest = line.partition(" ") if "\t" not in line else line.partition("\t")
        rest = rest.strip()
        if rest.startswith("no permissions"):
            state = "no permissions"
            rest = re.sub(r"^no permissions[^\]]*\]?", "", rest).strip()
        else:
            state, _, rest = rest.partition(" ")
        attrs = dict(tok.split(":", 1) for tok in rest.split() if ":" in tok)
        out.append((serial, state or "unknown", attrs))
    return out


def parse_getprop(text: str) -> dict[str, str]:
    """``getprop`` output (``[key]: [value]`` lines) -> dict."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^\[([^\]]+)\]: \[(.*)\]\s*$", text, re.MULTILINE)}


def _count_cpus(spec: str) -> Optional[int]:
    """``/sys/devices/system/cpu/possible`` ("0-7" or "0-3,6") -> number of cores."""
    total = 0
    for part in spec.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return None
        total += (int(hi) - int(lo) + 1) if hi else 1
    return total or None


def _describe(adb: Adb, serial: str, state: str, attrs: dict[str, str]) -> DeviceInfo:
    if state != "device":
        return DeviceInfo(serial=serial, state=state, model=attrs.get("model"), transport=attrs)
    dev = adb.for_device(serial)
    props = parse_getprop(dev.shell("getprop").stdout)
    cores = _count_cpus(dev.shell("cat /sys/devices/system/cpu/possible", check=False).stdout)
    sdk = props.get("ro.build.version.sdk", "")
    abilist = tuple(a for a in props.get("ro.product.cpu.abilist", "").split(",") if a)
    return DeviceInfo(
        serial=serial,
        state=state,
        model=props.get("ro.product.model") or attrs.get("model"),
        manufacturer=props.get("ro.product.manufacturer") or None,
        soc=" ".join(x for x in (props.get("ro.soc.manufacturer"), props.get("ro.soc.model")) if x) or None,
        board=props.get("ro.board.platform") or props.get("ro.product.board") or props.get("ro.hardware") or None,
        abi=props.get("ro.product.cpu.abi") or (abilist[0] if abilist else None),
        abilist=abilist,
        cpu_cores=cores,
        android_version=props.get("ro.build.version.release") or None,
        sdk=int(sdk) if sdk.isdigit() else None,
        fingerprint=props.get("ro.build.fingerprint") or None,
        transport=attrs,
    )


def list_devices(adb: Adb) -> list[DeviceInfo]:
    """Every device adb lists, described (getprop, core count) when its state is ``device``."""
    text = adb.run("devices", "-l").stdout
    return [_describe(adb, serial, state, attrs) for serial, state, attrs in parse_devices(text)]


def _state_error(serial: str, state: str) -> AdbError:
    return AdbError(f"device {serial} is {state}: {_STATE_HELP.get(state, 'it cannot run commands now')}")


def select_device(adb: Adb, serial: Optional[str] = None) -> DeviceInfo:
    """The device to use: ``serial`` if given, else the only device in state ``device``. Raises AdbError
    (with what to do) when it is absent, not authorized/online, or when several are ready and none is chosen."""
    entries = parse_devices(adb.run("devices", "-l").stdout)
    if serial:
        match = [e for e in entries if e[0] == serial]
        if not match:
            known = ", ".join(e[0] for e in entries) or "none"
            raise AdbError(f"device {serial} is not connected (adb lists: {known})")
        if match[0][1] != "device":
            raise _state_error(serial, match[0][1])
        return _describe(adb, *match[0])
    ready = [e for e in entries if e[1] == "device"]
    if not ready:
        if entries:
            raise _state_error(entries[0][0], entries[0][1])
        raise AdbError("no Android device connected (`adb devices` lists none): plug the phone in with USB "
                       "debugging enabled (see android_bench/README.md)")
    if len(ready) > 1:
        raise AdbError(f"{len(ready)} devices connected ({', '.join(e[0] for e in ready)}): choose one with --serial")
    return _describe(adb, *ready[0])


def cpu_max_freqs(adb: Adb) -> dict[int, int]:
    """``{core: cpuinfo_max_freq in kHz}`` from sysfs; empty when the device does not expose it."""
    proc = adb.shell("grep -H . /sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq", check=False)
    freqs = {}
    for m in re.finditer(r"/cpu(\d+)/cpufreq/cpuinfo_max_freq:(\d+)", proc.stdout):
        freqs[int(m.group(1))] = int(m.group(2))
    return freqs


def big_cores(freqs: dict[int, int]) -> tuple[int, ...]:
    """Cores faster than the slowest cluster (big + prime on a tri-cluster SoC); ``()`` when all are alike."""
    if not freqs or len(set(freqs.values())) < 2:
        return ()
    slowest = min(freqs.values())
    return tuple(sorted(c for c, f in freqs.items() if f > slowest))


def cpu_mask(cores: Sequence[int]) -> str:
    """Hex affinity mask for ``taskset`` (cores 4-7 -> ``f0``)."""
    return format(sum(1 << c for c in cores), "x")


def battery_status(adb: Adb) -> dict[str, Any]:
    """``{"level": %, "temperature_c": ..}`` from ``dumpsys battery`` (temperature is reported in 0.1 degC);
    empty when unavailable (never fails a benchmark)."""
    try:
        text = adb.shell("dumpsys battery", check=False).stdout
    except AdbError:
        return {}
    values = dict(re.findall(r"^\s*([A-Za-z ]+):\s*(-?\d+)\s*$", text, re.MULTILINE))
    out: dict[str, Any] = {}
    if "level" in values:
        out["level"] = int(values["level"])
    if "temperature" in values:
        out["temperature_c"] = int(values["temperature"]) / 10.0
    if "status" in values:
        out["status"] = int(values["status"])  # 2 charging, 3 discharging, 5 full
    return out


_ELF_MACHINES = {0x28: "armeabi-v7a", 0xB7: "arm64-v8a", 0x03: "x86", 0x3E: "x86_64", 0xF3: "riscv64"}


def binary_abi(path: str) -> Optional[str]:
    """The Android ABI an ELF executable was built for, ``None`` if unknown; raises UsageError if not ELF."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        raise UsageError(f"{path} is not an executable for Android (not an ELF file); download benchmark_model "
                         f"for the device's ABI (see android_bench/README.md)")
    return _ELF_MACHINES.get(int.from_bytes(head[18:20], "little" if head[5] == 1 else "big"))
