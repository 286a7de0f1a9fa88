"""``kcompress device ...``: the click layer over ``kcompress.device`` and ``kcompress.benchmark_log``.

Thin on purpose: options are parsed here, the work happens in the API. Progress goes to stderr so that
``--json`` output on stdout stays clean. Imports no TensorFlow.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import click

from kcompress.cli import handle_errors
from kcompress.cli.console import int_list, print_table, wrote
from kcompress.errors import UsageError
from kcompress.io import check_output_path

__all__ = ["device"]


def _split_multi(values: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for v in values:
        out.extend(x.strip().lower() for x in v.split(",") if x.strip())
    return tuple(dict.fromkeys(out))


def _fmt(value: Optional[float], digits: int = 2) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.{digits}f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"


def _print_results(report: Any) -> None:
    t = report.target
    title = " ".join(str(x) for x in (t.get("manufacturer"), t.get("model")) if x) or "Android device"
    details = ", ".join(str(x) for x in (t.get("serial"), t.get("soc") or t.get("board"), t.get("abi"),
                                         t.get("android_version") and f"Android {t['android_version']}") if x)
    rows = []
    for r in report.results:
        lat = r.latency_ms
        mean = lat.mean if lat else r.extra.get("inference_avg_ms")
        cov = r.delegate_coverage
        delegated = f"{cov['replaced_nodes']}/{cov['total_nodes'] or '?'}" if cov else "-"
        before = (r.extra.get("battery_before") or {}).get("temperature_c")
        after = (r.extra.get("battery_after") or {}).get("temperature_c")
        temp = f"{before:g}->{after:g}" if before is not None and after is not None else "-"
        rows.append([r.model, r.delegate, r.threads or "-", lat.count if lat else "-", _fmt(mean),
                     _fmt(lat.p50 if lat else None), _fmt(lat.p95 if lat else None), _fmt(lat.min if lat else None),
                     _fmt(r.init_ms, 1), _fmt(r.memory_mb.get("overall"), 1),
                     _fmt(r.memory_mb.get("peak_periodic"), 1), delegated, temp])
    print_table(f"{title} ({details})" if details else title,
                ["model", "delegate", "threads", "runs", "mean ms", "p50 ms", "p95 ms", "min ms", "init ms", "mem MB",
                 "peak MB", "delegated", "temp C"], rows)


def _emit(report: Any, as_json: bool, out: Optional[str], overwrite: bool) -> None:
    text = report.to_json()
    if out:
        from kcompress.io import atomic_write_bytes

        atomic_write_bytes(out, (text + "\n").encode(), overwrite=overwrite)
        wrote(out, f"{len(report.results)} result(s)", err=True)
    if as_json:
        click.echo(text)
    else:
        _print_results(report)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def device() -> None:
    """Benchmark .tflite files on Android devices over adb.

    \b
    Results use the same JSON schema as `kcompress bench`, so device and host numbers sit side by side in a
    report. Preparing a phone and getting benchmark_model: android_bench/README.md.

    \b
      kcompress device list
      kcompress device bench model_int8.tflite --benchmark-binary ./benchmark_model --threads 1,4 -o phone.json
      kcompress device parse captured_benchmark_output.txt --json
    """


_adb_option = click.option("--adb", "adb_path", metavar="PATH",
                           help="adb executable (default: adb on PATH, then $ANDROID_HOME/platform-tools/adb).")


@device.command("list")
@_adb_option
@click.option("--json", "as_json", is_flag=True, help="Print the devices as JSON.")
@handle_errors
def list_cmd(adb_path: Optional[str], as_json: bool) -> None:
    """List connected devices: serial, state, model, SoC/board, ABI, CPU cores, Android version.

    \b
    Devices that are unauthorized (accept the USB debugging prompt on the phone), offline or without
    permissions are listed with their state.

    \b
      kcompress device list
      kcompress device list --adb ~/Android/Sdk/platform-tools/adb --json
    """
    from kcompress.bench.android import Adb, find_adb, list_devices

    devices = list_devices(Adb(find_adb(adb_path)))
    if as_json:
        click.echo(json.dumps([{**d.target(), "state": d.state} for d in devices], indent=2))
        return
    if not devices:
        click.echo("No devices: adb lists none. Connect a phone with USB debugging enabled "
                   "(see android_bench/README.md).", err=True)
        return
    rows = [[d.serial, d.state, " ".join(x for x in (d.manufacturer, d.model) if x) or "-",
             " / ".join(x for x in (d.soc, d.board) if x) or "-", d.abi or "-", d.cpu_cores or "-",
             f"{d.android_version} (SDK {d.sdk})" if d.android_version else "-"] for d in devices]
    print_table(None, ["serial", "state", "model", "SoC / board", "ABI", "cores", "Android"], rows)


@device.command("bench")
@click.argument("models", nargs=-1, required=True, metavar="MODEL.tflite...")
@click.option("--serial", "-s", metavar="S", help="Device serial (required when several devices are connected).")
@_adb_option
@click.option("--benchmark-binary", metavar="PATH",
              help="LiteRT benchmark_model built for the device's ABI (pushed to the device).")
@click.option("--apk", is_flag=True, help="Drive the installed benchmark APK instead; timings come from logcat.")
@click.option("--threads", default="1,4", show_default=True, help="Comma-separated thread counts.")
@click.option("--delegate", "delegates", multiple=True, metavar="cpu|xnnpack|gpu|nnapi",
              help="Delegate(s) to run; repeat or comma-separate. Default: xnnpack.")
@click.option("--runs", default=50, show_default=True, help="Measured runs per combination.")
@click.option("--warmup", default=5, show_default=True, help="Warm-up runs (not measured).")
@click.option("--cooldown", default=5.0, show_default=True, metavar="SECONDS",
              help="Pause between combinations so the phone cools down.")
@click.option("--op-profiling", is_flag=True, help="Also record per-op timings (--enable_op_profiling).")
@click.option("--no-pin", is_flag=True, help="Do not pin to the big cores with taskset.")
@click.option("--timeout", default=600.0, show_default=True, metavar="SECONDS", help="Limit for one run.")
@click.option("--work-dir", default="kcompress", show_default=True, metavar="NAME",
              help="Folder on the device, emptied before and removed after the run: one plain name under "
                   "/data/local/tmp (NAME or /data/local/tmp/NAME).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("-o", "--out", metavar="FILE", help="Write the results JSON to FILE.")
@click.option("--overwrite", is_flag=True, help="Replace FILE if it exists.")
@handle_errors
def bench_cmd(models: tuple[str, ...], serial: Optional[str], adb_path: Optional[str],
              benchmark_binary: Optional[str], apk: bool, threads: str, delegates: tuple[str, ...], runs: int,
              warmup: int, cooldown: float, op_profiling: bool, no_pin: bool, timeout: float, as_json: bool,
              out: Optional[str], overwrite: bool, work_dir: str) -> None:
    """Benchmark .tflite files on an Android device with LiteRT's benchmark_model.

    Pushes the binary and the models to /data/local/tmp/kcompress/ (--work-dir), runs every model x delegate x threads
    combination (peak memory reported, pinned to the big cores where taskset exists, --cooldown seconds apart,
    battery temperature recorded before and after each run), then removes the files from the device.

    \b
      kcompress device bench model_int8.tflite --benchmark-binary ./android_aarch64_benchmark_model
      kcompress device bench fp32.tflite int8.tflite --benchmark-binary ./benchmark_model \\
          --threads 1,4 --delegate xnnpack --delegate gpu --cooldown 10 -o phone.json
      kcompress device bench model.tflite --apk --serial R58M123ABC --json
    """
    from kcompress.bench.android import Adb, DeviceBenchConfig, bench_on_device, find_adb

    if out:
        check_output_path(out, overwrite)
    config = DeviceBenchConfig(
        threads=int_list(threads, "--threads"),
        delegates=_split_multi(delegates) or ("xnnpack",),
        runs=runs,
        warmup=warmup,
        cooldown_s=cooldown,
        op_profiling=op_profiling,
        pin_big_cores=not no_pin,
        apk=apk,
        timeout_s=timeout,
        work_dir=work_dir,
    )
    report = bench_on_device(list(models), Adb(find_adb(adb_path)), config, benchmark_binary=benchmark_binary,
                             serial=serial, log=lambda msg: click.echo(msg, err=True))
    _emit(report, as_json, out, overwrite)


@device.command("parse")
@click.argument("log", metavar="LOG")
@click.option("--model", help="Model name to record (default: from the log's Graph line).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("-o", "--out", metavar="FILE", help="Write the results JSON to FILE.")
@click.option("--overwrite", is_flag=True, help="Replace FILE if it exists.")
@handle_errors
def parse_cmd(log: str, model: Optional[str], as_json: bool, out: Optional[str], overwrite: bool) -> None:
    """Parse benchmark_model output captured by hand into the kcompress result schema.

    LOG is a file (or - for stdin) holding a plain run, an INFO:-prefixed run, or logcat lines from the
    benchmark APK; several runs in one file (one STARTING! each) give several results. Failed runs are
    reported on stderr and skipped; no usable run is an error.

    \b
      adb shell /data/local/tmp/benchmark_model --graph=/data/local/tmp/m.tflite > run.txt 2>&1
      kcompress device parse run.txt
      adb logcat -d -s tflite > apk.txt && kcompress device parse apk.txt --json -o phone.json
    """
    from kcompress.bench.android import BenchmarkFailed
    from kcompress.bench.logparse import parse_benchmark_log, split_runs
    from kcompress.bench.schema import BenchReport

    if out:
        check_output_path(out, overwrite)
    if log == "-":
        text = sys.stdin.read()
    else:
        if not os.path.isfile(log):
            raise UsageError(f"log file not found: {log}")
        with open(log, encoding="utf-8", errors="replace") as f:
            text = f.read()
    results = []
    failures = []
    for n, piece in enumerate(split_runs(text), 1):
        parsed = parse_benchmark_log(piece)
        if parsed.failed:
            failures.append(f"run {n}: {parsed.failure_reason()}")
            continue
        results.append(parsed.to_result(model=model, runtime="benchmark_apk" if parsed.logcat else "benchmark_model",
                                        extra={"source": os.path.abspath(log) if log != "-" else "stdin"}))
    for f in failures:
        click.echo(f"Warning: skipped failed {f}", err=True)
    if not results:
        raise BenchmarkFailed(f"no benchmark results in {log}: "
                              + (failures[0] if failures else "no benchmark_model timings found"))
    target = {"kind": "android", "serial": None, "model": None, "manufacturer": None, "soc": None, "board": None,
              "abi": None, "cpu_cores": None, "android_version": None, "sdk": None, "source": "parsed log"}
    _emit(BenchReport(target=target, results=tuple(results)), as_json, out, overwrite)
