#!/usr/bin/env python
"""LiteRT vs ONNX Runtime on CIFAR-10: fp32 and int8 in both runtimes, accuracy on TEST, latency at 1 and 2 threads.

The model: --model PATH (a Keras model), else the ResNet-20-style teacher (kcompress.zoo.resnet_cifar) trained here
or loaded from --models-dir (the cache tools/bench_ptq.py writes: cifar_resnet.keras). Then:

- LiteRT fp32 (the TFLite converter) and LiteRT int8 (``kc.quantize``: full integer, per-channel, int8 I/O);
- ONNX fp32 (``export_onnx``, checked against Keras) and ONNX Runtime int8 static QDQ (U8S8, MinMax), per-channel
  AND per-tensor.

Every int8 model is calibrated on the SAME stratified, seeded samples of TRAIN (``--calibration-samples``); every
accuracy is on the TEST split (chose nothing). Latency: each configuration (threads x batch 1) times all five files
in their own runtime-only child processes, trials interleaved (``kcompress.bench.host``); p50 is the median of the
trials' p50s, p95 pooled; init = model load / session creation, first = first inference, both outside the warm
percentiles. Prints a Markdown table headed by the CPU model and writes the JSON (--out).

    python tools/bench_onnx.py --data ../shared/data/cifar10 --out bench-onnx.json
    python tools/bench_onnx.py --smoke        # tiny data, 1 epoch, few runs: checks the script works
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import kcompress as kc  # noqa: E402
from kcompress.bench.host import bench_tflite_many, versions  # noqa: E402
from kcompress.bench.schema import host_target  # noqa: E402
from kcompress.data import Preprocess, open_data  # noqa: E402
from kcompress.evaluation import evaluate  # noqa: E402
from kcompress.io import load_model, save_model, write_json  # noqa: E402
from kcompress.modelinfo import count_params  # noqa: E402
from kcompress.onnx import export_onnx, quantize_onnx  # noqa: E402
from kcompress.quantization.ptq import convert  # noqa: E402
from kcompress.zoo import resnet_cifar  # noqa: E402


def _model(args, train, test):
    if args.model:
        return load_model(args.model), args.model
    path = os.path.join(args.models_dir, "cifar_resnet.keras")
    if os.path.exists(path) and not args.smoke:
        return load_model(path), path
    from kcompress.train import fit

    model = resnet_cifar()
    t0 = time.time()
    fit(model, train, test, epochs=args.epochs, batch_size=128, lr=2e-3, verbose=0 if args.smoke else 2)
    print(f"trained resnet_cifar in {time.time() - t0:.0f} s", flush=True)
    if not args.smoke:
        os.makedirs(args.models_dir, exist_ok=True)
        save_model(model, path)
    return model, "resnet_cifar (trained here)"


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data", "cifar10"))
    ap.add_argument("--model", default=None, help="A trained Keras model (default: the ResNet-20-style teacher).")
    ap.add_argument("--models-dir", default="bench-models", help="Where the trained teacher is cached.")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--train-limit", type=int, default=None, help="Train on a stratified subset of N.")
    ap.add_argument("--test-limit", type=int, default=None, help="Evaluate on a stratified subset of TEST.")
    ap.add_argument("--calibration-samples", type=int, default=200)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--out", default="bench-onnx.json", help="JSON results (replaced if present).")
    ap.add_argument("--smoke", action="store_true", help="Tiny data, 1 epoch, few runs: check the script works.")
    args = ap.parse_args()
    if args.smoke:
        args.epochs, args.train_limit, args.test_limit = 1, args.train_limit or 300, args.test_limit or 100
        args.calibration_samples, args.runs, args.warmup, args.trials = 20, 5, 2, 2
    if not os.path.isdir(os.path.join(args.data, "train")):
        sys.exit(f"no CIFAR-10 at {args.data} (expected train/ and test/ image folders)")
    pre = Preprocess(scale=1 / 255)
    train, test = open_data(os.path.join(args.data, "train"), pre), open_data(os.path.join(args.data, "test"), pre)
    if args.train_limit:
        train = train.subset(args.train_limit)
    model, model_name = _model(args, train, test)
    shape = model.input_shape[1:]
    n_cal = args.calibration_samples

    def calibration():  # the one calibration sample both runtimes get (stratified, seeded, from TRAIN)
        return train.calibration_samples(shape, n_cal, seed=0)

    work = tempfile.mkdtemp(prefix="bench-onnx-")
    files: dict[str, object] = {}
    t0 = time.time()
    files["litert fp32"] = convert(model)
    q = kc.quantize(model, train, val_data=test, mode="int8", calibration_samples=n_cal, limit=args.test_limit)
    files["litert int8"] = q.tflite
    onnx_path = os.path.join(work, "fp32.onnx")
    check = export_onnx(model, onnx_path, check_data=test.subset(256))
    files["onnxruntime fp32"] = onnx_path
    files["onnxruntime int8 per-channel"] = quantize_onnx(onnx_path, "int8", calibration, per_channel=True,
                                                          num_samples=n_cal)
    files["onnxruntime int8 per-tensor"] = quantize_onnx(onnx_path, "int8", calibration, per_channel=False,
                                                         num_samples=n_cal)
    print(f"converted in {time.time() - t0:.0f} s; ONNX export vs Keras: max |diff| {check['max_abs_diff']:.3g}",
          flush=True)

    rows = {"keras fp32": {"accuracy": q.before.accuracy, "size_bytes": None}}
    for name, f in files.items():
        ev = evaluate(f, test, limit=args.test_limit, batch_size=50, description=f"testing {name}")
        size = len(f) if isinstance(f, (bytes, bytearray)) else os.path.getsize(f)
        rows[name] = {"accuracy": ev.accuracy, "size_bytes": size, "runtime": ev.runtime}
        print(f"{name}: test accuracy {ev.accuracy:.4f}, {size:,} B", flush=True)
    threads = [int(t) for t in args.threads.split(",")]
    names = list(files)
    results = []
    for t in threads:
        for name, r in zip(names, bench_tflite_many(list(files.values()), threads=t, runs=args.runs,
                                                    warmup=args.warmup, trials=args.trials, names=names)):
            rows[name][f"t{t}"] = {"p50_ms": r.p50_interval.median, "p50_range_ms": [r.p50_interval.low,
                                                                                    r.p50_interval.high],
                                   "p95_ms": r.latency_ms.p95, "init_ms": r.init_ms,
                                   "first_inference_ms": r.first_inference_ms,
                                   "peak_rss_mb": r.memory_mb.get("peak_rss"), "io": r.extra.get("io")}
            results.append(r)
    target = host_target(**versions())
    params = count_params(model)["total"]
    split = f"test[{args.test_limit}]" if args.test_limit else "test"
    lines = [f"\n### {model_name} ({params:,} params) on {target['cpu']} ({target['cpu_count']} CPUs)\n",
             f"Accuracy on CIFAR-10 {split}; calibration: {n_cal} stratified TRAIN samples (same for both runtimes); "
             f"latency batch 1, {args.trials} trials x {args.runs} runs, interleaved.\n",
             "| model | runtime | size | accuracy | Δ vs Keras | " +
             " | ".join(f"p50 {t} thr | p95 {t} thr" for t in threads) + " | init ms | first ms |",
             "|---|---|---|---|---|" + "---|---|" * len(threads) + "---|---|"]
    base = rows["keras fp32"]["accuracy"]
    for name, r in rows.items():
        lat = " | ".join(f"{r[f't{t}']['p50_ms']:.3f} | {r[f't{t}']['p95_ms']:.3f}" if f"t{t}" in r else "- | -"
                         for t in threads)
        first = r.get(f"t{threads[0]}")
        init = "-" if not first else f"{first['init_ms']:.1f}"
        first_ms = "-" if not first else f"{first['first_inference_ms']:.1f}"
        size = "-" if r["size_bytes"] is None else f"{r['size_bytes'] / 1e6:.3f} MB"
        lines.append(f"| {name} | {r.get('runtime', 'keras')} | {size} | {100 * r['accuracy']:.2f}% | "
                     f"{100 * (r['accuracy'] - base):+.2f} | {lat} | {init} | {first_ms} |")
    print("\n".join(lines), flush=True)
    write_json(args.out, {"target": target, "model": model_name, "params": params, "split": split,
                          "calibration_samples": n_cal, "export_check": check, "rows": rows, "smoke": args.smoke,
                          "bench": [r.to_dict() for r in results]}, overwrite=True)
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
