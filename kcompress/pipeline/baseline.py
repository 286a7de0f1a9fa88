"""The baseline record: everything to know about a model before compressing it, as one JSON-able dict.

Parameters, theoretical fp32 size (params x 4 bytes), real file sizes (input file, SavedModel, fp32 .tflite),
MACs/FLOPs, accuracy metrics, latency at several batch sizes for Keras and for the fp32 .tflite, peak memory,
the data set's size and class counts, and the environment. Meant to be committed next to the model.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from kcompress.bench.host import bench_keras, bench_tflite, versions
from kcompress.bench.schema import host_target
from kcompress.data import DataSource
from kcompress.evaluation import Evaluation, evaluate
from kcompress.inputs import as_data, as_model, resolve_options
from kcompress.io import path_size, saved_model_size
from kcompress.modelinfo import count_macs, count_params
from kcompress.options import BaselineOptions
from kcompress.quantization.ptq import convert

__all__ = ["measure_baseline", "baseline_run"]


def measure_baseline(model, data, options: Optional[BaselineOptions] = None, *, limit: Optional[int] = None,
                     preprocess=None, trust_model: bool = False, **option_fields) -> dict[str, Any]:
    """Measures ``model`` (a path or a Keras model) on ``data`` (a spec or a DataSource); returns the baseline dict
    (see the module docstring). Keywords are fields of :class:`~kcompress.options.BaselineOptions`.
    ``trust_model``: load a model file even with Lambda layers or unregistered classes (files you trust only)."""
    opts = resolve_options(BaselineOptions, options, **option_fields)
    return baseline_run(model, as_data(data, preprocess), opts, limit=limit, trust_model=trust_model)[0]


def baseline_run(
    model_path_or_model,
    data: DataSource,
    options: Optional[BaselineOptions] = None,
    limit: Optional[int] = None,
    trust_model: bool = False,
) -> tuple[dict[str, Any], Evaluation, bytes]:
    """The baseline dict plus what was made on the way (the Keras evaluation, the fp32 .tflite) for reuse."""
    o = options or BaselineOptions()
    batch_sizes, threads, runs, warmup = o.batch_sizes, o.threads, o.runs, o.warmup
    t_start = time.time()
    loaded = as_model(model_path_or_model, stage="baseline", trust_model=trust_model)
    path, model = loaded.path, loaded.model
    input_bytes = path_size(path) if path else None
    params = count_params(model)
    macs = count_macs(model, input_shape=data.sample_shape)  # npz/built-in data state the size; folders need a fixed one
    fp32 = convert(model)
    ev = evaluate(model, data, limit=limit, description="evaluating (keras)")
    ev_tfl = evaluate(fp32, data, limit=limit, description="evaluating (fp32 tflite)")
    latency = {"keras": [], "tflite_fp32": []}
    for b in batch_sizes:
        latency["keras"].append(bench_keras(model, batch_size=b, runs=runs, warmup=warmup).to_dict())
        latency["tflite_fp32"].append(
            bench_tflite(fp32, threads=threads, batch_size=b, runs=runs, warmup=warmup, name="fp32.tflite").to_dict()
        )
    peak = max((r["memory_mb"].get("peak_rss") or 0.0) for r in latency["keras"])
    inference = max((r["memory_mb"].get("rss_increase") or 0.0) for r in latency["tflite_fp32"])
    record = {
        "kind": "kcompress.baseline/1",
        "model": {
            "path": os.path.abspath(path) if path else None,
            "name": model.name,
            "input_shape": list(model.input_shape[1:]),
            "num_classes": int(model.output_shape[-1]),
            "layers": len(model.layers),
        },
        "params": params,
        "size_bytes": {
            "theoretical_fp32": params["total"] * 4,
            "input_file": input_bytes,
            "saved_model": saved_model_size(model),
            "tflite_fp32": len(fp32),
        },
        "macs": macs,
        "flops": 2 * macs,
        "accuracy": ev.metrics,
        "accuracy_tflite_fp32": {k: ev_tfl.metrics[k] for k in ("accuracy", "top5_accuracy", "macro_f1")},
        "latency": latency,
        "peak_memory_mb": peak,  # the Keras runs: this whole process, TensorFlow included
        "tflite_inference_memory_mb": inference,  # the fp32 .tflite: RSS increase in a clean LiteRT-only process
        "data": data.summary(),
        "environment": {**host_target(**versions()), "tflite_threads": threads},
        "measured_in_s": round(time.time() - t_start, 1),
    }
    return record, ev, fp32
