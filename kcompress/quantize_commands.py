"""``kcompress qat`` and ``kcompress sensitivity``: thin commands over :mod:`kcompress.quantize` and
:mod:`kcompress.sensitivity` (TensorFlow is imported inside the functions so ``kcompress --help`` stays fast)."""

from __future__ import annotations

import json
import os

import click

from kcompress.cli import handle_errors
from kcompress.commands import preprocess_options

__all__ = ["qat", "sensitivity"]


def _echo_table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    click.echo("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    for r in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


@click.command("qat")
@click.argument("model")
@click.option("--data", "data_spec", required=True, help="Training data (also calibrates the converter).")
@click.option("--val-data", default=None, help="VAL data for the accuracy comparison (default: --data).")
@click.option("--epochs", default=3, show_default=True, type=int, help="QAT fine-tune epochs (0: calibrate only).")
@click.option("--lr", default=1e-4, show_default=True, type=float, help="Fine-tune learning rate (5-10x below training's).")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--per-tensor", is_flag=True, help="Per-tensor weight scales (default per-channel).")
@click.option(
    "--float-layers", default="", help="Comma-separated layers to keep float, or 'auto' (with --max-drop)."
)
@click.option("--max-drop", default=0.3, show_default=True, type=float, help="Points of accuracy 'auto' may lose.")
@click.option("--io", default="int8", show_default=True, type=click.Choice(["int8", "uint8", "float"]))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("-o", "--output", default=None, help="Output .tflite (default: next to MODEL, *_qat_int8.tflite).")
@click.option("--keras-out", default=None, help="Also save the QAT Keras model here (to keep training it).")
@click.option("--json", "json_out", default=None, help="Write the comparison and layer table as JSON here.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@preprocess_options
@handle_errors
def qat(model, data_spec, val_data, epochs, lr, batch_size, per_tensor, float_layers, max_drop, io, seed, output,
        keras_out, json_out, overwrite, scale, offset, mean, std):  # fmt: skip
    """Quantization-aware training (tfmot 8-bit) of a trained MODEL, exported to an int8 .tflite.

    Works on any functional model: nested models are flattened, layers tfmot cannot quantize stay float in Keras
    and are quantized by the converter. Reports fp32, PTQ int8 and QAT int8 side by side on VAL (accuracy, size,
    latency) and says when PTQ was as good. Pruned (sparse) models keep their zeros.

    \b
    Example:
      kcompress qat model.keras --data train/ --val-data val/ --scale 1/255 --epochs 2 -o model_qat.tflite
    """
    from kcompress.data import Preprocess, open_data
    from kcompress.errors import UsageError
    from kcompress.models import atomic_write_bytes, check_output_path, load_model, save_model
    from kcompress.quantize import QATOptions
    from kcompress.quantize import qat as run_qat

    output = output or os.path.splitext(model.rstrip("/"))[0] + "_qat_int8.tflite"
    check_output_path(output, overwrite)
    for extra in (keras_out, json_out):
        if extra:
            check_output_path(extra, overwrite)
    pre = Preprocess.parse(scale, offset, mean, std)
    train = open_data(data_spec, pre)
    val = open_data(val_data, pre) if val_data else None
    m = load_model(model)
    names = tuple(n.strip() for n in float_layers.split(",") if n.strip())
    if names == ("auto",):
        from kcompress.sensitivity import auto_float_layers

        click.echo(f"choosing float layers (max drop {max_drop} points on VAL)...")
        names, report = auto_float_layers(
            m, train, val or train, max_drop=max_drop, per_channel=not per_tensor, io=io, log=click.echo
        )
        for c in report["chosen"]:
            click.echo(f"  keep float: {c['layer']} (+{c['float_cost_bytes'] / 1024:.1f} KB)")
    elif "auto" in names:
        raise UsageError("--float-layers auto cannot be combined with layer names")
    else:
        from kcompress.convert import resolve_float_layers

        names = resolve_float_layers(m, names)
    opts = QATOptions(
        epochs=epochs, lr=lr, batch_size=batch_size, per_channel=not per_tensor, io=io, float_layers=names, seed=seed
    )
    res = run_qat(m, train, val, opts, log=click.echo)
    click.echo("")
    _echo_table(
        ["layer", "type", "quantized how"], [(r["layer"], r["type"], r["how"]) for r in res.layers]
    )
    click.echo("")
    _echo_table(
        ["model", "accuracy", "drop (points)", "size KB", "latency ms"],
        [
            (
                r["model"],
                f"{r['accuracy']:.2%}",
                f"{r['drop_points']:+.2f}",
                f"{r['bytes'] / 1024:.1f}",
                f"{r['latency_ms']:.3f}" if r["latency_ms"] is not None else "-",
            )
            for r in res.rows
        ],
    )
    click.echo(f"Keras QAT model: {res.keras_qat_accuracy:.2%} on VAL")
    click.echo(res.verdict)
    for w in res.warnings:
        click.echo(f"Warning: {w}", err=True)
    atomic_write_bytes(output, res.tflite, overwrite)
    click.echo(f"wrote {output}")
    if keras_out:
        save_model(res.qat_model, keras_out, overwrite)
        click.echo(f"wrote {keras_out} (load it inside tfmot.quantization.keras.quantize_scope())")
    if json_out:
        atomic_write_bytes(json_out, json.dumps(res.to_dict(), indent=1, default=str).encode(), overwrite)
        click.echo(f"wrote {json_out}")


@click.command("sensitivity")
@click.argument("model")
@click.option("--data", "data_spec", required=True, help="Data to score on (a few hundred samples are used).")
@click.option("--samples", default=256, show_default=True, type=int, help="Samples scored per layer.")
@click.option("--top", default=20, show_default=True, type=int, help="Rows shown (the JSON has all).")
@click.option("-o", "--json", "json_out", default=None, help="JSON output (default: next to MODEL, *_sensitivity.json).")
@click.option("--overwrite", is_flag=True, help="Replace an existing JSON file.")
@preprocess_options
@handle_errors
def sensitivity(model, data_spec, samples, top, json_out, overwrite, scale, offset, mean, std):
    """Per-layer int8 sensitivity of MODEL: quantize one layer at a time, rank by output SQNR (lowest first).

    The most sensitive layers are the best candidates for `--float-layers`; each costs about 3 bytes per weight
    when kept float.

    \b
    Example:
      kcompress sensitivity model.keras --data val/ --scale 1/255 -o sens.json
    """
    from kcompress.data import Preprocess, open_data
    from kcompress.errors import UsageError
    from kcompress.models import atomic_write_bytes, check_output_path, load_model
    from kcompress.sensitivity import sensitivity as run

    if samples < 1:
        raise UsageError("--samples must be at least 1")
    json_out = json_out or os.path.splitext(model.rstrip("/"))[0] + "_sensitivity.json"
    check_output_path(json_out, overwrite)
    data = open_data(data_spec, Preprocess.parse(scale, offset, mean, std))
    rows = run(load_model(model), data, samples=samples)
    _echo_table(
        ["rank", "layer", "type", "params", "SQNR dB", "acc delta", "float cost KB"],
        [
            (
                r["rank"],
                r["layer"],
                r["type"],
                r["params"],
                f"{r['sqnr_db']:.1f}",
                f"{r['accuracy_delta']:+.2f}",
                f"{r['float_cost_bytes'] / 1024:.1f}",
            )
            for r in rows[:top]
        ],
    )
    atomic_write_bytes(json_out, json.dumps({"model": model, "samples": samples, "layers": rows}, indent=1).encode(), overwrite)
    click.echo(f"wrote {json_out}")
