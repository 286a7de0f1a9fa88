"""Block (layer) pruning and latency targets: which blocks are removable, bypassing equals a zeroed branch, measured
importance, FLOPs and latency targets, options and CLI. References: the float model's own outputs (with the branch
zeroed through its last BatchNorm's gamma and beta), hand arithmetic and TensorFlow's profiler."""

import json

import numpy as np
import pytest
from conftest import profiler_macs, run_cli

from kcompress.backend import keras, tf
from kcompress.errors import UsageError
from kcompress.evaluation import probabilities
from kcompress.modelinfo import count_macs
from kcompress.options import OptionError, PruneOptions
from kcompress.pruning.blocks import Staged, block_importance, find_blocks, fp32_latency_ms, remove_blocks
from kcompress.pruning.structured import prune_structured
from kcompress.train import fit
from kcompress.zoo import mobilenetv2, resnet_cifar

L = keras.layers
IDENTITY = ["s0b0_add", "s0b1_add", "s1b1_add", "s2b1_add"]  # resnet_cifar(blocks_per_stage=2): s1b0, s2b0 project


def _randomize_bn(model, seed=0):
    """Random BatchNorm statistics and affine weights, so that every layer changes the outputs."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.2, b.shape),
                               rng.normal(0, 0.2, m.shape), rng.uniform(0.5, 1.5, v.shape)])
    return model


def _copy(model):
    twin = keras.Model.from_config(model.get_config())
    twin.set_weights(model.get_weights())
    return twin


def _zeroed(model, layers):
    """The trusted reference: a copy whose given BatchNorm layers output exactly 0 (gamma = beta = 0)."""
    twin = _copy(model)
    for name in layers:
        g, b, m, v = twin.get_layer(name).get_weights()
        twin.get_layer(name).set_weights([np.zeros_like(g), np.zeros_like(b), m, v])
    return twin


@pytest.fixture(scope="module")
def resnet32():
    return _randomize_bn(resnet_cifar(width=8, blocks_per_stage=2))


@pytest.fixture(scope="module")
def trained(digits):
    """resnet_cifar at 8x8x1 trained briefly on digits (its blocks then matter unequally)."""
    model = resnet_cifar(input_shape=(8, 8, 1), width=8, blocks_per_stage=2)
    fit(model, digits[0], digits[1], epochs=3, lr=3e-3, verbose=0)
    return model


# ---------------------------------------------------------------------------------------------------- detection


def test_identity_blocks_are_found_and_projection_blocks_are_not(resnet32):
    blocks = find_blocks(resnet32)
    assert [b.name for b in blocks] == IDENTITY
    for b in blocks:
        p = b.name[:-3]
        assert b.layers == tuple(p + s for s in ("conv1", "bn1", "relu1", "conv2", "bn2")) and b.first == p + "conv1"
    assert [b.shortcut[0] for b in blocks] == ["stem_relu", "s0b0_relu2", "s1b0_relu2", "s2b0_relu2"]
    # two 3x3 convs of W channels on an S x S map: 32x32x8, 16x16x16, 8x8x32 all give the same MACs
    assert [b.macs for b in blocks] == [2 * 32 * 32 * 8 * 8 * 9] * 4
    for b in blocks:  # what removing a block saves, by TensorFlow's profiler
        assert profiler_macs(resnet32) - profiler_macs(remove_blocks(resnet32, [b])) == b.macs


def test_mobilenetv2_inverted_residuals_are_blocks():
    model = mobilenetv2()
    blocks = find_blocks(model)
    # the stride-1 repeats of MobileNetV2 (Sandler et al. 2018): blocks 2, 4-5, 7-9, 11-12 and 14-15
    assert [b.name for b in blocks] == [f"block_{i}_add" for i in (2, 4, 5, 7, 8, 9, 11, 12, 14, 15)]
    assert all(b.first.endswith("_expand") and b.layers[-1].endswith("_project_BN") for b in blocks)
    assert count_macs(remove_blocks(model, blocks)) == count_macs(model) - sum(b.macs for b in blocks)


def test_branches_that_are_not_closed_are_not_blocks():
    inp = L.Input((8, 8, 4))
    stem = L.Conv2D(4, 1, name="stem")(inp)
    y = L.Conv2D(4, 3, padding="same", name="b1")(stem)
    a1 = L.Add(name="open_add")([stem, L.Concatenate(name="cat")([y[..., :2], inp[..., :2]])])  # reads the input
    z = L.Conv2D(4, 3, padding="same", name="b2")(a1)
    a2 = L.Add(name="leaky_add")([a1, z])  # b2 also feeds the head below
    w = L.Conv2D(4, 3, padding="same", name="b3")(a2)
    a3 = L.Add(name="plus")([a2, w])
    out = L.Concatenate()([L.GlobalAveragePooling2D()(a3), L.GlobalAveragePooling2D()(z)])
    model = keras.Model(inp, out)
    assert [b.name for b in find_blocks(model)] == ["plus"]
    assert find_blocks(keras.Sequential([L.Input((4,)), L.Dense(3)])) == []


# ---------------------------------------------------------------------------------------------------- rebuild


def test_rebuild_with_nothing_removed_gives_the_float_models_outputs(resnet32):
    x = np.random.default_rng(1).uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
    same = remove_blocks(resnet32, [])
    assert same is not resnet32 and len(same.layers) == len(resnet32.layers)
    np.testing.assert_array_equal(same.predict(x, verbose=0), resnet32.predict(x, verbose=0))


@pytest.mark.parametrize("names", [["s0b1_add"], ["s2b1_add"], ["s0b0_add", "s0b1_add"], IDENTITY])
def test_removing_blocks_equals_zeroing_their_branches(resnet32, names):
    x = np.random.default_rng(2).uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
    weights = [w.copy() for w in resnet32.get_weights()]
    blocks = [b for b in find_blocks(resnet32) if b.name in names]
    new = remove_blocks(resnet32, blocks)
    reference = _zeroed(resnet32, [n[:-3] + "bn2" for n in names])
    assert not np.allclose(reference.predict(x, verbose=0), resnet32.predict(x, verbose=0))
    np.testing.assert_allclose(new.predict(x, verbose=0), reference.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert not {n for b in blocks for n in (*b.layers, b.name)} & {layer.name for layer in new.layers}
    assert count_macs(new) == count_macs(resnet32) - sum(b.macs for b in blocks)
    assert all(np.array_equal(a, b) for a, b in zip(weights, resnet32.get_weights()))  # the input is untouched


def test_chained_adds_and_tensor_keywords_are_rewired():
    """Add after Add with nothing between, and a TF op taking the bypassed Add's output as a keyword tensor."""
    inp = L.Input((6, 6, 4))
    x = L.Conv2D(4, 1, name="stem")(inp)
    y1 = L.BatchNormalization(name="bn_a")(L.Conv2D(4, 3, padding="same", name="conv_a")(x))
    a1 = L.Add(name="add_a")([x, y1])
    y2 = L.BatchNormalization(name="bn_b")(L.Conv2D(4, 3, padding="same", name="conv_b")(a1))
    a2 = L.Add(name="add_b")([y2, a1])  # the shortcut second
    h = tf.math.add(L.Conv2D(4, 1, name="head")(a2), a2)
    model = _randomize_bn(keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(h))))
    blocks = find_blocks(model)
    assert [b.name for b in blocks] == ["add_a", "add_b"]
    x_ = np.random.default_rng(3).normal(size=(4, 6, 6, 4)).astype(np.float32)
    ref = _zeroed(model, ["bn_a", "bn_b"]).predict(x_, verbose=0)
    np.testing.assert_allclose(remove_blocks(model, blocks).predict(x_, verbose=0), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- importance


def test_importance_is_the_val_loss_change_with_the_branch_zeroed(trained, digits):
    val = digits[1]
    blocks = find_blocks(trained)
    imp = block_importance(trained, blocks, val, n=200, seed=3)
    sample = val.subset(200, seed=3)
    x, y = map(np.concatenate, zip(*sample.numpy_batches((8, 8, 1), 64)))

    def loss_acc(model):
        p = probabilities(model.predict(x, verbose=0).astype(np.float64), "probabilities")
        return -np.mean(np.log(p[np.arange(len(y)), y])), np.mean(p.argmax(1) == y)

    loss0, acc0 = loss_acc(trained)
    for b in blocks:
        loss, acc = loss_acc(_zeroed(trained, [b.layers[-1]]))
        assert imp[b.name]["loss_increase"] == pytest.approx(loss - loss0, abs=1e-4)
        assert imp[b.name]["accuracy_drop"] == pytest.approx(100 * (acc0 - acc), abs=1e-6)
        assert imp[b.name]["samples"] == 200
    assert len({round(v["loss_increase"], 3) for v in imp.values()}) > 1  # the blocks matter unequally


# ---------------------------------------------------------------------------------------------------- targets


def test_block_granularity_meets_the_flops_target_within_one_block(trained, digits):
    r = prune_structured(trained, *digits, PruneOptions(granularity="block", target_flops=0.4, rounds=1, epochs=0))
    blocks = find_blocks(trained)
    target = int(r.macs_before * 0.6)
    assert profiler_macs(r.model) == r.macs_after <= target < r.macs_after + max(b.macs for b in blocks)
    removed = [d["block"] for d in r.staged["removed_blocks"]]
    imp = block_importance(trained, blocks, digits[1])  # equal MACs: the least loss increase goes first
    assert removed == sorted(imp, key=lambda n: imp[n]["loss_increase"])[:len(removed)]
    assert r.groups == []  # no channel was touched
    x = np.concatenate([b for b, _ in digits[1].numpy_batches((8, 8, 1), 128)])[:128]
    reference = _zeroed(trained, [n[:-3] + "bn2" for n in removed])
    np.testing.assert_allclose(r.model.predict(x, verbose=0), reference.predict(x, verbose=0), atol=1e-6)
    assert r.staged["notes"] == []


def test_block_granularity_says_when_blocks_run_out(trained, digits):
    r = prune_structured(trained, *digits, PruneOptions(granularity="block", target_flops=0.9, rounds=1, epochs=0))
    assert find_blocks(r.model) == [] and len(r.staged["removed_blocks"]) == len(IDENTITY)
    assert r.macs_after > 0.1 * r.macs_before and "not reached" in r.staged["notes"][0]


def test_both_removes_blocks_and_channels_and_fine_tunes(trained, digits):
    r = prune_structured(trained, *digits, PruneOptions(granularity="both", target_flops=0.5, rounds=2, epochs=2))
    assert 0 < len(r.staged["removed_blocks"]) < len(IDENTITY)
    assert len(find_blocks(r.model)) == len(IDENTITY) - len(r.staged["removed_blocks"])
    assert r.groups and all(g["kept"] < g["channels"] for g in r.groups)  # channels went too
    assert abs(1 - profiler_macs(r.model) / profiler_macs(trained) - 0.5) <= 0.03
    assert [d["round"] for d in r.rounds] == [1, 2] and all("val_accuracy" in d for d in r.rounds)
    assert r.accuracy_after is not None and r.accuracy_after > 0.5


def test_both_takes_block_share_of_the_reduction_from_blocks(trained, digits):
    """A larger ``block_share`` removes more blocks (never past the target) and leaves less to channels; the MACs
    that the blocks removed stay within one block of the share asked (hand arithmetic on the blocks' MACs)."""
    removed = {}
    for share in (0.25, 1.0):
        r = prune_structured(trained, None, digits[1], PruneOptions(granularity="both", target_flops=0.5, rounds=1,
                                                                    epochs=0, block_share=share))
        blocks = sum(b["macs"] for b in r.staged["removed_blocks"])
        goal = share * 0.5 * r.macs_before
        biggest = max(b.macs for b in find_blocks(trained))
        assert blocks <= 0.5 * r.macs_before and goal - biggest <= blocks <= goal + biggest, (share, blocks, goal)
        assert abs(r.flops_reduction - 0.5) <= 0.03
        removed[share] = len(r.staged["removed_blocks"])
    assert removed[1.0] > removed[0.25]


@pytest.mark.parametrize("granularity", ["block", pytest.param("both", marks=pytest.mark.slow)])
def test_latency_target_is_timed_reached_or_reported(trained, digits, granularity):
    before = fp32_latency_ms(trained)
    opts = PruneOptions(granularity=granularity, target_latency_ms=0.8 * before, epochs=0)
    r = prune_structured(trained, *digits, opts)
    lat = r.staged["latency"]
    assert lat["target_ms"] == opts.target_latency_ms and lat["reached"] == (lat["reached_ms"] <= lat["target_ms"])
    assert lat["reached"] or "not reached" in r.staged["notes"][-1]
    timed = {t["macs"]: t["p50_ms"] for t in lat["timings"]}  # the input and every candidate timed
    assert lat["timings"][0]["macs"] == r.macs_before and lat["before_ms"] == lat["timings"][0]["p50_ms"]
    assert r.macs_after < r.macs_before and timed[r.macs_after] == lat["reached_ms"]
    if lat["reached"]:  # the least pruned candidate that met the target was kept
        assert r.macs_after == max(m for m, ms in timed.items() if ms <= lat["target_ms"])
    again = fp32_latency_ms(r.model)  # latency is noisy (a shared 2-core host): ratios, generous bounds
    assert 0.5 < lat["reached_ms"] / again < 2.0
    assert 0.5 < lat["before_ms"] / before < 2.0 and again < 1.1 * before


def test_a_device_latency_target_is_scaled_by_the_inputs_device_and_host_times(trained, digits, tmp_path):
    """--latency-reference: the target is the device's ms; the host goal is target x host p50 / device p50 of the
    input model (from a kcompress.bench/1 JSON as `kcompress device bench` writes it)."""
    from kcompress.bench.schema import BenchReport, BenchResult, latency_stats

    device_ms = 5.0
    doc = BenchReport(target={"kind": "android", "manufacturer": "Google", "model": "Pixel 7"}, results=(
        BenchResult(model="input.tflite", runtime="benchmark_model", threads=4, batch_size=1,
                    latency_ms=latency_stats([2.0] * 20)),
        BenchResult(model="input.tflite", runtime="benchmark_model", threads=1, batch_size=1,
                    latency_ms=latency_stats([device_ms] * 20))))
    ref = tmp_path / "pixel7.json"
    ref.write_text(doc.to_json())
    opts = PruneOptions(granularity="block", target_latency_ms=0.8 * device_ms, latency_reference=str(ref), epochs=0)
    r = prune_structured(trained, *digits, opts)
    lat = r.staged["latency"]
    dev = lat["device"]
    assert dev["name"] == "Google Pixel 7" and dev["input_p50_ms"] == device_ms  # the 1-thread row, not the 4-thread
    assert dev["host_p50_ms"] == lat["before_ms"] and dev["scale"] == pytest.approx(device_ms / lat["before_ms"])
    assert dev["target_ms"] == 0.8 * device_ms and lat["target_ms"] == pytest.approx(0.8 * lat["before_ms"])
    assert dev["reached_ms"] == pytest.approx(lat["reached_ms"] * dev["scale"])
    assert lat["reached"] or "not reached" in r.staged["notes"][-1]
    with pytest.raises(OptionError, match="latency_reference: needs target_latency_ms"):
        PruneOptions(latency_reference=str(ref))
    one = BenchReport(target={"kind": "android"}, results=(doc.results[0],))  # only a 4-thread row
    ref.write_text(one.to_json())
    with pytest.raises(UsageError, match="no 1-thread, batch-1 latency"):
        prune_structured(trained, *digits, opts)


def test_a_latency_target_already_met_changes_nothing(trained, digits):
    r = prune_structured(trained, *digits, PruneOptions(target_latency_ms=1e4, epochs=0))  # 10 s: surely met
    lat = r.staged["latency"]
    assert lat["reached"] and len(lat["timings"]) == 1 and lat["reached_ms"] == lat["before_ms"] < 1e4
    assert r.macs_after == r.macs_before and r.groups == [] and r.staged["removed_blocks"] == []


# ---------------------------------------------------------------------------------------------------- options, API, CLI


def test_options_are_checked():
    with pytest.raises(OptionError, match="target_latency_ms: give target_latency_ms or ratio"):
        PruneOptions(target_latency_ms=2.0, ratio=0.3)
    with pytest.raises(OptionError, match="granularity: block needs target_flops or target_latency_ms"):
        PruneOptions(granularity="block", ratio=0.3)
    with pytest.raises(OptionError, match="target_latency_ms: must be > 0"):
        PruneOptions(target_latency_ms=0)
    with pytest.raises(OptionError, match="granularity: applies to method structured only"):
        PruneOptions(method="magnitude", granularity="both")
    with pytest.raises(OptionError, match="channel, block, both"):
        PruneOptions(granularity="layer")
    for share in (0, 1.5):
        with pytest.raises(OptionError, match="block_share: must be in"):
            PruneOptions(granularity="both", block_share=share)
    o = PruneOptions(target_latency_ms="2.5", granularity="both", epochs=6)  # replaces the default target_flops
    assert o.target_latency_ms == 2.5 and o.num_rounds() == 2
    # FLOPs targets: rounds of at most 20%, but at least 3 fine-tuning epochs each
    assert PruneOptions(target_flops=0.3).num_rounds() == 1 and PruneOptions(target_flops=0.3, epochs=6).num_rounds() == 2
    assert PruneOptions(target_flops=0.5, epochs=3).num_rounds() == 1 and PruneOptions(target_flops=0.5, epochs=9).num_rounds() == 3
    # blocks: one round (a second round removes blocks that cost far more with half the epochs left)
    assert PruneOptions(target_flops=0.5, epochs=9, granularity="block").num_rounds() == 1
    assert PruneOptions(target_flops=0.5, epochs=9, granularity="both").num_rounds() == 1
    assert Staged.of(PruneOptions()) is None  # channels to a FLOPs target: the plain path
    with pytest.raises(UsageError, match="needs data"):
        Staged.of(PruneOptions(granularity="block"))


def test_cli_refuses_two_targets_and_structured_flags_with_magnitude(cnn_path):
    base = ["prune", cnn_path, "--data", "digits:train", "--scale", "1/255"]
    r = run_cli(*base, "--target-flops", "0.5", "--target-latency-ms", "1")
    assert r.exit_code == 2 and "--target-flops and --target-latency-ms are two targets" in r.output
    r = run_cli(*base, "--ratio", "0.5", "--target-latency-ms", "1")
    assert r.exit_code == 2 and "--target-latency-ms: give target_latency_ms or ratio" in r.output
    r = run_cli(*base, "--method", "magnitude", "--granularity", "block")
    assert r.exit_code == 2 and "--granularity do not apply to --method magnitude" in r.output


def test_api_details_and_cli_print_the_removed_blocks(trained, digits, tmp_path):
    import kcompress as kc
    from kcompress.io import load_model, save_model

    r = kc.prune(trained, *digits, granularity="block", target_flops=0.3, rounds=1, epochs=0, measure=False)
    d = json.loads(json.dumps(r.to_dict()))["details"]
    assert d["latency"] is None and d["removed_blocks"]
    for blk in d["removed_blocks"]:
        assert blk["first"] == blk["layers"][0] and blk["macs"] == 2 * 8 * 8 * 8 * 9 * 8  # 8x8 map, 8 channels
        assert set(blk) >= {"block", "importance", "accuracy_drop", "loss_per_mmac", "round"}
    path = str(tmp_path / "resnet.keras")
    save_model(trained, path)
    out = str(tmp_path / "pruned.keras")
    res = run_cli("prune", path, "--data", "digits:train", "--val-data", "digits:val", "--scale", "1/255",
                  "--granularity", "block", "--target-flops", "0.3", "--rounds", "1", "--epochs", "0",
                  "--max-drop", "100", "-o", out)
    assert res.exit_code == 0, res.output
    first = d["removed_blocks"][0]["block"]
    assert f"removed block {first}" in res.output and "VAL loss" in res.output
    assert count_macs(load_model(out)) == count_macs(r.model)  # the same blocks went
