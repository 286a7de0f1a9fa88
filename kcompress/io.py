"""Model files and outputs: formats, load/save in any tf_keras format, the one atomic writer, JSON.

MODEL is a tf_keras model saved as a SavedModel directory, an ``.h5`` or a ``.keras`` file; Keras 3 files are
recognised and rebuilt in tf_keras by :mod:`kcompress.keras3`. Every write goes to a temporary file beside the target
and is renamed into place, so an interrupted write never leaves half a file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from typing import Optional

from kcompress.errors import KcompressError

__all__ = ["path_size", "check_output_path", "atomic_write_bytes", "write_json", "model_format", "load_model", "ensure_tf_keras", "save_model", "saved_model_size"]


def path_size(path: str) -> int:
    """Bytes of a file, or of everything under a directory."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def check_output_path(path: str, overwrite: bool) -> None:
    """Refuses an existing output unless ``overwrite``; the message names the flag."""
    if os.path.exists(path) and not overwrite:
        raise KcompressError(f"{path} exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise KcompressError(f"cannot write {path}: folder {parent} does not exist")


def atomic_write_bytes(path: str, data: bytes, overwrite: bool = False) -> None:
    """Writes ``data`` to a temp file beside ``path`` and renames it into place."""
    check_output_path(path, overwrite)
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".kcompress-", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj, overwrite: bool = False) -> None:
    """``obj`` as strict JSON (NaN -> null, numpy -> Python), written atomically."""
    import json

    from kcompress.bench.schema import json_clean

    atomic_write_bytes(path, (json.dumps(json_clean(obj), indent=2) + "\n").encode(), overwrite=overwrite)


def model_format(path: str) -> str:
    """``savedmodel``, ``h5``, ``keras`` (tf_keras zip), ``keras3`` or ``tflite``; raises for anything else."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "saved_model.pb")):
            from kcompress.keras3 import is_exported_savedmodel

            return "exported" if is_exported_savedmodel(path) else "savedmodel"
        raise KcompressError(f"{path}: a folder but not a SavedModel (no saved_model.pb)")
    if not os.path.isfile(path):
        raise KcompressError(f"{path}: no such model file or folder")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[4:8] == b"TFL3":
        return "tflite"
    if head.startswith(b"\x89HDF") or (head.startswith(b"PK") and zipfile.is_zipfile(path)):
        from kcompress.keras3 import is_keras3_file

        if is_keras3_file(path):
            return "keras3"
        return "h5" if head.startswith(b"\x89HDF") else "keras"
    raise KcompressError(f"{path}: not a model (expected a SavedModel folder, .h5, .keras or .tflite)")


def load_model(path: str, compile: bool = False, stage: str = "this step"):
    """A tf_keras model from any supported format.

    Keras 3 files are rebuilt in tf_keras and verified (outputs within 1e-5) by :mod:`kcompress.keras3`. An
    inference-only export (Keras 3 ``model.export()``) has no layers to train: it is refused with a message naming
    ``stage``; :func:`kcompress.convert.convert` takes its path for post-training quantization instead.
    """
    fmt = model_format(path)
    if fmt == "tflite":
        raise KcompressError(f"{path}: a .tflite file, but {stage} needs a Keras model")
    if fmt == "exported":
        from kcompress.keras3 import exported_savedmodel_message

        raise KcompressError(exported_savedmodel_message(stage, path))
    if fmt == "keras3":
        from kcompress import keras3 as bridge

        return bridge.to_tf_keras(bridge.load_keras3(path))
    from kcompress.backend import keras

    try:
        model = keras.models.load_model(path, compile=compile)
    except Exception as e:  # tf_keras raises many types for unreadable files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KcompressError(f"{path}: cannot load the model ({msg[:300]})") from None
    if not isinstance(model, keras.Model):
        raise KcompressError(
            f"{path}: an inference-only SavedModel, not a Keras model; quantize it with the TFLite converter, "
            "or pass the Keras model file"
        )
    return model


def ensure_tf_keras(model):
    """The model as tf_keras: Keras 3 model objects (Python API users) are rebuilt and verified; others pass."""
    from kcompress.keras3 import is_keras3_model, to_tf_keras

    return to_tf_keras(model) if is_keras3_model(model) else model


def save_model(model, path: str, overwrite: bool = False, keras3: bool = False) -> None:
    """Saves by extension (``.keras``, ``.h5``, else a SavedModel folder) via a temp path and a rename.

    ``keras3=True`` writes a Keras 3 ``.keras`` file (rebuilt from the tf_keras model and verified), so users who
    came with Keras 3 get Keras 3 back.
    """
    check_output_path(path, overwrite)
    if keras3:
        from kcompress.keras3 import save_keras3

        if not path.endswith(".keras"):
            raise KcompressError(f"{path}: Keras 3 models are written as .keras files")
        save_keras3(model, path)
        return
    parent = os.path.dirname(os.path.abspath(path))
    tmpdir = tempfile.mkdtemp(prefix=".kcompress-", dir=parent)
    try:
        base = os.path.basename(path.rstrip("/"))
        tmp = os.path.join(tmpdir, base)
        if path.endswith((".keras", ".h5")):
            model.save(tmp)
        else:
            model.save(tmp, save_format="tf")
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def saved_model_size(model) -> Optional[int]:
    """Bytes of the model saved as a SavedModel (a temporary folder, removed after)."""
    tmp = tempfile.mkdtemp(prefix="kcompress-sm-")
    try:
        model.save(os.path.join(tmp, "m"), save_format="tf")
        return path_size(os.path.join(tmp, "m"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
