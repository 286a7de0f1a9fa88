"""A/B comparison of two models or ``.tflite`` files on the same data: :func:`compare` -> :class:`Comparison`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from kcompress.inputs import as_data, as_model, describe, is_tflite

__all__ = ["Comparison", "compare"]


@dataclass(frozen=True)
class Comparison:
    """``a`` and ``b`` hold each model's accuracy, size, p50 latency (1 thread, batch 1; Keras models timed as
    their fp32 ``.tflite``) and mean confidence; ``diff`` is B against A: agreement, accuracy delta, per-class
    deltas (most hurt first), confidence shift."""

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
    def latency_ratio(self) -> float:
        """A's p50 over B's: above 1, B is faster."""
        return self.a["latency_p50_ms"] / self.b["latency_p50_ms"]

    def to_dict(self) -> dict:
        return {"data": self.data, "a": self.a, "b": self.b, **self.diff}

    def save(self, path: str, overwrite: bool = False) -> str:
        from kcompress.io import write_json

        write_json(path, self.to_dict(), overwrite=overwrite)
        return path


def _size(model, tfl: Optional[bytes]) -> int:
    from kcompress.io import path_size

    if isinstance(model, (str, os.PathLike)):
        return path_size(str(model))
    return len(tfl)


def compare(model_a, model_b, data, *, preprocess=None, limit: Optional[int] = None) -> Comparison:
    """Evaluates both models on ``data`` and compares them (B against A). Models are paths, Keras models or
    ``.tflite`` bytes; in-memory Keras models are sized as their fp32 ``.tflite``."""
    from kcompress.bench.host import bench_tflite
    from kcompress.evaluation import compare as diff
    from kcompress.evaluation import evaluate
    from kcompress.inputs import as_tflite
    from kcompress.quantization.ptq import convert

    src = as_data(data, preprocess)
    evs, info = [], []
    for model in (model_a, model_b):
        name = describe(model)
        if is_tflite(model):
            target: Any = as_tflite(model)
            tfl = target
        else:
            target = as_model(model, stage="compare").model
            tfl = convert(target)
        ev = evaluate(target, src, limit=limit, description=f"evaluating {os.path.basename(name)}")
        lat = bench_tflite(tfl, threads=1, runs=100, warmup=10).latency_ms.p50
        evs.append(ev)
        info.append({"model": name, "accuracy": ev.accuracy, "size_bytes": _size(model, tfl), "latency_p50_ms": lat,
                     "mean_confidence": ev.metrics["mean_confidence"]})
    return Comparison(src.name, info[0], info[1], diff(evs[1], evs[0]), tuple(evs))
