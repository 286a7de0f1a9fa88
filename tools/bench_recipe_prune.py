#!/usr/bin/env python
"""Issue 13's pruning rows on one trained teacher: structured 50% of FLOPs (channel, block, both) and magnitude 80%,
fine-tuned with a training recipe, measured on TEST (which chose nothing) against the unpruned teacher.

The splits are the pipeline's (``configs/cifar10_resnet.yaml``): VAL a stratified 10% of train (chooses the epoch),
TRAIN a stratified ``--train-limit`` subset of the rest, TEST the 10k test split. Latency: the fp32 and int8
``.tflite`` at 1 thread, batch 1, 5 interleaved trials in a LiteRT-only child (median of trial p50s). Example::

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
    ap.add_argument("-o", "--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    splits = open_splits(args)
    train_opts = kc.TrainOptions(optimizer=args.optimizer)
    base = kc.evaluate(args.teacher, splits.test).accuracy
    rows = []
    for run in args.runs:
        t0 = time.time()
        if run == "magnitude":
            r = kc.prune(args.teacher, splits.train, splits.val, test=splits.test, method="magnitude", sparsity=0.8,
                         epochs=args.epochs, train_options=train_opts, log=print, max_drop=100)
        else:
            r = kc.prune(args.teacher, splits.train, splits.val, test=splits.test, target_flops=0.5, granularity=run,
                         epochs=args.epochs, train_options=train_opts, log=print, max_drop=100)
        b, a = r.before, r.after
        row = {"run": run, "test_before": r.test["before_accuracy"], "test_after": r.test["after_accuracy"],
               "loss_points": 100 * (r.test["before_accuracy"] - r.test["after_accuracy"]),
               "val_after": r.accuracy_after, "params": (b["params"], a["params"]), "macs": (b["macs"], a["macs"]),
               "gzip": (b["fp32_tflite"]["gzip"], a["fp32_tflite"]["gzip"]), "seconds": round(time.time() - t0)}
        if run != "magnitude":
            row.update(fp32_ms=(b["fp32_p50_ms"], a["fp32_p50_ms"]), int8_ms=(b["int8_p50_ms"], a["int8_p50_ms"]),
                       fp32_speedup=b["fp32_p50_ms"] / a["fp32_p50_ms"], int8_speedup=b["int8_p50_ms"] / a["int8_p50_ms"],
                       removed_blocks=[x["block"] for x in r.details.get("removed_blocks", [])])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nteacher {args.teacher}: TEST {100 * base:.2f}%; recipe {args.optimizer}, {args.epochs} fine-tune epochs\n")
    print("| run | test after (teacher) | loss (points) | params | MACs | fp32 p50 ms (speed-up) | int8 p50 ms (speed-up) "
          "| gzip size |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        fp = f"{r['fp32_ms'][0]:.3f} -> {r['fp32_ms'][1]:.3f} ({r['fp32_speedup']:.2f}x)" if "fp32_ms" in r else "-"
        q = f"{r['int8_ms'][0]:.3f} -> {r['int8_ms'][1]:.3f} ({r['int8_speedup']:.2f}x)" if "int8_ms" in r else "-"
        print(f"| {r['run']} | {100 * r['test_after']:.2f}% ({100 * r['test_before']:.2f}%) | {r['loss_points']:.2f} | "
              f"{r['params'][0]:,} -> {r['params'][1]:,} | {r['macs'][0]:,} -> {r['macs'][1]:,} | {fp} | {q} | "
              f"{r['gzip'][1] / r['gzip'][0]:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
