"""What is inside an ``.onnx`` file: inputs, outputs, opset, op counts, weight bytes per dtype, quantization (QDQ
pairs, per-channel or per-tensor scales) and kcompress's export record. Read with ``onnx`` (no session is made)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from kcompress.errors import KcompressError

__all__ = ["inspect_onnx"]

_COMPUTE = ("Conv", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul")


def _shape(value_info) -> list:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]


def inspect_onnx(path: str) -> dict[str, Any]:
    """``{"format": "onnx", "opset", "inputs", "outputs", "op_counts", "initializer_bytes", "quantization", "ops",
    "metadata", "file_bytes"}``. ``quantization["float_compute_ops"]`` counts Conv/Gemm/MatMul nodes whose weight
    initializer is float and not behind a DequantizeLinear: what stayed float in a "quantized" file."""
    import os

    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(path)
    except Exception as e:  # noqa: BLE001  (onnx raises DecodeError, OSError, ...)
        raise KcompressError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0] if str(e) else e})") from None
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    dtypes = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in g.initializer}
    by_dtype: Counter = Counter()
    for t in g.initializer:
        by_dtype[dtypes[t.name]] += int(numpy_helper.to_array(t).nbytes)
    dq_of = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    per_channel = per_tensor = 0
    float_compute = []
    ops = []
    for i, n in enumerate(g.node):
        ops.append({"index": i, "op": n.op_type, "name": n.name, "inputs": list(n.input), "outputs": list(n.output)})
        if (n.op_type == "DequantizeLinear" and n.input[0] in inits and dtypes[n.input[0]] in ("int8", "uint8")
                and len(n.input) > 1 and n.input[1] in inits):  # a weight (int32 initializers are biases)
            size = int(np.prod(inits[n.input[1]].dims)) if inits[n.input[1]].dims else 1
            per_channel, per_tensor = per_channel + (size > 1), per_tensor + (size == 1)
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1:
            w = n.input[1]
            if w in inits and dtypes[w].startswith("float") and w not in dq_of:
                float_compute.append(n.name or n.op_type)
    counts = Counter(n.op_type for n in g.node)
    meta = next((p.value for p in model.metadata_props if p.key == "kcompress"), None)
    return {
        "format": "onnx",
        "file_bytes": os.path.getsize(path),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [{"name": v.name, "shape": _shape(v),
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
                   for v in g.input if v.name not in inits],
        "outputs": [{"name": v.name, "shape": _shape(v),
                     "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name}
                    for v in g.output],
        "op_counts": dict(sorted(counts.items())),
        "initializer_bytes": dict(sorted(by_dtype.items())),
        "quantization": {"quantize_linear": counts.get("QuantizeLinear", 0),
                         "dequantize_linear": counts.get("DequantizeLinear", 0),
                         "weights_per_channel": per_channel, "weights_per_tensor": per_tensor,
                         "integer_compute_ops": sum(counts.get(k, 0) for k in _COMPUTE if "Integer" in k or "QLinear" in k),
                         "float_compute_ops": float_compute},
        "ops": ops,
        "metadata": json.loads(meta) if meta else None,
    }
