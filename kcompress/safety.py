"""Safe loading: refuse model files that would run their own code when tf_keras loads them.

tf_keras rebuilds a ``Lambda`` layer of a legacy ``.h5`` or SavedModel from marshalled Python bytecode, and runs it
while rebuilding the graph, whatever ``safe_mode`` says. So before tf_keras sees an untrusted file,
:func:`check_model_file` reads the stored architecture *as data* (the ``.h5`` ``model_config`` attribute through
h5py, a tf_keras ``.keras`` zip's ``config.json``, a SavedModel's ``keras_metadata.pb``), walks every layer, nested
models and wrapped layers included, and refuses with one line naming the first layer that is a ``Lambda``, holds a
serialized Python function, or is of a class neither tf_keras nor the user registered
(``@keras.utils.register_keras_serializable()`` or an active ``custom_object_scope``). ``trust_model=True`` in the API
(``--trust-model`` on the command line) skips the check: only for files whose source you trust.

Gotchas:

- The check sees class names, not code: a registered class is trusted as registered. tf_keras's own built-in layers
  (everything in ``tf_keras.layers``, ``TFOpLambda``, which names a TensorFlow function rather than holding code, and
  the model classes) are known.
- A SavedModel without ``keras_metadata.pb`` is an inference-only export and is not loaded by tf_keras here.
- Runs no TensorFlow graph and imports no user code; h5py and the tf_keras protobuf module are the only readers.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Iterator, Optional

from kcompress.errors import KcompressError

__all__ = ["TRUST_HINT", "TFMOT_QAT_LAYERS", "UnsafeModel", "check_model_file", "check_config", "stored_configs",
           "uses_tfmot_qat"]

#: tfmot's quantization-aware training layers (a model saved by ``kcompress qat --keras-out``): their configs are
#: data (quantizer and config classes from tfmot's own registry), loaded inside tfmot's ``quantize_scope``.
TFMOT_QAT_LAYERS = frozenset({"QuantizeLayer", "QuantizeWrapper", "QuantizeWrapperV2", "QuantizeAnnotate"})

TRUST_HINT = "if you trust this file, pass --trust-model (trust_model=True in the Python API) to load it anyway"

# keys of a layer's config that hold other layers
_LAYER_LISTS = ("layers", "cells")
_LAYER_SLOTS = ("layer", "backward_layer", "forward_layer", "cell")
# layers tf_keras deserializes by name without being in tf_keras.layers
_EXTRA_BUILTINS = {"Functional", "Model", "Sequential", "TFOpLambda", "SlicingOpLambda", "TensorFlowOpLayer",
                   "InputLayer", "LinearModel", "WideDeepModel"}


class UnsafeModel(KcompressError):
    """A model file that would run code, or use unknown classes, when loaded."""


def _builtin_layers() -> set[str]:
    from kcompress.backend import keras

    names = set(_EXTRA_BUILTINS)
    modules = [keras.layers]
    experimental = getattr(keras.layers, "experimental", None)
    if experimental is not None:
        modules += [experimental, getattr(experimental, "preprocessing", None)]
    for mod in modules:
        for attr in dir(mod) if mod is not None else ():
            obj = getattr(mod, attr, None)
            if isinstance(obj, type) and issubclass(obj, keras.layers.Layer):
                names.update((attr, obj.__name__))
    return names


def _registered(class_name: str) -> bool:
    from kcompress.backend import keras

    if keras.saving.get_registered_object(class_name) is not None:
        return True
    short = {key.split(">")[-1] for key in keras.saving.get_custom_objects()}
    return class_name in short


def _walk(entry: dict, found: list, in_layer_slot: bool, owner: Optional[str]) -> None:
    """Collects ``(layer name, class name, problem)`` for every suspect layer under a serialized Keras object."""
    class_name = str(entry.get("class_name", ""))
    config = entry.get("config") if isinstance(entry.get("config"), dict) else {}
    name = str(config.get("name") or entry.get("name") or owner or "?")
    if in_layer_slot:
        owner = name
        if class_name == "Lambda":
            found.append((name, class_name, "is a Lambda layer, whose Python code runs when the model is loaded"))
        elif class_name and not _is_known(class_name, entry.get("registered_name")):
            found.append((name, class_name, f"is of the unregistered custom class {class_name!r}"))
    if class_name == "__lambda__":
        found.append((owner or "?", class_name, "holds a serialized Python lambda, which runs when loaded"))
    for key, value in config.items():
        if key.endswith("_type") and value == "lambda" and in_layer_slot and class_name != "Lambda":
            found.append((name, class_name, f"holds a serialized Python lambda ({key}), which runs when loaded"))
        _descend(value, found, in_layer_slot=False, owner=owner, key=key)


def _descend(value: Any, found: list, in_layer_slot: bool, owner: Optional[str], key: str = "") -> None:
    if isinstance(value, dict):
        if "class_name" in value:
            _walk(value, found, in_layer_slot or key in _LAYER_SLOTS, owner)
        else:
            for k, v in value.items():
                _descend(v, found, False, owner, k)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _descend(item, found, in_layer_slot or key in _LAYER_LISTS, owner)


_KNOWN: Optional[set[str]] = None


def _is_known(class_name: str, registered_name: Any = None) -> bool:
    global _KNOWN
    if _KNOWN is None:
        _KNOWN = _builtin_layers()
    if class_name in _KNOWN or class_name in TFMOT_QAT_LAYERS:
        return True
    return _registered(class_name) or (isinstance(registered_name, str) and _registered(registered_name))


def _problems(config: dict) -> list[tuple[str, str, str]]:
    found: list = []
    _walk(config, found, in_layer_slot=True, owner=None)
    return found


def _raise(found: list, source: str) -> None:
    unique = list(dict.fromkeys(found))
    if unique:
        name, class_name, problem = unique[0]
        more = f" (and {len(unique) - 1} more)" if len(unique) > 1 else ""
        raise UnsafeModel(f"refusing to load {source}: layer {name!r} ({class_name}) {problem}{more}; {TRUST_HINT}")


def check_config(config: dict, source: str) -> None:
    """Raises :class:`UnsafeModel` naming the first suspect layer of one serialized model (``{"class_name", ...}``)."""
    _raise(_problems(config), source)


def _json(text: Any, source: str) -> dict:
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        raise KcompressError(f"{source}: the stored model architecture is not readable JSON") from None
    if not isinstance(value, dict):
        raise KcompressError(f"{source}: the stored model architecture is not a Keras model config")
    return value


def stored_configs(path: str, fmt: str) -> Iterator[dict]:
    """The serialized Keras objects stored in a model file, read as data (``fmt`` from ``kcompress.io.model_format``)."""
    if fmt == "h5":
        import h5py

        try:
            with h5py.File(path, "r") as h5:
                raw = h5.attrs.get("model_config")
        except OSError as e:
            raise KcompressError(f"{path}: not a readable .h5 file ({e})") from None
        if raw is None:
            raise KcompressError(f"{path}: an .h5 file without a model architecture (weights only?)")
        yield _json(raw, path)
    elif fmt == "keras":
        try:
            with zipfile.ZipFile(path) as zf:
                raw = zf.read("config.json")
        except (KeyError, zipfile.BadZipFile, OSError):
            raise KcompressError(f"{path}: a .keras file without a readable config.json") from None
        yield _json(raw, path)
    elif fmt == "savedmodel":
        from tf_keras.protobuf import saved_metadata_pb2

        import kcompress.backend  # noqa: F401 - sets up TensorFlow before tf_keras is imported

        meta = saved_metadata_pb2.SavedMetadata()
        try:
            with open(os.path.join(path, "keras_metadata.pb"), "rb") as f:
                meta.ParseFromString(f.read())
        except Exception:  # noqa: BLE001 - a protobuf DecodeError or an OSError: the same answer
            raise KcompressError(f"{path}: keras_metadata.pb is not readable") from None
        for node in meta.nodes:
            if node.identifier.startswith("_tf_keras_") and node.identifier != "_tf_keras_metric":
                yield _json(node.metadata, path)


def uses_tfmot_qat(path: str, fmt: str) -> bool:
    """Whether the file's architecture holds tfmot QAT layers (then it loads inside tfmot's ``quantize_scope``)."""
    def walk(obj) -> bool:
        if isinstance(obj, dict):
            return obj.get("class_name") in TFMOT_QAT_LAYERS or any(walk(v) for v in obj.values())
        return isinstance(obj, list) and any(walk(v) for v in obj)

    try:
        return any(walk(config) for config in stored_configs(path, fmt))
    except KcompressError:
        return False


def check_model_file(path: str, fmt: str) -> None:
    """Raises :class:`UnsafeModel` (one line naming the layer) if loading ``path`` with tf_keras could run code."""
    _raise([p for config in stored_configs(path, fmt) for p in _problems(config)], path)
