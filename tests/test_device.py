"""Tests of ``kcompress device`` (list, bench, parse), the benchmark_model log parser and the adb harness.

The Android device is emulated at the adb process boundary by ``tests/fake_adb.py``: the harness runs a real
subprocess, the fake records every command and answers like a phone would.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kcompress.bench import android as dev
from kcompress.bench.logparse import RunStats, parse_benchmark_log, split_runs, strip_log_prefix
from kcompress.cli import main
from kcompress.errors import UsageError

DATA = Path(__file__).parent / "data"
FAKE = Path(__file__).parent / "fake_adb.py"
SERIAL = "2B171FDH2006XZ"
WORK = "/data/local/tmp/kcompress"
PIXEL_PROPS = {
    "ro.product.model": "Pixel 7",
    "ro.product.manufacturer": "Google",
    "ro.soc.manufacturer": "Google",
    "ro.soc.model": "GS201",
    "ro.board.platform": "gs201",
    "ro.product.cpu.abi": "arm64-v8a",
    "ro.product.cpu.abilist": "arm64-v8a,armeabi-v7a,armeabi",
    "ro.build.version.release": "14",
    "ro.build.version.sdk": "34",
    "ro.build.fingerprint": "google/panther/panther:14/UQ1A.240205.004/11269751:user/release-keys",
}
# Tensor G2: 4 little (1.8 GHz), 2 mid (2.35 GHz), 2 big (2.85 GHz) -> pin to cores 4-7, mask f0
PIXEL_FREQS = {"0": 1803000, "1": 1803000, "2": 1803000, "3": 1803000,
               "4": 2348000, "5": 2348000, "6": 2850000, "7": 2850000}


def _elf(machine: int) -> bytes:
    return b"\x7fELF\x02\x01\x01" + b"\x00" * 11 + machine.to_bytes(2, "little") + b"\x00" * 44


class FakeAdb:
    def __init__(self, root: Path):
        self.dir = root / "adb_state"
        self.dir.mkdir()
        self.path = str(root / "bin" / "adb")
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write(f"#!/bin/sh\nFAKE_ADB_DIR='{self.dir}' exec '{sys.executable}' -S '{FAKE}' \"$@\"\n")
        os.chmod(self.path, 0o755)
        self.configure(devices=[{"serial": SERIAL, "state": "device",
                                 "attrs": "usb:1-1 product:panther model:Pixel_7 device:panther transport_id:3"}],
                       props={SERIAL: PIXEL_PROPS}, freqs={SERIAL: PIXEL_FREQS})

    def configure(self, **values):
        path = self.dir / "config.json"
        config = json.loads(path.read_text()) if path.exists() else {}
        config.update(values)
        path.write_text(json.dumps(config))

    def commands(self) -> list[list[str]]:
        path = self.dir / "commands.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def shell_commands(self) -> list[str]:
        return [" ".join(c[c.index("shell") + 1:]) for c in self.commands() if "shell" in c]

    def device_path(self, remote: str) -> Path:
        return self.dir / "fs" / remote.lstrip("/")


@pytest.fixture
def fake_adb(tmp_path):
    return FakeAdb(tmp_path)


@pytest.fixture
def files(tmp_path):
    """Two small model files and an arm64 benchmark_model."""
    (tmp_path / "m1.tflite").write_bytes(b"TFL3" + b"\x00" * 1000)
    (tmp_path / "m2.tflite").write_bytes(b"TFL3" + b"\x00" * 2000)
    (tmp_path / "benchmark_model").write_bytes(_elf(0xB7))
    return tmp_path


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result


def assert_one_line_error(result, code, *fragments):
    assert result.exit_code == code, result.output
    errors = [x for x in result.stderr.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def bench_args(fake_adb, files, *extra):
    return ["device", "bench", files / "m1.tflite", "--adb", fake_adb.path,
            "--benchmark-binary", files / "benchmark_model", "--cooldown", "0", *extra]


# ---------------------------------------------------------------- parser


def test_parse_old_plain_log_without_prefix_or_percentiles():
    log = parse_benchmark_log((DATA / "benchmark_model_old_plain.log").read_text())
    r = log.to_result()
    assert r.model == "mobilenet_quant_v1_224.tflite" and r.threads == 4 and r.delegate == "cpu"
    assert r.latency_ms.count == 50 and r.latency_ms.mean == pytest.approx(71.2503)
    assert r.latency_ms.min == pytest.approx(69.87) and r.latency_ms.std == pytest.approx(1.203)
    assert math.isnan(r.latency_ms.p50) and math.isnan(r.latency_ms.p95)  # not printed: not guessed
    assert r.warmup_runs == 7 and r.warmup_mean_ms == pytest.approx(78.2141)
    assert r.init_ms == pytest.approx(3.024) and r.first_inference_ms == pytest.approx(118.352)
    assert r.memory_mb == {"init": 2.67578, "overall": 9.80859}  # older "Peak memory footprint" line
    assert r.delegate_coverage is None and not log.failed


def test_parse_info_prefixed_log_with_percentiles_memory_and_partial_delegation():
    r = parse_benchmark_log((DATA / "benchmark_model_info_xnnpack.log").read_text()).to_result()
    assert r.delegate == "xnnpack" and r.threads == 4 and r.warmup_runs == 5
    assert (r.latency_ms.p50, r.latency_ms.p95) == (pytest.approx(8.846), pytest.approx(9.63))
    assert r.extra["latency_p5_ms"] == pytest.approx(8.719)
    assert r.throughput_per_s == pytest.approx(1000 / 8.93246, rel=1e-6)
    # "Peak memory footprint (MB): not monitored" must not be read as a number
    assert r.memory_mb == {"init": 9.125, "overall": 17.4609, "peak_periodic": 21.0391}
    assert r.delegate_coverage == {"delegate": "TfLiteXNNPackDelegate", "replaced_nodes": 65, "total_nodes": 66,
                                   "partitions": 2}


def test_parse_gpu_log_with_scientific_numbers_and_op_profiling():
    log = parse_benchmark_log((DATA / "benchmark_model_gpu_profiling.log").read_text())
    r = log.to_result()
    assert r.delegate == "gpu" and r.threads == 1
    assert r.init_ms == pytest.approx(2950.34)  # "Init: 2.95034e+06"
    # the measured line, not the profiler's "Timings (microseconds): count=50 ... avg=34377.9"
    assert r.latency_ms.count == 50 and r.latency_ms.mean == pytest.approx(34.3202)
    assert r.warmup_runs == 13
    assert r.delegate_coverage["replaced_nodes"] == 251 and r.delegate_coverage["total_nodes"] == 267
    by_type = {row["node_type"]: row for row in r.op_profile}
    assert list(by_type) == ["TfLiteGpuDelegateV2", "TFLite_Detection_PostProcess", "RESHAPE"]  # regular runs
    assert by_type["TfLiteGpuDelegateV2"]["count"] == 2 and by_type["TfLiteGpuDelegateV2"]["avg_ms"] == 33.32
    assert by_type["RESHAPE"]["cdf_pct"] == 100.0
    top = r.extra["op_profile_top"]
    assert top[0]["avg_ms"] == 27.31 and top[2]["name"] == "[StatefulPartitionedCall:1, StatefulPartitionedCall:3]:270"


def test_parse_all_same_form_gives_exact_stats():
    r = parse_benchmark_log((DATA / "benchmark_model_tiny_allsame.log").read_text()).to_result()
    lat = r.latency_ms
    assert lat.count == 20 and lat.std == 0
    assert lat.mean == lat.min == lat.max == lat.p50 == lat.p95 == lat.p99 == pytest.approx(0.015)
    assert r.warmup_runs == 1 and r.warmup_mean_ms == pytest.approx(0.097)  # "count=1 curr=97"


def test_run_stats_reads_scientific_notation():
    s = RunStats.from_line("count=3 first=2950340 curr=2951002 min=2949876 max=2951002 avg=2.95034e+06 std=471")
    assert s.count == 3 and s.avg_us == 2950340.0 and s.latency_ms().mean == pytest.approx(2950.34)


def test_parse_apk_logcat_lines():
    text = (DATA / "benchmark_apk_logcat.log").read_text()
    log = parse_benchmark_log(text)
    assert log.logcat and not log.failed
    r = log.to_result()
    assert r.latency_ms.count == 105 and r.latency_ms.mean == pytest.approx(9.59066)
    assert r.memory_mb["peak_periodic"] == pytest.approx(23.4414)
    assert r.delegate_coverage["replaced_nodes"] == 66


@pytest.mark.parametrize("line, expected", [
    ("03-14 09:21:06.949 22871 22871 I tflite  : count=105 first=9588", ("I", "count=105 first=9588")),
    ("03-14 09:21:06.949 I/tflite  (22871): Graph: [/x.tflite]", ("I", "Graph: [/x.tflite]")),
    ("E/tflite  (22871): Failed to apply GPU delegate.", ("E", "Failed to apply GPU delegate.")),
    ("I/tflite: Num threads: [4]", ("I", "Num threads: [4]")),
    ("WARN: Explicitly applied XNNPACK delegate", ("WARN", "Explicitly applied XNNPACK delegate")),
    ("\t  CONV_2D\t  15", ("", "\t  CONV_2D\t  15")),
])
def test_strip_log_prefix(line, expected):
    assert strip_log_prefix(line) == expected


def test_failed_log_is_failed_with_the_specific_reason():
    log = parse_benchmark_log((DATA / "benchmark_model_gpu_failed.log").read_text())
    assert log.failed and log.failure_reason() == "Failed to apply GPU delegate."


def test_summary_line_only_keeps_mean_without_inventing_stats():
    line = "I/tflite  ( 9157): Inference timings in us: Init: 5685, First inference: 18535, " \
           "Warmup (avg): 14462.3, Inference (avg): 14575.2"
    r = parse_benchmark_log(line).to_result(model="m.tflite")
    assert r.latency_ms is None and r.extra["inference_avg_ms"] == pytest.approx(14.5752)
    assert r.throughput_per_s == pytest.approx(1000 / 14.5752, rel=1e-6)


def test_cli_parse_several_runs_to_json_file(tmp_path):
    text = (DATA / "benchmark_model_info_xnnpack.log").read_text() + (DATA / "benchmark_model_old_plain.log").read_text()
    assert len(split_runs(text)) == 2
    (tmp_path / "two.log").write_text(text)
    out = tmp_path / "res.json"
    result = invoke("device", "parse", tmp_path / "two.log", "-o", out)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["schema"] == "kcompress.bench/1" and doc["target"]["kind"] == "android"
    assert [r["latency_ms"]["mean"] for r in doc["results"]] == [pytest.approx(8.93246), pytest.approx(71.2503)]
    assert doc["results"][1]["latency_ms"]["p50"] is None  # NaN is written as null
    assert "mobilenet_v2_int8.tflite" in result.stdout  # table printed too


def test_cli_parse_apk_log_json_marks_runtime():
    result = invoke("device", "parse", DATA / "benchmark_apk_logcat.log", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["results"][0]["runtime"] == "benchmark_apk"
    assert doc["results"][0]["latency_ms"]["count"] == 105


def test_cli_parse_failed_log_is_one_line_error():
    result = invoke("device", "parse", DATA / "benchmark_model_gpu_failed.log")
    assert_one_line_error(result, 1, "Failed to apply GPU delegate.")


def test_cli_parse_missing_log(tmp_path):
    assert_one_line_error(invoke("device", "parse", tmp_path / "nope.txt"), 2, "log file not found")


# ---------------------------------------------------------------- helpers


def test_big_cores_and_mask():
    freqs = {int(k): v for k, v in PIXEL_FREQS.items()}
    assert dev.big_cores(freqs) == (4, 5, 6, 7) and dev.cpu_mask((4, 5, 6, 7)) == "f0"
    assert dev.big_cores({0: 2000000, 1: 2000000}) == ()  # all alike: no pinning
    assert dev.cpu_mask((0, 9)) == "201"


def test_parse_devices_states():
    text = ("* daemon not running; starting now at tcp:5037\n* daemon started successfully\n"
            "List of devices attached\n"
            "R58M123ABC             device usb:1-1 product:beyond1 model:SM_G973F device:beyond1 transport_id:1\n"
            "0123456789ABCDEF       unauthorized usb:1-2 transport_id:3\n"
            "emulator-5554\toffline transport_id:4\n"
            "ZY22ABC\tno permissions (missing udev rules? user is in the plugdev group); "
            "see [http://developer.android.com/tools/device.html] usb:1-4 transport_id:5\n")
    parsed = dev.parse_devices(text)
    assert [(s, st) for s, st, _ in parsed] == [("R58M123ABC", "device"), ("0123456789ABCDEF", "unauthorized"),
                                                ("emulator-5554", "offline"), ("ZY22ABC", "no permissions")]
    assert parsed[0][2]["model"] == "SM_G973F" and parsed[3][2]["usb"] == "1-4"


def test_config_rejects_bad_values():
    with pytest.raises(UsageError):
        dev.DeviceBenchConfig(delegates=("tpu",))
    with pytest.raises(UsageError):
        dev.DeviceBenchConfig(threads=(0,))


def test_find_adb_uses_android_home(tmp_path, monkeypatch):
    adb = tmp_path / "sdk" / "platform-tools" / "adb"
    adb.parent.mkdir(parents=True)
    adb.write_text("#!/bin/sh\n")
    adb.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("ANDROID_SDK_ROOT", raising=False)
    monkeypatch.setenv("ANDROID_HOME", str(tmp_path / "sdk"))
    assert dev.find_adb() == str(adb)
    monkeypatch.delenv("ANDROID_HOME")
    with pytest.raises(dev.AdbError, match="adb not found"):
        dev.find_adb()


# ---------------------------------------------------------------- device list


def test_device_list_shows_ready_unauthorized_and_offline(fake_adb):
    fake_adb.configure(devices=[
        {"serial": SERIAL, "state": "device", "attrs": "usb:1-1 product:panther model:Pixel_7 transport_id:3"},
        {"serial": "0123456789ABCDEF", "state": "unauthorized", "attrs": "usb:1-2 transport_id:4"},
        {"serial": "emulator-5554", "state": "offline", "attrs": "transport_id:5"},
    ])
    result = invoke("device", "list", "--adb", fake_adb.path, "--json")
    assert result.exit_code == 0, result.output
    rows = {d["serial"]: d for d in json.loads(result.stdout)}
    assert rows[SERIAL]["state"] == "device"
    assert (rows[SERIAL]["model"], rows[SERIAL]["soc"], rows[SERIAL]["board"]) == ("Pixel 7", "Google GS201", "gs201")
    assert (rows[SERIAL]["abi"], rows[SERIAL]["cpu_cores"], rows[SERIAL]["android_version"], rows[SERIAL]["sdk"]) \
        == ("arm64-v8a", 8, "14", 34)
    assert rows["0123456789ABCDEF"]["state"] == "unauthorized" and rows["emulator-5554"]["state"] == "offline"
    # only the ready device is asked for its properties
    assert [c[1] for c in fake_adb.commands() if c[-1] == "getprop"] == [SERIAL]

    table = invoke("device", "list", "--adb", fake_adb.path)
    assert table.exit_code == 0
    for text in (SERIAL, "unauthorized", "offline", "Pixel 7", "arm64-v8a", "14 (SDK 34)"):
        assert text in table.stdout


def test_device_list_without_devices_says_so(fake_adb):
    fake_adb.configure(devices=[])
    result = invoke("device", "list", "--adb", fake_adb.path)
    assert result.exit_code == 0 and "No devices" in result.stderr


# ---------------------------------------------------------------- device bench


def test_bench_end_to_end_json_and_commands(fake_adb, files):
    out = files / "phone.json"
    result = invoke("device", "bench", files / "m1.tflite", "--adb", fake_adb.path,
                    "--benchmark-binary", files / "benchmark_model", "--threads", "1,4", "--delegate", "xnnpack",
                    "--delegate", "gpu", "--runs", "20", "--warmup", "3", "--cooldown", "0", "-o", out)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["schema"] == "kcompress.bench/1"
    t = doc["target"]
    assert (t["kind"], t["serial"], t["model"], t["manufacturer"], t["soc"], t["abi"], t["cpu_cores"],
            t["android_version"], t["sdk"]) == ("android", SERIAL, "Pixel 7", "Google", "Google GS201",
                                                "arm64-v8a", 8, "14", 34)
    assert t["big_cores"] == [4, 5, 6, 7]
    results = doc["results"]
    assert [(r["model"], r["delegate"], r["threads"]) for r in results] == [
        ("m1.tflite", d, th) for d in ("xnnpack", "gpu") for th in (1, 4)]
    for r in results:
        base_us = {"xnnpack": 20000.0, "gpu": 9000.0}[r["delegate"]]
        assert r["runtime"] == "benchmark_model" and r["batch_size"] == 1
        assert r["latency_ms"]["mean"] == pytest.approx(base_us / r["threads"] / 1000)
        assert r["latency_ms"]["count"] == 20 and r["warmup_runs"] == 3
        assert r["memory_mb"]["overall"] == 5 + r["threads"] + 0.25
        assert r["memory_mb"]["peak_periodic"] == 9 + r["threads"] + 0.5
        assert r["model_bytes"] == 1004
        assert r["extra"]["cpu_mask"] == "f0"
        before, after = r["extra"]["battery_before"], r["extra"]["battery_after"]
        assert after["temperature_c"] > before["temperature_c"] and 0 < after["level"] <= 100
    gpu = [r for r in results if r["delegate"] == "gpu"][0]
    assert gpu["delegate_coverage"]["replaced_nodes"] == 29 and gpu["delegate_coverage"]["total_nodes"] == 31

    cmds = fake_adb.commands()
    assert all(c[:2] == ["-s", SERIAL] for c in cmds if c[:1] != ["devices"])
    pushes = [c[3:] for c in cmds if c[2:3] == ["push"]]
    assert [str(files / "benchmark_model"), f"{WORK}/benchmark_model"] in pushes
    assert [str(files / "m1.tflite"), f"{WORK}/m1.tflite"] in pushes
    runs = [s for s in fake_adb.shell_commands() if "benchmark_model " in s]
    assert len(runs) == 4
    for s in runs:
        assert f"taskset f0 ./benchmark_model --graph={WORK}/m" in s
        assert "--report_peak_memory_footprint=true" in s and "--num_runs=20" in s and "--warmup_runs=3" in s
    assert sum("--num_threads=1 " in s for s in runs) == 2 and sum("--num_threads=4 " in s for s in runs) == 2
    assert sum("--use_xnnpack=true" in s for s in runs) == 2 and sum("--use_gpu=true" in s for s in runs) == 2
    assert fake_adb.shell_commands()[-1] == f"rm -rf {WORK}"
    assert not fake_adb.device_path(WORK).exists()  # cleaned up
    assert [c[3] for c in cmds if c[2:3] == ["pull"]] == [f"{WORK}/run_{i}.log" for i in range(4)]


def test_bench_cpu_nnapi_flags_op_profiling_and_table(fake_adb, files):
    result = invoke(*bench_args(fake_adb, files, "--threads", "2", "--delegate", "cpu,nnapi", "--op-profiling"))
    assert result.exit_code == 0, result.output
    runs = [s for s in fake_adb.shell_commands() if "benchmark_model " in s]
    assert "--use_xnnpack=false" in runs[0] and "--use_nnapi=true" in runs[1]
    assert all("--enable_op_profiling=true" in s and "--num_threads=2" in s for s in runs)
    assert "Pixel 7" in result.stdout and "m1.tflite" in result.stdout and "30/31" in result.stdout
    assert "15.00" in result.stdout and "7.50" in result.stdout  # mean ms of cpu and nnapi at 2 threads


def test_bench_json_stdout_has_op_profile(fake_adb, files):
    result = invoke(*bench_args(fake_adb, files, "--threads", "1", "--op-profiling", "--json"))
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)["results"][0]
    assert r["delegate"] == "xnnpack"  # the default
    assert "--use_xnnpack=true" in [s for s in fake_adb.shell_commands() if "benchmark_model " in s][0]
    assert [row["node_type"] for row in r["op_profile"]] == ["CONV_2D", "FULLY_CONNECTED"]
    assert r["op_profile"][0]["count"] == 3


def test_bench_without_taskset_or_with_uniform_cores_does_not_pin(fake_adb, files):
    fake_adb.configure(taskset=False)
    assert invoke(*bench_args(fake_adb, files, "--threads", "1")).exit_code == 0
    fake_adb.configure(taskset=True, freqs={SERIAL: {str(i): 2000000 for i in range(4)}})
    result = invoke(*bench_args(fake_adb, files, "--threads", "1", "--json"))
    assert result.exit_code == 0
    assert json.loads(result.stdout)["results"][0]["extra"]["cpu_mask"] is None
    runs = [s for s in fake_adb.shell_commands() if "benchmark_model " in s]
    assert len(runs) == 2 and not any("taskset" in s for s in runs)


def test_bench_refuses_to_overwrite_output(fake_adb, files):
    out = files / "phone.json"
    out.write_text("keep me")
    result = invoke(*bench_args(fake_adb, files, "--threads", "1", "-o", out))
    assert_one_line_error(result, 1, "exists", "--overwrite")  # as every other command
    assert out.read_text() == "keep me" and fake_adb.commands() == []  # refused before touching the device
    result = invoke(*bench_args(fake_adb, files, "--threads", "1", "-o", out, "--overwrite"))
    assert result.exit_code == 0 and json.loads(out.read_text())["results"][0]["threads"] == 1
    assert [p.name for p in files.iterdir() if p.name.startswith(".kcompress-")] == []  # no temp file left


def test_cooldown_sleeps_between_runs_only_and_same_named_models_stay_apart(fake_adb, files):
    models = []
    for sub, size in (("a", 10), ("b", 20)):
        (files / sub).mkdir()
        (files / sub / "m.tflite").write_bytes(b"\x00" * size)
        models.append(str(files / sub / "m.tflite"))
    slept = []
    config = dev.DeviceBenchConfig(threads=(1,), delegates=("xnnpack",), cooldown_s=2.5)
    report = dev.bench_on_device(models, dev.Adb(fake_adb.path), config,
                                 benchmark_binary=str(files / "benchmark_model"), sleep=slept.append)
    assert slept == [2.5]
    assert [(r.model, r.model_bytes, r.extra["model_path"]) for r in report.results] == [
        ("m.tflite", 10, models[0]), ("m.tflite", 20, models[1])]
    runs = [s for s in fake_adb.shell_commands() if "benchmark_model " in s]
    assert f"--graph={WORK}/0_m.tflite" in runs[0] and f"--graph={WORK}/1_m.tflite" in runs[1]


def test_cooldown_really_sleeps(fake_adb, files):
    start = time.monotonic()
    result = invoke("device", "bench", files / "m1.tflite", "--adb", fake_adb.path,
                    "--benchmark-binary", files / "benchmark_model", "--threads", "1,2", "--cooldown", "0.4",
                    "--no-pin")
    assert result.exit_code == 0, result.output
    assert time.monotonic() - start >= 0.4
    runs = [s for s in fake_adb.shell_commands() if "benchmark_model " in s]
    assert len(runs) == 2 and not any("taskset" in s for s in runs)  # --no-pin


def test_bench_apk_mode_reads_logcat(fake_adb, files):
    result = invoke("device", "bench", files / "m1.tflite", "--adb", fake_adb.path, "--apk", "--threads", "4",
                    "--cooldown", "0", "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)["results"][0]
    assert r["runtime"] == "benchmark_apk" and r["latency_ms"]["mean"] == pytest.approx(5.0)
    assert r["memory_mb"]["overall"] == 9.25
    shell = fake_adb.shell_commands()
    starts = [s for s in shell if s.startswith("am start")]
    assert len(starts) == 1 and "org.tensorflow.lite.benchmark/.BenchmarkModelActivity --es args" in starts[0]
    assert f"--graph={WORK}/m1.tflite" in starts[0] and "--num_threads=4" in starts[0]
    assert ["logcat", "-c"] in [c[2:] for c in fake_adb.commands()]
    assert not any(c[2:3] == ["push"] and c[-1].endswith("benchmark_model") for c in fake_adb.commands())


def test_bench_apk_not_installed(fake_adb, files):
    fake_adb.configure(apk_installed=False)
    result = invoke("device", "bench", files / "m1.tflite", "--adb", fake_adb.path, "--apk")
    assert_one_line_error(result, 1, "benchmark APK", "not installed")


# ---------------------------------------------------------------- errors


def test_error_adb_not_found(files, tmp_path):
    result = invoke("device", "bench", files / "m1.tflite", "--adb", tmp_path / "no" / "adb",
                    "--benchmark-binary", files / "benchmark_model")
    assert_one_line_error(result, 1, "adb not found")
    assert_one_line_error(invoke("device", "list", "--adb", tmp_path / "no" / "adb"), 1, "adb not found")


def test_error_no_device(fake_adb, files):
    fake_adb.configure(devices=[])
    assert_one_line_error(invoke(*bench_args(fake_adb, files)), 1, "no Android device connected")


def test_error_several_devices_need_serial(fake_adb, files):
    other = "emulator-5554"
    fake_adb.configure(devices=[{"serial": SERIAL, "state": "device"}, {"serial": other, "state": "device"}],
                       props={SERIAL: PIXEL_PROPS, other: {**PIXEL_PROPS, "ro.product.model": "sdk_gphone64"}})
    assert_one_line_error(invoke(*bench_args(fake_adb, files)), 1, "2 devices connected", "--serial")
    result = invoke(*bench_args(fake_adb, files, "--serial", other, "--threads", "1", "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["target"]["model"] == "sdk_gphone64"
    assert_one_line_error(invoke(*bench_args(fake_adb, files, "--serial", "XYZ")), 1, "XYZ is not connected")


def test_error_unauthorized_device(fake_adb, files):
    fake_adb.configure(devices=[{"serial": SERIAL, "state": "unauthorized", "attrs": "usb:1-1 transport_id:2"}])
    assert_one_line_error(invoke(*bench_args(fake_adb, files)), 1, f"{SERIAL} is unauthorized", "USB debugging")
    assert_one_line_error(invoke(*bench_args(fake_adb, files, "--serial", SERIAL)), 1, "unauthorized")


def test_error_benchmark_binary_missing_or_wrong(fake_adb, files):
    args = bench_args(fake_adb, files)
    args[args.index("--benchmark-binary") + 1] = files / "missing_benchmark_model"
    assert_one_line_error(invoke(*args), 2, "benchmark binary not found")
    assert fake_adb.commands() == []
    no_binary = [a for a in bench_args(fake_adb, files) if a != files / "benchmark_model" and a != "--benchmark-binary"]
    assert_one_line_error(invoke(*no_binary), 2, "--benchmark-binary is required")
    (files / "benchmark_model").write_text("<html>404</html>")
    assert_one_line_error(invoke(*bench_args(fake_adb, files)), 2, "not an ELF file")
    (files / "benchmark_model").write_bytes(_elf(0x3E))  # x86_64 build for an arm64 phone
    assert_one_line_error(invoke(*bench_args(fake_adb, files)), 2, "built for x86_64", "arm64-v8a")


def test_error_model_missing(fake_adb, files):
    result = invoke("device", "bench", files / "nope.tflite", "--adb", fake_adb.path,
                    "--benchmark-binary", files / "benchmark_model")
    assert_one_line_error(result, 2, "model file not found", "nope.tflite")


@pytest.mark.parametrize("mode, fragment", [("exit", "exit 139"), ("failed_text", "Failed to apply GPU delegate.")])
def test_error_benchmark_fails_on_device_and_cleans_up(fake_adb, files, mode, fragment):
    fake_adb.configure(bench_mode=mode)
    result = invoke(*bench_args(fake_adb, files, "--delegate", "gpu"))
    assert_one_line_error(result, 1, "benchmark_model failed on", "m1.tflite (gpu, 1 threads)", fragment)
    assert fake_adb.shell_commands()[-1] == f"rm -rf {WORK}"


@pytest.mark.parametrize("option, value, fragment", [("--threads", "one", "--threads"),
                                                     ("--delegate", "tpu", "unknown delegate")])
def test_error_bad_options_exit_2(fake_adb, files, option, value, fragment):
    assert_one_line_error(invoke(*bench_args(fake_adb, files, option, value)), 2, fragment)


# ---------------------------------------------------------------- help and imports


@pytest.mark.parametrize("cmd", [[], ["list"], ["bench"], ["parse"]])
def test_help_teaches_with_examples(cmd):
    result = invoke("device", *cmd, "--help")
    assert result.exit_code == 0 and "kcompress device" in result.output


def test_top_level_help_lists_device_and_device_tools_do_not_import_tensorflow():
    assert "device" in invoke("--help").output
    code = ("import sys, kcompress.cli, kcompress.cli.device, kcompress.bench.android, kcompress.bench.logparse;"
            "assert 'tensorflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# ---------------------------------------------------------------- the device work folder and shell quoting


@pytest.mark.parametrize("work_dir", ["/data/local/tmp/", "/data/local/tmp/x;reboot", "x;reboot", "..",
                                      "/data/local/tmp/..", "/data/local/tmp/a/b", "/sdcard/kc", "a b", "$(reboot)"])
def test_bench_work_dir_must_be_one_plain_folder_under_data_local_tmp(fake_adb, files, work_dir):
    keep = fake_adb.device_path("/data/local/tmp/other/keep.txt")
    keep.parent.mkdir(parents=True)
    keep.write_text("someone else's file")
    result = invoke(*bench_args(fake_adb, files, "--work-dir", work_dir))
    assert_one_line_error(result, 2, "plain folder name under /data/local/tmp")
    assert keep.exists()
    assert not any("reboot" in " ".join(c) for c in fake_adb.commands())
    assert not any(s.startswith("rm") for s in fake_adb.shell_commands())
    with pytest.raises(UsageError, match="plain folder name"):
        dev.DeviceBenchConfig(work_dir=work_dir)


@pytest.mark.parametrize("work_dir", ["scratch", "/data/local/tmp/scratch", "/data/local/tmp/scratch/"])
def test_bench_work_dir_as_a_name_or_a_full_path(fake_adb, files, work_dir):
    result = invoke(*bench_args(fake_adb, files, "--threads", "1", "--work-dir", work_dir))
    assert result.exit_code == 0, result.output
    shell = fake_adb.shell_commands()
    assert shell[-1] == "rm -rf /data/local/tmp/scratch"
    assert any("--graph=/data/local/tmp/scratch/m1.tflite" in s for s in shell)
    assert not fake_adb.device_path("/data/local/tmp/scratch").exists()


def test_model_names_with_spaces_and_quotes_reach_the_device_safely(fake_adb, files):
    import shlex

    odd = files / "my model's \"best\".tflite"
    odd.write_bytes(b"TFL3" + b"\x00" * 100)
    for extra in ([], ["--apk"]):
        result = invoke("device", "bench", odd, "--adb", fake_adb.path, "--benchmark-binary",
                        files / "benchmark_model", "--threads", "1", "--cooldown", "0", "--json", *extra)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["results"][0]["model"] == odd.name
    pushes = [c[3:] for c in fake_adb.commands() if c[2:3] == ["push"]]
    assert [str(odd), f"{WORK}/my_model_s__best_.tflite"] in pushes  # the local path as one argument, no shell
    for command in fake_adb.shell_commands():
        words = shlex.split(command)  # every command the device shell gets parses
        paths = [w for word in words for w in word.split(" ") if w.startswith(("--graph=", WORK))]  # APK: one arg
        assert not any("'" in w or '"' in w for w in paths), command
