"""The training recipe of one stage: optimizer, learning-rate schedule and augmentation, built from the ``train``
section (:class:`~kcompress.options.TrainOptions`), the stage's own learning rate and its length.

Every training stage builds one with :func:`recipe` (:func:`kcompress.train.fit` for the pipeline's train stage and
the pruning fine-tunes, the distiller, QAT), so they all train the same way:

- ``sgd``: Nesterov momentum; weight decay is L2 regularisation of the kernels (``wd * w`` added to their
  gradients, so it passes through the momentum, as PyTorch's ``SGD(weight_decay=wd)`` does). Gotcha: tf_keras's
  ``kernel_regularizer=l2(x)`` adds ``x * sum(w**2)`` to the loss, so its gradient is ``2x * w``: a hand-written
  recipe's "L2 5e-4" is ``wd = 1e-3`` here (the default, see :data:`kcompress.optionbase.SGD_WEIGHT_DECAY`).
  tf_keras's own ``weight_decay`` argument is *decoupled* (``w -= lr * wd * w`` after the step), about
  ``1 / (1 - momentum)`` = 10x weaker with momentum 0.9, so it is not used for sgd.
- ``adamw``: tf_keras's AdamW (decoupled decay), on the kernels only; ``adam``: L2 on the kernels, as for sgd.
- Kernels are the variables of rank 2 or more (conv, dense, depthwise); biases and BatchNorm are never decayed.
- ``cosine``: a linear warm-up from 0 over ``warmup_epochs``, then half a cosine from the rate to 0 at the
  stage's last step (:class:`WarmupCosine`); ``constant`` keeps the rate after the warm-up.

Gotcha: a model compiled with these objects saves to ``.keras`` and loads back inside kcompress (they are
registered serializable), but not from ``.h5`` nor with tf_keras alone; so :func:`kcompress.train.fit` and the
distiller re-compile the trained model with a plain Adam before returning it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from kcompress.backend import keras, tf
from kcompress.options import TrainOptions
from kcompress.types import LRSchedule, Optimizer

__all__ = ["Recipe", "recipe", "WarmupCosine", "L2SGD", "L2Adam", "KernelAdamW", "is_kernel"]


def is_kernel(variable) -> bool:
    """Weight decay applies to kernels (rank >= 2), never to biases or BatchNorm parameters."""
    return variable.shape.rank is not None and variable.shape.rank >= 2


@keras.utils.register_keras_serializable(package="kcompress")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """``lr(step)``: ``base * (step + 1) / warmup`` during the warm-up, then for ``cosine``
    ``base / 2 * (1 + cos(pi * (step - warmup) / (total - warmup)))`` (0 from step ``total`` on), for ``constant``
    ``base``. ``step`` is the optimizer's iteration count (0-based)."""

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine"):
        super().__init__()
        self.base_lr, self.total_steps, self.warmup_steps, self.kind = float(base_lr), int(total_steps), \
            int(warmup_steps), str(kind)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        base = tf.constant(self.base_lr, tf.float32)
        warm = float(max(1, self.warmup_steps))
        if self.kind == LRSchedule.COSINE:
            span = float(max(1, self.total_steps - self.warmup_steps))
            progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
            after = 0.5 * base * (1.0 + tf.cos(math.pi * progress))
        else:
            after = base
        if self.warmup_steps <= 0:
            return after
        return tf.where(step < self.warmup_steps, base * (step + 1.0) / warm, after)

    def get_config(self) -> dict:
        return {"base_lr": self.base_lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "kind": self.kind}


class _KernelL2:
    """Adds ``l2 * w`` to the gradient of every kernel before the optimizer's own step."""

    def update_step(self, gradient, variable):
        if self.l2 and is_kernel(variable) and not isinstance(gradient, tf.IndexedSlices):
            gradient = gradient + tf.cast(self.l2, variable.dtype) * variable
        return super().update_step(gradient, variable)

    def get_config(self):
        return {**super().get_config(), "l2": self.l2}


@keras.utils.register_keras_serializable(package="kcompress")
class L2SGD(_KernelL2, keras.optimizers.SGD):
    """SGD with L2 regularisation of the kernels (coupled: it passes through the momentum)."""

    def __init__(self, l2: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.l2 = float(l2)


@keras.utils.register_keras_serializable(package="kcompress")
class L2Adam(_KernelL2, keras.optimizers.Adam):
    """Adam with L2 regularisation of the kernels (through the adaptive step, unlike AdamW)."""

    def __init__(self, l2: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.l2 = float(l2)


@keras.utils.register_keras_serializable(package="kcompress")
class KernelAdamW(keras.optimizers.AdamW):
    """AdamW whose decoupled decay skips biases and BatchNorm parameters."""

    def _use_weight_decay(self, variable):
        return is_kernel(variable) and super()._use_weight_decay(variable)


@dataclass(frozen=True)
class Recipe:
    """One stage's optimizer, schedule and augmentation, resolved (see :func:`recipe`)."""

    optimizer: Optimizer
    lr: float
    momentum: float
    weight_decay: float
    schedule: LRSchedule
    warmup_steps: int
    total_steps: int
    augment: tuple  # resolved steps, () for none
    augment_reason: str

    def learning_rate(self):
        """A float for a constant rate without warm-up, else a :class:`WarmupCosine`."""
        if self.schedule == LRSchedule.CONSTANT and self.warmup_steps <= 0:
            return self.lr
        return WarmupCosine(self.lr, self.total_steps, self.warmup_steps, str(self.schedule))

    def make_optimizer(self):
        """A fresh optimizer (its own step counter: the schedule starts over)."""
        lr = self.learning_rate()
        if self.optimizer == Optimizer.SGD:
            return L2SGD(l2=self.weight_decay, learning_rate=lr, momentum=self.momentum, nesterov=self.momentum > 0)
        if self.optimizer == Optimizer.ADAMW:
            return KernelAdamW(learning_rate=lr, weight_decay=self.weight_decay)
        return L2Adam(l2=self.weight_decay, learning_rate=lr) if self.weight_decay else keras.optimizers.Adam(lr)

    def augmenter(self):
        """A :class:`kcompress.augment.BatchAugment`, or None without augmentation."""
        from kcompress.augment import BatchAugment

        return BatchAugment(self.augment) if self.augment else None

    @property
    def augment_text(self) -> str:
        return ",".join(n if v is None else f"{n}:{v:g}" for n, v in self.augment) or "none"

    def describe(self, augment: Optional[str] = None) -> str:
        """One line for the log: ``sgd (Nesterov 0.9, L2 1e-3) lr 0.05 cosine over 230 steps; augment none``
        (``augment`` replaces the augmentation's description)."""
        if self.optimizer == Optimizer.SGD:
            opt = f"sgd (Nesterov momentum {self.momentum:g}" + (f", L2 {self.weight_decay:g})"
                                                                 if self.weight_decay else ")")
        elif self.optimizer == Optimizer.ADAMW:
            opt = f"adamw (decoupled decay {self.weight_decay:g})"
        else:
            opt = "adam" + (f" (L2 {self.weight_decay:g})" if self.weight_decay else "")
        warm = f" after {self.warmup_steps} warm-up steps" if self.warmup_steps else ""
        sched = f"cosine to 0 over {self.total_steps} steps{warm}" if self.schedule == LRSchedule.COSINE else \
            f"constant{warm}"
        aug = augment or f"{self.augment_text} ({self.augment_reason})"
        return f"{opt}, lr {self.lr:g} {sched}; augment {aug}"

    def to_dict(self) -> dict[str, Any]:
        return {"optimizer": str(self.optimizer), "lr": self.lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "schedule": str(self.schedule), "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "augment": self.augment_text}


def recipe(options: Optional[TrainOptions], lr: float, epochs: float, steps_per_epoch: int, data=None,
           input_shape=None) -> Recipe:
    """The recipe of a stage that trains ``epochs`` epochs of ``steps_per_epoch`` steps at base rate ``lr``.

    ``data`` (the TRAIN DataSource) and ``input_shape`` (the model's, without the batch axis) resolve
    ``augment: auto``; see :func:`kcompress.augment.resolve_augment`."""
    from kcompress.augment import resolve_augment

    o = options or TrainOptions()
    total = max(1, int(round(epochs * steps_per_epoch)))
    warmup = min(total, int(round(o.warmup_epochs * steps_per_epoch)))
    steps, why = resolve_augment(o.augment, data, input_shape)
    return Recipe(o.optimizer, float(lr), o.momentum, o.decay, o.schedule, warmup, total, steps, why)
