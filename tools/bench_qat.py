"""Benchmark: fp32 vs PTQ int8 vs QAT int8 vs mixed precision (auto float layers) on CIFAR-10.

Trains the base models briefly (cached in --workdir), then for each: PTQ int8, QAT (--qat-epochs) exported to
int8, and mixed precision with ``auto_float_layers(max_drop)``; accuracy on a held-out TEST split (the test folder
minus the VAL samples used for model selection and the auto search), .tflite size and single-thread latency in the
LiteRT interpreter. Prints a Markdown table.

    nice -n 10 python tools/bench_qat.py --data ../shared/data/cifar10 --train-samples 20000 --epochs 12
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _arrays(data_dir: str, split: str, n: int, seed: int):
    from kcompress.data import Preprocess, open_data

    src = open_data(os.path.join(data_dir, split), Preprocess())
    xs, ys = [], []
    for x, y in src.with_preprocess(Preprocess()).numpy_batches((32, 32, 3), batch_size=500):
        xs.append(x.astype(np.uint8))
        ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys)
    order = np.random.default_rng(seed).permutation(len(y))[:n]
    return x[order], y[order]


def prepare_data(args):
    os.makedirs(args.workdir, exist_ok=True)
    paths = {k: os.path.join(args.workdir, f"{k}.npz") for k in ("train", "val", "test")}
    if not all(os.path.exists(p) for p in paths.values()):
        x, y = _arrays(args.data, "train", args.train_samples, 0)
        np.savez(paths["train"], x=x, y=y)
        x, y = _arrays(args.data, "test", 10000, 1)
        np.savez(paths["val"], x=x[: args.val_samples], y=y[: args.val_samples])
        np.savez(paths["test"], x=x[args.val_samples :], y=y[args.val_samples :])
    from kcompress.data import Preprocess, open_data

    pre = Preprocess(scale=1 / 255)
    return {k: open_data(p, pre) for k, p in paths.items()}


def base_model(name: str, data, args):
    from kcompress import zoo as architectures
    from kcompress.backend import keras
    from kcompress.io import load_model, save_model
    from kcompress.train import fit

    path = os.path.join(args.workdir, f"{name}_fp32.keras")
    if os.path.exists(path):
        return load_model(path)
    model = architectures.resnet_cifar() if name == "resnet" else architectures.mobilenetv2(alpha=0.5)
    for layer in model.layers:  # keras.applications' BN momentum 0.999 leaves the moving stats at their init
        if isinstance(layer, keras.layers.BatchNormalization):  # after a few short epochs (VAL at chance)
            layer.momentum = 0.9
    t0 = time.time()
    fit(model, data["train"], data["val"], epochs=args.epochs, batch_size=128, lr=2e-3, seed=0, verbose=2)
    print(f"[{name}] trained {args.epochs} epochs in {time.time() - t0:.0f}s", flush=True)
    save_model(model, path, overwrite=True)
    return model


def measure(name: str, tfl: bytes, test) -> dict:
    from kcompress.bench.host import bench_tflite
    from kcompress.evaluation import evaluate

    acc = evaluate(tfl, test, description=name).accuracy
    lat = bench_tflite(tfl, threads=1, batch_size=1, runs=100, warmup=10).latency_ms
    return {"variant": name, "accuracy": acc, "bytes": len(tfl), "latency_ms": lat.mean if lat else None}


def run_model(name: str, data, args) -> list[dict]:
    from kcompress.modelinfo import input_shape
    from kcompress.options import QATOptions, QuantizeOptions
    from kcompress.quantization.ptq import convert
    from kcompress.quantization.qat import int8_report, qat
    from kcompress.quantization.sensitivity import auto_float_layers

    model = base_model(name, data, args)
    if args.only_train:
        return []
    shape = input_shape(model)
    if args.control:
        return control_rows(name, model, data, args)
    rows = [measure("fp32", convert(model, QuantizeOptions(mode="fp32")), data["test"])]
    t0 = time.time()
    res = qat(model, data["train"], data["val"], QATOptions(epochs=args.qat_epochs, lr=args.qat_lr), bench=False)
    print(f"[{name}] QAT {args.qat_epochs} epochs + export in {time.time() - t0:.0f}s; {res.verdict}", flush=True)
    for w in res.warnings:
        print(f"[{name}] warning: {w}", flush=True)
    rows.append(measure("PTQ int8", res.ptq_tflite, data["test"]))
    rows.append(measure(f"QAT int8 ({args.qat_epochs} ep)", res.tflite, data["test"]))
    rows[-1]["int8_check"] = res.info["int8_check"]
    t0 = time.time()
    layers, report = auto_float_layers(model, data["train"], data["val"], max_drop=args.max_drop)
    print(f"[{name}] auto float layers {layers} in {time.time() - t0:.0f}s", flush=True)
    if layers:
        tfl = convert(
            model,
            QuantizeOptions(mode="int8", float_layers=tuple(layers)),
            calibration=lambda: data["train"].calibration_samples(shape, 200),
        )
        rows.append(measure(f"mixed ({len(layers)} float)", tfl, data["test"]))
        rows[-1]["float_layers"] = list(layers)
        rows[-1]["int8_check"] = int8_report(tfl, 4 * model.count_params(), layers)
    else:
        rows.append({"variant": "mixed", "note": "PTQ int8 already within max-drop: no layer kept float"})
    base = rows[0]["accuracy"]
    for r in rows:
        r["model"] = name
        if "accuracy" in r:
            r["drop_points"] = (base - r["accuracy"]) * 100
    return rows


def control_rows(name, model, data, args) -> list[dict]:
    """fp32 fine-tuned exactly as QAT is (same epochs, lr, batch), and its PTQ int8: separates the gain of the
    extra training from the gain of QAT itself."""
    from kcompress.modelinfo import input_shape
    from kcompress.options import QuantizeOptions
    from kcompress.quantization.ptq import convert
    from kcompress.train import fit

    shape = input_shape(model)
    fit(model, data["train"], data["val"], epochs=args.qat_epochs, batch_size=64, lr=args.qat_lr, seed=0, verbose=2)
    rows = [measure(f"fp32 + {args.qat_epochs} ep fine-tune", convert(model, QuantizeOptions(mode="fp32")), data["test"])]
    tfl = convert(model, QuantizeOptions(mode="int8"), calibration=lambda: data["train"].calibration_samples(shape, 200))
    rows.append(measure("PTQ int8 of that", tfl, data["test"]))
    for r in rows:
        r["model"] = name
        r["drop_points"] = (rows[0]["accuracy"] - r["accuracy"]) * 100
    return rows


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data", "cifar10"))
    p.add_argument("--workdir", default="/tmp/bench_qat")
    p.add_argument("--models", default="resnet,mobilenetv2")
    p.add_argument("--train-samples", type=int, default=20000)
    p.add_argument("--val-samples", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--qat-lr", type=float, default=2e-4)
    p.add_argument("--max-drop", type=float, default=0.3)
    p.add_argument("--only-train", action="store_true")
    p.add_argument("--control", action="store_true", help="only the fp32 fine-tune control (same schedule as QAT)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    t0 = time.time()
    data = prepare_data(args)
    rows = []
    for name in args.models.split(","):
        rows.extend(run_model(name, data, args))
    if not rows:
        return
    print(f"\nwall time {time.time() - t0:.0f}s; TEST = {data['test'].num_samples} CIFAR-10 test images\n")
    print("| model | variant | accuracy | drop (points) | .tflite KB | latency ms (1 thread) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "accuracy" not in r:
            print(f"| {r['model']} | {r['variant']} | {r['note']} | | | |")
            continue
        print(
            f"| {r['model']} | {r['variant']} | {r['accuracy']:.2%} | {r['drop_points']:+.2f} | "
            f"{r['bytes'] / 1024:.0f} | {r['latency_ms']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
