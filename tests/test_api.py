"""The Python facade (``import kcompress as kc``) and the options classes: one API with two faces, one default per
setting, validation before any work."""

import dataclasses
import importlib
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import run_cli

import kcompress as kc
from kcompress.cli import LAZY_COMMANDS, main
from kcompress.cli.console import build
from kcompress.options import (
    BaselineOptions,
    BenchmarkOptions,
    DataOptions,
    DistillOptions,
    PruneOptions,
    QATOptions,
    QuantizeOptions,
    TrainOptions,
)
from kcompress.pipeline.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
SCALE = ("--scale", "1/255")


def test_import_kcompress_and_help_import_no_tensorflow():
    code = ("import sys, kcompress, kcompress.options, kcompress.types, kcompress.cli, kcompress.cli.console; "
            "kcompress.__all__; assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
            "from kcompress.cli import main; sys.argv = ['kcompress', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported by --help'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_every_facade_name_resolves_and_no_submodule_shadows_it():
    for info in pkgutil.walk_packages(kc.__path__, "kcompress."):
        importlib.import_module(info.name)  # importing a submodule sets it as an attribute of its package
    for name in kc.__all__:
        value = getattr(kc, name)
        assert not isinstance(value, type(kc)), f"kc.{name} is the module {value.__name__}, not the API"
    for fn in ("quantize", "qat", "distill", "prune", "evaluate", "compare", "run_pipeline", "sensitivity"):
        assert callable(getattr(kc, fn))


def test_quantize_api_and_cli_give_the_same_figures(cnn_path, tmp_path):
    data = kc.open_data("digits:train", kc.Preprocess(scale=1 / 255))
    r = kc.quantize(cnn_path, data, mode="int8", val_data="digits:val", calibration_samples=100)
    assert isinstance(r, kc.QuantizeResult) and dataclasses.is_dataclass(r)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.latency_ms = 0.0
    out = tmp_path / "api.tflite"
    r.save(str(out))
    with pytest.raises(kc.KcompressError, match="--overwrite"):
        r.save(str(out))
    cli = run_cli("quantize", cnn_path, "--data", "digits:train", "--val-data", "digits:val", *SCALE,
                  "--calibration-samples", "100", "-o", tmp_path / "cli.tflite", "--json")
    assert cli.exit_code == 0, cli.output
    shown = json.loads(cli.output)
    assert shown["accuracy_before"] == r.before.accuracy and shown["accuracy_after"] == r.after.accuracy
    assert shown["size_bytes"] == r.size_bytes and shown["size_ratio"] == r.size_ratio
    assert (tmp_path / "cli.tflite").read_bytes() == out.read_bytes()  # same seed, same calibration sample
    # the table the CLI prints carries the same accuracies as the result object
    table = run_cli("quantize", cnn_path, "--data", "digits:train", "--val-data", "digits:val", *SCALE,
                    "--calibration-samples", "100", "-o", tmp_path / "t.tflite")
    assert f"{100 * r.before.accuracy:.2f}%" in table.output and f"{100 * r.after.accuracy:.2f}%" in table.output


def test_compare_api_and_cli_agree(cnn_path, trained_cnn, tmp_path):
    q = kc.quantize(trained_cnn, "digits:train", preprocess=kc.Preprocess(scale=1 / 255), val_data="digits:val")
    c = kc.compare(cnn_path, q.tflite, "digits:val", preprocess=kc.Preprocess(scale=1 / 255))
    assert c.a["accuracy"] == q.before.accuracy and c.b["accuracy"] == q.after.accuracy
    path = q.save(str(tmp_path / "q.tflite"))
    cli = json.loads(run_cli("compare", cnn_path, path, "--data", "digits:val", *SCALE, "--json").output)
    assert cli["agreement"] == c.agreement and cli["accuracy_delta"] == c.accuracy_delta


# ---------------------------------------------------------------------------------------------------- options

# options class -> (command, {field: why it has no flag on that command})
COMMANDS = {
    QuantizeOptions: ("quantize", {"enabled": "pipeline only", "qat": "pipeline only (kcompress qat is the flag)",
                                   "per_channel": "--per-tensor, inverted"}),
    QATOptions: ("qat", {}),
    DistillOptions: ("distill", {"enabled": "pipeline only"}),
    PruneOptions: ("prune", {"enabled": "pipeline only"}),
    BaselineOptions: ("baseline", {}),
    BenchmarkOptions: ("bench", {}),
    TrainOptions: ("distill", {}),  # and prune, qat: test_every_training_command_has_the_train_flags
    DataOptions: ("quantize", {"train": "--data", "val": "--val-data", "train_limit": "pipeline only",
                               "test": "--test-data", "val_split": "pipeline only (give --val-data)"}),
}
CLI_ONLY = {"data", "data_spec", "val_data", "val_spec", "out", "overwrite", "as_json", "limit", "seed", "model",
            "model_path", "models", "teacher", "resume", "per_tensor", "keras_out", "scale", "offset", "mean", "std",
            "test_data", "test_split", "train_limit",  # the data section's test and test_split
            "trust_model",  # deliberately no config key: a shared config must not vouch for its own model file
            "fmt"}  # quantize --format onnx: ONNX Runtime output, no pipeline stage (yet)


def _command(name):
    module, attr = LAZY_COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("cls", list(COMMANDS), ids=lambda c: c.__name__)
def test_every_option_has_a_flag_and_a_config_key_with_the_same_default(cls):
    command, exempt = COMMANDS[cls]
    params = {p.name: p for p in _command(command).params}
    section = next(f.name for f in dataclasses.fields(RunConfig) if f.type in (cls, cls.__name__))
    defaults = RunConfig().to_dict()[section]
    for f in dataclasses.fields(cls):
        assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
        assert f.name in defaults  # a config key of the same name
        if f.name in exempt:
            continue
        assert f.name in params, f"{cls.__name__}.{f.name} has no flag on `kcompress {command}`"
        cli_default = params[f.name].default
        if isinstance(cli_default, tuple) and not cli_default:
            cli_default = None
        if cli_default is None:  # no default on the flag: the option must have none either
            assert getattr(cls(), f.name) in (None, ()), f"--{f.name} has no default, the option has one"
        else:
            built = build(cls, **{f.name: cli_default})
            assert getattr(built, f.name) == getattr(cls(), f.name), f"--{f.name} default differs"
    if cls not in (DataOptions, TrainOptions):  # the other way round: every flag is a setting, or a CLI-only one
        names = {f.name for f in dataclasses.fields(cls)}
        from_quantize = {f.name for f in dataclasses.fields(QuantizeOptions)}  # qat takes the int8 settings
        from_train = {f.name for f in dataclasses.fields(TrainOptions)} if command in TRAINING else set()
        extra = set(params) - names - CLI_ONLY - (from_quantize if cls is QATOptions else set()) - from_train
        assert not extra, f"`kcompress {command}` flags without a config key: {extra}"


TRAINING = ("distill", "prune", "qat")  # the commands that train: each takes the train section's flags


@pytest.mark.parametrize("command", TRAINING)
def test_every_training_command_has_the_train_flags(command):
    params = {p.name: p for p in _command(command).params}
    for f in dataclasses.fields(TrainOptions):
        assert f.name in params, f"TrainOptions.{f.name} has no flag on `kcompress {command}`"
        default = params[f.name].default
        assert build(TrainOptions, **{f.name: default}) == TrainOptions(), f"--{f.name} default differs"


@pytest.mark.parametrize("override, key", [
    ("prune.target_flops=1.5", "prune.target_flops"),
    ("quantize.calibration_samples=0", "quantize.calibration_samples"),
    ("distill.temperature_schedule=linear:8", "distill.temperature_schedule"),
    ("prune.block='4:2'", "prune.block"),
    ("distill.alpha=1.5", "distill.alpha"),
    ("distill.temperature=0", "distill.temperature"),
    ("quantize.mode=int4", "quantize.mode"),
    ("prune.criterion=random", "prune.criterion"),
])
def test_config_validate_rejects_bad_values_naming_the_key(tmp_path, override, key):
    key_, value = override.split("=", 1)
    section, name = key_.split(".")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: t\nmodel: {{path: m.keras}}\n{section}:\n  {name}: {value}\n")
    r = CliRunner().invoke(main, ["config", "--validate", str(cfg)])
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"Error: {key}:"), r.output
    with pytest.raises(kc.UsageError, match=re.escape(name)):
        dataclasses.replace(getattr(RunConfig(), section), **{name: __import__("yaml").safe_load(value)})


def test_options_coerce_types_and_enums():
    q = QuantizeOptions(mode="int8", io="uint8")
    assert q.mode == kc.QuantMode.INT8 and f"{q.mode}" == "int8" and q.io_type == "uint8"
    assert DataOptions(scale="1/255").scale == pytest.approx(1 / 255)
    assert PruneOptions(method="magnitude").learning_rate == 1e-4 and PruneOptions().learning_rate == 1e-3
    with pytest.raises(kc.UsageError, match="io"):
        QuantizeOptions(mode="float16", io="int8")
    with pytest.raises(kc.UsageError, match="unknown option 'epoch'.*'epochs'"):
        kc.prune("m.keras", "digits", epoch=3)


def test_readme_python_example_runs_as_written(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "model_int8.tflite").exists()

