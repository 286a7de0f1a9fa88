"""A fake ``adb`` for tests: emulates an Android device at the adb process boundary.

Run as ``python fake_adb.py ARGS`` with ``FAKE_ADB_DIR`` pointing to a state directory that holds
``config.json`` (devices, getprop values, core frequencies, how benchmark_model behaves). Every invocation is
appended to ``commands.jsonl``; the device's file system lives under ``fs/``; logcat under ``logcat.txt``.
benchmark_model runs print a realistic log whose latency is ``BASE_US[delegate] / threads``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys

BASE_US = {"cpu": 30000.0, "xnnpack": 20000.0, "gpu": 9000.0, "nnapi": 15000.0}
STATE = os.environ["FAKE_ADB_DIR"]


def load_config() -> dict:
    with open(os.path.join(STATE, "config.json")) as f:
        return json.load(f)


def fs(path: str) -> str:
    return os.path.join(STATE, "fs", path.lstrip("/"))


def fail(msg: str, code: int = 1) -> None:
    sys.stderr.write(msg + "\n")
    sys.exit(code)


def flags_of(words: list[str]) -> dict[str, str]:
    return dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)


def benchmark_log(flags: dict[str, str]) -> str:
    delegate = "xnnpack"
    if flags.get("use_gpu") == "true":
        delegate = "gpu"
    elif flags.get("use_nnapi") == "true":
        delegate = "nnapi"
    elif flags.get("use_xnnpack") == "false":
        delegate = "cpu"
    threads = int(flags.get("num_threads", "1"))
    runs = int(flags.get("num_runs", "50"))
    warmup = int(flags.get("warmup_runs", "1"))
    avg = BASE_US[delegate] / threads
    graph = flags["graph"]
    lines = [
        "INFO: STARTING!",
        "INFO: Log parameter values verbosely: [0]",
        f"INFO: Min num runs: [{runs}]",
        f"INFO: Num threads: [{threads}]",
        f"INFO: Min warmup runs: [{warmup}]",
        f"INFO: Graph: [{graph}]",
        f"INFO: #threads used for CPU inference: [{threads}]",
        f"INFO: Loaded model {graph}",
        "INFO: Initialized TensorFlow Lite runtime.",
    ]
    if delegate == "xnnpack":
        lines += ["INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
                  "VERBOSE: Replacing 31 out of 31 node(s) with delegate (TfLiteXNNPackDelegate) node, "
                  "yielding 1 partitions for the whole graph."]
    elif delegate == "gpu":
        lines += ["INFO: Created TensorFlow Lite delegate for GPU.",
                  "INFO: Replacing 29 out of 31 node(s) with delegate (TfLiteGpuDelegateV2) node, "
                  "yielding 2 partitions for subgraph 0."]
    elif delegate == "nnapi":
        lines += ["INFO: Replacing 30 out of 31 node(s) with delegate (TfLiteNnapiDelegate) node, "
                  "yielding 2 partitions for subgraph 0."]
    lines += [
        "INFO: The input model file size (MB): 0.25",
        "INFO: Initialized session in 12.5ms.",
        f"INFO: Running benchmark for at least {warmup} iterations and at least 0 seconds but terminate if "
        "exceeding 150 seconds.",
        f"INFO: count={warmup} first={avg * 2:.0f} curr={avg:.0f} min={avg:.0f} max={avg * 2:.0f} "
        f"avg={avg * 1.2:g} std={avg * 0.1:.0f}",
        "",
        f"INFO: Running benchmark for at least {runs} iterations and at least 0 seconds but terminate if "
        "exceeding 150 seconds.",
        f"INFO: count={runs} first={avg:.0f} curr={avg:.0f} min={avg * 0.9:.0f} max={avg * 1.5:.0f} avg={avg:g} "
        f"std={avg * 0.05:.0f} p5={avg * 0.92:.0f} median={avg * 0.99:.0f} p95={avg * 1.3:.0f}",
        "",
        f"INFO: Inference timings in us: Init: 12500, First inference: {avg * 2:.0f}, Warmup (avg): {avg * 1.2:g}, "
        f"Inference (avg): {avg:g}",
        "INFO: Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to "
        "the actual memory footprint of the model at runtime. Take the information at your discretion.",
        f"INFO: Memory footprint delta from the start of the tool (MB): init=3.5 overall={5 + threads}.25",
        f"INFO: Overall peak memory footprint (MB) via periodic monitoring: {9 + threads}.5",
    ]
    if flags.get("enable_op_profiling") == "true":
        lines += [
            "Operator-wise Profiling Info for Regular Benchmark Runs:",
            "============================== Summary by node type ==============================",
            "\t             [Node type]\t  [count]\t  [avg ms]\t    [avg %]\t    [cdf %]\t  [mem KB]\t[times called]",
            f"\t                 CONV_2D\t        3\t    {avg * 0.0007:.3f}\t    70.000%\t    70.000%\t     0.000\t        3",
            f"\t         FULLY_CONNECTED\t        1\t    {avg * 0.0003:.3f}\t    30.000%\t   100.000%\t     0.000\t        1",
            "",
            f"Timings (microseconds): count={runs} first=1 curr=1 min=1 max=1 avg=1 std=0",
        ]
    return "\n".join(lines) + "\n"


def run_benchmark(words: list[str], config: dict) -> int:
    flags = flags_of(words)
    mode = config.get("bench_mode", "ok")
    exe = next(w for w in words if w.endswith("benchmark_model"))
    cwd = words[words.index("cd") + 1] if "cd" in words else "/data/local/tmp/kcompress"
    binary = fs(f"{cwd}/{exe[2:]}") if exe.startswith("./") else fs(exe)
    if not os.path.isfile(binary):
        return 127
    if not os.path.isfile(fs(flags.get("graph", "/missing"))):
        text = f"INFO: STARTING!\nERROR: Could not open '{flags.get('graph')}'.\nERROR: Failed to load model\n"
        code = 1
    elif mode == "exit":
        text = "INFO: STARTING!\nSegmentation fault\n"
        code = 139
    elif mode == "failed_text":
        text = ("INFO: STARTING!\nINFO: Created TensorFlow Lite delegate for GPU.\n"
                "ERROR: Failed to apply GPU delegate.\nERROR: Benchmarking failed.\n")
        code = 0  # old adb does not forward exit codes: the text must be enough
    else:
        text, code = benchmark_log(flags), 0
    m = re.search(r"> (\S+) 2>&1", " ".join(words))
    if m:
        os.makedirs(os.path.dirname(fs(m.group(1))), exist_ok=True)
        with open(fs(m.group(1)), "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return code


def shell(command: str, serial: str, config: dict) -> int:
    words = shlex.split(command)
    props = config["props"].get(serial, {})
    if command == "getprop":
        for k, v in props.items():
            print(f"[{k}]: [{v}]")
        return 0
    if command == "cat /sys/devices/system/cpu/possible":
        print(f"0-{len(config.get('freqs', {}).get(serial, {'0': 1})) - 1}")
        return 0
    if command.startswith("grep -H . /sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq"):
        for cpu, freq in config.get("freqs", {}).get(serial, {}).items():
            print(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq:{freq}")
        return 0
    if command == "command -v taskset":
        if config.get("taskset", True):
            print("/system/bin/taskset")
            return 0
        return 1
    if command == "dumpsys battery":
        counter = os.path.join(STATE, "battery_calls")
        n = int(open(counter).read()) if os.path.exists(counter) else 0
        with open(counter, "w") as f:
            f.write(str(n + 1))
        print("Current Battery Service state:\n  AC powered: false\n  USB powered: true\n  status: 2\n"
              f"  health: 2\n  present: true\n  level: {80 - n // 2}\n  scale: 100\n  voltage: 4180\n"
              f"  temperature: {300 + n}\n  technology: Li-ion")
        return 0
    if words[:2] == ["pm", "list"]:
        if config.get("apk_installed", True):
            print("package:org.tensorflow.lite.benchmark")
        return 0
    if words[:2] == ["am", "start"]:
        args = words[words.index("args") + 1]
        text = benchmark_log(flags_of(args.split()))
        with open(os.path.join(STATE, "logcat.txt"), "a") as f:
            for line in text.splitlines():
                msg = re.sub(r"^(INFO|VERBOSE): ", "", line)
                f.write(f"03-14 09:21:05.402 22871 22871 I tflite  : {msg}\n")
        print("Starting: Intent { cmp=org.tensorflow.lite.benchmark/.BenchmarkModelActivity (has extras) }")
        return 0
    if any(w.startswith("--graph=") for w in words):
        return run_benchmark(words, config)
    for part in command.split("&&"):
        w = shlex.split(part)
        if w[:2] == ["rm", "-rf"]:
            shutil.rmtree(fs(w[2]), ignore_errors=True)
        elif w[:2] == ["mkdir", "-p"]:
            os.makedirs(fs(w[2]), exist_ok=True)
        elif w[:1] == ["chmod"]:
            if not os.path.exists(fs(w[2])):
                fail(f"chmod: {w[2]}: No such file or directory")
        else:
            fail(f"fake adb: unsupported shell command: {command}", 127)
    return 0


def main(argv: list[str]) -> int:
    with open(os.path.join(STATE, "commands.jsonl"), "a") as f:
        f.write(json.dumps(argv) + "\n")
    config = load_config()
    serial = None
    if argv[:1] == ["-s"]:
        serial, argv = argv[1], argv[2:]
    devices = config["devices"]
    if argv[:1] == ["devices"]:
        print("List of devices attached")
        for d in devices:
            print(f"{d['serial']}\t{d['state']}" + (f" {d['attrs']}" if d.get("attrs") else ""))
        print()
        return 0
    if serial is None:
        ready = [d for d in devices if d["state"] == "device"]
        if len(ready) != 1:
            fail("adb: more than one device/emulator" if ready else "adb: no devices/emulators found")
        serial = ready[0]["serial"]
    match = [d for d in devices if d["serial"] == serial]
    if not match:
        fail(f"adb: device '{serial}' not found")
    if match[0]["state"] != "device":
        fail(f"adb: device {match[0]['state']}.")
    cmd = argv[0]
    if cmd == "shell":
        return shell(" ".join(argv[1:]), serial, config)
    if cmd == "push":
        local, remote = argv[1], argv[2]
        os.makedirs(os.path.dirname(fs(remote)), exist_ok=True)
        shutil.copy(local, fs(remote))
        print(f"{local}: 1 file pushed, 0 skipped. 12.3 MB/s ({os.path.getsize(local)} bytes in 0.001s)")
        return 0
    if cmd == "pull":
        remote, local = argv[1], argv[2]
        if not os.path.exists(fs(remote)):
            fail(f"adb: error: failed to stat remote object '{remote}': No such file or directory")
        shutil.copy(fs(remote), local)
        print(f"{remote}: 1 file pulled, 0 skipped.")
        return 0
    if cmd == "logcat":
        path = os.path.join(STATE, "logcat.txt")
        if "-c" in argv:
            open(path, "w").close()
        elif os.path.exists(path):
            sys.stdout.write("--------- beginning of main\n" + open(path).read())
        return 0
    fail(f"fake adb: unsupported command {argv}", 1)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
