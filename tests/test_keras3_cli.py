"""Keras 3 models through the commands: quantize from .keras and from an export; outputs back as Keras 3."""

import json

import numpy as np
import pytest
from conftest import run_cli

from kcompress.backend import keras3

SCALE = str(1 / 255)


@pytest.fixture(scope="module")
def k3_cnn_path(tmp_path_factory, digits_train):
    """A Keras 3 CNN trained on digits (explicit metric object: the string "accuracy" fails on keras 3.15/TF 2.21)."""
    k = keras3()
    k.utils.set_random_seed(0)
    model = k.Sequential([
        k.Input((8, 8, 1)),
        k.layers.Conv2D(16, 3, padding="same", activation="relu"),
        k.layers.BatchNormalization(),
        k.layers.Flatten(),
        k.layers.Dense(64, activation="relu"),
        k.layers.Dense(10, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=[k.metrics.SparseCategoricalAccuracy()])
    xs, ys = zip(*digits_train.numpy_batches((8, 8, 1), 256))
    model.fit(np.concatenate(xs), np.concatenate(ys), epochs=8, verbose=0)
    d = tmp_path_factory.mktemp("k3")
    path = str(d / "k3.keras")
    model.save(path)
    model.export(str(d / "exported"))
    return path


def test_quantize_a_keras3_file(k3_cnn_path, tmp_path):
    out = tmp_path / "k3_int8.tflite"
    r = run_cli("quantize", k3_cnn_path, "--data", "digits:train", "--val-data", "digits:val", "--scale", SCALE,
                "-o", out)
    assert r.exit_code == 0, r.output
    r = run_cli("evaluate", out, "--data", "digits:val", "--scale", SCALE, "--json", "--reference", k3_cnn_path)
    doc = json.loads(r.output)
    assert doc["accuracy"] > 0.85 and abs(doc["reference"]["accuracy_delta"]) <= 0.01


def test_quantize_a_keras3_export_and_refuse_training_stages(k3_cnn_path, tmp_path):
    exported = k3_cnn_path.replace("k3.keras", "exported")
    out = tmp_path / "exp_int8.tflite"
    r = run_cli("quantize", exported, "--data", "digits:train", "--val-data", "digits:val", "--scale", SCALE, "-o", out)
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[4:8] == b"TFL3"
    r = run_cli("baseline", exported, "--data", "digits:val")
    assert r.exit_code == 1
    assert "export" in r.output.lower() and "Traceback" not in r.output


@pytest.mark.parametrize("method, extra", [("magnitude", ["--sparsity", "0.5"]), ("structured", ["--ratio", "0.25"])])
def test_prune_a_keras3_file_returns_keras3(k3_cnn_path, tmp_path, method, extra):
    from kcompress.keras3 import is_keras3_file

    out = tmp_path / f"k3_{method}.keras"
    r = run_cli("prune", k3_cnn_path, "--data", "digits:train", "--val-data", "digits:val", "--scale", SCALE,
                "--method", method, *extra, "--epochs", "1", "-o", out)
    assert r.exit_code == 0, r.output
    assert "as a Keras 3 model" in r.output
    assert is_keras3_file(str(out))
    model = keras3().models.load_model(str(out))
    x = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 1)).astype(np.float32)
    assert model.predict(x, verbose=0).shape == (4, 10)


def test_distill_a_keras3_teacher_returns_a_keras3_student(k3_cnn_path, tmp_path):
    from kcompress.keras3 import is_keras3_file

    out = tmp_path / "k3_student.keras"
    r = run_cli("distill", "--teacher", k3_cnn_path, "--data", "digits:train", "--val-data", "digits:val",
                "--scale", SCALE, "--student-width", "0.5", "--epochs", "2", "--max-drop", "100", "-o", out)
    assert r.exit_code == 0, r.output
    assert is_keras3_file(str(out))
    student = keras3().models.load_model(str(out))
    assert student.count_params() < keras3().models.load_model(k3_cnn_path).count_params()
