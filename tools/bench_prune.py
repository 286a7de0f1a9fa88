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

import kcompress.backend  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
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
    from kcompress.io import load_model, save_model
    from kcompress.train import fit
    from kcompress.zoo import resnet_cifar

    path = os.path.join(args.work, "base.keras")
    if os.path.exists(path):
        return load_model(path)
    t0 = time.time()
    model = resnet_cifar(width=16)
    fit(model, train, val, epochs=args.epochs, batch_size=128, lr=2e-3, seed=0, verbose=2)
    save_model(model, path)
    print(f"base trained in {time.time() - t0:.0f} s", flush=True)
    return model


def measure(name, model, train, test, seconds=None):
    from kcompress.bench.host import bench_tflite
    from kcompress.evaluation import evaluate
    from kcompress.modelinfo import count_macs, count_params
    from kcompress.options import QuantizeOptions
    from kcompress.quantization.ptq import convert

    row = {"model": name, "accuracy": evaluate(model, test, batch_size=256).accuracy,
           "params": count_params(model)["total"], "macs": count_macs(model), "seconds": seconds}
    fp32 = convert(model, QuantizeOptions(mode="fp32"))
    int8 = convert(model, QuantizeOptions(mode="int8", io="float"),
                   calibration=lambda: train.calibration_samples((32, 32, 3), 100))
    for tag, b in (("fp32", fp32), ("int8", int8)):
        row[f"{tag}_bytes"] = len(b)
        row[f"{tag}_gzip"] = len(gzip.compress(b, 9))
        for t in (1, 2):
            row[f"{tag}_ms_t{t}"] = bench_tflite(b, threads=t, runs=100, warmup=20).latency_ms.p50
    print(json.dumps(row), flush=True)
    return row


def table(rows) -> str:
    base = rows[0]
    head = ("| model | acc % | params | MMACs | fp32 KB (gzip) | int8 KB (gzip) | fp32 ms t1 / t2 | int8 ms t1 / t2 "
            "| fp32 speed-up t1 | gzip vs base | fine-tune s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['model']} | {100 * r['accuracy']:.2f} | {r['params']:,} | {r['macs'] / 1e6:.1f} "
            f"| {r['fp32_bytes'] / 1024:.0f} ({r['fp32_gzip'] / 1024:.0f}) | {r['int8_bytes'] / 1024:.0f} "
            f"({r['int8_gzip'] / 1024:.0f}) | {r['fp32_ms_t1']:.3f} / {r['fp32_ms_t2']:.3f} "
            f"| {r['int8_ms_t1']:.3f} / {r['int8_ms_t2']:.3f} | {base['fp32_ms_t1'] / r['fp32_ms_t1']:.2f}x "
            f"| fp32 {r['fp32_gzip'] / base['fp32_gzip']:.2f}x, int8 {r['int8_gzip'] / base['int8_gzip']:.2f}x "
            f"| {r['seconds'] or 0:.0f} |"
        )
    return "\n".join(lines)


def run_all(args, model, train, val, test):
    from kcompress.options import PruneOptions
    from kcompress.pruning.magnitude import prune_magnitude
    from kcompress.pruning.structured import prune_structured

    out = os.path.join(args.work, "rows.json")
    rows = json.load(open(out)) if os.path.exists(out) else []
    done = {r["model"] for r in rows}

    def keep(row):
        rows.append(row)
        json.dump(rows, open(out, "w"), indent=1)
        print(table(rows), flush=True)

    if "base" not in done:
        keep(measure("base", model, train, test))
    structured = [
        (f"structured -{int(100 * f)}% FLOPs ({args.criterion})",
         lambda f=f: prune_structured(model, train, val, PruneOptions(
             target_flops=f, criterion=args.criterion, epochs=args.ft_epochs, lr=1e-3, batch_size=128),
             verbose=2).model)
        for f in args.flops
    ]
    magnitude = [
        (f"magnitude {int(100 * s)}%",
         lambda s=s: prune_magnitude(model, train, val, PruneOptions(
             method="magnitude", sparsity=s, epochs=args.ft_epochs, lr=5e-4, batch_size=128), verbose=2).model)
        for s in args.sparsity
    ]
    variants = [v for pair in zip(structured, magnitude) for v in pair]  # the goals' rows first (defaults)
    variants += structured[len(magnitude):] + magnitude[len(structured):]
    for name, run in variants:
        if name in done:
            continue
        t0 = time.time()
        pruned = run()
        keep(measure(name, pruned, train, test, time.time() - t0))
    print("\nfinal table:\n" + table(rows), flush=True)


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
    p.add_argument("--criterion", default="l1")
    p.add_argument("--flops", type=float, nargs="*", default=[0.5, 0.3])
    p.add_argument("--sparsity", type=float, nargs="*", default=[0.8, 0.5])
    args = p.parse_args()
    t0 = time.time()
    train, val, test = prepare(args)
    print(f"data ready in {time.time() - t0:.0f} s: {train.num_samples} train, {val.num_samples} val, "
          f"{test.num_samples} test", flush=True)
    model = base_model(args, train, val)
    if args.stage == "base":
        return
    run_all(args, model, train, val, test)


if __name__ == "__main__":
    main()
