"""Post-training quantization for ONNX Runtime end to end: :func:`quantize_model` -> :class:`ONNXQuantizeResult`.

What ``kcompress quantize --format onnx`` does: export the Keras model to fp32 ONNX (checked against Keras) or take
an fp32 ``.onnx``, quantize it with ONNX Runtime (:func:`kcompress.onnx.quantize.quantize_onnx`) calibrated on the
same stratified, seeded samples as the LiteRT path, then evaluate before (Keras, or the fp32 ``.onnx``) and after
(the quantized ``.onnx`` in ONNX Runtime) on VAL, and time fp32 and quantized ONNX interleaved (1 thread, batch 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from kcompress.errors import UsageError
from kcompress.evaluation import BeforeAfter

__all__ = ["ONNXQuantizeResult", "quantize_model"]


def _quiet(_msg: str) -> None:
    pass


@dataclass(frozen=True)
class ONNXQuantizeResult(BeforeAfter):
    """Quantized ONNX bytes with the evaluation before and after on the same data and the latency of both."""

    onnx: bytes = field(repr=False)
    fp32_onnx: bytes = field(repr=False)
    options: Any  # QuantizeOptions as applied (mode, per_channel, calibration_samples, max_drop)
    model: str
    data: str
    before: Any = field(repr=False)  # Evaluation of the source (Keras, or the fp32 .onnx)
    after: Any = field(repr=False)  # Evaluation of the quantized .onnx in ONNX Runtime
    latency_fp32_ms: float
    latency_ms: float
    latency_fp32_trials_ms: tuple = ()
    latency_trials_ms: tuple = ()
    export_check: Optional[dict] = None  # max_abs_diff etc. of the fp32 export (None when given an .onnx)
    test: Optional[dict] = None

    @property
    def size_bytes(self) -> int:
        return len(self.onnx)

    @property
    def size_ratio(self) -> float:
        return len(self.onnx) / len(self.fp32_onnx)

    @property
    def speedup(self):
        from kcompress.bench.schema import speedup

        return speedup(self.latency_fp32_trials_ms or (self.latency_fp32_ms,),
                       self.latency_trials_ms or (self.latency_ms,))

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "format": "onnx", "runtime": "onnxruntime",
                "options": self.options.to_dict(), "accuracy_before": self.before.accuracy,
                "runtime_before": self.before.runtime, "accuracy_after": self.after.accuracy,
                "accuracy_delta": self.accuracy_delta, "samples": self.after.metrics["num_samples"],
                "fp32_onnx_bytes": len(self.fp32_onnx), "size_bytes": self.size_bytes, "size_ratio": self.size_ratio,
                "latency_fp32_p50_ms": self.latency_fp32_ms, "latency_p50_ms": self.latency_ms,
                "latency_fp32_p50_trials_ms": list(self.latency_fp32_trials_ms),
                "latency_p50_trials_ms": list(self.latency_trials_ms), "speedup": self.speedup.to_dict(),
                "export_check": self.export_check, "test": self.test}

    def save(self, path: str, overwrite: bool = False) -> str:
        from kcompress.atomic import atomic_write_bytes

        atomic_write_bytes(path, self.onnx, overwrite=overwrite)
        return path


def quantize_model(model, data, mode: Optional[str] = None, *, val_data=None, test_data=None,
                   test_split: float = 0.0, options=None, preprocess=None, limit: Optional[int] = None,
                   seed: int = 0, log: Callable[[str], None] = _quiet, trust_model: bool = False,
                   **option_fields) -> ONNXQuantizeResult:
    """``model`` (a Keras model or path, or an fp32 ``.onnx`` path/bytes) quantized for ONNX Runtime (module
    docstring). Settings: :class:`~kcompress.options.QuantizeOptions` (``mode`` int8 or dynamic, ``per_channel``,
    ``calibration_samples``, ``max_drop``); ``io`` and ``float_layers`` have no ONNX meaning and are refused."""
    from kcompress.bench.host import bench_tflite_many
    from kcompress.data import check_fits
    from kcompress.evaluation import evaluate, test_figures
    from kcompress.inputs import as_model, as_splits, describe, preprocess_of, resolve_options
    from kcompress.onnx.export import check_against_keras, onnx_bytes
    from kcompress.onnx.quantize import ONNX_MODES, quantize_onnx
    from kcompress.onnx.runtime import ONNXModel, is_onnx, read_onnx_bytes
    from kcompress.options import QuantizeOptions

    opts = resolve_options(QuantizeOptions, options, mode=mode, **option_fields)
    if opts.mode not in ONNX_MODES:
        raise UsageError(f"--format onnx takes --mode {' or '.join(ONNX_MODES)}, got {opts.mode}")
    if opts.float_layers:
        raise UsageError("--float-layers applies to .tflite output only")
    if opts.io not in (None, "float"):
        raise UsageError("--io applies to .tflite output only (ONNX QDQ models keep float inputs and outputs)")
    preprocess = preprocess_of(data, preprocess)
    src, val, test = as_splits(data, val_data, test_data, test_split=test_split, seed=seed, preprocess=preprocess)
    val = val if val is not None else src
    check = None
    if is_onnx(model):
        fp32 = read_onnx_bytes(model)
        reference = ONNXModel(fp32)
        shape, classes = reference.input_shape, reference.num_classes
        source: Any = fp32
    else:
        from kcompress.modelinfo import input_shape, num_classes

        source = as_model(model, stage="quantize", trust_model=trust_model).model
        shape, classes = input_shape(source), num_classes(source)
        log(f"Exporting {describe(model)} to ONNX ...")
        fp32 = onnx_bytes(source)
        check = check_against_keras(source, fp32, val, seed=seed)
    for d in (src, val, test):
        if d is not None and classes:
            check_fits(d, shape, classes)
    log(f"Quantizing with ONNX Runtime ({opts.mode}, {'per-channel' if opts.per_channel else 'per-tensor'} "
        "weights) ...")
    quant = quantize_onnx(fp32, opts.mode,
                          lambda: src.calibration_samples(shape, opts.calibration_samples, seed=seed),
                          per_channel=opts.per_channel, log=log)
    before = evaluate(source, val, limit=limit, description="evaluating fp32")
    after = evaluate(quant, val, limit=limit, description="evaluating onnx")
    lat_fp32, lat_q = bench_tflite_many([fp32, quant], threads=1, runs=20, warmup=10, trials=5)
    figures = test_figures({"before": source, "after": quant}, test)
    return ONNXQuantizeResult(onnx=quant, fp32_onnx=fp32, options=opts, model=describe(model), data=val.name,
                              before=before, after=after, latency_fp32_ms=lat_fp32.p50_interval.median,
                              latency_ms=lat_q.p50_interval.median, latency_fp32_trials_ms=lat_fp32.trial_p50s,
                              latency_trials_ms=lat_q.trial_p50s, export_check=check, test=figures)
