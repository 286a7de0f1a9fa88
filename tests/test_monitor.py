"""Drift monitoring (kcompress.monitoring, `kcompress monitor`) and compare --fraction, on scikit-learn digits.

References: PSI by hand and with numpy's histogram, KS from scipy, input moments from numpy, confidences and class
frequencies from the float Keras model's own predictions, accuracy on a compare subset from scikit-learn.
"""

import json
import os

import numpy as np
import pytest
from conftest import run_cli

SCALE = ["--scale", str(1 / 255)]


@pytest.fixture(scope="module")
def raw_val():
    """digits:val as raw 0-255 pixels and labels (what a user would feed)."""
    from kcompress.data import open_data

    val = open_data("digits:val")
    x = np.concatenate([b for b, _ in val.numpy_batches((8, 8, 1), 512)])
    return x, val.labels


@pytest.fixture(scope="module")
def reference(trained_cnn, digits_val):
    import kcompress as kc

    return kc.monitor_reference(trained_cnn, digits_val)


@pytest.fixture(scope="module")
def ref_file(cnn_path, digits_npz, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mon") / "ref.json")
    r = run_cli("monitor", cnn_path, "--write-reference", path, "--data", digits_npz, *SCALE)
    assert r.exit_code == 0, r.output
    return path


def _npz(tmp_path, name, x, y=None):
    path = str(tmp_path / name)
    np.savez(path, **({"x": x} if y is None else {"x": x, "y": y}))
    return path


# ------------------------------------------------------------------------------------------------ statistics
def test_psi_matches_hand_computed_values():
    from kcompress.monitoring.stats import psi

    # 2 bins cut at the reference median 2.5: reference shares (.5, .5), new (.75, .25)
    assert psi(np.array([1.0, 2, 3, 4]), np.array([1.0, 1, 1, 4]), bins=2) == pytest.approx(0.25 * np.log(3), rel=1e-12)
    assert psi(np.array([1.0, 2, 3, 4]), np.array([4.0, 1, 3, 2]), bins=2) == 0.0
    rng = np.random.default_rng(0)
    ref, new = rng.normal(0, 1, 2000), rng.normal(0.5, 1.3, 1500)
    cuts = np.quantile(ref, np.arange(1, 10) / 10)
    p = np.histogram(ref, np.r_[-np.inf, cuts, np.inf])[0] / len(ref)
    q = np.histogram(new, np.r_[-np.inf, cuts, np.inf])[0] / len(new)
    assert psi(ref, new, bins=10) == pytest.approx(float(np.sum((q - p) * np.log(q / p))), rel=1e-9)


def test_psi_floors_an_empty_bin_and_merges_tied_quantiles():
    from kcompress.monitoring.stats import PSI_EPSILON, psi, quantile_cuts

    ref = np.r_[np.full(70, 0.99609375), np.linspace(0.3, 0.9, 30)]  # an int8 softmax piles up at one level
    assert len(quantile_cuts(ref, 10)) < 9
    expected = (PSI_EPSILON - 0.5) * np.log(PSI_EPSILON / 0.5) + (1.0 - 0.5) * np.log(1.0 / 0.5)
    assert psi(np.array([1.0, 2.0]), np.array([2.0, 2.0, 2.0]), bins=2) == pytest.approx(expected)
    assert np.isfinite(psi(ref, np.full(10, 0.1)))


def test_ks_and_chi_square_are_scipys():
    from scipy.stats import chisquare, ks_2samp

    from kcompress.monitoring.stats import chi_square, ks_test

    rng = np.random.default_rng(1)
    a, b = rng.uniform(size=300), rng.beta(2, 1, size=200)
    want = ks_2samp(a, b)
    assert ks_test(a, b) == (pytest.approx(want.statistic), pytest.approx(want.pvalue))
    pred = rng.integers(0, 4, 400)
    freq = np.array([0.1, 0.2, 0.3, 0.4])
    assert chi_square(freq, pred) == pytest.approx(chisquare(np.bincount(pred, minlength=4), freq * 400).pvalue)


def test_channel_moments_match_numpy_over_uneven_batches():
    from kcompress.monitoring.stats import ChannelMoments

    rng = np.random.default_rng(2)
    x = rng.normal(1e3, 2.0, size=(101, 5, 4, 3))  # a large mean: a naive sum of squares would lose digits
    m = ChannelMoments()
    for part in np.split(x, [7, 8, 60]):
        m.add(part)
    np.testing.assert_allclose(m.mean, x.reshape(-1, 3).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m.std, x.reshape(-1, 3).std(axis=0), rtol=1e-9)


# ------------------------------------------------------------------------------------------------- reference
def test_reference_holds_the_keras_models_own_statistics(reference, trained_cnn, raw_val, tmp_path):
    from kcompress.monitoring import Reference

    x, _ = raw_val
    probs = trained_cnn.predict(x / 255.0, verbose=0)
    assert reference.num_samples == len(x) == len(reference.confidences)
    np.testing.assert_allclose(reference.confidences, probs.max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(reference.class_frequencies, np.bincount(probs.argmax(axis=1), minlength=10) / len(x))
    np.testing.assert_allclose(reference.input_mean, [(x / 255.0).mean()], rtol=1e-5)
    np.testing.assert_allclose(reference.input_std, [(x / 255.0).std()], rtol=1e-5)
    assert reference.preprocess["scale"] == pytest.approx(1 / 255) and reference.split == "val"
    path = reference.save(str(tmp_path / "r.json"))
    assert Reference.load(path) == reference
    with pytest.raises(Exception, match="exists"):
        reference.save(path)


def test_run_reference_reuses_the_stage_outputs(trained_cnn, cnn_path, digits_val, tmp_path):
    from kcompress.evaluation import evaluate
    from kcompress.monitoring import Reference
    from kcompress.monitoring.reference import write_run_reference
    from kcompress.pipeline.runner import StageRecord

    ev = evaluate(cnn_path, digits_val)
    np.savez(tmp_path / "outputs.npz", outputs=ev.outputs, labels=ev.labels)
    record = StageRecord("prune", str(tmp_path), cnn_path, {"output_kind": ev.output_kind})
    path = write_run_reference(str(tmp_path), record, digits_val, log=lambda m: None)
    ref = Reference.load(str(tmp_path))  # the run folder resolves to its monitor_reference.json
    assert path == os.path.join(str(tmp_path), "monitor_reference.json")
    np.testing.assert_allclose(ref.confidences, ev.outputs.max(axis=1), rtol=1e-6)
    assert ref.model == cnn_path and len(ref.model_sha256) == 64


# --------------------------------------------------------------------------------------------- drift (API)
def test_the_same_data_does_not_drift(reference, trained_cnn, raw_val):
    import kcompress as kc

    r = kc.monitor(trained_cnn, reference, raw_val[0])  # the reference's preprocessing (1/255) is reused
    assert not r.drifted and r.summary.startswith("No drift")
    assert r.test("confidence_psi").value == pytest.approx(0.0, abs=1e-9)
    assert r.test("confidence_ks").value == pytest.approx(1.0)
    assert r.test("input_mean_shift").value < 1e-5


def test_gaussian_noise_drifts(reference, trained_cnn, raw_val):
    from scipy.stats import ks_2samp

    import kcompress as kc

    x = raw_val[0] + np.random.default_rng(0).normal(0, 0.5 * 255, raw_val[0].shape)
    r = kc.monitor(trained_cnn, reference, x)
    assert r.drifted and r.summary.startswith("Drift: ")
    assert r.test("confidence_psi").verdict == "drift"
    assert r.test("confidence_ks").value == pytest.approx(ks_2samp(reference.confidences, r.confidences).pvalue)
    assert r.test("input_std_ratio").verdict == "drift"


def test_a_missing_class_drifts_and_is_named(reference, trained_cnn, raw_val):
    import kcompress as kc

    x, y = raw_val
    r = kc.monitor(trained_cnn, reference, x[y != 3])
    t = r.test("class_psi")
    assert r.drifted and t.verdict == "drift" and t.extra["class"] == "3"
    assert "class 3 frequency" in r.summary


@pytest.mark.parametrize("kind", ["inverted", "permuted", "uniform"])
def test_other_data_of_the_same_shape_drifts(reference, trained_cnn, raw_val, kind):
    import kcompress as kc

    x, rng = raw_val[0], np.random.default_rng(3)
    other = {"inverted": lambda: 255.0 - x,
             "permuted": lambda: x.reshape(len(x), -1)[:, rng.permutation(64)].reshape(x.shape),
             "uniform": lambda: rng.uniform(0, 255, x.shape)}[kind]()
    r = kc.monitor(trained_cnn, reference, other)
    assert r.drifted and r.test("confidence_psi").verdict == "drift"


def test_another_model_is_refused_unless_asked(ref_file, trained_cnn, digits_npz, tmp_path):
    import kcompress as kc
    from kcompress.errors import KcompressError
    from kcompress.io import save_model

    other = str(tmp_path / "other.keras")
    save_model(trained_cnn, other)  # the same weights, another file: another sha256
    with pytest.raises(KcompressError, match="not the model the reference"):
        kc.monitor(other, ref_file, digits_npz)
    assert not kc.monitor(other, ref_file, digits_npz, check_model=False).drifted


def test_facade_monitor_stays_a_function():
    import kcompress as kc
    import kcompress.monitoring  # noqa: F401

    assert callable(kc.monitor) and callable(kc.monitor_reference)
    assert kc.MonitorOptions().psi_drift == 0.25 and kc.MonitorOptions().psi_warn == 0.1


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_same_data_exits_0_and_json_parses(ref_file, cnn_path, digits_npz):
    r = run_cli("monitor", cnn_path, "--reference", ref_file, "--data", digits_npz, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["drifted"] is False and d["num_samples"] == 359 and {t["name"] for t in d["tests"]} == {
        "confidence_psi", "confidence_ks", "class_psi", "input_mean_shift", "input_std_ratio"}
    assert d["options"]["psi_drift"] == 0.25


def test_cli_noisy_unlabelled_data_exits_1_with_a_summary_and_a_plot(ref_file, cnn_path, raw_val, tmp_path):
    noisy = raw_val[0] + np.random.default_rng(4).normal(0, 0.5 * 255, raw_val[0].shape)
    data = _npz(tmp_path, "noisy.npz", noisy.astype(np.float32))  # no y: unlabelled inputs
    plot = str(tmp_path / "drift.png")
    r = run_cli("monitor", cnn_path, "--reference", ref_file, "--data", data, "--plot", plot)
    assert r.exit_code == 1
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Drift: confidence PSI ") and "> 0.25" in last
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_thresholds_are_flags(ref_file, cnn_path, raw_val, tmp_path):
    x, y = raw_val
    data = _npz(tmp_path, "no3.npz", x[y != 3], y[y != 3])
    assert run_cli("monitor", cnn_path, "--reference", ref_file, "--data", data).exit_code == 1
    loose = run_cli("monitor", cnn_path, "--reference", ref_file, "--data", data, "--class-psi-drift", "50",
                    "--psi-warn", "40", "--psi-drift", "50")
    assert loose.exit_code == 0, loose.output


def test_cli_errors_are_one_line(cnn_path, digits_npz, tmp_path):
    r = run_cli("monitor", cnn_path, "--reference", str(tmp_path / "nope.json"), "--data", digits_npz)
    assert r.exit_code == 1 and r.output.strip().count("\n") == 0 and r.output.startswith("Error: ")
    r = run_cli("monitor", cnn_path, "--reference", str(tmp_path), "--data", digits_npz)
    assert r.exit_code == 1 and "monitor_reference.json" in r.output
    assert run_cli("monitor", cnn_path, "--data", digits_npz).exit_code == 2
    assert run_cli("monitor", cnn_path, "--reference", "x.json", "--data", digits_npz, "--alpha", "2").exit_code == 2


# --------------------------------------------------------------------------------------------- compare --fraction
def test_compare_fraction_evaluates_a_seeded_half(cnn_path, trained_cnn, raw_val):
    from sklearn.metrics import accuracy_score

    x, y = raw_val
    r = run_cli("compare", cnn_path, cnn_path, "--data", "digits:val", *SCALE, "--fraction", "0.5", "--seed", "7",
                "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    n = int(np.floor(0.5 * len(y) + 0.5))
    assert (d["num_samples"], d["total_samples"], d["fraction"], d["seed"]) == (n, len(y), 0.5, 7)
    idx = np.sort(np.random.default_rng(7).choice(len(y), size=n, replace=False))  # the traffic split, redone
    want = accuracy_score(y[idx], trained_cnn.predict(x[idx] / 255.0, verbose=0).argmax(axis=1))
    assert d["a"]["accuracy"] == pytest.approx(want, abs=1e-12)
    import kcompress as kc

    c = kc.compare(cnn_path, cnn_path, "digits:val", preprocess=kc.Preprocess(scale=1 / 255), fraction=0.5, seed=7)
    np.testing.assert_array_equal(c.evaluations[0].labels, y[idx])  # exactly those samples, in order
    assert c.a["accuracy"] == d["a"]["accuracy"]
    text = run_cli("compare", cnn_path, cnn_path, "--data", "digits:val", *SCALE, "--fraction", "0.5")
    assert f"{n} of {len(y)} samples" in text.output
    assert run_cli("compare", cnn_path, cnn_path, "--data", "digits:val", "--fraction", "0").exit_code == 2


# -------------------------------------------------------------------------------------------------- pipeline
def test_a_pipeline_run_writes_the_final_models_val_reference(cnn_path, raw_val, tmp_path):
    from kcompress.monitoring import Reference
    from kcompress.pipeline.config import config_from_dict
    from kcompress.pipeline.runner import execute

    cfg = config_from_dict({
        "name": "m", "model": {"path": cnn_path}, "data": {"train": "digits:train", "val": "digits:val",
                                                          "scale": 1 / 255},
        "baseline": {"batch_sizes": [1], "runs": 2}, "quantize": {"qat": "never", "calibration_samples": 50},
        "benchmark": {"threads": [1], "runs": 2, "warmup": 1, "trials": 1}})
    run_dir = str(tmp_path / "run")
    records = execute(cfg, run_dir, log=lambda m: None)
    final = records[-1].model_path
    ref = Reference.load(run_dir)
    assert final.endswith("model.tflite") and ref.num_samples == len(raw_val[1]) and ref.split == "val"
    with np.load(os.path.join(run_dir, "04-quantize", "outputs.npz")) as npz:  # the int8 model's VAL outputs
        np.testing.assert_allclose(ref.confidences, npz["outputs"].max(axis=1))
    r = run_cli("monitor", final, "--reference", run_dir, "--data", "digits:val")  # the reference's 1/255 reused
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].startswith("No drift")
