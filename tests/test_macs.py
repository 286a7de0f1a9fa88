"""MAC counting against TensorFlow's profiler (conftest.profiler_macs) and against arithmetic written out here.

The profiler has FLOP formulas for Conv2D/Conv3D/DepthwiseConv2dNative/Conv2DBackpropInput/MatMul/BatchMatMul but
none for Einsum or Conv3DBackpropInputV2, so EinsumDense, MultiHeadAttention and Conv3DTranspose are checked by hand.
"""

import numpy as np
import pytest
from conftest import profiler_macs

from kcompress.backend import keras
from kcompress.errors import KcompressError
from kcompress.modelinfo import count_macs, macs_by_layer

L = keras.layers


def _by_name(model, input_shape=None) -> dict:
    return {path: macs for path, _, macs in macs_by_layer(model, input_shape)}


@pytest.mark.parametrize("build, size", [
    (lambda: keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), alpha=0.35), None),
    (lambda: keras.applications.MobileNetV2(weights=None), None),
    (lambda: keras.applications.ResNet50(weights=None), None),
], ids=["mobilenetv2-0.35-96", "mobilenetv2-224", "resnet50-224"])
def test_applications_agree_with_the_profiler(build, size):
    model = build()
    ours, ref = count_macs(model, size), profiler_macs(model, size)
    assert ours == pytest.approx(ref, rel=0.02), (ours, ref)


def _fully_convolutional():
    inp = L.Input((None, None, 3))
    x = L.Conv2D(8, 3, strides=2, padding="same")(inp)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same")(x)
    x = L.Conv2D(16, 3, padding="same", groups=4)(x)
    x = L.SeparableConv2D(12, 3, strides=2, padding="same")(x)
    x = L.Conv2DTranspose(6, 3, strides=2, padding="same")(x)
    return keras.Model(inp, L.Conv2D(5, 1)(x))


def test_fully_convolutional_model_counts_at_a_stated_size():
    model = _fully_convolutional()
    with pytest.raises(KcompressError, match=r"input_shape=\(224, 224, 3\)"):
        count_macs(model)  # no size of its own: never a silent 1x1
    for size in [(64, 64, 3), (32, 48, 3)]:
        assert count_macs(model, input_shape=size) == profiler_macs(model, size)
    # by hand at 64x64: 32x32 after the stem, 16x16 after the separable conv, 32x32 after the transposed conv
    hand = (32 * 32 * 9 * 3 * 8  # stem
            + 32 * 32 * 9 * 8 * 2  # depthwise, multiplier 2
            + 32 * 32 * 9 * (16 // 4) * 16  # 4 groups of 4 input channels
            + 16 * 16 * 9 * 16 + 16 * 16 * 16 * 12  # separable: depthwise then 1x1
            + 16 * 16 * 9 * 12 * 6  # transposed: every input position x kernel x cin x filters
            + 32 * 32 * 6 * 5)
    assert count_macs(model, input_shape=(64, 64, 3)) == hand


def test_stated_size_must_fit_the_model():
    model = _fully_convolutional()
    with pytest.raises(KcompressError, match="does not fit"):
        count_macs(model, input_shape=(64, 64, 4))
    with pytest.raises(KcompressError, match="does not fit"):
        count_macs(model, input_shape=(1, 64, 64, 3))  # a batch axis given by mistake
    fixed = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), alpha=0.35)
    with pytest.raises(KcompressError, match="does not fit"):
        count_macs(fixed, input_shape=(64, 64, 3))


def test_open_sizes_that_no_layer_multiplies_need_no_stated_size():
    inp = L.Input((None, None, 3))
    model = keras.Model(inp, L.Dense(10)(L.GlobalAveragePooling2D()(inp)))
    assert count_macs(model) == 3 * 10


def test_1d_separable_depthwise_grouped_and_transposed_convs():
    inp = L.Input((32, 6))
    x = L.SeparableConv1D(8, 3, depth_multiplier=2, padding="same", name="sep")(inp)
    x = L.DepthwiseConv1D(5, strides=2, name="dw")(x)  # valid: (32 - 5) // 2 + 1 = 14 steps
    x = L.Conv1DTranspose(4, 3, strides=2, padding="same", name="tr")(x)  # 14 -> 28 steps
    x = L.Conv1D(6, 3, groups=2, name="grouped")(x)  # valid: 26 steps
    model = keras.Model(inp, x)
    hand = {"sep": 32 * 3 * 6 * 2 + 32 * 12 * 8, "dw": 14 * 5 * 8, "tr": 14 * 3 * 8 * 4, "grouped": 26 * 3 * 2 * 6}
    assert {k: v for k, v in _by_name(model).items() if v} == hand
    assert count_macs(model) == sum(hand.values()) == profiler_macs(model)


def test_3d_convs_and_transposed_conv():
    inp = L.Input((4, 4, 4, 2))
    x = L.Conv3DTranspose(5, 3, strides=2, padding="same", name="tr")(inp)  # 4^3 -> 8^3
    x = L.Conv3D(3, 3, name="conv")(x)  # valid: 6^3
    model = keras.Model(inp, x)
    hand = {"tr": 4**3 * 27 * 2 * 5, "conv": 6**3 * 27 * 5 * 3}
    assert {k: v for k, v in _by_name(model).items() if v} == hand
    # TF's profiler has no FLOP formula for Conv3DBackpropInputV2: it sees the Conv3D only
    assert profiler_macs(model) == hand["conv"]


def test_dense_on_sequences_attention_dot_and_time_distributed():
    inp = L.Input((10, 16))
    x = L.Dense(8, name="proj")(inp)  # per step
    a = L.Attention(name="att")([x, x])  # scores 10x10 over 8 features, then 10x10 weights over 8 features
    b = L.AdditiveAttention(name="add")([x, x])  # element-wise scores (no MACs), then the weights over 8 features
    d = L.Dot(axes=2, name="dot")([a, b])  # (10, 10) outputs over 8 features
    t = L.TimeDistributed(L.Dense(3), name="td")(d)
    model = keras.Model(inp, t)
    hand = {"proj": 10 * 16 * 8, "att": 10 * 10 * 8 + 10 * 10 * 8, "add": 10 * 10 * 8, "dot": 10 * 10 * 8,
            "td": 10 * 10 * 3}
    assert {k: v for k, v in _by_name(model).items() if v} == hand
    assert count_macs(model) == sum(hand.values()) == profiler_macs(model)


def test_time_distributed_conv():
    inp = L.Input((3, 8, 8, 2))
    model = keras.Model(inp, L.TimeDistributed(L.Conv2D(4, 3, padding="same"))(inp))
    assert count_macs(model) == 3 * 64 * 9 * 2 * 4 == profiler_macs(model)


def test_multi_head_attention_and_einsum_dense_by_hand():
    q_in, v_in = L.Input((10, 16)), L.Input((12, 8))
    att = L.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(q_in, v_in)
    out = L.EinsumDense("abc,cd->abd", output_shape=(None, 32), name="ein")(att)
    model = keras.Model([q_in, v_in], out)
    mha = (10 * 16 * 2 * 4  # query projection
           + 12 * 8 * 2 * 4 + 12 * 8 * 2 * 4  # key and value projections (value_dim = key_dim)
           + 2 * 10 * 12 * 4  # scores: heads x queries x keys x key_dim
           + 2 * 10 * 12 * 4  # scores x values
           + 10 * 2 * 4 * 16)  # output projection back to the query's 16 features
    assert _by_name(model) == {"mha": mha, "ein": 10 * 16 * 32}
    # at a stated sequence length (the model's own lengths are fixed, so only those fit)
    assert count_macs(model, input_shape=[(10, 16), (12, 8)]) == mha + 10 * 16 * 32


def test_nested_backbone_counts_as_backbone_plus_head():
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, alpha=0.35)  # declared (None, None, 3)
    inp = L.Input((96, 96, 3))
    x = L.GlobalAveragePooling2D()(backbone(inp, training=False))
    model = keras.Model(inp, L.Dense(5)(x))
    backbone_ref = profiler_macs(backbone, (96, 96, 3))
    assert count_macs(model) == backbone_ref + 1280 * 5 == profiler_macs(model)
    assert count_macs(backbone, input_shape=(96, 96, 3)) == backbone_ref
    with pytest.raises(KcompressError, match="input_shape"):
        count_macs(backbone)
    assert any(path.startswith(backbone.name + "/") for path in _by_name(model))


def test_shared_layer_counts_once_per_call():
    inp = L.Input((8, 8, 4))
    shared = L.Conv2D(4, 3, padding="same")
    x = shared(L.Conv2D(4, 1)(shared(inp)))
    model = keras.Model(inp, x)
    assert count_macs(model) == 2 * 64 * 9 * 4 * 4 + 64 * 4 * 4 == profiler_macs(model)


def test_subclassed_model_uses_recorded_shapes():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.a, self.b = L.Dense(6), L.Dense(2)

        def call(self, x):
            return self.b(self.a(x))

    net = Net()
    net(np.zeros((1, 5), np.float32))  # eagerly: autograph may not convert a class defined in a test
    assert count_macs(net) == 5 * 6 + 6 * 2
    with pytest.raises(KcompressError, match="subclassed"):
        count_macs(net, input_shape=(5,))
