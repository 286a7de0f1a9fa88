"""Transfer-learning models as users build them: a keras.applications backbone nested in a small model with a new
head and a Rescaling layer in front. One flat graph view (kcompress.graph) serves every stage."""

import numpy as np
import pytest

from kcompress.backend import keras
from kcompress.data import Preprocess, open_data
from kcompress.graph import augmentation_layers, flatten_model, nesting

L = keras.layers


@pytest.fixture(scope="module")
def digits32(digits32_npz):
    """Real digits upsampled to 32x32x3, 0-255 (the transfer models rescale them)."""
    return open_data(digits32_npz, Preprocess(scale=1.0))


def transfer(backbone, sequential=True):
    """Rescaling -> backbone (nested, one layer) -> pooling -> new head, as a Keras tutorial builds it."""
    if sequential:
        return keras.Sequential([L.Input((32, 32, 3)), L.Rescaling(1 / 127.5, -1), backbone,
                                 L.GlobalAveragePooling2D(), L.Dense(10)], name="transfer")
    inp = L.Input((32, 32, 3))
    x = backbone(L.Rescaling(1 / 127.5, -1)(inp))
    return keras.Model(inp, L.Dense(10)(L.GlobalAveragePooling2D()(x)), name="transfer")


def mobilenet(alpha=0.35):
    return keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=alpha)


def sample(n=4, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, 32, 32, 3)).astype("float32")


@pytest.mark.parametrize("sequential", [True, False])
def test_flat_view_gives_the_same_outputs_and_saves(sequential, tmp_path):
    model = transfer(mobilenet(), sequential)
    flat, info = flatten_model(model, with_nesting=True)
    assert not any(isinstance(la, keras.Model) for la in flat.layers)
    assert list(info.models) == [model.layers[1 if sequential else 2].name] and "inlined" in info.describe()
    def work(layers):  # layers that compute (no input layers, no models)
        return [la for la in layers if not isinstance(la, (L.InputLayer, keras.Model))]

    assert len(work(flat.layers)) == len(work(model.layers)) + len(work(model.layers[1 if sequential else 2].layers))
    x = sample()
    np.testing.assert_allclose(flat(x, training=False).numpy(), model(x, training=False).numpy(), atol=1e-5)
    assert flat.count_params() == model.count_params()
    path = str(tmp_path / "flat.keras")
    flat.save(path)
    back = keras.models.load_model(path)  # plain tf_keras, no kcompress objects
    np.testing.assert_allclose(back(x, training=False).numpy(), model(x, training=False).numpy(), atol=1e-5)


def test_same_names_in_two_nested_models_and_shared_layers():
    """Two nested Sequentials holding different layers named alike get renamed copies (same weights); a layer object
    called twice stays one layer (one set of weights) in the flat view."""
    a = keras.Sequential([L.Conv2D(4, 3, padding="same", name="c"), L.ReLU(name="r")], name="a")
    b = keras.Sequential([L.Conv2D(4, 3, padding="same", name="c"), L.ReLU(name="r")], name="b")
    shared = L.Conv2D(4, 1, name="shared")
    inp = L.Input((16, 16, 3))
    x = L.Add()([shared(a(inp)), shared(b(inp))])
    model = keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(x)))
    flat, info = flatten_model(model, with_nesting=True)
    names = [la.name for la in flat.layers]
    assert len(names) == len(set(names))
    assert info.renamed == {"b/c": "b_c", "b/r": "b_r"}
    assert names.count("shared") == 1 and len(flat.get_layer("shared")._inbound_nodes) >= 2
    np.testing.assert_array_equal(flat.get_layer("b_c").get_weights()[0], b.get_layer("c").get_weights()[0])
    assert flat.count_params() == model.count_params()
    x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(flat(x).numpy(), model(x).numpy(), atol=1e-5)


def test_subclassed_nested_model_is_named():
    from kcompress.errors import KcompressError

    class Sub(keras.Model):
        def __init__(self):
            super().__init__(name="my_sub")
            self.c = L.Conv2D(2, 3)

        def call(self, x):
            return self.c(x)

    inp = L.Input((8, 8, 1))
    model = keras.Model(inp, L.Dense(2)(L.Flatten()(Sub()(inp))))
    with pytest.raises(KcompressError, match="my_sub"):
        flatten_model(model)
    with pytest.raises(KcompressError, match="my_sub"):
        nesting(model)


def test_magnitude_pruning_prunes_the_nested_backbone(digits32):
    from kcompress.options import PruneOptions
    from kcompress.pruning.magnitude import prune_magnitude

    model = transfer(mobilenet())
    backbone = model.layers[1]
    logs = []
    res = prune_magnitude(model, digits32, None, PruneOptions(method="magnitude", sparsity=0.5, epochs=1),
                          verbose=0, log=logs.append)
    assert res.flattened == {backbone.name: len(backbone.layers)}
    assert any("inlined" in m for m in logs) and any("depthwise" in m for m in logs)
    convs = [la.name for la in backbone.layers if type(la) is L.Conv2D]
    assert len(convs) > 30 and set(convs) <= set(res.pruned)
    for name in convs:  # every backbone convolution is at the target, measured on the output model's weights
        w = res.model.get_layer(name).get_weights()[0]
        assert abs(float(np.mean(w == 0)) - 0.5) < 0.02, name
    dw = [la.name for la in backbone.layers if isinstance(la, L.DepthwiseConv2D)]
    assert dw and all("depthwise" in res.skipped[n] for n in dw)
    assert res.target_met
    # the user's model is untouched
    assert float(np.mean(backbone.get_layer(convs[0]).get_weights()[0] == 0)) < 0.01


@pytest.mark.parametrize("family", ["MobileNetV3Small", "ConvNeXtTiny"])
def test_student_width_scales_inside_the_backbone(family):
    from kcompress.distillation.students import derive_student

    backbone = getattr(keras.applications, family)(include_top=False, weights=None, input_shape=(32, 32, 3))
    model = transfer(backbone)
    logs = []
    student = derive_student(model, 0.5, log=logs.append)
    assert any("inlined" in m for m in logs)
    assert not any(isinstance(la, keras.Model) for la in student.layers)
    teacher = flatten_model(model)
    halved = kept = 0
    for la in teacher.layers[:-1]:  # convolutions and Dense layers (ConvNeXt's pointwise ones), not the classifier
        if (type(la) is L.Conv2D and la.groups == 1) or type(la) is L.Dense:
            attr = "filters" if type(la) is L.Conv2D else "units"
            new, old = getattr(student.get_layer(la.name), attr), getattr(la, attr)
            halved += new == max(1, round(0.5 * old))
            kept += new == old
    assert halved > 0.5 * (halved + kept)  # most convolutions inside the backbone are narrower
    assert student.get_layer(teacher.layers[-1].name).units == 10  # the classifier keeps its classes
    assert student(sample(2)).shape == (2, 10)
    assert student.count_params() < 0.6 * model.count_params()


def test_augmentation_layers_are_inert_in_every_export(digits32):
    """RandomFlip/RandomRotation/... in front of the model: the fp32 and int8 .tflite files are deterministic and
    equal the Keras model at inference."""
    from ai_edge_litert.interpreter import Interpreter

    from kcompress.options import QuantizeOptions
    from kcompress.quantization.ptq import convert

    aug = keras.Sequential([L.RandomFlip(), L.RandomRotation(0.2), L.RandomZoom(0.2), L.RandomTranslation(0.1, 0.1),
                            L.RandomContrast(0.3)], name="augment")
    inp = L.Input((32, 32, 3))
    x = L.Rescaling(1 / 255)(aug(inp))
    x = L.GlobalAveragePooling2D()(L.ReLU()(L.Conv2D(8, 3)(x)))
    model = keras.Model(inp, L.Dense(10)(x))
    assert len(augmentation_layers(model)) == 5
    xs = np.concatenate([b for b, _ in digits32.numpy_batches((32, 32, 3), 64)])[:16]
    ref = model(xs, training=False).numpy()
    calib = lambda: (xs[i:i + 1] for i in range(16))  # noqa: E731
    for mode in ("fp32", "int8"):
        tfl = convert(model) if mode == "fp32" else convert(model, QuantizeOptions(mode="int8", io="float"),
                                                            calibration=calib)
        it = Interpreter(model_content=tfl)
        it.allocate_tensors()
        i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
        runs = []
        for _ in range(3):
            out = []
            for row in xs:
                it.set_tensor(i, row[None])
                it.invoke()
                out.append(it.get_tensor(o)[0].copy())
            runs.append(np.stack(out))
        np.testing.assert_array_equal(runs[0], runs[1])
        np.testing.assert_array_equal(runs[0], runs[2])
        tol = 1e-4 if mode == "fp32" else 0.05 * np.abs(ref).max()
        np.testing.assert_allclose(runs[0], ref, atol=tol)


def test_keras3_transfer_model_flattens_and_goes_back_to_keras3(tmp_path):
    """A Keras 3 model with a nested keras.applications backbone: the bridge rebuilds it in tf_keras, the flat view
    computes the same, and the flat model saved back as Keras 3 loads with Keras 3 alone and predicts the same."""
    from kcompress import keras3 as bridge
    from kcompress.backend import keras3

    k3 = keras3()
    backbone = k3.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35)
    model = k3.Sequential([k3.Input((32, 32, 3)), k3.layers.Rescaling(1 / 127.5, -1), backbone,
                           k3.layers.GlobalAveragePooling2D(), k3.layers.Dense(10)])
    x = sample()
    want = k3.ops.convert_to_numpy(model(x, training=False))
    tfk = bridge.to_tf_keras(model)
    flat = flatten_model(tfk)
    assert not any(isinstance(la, keras.Model) for la in flat.layers)
    np.testing.assert_allclose(flat(x, training=False).numpy(), want, atol=1e-5)
    path = bridge.save_keras3(flat, str(tmp_path / "flat.keras"))
    back = k3.saving.load_model(path)
    np.testing.assert_allclose(k3.ops.convert_to_numpy(back(x, training=False)), want, atol=1e-5)


def test_qat_of_a_nested_backbone_folds_batchnorm_like_ptq(digits32):
    """The flat view holds fresh layer copies: with the user's layer objects (which also belong to the nested model's
    graph) tfmot saw each convolution with two consumers and left 52 BatchNorms as float MUL/ADD ops."""
    from collections import Counter

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    import kcompress as kc

    model = transfer(mobilenet())

    def ops(tflite):
        it = Interpreter(model_content=tflite, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        return Counter(o["op_name"] for o in it._get_ops_details())

    qat_ops = ops(kc.qat(model, digits32, epochs=1, bench=False).tflite)
    ptq_ops = ops(kc.quantize(model, digits32, mode="int8", calibration_samples=32).tflite)
    assert qat_ops == ptq_ops
    # Rescaling's one MUL and one ADD, and MobileNetV2's ten residual adds: no BatchNorm left as arithmetic
    assert qat_ops["MUL"] == 1 and qat_ops["ADD"] == 11
