"""Post-training quantization of ONNX models with ONNX Runtime's tools (``onnxruntime.quantization``).

Modes:

- ``int8``: static quantization, ``quantize_static`` in QDQ format (``QuantizeLinear``/``DequantizeLinear`` pairs
  around float ops, which ONNX Runtime's CPU provider fuses into integer kernels), U8S8: uint8 activations
  (asymmetric, MinMax calibration, the statistic the TFLite converter takes), int8 weights (symmetric, per output
  channel unless ``per_channel=False``), over the SAME stratified, seeded calibration samples as the LiteRT int8 path
  (:meth:`kcompress.data.DataSource.calibration_samples`, ``QuantizeOptions.calibration_samples`` of them).
  Why U8S8 and not S8S8 (which ONNX Runtime's guide calls the balanced first choice): measured on this x86-64 host
  (Intel Xeon, AVX-512 VNNI, ORT 1.32) on the CIFAR-10 ResNet-20, S8S8 ran at 0.90 ms p50 (1 thread), slower than
  fp32 (0.57 ms), while U8S8 ran at 0.30 ms with the same accuracy: ORT's x86 integer kernels take uint8
  activations (VPMADDUBSW / VNNI). On ARM both run; U8S8 is ORT's own ``quantize_static`` default.
- ``dynamic``: ``quantize_dynamic``, int8 weights (QInt8), activations quantized on the fly (``MatMulInteger``,
  ``DynamicQuantizeLinear``); ``Conv`` nodes stay float, because ONNX Runtime's CPU ``ConvInteger`` has no kernel
  for int8 weights.

``quant_pre_process`` (ONNX Runtime's graph optimizations and ONNX shape inference; not the symbolic one, which
needs sympy and only matters for free dimensions other than the batch) runs first, as the guide
recommends; if it fails on a graph the model is quantized as it is. Every model this module returns has been
loaded and run once in ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from kcompress.errors import KcompressError, UsageError

__all__ = ["ONNX_MODES", "quantize_onnx", "calibration_arrays"]

ONNX_MODES = ("int8", "dynamic")
_CALIBRATION_BATCH = 32  # MinMax statistics do not depend on how samples are batched; fewer runs are faster


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__


def calibration_arrays(samples: Any, input_shape: tuple, n: int = 200, seed: int = 0) -> Iterator[np.ndarray]:
    """Single-sample float32 arrays from ``samples``: a DataSource or data spec (its stratified, seeded
    :meth:`~kcompress.data.DataSource.calibration_samples`, ``n`` of them), a callable returning an iterable of
    arrays (as the LiteRT converter takes), or an iterable of arrays (batches are split into samples)."""
    from kcompress.data import DataSource

    if isinstance(samples, (str, os.PathLike)):
        from kcompress.inputs import as_data

        samples = as_data(samples, what="calibration data")
    if isinstance(samples, DataSource):
        it: Iterable = samples.calibration_samples(input_shape, n, seed=seed)
    elif callable(samples):
        it = samples()
    elif samples is None:
        raise UsageError("int8 needs calibration samples (--data)")
    else:
        it = samples
    for x in it:
        x = np.asarray(x, np.float32)
        if x.ndim == len(input_shape):  # one sample without its batch axis
            x = x[None]
        yield from (row[None] for row in x)


class _Reader:
    """A ``CalibrationDataReader`` over single-sample arrays, grouped into batches when the batch axis is free."""

    def __init__(self, name: str, arrays: Iterable[np.ndarray], batch: int):
        self.name, self.batch = name, batch
        self.count = 0
        self._it = iter(arrays)

    def get_next(self) -> Optional[dict]:
        rows = []
        for x in self._it:
            rows.append(x)
            if len(rows) == self.batch:
                break
        if not rows:
            return None
        self.count += len(rows)
        return {self.name: np.concatenate(rows)}


def _reader(name: str, arrays: Iterable[np.ndarray], batch: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_Reader, CalibrationDataReader):
        pass

    return Reader(name, arrays, batch)


def quantize_onnx(model, mode: str = "int8", calibration_samples: Any = None, *, per_channel: bool = True,
                  num_samples: int = 200, seed: int = 0, preprocess: bool = True,
                  log: Optional[Callable[[str], None]] = None) -> bytes:
    """An fp32 ONNX model (path or bytes) quantized by ONNX Runtime (module docstring); returns the bytes.

    ``calibration_samples`` (``int8`` only): see :func:`calibration_arrays`; a DataSource gives ``num_samples``
    stratified samples drawn with ``seed``, as ``kcompress quantize`` does for LiteRT. ``per_channel=False``: one
    weight scale per tensor. ``preprocess=False`` skips ``quant_pre_process``."""
    from kcompress.onnx.runtime import ONNXModel, read_onnx_bytes

    if mode not in ONNX_MODES:
        raise UsageError(f"ONNX quantization mode must be one of {', '.join(ONNX_MODES)}, got {mode!r}")
    if mode == "int8" and calibration_samples is None:
        raise UsageError("int8 needs calibration samples (--data)")
    fp32 = read_onnx_bytes(model)
    ref = ONNXModel(fp32)  # a file ONNX Runtime cannot load is reported here, as one line
    if any(d is None for d in ref.input_shape):
        raise KcompressError(f"the model's input shape {ref.input_shape} has free dimensions; export it with a "
                             "fixed input size to quantize it")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    work = tempfile.mkdtemp(prefix="kcompress-onnxq-")
    try:
        src, out = os.path.join(work, "fp32.onnx"), os.path.join(work, f"{mode}.onnx")
        with open(src, "wb") as f:
            f.write(fp32)
        if preprocess:
            src = _pre_process(src, os.path.join(work, "pre.onnx"), log)
        with _quiet():
            try:
                if mode == "int8":
                    arrays = calibration_arrays(calibration_samples, ref.input_shape, num_samples, seed)
                    reader = _reader(ref.input_name, arrays, 1 if ref.fixed_batch else _CALIBRATION_BATCH)
                    quantize_static(src, out, reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                    calibrate_method=CalibrationMethod.MinMax,
                                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
                    if reader.count == 0:
                        raise KcompressError("no calibration samples: the calibration data is empty")
                else:
                    ops = ["MatMul", "Gemm", "Attention", "LSTM", "GRU", "Gather", "EmbedLayerNormalization"]
                    quantize_dynamic(src, out, op_types_to_quantize=ops, per_channel=per_channel,
                                     weight_type=QuantType.QInt8)
            except KcompressError:
                raise
            except Exception as e:  # noqa: BLE001  (ORT's tools raise ValueError, RuntimeError, KeyError...)
                raise KcompressError(f"ONNX Runtime could not quantize the model ({mode}): {_first_line(e)}") from None
        with open(out, "rb") as f:
            data = f.read()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _smoke_test(data, ref)
    return data


@contextlib.contextmanager
def _quiet():
    """Silences ORT's tools: Python warnings and the root logger's WARNING lines (it advises pre-processing even
    after ``quant_pre_process`` ran, and notes opset upgrades)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = logging.root.manager.disable
        logging.disable(max(before, logging.WARNING))
        try:
            yield
        finally:
            logging.disable(before)


def _pre_process(src: str, dst: str, log) -> str:
    """``quant_pre_process`` of ``src`` into ``dst``; ``src`` itself when it fails (said through ``log``)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(src, dst, skip_symbolic_shape=True)  # (symbolic: needs sympy; our shapes are static)
        return dst
    except Exception as e:  # noqa: BLE001
        if log:
            log(f"quant_pre_process failed ({_first_line(e)}); quantizing the model as exported")
        return src


def _smoke_test(data: bytes, ref) -> None:
    """Loads the quantized model and runs it once on zeros; a model that does not run is an error."""
    from kcompress.onnx.runtime import ONNXModel

    try:
        m = ONNXModel(data)
        m.predict(np.zeros((1, *ref.input_shape), np.float32))
    except KcompressError as e:
        raise KcompressError(f"the quantized ONNX model does not run in ONNX Runtime: {e}") from None
