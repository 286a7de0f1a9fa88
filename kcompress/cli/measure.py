"""Commands that measure: demo, baseline, evaluate, bench, inspect.

Thin: parse options, call the Python API (``kcompress``), print the result. TensorFlow is imported inside the
functions only.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import click

from kcompress.cli import handle_errors
from kcompress.cli.console import (
    build,
    console,
    default_out,
    mb,
    ms,
    option,
    pct,
    preprocess,
    preprocess_options,
    print_json,
    print_table,
    trust_model_option,
    wrote,
)
from kcompress.errors import UsageError
from kcompress.options import BaselineOptions, BenchmarkOptions

__all__ = ["demo", "baseline", "evaluate", "bench", "inspect_cmd"]


KEY_SETTINGS = ("mode", "student_width", "temperature", "alpha", "method", "target_flops", "ratio", "sparsity",
                "qat", "io", "epochs")


# --------------------------------------------------------------------------------------------------------- demo
@click.command()
@click.argument("overrides", nargs=-1, metavar="[section.key=value ...]")
@click.option("-o", "--out", "out_dir", default="kcompress-demo", show_default=True, help="Folder for the run.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier demo in the output folder.")
@handle_errors
def demo(overrides, out_dir: str, overwrite: bool) -> None:
    """The whole flow on built-in data: train, distill, prune, quantize to int8, validate, benchmark, report.

    Runs configs/quickstart.yaml on scikit-learn's digits, offline, in a few minutes on 2 CPU cores. Every stage is
    validated on digits:val (VAL: chooses epochs and PTQ vs QAT) and measured on a quarter of digits:train held out
    as TEST (chose nothing; the .tflite in the LiteRT interpreter); the table compares each stage with the fp32
    baseline on TEST. Overrides work as in `kcompress run` (e.g. distill.epochs=5).

    \b
    Example:
      kcompress demo -o demo/
      kcompress demo -o demo/ prune.target_flops=0.5 --overwrite
    """
    from kcompress.pipeline.demo import run_demo

    con = console()
    result = run_demo(out_dir, overwrite=overwrite, log=lambda m: con.print(m, markup=False, soft_wrap=True),
                      overrides=tuple(overrides))
    base = result.rows[0]
    rows = []
    from kcompress.bench.schema import speedup

    for r in result.rows:
        # stages are timed at different moments: unpaired ratios of every trial pair give the interval
        speed = speedup(base.latency_p50_trials_ms or (base.latency_p50_ms,),
                        r.latency_p50_trials_ms or (r.latency_p50_ms,), paired=False) if r.latency_p50_ms else None
        rows.append([r.stage, "int8 .tflite" if r.kind == "tflite" else "fp32", pct(r.accuracy),
                     f"{100 * (r.accuracy - base.accuracy):+.2f}", "-" if r.params is None else f"{r.params:,}",
                     mb(r.size_bytes), f"{r.size_bytes / base.size_bytes:.2f}x", ms(r.latency_p50_ms),
                     "-" if speed is None else speed.text()])
    print_table(
        f"kcompress demo, accuracy on {base.split.upper()} (size and latency of each stage's .tflite; 1 thread, "
        "batch 1)",
        ["stage", "model", f"{base.split} accuracy", "Δ points", "params", "size", "size vs fp32", "p50 latency", "speed-up"],
        rows, con)
    con.print(f"Files written to {os.path.abspath(result.out_dir)}/ (final model: {result.rows[-1].path}; "
                  f"report: {result.report})")


# ----------------------------------------------------------------------------------------------------- baseline
@click.command()
@click.argument("model")
@click.option("--data", required=True, help="Validation data: image folder, .npz (x, y) or built-in name.")
@click.option("-o", "--out", default=None, help="Output JSON [default: MODEL_baseline.json].")
@option(BaselineOptions, "batch_sizes")
@option(BaselineOptions, "threads")
@option(BaselineOptions, "runs")
@option(BaselineOptions, "warmup")
@click.option("--limit", type=int, default=None, help="Evaluate a stratified random sample of N (seeded).")
@click.option("--json", "as_json", is_flag=True, help="Print the baseline record as JSON too.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@preprocess_options
@trust_model_option
@handle_errors
def baseline(model: str, data: str, out: Optional[str], batch_sizes: str, threads: int, runs: int, warmup: int,
             limit: Optional[int], as_json: bool, overwrite: bool, **kw) -> None:
    """Measure MODEL before compressing it, into one JSON file to commit next to it.

    Records parameters, theoretical fp32 size and real file sizes (input, SavedModel, fp32 .tflite), MACs/FLOPs,
    accuracy (top-1, top-5, per-class, macro F1, confusion matrix), latency at several batch sizes for Keras and
    the fp32 .tflite (mean/p50/p95/p99, throughput), peak memory, the data's class counts and the environment.

    \b
    Example:
      kcompress baseline model.keras --data val/ --scale 0.00392 -o baseline.json
    """
    import kcompress as kc
    from kcompress.io import check_output_path, write_json

    opts = build(BaselineOptions, batch_sizes=batch_sizes, threads=threads, runs=runs, warmup=warmup)
    out = out or default_out(model, "_baseline.json")
    check_output_path(out, overwrite)
    src = kc.open_data(data, preprocess(kw))
    b = kc.baseline(model, src, opts, limit=limit)
    write_json(out, b, overwrite)
    if as_json:
        print_json(b)
        wrote(out, err=True)
        return
    acc = b["accuracy"]
    con = console()
    rows = [
        ["parameters", f"{b['params']['total']:,}"],
        ["fp32 size (params x 4)", mb(b["size_bytes"]["theoretical_fp32"])],
        ["input file", mb(b["size_bytes"]["input_file"])],
        ["fp32 .tflite", mb(b["size_bytes"]["tflite_fp32"])],
        ["MACs / sample", f"{b['macs']:,}"],
        ["accuracy (top-1)", pct(acc["accuracy"])],
        ["top-5", pct(acc["top5_accuracy"])],
        ["macro F1", f"{acc['macro_f1']:.4f}"],
    ]
    for kind in ("keras", "tflite_fp32"):
        for r in b["latency"][kind]:
            rows.append([f"{kind} p50 @ batch {r['batch_size']}", ms(r["latency_ms"]["p50"])])
    rows.append(["peak memory, Keras (whole process)", f"{b['peak_memory_mb']:.0f} MB"])
    rows.append(["inference memory, fp32 .tflite", f"+{b['tflite_inference_memory_mb']:.1f} MB (LiteRT-only process)"])
    print_table(f"baseline of {model} on {src.name} ({src.num_samples} samples)", ["", "value"], rows, con)
    wrote(out)


# ----------------------------------------------------------------------------------------------------- evaluate
@click.command()
@click.argument("model")
@click.option("--data", required=True, help="Labelled data: image folder, .npz (x, y) or built-in name.")
@click.option("--reference", default=None, help="Another model or .tflite: agreement and per-class differences.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--limit", type=int, default=None, help="Only a stratified random sample of N (seeded).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (top level has 'accuracy').")
@preprocess_options
@trust_model_option
@handle_errors
def evaluate(model: str, data: str, reference: Optional[str], batch_size: int, limit: Optional[int],
             as_json: bool, **kw) -> None:
    """Accuracy of a Keras model, .tflite file (LiteRT) or .onnx file (ONNX Runtime) on labelled data.

    .tflite files with int8/uint8 inputs get them quantized with the file's own scale and zero point, so pass the
    same preprocessing flags as for the Keras model.

    \b
    Examples:
      kcompress evaluate model_int8.tflite --data val/ --scale 0.00392
      kcompress evaluate model_int8.tflite --data digits:val --scale 0.00392 --reference model.keras --json
    """
    from kcompress.data import open_data
    from kcompress.evaluation import compare
    from kcompress.evaluation import evaluate as run_eval

    src = open_data(data, preprocess(kw))
    ev = run_eval(model, src, batch_size=batch_size, limit=limit)
    result = {"model": model, "runtime": ev.runtime, "data": src.name, **ev.metrics}
    if reference:
        ref = run_eval(reference, src, batch_size=batch_size, limit=limit, description="evaluating reference")
        result["reference"] = {"model": reference, "runtime": ref.runtime, "accuracy": ref.accuracy,
                               **compare(ev, ref)}
    if as_json:
        print_json(result)
        return
    con = console()
    rows = [["runtime", ev.runtime], ["accuracy (top-1)", pct(ev.accuracy)], ["top-5", pct(ev.metrics["top5_accuracy"])],
            ["macro F1", f"{ev.metrics['macro_f1']:.4f}"], ["samples", ev.metrics["num_samples"]]]
    if reference:
        r = result["reference"]
        rows += [["reference accuracy", pct(r["accuracy"])], ["agreement (top-1)", pct(r["agreement"])],
                 ["Δ accuracy", f"{100 * r['accuracy_delta']:+.2f} pts"]]
        worst = list(r["per_class_recall_delta"].items())[:3]
        rows.append(["most-hurt classes", ", ".join(f"{k} {100 * v:+.1f}" for k, v in worst)])
    print_table(f"{model} on {src.name}", ["", "value"], rows, con)
    per_class = ev.metrics["per_class_recall"]
    con.print("per-class recall: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in per_class.items()))


# -------------------------------------------------------------------------------------------------------- bench
@click.command()
@click.argument("models", nargs=-1, required=True)
@option(BenchmarkOptions, "threads")
@option(BenchmarkOptions, "batch_sizes")
@option(BenchmarkOptions, "runs")
@option(BenchmarkOptions, "warmup")
@option(BenchmarkOptions, "trials")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (schema kcompress.bench/1).")
@click.option("-o", "--out", default=None, help="Also write the JSON here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@handle_errors
def bench(models, threads: str, batch_sizes: str, runs: int, warmup: int, trials: int, as_json: bool,
          out: Optional[str], overwrite: bool) -> None:
    """Latency (p50 with its range over repeated trials, mean, std, p95, p99), throughput and memory of .tflite
    files (LiteRT) and .onnx files (ONNX Runtime, CPU) on this host.

    Each model runs in a child process that loads only the LiteRT interpreter (no TensorFlow): memory is that
    process's peak resident set and its increase over the resident set after the imports. The interpreter applies
    its default CPU delegate (XNNPACK) where it can; the delegate column says what ran. Trials of several models
    are interleaved. The JSON schema is the one `kcompress device bench` writes for Android devices, so host and
    device results can be compared.

    \b
    Example:
      kcompress bench model_fp32.tflite model_int8.tflite --threads 1,2 --batch-sizes 1,8 -o bench.json
    """
    import kcompress as kc
    from kcompress.io import check_output_path, model_format

    for m in models:
        if model_format(m) not in ("tflite", "onnx"):
            raise UsageError(f"{m}: bench takes .tflite and .onnx files (convert Keras models with kcompress "
                             "quantize or kcompress export)")
    opts = build(BenchmarkOptions, threads=threads, batch_sizes=batch_sizes, runs=runs, warmup=warmup,
                 trials=trials)
    if out:
        check_output_path(out, overwrite)
    report = kc.benchmark(models, opts.threads, opts.batch_sizes, opts.runs, opts.warmup, opts.trials)
    if out:
        from kcompress.io import atomic_write_bytes

        atomic_write_bytes(out, (report.to_json() + "\n").encode(), overwrite=overwrite)
    if as_json:
        click.echo(report.to_json())
    else:
        _print_bench(report, opts)
    if out:
        wrote(out, err=as_json)


def _print_bench(report, opts: BenchmarkOptions) -> None:
    """One row per result: p50 as the median of the trials' p50s with their range, the pooled statistics, I/O
    dtype, delegate and memory (peak RSS of the LiteRT-only child, and its increase over the post-import RSS)."""
    def sig(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"

    rows = []
    for r in report.results:
        s, p, mem, io = r.latency_ms, r.p50_interval, r.memory_mb, r.extra.get("io") or {}
        peak, increase = mem.get("peak_rss"), mem.get("rss_increase")
        rows.append([os.path.basename(r.model), r.runtime, r.threads, r.batch_size, io.get("input", "-"), r.delegate,
                     f"{sig(p.median)} ({sig(p.low)}-{sig(p.high)})", sig(s.mean), sig(s.std), sig(s.p95),
                     sig(s.p99), f"{r.throughput_per_s:.1f}/s", sig(r.init_ms), sig(r.first_inference_ms),
                     "-" if peak is None else f"{peak:.1f}" + ("" if increase is None else f" (+{increase:.1f})")])
    print_table(f"{report.target['cpu']}: {opts.trials} trials x {opts.runs} runs, {opts.warmup} warm-up; "
                "p50: median of trial p50s (range); cold start (not in the percentiles): load = model load and "
                "tensor allocation or session creation, first = first inference; memory: peak RSS (+ over "
                "post-import RSS)",
                ["model", "runtime", "threads", "batch", "input", "delegate", f"p50 ms, {opts.trials} trials", "mean ms",
                 "std ms", "p95 ms", "p99 ms", "throughput", "load ms", "first ms", "memory MB"], rows, console())


# ------------------------------------------------------------------------------------------------------ inspect
@click.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@trust_model_option
@handle_errors
def inspect_cmd(model: str, as_json: bool) -> None:
    """Layers (Keras), ops and tensors (.tflite) or nodes (.onnx): shapes, dtypes, parameters, quantization.

    For a .tflite file it says which compute ops stayed float and counts QUANTIZE/DEQUANTIZE ops, so a
    "quantized" model that is mostly float shows at a glance.

    \b
    Examples:
      kcompress inspect model.keras
      kcompress inspect model_int8.tflite --json
      kcompress inspect model_int8.onnx
    """
    import kcompress as kc

    info = kc.inspect(model)
    if as_json:
        print_json(info)
        return
    con = console()
    if info["format"] == "onnx":
        _print_onnx(con, model, info)
        return
    if info["format"] != "tflite":
        rows = [[l["name"], l["class"], l["output_shape"], l["dtype"], f"{l['params']:,}", mb(l["bytes"]),
                 "-" if l["macs"] is None else f"{l['macs']:,}"] for l in info["layers"]]
        print_table(f"{model} ({info['format']})", ["layer", "type", "output", "dtype", "params", "bytes",
                                                             "MACs"], rows, con)
        macs = f"{info['macs']:,} MACs per sample" if info["macs"] is not None else f"MACs: {info['macs_note']}"
        con.print(f"{info['params']['total']:,} parameters, {macs}")
        return
    rows = []
    for op in info["ops"]:
        o = op["outputs"][0] if op["outputs"] else {}
        q = o.get("quantization")
        qs = "-" if not q else (f"scale {q['scale']:.3g} zp {q['zero_point']}" if "scale" in q
                                else f"per-channel x{q['per_channel']}")
        weights = [i for i in op["inputs"][1:] if i.get("quantization") and "per_channel" in i["quantization"]]
        if weights:
            qs += f"; weights per-channel x{weights[0]['quantization']['per_channel']}"
        rows.append([op["index"], op["op"], str(o.get("shape")), o.get("dtype"), qs])
    print_table(f"{model} ({mb(info['file_bytes'])})", ["#", "op", "output", "dtype", "quantization"], rows, con)
    f = info["float_ops"]
    con.print(
        f"{f['ops']} ops; float compute ops: {f['float_compute_op_count']} "
        f"({', '.join(f['float_compute_ops']) or 'none'}); QUANTIZE {f['quantize_ops']}, DEQUANTIZE {f['dequantize_ops']}"
    )
    if info.get("metadata"):
        meta = info["metadata"]
        con.print(f"kcompress metadata: model {meta.get('model_name') or '-'}, kcompress "
                  f"{meta.get('kcompress_version')}, config hash {meta.get('config_hash') or '-'}")
        if meta.get("input"):
            pre = meta["input"]["preprocess"]
            con.print(f"  feed it: {meta['input']['source']}; then x * {pre['scale']:g} + {pre['offset']:g}, "
                      f"(x - {pre['mean']}) / {pre['std']}", markup=False)
        if meta.get("class_names"):
            names = meta["class_names"]
            con.print(f"  classes ({len(names)}): {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}",
                      markup=False)
        for st in meta.get("stages", []):
            acc = st.get("val_accuracy", st.get("accuracy"))
            test = f", test {pct(st['test_accuracy'])}" if st.get("test_accuracy") is not None else ""
            con.print(f"  {st['stage']}: val accuracy {pct(acc)}{test}; " + ", ".join(
                f"{k}={v}" for k, v in st.get("settings", {}).items() if k in KEY_SETTINGS))
        if meta.get("metrics"):
            con.print("  validated metrics (val): " + json.dumps(meta["metrics"], sort_keys=True))
    con.print("tensor bytes by dtype: " + ", ".join(f"{k} {mb(v['bytes'])}" for k, v in info["tensor_dtypes"].items()))


def _print_onnx(con, path: str, info: dict) -> None:
    """An .onnx file: op counts, weight bytes per dtype, QDQ pairs and per-channel scales, what stayed float."""
    print_table(f"{path} ({mb(info['file_bytes'])}, opset {info['opset']}, {info['producer']})", ["op", "count"],
                [[op, n] for op, n in info["op_counts"].items()], con)
    io = "; ".join(f"{v['name']} {v['shape']} {v['dtype']}" for v in info["inputs"] + info["outputs"])
    con.print(f"inputs/outputs: {io}", markup=False)
    q = info["quantization"]
    con.print("weights: " + ", ".join(f"{k} {mb(v)}" for k, v in info["initializer_bytes"].items())
              + f"; QuantizeLinear {q['quantize_linear']}, DequantizeLinear {q['dequantize_linear']} (weights "
              f"per-channel {q['weights_per_channel']}, per-tensor {q['weights_per_tensor']}); float compute ops: "
              f"{len(q['float_compute_ops'])}", markup=False)
    if info.get("metadata"):
        con.print(f"kcompress export record: {info['metadata']}", markup=False)

