"""Click commands of the foundation: demo, baseline, quantize, evaluate, bench, inspect.

Thin: parse options, call the Python API, print. TensorFlow is imported inside the functions only.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import click

from kcompress.cli import handle_errors
from kcompress.errors import UsageError

__all__ = ["demo", "baseline", "quantize", "evaluate", "bench", "inspect_cmd", "preprocess_options", "int_list"]


KEY_SETTINGS = ("mode", "student_width", "temperature", "alpha", "method", "target_flops", "ratio", "sparsity",
                "qat", "io", "epochs")


def int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated whole numbers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{what}: expected comma-separated numbers >= 1, got {text!r}")
    return values


def preprocess_options(fn):
    """--scale/--offset/--mean/--std, applied identically to Keras, calibration and TFLite evaluation."""
    opts = [
        click.option("--scale", default=None, help="Multiply inputs by this (e.g. 1/255 or 0.00392)."),
        click.option("--offset", default=None, help="Then add this."),
        click.option("--mean", default=None, help="Then subtract this (one value or per-channel: 123.7,116.3,103.5)."),
        click.option("--std", default=None, help="Then divide by this (one value or per-channel)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _preprocess(kw):
    from kcompress.data import Preprocess

    return Preprocess.parse(kw.pop("scale"), kw.pop("offset"), kw.pop("mean"), kw.pop("std"))


def _console():
    import sys

    from rich.console import Console

    # tables must not wrap into unreadable columns in logs and pipes
    return Console(highlight=False, width=None if sys.stdout.isatty() else 140)


def _table(title: Optional[str], headers, rows):
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[str(c) for c in r])
    return t


def _mb(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _default_out(path: str, suffix: str) -> str:
    base = path.rstrip("/")
    for ext in (".keras", ".h5", ".tflite"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base + suffix


# --------------------------------------------------------------------------------------------------------- demo
@click.command()
@click.argument("overrides", nargs=-1, metavar="[section.key=value ...]")
@click.option("-o", "--out", "out_dir", default="kcompress-demo", show_default=True, help="Folder for the run.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier demo in the output folder.")
@handle_errors
def demo(overrides, out_dir: str, overwrite: bool) -> None:
    """The whole flow on built-in data: train, distill, prune, quantize to int8, validate, benchmark, report.

    Runs configs/quickstart.yaml on scikit-learn's digits, offline, in a few minutes on 2 CPU cores. Every stage is
    validated on digits:val (the .tflite in the LiteRT interpreter) and the table compares each stage with the
    fp32 baseline. Overrides work as in `kcompress run` (e.g. distill.epochs=5).

    \b
    Example:
      kcompress demo -o demo/
      kcompress demo -o demo/ prune.target_flops=0.5 --overwrite
    """
    from kcompress.demo import run_demo

    console = _console()
    result = run_demo(out_dir, overwrite=overwrite, log=lambda m: console.print(m, markup=False),
                      overrides=tuple(overrides))
    base = result.rows[0]
    rows = []
    for r in result.rows:
        speed = (base.latency_p50_ms / r.latency_p50_ms) if r.latency_p50_ms else None
        rows.append([r.stage, "int8 .tflite" if r.kind == "tflite" else "fp32", _pct(r.accuracy),
                     f"{100 * (r.accuracy - base.accuracy):+.2f}", "-" if r.params is None else f"{r.params:,}",
                     _mb(r.size_bytes), f"{r.size_bytes / base.size_bytes:.2f}x", _ms(r.latency_p50_ms),
                     "-" if speed is None else f"{speed:.2f}x"])
    console.print(_table(
        "kcompress demo on digits:val (size and latency of each stage's .tflite; 1 thread, batch 1)",
        ["stage", "model", "accuracy", "Δ points", "params", "size", "size vs fp32", "p50 latency", "speed-up"],
        rows))
    console.print(f"Files written to {os.path.abspath(result.out_dir)}/ (final model: {result.rows[-1].path}; "
                  f"report: {result.report})")


# ----------------------------------------------------------------------------------------------------- baseline
@click.command()
@click.argument("model")
@click.option("--data", required=True, help="Validation data: image folder, .npz (x, y) or built-in name.")
@click.option("-o", "--out", default=None, help="Output JSON [default: MODEL_baseline.json].")
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="Batch sizes to time.")
@click.option("--threads", default=1, show_default=True, help="Interpreter threads for the .tflite timings.")
@click.option("--runs", default=30, show_default=True, help="Timed runs per configuration (after warm-up).")
@click.option("--warmup", default=5, show_default=True, help="Warm-up runs, not timed.")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N samples.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@preprocess_options
@handle_errors
def baseline(model: str, data: str, out: Optional[str], batch_sizes: str, threads: int, runs: int, warmup: int,
             limit: Optional[int], overwrite: bool, **kw) -> None:
    """Measure MODEL before compressing it, into one JSON file to commit next to it.

    Records parameters, theoretical fp32 size and real file sizes (input, SavedModel, fp32 .tflite), MACs/FLOPs,
    accuracy (top-1, top-5, per-class, macro F1, confusion matrix), latency at several batch sizes for Keras and
    the fp32 .tflite (mean/p50/p95/p99, throughput), peak memory, the data's class counts and the environment.

    \b
    Example:
      kcompress baseline model.keras --data val/ --scale 0.00392 -o baseline.json
    """
    from kcompress.baseline import measure_baseline
    from kcompress.data import open_data
    from kcompress.models import check_output_path, write_json

    sizes = int_list(batch_sizes, "--batch-sizes")
    out = out or _default_out(model, "_baseline.json")
    check_output_path(out, overwrite)
    src = open_data(data, _preprocess(kw))
    b = measure_baseline(model, src, batch_sizes=sizes, threads=threads, runs=runs, warmup=warmup, limit=limit)
    write_json(out, b, overwrite)
    acc = b["accuracy"]
    console = _console()
    rows = [
        ["parameters", f"{b['params']['total']:,}"],
        ["fp32 size (params x 4)", _mb(b["size_bytes"]["theoretical_fp32"])],
        ["input file", _mb(b["size_bytes"]["input_file"])],
        ["fp32 .tflite", _mb(b["size_bytes"]["tflite_fp32"])],
        ["MACs / sample", f"{b['macs']:,}"],
        ["accuracy (top-1)", _pct(acc["accuracy"])],
        ["top-5", _pct(acc["top5_accuracy"])],
        ["macro F1", f"{acc['macro_f1']:.4f}"],
    ]
    for kind in ("keras", "tflite_fp32"):
        for r in b["latency"][kind]:
            rows.append([f"{kind} p50 @ batch {r['batch_size']}", _ms(r["latency_ms"]["p50"])])
    rows.append(["peak memory (RSS)", f"{b['peak_memory_mb']:.0f} MB"])
    console.print(_table(f"baseline of {model} on {src.name} ({src.num_samples} samples)", ["", "value"], rows))
    console.print(f"Wrote {out}")


# ----------------------------------------------------------------------------------------------------- quantize
@click.command()
@click.argument("model")
@click.option("--data", required=True, help="Data to draw calibration samples from (and to evaluate on).")
@click.option("--mode", type=click.Choice(["dynamic", "float16", "int8", "int16x8"]), default="int8",
              show_default=True, help="dynamic: int8 weights; float16: fp16 weights; int8: full integer; "
              "int16x8: int16 activations, int8 weights.")
@click.option("-o", "--out", default=None, help="Output .tflite [default: MODEL_<mode>.tflite].")
@click.option("--val-data", default=None, help="Evaluate on this instead of --data.")
@click.option("--calibration-samples", default=200, show_default=True, help="Representative samples for int8.")
@click.option("--per-tensor", is_flag=True, help="One scale per weight tensor instead of per channel.")
@click.option("--io", type=click.Choice(["int8", "uint8", "float"]), default=None,
              help="Input/output type [default: int8 for --mode int8, else float].")
@click.option("--float-layers", default="", help="Comma-separated Keras layer names to keep in float; "
              "'first' and 'last' name the first/last layer with weights; 'auto' keeps the fewest, most "
              "sensitive layers float so the drop stays within --max-drop.")
@click.option("--max-drop", type=float, default=None, help="With --float-layers auto: accuracy points you can lose.")
@click.option("--limit", type=int, default=None, help="Evaluate on the first N samples only.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@preprocess_options
@handle_errors
def quantize(model: str, data: str, mode: str, out: Optional[str], val_data: Optional[str],
             calibration_samples: int, per_tensor: bool, io: Optional[str], float_layers: str,
             max_drop: Optional[float], limit: Optional[int], overwrite: bool, **kw) -> None:
    """Post-training quantization of MODEL to a .tflite file, checked in the LiteRT interpreter.

    Prints accuracy, size and latency (1 thread, batch 1) before and after, and a hint when the quantized model
    is measured slower than fp32 (dynamic range often is on CPU).

    \b
    Examples:
      kcompress quantize model.keras --data train/ --val-data val/ --scale 0.00392
      kcompress quantize model.keras --data digits:train --mode int8 --float-layers first,last
      kcompress quantize model.keras --data train/ --val-data val/ --float-layers auto --max-drop 0.3
    """
    from kcompress.benchmark import bench_tflite
    from kcompress.convert import QuantizeOptions, convert, resolve_float_layers
    from kcompress.data import check_fits, open_data
    from kcompress.evaluate import evaluate
    from kcompress.models import (atomic_write_bytes, check_output_path, input_shape, load_model, model_format,
                                  num_classes, path_size)
    from kcompress.runtime import TFLiteModel

    out = out or _default_out(model, f"_{mode}.tflite")
    check_output_path(out, overwrite)
    pre = _preprocess(kw)
    names = tuple(n.strip() for n in float_layers.split(",") if n.strip())
    exported = model_format(model) == "exported"  # an inference-only SavedModel: the converter reads the folder
    if exported:
        if names:
            raise UsageError("--float-layers needs the Keras model (layer names); an exported SavedModel has none")
        source = model
        fp32 = convert(model)
        reference = TFLiteModel(fp32)
        shape, classes = reference.input_shape, int(reference.output["shape"][-1])
    else:
        source = load_model(model, stage="quantize")
        shape, classes = input_shape(source), num_classes(source)
    src = open_data(data, pre)
    val = open_data(val_data, pre) if val_data else src
    check_fits(src, shape, classes)
    check_fits(val, shape, classes)
    console = _console()
    auto = names == ("auto",)
    if auto:
        if mode != "int8" or exported:
            raise UsageError("--float-layers auto needs --mode int8 and a Keras model")
        from kcompress.sensitivity import auto_float_layers

        max_drop = 0.3 if max_drop is None else max_drop
        console.print(f"Choosing float layers so the drop stays within {max_drop} points ...")
        names, plan = auto_float_layers(source, calibration_data=src, val_data=val, max_drop=max_drop,
                                        calibration_samples=calibration_samples, per_channel=not per_tensor, io=io,
                                        log=lambda m: console.print(m, markup=False))
        for row in plan.get("chosen", []):
            console.print(f"  keeping {row['layer']} in float costs {_mb(row['float_cost_bytes'])} "
                          f"(SQNR {row['sqnr_db']:.1f} dB)")
        if not names:
            console.print("  plain int8 is already within the budget: no layer kept in float")
    elif max_drop is not None:
        raise UsageError("--max-drop goes with --float-layers auto")
    opts = QuantizeOptions(
        mode=mode, calibration_samples=calibration_samples, per_channel=not per_tensor, io=io,
        float_layers=tuple(names) if auto else (resolve_float_layers(source, names) if names else ()),
    )
    console.print(f"Converting {model} ({mode}, {'per-tensor' if per_tensor else 'per-channel'} weights) ...")
    if not exported:
        fp32 = convert(source)
    quant = convert(source, opts, calibration=lambda: src.calibration_samples(shape, calibration_samples))
    atomic_write_bytes(out, quant, overwrite=overwrite)
    before = evaluate(fp32 if exported else source, val, limit=limit,
                      description="evaluating fp32" if exported else "evaluating keras")
    after = evaluate(out, val, limit=limit, description="evaluating tflite")
    lat_fp32 = bench_tflite(fp32, threads=1, runs=50, warmup=10).latency_ms.p50
    lat_q = bench_tflite(out, threads=1, runs=50, warmup=10).latency_ms.p50
    rows = [
        ["accuracy", _pct(before.accuracy), _pct(after.accuracy), f"{100 * (after.accuracy - before.accuracy):+.2f} pts"],
        ["size", _mb(path_size(model)) + " (input)", _mb(len(quant)), f"{len(quant) / len(fp32):.2f}x of fp32 .tflite"],
        ["p50 latency", _ms(lat_fp32) + " (fp32 .tflite)", _ms(lat_q), f"{lat_fp32 / lat_q:.2f}x speed-up"],
    ]
    console.print(_table(f"{mode} on {val.name} ({after.metrics['num_samples']} samples)",
                         ["", "before", "after", "change"], rows))
    if opts.float_layers:
        console.print(f"Kept in float: {', '.join(opts.float_layers)}")
    if lat_q > lat_fp32 * 1.05:
        console.print(
            f"Hint: {mode} measured {lat_q / lat_fp32:.2f}x SLOWER than fp32 here (1 thread, batch 1). "
            + ("Dynamic-range kernels quantize activations on the fly; try --mode int8. " if mode == "dynamic" else "")
            + "Measure on the target device before choosing (kcompress device bench)."
        )
    console.print(f"Wrote {out}")


# ----------------------------------------------------------------------------------------------------- evaluate
@click.command()
@click.argument("model")
@click.option("--data", required=True, help="Labelled data: image folder, .npz (x, y) or built-in name.")
@click.option("--reference", default=None, help="Another model or .tflite: agreement and per-class differences.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first N samples.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (top level has 'accuracy').")
@preprocess_options
@handle_errors
def evaluate(model: str, data: str, reference: Optional[str], batch_size: int, limit: Optional[int],
             as_json: bool, **kw) -> None:
    """Accuracy of a Keras model or .tflite file on labelled data.

    .tflite files with int8/uint8 inputs get them quantized with the file's own scale and zero point, so pass the
    same preprocessing flags as for the Keras model.

    \b
    Examples:
      kcompress evaluate model_int8.tflite --data val/ --scale 0.00392
      kcompress evaluate model_int8.tflite --data digits:val --scale 0.00392 --reference model.keras --json
    """
    from kcompress.data import open_data
    from kcompress.evaluate import compare, evaluate as run_eval

    src = open_data(data, _preprocess(kw))
    ev = run_eval(model, src, batch_size=batch_size, limit=limit)
    result = {"model": model, "data": src.name, **ev.metrics}
    if reference:
        ref = run_eval(reference, src, batch_size=batch_size, limit=limit, description="evaluating reference")
        result["reference"] = {"model": reference, "accuracy": ref.accuracy, **compare(ev, ref)}
    if as_json:
        from kcompress.results import json_clean

        click.echo(json.dumps(json_clean(result), indent=2))
        return
    console = _console()
    rows = [["accuracy (top-1)", _pct(ev.accuracy)], ["top-5", _pct(ev.metrics["top5_accuracy"])],
            ["macro F1", f"{ev.metrics['macro_f1']:.4f}"], ["samples", ev.metrics["num_samples"]]]
    if reference:
        r = result["reference"]
        rows += [["reference accuracy", _pct(r["accuracy"])], ["agreement (top-1)", _pct(r["agreement"])],
                 ["Δ accuracy", f"{100 * r['accuracy_delta']:+.2f} pts"]]
        worst = list(r["per_class_accuracy_delta"].items())[:3]
        rows.append(["most-hurt classes", ", ".join(f"{k} {100 * v:+.1f}" for k, v in worst)])
    console.print(_table(f"{model} on {src.name}", ["", "value"], rows))
    per_class = ev.metrics["per_class_accuracy"]
    console.print("per-class accuracy: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in per_class.items()))


# -------------------------------------------------------------------------------------------------------- bench
@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--threads", default="1", show_default=True, help="Comma-separated interpreter thread counts.")
@click.option("--batch-sizes", default="1", show_default=True, help="Comma-separated batch sizes.")
@click.option("--runs", default=100, show_default=True, help="Timed runs per configuration.")
@click.option("--warmup", default=10, show_default=True, help="Warm-up runs, not timed.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (schema kcompress.bench/1).")
@click.option("-o", "--out", default=None, help="Also write the JSON here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@handle_errors
def bench(models, threads: str, batch_sizes: str, runs: int, warmup: int, as_json: bool, out: Optional[str],
          overwrite: bool) -> None:
    """Latency (mean, std, min, p50, p95, p99), throughput and peak memory of .tflite files on this host.

    Uses the LiteRT interpreter with its default CPU delegate (XNNPACK). The JSON schema is the one
    `kcompress device bench` writes for Android devices, so host and device results can be compared.

    \b
    Example:
      kcompress bench model_fp32.tflite model_int8.tflite --threads 1,2 --batch-sizes 1,8 -o bench.json
    """
    from kcompress.benchmark import bench_report
    from kcompress.models import check_output_path, model_format

    for m in models:
        if model_format(m) != "tflite":
            raise UsageError(f"{m}: bench takes .tflite files (convert Keras models with kcompress quantize)")
    if runs < 1 or warmup < 0:
        raise UsageError("--runs must be >= 1 and --warmup >= 0")
    if out:
        check_output_path(out, overwrite)
    report = bench_report(models, int_list(threads, "--threads"), int_list(batch_sizes, "--batch-sizes"), runs,
                          warmup)
    if out:
        from kcompress.models import atomic_write_bytes

        atomic_write_bytes(out, (report.to_json() + "\n").encode(), overwrite=overwrite)
    if as_json:
        click.echo(report.to_json())
    else:
        rows = []
        for r in report.results:
            s = r.latency_ms
            rows.append([os.path.basename(r.model), r.threads, r.batch_size, _ms(s.mean), _ms(s.std), _ms(s.min),
                         _ms(s.p50), _ms(s.p95), _ms(s.p99), f"{r.throughput_per_s:.1f}/s",
                         f"{r.memory_mb.get('peak_rss') or 0:.0f} MB"])
        console = _console()
        console.print(_table(f"LiteRT on {report.target['cpu']} ({runs} runs after {warmup} warm-up)",
                             ["model", "threads", "batch", "mean", "std", "min", "p50", "p95", "p99", "throughput",
                              "peak RSS"], rows))
    if out:
        click.echo(f"Wrote {out}", err=as_json)


# ------------------------------------------------------------------------------------------------------ inspect
@click.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@handle_errors
def inspect_cmd(model: str, as_json: bool) -> None:
    """Layers (Keras) or ops and tensors (.tflite): shapes, dtypes, parameters, quantization parameters.

    For a .tflite file it says which compute ops stayed float and counts QUANTIZE/DEQUANTIZE ops, so a
    "quantized" model that is mostly float shows at a glance.

    \b
    Examples:
      kcompress inspect model.keras
      kcompress inspect model_int8.tflite --json
    """
    from kcompress.inspection import inspect_model
    from kcompress.results import json_clean

    info = inspect_model(model)
    if as_json:
        click.echo(json.dumps(json_clean(info), indent=2))
        return
    console = _console()
    if info["format"] != "tflite":
        rows = [[l["name"], l["class"], l["output_shape"], l["dtype"], f"{l['params']:,}", _mb(l["bytes"]),
                 f"{l['macs']:,}"] for l in info["layers"]]
        console.print(_table(f"{model} ({info['format']})", ["layer", "type", "output", "dtype", "params", "bytes",
                                                             "MACs"], rows))
        console.print(f"{info['params']['total']:,} parameters, {info['macs']:,} MACs per sample")
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
    console.print(_table(f"{model} ({_mb(info['file_bytes'])})", ["#", "op", "output", "dtype", "quantization"], rows))
    f = info["float_ops"]
    console.print(
        f"{f['ops']} ops; float compute ops: {f['float_compute_op_count']} "
        f"({', '.join(f['float_compute_ops']) or 'none'}); QUANTIZE {f['quantize_ops']}, DEQUANTIZE {f['dequantize_ops']}"
    )
    if info.get("metadata"):
        meta = info["metadata"]
        console.print(f"kcompress metadata: model {meta.get('model_name')}, kcompress {meta.get('kcompress_version')}, "
                      f"config hash {meta.get('config_hash')}")
        for st in meta.get("stages", []):
            acc = st.get("accuracy")
            console.print(f"  {st['stage']}: accuracy {_pct(acc)}; " + ", ".join(
                f"{k}={v}" for k, v in st.get("settings", {}).items() if k in KEY_SETTINGS))
        console.print("  validated metrics: " + json.dumps(meta.get("metrics", {}), sort_keys=True))
    console.print("tensor bytes by dtype: " + ", ".join(f"{k} {_mb(v['bytes'])}" for k, v in info["tensor_dtypes"].items()))
