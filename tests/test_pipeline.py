"""Pipelines end to end on the digits CNN: stage folders, gates, resume, metadata, report."""

import json
import os

import pytest
import yaml
from conftest import run_cli

from kcompress.errors import KcompressError
from kcompress.pipeline.config import config_from_dict
from kcompress.pipeline.runner import GateFailed, execute
from kcompress.quantization.metadata import read_metadata

SCALE = 1 / 255


def _cfg(cnn_path, qat_epochs=None, **quantize):
    return config_from_dict({
        "name": "t", "model": {"path": cnn_path},
        "data": {"train": "digits:train", "val": "digits:val", "scale": SCALE},
        "baseline": {"batch_sizes": [1], "runs": 3},
        "quantize": {"qat": "never", "calibration_samples": 50, **quantize},
        "benchmark": {"threads": [1], "runs": 5, "warmup": 1},
        **({"qat": {"epochs": qat_epochs}} if qat_epochs else {}),
    })


@pytest.fixture(scope="module")
def ptq_run(cnn_path, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "ptq")
    logs = []
    records = execute(_cfg(cnn_path), run_dir, log=logs.append)
    return run_dir, records, logs


def test_stage_folders_hold_model_metrics_config_and_log(ptq_run):
    run_dir, records, _ = ptq_run
    assert [r.stage for r in records] == ["baseline", "quantize", "benchmark"]
    for name in ("01-baseline", "04-quantize"):
        files = set(os.listdir(os.path.join(run_dir, name)))
        assert {"metrics.json", "config.yaml", "log.txt", "stage.json", "outputs.npz"} <= files
    q = json.load(open(os.path.join(run_dir, "04-quantize", "metrics.json")))
    b = json.load(open(os.path.join(run_dir, "01-baseline", "metrics.json")))
    assert q["kind"] == "tflite" and q["method"] == "ptq"
    assert q["config_hash"] == b["config_hash"] == read_metadata(os.path.join(run_dir, "04-quantize", "model.tflite"))["config_hash"]
    assert abs(q["accuracy"] - b["accuracy"]) <= 0.01
    assert q["tflite_bytes"] < 0.3 * b["params"] * 4
    assert os.path.exists(os.path.join(run_dir, "01-baseline", "baseline.json"))
    bench = json.load(open(os.path.join(run_dir, "05-benchmark", "bench.json")))
    assert bench["schema"] == "kcompress.bench/1"


def test_final_tflite_carries_metadata(ptq_run):
    _, records, _ = ptq_run
    meta = read_metadata(records[-1].model_path)
    assert meta["model_name"] == "t" and meta["config_hash"]
    assert [s["stage"] for s in meta["stages"]] == ["baseline", "quantize"]
    assert meta["metrics"]["accuracy"] > 0.9
    assert meta["stages"][1]["settings"]["mode"] == "int8"


def test_resume_skips_finished_stages_and_reruns_changed_ones(ptq_run, cnn_path):
    run_dir, _, _ = ptq_run
    logs = []
    execute(_cfg(cnn_path), run_dir, resume=True, log=logs.append)
    assert sum("finished earlier, skipped" in line for line in logs) == 3
    logs.clear()
    execute(_cfg(cnn_path, calibration_samples=40), run_dir, resume=True, log=logs.append)
    assert any(line.startswith("[baseline] finished earlier") for line in logs)
    assert any(line.startswith("[quantize] running") for line in logs)
    with pytest.raises(KcompressError, match="not empty; pass --resume"):
        execute(_cfg(cnn_path), run_dir)


def test_loosening_a_gate_and_resuming_does_not_redo_the_stage(cnn_path, tmp_path):
    run_dir = str(tmp_path / "gate")
    with pytest.raises(GateFailed):
        execute(_cfg(cnn_path, max_drop=-100.0), run_dir, log=lambda m: None)
    logs = []
    execute(_cfg(cnn_path, max_drop=5.0), run_dir, resume=True, log=logs.append)
    assert "[quantize] finished earlier, skipped" in logs
    assert any(line.startswith("[benchmark] running") for line in logs)


def test_gate_stops_the_run_naming_the_stage_and_keeps_artifacts(cnn_path, tmp_path):
    run_dir = str(tmp_path / "gated")
    with pytest.raises(GateFailed, match=r"stage quantize dropped VAL accuracy by .* more than its max_drop -100"):
        execute(_cfg(cnn_path, max_drop=-100.0), run_dir, log=lambda m: None)
    assert os.path.exists(os.path.join(run_dir, "04-quantize", "model.tflite"))
    assert not os.path.exists(os.path.join(run_dir, "05-benchmark"))


def test_report_over_two_runs(ptq_run, tmp_path):
    run_dir, _, _ = ptq_run
    out = tmp_path / "rep"
    r = run_cli("report", run_dir, run_dir, "-o", out)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "report.json").read_text())
    stages = doc["runs"][0]["stages"]
    assert [s["stage"] for s in stages] == ["baseline", "quantize"]
    assert stages[1]["pareto_size"] and stages[1]["agreement_with_baseline"] > 0.95
    md = (out / "report.md").read_text()
    assert "| quantize (ptq) |" in md and "![pareto_size.png](pareto_size.png)" in md
    for png in ("pareto_size.png", "pareto_latency.png", "per_class_delta.png", "confidence.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_run_cli_with_overrides_and_bad_config(cnn_path, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": cnn_path}, "quantize": {"qat": "never"}}))
    r = run_cli("run", cfg, "quantize.mod=int8")
    assert r.exit_code == 2 and "unknown config key quantize.mod (did you mean quantize.mode?)" in r.output
    r = run_cli("run", cfg, "-o", tmp_path / "r", f"data.scale={SCALE}", "baseline.runs=2", "benchmark.runs=3",
                "quantize.calibration_samples=20")
    assert r.exit_code == 0, r.output
    assert "Final model:" in r.output and (tmp_path / "r" / "report.md").exists()
    r = run_cli("inspect", tmp_path / "r" / "04-quantize" / "model.tflite")
    assert "kcompress metadata" in r.output and "mode=int8" in r.output


def test_compare_and_recommend(cnn_path, ptq_run, tmp_path):
    _, records, _ = ptq_run
    r = run_cli("compare", cnn_path, records[-1].model_path, "--data", "digits:val", "--scale", SCALE, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["agreement"] > 0.95 and doc["b"]["size_bytes"] < doc["a"]["size_bytes"]
    out = tmp_path / "plan.yaml"
    r = run_cli("recommend", cnn_path, "--target", "mcu", "--max-size-mb", "0.05", "--scale", SCALE, "-o", out)
    assert r.exit_code == 0, r.output
    text = out.read_text()
    plan = yaml.safe_load(text)
    assert plan["quantize"]["mode"] == "int8" and plan["quantize"]["io"] == "int8"
    assert plan["distill"]["enabled"]  # 150k params at ~1 byte each is 3x over 50 kB: more than pruning gives
    assert "# distill:" in text and "# quantize: microcontrollers run int8" in text
    r = run_cli("recommend", cnn_path, "--target", "mobile-gpu", "-o", tmp_path / "gpu.yaml")
    assert yaml.safe_load((tmp_path / "gpu.yaml").read_text())["quantize"]["mode"] == "float16"


def test_quantize_stage_runs_qat_and_keeps_the_better(cnn_path, tmp_path):
    logs = []
    records = execute(_cfg(cnn_path, qat="always", qat_epochs=1), str(tmp_path / "qat"), log=logs.append)
    q = records[1].metrics
    assert q["stage"] == "quantize" and "qat_accuracy" in q and "ptq_accuracy" in q
    assert q["method"] == ("qat" if q["qat_accuracy"] > q["ptq_accuracy"] else "ptq")
    assert q["accuracy"] == pytest.approx(max(q["qat_accuracy"], q["ptq_accuracy"]), abs=1e-9)
    assert any("running quantization-aware training" in line for line in logs)


def test_prune_stage_that_misses_its_flops_target_fails_the_gate_and_the_cli(tmp_path, digits):
    """Almost every MAC sits behind softmax activations (channel barriers): structured pruning at 50% FLOPs cannot
    get near the target, and both the pipeline and `kcompress prune` say so and fail, keeping the output."""
    from kcompress.backend import keras
    from kcompress.io import save_model

    L = keras.layers
    inp = L.Input((8, 8, 1))
    x = L.Activation("softmax")(L.Conv2D(32, 3, padding="same")(inp))
    x = L.Activation("softmax")(L.Conv2D(32, 3, padding="same", name="big")(x))
    x = L.Conv2D(8, 1, activation="relu")(x)
    model = keras.Model(inp, L.Dense(10)(L.GlobalAveragePooling2D()(x)))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    path = str(tmp_path / "frozen.keras")
    save_model(model, path)
    cfg = config_from_dict({"name": "t", "model": {"path": path},
                            "data": {"train": "digits:train", "val": "digits:val", "scale": SCALE},
                            "baseline": {"batch_sizes": [1], "runs": 3},
                            "prune": {"enabled": True, "method": "structured", "target_flops": 0.5, "epochs": 1,
                                      "max_drop": 100},
                            "quantize": {"qat": "never"}, "max_drop": 100})
    run_dir = str(tmp_path / "run")
    with pytest.raises(GateFailed, match=r"stage prune missed its target by more than 5 points \(.*big"):
        execute(cfg, run_dir, log=lambda m: None)
    assert os.path.exists(os.path.join(run_dir, "03-prune", "model.keras"))
    out = str(tmp_path / "pruned.keras")
    r = run_cli("prune", path, "--data", "digits:train", "--val-data", "digits:val", "--scale", SCALE, "--method",
                "structured", "--target-flops", 0.5, "--epochs", 1, "-o", out)
    assert r.exit_code == 1 and "missed its target" in r.output
    assert not os.path.exists(out) and os.path.exists(out.replace(".keras", ".FAILED.keras"))


def test_prune_stage_learns_from_the_baseline_teacher(cnn_path, tmp_path):
    raw = {"name": "t", "model": {"path": cnn_path},
           "data": {"train": "digits:train", "val": "digits:val", "scale": SCALE},
           "baseline": {"batch_sizes": [1], "runs": 3},
           "prune": {"enabled": True, "method": "structured", "target_flops": 0.3, "epochs": 1, "max_drop": 10,
                     "teacher": "baseline"},
           "quantize": {"enabled": False}}
    logs = []
    records = execute(config_from_dict(raw), str(tmp_path / "run"), log=logs.append)
    base = os.path.join(str(tmp_path / "run"), "01-baseline", "model.keras")
    assert [r.stage for r in records] == ["baseline", "prune"]
    assert any(f"learn from the teacher {base}" in line for line in logs), logs
    assert any("knowledge distillation from the teacher" in line for line in logs)
    assert records[-1].metrics["macs_after"] < 0.8 * records[-1].metrics["macs_before"]
    with pytest.raises(KcompressError, match="prune.teacher: no model file"):
        config_from_dict({**raw, "prune": {**raw["prune"], "teacher": str(tmp_path / "missing.keras")}})
