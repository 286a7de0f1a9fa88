"""``kcompress demo``: ``configs/quickstart.yaml`` on built-in data, in a few minutes on 2 CPU cores.

Trains :func:`~kcompress.architectures.digits_cnn` on scikit-learn's digits (``digits:train``, pixels scaled by
1/255), distills a half-width student, prunes 30% of its FLOPs structurally, quantizes it to int8, validates every
stage on ``digits:val`` (VAL, which chooses) and on a stratified quarter of ``digits:train`` held out as TEST (which
reports; the ``.tflite`` in the LiteRT interpreter), benchmarks the final file and writes the report. :data:`QUICKSTART` is the same config as ``configs/quickstart.yaml`` (a test keeps them equal), so the demo
works from an installed package too.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Optional

from kcompress.errors import KcompressError

__all__ = ["QUICKSTART", "DemoRow", "DemoResult", "run_demo"]

QUICKSTART: dict[str, Any] = {
    "name": "quickstart",
    "seed": 0,
    "max_drop": 4.0,
    "model": {"architecture": "digits_cnn", "epochs": 15},
    "data": {"train": "digits:train", "val": "digits:val", "test_split": 0.25, "scale": 0.00392156862745098},
    "distill": {"enabled": True, "student_width": 0.5, "epochs": 15, "max_drop": 3.0},
    "prune": {"enabled": True, "method": "structured", "target_flops": 0.3, "epochs": 6, "max_drop": 2.0},
    "quantize": {"enabled": True, "mode": "int8", "qat": "auto", "max_drop": 1.0},
    "benchmark": {"threads": [1, 2], "batch_sizes": [1, 8]},
}


@dataclass(frozen=True)
class DemoRow:
    stage: str
    path: str
    kind: str
    accuracy: float
    size_bytes: int  # the .tflite: fp32 conversion for Keras stages
    latency_p50_ms: Optional[float]
    params: Optional[int] = None
    val_accuracy: Optional[float] = None  # ``accuracy`` is on ``split``: TEST when the config has one
    split: str = "val"
    latency_p50_trials_ms: tuple = ()


@dataclass(frozen=True)
class DemoResult:
    out_dir: str
    rows: tuple[DemoRow, ...]
    report: str


def _clear(out_dir: str) -> None:
    """Removes what an earlier demo wrote (and only that)."""
    from kcompress.pipeline.report import STAGE_DIRS

    for name in list(STAGE_DIRS.values()):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    for name in ("config.yaml", "run.json", "report.json", "report.md", "pareto_size.png", "pareto_latency.png",
                 "per_class_delta.png", "confidence.png"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.unlink(os.path.join(out_dir, name))


def run_demo(out_dir: str = "kcompress-demo", overwrite: bool = False, log: Callable[[str], None] = print,
             overrides: tuple[str, ...] = ()) -> DemoResult:
    """Runs the quickstart pipeline into ``out_dir`` (absent or empty, unless ``overwrite``)."""
    from kcompress.pipeline.config import apply_overrides, config_from_dict
    from kcompress.pipeline.report import write_report
    from kcompress.pipeline.runner import execute

    if os.path.exists(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise KcompressError(f"{out_dir} exists and is not empty; pass --overwrite or choose another -o")
        _clear(out_dir)
    cfg = config_from_dict(apply_overrides(QUICKSTART, list(overrides)))
    records = execute(cfg, out_dir, resume=True, log=log)
    paths = write_report([out_dir])
    rows = []
    for r in records:
        if r.stage in ("train", "benchmark"):
            continue
        m = r.metrics
        rows.append(DemoRow(r.stage, r.model_path, m["kind"], m.get("test", m)["accuracy"],
                            m.get("tflite_bytes") or m.get("tflite_fp32_bytes") or m["size_bytes"],
                            m.get("latency_p50_ms"), m.get("params"), m["accuracy"], "test" if "test" in m else "val",
                            tuple(m.get("latency_p50_trials_ms") or ())))
    return DemoResult(out_dir, tuple(rows), paths["md"])
