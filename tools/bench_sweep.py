#!/usr/bin/env python
"""A CIFAR-10 sweep: ResNet-20-style teacher, then student width x structured prune amount x quantization scheme.

Runs ``kcompress.sweep`` on ``configs/cifar10_resnet.yaml`` with a reduced training budget (overridable with
``section.key=value`` arguments) over the grid

    distill.student_width: [0.5, 0.75]     prune.target_flops: [0.3, 0.5]     quantize.mode: [int8, int16x8]

(8 trials; ``--trials`` for fewer), then prints the Pareto front on accuracy (VAL: it chose the front; TEST beside
it, which chose nothing) and size, every trial's row, the wall time, how many stages the trials shared (the teacher
is trained once, each student width distilled once, each pruned student quantized twice) and the CPU.

    nice python tools/bench_sweep.py --data ../shared/data/cifar10 -o sweeps/bench-cifar10
    python tools/bench_sweep.py --smoke        # a 2-trial run on 2,000 images, to check that it starts
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import kcompress as kc  # noqa: E402
from kcompress.pipeline.config import load_config  # noqa: E402

SPACE = {
    "distill.student_width": [0.5, 0.75],
    "prune.target_flops": [0.3, 0.5],
    "quantize.mode": ["int8", "int16x8"],
}
# The budget: a 20k-image training subset, a 12-epoch teacher, 10-epoch students, one-round prune, 1 QAT epoch.
BUDGET = [
    "data.train_limit=20000", "model.epochs=12", "distill.epochs=10", "prune.rounds=1", "prune.epochs=3",
    "qat.epochs=1", "benchmark.threads=[1]", "benchmark.batch_sizes=[1]", "baseline.batch_sizes=[1]",
    # gates a sweep explores rather than stops at: a trial below them is still a point on the plot
    "max_drop=10", "distill.max_drop=10", "prune.max_drop=10", "quantize.max_drop=3",
]
# the smoke checks that every stage runs and reports, not accuracy: its gates are off
SMOKE = ["data.train_limit=2000", "model.epochs=4", "distill.epochs=1", "prune.epochs=1", "qat.epochs=1",
         "max_drop=100", "distill.max_drop=100", "prune.max_drop=100", "quantize.max_drop=100"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data", "cifar10"))
    ap.add_argument("--config", default=os.path.join(here, "..", "configs", "cifar10_resnet.yaml"))
    ap.add_argument("-o", "--out", default="sweeps/bench-cifar10")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a tiny 2-trial run to check that the tool starts")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if not os.path.isdir(os.path.join(args.data, "train")):
        sys.exit(f"no CIFAR-10 at {args.data}")
    overrides = [f"data.train={args.data}/train", f"data.test={args.data}/test", *BUDGET,
                 *(SMOKE if args.smoke else []), *args.overrides]
    cfg, _ = load_config(args.config, overrides)
    trials = 2 if args.smoke and args.trials is None else args.trials
    t0 = time.time()
    result = kc.sweep(cfg, SPACE, args.out, trials=trials, objectives=("accuracy", "size"), sampler="grid",
                      resume=args.resume, log=lambda m: print(m, flush=True))
    wall = time.time() - t0
    summary = result.to_dict() if hasattr(result, "to_dict") else {}
    print(f"\nCPU: {cpu_name()}; wall time {wall:.0f} s; {len(result.trials)} trials; "
          f"{sum(t.shared_stages for t in result.trials)} stages shared between trials")
    print(open(os.path.join(args.out, "sweep.md")).read())
    with open(os.path.join(args.out, "bench_sweep.json"), "w") as f:
        json.dump({"cpu": cpu_name(), "wall_s": wall, "overrides": overrides, "space": SPACE,
                   "summary": summary}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
