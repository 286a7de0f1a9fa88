"""kcompress: make trained Keras models small and fast for phones and edge devices.

``import kcompress as kc`` gives the whole toolkit as functions that return frozen result objects::

    data = kc.open_data("train/", preprocess=kc.Preprocess(scale=1/255))
    r = kc.quantize("model.keras", data, mode="int8", val_data="val/")
    print(r.before.accuracy, r.after.accuracy, r.size_ratio, r.latency_ratio)
    r.save("model_int8.tflite")

Importing the package does not import TensorFlow: every name below is loaded on first use (PEP 562), and the
modules that need TensorFlow import it then.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    # data and models
    "open_data": "kcompress.data",
    "Preprocess": "kcompress.data",
    "DataSource": "kcompress.data",
    "load_model": "kcompress.io",
    "save_model": "kcompress.io",
    # settings
    "DataOptions": "kcompress.options",
    "ModelOptions": "kcompress.options",
    "BaselineOptions": "kcompress.options",
    "DistillOptions": "kcompress.options",
    "PruneOptions": "kcompress.options",
    "QuantizeOptions": "kcompress.options",
    "QATOptions": "kcompress.options",
    "BenchmarkOptions": "kcompress.options",
    "TrainOptions": "kcompress.options",
    "QuantMode": "kcompress.types",
    "IOType": "kcompress.types",
    "QATPolicy": "kcompress.types",
    "PruneMethod": "kcompress.types",
    "Criterion": "kcompress.types",
    "PruneSchedule": "kcompress.types",
    "CacheTeacher": "kcompress.types",
    "Optimizer": "kcompress.types",
    "LRSchedule": "kcompress.types",
    "Target": "kcompress.types",
    "Delegate": "kcompress.types",
    "Strategy": "kcompress.types",
    "Runtime": "kcompress.types",
    "Format": "kcompress.types",
    "RunConfig": "kcompress.pipeline.config",
    "load_config": "kcompress.pipeline.config",
    # techniques
    "quantize": "kcompress.quantization.api",
    "QuantizeResult": "kcompress.quantization.api",
    "qat": "kcompress.quantization.api",
    "QATResult": "kcompress.quantization.qat",
    "sensitivity": "kcompress.quantization.api",
    "SensitivityResult": "kcompress.quantization.api",
    "distill": "kcompress.distillation.api",
    "DistillResult": "kcompress.distillation.trainer",
    "prune": "kcompress.pruning.api",
    "PruneResult": "kcompress.pruning.api",
    # multi-device and multi-worker training
    "distribute": "kcompress.distributed",
    "is_chief": "kcompress.distributed",
    "worker_path": "kcompress.distributed",
    # measuring
    "evaluate": "kcompress.evaluation",
    "Evaluation": "kcompress.evaluation",
    "compare": "kcompress.pipeline.compare",
    "Comparison": "kcompress.pipeline.compare",
    "baseline": "kcompress.pipeline.baseline",
    "benchmark": "kcompress.bench.host",
    "BenchReport": "kcompress.bench.schema",
    "inspect": "kcompress.litert.inspect",
    # ONNX Runtime as a second runtime
    "export_onnx": "kcompress.onnx.export",
    "quantize_onnx": "kcompress.onnx.quantize",
    "ONNXModel": "kcompress.onnx.runtime",
    # drift monitoring
    "monitor": "kcompress.monitoring",
    "monitor_reference": "kcompress.monitoring",
    "MonitorReference": "kcompress.monitoring",
    "DriftResult": "kcompress.monitoring",
    "MonitorOptions": "kcompress.options",
    # pipelines
    "run_pipeline": "kcompress.pipeline.runner",
    "RunResult": "kcompress.pipeline.runner",
    "GateFailed": "kcompress.pipeline.runner",
    "report": "kcompress.pipeline.report",
    "recommend": "kcompress.pipeline.recommend",
    "demo": "kcompress.pipeline.demo",
    "sweep": "kcompress.sweeps",
    "SweepOptions": "kcompress.sweeps",
    "SweepResult": "kcompress.sweeps",
    # errors
    "KcompressError": "kcompress.errors",
    "UsageError": "kcompress.errors",
}

# facade name -> the name inside its module, where they differ
_ALIASES = {
    "baseline": "measure_baseline",
    "benchmark": "bench_report",
    "inspect": "inspect_model",
    "MonitorReference": "Reference",
    "report": "write_report",
    "demo": "run_demo",
    "distribute": "strategy",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kcompress' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
