"""The CIFAR-10 splits shared by issue 13's recipe benchmarks (``bench_recipe_*.py``, ``handwritten_kd.py``): VAL a
stratified 10% of train (chooses), TRAIN a stratified ``--train-limit`` subset of the rest, TEST the 10k test split
(reported, chooses nothing): the splits of ``configs/cifar10_resnet.yaml``."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def add_arguments(ap) -> None:
    """``--teacher``, ``--data`` and ``--train-limit``."""
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True, help="CIFAR-10 folder with train/ and test/")
    ap.add_argument("--train-limit", type=int, default=20000)


def open_splits(args):
    """The opened splits (``.train``, ``.val``, ``.test``) for parsed ``args``."""
    import kcompress as kc

    return kc.DataOptions(train=os.path.join(args.data, "train"), val_split=0.1, test=os.path.join(args.data, "test"),
                          train_limit=args.train_limit, scale=1 / 255).open(seed=0)
