"""BatchNorm recalibration (AdaBN): re-estimate every BatchNormalization layer's moving statistics from data.

Why: a network evaluates with its BN layers' *moving* mean and variance, which trail the weights by about
``1 / (1 - momentum)`` steps (100 with Keras's default 0.99). After a short training (a student trained for a few
epochs on a small set), after channel surgery, or after a fine-tune, they describe a network that no longer exists,
and validation accuracy collapses while training accuracy (batch statistics) climbs. Re-estimating them on a pass of
training data costs one forward pass of a few thousand samples and changes no weight.

How: the moving statistics are reset and each BN layer's momentum is set so that batch ``k`` is averaged in with
weight ``1/k`` (an exact mean over the pass, as PyTorch's ``update_bn`` does); the forward passes run eagerly in
training mode, so the momentum is read at each call. Layers inside nested models and inside pruning wrappers count.
"""

from __future__ import annotations

from typing import Optional

from kcompress.backend import keras, tf
from kcompress.data import DataSource
from kcompress.modelinfo import flat_layers, input_shape

__all__ = ["batchnorm_layers", "recalibrate_batchnorm", "RecalibrateBatchNorm"]


def batchnorm_layers(model) -> list:
    """Every BatchNormalization layer of ``model`` (nested models and wrappers included), in layer order."""
    out = []
    for layer in flat_layers(model):
        inner = getattr(layer, "layer", layer)  # tfmot pruning/quantization wrappers
        if isinstance(inner, keras.layers.BatchNormalization) and inner.trainable is not None:
            out.append(inner)
    return out


def recalibrate_batchnorm(model, data: DataSource, samples: int = 2048, batch_size: int = 128, seed: int = 0,
                          training_model=None) -> int:
    """Re-estimates the moving mean and variance of every BN layer of ``model`` on a stratified, seeded sample of
    ``samples`` from ``data``. Returns how many layers were recalibrated (0: the model has no BatchNorm, nothing runs).

    ``training_model``: what to call to run ``model`` forward (default ``model``), e.g. a pruning wrapper model.
    Weights and trainable state are untouched; frozen BN layers (``trainable=False``) are recalibrated too, since
    their statistics describe the current weights only after the pass."""
    bns = batchnorm_layers(model)
    if not bns:
        return 0
    saved = [(bn.momentum, bn.trainable) for bn in bns]
    for bn in bns:
        bn.moving_mean.assign(tf.zeros_like(bn.moving_mean))
        bn.moving_variance.assign(tf.ones_like(bn.moving_variance))
        bn.trainable = True  # a frozen BN layer runs in inference mode even with training=True
    net = training_model or model
    try:
        sample = data.dataset(input_shape(model), batch_size=batch_size, limit=min(samples, data.num_samples),
                              seed=seed)  # stratified, seeded
        for k, (x, _) in enumerate(sample, start=1):
            for bn in bns:
                bn.momentum = (k - 1) / k  # moving = (k-1)/k * moving + 1/k * batch: the running mean of batches
            net(x, training=True)
    finally:
        for bn, (momentum, trainable) in zip(bns, saved):
            bn.momentum, bn.trainable = momentum, trainable
    return len(bns)


class RecalibrateBatchNorm(keras.callbacks.Callback):
    """Recalibrates BN statistics right before each validation pass of ``fit`` (``on_test_begin``), so VAL
    accuracy, and the best epoch it chooses, are those of the weights as trained, not of lagging statistics.

    ``model_to_update``: the network whose BN layers to recalibrate (default: the model being fitted); for a
    distiller, its student."""

    def __init__(self, data: DataSource, model_to_update=None, samples: int = 2048, batch_size: int = 128,
                 seed: int = 0):
        super().__init__()
        self.data, self.target, self.samples, self.batch_size, self.seed = data, model_to_update, samples, \
            batch_size, seed
        self.layers: Optional[int] = None

    def on_test_begin(self, logs=None):
        target = self.target if self.target is not None else self.model
        self.layers = recalibrate_batchnorm(target, self.data, self.samples, self.batch_size, self.seed)
