"""The shared fit loop: compile, train with a progress bar (Keras's own), keep the best epoch on VAL.

Training stages call :func:`fit`; it runs under the default ``tf.distribute`` strategy, or MirroredStrategy when
more than one GPU is visible (the model must then be built inside ``strategy_scope()``). The optimizer, learning-rate
schedule and augmentation come from the ``train`` section (:class:`~kcompress.options.TrainOptions`) through
:func:`kcompress.recipe.recipe`, as in every other training stage.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

from kcompress.backend import keras, tf
from kcompress.data import DataSource
from kcompress.modelinfo import input_shape
from kcompress.options import TrainOptions

__all__ = ["fit", "strategy", "compile_classifier", "steps_per_epoch"]


def strategy():
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def compile_classifier(model, lr: float = 1e-3, optimizer=None, loss=None) -> None:
    """``optimizer`` (default: a plain Adam at ``lr``) + sparse categorical cross-entropy, whose ``from_logits``
    follows whether the model ends in softmax (``loss`` replaces it: a wrapped model hides its last layer)."""
    from kcompress.evaluation import PROBABILITIES, output_kind

    if loss is None:
        from_logits = output_kind(model) != PROBABILITIES  # read from the layer producing the output
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    model.compile(
        optimizer=optimizer if optimizer is not None else keras.optimizers.Adam(lr),
        loss=loss,
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def steps_per_epoch(data: DataSource, batch_size: int) -> int:
    return max(1, -(-data.num_samples // batch_size))


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
):
    """Trains in place and returns the Keras History. The best epoch's weights by VAL accuracy are restored.

    ``train_options`` (default: the ``train`` section's defaults): optimizer, schedule over ``epochs`` and
    augmentation of ``train`` (see :mod:`kcompress.recipe`); ``lr`` is the stage's base rate; ``log`` receives
    one line saying which recipe ran. ``loss`` replaces the classifier loss chosen from the model's last layer.
    ``compile=False`` keeps the caller's compilation (its optimizer too); the augmentation still applies. With
    ``compile`` the trained model is re-compiled with a plain Adam (same loss): it saves and loads with tf_keras
    alone (a ``.h5`` file cannot hold the schedule).

    ``recalibrate_bn``: BatchNorm moving statistics are re-estimated on training data before every validation pass
    (and at the end without VAL), so VAL sees the weights as trained (see :mod:`kcompress.batchnorm`)."""
    from kcompress.augment import augment_batches
    from kcompress.batchnorm import RecalibrateBatchNorm, recalibrate_batchnorm
    from kcompress.recipe import recipe

    keras.utils.set_random_seed(seed)
    shape = input_shape(model)
    rec = recipe(train_options, lr, epochs, steps_per_epoch(train, batch_size), train, shape)
    if log is not None:
        log(f"training {epochs} epoch(s): {rec.describe() if compile else 'augment ' + rec.augment_text}")
    if compile:
        compile_classifier(model, lr, optimizer=rec.make_optimizer(), loss=loss)
    train_ds = train.dataset(shape, batch_size=batch_size, shuffle=True, seed=seed, repeat=False)
    # reshuffle each epoch: a fresh order per epoch from tf.data's own shuffle on top of the seeded order
    train_ds = train_ds.unbatch().shuffle(4096, seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    train_ds = augment_batches(train_ds, rec.augmenter(), seed).prefetch(tf.data.AUTOTUNE)
    val_ds = val.dataset(shape, batch_size=256) if val is not None else None
    cbs = list(callbacks)
    if recalibrate_bn and val is not None:
        cbs.insert(0, RecalibrateBatchNorm(train, seed=seed))
    if val is not None and restore_best:
        cbs.append(
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", patience=epochs, restore_best_weights=True, mode="max", verbose=0
            )
        )
    if verbose is None:
        verbose = 1 if sys.stderr.isatty() else 2
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=verbose, callbacks=cbs)
    if recalibrate_bn and val is None:
        recalibrate_batchnorm(model, train, seed=seed)
    if compile:  # kcompress's optimizer and schedule classes stay out of saved files
        compile_classifier(model, lr, loss=model.loss)
    return history
