#!/usr/bin/env python
"""The full pipeline on CIFAR-10: ResNet-20-style teacher -> distilled student -> structured prune -> int8.

Runs ``configs/cifar10_resnet.yaml`` (with any ``section.key=value`` overrides, e.g. a smaller train_limit for
a quicker run), then prints every stage's accuracy on TEST (CIFAR-10's test split, which chose nothing; VAL is a
stratified 10% of train), size and latency, and the goal check: at least 20x smaller than the fp32 teacher file at
98% or more of the teacher's accuracy (relative, on TEST).

    python tools/bench_pipeline.py --data ../shared/data/cifar10 -o runs/bench-pipeline data.train_limit=20000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kcompress.errors import KcompressError  # noqa: E402
from kcompress.pipeline.config import load_config  # noqa: E402
from kcompress.pipeline.report import read_run, write_report  # noqa: E402
from kcompress.pipeline.runner import execute  # noqa: E402


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data", "cifar10"))
    ap.add_argument("--config", default=os.path.join(here, "..", "configs", "cifar10_resnet.yaml"))
    ap.add_argument("-o", "--out", default="runs/bench-pipeline")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if not os.path.isdir(os.path.join(args.data, "train")):
        sys.exit(f"no CIFAR-10 at {args.data}")
    overrides = [f"data.train={args.data}/train", f"data.test={args.data}/test", *args.overrides]
    cfg, _ = load_config(args.config, overrides)
    t0 = time.time()
    try:
        execute(cfg, args.out, resume=args.resume, log=lambda m: print(m, flush=True))
    except KcompressError as e:
        sys.exit(f"stopped: {e}\n(loosen the gate with e.g. distill.max_drop=5 max_drop=6 and --resume)")
    write_report([args.out])
    stages = {s["stage"]: s["metrics"] for s in read_run(args.out)}
    base = stages["baseline"]
    teacher_file = base["tflite_fp32_bytes"]
    print("\n| stage | test accuracy | relative to teacher (test) | val accuracy | size | teacher size / size | "
          "p50 1 thread |")
    print("|---|---|---|---|---|---|---|")
    for name, m in stages.items():
        if name in ("train", "benchmark"):
            continue
        size = m.get("tflite_bytes") or m.get("tflite_fp32_bytes")
        print(f"| {name} | {100 * m['test']['accuracy']:.2f}% | {100 * m['test']['accuracy'] / base['test']['accuracy']:.1f}% "
              f"| {100 * m['accuracy']:.2f}% | {size / 1e3:.1f} kB | {teacher_file / size:.1f}x | "
              f"{m['latency_p50_ms']:.3f} ms |")
    final = stages["quantize"]
    ratio = teacher_file / final["tflite_bytes"]
    rel = final["test"]["accuracy"] / base["test"]["accuracy"]
    print(f"\ngoal (>= 20x smaller at >= 98% relative accuracy): {ratio:.1f}x at {100 * rel:.1f}% -> "
          f"{'met' if ratio >= 20 and rel >= 0.98 else 'NOT met'}; wall time {time.time() - t0:.0f} s")
    print(json.dumps(stages.get("benchmark", {}).get("bench", []), indent=1))


if __name__ == "__main__":
    main()
