"""Benchmark of block pruning and latency targets (issue 13): channel vs block vs both at one FLOPs target, then
a latency target, on a trained model (e.g. ResNet-20 width 16 on CIFAR-10). No fine-tuning (``epochs=0``): the
figures are the architectures' MACs and fp32 ``.tflite`` latency (LiteRT, 1 thread, batch 1, all models' trials
interleaved), with VAL accuracy before any fine-tuning as a hint of what each removed. Prints Markdown. Example::

    nice -n 10 python tools/bench_blocks.py --model model.keras --val ../shared/data/cifar10/test --val-limit 2000
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kcompress.backend  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from kcompress.data import Preprocess, open_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--val", required=True, help="VAL data: block importance and the accuracy column")
    ap.add_argument("--val-limit", type=int, default=2000)
    ap.add_argument("--scale", type=float, default=1 / 255)
    ap.add_argument("--target-flops", type=float, default=0.5)
    ap.add_argument("--latency-factor", type=float, default=0.6, help="latency target = this x the input's p50")
    args = ap.parse_args()

    from kcompress.bench.host import bench_tflite_many
    from kcompress.evaluation import evaluate
    from kcompress.io import load_model
    from kcompress.modelinfo import count_macs
    from kcompress.options import PruneOptions
    from kcompress.pruning.blocks import find_blocks, fp32_latency_ms
    from kcompress.pruning.structured import prune_structured
    from kcompress.quantization.ptq import convert

    model = load_model(args.model)
    val = open_data(args.val, Preprocess(scale=args.scale)).subset(args.val_limit, seed=0)
    rows = {"input": (model, 0.0, {})}
    for g in ("channel", "block", "both"):
        t0 = time.perf_counter()
        r = prune_structured(model, None, val, PruneOptions(granularity=g, target_flops=args.target_flops, rounds=1,
                                                            epochs=0))
        rows[g] = (r.model, time.perf_counter() - t0, r.staged)
    results = bench_tflite_many([convert(m) for m, _, _ in rows.values()], threads=1, runs=50, trials=5)
    print(f"\n| {args.target_flops:.0%} FLOPs | MACs | blocks | fp32 p50 ms (trials' range) | VAL acc, no fine-tune "
          "| prune s |\n|---|---|---|---|---|---|")
    for (name, (m, secs, staged)), res in zip(rows.items(), results):
        p = res.p50_interval
        acc = evaluate(m, val).accuracy
        print(f"| {name} | {count_macs(m) / 1e6:.2f}M | {len(find_blocks(m))} | {p.median:.3f} ({p.low:.3f}-{p.high:.3f}) "
              f"| {100 * acc:.2f}% | {secs:.0f} |")
        for b in staged.get("removed_blocks", []):
            print(f"|  - {b['block']} | {b['macs'] / 1e6:.2f}M | | | loss {b['importance']:+.3f}, "
                  f"acc {-b['accuracy_drop']:+.2f} pts | |")
    before = fp32_latency_ms(model)
    target = args.latency_factor * before
    print(f"\nlatency target {target:.3f} ms ({args.latency_factor:g} x {before:.3f} ms)\n")
    print("| granularity | MACs after | reached ms | reached | timings | prune s |\n|---|---|---|---|---|---|")
    for g in ("channel", "block", "both"):
        t0 = time.perf_counter()
        r = prune_structured(model, None, val, PruneOptions(granularity=g, target_latency_ms=target, epochs=0))
        lat = r.staged["latency"]
        print(f"| {g} | {r.macs_after / 1e6:.2f}M ({1 - r.macs_after / r.macs_before:.0%} less) | "
              f"{lat['reached_ms']:.3f} | {lat['reached']} | {len(lat['timings'])} | "
              f"{time.perf_counter() - t0:.0f} |")


if __name__ == "__main__":
    main()
