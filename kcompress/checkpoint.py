"""Per-epoch checkpoints of a training loop and resume after a kill (QAT, structured-pruning rounds, training).

A checkpoint folder holds ``state.json`` (what is done, the settings it was made with, the best epoch so far) and
``epoch-N/`` folders (the model's variables and the optimizer's, a ``tf.train.Checkpoint``). Each epoch folder is
written with the atomic writer and ``state.json`` is written after it, naming it: a kill at any point leaves the
previous epoch's state and folder whole (a newer, unnamed folder is never read). Older folders are removed after
``state.json`` names the new one, except the best epoch's.

:func:`read_state` decides whether a folder may be continued: its fingerprint (the settings a result depends on:
the input model's weights, the data, the options, the seed) must equal this run's, else the resume is refused with
one line naming the first differences (:class:`StaleCheckpoint`); the pipeline runner instead deletes the
folder of a stage whose settings changed and starts it over. :func:`fit_resumable` is
:func:`kcompress.train.fit` with these checkpoints.

Gotchas:

- A resumed fit continues at the next epoch with the restored weights and optimizer state (so the learning-rate
  schedule carries on); each epoch's data order and augmentation are an uninterrupted run's. Dropout masks are
  not: tf_keras draws them from stateful random ops whose state is no variable and starts over in a new process.
  Measured on digits: without dropout, a fine-tune (QAT or a pruning round's) resumed after epoch 1 ends within
  1e-4 of an uninterrupted run's weights; with dropout, at the same accuracy within a point but other weights.
  Resuming at a round boundary (a fresh fine-tune) is exact.
- The best epoch (by ``val_accuracy``) counts the epochs before the kill: its weights are restored from its
  folder at the end, as ``fit``'s early stopping does within one process.
- Checkpoints hold variables, not architectures: the caller rebuilds the same model (QAT: the same QAT model;
  pruning: the saved architecture, see :func:`save_architecture`) before resuming.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Optional

import numpy as np

from kcompress.atomic import atomic_path, atomic_write_text
from kcompress.backend import keras, tf
from kcompress.errors import KcompressError, UsageError

__all__ = ["STATE_FILE", "StaleCheckpoint", "weights_fingerprint", "data_identity", "read_state", "write_state",
           "EpochCheckpoint", "fit_resumable", "save_architecture", "load_architecture"]

STATE_FILE = "state.json"


class StaleCheckpoint(KcompressError):
    """A resume was asked for, but the checkpoint was made with other settings (or is unreadable)."""


def weights_fingerprint(model) -> str:
    """A hash of the model's layers (names, classes) and their weights' shapes and bytes. Variable names are left
    out: TensorFlow makes them unique per process (``conv1_2/kernel``), so a model and its saved copy differ there."""
    h = hashlib.sha256()
    for layer in model.layers:
        h.update(f"{layer.name}:{type(layer).__name__}\0".encode())
        for w in layer.weights:
            value = np.ascontiguousarray(w.numpy())
            h.update(f"{value.shape}{value.dtype}\0".encode() + value.tobytes())
    return h.hexdigest()[:16]


def data_identity(data) -> Optional[dict]:
    """What a data source contributes to a fingerprint: its samples' hash and its preprocessing."""
    if data is None:
        return None
    pre = getattr(data, "preprocess", None)
    return {"samples": data.fingerprint(), "preprocess": pre.to_dict() if hasattr(pre, "to_dict") else repr(pre)}


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def read_state(ckpt_dir: Optional[str], resume: bool, fingerprint: dict, what: str = "run") -> Optional[dict]:
    """The state to continue from ``ckpt_dir`` (created if missing), or None to start afresh.

    Without ``resume``, an earlier run's checkpoints are an error (pass ``--resume`` or ``--overwrite``); with it,
    a state whose fingerprint differs from ``fingerprint`` is an error naming the first differing settings."""
    if not ckpt_dir:
        if resume:
            raise UsageError("--resume needs a checkpoint folder")
        return None
    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, STATE_FILE)
    if not os.path.exists(path):
        return None
    if not resume:
        raise KcompressError(f"{ckpt_dir} holds checkpoints of an earlier {what}; pass --resume to continue it, or "
                             "--overwrite to start over")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        saved = state["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StaleCheckpoint(f"cannot resume from {ckpt_dir}: {STATE_FILE} is unreadable ({e}); pass --overwrite "
                              "to start over") from None
    now = _canonical(fingerprint)
    diff = [k for k in sorted(set(now) | set(saved)) if saved.get(k) != now.get(k)]
    if diff:
        shown = ", ".join(f"{k}: was {_short(saved.get(k))}, now {_short(now.get(k))}" for k in diff[:3])
        raise StaleCheckpoint(f"cannot resume from {ckpt_dir}: the {what}'s settings differ ({shown}); pass "
                              "--overwrite to start over")
    return state


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def write_state(ckpt_dir: str, state: dict) -> None:
    """Writes ``state.json`` atomically (the commit point of a checkpoint)."""
    atomic_write_text(os.path.join(ckpt_dir, STATE_FILE), json.dumps(_canonical(state), indent=1), overwrite=True)


class EpochCheckpoint(keras.callbacks.Callback):
    """Writes a checkpoint after every epoch and restores one when training starts (module docstring).

    ``ckpt_dir`` None: nothing is written (the best epoch is kept in memory only).
    ``state``: what :func:`read_state` returned (None: a fresh run). ``extra``: more keys for ``state.json``.
    After training, :attr:`history` holds every epoch's logs (those before the kill too) and :attr:`best_epoch`
    (1-based) and :attr:`best` the best ``monitor`` value (ties: lower loss, :attr:`best_loss`); the best epoch's
    weights are restored when ``restore_best`` and ``monitor`` was measured."""

    def __init__(self, ckpt_dir: Optional[str], fingerprint: dict, state: Optional[dict] = None, monitor: str = "val_accuracy",
                 restore_best: bool = True, extra: Optional[dict] = None):
        super().__init__()
        self.ckpt_dir, self.fingerprint, self.monitor, self.restore_best = ckpt_dir, fingerprint, monitor, restore_best
        self.extra = dict(extra or {})
        state = state or {}
        self.initial_epoch = int(state.get("epochs_done", 0))
        self.history: list[dict] = list(state.get("history", []))
        self.best: Optional[float] = state.get("best")
        self.best_loss: float = state.get("best_loss", float("inf"))  # breaks ties of ``best`` (epoch_rank)
        self.best_epoch: Optional[int] = state.get("best_epoch")
        self._last = state.get("last")
        self._best_dir = state.get("best_dir")
        self._best_weights = None  # in memory when the best epoch ran in this process

    def _objects(self) -> tf.train.Checkpoint:
        parts = {"model": self.model}
        if getattr(self.model, "optimizer", None) is not None:
            parts["optimizer"] = self.model.optimizer
        return tf.train.Checkpoint(**parts)

    def on_train_begin(self, logs=None):
        if not self._last:
            return
        opt = getattr(self.model, "optimizer", None)
        if opt is not None and hasattr(opt, "build"):
            opt.build(self.model.trainable_variables)  # slots exist, so the restore below fills them now
        prefix = os.path.join(self.ckpt_dir, self._last, "ckpt")
        # kept: variables created later (a dropout layer's random generator, at its first training call) are
        # restored when they are created, while the checkpoint object lives
        self._restoring = self._objects()
        self._restoring.read(prefix).assert_existing_objects_matched()

    def on_epoch_end(self, epoch, logs=None):
        row = {k: float(v) for k, v in (logs or {}).items()}
        row["epoch"] = epoch + 1
        self.history.append(row)
        from kcompress.train import epoch_rank, ranks_above

        rank = epoch_rank(row, self.monitor)
        name = f"epoch-{epoch + 1}"
        if ranks_above(rank, None if self.best is None else (self.best, -self.best_loss)):
            self.best, self.best_loss, self.best_epoch, self._best_dir = rank[0], -rank[1], epoch + 1, name
            self._best_weights = self.model.get_weights()
        self._last = name
        if not self.ckpt_dir:
            return
        with atomic_path(os.path.join(self.ckpt_dir, name), overwrite=True) as tmp:
            os.makedirs(tmp)
            self._objects().write(os.path.join(tmp, "ckpt"))
        write_state(self.ckpt_dir, {**self.extra, "fingerprint": self.fingerprint, "epochs_done": epoch + 1,
                                    "history": self.history, "best": self.best, "best_loss": self.best_loss,
                                    "best_epoch": self.best_epoch,
                                    "last": name, "best_dir": self._best_dir})
        for entry in os.listdir(self.ckpt_dir):  # older epochs: no longer named by state.json
            if entry.startswith("epoch-") and entry not in (name, self._best_dir):
                shutil.rmtree(os.path.join(self.ckpt_dir, entry), ignore_errors=True)

    def on_train_end(self, logs=None):
        if not self.restore_best or self.best_epoch is None or self._best_dir == self._last:
            return
        if self._best_weights is not None:
            self.model.set_weights(self._best_weights)
        else:  # the best epoch ran before the kill
            tf.train.Checkpoint(model=self.model).read(
                os.path.join(self.ckpt_dir, self._best_dir, "ckpt")).expect_partial()


def fit_resumable(model, train, val=None, *, checkpoint_dir: Optional[str] = None, resume: bool = False,
                  fingerprint: Optional[dict] = None, epochs: int = 5, callbacks=(), what: str = "fine-tune",
                  **fit_args) -> EpochCheckpoint:
    """:func:`kcompress.train.fit` with per-epoch checkpoints in ``checkpoint_dir``; ``resume`` continues from them.

    Returns the :class:`EpochCheckpoint` (``history``, ``best``, ``best_epoch`` over all epochs, resumed or not).
    Without ``checkpoint_dir`` it still returns one (nothing is written). ``fingerprint``: the settings a resume
    must match (``epochs`` is added). The best epoch on VAL is kept as ``fit`` keeps it."""
    from kcompress.train import fit

    fp = {**(fingerprint or {}), "epochs": epochs}
    state = read_state(checkpoint_dir, resume, fp, what)
    cb = EpochCheckpoint(checkpoint_dir, fp, state)
    log = fit_args.get("log")
    if state is not None and log is not None:
        log(f"continuing the interrupted {what} from {checkpoint_dir}: {cb.initial_epoch} of {epochs} epoch(s) done")
    if cb.initial_epoch < epochs:
        fit(model, train, val, epochs=epochs, callbacks=[*callbacks, cb], restore_best=False,
            initial_epoch=cb.initial_epoch, **fit_args)
        return cb
    # every epoch ran before the kill: what fit would have left (Keras refuses a fit of no epochs)
    from kcompress.batchnorm import recalibrate_batchnorm
    from kcompress.train import compile_classifier

    best = cb._best_dir if cb.best_epoch is not None else cb._last
    tf.train.Checkpoint(model=model).read(os.path.join(checkpoint_dir, best, "ckpt")).expect_partial()
    if fit_args.get("recalibrate_bn", True) and val is None:
        recalibrate_batchnorm(model, train, seed=fit_args.get("seed", 0))
    if fit_args.get("compile", True):
        compile_classifier(model, fit_args.get("lr", 1e-3), loss=fit_args.get("loss"))
    return cb


# ------------------------------------------------------------------------------------------------ architectures
def save_architecture(model, path: str) -> None:
    """Writes ``model``'s config and weights to the folder ``path`` atomically (``model.json``, ``weights.h5``).

    Used for models whose architecture changes during a run (structured pruning): :func:`load_architecture`
    rebuilds them with the layer classes of the run's input model, so unregistered custom layers come back too."""
    with atomic_path(path, overwrite=True) as tmp:
        os.makedirs(tmp)
        with open(os.path.join(tmp, "model.json"), "w", encoding="utf-8") as f:
            f.write(model.to_json())  # Keras's own encoder: constants of TF ops in the graph survive
        model.save_weights(os.path.join(tmp, "weights.h5"))


def load_architecture(path: str, like) -> Any:
    """The model :func:`save_architecture` wrote to ``path``, rebuilt with the layer classes of ``like`` (the run's
    input model). A layer class that ``like`` does not have is refused: the checkpoint is not this run's."""
    with open(os.path.join(path, "model.json"), encoding="utf-8") as f:
        text = f.read()
    custom = {type(layer).__name__: type(layer) for layer in like.layers}
    layers = json.loads(text).get("config", {}).get("layers", [])
    unknown = sorted({lc.get("class_name") for lc in layers} - set(custom) - {"InputLayer"})
    if unknown:
        raise StaleCheckpoint(f"{path}: layer class(es) {', '.join(map(str, unknown))} that the input model does "
                              "not have; this checkpoint is not this run's (pass --overwrite to start over)")
    model = keras.models.model_from_json(text, custom_objects=custom)
    model.load_weights(os.path.join(path, "weights.h5"))
    return model

