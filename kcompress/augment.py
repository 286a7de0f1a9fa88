"""Augmentation of TRAIN batches, on the fly in ``tf.data``, shared by every training stage.

The steps come from ``train.augment`` (parsed by :func:`kcompress.options.parse_augment`) and run in the order
given, on float batches ``[B, H, W, C]`` after preprocessing:

- ``flip``: each image mirrored left-right with probability 1/2;
- ``crop:PAD``: each image reflect-padded by PAD pixels on every side, then a random HxW window kept (a shift of
  up to PAD pixels, the border filled by reflection, as in the usual CIFAR recipe);
- ``rotate:DEG``: each image rotated by a random angle in [-DEG, DEG] (bilinear, border filled by reflection).

``auto`` is resolved against the data by :func:`resolve_augment`: flip and crop:4 for an image folder whose images
are fed at 16x16 or more, nothing for arrays (``.npz``, built-in digits: a mirrored digit is another glyph).

Randomness is seeded: :meth:`BatchAugment.dataset` draws one seed per batch from ``tf.data.Dataset.random(seed)``
(a fresh stream each epoch) and every step uses stateless random ops, so a run is reproducible from its seed.
VAL and TEST are never augmented.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

from kcompress.backend import tf
from kcompress.errors import UsageError
from kcompress.options import parse_augment

__all__ = ["BatchAugment", "resolve_augment", "augment_batches", "MIN_AUTO_SIZE"]

MIN_AUTO_SIZE = 16  # auto augments image folders fed at HxW of at least this


def _image_hw(input_shape: Optional[Sequence[Optional[int]]]) -> Optional[tuple[int, int]]:
    shape = tuple(input_shape or ())
    if len(shape) != 3 or shape[0] is None or shape[1] is None:
        return None
    return int(shape[0]), int(shape[1])


def resolve_augment(spec: Any, data=None, input_shape=None) -> tuple[tuple[tuple[str, Any], ...], str]:
    """``(steps, reason)``: the parsed ``spec`` with ``auto`` resolved for ``data`` (a DataSource) fed at
    ``input_shape`` (the model's, without the batch axis); ``reason`` says why, for the log.

    Raises a UsageError when explicit steps cannot apply (inputs that are not HxWxC images, a crop wider than the
    image)."""
    steps = parse_augment(spec)
    hw = _image_hw(input_shape)
    if steps == (("auto", None),):
        kind = getattr(data, "kind", None)
        if kind == "folder" and hw is not None and min(hw) >= MIN_AUTO_SIZE:
            return (("flip", None), ("crop", 4)), f"auto: an image folder fed at {hw[0]}x{hw[1]}"
        why = ("images smaller than 16x16" if kind == "folder" and hw is not None else
               "inputs that are not images" if hw is None else "array data (.npz or built-in; a flip can change "
               "the class of digits or text)")
        return (), f"auto: none for {why}"
    if not steps:
        return (), "none"
    if hw is None:
        raise UsageError(f"augmentation {_text(steps)} needs image inputs (H, W, C); the model takes "
                         f"{tuple(input_shape or ())}")
    for name, value in steps:
        if name == "crop" and value >= min(hw):
            raise UsageError(f"augmentation crop:{value} needs images larger than {value} pixels (they are "
                             f"{hw[0]}x{hw[1]})")
    return steps, "as given"


def _text(steps) -> str:
    return ",".join(name if value is None else f"{name}:{value:g}" for name, value in steps) or "none"


def _flip(x, seed):
    coin = tf.random.stateless_uniform(tf.shape(x)[:1], seed) < 0.5
    return tf.where(coin[:, None, None, None], tf.reverse(x, axis=[2]), x)


def _crop(x, seed, pad: int):
    shape = tf.shape(x)
    b, h, w = shape[0], shape[1], shape[2]
    padded = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    offsets = tf.random.stateless_uniform((b, 2), seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(h)[None, :]  # [B, H]: the window's rows in the padded image
    cols = offsets[:, 1:] + tf.range(w)[None, :]
    out = tf.gather(padded, rows, axis=1, batch_dims=1)  # [B, H, W + 2 PAD, C]
    return tf.gather(out, cols, axis=2, batch_dims=1)


def _rotate(x, seed, degrees: float):
    shape = tf.shape(x)
    b, h, w = shape[0], tf.cast(shape[1], tf.float32), shape[2]
    w_f = tf.cast(w, tf.float32)
    limit = degrees * math.pi / 180.0
    angle = tf.random.stateless_uniform((b,), seed, minval=-limit, maxval=limit)
    cos, sin = tf.cos(angle), tf.sin(angle)
    # output pixel (x, y) reads input pixel (a0 x + a1 y + a2, b0 x + b1 y + b2): a rotation about the centre
    cx, cy = (w_f - 1) / 2, (h - 1) / 2
    zeros = tf.zeros_like(cos)
    transforms = tf.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, zeros, zeros],
                          axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(images=x, transforms=transforms, output_shape=shape[1:3],
                                                 fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")


class BatchAugment:
    """A batch function built from parsed steps: ``aug(x, seed)`` with ``x`` float ``[B, H, W, C]`` and ``seed``
    an int ``[2]`` tensor (stateless randomness); ``seed=None`` draws one (tests, interactive use)."""

    def __init__(self, steps: Sequence[tuple[str, Any]]):
        self.steps = tuple(steps)
        if not self.steps or any(name not in ("flip", "crop", "rotate") for name, _ in self.steps):
            raise ValueError(f"BatchAugment needs resolved steps, got {self.steps!r}")

    def __repr__(self) -> str:
        return f"BatchAugment({_text(self.steps)})"

    @property
    def text(self) -> str:
        return _text(self.steps)

    def __call__(self, x, seed=None):
        x = tf.convert_to_tensor(x, tf.float32)
        if seed is None:
            seed = tf.random.uniform((2,), maxval=2**31 - 1, dtype=tf.int64)
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=len(self.steps))
        for (name, value), s in zip(self.steps, tf.unstack(seeds)):
            if name == "flip":
                x = _flip(x, s)
            elif name == "crop":
                x = _crop(x, s, int(value))
            else:
                x = _rotate(x, s, float(value))
        return x

    def dataset(self, ds, seed: int = 0):
        """``ds`` of ``(x, y)`` batches, with ``x`` augmented (one seed per batch, a new stream each epoch)."""
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2, drop_remainder=True)
        return tf.data.Dataset.zip((ds, seeds)).map(lambda xy, s: (self(xy[0], s), xy[1]),
                                                      num_parallel_calls=tf.data.AUTOTUNE)


def augment_batches(ds, augment: Optional[Union[BatchAugment, Callable]], seed: int = 0):
    """``ds`` of ``(x, y)`` batches with ``augment`` applied to ``x``: a :class:`BatchAugment` (seeded) or any
    function of a batch of inputs; None leaves ``ds`` as it is."""
    if augment is None:
        return ds
    if isinstance(augment, BatchAugment):
        return augment.dataset(ds, seed)
    return ds.map(lambda x, y: (augment(x), y), num_parallel_calls=tf.data.AUTOTUNE)
