"""Structured pruning of models as users build them (issue 14): nested backbones, squeeze-excite blocks, softmax and
other channel-coupling barriers, TF ops with constants, augmentation layers, and the FLOPs target check.

References: the original model's own outputs (a rebuild that keeps every channel, or drops only dead channels, must
give them to 1e-5) and MACs counted by :func:`kcompress.modelinfo.count_macs` on the models themselves.
"""

import numpy as np
import pytest

from kcompress.backend import keras, tf
from kcompress.data import Preprocess, open_data
from kcompress.modelinfo import count_macs
from kcompress.options import PruneOptions
from kcompress.pruning.api import prune
from kcompress.pruning.structured import ChannelGraph, prune_once, prune_structured

L = keras.layers


@pytest.fixture(scope="module")
def digits32(tmp_path_factory):
    """256 real digits upsampled to 32x32x3, pixels 0-255 (the applications models rescale themselves)."""
    src = open_data("digits")
    x = np.concatenate([b for b, _ in src.numpy_batches((8, 8, 1), batch_size=256)])[:256]
    x = np.repeat(np.kron(x, np.ones((1, 4, 4, 1), np.float32)), 3, axis=-1)
    path = tmp_path_factory.mktemp("d32") / "d32.npz"
    np.savez(path, x=x, y=src.labels[:256])
    return open_data(str(path), Preprocess())


def _images(data, n=64):
    return np.concatenate([x for x, _ in data.numpy_batches((32, 32, 3), batch_size=n)])[:n]


def _digits_x(n=32):
    val = open_data("digits:val", Preprocess(scale=1 / 255))
    return np.concatenate([x for x, _ in val.numpy_batches((8, 8, 1), batch_size=n)])[:n]


def _keep_all_matches(model, x):
    """A rebuild that keeps every channel gives the original's outputs (at inference)."""
    graph = ChannelGraph(model)
    np.testing.assert_allclose(graph.rebuild()(x, training=False).numpy(), model(x, training=False).numpy(),
                               atol=1e-5)
    return graph


def _root(graph, layer):
    return graph.root(graph.records[layer]["out"])


# ---------- 1. nested models


@pytest.mark.parametrize("build", ["sequential", "functional"])
def test_nested_backbone_is_flattened_and_pruned(build, digits32, tmp_path):
    keras.utils.set_random_seed(0)
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, alpha=0.35, input_shape=(32, 32, 3))
    if build == "sequential":
        model = keras.Sequential([L.Input((32, 32, 3)), L.Rescaling(1 / 127.5, -1), backbone,
                                  L.GlobalAveragePooling2D(), L.Dense(10)])
    else:
        inp = L.Input((32, 32, 3))
        x = L.GlobalAveragePooling2D()(backbone(L.Rescaling(1 / 127.5, -1)(inp)))
        model = keras.Model(inp, L.Dense(10)(x))
    x = _images(digits32)
    _keep_all_matches(model, x)
    logs = []
    res = prune_structured(model, None, None, PruneOptions(target_flops=0.5, epochs=0), log=logs.append)
    assert list(res.flattened) == [backbone.name] and any(backbone.name in m and "inlined" in m for m in logs)
    assert not any(isinstance(layer, keras.Model) for layer in res.model.layers)  # one flat model
    assert res.params_after <= 0.75 * res.params_before
    assert abs(1 - count_macs(res.model) / count_macs(model) - 0.5) <= 0.05  # count_macs traces the nested original
    assert res.target_met and res.shortfall == ""
    before, after = model.predict(x, verbose=0), res.model.predict(x, verbose=0)
    assert np.corrcoef(before.ravel(), after.ravel())[0, 1] > 0.5  # sanity: same network, half its channels
    path = str(tmp_path / "pruned.keras")
    keras.models.save_model(res.model, path)
    np.testing.assert_allclose(keras.models.load_model(path).predict(x, verbose=0), after, atol=1e-5)


# ---------- 2. target check


def _mostly_frozen():
    """Almost all MACs sit in c2, whose input and output channels feed softmax activations (barriers)."""
    inp = L.Input((8, 8, 1))
    x = L.Activation("softmax", name="sm1")(L.Conv2D(32, 3, padding="same", name="c1")(inp))
    x = L.Activation("softmax", name="sm2")(L.Conv2D(32, 3, padding="same", name="c2")(x))
    x = L.Conv2D(8, 1, activation="relu", name="c3")(x)
    return keras.Model(inp, L.Dense(10, name="head")(L.GlobalAveragePooling2D()(x)))


def test_missed_flops_target_is_reported(digits):
    from kcompress.zoo import digits_cnn

    r = prune(_mostly_frozen(), *digits, method="structured", target_flops=0.5, epochs=0, measure=False)
    d = r.details
    assert d["target_met"] is False and r.target_met is False
    reached = 1 - count_macs(r.model) / count_macs(_mostly_frozen())
    assert reached < 0.05 and f"{reached:.0%} fewer MACs reached of the 50% asked" in d["shortfall"]
    biggest = d["shortfall"].split("biggest frozen groups: ")[1]
    assert biggest.startswith("c2 (") and "softmax couples channels" in biggest
    assert any("target missed" in w for w in r.warnings)
    assert d["frozen"]["c2"].startswith("feeds sm2") and "c3" not in d["frozen"]
    ok = prune(digits_cnn(width=8), *digits, method="structured", target_flops=0.5, epochs=0, measure=False)
    assert ok.details["target_met"] is True and ok.details["shortfall"] == "" and ok.target_met
    assert abs(1 - count_macs(ok.model) / count_macs(digits_cnn(width=8)) - 0.5) <= 0.05


# ---------- 3. barriers


def test_softmax_anywhere_is_a_barrier_and_elementwise_activations_pass():
    inp = L.Input((8, 8, 1))
    x = L.Activation("gelu", name="gelu")(L.Conv2D(8, 3, padding="same", name="c1")(inp))
    x = L.Activation("softmax", name="act_sm")(L.Conv2D(12, 3, padding="same", name="c2")(x))
    x = L.Activation("hard_sigmoid")(L.Conv2D(12, 3, padding="same", activation="swish", name="c3")(x))
    x = L.Softmax(name="sm_layer")(L.Conv2D(12, 1, name="c4")(x))
    x = tf.nn.softmax(L.Conv2D(12, 1, name="c5")(x))
    x = L.Conv2D(16, 1, activation="relu", name="c6")(x)
    x = L.Dense(16, activation="softmax", name="d_sm")(L.GlobalAveragePooling2D()(x))
    x = L.Dense(16, activation="tanh", name="d2")(x)
    model = keras.Model(inp, L.Dense(10, name="head")(x))
    graph = _keep_all_matches(model, _digits_x())
    frozen = graph.frozen_layers()
    assert frozen["c2"] == "feeds act_sm (activation softmax couples channels)"
    assert "softmax couples channels" in frozen["c4"] and "softmax" in frozen["c5"]
    assert frozen["d_sm"] == "activation softmax couples channels (in d_sm)"
    assert {"c1", "c3", "c6", "d2"}.isdisjoint(frozen)
    new, _ = prune_once(model, PruneOptions(ratio=0.5), ratio=0.5)
    widths = {n: new.get_layer(n).kernel.shape[-1] for n in ("c1", "c2", "c3", "c4", "c5", "c6", "d_sm", "d2")}
    assert widths == {"c1": 4, "c2": 12, "c3": 6, "c4": 12, "c5": 12, "c6": 8, "d_sm": 16, "d2": 8}
    assert new.get_layer("d_sm").kernel.shape[0] == 8  # the softmax Dense's inputs were pruned
    assert new(_digits_x()).shape == (32, 10)


# ---------- 4. TF ops with constants


DEAD = [0, 3, 5, 6]  # channels of c1 the tests kill (zero filters, and zero where a constant is added)


def _op_model(per_channel: bool):
    inp = L.Input((8, 8, 1))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inp)
    if per_channel:
        shift = np.linspace(-0.3, 0.3, 8).astype(np.float32)
        shift[DEAD] = 0.0
        x = x * np.linspace(0.5, 2.0, 8).astype(np.float32)  # a value per channel
        x = tf.multiply(x, np.linspace(1.0, 0.2, 8).astype(np.float32).reshape(1, 1, 8))
        x = x + tf.constant(shift)
        x = tf.maximum(np.linspace(-1.0, -0.1, 8).astype(np.float32).reshape(1, 1, 8), x)  # the first operand
    else:
        x = (x + 3.0) * (1.0 / 6.0)  # scalars (MobileNetV3's hard_sigmoid)
        x = x * np.full((8, 8, 1), 0.5, np.float32)  # size 1 along the channels
    x = L.Conv2D(12, 3, padding="same", activation="relu", name="c2")(tf.nn.relu(x))
    return keras.Model(inp, L.Dense(10, name="head")(L.GlobalAveragePooling2D()(x)))


@pytest.mark.parametrize("per_channel", [False, True])
def test_tf_op_constants_pass_or_are_sliced_with_the_channels(per_channel):
    model = _op_model(per_channel)
    x = _digits_x()
    assert "c1" not in _keep_all_matches(model, x).frozen_layers()
    pruned, _ = prune_once(model, PruneOptions(ratio=0.5), ratio=0.5)
    assert pruned.get_layer("c1").filters == 4 and pruned(x).shape == (32, 10)
    if per_channel:  # dead channels of c1 (zero filters, zero shift) go without changing the outputs
        k, b = model.get_layer("c1").get_weights()
        k[..., DEAD], b[DEAD] = 0.0, 0.0
        model.get_layer("c1").set_weights([k, b])
        graph = ChannelGraph(model)
        graph.keep[_root(graph, "c1")][DEAD] = False
        new = graph.rebuild()
        assert new.get_layer("c1").filters == 4
        np.testing.assert_allclose(new(x).numpy(), model(x).numpy(), atol=1e-5)


# ---------- 5. squeeze-excite


@pytest.mark.parametrize("name, expand, se_squeeze, se_expand", [
    ("MobileNetV3Small", "{}/expand", "{}/squeeze_excite/Conv", "{}/squeeze_excite/Conv_1"),
    ("EfficientNetB0", "{}_expand_conv", "{}_se_reduce", "{}_se_expand")])
def test_squeeze_excite_blocks_share_a_mask_and_prune(name, expand, se_squeeze, se_expand, digits32):
    model = getattr(keras.applications, name)(input_shape=(32, 32, 3), weights=None, classes=10)
    graph = ChannelGraph(model)
    names = {layer.name for layer in model.layers}
    blocks = [n[:-len(se_expand.format(""))] for n in names if n.endswith(se_expand.format(""))]
    checked = 0
    for blk in blocks:
        if expand.format(blk) in names:  # the SE expand conv scales the block's expanded features: one group
            assert _root(graph, se_expand.format(blk)) == _root(graph, expand.format(blk)), blk
            checked += 1
        squeeze = _root(graph, se_squeeze.format(blk))
        assert squeeze in graph.groups() and graph.members(squeeze) == [se_squeeze.format(blk)]
    assert checked >= 8
    res = prune_structured(model, None, None, PruneOptions(target_flops=0.5, epochs=0))
    assert res.params_after <= 0.75 * res.params_before and res.target_met
    assert abs(1 - count_macs(res.model) / count_macs(model) - 0.5) <= 0.05
    pruned = {layer.name: layer for layer in res.model.layers}
    assert any(pruned[se_squeeze.format(b)].filters < model.get_layer(se_squeeze.format(b)).filters for b in blocks)
    assert res.model.predict(_images(digits32, 8), verbose=0).shape == (8, 10)


# ---------- 6. augmentation layers


def test_augmentation_layers_pass_channels_through():
    augment = keras.Sequential([L.RandomFlip("horizontal", name="flip"), L.RandomRotation(0.1, name="rotate")],
                               name="augment")
    inp = L.Input((8, 8, 1))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(augment(inp))
    x = L.RandomZoom(0.1, name="zoom")(x)  # mid-graph: c1's channels go through it
    x = L.Conv2D(12, 3, padding="same", activation="relu", name="c2")(x)
    model = keras.Model(inp, L.Dense(10, name="head")(L.GlobalAveragePooling2D()(x)))
    graph = _keep_all_matches(model, _digits_x())  # augmentation is identity at inference
    assert set(graph.frozen_layers()) == {"head"}
    assert graph.records["zoom"]["kind"] == "pass" and graph.records["flip"]["kind"] == "pass"
    res = prune_structured(model, None, None, PruneOptions(ratio=0.5, epochs=0))
    assert res.model.get_layer("c1").filters == 4 and res.model.get_layer("c2").filters == 6
    assert res.flattened == {"augment": 2}
    assert res.model(_digits_x(), training=False).shape == (32, 10)
