"""Resume by content, not by path: retrained models, moved run folders, disabled stages, a killed distillation.
Plus the three splits through a whole run, and what the final .tflite records for whoever deploys it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from kcompress.pipeline.config import config_from_dict
from kcompress.pipeline.report import build_report
from kcompress.pipeline.runner import execute
from kcompress.quantization.metadata import read_metadata

SCALE = 1 / 255


def _cfg(model_path, **sections):
    return config_from_dict({
        "name": "r", "model": {"path": model_path},
        "data": {"train": "digits:train", "val": "digits:val", "test_split": 0.2, "scale": SCALE},
        "baseline": {"batch_sizes": [1], "runs": 3},
        "quantize": {"qat": "never", "calibration_samples": 50},
        "benchmark": {"threads": [1], "runs": 5, "warmup": 1},
        **sections,
    })


def _ran(logs):
    return [line.split("]")[0][1:] for line in logs if line.endswith(tuple("0123456789")) is False
            and " running in " in line]


def test_retrained_model_in_place_reruns_every_stage(trained_cnn, tmp_path):
    from kcompress.io import save_model

    model = str(tmp_path / "model.keras")
    save_model(trained_cnn, model)
    run_dir = str(tmp_path / "run")
    execute(_cfg(model), run_dir, log=lambda m: None)
    logs = []
    execute(_cfg(model), run_dir, resume=True, log=logs.append)
    assert _ran(logs) == []
    changed = [w.copy() for w in trained_cnn.get_weights()]
    changed[-1] += 0.5  # "retrained": same path, same architecture, other weights
    trained_cnn.set_weights(changed)
    try:
        save_model(trained_cnn, model, overwrite=True)
    finally:
        changed[-1] -= 0.5
        trained_cnn.set_weights(changed)
    logs.clear()
    execute(_cfg(model), run_dir, resume=True, log=logs.append)
    assert _ran(logs) == ["baseline", "quantize", "benchmark"]


def test_moved_run_folder_resumes_and_disabled_stage_leaves_the_report(cnn_path, tmp_path):
    run_dir = str(tmp_path / "run")
    cfg = _cfg(cnn_path, prune={"enabled": True, "target_flops": 0.2, "epochs": 1, "max_drop": 50})
    execute(cfg, run_dir, log=lambda m: None)
    moved = str(tmp_path / "elsewhere" / "run")
    shutil.move(run_dir, moved)
    logs = []
    records = execute(cfg, moved, resume=True, log=logs.append)
    assert _ran(logs) == []
    assert all(os.path.exists(r.model_path) and r.model_path.startswith(moved) for r in records)
    assert [r["stage"] for r in build_report([moved])["runs"][0]["stages"]] == ["baseline", "prune", "quantize"]
    logs.clear()
    execute(_cfg(cnn_path), moved, resume=True, log=logs.append)  # prune disabled now
    assert _ran(logs) == ["quantize", "benchmark"]
    assert os.path.isdir(os.path.join(moved, "03-prune"))  # kept on disk, not reported
    assert [r["stage"] for r in build_report([moved])["runs"][0]["stages"]] == ["baseline", "quantize"]


def test_run_reports_test_and_records_how_to_feed_the_tflite(cnn_path, tmp_path):
    from kcompress.data import open_data
    from kcompress.evaluation import evaluate

    run_dir = str(tmp_path / "run")
    records = execute(_cfg(cnn_path), run_dir, log=lambda m: None)
    q = records[1]
    test = open_data("digits:train").with_preprocess(open_data("digits:val").preprocess).split(0.2, seed=0,
                                                                                                  what="test")[1]
    assert q.metrics["split"] == "val" and q.metrics["test"]["num_samples"] == test.num_samples
    with open(q.model_path, "rb") as f:
        tfl = f.read()
    from kcompress.data import Preprocess

    ev = evaluate(tfl, test.with_preprocess(Preprocess(scale=SCALE)))
    assert abs(ev.accuracy - q.metrics["test"]["accuracy"]) < 1e-9  # TEST is what the numbers say
    meta = read_metadata(q.model_path)
    assert meta["input"]["preprocess"]["scale"] == SCALE
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert q.metrics["tflite_bytes"] + q.metrics["metadata_bytes"] == len(tfl)  # the reported size excludes it
    report = build_report([run_dir])["runs"][0]
    assert report["split"] == "test" and report["stages"][1]["accuracy"] == q.metrics["test"]["accuracy"]
    with np.load(os.path.join(q.dir, "outputs.npz")) as z:
        assert np.array_equal(z["test_labels"], test.labels)


def test_kill_during_distill_then_resume_finishes(tmp_path):
    root = os.path.join(os.path.dirname(__file__), "..")
    run_dir = str(tmp_path / "killed")
    args = [sys.executable, "-m", "kcompress", "run", os.path.join(root, "configs", "quickstart.yaml"), "-o",
            run_dir, "model.epochs=2", "distill.epochs=40", "prune.enabled=false", "max_drop=100",
            "distill.max_drop=100", "benchmark.threads=[1]", "benchmark.batch_sizes=[1]", "benchmark.runs=5"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(tmp_path))
    state = os.path.join(run_dir, "02-distill", "checkpoints", "state.json")
    deadline = time.time() + 240
    while not os.path.exists(state) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(state) as f:
        done_before = json.load(f)["epochs_done"]
    assert done_before < 40
    out = subprocess.run(args + ["--resume"], capture_output=True, text=True, cwd=str(tmp_path), timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "continuing the interrupted distillation" in out.stdout
    assert "[baseline] finished earlier, skipped" in out.stdout
    assert os.path.exists(os.path.join(run_dir, "04-quantize", "model.tflite"))
