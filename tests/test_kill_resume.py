"""Kill -9 mid-run, then resume: QAT epochs, structured-pruning rounds, and a whole pipeline run.

Each kill is real: a child process is SIGKILLed once the checkpoint (or stage folder) it should die after appears.
The reference is an uninterrupted run with the same seed; resumed runs must finish, load, and match it. The QAT and
pruning tests use a CNN without dropout, whose resumed fine-tunes match to round-off (dropout masks start over in a
new process, see kcompress.checkpoint); the pipeline test runs quickstart's digits_cnn (with dropout), compared on
accuracy.
"""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import kcompress as kc
from kcompress.data import Preprocess
from kcompress.errors import KcompressError

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PRE = Preprocess(scale=1 / 255)
QAT = {"epochs": 3, "seed": 0}
PRUNE = {"method": "structured", "target_flops": 0.4, "rounds": 2, "epochs": 4, "seed": 0}

WORKER = """
import json, sys
import kcompress as kc
from kcompress.data import Preprocess
kind, model, ckpt, settings = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
pre = Preprocess(scale=1 / 255)
if kind == "qat":
    kc.qat(model, "digits:train", val_data="digits:val", preprocess=pre, bench=False, checkpoint_dir=ckpt, **settings)
else:
    kc.prune(model, "digits:train", "digits:val", preprocess=pre, measure=False, checkpoint_dir=ckpt, **settings)
"""


@pytest.fixture(scope="module")
def plain_cnn_path(tmp_path_factory):
    """A small digits CNN without dropout (conv-BN-ReLU x2, pool, dense), trained 5 epochs."""
    from kcompress.backend import keras
    from kcompress.data import open_data
    from kcompress.io import save_model
    from kcompress.train import fit

    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = L.Input((8, 8, 1), name="image")
    x = inp
    for i, width in enumerate((16, 32), start=1):
        x = L.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = L.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = L.ReLU(name=f"relu{i}")(x)
    x = L.Flatten(name="flatten")(L.MaxPooling2D(name="pool")(x))
    x = L.Dense(64, activation="relu", name="fc1")(x)
    model = keras.Model(inp, L.Dense(10, activation="softmax", name="classifier")(x))
    fit(model, open_data("digits:train", PRE), open_data("digits:val", PRE), epochs=5, lr=2e-3, verbose=0)
    path = str(tmp_path_factory.mktemp("plain") / "plain_cnn.keras")
    save_model(model, path)
    return path


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _kill_when(args, ready, timeout=300, **popen) -> bool:
    """Starts ``args`` and SIGKILLs it as soon as ``ready()`` is true: True. False when it finished first (exit 0;
    any other exit fails the test)."""
    t0 = time.time()
    popen.setdefault("stdout", subprocess.DEVNULL)
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, **popen)
    while proc.poll() is None and not ready() and time.time() - t0 < timeout:
        time.sleep(0.01)
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert alive or proc.returncode == 0, f"the child failed (exit {proc.returncode}): {err[-3000:]}"
    return alive


def _killed_worker(kind, model, ckpt, settings, ready):
    assert _kill_when([sys.executable, "-c", WORKER, kind, model, ckpt, json.dumps(settings)], ready), \
        "the run finished before it could be killed"


def _max_diff(a, b):
    assert [w.shape for w in a] == [w.shape for w in b]
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b) if x.size)


# ----------------------------------------------------------------------------------------------------------- QAT
def test_qat_killed_after_epoch_1_of_3_resumes_to_the_uninterrupted_result(plain_cnn_path, tmp_path, capsys):
    model = plain_cnn_path
    ref = kc.qat(model, "digits:train", val_data="digits:val", preprocess=PRE, bench=False, **QAT)
    ckpt = str(tmp_path / "qat.ckpt")
    state = os.path.join(ckpt, "state.json")
    _killed_worker("qat", model, ckpt, QAT, lambda: (_read_json(state) or {}).get("epochs_done", 0) >= 1)
    done = _read_json(state)["epochs_done"]
    assert done < 3  # interrupted mid-fine-tune
    capsys.readouterr()
    logs = []
    res = kc.qat(model, "digits:train", val_data="digits:val", preprocess=PRE, bench=False, checkpoint_dir=ckpt,
                 resume=True, log=logs.append, **QAT)
    out = capsys.readouterr().out
    assert f"continuing the interrupted QAT fine-tune from {ckpt}: {done} of 3 epoch(s) done" in logs
    assert "Epoch 1/3" not in out and "Epoch 3/3" in out  # Keras ran only the epochs left
    assert [h["epoch"] for h in _read_json(state)["history"]] == [1, 2, 3]
    # the same fine-tune: the QAT model's weights and quantizer ranges, and the int8 model's accuracy on VAL
    assert _max_diff([w.numpy() for w in ref.qat_model.weights], [w.numpy() for w in res.qat_model.weights]) < 1e-3
    assert abs(res.qat_accuracy - ref.qat_accuracy) <= 0.01
    assert abs(res.keras_qat_accuracy - ref.keras_qat_accuracy) <= 0.01

    # settings are part of the checkpoint's identity
    with pytest.raises(KcompressError, match=r"settings differ \(epochs: was 3, now 2"):
        kc.qat(model, "digits:train", val_data="digits:val", preprocess=PRE, bench=False, checkpoint_dir=ckpt,
               resume=True, epochs=2, seed=0)
    with pytest.raises(KcompressError, match="pass --resume to continue it"):
        kc.qat(model, "digits:train", val_data="digits:val", preprocess=PRE, bench=False, checkpoint_dir=ckpt,
               **QAT)


# ------------------------------------------------------------------------------------------------------- pruning
def _widths(model):
    return [(la.name, getattr(la, "filters", None) or getattr(la, "units", None)) for la in model.layers]


def test_structured_pruning_killed_between_and_within_rounds_resumes_to_the_uninterrupted_result(plain_cnn_path,
                                                                                                    tmp_path):
    model = plain_cnn_path
    ref = kc.prune(model, "digits:train", "digits:val", preprocess=PRE, measure=False, **PRUNE)

    # killed between rounds: the resumed run is the uninterrupted one
    ckpt = str(tmp_path / "rounds.ckpt")
    state = os.path.join(ckpt, "state.json")
    _killed_worker("prune", model, ckpt, PRUNE, lambda: (_read_json(state) or {}).get("rounds_done") == 1)
    logs = []
    res = kc.prune(model, "digits:train", "digits:val", preprocess=PRE, measure=False, checkpoint_dir=ckpt,
                   resume=True, log=logs.append, **PRUNE)
    assert f"continuing the interrupted pruning from {ckpt}: 1 round(s) done" in logs
    assert not any("round 1 fine-tune" in m for m in logs)  # round 1 was not redone
    assert _widths(res.model) == _widths(ref.model)
    assert [r["macs"] for r in res.details["rounds"]] == [r["macs"] for r in ref.details["rounds"]]
    assert _max_diff(ref.model.get_weights(), res.model.get_weights()) < 1e-3
    assert abs(res.accuracy_after - ref.accuracy_after) <= 0.01

    # killed inside round 1's fine-tune, after its first epoch: continues that fine-tune at epoch 2
    ckpt = str(tmp_path / "epochs.ckpt")
    fit_state = os.path.join(ckpt, "round-1-fit", "state.json")
    _killed_worker("prune", model, ckpt, PRUNE, lambda: os.path.exists(fit_state))
    assert _read_json(os.path.join(ckpt, "state.json"))["rounds_done"] == 0
    logs = []
    mid = kc.prune(model, "digits:train", "digits:val", preprocess=PRE, measure=False, checkpoint_dir=ckpt,
                   resume=True, log=logs.append, **PRUNE)
    assert any(m.endswith("round 1 continues after its pruning step") for m in logs)
    assert any(m.startswith("continuing the interrupted round 1 fine-tune") and m.endswith("1 of 2 epoch(s) done")
               for m in logs)
    assert _widths(mid.model) == _widths(ref.model)
    assert _max_diff(ref.model.get_weights(), mid.model.get_weights()) < 1e-3
    assert abs(mid.accuracy_after - ref.accuracy_after) <= 0.01

    with pytest.raises(KcompressError, match="settings differ"):
        kc.prune(model, "digits:train", "digits:val", preprocess=PRE, measure=False, checkpoint_dir=ckpt,
                 resume=True, **{**PRUNE, "target_flops": 0.3})


def test_cli_resume_flags(plain_cnn_path, tmp_path):
    from conftest import run_cli

    out = tmp_path / "m_qat.tflite"
    ckpt = tmp_path / "m_qat.tflite.ckpt"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(json.dumps({"fingerprint": {"what": "qat"}, "epochs_done": 1}))
    args = ["qat", plain_cnn_path, "--data", "digits:train", "--val-data", "digits:val", "--scale", "1/255",
            "--epochs", "2", "--train-limit", "300", "-o", out]
    r = run_cli(*args)  # an earlier run's checkpoints: neither continued nor replaced silently
    assert r.exit_code == 1 and "pass --resume to continue it, or --overwrite to start over" in r.output
    r = run_cli(*args, "--resume")  # they are not this run's
    assert r.exit_code == 1 and "settings differ" in r.output and "Traceback" not in r.output
    r = run_cli(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    assert out.exists() and not ckpt.exists()  # written, and the checkpoints are gone
    r = run_cli("prune", plain_cnn_path, "--data", "digits:train", "--method", "magnitude", "--resume")
    assert r.exit_code == 2 and "--resume do not apply to --method magnitude" in r.output


# ------------------------------------------------------------------------------------------------------ pipeline
# quickstart's stages (train, baseline, distill, structured prune, int8 quantize with QAT, benchmark, report), with
# fewer epochs; gates opened so that only a crash, not a noisy accuracy, can stop a run
OVERRIDES = ["model.epochs=6", "distill.epochs=6", "prune.epochs=4", "quantize.qat=always", "qat.epochs=3",
             "max_drop=100", "distill.max_drop=100", "prune.max_drop=100", "quantize.max_drop=100",
             "benchmark.threads=[1]", "benchmark.batch_sizes=[1]", "benchmark.runs=5", "benchmark.warmup=1"]
STAGES = {"train": "00-train", "distill": "02-distill", "prune": "03-prune", "quantize": "04-quantize",
          "report": "05-benchmark"}
ORDER = list(STAGES)


def _run_args(run_dir, resume=False):
    return [sys.executable, "-m", "kcompress", "run", os.path.join(ROOT, "configs", "quickstart.yaml"), "-o", run_dir,
            *OVERRIDES] + (["--resume"] if resume else [])


def _stage_windows(run_dir):
    """Per kill target, ``(marker, seconds)``: the marker is the stage's checkpoint (its ``checkpoints/state.json``,
    written after each epoch or pruning step), the seconds how long the stage ran after its last checkpoint in an
    uninterrupted run, so a kill that many seconds at most after its first checkpoint lands in the stage. For the
    report: the benchmark's stage.json (the report is written next), and how long the report took."""
    out = {}
    for name, folder in STAGES.items():
        sdir = os.path.join(run_dir, folder)
        if name == "report":
            marker = start = os.path.join(sdir, "stage.json")
            end = os.path.join(run_dir, "report.md")
        else:
            marker = start = os.path.join(sdir, "checkpoints", "state.json")  # its last write: the last epoch's
            end = os.path.join(sdir, "stage.json")
        out[name] = (os.path.relpath(marker, run_dir), max(0.2, os.path.getmtime(end) - os.path.getmtime(start)))
    return out


def _figures(run_dir):
    """Per stage: VAL and TEST accuracy as the run's metrics say; and the report's figures."""
    plan = _read_json(os.path.join(run_dir, "run.json"))["stages"]
    figs = {}
    for stage in plan:
        folder = {"baseline": "01-baseline", "benchmark": "05-benchmark", **STAGES}[stage]
        m = _read_json(os.path.join(run_dir, folder, "metrics.json"))
        figs[stage] = (m["accuracy"], m["test"]["accuracy"])
    return figs


def _check_artifacts(run_dir):
    """Every artifact of a finished run loads: models in Keras and LiteRT, JSON, npz, report files."""
    from ai_edge_litert.interpreter import Interpreter

    from kcompress.io import load_model
    from kcompress.pipeline.resume import finished, stage_model

    plan = _read_json(os.path.join(run_dir, "run.json"))["stages"]
    for stage in plan:
        folder = {"baseline": "01-baseline", "benchmark": "05-benchmark", **STAGES}[stage]
        sdir = os.path.join(run_dir, folder)
        info = _read_json(os.path.join(sdir, "stage.json"))
        assert info is not None and finished(sdir, info["chain"]) is not None, stage
        for path in glob.glob(os.path.join(sdir, "*.json")):
            assert _read_json(path) is not None, path
        model = stage_model(sdir, info)
        if model.endswith(".tflite"):
            interp = Interpreter(model_path=model)
            interp.allocate_tensors()
            inp = interp.get_input_details()[0]
            interp.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
            interp.invoke()
        else:
            assert load_model(model).count_params() > 0
        if stage != "benchmark":
            with np.load(os.path.join(sdir, "outputs.npz"), allow_pickle=False) as z:
                assert len(z["outputs"]) == len(z["labels"]) > 0
            with open(os.path.join(sdir, "log.txt"), encoding="utf-8") as f:
                assert f.read().endswith("\n")
    report = _read_json(os.path.join(run_dir, "report.json"))
    assert report is not None and report["runs"][0]["stages"]
    for png in glob.glob(os.path.join(run_dir, "*.png")):
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png


def _kill_and_resume(tmp_path, targets, seed, min_kills):
    """An uninterrupted run, then one killed once per target, in stage order, each at a seeded random moment after
    the stage's next checkpoint (:func:`_stage_windows`), or after the process restarts the stage when an earlier
    one left a checkpoint there, or after it starts its run when an earlier kill landed after the stage had
    finished; then resumed until it finishes. Returns the kills: (target, delay, stages
    finished at the kill), and what the resumed processes continued."""
    t0 = time.time()
    ref_dir = str(tmp_path / "ref")
    done = subprocess.run(_run_args(ref_dir), capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ref_seconds = time.time() - t0
    windows = _stage_windows(ref_dir)
    rng = random.Random(seed)
    plan = sorted((ORDER.index(t), rng.uniform(0, windows[t][1])) for t in targets)
    run_dir = str(tmp_path / "killed")
    kills = []
    t1 = time.time()
    for stage_index, delay in plan:
        target = ORDER[stage_index]
        marker = os.path.join(run_dir, windows[target][0])
        fallback = os.path.join(run_dir, "run.json")  # rewritten by every process as it starts the run
        stage_done = os.path.join(run_dir, STAGES[target], "stage.json")
        # a checkpoint an earlier process left: count from the moment this one restarts the stage to continue it
        restart = os.path.join(run_dir, STAGES[target], "started.json") if os.path.exists(marker) else marker
        started = time.time()
        seen = {}

        def fresh(path):  # written by this process
            return os.path.exists(path) and os.path.getmtime(path) >= started

        def ready():
            if "at" not in seen:
                done_earlier = os.path.exists(stage_done) and not fresh(stage_done)
                if not (fresh(marker) or fresh(restart) or (done_earlier and fresh(fallback))):
                    return False
                seen["at"] = time.time()
            return time.time() - seen["at"] >= delay

        with open(tmp_path / f"log-{len(kills)}.txt", "w") as log:
            if not _kill_when(_run_args(run_dir, resume=os.path.exists(run_dir)), ready, cwd=str(tmp_path),
                              stdout=log, env={**os.environ, "PYTHONUNBUFFERED": "1"}):
                break  # the run finished before this kill
        finished = [f for f in sorted(os.listdir(run_dir)) if os.path.exists(os.path.join(run_dir, f, "stage.json"))]
        kills.append((target, round(delay, 2), finished))
    out = subprocess.run(_run_args(run_dir, resume=True), capture_output=True, text=True, cwd=str(tmp_path),
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    logs = sorted(tmp_path.glob("log-*.txt"), key=lambda p: int(p.stem.split("-")[1]))
    lines = [line for p in logs for line in p.read_text().splitlines()]
    continued = [line.split("] ", 1)[-1].split(" from ")[0] for line in lines + out.stdout.splitlines()
                 if "continuing the interrupted" in line]
    print(f"\nkill/resume: uninterrupted run {ref_seconds:.0f} s; {len(kills)} kills (target, delay s, stages "
          f"finished then) {kills}; killed-and-resumed run {time.time() - t1:.0f} s; continued: {continued}")
    assert len(kills) >= min_kills, kills
    assert continued, "no resumed process continued a checkpoint"
    _check_artifacts(run_dir)
    ref, got = _figures(ref_dir), _figures(run_dir)
    assert list(ref) == list(got)
    for stage in ref:  # the same figures: runs resumed at a stage or round boundary are exact, mid-epoch noisy
        assert abs(ref[stage][0] - got[stage][0]) <= 0.03, (stage, ref[stage], got[stage])
        assert abs(ref[stage][1] - got[stage][1]) <= 0.03, (stage, ref[stage], got[stage])
    assert abs(ref["quantize"][0] - got["quantize"][0]) <= 0.02, (ref["quantize"], got["quantize"])
    return kills, continued


def test_pipeline_killed_at_3_points_resumes_to_the_uninterrupted_figures(tmp_path):
    _kill_and_resume(tmp_path, ["train", "prune", "quantize"], seed=15, min_kills=3)


@pytest.mark.slow
def test_pipeline_killed_at_12_random_points_resumes_to_the_uninterrupted_figures(tmp_path):
    targets = ["train"] * 2 + ["distill"] * 3 + ["prune"] * 3 + ["quantize"] * 3 + ["report"]
    _kill_and_resume(tmp_path, targets, seed=1015, min_kills=10)
