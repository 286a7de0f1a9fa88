"""A/B comparison of two models or ``.tflite`` files on the same data: :func:`compare` -> :class:`Comparison`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from kcompress.bench.schema import SpeedUp, speedup
from kcompress.inputs import as_data, as_model, describe, is_tflite

__all__ = ["Comparison", "compare", "traffic_indices"]

TRIALS = 5  # interleaved trials of 30 runs per model


@dataclass(frozen=True)
class Comparison:
    """``a`` and ``b`` hold each model's accuracy, size, latency (1 thread, batch 1; Keras models timed as their
    fp32 ``.tflite``) and mean confidence; ``diff`` is B against A: agreement, accuracy delta, per-class deltas
    (most hurt first), confidence shift.

    Latency: ``latency_p50_ms`` is the median of ``latency_p50_trials_ms``, the p50s of repeated trials timed
    interleaved (A1 B1 A2 B2 ...); ``latency_p50_interval_ms`` is their range. :attr:`speedup` is B's speed-up over
    A with its interval; print it with ``speedup.text()``, not the bare ratio."""

    data: str
    a: dict
    b: dict
    diff: dict
    evaluations: tuple = field(default=(), repr=False)
    num_samples: int = 0  # samples both models were evaluated on
    total_samples: int = 0  # samples in the data, before ``fraction`` and ``limit``
    fraction: float = 1.0  # the share of the data drawn at random (seeded), as in a traffic split
    seed: int = 0

    @property
    def accuracy_delta(self) -> float:
        return self.diff["accuracy_delta"]

    @property
    def agreement(self) -> float:
        return self.diff["agreement"]

    @property
    def size_ratio(self) -> float:
        return self.b["size_bytes"] / self.a["size_bytes"]

    @property
    def speedup(self) -> SpeedUp:
        """B's speed-up over A (A's p50 over B's, per pair of trials) with its interval: above 1, B is faster."""
        a, b = self.a, self.b  # one trial where only the p50 is known
        return speedup(a.get("latency_p50_trials_ms") or [a["latency_p50_ms"]],
                       b.get("latency_p50_trials_ms") or [b["latency_p50_ms"]])

    @property
    def latency_ratio(self) -> float:
        """The median of :attr:`speedup`'s ratios (A's p50 over B's): above 1, B is faster. Report it with its
        interval (``speedup.text()``)."""
        return self.speedup.median

    def to_dict(self) -> dict:
        return {"data": self.data, "num_samples": self.num_samples, "total_samples": self.total_samples,
                "fraction": self.fraction, "seed": self.seed, "a": self.a, "b": self.b,
                "speedup": self.speedup.to_dict(), **self.diff}

    def save(self, path: str, overwrite: bool = False) -> str:
        from kcompress.io import write_json

        write_json(path, self.to_dict(), overwrite=overwrite)
        return path


def _size(model, tfl: Optional[bytes]) -> int:
    from kcompress.io import path_size

    if isinstance(model, (str, os.PathLike)):
        return path_size(str(model))
    return len(tfl)


def traffic_indices(num_samples: int, fraction: float, seed: int = 0):
    """Sorted indices of a seeded uniform random share ``fraction`` (0 < F <= 1) of ``num_samples`` samples, as a
    traffic split would route them: ``floor(F * N + 0.5)`` samples (half rounded up; at least 1), not stratified."""
    import numpy as np

    from kcompress.errors import UsageError

    if not 0.0 < float(fraction) <= 1.0:
        raise UsageError(f"--fraction must be in (0, 1], got {fraction}")
    n = max(1, int(np.floor(float(fraction) * num_samples + 0.5)))
    if n >= num_samples:
        return np.arange(num_samples)
    return np.sort(np.random.default_rng(seed).choice(num_samples, size=n, replace=False))


def compare(model_a, model_b, data, *, preprocess=None, limit: Optional[int] = None, fraction: float = 1.0,
            seed: int = 0, trust_model: bool = False) -> Comparison:
    """Evaluates both models on ``data`` and compares them (B against A). Models are paths, Keras models,
    ``.tflite`` or ``.onnx`` bytes; ``.onnx`` files run in ONNX Runtime. In-memory Keras models are sized and timed
    as their fp32 ``.tflite`` (as their fp32 ONNX export when the other model is ``.onnx``, so both are timed in the
    same runtime). Each row's ``runtime`` says what evaluated it, ``latency_runtime`` what timed it.
    ``trust_model``: load model files even with Lambda layers or unregistered classes (files you trust only).
    ``fraction``: both models see the same seeded random share of the data (:func:`traffic_indices`), as in an A/B
    traffic split; ``limit`` then keeps a stratified sample of that."""
    from kcompress.bench.host import bench_tflite_many
    from kcompress.evaluation import compare as diff
    from kcompress.evaluation import evaluate
    from kcompress.inputs import as_tflite
    from kcompress.onnx.runtime import is_onnx, read_onnx_bytes
    from kcompress.quantization.ptq import convert

    src = as_data(data, preprocess)
    total = src.num_samples
    if fraction != 1.0:
        src = src.take(traffic_indices(total, fraction, seed), f"{src.name}[{float(fraction):g} seed {seed}]")
    evs, info, tfls = [], [], []
    any_onnx = is_onnx(model_a) or is_onnx(model_b)
    for model in (model_a, model_b):
        name = describe(model)
        if is_onnx(model):
            target = read_onnx_bytes(model)
            tfl = target
        elif is_tflite(model):
            target: Any = as_tflite(model)
            tfl = target
        else:
            target = as_model(model, stage="compare", trust_model=trust_model).model
            if any_onnx:
                from kcompress.onnx.export import onnx_bytes

                tfl = onnx_bytes(target)
            else:
                tfl = convert(target)
        ev = evaluate(target, src, limit=limit, description=f"evaluating {os.path.basename(name)}")
        evs.append(ev)
        tfls.append(tfl)
        info.append({"model": name, "runtime": ev.runtime, "accuracy": ev.accuracy, "size_bytes": _size(model, tfl),
                     "mean_confidence": ev.metrics["mean_confidence"]})
    for row, r in zip(info, bench_tflite_many(tfls, threads=1, runs=30, warmup=10, trials=TRIALS)):
        p50 = r.p50_interval
        row.update({"latency_runtime": r.runtime, "latency_p50_ms": p50.median,
                    "latency_p50_interval_ms": [p50.low, p50.high],
                    "latency_p50_trials_ms": list(r.trial_p50s), "delegate": r.delegate, "io": r.extra.get("io")})
    return Comparison(src.name, info[0], info[1], diff(evs[1], evs[0]), tuple(evs),
                      num_samples=len(evs[0].labels), total_samples=total, fraction=float(fraction), seed=int(seed))
