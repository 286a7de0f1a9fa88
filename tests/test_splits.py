"""Three splits, stratified seeded samples and class-list checks, against numpy counts of the labels."""

import os

import numpy as np
import pytest
from conftest import run_cli

from kcompress.data import check_fits, open_data, open_splits, stratified_indices
from kcompress.errors import KcompressError, UsageError
from kcompress.options import DataOptions, OptionError


def _image_folder(root, classes, per_class=6, size=8):
    """PNG files in one sub-folder per class, written in class order (as image folders are listed)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, cls in enumerate(classes):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for j in range(per_class):
            px = np.full((size, size, 3), 20 * i, np.uint8) + rng.integers(0, 5, (size, size, 3), dtype=np.uint8)
            Image.fromarray(px).save(os.path.join(root, cls, f"{j:03d}.png"))
    return str(root)


CLASSES = [f"c{i}" for i in range(8)]


def test_stratified_indices_keep_proportions_and_every_class():
    labels = np.repeat(np.arange(6), [400, 200, 100, 50, 5, 1])
    for n in (6, 40, 200, 700):
        idx = stratified_indices(labels, n, seed=3)
        assert len(idx) == len(set(idx)) == n
        counts = np.bincount(labels[idx], minlength=6)
        assert (counts >= 1).all()
        expected = n * np.bincount(labels) / len(labels)
        bumped = int(np.sum(expected < 0.5))  # rare classes lifted to one sample, taken from the largest class
        assert np.all(np.abs(counts - expected) <= 1 + bumped)
    assert np.array_equal(stratified_indices(labels, 50, seed=1), stratified_indices(labels, 50, seed=1))
    assert not np.array_equal(stratified_indices(labels, 50, seed=1), stratified_indices(labels, 50, seed=2))


def test_calibration_and_limit_cover_every_class_of_a_class_sorted_folder(tmp_path):
    data = open_data(_image_folder(tmp_path / "train", CLASSES, per_class=10))
    assert list(data.labels[:10]) == [0] * 10  # file order is class order: "the first N" would be one class
    calib = np.concatenate(list(data.calibration_samples((8, 8, 3), n=16, seed=0)))
    # each class has its own pixel level (20 * class index + noise < 5): read the class back from the pixels
    seen = set(np.round(calib.reshape(16, -1).mean(axis=1) / 20).astype(int).tolist())
    assert seen == set(range(8))
    ys = np.concatenate([y for _, y in data.numpy_batches((8, 8, 3), batch_size=4, limit=16)])
    assert np.array_equal(np.bincount(ys, minlength=8), [2] * 8)


def test_limit_evaluates_a_stratified_sample(tmp_path, trained_cnn, digits_val):
    from kcompress.evaluation import evaluate

    ev = evaluate(trained_cnn, digits_val, limit=50)
    assert len(ev.labels) == 50
    assert (np.bincount(ev.labels, minlength=10) >= 4).all()  # the first 50 of digits:val would not be


def test_split_carves_a_stratified_seeded_disjoint_part():
    train = open_data("digits:train")
    rest, test = train.split(0.25, seed=0, what="test")
    assert rest.num_samples + test.num_samples == train.num_samples
    full = np.bincount(train.labels)
    assert np.all(np.abs(np.bincount(test.labels) - 0.25 * full) <= 1)
    xs = lambda d: {x.tobytes() for x, _ in ((x, y) for xb, yb in d.numpy_batches((8, 8, 1), 512) for x, y in zip(xb, yb))}
    assert not xs(rest) & xs(test)
    again = train.split(0.25, seed=0, what="test")[1]
    assert np.array_equal(again.labels, test.labels)


def test_open_splits_carves_val_and_test_from_train():
    s = DataOptions(train="digits:train", val_split=0.1, test_split=0.2).open(seed=0)
    n = open_data("digits:train").num_samples
    assert s.train.num_samples + s.val.num_samples + s.test.num_samples == n
    assert abs(s.test.num_samples - 0.2 * n) <= 1 and abs(s.val.num_samples - 0.1 * 0.8 * n) <= 1
    assert "test" in s.test.name and "val" in s.val.name
    with pytest.raises(OptionError, match="test_split"):
        DataOptions(test="digits:val", test_split=0.1)
    with pytest.raises(OptionError, match="val_split"):
        DataOptions(val_split=0.6, test_split=0.5)


def test_class_lists_must_match_between_splits(tmp_path):
    train = _image_folder(tmp_path / "train", CLASSES, per_class=2)
    missing = _image_folder(tmp_path / "val_missing", CLASSES[:-1], per_class=2)
    extra = _image_folder(tmp_path / "val_extra", CLASSES + ["zz_junk"], per_class=2)
    with pytest.raises(KcompressError, match="missing c7"):
        open_splits(train, missing)
    with pytest.raises(KcompressError, match="extra zz_junk"):
        open_splits(train, extra)
    # archive litter is never a class: a __MACOSX folder is ignored
    macos = _image_folder(tmp_path / "val_macos", CLASSES, per_class=2)
    os.makedirs(os.path.join(macos, "__MACOSX", "c0"))
    assert open_splits(train, macos).val.class_names == tuple(CLASSES)


def test_npz_class_names_and_labels_are_checked(tmp_path):
    x = np.zeros((6, 8, 8, 1), np.float32)
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, x=x, y=np.array([0, 1, 2, 3, 0, 1]), class_names=np.array(["a", "b", "c"]))
    with pytest.raises(KcompressError, match="label 3 is out of range for its 3 class_names"):
        open_data(bad)
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    np.savez(a, x=x, y=np.array([0, 1, 2, 0, 1, 2]), class_names=np.array(["cat", "dog", "emu"]))
    np.savez(b, x=x, y=np.array([0, 1, 2, 0, 1, 2]), class_names=np.array(["dog", "cat", "emu"]))
    with pytest.raises(KcompressError, match="another order"):
        open_splits(a, b)
    plain = str(tmp_path / "plain.npz")
    np.savez(plain, x=x, y=np.array([0, 1, 2, 3, 4, 0]))
    with pytest.raises(KcompressError, match="label 4 is not one of"):
        open_splits(a, plain)


def test_model_output_width_must_match_named_classes(tmp_path, trained_cnn):
    x = np.zeros((4, 8, 8, 1), np.float32)
    path = str(tmp_path / "nine.npz")
    np.savez(path, x=x, y=np.array([0, 1, 2, 3]), class_names=np.array([str(i) for i in range(9)]))
    with pytest.raises(KcompressError, match="9 classes but the model outputs 10"):
        check_fits(open_data(path), (8, 8, 1), 10)
    r = run_cli("evaluate", _save(trained_cnn, tmp_path), "--data", path)
    assert r.exit_code == 1 and "9 classes but the model outputs 10" in r.output


def _save(model, tmp_path):
    from kcompress.io import save_model

    p = str(tmp_path / "m.keras")
    save_model(model, p)
    return p


def test_a_split_fraction_that_leaves_nothing_is_a_usage_error():
    with pytest.raises(UsageError):
        open_data("digits:val").split(0.0001)
