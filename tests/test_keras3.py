"""The Keras 3 <-> tf_keras bridge: rebuilt models compute what the originals compute, in Keras and in LiteRT."""

import os
import zipfile

import numpy as np
import pytest

from kcompress import keras3 as bridge
from kcompress.backend import keras, tf
from kcompress.backend import keras3 as _keras3
from kcompress.errors import KcompressError

k3 = _keras3()
L = k3.layers

MODEL_NAMES = ["small_cnn", "residual_bn", "concat", "mobilenet_v2", "text"]


def assert_close(want, got, rtol):
    """The tolerance the bridge documents: max|a - b| <= rtol * max(1, max|a|)."""
    want = np.asarray(want, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    assert want.shape == got.shape
    diff = np.max(np.abs(want - got))
    assert diff <= rtol * max(1.0, np.max(np.abs(want))), f"max abs difference {diff}"


def _randomize_batchnorm(model, rng):
    """Non-trivial BatchNorm statistics, so copying them (or not) shows in the outputs."""
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                rng.normal(0, 0.2, beta.shape).astype("float32"),
                rng.normal(0, 0.5, mean.shape).astype("float32"),
                rng.uniform(0.5, 2.0, var.shape).astype("float32"),
            ])


def build_small_cnn():
    inp = k3.Input((16, 16, 3), name="image")
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(8, 3, padding="same")(x)
    x = L.LeakyReLU(negative_slope=0.1)(x)
    x = L.Flatten()(x)
    x = L.Dropout(0.2)(x)
    out = L.Dense(5, activation="softmax", kernel_regularizer=k3.regularizers.L2(1e-4))(x)
    return k3.Model(inp, out, name="small_cnn")


def build_residual_bn():
    """Trained one step (so BatchNorm's moving statistics moved), with an explicit loss and no string metric."""
    inp = k3.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False)(inp)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    y = L.Conv2D(8, 3, padding="same", use_bias=False)(x)
    y = L.BatchNormalization(name="bn_residual")(y)
    x = L.Add()([x, y])
    x = L.ReLU(max_value=6.0)(x)
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(4)(x)
    model = k3.Model(inp, out, name="residual_bn")
    rng = np.random.default_rng(1)
    model.compile(optimizer=k3.optimizers.SGD(0.01), loss="mse")
    model.fit(rng.normal(1.0, 2.0, (16, 12, 12, 3)).astype("float32"), rng.normal(size=(16, 4)).astype("float32"),
              batch_size=8, epochs=1, verbose=0)
    return model


def build_concat():
    inp = k3.Input((10, 10, 4))
    a = L.Conv2D(6, 1, activation="swish")(inp)
    b = L.DepthwiseConv2D(3, padding="same")(inp)
    b = L.BatchNormalization()(b)
    x = L.Concatenate(axis=-1)([a, b, inp])
    x = L.AveragePooling2D(2)(x)
    x = L.GlobalMaxPooling2D()(x)
    out = L.Dense(3, activation="sigmoid")(x)
    return k3.Model(inp, out, name="concat")


def build_mobilenet_v2():
    return k3.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10, classifier_activation=None
    )


def build_text():
    tokens = k3.Input((12,), dtype="int32", name="tokens")
    x = L.Embedding(50, 8, mask_zero=True)(tokens)
    x = L.GlobalAveragePooling1D()(x)
    x = L.Dense(16, activation="gelu")(x)
    out = L.Dense(1, activation="sigmoid")(x)
    return k3.Model(tokens, out, name="text")


BUILDERS = {
    "small_cnn": build_small_cnn,
    "residual_bn": build_residual_bn,
    "concat": build_concat,
    "mobilenet_v2": build_mobilenet_v2,
    "text": build_text,
}


def sample_inputs(name, model, seed=123):
    """Inputs different from the ones the bridge verifies with (its seed is 0)."""
    rng = np.random.default_rng(seed)
    shape = [3] + [int(d) for d in model.inputs[0].shape[1:]]
    if name == "text":
        x = rng.integers(1, 50, size=shape).astype("int32")
        x[:, 8:] = 0  # padding, so the mask matters
        return x
    return rng.normal(0, 1.5, size=shape).astype("float32")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (path, loaded Keras 3 model, tf_keras model), built on first use."""
    cache = {}
    directory = tmp_path_factory.mktemp("keras3")

    def get(name):
        if name not in cache:
            original = BUILDERS[name]()
            if name in ("concat", "mobilenet_v2"):
                _randomize_batchnorm(original, np.random.default_rng(7))
            path = str(directory / f"{name}.keras")
            original.save(path)
            loaded = bridge.load_keras3(path)
            cache[name] = (path, loaded, bridge.to_tf_keras(loaded))
        return cache[name]

    return get


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_keras3_file_converts_to_tf_keras_with_same_outputs(converted, name):
    path, k3_model, tfk_model = converted(name)
    assert bridge.is_keras3_file(path)
    assert bridge.is_keras3_model(k3_model) and not bridge.is_keras3_model(tfk_model)
    assert isinstance(tfk_model, keras.Model)
    assert [w.shape for w in tfk_model.weights] == [tuple(w.shape) for w in k3_model.weights]
    x = sample_inputs(name, k3_model)
    want = k3.ops.convert_to_numpy(k3_model(x, training=False))
    assert_close(want, tfk_model(x, training=False).numpy(), 1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_round_trip_back_to_keras3_keeps_outputs(converted, name):
    _, k3_model, tfk_model = converted(name)
    back = bridge.to_keras3(tfk_model)
    assert bridge.is_keras3_model(back)
    x = sample_inputs(name, k3_model)
    want = k3.ops.convert_to_numpy(k3_model(x, training=False))
    assert_close(want, k3.ops.convert_to_numpy(back(x, training=False)), 1e-5)


@pytest.mark.parametrize("name", ["residual_bn", "mobilenet_v2", "text"])
def test_converted_model_runs_the_same_in_litert(converted, name):
    from ai_edge_litert.interpreter import Interpreter

    _, k3_model, tfk_model = converted(name)
    flatbuffer = tf.lite.TFLiteConverter.from_keras_model(tfk_model).convert()
    interpreter = Interpreter(model_content=flatbuffer)
    x = sample_inputs(name, k3_model)[:1]
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x.astype(inp["dtype"]))
    interpreter.invoke()
    want = k3.ops.convert_to_numpy(k3_model(x, training=False))
    assert_close(want, interpreter.get_tensor(out["index"]), 1e-4)


def test_batchnorm_moving_statistics_are_copied(converted):
    _, k3_model, tfk_model = converted("residual_bn")
    k3_bn = k3_model.get_layer("bn_residual")
    mean = k3.ops.convert_to_numpy(k3_bn.moving_mean)
    variance = k3.ops.convert_to_numpy(k3_bn.moving_variance)
    assert np.abs(mean).max() > 1e-3 and np.abs(variance - 1).max() > 1e-3  # training moved them
    tfk_bn = tfk_model.get_layer("bn_residual")
    np.testing.assert_array_equal(tfk_bn.moving_mean.numpy(), mean)
    np.testing.assert_array_equal(tfk_bn.moving_variance.numpy(), variance)


def test_converted_model_takes_tfmot_pruning_and_quantization(converted):
    from kcompress.backend import tfmot

    _, _, tfk_model = converted("residual_bn")
    x = sample_inputs("residual_bn", tfk_model)
    pruned = tfmot().sparsity.keras.prune_low_magnitude(tfk_model)
    assert pruned(x, training=False).shape == (3, 4)
    quantized = tfmot().quantization.keras.quantize_model(tfk_model)
    assert quantized(x, training=False).shape == (3, 4)


def test_sequential_model_converts(tmp_path):
    model = k3.Sequential([k3.Input((6,)), L.Dense(4, activation="tanh"), L.BatchNormalization(), L.Dense(2)])
    _randomize_batchnorm(model, np.random.default_rng(3))
    tfk_model = bridge.to_tf_keras(model)
    assert isinstance(tfk_model, keras.Sequential)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    assert_close(k3.ops.convert_to_numpy(model(x)), tfk_model(x).numpy(), 1e-5)


def test_nested_model_converts():
    block = k3.Sequential([k3.Input((8,)), L.Dense(8, activation="relu"), L.Dense(8)], name="block")
    inp = k3.Input((8,))
    out = L.Dense(2)(L.Add()([inp, block(inp)]))
    model = k3.Model(inp, out)
    tfk_model = bridge.to_tf_keras(model)
    assert isinstance(tfk_model.get_layer("block"), keras.Sequential)
    x = np.random.default_rng(0).normal(size=(3, 8)).astype("float32")
    assert_close(k3.ops.convert_to_numpy(model(x)), tfk_model(x).numpy(), 1e-5)


def _preprocessing_model():
    inp = k3.Input((16, 16, 3))
    x = L.Rescaling(1 / 127.5, offset=-1)(inp)
    x = L.RandomFlip()(x)
    x = L.RandomRotation(0.1)(x)  # Keras 3 records training=True on the node; inference must stay identity
    x = L.Resizing(8, 8)(x)
    return k3.Model(inp, L.SeparableConv2D(4, 3)(x))


def _recurrent_model():
    inp = k3.Input((6, 5))
    x = L.LSTM(4, return_sequences=True)(inp)
    x = L.Bidirectional(L.GRU(3, return_sequences=True))(x)
    return k3.Model(inp, L.TimeDistributed(L.Dense(2))(x))


def _adapted_normalization_model():
    norm = L.Normalization()
    norm.adapt(np.random.default_rng(0).uniform(0, 5, (20, 4)).astype("float32"))
    inp = k3.Input((4,))
    return k3.Model(inp, L.Dense(3)(norm(inp)))


@pytest.mark.parametrize("build", [_preprocessing_model, _recurrent_model, _adapted_normalization_model])
def test_layers_whose_arguments_differ_convert_both_ways(build):
    model = build()
    tfk_model = bridge.to_tf_keras(model)
    back = bridge.to_keras3(tfk_model)
    shape = [2] + [int(d) for d in model.inputs[0].shape[1:]]
    x = np.random.default_rng(5).uniform(0, 3, shape).astype("float32")
    want = k3.ops.convert_to_numpy(model(x, training=False))
    assert_close(want, tfk_model(x, training=False).numpy(), 1e-5)
    assert_close(want, k3.ops.convert_to_numpy(back(x, training=False)), 1e-5)


def test_tf_keras_dot_keras_file_is_not_keras3(tmp_path):
    inp = keras.Input((5,))
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    path = str(tmp_path / "written_by_tf_keras.keras")
    model.save(path)
    assert zipfile.is_zipfile(path)  # same container as Keras 3 writes
    assert not bridge.is_keras3_file(path)
    h5 = str(tmp_path / "written_by_tf_keras.h5")
    model.save(h5)
    assert not bridge.is_keras3_file(h5)
    assert not bridge.is_keras3_file(str(tmp_path))


def test_keras3_legacy_h5_is_detected(tmp_path):
    inp = k3.Input((5,))
    path = str(tmp_path / "written_by_keras3.h5")
    k3.Model(inp, L.Dense(2)(inp)).save(path)
    assert bridge.is_keras3_file(path)


def test_save_keras3_writes_a_keras3_file_with_same_outputs(tmp_path):
    inp = keras.Input((7,))
    x = keras.layers.Dense(5, activation="relu")(inp)
    x = keras.layers.BatchNormalization()(x)
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(x))
    model.layers[2].set_weights([w + 0.3 for w in model.layers[2].get_weights()])
    path = str(tmp_path / "out" / "model.keras")
    assert bridge.save_keras3(model, path) == path
    assert os.listdir(tmp_path / "out") == ["model.keras"]  # no temporary file left behind
    assert bridge.is_keras3_file(path)
    loaded = bridge.load_keras3(path)
    x = np.random.default_rng(0).normal(size=(4, 7)).astype("float32")
    assert_close(model(x).numpy(), k3.ops.convert_to_numpy(loaded(x)), 1e-5)
    with pytest.raises(KcompressError, match=r"\.keras"):
        bridge.save_keras3(model, str(tmp_path / "model.h5"))


class Scale(L.Layer):
    """A Keras 3 custom layer: multiplies by a constant factor and a learned per-channel gain."""

    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def build(self, input_shape):
        self.gain = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="gain")

    def call(self, x):
        return x * self.factor * self.gain

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


class TfkScale(keras.layers.Layer):
    """The same layer in tf_keras."""

    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def build(self, input_shape):
        self.gain = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="gain")

    def call(self, x):
        return x * self.factor * self.gain

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def _custom_model():
    inp = k3.Input((4,))
    x = L.Dense(3)(inp)
    out = L.Dense(2)(Scale(factor=3.0, name="scale")(x))
    model = k3.Model(inp, out)
    model.get_layer("scale").set_weights([np.array([0.5, 1.0, 2.0], "float32")])
    return model


@pytest.fixture
def scale_converters():
    yield
    bridge.unregister_layer_converter("Scale")
    bridge.unregister_layer_converter("TfkScale")


def test_custom_layer_is_refused_with_how_to_register():
    with pytest.raises(KcompressError) as err:
        bridge.to_tf_keras(_custom_model())
    message = str(err.value)
    assert "'scale' (Scale)" in message and "register_layer_converter('Scale'" in message


def test_registered_converter_makes_custom_layer_convert(scale_converters):
    def to_tfk(config):
        return TfkScale, {"name": config["name"], "factor": config["factor"]}

    def to_k3(config):
        return Scale, {"name": config["name"], "factor": config["factor"]}

    bridge.register_layer_converter("Scale", to_tf_keras=to_tfk)
    bridge.register_layer_converter("TfkScale", to_keras3=to_k3)
    model = _custom_model()
    tfk_model = bridge.to_tf_keras(model)
    assert isinstance(tfk_model.get_layer("scale"), TfkScale)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    want = k3.ops.convert_to_numpy(model(x))
    assert_close(want, tfk_model(x).numpy(), 1e-5)
    back = bridge.to_keras3(tfk_model)
    assert isinstance(back.get_layer("scale"), Scale)
    assert_close(want, k3.ops.convert_to_numpy(back(x)), 1e-5)


def test_verification_names_the_first_differing_layer(scale_converters):
    def wrong_factor(config):
        return TfkScale, {"name": config["name"], "factor": config["factor"] + 1.0}

    bridge.register_layer_converter("Scale", to_tf_keras=wrong_factor)
    with pytest.raises(KcompressError, match=r"layer 'scale' \(Scale\) is the first to differ"):
        bridge.to_tf_keras(_custom_model())
    assert isinstance(bridge.to_tf_keras(_custom_model(), verify=False), keras.Model)


@pytest.mark.parametrize(
    "make_layer, expected",
    [
        (lambda: L.RMSNormalization(name="rms"), r"'rms' \(RMSNormalization\) has no tf_keras counterpart"),
        (lambda: L.Dense(3, activation="hard_silu", name="d"), r"'d' \(Dense\) uses the activation 'hard_silu'"),
        (lambda: L.Dense(3, activation="hard_sigmoid", name="d"), r"'d' \(Dense\) uses the activation"),
        (lambda: L.Dense(3, lora_rank=2, name="d"), r"'d' \(Dense\) sets lora_rank=2"),
    ],
)
def test_keras3_only_features_are_refused_naming_the_layer(make_layer, expected):
    inp = k3.Input((4,))
    model = k3.Model(inp, make_layer()(inp))
    with pytest.raises(KcompressError, match=expected):
        bridge.to_tf_keras(model)


def test_load_keras3_explains_unknown_custom_class(tmp_path):
    class LocalScale(Scale):  # defined here, so Keras cannot import it when loading
        pass

    inp = k3.Input((3,))
    path = str(tmp_path / "custom.keras")
    k3.Model(inp, LocalScale(name="s")(inp)).save(path)
    with pytest.raises(KcompressError, match=r"custom class 'LocalScale'.*custom_objects"):
        bridge.load_keras3(path)
    loaded = bridge.load_keras3(path, custom_objects={"LocalScale": LocalScale})
    assert isinstance(loaded.get_layer("s"), LocalScale)


def test_exported_savedmodel_is_detected_and_converts_to_tflite(converted, tmp_path):
    _, k3_model, tfk_model = converted("small_cnn")
    export_dir = str(tmp_path / "export")
    k3_model.export(export_dir, verbose=False)
    assert bridge.is_exported_savedmodel(export_dir)
    assert tf.lite.TFLiteConverter.from_saved_model(export_dir).convert()[4:8] == b"TFL3"

    keras_savedmodel = str(tmp_path / "tf_keras_savedmodel")
    tfk_model.save(keras_savedmodel, save_format="tf")
    assert not bridge.is_exported_savedmodel(keras_savedmodel)  # tf_keras can reload its layers
    assert not bridge.is_exported_savedmodel(str(tmp_path / "missing"))

    message = bridge.exported_savedmodel_message("distill", export_dir)
    assert message.startswith("distill needs a trainable Keras model") and export_dir in message
    assert ".keras" in message and "post-training" in message and "\n" not in message


def test_subclassed_and_foreign_models_are_refused():
    class Sub(k3.Model):
        def call(self, x):
            return x

    with pytest.raises(KcompressError, match="subclassed"):
        bridge.to_tf_keras(Sub())
    with pytest.raises(KcompressError, match="expects a Keras 3 model"):
        bridge.to_tf_keras(keras.Sequential([keras.layers.Dense(1)]))
