"""int4 weights through ai-edge-quantizer: the file holds INT4 tensors (read from the flatbuffer, not from our
report), runs in LiteRT on real digits, is smaller than int8 and stays near the float Keras model (sklearn)."""

import importlib.util
import json
import sys

import numpy as np
import pytest
from conftest import run_cli
from sklearn.metrics import accuracy_score

needs_aeq = pytest.mark.skipif(importlib.util.find_spec("ai_edge_quantizer") is None,
                               reason="ai-edge-quantizer is not installed (pip install 'kcompress[aeq]')")

TOLERANCE = 2.0  # points of accuracy an int4-weights model may lose against float Keras on digits (measured 0.6)


def _xy(data):
    xs, ys = zip(*data.numpy_batches((8, 8, 1), 512))
    return np.concatenate(xs), np.concatenate(ys)


def _filter_types(tflite: bytes) -> dict[str, str]:
    """Output name of every CONV_2D / FULLY_CONNECTED op -> its filter tensor's TensorType name, straight from the
    flatbuffer schema (the interpreter reports INT4 tensors as int8)."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAs(tflite, 0)
    types = {v: k for k, v in vars(fb.TensorType).items() if not k.startswith("_")}
    ops = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    sg = model.Subgraphs(0)
    out = {}
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        kind = ops[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
        if kind in ("CONV_2D", "FULLY_CONNECTED"):
            out[sg.Tensors(op.Outputs(0)).Name().decode()] = types[sg.Tensors(op.Inputs(1)).Type()]
    return out


def _by_layer(tflite: bytes, layers) -> dict[str, str]:
    types = _filter_types(tflite)
    out = {}
    for layer in layers:
        hits = [t for name, t in types.items() if f"/{layer}/" in name]
        assert len(hits) == 1, (layer, types)
        out[layer] = hits[0]
    return out


@pytest.fixture(scope="module")
def fp32(trained_cnn):
    from kcompress.quantization.ptq import convert

    return convert(trained_cnn)


@pytest.fixture(scope="module")
def calib(digits_train):
    return lambda: digits_train.calibration_samples((8, 8, 1), 200)


LAYERS = ("conv1", "conv2", "fc1", "classifier")


@needs_aeq
def test_int4_weights_are_int4_run_in_litert_and_beat_int8_size(trained_cnn, fp32, calib, digits_val):
    from kcompress.litert.interpreter import TFLiteModel
    from kcompress.options import QuantizeOptions
    from kcompress.quantization.aeq import int4_weights
    from kcompress.quantization.ptq import convert

    tfl, report = int4_weights(trained_cnn, fp32, None, calib)
    assert _by_layer(tfl, LAYERS) == dict.fromkeys(LAYERS, "INT4")
    assert [r["weights"] for r in report["layers"]] == ["int4"] * 4
    x, y = _xy(digits_val)  # held out: calibration came from digits:train
    keras_acc = accuracy_score(y, trained_cnn.predict(x, verbose=0).argmax(1))
    int4_acc = accuracy_score(y, TFLiteModel(tfl).predict(x).argmax(1))
    assert 100 * (keras_acc - int4_acc) <= TOLERANCE, (keras_acc, int4_acc)
    int8 = convert(trained_cnn, QuantizeOptions(mode="int8"), calibration=calib)
    assert len(tfl) < 0.6 * len(int8), (len(tfl), len(int8))
    # the converter's own entry point gives the same all-int4 file (what the pipeline and sweeps call)
    assert _filter_types(convert(trained_cnn, QuantizeOptions(mode="int4-weights"), calibration=calib)) == \
        _filter_types(tfl)


@needs_aeq
def test_recipe_first_last_int8_and_regex_float(trained_cnn, fp32, calib):
    from kcompress.quantization.aeq import int4_weights

    tfl, report = int4_weights(trained_cnn, fp32, [{"layers": ["first", "last"], "weights": "int8"}], calib)
    assert _by_layer(tfl, LAYERS) == {"conv1": "INT8", "conv2": "INT4", "fc1": "INT4", "classifier": "INT8"}
    tfl, _ = int4_weights(trained_cnn, fp32, [{"layers": "conv.*", "weights": "float"},
                                              {"layers": ["fc1"], "weights": "int8"}], calib)
    assert _by_layer(tfl, LAYERS) == {"conv1": "FLOAT32", "conv2": "FLOAT32", "fc1": "INT8", "classifier": "INT4"}


@pytest.mark.parametrize("recipe, message", [
    ([{"layers": ["conv1"], "weights": "int3"}], "is not one of int4, int8, float"),
    ([{"layers": ["conv1"], "weights": "int8", "bits": 4}], "exactly the keys layers and weights"),
    ([{"layers": ["conv9"], "weights": "int8"}], "no weighted layer 'conv9' (did you mean"),
    ([{"layers": "dense.*", "weights": "int8"}], "matches no weighted layer"),
    ({"rules": []}, "expected a list of rules"),
])
def test_bad_recipe_is_a_usage_error(trained_cnn, recipe, message):
    from kcompress.errors import UsageError
    from kcompress.quantization.aeq import load_recipe, resolve_recipe

    with pytest.raises(UsageError) as e:
        resolve_recipe(trained_cnn, load_recipe(recipe))
    assert message in str(e.value)


@pytest.fixture(scope="module")
def outlier_mlp(digits_train, digits_val):
    """A trained digits MLP whose first layer has one weight row 5x every column's largest, on pixel 0: that pixel
    is 0 in every sklearn digit, so the float model is unchanged, but per-channel int4 (7 steps) then rounds the
    rest of the layer to zero while int8 (127 steps) keeps it."""
    from kcompress.backend import keras
    from kcompress.train import fit

    L = keras.layers
    inp = L.Input((8, 8, 1), name="image")
    x = L.Dense(32, activation="relu", name="fc_a")(L.Flatten(name="flat")(inp))
    model = keras.Model(inp, L.Dense(10, activation="softmax", name="out")(x))
    fit(model, digits_train, digits_val, epochs=15, lr=1e-2, verbose=0)
    for data in (digits_train, digits_val):
        assert not _xy(data)[0].reshape(-1, 64)[:, 0].any(), "pixel 0 is not always 0"
    kernel, bias = model.get_layer("fc_a").get_weights()
    kernel[0] = 5 * np.abs(kernel).max(axis=0)
    model.get_layer("fc_a").set_weights([kernel, bias])
    return model


@needs_aeq
def test_mixed_precision_meets_max_drop_on_val(outlier_mlp, digits_train, digits_val):
    from kcompress.litert.interpreter import TFLiteModel
    from kcompress.quantization.aeq import mixed_precision
    from kcompress.quantization.ptq import convert

    budget = 1.0
    x, y = _xy(digits_val)
    keras_acc = accuracy_score(y, outlier_mlp.predict(x, verbose=0).argmax(1))
    assert keras_acc > 0.9
    calib = lambda: digits_train.calibration_samples((8, 8, 1), 200)  # noqa: E731
    tfl, plan = mixed_precision(outlier_mlp, convert(outlier_mlp), calib, digits_val, max_drop=budget)
    assert plan["trials"][0]["counts"] == {"int4": 2, "int8": 0, "float": 0}
    assert plan["trials"][0]["drop"] > budget, "all-int4 should miss the budget on this model"
    assert plan["met"], plan["trials"]
    drop = 100 * (keras_acc - accuracy_score(y, TFLiteModel(tfl).predict(x).argmax(1)))
    assert drop <= budget
    assert plan["assignment"]["fc_a"] != "int4"
    assert [r["layer"] for r in plan["ranking"]][0] == "fc_a", "the sensitivity ranking puts the outlier layer first"
    want = {"int4": "INT4", "int8": "INT8", "float": "FLOAT32"}
    assert _by_layer(tfl, ["fc_a", "out"]) == {n: want[p] for n, p in plan["assignment"].items()}


@needs_aeq
def test_api_fills_the_quantize_result(trained_cnn, digits_train, digits_val):
    import kcompress as kc
    from kcompress.litert.interpreter import TFLiteModel

    r = kc.quantize(trained_cnn, digits_train, mode="int4-weights", val_data=digits_val,
                    recipe=[{"layers": ["last"], "weights": "int8"}])
    x, y = _xy(digits_val)
    assert r.after.accuracy == pytest.approx(accuracy_score(y, TFLiteModel(r.tflite).predict(x).argmax(1)))
    assert r.before.accuracy == pytest.approx(accuracy_score(y, trained_cnn.predict(x, verbose=0).argmax(1)))
    assert r.size_bytes < r.precision["int8_bytes"] < r.fp32_size_bytes
    assert r.latency_ms > 0 and r.latency_fp32_ms > 0 and r.precision["latency_int8_ms"] > 0
    assert set(r.precision["slower_than"]) <= {"int8", "fp32"}
    assert (r.smaller_but_slower is None) == (not r.precision["slower_than"])
    assert _by_layer(r.tflite, ["classifier", "fc1"]) == {"classifier": "INT8", "fc1": "INT4"}
    json.dumps(r.to_dict())


@needs_aeq
def test_cli_writes_the_int4_file(cnn_path, tmp_path):
    from kcompress.litert.interpreter import TFLiteModel

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("- {layers: [first, last], weights: int8}\n")
    out = tmp_path / "m4.tflite"
    r = run_cli("quantize", cnn_path, "--data", "digits:train", "--val-data", "digits:val", "--scale", "1/255",
                "--mode", "int4-weights", "--recipe", recipe, "--max-drop", "3", "-o", out)
    assert r.exit_code == 0, r.output
    assert "weights per layer" in r.output
    assert _by_layer(out.read_bytes(), LAYERS) == {"conv1": "INT8", "conv2": "INT4", "fc1": "INT4",
                                                   "classifier": "INT8"}
    assert TFLiteModel(str(out)).predict(np.zeros((2, 8, 8, 1), np.float32)).shape == (2, 10)


def test_without_ai_edge_quantizer_the_mode_exits_1_with_the_install_hint(cnn_path, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "ai_edge_quantizer" or m.startswith("ai_edge_quantizer.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "ai_edge_quantizer", None)
    out = tmp_path / "m4.tflite"
    r = run_cli("quantize", cnn_path, "--data", "digits:val", "--mode", "int4-weights", "-o", out)
    assert r.exit_code == 1, r.output
    assert "pip install 'kcompress[aeq]'" in r.output
    assert [line for line in r.output.splitlines() if line.startswith("Error")] == [
        "Error: mode int4-weights needs ai-edge-quantizer: pip install 'kcompress[aeq]'"]
    assert not out.exists()


@needs_aeq
def test_pipeline_quantize_stage_takes_int4_weights_with_a_recipe_file(cnn_path, tmp_path):
    from kcompress.pipeline.config import config_from_dict
    from kcompress.pipeline.runner import execute

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("- {layers: [first, last], weights: int8}\n")
    cfg = config_from_dict({
        "name": "int4", "model": {"path": cnn_path},
        "data": {"train": "digits:train", "val": "digits:val", "scale": 1 / 255},
        "baseline": {"batch_sizes": [1], "runs": 3},
        "quantize": {"mode": "int4-weights", "recipe": str(recipe), "qat": "never", "calibration_samples": 50,
                     "max_drop": 3},
        "benchmark": {"threads": [1], "runs": 5, "warmup": 1, "trials": 2},
    })
    records = execute(cfg, str(tmp_path / "run"), log=lambda m: None)
    q = records[1]
    tfl = open(q.model_path, "rb").read()
    assert _by_layer(tfl, LAYERS) == {"conv1": "INT8", "conv2": "INT4", "fc1": "INT4", "classifier": "INT8"}
    assert q.metrics["accuracy"] >= records[0].metrics["accuracy"] - 0.03  # measured in LiteRT on VAL
