"""Every private TensorFlow / tf_keras / Keras 3 / LiteRT / tfmot name kcompress uses, and why, in one place.

Where a public API does the job, kcompress uses it (``layer.inbound_nodes``, ``KerasTensor.node``,
``Node.parent_nodes``, ``keras.backend.is_keras_tensor``); what is left here has no public equivalent in the pinned
versions. Each function names the private attribute it reads and what it is for; ``tests/test_internals.py`` checks
each against a public reference, so an upgrade that renames or changes one fails there, by name, not somewhere deep
inside a pruning round. Nothing else in kcompress may touch a private name of another package.

Gotcha: these are read-only views except :func:`disable_per_channel` and :func:`averaged_moving_quantize`, which
change converter / tfmot behaviour and say so.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from kcompress.errors import KcompressError

__all__ = [
    "InternalAPIError", "ops_details", "quant_interpreter", "disable_per_channel", "is_graph_network",
    "nodes_in_depth_order", "tensor_usage_count", "call_spec", "build_input_shape", "mha_parts",
    "keras3_history_layer", "keras3_last_output", "averaged_moving_quantize", "default_8bit_config",
    "output_quantize_config",
]


class InternalAPIError(RuntimeError):
    """A private name kcompress relies on is gone or changed: a kcompress bug to report (exit 3), not user error."""


def _need(obj, name: str, what: str):
    if not hasattr(obj, name):
        raise InternalAPIError(
            f"{type(obj).__name__}.{name} is missing: {what} relies on it; this kcompress does not support the "
            "installed TensorFlow/Keras/LiteRT version (please report it)"
        )
    return getattr(obj, name)


# ------------------------------------------------------------------------------------------------------------ LiteRT


def ops_details(interpreter) -> list[dict[str, Any]]:
    """Per-op ``{"index", "op_name", "inputs", "outputs"}`` of a LiteRT/TFLite interpreter, in execution order.

    ``Interpreter._get_ops_details()`` ("experimental and subject to change"): the only API giving ops with their
    tensor indices and the delegate nodes after ``allocate_tensors()``. ``tf.lite.experimental.Analyzer`` prints a
    text dump only and knows nothing of delegates.
    """
    return list(_need(interpreter, "_get_ops_details", "listing a .tflite's ops")())


def quant_interpreter(debugger):
    """The interpreter of the quantized model inside ``tf.lite.experimental.QuantizationDebugger``
    (``_quant_interpreter``): the debugger takes op output names in its denylist but does not list them."""
    return _need(debugger, "_quant_interpreter", "--float-layers (selective quantization)")


def disable_per_channel(converter) -> None:
    """Per-tensor instead of per-channel int8 weights (``TFLiteConverter._experimental_disable_per_channel``).

    The public ``experimental_disable_per_channel_quantization_for_dense_layers`` covers Dense only; this flag is
    what the converter reads for every layer. Changes the converter.
    """
    _need(converter, "_experimental_disable_per_channel", "per_channel=False")
    converter._experimental_disable_per_channel = True


# ---------------------------------------------------------------------------------------------------------- tf_keras


def is_graph_network(model) -> bool:
    """Whether a tf_keras model is functional (a graph of layers; Sequential models with an input are too).

    ``Model._is_graph_network``: a model built with ``keras.Model(inputs, outputs)`` and a subclass of ``Model``
    share their class, so only this flag tells them apart.
    """
    return bool(getattr(model, "_is_graph_network", False))


def nodes_in_depth_order(model) -> list:
    """The nodes of a functional model, inputs first, in the order Keras itself runs them (``_nodes_by_depth``).

    A topological order rebuilt from public ``Node.parent_nodes`` would be valid but not Keras's order, and
    flattening relies on calling layers in exactly Keras's order so that nested models give the same graph.
    """
    by_depth = _need(model, "_nodes_by_depth", "walking a model's graph")
    return [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]]


def tensor_usage_count(model) -> dict:
    """``{str(id(keras_tensor)): consumers}`` of a functional model (``_tensor_usage_count``), as Keras uses it to
    hand each consumer its own reference when running the graph."""
    return _need(model, "_tensor_usage_count", "walking a model's graph")


def call_spec(layer):
    """How a layer's ``call`` names its arguments (``Layer._call_spec``: ``arg_names``, ``split_out_first_arg``):
    needed to read a TF-op layer's constant operands the way tf_keras serializes them."""
    return _need(layer, "_call_spec", "reading a TF-op layer's constants")


def build_input_shape(layer):
    """The input shape a layer was built with (``_build_input_shape``), or None: the only shape a layer inside a
    subclassed model keeps (Keras traces their calls in a scratch graph, so they have no inbound nodes)."""
    return getattr(layer, "_build_input_shape", None)


def mha_parts(layer) -> dict[str, Any]:
    """A built tf_keras ``MultiHeadAttention``'s projections, einsum equations and call shapes, for counting MACs.

    All private (``_query_dense``, ``_dot_product_equation``, ``_query_shape``, ...): the layer exposes none of them.
    Raises :class:`KcompressError` for a layer that was never built.
    """
    if not hasattr(layer, "_query_dense"):
        raise KcompressError(f"layer {layer.name!r} is not built, so its projections are unknown")
    shapes = getattr(layer, "_query_shape", None)
    return {
        "query": layer._query_dense,
        "key": layer._key_dense,
        "value": layer._value_dense,
        "output": layer._output_dense,
        "dot_product_equation": layer._dot_product_equation,
        "combine_equation": layer._combine_equation,
        "shapes": None if shapes is None else (layer._query_shape, layer._value_shape, layer._key_shape),
    }


# ----------------------------------------------------------------------------------------------------------- Keras 3


def keras3_history_layer(tensor):
    """The layer (or operation) that produced a Keras 3 symbolic tensor (``KerasTensor._keras_history[0]``), or None.

    tf_keras tensors have the public ``tensor.node.layer``; Keras 3 has no public equivalent.
    """
    node = getattr(tensor, "node", None)  # tf_keras: public
    if node is not None and hasattr(node, "layer"):
        return node.layer
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history[0]


def keras3_last_output(layer):
    """A Keras 3 layer's output in its last call (``Operation._inbound_nodes[-1].outputs``): Keras 3 dropped
    ``get_output_at`` and has no public per-call outputs."""
    outputs = _need(layer, "_inbound_nodes", "rebuilding a Keras 3 model")[-1].outputs
    return outputs if len(outputs) > 1 else outputs[0]


# -------------------------------------------------------------------------------------------------------------- tfmot


@contextlib.contextmanager
def averaged_moving_quantize(decay: Callable[[], float]) -> Iterator[None]:
    """While active, tfmot's moving-average range quantizers use ``decay()`` as their EMA decay.

    Replaces ``quant_ops.MovingAvgQuantize`` as tfmot's quantizers look it up (a module attribute): tfmot offers no
    option for the decay. Restored on exit, also on error. Changes tfmot behaviour process-wide while active.
    """
    from tensorflow_model_optimization.python.core.quantization.keras import quantizers

    original = _need(quantizers.quant_ops, "MovingAvgQuantize", "QAT range calibration")

    def averaged(*args, **kwargs):
        kwargs["ema_decay"] = decay()
        return original(*args, **kwargs)

    quantizers.quant_ops.MovingAvgQuantize = averaged
    try:
        yield
    finally:
        quantizers.quant_ops.MovingAvgQuantize = original


def default_8bit_config(weight_attrs: list[str], activation_attrs: list[str], quantize_output: bool):
    """tfmot's ``Default8BitQuantizeConfig`` (module ``default_8bit_quantize_registry``; the public
    ``tfmot.quantization.keras.default_8bit`` exports the registry, not its configs): the default scheme's config
    with per-tensor weights, which the public API cannot ask for."""
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry as reg,
    )

    return _need(reg, "Default8BitQuantizeConfig", "per-tensor QAT")(weight_attrs, activation_attrs, quantize_output)


def output_quantize_config():
    """tfmot's ``Default8BitOutputQuantizeConfig`` (module ``default_8bit_quantize_configs``, not exported): fake-
    quantizes a layer's output only. Used for BatchNormalization after a per-tensor conv, which tfmot's fold
    transform matches only for convs with the default (per-channel) config."""
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_configs as cfgs,
    )

    return _need(cfgs, "Default8BitOutputQuantizeConfig", "per-tensor QAT")()
