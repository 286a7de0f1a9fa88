"""Benchmark ``.tflite`` files on Android devices over ``adb``, with results in the ``kcompress.bench/1`` schema.

``Adb`` (from :mod:`kcompress.bench.adb`) wraps the adb executable (timeouts, ``AdbError`` with one readable line);
``list_devices``/``select_device`` find phones and describe them (``adb devices -l`` + ``getprop``);
``bench_on_device`` pushes LiteRT's ``benchmark_model`` and the models to ``/data/local/tmp/kcompress/``, runs
every model x delegate x threads combination, and returns a ``BenchReport`` whose ``target`` describes the phone.
``apk=True`` drives the installed benchmark APK instead and reads the timings from logcat.

Gotchas:
- Runs are pinned to the big cores with ``taskset`` when the device has it and its cores differ in maximum
  frequency ("big" = every core faster than the slowest cluster); the mask is recorded in each result's ``extra``.
- ``min_secs``/``warmup_min_secs`` are set to 0 so benchmark_model does exactly ``runs`` and ``warmup`` runs.
- The first failing combination stops the benchmark (after cleaning the device); nothing partial is returned.
- The work directory on the device is deleted at the end, also after a failure. It is always one plain folder
  under ``/data/local/tmp`` (:func:`work_dir_path`), and every path sent to the device shell is ``shlex.quote``-d.
Imports no TensorFlow.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from kcompress.bench.adb import (
    Adb,
    AdbError,
    DeviceInfo,
    battery_status,
    big_cores,
    binary_abi,
    cpu_mask,
    cpu_max_freqs,
    find_adb,
    last_line,
    list_devices,
    parse_devices,
    parse_getprop,
    select_device,
)
from kcompress.bench.logparse import parse_benchmark_log
from kcompress.bench.schema import BenchReport, BenchResult
from kcompress.errors import KcompressError, UsageError
from kcompress.types import Delegate

__all__ = [
    "DELEGATES",
    "WORK_DIR",
    "APK_PACKAGE",
    "AdbError",
    "BenchmarkFailed",
    "Adb",
    "DeviceInfo",
    "DeviceBenchConfig",
    "find_adb",
    "parse_devices",
    "parse_getprop",
    "list_devices",
    "select_device",
    "cpu_max_freqs",
    "big_cores",
    "cpu_mask",
    "battery_status",
    "binary_abi",
    "benchmark_flags",
    "bench_on_device",
    "work_dir_path",
]

DELEGATES = Delegate.values()
WORK_DIR = "/data/local/tmp/kcompress"
_WORK_ROOT = "/data/local/tmp"
_WORK_NAME = re.compile(r"[A-Za-z0-9._-]+")
APK_PACKAGE = "org.tensorflow.lite.benchmark"
APK_ACTIVITY = f"{APK_PACKAGE}/.BenchmarkModelActivity"

_DELEGATE_FLAGS = {
    "cpu": ["--use_xnnpack=false"],  # the built-in TFLite kernels, XNNPACK explicitly off
    "xnnpack": ["--use_xnnpack=true"],
    "gpu": ["--use_gpu=true"],
    "nnapi": ["--use_nnapi=true"],
}

@dataclass(frozen=True)
class DeviceBenchConfig:
    """What ``bench_on_device`` runs: every model x delegate x threads combination.

    ``cooldown_s`` is slept between runs (not before the first) so the phone sheds heat; ``extra_args`` go to
    benchmark_model verbatim; ``timeout_s`` bounds one run.
    """

    threads: tuple[int, ...] = (1, 4)
    delegates: tuple[str, ...] = ("xnnpack",)
    runs: int = 50
    warmup: int = 5
    cooldown_s: float = 5.0
    op_profiling: bool = False
    pin_big_cores: bool = True
    apk: bool = False
    timeout_s: float = 600.0
    work_dir: str = WORK_DIR
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        bad = [d for d in self.delegates if d not in DELEGATES]
        if bad or not self.delegates:
            raise UsageError(f"unknown delegate {bad[0] if bad else ''!r}: choose from {', '.join(DELEGATES)}")
        if not self.threads or any(t < 1 for t in self.threads):
            raise UsageError("threads must be positive integers, e.g. --threads 1,4")
        if self.runs < 1 or self.warmup < 0 or self.cooldown_s < 0 or self.timeout_s <= 0:
            raise UsageError("--runs must be >= 1, --warmup and --cooldown >= 0")
        object.__setattr__(self, "work_dir", work_dir_path(self.work_dir))


def work_dir_path(value: str) -> str:
    """``NAME`` or ``/data/local/tmp/NAME`` -> ``/data/local/tmp/NAME``, for one plain folder name of letters, digits,
    ``.``, ``_`` and ``-`` (not ``.`` or ``..``); anything else is a UsageError. The folder is emptied before and
    removed after a run, so it must never be ``/data/local/tmp`` itself, a path outside it, or shell syntax."""
    text = str(value)
    name = text[len(_WORK_ROOT) + 1:] if text.startswith(_WORK_ROOT + "/") else text
    name = name[:-1] if name.endswith("/") else name
    if not _WORK_NAME.fullmatch(name) or name in (".", ".."):
        raise UsageError(f"work dir {text!r}: give one plain folder name under {_WORK_ROOT} (letters, digits, . _ -), "
                         f"e.g. kcompress or {WORK_DIR}; it is emptied and removed")
    return f"{_WORK_ROOT}/{name}"


def benchmark_flags(graph: str, threads: int, delegate: str, config: DeviceBenchConfig) -> list[str]:
    """The benchmark_model command-line flags of one run."""
    flags = [
        f"--graph={graph}",
        f"--num_threads={threads}",
        f"--num_runs={config.runs}",
        "--min_secs=0",
        f"--warmup_runs={config.warmup}",
        "--warmup_min_secs=0",
        "--report_peak_memory_footprint=true",
        *_DELEGATE_FLAGS[delegate],
    ]
    if config.op_profiling:
        flags.append("--enable_op_profiling=true")
    return flags + list(config.extra_args)


def _remote_names(models: Sequence[str]) -> list[str]:
    """Device file names: the basename made shell-safe, with an index prefix when two models share one."""
    names = [re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(m)) for m in models]
    return [f"{i}_{n}" if names.count(n) > 1 else n for i, n in enumerate(names)]


class BenchmarkFailed(KcompressError):
    """benchmark_model (or the APK) failed on the device."""


def bench_on_device(
    models: Sequence[str],
    adb: Adb,
    config: DeviceBenchConfig = DeviceBenchConfig(),
    benchmark_binary: Optional[str] = None,
    serial: Optional[str] = None,
    log: Callable[[str], None] = lambda msg: None,
    sleep: Callable[[float], None] = time.sleep,
) -> BenchReport:
    """Benchmarks ``models`` (local .tflite paths) on the device and returns the results.

    ``benchmark_binary`` is the local benchmark_model for the device's ABI (not needed with ``config.apk``);
    ``log`` receives progress lines; ``sleep`` is how cooldowns wait (tests pass a recorder).
    Raises KcompressError subclasses with one readable line for every expected failure.
    """
    for m in models:
        if not os.path.isfile(m):
            raise UsageError(f"model file not found: {m}")
    if not models:
        raise UsageError("give at least one .tflite model")
    bin_abi = None
    if not config.apk:
        if not benchmark_binary:
            raise UsageError("--benchmark-binary is required (or use --apk): download benchmark_model for the "
                             "device's ABI (see android_bench/README.md)")
        if not os.path.isfile(benchmark_binary):
            raise UsageError(f"benchmark binary not found: {benchmark_binary}")
        bin_abi = binary_abi(benchmark_binary)

    device = select_device(adb, serial)
    dev = adb.for_device(device.serial)
    if bin_abi and device.abilist and bin_abi not in device.abilist:
        raise UsageError(f"{benchmark_binary} is built for {bin_abi} but {device.serial} runs "
                         f"{', '.join(device.abilist)}: download the {device.abi} benchmark_model")
    if config.apk and APK_PACKAGE not in dev.shell(f"pm list packages {shlex.quote(APK_PACKAGE)}",
                                                    check=False).stdout:
        raise AdbError(f"the benchmark APK ({APK_PACKAGE}) is not installed on {device.serial}: "
                       "adb install -r -d -g android_aarch64_benchmark_model.apk (see android_bench/README.md)")
    log(f"Device {device.serial}: {device.manufacturer or ''} {device.model or ''} ({device.abi}, "
        f"Android {device.android_version})")

    work = work_dir_path(config.work_dir)
    q = shlex.quote
    freqs = cpu_max_freqs(dev)
    big = big_cores(freqs)
    mask = None
    if config.pin_big_cores and big and not config.apk:
        if dev.shell("command -v taskset", check=False).stdout.strip():
            mask = cpu_mask(big)
    target = {**device.target(), "cpu_max_freq_khz": {str(k): v for k, v in sorted(freqs.items())},
              "big_cores": list(big)}

    results: list[BenchResult] = []
    dev.shell(f"rm -rf {q(work)} && mkdir -p {q(work)}")
    try:
        if not config.apk:
            log(f"Pushing {os.path.basename(benchmark_binary)} to {work}/")
            dev.push(benchmark_binary, f"{work}/benchmark_model")
            dev.shell(f"chmod 755 {q(work + '/benchmark_model')}")
        remote = [f"{work}/{n}" for n in _remote_names(models)]
        for local, path in zip(models, remote):
            log(f"Pushing {local} to {path}")
            dev.push(local, path)
            if config.apk:
                dev.shell(f"chmod 644 {q(path)}")
        combos = [(i, d, t) for i in range(len(models)) for d in config.delegates for t in config.threads]
        with tempfile.TemporaryDirectory(prefix="kcompress-device-") as tmp:
            for n, (i, delegate, threads) in enumerate(combos):
                if n and config.cooldown_s:
                    log(f"Cooling down {config.cooldown_s:g} s")
                    sleep(config.cooldown_s)
                name = os.path.basename(models[i])
                log(f"[{n + 1}/{len(combos)}] {name}: {delegate}, {threads} thread(s)")
                flags = benchmark_flags(remote[i], threads, delegate, config)
                before = battery_status(dev)
                if config.apk:
                    text, code = _run_apk(dev, flags, config, sleep)
                else:
                    text, code = _run_binary(dev, work, n, flags, mask, config, tmp)
                after = battery_status(dev)
                parsed = parse_benchmark_log(text)
                if code != 0 or parsed.failed:
                    reason = parsed.failure_reason() if parsed.failed else last_line(text)
                    raise BenchmarkFailed(
                        f"benchmark_model failed on {device.serial} for {name} ({delegate}, {threads} threads)"
                        + (f", exit {code}" if code else "") + f": {reason}")
                results.append(parsed.to_result(
                    model=name,
                    runtime="benchmark_apk" if config.apk else "benchmark_model",
                    threads=threads,
                    delegate=delegate,
                    model_bytes=os.path.getsize(models[i]),
                    extra={"model_path": os.path.abspath(models[i]), "cpu_mask": mask,
                           "battery_before": before, "battery_after": after,
                           "cooldown_s": config.cooldown_s, "benchmark_args": flags},
                ))
    finally:
        try:
            dev.shell(f"rm -rf {q(work)}", check=False)
        except AdbError as e:
            log(f"Warning: could not clean {work} on the device: {e}")
    return BenchReport(target=target, results=tuple(results))


def _run_binary(dev: Adb, work: str, n: int, flags: list[str], mask: Optional[str], config: DeviceBenchConfig,
                tmp: str) -> tuple[str, int]:
    """Runs benchmark_model with its output redirected to a file on the device, pulls the file; (text, exit)."""
    remote_log = f"{work}/run_{n}.log"
    q = shlex.quote
    pin = f"taskset {q(mask)} " if mask else ""
    command = f"cd {q(work)} && {pin}./benchmark_model {' '.join(q(f) for f in flags)} > {q(remote_log)} 2>&1"
    proc = dev.shell(command, timeout_s=config.timeout_s, check=False)
    local_log = os.path.join(tmp, f"run_{n}.log")
    try:
        dev.pull(remote_log, local_log)
        with open(local_log, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except AdbError:
        text = ""
    return text + proc.stdout + proc.stderr, proc.returncode


def _run_apk(dev: Adb, flags: list[str], config: DeviceBenchConfig, sleep: Callable[[float], None]) -> tuple[str, int]:
    """Starts the benchmark APK with ``flags`` and polls logcat (tag ``tflite``) until the run ends; (text, 0)."""
    dev.run("logcat", "-c")
    args = " ".join(flags)
    dev.shell(f"am start -S -n {shlex.quote(APK_ACTIVITY)} --es args {shlex.quote(args)}")
    deadline = time.monotonic() + config.timeout_s
    while True:
        text = dev.run("logcat", "-d", "-v", "threadtime", "-s", "tflite").stdout
        parsed = parse_benchmark_log(text)
        if parsed.inference_avg_us is not None or parsed.failures:
            if parsed.inference_avg_us is not None and "Memory footprint" not in text and time.monotonic() < deadline:
                sleep(0.5)  # the memory lines follow the timings line
                text = dev.run("logcat", "-d", "-v", "threadtime", "-s", "tflite").stdout
            return text, 0
        if time.monotonic() > deadline:
            raise BenchmarkFailed(f"the benchmark APK printed no timings within {config.timeout_s:g} s "
                                  "(is the screen on and the APK allowed to read /data/local/tmp?)")
        sleep(1.0)
