"""``kcompress demo``: the whole flow on built-in data, in about a minute on 2 CPU cores.

Trains :func:`~kcompress.architectures.digits_cnn` on scikit-learn's digits (``digits:train``, pixels scaled by
1/255), then converts it to fp32 and int8 ``.tflite``, evaluates every file in the LiteRT interpreter on
``digits:val``, benchmarks them and returns one row per model. Each extra stage (distillation, pruning, QAT) adds
rows as its module lands.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from kcompress.errors import KcompressError

__all__ = ["DemoRow", "DemoResult", "run_demo", "DEMO_PREPROCESS"]


@dataclass(frozen=True)
class DemoRow:
    name: str
    path: str
    accuracy: float
    size_bytes: int
    latency_p50_ms: Optional[float]
    params: Optional[int] = None


@dataclass(frozen=True)
class DemoResult:
    out_dir: str
    rows: tuple[DemoRow, ...]
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "rows": [r.__dict__ for r in self.rows], "notes": list(self.notes)}


def _preprocess():
    from kcompress.data import Preprocess

    return Preprocess(scale=1 / 255)


DEMO_PREPROCESS = {"scale": 1 / 255}


def run_demo(
    out_dir: str = "kcompress-demo",
    epochs: int = 15,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    seed: int = 0,
) -> DemoResult:
    """Runs the demo, writing into ``out_dir`` (created; must be empty or absent unless ``overwrite``)."""
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise KcompressError(f"{out_dir} exists and is not empty; pass --overwrite or choose another -o")
    os.makedirs(out_dir, exist_ok=True)

    from kcompress.architectures import digits_cnn
    from kcompress.benchmark import bench_tflite, bench_keras
    from kcompress.convert import QuantizeOptions, convert
    from kcompress.data import open_data
    from kcompress.evaluate import evaluate
    from kcompress.models import atomic_write_bytes, count_params, path_size, save_model
    from kcompress.train import fit

    pre = _preprocess()
    train, val = open_data("digits:train", pre), open_data("digits:val", pre)
    log(f"data: {train.num_samples} training and {val.num_samples} validation images of digits (8x8, 10 classes)")
    model = digits_cnn()
    log(f"training {model.name} ({count_params(model)['total']:,} parameters) for {epochs} epochs ...")
    fit(model, train, val, epochs=epochs, batch_size=64, lr=2e-3, seed=seed, verbose=0)
    model_path = os.path.join(out_dir, "model.keras")
    save_model(model, model_path, overwrite=True)

    rows = []
    keras_acc = evaluate(model, val).accuracy
    keras_lat = bench_keras(model, batch_size=1, runs=50, warmup=10).latency_ms.p50
    rows.append(DemoRow("keras fp32", model_path, keras_acc, path_size(model_path), keras_lat,
                        count_params(model)["total"]))
    shape = model.input_shape[1:]
    calibration = lambda: train.calibration_samples(shape, 200, seed=seed)  # noqa: E731
    for label, mode in (("tflite fp32", "fp32"), ("tflite int8", "int8")):
        log(f"converting to {label} ...")
        data = convert(model, QuantizeOptions(mode=mode), calibration=calibration)
        path = os.path.join(out_dir, f"model_{mode}.tflite")
        atomic_write_bytes(path, data, overwrite=True)
        acc = evaluate(path, val).accuracy
        lat = bench_tflite(path, threads=1, batch_size=1, runs=200, warmup=20).latency_ms.p50
        rows.append(DemoRow(label, path, acc, len(data), lat))
    result = DemoResult(out_dir=out_dir, rows=tuple(rows))
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result.to_dict(), f, indent=2)
    return result
