"""What is inside a Keras model, a ``.tflite`` or an ``.onnx`` file: layers/ops, shapes, dtypes, parameters,
quantization."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from kcompress.internals import ops_details
from kcompress.io import model_format

__all__ = ["inspect_model", "tflite_output_kind"]

_PASS_THROUGH = ("DEQUANTIZE", "QUANTIZE")  # type conversions between the softmax and the output tensor


def inspect_model(path: str, trust_model: bool = False) -> dict[str, Any]:
    """``{"format", "layers"|"ops", ...}``: per layer (Keras) or per op and tensor (TFLite). A Keras file is loaded
    safely unless ``trust_model`` (see :func:`kcompress.io.load_model`)."""
    fmt = model_format(path)
    if fmt == "onnx":
        from kcompress.onnx.inspect import inspect_onnx

        return inspect_onnx(path)
    return _inspect_tflite(path) if fmt == "tflite" else _inspect_keras(path, trust_model)


def _inspect_keras(path: str, trust_model: bool = False) -> dict[str, Any]:
    from kcompress.errors import KcompressError
    from kcompress.io import load_model
    from kcompress.modelinfo import count_params, flat_layers, macs_by_layer

    model = load_model(path, trust_model=trust_model)
    try:  # per layer at the declared input size, nested models included
        per_layer: Optional[dict] = {}
        for _, layer, macs in macs_by_layer(model):
            per_layer[id(layer)] = per_layer.get(id(layer), 0) + macs
        macs_note = None
    except KcompressError as e:  # sizes declared None: MACs depend on the input size
        per_layer, macs_note = None, str(e)
    layers = []
    for layer in flat_layers(model):
        n = int(sum(np.prod(w.shape) for w in layer.weights))
        try:
            out_shape = layer.output_shape
        except AttributeError:
            out_shape = None
        layers.append(
            {
                "name": layer.name,
                "class": layer.__class__.__name__,
                "output_shape": str(out_shape),
                "dtype": layer.dtype,
                "params": n,
                "bytes": int(sum(np.prod(w.shape) * w.dtype.size for w in layer.weights)),
                "macs": per_layer.get(id(layer), 0) if per_layer is not None else None,
            }
        )
    from kcompress.evaluation import output_kind

    return {
        "format": model_format(path),
        "name": model.name,
        "output_kind": output_kind(model),
        "params": count_params(model),
        "macs": sum(per_layer.values()) if per_layer is not None else None,
        "macs_note": macs_note,
        "layers": layers,
    }


def _inspect_tflite(path: str) -> dict[str, Any]:
    import os

    from kcompress.litert.interpreter import float_op_report, tflite_ops, tflite_tensors

    tensors = tflite_tensors(path)
    by_name = {t.name: t for t in tensors}
    ops = tflite_ops(path)
    def tensor(name: str) -> dict:
        t = by_name.get(name)
        return {"name": name, "dtype": t.dtype if t else None, "shape": list(t.shape) if t else None,
                "quantization": _qparams(t)}

    rows = [{"index": op["index"], "op": op["op"], "inputs": [tensor(n) for n in op["inputs"]],
             "outputs": [tensor(n) for n in op["outputs"]]} for op in ops]
    from kcompress.quantization.metadata import read_metadata

    report = float_op_report(path)
    return {
        "metadata": read_metadata(path),
        "format": "tflite",
        "file_bytes": os.path.getsize(path),
        "output_kind": tflite_output_kind(path),
        "tensor_dtypes": _dtype_bytes(tensors),
        "float_ops": report,
        "ops": rows,
    }


def tflite_output_kind(model: str | bytes) -> str:
    """``"probabilities"`` when the op producing the output tensor is ``SOFTMAX`` (also behind ``DEQUANTIZE`` or
    ``QUANTIZE``), else ``"logits"``. Read from the plain op graph (no delegate fuses the ops away)."""
    from kcompress.litert.interpreter import TFLiteModel

    interp = TFLiteModel(model, delegates=False).interpreter
    producer = {int(t): op for op in ops_details(interp) for t in op["outputs"] if t >= 0}
    tensor = int(interp.get_output_details()[0]["index"])
    for _ in range(len(producer) + 1):
        op = producer.get(tensor)
        if op is None:
            return "logits"
        if op["op_name"] == "SOFTMAX":
            return "probabilities"
        if op["op_name"] not in _PASS_THROUGH or not len(op["inputs"]):
            return "logits"
        tensor = int(op["inputs"][0])
    return "logits"


def _qparams(t) -> Any:
    if t is None or not t.scales:
        return None
    if len(t.scales) == 1:
        return {"scale": t.scales[0], "zero_point": t.zero_points[0] if t.zero_points else 0}
    return {
        "per_channel": len(t.scales),
        "axis": t.quantized_dimension,
        "scale_min": min(t.scales),
        "scale_max": max(t.scales),
    }


def _dtype_bytes(tensors) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for t in tensors:
        d = out.setdefault(t.dtype, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += t.bytes
    return out
