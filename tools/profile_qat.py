"""Profile: where ``kcompress qat`` spends its time and memory on a small job (issue 14).

Runs the public QAT API (``kc.qat``, what ``kcompress qat`` calls) on a ``keras.applications`` family built at
32x32x3 with random weights, trained for one epoch on 64 real samples (scikit-learn digits upsampled to 32x32x3),
and prints per-phase seconds and peak resident memory. Phases are kcompress's own steps (PTQ baseline, building the
QAT model, range calibration, the training epoch, the export's converter, the LiteRT evaluations, the int8 checks,
benchmarking), timed by wrapping those functions for this run only: a phase's seconds (wall, and this process's
CPU) exclude the phases nested in it, its peak RSS includes them (Linux ``VmHWM``, reset at every phase start
through ``/proc/self/clear_refs``).

Each family runs in its own process so peaks do not carry over::

    python tools/profile_qat.py                                   # the five families, one table each
    python tools/profile_qat.py --family nasnetmobile --cprofile /tmp/nasnet.prof
    python tools/profile_qat.py --family mobilenetv2 --no-bench --json /tmp/mnv2.json

Timings are noisy on a shared machine: wall seconds stretch with other jobs' load, CPU seconds (this process, all
its threads) much less; compare CPU seconds and shares, and repeat.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FAMILIES = {
    "nasnetmobile": "NASNetMobile",
    "mobilenetv2": "MobileNetV2",
    "efficientnetb0": "EfficientNetB0",
    "densenet121": "DenseNet121",
    "resnet50": "ResNet50",
    "mobilenetv3small": "MobileNetV3Small",
    "inceptionresnetv2": "InceptionResNetV2",
}
DEFAULT = ("nasnetmobile", "mobilenetv2", "efficientnetb0", "densenet121", "resnet50")


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: peaks become cumulative
        pass


class Phases:
    """Exclusive seconds and inclusive peak RSS per labelled phase."""

    def __init__(self):
        self.stack: list[dict] = []
        self.rows: dict[str, dict] = {}

    def wrap(self, module, attr: str, label):
        fn = getattr(module, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = label(self, args, kwargs) if callable(label) else label
            now, cpu = time.perf_counter(), time.process_time()
            hwm = _hwm_kib()
            for f in self.stack:  # fold the peak so far into every open phase, then start this one afresh
                f["peak"] = max(f["peak"], hwm)
            if self.stack:
                self.stack[-1]["self"] += now - self.stack[-1]["since"]
                self.stack[-1]["cpu"] += cpu - self.stack[-1]["cpu_since"]
            _reset_hwm()
            self.stack.append(
                {"name": name, "self": 0.0, "since": now, "cpu": 0.0, "cpu_since": cpu, "peak": _hwm_kib()}
            )
            try:
                return fn(*args, **kwargs)
            finally:
                end, cpu_end = time.perf_counter(), time.process_time()
                hwm = _hwm_kib()
                for f in self.stack:
                    f["peak"] = max(f["peak"], hwm)
                frame = self.stack.pop()
                frame["self"] += end - frame["since"]
                frame["cpu"] += cpu_end - frame["cpu_since"]
                row = self.rows.setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0, "peak_gib": 0.0, "calls": 0})
                row["seconds"] += frame["self"]
                row["cpu_seconds"] += frame["cpu"]
                row["peak_gib"] = max(row["peak_gib"], frame["peak"] / 2**20)
                row["calls"] += 1
                if self.stack:
                    self.stack[-1]["since"], self.stack[-1]["cpu_since"] = end, cpu_end

        setattr(module, attr, timed)

    def parent(self) -> str:
        return self.stack[-1]["name"] if self.stack else ""


def _convert_label(ph: Phases, args, kwargs) -> str:
    opts = args[1] if len(args) > 1 else kwargs.get("options")
    if ph.parent() == "export (QAT model)":
        return "converter: QAT model -> int8"
    if opts is None or str(opts.mode) == "fp32":
        return "converter: fp32 baseline"
    return "converter: PTQ int8 baseline"


def instrument() -> Phases:
    import kcompress.evaluation as evaluation
    import kcompress.inputs as inputs
    import kcompress.quantization.metadata as metadata
    import kcompress.quantization.ptq as ptq
    import kcompress.quantization.qat as qat
    import kcompress.quantization.sensitivity as sensitivity
    import kcompress.train as train

    ph = Phases()
    ph.wrap(inputs, "as_model", "load model")
    ph.wrap(inputs, "as_splits", "open data")
    ph.wrap(sensitivity, "choose_float_layers", "choose float layers")
    ph.wrap(ptq, "convert", _convert_label)
    ph.wrap(ptq, "smoke_test", "smoke test (.tflite on zeros)")
    ph.wrap(evaluation, "evaluate", lambda _p, a, k: f"evaluate: {k.get('description', 'evaluating')}")
    ph.wrap(evaluation, "test_figures", "TEST figures")
    ph.wrap(qat, "qat_model", "build QAT model (quantize_apply)")
    ph.wrap(qat, "calibrate", "calibrate ranges")
    ph.wrap(train, "fit", "train (fit, incl. tracing)")
    ph.wrap(qat, "export_tflite", "export (QAT model)")
    ph.wrap(qat, "tflite_weight_sparsity", "int8 checks: sparsity")
    ph.wrap(qat, "diverging_layers", "diverging layers (per-layer compare)")
    ph.wrap(qat, "int8_report", "int8 checks: report")
    ph.wrap(qat, "layer_table", "layer table")
    ph.wrap(qat, "_bench", "benchmark (LiteRT)")
    ph.wrap(metadata, "add_metadata", "metadata")
    return ph


def digits32(n: int, size: int, path: str) -> str:
    """``n`` real digits (8x8, scikit-learn) upsampled to ``size`` x ``size`` x 3 as an ``.npz`` of 0..255 pixels."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images[:n].astype(np.float32) * (255 / 16)
    rep = -(-size // 8)
    x = np.kron(x, np.ones((1, rep, rep), np.float32))[:, :size, :size]
    np.savez(path, x=np.repeat(x[..., None], 3, axis=-1), y=d.target[:n])
    return path


def run_one(args) -> dict:
    ph = instrument()
    import kcompress as kc
    from kcompress.backend import keras
    from kcompress.data import Preprocess

    build = getattr(keras.applications, FAMILIES[args.family])
    t0 = time.perf_counter()
    model = build(weights=None, input_shape=(args.size, args.size, 3), classes=10)
    built = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        data = kc.open_data(digits32(args.samples, args.size, os.path.join(tmp, "d.npz")), Preprocess(scale=1 / 255))
        prof = None
        if args.cprofile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t0, c0 = time.perf_counter(), time.process_time()
        res, error = None, None
        try:
            res = kc.qat(model, data, epochs=args.epochs, batch_size=args.batch_size, bench=args.bench, seed=0)
        except Exception as e:  # noqa: BLE001 - report the phases measured up to the failure
            error = f"{type(e).__name__}: {str(e)[:300]}"
        total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
        if prof is not None:
            prof.disable()
            prof.dump_stats(args.cprofile)
    out = {
        "family": args.family,
        "size": args.size,
        "samples": args.samples,
        "total_seconds": total,
        "total_cpu_seconds": total_cpu,
        "build_float_seconds": built,
        # ru_maxrss is reset with VmHWM by clear_refs: the phases' peaks are the process's
        "peak_rss_gib": max(
            [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20] + [r["peak_gib"] for r in ph.rows.values()]
        ),
        "phases": ph.rows,
        "error": error,
    }
    if res is not None:
        check = res.info["int8_check"]
        out["int8"] = {k: check[k] for k in ("ratio", "dequantize_ops", "float_compute_op_count", "problems")}
        out["rows"] = [{k: r[k] for k in ("model", "accuracy", "bytes")} for r in res.rows]
        out["keras_qat_accuracy"] = res.keras_qat_accuracy
        out["warnings"] = list(res.warnings)
    return out


def show(r: dict) -> None:
    print(
        f"\n## {r['family']} {r['size']}x{r['size']}, {r['samples']} samples: {r['total_seconds']:.1f}s wall, "
        f"{r['total_cpu_seconds']:.1f}s CPU in kc.qat (+{r['build_float_seconds']:.1f}s building the float model), "
        f"peak RSS {r['peak_rss_gib']:.2f} GiB"
    )
    print(f"{'phase':40s} {'wall s':>7s} {'CPU s':>7s} {'CPU share':>9s} {'peak GiB':>8s} calls")
    for name, row in sorted(r["phases"].items(), key=lambda kv: -kv[1]["cpu_seconds"]):
        print(
            f"{name:40s} {row['seconds']:7.1f} {row['cpu_seconds']:7.1f} "
            f"{row['cpu_seconds'] / max(r['total_cpu_seconds'], 1e-9):9.1%} {row['peak_gib']:8.2f} {row['calls']}"
        )
    if r["error"]:
        print("FAILED:", r["error"])
    else:
        print("int8:", r["int8"], "| rows:", r["rows"], "| keras QAT:", r["keras_qat_accuracy"])
        for w in r["warnings"]:
            print("warning:", w)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", action="append", choices=sorted(FAMILIES), help="repeatable (default: five)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-bench", dest="bench", action="store_false", help="skip the LiteRT latency benchmark")
    p.add_argument("--cprofile", default=None, help="write cProfile stats here (one family only)")
    p.add_argument("--json", default=None, help="append one JSON line per family here")
    args = p.parse_args(argv)
    families = args.family or list(DEFAULT)
    if len(families) > 1:  # one process per family: clean peaks, no state carried over
        rc = 0
        for fam in families:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--family",
                fam,
                "--size",
                str(args.size),
                "--samples",
                str(args.samples),
                "--epochs",
                str(args.epochs),
                "--batch-size",
                str(args.batch_size),
            ]
            cmd += ([] if args.bench else ["--no-bench"]) + (["--json", args.json] if args.json else [])
            rc |= subprocess.call(cmd)
        return rc
    args.family = families[0]
    r = run_one(args)
    show(r)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(r) + "\n")
    return 1 if r["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
