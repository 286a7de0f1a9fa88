"""The distillation loss, the temperature schedule and the Distiller model (a custom ``train_step``).

The loss is ``alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))``. Models that
end in softmax are handled by taking the log of their probabilities (floored at 1e-30): ``log softmax(z)`` differs
from ``z`` by a per-row constant, which softmax ignores, so the soft targets are exactly those of the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from kcompress.backend import keras, tf
from kcompress.distillation.students import outputs_probabilities
from kcompress.errors import KcompressError, UsageError
from kcompress.modelinfo import input_shape, num_classes
from kcompress.options import parse_temperature_schedule

__all__ = ["distillation_loss", "TemperatureSchedule", "Distiller", "as_logits", "check_compatible"]

FLOOR = 1e-30

# ----------------------------------------------------------------------------------------------------------- loss


def as_logits(out, is_probabilities: bool):
    return tf.math.log(tf.maximum(out, FLOOR)) if is_probabilities else out


def distillation_loss(y, student_out, teacher_logits, temperature, alpha, student_probabilities: bool = False):
    """``(ce, kl, total)``, each the batch mean.

    ``teacher_logits`` are logits or log-probabilities; ``student_out`` is logits, or probabilities when
    ``student_probabilities``. ``kl`` is ``KL(softmax(t/T) || softmax(s/T))`` without the ``T^2`` factor;
    ``total = alpha * ce + (1 - alpha) * T^2 * kl``.
    """
    temperature = tf.cast(temperature, tf.float32)
    ce = tf.reduce_mean(
        keras.losses.sparse_categorical_crossentropy(y, student_out, from_logits=not student_probabilities)
    )
    s = as_logits(tf.cast(student_out, tf.float32), student_probabilities)
    log_pt = tf.nn.log_softmax(tf.cast(teacher_logits, tf.float32) / temperature, axis=-1)
    log_ps = tf.nn.log_softmax(s / temperature, axis=-1)
    kl = tf.reduce_mean(tf.reduce_sum(tf.exp(log_pt) * (log_pt - log_ps), axis=-1))
    total = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return ce, kl, total


# ----------------------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class TemperatureSchedule:
    """``constant`` (the --temperature), ``linear:HIGH:LOW`` or ``cosine:HIGH:LOW`` across the epochs."""

    kind: str = "constant"
    start: float = 4.0
    end: float = 4.0

    @classmethod
    def parse(cls, spec: Optional[str], temperature: float = 4.0) -> "TemperatureSchedule":
        try:
            return cls(*parse_temperature_schedule(spec, temperature))
        except ValueError as e:
            raise UsageError(f"--temperature-schedule {e}") from None

    def __call__(self, epoch: int, epochs: int) -> float:
        if self.kind == "constant" or epochs <= 1:
            return self.start
        f = min(1.0, epoch / (epochs - 1))
        if self.kind == "cosine":
            f = 0.5 * (1 - math.cos(math.pi * f))
        return self.start + (self.end - self.start) * f

    def __str__(self) -> str:
        return f"constant:{self.start:g}" if self.kind == "constant" else f"{self.kind}:{self.start:g}:{self.end:g}"


# ----------------------------------------------------------------------------------------------------------- model


class Distiller(keras.Model):
    """Trains ``student`` against a frozen ``teacher``; ``call`` is the student's forward pass.

    Batches are ``(x, y)`` (the teacher runs on the fly) or ``((x, teacher_logits), y)`` (cached; not a 3-tuple,
    which Keras would read as sample weights). Metrics: ``loss``,
    ``student_ce``, ``distill_kl`` (without ``T^2``) and ``accuracy``; with validation data also ``val_*``.
    ``temperature`` is a non-trainable variable that a schedule may change between epochs.
    """

    def __init__(self, student, teacher, alpha: float = 0.5, temperature: float = 4.0, **kwargs):
        super().__init__(name=kwargs.pop("name", "distiller"), **kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise UsageError(f"alpha must be between 0 and 1, got {alpha}")
        check_compatible(teacher, student)
        if not student.trainable_variables:
            raise KcompressError("the student has no trainable weights (all its layers are frozen)")
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.alpha = float(alpha)
        self.temperature = tf.Variable(float(temperature), trainable=False, dtype=tf.float32, name="temperature")
        self.student_probabilities = outputs_probabilities(student)
        self.teacher_probabilities = outputs_probabilities(teacher)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.ce_tracker = keras.metrics.Mean(name="student_ce")
        self.kl_tracker = keras.metrics.Mean(name="distill_kl")
        self.acc_metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    @property
    def metrics(self):
        return [self.loss_tracker, self.ce_tracker, self.kl_tracker, self.acc_metric]

    def call(self, x, training=False):
        return self.student(x, training=training)

    def teacher_logits(self, x):
        return as_logits(self.teacher(x, training=False), self.teacher_probabilities)

    def _unpack(self, data):
        x, y = data
        if isinstance(x, (tuple, list)):
            x, t = x
        else:
            t = self.teacher_logits(x)
        return x, y, tf.stop_gradient(t)

    def _update(self, y, out, ce, kl, total):
        self.loss_tracker.update_state(total)
        self.ce_tracker.update_state(ce)
        self.kl_tracker.update_state(kl)
        self.acc_metric.update_state(y, out)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        x, y, t = self._unpack(data)
        with tf.GradientTape() as tape:
            out = self.student(x, training=True)
            ce, kl, total = distillation_loss(y, out, t, self.temperature, self.alpha, self.student_probabilities)
            loss = total
            if self.student.losses:
                loss = loss + tf.add_n(self.student.losses)
            # gradients are summed across replicas, so each replica contributes its share of the mean
            loss = loss / tf.distribute.get_strategy().num_replicas_in_sync
        variables = self.student.trainable_variables
        grads = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        return self._update(y, out, ce, kl, total)

    def test_step(self, data):
        x, y, t = self._unpack(data)
        out = self.student(x, training=False)
        ce, kl, total = distillation_loss(y, out, t, self.temperature, self.alpha, self.student_probabilities)
        return self._update(y, out, ce, kl, total)


def check_compatible(teacher, student) -> None:
    """Same input shape and class count, or a clear error."""
    ts, ss = input_shape(teacher), input_shape(student)
    if len(ts) != len(ss) or any(a is not None and b is not None and a != b for a, b in zip(ts, ss)):
        raise KcompressError(f"teacher and student take different inputs: teacher {ts}, student {ss}")
    tc, sc = num_classes(teacher), num_classes(student)
    if tc != sc:
        raise KcompressError(f"teacher and student predict different numbers of classes: teacher {tc}, student {sc}")

