import glob
import os

import pytest

from kcompress.errors import UsageError
from kcompress.pipeline.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_hash,
    defaults_yaml,
    load_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_shipped_config_loads(path):
    cfg, _ = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.quantize.enabled


def test_required_configs_are_shipped():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))}
    assert {"quickstart.yaml", "cifar10_resnet.yaml", "ptq_only.yaml", "qat.yaml"} <= names


def test_unknown_key_names_the_nearest_valid_one():
    with pytest.raises(UsageError, match=r"unknown config key prune\.sparsty \(did you mean prune\.sparsity\?\)"):
        config_from_dict({"model": {"path": "m.keras"}, "prune": {"sparsty": 0.5}})
    with pytest.raises(UsageError, match=r"unknown config key quantise"):
        config_from_dict({"model": {"path": "m.keras"}, "quantise": {}})


def test_types_and_choices_are_checked():
    with pytest.raises(UsageError, match=r"prune\.epochs: expected a whole number"):
        config_from_dict({"model": {"path": "m"}, "prune": {"epochs": 1.5}})
    with pytest.raises(UsageError, match=r"quantize\.mode: 'int4' is not one of"):
        config_from_dict({"model": {"path": "m"}, "quantize": {"mode": "int4"}})
    with pytest.raises(UsageError, match="needs model.path"):
        config_from_dict({})


def test_overrides_apply_and_change_the_hash():
    raw = {"model": {"path": "m.keras"}}
    a = config_from_dict(raw)
    b = config_from_dict(apply_overrides(raw, ["prune.target_flops=0.5", "quantize.qat=never"]))
    assert b.prune.target_flops == 0.5 and b.quantize.qat == "never"
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash(config_from_dict(raw))
    with pytest.raises(UsageError, match="not of the form"):
        apply_overrides(raw, ["prune.epochs"])


def test_defaults_yaml_documents_every_key_and_loads_back():
    import yaml

    text = defaults_yaml()
    for line in text.splitlines()[1:]:
        assert "  # " in line, line  # every key has a doc comment
    raw = yaml.safe_load(text)
    raw["model"]["path"] = "m.keras"
    assert config_from_dict(raw) == config_from_dict({"model": {"path": "m.keras"}})


@pytest.mark.parametrize("name", ["ptq_only.yaml", "qat.yaml"])
def test_shipped_config_runs_on_a_real_model(name, cnn_path, tmp_path):
    """The shipped configs as a user runs them: model.path replaced, everything else as shipped."""
    from kcompress.litert.interpreter import TFLiteModel
    from kcompress.pipeline.runner import execute

    cfg, _ = load_config(os.path.join(ROOT, "configs", name), [f"model.path={cnn_path}", "qat.epochs=1",
                                                                "benchmark.runs=5", "benchmark.threads=[1]"])
    records = execute(cfg, str(tmp_path / "run"), log=lambda m: None)
    assert [r.stage for r in records] == ["baseline", "quantize", "benchmark"]
    q = records[1].metrics
    assert q["method"] == ("ptq" if name == "ptq_only.yaml" else q["method"])
    if name == "qat.yaml":
        assert q.get("qat_accuracy") is not None  # qat: always ran QAT, whichever was kept
    assert TFLiteModel(records[1].model_path).input_dtype.__name__ == "int8"
    assert records[0].metrics["accuracy"] - q["accuracy"] <= 0.01 + cfg.quantize.max_drop / 100
