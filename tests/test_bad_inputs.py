"""The bad-input corpus, generated under a temporary folder: every case runs the real CLI (in process, exceptions
not caught by the runner) and must give one ``Error:`` line, the documented exit code (1 user error, 2 usage
error), no traceback, no crash file, and leave every existing file byte for byte as it was. Plus the exit-3
contract for kcompress's own bugs, and the fixed-batch ``.tflite`` that used to crash ``evaluate``."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import run_cli
from conftest import tree_hashes as _files

USER, USAGE, BUG = 1, 2, 3


@pytest.fixture(autouse=True)
def crash_home(tmp_path_factory, monkeypatch):
    """Crash files go to a folder of the test's own (and are counted), never to the real ~/.cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache / "kcompress"


# ------------------------------------------------------------------------------------------------ the corpus
def _tiny_model():
    """A softmax regression on 8x8x1 digits, trained a little (about 90% on digits:val)."""
    from kcompress.backend import keras, tf
    from kcompress.data import open_data

    tf.keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    out = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(inp))
    model = keras.Model(inp, out)
    train = open_data("digits:train")
    x = np.concatenate([b for b, _ in train.numpy_batches((8, 8, 1), 512)]) / 255.0
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(x, train.labels, epochs=15, batch_size=64, verbose=0)
    return model


def _fixed_batch_tflite(model, keras, tf) -> bytes:
    """The same weights in a graph built for batch 1 only: a RESHAPE to the constant shape [1, 64]."""
    inp = keras.Input((8, 8, 1), batch_size=1)
    out = keras.layers.Dense(10, activation="softmax")(keras.layers.Reshape((64,))(inp))
    fixed = keras.Model(inp, out)
    fixed.set_weights(model.get_weights())
    return tf.lite.TFLiteConverter.from_keras_model(fixed).convert()


def _png(path, rng, size=8):
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Good models (``good/``) and every kind of bad input (``bad/``)."""
    from kcompress.backend import keras, tf

    root = tmp_path_factory.mktemp("corpus")
    good, bad = root / "good", root / "bad"
    good.mkdir()
    bad.mkdir()
    model = _tiny_model()
    model.save(good / "m.h5")
    model.save(good / "m.keras")
    model.save(good / "sm")
    (good / "m.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    (good / "fixed.tflite").write_bytes(_fixed_batch_tflite(model, keras, tf))
    rng = np.random.default_rng(0)

    # models: empty, truncated and junk files of every format, SavedModel folders with a broken saved_model.pb
    for ext in ("h5", "keras", "tflite"):
        data = (good / f"m.{ext}").read_bytes()
        (bad / f"empty.{ext}").write_bytes(b"")
        (bad / f"truncated.{ext}").write_bytes(data[: len(data) // 2])
        (bad / f"junk.{ext}").write_bytes(rng.bytes(3000))
    for name, content in (("sm_junk", rng.bytes(500)), ("sm_truncated", None), ("sm_empty_pb", b"")):
        shutil.copytree(good / "sm", bad / name)
        pb = (good / "sm" / "saved_model.pb").read_bytes()
        (bad / name / "saved_model.pb").write_bytes(pb[: len(pb) // 2] if content is None else content)
    (bad / "sm_no_pb").mkdir()

    # .npz data
    x = rng.uniform(0, 255, (40, 8, 8, 1)).astype(np.float32)
    y = np.arange(40) % 10
    np.savez(bad / "wrong_shape.npz", x=rng.uniform(size=(40, 5)), y=y)
    np.savez(bad / "y_3d.npz", x=x, y=np.zeros((40, 2, 2)))
    np.savez(bad / "length.npz", x=x, y=y[:30])
    x_nan = x.copy()
    x_nan[7, 3, 3, 0] = np.nan
    np.savez(bad / "nan.npz", x=x_nan, y=y)
    np.savez(bad / "out_of_range.npz", x=x, y=y + 5)
    np.savez(bad / "negative.npz", x=x, y=y - 1)
    np.savez(bad / "text_labels.npz", x=x, y=np.array(["cat"] * 40))
    np.savez(bad / "pickled_x.npz", x=np.array([{"a": i} for i in range(40)], dtype=object), y=y)
    np.savez(bad / "pickled_y.npz", x=x, y=np.array([None] * 40, dtype=object))
    np.savez(bad / "no_y.npz", x=x)
    np.savez(bad / "scalars.npz", x=np.float32(1), y=np.int64(1))
    whole = (bad / "nan.npz").read_bytes()
    (bad / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    (bad / "junk.npz").write_bytes(rng.bytes(1000))
    (bad / "empty.npz").write_bytes(b"")

    # image folders
    (bad / "folder_empty").mkdir()
    for c in "ab":
        (bad / "folder_no_images" / c).mkdir(parents=True)
        (bad / "folder_no_images" / c / "notes.txt").write_text("not an image")
    (bad / "folder_one_class" / "cat").mkdir(parents=True)
    for i in range(3):
        _png(bad / "folder_one_class" / "cat" / f"{i}.png", rng)
    for c in range(10):
        (bad / "folder_corrupt" / str(c)).mkdir(parents=True)
        (bad / "folder_corrupt" / str(c) / "x.png").write_bytes(rng.bytes(200))  # not an image at all
        (bad / "folder_corrupt" / str(c) / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))  # PNG magic
    for split, classes in (("train", "abc"), ("val", "ab")):  # val lacks class c
        for c in classes:
            (bad / "split" / split / c).mkdir(parents=True)
            for i in range(3):
                _png(bad / "split" / split / c / f"{i}.png", rng)

    # pipeline configs
    head = f"name: t\nmodel: {{path: {good / 'm.h5'}}}\n"
    configs = {
        "unknown_key.yaml": head + "prune: {sparsty: 0.5}\n",
        "unknown_section.yaml": head + "quantise: {mode: int8}\n",
        "out_of_range.yaml": head + "prune: {target_flops: 1.5}\n",
        "negative_epochs.yaml": head + "distill: {epochs: -3}\n",
        "bad_enum.yaml": head + "quantize: {mode: int4}\n",
        "negative_seed.yaml": "seed: -1\n" + head,
        "huge_number.yaml": head + "distill: {temperature: " + "9" * 400 + "}\n",
        "date_name.yaml": "name: 2024-01-01\n" + head[len("name: t\n"):],
        "not_yaml.yaml": "model: [1\n",
        "a_list.yaml": "- model\n- data\n",
        "missing_class.yaml": head + f"data: {{train: {bad / 'split' / 'train'}, val: {bad / 'split' / 'val'}}}\n",
    }
    for name, text in configs.items():
        (bad / name).write_text(text)

    # a run folder for `kcompress report`, with benchmark files from a phone
    run = root / "run"
    (run / "01-baseline").mkdir(parents=True)
    (run / "01-baseline" / "stage.json").write_text("{}")
    (run / "01-baseline" / "metrics.json").write_text('{"kind": "keras", "accuracy": 0.9, "size_bytes": 1000}')
    return root


def _one_error(result, code, crash_dir, match=None):
    """Exit ``code``, exactly one ``Error:`` line (on stderr), no traceback, no crash file."""
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    assert errors[0] in result.stderr
    assert "Traceback" not in result.output and "kcompress bug" not in result.output
    assert not crash_dir.exists() or not os.listdir(crash_dir)
    if match:
        assert match in errors[0], errors[0]
    return errors[0]


def _case(corpus, crash_home, args, code, match=None):
    before = _files(corpus)
    result = run_cli(*[str(a).format(good=corpus / "good", bad=corpus / "bad", root=corpus) for a in args])
    line = _one_error(result, code, crash_home, match)
    after = _files(corpus)
    assert {k: after.get(k) for k in before} == before  # nothing that existed was modified or removed
    return line


MODEL_CASES = {
    "missing .h5": ("{bad}/missing.h5", "no such model"),
    "missing .keras": ("{bad}/missing.keras", "no such model"),
    "missing .tflite": ("{bad}/missing.tflite", "no such model"),
    "missing SavedModel": ("{bad}/missing_savedmodel", "no such model"),
    "empty .h5": ("{bad}/empty.h5", "not a model"),
    "empty .keras": ("{bad}/empty.keras", "not a model"),
    "empty .tflite": ("{bad}/empty.tflite", "not a model"),
    "truncated .h5": ("{bad}/truncated.h5", "not a readable .h5"),
    "truncated .keras": ("{bad}/truncated.keras", "not a model"),
    "truncated .tflite": ("{bad}/truncated.tflite", "cannot load the .tflite model"),
    "junk .h5": ("{bad}/junk.h5", "not a model"),
    "junk .keras": ("{bad}/junk.keras", "not a model"),
    "junk .tflite": ("{bad}/junk.tflite", "not a model"),
    "SavedModel, junk saved_model.pb": ("{bad}/sm_junk", "cannot load the model"),
    "SavedModel, truncated saved_model.pb": ("{bad}/sm_truncated", "cannot load the model"),
    "SavedModel, empty saved_model.pb": ("{bad}/sm_empty_pb", "cannot load the model"),
    "folder without saved_model.pb": ("{bad}/sm_no_pb", "not a SavedModel"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_model_files(corpus, crash_home, case):
    path, match = MODEL_CASES[case]
    _case(corpus, crash_home, ["evaluate", path, "--data", "digits:val"], USER, match)


DATA_CASES = {
    "npz: samples of the wrong shape": ("wrong_shape.npz", "samples have shape (5,)"),
    "npz: 3-D labels": ("y_3d.npz", "one label or one one-hot row per sample"),
    "npz: x and y lengths differ": ("length.npz", "x has 40 samples but y has 30"),
    "npz: NaN in x": ("nan.npz", "NaN or infinite"),
    "npz: labels out of range": ("out_of_range.npz", "outside the model's 10 classes"),
    "npz: negative labels": ("negative.npz", "labels must be >= 0"),
    "npz: text labels": ("text_labels.npz", "integer class indices"),
    "npz: pickled x": ("pickled_x.npz", "array 'x' holds Python objects"),
    "npz: pickled y": ("pickled_y.npz", "array 'y' holds Python objects"),
    "npz: no y": ("no_y.npz", "needs arrays 'x' and 'y'"),
    "npz: scalars": ("scalars.npz", "one row per sample"),
    "npz: truncated": ("truncated.npz", "not a readable .npz"),
    "npz: junk": ("junk.npz", "not an .npz file"),
    "npz: empty file": ("empty.npz", "not a readable .npz"),
    "npz: missing": ("missing.npz", "no such data"),
    "folder: empty": ("folder_empty", "no class sub-folders"),
    "folder: no images": ("folder_no_images", "the data set is empty"),
    "folder: one class": ("folder_one_class", "only one class sub-folder"),
    "folder: corrupt images": ("folder_corrupt", "the data set is empty"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data(corpus, crash_home, case):
    name, match = DATA_CASES[case]
    _case(corpus, crash_home, ["evaluate", "{good}/m.tflite", "--data", f"{{bad}}/{name}"], USER, match)


def test_pickled_npz_is_never_unpickled(corpus, crash_home, monkeypatch):
    """allow_pickle=False: the object array is refused before pickle.loads could run anything."""
    import pickle

    def never(*args, **kwargs):
        raise AssertionError("pickle.loads called on a data file")

    monkeypatch.setattr(pickle, "loads", never)
    monkeypatch.setattr(pickle, "load", never)
    _case(corpus, crash_home, ["evaluate", "{good}/m.tflite", "--data", "{bad}/pickled_x.npz"], USER,
          "holds Python objects")


CONFIG_CASES = {
    "unknown key": ("unknown_key.yaml", USAGE, "unknown config key prune.sparsty (did you mean prune.sparsity?)"),
    "unknown section": ("unknown_section.yaml", USAGE, "unknown config key quantise"),
    "out of range": ("out_of_range.yaml", USAGE, "prune.target_flops: must be between 0 and 1"),
    "negative epochs": ("negative_epochs.yaml", USAGE, "distill.epochs: must be at least 1"),
    "bad choice": ("bad_enum.yaml", USAGE, "quantize.mode: 'int4' is not one of"),
    "negative seed": ("negative_seed.yaml", USAGE, "seed: must be a whole number from 0"),
    "number beyond float": ("huge_number.yaml", USAGE, "distill.temperature: expected a number"),
    "a date where text goes": ("date_name.yaml", USAGE, "name: expected text"),
    "not YAML": ("not_yaml.yaml", USAGE, "not valid YAML"),
    "a list, not a mapping": ("a_list.yaml", USAGE, "expected a mapping"),
    "missing file": ("missing.yaml", USER, "cannot read the config"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_validate(corpus, crash_home, case):
    name, code, match = CONFIG_CASES[case]
    _case(corpus, crash_home, ["config", "--validate", f"{{bad}}/{name}"], code, match)


@pytest.mark.parametrize("case", ["unknown key", "out of range", "number beyond float", "a date where text goes"])
def test_bad_config_run(corpus, crash_home, tmp_path, case):
    name, code, match = CONFIG_CASES[case]
    _case(corpus, crash_home, ["run", f"{{bad}}/{name}", "-o", tmp_path / "run"], code, match)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_val_folder_missing_a_class(corpus, crash_home, tmp_path):
    _case(corpus, crash_home, ["run", "{bad}/missing_class.yaml", "-o", tmp_path / "run"], USER,
          "its classes differ from")


def test_bad_override(corpus, crash_home, tmp_path):
    _case(corpus, crash_home, ["run", "{bad}/unknown_key.yaml", "prune.epochs=[1", "-o", tmp_path / "run"], USAGE,
          "not valid YAML")


# ------------------------------------------------------------------------------------------------ device results
def _device_doc():
    from kcompress.bench.schema import BenchReport, BenchResult, LatencyStats

    result = BenchResult(model="/data/local/tmp/kc/m.tflite", runtime="benchmark_model", threads=4, batch_size=1,
                         latency_ms=LatencyStats(50, 1.0, 0.1, 0.9, 1.2, 1.0, 1.1, 1.15))
    return json.loads(BenchReport(target={"kind": "android", "model": "Pixel 7"}, results=(result,)).to_json())


def _with(doc, **changes):
    return {**doc, "results": [{**doc["results"][0], **changes}]}


DEVICE_CASES = {
    "threads as text": (lambda d: _with(d, threads="four"), "results[0]: threads must be a whole number"),
    "latency_ms a list": (lambda d: _with(d, latency_ms=[1, 2]), "results[0]: latency_ms must be an object"),
    "a statistic missing": (lambda d: _with(d, latency_ms={"mean": 1.0}), "latency_ms has no count"),
    "a statistic as text": (lambda d: _with(d, latency_ms={**d["results"][0]["latency_ms"], "p50": "fast"}),
                            "latency_ms.p50 must be a number"),
    "extra a list, with an unknown key": (lambda d: _with(d, extra=[1], energy_mj=3), "extra must be an object"),
    "results an object": (lambda d: {**d, "results": {"a": 1}}, "results must be a list"),
    "target a list": (lambda d: {**d, "target": ["Pixel"]}, "target must be an object"),
    "another schema": (lambda d: {**d, "schema": "other/2"}, "not a kcompress benchmark result"),
    "not JSON": (lambda d: "{not json", "not valid JSON"),
}


def _report_case(corpus, crash_home, tmp_path, doc):
    run = tmp_path / "run"
    shutil.copytree(corpus / "run", run)
    (run / "device_pixel.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    before = _files(tmp_path)
    return run, before


@pytest.mark.parametrize("case", sorted(DEVICE_CASES))
def test_malformed_device_json_in_report(corpus, crash_home, tmp_path, case):
    make, match = DEVICE_CASES[case]
    run, before = _report_case(corpus, crash_home, tmp_path, make(_device_doc()))
    line = _one_error(run_cli("report", run, "-o", tmp_path / "report"), USER, crash_home, match)
    assert "device_pixel.json" in line
    assert {k: v for k, v in _files(tmp_path).items() if k in before} == before


def test_device_json_with_unknown_keys_is_reported(corpus, crash_home, tmp_path):
    """Keys a newer kcompress writes are no error: kept in the result's extra, the report lists the device."""
    doc = _device_doc()
    doc = {**_with(doc, energy_mj=3.0, latency_ms={**doc["results"][0]["latency_ms"], "p999": 2.0}), "notes": "x"}
    run, _ = _report_case(corpus, crash_home, tmp_path, doc)
    r = run_cli("report", run, "-o", tmp_path / "report")
    assert r.exit_code == 0, r.output
    devices = json.loads((tmp_path / "report" / "report.json").read_text())["runs"][0]["device_benchmark"]
    assert devices == [{"file": "device_pixel.json", "device": "Pixel 7", "model": "m.tflite", "threads": 4,
                        "delegate": "cpu", "p50_ms": 1.0, "mean_ms": 1.0}]


# ------------------------------------------------------------------------------------------------ exit codes
def test_an_os_error_about_a_user_path_is_a_user_error(crash_home, tmp_path):
    """Commands check the paths they are given, so a raw OS error is rare; when one comes through (here a real
    IsADirectoryError, which root gets too), it names the path, exits 1 and is not reported as a bug."""
    import click
    from click.testing import CliRunner

    from kcompress.cli import handle_errors, main

    @main.command("read-it")
    @click.argument("path")
    @handle_errors
    def read_it(path):
        with open(path, encoding="utf-8") as f:
            click.echo(f.read())

    try:
        r = CliRunner().invoke(main, ["read-it", str(tmp_path)], catch_exceptions=False)
    finally:
        main.commands.pop("read-it")
    _one_error(r, USER, crash_home, f"Error: {tmp_path}: Is a directory")


def test_an_internal_error_is_exit_3_with_a_saved_traceback(corpus, crash_home, monkeypatch):
    """A bug (here a library raising TypeError under us) is not blamed on the user: exit 3, one line naming it,
    the traceback saved; --debug raises it instead."""
    import yaml

    def broken(stream):
        raise TypeError("simulated library bug\nsecond line")

    monkeypatch.setattr(yaml, "safe_load", broken)
    r = run_cli("config", "--validate", corpus / "bad" / "unknown_key.yaml")
    assert r.exit_code == BUG, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in r.output
    line = errors[0]
    assert "kcompress bug" in line and "TypeError: simulated library bug" in line and "second line" not in line
    assert "--debug" in line
    crashes = os.listdir(crash_home)
    assert len(crashes) == 1 and crashes[0].startswith("crash-") and str(crash_home / crashes[0]) in line
    saved = (crash_home / crashes[0]).read_text()
    assert "Traceback (most recent call last)" in saved and "TypeError: simulated library bug" in saved
    assert "in broken" in saved  # the frame that raised
    with pytest.raises(TypeError, match="simulated"):
        run_cli("--debug", "config", "--validate", corpus / "bad" / "unknown_key.yaml")


def test_crash_file_falls_back_to_the_temp_folder(corpus, tmp_path, monkeypatch):
    import tempfile

    import yaml

    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(yaml, "safe_load", lambda stream: {}.__getitem__("missing"))  # a KeyError from a library
    r = run_cli("config", "--validate", corpus / "bad" / "unknown_key.yaml")
    assert r.exit_code == BUG and "KeyError" in r.output
    saved = os.listdir(tmp_path / "tmp" / "kcompress")
    assert len(saved) == 1 and str(tmp_path / "tmp" / "kcompress" / saved[0]) in r.output


def test_usage_errors_of_click_are_exit_2(crash_home):
    r = run_cli("evaluate", "--no-such-flag")
    assert r.exit_code == USAGE and "No such option" in r.output
    assert not crash_home.exists()


# ------------------------------------------------------------------------------------------------ fixed batch
def test_fixed_batch_tflite_evaluates_like_its_reference(corpus, crash_home):
    """A .tflite whose graph only takes batch 1 used to fail allocate_tensors (a RuntimeError, a traceback) when
    resized to --batch-size; it now runs sample by sample and scores exactly what the Keras model scores."""
    good = corpus / "good"
    r = run_cli("evaluate", good / "fixed.tflite", "--data", "digits:val", "--scale", 1 / 255, "--reference",
                good / "m.h5", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["accuracy"] > 0.8  # a trained model, not chance
    assert out["reference"]["agreement"] == 1.0 and out["accuracy"] == out["reference"]["accuracy"]


def test_fixed_batch_tflite_predicts_like_the_resizable_one(corpus):
    from kcompress.data import open_data
    from kcompress.litert.interpreter import TFLiteModel

    x = np.concatenate([b for b, _ in open_data("digits:val").numpy_batches((8, 8, 1), 512)]) / 255.0
    fixed = TFLiteModel(str(corpus / "good" / "fixed.tflite"), batch_size=64)
    free = TFLiteModel(str(corpus / "good" / "m.tflite"), batch_size=64)
    assert (fixed.batch_size, fixed.fixed_batch) == (1, True)
    assert (free.batch_size, free.fixed_batch) == (64, False)
    np.testing.assert_allclose(fixed.predict(x), free.predict(x), rtol=1e-5, atol=1e-6)


def test_fixed_batch_tflite_bench(corpus, crash_home):
    good = corpus / "good"
    fast = ["--runs", "3", "--warmup", "1", "--trials", "1", "--threads", "1"]
    r = run_cli("bench", good / "fixed.tflite", *fast, "--json")
    assert r.exit_code == 0, r.output
    assert [res["batch_size"] for res in json.loads(r.stdout)["results"]] == [1]
    # timing it at another batch would time something else: one clear line instead
    _case(corpus, crash_home, ["bench", "{good}/fixed.tflite", *fast, "--batch-sizes", "4"], USER,
          "the model's batch is fixed at 1")


def test_a_real_process_prints_one_line_not_tensorflow_start_up_noise(tmp_path):
    """In a fresh process TensorFlow's C++ start-up lines (oneDNN, CUDA stubs) would precede ours; stderr is one
    line. (The in-process cases above cannot see native stderr.)"""
    import subprocess
    import sys

    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00\x01\x02\x03TFL3garbage")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    r = subprocess.run([sys.executable, "-m", "kcompress", "evaluate", str(junk), "--data", "digits:val"],
                       capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.stderr
