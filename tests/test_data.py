import numpy as np
import pytest
from PIL import Image

from kcompress.data import Preprocess, check_fits, open_data
from kcompress.errors import KcompressError


def test_builtin_digits_split_is_stratified_and_disjoint():
    train, val, full = open_data("digits:train"), open_data("digits:val"), open_data("digits")
    assert train.num_samples + val.num_samples == full.num_samples == 1797
    counts = val.class_counts()
    assert min(counts.values()) >= 35 and max(counts.values()) <= 37


def test_npz_data_reach_the_model_as_stored(tmp_path):
    x = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1]))
    src = open_data(str(tmp_path / "d.npz"))
    (xb, yb), = list(src.numpy_batches((4, 4, 1), batch_size=8))
    np.testing.assert_array_equal(xb, x)
    np.testing.assert_array_equal(yb, [0, 1])


def test_preprocess_is_applied_per_channel(tmp_path):
    x = np.full((1, 2, 2, 3), 100.0, np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0]))
    pre = Preprocess.parse(scale="0.5", offset="10", mean="10,20,30", std="2")
    (xb, _), = list(open_data(str(tmp_path / "d.npz"), pre).numpy_batches((2, 2, 3)))
    np.testing.assert_allclose(xb[0, 0, 0], [(60 - 10) / 2, (60 - 20) / 2, (60 - 30) / 2])


def test_preprocess_takes_fractions_and_rejects_nonsense():
    from kcompress.errors import UsageError

    assert Preprocess.parse(scale="1/255").scale == 1 / 255
    with pytest.raises(UsageError, match="got '1/0'"):
        Preprocess.parse(scale="1/0")


def test_one_hot_labels_become_indices(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.eye(3)[[2, 0, 1]])
    assert open_data(str(tmp_path / "d.npz")).labels.tolist() == [2, 0, 1]


def test_image_folder_skips_non_images_and_resizes(tmp_path):
    for cls, color in (("cat", 10), ("dog", 200)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), color, np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipped 2 file"):
        src = open_data(str(tmp_path))
    assert src.class_names == ("cat", "dog") and src.num_samples == 6
    (x, y), = list(src.numpy_batches((8, 8, 1), batch_size=16))
    assert x.shape == (6, 8, 8, 1)
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert x[:3].max() < 20 and x[3:].min() > 150  # float pixels 0-255, no hidden scaling


def test_shape_mismatch_and_bad_labels_are_clear(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 5, 5, 1)), y=np.array([0, 12]))
    src = open_data(str(tmp_path / "d.npz"))
    with pytest.raises(KcompressError, match=r"shape \(5, 5, 1\) but the model expects \(8, 8, 1\)"):
        check_fits(src, (8, 8, 1), 10)
    with pytest.raises(KcompressError, match="label 12 is outside the model's 10 classes"):
        check_fits(src, (5, 5, 1), 10)


def test_empty_and_missing_data(tmp_path):
    np.savez(tmp_path / "e.npz", x=np.zeros((0, 2)), y=np.zeros((0,)))
    with pytest.raises(KcompressError, match="empty"):
        open_data(str(tmp_path / "e.npz"))
    (tmp_path / "folder" / "a").mkdir(parents=True)
    with pytest.raises(KcompressError, match="empty"):
        open_data(str(tmp_path / "folder"))
    with pytest.raises(KcompressError, match="no such data"):
        open_data(str(tmp_path / "nope"))
