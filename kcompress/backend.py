"""The one place that imports TensorFlow, tf_keras and tfmot.

tfmot works only with Keras 2, so ``TF_USE_LEGACY_KERAS=1`` must be set before TensorFlow is first imported;
every other module gets ``tf`` and ``keras`` (which is ``tf_keras``) from here. Keras 3 (the ``keras`` package) is
reached through :func:`keras3` only, for reading users' Keras 3 models.
"""

import contextlib
import functools
import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silences file descriptor 2 while TensorFlow loads and finds its devices: its C++ start-up lines (oneDNN, CUDA
    stubs, "before absl::InitializeLog()") ignore ``TF_CPP_MIN_LOG_LEVEL``, and a user error must stay one line.
    ``TF_CPP_MIN_LOG_LEVEL=0`` keeps them. Python exceptions are unaffected (raised after the descriptor is back)."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("", "0"):
        yield
        return
    try:
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no stderr to silence
        yield
        return
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


with _quiet_native_stderr():
    import tensorflow as tf  # noqa: E402
    import tf_keras as keras  # noqa: E402

    tf.config.list_physical_devices()  # device discovery logs its own lines (cuInit) on first use

__all__ = ["tf", "keras", "tfmot", "keras3", "traced_gradients_released"]


@functools.lru_cache(maxsize=None)
def tfmot():
    """tensorflow_model_optimization, imported (and adjusted, once) on first use (it takes a second).

    Gotcha: tf_keras runs every layer class defined outside Keras through AutoGraph each time it is traced, and a
    QAT model is hundreds of tfmot ``QuantizeWrapper`` calls. Their ``call`` branches only on Python values
    (``training`` goes through ``smart_cond``), so they are traced as plain Python here: same graph, same outputs,
    less time (InceptionResNetV2 at 75x75, ``tools/profile_qat.py``: ``quantize_apply`` 32.4 -> 25.6 s)."""
    import tensorflow_model_optimization as _tfmot

    _tfmot.quantization.keras.QuantizeWrapper._should_use_autograph = _no_autograph
    return _tfmot


def _no_autograph(layer) -> bool:
    return False


@contextlib.contextmanager
def traced_gradients_released():
    """Work inside keeps none of the custom-gradient registrations it makes (removed at exit).

    Gotcha: ``tf.custom_gradient`` in graph mode registers a gradient function per call in TensorFlow's global
    registry, closed over the traced graph, and never removes it. ``tf.distribute``'s ``all_reduce`` in Keras's train
    step is one, so every ``model.fit`` trace kept its whole train graph alive for the life of the process
    (InceptionResNetV2's QAT train graph: 35k ops). Only for work whose graphs are not differentiated again after it
    (a finished ``fit``: a later one traces anew)."""
    from tensorflow.python.framework import ops as _ops

    registry = _ops.gradient_registry._registry
    before = set(registry)
    try:
        yield
    finally:
        for name in set(registry) - before:
            if name.startswith("CustomGradient-"):
                del registry[name]


def keras3():
    """The Keras 3 package, for users' Keras 3 models."""
    import keras as _keras3

    return _keras3

tf.get_logger().setLevel("ERROR")  # retracing chatter and deprecation notices are not the user's business
