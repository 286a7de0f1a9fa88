"""ONNX commands: ``export`` (Keras -> ONNX, checked in ONNX Runtime) and the ``--format onnx`` branch of
``quantize`` (:func:`quantize_onnx_command`).

Thin over :mod:`kcompress.onnx`; TensorFlow, tf2onnx and ONNX Runtime are imported inside the functions.
"""

from __future__ import annotations

import sys
from typing import Optional

import click

from kcompress.cli import handle_errors
from kcompress.cli.console import (
    console,
    default_out,
    failed_name,
    mb,
    ms,
    pct,
    points,
    preprocess,
    preprocess_options,
    print_json,
    print_table,
    trust_model_option,
    wrote,
)

__all__ = ["export", "quantize_onnx_command", "onnx_out"]


def onnx_out(model: str, suffix: str) -> str:
    """``model.keras`` / ``model.onnx`` + ``_int8.onnx`` -> ``model_int8.onnx`` (next to the input)."""
    base = str(model).rstrip("/")
    if base.lower().endswith(".onnx"):
        base = base[:-5]
    return default_out(base, suffix)


@click.command()
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True,
              help="What to export to (for an fp32 .tflite, run quantize with --mode fp32).")
@click.option("-o", "--out", default=None, help="Output file [default: MODEL.onnx].")
@click.option("--opset", type=click.IntRange(7, 21), default=17, show_default=True, help="ONNX opset.")
@click.option("--data", default=None, help="Check the export on a stratified sample of this data (default: "
                                           "seeded uniform [0, 1) inputs).")
@click.option("--check-samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Samples the ONNX file is checked on against Keras.")
@click.option("--json", "as_json", is_flag=True, help="Print the export record as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@preprocess_options
@trust_model_option
@handle_errors
def export(model: str, fmt: str, out: Optional[str], opset: int, data: Optional[str], check_samples: int,
           as_json: bool, overwrite: bool, **kw) -> None:
    """Export MODEL (Keras 2 or 3) to ONNX, checked against Keras in ONNX Runtime before it is written.

    The ONNX file has one float input named 'input' with a free batch axis. It is run in ONNX Runtime next to the
    Keras model on the same samples; a max absolute output difference above 1e-3 of the largest output is an
    error and nothing is written. The figures of the check are stored in the file's metadata.

    \b
    Examples:
      kcompress export model.keras --format onnx -o model.onnx
      kcompress export model.keras --data val/ --scale 0.00392 --overwrite
    """
    from kcompress.data import open_data
    from kcompress.io import check_output_path
    from kcompress.onnx.export import export_onnx

    out = out or onnx_out(model, ".onnx")
    check_output_path(out, overwrite)
    pre = preprocess(kw)
    check_data = open_data(data, pre) if data else None
    r = export_onnx(model, out, opset=opset, check_data=check_data, overwrite=overwrite,
                    check_samples=check_samples)
    if as_json:
        print_json(r)
        return
    con = console()
    con.print(f"ONNX (opset {r['opset']}) vs Keras on {r['samples']} samples of {r['sample_source']}: max |difference|"
              f" {r['max_abs_diff']:.3g} (tolerance {r['tolerance']:.3g}), top-1 agreement {pct(r['agreement'])}",
              markup=False, soft_wrap=True)
    wrote(out, f"{mb(r['size_bytes'])}")


def quantize_onnx_command(model: str, data: str, opts, *, out: Optional[str], val_data: Optional[str],
                          test_data: Optional[str], test_split: float, limit: Optional[int], seed: int,
                          as_json: bool, overwrite: bool, pre) -> None:
    """``kcompress quantize --format onnx``: quantize for ONNX Runtime, print before/after, gate on max_drop (a
    result that misses it is written as ``*.FAILED.onnx`` and the command exits 1)."""
    from kcompress.io import check_output_path
    from kcompress.onnx.api import quantize_model

    out = out or onnx_out(model, f"_{opts.mode}.onnx")
    check_output_path(out, overwrite)
    con = console()
    r = quantize_model(model, data, val_data=val_data, test_data=test_data, test_split=test_split, options=opts,
                       preprocess=pre, limit=limit, seed=seed,
                       log=lambda m: con.print(m, markup=False, soft_wrap=True) if not as_json else None)
    final = out if r.within_max_drop else failed_name(out)
    r.save(final, overwrite=True if final != out else overwrite)
    if as_json:
        print_json({**r.to_dict(), "out": final})
    else:
        split = "val" if val_data else "data"
        rows = [["accuracy (test: chose nothing)", pct(r.test["before_accuracy"]), pct(r.test["after_accuracy"]),
                 points(r.test["after_accuracy"] - r.test["before_accuracy"])]] if r.test else []
        rows += [
            [f"accuracy ({split})", pct(r.before.accuracy) + f" ({r.before.runtime})", pct(r.after.accuracy),
             points(r.accuracy_delta)],
            ["size", mb(len(r.fp32_onnx)) + " (fp32 .onnx)", mb(r.size_bytes), f"{r.size_ratio:.2f}x of fp32 .onnx"],
            ["p50 latency", ms(r.latency_fp32_ms) + " (fp32 .onnx)", ms(r.latency_ms),
             f"{r.speedup.text()} speed-up"],
        ]
        print_table(f"ONNX Runtime {r.options.mode} ({'per-channel' if r.options.per_channel else 'per-tensor'}) on "
                    f"{r.data} ({r.after.metrics['num_samples']} samples)", ["", "before", "after", "change"], rows,
                    con)
        if r.export_check:
            c = r.export_check
            con.print(f"fp32 export vs Keras: max |difference| {c['max_abs_diff']:.3g} on {c['samples']} samples",
                      markup=False)
        wrote(final)
    if not r.within_max_drop:
        click.echo(f"Error: quantization lost {r.drop_points:.2f} points on {r.data}, more than --max-drop "
                   f"{r.options.max_drop} (kept as {final}, not {out})", err=True)
        sys.exit(1)
