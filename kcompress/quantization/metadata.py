"""The ``kcompress`` metadata entry of a ``.tflite``: how to feed it (``input``: the preprocessing; ``class_names``),
and, from pipelines, the config hash, stages and validated metrics, as JSON.

Interpreters ignore metadata they do not know, so a file runs as before (checked by a smoke run).
"""

from __future__ import annotations

import json
from typing import Optional

from kcompress.quantization.ptq import smoke_test

__all__ = ["METADATA_NAME", "add_metadata", "read_metadata", "deployment_info"]

METADATA_NAME = "kcompress"


def deployment_info(data) -> dict:
    """What whoever deploys the file needs to feed it, from the data it was validated on: the preprocessing
    (``x * scale + offset``, then ``(x - mean) / std``, applied to float inputs before any int8 quantization of the
    input) and the class names in output order."""
    pre = data.preprocess.to_dict()
    source = {"folder": "image files decoded to float pixels 0-255, resized (bilinear) to the input size",
              "npz": "arrays as stored in the .npz", "builtin": f"the built-in data set {data.name}"}[data.kind]
    return {"input": {"source": source, "preprocess": pre,
                      "formula": "x * scale + offset, then (x - mean) / std (per channel)"},
            "class_names": list(data.class_names)}


def add_metadata(data: bytes, info: dict) -> bytes:
    """The flatbuffer with ``info`` (JSON) stored as model metadata named ``kcompress``; replaces an older one.

    Interpreters ignore metadata they do not know, so the file runs as before (checked by :func:`smoke_test`).
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    payload = json.dumps(info, sort_keys=True).encode()
    metadata = [m for m in (model.metadata or []) if _name(m.name) != METADATA_NAME]
    buf = schema.BufferT()
    buf.data = list(payload)
    model.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    metadata.append(entry)
    model.metadata = metadata
    out = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    smoke_test(out)
    return out


def read_metadata(data_or_path) -> Optional[dict]:
    """The ``kcompress`` metadata of a .tflite (bytes or path), or None."""
    from tensorflow.lite.tools import flatbuffer_utils

    if isinstance(data_or_path, str):
        with open(data_or_path, "rb") as f:
            data_or_path = f.read()
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data_or_path))
    for m in model.metadata or []:
        if _name(m.name) == METADATA_NAME:
            raw = model.buffers[m.buffer].data
            return json.loads(bytes(bytearray(raw)).decode()) if raw is not None else None
    return None


def _name(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)
