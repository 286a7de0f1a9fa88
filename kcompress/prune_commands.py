"""``kcompress prune``: magnitude (tfmot) or structured (channels removed) pruning with fine-tuning.

Thin over :mod:`kcompress.prune` and :mod:`kcompress.prune_structured`; TensorFlow is imported inside the command.
"""

from __future__ import annotations

import click

from kcompress.cli import handle_errors
from kcompress.commands import preprocess_options

__all__ = ["prune"]


def _default_out(model_path: str, method: str) -> str:
    stem = model_path.rstrip("/")
    for ext in (".keras", ".h5"):
        if stem.endswith(ext):
            return stem[: -len(ext)] + f"_{method}.keras"
    return stem + f"_{method}.keras"


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f} KB"


@click.command("prune")
@click.argument("model_path", metavar="MODEL")
@click.option("--data", "data_spec", required=True, help="TRAIN data for fine-tuning (folder, .npz or built-in name).")
@click.option("--val-data", "val_spec", default=None, help="VAL data: accuracy before/after and best-epoch choice.")
@click.option("--method", type=click.Choice(["magnitude", "structured"]), required=True)
@click.option("--sparsity", type=float, default=0.5, show_default=True, help="magnitude: final sparsity.")
@click.option("--schedule", type=click.Choice(["polynomial", "constant"]), default="polynomial", show_default=True)
@click.option("--initial-sparsity", type=float, default=0.0, show_default=True, help="magnitude: polynomial start.")
@click.option("--block", default=None, help="magnitude: M:N block sparsity, e.g. 2:4 (M zeros in every N weights).")
@click.option("--skip", multiple=True, help="magnitude: keep dense (layer name, regex, first or last); repeatable.")
@click.option("--target-flops", type=float, default=None, help="structured: fraction of FLOPs to remove, e.g. 0.5.")
@click.option("--ratio", type=float, default=None, help="structured: fraction of channels to remove per group.")
@click.option("--criterion", type=click.Choice(["l1", "l2", "bn", "taylor"]), default="l1", show_default=True)
@click.option("--rounds", type=int, default=None, help="structured: prune in K steps (default: 10-20% each).")
@click.option("--channel-multiple", type=int, default=1, show_default=True,
              help="structured: round kept channel counts up to a multiple of this (4 or 8 suit SIMD kernels).")
@click.option("--epochs", type=int, default=4, show_default=True, help="Fine-tuning epochs (in total).")
@click.option("--lr", type=float, default=None, help="Fine-tuning learning rate [magnitude 1e-4, structured 1e-3].")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@preprocess_options
@click.option("-o", "--output", default=None, help="Output model [MODEL_<method>.keras next to MODEL].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@handle_errors
def prune(model_path, data_spec, val_spec, method, sparsity, schedule, initial_sparsity, block, skip, target_flops,
          ratio, criterion, rounds, channel_multiple, epochs, lr, batch_size, seed, scale, offset, mean, std, output,
          overwrite):
    """Prune MODEL with fine-tuning on --data and write a plain tf_keras model.

    \b
    magnitude: unstructured sparsity through tfmot on the layers it can prune (the rest stay dense).
      The file only shrinks after compression (gzip size shown); latency does not change.
    structured: removes whole channels (residual Add groups share one mask) and rebuilds a smaller,
      faster dense model; fp32/int8 TFLite latency is measured before and after.

    \b
    Examples:
      kcompress prune model.keras --data train/ --val-data val/ --method magnitude --sparsity 0.8 --epochs 8
      kcompress prune model.keras --data train/ --val-data val/ --method structured --target-flops 0.5 \\
          --rounds 3 --epochs 6 --scale 0.00392156862745098
    """
    from kcompress.data import Preprocess, check_fits, open_data
    from kcompress.errors import UsageError
    from kcompress.models import check_output_path, input_shape, load_model, model_format, num_classes, save_model

    out = output or _default_out(model_path, method)
    check_output_path(out, overwrite)
    pre = Preprocess.parse(scale, offset, mean, std)
    model = load_model(model_path, stage="prune")
    keras3_in = model_format(model_path) == "keras3"
    train = open_data(data_spec, pre)
    val = open_data(val_spec, pre) if val_spec else None
    for d in (train, val):
        if d is not None:
            check_fits(d, input_shape(model), num_classes(model))
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if method == "magnitude":
        if target_flops is not None or ratio is not None:
            raise UsageError("--target-flops/--ratio belong to --method structured")
        pruned = _magnitude(model, train, val, sparsity, schedule, initial_sparsity, block, skip, epochs,
                            lr or 1e-4, batch_size, seed)
    else:
        if block or skip:
            raise UsageError("--block/--skip belong to --method magnitude")
        pruned = _structured(model, train, val, target_flops, ratio, criterion, rounds, channel_multiple, epochs,
                             lr or 1e-3, batch_size, seed)
    save_model(pruned, out, overwrite=overwrite, keras3=keras3_in and out.endswith(".keras"))
    click.echo(f"Wrote {out} ({_kb(_size(out))})" + (" as a Keras 3 model, like the input" if keras3_in else ""))


def _size(path: str) -> int:
    from kcompress.models import path_size

    return path_size(path)


def _acc(a) -> str:
    return "-" if a is None else f"{100 * a:.2f}%"


def _magnitude(model, train, val, sparsity, schedule, initial, block, skip, epochs, lr, batch_size, seed):
    import warnings

    from kcompress.convert import convert
    from kcompress.prune import MagnitudeOptions, parse_block, prune_magnitude, sizes

    opts = MagnitudeOptions(sparsity=sparsity, schedule=schedule, initial_sparsity=initial, block=parse_block(block),
                            skip=tuple(skip), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # printed below, once
        result = prune_magnitude(model, train, val, opts)
    for w in result.warnings:
        click.echo(f"Warning: {w}", err=True)
    click.echo(f"Pruned {len(result.pruned)} layer(s) to {opts.target:.0%} sparsity"
               f"{' in ' + block + ' blocks' if block else ''}:")
    for name in result.pruned:
        click.echo(f"  {name:<32} {result.sparsity[name]:6.1%}")
    for name, why in result.skipped.items():
        click.echo(f"  {name:<32} dense ({why})")
    before, after = sizes(convert(model)), sizes(convert(result.model))  # fp32 .tflite, smoke-run by convert
    click.echo(f"\n{'':<24}{'before':>14}{'after':>14}")
    click.echo(f"{'accuracy (val)':<24}{_acc(result.accuracy_before):>14}{_acc(result.accuracy_after):>14}")
    click.echo(f"{'sparsity (pruned)':<24}{'0.0%':>14}{result.overall_sparsity:>14.1%}")
    click.echo(f"{'sparsity (all params)':<24}{'':>14}{result.total_sparsity:>14.1%}")
    click.echo(f"{'fp32 .tflite raw':<24}{_kb(before['raw']):>14}{_kb(after['raw']):>14}")
    click.echo(f"{'fp32 .tflite gzip':<24}{_kb(before['gzip']):>14}{_kb(after['gzip']):>14}")
    return result.model


def _structured(model, train, val, target_flops, ratio, criterion, rounds, channel_multiple, epochs, lr, batch_size,
                seed):
    from kcompress.benchmark import bench_tflite
    from kcompress.convert import QuantizeOptions, convert
    from kcompress.models import input_shape
    from kcompress.prune_structured import StructuredOptions, prune_structured

    opts = StructuredOptions(target_flops=target_flops, ratio=ratio, criterion=criterion, rounds=rounds,
                             multiple=channel_multiple, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    result = prune_structured(model, train, val, opts)
    click.echo(f"Removed channels in {len(result.groups)} group(s) over {len(result.rounds)} round(s):")
    for g in result.groups:
        click.echo(f"  {', '.join(g['layers'])}: {g['channels']} -> {g['kept']}")
    for name, why in result.frozen.items():
        click.echo(f"  {name}: kept whole ({why})")
    shape = input_shape(model)

    def measure(m):
        fp32 = convert(m)
        int8 = convert(m, QuantizeOptions(mode="int8", io="float"),
                       calibration=lambda: train.calibration_samples(shape, 100))
        return {"fp32": fp32, "int8": int8,
                "fp32_ms": bench_tflite(fp32, threads=1, runs=30, warmup=5).latency_ms.p50,
                "int8_ms": bench_tflite(int8, threads=1, runs=30, warmup=5).latency_ms.p50}

    b, a = measure(model), measure(result.model)
    click.echo(f"\n{'':<26}{'before':>14}{'after':>14}")
    click.echo(f"{'accuracy (val)':<26}{_acc(result.accuracy_before):>14}{_acc(result.accuracy_after):>14}")
    click.echo(f"{'parameters':<26}{result.params_before:>14,}{result.params_after:>14,}")
    click.echo(f"{'MFLOPs (2 x MACs)':<26}{2 * result.macs_before / 1e6:>14.2f}{2 * result.macs_after / 1e6:>14.2f}"
               f"   (-{result.flops_reduction:.1%})")
    click.echo(f"{'fp32 .tflite size':<26}{_kb(len(b['fp32'])):>14}{_kb(len(a['fp32'])):>14}")
    click.echo(f"{'int8 .tflite size':<26}{_kb(len(b['int8'])):>14}{_kb(len(a['int8'])):>14}")
    click.echo(f"{'fp32 latency p50, 1 thr':<26}{b['fp32_ms']:>11.3f} ms{a['fp32_ms']:>11.3f} ms")
    click.echo(f"{'int8 latency p50, 1 thr':<26}{b['int8_ms']:>11.3f} ms{a['int8_ms']:>11.3f} ms")
    return result.model

