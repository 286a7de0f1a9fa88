"""``kcompress prune``: magnitude (tfmot) or structured (channels removed) pruning with fine-tuning.

Thin over :func:`kcompress.prune`; TensorFlow is imported inside the command.
"""

from __future__ import annotations

import shutil
import sys

import click

from kcompress.cli import handle_errors
from kcompress.cli.console import (
    build,
    console,
    failed_name,
    flag_name,
    mb,
    ms,
    option,
    pct,
    preprocess,
    preprocess_options,
    print_json,
    print_table,
    test_options,
    train_limit_option,
    train_options,
    train_settings,
    trust_model_option,
    wrote,
)
from kcompress.options import PruneOptions

__all__ = ["prune"]

MAGNITUDE_ONLY = {"sparsity", "schedule", "initial_sparsity", "block", "skip"}
STRUCTURED_ONLY = {"target_flops", "ratio", "criterion", "rounds", "channel_multiple", "granularity", "block_share",
                   "target_latency_ms", "latency_reference", "resume", "teacher"}


def _default_out(model_path: str, method: str) -> str:
    stem = model_path.rstrip("/")
    for ext in (".keras", ".h5"):
        if stem.endswith(ext):
            return stem[: -len(ext)] + f"_{method}.keras"
    return stem + f"_{method}.keras"


@click.command("prune")
@click.argument("model_path", metavar="MODEL")
@click.option("--data", "data_spec", required=True, help="TRAIN data for fine-tuning (folder, .npz or built-in name).")
@click.option("--val-data", "val_spec", default=None, help="VAL data: accuracy before/after and best-epoch choice.")
@test_options
@train_limit_option
@option(PruneOptions, "method")
@option(PruneOptions, "sparsity")
@option(PruneOptions, "schedule")
@option(PruneOptions, "initial_sparsity")
@option(PruneOptions, "block")
@option(PruneOptions, "skip", multiple=True, default=(), show_default=False,
        help="Magnitude: keep a layer dense (name, regex, first or last); repeatable.")
@option(PruneOptions, "target_flops")
@option(PruneOptions, "ratio")
@option(PruneOptions, "criterion")
@option(PruneOptions, "rounds")
@option(PruneOptions, "channel_multiple", type=str)  # a number or auto
@option(PruneOptions, "granularity")
@option(PruneOptions, "block_share")
@option(PruneOptions, "target_latency_ms")
@option(PruneOptions, "latency_reference")
@option(PruneOptions, "teacher")
@option(PruneOptions, "epochs")
@option(PruneOptions, "lr")
@option(PruneOptions, "batch_size")
@option(PruneOptions, "max_drop")
@train_options
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (config: seed).")
@preprocess_options
@click.option("-o", "--out", default=None, help="Output model [MODEL_<method>.keras next to MODEL].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--resume", is_flag=True, help="Structured: continue an interrupted run from its checkpoints "
                                             "(OUT.ckpt/: each round, each fine-tuning epoch).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (and start over its checkpoints).")
@trust_model_option
@handle_errors
def prune(model_path, data_spec, val_spec, method, sparsity, schedule, initial_sparsity, block, skip, target_flops,
          ratio, criterion, rounds, channel_multiple, epochs, lr, batch_size, max_drop, seed, out, as_json, overwrite,
          test_data, test_split, train_limit, **kw):
    """Prune MODEL with fine-tuning on --data and write a plain Keras model (Keras 3 in, Keras 3 out).

    \b
    structured: removes whole channels (residual Add groups share one mask) and rebuilds a smaller,
      faster dense model; fp32/int8 TFLite size and latency are measured before and after.
      --granularity block|both also removes whole identity residual blocks (least VAL loss per MAC
      first); --target-latency-ms prunes until the fp32 .tflite's p50 on this host (1 thread) is at
      most that (with --latency-reference DEVICE.json, the input's time on a device: that device's ms,
      scaled by the two times). Small models spend much of their time in per-op overhead: removing
      blocks (fewer ops) cuts latency more than removing channels does for the same MACs.
    magnitude: unstructured sparsity through tfmot on the layers it can prune (the rest stay dense).
      The file only shrinks after compression (gzip size shown); latency does not change.
    A result more than --max-drop points below MODEL on VAL is written, and the command exits 1 saying so.
    Structured pruning checkpoints each round and fine-tuning epoch to OUT.ckpt/ (removed once the output is
    written); --resume continues a killed run there.

    \b
    Examples:
      kcompress prune model.keras --data train/ --val-data val/ --method magnitude --sparsity 0.8 --epochs 8
      kcompress prune model.keras --data train/ --val-data val/ --target-flops 0.5 \\
          --rounds 3 --epochs 6 --scale 1/255
      kcompress prune resnet.keras --data train/ --val-data val/ --granularity both --target-latency-ms 2.5
      kcompress prune resnet.keras --data train/ --granularity both --target-latency-ms 4 \\
          --latency-reference pixel7.json
      kcompress prune student.keras --data train/ --val-data val/ --granularity block --teacher teacher.keras
    """
    import kcompress as kc
    from kcompress.distributed import worker_path
    from kcompress.errors import KcompressError, UsageError
    from kcompress.io import check_output_path

    ctx = click.get_current_context()
    given = {p.name for p in ctx.command.params
             if ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE}
    wrong = (STRUCTURED_ONLY if method == "magnitude" else MAGNITUDE_ONLY) & given
    if wrong:
        flags = ", ".join(flag_name(n) for n in sorted(wrong))
        raise UsageError(f"{flags} do not apply to --method {method}")
    granularity, target_latency_ms, teacher = kw.pop("granularity"), kw.pop("target_latency_ms"), kw.pop("teacher")
    block_share, latency_reference = kw.pop("block_share"), kw.pop("latency_reference")
    if {"target_flops", "target_latency_ms"} <= given:
        raise UsageError("--target-flops and --target-latency-ms are two targets: give one")
    opts = build(PruneOptions, method=method, sparsity=sparsity, schedule=schedule, initial_sparsity=initial_sparsity,
                 block=block, skip=tuple(skip), target_flops=target_flops, ratio=ratio, criterion=criterion,
                 rounds=rounds, channel_multiple=channel_multiple, epochs=epochs, lr=lr, batch_size=batch_size,
                 max_drop=max_drop, granularity=granularity, block_share=block_share, target_latency_ms=target_latency_ms,
                 teacher=teacher, latency_reference=latency_reference)
    out = out or _default_out(model_path, str(opts.method))
    resume = kw.pop("resume")
    check_output_path(out, overwrite or resume)
    ckpt = out.rstrip("/") + ".ckpt" if str(opts.method) == "structured" else None
    topts = train_settings(kw)
    r = kc.prune(model_path, data_spec, val_spec, test=test_data, test_split=test_split, train_limit=train_limit,
                 log=(lambda m: None) if as_json else click.echo, options=opts, preprocess=preprocess(kw), seed=seed,
                 train_options=topts, checkpoint_dir=ckpt, resume=resume, overwrite_checkpoints=overwrite)
    out, ckpt = worker_path(out), worker_path(ckpt) if ckpt else None  # only the chief writes the user's files
    ok = r.within_max_drop and r.target_met
    final = out if ok else failed_name(out)
    r.save(final, overwrite=True if final != out else overwrite or resume)
    if ckpt:
        shutil.rmtree(ckpt, ignore_errors=True)  # the output is written: no longer needed
    if as_json:
        print_json({**r.to_dict(), "out": final})
    else:
        _print(r)
        for h in r.hints:
            click.echo(f"Hint: {h}")
        wrote(final, "as a Keras 3 model, like the input" if r.keras3 else "")
    if not r.target_met:
        click.echo(f"Error: pruning missed its target by more than 5 points ({r.details.get('shortfall') or ''}"
                   f"{'; ' if r.details.get('shortfall') else ''}kept as {final}, not {out}; see the frozen or "
                   "skipped layers above)", err=True)
        sys.exit(KcompressError.exit_code)
    if not r.within_max_drop:
        click.echo(f"Error: pruning lost {r.drop_points:.2f} points on VAL, more than --max-drop {opts.max_drop} "
                   f"(kept as {final}, not {out}; fine-tune longer, prune less or more gradually with --rounds)",
                   err=True)
        sys.exit(KcompressError.exit_code)


def _print(r) -> None:
    con = console()
    for w in r.warnings:
        click.echo(f"Warning: {w}", err=True)
    b, a, d = r.before, r.after, r.details
    rows = [["accuracy (test: chose nothing)", pct(r.test["before_accuracy"]), pct(r.test["after_accuracy"])]
            ] if r.test else []
    rows += [["accuracy (val: chose the epoch)", pct(r.accuracy_before), pct(r.accuracy_after)],
            ["parameters", f"{b['params']:,}", f"{a['params']:,}"],
            ["MFLOPs (2 x MACs)", f"{2 * b['macs'] / 1e6:.2f}", f"{2 * a['macs'] / 1e6:.2f} (-{r.flops_reduction:.1%})"],
            ["fp32 .tflite", mb(b["fp32_tflite"]["raw"]), mb(a["fp32_tflite"]["raw"])],
            ["fp32 .tflite gzip", mb(b["fp32_tflite"]["gzip"]), mb(a["fp32_tflite"]["gzip"])]]
    if r.method == "structured":
        for g in d["groups"]:
            con.print(f"  {', '.join(g['layers'])}: {g['channels']} -> {g['kept']} channels")
        for name, why in d["frozen"].items():
            con.print(f"  {name}: kept whole ({why})")
        _print_blocks(con, d)
        fast = r.speedups()  # from interleaved trials

        def timed(kind: str) -> str:
            return ms(a[f"{kind}_p50_ms"]) + (f" ({fast[kind].text()} faster)" if kind in fast else "")

        rows += [["int8 .tflite", mb(b["int8_tflite_bytes"]), mb(a["int8_tflite_bytes"])],
                 ["fp32 latency p50, 1 thread", ms(b["fp32_p50_ms"]), timed("fp32")],
                 ["int8 latency p50, 1 thread", ms(b["int8_p50_ms"]), timed("int8")]]
        blocks = f", {len(d['removed_blocks'])} block(s)" if d.get("removed_blocks") else ""
        title = f"structured pruning: {len(d['groups'])} channel group(s){blocks} over {len(d['rounds'])} round(s)"
    else:
        for name in d["pruned"]:
            con.print(f"  {name:<32} {d['sparsity'][name]:6.1%}")
        for name, why in d["skipped"].items():
            con.print(f"  {name:<32} dense ({why})")
        rows += [["sparsity (pruned layers)", "0.0%", f"{d['overall_sparsity']:.1%}"],
                 ["sparsity (all params)", "", f"{d['total_sparsity']:.1%}"]]
        title = f"magnitude pruning: {len(d['pruned'])} layer(s) to {d['target_sparsity']:.0%} sparsity"
    print_table(title, ["", "before", "after"], rows, con)


def _print_blocks(con, d: dict) -> None:
    """Removed blocks with the figures that chose them, and the latency target's outcome."""
    if d.get("removed_blocks"):
        con.print("  whole blocks removed, the least VAL loss increase per MAC first (measured with each bypassed):")
    for blk in d.get("removed_blocks", []):
        con.print(f"  removed block {blk['block']} ({blk['first']} .. {blk['layers'][-1]}, {blk['macs'] / 1e6:.2f} "
                  f"MMACs, round {blk['round']}): VAL loss {blk['importance']:+.4f}, accuracy "
                  f"{-blk['accuracy_drop']:+.2f} points on {blk['samples']} samples")
    lat = d.get("latency")
    if lat:
        verdict = "reached" if lat["reached"] else "NOT reached"
        con.print(f"  latency target {lat['target_ms']:.3f} ms {verdict}: {lat['before_ms']:.3f} -> "
                  f"{lat['reached_ms']:.3f} ms (fp32 .tflite p50, 1 thread, batch 1, as timed while pruning)")
        if lat.get("device"):
            dev = lat["device"]
            con.print(f"  on {dev['name']}: target {dev['target_ms']:.3f} ms, about {dev['reached_ms']:.3f} ms "
                      f"(this host's time x {dev['scale']:.2f}, from {dev['reference']}; benchmark it there)")
