#!/usr/bin/env python
"""Post-training quantization on CIFAR-10: every mode, for a ResNet-20-style net and MobileNetV2.

Trains each model (or loads it from --models-dir when present), converts it in every mode, evaluates each .tflite
on the whole test split in the LiteRT interpreter, times p50 latency at 1 and 2 threads, and prints one Markdown
table with ratios to fp32.

    python tools/bench_ptq.py --data ../shared/data/cifar10 --epochs 15 --train-limit 20000
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kcompress.bench.host import bench_tflite  # noqa: E402
from kcompress.data import Preprocess, open_data  # noqa: E402
from kcompress.evaluation import evaluate  # noqa: E402
from kcompress.io import load_model, save_model  # noqa: E402
from kcompress.modelinfo import count_params
from kcompress.options import QuantizeOptions  # noqa: E402
from kcompress.quantization.ptq import convert  # noqa: E402
from kcompress.train import fit  # noqa: E402
from kcompress.types import QuantMode  # noqa: E402
from kcompress.zoo import mobilenetv2, resnet_cifar  # noqa: E402

MODES = QuantMode.values()


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data", "cifar10"))
    ap.add_argument("--models", default="resnet,mobilenetv2")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--train-limit", type=int, default=None, help="Train on the first N shuffled images.")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--models-dir", default="bench-models", help="Trained models are cached here.")
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    if not os.path.isdir(os.path.join(args.data, "train")):
        sys.exit(f"no CIFAR-10 at {args.data} (expected train/ and test/ image folders)")
    pre = Preprocess(scale=1 / 255)
    train, test = open_data(os.path.join(args.data, "train"), pre), open_data(os.path.join(args.data, "test"), pre)
    if args.train_limit:
        train = train.subset(args.train_limit)
    os.makedirs(args.models_dir, exist_ok=True)
    print(f"train {train.num_samples}, test {test.num_samples if not args.test_limit else args.test_limit}",
          flush=True)
    tables = []
    for name in args.models.split(","):
        path = os.path.join(args.models_dir, f"cifar_{name}.keras")
        if os.path.exists(path):
            model = load_model(path)
        else:
            model = resnet_cifar() if name == "resnet" else mobilenetv2((32, 32, 3), 10)
            t0 = time.time()
            fit(model, train, test, epochs=args.epochs, batch_size=128, lr=2e-3, verbose=2)
            print(f"trained {name} in {time.time() - t0:.0f} s", flush=True)
            save_model(model, path)
        params = count_params(model)["total"]
        shape = model.input_shape[1:]
        rows = []
        for mode in MODES:
            t0 = time.time()
            data = convert(model, QuantizeOptions(mode=mode), calibration=lambda: train.calibration_samples(shape, 200))
            acc = evaluate(data, test, limit=args.test_limit, batch_size=50).accuracy
            lat = [bench_tflite(data, threads=t, runs=args.runs, warmup=20).latency_ms.p50 for t in (1, 2)]
            rows.append((mode, len(data), acc, *lat))
            print(f"{name} {mode}: {len(data)} B, acc {acc:.4f}, p50 {lat[0]:.3f}/{lat[1]:.3f} ms "
                  f"({time.time() - t0:.0f} s)", flush=True)
        ref = rows[0]
        lines = [f"\n### {name} ({params:,} params)\n",
                 "| mode | size | size/fp32 | accuracy | Δ points | p50 1 thr | speed-up | p50 2 thr | speed-up |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for mode, size, acc, l1, l2 in rows:
            lines.append(f"| {mode} | {size / 1e6:.3f} MB | {size / ref[1]:.2f}x | {100 * acc:.2f}% | "
                         f"{100 * (acc - ref[2]):+.2f} | {l1:.3f} ms | {ref[3] / l1:.2f}x | {l2:.3f} ms | "
                         f"{ref[4] / l2:.2f}x |")
        tables.append("\n".join(lines))
        print(tables[-1], flush=True)
    print("\n".join(tables))


if __name__ == "__main__":
    main()
