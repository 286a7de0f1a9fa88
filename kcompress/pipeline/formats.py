"""The quantize stage's files beyond the ``.tflite``: ``convert.formats: [tflite, onnx]``.

The ``.tflite`` stays the stage's model (PTQ vs QAT and float layers are chosen on it, and later stages and the
benchmark follow it). With ``onnx`` in the formats, the same Keras model the quantize stage started from is also
exported to ONNX (tf2onnx, checked against Keras on VAL samples) and quantized by ONNX Runtime with the stage's
calibration samples, written as ``model.onnx`` (and ``model_fp32.onnx``) in the stage folder, and measured like the
``.tflite``: VAL and TEST figures, size, p50 latency at 1 thread, batch 1. The figures go under ``metrics["onnx"]``
and its outputs into ``outputs.npz`` (``onnx_outputs``, ``onnx_test_outputs``) so the report can set both runtimes
side by side.
Gotcha: a QAT model is not what ONNX gets: ONNX Runtime quantizes the float model after training (PTQ); when the
``.tflite`` needed QAT to meet ``quantize.max_drop``, the ONNX file may miss it, and the gate says so.
"""

from __future__ import annotations

import os
from typing import Any

from kcompress.types import Format, QuantMode

__all__ = ["onnx_mode", "write_onnx"]


def onnx_mode(mode: str) -> tuple[str, str]:
    """``(what ONNX Runtime does, why)`` for a pipeline ``quantize.mode``: ``int8``, ``dynamic`` or ``fp32``."""
    if mode in (QuantMode.INT8, QuantMode.DYNAMIC):
        return str(mode), ""
    if mode in (QuantMode.FP32, QuantMode.FLOAT16):
        return "fp32", f"{mode} has no ONNX Runtime quantization; the ONNX file is the fp32 export"
    return "int8", f"ONNX Runtime's CPU kernels have no {mode}; the ONNX file is int8"


def write_onnx(ctx, model, out_dir: str, split_metrics) -> tuple[dict[str, Any], dict[str, Any]]:
    """Exports, quantizes, writes and measures the ONNX file of ``model`` (module docstring). Returns
    ``(metrics, outputs)``: ``metrics`` as the runner's (``accuracy`` and the rest on VAL, ``test`` on TEST) plus
    ``mode``, ``size_bytes``, ``latency_p50_ms``, ``export_check``; ``outputs`` for ``outputs.npz``."""
    from kcompress.atomic import atomic_write_bytes
    from kcompress.bench.host import bench_tflite_many
    from kcompress.evaluation import evaluate
    from kcompress.modelinfo import input_shape
    from kcompress.onnx.export import check_against_keras, onnx_bytes
    from kcompress.onnx.quantize import quantize_onnx

    c, conv = ctx.cfg.quantize, ctx.cfg.convert
    mode, why = onnx_mode(c.mode)
    if why:
        ctx.log(f"onnx: {why}")
    fp32 = onnx_bytes(model, opset=conv.onnx_opset)
    check = check_against_keras(model, fp32, ctx.val, seed=ctx.cfg.seed)
    ctx.log(f"onnx: exported (opset {conv.onnx_opset}), max |ONNX - Keras| {check['max_abs_diff']:.3g} on "
            f"{check['samples']} VAL samples")
    data = fp32 if mode == "fp32" else quantize_onnx(
        fp32, mode, ctx.calibration(input_shape(model)), per_channel=c.per_channel, log=ctx.log)
    atomic_write_bytes(os.path.join(out_dir, "model_fp32.onnx"), fp32, overwrite=True)
    path = os.path.join(out_dir, "model.onnx")
    atomic_write_bytes(path, data, overwrite=True)
    ev = evaluate(data, ctx.val, description="validating onnx (val)")
    m: dict[str, Any] = {"format": Format.ONNX.value, "runtime": "onnxruntime", "mode": mode,
                         "per_channel": bool(c.per_channel), "file": os.path.basename(path), "split": "val",
                         **split_metrics(ev), "size_bytes": len(data), "fp32_size_bytes": len(fp32),
                         "export_check": check}
    outputs: dict[str, Any] = {"onnx_outputs": ev.outputs}
    if ctx.test is not None:
        tev = evaluate(data, ctx.test, description="testing onnx (test)")
        m["test"] = split_metrics(tev)
        outputs["onnx_test_outputs"] = tev.outputs
    (r,) = bench_tflite_many([data], threads=1, runs=30, warmup=10, trials=5)
    m.update(latency_p50_ms=r.p50_interval.median, latency_p50_trials_ms=list(r.trial_p50s),
             init_ms=r.init_ms, first_inference_ms=r.first_inference_ms)
    test = f", test {100 * m['test']['accuracy']:.2f}%" if "test" in m else ""
    ctx.log(f"onnx {mode}: val {100 * m['accuracy']:.2f}%{test}, {len(data) / 1e3:.1f} kB, p50 "
            f"{m['latency_p50_ms']:.3f} ms (onnxruntime, 1 thread)")
    return m, outputs
