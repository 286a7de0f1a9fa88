"""The one place that imports TensorFlow, tf_keras and tfmot.

tfmot works only with Keras 2, so ``TF_USE_LEGACY_KERAS=1`` must be set before TensorFlow is first imported;
every other module gets ``tf`` and ``keras`` (which is ``tf_keras``) from here. Keras 3 (the ``keras`` package) is
reached through :func:`keras3` only, for reading users' Keras 3 models.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["tf", "keras", "tfmot", "keras3"]


def tfmot():
    """tensorflow_model_optimization, imported on first use (it takes a second)."""
    import tensorflow_model_optimization as _tfmot

    return _tfmot


def keras3():
    """The Keras 3 package, for users' Keras 3 models."""
    import keras as _keras3

    return _keras3

tf.get_logger().setLevel("ERROR")  # retracing chatter and deprecation notices are not the user's business
