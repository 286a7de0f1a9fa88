#!/usr/bin/env python
"""Issue 13's distillation row on one trained teacher: a half-width student distilled with a training recipe,
started from scratch or from the teacher's own channels (``student_init``), measured on TEST (which chose nothing).

The splits are the pipeline's (``configs/cifar10_resnet.yaml``): VAL a stratified 10% of train (chooses the best
epoch), TRAIN a stratified ``--train-limit`` subset of the rest, TEST the 10k test split. Each run is one
``kc.distill`` call (KD T=4, alpha 0.5, the teacher on every augmented batch: flip + crop:4); rows go to
``--out`` (JSON) as they finish, so an interrupted benchmark keeps what it measured. Example::

    nice python tools/bench_recipe_distill.py --teacher runs/cifar13/01-baseline/model.keras \\
        --data ../shared/data/cifar10 --inits teacher scratch --seeds 0 1 --epochs 15 --lr 0.05
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cifar_splits import add_arguments, open_splits  # noqa: E402

import kcompress as kc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="empty: the distill stage's rate for the optimizer")
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--weight-decay", type=float, default=None)
    ap.add_argument("--inits", nargs="+", default=["teacher", "scratch"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--student-out", default=None, help="save each student as STUDENT_OUT-INIT-SEED.keras")
    ap.add_argument("-o", "--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    splits = open_splits(args)
    train_opts = kc.TrainOptions(optimizer=args.optimizer, weight_decay=args.weight_decay)
    rows = json.load(open(args.out)) if args.out and os.path.exists(args.out) else []
    recipe = {"width": args.width, "epochs": args.epochs, "lr": args.lr, "optimizer": args.optimizer,
              "weight_decay": args.weight_decay}

    def same(r):  # rows of this recipe (an earlier run's rows of another recipe stay, apart)
        return all(r.get(k) == v for k, v in recipe.items())

    done = {(r["init"], r["seed"]) for r in rows if same(r)}
    for init in args.inits:
        for seed in args.seeds:
            if (init, seed) in done:
                continue
            t0 = time.time()
            r = kc.distill(args.teacher, splits.train, splits.val, test=splits.test, seed=seed, epochs=args.epochs,
                           lr=args.lr, batch_size=args.batch_size, student_width=args.width, student_init=init,
                           train_options=train_opts, max_drop=100, log=print, verbose=2)
            row = {"init": init, "seed": seed, **recipe,
                   "student_params": r.student_params, "teacher_params": r.teacher_params,
                   "val_student": r.student_accuracy, "val_teacher": r.teacher_accuracy,
                   "test_student": r.test["student_accuracy"], "test_teacher": r.test["teacher_accuracy"],
                   "best_epoch": r.best_epoch, "seconds": round(time.time() - t0)}
            if args.student_out:
                r.save(f"{args.student_out}-{init}-{seed}.keras", overwrite=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out + ".tmp", "w") as f:
                    json.dump(rows, f, indent=1)
                os.replace(args.out + ".tmp", args.out)
    print(f"\n| student x{args.width} ({args.epochs} epochs) | params | TEST per seed | TEST mean | teacher TEST |")
    print("|---|---|---|---|---|")
    for init in args.inits:
        mine = [r for r in rows if r["init"] == init and same(r)]
        if mine:
            accs = [100 * r["test_student"] for r in mine]
            print(f"| init {init} | {mine[0]['student_params']:,} | " + ", ".join(f"{a:.2f}%" for a in accs)
                  + f" | {statistics.mean(accs):.2f}% | {100 * mine[0]['test_teacher']:.2f}% |")


if __name__ == "__main__":
    main()
