"""Magnitude and structured pruning: sparsity reached, patterns hold, channel groups rebuild exactly, CLI."""

import re
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from kcompress.backend import keras, tf, tfmot
from kcompress.cli import main
from kcompress.data import Preprocess, open_data
from kcompress.errors import UsageError
from kcompress.io import load_model, save_model
from kcompress.modelinfo import count_macs
from kcompress.options import OptionError, PruneOptions, parse_block
from kcompress.pruning.magnitude import prune_magnitude, resolve_skip
from kcompress.pruning.structured import MIN_KEEP, ChannelGraph, prune_once, prune_structured
from kcompress.quantization.ptq import convert
from kcompress.train import fit
from kcompress.zoo import digits_cnn, mobilenetv2, resnet_cifar

L = keras.layers
PRE = Preprocess(scale=1 / 255)


@pytest.fixture(scope="module")
def trained(digits):
    model = digits_cnn(width=8)
    fit(model, digits[0], digits[1], epochs=4, lr=3e-3, verbose=0)
    return model


@pytest.fixture(scope="module")
def digits32(digits32_npz):
    """Real digits upsampled to 32x32x3, scaled to 0-1."""
    return open_data(digits32_npz, PRE)


def _kernel_sparsity(layer):
    w = layer.get_weights()[0]
    return float(np.mean(w == 0))


# ---------- magnitude


def test_magnitude_reaches_target_in_every_layer_and_keeps_its_best_val_accuracy(trained, digits):
    res = prune_magnitude(trained, *digits, PruneOptions(method="magnitude", sparsity=0.6, epochs=3, lr=1e-3), verbose=0)
    assert res.pruned == ["conv1", "conv2", "fc1", "classifier"]
    for name in res.pruned:
        assert abs(_kernel_sparsity(res.model.get_layer(name)) - 0.6) < 0.02, name
    assert abs(res.overall_sparsity - 0.6) < 0.01
    # the stripped plain model predicts what the wrapped model scored on VAL (best epoch after the ramp)
    spe = -(-digits[0].num_samples // 64)
    after_ramp = [a for e, a in enumerate(res.history["val_accuracy"]) if (e + 1) * spe >= res.ramp_end_step]
    assert res.accuracy_after == pytest.approx(max(after_ramp), abs=1e-6)
    assert res.ramp_end_step <= 0.6 * res.steps
    # the input model is untouched
    assert _kernel_sparsity(trained.get_layer("fc1")) < 0.01
    assert not any("prune" in layer.name for layer in res.model.layers)


def test_two_of_four_blocks_hold(trained, digits):
    res = prune_magnitude(trained, digits[0], None, PruneOptions(method="magnitude", block="2:4", epochs=1), verbose=0)
    assert "conv1" in res.skipped and "multiple of 4" in res.skipped["conv1"]  # 1 input channel
    for name in res.pruned:
        w = res.model.get_layer(name).get_weights()[0]
        rows = np.moveaxis(w, -1, 0).reshape(-1, 4)  # groups of 4 consecutive input channels
        assert np.all((rows == 0).sum(axis=1) >= 2), name
        from tensorflow_model_optimization.python.core.sparsity.keras import pruning_utils

        assert pruning_utils.is_pruned_m_by_n(tf.constant(w), (2, 4))  # tfmot's own checker agrees


def test_skip_names_regex_first_last_and_errors(trained):
    assert resolve_skip(trained, ["first", "last"]) == {"conv1": "--skip first", "classifier": "--skip last"}
    assert set(resolve_skip(trained, ["conv.*"])) == {"conv1", "conv2"}
    with pytest.raises(UsageError, match="matches no layer"):
        resolve_skip(trained, ["nope"])
    with pytest.raises(ValueError, match="M:N"):
        parse_block("4:2")


def test_short_budget_warns(trained, digits):
    with pytest.warns(UserWarning, match="short for 80% sparsity"):
        prune_magnitude(trained, digits[0], None, PruneOptions(method="magnitude", sparsity=0.8, epochs=1), verbose=0)


@pytest.mark.slow
def test_mobilenetv3small_prunes_where_whole_model_tfmot_fails(digits32):
    model = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, classes=10)
    with pytest.raises(Exception):
        tfmot().sparsity.keras.prune_low_magnitude(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = prune_magnitude(model, digits32, None, PruneOptions(method="magnitude", sparsity=0.5, epochs=1, batch_size=64),
                              verbose=0)
    assert len(res.pruned) > 20
    assert all(abs(s - 0.5) < 0.02 for s in res.sparsity.values())
    assert res.model.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0).shape == (1, 10)


@pytest.mark.slow
def test_efficientnetb0_prunes(digits32):
    model = keras.applications.EfficientNetB0(input_shape=(32, 32, 3), weights=None, classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = prune_magnitude(model, digits32, None, PruneOptions(method="magnitude", sparsity=0.5, epochs=1), verbose=0)
    assert len(res.pruned) > 50 and all(abs(s - 0.5) < 0.02 for s in res.sparsity.values())


# ---------- structured


def test_ratio_zero_is_identity():
    model = resnet_cifar(width=8, blocks_per_stage=1)
    res = prune_structured(model, None, None, PruneOptions(ratio=0.0, epochs=0))
    x = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(res.model(x).numpy(), model(x).numpy())
    assert res.params_after == res.params_before and res.groups == []


def test_removing_zero_filters_keeps_outputs():
    inp = L.Input((12, 12, 3))
    x = L.Conv2D(8, 3, activation="relu", name="c1")(inp)
    x = L.Conv2D(16, 3, activation="relu", name="c2")(x)
    x = L.Flatten()(L.MaxPooling2D()(x))
    out = L.Dense(5, name="head")(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(1)
    for name, zero in (("c1", [0, 3, 5, 6]), ("c2", list(range(0, 16, 2)))):
        k, b = model.get_layer(name).get_weights()
        k[..., zero], b[zero] = 0.0, 0.0
        b[[i for i in range(len(b)) if i not in zero]] = rng.uniform(0.1, 0.2)
        model.get_layer(name).set_weights([k, b])
    new, _ = prune_once(model, PruneOptions(ratio=0.5), ratio=0.5)
    assert new.get_layer("c1").filters == 4 and new.get_layer("c2").filters == 8
    assert new.get_layer("head").kernel.shape[0] == 4 * 4 * 8  # Dense after Flatten lost the spatial blocks
    x = rng.uniform(0, 1, (3, 12, 12, 3)).astype(np.float32)
    np.testing.assert_allclose(new(x).numpy(), model(x).numpy(), atol=1e-5)


def _concat_model():
    inp = L.Input((16, 16, 3))
    a = L.ReLU()(L.BatchNormalization(name="a_bn")(L.Conv2D(8, 3, padding="same", name="a")(inp)))
    b = L.Conv2D(12, 1, name="b")(inp)
    x = L.Concatenate(name="cat")([a, b])
    x = L.Conv2D(16, 3, padding="same", name="c")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10, activation="softmax", name="head")(x))


@pytest.mark.parametrize("build", ["resnet", "concat", pytest.param("mobilenetv2", marks=pytest.mark.slow)])
def test_flops_target_reached_and_model_converts(build, tmp_path):
    model = {"resnet": lambda: resnet_cifar(width=8, blocks_per_stage=2), "concat": _concat_model,
             "mobilenetv2": lambda: mobilenetv2(alpha=0.35)}[build]()
    res = prune_structured(model, None, None, PruneOptions(target_flops=0.4, epochs=0))
    new = res.model
    from conftest import profiler_macs  # TensorFlow's count, not the pruner's own counter

    drop = 1 - profiler_macs(new) / profiler_macs(model)
    assert abs(drop - 0.4) <= 0.05, drop
    assert res.params_after < res.params_before and res.groups
    assert len(convert(new)) > 0  # convert() loads and invokes the .tflite once
    save_model(new, str(tmp_path / "m.keras"))
    x = np.random.default_rng(0).uniform(0, 1, (2, *model.input_shape[1:])).astype(np.float32)
    np.testing.assert_allclose(load_model(str(tmp_path / "m.keras"))(x).numpy(), new(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("multiple", [4, 8])
def test_channel_multiple_keeps_whole_multiples_and_still_meets_the_flops_target(multiple):
    """Kept channel counts are multiples of ``channel_multiple`` (or the whole group, or its floor), and the channels
    given back after the search (``multiple`` at a time) bring the MACs close to the target instead of far past it."""
    model = resnet_cifar(width=8, blocks_per_stage=2)  # groups of 8, 16 and 32 channels
    res = prune_structured(model, None, None, PruneOptions(target_flops=0.4, epochs=0, channel_multiple=multiple))
    from conftest import profiler_macs

    drop = 1 - profiler_macs(res.model) / profiler_macs(model)
    assert 0.4 <= drop <= 0.45, drop  # at or past the target, by less than the 5-point slack
    assert res.groups
    for g in res.groups:
        assert g["kept"] % multiple == 0 or g["kept"] == max(1, int(np.ceil(MIN_KEEP * g["channels"]))), g


def test_tile_rule_finds_the_first_width_where_one_more_channel_costs_a_step():
    """The probe's rule on cost curves with a known tile: time proportional to the channels rounded up to 16 or 8
    (plus a fixed cost and a small per-channel slope, as measured), and one with no step."""
    from kcompress.pruning.tiles import CANDIDATES, tile_from_timings

    widths = [v for w in CANDIDATES for v in (w, w + 1)]
    for tile in (8, 16):
        assert tile_from_timings({w: 20 + 3 * -(-w // tile) * tile + 0.2 * w for w in widths}) == tile
    assert tile_from_timings({w: 20 + 3 * w for w in widths}) == 1  # linear: 33/32 is under the jump


def test_speed_hint_when_the_time_lags_the_macs_names_groups_just_over_the_tile():
    from kcompress.pruning.tiles import slow_speedup, tile_hint

    assert slow_speedup(100, 50, 1.28) and not slow_speedup(100, 50, 1.6)  # half the MACs: 1.5x is the line
    assert not slow_speedup(100, 80, 1.0)  # under a quarter of the MACs removed: no hint
    groups = [{"channels": 32, "kept": 17}, {"channels": 64, "kept": 50}, {"channels": 64, "kept": 48},
              {"channels": 16, "kept": 12}]
    h = tile_hint(groups, 16, 2.0, 1.28, "channel")
    assert "2 of 4 pruned channel groups keep a count just above a multiple of 16" in h  # 17 and 50 (12: inside)
    assert "--channel-multiple auto" in h and "--granularity both" in h and "1.28x" in h
    h = tile_hint([{"channels": 32, "kept": 16}], 16, 2.0, 1.3, "both")
    assert "multiple" not in h and "--granularity both" not in h


def test_channel_multiple_auto_uses_the_tile_measured_on_this_host():
    from kcompress.pruning.tiles import channel_tile, tile_from_timings

    probe = channel_tile()
    assert probe.tile == max(tile_from_timings(probe.timings["fp32"]), tile_from_timings(probe.timings["int8"]))
    model = resnet_cifar(width=16, blocks_per_stage=1)  # groups of 16, 32 and 64 channels
    res = prune_structured(model, None, None, PruneOptions(target_flops=0.3, epochs=0, channel_multiple="auto"))
    assert res.channel_multiple == probe.tile
    for g in res.groups:
        assert g["kept"] % probe.tile == 0 or g["kept"] == max(1, int(np.ceil(MIN_KEEP * g["channels"]))), g
    assert PruneOptions(channel_multiple="auto").channel_multiple == 0 and PruneOptions(channel_multiple="8").channel_multiple == 8
    with pytest.raises(OptionError, match="channel_multiple: expected a whole number"):
        PruneOptions(channel_multiple="wide")


def test_residual_adds_share_one_mask():
    model = resnet_cifar(width=8, blocks_per_stage=2)
    graph = ChannelGraph(model)
    roots = {graph.root(a) for a, names in graph.sources.items() if any(n.startswith("s0") for n in names)
             and any(n.endswith("conv2") for n in names)}
    stem = [graph.root(a) for a, names in graph.sources.items() if "stem_conv" in names]
    assert roots == set(stem)  # the stem and every stage-0 block's second conv are one group
    assert "classifier" in graph.frozen_layers()


def test_rounds_fine_tune_and_criteria(trained, digits):
    res = prune_structured(trained, *digits, PruneOptions(target_flops=0.5, rounds=2, epochs=2, criterion="taylor",
                                                               lr=1e-3), verbose=0)
    assert [r["round"] for r in res.rounds] == [1, 2] and all("val_accuracy" in r for r in res.rounds)
    assert 0.45 <= res.flops_reduction <= 0.65  # a tiny model: one channel is several points of its FLOPs
    # half the FLOPs of a 4-layer net, two short fine-tuning rounds: within 5 points of the unpruned model on VAL
    assert res.accuracy_before > 0.9 and res.accuracy_after >= res.accuracy_before - 0.05, (res.accuracy_before,
                                                                                             res.accuracy_after)
    # bn criterion: channels whose BN gamma is zero go first
    model = keras.models.clone_model(trained)
    model.set_weights(trained.get_weights())
    gamma, beta, mean, var = model.get_layer("bn1").get_weights()
    gamma[:4] = 0.0
    model.get_layer("bn1").set_weights([gamma, beta, mean, var])
    graph = ChannelGraph(model)
    new, g = prune_once(model, PruneOptions(ratio=0.5, criterion="bn"), ratio=0.5)
    root = graph.root(next(a for a, n in g.sources.items() if "conv1" in n))
    assert not g.keep[root][:4].any() and g.keep[root][4:].all()


def _kl_to(teacher, student, data, t: float = 4.0) -> float:
    """Mean KL(teacher || student) of the softened (T) outputs on ``data``: numpy, from the models' probabilities."""
    x = np.concatenate([b[0] for b in data.numpy_batches(student.input_shape[1:], 256)])
    p, q = (np.log(np.clip(m.predict(x, verbose=0), 1e-12, 1)) / t for m in (teacher, student))
    p, q = (np.exp(z - z.max(1, keepdims=True)) for z in (p, q))
    p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))


def test_teacher_fine_tune_moves_the_pruned_model_toward_the_teacher(trained, trained_cnn, digits):
    import kcompress as kc

    opts = dict(method="structured", target_flops=0.5, epochs=4, lr=1e-3, measure=False, max_drop=100, seed=0)
    lines = []
    plain = kc.prune(trained, *digits, **opts)
    taught = kc.prune(trained, *digits, teacher=trained_cnn, log=lines.append, **opts)
    assert any("knowledge distillation from the teacher" in line for line in lines)
    assert trained_cnn.trainable  # the distillation trainer froze the teacher only while it trained
    assert taught.details["groups"] == plain.details["groups"]  # the same channels went; only the fine-tune differs
    # the fine-tune learned from the teacher: its softened outputs are closer to the teacher's than a label fine-tune's
    kl_taught, kl_plain = _kl_to(trained_cnn, taught.model, digits[1]), _kl_to(trained_cnn, plain.model, digits[1])
    assert kl_taught < 0.8 * kl_plain, (kl_taught, kl_plain)
    assert taught.accuracy_after >= taught.accuracy_before - 0.05
    with pytest.raises(UsageError, match="structured only"):
        kc.prune(trained, *digits, method="magnitude", teacher=trained_cnn, measure=False)
    with pytest.raises(UsageError, match="teacher: applies to method structured only"):
        kc.prune(trained, *digits, method="magnitude", options=PruneOptions(method="magnitude", teacher="t.keras"))


# ---------- CLI


@pytest.fixture(scope="module")
def model_file(trained, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("m") / "digits.keras")
    save_model(trained, path)
    return path


def _cli_args(model_file):
    return ["prune", model_file, "--data", "digits:train", "--val-data", "digits:val", "--scale", str(1 / 255)]


def test_cli_magnitude_end_to_end(model_file, tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "mag.keras")
    args = _cli_args(model_file)
    r = runner.invoke(main, args + ["--method", "magnitude", "--sparsity", "0.5", "--epochs", "3", "--skip", "first",
                                    "--max-drop", "10", "-o", out])
    assert r.exit_code == 0, r.output
    assert "magnitude pruning: 3 layer(s)" in r.output and "conv1" in r.output and "dense (--skip first)" in r.output
    assert "gzip" in r.output and f"Wrote {out}" in r.output
    assert abs(_kernel_sparsity(load_model(out).get_layer("fc1")) - 0.5) < 0.02
    r = runner.invoke(main, args + ["--method", "magnitude", "-o", out])
    assert r.exit_code == 1 and "--overwrite" in r.output


def test_cli_structured_end_to_end(model_file, tmp_path):
    runner = CliRunner()
    args = _cli_args(model_file)
    out2 = str(tmp_path / "st.keras")
    r = runner.invoke(main, args + ["--method", "structured", "--target-flops", "0.5", "--epochs", "1", "--max-drop", "10",
                                    "-o", out2])
    assert r.exit_code == 0, r.output
    assert "conv1: 8 ->" in r.output and "latency" in r.output and "MFLOPs" in r.output
    assert re.search(r"\dx \(\d+\.\d\d-\d+\.\d\dx, 7 trials\) faster", r.output), r.output
    from conftest import profiler_macs  # TensorFlow's count, not the pruner's own counter

    assert profiler_macs(load_model(out2)) < 0.56 * profiler_macs(load_model(model_file))


def test_before_and_after_are_timed_in_one_run_and_speedups_pair_their_trials(trained, digits):
    """The input's and the pruned model's fp32/int8 files are timed together (interleaved trials), and each speed-up
    is the median (and range) of trial i's ratio, computed here with numpy from the trials the result carries."""
    import kcompress as kc
    from kcompress.pruning.api import LATENCY_TRIALS

    r = kc.prune(trained, *digits, target_flops=0.5, epochs=0)
    fast = r.speedups()
    assert set(fast) == {"fp32", "int8"}
    for kind in ("fp32", "int8"):
        b = np.array(r.before[f"{kind}_p50_trials_ms"])
        a = np.array(r.after[f"{kind}_p50_trials_ms"])
        assert len(b) == len(a) == LATENCY_TRIALS and fast[kind].paired and fast[kind].trials == LATENCY_TRIALS
        assert fast[kind].median == pytest.approx(np.median(b / a)) and fast[kind].low == pytest.approx((b / a).min())
        assert r.before[f"{kind}_p50_ms"] == pytest.approx(np.median(b))
    assert r.to_dict()["speedups"]["int8"]["median"] == fast["int8"].median
    assert kc.prune(trained, *digits, target_flops=0.5, epochs=0, measure=False).speedups() == {}


def test_cli_usage_errors(model_file):
    runner = CliRunner()
    base = ["prune", model_file, "--data", "digits:train"]
    r = runner.invoke(main, base + ["--method", "magnitude", "--block", "3:2"])
    assert r.exit_code == 2 and "M:N" in r.output
    r = runner.invoke(main, base + ["--method", "structured", "--target-flops", "1.5"])
    assert r.exit_code == 2 and "--target-flops: must be between 0 and 1" in r.output
    r = runner.invoke(main, base + ["--method", "structured", "--sparsity", "0.8"])
    assert r.exit_code == 2 and "--sparsity do not apply to --method structured" in r.output
    r = runner.invoke(main, ["prune", "--help"])
    assert r.exit_code == 0 and "--target-flops" in r.output and "Examples" in r.output


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "taylor"])
def test_separable_model_with_every_criterion(criterion, digits):
    inp = L.Input((8, 8, 1))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    x = L.SeparableConv2D(16, 3, depth_multiplier=2, padding="same", name="sep")(x)
    x = L.ReLU()(L.BatchNormalization(name="bn")(x))
    out = L.Dense(10, activation="softmax", name="head")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    bn = model.get_layer("bn")  # trained BatchNorm has distinct gammas; fresh ones (all 1) rank nothing
    bn.gamma.assign(np.random.default_rng(0).uniform(0.1, 1.0, bn.gamma.shape).astype(np.float32))
    new, _ = prune_once(model, PruneOptions(target_flops=0.4, criterion=criterion),
                        target_macs=int(0.6 * count_macs(model)), data=digits[0])
    from conftest import profiler_macs  # TensorFlow's count, not the pruner's own counter

    assert abs(1 - profiler_macs(new) / profiler_macs(model) - 0.4) <= 0.05
    assert new.get_layer("sep").filters < 16 and new.get_layer("head").kernel.shape[0] == new.get_layer("sep").filters
    assert len(convert(new)) > 0
