"""Sweeps and ablations on the digits CNN: grid, resume, a killed sweep, contributions, stage sharing, Ray.

References are read from the trial folders themselves (each an ordinary pipeline run: its stages' metrics.json),
not from the sweep's own summary."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import run_cli

pytest.importorskip("optuna")

import kcompress as kc  # noqa: E402


def _base(cnn_path, **sections):
    cfg = {
        "name": "sw", "max_drop": 100.0, "model": {"path": cnn_path},
        "data": {"train": "digits:train", "val": "digits:val", "scale": 1 / 255, "test_split": 0.2},
        "baseline": {"batch_sizes": [1], "runs": 2, "warmup": 1},
        "distill": {"enabled": True, "epochs": 1, "student_width": 0.5, "max_drop": 100.0},
        "prune": {"enabled": True, "method": "structured", "target_flops": 0.2, "epochs": 1, "max_drop": 100.0},
        "quantize": {"qat": "never", "calibration_samples": 20, "max_drop": 100.0},
        "benchmark": {"threads": [1], "batch_sizes": [1], "runs": 5, "warmup": 1, "trials": 1},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


GRID = {"distill.temperature": [2, 4], "prune.target_flops": [0.2, 0.4]}


def _final(trial_dir):
    """VAL/TEST accuracy, .tflite bytes and benchmark p50 of a run folder's final stage, read from its files."""
    stages = json.load(open(os.path.join(trial_dir, "run.json")))["stages"]
    dirs = {"baseline": "01-baseline", "distill": "02-distill", "prune": "03-prune", "quantize": "04-quantize"}
    last = [s for s in stages if s in dirs][-1]
    m = json.load(open(os.path.join(trial_dir, dirs[last], "metrics.json")))
    bench = json.load(open(os.path.join(trial_dir, "05-benchmark", "metrics.json")))["bench"][0]
    return {"accuracy": m["accuracy"], "test_accuracy": m["test"]["accuracy"], "size_bytes": m["tflite_bytes"],
            "latency_ms": bench["p50_ms"]}


def _mtimes(sweep_dir):
    return {os.path.join(root, n): os.stat(os.path.join(root, n)).st_mtime_ns
            for root, _, names in os.walk(sweep_dir) if "trial-" in root for n in names}


@pytest.fixture(scope="module")
def grid(cnn_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweeps") / "grid")
    logs = []
    t0 = time.time()
    result = kc.sweep(_base(cnn_path), GRID, out, log=logs.append)
    return result, out, logs, time.time() - t0


def test_grid_sweep_runs_every_combination_and_writes_the_front(grid):
    result, out, logs, _ = grid
    doc = json.load(open(os.path.join(out, "sweep.json")))
    combos = sorted((t["params"]["distill.temperature"], t["params"]["prune.target_flops"]) for t in doc["trials"])
    assert combos == [(2, 0.2), (2, 0.4), (4, 0.2), (4, 0.4)]
    assert [t["status"] for t in doc["trials"]] == ["done"] * 4
    finals = {t["number"]: _final(os.path.join(out, t["folder"])) for t in doc["trials"]}
    for t in doc["trials"]:
        ref = finals[t["number"]]
        assert (t["val_accuracy"], t["test_accuracy"], t["size_bytes"], t["latency_ms"]) == (
            ref["accuracy"], ref["test_accuracy"], ref["size_bytes"], ref["latency_ms"])
    # the front: trials no other trial beats on VAL accuracy and size at once
    pts = np.array([[finals[n]["accuracy"], -finals[n]["size_bytes"]] for n in sorted(finals)])
    front = [n for i, n in enumerate(sorted(finals))
             if not any((pts[j] >= pts[i]).all() and (pts[j] > pts[i]).any() for j in range(len(pts)))]
    assert sorted(doc["front"]) == front == sorted(t.number for t in result.front)
    md = open(os.path.join(out, "sweep.md")).read()
    assert "## Pareto front" in md and "## All trials" in md and md.count("| trial-00") == 4 + len(front)
    for png in ("accuracy_size.png", "accuracy_latency.png"):
        assert open(os.path.join(out, png), "rb").read(4) == b"\x89PNG"
    assert any("front so far" in line for line in logs)


def test_trials_share_the_stages_whose_settings_are_equal(grid):
    result, out, _, _ = grid
    seen = []
    for t in sorted(result.trials, key=lambda t: t.number):
        temp = t.params["distill.temperature"]
        # baseline is shared by every later trial; distill too when an earlier trial had this temperature
        expected = 0 if not seen else 2 if temp in seen else 1
        assert t.shared_stages == expected, (t.number, t.params, seen)
        seen.append(temp)
        log = open(os.path.join(t.folder, "run.log")).read()
        assert ("[baseline] finished earlier, skipped" in log) == (expected >= 1)
        assert ("[distill] finished earlier, skipped" in log) == (expected == 2)


def test_report_on_a_sweep_folder_reports_every_trial(grid, tmp_path):
    result, out, _, _ = grid
    from click.testing import CliRunner

    from kcompress.cli import main

    r = CliRunner().invoke(main, ["report", out, "-o", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    doc = json.load(open(tmp_path / "rep" / "report.json"))
    runs = sorted({row["run"] for run in doc["runs"] for row in run["stages"]})
    assert runs == sorted(os.path.basename(t.folder) for t in result.trials if t.status == "done")
    final = {row["run"]: row for run in doc["runs"] for row in run["stages"] if row["stage"].startswith("quantize")}
    for t in result.done:  # the report's final VAL accuracy is the trial's
        assert final[os.path.basename(t.folder)]["val_accuracy"] == pytest.approx(t.accuracy, abs=1e-9)


def test_resume_runs_no_trial_again(grid, cnn_path):
    result, out, _, _ = grid
    before = _mtimes(out)
    logs = []
    again = kc.sweep(_base(cnn_path), GRID, out, resume=True, log=logs.append)
    assert not any("started" in line for line in logs)
    assert _mtimes(out) == before
    assert [t.to_dict() for t in again.trials] == [t.to_dict() for t in result.trials]
    import optuna

    study = optuna.load_study(study_name="kcompress", storage=f"sqlite:///{out}/study.db")
    assert len(study.trials) == 4
    r = run_cli("sweep", "--help")
    assert r.exit_code == 0 and "distill.enabled: [true, false]" in r.output


def test_a_sweep_without_resume_refuses_an_existing_folder_and_a_changed_space(grid, cnn_path):
    _, out, _, _ = grid
    with pytest.raises(kc.KcompressError, match="exists and is not empty; pass --resume"):
        kc.sweep(_base(cnn_path), GRID, out, log=lambda m: None)
    with pytest.raises(kc.UsageError, match="holds a sweep with another space"):
        kc.sweep(_base(cnn_path), {"distill.temperature": [2, 8]}, out, resume=True, log=lambda m: None)


def test_bad_space_keys_and_values_exit_2_before_any_trial(cnn_path, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(_base(cnn_path)))
    for space, message in (({"distill.temprature": [2, 4]}, "unknown config key distill.temprature (did you mean "
                                                              "distill.temperature?)"),
                           ({"distill.temperature": [2, -1]}, "distill.temperature=-1: distill.temperature: must be > 0"),
                           ({"prune": [0.1]}, "prune is a config section"),
                           ({"distill.alpha": {"low": 0.7, "high": 0.3}}, "low (0.7) must be below high (0.3)"),
                           ({"quantize.mode": ["int9"]}, "'int9' is not one of")):
        sp = tmp_path / "space.yaml"
        sp.write_text(yaml.safe_dump(space))
        r = run_cli("sweep", base, "--space", sp, "-o", tmp_path / "s")
        assert r.exit_code == 2, r.output
        assert message in r.output and len(r.output.strip().splitlines()) == 1
        assert not (tmp_path / "s").exists()


def test_ablation_gives_each_stages_contribution_from_the_runs(cnn_path, tmp_path):
    out = str(tmp_path / "abl")
    space = {"distill.enabled": [True, False], "prune.enabled": [True, False]}
    result = kc.sweep(_base(cnn_path), space, out, log=lambda m: None)
    assert len(result.done) == 4
    finals = {t.number: _final(t.folder) for t in result.trials}
    rows = {r["stage"]: r for r in result.contributions}
    assert set(rows) == {"distill", "prune"}
    for key in space:
        stage = key.split(".")[0]
        for label, flag in (("with", True), ("without", False)):
            group = [t.number for t in result.trials if t.params[key] is flag]
            assert sorted(rows[stage][label]["trials"]) == sorted(group) and len(group) == 2
            for fig in ("accuracy", "test_accuracy", "size_bytes", "latency_ms"):
                assert rows[stage][label][fig] == pytest.approx(np.mean([finals[n][fig] for n in group]), abs=1e-12)
    # the student is half as wide: distillation makes the model smaller
    assert rows["distill"]["delta"]["size_bytes"] < 0
    md = open(os.path.join(out, "sweep.md")).read()
    assert "## Contribution of each stage" in md and "| distill | with |" in md


def test_a_quantization_sweep_trains_and_distills_once(cnn_path, tmp_path):
    out = str(tmp_path / "q")
    result = kc.sweep(_base(cnn_path), {"quantize.mode": ["int8", "int16x8"]}, out, log=lambda m: None)
    first, second = sorted(result.trials, key=lambda t: t.number)
    assert (first.shared_stages, second.shared_stages) == (0, 3)
    for stage in ("01-baseline", "02-distill", "03-prune"):
        a, b = (os.path.join(t.folder, stage, "model.keras") for t in (first, second))
        assert open(a, "rb").read() == open(b, "rb").read()
        assert json.load(open(os.path.join(first.folder, stage, "stage.json")))["chain"] == json.load(
            open(os.path.join(second.folder, stage, "stage.json")))["chain"]
    log = open(os.path.join(second.folder, "run.log")).read()
    assert "[distill] running" not in log and "[quantize] running" in log
    modes = {t.params["quantize.mode"]: json.load(open(os.path.join(t.folder, "04-quantize", "metrics.json")))["mode"]
             for t in result.trials}
    assert modes == {"int8": "int8", "int16x8": "int16x8"}


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_redoing_finished_trials(cnn_path, tmp_path):
    base, space = tmp_path / "base.yaml", tmp_path / "space.yaml"
    base.write_text(yaml.safe_dump(_base(cnn_path)))
    space.write_text(yaml.safe_dump({"prune.target_flops": [0.2, 0.4, 0.5]}))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kcompress", "sweep", str(base), "--space", str(space), "-o",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (out / "trial-000" / "trial.json").exists():
            assert proc.poll() is None and time.time() < deadline, "the sweep ended before its first trial finished"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first = (out / "trial-000" / "trial.json").stat().st_mtime_ns
    assert json.load(open(out / "trial-000" / "trial.json"))["status"] == "done"
    assert not (out / "trial-002").exists()  # killed mid-sweep
    logs = []
    result = kc.sweep(str(base), str(space), str(out), resume=True, log=logs.append)
    assert sorted(t.params["prune.target_flops"] for t in result.done) == [0.2, 0.4, 0.5]
    assert len(result.trials) == 3 and (out / "trial-000" / "trial.json").stat().st_mtime_ns == first
    assert not any(line.startswith("trial-000 started") for line in logs)


@pytest.mark.slow
def test_ray_backend_gives_the_local_results(grid, cnn_path, tmp_path):
    pytest.importorskip("ray")
    local, _, _, _ = grid
    out = str(tmp_path / "ray")
    space = {"distill.temperature": [2, 4]}
    result = kc.sweep(_base(cnn_path), space, out, backend="ray", jobs=2, log=lambda m: None)
    assert len(result.done) == 2
    for t in result.trials:
        ref = next(r for r in local.trials if r.params == {**t.params, "prune.target_flops": 0.2})
        assert t.accuracy == pytest.approx(ref.accuracy, abs=0.02)
        assert t.test_accuracy == pytest.approx(ref.test_accuracy, abs=0.02)
        assert t.size_bytes == pytest.approx(ref.size_bytes, rel=0.02)
        assert os.path.exists(os.path.join(t.folder, "04-quantize", "model.tflite"))


@pytest.mark.slow
def test_local_worker_processes_run_trials_at_once_and_share_the_first_trials_stages(grid, cnn_path, tmp_path):
    local, _, _, _ = grid
    out = str(tmp_path / "jobs")
    result = kc.sweep(_base(cnn_path), {"distill.temperature": [2, 4, 8]}, out, jobs=2, log=lambda m: None)
    assert len(result.done) == 3
    # the first trial runs alone, so both later ones share its baseline
    assert sorted(t.shared_stages for t in result.trials) == [0, 1, 1]
    for t in result.trials:
        ref = next((r for r in local.trials if r.params == {**t.params, "prune.target_flops": 0.2}), None)
        if ref is not None:
            assert t.accuracy == pytest.approx(ref.accuracy, abs=0.02)


def test_the_shipped_space_validates_against_quickstart():
    import glob

    from kcompress.sweeps.space import load_space

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = yaml.safe_load(open(os.path.join(root, "configs", "quickstart.yaml")))
    spaces = glob.glob(os.path.join(root, "configs", "sweeps", "*.yaml"))
    assert spaces
    for path in spaces:
        assert load_space(path, base).params


@pytest.mark.parametrize("objectives, noted", [(("accuracy", "size"), True), (("accuracy", "size", "latency"), False)])
def test_a_much_slower_front_trial_is_called_out_unless_latency_is_an_objective(tmp_path, objectives, noted):
    from kcompress.sweeps.results import SweepResult, TrialResult, write_results

    fast = TrialResult(0, str(tmp_path / "trial-000"), {"quantize.mode": "int8"}, "done", accuracy=0.678,
                       size_bytes=110_700, latency_ms=0.317)
    slow = TrialResult(1, str(tmp_path / "trial-001"), {"quantize.mode": "int16x8"}, "done", accuracy=0.680,
                       size_bytes=117_500, latency_ms=4.768)
    r = write_results(SweepResult(str(tmp_path), objectives, (fast, slow), (fast, slow), None, {}),
                      ["quantize.mode"], {"name": "t", "sampler": "grid"}, plots=False)
    md = open(r.files["md"]).read()
    assert ("trial-001 is on the front, but its p50 is 15.0x trial-000's" in md) is noted
    assert "trial-000 is on the front, but" not in md
