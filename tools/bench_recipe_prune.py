#!/usr/bin/env python
"""Issue 13's pruning rows on one trained teacher: structured 50% of FLOPs (channel, block, both) and magnitude 80%,
fine-tuned with a training recipe, measured on TEST (which chose nothing) against the unpruned teacher.

The splits are the pipeline's (``configs/cifar10_resnet.yaml``): VAL a stratified 10% of train (chooses the epoch),
TRAIN a stratified ``--train-limit`` subset of the rest, TEST the 10k test split. Latency: the fp32 and int8
``.tflite`` of the teacher and the pruned model at 1 thread, batch 1, 7 interleaved trials in LiteRT-only children
(p50: median of the trial p50s; speed-up: median and range of the per-trial ratios). Example::

    nice python tools/bench_recipe_prune.py --teacher runs/cifar13/01-baseline/model.keras \\
        --data ../shared/data/cifar10 --optimizer sgd --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cifar_splits import add_arguments, open_splits  # noqa: E402

import kcompress as kc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--runs", nargs="*", default=["channel", "block", "both", "magnitude"])
    ap.add_argument("--channel-multiple", type=int, default=None, help="structured runs: kept channel counts are "
                    "multiples of this (default: the option's)")
    ap.add_argument("--block-share", type=float, default=None, help="run both: the share of the MACs taken by "
                    "whole blocks (default: the option's)")
    ap.add_argument("-o", "--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--save", default=None, help="write each pruned model here as RUN.keras (to time it again)")
    ap.add_argument("--retime", nargs="*", default=None, metavar="MODEL",
                    help="train nothing: time the teacher and these pruned models together (fp32 and int8, "
                         "interleaved trials; run it on a quiet machine) and print their speed-ups")
    ap.add_argument("--trials", type=int, default=9, help="--retime: interleaved trials")
    args = ap.parse_args()
    splits = open_splits(args)
    if args.retime is not None:
        return retime(args, splits)
    train_opts = kc.TrainOptions(optimizer=args.optimizer)
    base = kc.evaluate(args.teacher, splits.test).accuracy
    rows = []
    for run in args.runs:
        t0 = time.time()
        if run == "magnitude":
            r = kc.prune(args.teacher, splits.train, splits.val, test=splits.test, method="magnitude", sparsity=0.8,
                         epochs=args.epochs, train_options=train_opts, log=print, max_drop=100)
        else:
            extra = {k: v for k, v in (("channel_multiple", args.channel_multiple), ("block_share", args.block_share))
                     if v is not None}
            r = kc.prune(args.teacher, splits.train, splits.val, test=splits.test, target_flops=0.5, granularity=run,
                         epochs=args.epochs, train_options=train_opts, log=print, max_drop=100, **extra)
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            r.save(os.path.join(args.save, f"{run}.keras"), overwrite=True)
        b, a = r.before, r.after
        row = {"run": run, "channel_multiple": r.options.channel_multiple, "block_share": r.options.block_share,
               "test_before": r.test["before_accuracy"], "test_after": r.test["after_accuracy"],
               "loss_points": 100 * (r.test["before_accuracy"] - r.test["after_accuracy"]),
               "val_after": r.accuracy_after, "params": (b["params"], a["params"]), "macs": (b["macs"], a["macs"]),
               "gzip": (b["fp32_tflite"]["gzip"], a["fp32_tflite"]["gzip"]), "seconds": round(time.time() - t0)}
        if run != "magnitude":
            row.update(fp32_ms=(b["fp32_p50_ms"], a["fp32_p50_ms"]), int8_ms=(b["int8_p50_ms"], a["int8_p50_ms"]),
                       speedups={k: (v.median, v.low, v.high) for k, v in r.speedups().items()},
                       removed_blocks=[x["block"] for x in r.details.get("removed_blocks", [])])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nteacher {args.teacher}: TEST {100 * base:.2f}%; recipe {args.optimizer}, {args.epochs} fine-tune epochs\n")
    print("| run | VAL after (chooses) | test after (teacher) | loss (points) | params | MACs "
          "| fp32 p50 ms (speed-up: median, range of the interleaved trials' ratios) | int8 p50 ms (speed-up) "
          "| gzip size |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fp, q = (f"{r[f'{k}_ms'][0]:.3f} -> {r[f'{k}_ms'][1]:.3f} ({_ratio(r['speedups'][k])})"
                 if f"{k}_ms" in r else "-" for k in ("fp32", "int8"))
        label = r["run"] + ("" if r["run"] == "magnitude" else f" (multiple {r['channel_multiple']}"
                            + (f", block share {r['block_share']:g})" if r["run"] == "both" else ")"))
        print(f"| {label} | {100 * r['val_after']:.2f}% | {100 * r['test_after']:.2f}% ({100 * r['test_before']:.2f}%) | "
              f"{r['loss_points']:.2f} | "
              f"{r['params'][0]:,} -> {r['params'][1]:,} | {r['macs'][0]:,} -> {r['macs'][1]:,} | {fp} | {q} | "
              f"{r['gzip'][1] / r['gzip'][0]:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def _ratio(s) -> str:
    """``(median, low, high)`` of a speed-up as ``"1.86x, 1.77-3.06x"``."""
    return f"{s[0]:.2f}x, {s[1]:.2f}-{s[2]:.2f}x"


def retime(args, splits) -> None:
    """Times the teacher and ``args.retime`` in one run (each fp32 and int8 ``.tflite``, all trials interleaved)."""
    from kcompress.bench.schema import speedup
    from kcompress.io import load_model
    from kcompress.pruning.api import measure_models

    paths = [args.teacher, *args.retime]
    figs = measure_models([load_model(p) for p in paths], splits.train, trials=args.trials, runs=50, warmup=10)
    print(f"\n| model | params | MACs | fp32 p50 ms | fp32 speed-up (median, range of {args.trials} interleaved "
          "trials) | int8 p50 ms | int8 speed-up |\n|---|---|---|---|---|---|---|")
    for path, f in zip(paths, figs):
        cells = []
        for kind in ("fp32", "int8"):
            s = speedup(figs[0][f"{kind}_p50_trials_ms"], f[f"{kind}_p50_trials_ms"])
            cells += [f"{f[f'{kind}_p50_ms']:.3f}", _ratio((s.median, s.low, s.high))]
        print(f"| {path} | {f['params']:,} | {f['macs']:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
