"""Knowledge distillation: a frozen teacher trains a smaller student (Hinton et al. 2015).

The loss is ``alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))`` where ``t``
and ``s`` are the teacher's and student's logits. Models that end in softmax are handled by taking the log of their
probabilities: ``log softmax(z)`` differs from ``z`` by a per-row constant, which softmax ignores, so the soft targets
are exactly those of the logits (probabilities that underflow to 0 are floored at 1e-30 first).

- :class:`Distiller` is a ``tf_keras.Model`` with its own ``train_step``/``test_step``; the teacher is frozen and run
  with ``training=False`` (BatchNorm and Dropout in inference mode). Only the student's variables get gradients.
- :func:`distill` checks the teacher on VAL first, caches the teacher's outputs once when the data are not augmented
  (in memory, or in a ``.npy`` memmap on disk for large sets), trains with per-epoch checkpoints, resume, early
  stopping on VAL accuracy and the best epoch's weights, and returns the plain student in a :class:`DistillResult`.
  Optimizer, schedule and augmentation come from the ``train`` section (:mod:`kcompress.recipe`); with
  augmentation the teacher runs on each augmented batch, the very inputs the student sees ("consistent teaching"),
  and the cache is off. Which of the two ran, and why, is logged and kept in ``DistillResult.cache_reason``.
- :func:`derive_student` builds a narrower copy of the teacher's architecture (see :mod:`kcompress.students`).
- Gotcha: the cache holds the teacher's outputs for one fixed order of the training data; every epoch reshuffles
  (x, y, teacher output) together through a shuffle buffer, exactly as :func:`kcompress.train.fit` shuffles (x, y).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np

from kcompress.atomic import atomic_path, atomic_write_text
from kcompress.backend import keras, tf
from kcompress.batchnorm import RecalibrateBatchNorm, recalibrate_batchnorm
from kcompress.data import DataSource, check_fits
from kcompress.distillation.loss import Distiller, TemperatureSchedule, as_logits, check_compatible, distillation_loss
from kcompress.distillation.students import derive_student, make_student, outputs_probabilities
from kcompress.distributed import describe, shard_by_data
from kcompress.errors import KcompressError, UsageError
from kcompress.modelinfo import count_params, input_shape, num_classes
from kcompress.options import DistillOptions, TrainOptions
from kcompress.progress import progress
from kcompress.train import build_optimizer, copy_into_scope, epoch_rank, ranks_above, strategy

__all__ = [
    "DistillResult",
    "Distiller",
    "TemperatureSchedule",
    "distillation_loss",
    "derive_student",
    "outputs_probabilities",
    "check_compatible",
    "check_teacher",
    "cache_teacher_outputs",
    "distill",
    "weights_bytes",
    "size_warnings",
]

SHUFFLE_BUFFER = 4096
MEMORY_CACHE_LIMIT = 1 << 30  # bytes of teacher outputs kept in memory; larger caches go to a .npy memmap



def weights_bytes(model) -> int:
    """Bytes of the model's weights as stored (float32: 4 per parameter)."""
    return int(sum(int(np.prod(w.shape)) * w.dtype.size for w in model.weights))


# ----------------------------------------------------------------------------------------------------------- teacher


_TEACHER_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # teacher -> its traced logits function


def _teacher_fn(teacher):
    """One traced function per teacher (kept on the model, so repeated passes do not retrace)."""
    run = _TEACHER_FNS.get(teacher)
    if run is None:
        probs = outputs_probabilities(teacher)

        @tf.function(reduce_retracing=True)
        def run(x):
            return as_logits(teacher(x, training=False), probs)

        _TEACHER_FNS[teacher] = run
    return run


def _outputs_over(teacher, ds, n_rows: int, n_classes: int, desc: str, path: Optional[str] = None):
    """Teacher logits for every batch of ``ds`` in order, and the labels seen; memmap at ``path`` if given."""
    run = _teacher_fn(teacher)
    if path is not None:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_rows, n_classes))
    else:
        out = np.empty((n_rows, n_classes), np.float32)
    labels = np.empty(n_rows, np.int64)
    i = 0
    with progress(desc, total=n_rows) as bar:
        for x, y in ds:
            t = run(x).numpy()
            out[i : i + len(t)] = t
            labels[i : i + len(t)] = y.numpy()
            i += len(t)
            bar.advance(len(t))
    if path is not None:
        out.flush()
    return out[:i], labels[:i]


def check_teacher(teacher, val: DataSource, min_accuracy: Optional[float] = None, batch_size: int = 256):
    """Evaluates the teacher on ``val``; returns ``(accuracy, teacher_logits)`` or raises when it is too weak.

    Default floor: the majority-class share of ``val`` (chance) plus 10 points; ``min_accuracy`` replaces it.
    """
    shape = input_shape(teacher)
    logits, labels = _outputs_over(
        teacher, val.dataset(shape, batch_size=batch_size), val.num_samples, num_classes(teacher), "teacher on VAL"
    )
    acc = float(np.mean(logits.argmax(-1) == labels)) if len(labels) else 0.0
    chance = float(np.bincount(labels).max() / len(labels)) if len(labels) else 0.0
    floor = min(0.99, chance + 0.10) if min_accuracy is None else float(min_accuracy)
    if acc < floor:
        why = (
            f"below --min-teacher-accuracy {floor:.4f}"
            if min_accuracy is not None
            else f"not clearly better than chance ({chance:.4f}; needs {floor:.4f})"
        )
        raise KcompressError(
            f"the teacher's accuracy on {val.name} is {acc:.4f}, {why}; the student would inherit its errors "
            "(check the teacher, its preprocessing flags, or lower --min-teacher-accuracy)"
        )
    return acc, logits


def cache_teacher_outputs(teacher, train: DataSource, batch_size: int, seed: int, where: str = "auto",
                          cache_dir: Optional[str] = None):
    """Teacher logits for ``train`` in the seeded order that :func:`_train_dataset` streams; ``(array, kind)``."""
    shape = input_shape(teacher)
    n, c = train.num_samples, num_classes(teacher)
    if where == "auto":
        where = "memory" if n * c * 4 <= MEMORY_CACHE_LIMIT else "disk"
    path = None
    if where == "disk":
        cache_dir = cache_dir or tempfile.mkdtemp(prefix="kcompress-teacher-")
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, "teacher_logits.npy")
    ds = train.dataset(shape, batch_size=batch_size, shuffle=True, seed=seed)
    logits, _ = _outputs_over(teacher, ds, n, c, "teacher outputs (cache)", path)
    return logits, where


def _logits_batches(logits: np.ndarray, batch_size: int):
    """Batches of cached logits, read in order (a memmap is read slice by slice, never loaded whole)."""
    n, c = logits.shape
    if not isinstance(logits, np.memmap):
        return tf.data.Dataset.from_tensor_slices(logits).batch(batch_size)

    def gen():
        for start in range(0, n, batch_size):
            yield np.asarray(logits[start : start + batch_size])

    return tf.data.Dataset.from_generator(gen, output_signature=tf.TensorSpec((None, c), tf.float32))


def _train_dataset(train: DataSource, shape, batch_size: int, seed: int, logits=None,
                   augment: Optional[Callable] = None):
    ds = train.dataset(shape, batch_size=batch_size, shuffle=True, seed=seed)
    if logits is not None:
        ds = tf.data.Dataset.zip((ds, _logits_batches(logits, batch_size))).map(lambda xy, t: ((xy[0], t), xy[1]))
    ds = ds.unbatch().shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    from kcompress.augment import augment_batches

    return augment_batches(ds, augment, seed).prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class DistillResult:
    """What :func:`distill` returns. ``student`` is a plain Keras model (the best epoch's weights)."""

    student: object = field(repr=False)
    teacher_params: int
    student_params: int
    teacher_bytes: int
    student_bytes: int
    teacher_accuracy: float
    student_accuracy: Optional[float]
    best_epoch: Optional[int]  # 1-based
    history: tuple  # one dict per epoch: loss, student_ce, distill_kl, accuracy, val_*, temperature, seconds
    cache: str  # "memory", "disk" or "off"
    cache_seconds: float
    warnings: tuple = ()
    keras3: bool = False  # the teacher came as Keras 3: save() writes a Keras 3 .keras file
    checkpoint_dir: Optional[str] = None
    max_drop: Optional[float] = None  # the largest drop (points) below the teacher the user accepts
    test: Optional[dict] = None  # teacher_accuracy / student_accuracy on TEST (chose nothing), when given
    cache_reason: str = ""  # why the teacher's outputs were cached, or why the teacher ran on every batch
    recipe: Optional[dict] = None  # optimizer, schedule and augmentation as run (kcompress.recipe.Recipe.to_dict)

    @property
    def size_ratio(self) -> float:
        return self.student_bytes / self.teacher_bytes

    @property
    def drop_points(self) -> Optional[float]:
        """Teacher minus student accuracy on VAL, in points (None without VAL)."""
        if self.student_accuracy is None:
            return None
        return 100 * (self.teacher_accuracy - self.student_accuracy)

    @property
    def within_max_drop(self) -> bool:
        return self.max_drop is None or self.drop_points is None or self.drop_points <= self.max_drop

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "student"}
        d["history"] = list(self.history)
        d["warnings"] = list(self.warnings)
        d["size_ratio"] = self.size_ratio
        d["drop_points"] = self.drop_points
        return d

    def save(self, path: str, overwrite: bool = False) -> str:
        """Writes the student (Keras 3 ``.keras`` when the teacher was Keras 3, else by extension)."""
        from kcompress.io import save_model

        save_model(self.student, path, overwrite=overwrite, keras3=self.keras3 and path.endswith(".keras"))
        return path

    def discard_checkpoints(self) -> None:
        """Removes the per-epoch checkpoints (once the student is saved, they are no longer needed)."""
        if self.checkpoint_dir:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)


def size_warnings(teacher_bytes: int, student_bytes: int) -> list[str]:
    ratio = student_bytes / max(1, teacher_bytes)
    if ratio > 0.5:
        return [f"the student is {100 * ratio:.0f}% of the teacher's size: little compression"]
    if ratio < 0.05:
        return [f"the student is only {100 * ratio:.1f}% of the teacher's size: expect an accuracy floor"]
    return []


class _EpochState(keras.callbacks.Callback):
    """Temperature schedule, epoch timing, best-epoch tracking, early stopping and per-epoch checkpoints."""

    def __init__(self, distiller, schedule, epochs, monitor, patience, ckpt_dir, fingerprint, state=None):
        super().__init__()
        self.d, self.schedule, self.epochs, self.monitor, self.patience = distiller, schedule, epochs, monitor, patience
        self.ckpt_dir, self.fingerprint = ckpt_dir, fingerprint
        state = state or {}
        self.history = list(state.get("history", []))
        self.best = state.get("best", -1.0)
        self.best_loss = state.get("best_loss", float("inf"))  # breaks ties of ``best`` (epoch_rank)
        self.best_epoch = state.get("best_epoch")
        self.wait = state.get("wait", 0)
        self.best_weights = None
        self.stopped_early = False
        if ckpt_dir:
            self.ckpt = tf.train.Checkpoint(student=distiller.student, optimizer=distiller.optimizer)
            self.manager = tf.train.CheckpointManager(self.ckpt, os.path.join(ckpt_dir, "last"), max_to_keep=1)

    def on_epoch_begin(self, epoch, logs=None):
        self.d.temperature.assign(self.schedule(epoch, self.epochs))
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        row = {k: float(v) for k, v in (logs or {}).items()}
        row.update(epoch=epoch + 1, temperature=float(self.d.temperature.numpy()),
                   seconds=time.perf_counter() - self._t0)
        self.history.append(row)
        rank = epoch_rank(row, self.monitor)
        if ranks_above(rank, (self.best, -self.best_loss)):
            self.best, self.best_loss, self.best_epoch, self.wait = rank[0], -rank[1], epoch + 1, 0
            self.best_weights = self.d.student.get_weights()
            if self.ckpt_dir:
                with atomic_path(os.path.join(self.ckpt_dir, "best.weights.h5"), overwrite=True) as tmp:
                    self.d.student.save_weights(tmp)
        else:
            self.wait += 1
            if self.patience is not None and self.wait >= self.patience:
                self.model.stop_training = True
                self.stopped_early = True
        if self.ckpt_dir:
            self.manager.save(checkpoint_number=epoch + 1)
            state = {"epochs_done": epoch + 1, "history": self.history, "best": self.best, "best_loss": self.best_loss,
                     "best_epoch": self.best_epoch, "wait": self.wait, "fingerprint": self.fingerprint,
                     "stopped_early": self.stopped_early}
            atomic_write_text(os.path.join(self.ckpt_dir, "state.json"), json.dumps(state, indent=1), overwrite=True)


def _load_state(ckpt_dir: Optional[str], resume: bool, fingerprint: dict) -> Optional[dict]:
    if not ckpt_dir:
        if resume:
            raise UsageError("--resume needs a checkpoint folder")
        return None
    path = os.path.join(ckpt_dir, "state.json")
    if not os.path.exists(path):
        return None
    if not resume:
        raise KcompressError(
            f"{ckpt_dir} holds checkpoints of an earlier run; pass --resume to continue it, or --overwrite to start over"
        )
    with open(path) as f:
        state = json.load(f)
    diff = {k: (state["fingerprint"].get(k), v) for k, v in fingerprint.items() if state["fingerprint"].get(k) != v}
    if diff:
        first = ", ".join(f"{k}: was {a}, now {b}" for k, (a, b) in list(diff.items())[:3])
        raise KcompressError(f"cannot resume from {ckpt_dir}: the run's settings differ ({first})")
    return state


def distill(
    teacher,
    student: Union[object, float],
    train: DataSource,
    val: Optional[DataSource] = None,
    options: Optional[DistillOptions] = None,
    seed: int = 0,
    checkpoint_dir: Optional[str] = None,
    resume: bool = False,
    augment: Optional[Callable] = None,
    callbacks=(),
    verbose: Optional[int] = None,
    train_options: Optional[TrainOptions] = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> DistillResult:
    """Distills ``teacher`` into ``student`` (a Keras model, or a width multiplier for :func:`make_student`;
    None: ``options.student_width``). ``options.student`` (a path) is the API's and CLI's business, not read here.

    Without ``val`` the teacher is checked on ``train`` and the best epoch is chosen by training accuracy.
    ``checkpoint_dir``: per-epoch checkpoints and ``state.json``; ``resume`` continues from them. ``augment``
    (a function on a batch of inputs) replaces ``train_options.augment``; augmentation turns the teacher cache off:
    the teacher then sees the augmented batch. ``train_options``: optimizer, schedule, augmentation (the ``train``
    section); ``log`` receives the recipe and the cache decision.
    """
    from kcompress.recipe import recipe

    options = options or DistillOptions()
    if student is None:
        student = options.student_width
    shape = input_shape(teacher)
    n_classes = num_classes(teacher)
    train_options = train_options or TrainOptions()
    yields = options.cache_teacher in ("memory", "disk") and train_options.augment_steps == (("auto", None),)
    if yields:  # auto yields to the cache the user asked for
        train_options = train_options.replace(augment=("none",))
    lr = options.rate(train_options.optimizer)
    rec = recipe(train_options, lr, options.epochs, -(-train.num_samples // options.batch_size), train, shape)
    if yields:
        rec = dataclasses.replace(rec, augment_reason=f"auto: none, as cache_teacher is {options.cache_teacher}")
    custom = augment is not None
    aug_text = "a custom function" if custom else rec.augment_text
    augment = augment if custom else rec.augmenter()
    where, cache_reason = _cache_plan(options.cache_teacher, augment, aug_text)
    keras.utils.set_random_seed(seed)
    if isinstance(student, (int, float)) and not isinstance(student, bool):
        student = make_student(teacher, float(student), options.student_init, log=log)
    # variables must be created in the strategy's scope: a copy of the student trains there (its weights are copied
    # back at the end, so the student returned is a plain model); so does the teacher when it runs every step
    strat = strategy(train_options.strategy)  # the process's one strategy (kcompress.distributed)
    log(f"training {options.epochs} epoch(s): {rec.describe(augment=aug_text if custom else None)}"
        f"{describe(strat, options.batch_size)}")
    given, student = student, copy_into_scope(student, strat)
    if where == "off":
        teacher = copy_into_scope(teacher, strat)
    check_compatible(teacher, student)
    for data in (train, val):
        if data is not None:
            check_fits(data, shape, n_classes)

    teacher_acc, val_logits = check_teacher(teacher, val if val is not None else train, options.min_teacher_accuracy)

    fingerprint = {"teacher_params": count_params(teacher)["total"], "student_params": count_params(student)["total"],
                   "alpha": options.alpha, "schedule": str(TemperatureSchedule.parse(options.temperature_schedule,
                                                                                      options.temperature)),
                   "batch_size": options.batch_size, "lr": lr, "seed": seed,
                   "train_samples": train.num_samples,  # more epochs may resume: the schedule then stretches
                   "recipe": {**{k: v for k, v in rec.to_dict().items() if k != "total_steps"}, "augment": aug_text}}
    if options.student_init != "scratch":  # (absent for scratch: earlier checkpoints stay valid)
        fingerprint["student_init"] = str(options.student_init)
    if checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)
    state = _load_state(checkpoint_dir, resume, fingerprint)

    t0 = time.perf_counter()
    logits = None
    temp_cache = None
    if where != "off":
        cache_dir = os.path.join(checkpoint_dir, "cache") if checkpoint_dir else None
        if cache_dir is None:
            cache_dir = temp_cache = tempfile.mkdtemp(prefix="kcompress-teacher-")
        logits, where = cache_teacher_outputs(teacher, train, options.batch_size, seed, where, cache_dir)
        cache_reason = cache_reason.format(where=where)
    cache_seconds = time.perf_counter() - t0
    log(f"teacher outputs: {cache_reason}")
    train_ds = shard_by_data(_train_dataset(train, shape, options.batch_size, seed, logits, augment))
    val_ds = None
    if val is not None:
        vy = tf.data.Dataset.from_tensor_slices(val_logits).batch(256)
        # the teacher's VAL outputs from the check above serve every epoch (VAL is never augmented)
        val_ds = shard_by_data(tf.data.Dataset.zip((val.dataset(shape, batch_size=256), vy))
                               .map(lambda xy, t: ((xy[0], t), xy[1])))

    # the Distiller freezes the teacher for training; the caller's model is given back with its own flag
    teacher_trainable = teacher.trainable
    try:
        schedule = TemperatureSchedule.parse(options.temperature_schedule, options.temperature)
        with strat.scope():
            distiller = Distiller(student, teacher, options.alpha, schedule(0, options.epochs))
            distiller.compile(optimizer=rec.make_optimizer())
            build_optimizer(distiller.optimizer, student.trainable_variables)  # the step is traced once
        monitor = "val_accuracy" if val is not None else "accuracy"
        cb = _EpochState(distiller, schedule, options.epochs, monitor, options.patience, checkpoint_dir, fingerprint,
                         state)
        initial_epoch = 0
        if state is not None:
            initial_epoch = int(state["epochs_done"])
            cb.ckpt.restore(cb.manager.latest_checkpoint).expect_partial()
            best_path = os.path.join(checkpoint_dir, "best.weights.h5")
            if os.path.exists(best_path):
                keep = student.get_weights()
                student.load_weights(best_path)
                cb.best_weights = student.get_weights()
                student.set_weights(keep)
            if state.get("stopped_early"):
                initial_epoch = options.epochs

        verbose = verbose if verbose is not None else (1 if sys.stderr.isatty() else 2)
        if initial_epoch < options.epochs:
            # BN statistics re-estimated on TRAIN before each VAL pass (AdaBN): a student trained for a few epochs
            # otherwise validates with moving averages that trail its weights (see kcompress.batchnorm)
            recal = [RecalibrateBatchNorm(train, model_to_update=student, seed=seed)] if val is not None else []
            distiller.fit(train_ds, validation_data=val_ds, epochs=options.epochs, initial_epoch=initial_epoch,
                          verbose=verbose, callbacks=[*recal, cb, *callbacks])
    finally:
        teacher.trainable = teacher_trainable
        if temp_cache:
            del train_ds, logits
            shutil.rmtree(temp_cache, ignore_errors=True)
    if cb.best_weights is not None:
        student.set_weights(cb.best_weights)
    if student is not given:  # trained as a copy in the strategy's scope
        given.set_weights(student.get_weights())
        student = given
    if val is None:  # no VAL pass recalibrated the statistics: do it once, on the weights kept
        recalibrate_batchnorm(student, train, seed=seed)
    best_row = next((h for h in cb.history if h["epoch"] == cb.best_epoch), None)
    student_acc = best_row.get("val_accuracy") if (best_row and val is not None) else None

    from kcompress.train import compile_classifier

    compile_classifier(student, lr)  # a plain Adam: the saved student evaluates right after loading, in tf_keras
    t_bytes, s_bytes = weights_bytes(teacher), weights_bytes(student)
    return DistillResult(
        student=student,
        teacher_params=count_params(teacher)["total"],
        student_params=count_params(student)["total"],
        teacher_bytes=t_bytes,
        student_bytes=s_bytes,
        teacher_accuracy=teacher_acc,
        student_accuracy=student_acc,
        best_epoch=cb.best_epoch,
        history=tuple(cb.history),
        cache=where,
        cache_seconds=cache_seconds,
        warnings=tuple(size_warnings(t_bytes, s_bytes)),
        cache_reason=cache_reason,
        recipe={**rec.to_dict(), "augment": aug_text},
    )


def _cache_plan(cache_teacher: str, augment, aug_text: str) -> tuple[str, str]:
    """``(where, why)``: the cache setting to use (auto, memory, disk, off) and a sentence for the log."""
    if augment is not None:
        if cache_teacher in ("memory", "disk"):
            raise UsageError(f"augmented data ({aug_text}) cannot use cached teacher outputs: the teacher must see "
                             "each augmented batch (set train.augment none, or cache_teacher auto/off)")
        return "off", (f"the teacher runs on every augmented batch ({aug_text}), so it teaches on exactly what the "
                       "student sees; no cache")
    if cache_teacher == "off":
        return "off", "the teacher runs on every batch (cache_teacher off)"
    return cache_teacher, ("cached once, in {where}: without augmentation the teacher sees the same inputs every "
                           "epoch")
