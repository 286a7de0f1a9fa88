"""Running ``.onnx`` files in ONNX Runtime (CPU), no TensorFlow needed.

:class:`ONNXModel` takes float batches as the Keras model would and returns float outputs, like
:class:`~kcompress.litert.interpreter.TFLiteModel`: a QDQ int8 model keeps float inputs and outputs (the
``QuantizeLinear``/``DequantizeLinear`` pairs are inside the graph), so the same data pipeline evaluates Keras,
LiteRT and ONNX models alike.

Gotchas:

- ONNX files have no magic bytes: a path is taken as ONNX by its ``.onnx`` extension, bytes by their first protobuf
  field (``ir_version``, tag ``0x08``) when they are not a ``.tflite`` (``TFL3`` at offset 4). A corrupt file is
  found when ONNX Runtime parses it, and reported as one :class:`~kcompress.errors.KcompressError` line.
- ``num_threads`` sets ONNX Runtime's intra-op pool; the inter-op pool is 1 and execution sequential, so the figure
  is comparable to LiteRT's ``num_threads``. ``None`` keeps ONNX Runtime's default (one thread per physical core).
- A graph exported with a fixed batch (often 1) runs chunk by chunk at that batch, the last chunk zero-padded and
  the padding dropped (``fixed_batch`` is then True and ``batch_size`` the file's).
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import numpy as np

from kcompress.errors import KcompressError

__all__ = ["ONNXModel", "is_onnx", "onnx_output_kind", "read_onnx_bytes", "ort_version"]

_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__


def is_onnx(model: Any) -> bool:
    """True for a path ending in ``.onnx`` (any case) or bytes that look like an ONNX ``ModelProto``."""
    if isinstance(model, (bytes, bytearray)):
        head = bytes(model[:8])
        return head[4:8] != b"TFL3" and head[:1] == b"\x08"
    if isinstance(model, (str, os.PathLike)):
        return str(model).lower().endswith(".onnx") and not os.path.isdir(str(model))
    return False


def read_onnx_bytes(model: Any) -> bytes:
    """The bytes of an ONNX path or bytes; a missing file is one error line."""
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    try:
        with open(model, "rb") as f:
            return f.read()
    except OSError as e:
        raise KcompressError(f"{model}: cannot read the ONNX file ({e.strerror or e})") from None


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


class ONNXModel:
    """An ONNX model (path or bytes) in an ONNX Runtime CPU session, ready to run on float batches.

    ``load_ms``: time to create the session (parse, optimize, allocate); ``first_inference_ms``: the first
    :meth:`run`, set once it happened (kernels and buffers are prepared lazily, so it is slower than the others).
    """

    def __init__(self, model, num_threads: Optional[int] = None, batch_size: Optional[int] = None):
        import onnxruntime as ort

        self.name = str(model) if not isinstance(model, (bytes, bytearray)) else "<onnx>"
        if not isinstance(model, (bytes, bytearray)) and not os.path.isfile(str(model)):
            raise KcompressError(f"{model}: no such ONNX file")
        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = int(num_threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are not the user's
        self.num_threads = num_threads
        t0 = time.perf_counter()
        try:
            src = bytes(model) if isinstance(model, (bytes, bytearray)) else str(model)
            self.session = ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  (InvalidProtobuf, Fail, InvalidGraph, NotImplemented...)
            raise KcompressError(f"{self.name}: cannot load the ONNX model ({_first_line(e)})") from None
        self.load_ms = (time.perf_counter() - t0) * 1000.0
        self.first_inference_ms: Optional[float] = None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise KcompressError(f"{self.name}: kcompress runs ONNX models with one input and an output, this one "
                                 f"has {len(inputs)} inputs and {len(outputs)} outputs")
        inp, out = inputs[0], outputs[0]
        if inp.type not in _FLOAT_TYPES:
            raise KcompressError(f"{self.name}: the model's input is {inp.type}, kcompress feeds float tensors")
        self.input_name = inp.name
        self.input_dtype = _FLOAT_TYPES[inp.type]
        self.output_dtype = _FLOAT_TYPES.get(out.type, np.float32)
        dims = list(inp.shape)
        if not dims:
            raise KcompressError(f"{self.name}: the model's input is a scalar, kcompress feeds batches")
        self.fixed_batch = isinstance(dims[0], int) and dims[0] > 0
        self.batch_size = int(dims[0]) if self.fixed_batch else int(batch_size or 64)
        self.input_shape = tuple(d if isinstance(d, int) and d > 0 else None for d in dims[1:])
        self.output_shape = tuple(d if isinstance(d, int) and d > 0 else None for d in out.shape)

    @property
    def num_classes(self) -> Optional[int]:
        """The output's last dimension, None when the graph leaves it symbolic."""
        return self.output_shape[-1] if self.output_shape else None

    def run(self, x: np.ndarray) -> np.ndarray:
        """One batch exactly as given (no chunking): the first output as float32."""
        t0 = time.perf_counter()
        try:
            out = self.session.run(None, {self.input_name: x})[0]
        except Exception as e:  # noqa: BLE001
            raise KcompressError(f"{self.name}: ONNX Runtime failed on a batch of shape {x.shape} "
                                 f"({_first_line(e)})") from None
        if self.first_inference_ms is None:
            self.first_inference_ms = (time.perf_counter() - t0) * 1000.0
        return np.asarray(out, np.float32)

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """``x`` in the input's dtype, contiguous (what :meth:`run` is timed on)."""
        return np.ascontiguousarray(np.asarray(x, self.input_dtype))

    def predict(self, x: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
        """Outputs for float samples ``x`` (any count), run in batches of ``batch_size`` (the file's own batch when
        it is fixed; the last chunk is then zero-padded and the padding dropped)."""
        x = self.prepare(x)
        step = self.batch_size if self.fixed_batch else int(batch_size or self.batch_size)
        outs = []
        for start in range(0, len(x), step):
            chunk = x[start:start + step]
            n = len(chunk)
            if self.fixed_batch and n < step:
                chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)])
            outs.append(self.run(chunk)[:n])
        if not outs:
            return np.zeros((0, *(d or 0 for d in self.output_shape[1:])), np.float32)
        return np.concatenate(outs)

    def info(self) -> dict:
        """Input/output names, shapes and dtypes, the providers and ONNX Runtime's version."""
        return {"input": {"name": self.input_name, "shape": [None, *self.input_shape],
                          "dtype": np.dtype(self.input_dtype).name},
                "output": {"shape": list(self.output_shape), "dtype": np.dtype(self.output_dtype).name},
                "providers": self.session.get_providers(), "onnxruntime": ort_version(),
                "fixed_batch": self.fixed_batch}


def onnx_output_kind(model) -> Optional[str]:
    """``"probabilities"`` when the graph's first output comes from a ``Softmax`` (possibly behind
    ``QuantizeLinear``/``DequantizeLinear``, ``Identity``, ``Reshape``), ``"logits"`` otherwise; None when the file
    cannot be read as ONNX (ONNX Runtime then says why)."""
    import onnx

    try:
        proto = onnx.load_model_from_string(read_onnx_bytes(model))
    except Exception:  # noqa: BLE001  (DecodeError and friends: the session reports the file)
        return None
    graph = proto.graph
    if not graph.output:
        return None
    producer = {out: node for node in graph.node for out in node.output}
    name = graph.output[0].name
    for _ in range(len(graph.node) + 1):
        node = producer.get(name)
        if node is None:
            return "logits"
        if node.op_type == "Softmax":
            return "probabilities"
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear", "Identity", "Reshape", "Cast") or \
                not node.input:
            return "logits"
        name = node.input[0]
    return "logits"
