"""The shared fit loop: compile, train with a progress bar (Keras's own), keep the best epoch on VAL.

Training stages call :func:`fit`; it runs under the default ``tf.distribute`` strategy, or MirroredStrategy when
more than one GPU is visible (the model must then be built inside ``strategy_scope()``).
"""

from __future__ import annotations

import sys
from typing import Optional

from kcompress.backend import keras, tf
from kcompress.data import DataSource
from kcompress.modelinfo import input_shape

__all__ = ["fit", "strategy", "compile_classifier"]


def strategy():
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def compile_classifier(model, lr: float = 1e-3) -> None:
    """Adam + sparse categorical cross-entropy; ``from_logits`` follows whether the model ends in softmax."""
    from kcompress.evaluation import PROBABILITIES, output_kind

    from_logits = output_kind(model) != PROBABILITIES  # read from the layer producing the output
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


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
):
    """Trains in place and returns the Keras History. The best epoch's weights by VAL accuracy are restored."""
    keras.utils.set_random_seed(seed)
    if compile:
        compile_classifier(model, lr)
    shape = input_shape(model)
    train_ds = train.dataset(shape, batch_size=batch_size, shuffle=True, seed=seed, repeat=False)
    # reshuffle each epoch: a fresh order per epoch from tf.data's own shuffle on top of the seeded order
    train_ds = train_ds.unbatch().shuffle(4096, seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    val_ds = val.dataset(shape, batch_size=256) if val is not None else None
    cbs = list(callbacks)
    if val is not None and restore_best:
        cbs.append(
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", patience=epochs, restore_best_weights=True, mode="max", verbose=0
            )
        )
    if verbose is None:
        verbose = 1 if sys.stderr.isatty() else 2
    return model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=verbose, callbacks=cbs)
