"""Quantization commands: ``quantize`` (post-training), ``qat`` and ``sensitivity``.

Thin over :func:`kcompress.quantize`, :func:`kcompress.qat` and :func:`kcompress.sensitivity`: parse options, call,
print the result object. TensorFlow is imported inside the functions so ``kcompress --help`` stays fast.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Optional

import click

from kcompress.cli import handle_errors
from kcompress.cli.console import (
    build,
    console,
    default_out,
    failed_name,
    mb,
    ms,
    option,
    pct,
    points,
    preprocess,
    preprocess_options,
    print_json,
    print_table,
    print_test,
    test_options,
    train_limit_option,
    train_options,
    train_settings,
    trust_model_option,
    wrote,
)
from kcompress.errors import UsageError
from kcompress.options import QATOptions, QuantizeOptions

__all__ = ["quantize", "qat", "sensitivity"]

_FLAGS = {"per_channel": "--per-tensor", "float_layers": "--float-layers"}


def _quantize_options(mode, calibration_samples, per_tensor, io, float_layers, max_drop, recipe=None
                      ) -> QuantizeOptions:
    return build(QuantizeOptions, _FLAGS, mode=mode, calibration_samples=calibration_samples,
                 per_channel=not per_tensor, io=io, float_layers=float_layers, max_drop=max_drop, recipe=recipe)


def _int8_options(fn):
    """The int8 settings ``quantize`` and ``qat`` share (the quantize section's keys)."""
    for opt in reversed((
        option(QuantizeOptions, "calibration_samples"),
        click.option("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per channel "
                                                        "(config: quantize.per_channel false)."),
        option(QuantizeOptions, "io"),
        option(QuantizeOptions, "float_layers", help="Comma-separated Keras layers kept in float: names, 'first' "
                                                     "and 'last' (the first/last layer with weights), or 'auto' "
                                                     "(the fewest, most sensitive within --max-drop on VAL)."),
        option(QuantizeOptions, "max_drop"),
    )):
        fn = opt(fn)
    return fn


def _print_plan(con, plan: Optional[dict]) -> None:
    if plan is None:
        return
    for row in plan.get("chosen", []):
        con.print(f"  keeping {row['layer']} in float costs {mb(row['float_cost_bytes'])} (SQNR {row['sqnr_db']:.1f} dB)")
    if not plan.get("met"):
        con.print("  no number of float layers met the budget; keeping the best trial")
    elif not plan.get("chosen"):
        con.print("  plain int8 is already within the budget: no layer kept in float")
    con.print("  the float layers were chosen on the evaluation data, so the accuracy below is optimistic: check "
              "it on held-out data with `kcompress evaluate`")


@click.command()
@click.argument("model")
@click.option("--data", required=True, help="Data to draw calibration samples from (and to evaluate on).")
@option(QuantizeOptions, "mode", type=click.Choice(["fp32", "dynamic", "float16", "int8", "int16x8", "int4-weights"]))
@option(QuantizeOptions, "recipe")
@click.option("-o", "--out", default=None, help="Output .tflite [default: MODEL_<mode>.tflite].")
@click.option("--val-data", default=None, help="VAL: evaluate (and choose float layers) on this instead of --data.")
@test_options
@_int8_options
@click.option("--limit", type=int, default=None, help="Evaluate on a stratified random sample of N (seeded).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration sample (config: seed).")
@click.option("--format", "fmt", type=click.Choice(["tflite", "onnx"]), default="tflite", show_default=True,
              help="onnx: quantize for ONNX Runtime instead (--mode int8: static QDQ, or dynamic; MODEL may be .onnx).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@preprocess_options
@trust_model_option
@handle_errors
def quantize(model: str, data: str, mode: str, out: Optional[str], val_data: Optional[str],
             calibration_samples: int, per_tensor: bool, io: Optional[str], float_layers: Optional[str],
             max_drop: str, limit: Optional[int], seed: int, as_json: bool, overwrite: bool, test_data: Optional[str],
             test_split: float, **kw) -> None:
    """Post-training quantization of MODEL to a .tflite file, checked in the LiteRT interpreter.

    Prints accuracy, size and latency (1 thread, batch 1) before and after, and a hint when the quantized model
    is measured slower than fp32 (dynamic range often is on CPU).

    \b
    Examples:
      kcompress quantize model.keras --data train/ --val-data val/ --scale 0.00392
      kcompress quantize model.keras --data digits:train --mode int8 --float-layers first,last
      kcompress quantize model.keras --data train/ --val-data val/ --float-layers auto --max-drop 0.3
      kcompress quantize pruned.keras --data val/ --mode fp32 -o pruned_fp32.tflite   # plain fp32 export
      kcompress quantize model.keras --data train/ --val-data val/ --mode int4-weights --recipe auto --max-drop 0.5
    """
    import kcompress as kc
    from kcompress.io import check_output_path

    opts = _quantize_options(mode, calibration_samples, per_tensor, io, float_layers, max_drop, kw.pop("recipe", None))
    if kw.pop("fmt", "tflite") == "onnx":  # ONNX Runtime's quantization tools: kcompress.cli.export
        from kcompress.cli.export import quantize_onnx_command

        return quantize_onnx_command(model, data, opts, out=out, val_data=val_data, test_data=test_data,
                                     test_split=test_split, limit=limit, seed=seed, as_json=as_json,
                                     overwrite=overwrite, pre=preprocess(kw))
    out = out or default_out(model, f"_{opts.mode}.tflite")
    check_output_path(out, overwrite)
    con = console()
    r = kc.quantize(model, data, val_data=val_data, test_data=test_data, test_split=test_split, options=opts, preprocess=preprocess(kw), limit=limit, seed=seed,
                    log=lambda m: con.print(m, markup=False, soft_wrap=True) if not as_json else None)
    final = out if r.within_max_drop else failed_name(out)
    r.save(final, overwrite=True if final != out else overwrite)
    if as_json:
        print_json({**r.to_dict(), "out": final})
        _gate(r.within_max_drop, r.drop_points, r.options.max_drop, out, final, r.data, r.options.mode)
        return
    _print_plan(con, r.float_layer_plan)
    split = "val" if val_data else "data"
    rows = [["accuracy (test: chose nothing)", pct(r.test["before_accuracy"]), pct(r.test["after_accuracy"]),
             points(r.test["after_accuracy"] - r.test["before_accuracy"])]] if r.test else []
    rows += [
        [f"accuracy ({split})", pct(r.before.accuracy), pct(r.after.accuracy), points(r.accuracy_delta)],
        ["size", mb(r.source_bytes) + " (input)", mb(r.size_bytes), f"{r.size_ratio:.2f}x of fp32 .tflite"],
        ["p50 latency", ms(r.latency_fp32_ms) + " (fp32 .tflite)", ms(r.latency_ms), f"{r.speedup.text()} speed-up"],
    ]
    print_table(f"{r.options.mode} on {r.data} ({r.after.metrics['num_samples']} samples)",
                ["", "before", "after", "change"], rows, con)
    if r.options.float_layers:
        con.print(f"Kept in float: {', '.join(r.options.float_layers)}")
    if r.hint:
        con.print(f"Hint: {r.hint}")
    if r.precision:
        _print_precision(con, r)
    wrote(final)
    _gate(r.within_max_drop, r.drop_points, r.options.max_drop, out, final, r.data, r.options.mode)


def _print_precision(con, r) -> None:
    """int4-weights: the weights of each layer as found in the file, int8 for comparison, the slower warning."""
    p = r.precision
    if p.get("plan"):
        con.print(f"Mixed precision chosen on VAL over {len(p['plan']['trials'])} trials (optimistic there: check "
                  "held-out data with `kcompress evaluate`)" + ("" if p["plan"]["met"] else "; no mix met the budget"))
    con.print(f"Scheme: {p['scheme']}")
    print_table("weights per layer", ["layer", "asked", "in the file", "ops"],
                [(x["layer"], x["requested"], x["weights"], ",".join(x["ops"])) for x in p["layers"]], con)
    con.print(f"int8 for comparison: {mb(p['int8_bytes'])}, p50 {ms(p['latency_int8_ms'])}")
    if r.smaller_but_slower:
        click.echo(f"Warning: {r.smaller_but_slower}", err=True)


def _gate(ok: bool, drop: float, max_drop: float, out: str, final: str, split: str, mode: str = "int8") -> None:
    if not ok:
        fix = "--recipe auto (int4/int8/float per layer)" if mode == "int4-weights" else \
            "--float-layers auto or kcompress qat"
        click.echo(f"Error: quantization lost {drop:.2f} points on {split}, more than --max-drop {max_drop} (kept as "
                   f"{final}, not {out}; try {fix})", err=True)
        sys.exit(1)


@click.command("qat")
@click.argument("model")
@click.option("--data", "data_spec", required=True, help="Training data (also calibrates the converter).")
@click.option("--val-data", default=None, help="VAL data for the comparison and 'auto' float layers (default: --data).")
@test_options
@train_limit_option
@option(QATOptions, "epochs")
@option(QATOptions, "lr")
@option(QATOptions, "batch_size")
@option(QATOptions, "preserve_sparsity", "--preserve-sparsity/--no-preserve-sparsity", default=None,
        show_default=False)
@option(QATOptions, "max_tflite_drop")
@_int8_options
@train_options
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of shuffling and sampling (config: seed).")
@click.option("-o", "--out", default=None, help="Output .tflite [default: MODEL_qat_int8.tflite].")
@click.option("--keras-out", default=None, help="Also save the QAT Keras model here, as .h5 or a SavedModel folder "
                                                "(to keep training it; it loads back with kc.load_model).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison and layer table as JSON.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its per-epoch checkpoints (OUT.ckpt/).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (and start over their checkpoints).")
@preprocess_options
@trust_model_option
@handle_errors
def qat(model, data_spec, val_data, epochs, lr, batch_size, preserve_sparsity, max_tflite_drop, calibration_samples,
        per_tensor, io, float_layers, max_drop, seed, out, keras_out, as_json, overwrite, test_data, test_split,
        train_limit, **kw):  # fmt: skip
    """Quantization-aware training (tfmot 8-bit) of a trained MODEL, exported to an int8 .tflite.

    Works on any functional model: nested models are flattened, layers tfmot cannot quantize stay float in Keras
    and are quantized by the converter. Reports fp32, PTQ int8 and QAT int8 side by side on VAL (accuracy, size,
    latency) and says when PTQ was as good. Pruned (sparse) models keep their zeros. Each fine-tuning epoch is
    checkpointed to OUT.ckpt/ (removed when the output is written); --resume continues a killed run there.

    \b
    Example:
      kcompress qat model.keras --data train/ --val-data val/ --scale 1/255 --epochs 2 -o model_qat.tflite
    """
    import kcompress as kc
    from kcompress.distributed import worker_path
    from kcompress.io import check_output_path, save_model

    q = _quantize_options("int8", calibration_samples, per_tensor, io or "int8", float_layers, max_drop)
    opts = build(QATOptions, epochs=epochs, lr=lr, batch_size=batch_size, preserve_sparsity=preserve_sparsity,
                 max_tflite_drop=max_tflite_drop)
    out = out or os.path.splitext(model.rstrip("/"))[0] + "_qat_int8.tflite"
    resume = kw.pop("resume")
    for path in (out, keras_out):
        if path:
            check_output_path(path, overwrite or resume)
    if keras_out and keras_out.endswith(".keras"):  # before training, not after (see kcompress.io.save_model)
        raise UsageError(f"--keras-out {keras_out}: a quantization-aware model does not load back from a .keras file "
                         "(tfmot); use .h5 or a folder (SavedModel)")
    log = (lambda m: None) if as_json else click.echo
    topts = train_settings(kw)
    res = kc.qat(model, data_spec, val_data=val_data, test_data=test_data, test_split=test_split,
                 train_limit=train_limit, options=opts, quantize=q, preprocess=preprocess(kw), seed=seed,
                 log=log, train_options=topts, checkpoint_dir=out.rstrip("/") + ".ckpt", resume=resume,
                 overwrite_checkpoints=overwrite)
    out, keras_out = worker_path(out), worker_path(keras_out) if keras_out else None  # only the chief's are kept
    res.save(out, overwrite=overwrite or resume)
    if keras_out:
        save_model(res.qat_model, keras_out, overwrite or resume)
    shutil.rmtree(out.rstrip("/") + ".ckpt", ignore_errors=True)  # the outputs are written: no longer needed
    if as_json:
        print_json({**res.to_dict(), "out": out})
        return
    con = console()
    print_table("QAT layers", ["layer", "type", "quantized how"], [(r["layer"], r["type"], r["how"])
                                                                    for r in res.layers], con)
    print_table("fp32, PTQ int8 and QAT int8 on VAL", ["model", "accuracy", "drop (points)", "size", "latency"],
                [(r["model"], pct(r["accuracy"]), f"{r['drop_points']:+.2f}", mb(r["bytes"]), ms(r["latency_ms"]))
                 for r in res.rows], con)
    con.print(f"Keras QAT model: {pct(res.keras_qat_accuracy)} on VAL")
    con.print(res.verdict)
    print_test(res.test, ("fp32", "qat"))
    for w in res.warnings:
        click.echo(f"Warning: {w}", err=True)
    wrote(out)
    if keras_out:
        wrote(keras_out, "kcompress loads it; your own code: inside tfmot.quantization.keras.quantize_scope()")


@click.command("sensitivity")
@click.argument("model")
@click.option("--data", "data_spec", required=True, help="Data to score on (a few hundred samples are used).")
@click.option("--samples", default=256, show_default=True, type=int, help="Samples scored per layer.")
@click.option("--top", default=20, show_default=True, type=int, help="Rows shown (the JSON has all).")
@click.option("-o", "--out", default=None, help="JSON output [default: MODEL_sensitivity.json].")
@click.option("--json", "as_json", is_flag=True, help="Print the ranking as JSON instead of a table.")
@click.option("--overwrite", is_flag=True, help="Replace an existing JSON file.")
@preprocess_options
@trust_model_option
@handle_errors
def sensitivity(model, data_spec, samples, top, out, as_json, overwrite, **kw):
    """Per-layer int8 sensitivity of MODEL: quantize one layer at a time, rank by output SQNR (lowest first).

    The most sensitive layers are the best candidates for `--float-layers`; each costs about 3 bytes per weight
    when kept float.

    \b
    Example:
      kcompress sensitivity model.keras --data val/ --scale 1/255 -o sens.json
    """
    import kcompress as kc
    from kcompress.io import check_output_path

    out = out or os.path.splitext(model.rstrip("/"))[0] + "_sensitivity.json"
    check_output_path(out, overwrite)
    res = kc.sensitivity(model, data_spec, samples=samples, preprocess=preprocess(kw))
    res.save(out, overwrite=overwrite)
    if as_json:
        print_json(res.to_dict())
        return
    print_table(f"int8 sensitivity of {model} ({samples} samples of {res.data})",
                ["rank", "layer", "type", "params", "SQNR dB", "acc delta", "float cost"],
                [(r["rank"], r["layer"], r["type"], r["params"], f"{r['sqnr_db']:.1f}", f"{r['accuracy_delta']:+.2f}",
                  mb(r["float_cost_bytes"])) for r in res.layers[:top]])
    wrote(out)
