"""What a Keras model is: input shape, classes, parameters and multiply-accumulates per sample."""

from __future__ import annotations

import numpy as np

from kcompress.backend import keras
from kcompress.errors import KcompressError

__all__ = ["input_shape", "num_classes", "count_params", "flat_layers", "layer_macs", "count_macs"]


def input_shape(model) -> tuple:
    """The model's single input shape without the batch axis."""
    shapes = model.input_shape
    if isinstance(shapes, list):
        if len(shapes) != 1:
            raise KcompressError(f"models with {len(shapes)} inputs are not supported yet (need one input)")
        shapes = shapes[0]
    return tuple(shapes[1:])


def num_classes(model) -> int:
    shape = model.output_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise KcompressError(f"models with {len(shape)} outputs are not supported yet (need one classifier output)")
        shape = shape[0]
    if len(shape) != 2 or shape[-1] is None:
        raise KcompressError(f"the model's output shape {shape} is not a classifier's (batch, classes)")
    return int(shape[-1])


def count_params(model) -> dict[str, int]:
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(sum(np.prod(w.shape) for w in model.weights))
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}


def flat_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from flat_layers(layer)
        else:
            yield layer


def _out_spatial(layer) -> int:
    shape = layer.output_shape
    if isinstance(shape, list):
        shape = shape[0]
    return int(np.prod([d for d in shape[1:-1] if d is not None])) if len(shape) > 2 else 1


def layer_macs(layer) -> int:
    """Multiply-accumulates of one layer for one sample (convolutions, dense; 0 for the rest)."""
    L = keras.layers
    if isinstance(layer, L.DepthwiseConv2D):
        k = int(np.prod(layer.kernel_size))
        cin = int(layer.input_shape[-1])
        return _out_spatial(layer) * k * cin * layer.depth_multiplier
    if isinstance(layer, L.SeparableConv2D):
        k = int(np.prod(layer.kernel_size))
        cin = int(layer.input_shape[-1])
        spatial = _out_spatial(layer)
        return spatial * k * cin * layer.depth_multiplier + spatial * cin * layer.depth_multiplier * layer.filters
    if isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D)) and not isinstance(layer, L.Conv2DTranspose):
        k = int(np.prod(layer.kernel_size))
        cin = int(layer.input_shape[-1]) // max(1, getattr(layer, "groups", 1))
        return _out_spatial(layer) * k * cin * layer.filters
    if isinstance(layer, L.Conv2DTranspose):
        k = int(np.prod(layer.kernel_size))
        cin = int(layer.input_shape[-1])
        in_shape = layer.input_shape
        return int(np.prod(in_shape[1:-1])) * k * cin * layer.filters
    if isinstance(layer, L.Dense):
        shape = layer.input_shape
        rows = int(np.prod([d for d in shape[1:-1] if d is not None])) if len(shape) > 2 else 1
        return rows * int(shape[-1]) * layer.units
    return 0


def count_macs(model) -> int:
    """Multiply-accumulates for one sample; FLOPs are about twice this."""
    return int(sum(layer_macs(layer) for layer in flat_layers(model)))
