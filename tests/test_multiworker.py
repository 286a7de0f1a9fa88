"""Multi-device and multi-worker training, for real on CPU: two worker processes on localhost ports, each with its
own TF_CONFIG, run the same CLI command under MultiWorkerMirroredStrategy; both end with identical weights (each
worker trains on its half of every global batch, so only synchronised gradients make them equal) and only the chief
writes the output."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kcompress.backend import keras  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from kcompress.distributed import distribute_early, is_chief, resolve, strategy, worker_path
from kcompress.errors import UsageError
from kcompress.options import OptionError, TrainOptions
from kcompress.types import Strategy

# Runs one CLI command in this worker, then dumps what this worker ended with (its own copy of the output, which on a
# non-chief worker lives in a temporary folder until the process exits) and where that copy was.
DRIVER = textwrap.dedent('''
    import json, sys
    import numpy as np
    import kcompress as kc
    from kcompress.cli import main

    keras_out, dump, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    try:
        main(args, standalone_mode=False)
    except SystemExit as e:
        if e.code:
            raise
    mine = kc.worker_path(keras_out)
    from kcompress.backend import keras, tfmot
    with tfmot().quantization.keras.quantize_scope():
        model = keras.models.load_model(mine, compile=False)
    np.savez(dump, *model.get_weights())
    print(json.dumps({"chief": kc.is_chief(), "mine": mine,
                      "replicas": kc.distribute().num_replicas_in_sync}))
''')


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _run_workers(tmp_path, keras_out: str, args: list[str], timeout: int = 300) -> list[dict]:
    """Starts two workers running ``kcompress ARGS``; returns each one's report, weights and output."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    hosts = [f"localhost:{p}" for p in _free_ports(2)]
    procs = []
    for i in range(2):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
               "TF_CONFIG": json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}})}
        procs.append(subprocess.Popen([sys.executable, str(driver), keras_out, str(tmp_path / f"w{i}.npz"), *args],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    reports = []
    for i, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"worker {i}:\n{text[-3000:]}"
        report = json.loads(text.strip().splitlines()[-1])
        with np.load(tmp_path / f"w{i}.npz") as z:
            report["weights"] = [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]
        report["output"] = text
        reports.append(report)
    return reports


def _check_in_sync(reports, tmp_path, outputs: list[str]):
    chief, other = reports
    assert chief["chief"] and not other["chief"]
    assert chief["replicas"] == other["replicas"] == 2
    for r in reports:  # the stage itself trained under the two-replica strategy, on half of each global batch
        assert "MultiWorkerMirroredStrategy, 2 replicas: global batch 64, 32 per replica" in r["output"]
    assert len(chief["weights"]) == len(other["weights"]) > 0
    for a, b in zip(chief["weights"], other["weights"]):
        np.testing.assert_array_equal(a, b)
    # only the chief wrote the user's files; the other worker's copies were in a temporary folder, now deleted
    for out in outputs:
        assert os.path.exists(out)
    assert chief["mine"] == outputs[-1]
    assert not other["mine"].startswith(str(tmp_path)) and not os.path.exists(other["mine"])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["driver.py", "w0.npz", "w1.npz", *(os.path.basename(o) for o in outputs)]), left


@pytest.fixture(scope="module")
def teacher_file(digits, tmp_path_factory):
    from kcompress.io import save_model
    from kcompress.train import fit
    from kcompress.zoo import digits_cnn

    model = digits_cnn(width=8)
    fit(model, *digits, epochs=4, lr=3e-3, seed=0, verbose=0)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.keras")
    save_model(model, path)
    return path


def test_two_workers_distill_in_lockstep_and_only_the_chief_writes(teacher_file, tmp_path):
    out = str(tmp_path / "student.keras")
    reports = _run_workers(tmp_path, out, [
        "distill", "--teacher", teacher_file, "--data", "digits:train", "--val-data", "digits:val", "--scale",
        "1/255", "--student-width", "0.5", "--epochs", "2", "--batch-size", "64", "--max-drop", "100",
        "--train-limit", "512", "-o", out])
    _check_in_sync(reports, tmp_path, [out])
    assert "best epoch" in reports[0]["output"]


@pytest.mark.slow
def test_two_workers_qat_in_lockstep_and_only_the_chief_writes(teacher_file, tmp_path):
    out, keras_out = str(tmp_path / "model_int8.tflite"), str(tmp_path / "qat.h5")
    reports = _run_workers(tmp_path, keras_out, [
        "qat", teacher_file, "--data", "digits:train", "--val-data", "digits:val", "--scale", "1/255",
        "--epochs", "1", "--batch-size", "64", "--train-limit", "512", "--calibration-samples", "64",
        "-o", out, "--keras-out", keras_out])
    _check_in_sync(reports, tmp_path, [out, keras_out])


# --------------------------------------------------------------------------------------------- without TF_CONFIG


def test_auto_is_the_default_strategy_without_tf_config(monkeypatch):
    from kcompress.backend import tf

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert resolve("auto") == (Strategy.MIRRORED if len(tf.config.list_physical_devices("GPU")) > 1
                               else Strategy.NONE)
    assert resolve(None) == resolve("auto") and resolve("none") == Strategy.NONE
    if resolve("auto") == Strategy.NONE:
        assert strategy("auto") is tf.distribute.get_strategy()
    distribute_early("auto")  # nothing to set up
    assert is_chief() and worker_path("out.keras") == "out.keras"


def test_impossible_strategies_are_usage_errors(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UsageError, match="multi_worker needs TF_CONFIG"):
        resolve("multi_worker")
    with pytest.raises(UsageError, match="one of auto, none, mirrored, multi_worker"):
        resolve("ring")
    from kcompress.backend import tf

    if len(tf.config.list_physical_devices("GPU")) < 2:
        with pytest.raises(UsageError, match="mirrored needs at least 2 visible GPUs"):
            distribute_early("mirrored")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(UsageError, match="TF_CONFIG is not valid JSON"):
        resolve("auto")


def test_train_options_validate_the_strategy():
    assert TrainOptions().strategy == Strategy.AUTO
    assert TrainOptions(strategy="multi_worker").strategy == Strategy.MULTI_WORKER
    with pytest.raises(OptionError, match="strategy"):
        TrainOptions(strategy="ring")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "structured"])
def test_two_workers_prune_in_lockstep_and_only_the_chief_writes(teacher_file, tmp_path, method):
    out = str(tmp_path / "pruned.keras")
    settings = ["--sparsity", "0.5"] if method == "magnitude" else ["--target-flops", "0.3", "--rounds", "1"]
    reports = _run_workers(tmp_path, out, [
        "prune", teacher_file, "--method", method, *settings, "--data", "digits:train", "--val-data", "digits:val",
        "--scale", "1/255", "--epochs", "1", "--batch-size", "64", "--max-drop", "100", "--train-limit", "512",
        "-o", out])
    _check_in_sync(reports, tmp_path, [out])
