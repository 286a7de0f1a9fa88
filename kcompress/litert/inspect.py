"""What is inside a Keras model or a ``.tflite`` file: layers/ops, shapes, dtypes, parameters, quantization."""

from __future__ import annotations

from typing import Any

import numpy as np

from kcompress.io import model_format

__all__ = ["inspect_model"]


def inspect_model(path: str) -> dict[str, Any]:
    """``{"format", "layers"|"ops", ...}``: per layer (Keras) or per op and tensor (TFLite)."""
    fmt = model_format(path)
    return _inspect_tflite(path) if fmt == "tflite" else _inspect_keras(path)


def _inspect_keras(path: str) -> dict[str, Any]:
    from kcompress.io import load_model
    from kcompress.modelinfo import count_macs, count_params, flat_layers, layer_macs

    model = load_model(path)
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
                "macs": layer_macs(layer),
            }
        )
    return {
        "format": model_format(path),
        "name": model.name,
        "params": count_params(model),
        "macs": count_macs(model),
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
        "tensor_dtypes": _dtype_bytes(tensors),
        "float_ops": report,
        "ops": rows,
    }


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
