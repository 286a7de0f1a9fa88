"""Running and reading ``.tflite`` files in the LiteRT interpreter (``ai_edge_litert``), no TensorFlow needed.

:class:`TFLiteModel` takes float inputs as the Keras model would and returns float outputs: for int8/uint8/int16
I/O it quantizes inputs with the model's own input scale and zero point and dequantizes the outputs, so the same
data pipeline evaluates Keras and TFLite models alike. Gotcha: the interpreter holds views into its tensors, so
outputs are copied before the next ``invoke``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from kcompress.errors import KcompressError
from kcompress.internals import ops_details

__all__ = ["TFLiteModel", "tflite_ops", "tflite_tensors", "float_op_report", "delegation", "QUANT_TYPES"]

QUANT_TYPES = (np.int8, np.uint8, np.int16)
_DELEGATE_ERROR = re.compile(r"xnnpack|delegate", re.IGNORECASE)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _interpreter_class():
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter


class TFLiteModel:
    """A ``.tflite`` file (path or bytes) ready to run on float batches.

    ``batch_size`` resizes the input's batch axis once; shorter batches are padded and the padding dropped, so
    the interpreter is allocated a single time. Gotcha: a file converted with a fixed batch (often 1) whose graph
    cannot take another (a ``RESHAPE`` to a constant ``[1, -1]`` fails to prepare, or the output keeps batch 1) runs
    at its own batch instead, chunk by chunk: ``batch_size`` is then the file's and ``fixed_batch`` is True, so
    callers that need a given batch (benchmarks) can say so.
    """

    def __init__(
        self, model: str | bytes, num_threads: Optional[int] = None, batch_size: int = 1, delegates: bool = True
    ):
        self.batch_size = int(batch_size)
        #: True when the file's batch could not be resized to the ``batch_size`` asked for (see the class doc)
        self.fixed_batch = False
        #: why the default delegate (XNNPACK) was dropped, when it refused the graph ("" when it was not)
        self.delegate_fallback = ""
        try:
            self.interpreter = self._open(model, num_threads, delegates)
        except RuntimeError as e:  # XNNPACK can refuse a valid graph (e.g. a quantization scale near 1e-9)
            if not delegates or not _DELEGATE_ERROR.search(str(e)):
                raise KcompressError(f"cannot run the .tflite model: {_first_line(e)}") from None
            self.delegate_fallback = _first_line(e)
            self.interpreter = self._open(model, num_threads, False)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def _new(self, model, num_threads, delegates: bool):
        """A fresh interpreter, tensors not allocated; a file LiteRT cannot read is a KcompressError."""
        Interpreter = _interpreter_class()
        kwargs: dict[str, Any] = {"num_threads": num_threads}
        if not delegates:  # the plain op graph, as written in the file (XNNPACK would fuse ops into DELEGATE nodes)
            from ai_edge_litert.interpreter import OpResolverType

            kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            if isinstance(model, (bytes, bytearray)):
                interpreter = Interpreter(model_content=bytes(model), **kwargs)
            else:
                interpreter = Interpreter(model_path=model, **kwargs)
        except ValueError as e:
            raise KcompressError(f"cannot load the .tflite model: {_first_line(e)}") from None
        except RuntimeError as e:
            if delegates:
                raise
            raise KcompressError(f"cannot load the .tflite model: {_first_line(e)}") from None
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise KcompressError(f"models with {len(inputs)} inputs / {len(outputs)} outputs are not supported yet")
        return interpreter

    def _open(self, model, num_threads, delegates: bool):
        """An interpreter with the batch axis resized (when the graph allows it) and tensors allocated."""
        interpreter = self._new(model, num_threads, delegates)
        detail = interpreter.get_input_details()[0]
        shape = [int(d) for d in detail["shape"]]
        if not shape or shape[0] == self.batch_size:
            interpreter.allocate_tensors()
            return interpreter
        try:
            interpreter.resize_tensor_input(detail["index"], [self.batch_size, *shape[1:]])
            interpreter.allocate_tensors()
            out_shape = interpreter.get_output_details()[0]["shape"]
            resized = len(out_shape) > 0 and int(out_shape[0]) == self.batch_size
        except (RuntimeError, ValueError) as e:
            if delegates and _DELEGATE_ERROR.search(str(e)):
                raise RuntimeError(str(e)) from None  # the delegate's refusal: __init__ retries without it
            resized = False
        if resized:
            return interpreter
        # The graph is built for its own batch (e.g. a RESHAPE to a constant [1, -1]): run at that batch.
        self.batch_size, self.fixed_batch = shape[0], True
        interpreter = self._new(model, num_threads, delegates)
        interpreter.allocate_tensors()
        return interpreter

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.input["shape"][1:])

    @property
    def input_dtype(self):
        return self.input["dtype"]

    @property
    def output_dtype(self):
        return self.output["dtype"]

    def delegation(self) -> dict[str, Any]:
        """What executes the model, read from the interpreter's graph after allocation: see :func:`delegation`."""
        return delegation(ops_details(self.interpreter))

    def _quantize_input(self, x: np.ndarray) -> np.ndarray:
        dtype = self.input["dtype"]
        if dtype in QUANT_TYPES:
            scale, zero = self.input["quantization"]
            if scale == 0:
                return x.astype(dtype)
            info = np.iinfo(dtype)
            return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)
        return x.astype(dtype)

    def _dequantize_output(self, y: np.ndarray) -> np.ndarray:
        if self.output["dtype"] in QUANT_TYPES:
            scale, zero = self.output["quantization"]
            if scale != 0:
                return (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)

    def set_raw_input(self, x: np.ndarray) -> None:
        """Sets an already batch-sized, already typed input (used by benchmarks)."""
        self.interpreter.set_tensor(self.input["index"], x)

    def invoke(self) -> None:
        self.interpreter.invoke()

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """``x`` padded to the batch size and quantized to the input type."""
        n = len(x)
        if n < self.batch_size:
            pad = np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)
            x = np.concatenate([x, pad])
        return self._quantize_input(np.asarray(x, np.float32))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Float outputs for a float batch of any length (run in chunks of ``batch_size``)."""
        x = np.asarray(x, np.float32)
        if tuple(x.shape[1:]) != self.input_shape:
            raise KcompressError(f"input shape {tuple(x.shape[1:])} does not fit the .tflite input {self.input_shape}")
        out = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start : start + self.batch_size]
            self.interpreter.set_tensor(self.input["index"], self.prepare(chunk))
            self.interpreter.invoke()
            y = self.interpreter.get_tensor(self.output["index"])[: len(chunk)]
            out.append(self._dequantize_output(np.array(y)))
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


@dataclass(frozen=True)
class TensorInfo:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    quantized_dimension: int
    bytes: int


def tflite_tensors(model: str | bytes) -> list[TensorInfo]:
    """Every tensor with its dtype and quantization parameters (per-channel scales included)."""
    interp = TFLiteModel(model, delegates=False).interpreter
    out = []
    for t in interp.get_tensor_details():
        q = t.get("quantization_parameters", {})
        shape = tuple(int(d) for d in t["shape"])
        out.append(
            TensorInfo(
                index=int(t["index"]),
                name=t["name"],
                shape=shape,
                dtype=np.dtype(t["dtype"]).name,
                scales=tuple(float(s) for s in np.asarray(q.get("scales", []))),
                zero_points=tuple(int(z) for z in np.asarray(q.get("zero_points", []))),
                quantized_dimension=int(q.get("quantized_dimension", 0)),
                bytes=int(np.prod(shape)) * np.dtype(t["dtype"]).itemsize if shape else np.dtype(t["dtype"]).itemsize,
            )
        )
    return out


def tflite_ops(model: str | bytes) -> list[dict[str, Any]]:
    """Ops in execution order: ``{"index", "op", "inputs", "outputs", "input_dtypes", "output_dtypes"}``."""
    interp = TFLiteModel(model, delegates=False).interpreter
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    ops = []
    for op in ops_details(interp):
        ins = [int(i) for i in op["inputs"] if i >= 0]
        outs = [int(i) for i in op["outputs"] if i >= 0]
        ops.append(
            {
                "index": int(op["index"]),
                "op": op["op_name"],
                "inputs": [tensors[i]["name"] for i in ins if i in tensors],
                "outputs": [tensors[i]["name"] for i in outs if i in tensors],
                "input_dtypes": [np.dtype(tensors[i]["dtype"]).name for i in ins if i in tensors],
                "output_dtypes": [np.dtype(tensors[i]["dtype"]).name for i in outs if i in tensors],
            }
        )
    return ops


_COMPUTE_OPS = {
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "FULLY_CONNECTED",
    "TRANSPOSE_CONV",
    "CONV_3D",
    "BATCH_MATMUL",
    "ADD",
    "MUL",
    "AVERAGE_POOL_2D",
    "MAX_POOL_2D",
    "MEAN",
    "SOFTMAX",
    "CONCATENATION",
}


def float_op_report(model: str | bytes) -> dict[str, Any]:
    """Which ops compute in float: ``{"ops", "float_ops", "float_compute_ops", "quantize_ops", "dequantize_ops"}``.

    A compute op is counted as float when its first output is float32/float16. QUANTIZE/DEQUANTIZE counts show
    where a "quantized" model hops back to float.
    """
    ops = tflite_ops(model)
    float_ops = [o for o in ops if o["output_dtypes"] and o["output_dtypes"][0].startswith("float")]
    return {
        "ops": len(ops),
        "float_ops": len(float_ops),
        "float_compute_ops": sorted({o["op"] for o in float_ops if o["op"] in _COMPUTE_OPS}),
        "float_compute_op_count": sum(1 for o in float_ops if o["op"] in _COMPUTE_OPS),
        "quantize_ops": sum(1 for o in ops if o["op"] == "QUANTIZE"),
        "dequantize_ops": sum(1 for o in ops if o["op"] == "DEQUANTIZE"),
        "op_counts": _counts(o["op"] for o in ops),
    }


def delegation(ops: list[dict[str, Any]]) -> dict[str, Any]:
    """Which delegate runs a graph, from the interpreter's op details (``Interpreter._get_ops_details()`` after
    ``allocate_tensors``): ``{"delegate", "partitions", "replaced_nodes", "total_nodes"}``.

    Applying a delegate appends one ``DELEGATE`` node per partition and keeps the replaced nodes in the list; a
    partition is every original node between the DELEGATE node's inputs and its outputs, so the replaced nodes are
    found by walking back from its outputs to its inputs. ``delegate`` is ``"xnnpack"`` when there is a
    DELEGATE node (the interpreter's only default delegate; :class:`TFLiteModel` passes no others) and ``"cpu"``
    (the builtin kernels, no delegate) otherwise.
    """
    original = [o for o in ops if o["op_name"] != "DELEGATE"]
    partitions = [o for o in ops if o["op_name"] == "DELEGATE"]
    producer = {int(t): o["index"] for o in original for t in o["outputs"] if t >= 0}
    by_index = {o["index"]: o for o in original}
    replaced: set[int] = set()
    for part in partitions:
        stop = {int(t) for t in part["inputs"] if t >= 0}
        todo = [int(t) for t in part["outputs"] if t >= 0]
        while todo:
            node = producer.get(todo.pop())
            if node is None or node in replaced:
                continue
            replaced.add(node)
            todo.extend(int(t) for t in by_index[node]["inputs"] if t >= 0 and int(t) not in stop)
    return {"delegate": "xnnpack" if partitions else "cpu", "partitions": len(partitions),
            "replaced_nodes": len(replaced), "total_nodes": len(original)}


def _counts(names) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return dict(sorted(out.items()))
