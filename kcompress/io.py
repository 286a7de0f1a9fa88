"""Model files and outputs: formats, load/save in any tf_keras format, the one atomic writer, JSON.

MODEL is a tf_keras model saved as a SavedModel directory, an ``.h5`` or a ``.keras`` file; Keras 3 files are
recognised and rebuilt in tf_keras by :mod:`kcompress.keras3`. Every write goes to a temporary file beside the target
and is renamed into place, so an interrupted write never leaves half a file behind (:mod:`kcompress.atomic`).

Loading is safe by default: a file whose stored architecture has a ``Lambda`` layer or an unregistered custom class
is refused before tf_keras reads it (:mod:`kcompress.safety`), unless ``trust_model=True``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import tempfile
import zipfile
from typing import Any, Iterator, Optional

from kcompress.atomic import atomic_path, atomic_write_bytes, atomic_write_text, check_output_path
from kcompress.errors import KcompressError

__all__ = ["path_size", "check_output_path", "atomic_path", "atomic_write_bytes", "atomic_write_text", "write_json",
           "model_format", "load_model", "trusting_models", "ensure_tf_keras", "save_model", "saved_model_size"]

_TRUST_MODELS = contextvars.ContextVar("kcompress_trust_models", default=False)


def path_size(path: str) -> int:
    """Bytes of a file, or of everything under a directory."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def write_json(path: str, obj, overwrite: bool = False) -> None:
    """``obj`` as strict JSON (NaN -> null, numpy -> Python), written atomically."""
    import json

    from kcompress.bench.schema import json_clean

    atomic_write_bytes(path, (json.dumps(json_clean(obj), indent=2) + "\n").encode(), overwrite=overwrite)


def model_format(path: str) -> str:
    """``savedmodel``, ``h5``, ``keras`` (tf_keras zip), ``keras3``, ``tflite`` or ``onnx`` (by its extension: ONNX
    has no magic bytes); raises for anything else."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "saved_model.pb")):
            from kcompress.keras3 import is_exported_savedmodel

            return "exported" if is_exported_savedmodel(path) else "savedmodel"
        raise KcompressError(f"{path}: a folder but not a SavedModel (no saved_model.pb)")
    if not os.path.isfile(path):
        raise KcompressError(f"{path}: no such model file or folder")
    if path.lower().endswith(".onnx"):
        return "onnx"
    with open(path, "rb") as f:
        head = f.read(8)
    if head[4:8] == b"TFL3":
        return "tflite"
    if head.startswith(b"\x89HDF") or (head.startswith(b"PK") and zipfile.is_zipfile(path)):
        from kcompress.keras3 import is_keras3_file

        if is_keras3_file(path):
            return "keras3"
        return "h5" if head.startswith(b"\x89HDF") else "keras"
    raise KcompressError(f"{path}: not a model (expected a SavedModel folder, .h5, .keras, .tflite or .onnx)")


@contextlib.contextmanager
def trusting_models(trust: bool = True) -> Iterator[None]:
    """Within the block, :func:`load_model` trusts model files as if ``trust_model=True`` were passed (how the CLI's
    ``--trust-model`` reaches every load of a command; an explicit ``trust_model=True`` needs no block)."""
    token = _TRUST_MODELS.set(bool(trust) or _TRUST_MODELS.get())
    try:
        yield
    finally:
        _TRUST_MODELS.reset(token)


def load_model(path: str, compile: bool = False, stage: str = "this step", trust_model: bool = False):
    """A tf_keras model from any supported format.

    Safe by default: the stored architecture is read as data first and a ``Lambda`` layer (whose Python bytecode
    tf_keras would run while loading a ``.h5`` or SavedModel) or a class that neither tf_keras nor the user registered
    is refused with one line naming the layer (:mod:`kcompress.safety`); ``.keras`` files are also loaded with
    ``safe_mode=True``. ``trust_model=True`` (or a :func:`trusting_models` block) loads them anyway: only for files
    from a source you trust.

    Keras 3 files are rebuilt in tf_keras and verified (outputs within 1e-5) by :mod:`kcompress.keras3`. An
    inference-only export (Keras 3 ``model.export()``) has no layers to train: it is refused with a message naming
    ``stage``; :func:`kcompress.convert.convert` takes its path for post-training quantization instead.
    """
    trust = bool(trust_model) or _TRUST_MODELS.get()
    fmt = model_format(path)
    if fmt in ("tflite", "onnx"):
        raise KcompressError(f"{path}: a .{fmt} file, but {stage} needs a Keras model")
    if fmt == "exported":
        from kcompress.keras3 import exported_savedmodel_message

        raise KcompressError(exported_savedmodel_message(stage, path))
    if fmt == "keras3":
        from kcompress import keras3 as bridge

        return bridge.to_tf_keras(bridge.load_keras3(path, safe_mode=not trust))
    if not trust:
        from kcompress.safety import check_model_file

        check_model_file(path, fmt)
    from kcompress.backend import keras

    kwargs = {"safe_mode": not trust} if fmt == "keras" else {}
    scope: Any = contextlib.nullcontext()
    from kcompress.safety import uses_tfmot_qat

    if uses_tfmot_qat(path, fmt):  # a QAT model (kcompress qat --keras-out): tfmot's classes
        from kcompress.backend import tfmot

        scope = tfmot().quantization.keras.quantize_scope()
    try:
        with scope:
            model = keras.models.load_model(path, compile=compile, **kwargs)
    except Exception as e:  # tf_keras raises many types for unreadable files
        msg = " ".join(str(e).split()) if str(e) else type(e).__name__
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
    """Saves by extension (``.keras``, ``.h5``, else a SavedModel folder) with the atomic writer: a kill at any
    point leaves the old model (file or folder) loadable at ``path``.

    ``keras3=True`` writes a Keras 3 ``.keras`` file (rebuilt from the tf_keras model and verified), so users who
    came with Keras 3 get Keras 3 back.
    """
    check_output_path(path, overwrite)
    if path.endswith(".keras") and not keras3:
        from kcompress.safety import TFMOT_QAT_LAYERS

        if any(type(layer).__name__ in TFMOT_QAT_LAYERS for layer in getattr(model, "layers", ())):
            # tfmot restores a QuantizeLayer's variables from .h5 and SavedModel, not from .keras (it expects 5
            # variables and finds 3), so such a file would not load back
            raise KcompressError(f"{path}: a quantization-aware (tfmot) model does not load back from a .keras "
                                 "file; save it as .h5 or a SavedModel folder (a path without extension)")
    if keras3:
        from kcompress.keras3 import save_keras3

        if not path.endswith(".keras"):
            raise KcompressError(f"{path}: Keras 3 models are written as .keras files")
        save_keras3(model, path)
        return
    with atomic_path(path, overwrite=overwrite) as tmp:
        if path.endswith((".keras", ".h5")):
            model.save(tmp)
        else:
            model.save(tmp, save_format="tf")


def saved_model_size(model) -> Optional[int]:
    """Bytes of the model saved as a SavedModel (a temporary folder, removed after)."""
    tmp = tempfile.mkdtemp(prefix="kcompress-sm-")
    try:
        model.save(os.path.join(tmp, "m"), save_format="tf")
        return path_size(os.path.join(tmp, "m"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
