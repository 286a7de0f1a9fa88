"""Shared fixtures: one digits CNN trained once per session, real data from scikit-learn."""


import numpy as np
import pytest

from kcompress.backend import keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TF)


@pytest.fixture(scope="session")
def digits_pre():
    from kcompress.data import Preprocess

    return Preprocess(scale=1 / 255)


@pytest.fixture(scope="session")
def digits_train(digits_pre):
    from kcompress.data import open_data

    return open_data("digits:train", digits_pre)


@pytest.fixture(scope="session")
def digits_val(digits_pre):
    from kcompress.data import open_data

    return open_data("digits:val", digits_pre)


@pytest.fixture(scope="session")
def digits(digits_train, digits_val):
    """(digits:train, digits:val), pixels scaled to 0-1."""
    return digits_train, digits_val


@pytest.fixture(scope="session")
def trained_cnn(digits_train, digits_val):
    """digits_cnn trained for 10 epochs (about 96% on digits:val)."""
    from kcompress.train import fit
    from kcompress.zoo import digits_cnn

    model = digits_cnn()
    fit(model, digits_train, digits_val, epochs=10, lr=2e-3, verbose=0)
    return model


@pytest.fixture(scope="session")
def cnn_path(trained_cnn, tmp_path_factory):
    from kcompress.io import save_model

    path = str(tmp_path_factory.mktemp("models") / "cnn.keras")
    save_model(trained_cnn, path)
    return path


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory):
    """digits:val as an .npz of raw 0-255 pixels (what a user would save)."""
    from sklearn.datasets import load_digits

    from kcompress.data import open_data

    val = open_data("digits:val")
    xs = np.concatenate([x for x, _ in val.numpy_batches((8, 8, 1), 512)])
    path = str(tmp_path_factory.mktemp("data") / "digits_val.npz")
    np.savez(path, x=xs, y=val.labels)
    assert load_digits is not None
    return path


def run_cli(*args):
    from click.testing import CliRunner

    from kcompress.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result
