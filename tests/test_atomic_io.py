"""The one atomic writer: outputs get the umask's modes, a kill never loses the old output, reports are not
overwritten without --overwrite."""

import contextlib
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import run_cli
from conftest import tree_hashes as hashes

from kcompress.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from kcompress.backend import keras
from kcompress.errors import KcompressError
from kcompress.io import load_model, save_model


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: str) -> dict[str, int]:
    """{relative path: permission bits} of every file and folder under ``root`` (``root`` itself included)."""
    out = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(base, name)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


def tiny_model(units: int = 3, name: str = "dense"):
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(units, name=name)])


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])
def test_written_files_and_folders_get_the_umask_modes(tmp_path, mask, file_mode, dir_mode):
    with umask(mask):
        atomic_write_bytes(str(tmp_path / "a.bin"), b"x")
        atomic_write_text(str(tmp_path / "b.txt"), "y")
        with atomic_path(str(tmp_path / "c.npz")) as tmp:
            np.savez_compressed(tmp, x=np.arange(3))
        with atomic_path(str(tmp_path / "folder")) as tmp:
            os.makedirs(os.path.join(tmp, "sub"))
            with open(os.path.join(tmp, "sub", "f"), "w") as f:
                f.write("z")
        save_model(tiny_model(), str(tmp_path / "sm"))
        save_model(tiny_model(), str(tmp_path / "m.h5"))
    for name in ("a.bin", "b.txt", "c.npz", "m.h5"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == file_mode, name
    for folder in ("folder", "sm"):
        for rel, mode in modes(str(tmp_path / folder)).items():
            want = dir_mode if os.path.isdir(tmp_path / folder / rel) else file_mode
            assert mode == want, (folder, rel, oct(mode))
    assert np.load(tmp_path / "c.npz")["x"].tolist() == [0, 1, 2]
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.txt", "c.npz", "folder", "m.h5", "sm"]  # no temp left


def test_existing_output_is_refused_without_overwrite_and_a_failed_write_keeps_the_old(tmp_path):
    path = str(tmp_path / "out.txt")
    atomic_write_text(path, "old")
    with pytest.raises(KcompressError, match="exists; pass --overwrite"):
        atomic_write_text(path, "new")
    with pytest.raises(RuntimeError):
        with atomic_path(path, overwrite=True) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed mid-write")
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_replacing_a_savedmodel_folder(tmp_path):
    path = str(tmp_path / "sm")
    save_model(tiny_model(3, "old"), path)
    save_model(tiny_model(5, "new"), path, overwrite=True)
    assert load_model(path).get_layer("new").units == 5
    assert os.listdir(tmp_path) == ["sm"]  # the old folder is gone, no temp left


def test_a_kill_before_the_commit_keeps_the_old_savedmodel(tmp_path):
    path = str(tmp_path / "sm")
    save_model(tiny_model(3, "old"), path)
    before = hashes(path)
    script = textwrap.dedent(f"""
        import os, signal
        from kcompress.backend import keras
        from kcompress.io import atomic_path
        new = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, name="new")])
        with atomic_path({path!r}, overwrite=True) as tmp:
            new.save(tmp, save_format="tf")
            assert os.path.exists(os.path.join(tmp, "saved_model.pb"))
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert hashes(path) == before
    assert load_model(path).get_layer("old").units == 3
    leftovers = [n for n in os.listdir(tmp_path) if n != "sm"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".kcompress-")  # the new one, never committed
    save_model(tiny_model(5, "new"), path, overwrite=True)  # and the next write is not disturbed by it
    assert load_model(path).get_layer("new").units == 5


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A real pipeline run (train 1 epoch, baseline, int8, benchmark) written under umask 022."""
    from kcompress.pipeline.config import config_from_dict
    from kcompress.pipeline.runner import run_pipeline

    run_dir = str(tmp_path_factory.mktemp("runs") / "r")
    cfg = config_from_dict({
        "name": "atomic", "model": {"architecture": "digits_cnn", "epochs": 1},
        "data": {"train": "digits:train", "val": "digits:val", "scale": 1 / 255, "train_limit": 300},
        "baseline": {"batch_sizes": [1], "runs": 2, "warmup": 1},
        "quantize": {"qat": "never", "calibration_samples": 20, "max_drop": 100.0},
        "benchmark": {"threads": [1], "batch_sizes": [1], "runs": 2, "warmup": 1, "trials": 1},
    })
    with umask(0o022):
        run_pipeline(cfg, run_dir, log=lambda m: None)
    return run_dir


def test_a_pipeline_run_writes_0644_files_and_0755_folders(small_run):
    found = modes(small_run)
    assert any(rel.endswith("outputs.npz") for rel in found) and any(rel.endswith(".png") for rel in found)
    bad = {rel: oct(m) for rel, m in found.items()
           if m != (0o755 if os.path.isdir(os.path.join(small_run, rel)) else 0o644)}
    assert not bad


def test_cli_quantize_output_follows_the_umask(small_run, tmp_path):
    model = os.path.join(small_run, "00-train", "model.keras")
    assert os.path.exists(model), os.listdir(os.path.join(small_run, "00-train"))
    for mask, want in ((0o022, 0o644), (0o077, 0o600)):
        out = tmp_path / f"m_{mask:o}.tflite"
        with umask(mask):
            r = run_cli("quantize", model, "--data", "digits:val", "--scale", "1/255", "--limit", "50",
                        "--calibration-samples", "20", "--max-drop", "100", "-o", out)
        assert r.exit_code == 0, r.output
        assert stat.S_IMODE(os.stat(out).st_mode) == want


def test_report_refuses_to_overwrite_without_the_flag(small_run, tmp_path):
    before = hashes(small_run)
    assert "report.md" in before  # the run wrote its report into the run folder
    r = run_cli("report", small_run)
    assert r.exit_code == 1 and "Traceback" not in r.output
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "exists; pass --overwrite" in errors[0], r.stderr
    assert hashes(small_run) == before
    out = tmp_path / "rep"
    assert run_cli("report", small_run, "-o", out).exit_code == 0
    with umask(0o022):
        r = run_cli("report", small_run, "-o", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert all(m == 0o644 for rel, m in modes(str(out)).items() if rel != ".")
