"""Benchmark of ``kcompress prune`` on CIFAR-10 (issue 4): structured 30%/50% FLOPs and magnitude 50%/80%.

Trains a ResNet-20-style base (``architectures.resnet_cifar``) on a subset of CIFAR-10 train (cached as .npz in
``--work``), then prunes it four ways with fine-tuning and measures accuracy on the test set, params, MACs, raw
and gzip size, and fp32/int8 TFLite p50 latency at 1 and 2 threads against the unpruned model. Prints a Markdown
table. Example::

    nice -n 10 python tools/bench_prune.py --data ../shared/data/cifar10 --train-limit 20000 --epochs 15
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from kcompress._keras import keras, tf  # noqa: E402
from kcompress.data import Preprocess, open_data  # noqa: E402


def cache_npz(data_dir: str, split: str, limit: int, out: str, seed: int = 0) -> str:
    """Decodes ``limit`` images of a split (a fixed random subset) into an npz of 0-255 pixels."""
    if os.path.exists(out):
        return out
    src = open_data(os.path.join(data_dir, split))
    xs, ys = [], []
    for x, y in src.numpy_batches((32, 32, 3), batch_size=512, limit=None) if limit >= src.num_samples else _subset(
        src, limit, seed
    ):
        xs.append(x.astype(np.uint8))
        ys.append(y)
    np.savez(out, x=np.concatenate(xs), y=np.concatenate(ys), class_names=np.asarray(src.class_names))
    return out


def _subset(src, limit, seed):
    for x, y in src.dataset((32, 32, 3), batch_size=512, shuffle=True, seed=seed, limit=limit):
        yield x.numpy(), y.numpy()


def prepare(args):
    os.makedirs(args.work, exist_ok=True)
    full = cache_npz(args.data, "train", args.train_limit + args.val_limit, os.path.join(args.work, "trainval.npz"))
    test = cache_npz(args.data, "test", args.test_limit, os.path.join(args.work, "test.npz"))
    arr = np.load(full)
    tr, va = os.path.join(args.work, "train.npz"), os.path.join(args.work, "val.npz")
    if not os.path.exists(tr):
        n = args.train_limit
        np.savez(tr, x=arr["x"][:n], y=arr["y"][:n], class_names=arr["class_names"])
        np.savez(va, x=arr["x"][n:], y=arr["y"][n:], class_names=arr["class_names"])
    pre = Preprocess(scale=1 / 255)
    return open_data(tr, pre), open_data(va, pre), open_data(test, pre)


def base_model(args, train, val):
    from kcompress.architectures import resnet_cifar
    from kcompress.models import load_model, save_model
    from kcompress.train import fit

    path = os.path.join(args.work, "base.keras")
    if os.path.exists(path):
        return load_model(path)
    t0 = time.time()
    model = resnet_cifar(width=16)
    fit(model, train, val, epochs=args.epochs, batch_size=128, lr=2e-3, seed=0, verbose=2)
    save_model(model, path)
    print(f"base trained in {time.time() - t0:.0f} s", flush=True)
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10"))
    p.add_argument("--work", default="/tmp/bench_prune")
    p.add_argument("--train-limit", type=int, default=20000)
    p.add_argument("--val-limit", type=int, default=2000)
    p.add_argument("--test-limit", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--ft-epochs", type=int, default=4, help="fine-tune epochs per pruned model")
    p.add_argument("--stage", default="all", choices=["base", "all"])
    args = p.parse_args()
    t0 = time.time()
    train, val, test = prepare(args)
    print(f"data ready in {time.time() - t0:.0f} s: {train.num_samples} train, {val.num_samples} val, "
          f"{test.num_samples} test", flush=True)
    model = base_model(args, train, val)
    if args.stage == "base":
        return
    from bench_prune_run import run_all  # noqa: E402  (filled in below)

    run_all(args, model, train, val, test)


if __name__ == "__main__":
    main()
