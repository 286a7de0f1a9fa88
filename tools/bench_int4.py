#!/usr/bin/env python
"""int4 weights on CIFAR-10: fp32, int8, int16x8, int4-weights and a recipe (first and last layers int8, the rest
int4) of one ResNet-style model: size, TEST-split accuracy in LiteRT, p50 latency at 1 thread (batch 1, the
files timed interleaved), and the CPU. Prints a Markdown table and writes the same rows as JSON.

    python tools/bench_int4.py --model bench-models/cifar_resnet.keras --data ../shared/data/cifar10
    python tools/bench_int4.py --smoke          # tiny untrained model, 64 images: checks the script runs

Without --model a ResNet-20 (kcompress.zoo.resnet_cifar) is trained for --epochs first. Calibration: 200
stratified samples of the training split (the int8 path's default), the same for every mode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kcompress.bench.host import bench_tflite_many, versions  # noqa: E402
from kcompress.bench.schema import host_target  # noqa: E402
from kcompress.data import Preprocess, open_data  # noqa: E402
from kcompress.evaluation import evaluate  # noqa: E402
from kcompress.options import QuantizeOptions  # noqa: E402
from kcompress.quantization.aeq import int4_weights  # noqa: E402
from kcompress.quantization.ptq import convert  # noqa: E402

FIRST_LAST_INT8 = [{"layers": ["first", "last"], "weights": "int8"}]


def _data(args):
    pre = Preprocess(scale=1 / 255)
    if args.smoke:
        src = open_data(os.path.join(args.data, "test"), pre) if os.path.isdir(args.data) else None
        if src is None:
            import numpy as np

            rng = np.random.default_rng(0)
            path = os.path.join(args.out_dir, "smoke.npz")
            np.savez(path, x=rng.integers(0, 256, (64, 32, 32, 3)).astype(np.uint8), y=np.arange(64) % 10)
            src = open_data(path, pre)
        src = src.subset(64)
        return src, src
    if not os.path.isdir(os.path.join(args.data, "train")):
        sys.exit(f"no CIFAR-10 at {args.data} (expected train/ and test/ image folders)")
    train, test = open_data(os.path.join(args.data, "train"), pre), open_data(os.path.join(args.data, "test"), pre)
    return train, (test.subset(args.test_limit) if args.test_limit else test)


def _model(args, train):
    from kcompress.io import load_model, save_model
    from kcompress.zoo import resnet_cifar

    if args.model:
        return load_model(args.model), args.model
    model = resnet_cifar(width=8, blocks_per_stage=1) if args.smoke else resnet_cifar()
    if not args.smoke:
        from kcompress.train import fit

        fit(model, train, None, epochs=args.epochs, lr=1e-3, verbose=2)
        path = os.path.join(args.out_dir, "cifar_resnet.keras")
        save_model(model, path, overwrite=True)
        return model, path
    return model, "resnet_cifar(width=8, 1 block/stage), untrained (smoke)"


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data", "cifar10"))
    ap.add_argument("--model", default=None, help="A trained CIFAR-10 Keras model (default: train a ResNet-20).")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--test-limit", type=int, default=None, help="Evaluate on a stratified N of TEST.")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--out-dir", default="bench-int4")
    ap.add_argument("--max-drop", type=float, default=1.0, help="Budget (points, on VAL) of the auto recipe row.")
    ap.add_argument("--smoke", action="store_true", help="Tiny untrained model, 64 images, few runs.")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    train, test = _data(args)
    model, name = _model(args, train)
    # VAL (chooses the mixed-precision recipe): a stratified 4% of TRAIN, never used to calibrate; TEST reports
    train, val = (train, train) if args.smoke else train.split(0.04, what="VAL")
    shape = tuple(model.input_shape[1:])
    calib = lambda: train.calibration_samples(shape, 32 if args.smoke else 200)  # noqa: E731
    fp32 = convert(model)
    files = {"fp32": fp32,
             "int8": convert(model, QuantizeOptions(mode="int8"), calibration=calib),
             "int16x8": convert(model, QuantizeOptions(mode="int16x8"), calibration=calib)}
    files["int4-weights"], rep4 = int4_weights(model, fp32, None, calib)
    files["int4 + first/last int8"], rep_r = int4_weights(model, fp32, FIRST_LAST_INT8, calib)
    auto = f"int4 auto (max_drop {args.max_drop} on VAL)"
    files[auto], rep_a = int4_weights(model, fp32, "auto", calib, val, args.max_drop)
    runs, trials = (10, 2) if args.smoke else (args.runs, args.trials)
    lat = bench_tflite_many(list(files.values()), threads=1, runs=runs, warmup=5, trials=trials)
    rows = []
    for (mode, tfl), la in zip(files.items(), lat):
        acc = evaluate(tfl, test, description=f"{mode} on TEST").accuracy
        rows.append({"mode": mode, "bytes": len(tfl), "size_vs_fp32": len(tfl) / len(fp32), "test_accuracy": acc,
                     "p50_ms": la.p50_interval.median, "p50_trials_ms": list(la.trial_p50s)})
        with open(os.path.join(args.out_dir, f"{mode.replace(' ', '').replace('/', '_')}.tflite"), "wb") as f:
            f.write(tfl)
    target = host_target(**versions())
    doc = {"model": name, "test": test.name, "test_samples": test.num_samples, "cpu": target["cpu"],
           "target": target, "threads": 1, "batch": 1, "rows": rows,
           "int4_layers": rep4["layers"], "recipe_layers": rep_r["layers"], "scheme": rep4["scheme"],
           "auto_layers": rep_a["layers"], "auto_counts": rep_a["counts"], "auto_plan": rep_a["plan"]}
    base = {r["mode"]: r for r in rows}
    print(f"\n{name} on {test.name} ({test.num_samples} images), {target['cpu']}, 1 thread, batch 1\n")
    print("| mode | size | vs fp32 | TEST acc | p50 ms | vs int8 p50 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['bytes'] / 1e3:.1f} kB | {r['size_vs_fp32']:.2f}x | {100 * r['test_accuracy']:.2f}% "
              f"| {r['p50_ms']:.3f} | {r['p50_ms'] / base['int8']['p50_ms']:.2f}x |")
    path = os.path.join(args.out_dir, "bench_int4.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    print(f"\nauto recipe: {rep_a['counts']} (layers per weight type, as found in the file)")
    print(f"\nWrote {path}")


if __name__ == "__main__":
    main()
