"""The shared fit loop: compile, train with a progress bar (Keras's own), keep the best epoch on VAL.

Training stages call :func:`fit`; it trains under the ``tf.distribute`` strategy of ``train.strategy``
(:func:`strategy`, see :mod:`kcompress.distributed`: one device by default, MirroredStrategy with several GPUs,
MultiWorkerMirroredStrategy when ``TF_CONFIG`` names a cluster). A model built outside that strategy's scope is
copied into it with its weights, trained there, and its weights copied back, so ``fit`` still trains in place. The
optimizer, learning-rate schedule and augmentation come from the ``train`` section
(:class:`~kcompress.options.TrainOptions`) through :func:`kcompress.recipe.recipe`, as in every other training stage.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

from kcompress.backend import keras, tf, traced_gradients_released
from kcompress.data import DataSource
from kcompress.distributed import describe, shard_by_data, strategy
from kcompress.errors import UsageError
from kcompress.modelinfo import input_shape
from kcompress.options import TrainOptions

__all__ = ["fit", "strategy", "in_scope", "copy_into_scope", "compile_classifier", "steps_per_epoch",
           "release_traced_functions"]

# the tf.functions Keras traces for fit/evaluate/predict and caches on the model
_TRACED = ("train_function", "train_tf_function", "test_function", "predict_function")


def release_traced_functions(model) -> None:
    """Drops the model's cached fit/evaluate/predict ``tf.function`` s so their graphs can be freed.

    Gotcha: tf_keras tracks each of them as a checkpoint dependency of the model when it caches it, and
    ``compile`` (``_reset_compile_cache``) later sets the attribute to ``None`` without untracking it, so the
    traced graph stays reachable from the model (its reference counts and tf's dependency list) for its lifetime; for
    InceptionResNetV2's QAT model that train graph has 35k ops. This sets the attributes to ``None`` untracked and
    drops both entries; the next ``fit`` traces again."""
    _set_untracked(model, dict.fromkeys(_TRACED))
    attrs = [id(v) for v in model.__dict__.values()]
    counts = model._obj_reference_counts  # tf_keras's per-value count behind its attribute tracking
    stale = [f for f in list(counts) if isinstance(f, tf.types.experimental.PolymorphicFunction) and id(f) not in attrs]
    for f in stale:
        del counts[f]
    for name in _TRACED:
        model._delete_tracking(name)


@tf.__internal__.tracking.no_automatic_dependency_tracking
def _set_untracked(model, values: dict) -> None:
    for name, value in values.items():
        setattr(model, name, value)


def in_scope(model, strat) -> bool:
    """Whether ``model``'s variables were created under ``strat`` (so it can be trained under it)."""
    return all(strat.extended.variable_created_in_scope(w) for w in model.weights)


def copy_into_scope(model, strat):
    """``model`` itself when it can train under ``strat``; else a copy (same architecture, same weights: tfmot's
    pruning masks and quantizer ranges included) built in ``strat``'s scope. The model's own layer classes (and
    those inside tfmot's wrappers) are used, so unregistered custom layers copy too."""
    if in_scope(model, strat):
        return model
    from kcompress.backend import tfmot

    classes = {}
    for layer in model.layers:
        for cls in (type(layer), type(getattr(layer, "layer", None))):
            classes.setdefault(cls.__name__, cls)
    tq, ts = tfmot().quantization.keras, tfmot().sparsity.keras
    with strat.scope(), keras.utils.custom_object_scope(classes), tq.quantize_scope(), ts.prune_scope():
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
    return copy


def compile_classifier(model, lr: float = 1e-3, optimizer=None, loss=None) -> None:
    """``optimizer`` (default: a plain Adam at ``lr``) + sparse categorical cross-entropy, whose ``from_logits``
    follows whether the model ends in softmax (``loss`` replaces it: a wrapped model hides its last layer)."""
    from kcompress.evaluation import PROBABILITIES, output_kind

    if loss is None:
        from_logits = output_kind(model) != PROBABILITIES  # read from the layer producing the output
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    strat = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
    with strat.scope():  # optimizer and metric in the model's strategy, as Keras requires
        model.compile(
            optimizer=optimizer if optimizer is not None else keras.optimizers.Adam(lr),
            loss=loss,
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )


def epoch_rank(logs: Optional[dict], monitor: str = "val_accuracy") -> tuple[float, float]:
    """How every training stage ranks its epochs (larger is better): ``monitor``, then its loss, lower first.

    VAL accuracy on a few hundred samples ties often, and the first of tied epochs is usually not the best one
    (the loss keeps falling). NaN (not measured) never ranks above anything."""
    logs = logs or {}
    nan = float("nan")
    acc = float(logs.get(monitor, nan))
    loss = float(logs.get(monitor.replace("accuracy", "loss"), float("inf")))
    return acc, -loss


def ranks_above(rank: tuple[float, float], best: Optional[tuple[float, float]]) -> bool:
    """``rank`` (see :func:`epoch_rank`) beats ``best`` (None: nothing yet)."""
    return rank[0] == rank[0] and (best is None or rank > tuple(best))


class KeepBestEpoch(keras.callbacks.Callback):
    """Restores, at the end of training, the weights of the best epoch by :func:`epoch_rank` on ``monitor``."""

    def __init__(self, monitor: str = "val_accuracy"):
        super().__init__()
        self.monitor, self.best, self.best_epoch, self.weights = monitor, None, None, None

    def on_epoch_end(self, epoch, logs=None):
        rank = epoch_rank(logs, self.monitor)
        if ranks_above(rank, self.best):
            self.best, self.best_epoch, self.weights = rank, epoch + 1, weights_unless_last(self, epoch)

    def on_train_end(self, logs=None):
        if self.weights is not None:
            self.model.set_weights(self.weights)


def weights_unless_last(callback: keras.callbacks.Callback, epoch: int):
    """The model's weights for a best-epoch callback to restore at the end; ``None`` after the run's last epoch,
    whose weights the model keeps anyway (no copy: a pruning-wrapped InceptionResNetV2's is 0.4 GiB)."""
    if epoch + 1 >= (callback.params or {}).get("epochs", epoch + 2):
        return None
    return callback.model.get_weights()


def steps_per_epoch(data: DataSource, batch_size: int) -> int:
    return max(1, -(-data.num_samples // batch_size))


def build_optimizer(optimizer, variables) -> None:
    """Creates ``optimizer``'s slots for ``variables`` now rather than in the first train step (which is then
    traced twice, see :func:`build_training_state`). Legacy Keras optimizers are left to build their own."""
    if isinstance(optimizer, keras.optimizers.Optimizer):
        optimizer.build(variables)


def build_training_state(model, dataset) -> None:
    """Creates the compiled model's optimizer slots and its loss's and metrics' variables before ``model.fit``.

    Keras creates them inside the first train step, and a ``tf.function`` whose first call creates variables is
    traced twice: tracing is most of a short fine-tune of a deep model (the QAT step of InceptionResNetV2 at 75x75
    traces in about 13 s). Created here, the step is traced once and trains the same. ``dataset`` gives the label
    spec (its batches are ``(x, y[, sample_weight])``). Models without functional outputs (subclassed) are left to
    Keras. Call it in the model's distribution strategy scope."""
    outputs = getattr(model, "outputs", None)
    if not outputs or getattr(model, "compiled_loss", None) is None:
        return
    build_optimizer(model.optimizer, model.trainable_variables)
    zeros = [tf.zeros([1, *(d or 1 for d in t.shape[1:])], t.dtype) for t in outputs]
    y_pred = zeros[0] if len(zeros) == 1 else zeros
    y_spec = dataset.element_spec[1]
    y_true = tf.nest.map_structure(lambda s: tf.zeros([1, *(d or 1 for d in s.shape[1:])], s.dtype), y_spec)
    if not model.compiled_loss.built:
        model.compiled_loss.build(y_pred)
    if model.compiled_metrics is not None and not model.compiled_metrics.built:
        model.compiled_metrics.build(y_pred, y_true)


def fit(
    model,
    train: DataSource,
    val: Optional[DataSource] = None,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    restore_best: bool = True,
    verbose: Optional[int] = None,
    callbacks=(),
    compile: bool = True,
    recalibrate_bn: bool = True,
    train_options: Optional[TrainOptions] = None,
    loss=None,
    log: Optional[Callable[[str], None]] = None,
    initial_epoch: int = 0,
):
    """Trains in place and returns the Keras History. The best epoch's weights by VAL accuracy (ties: VAL loss) are
    restored.

    ``train_options`` (default: the ``train`` section's defaults): optimizer, schedule over ``epochs`` and
    augmentation of ``train`` (see :mod:`kcompress.recipe`); ``lr`` is the stage's base rate; ``log`` receives
    one line saying which recipe ran. ``loss`` replaces the classifier loss chosen from the model's last layer.
    ``compile=False`` keeps the caller's compilation (its optimizer too); the augmentation still applies. With
    ``compile`` the trained model is re-compiled with a plain Adam (same loss): it saves and loads with tf_keras
    alone (a ``.h5`` file cannot hold the schedule).

    ``recalibrate_bn``: BatchNorm moving statistics are re-estimated on training data before every validation pass
    (and at the end without VAL), so VAL sees the weights as trained (see :mod:`kcompress.batchnorm`).

    ``initial_epoch``: continue a run at this epoch (0-based; :func:`kcompress.checkpoint.fit_resumable` restores the
    weights and optimizer first); the shuffled order and augmentation of each epoch are an uninterrupted run's.

    Strategy (``train_options.strategy``): ``batch_size`` is the global batch, split across the replicas; ``lr`` is
    not scaled. A model built outside the strategy's scope is trained as a copy inside it (callbacks see the copy)
    and its weights are copied back; with ``compile=False`` that copy would lose the caller's compilation, so it is
    refused: build the model in ``strategy(...).scope()``."""
    from kcompress.augment import augment_batches
    from kcompress.batchnorm import RecalibrateBatchNorm, recalibrate_batchnorm
    from kcompress.recipe import recipe

    strat = strategy(train_options.strategy if train_options is not None else None)
    if not compile and not in_scope(model, strat):
        raise UsageError("fit(compile=False) under a tf.distribute strategy needs the model built in its scope "
                         "(kcompress.distribute(...).scope())")
    keras.utils.set_random_seed(seed)
    shape = input_shape(model)
    rec = recipe(train_options, lr, epochs, steps_per_epoch(train, batch_size), train, shape)
    if log is not None:
        log(f"training {epochs} epoch(s): {rec.describe() if compile else 'augment ' + rec.augment_text}"
            f"{describe(strat, batch_size)}")
    given, model = model, copy_into_scope(model, strat)
    if compile:
        with strat.scope():
            compile_classifier(model, lr, optimizer=rec.make_optimizer(), loss=loss)
    train_ds = train.dataset(shape, batch_size=batch_size, shuffle=True, seed=seed, repeat=False)
    # reshuffle each epoch: a fresh order per epoch from tf.data's own shuffle on top of the seeded order
    train_ds = train_ds.unbatch().shuffle(4096, seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    train_ds = shard_by_data(augment_batches(train_ds, rec.augmenter(), seed).prefetch(tf.data.AUTOTUNE))
    val_ds = shard_by_data(val.dataset(shape, batch_size=256)) if val is not None else None
    cbs = list(callbacks)
    if recalibrate_bn and val is not None:
        cbs.insert(0, RecalibrateBatchNorm(train, seed=seed))
    if val is not None and restore_best:
        cbs.append(KeepBestEpoch())
    if verbose is None:
        verbose = 1 if sys.stderr.isatty() else 2
    for _ in range(initial_epoch):  # each new iterator draws the next epoch's shuffle and augmentation seeds
        iter(train_ds)
    with strat.scope(), traced_gradients_released():
        build_training_state(model, train_ds)
        history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=verbose, callbacks=cbs,
                            initial_epoch=initial_epoch)
    trained_loss = model.loss
    release_traced_functions(model)
    if model is not given:  # trained as a copy inside the strategy's scope
        given.set_weights(model.get_weights())
        model = given
    if recalibrate_bn and val is None:
        recalibrate_batchnorm(model, train, seed=seed)
    if compile:  # kcompress's optimizer and schedule classes stay out of saved files
        compile_classifier(model, lr, loss=trained_loss)
    return history
