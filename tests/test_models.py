import os

import numpy as np
import pytest

from kcompress.backend import keras
from kcompress.errors import KcompressError
from kcompress.io import load_model, model_format, save_model
from kcompress.modelinfo import count_macs, count_params


def test_macs_counted_by_hand():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)  # 8*8 * 3*3*3 * 4 = 6912
    x = keras.layers.DepthwiseConv2D(3, padding="valid")(x)  # 6*6 * 3*3 * 4 = 1296
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(10)(x)  # 144 * 10 = 1440
    model = keras.Model(inp, out)
    assert count_macs(model) == 6912 + 1296 + 1440
    assert count_params(model)["total"] == (3 * 3 * 3 * 4 + 4) + (3 * 3 * 4 + 4) + (144 * 10 + 10)


@pytest.mark.parametrize("name", ["m.keras", "m.h5", "m_savedmodel"])
def test_every_tf_keras_format_loads_with_the_same_outputs(trained_cnn, tmp_path, name):
    path = str(tmp_path / name)
    save_model(trained_cnn, path)
    assert model_format(path) == {"m.keras": "keras", "m.h5": "h5", "m_savedmodel": "savedmodel"}[name]
    x = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(load_model(path).predict(x, verbose=0), trained_cnn.predict(x, verbose=0), atol=1e-6)


def test_save_refuses_to_overwrite_and_leaves_no_temp_files(trained_cnn, tmp_path):
    path = str(tmp_path / "m.keras")
    save_model(trained_cnn, path)
    before = os.path.getmtime(path)
    with pytest.raises(KcompressError, match="exists; pass --overwrite"):
        save_model(trained_cnn, path)
    assert os.path.getmtime(path) == before
    assert os.listdir(tmp_path) == ["m.keras"]


def test_not_a_model(tmp_path):
    (tmp_path / "x.keras").write_text("text")
    with pytest.raises(KcompressError, match="not a model"):
        model_format(str(tmp_path / "x.keras"))
    (tmp_path / "d").mkdir()
    with pytest.raises(KcompressError, match="not a SavedModel"):
        model_format(str(tmp_path / "d"))
