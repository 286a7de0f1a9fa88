"""A pipeline asked for both formats (convert.formats: [tflite, onnx]): both files, measured, gated, reported."""

import json
import os

import numpy as np
import pytest
from sklearn.metrics import accuracy_score

from kcompress.errors import UsageError
from kcompress.pipeline.config import config_from_dict
from kcompress.pipeline.report import build_report, write_report
from kcompress.pipeline.runner import GateFailed, execute


def _cfg(cnn_path, formats=("tflite", "onnx"), **quantize):
    return config_from_dict({
        "name": "both", "model": {"path": cnn_path},
        "data": {"train": "digits:train", "val": "digits:val", "scale": 1 / 255},
        "baseline": {"batch_sizes": [1], "runs": 3},
        "quantize": {"qat": "never", "calibration_samples": 50, **quantize},
        "convert": {"formats": list(formats)},
        "benchmark": {"threads": [1], "runs": 5, "warmup": 1, "trials": 2},
    })


@pytest.fixture(scope="module")
def both_run(cnn_path, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "both")
    logs = []
    records = execute(_cfg(cnn_path), run_dir, log=logs.append)
    return run_dir, records, logs


def test_quantize_stage_writes_and_measures_an_onnx_file_beside_the_tflite(both_run, digits_val):
    import onnx

    from kcompress.onnx.runtime import ONNXModel

    run_dir, records, logs = both_run
    qdir = os.path.join(run_dir, "04-quantize")
    assert {"model.tflite", "model.onnx", "model_fp32.onnx"} <= set(os.listdir(qdir))
    m = json.load(open(os.path.join(qdir, "metrics.json")))["onnx"]
    assert m["runtime"] == "onnxruntime" and m["mode"] == "int8" and m["per_channel"]
    # really int8: QDQ nodes and int8 weights, and smaller than the fp32 export
    graph = onnx.load(os.path.join(qdir, "model.onnx")).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)
    assert m["size_bytes"] < 0.4 * m["fp32_size_bytes"]
    # the recorded VAL accuracy is what ONNX Runtime gives on VAL, scored independently
    x, y = map(np.concatenate, zip(*digits_val.numpy_batches((8, 8, 1), 512)))
    pred = ONNXModel(os.path.join(qdir, "model.onnx")).predict(x, batch_size=64).argmax(-1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-9)
    baseline = records[0].metrics["accuracy"]
    assert m["accuracy"] >= baseline - 0.02  # int8 QDQ per-channel keeps the float model's accuracy
    assert m["export_check"]["max_abs_diff"] <= m["export_check"]["tolerance"]
    assert m["latency_p50_ms"] > 0 and m["init_ms"] > 0
    assert any("onnx int8: val" in line for line in logs)


def test_benchmark_stage_times_both_runtimes_and_the_report_sets_them_side_by_side(both_run):
    run_dir, _, _ = both_run
    bench = json.load(open(os.path.join(run_dir, "05-benchmark", "metrics.json")))["bench"]
    assert {b["runtime"] for b in bench} == {"litert-python", "onnxruntime"}
    assert all(b["init_ms"] is not None and b["first_inference_ms"] is not None for b in bench)
    rows = build_report([run_dir])["runs"][0]["stages"]
    assert [(r["stage"], r["kind"]) for r in rows] == [("baseline", "keras"), ("quantize", "tflite"),
                                                      ("quantize", "onnx")]
    onnx_row = rows[-1]
    metrics = json.load(open(os.path.join(run_dir, "04-quantize", "metrics.json")))["onnx"]
    assert onnx_row["accuracy"] == metrics["accuracy"] and onnx_row["size_bytes"] == metrics["size_bytes"]
    assert 0.9 <= onnx_row["agreement_with_baseline"] <= 1.0
    paths = write_report([run_dir], out_dir=os.path.join(run_dir, "report"), overwrite=True)
    md = open(paths["md"]).read()
    assert "| quantize (onnx int8) |" in md and "| quantize (ptq) |" in md
    assert "onnxruntime" in md and "first inference" in md


def test_resume_with_onnx_added_reruns_only_quantize(cnn_path, tmp_path):
    run_dir = str(tmp_path / "r")
    execute(_cfg(cnn_path, formats=("tflite",)), run_dir, log=lambda m: None)
    assert not os.path.exists(os.path.join(run_dir, "04-quantize", "model.onnx"))
    logs = []
    execute(_cfg(cnn_path), run_dir, resume=True, log=logs.append)
    assert any(line.startswith("[baseline] finished earlier") for line in logs)
    assert any(line.startswith("[quantize] running") for line in logs)
    assert os.path.exists(os.path.join(run_dir, "04-quantize", "model.onnx"))


def test_onnx_file_is_gated_like_the_tflite(cnn_path, tmp_path):
    with pytest.raises(GateFailed, match="ONNX file .*dropped VAL accuracy"):
        execute(_cfg(cnn_path, max_drop=-100.0), str(tmp_path / "g"), log=lambda m: None)
    assert os.path.exists(tmp_path / "g" / "04-quantize" / "model.onnx")  # artifacts kept


@pytest.mark.parametrize("formats, message", [(["onnx"], "must include tflite"), (["tflite", "pt"], "'pt' is not")])
def test_formats_are_validated(cnn_path, formats, message):
    with pytest.raises(UsageError, match=message):
        _cfg(cnn_path, formats=formats)


def test_modes_without_an_onnx_equivalent_say_what_onnx_gets():
    from kcompress.pipeline.formats import onnx_mode

    assert onnx_mode("int8") == ("int8", "") and onnx_mode("dynamic") == ("dynamic", "")
    assert onnx_mode("float16")[0] == "fp32" and onnx_mode("int16x8")[0] == "int8"
    assert "int16x8" in onnx_mode("int16x8")[1]
    assert np.all([onnx_mode(m)[0] in ("int8", "dynamic", "fp32") for m in ("fp32", "int4-weights")])


def test_inspect_reads_an_onnx_file_and_tells_float_from_quantized(both_run):
    import onnx
    from conftest import run_cli

    import kcompress as kc

    qdir = os.path.join(both_run[0], "04-quantize")
    compute = [n for n in onnx.load(os.path.join(qdir, "model_fp32.onnx")).graph.node
               if n.op_type in ("Conv", "Gemm", "MatMul")]
    fp32 = kc.inspect(os.path.join(qdir, "model_fp32.onnx"))
    assert fp32["format"] == "onnx" and fp32["quantization"]["dequantize_linear"] == 0
    assert len(fp32["quantization"]["float_compute_ops"]) == len(compute) > 0
    assert fp32["initializer_bytes"]["float32"] > 0 and "int8" not in fp32["initializer_bytes"]
    q = kc.inspect(os.path.join(qdir, "model.onnx"))
    assert q["quantization"]["float_compute_ops"] == [] and q["quantization"]["quantize_linear"] > 0
    assert q["quantization"]["weights_per_channel"] == len(compute) and q["quantization"]["weights_per_tensor"] == 0
    assert q["initializer_bytes"]["int8"] > 0 and q["inputs"][0]["dtype"] == "float32"
    out = run_cli("inspect", os.path.join(qdir, "model.onnx"))
    assert out.exit_code == 0 and "DequantizeLinear" in out.output and "float compute ops: 0" in out.output
