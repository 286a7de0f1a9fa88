"""One test per private TensorFlow/Keras/LiteRT/tfmot name kcompress uses (kcompress/internals.py), each checked
against a public reference, so a version that renames or changes one fails here by name."""

import re

import numpy as np
import pytest

from kcompress import internals
from kcompress.backend import keras, tf

L = keras.layers


def _small_cnn():
    x = L.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", activation="relu", name="conv_a")(x)
    b = L.Conv2D(4, 1, name="conv_b")(x)
    y = L.Add(name="add")([a, b])
    y = L.GlobalAveragePooling2D(name="gap")(y)
    y = L.Dense(3, name="head")(y)
    return keras.Model(x, y)


def _int8(model, per_channel=True) -> bytes:
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    conv.representative_dataset = lambda: ([rng.random((1, 8, 8, 3), dtype=np.float32)] for _ in range(8))
    if not per_channel:
        internals.disable_per_channel(conv)
    return conv.convert()


def test_ops_details_match_public_analyzer(capsys):
    tflite = _int8(_small_cnn())
    from ai_edge_litert.interpreter import Interpreter

    ops = internals.ops_details(Interpreter(model_content=tflite))
    capsys.readouterr()
    tf.lite.experimental.Analyzer.analyze(model_content=tflite)
    text = capsys.readouterr().out
    public = re.findall(r"Op#\d+ (\w+)\(", text)
    assert public and [op["op_name"] for op in ops] == public
    assert all({"index", "op_name", "inputs", "outputs"} <= set(op) for op in ops)


def test_disable_per_channel_gives_one_scale_per_conv():
    def conv_scales(tflite):
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_content=tflite)
        out = []
        for op in internals.ops_details(interp):
            if op["op_name"] == "CONV_2D":
                q = interp.get_tensor_details()[int(op["inputs"][1])]["quantization_parameters"]
                out.append(len(q["scales"]))
        return out

    model = _small_cnn()
    assert conv_scales(_int8(model)) == [4, 4]  # per channel: one scale per output channel
    assert conv_scales(_int8(model, per_channel=False)) == [1, 1]


def test_quant_interpreter_is_the_quantized_model():
    model = _small_cnn()
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    data = lambda: ([rng.random((1, 8, 8, 3), dtype=np.float32)] for _ in range(4))  # noqa: E731
    conv.representative_dataset = data
    debugger = tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=data)
    interp = internals.quant_interpreter(debugger)
    names = [t["name"] for t in interp.get_tensor_details()]
    assert any("conv_a" in n for n in names)
    assert any(t["dtype"] == np.int8 for t in interp.get_tensor_details())


class Sub(keras.Model):
    def __init__(self):
        super().__init__()
        self.d = L.Dense(2)

    def call(self, x):
        return self.d(x)


def test_is_graph_network():
    sub = Sub()
    sub(np.zeros((1, 3), np.float32))
    assert internals.is_graph_network(_small_cnn())
    assert internals.is_graph_network(keras.Sequential([L.Input((3,)), L.Dense(2)]))
    assert not internals.is_graph_network(sub)


def test_nodes_in_depth_order_is_topological_and_complete():
    model = _small_cnn()
    nodes = internals.nodes_in_depth_order(model)
    layers = [n.layer.name for n in nodes if not n.is_input]
    assert sorted(layers) == sorted(la.name for la in model.layers if not isinstance(la, L.InputLayer))
    seen = set()
    for node in nodes:  # every parent (public Node.parent_nodes) comes first
        assert all(id(p) in seen for p in node.parent_nodes)
        seen.add(id(node))


def test_tensor_usage_count_equals_public_consumer_count():
    model = _small_cnn()
    usage = internals.tensor_usage_count(model)
    counted: dict[str, int] = {}
    for layer in model.layers:
        for node in layer.inbound_nodes:
            for t in tf.nest.flatten(node.keras_inputs):
                counted[str(id(t))] = counted.get(str(id(t)), 0) + 1
    for t in model.outputs:
        counted[str(id(t))] = counted.get(str(id(t)), 0) + 1
    assert usage == counted
    assert usage[str(id(model.inputs[0]))] == 2  # conv_a and conv_b


def test_call_spec_names_tf_op_arguments():
    x = L.Input((4,))
    y = tf.math.add(x, np.ones(4, np.float32))
    model = keras.Model(x, y)
    op = [la for la in model.layers if type(la).__name__ == "TFOpLambda"][0]
    spec = internals.call_spec(op)
    assert spec.arg_names[:2] == ["x", "y"]
    node = op.inbound_nodes[0]
    first, args, kwargs = spec.split_out_first_arg(node.call_args, node.call_kwargs)
    assert keras.backend.is_keras_tensor(first)


def test_build_input_shape_of_a_layer_in_a_subclassed_model():
    sub = Sub()
    sub(np.zeros((5, 3), np.float32))
    assert tuple(internals.build_input_shape(sub.d)) == (5, 3)
    assert internals.build_input_shape(L.Dense(2)) is None


def test_mha_parts_match_the_layer_config():
    mha = L.MultiHeadAttention(num_heads=2, key_dim=4, value_dim=3)
    q = L.Input((5, 6))
    v = L.Input((7, 6))
    mha(q, v)
    parts = internals.mha_parts(mha)
    assert tuple(parts["query"].kernel.shape) == (6, 2, 4)
    assert tuple(parts["value"].kernel.shape) == (6, 2, 3)
    assert tuple(parts["output"].kernel.shape) == (2, 3, 6)
    assert "," in parts["dot_product_equation"] and "->" in parts["combine_equation"]
    assert [tuple(s)[1:] for s in parts["shapes"]] == [(5, 6), (7, 6), (7, 6)]
    from kcompress.errors import KcompressError

    with pytest.raises(KcompressError, match="not built"):
        internals.mha_parts(L.MultiHeadAttention(num_heads=2, key_dim=4))


def test_keras3_history_layer_and_last_output():
    from kcompress.backend import keras3

    k3 = keras3()
    dense = k3.layers.Dense(2, name="shared")
    a, b = k3.Input((3,)), k3.Input((3,))
    ya, yb = dense(a), dense(b)
    k3.Model([a, b], [ya, yb])
    assert internals.keras3_history_layer(ya) is dense
    assert internals.keras3_last_output(dense) is yb
    t = L.Input((3,))
    d = L.Dense(2)
    assert internals.keras3_history_layer(d(t)) is d  # tf_keras: public KerasTensor.node
    assert internals.keras3_history_layer(np.zeros(2)) is None


def test_averaged_moving_quantize_sets_tfmot_ema_decay():
    """With decay 0 the activation range after one training-mode batch is that batch's exact range; tfmot's own
    decay (0.999) moves it from its initial 6 by 0.1% of the way."""
    from kcompress.backend import tfmot

    def ranges(patched: bool):
        x = L.Input((4,))
        model = keras.Model(x, L.Dense(3, name="d", kernel_initializer="ones")(x))
        q = tfmot().quantization.keras.quantize_model(model)
        batch = np.full((2, 4), 5.0, np.float32)
        if patched:
            with internals.averaged_moving_quantize(lambda: 0.0):
                q(batch, training=True)
        else:
            q(batch, training=True)
        qd = [la for la in q.layers if la.name.endswith("d")][0]
        mx = [w for w in qd.weights if "post_activation_max" in w.name or "output_max" in w.name]
        return float(mx[0].numpy())

    assert ranges(True) == pytest.approx(20.0)  # 4 inputs of 5 through ones
    assert ranges(False) == pytest.approx(6.0 + 0.001 * (20.0 - 6.0), abs=1e-4)


def test_default_8bit_config_is_per_tensor():
    cfg = internals.default_8bit_config(["kernel"], ["activation"], False)
    conv = L.Conv2D(4, 3)
    conv.build((None, 8, 8, 3))
    [(w, quantizer)] = cfg.get_weights_and_quantizers(conv)
    assert w is conv.kernel
    assert quantizer.get_config()["per_axis"] is False


def test_output_quantize_config_quantizes_the_output_only():
    cfg = internals.output_quantize_config()
    bn = L.BatchNormalization()
    bn.build((None, 4))
    assert cfg.get_weights_and_quantizers(bn) == [] and cfg.get_activations_and_quantizers(bn) == []
    assert len(cfg.get_output_quantizers(bn)) == 1
