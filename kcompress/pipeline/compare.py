"""A/B comparison of two models or ``.tflite`` files on the same data: :func:`compare` -> :class:`Comparison`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from kcompress.bench.schema import SpeedUp, speedup
from kcompress.inputs import as_data, as_model, describe, is_tflite

__all__ = ["Comparison", "compare"]

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
        return {"data": self.data, "a": self.a, "b": self.b, "speedup": self.speedup.to_dict(), **self.diff}

    def save(self, path: str, overwrite: bool = False) -> str:
        from kcompress.io import write_json

        write_json(path, self.to_dict(), overwrite=overwrite)
        return path


def _size(model, tfl: Optional[bytes]) -> int:
    from kcompress.io import path_size

    if isinstance(model, (str, os.PathLike)):
        return path_size(str(model))
    return len(tfl)


def compare(model_a, model_b, data, *, preprocess=None, limit: Optional[int] = None,
            trust_model: bool = False) -> Comparison:
    """Evaluates both models on ``data`` and compares them (B against A). Models are paths, Keras models or
    ``.tflite`` bytes; in-memory Keras models are sized as their fp32 ``.tflite``. ``trust_model``: load model files
    even with Lambda layers or unregistered classes (files you trust only)."""
    from kcompress.bench.host import bench_tflite_many
    from kcompress.evaluation import compare as diff
    from kcompress.evaluation import evaluate
    from kcompress.inputs import as_tflite
    from kcompress.quantization.ptq import convert

    src = as_data(data, preprocess)
    evs, info, tfls = [], [], []
    for model in (model_a, model_b):
        name = describe(model)
        if is_tflite(model):
            target: Any = as_tflite(model)
            tfl = target
        else:
            target = as_model(model, stage="compare", trust_model=trust_model).model
            tfl = convert(target)
        ev = evaluate(target, src, limit=limit, description=f"evaluating {os.path.basename(name)}")
        evs.append(ev)
        tfls.append(tfl)
        info.append({"model": name, "accuracy": ev.accuracy, "size_bytes": _size(model, tfl),
                     "mean_confidence": ev.metrics["mean_confidence"]})
    for row, r in zip(info, bench_tflite_many(tfls, threads=1, runs=30, warmup=10, trials=TRIALS)):
        p50 = r.p50_interval
        row.update({"latency_p50_ms": p50.median, "latency_p50_interval_ms": [p50.low, p50.high],
                    "latency_p50_trials_ms": list(r.trial_p50s), "delegate": r.delegate, "io": r.extra.get("io")})
    return Comparison(src.name, info[0], info[1], diff(evs[1], evs[0]), tuple(evs))
