"""ONNX Runtime as a second runtime: export checked against Keras, static QDQ and dynamic quantization, and the
commands (export, quantize --format onnx, evaluate, bench, compare) on .onnx files."""

import json

import numpy as np
import pytest
from conftest import run_cli

SCALE = str(1 / 255)


@pytest.fixture(scope="module")
def val_xy(digits_val):
    xs, ys = zip(*digits_val.numpy_batches((8, 8, 1), 512))
    return np.concatenate(xs), np.concatenate(ys)


@pytest.fixture(scope="module")
def onnx_path(trained_cnn, digits_val, tmp_path_factory):
    from kcompress.onnx import export_onnx

    path = str(tmp_path_factory.mktemp("onnx") / "cnn.onnx")
    record = export_onnx(trained_cnn, path, check_data=digits_val)
    return path, record


@pytest.fixture(scope="module")
def int8_bytes(onnx_path, digits_train):
    from kcompress.onnx import quantize_onnx

    return quantize_onnx(onnx_path[0], "int8", digits_train, per_channel=True)


def test_export_matches_keras(trained_cnn, onnx_path, val_xy):
    from kcompress.onnx import ONNXModel
    from kcompress.onnx.export import exported_record

    path, record = onnx_path
    x, _ = val_xy
    ref = trained_cnn.predict(x, verbose=0)  # the trusted reference: the Keras model itself
    got = ONNXModel(path).predict(x, batch_size=50)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4
    assert record["max_abs_diff"] < 1e-4 and record["samples"] == 256 and record["opset"] == 17
    assert record["size_bytes"] == len(open(path, "rb").read())
    assert exported_record(path)["max_abs_diff"] == record["max_abs_diff"]


def test_int8_qdq_per_channel_accuracy_and_graph(trained_cnn, int8_bytes, onnx_path, val_xy):
    import onnx
    from onnx import numpy_helper
    from sklearn.metrics import accuracy_score

    from kcompress.onnx import ONNXModel

    x, y = val_xy
    float_acc = accuracy_score(y, trained_cnn.predict(x, verbose=0).argmax(1))
    int8_acc = accuracy_score(y, ONNXModel(int8_bytes).predict(x).argmax(1))
    assert int8_acc >= float_acc - 0.02, (float_acc, int8_acc)

    proto = onnx.load_model_from_string(int8_bytes)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 5
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    int8_weights = [a for a in inits.values() if a.dtype == np.int8 and a.ndim >= 2]
    assert len(int8_weights) == 4  # conv1, conv2, fc1, classifier kernels
    assert not any(a.dtype == np.float32 and a.size > 1000 for a in inits.values())  # no float kernel left
    # per channel: the weight DequantizeLinear of conv2 has one scale per output channel (64)
    scales = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in inits and inits[n.input[0]].ndim == 4]
    assert sorted(s.size for s in scales) == [32, 64]
    assert len(int8_bytes) < 0.35 * len(open(onnx_path[0], "rb").read())


def test_per_tensor_and_dynamic(onnx_path, digits_train, val_xy):
    import onnx
    from onnx import numpy_helper

    from kcompress.onnx import ONNXModel, quantize_onnx

    x, y = val_xy
    per_tensor = quantize_onnx(onnx_path[0], "int8", digits_train, per_channel=False)
    proto = onnx.load_model_from_string(per_tensor)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    scales = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in inits and inits[n.input[0]].ndim >= 2]
    assert scales and all(s.size == 1 for s in scales)
    assert (ONNXModel(per_tensor).predict(x).argmax(1) == y).mean() > 0.9

    dyn = quantize_onnx(onnx_path[0], "dynamic")
    ops = {n.op_type for n in onnx.load_model_from_string(dyn).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    ref = ONNXModel(onnx_path[0]).predict(x)
    got = ONNXModel(dyn).predict(x)
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.97


def test_calibration_uses_the_litert_samples(digits_train):
    """The CalibrationDataReader is fed exactly DataSource.calibration_samples (what the LiteRT converter gets)."""
    from kcompress.onnx.quantize import calibration_arrays

    want = np.concatenate(list(digits_train.calibration_samples((8, 8, 1), 40, seed=3)))
    got = np.concatenate(list(calibration_arrays(digits_train, (8, 8, 1), 40, seed=3)))
    np.testing.assert_array_equal(got, want)


def test_evaluate_and_predictor_on_onnx(onnx_path, trained_cnn, digits_val, val_xy):
    from sklearn.metrics import accuracy_score

    from kcompress.evaluation import evaluate

    ev = evaluate(onnx_path[0], digits_val)
    x, y = val_xy
    assert ev.runtime == "onnxruntime" and ev.output_kind == "probabilities"
    assert ev.accuracy == pytest.approx(accuracy_score(y, trained_cnn.predict(x, verbose=0).argmax(1)))
    assert evaluate(trained_cnn, digits_val).runtime == "keras"


def test_cli_evaluate_bench_compare_on_onnx(onnx_path, int8_bytes, cnn_path, tmp_path):
    q = tmp_path / "q.onnx"
    q.write_bytes(int8_bytes)
    r = run_cli("evaluate", q, "--data", "digits:val", "--scale", SCALE, "--reference", onnx_path[0], "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["runtime"] == "onnxruntime" and d["reference"]["runtime"] == "onnxruntime" and d["accuracy"] > 0.9

    r = run_cli("bench", q, "--runs", 5, "--warmup", 1, "--trials", 2, "--threads", "1,2", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)["results"]
    assert [x["threads"] for x in res] == [1, 2]
    for x in res:
        assert x["runtime"] == "onnxruntime"
        assert x["init_ms"] > 0 and x["first_inference_ms"] > 0 and x["latency_ms"]["p95"] >= x["latency_ms"]["p50"]
        assert x["extra"]["tensorflow_imported"] is False and x["memory_mb"]["peak_rss"] > 0
        assert x["extra"]["providers"] == ["CPUExecutionProvider"]

    r = run_cli("compare", cnn_path, q, "--data", "digits:val", "--scale", SCALE, "--json")
    assert r.exit_code == 0, r.output
    c = json.loads(r.output)
    assert c["a"]["runtime"] == "keras" and c["b"]["runtime"] == "onnxruntime"
    assert c["a"]["latency_runtime"] == c["b"]["latency_runtime"] == "onnxruntime"  # both timed in ONNX Runtime
    assert c["agreement"] > 0.95


def test_cli_export_refuses_overwrite_and_quantize_format_onnx(cnn_path, tmp_path):
    out = tmp_path / "m.onnx"
    r = run_cli("export", cnn_path, "--format", "onnx", "-o", out, "--data", "digits:val", "--scale", SCALE)
    assert r.exit_code == 0, r.output
    assert "max |difference|" in r.output and out.exists()
    before = out.read_bytes()
    r = run_cli("export", cnn_path, "-o", out)
    assert r.exit_code == 1 and "--overwrite" in r.output and out.read_bytes() == before
    r = run_cli("export", cnn_path, "-o", out, "--overwrite", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["max_abs_diff"] < 1e-4

    q = tmp_path / "m_int8.onnx"
    r = run_cli("quantize", out, "--data", "digits:train", "--val-data", "digits:val", "--scale", SCALE,
                "--format", "onnx", "--mode", "int8", "--per-tensor", "--json", "-o", q)
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["runtime"] == "onnxruntime" and d["options"]["per_channel"] is False and q.exists()
    assert d["accuracy_after"] > d["accuracy_before"] - 0.02


def test_corrupt_onnx_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07this is not a model")
    r = run_cli("evaluate", bad, "--data", "digits:val")
    assert r.exit_code == 1
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "cannot load the ONNX model" in lines[0]
    r = run_cli("bench", bad, "--runs", 2, "--trials", 1)
    assert r.exit_code == 1 and "cannot load the ONNX model" in r.output


def test_keras3_model_exports(tmp_path, digits_val):
    from kcompress.backend import keras3
    from kcompress.onnx import ONNXModel, export_onnx

    k = keras3()
    k.utils.set_random_seed(0)
    model = k.Sequential([k.Input((8, 8, 1)), k.layers.Conv2D(8, 3, activation="relu"), k.layers.Flatten(),
                          k.layers.Dense(10, activation="softmax")])
    path = str(tmp_path / "k3.onnx")
    record = export_onnx(model, path, check_data=digits_val)
    x = np.concatenate([b for b, _ in digits_val.numpy_batches((8, 8, 1), 64, limit=64)])
    np.testing.assert_allclose(ONNXModel(path).predict(x), np.asarray(model(x)), atol=1e-5)
    assert record["max_abs_diff"] < 1e-5
