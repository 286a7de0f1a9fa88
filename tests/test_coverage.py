"""The coverage matrix of issue 14 (tools/coverage.py): tf_keras.applications families through every stage.

The fast subset runs in the default suite: three families, each nested in a transfer-learning model (Rescaling in
front, new head), through the stage functions of tools/coverage.py in this process, on 64 real digits at 32x32.
Every stage runs on at least one family (the cheap ones on more), so the file stays within about 4 minutes on 2
cores. What the stage produced is checked here against trusted references (the output model's weights, Keras's own
parameter count, the .tflite in the ai_edge_litert interpreter), not against the tool's verdict alone.

The full matrix (every family, top-level, nested and Keras 3) is the slow test at the end.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kcompress.backend import keras

L = keras.layers
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "coverage.py")


def _load_tool():
    spec = importlib.util.spec_from_file_location("kcompress_coverage_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


cov = _load_tool()

# (family, stages it runs in the fast subset): every stage on at least one family, on two where it is quick
FAST = {
    "MobileNetV2": ("magnitude", "structured", "distill"),
    "RegNetX": ("ptq", "qat", "structured"),
    "MobileNetV3Small": ("ptq", "distill"),
}
CASES = [(f, s) for f, stages in FAST.items() for s in stages]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("coverage"))


@pytest.fixture(scope="module")
def cases(workdir):
    """family -> (Family, model source, TRAIN, VAL), nested variant."""
    out = {}
    for name in FAST:
        fam = cov.family(name)
        train, val = cov.open_splits(fam, "nested", workdir)
        out[name] = (fam, cov.model_source(fam, "nested", workdir), train, val)
    return out


def _val_arrays(val, size):
    xs, ys = zip(*val.numpy_batches((size, size, 3), batch_size=64))
    return np.concatenate(xs), np.concatenate(ys)


def _run_interpreter(tflite, x):
    """The .tflite over ``x`` in ai_edge_litert; (float outputs, input dtype, output dtype, ops details, tensors)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=bytes(tflite))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    s, z = inp["quantization"]
    ys = []
    for row in x:
        q = np.clip(np.round(row[None] / s + z), -128, 127).astype(np.int8) if inp["dtype"] == np.int8 else row[None]
        it.set_tensor(inp["index"], q)
        it.invoke()
        o = it.get_tensor(out["index"])[0].astype(np.float32)
        os_, oz = out["quantization"]
        ys.append((o - oz) * os_ if out["dtype"] == np.int8 else o)
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    return np.stack(ys), inp["dtype"], out["dtype"], it._get_ops_details(), tensors


def _assert_int8_file(tflite, model, val, size):
    """Int8 I/O; every conv/FC computes in int8 on int8 weights; no float compute op; at most 0.35x the fp32
    parameter bytes (Keras's own count); runs on VAL with finite outputs."""
    x, y = _val_arrays(val, size)
    outs, in_t, out_t, ops, tensors = _run_interpreter(tflite, x)
    assert in_t == np.int8 and out_t == np.int8
    assert outs.shape == (len(y), 10) and np.all(np.isfinite(outs))
    weighted = [o for o in ops if o["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    assert weighted
    for o in weighted:
        assert tensors[o["outputs"][0]]["dtype"] == np.int8, o["op_name"]
        assert tensors[o["inputs"][1]]["dtype"] == np.int8, o["op_name"]  # the weights
    compute = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MUL", "MEAN", "AVERAGE_POOL_2D",
               "MAX_POOL_2D", "CONCATENATION", "SOFTMAX")
    floats = [o["op_name"] for o in ops if o["op_name"] in compute
              and np.dtype(tensors[o["outputs"][0]]["dtype"]).kind == "f"]
    assert floats == []
    assert len(tflite) <= 0.35 * 4 * model.count_params() * 1.01  # kcompress metadata (preprocessing) rides along
    return float(np.mean(outs.argmax(1) == y))


@pytest.mark.parametrize("name,stage", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_nested_family_passes_stage(cases, name, stage):
    fam, source, train, val = cases[name]
    before = source()
    record, outcome = cov.run_stage(stage, lambda: before, train, val)
    assert outcome is not None, record["reason"]
    assert record["ok"], record["reason"]
    assert record["seconds"] > 0 and record["peak_mib"] > 0
    if stage in ("ptq", "qat"):
        acc = _assert_int8_file(outcome.artifact, before, val, fam.size)
        assert acc == pytest.approx(record["accuracy_tflite"])
        assert record["float_compute_op_count"] == 0 and record["int8_ratio"] <= cov.MAX_INT8_RATIO
        if stage == "qat":
            assert record["qat_train_seconds"] is not None
    elif stage == "magnitude":
        pruned = outcome.artifact
        backbone = before.layers[1]
        convs = [la for la in backbone.layers if type(la) is L.Conv2D]
        assert len(convs) > 20
        for la in convs:  # the backbone's own convolutions, measured on the output model's weights
            k = pruned.get_layer(la.name).kernel.numpy()
            assert abs(float(np.mean(k == 0)) - 0.5) <= 0.05, la.name
        head = pruned.get_layer("head").kernel.numpy()
        assert abs(float(np.mean(head == 0)) - 0.5) <= 0.05
        assert float(np.mean(convs[0].kernel.numpy() == 0)) < 0.01  # the input model is untouched
    elif stage == "structured":
        pruned = outcome.artifact
        assert pruned.count_params() <= 0.75 * before.count_params()
        assert record["params_ratio"] == pytest.approx(pruned.count_params() / before.count_params(), abs=1e-3)
        x, _ = _val_arrays(val, fam.size)
        out = pruned(x, training=False).numpy()
        assert out.shape == (len(x), 10) and np.all(np.isfinite(out))
        assert record["macs_ratio"] < 1.0
    elif stage == "distill":
        student = outcome.artifact
        assert not any(isinstance(la, keras.Model) for la in student.layers)  # derived through the backbone
        assert student.count_params() < 0.6 * before.count_params()
        assert student.get_layer("head").units == 10
        x, _ = _val_arrays(val, fam.size)
        out = student(x, training=False).numpy()
        assert out.shape == (len(x), 10) and np.all(np.isfinite(out))


def test_data_are_real_digits_at_the_input_size(workdir):
    """64 + 64 samples, disjoint, every class, pixels 0-255, each 8x8 digit pixel an (s/8)-wide block."""
    from sklearn.datasets import load_digits

    train_path, val_path = cov.make_data(32, workdir)
    tr, va = np.load(train_path), np.load(val_path)
    assert tr["x"].shape == va["x"].shape == (64, 32, 32, 3)
    assert set(tr["y"]) == set(va["y"]) == set(range(10))
    assert tr["x"].min() >= 0 and tr["x"].max() <= 255 and tr["x"].max() > 200
    assert np.array_equal(tr["x"], np.repeat(np.kron(tr["x"][:, ::4, ::4, :1], np.ones((1, 4, 4, 1))), 3, -1))
    digits = load_digits()
    small = tr["x"][:, ::4, ::4, 0] * 16.0 / 255.0  # back to sklearn's 0-16 scale
    for s, label in zip(small, tr["y"]):  # each sample is one of sklearn's images, with its label
        hits = np.flatnonzero(np.all(np.abs(digits.images - s) < 1e-3, axis=(1, 2)))
        assert len(hits) and label in digits.target[hits]
    both = {a.tobytes() for a in tr["x"]} & {a.tobytes() for a in va["x"]}
    assert not both


def test_first_line_keeps_kcompress_messages_and_types_others():
    from kcompress.errors import KcompressError

    assert cov.first_line(KcompressError("layer 'se_mul' blocks pruning\nmore")) == "layer 'se_mul' blocks pruning"
    assert cov.first_line(ValueError("bad shape\ntraceback")) == "ValueError: bad shape"


def test_doc_has_header_tables_reasons_and_summary(tmp_path):
    results = {
        "MobileNetV2/nested": {
            "family": "MobileNetV2", "app": "MobileNetV2", "label": "MobileNetV2 (alpha 0.35)", "variant": "nested",
            "input": 32, "params": 420000, "commit": "abc1234", "date": "2026-01-01T00:00:00",
            "host": "CPU A, 2 cores", "build": {"ok": True, "seconds": 2.0, "peak_mib": 500.0},
            "stages": {"ptq": {"ok": True, "reason": "", "seconds": 7.4, "peak_mib": 800.0},
                       "qat": {"ok": False, "reason": "3 float compute op(s) left: MUL -> sequential/se/mul | x",
                               "seconds": 50.0, "peak_mib": 5000.0}},
        },
    }
    path = str(tmp_path / "COVERAGE.md")
    text = cov.write_doc(results, path, "python tools/coverage.py --families MobileNetV2")
    assert open(path).read() == text
    assert "python tools/coverage.py --families MobileNetV2" in text and "abc1234" in text
    assert "- Host: CPU A, 2 cores;" in text and "## Nested backbone" in text and "## Top-level" not in text
    row = next(line for line in text.splitlines() if line.startswith("| MobileNetV2 (alpha 0.35)"))
    assert "ok 7 s" in row and "FAIL 50 s [1]" in row and "4.9 GiB" in row
    assert "1. MobileNetV2 / qat: 3 float compute op(s) left: MUL -> sequential/se/mul \\| x" in text
    assert "1 of 2 cells pass" in text and "MobileNetV2 nested qat (4.9 GiB)" in text


def test_rerun_of_some_stages_keeps_the_others_with_where_they_were_measured(tmp_path):
    """``--rerun --stages qat`` replaces the qat cell only; the ptq cell keeps its own commit, date and host, and the
    header names both hosts and commits (it named this machine for every cell, and a rerun dropped the other cells)."""
    old = {"family": "F", "app": "F", "label": "F", "variant": "top", "input": 32, "params": 1000, "commit": "old1234",
           "date": "2026-01-01T00:00:00", "host": "CPU A, 2 cores", "build": {"ok": True, "seconds": 1, "peak_mib": 100},
           "stages": {"ptq": {"ok": True, "reason": "", "seconds": 5.0, "peak_mib": 900.0},
                      "qat": {"ok": True, "reason": "", "seconds": 60.0, "peak_mib": 5000.0}}}
    stamp = {"commit": "new5678", "date": "2026-02-01T00:00:00", "host": "CPU B, 2 cores"}
    new = {**old, **stamp, "stages": {"qat": {"ok": True, "reason": "", "seconds": 40.0, "peak_mib": 3000.0, **stamp}}}
    merged = cov.merge_rerun(old, new)
    assert list(merged["stages"]) == ["ptq", "qat"] and merged["stages"]["qat"]["seconds"] == 40.0
    assert (merged["stages"]["ptq"]["commit"], merged["stages"]["ptq"]["host"]) == ("old1234", "CPU A, 2 cores")
    assert cov.merge_rerun(None, new) is new
    text = cov.write_doc({"F/top": merged}, str(tmp_path / "C.md"), "python tools/coverage.py")
    header = text.split("## ")[0]
    assert "new5678, old1234" in header and "CPU A, 2 cores; CPU B, 2 cores" in header
    assert "2026-01-01T00:00:00 to 2026-02-01T00:00:00" in header
    row = next(line for line in text.splitlines() if line.startswith("| F "))
    assert "ok 5 s" in row and "ok 40 s" in row and "2.9 GiB" in row  # the rerun's peak, not the old 4.9 GiB


def test_help_answers_without_tensorflow():
    out = subprocess.run([sys.executable, "-c", f"import runpy, sys; sys.argv = ['coverage.py', '--help']\n"
                          f"try:\n    runpy.run_path({TOOL!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
                          "print('tensorflow' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert "--variants" in out.stdout and out.stdout.strip().endswith("False")


def _names_a_layer(reason: str, model) -> bool:
    from kcompress.graph import flatten_model

    names = {la.name for la in model.layers} | {la.name for la in flatten_model(model).layers}
    return any(n in reason for n in names)


@pytest.mark.slow
def test_full_matrix_every_cell_passes_or_names_the_blocking_layer(tmp_path):
    """Every family x top/nested/keras3 x stage, each (family, variant) in its own process (hours on 2 cores)."""
    out, results = str(tmp_path / "COVERAGE.md"), str(tmp_path / "results.json")
    subprocess.run([sys.executable, TOOL, "--workdir", str(tmp_path), "--out", out, "--json", results], cwd=ROOT,
                   timeout=24 * 3600)
    with open(results) as f:
        rows = json.load(f)["results"]
    expected = {f"{f.app}/{v}" for f in cov.FAMILIES for v in ("top", "nested")}
    expected |= {f"{cov.family(f).app}/keras3" for f in cov.KERAS3_FAMILIES}
    assert set(rows) == expected
    from kcompress.inputs import as_model

    bad = []
    for key, rec in rows.items():
        assert set(rec["stages"]) == set(cov.STAGES), key
        failed = {s: c["reason"] for s, c in rec["stages"].items() if not c["ok"]}
        if not failed:
            continue
        fam, variant = cov.family(rec["app"]), rec["variant"]
        model = as_model(cov.model_source(fam, variant, str(tmp_path))()).model
        bad += [f"{key} {s}: {r}" for s, r in failed.items() if not r or not _names_a_layer(r, model)]
    assert not bad, "\n".join(bad)
