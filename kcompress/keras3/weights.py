"""Copy weights between a Keras 3 model and its tf_keras rebuild (or back), layer by layer, through any registered
layer converter's weight mapping. Private: use :mod:`kcompress.keras3`."""

from __future__ import annotations

import sys

import numpy as np

from kcompress.backend import keras
from kcompress.errors import KcompressError
from kcompress.keras3.rebuild import MODEL_CLASSES, Side, find_converter

__all__ = ["copy_weights", "is_model"]


def copy_weights(src_model, dst_model, src: Side, dst: Side) -> None:
    """Copy weights layer by layer (matched by name), recursing into nested models; shapes must agree."""
    for layer in src_model.layers:
        try:
            target = dst_model.get_layer(layer.name)
        except ValueError as err:
            raise KcompressError(f"layer {layer.name!r} is missing from the rebuilt {dst.name} model") from err
        if is_model(layer):
            copy_weights(layer, target, src, dst)
            continue
        weights = layer.get_weights()
        converter = find_converter({"class_name": type(layer).__name__,
                                     "registered_name": _registered_name(layer)})
        fn = None
        if converter is not None:
            fn = converter.weights_to_tf_keras if dst.pkg is keras else converter.weights_to_keras3
        if fn is not None:
            weights = list(fn(weights))
        expected = [tuple(w.shape) for w in target.get_weights()]
        got = [tuple(np.shape(w)) for w in weights]
        if expected != got:
            raise KcompressError(
                f"layer {layer.name!r} ({type(layer).__name__}): weight shapes {got} do not fit the rebuilt "
                f"{dst.name} layer's {expected}"
            )
        if weights:
            target.set_weights(weights)
            if hasattr(target, "finalize_state"):
                target.finalize_state()  # Normalization & co. derive their tensors from the adapted variables


def is_model(layer) -> bool:
    return type(layer).__name__ in MODEL_CLASSES and hasattr(layer, "layers")


def _registered_name(layer) -> str | None:
    k3 = sys.modules.get("keras")
    if k3 is not None and isinstance(layer, k3.layers.Layer):
        return k3.saving.get_registered_name(type(layer))
    return keras.utils.get_registered_name(type(layer))
