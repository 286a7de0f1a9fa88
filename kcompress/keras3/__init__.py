"""The Keras 3 <-> tf_keras bridge: read users' Keras 3 models and rebuild them in tf_keras (and back).

tfmot and the rest of kcompress work on tf_keras (Keras 2) models. A Keras 3 model is rebuilt in tf_keras from its
config, with every layer's config translated (dtype policies, initializer forms, renamed arguments, the Keras 3
``inbound_nodes`` format), its weights copied layer by layer, and the two models' outputs compared on random inputs.
:func:`to_keras3` does the reverse, for writing results back as Keras 3 ``.keras`` files.

What is supported: Functional and Sequential models (nested ones too) made of built-in layers that exist in both
Keras versions with the same meaning. Anything else (custom layers, Keras 3-only layers, Lambda layers, raw
``keras.ops`` calls in a functional graph, layers called on several tensor arguments such as
``MultiHeadAttention(query, value)``) raises :class:`~kcompress.errors.KcompressError` naming the layer; a converter
for a custom or Keras 3-only layer can be registered with :func:`register_layer_converter`. Subclassed models cannot
be rebuilt at all.

Gotchas:

- A layer argument that only one side knows is dropped when its value is the default of that argument (the feature is
  off), and is an error otherwise: silently dropping e.g. a LoRA rank would change the model.
- Activations whose names exist on both sides but compute different functions (``hard_sigmoid``) are refused.
- ``training=`` arguments recorded on functional nodes are dropped (Keras 3 records the call default, e.g.
  ``training=True`` for random augmentation layers, which tf_keras would obey even at inference); so a layer called
  with an explicit ``training=True`` (Monte Carlo dropout) follows the outer call after conversion.
- Keras 3 writes ``Embedding(mask_zero=True)`` masks as a ``NotEqual`` op feeding ``mask=``; tf_keras propagates
  masks by itself, so that op and argument are dropped.
- Verification compares outputs with ``max|a - b| <= rtol * max(1, max|a|)`` (``a`` the source model's output): a
  relative tolerance on the output's scale, absolute for outputs smaller than 1. Random inputs are standard normal for
  float inputs, and integers in ``[0, vocab)`` for integer inputs and for every input of a model with an ``Embedding``
  (``vocab`` its smallest ``input_dim``, else 10); pass ``inputs=`` for models that need real data (string inputs,
  lookup layers).
- An inference-only SavedModel (``model.export()``, ``tf.saved_model.save``) has no layers left: it can be converted
  to TFLite (post-training quantization) but not trained; see :func:`is_exported_savedmodel`.
"""
from __future__ import annotations

import json
import os
import re
import sys
import zipfile
from typing import Any

import numpy as np

from kcompress.backend import keras, keras3, tf
from kcompress.errors import KcompressError
from kcompress.internals import keras3_last_output
from kcompress.keras3.rebuild import (
    MODEL_CLASSES,
    Side,
    convert_entry,
    k3_side,
    register_layer_converter,
    tfk_side,
    unregister_layer_converter,
)
from kcompress.keras3.weights import copy_weights, is_model

__all__ = [
    "is_keras3_file",
    "is_keras3_model",
    "is_exported_savedmodel",
    "exported_savedmodel_message",
    "load_keras3",
    "to_tf_keras",
    "to_keras3",
    "save_keras3",
    "register_layer_converter",
    "unregister_layer_converter",
    "DEFAULT_RTOL",
]

DEFAULT_RTOL = 1e-5


# --------------------------------------------------------------------------------------------------------------------
# Detection


def is_keras3_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is a model file written by Keras 3 (``.keras`` zip, or legacy ``.h5``).

    tf_keras 2.x writes ``.keras`` zips too; the two differ only in ``metadata.json``'s ``keras_version`` (``"3.x"``
    against ``"2.x"``), which is what is checked. For ``.h5`` files the root ``keras_version`` attribute is read.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                meta = json.loads(zf.read("metadata.json"))
        except (KeyError, ValueError, zipfile.BadZipFile):
            return False
        return str(meta.get("keras_version", "")).startswith("3.")
    with open(path, "rb") as f:
        if f.read(8) != b"\x89HDF\r\n\x1a\n":
            return False
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            version = h5.attrs.get("keras_version", "")
    except OSError:  # a truncated or corrupt .h5: not Keras 3; the tf_keras loader says what is wrong with it
        return False
    if isinstance(version, bytes):
        version = version.decode()
    return str(version).startswith("3.")


def is_keras3_model(obj: Any) -> bool:
    """True if ``obj`` is a Keras 3 model (does not import Keras 3 if nothing has yet)."""
    k3 = sys.modules.get("keras")
    return k3 is not None and hasattr(k3, "Model") and isinstance(obj, k3.Model)


def is_exported_savedmodel(path: str | os.PathLike) -> bool:
    """True if ``path`` is a SavedModel directory without Keras metadata: an inference-only export.

    Keras 3's ``model.export()``, tf_keras' ``model.export()`` and ``tf.saved_model.save`` write these; tf_keras'
    ``model.save(dir)`` also writes ``keras_metadata.pb``, from which tf_keras can reload the layers, so that one is
    not counted. Such an export can be converted to TFLite (``tf.lite.TFLiteConverter.from_saved_model``) only.
    """
    path = os.fspath(path)
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, "saved_model.pb"))
        and not os.path.isfile(os.path.join(path, "keras_metadata.pb"))
    )


def exported_savedmodel_message(stage: str, path: str | os.PathLike | None = None) -> str:
    """The one-line error for a stage (``"distill"``, ``"prune"``, ``"qat"``...) given an inference-only export."""
    where = f"{os.fspath(path)} is" if path is not None else "the model is"
    return (
        f"{stage} needs a trainable Keras model, but {where} an inference-only SavedModel (model.export() or "
        "tf.saved_model.save): it keeps the computation graph and weights, not the layers, so it can only be "
        "post-training quantized (quantize with a PTQ mode); for "
        f"{stage}, pass the .keras or .h5 file the model was saved from instead."
    )


# --------------------------------------------------------------------------------------------------------------------
# Loading and saving


def load_keras3(path: str | os.PathLike, custom_objects: dict | None = None, safe_mode: bool = True):
    """Load a Keras 3 model file with Keras 3 (not compiled). Unknown custom classes become a KcompressError.

    Import the module that defines (and registers, ``@keras.saving.register_keras_serializable()``) any custom layer
    before calling this, or pass ``custom_objects``. Keras refuses ``Lambda`` layers unless ``safe_mode=False``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise KcompressError(f"model file not found: {path}")
    k3 = keras3()
    try:
        return k3.saving.load_model(path, custom_objects=custom_objects, compile=False, safe_mode=safe_mode)
    except (TypeError, ValueError) as err:
        text = " ".join(str(err).split())
        missing = re.search(r"Could not locate (?:class|function) '([^']+)'", text) or re.search(
            r"Unknown (?:layer|object): '?([\w.>]+)", text
        )
        if missing:
            name = missing.group(1)
            raise KcompressError(
                f"cannot load {path}: it uses the custom class {name!r}, which Keras 3 does not know; import the "
                "module that defines it (registered with @keras.saving.register_keras_serializable()) before "
                f"loading, or pass custom_objects={{{name!r}: TheClass}}"
            ) from err
        if "safe_mode" in text or "lambda" in text.lower():
            raise KcompressError(
                f"refusing to load {path}: it contains a Lambda layer, whose Python code Keras would run (safe mode); "
                "if you trust this file, pass --trust-model (trust_model=True in the Python API), though Lambda "
                "layers cannot be converted to tf_keras anyway"
            ) from err
        raise KcompressError(f"cannot load {path} with Keras 3: {text}") from err


def save_keras3(tfk_model, path: str | os.PathLike, verify: bool = True, inputs=None) -> str:
    """Convert a tf_keras model with :func:`to_keras3` and write it as a Keras 3 ``.keras`` file; returns the path.

    Written with the atomic writer (:mod:`kcompress.atomic`), so a crash never leaves half a file. The path
    must end in ``.keras`` (Keras 3 insists).
    """
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise KcompressError(f"a Keras 3 model file must end in .keras: {path}")
    from kcompress.atomic import atomic_path

    k3_model = to_keras3(tfk_model, verify=verify, inputs=inputs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path, overwrite=True) as tmp:
        k3_model.save(tmp)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Conversion


def to_tf_keras(k3_model, verify: bool = True, inputs=None, rtol: float = DEFAULT_RTOL):
    """Rebuild a Keras 3 Functional or Sequential model in tf_keras, with its weights; returns the tf_keras model.

    With ``verify`` the two models are run on ``inputs`` (random ones if None) and a KcompressError names the first
    layer whose output differs by more than ``rtol`` (see the module docstring for the tolerance). The result is not
    compiled.
    """
    if not is_keras3_model(k3_model):
        raise KcompressError(f"to_tf_keras expects a Keras 3 model, got {_type_name(k3_model)}")
    return _convert(k3_model, k3_side(), tfk_side(), verify, inputs, rtol)


def to_keras3(tfk_model, verify: bool = True, inputs=None, rtol: float = DEFAULT_RTOL):
    """Rebuild a tf_keras Functional or Sequential model in Keras 3, with its weights; verified like to_tf_keras.

    Strip tfmot wrappers first (``strip_pruning``; QAT models are not convertible): they are custom layers here.
    """
    if not isinstance(tfk_model, keras.Model):
        raise KcompressError(f"to_keras3 expects a tf_keras model, got {_type_name(tfk_model)}")
    return _convert(tfk_model, tfk_side(), k3_side(), verify, inputs, rtol)


def _type_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def _convert(model, src: Side, dst: Side, verify: bool, inputs, rtol: float):
    class_name = type(model).__name__
    if class_name not in MODEL_CLASSES:
        raise KcompressError(
            f"only Functional and Sequential models can be converted, not a subclassed model ({class_name}); "
            "rebuild it with the functional API or save it as an exported SavedModel for post-training quantization"
        )
    entry = {"class_name": class_name, "config": model.get_config(), "name": model.name}
    custom_objects: dict[str, Any] = {}
    new_entry = convert_entry(entry, src, dst, custom_objects)
    target_cls = dst.pkg.Sequential if new_entry["class_name"] == "Sequential" else dst.pkg.Model
    try:
        new_model = target_cls.from_config(new_entry["config"], custom_objects=custom_objects)
    except Exception as err:  # noqa: BLE001 - any framework error becomes one line for the user
        raise KcompressError(
            f"cannot rebuild {model.name!r} in {dst.name}: {' '.join(str(err).split())[:400]}"
        ) from err
    copy_weights(model, new_model, src, dst)
    if verify:
        _verify(model, new_model, src, dst, inputs, rtol)
    return new_model


# --------------------------------------------------------------------------------------------------------------------
# Verification


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "numpy"):
        return np.asarray(x.numpy())
    k3 = sys.modules.get("keras")
    if k3 is not None:
        return np.asarray(k3.ops.convert_to_numpy(x))
    return np.asarray(x)


def _run(model, xs: list[np.ndarray]) -> list[np.ndarray]:
    feed = xs[0] if len(xs) == 1 else list(xs)
    out = model(feed, training=False)
    return [_to_numpy(o) for o in tf.nest.flatten(out)]


def _close(a: np.ndarray, b: np.ndarray, rtol: float) -> tuple[bool, float, float]:
    """``max|a-b| <= rtol * max(1, max|a|)``; returns (ok, max abs difference, allowed difference)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False, float("inf"), 0.0
    if a.size == 0:
        return True, 0.0, 0.0
    diff = float(np.max(np.abs(a - b)))
    allowed = rtol * max(1.0, float(np.max(np.abs(a))))
    return bool(diff <= allowed), diff, allowed


def _random_inputs(model, seed: int = 0) -> list[np.ndarray]:
    """One random batch of 2 per model input (see the module docstring for the distributions)."""
    rng = np.random.default_rng(seed)
    vocab = _min_vocab(model)
    xs = []
    for t in model.inputs:
        shape = [2 if d is None else int(d) for d in t.shape]
        dtype = np.dtype(str(getattr(t.dtype, "name", t.dtype)))
        if np.issubdtype(dtype, np.integer) or vocab is not None:
            xs.append(rng.integers(0, vocab or 10, size=shape).astype(dtype))
        elif np.issubdtype(dtype, np.floating):
            xs.append(rng.standard_normal(shape).astype(dtype))
        elif dtype == np.bool_:
            xs.append(rng.integers(0, 2, size=shape).astype(bool))
        else:
            raise KcompressError(
                f"cannot make random {dtype} inputs for input {t.name!r} to verify the conversion; pass inputs="
            )
    return xs


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if is_model(layer):
            yield from _all_layers(layer)


def _min_vocab(model) -> int | None:
    dims = [int(layer.input_dim) for layer in _all_layers(model) if type(layer).__name__ == "Embedding"]
    return min(dims) if dims else None


def _verify(src_model, dst_model, src: Side, dst: Side, inputs, rtol: float) -> None:
    if inputs is None:
        xs = _random_inputs(src_model)
    else:
        xs = [np.asarray(x) for x in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
    try:
        want = _run(src_model, xs)
        got = _run(dst_model, xs)
    except Exception as err:  # noqa: BLE001
        text = " ".join(str(err).split())[:300]
        raise KcompressError(f"cannot run the models to verify the conversion: {text}") from err
    if len(want) == len(got) and all(_close(a, b, rtol)[0] for a, b in zip(want, got)):
        return
    culprit = _first_differing_layer(src_model, dst_model, src, dst, xs, rtol)
    if culprit:
        raise KcompressError(f"the {dst.name} model does not match the {src.name} model: {culprit}")
    diffs = [_close(a, b, rtol)[1] for a, b in zip(want, got)]
    raise KcompressError(
        f"the {dst.name} model does not match the {src.name} model: output max abs difference {max(diffs):.3g} "
        f"(tolerance rtol={rtol:g})"
    )


def _first_differing_layer(src_model, dst_model, src: Side, dst: Side, xs, rtol: float) -> str | None:
    """Run every top-level layer's output on both sides and describe the first one that differs, if any."""
    names, src_outs, dst_outs = [], [], []
    for layer in src_model.layers:
        if type(layer).__name__ == "InputLayer":
            continue
        try:
            s = _last_output(layer, src)
            d = _last_output(dst_model.get_layer(layer.name), dst)
        except Exception:  # noqa: BLE001 - a layer without a single output is skipped
            continue
        names.append(layer.name)
        src_outs.append(s)
        dst_outs.append(d)
    if not names:
        return None
    try:
        src_probe = src.pkg.Model(_inputs_arg(src_model), src_outs)
        dst_probe = dst.pkg.Model(_inputs_arg(dst_model), dst_outs)
        src_vals = _run(src_probe, xs)
        dst_vals = _run(dst_probe, xs)
    except Exception:  # noqa: BLE001 - diagnosis is best effort; the caller still raises
        return None
    s_iter = iter(src_vals)
    d_iter = iter(dst_vals)
    for name, s_out in zip(names, src_outs):
        for _ in tf.nest.flatten(s_out):
            a, b = next(s_iter), next(d_iter)
            ok, diff, allowed = _close(a, b, rtol)
            if not ok:
                layer = src_model.get_layer(name)
                return (
                    f"layer {name!r} ({type(layer).__name__}) is the first to differ: max abs difference {diff:.3g} "
                    f"> {allowed:.3g}"
                )
    return None


def _inputs_arg(model):
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def _last_output(layer, side: Side):
    """The layer's output in its last call (the outer model's, for nested models)."""
    if side.pkg is keras:
        return layer.get_output_at(-1)
    return keras3_last_output(layer)
