"""Safe model loading: files whose layers would run code at load are refused unless trusted.

The Lambda layer's code creates a marker file when it runs. The trusted loads prove that the code really runs (the
marker appears), so the refusals that leave no marker mean something.
"""

import os

import pytest
from conftest import run_cli

import kcompress as kc
from kcompress.backend import keras

FORMATS = ("h5", "savedmodel", "keras")


def _save(model, folder, fmt: str) -> str:
    path = os.path.join(folder, {"h5": "m.h5", "savedmodel": "m_sm", "keras": "m.keras"}[fmt])
    if fmt == "savedmodel":
        model.save(path, save_format="tf")
    else:
        model.save(path)
    return path


class Scale(keras.layers.Layer):
    """A custom layer nobody registered."""

    def call(self, x):
        return 2.0 * x


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    """{format: path} of a model with a Lambda (nested inside a Sequential) that creates ``marker`` when run."""
    folder = tmp_path_factory.mktemp("evil")
    marker = str(folder / "marker")
    fn = eval(f"lambda x: (open({marker!r}, 'w').close(), x)[1]")  # the path is a constant in the bytecode
    inp = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="dense")(inp)
    out = keras.Sequential([keras.layers.Lambda(fn, name="evil")], name="inner")(hidden)
    model = keras.Model(inp, out)
    paths = {fmt: _save(model, str(folder), fmt) for fmt in FORMATS}
    os.remove(marker)  # building and saving ran the code once
    return paths, marker


@pytest.fixture
def marker(evil):
    paths, marker = evil
    if os.path.exists(marker):
        os.remove(marker)
    yield marker
    if os.path.exists(marker):
        os.remove(marker)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lambda_model_is_refused_by_the_api_without_running_its_code(evil, marker, fmt):
    with pytest.raises(kc.KcompressError) as err:
        kc.load_model(evil[0][fmt])
    text = str(err.value)
    assert "\n" not in text
    assert "'evil' (Lambda)" in text and "--trust-model" in text and "trust_model=True" in text
    assert not os.path.exists(marker)
    with pytest.raises(kc.KcompressError, match="'evil' \\(Lambda\\)"):
        kc.inspect(evil[0][fmt])
    assert not os.path.exists(marker)


@pytest.mark.parametrize("fmt", FORMATS)
def test_trusting_the_model_runs_its_code(evil, marker, fmt):
    model = kc.load_model(evil[0][fmt], trust_model=True)
    assert os.path.exists(marker)  # so the refusals above really prevented code from running
    assert model.get_layer("inner").get_layer("evil") is not None


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_refuses_with_one_line_and_exit_1(evil, marker, fmt):
    result = run_cli("inspect", evil[0][fmt])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("Error: refusing to load"), result.stderr
    assert "'evil' (Lambda)" in errors[0] and "--trust-model" in errors[0]
    assert not os.path.exists(marker)


def test_cli_trust_model_flag_loads_it(evil, marker):
    result = run_cli("inspect", "--trust-model", evil[0]["h5"], "--json")
    assert result.exit_code == 0, result.output
    assert os.path.exists(marker)


def test_unregistered_custom_class_is_refused_by_name_and_loads_when_known(tmp_path):
    inp = keras.Input((4,))
    model = keras.Model(inp, Scale(name="scale")(keras.layers.Dense(3)(inp)))
    for fmt in ("h5", "savedmodel"):
        path = _save(model, str(tmp_path), fmt)
        with pytest.raises(kc.KcompressError, match=r"'scale' \(Scale\) is of the unregistered custom class"):
            kc.load_model(path)
        with keras.utils.custom_object_scope({"Scale": Scale}):  # the user vouches for the class by providing it
            assert kc.load_model(path).get_layer("scale").__class__ is Scale
    result = run_cli("inspect", os.path.join(str(tmp_path), "m.h5"))
    assert result.exit_code == 1 and "'scale' (Scale)" in result.stderr and "Traceback" not in result.output


def test_plain_models_still_load(tmp_path):
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    x = keras.layers.Bidirectional(keras.layers.LSTM(2))(keras.layers.Reshape((36, 4))(x))
    small = keras.Model(inp, keras.layers.Dense(3)(x))
    for fmt in FORMATS:
        assert len(kc.load_model(_save(small, str(tmp_path), fmt)).layers) == len(small.layers)
    mobilenet = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
    path = str(tmp_path / "mobilenet.h5")
    mobilenet.save(path)
    assert kc.load_model(path).count_params() == mobilenet.count_params()


def test_keras3_lambda_is_refused_and_the_message_says_how_to_trust(tmp_path):
    from kcompress.backend import keras3

    k3 = keras3()
    marker = str(tmp_path / "marker")
    fn = eval(f"lambda x: (open({marker!r}, 'w').close(), x)[1]")
    inp = k3.Input((4,))
    model = k3.Model(inp, k3.layers.Lambda(fn, name="evil")(k3.layers.Dense(3)(inp)))
    path = str(tmp_path / "k3.keras")
    model.save(path)
    os.remove(marker)
    with pytest.raises(kc.KcompressError) as err:
        kc.load_model(path)
    assert "Lambda" in str(err.value) and "--trust-model" in str(err.value) and "trust_model=True" in str(err.value)
    assert not os.path.exists(marker)
    with pytest.raises(kc.KcompressError, match="Lambda"):  # trusted, Keras 3 loads it; tf_keras cannot rebuild it
        kc.load_model(path, trust_model=True)
    assert os.path.exists(marker)


def test_qat_model_saved_as_h5_or_savedmodel_loads_back_safely_and_keras_is_refused(tmp_path):
    import numpy as np

    from kcompress.backend import tfmot
    from kcompress.errors import KcompressError
    from kcompress.io import load_model, save_model

    inp = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(keras.layers.Conv2D(4, 3)(inp))
    qat = tfmot().quantization.keras.quantize_model(keras.Model(inp, keras.layers.Dense(10)(x)))
    xs = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 1)).astype("float32")
    for name in ("q.h5", "q_savedmodel"):
        save_model(qat, str(tmp_path / name))
        back = load_model(str(tmp_path / name))  # safe mode: tfmot's layers are known, nothing trusted
        assert [type(layer).__name__ for layer in back.layers] == [type(layer).__name__ for layer in qat.layers]
        np.testing.assert_allclose(back(xs).numpy(), qat(xs).numpy(), atol=1e-6)
    with pytest.raises(KcompressError, match="does not load back from a .keras"):
        save_model(qat, str(tmp_path / "q.keras"))
    assert not (tmp_path / "q.keras").exists()
