"""Pipeline configuration: frozen dataclasses, YAML in and out, ``section.key=value`` overrides.

Every key has a default and a one-line doc (``field(metadata={"doc": ...})``), printed by
``kcompress config --show-defaults``. Unknown keys are errors that name the nearest valid key. The config hash
(:func:`config_hash`) identifies a run's settings in every artifact and in the final ``.tflite``'s metadata.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from kcompress.errors import KcompressError, UsageError
from kcompress.options import (
    BaselineOptions,
    BenchmarkOptions,
    ConvertOptions,
    DataOptions,
    DistillOptions,
    ModelOptions,
    OptionError,
    Options,
    PruneOptions,
    QATOptions,
    QuantizeOptions,
    TrainOptions,
)

__all__ = [
    "RunConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "config_hash",
    "defaults_yaml",
    "dump_yaml",
]


@dataclass(frozen=True)
class RunConfig(Options):
    name: str = field(default="run", metadata={"doc": "the run's name (used in reports and the .tflite metadata)"})
    seed: int = field(default=0, metadata={"doc": "random seed for training, shuffling and sampling"})
    max_drop: float = field(default=3.0, metadata={
        "doc": "largest overall accuracy drop (points) from the baseline to the final model"})
    model: ModelOptions = field(default_factory=ModelOptions, metadata={"doc": "the model to compress"})
    data: DataOptions = field(default_factory=DataOptions, metadata={"doc": "data and preprocessing"})
    train: TrainOptions = field(default_factory=TrainOptions, metadata={
        "doc": "how every training stage trains (train, distill, prune fine-tunes, QAT): optimizer, schedule, "
               "augmentation"})
    baseline: BaselineOptions = field(default_factory=BaselineOptions, metadata={"doc": "baseline measurement"})
    distill: DistillOptions = field(default_factory=DistillOptions, metadata={"doc": "knowledge distillation"})
    prune: PruneOptions = field(default_factory=PruneOptions, metadata={"doc": "pruning"})
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions, metadata={"doc": "quantization (PTQ first)"})
    qat: QATOptions = field(default_factory=QATOptions, metadata={
        "doc": "quantization-aware training, when quantize.qat asks for it"})
    convert: ConvertOptions = field(default_factory=ConvertOptions, metadata={
        "doc": "deployable files the quantize stage writes (.tflite, and .onnx for ONNX Runtime)"})
    benchmark: BenchmarkOptions = field(default_factory=BenchmarkOptions, metadata={"doc": "host benchmark"})

    def _check(self) -> None:
        if not 0 <= self.seed < 2**31:  # what numpy, TensorFlow and Python's random all accept
            raise OptionError("seed", f"must be a whole number from 0 to {2**31 - 1}, got {self.seed}")
        t = self.prune.teacher
        if self.prune.enabled and t not in (None, "baseline") and not os.path.exists(t):
            raise OptionError("prune.teacher", f"no model file {t} (baseline: the model the pipeline starts from)")


def _build(cls, raw: Any, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}{key if isinstance(key, str) and key.isprintable() and key.strip() == key else repr(key)}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else f" (valid: {', '.join(fields)})"
            raise UsageError(f"unknown config key {where}{hint}")
        tp = hints[key]
        kwargs[key] = _build(tp, value, where + ".") if dataclasses.is_dataclass(tp) else value
    try:
        return cls(**kwargs)
    except OptionError as e:
        raise UsageError(f"{prefix}{e.key}: {e.detail}") from None


def config_from_dict(raw: dict) -> RunConfig:
    cfg = _build(RunConfig, raw, "")
    if cfg.model.path is None and cfg.model.architecture is None:
        raise UsageError("the config needs model.path (a trained model) or model.architecture (train one first)")
    return cfg


def config_to_dict(cfg: Options) -> dict:
    return cfg.to_dict()


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UsageError(f"override {text!r} is not of the form section.key=value")
    key, value = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise UsageError(f"override {text!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``["prune.epochs=2", "quantize.qat=never"]`` applied to a raw config dict (a deep copy)."""
    out = copy.deepcopy(raw)  # (a JSON round trip would choke on YAML's dates and binaries)
    if overrides and not isinstance(out, dict):
        raise UsageError(f"config: expected a mapping of keys, got {out!r:.80}")
    for text in overrides:
        keys, value = _parse_override(text)
        node = out
        for k in keys[:-1]:
            if node.get(k) is None:  # absent, or an empty section (``prune:`` alone is null in YAML)
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise UsageError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    return out


def load_config(path: str, overrides: list[str] = ()) -> tuple[RunConfig, dict]:
    """The validated config and the raw dict it came from (overrides applied)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise KcompressError(f"{path}: cannot read the config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    raw = apply_overrides(raw, list(overrides))
    return config_from_dict(raw), raw


def config_hash(cfg) -> str:
    text = json.dumps(config_to_dict(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def defaults_yaml() -> str:
    """Every key with its default and doc, as a commented YAML file."""
    lines = ["# kcompress pipeline config: every key, its default and what it does."]

    def emit(cls, indent: str):
        defaults = cls().to_dict()
        for f in dataclasses.fields(cls):
            doc = f.metadata.get("doc", "")
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                lines.append(f"{indent}{f.name}:  # {doc}")
                emit(tp, indent + "  ")
                continue
            value = yaml.safe_dump(defaults[f.name], default_flow_style=True).strip()
            if value.endswith("\n..."):
                value = value[:-4].strip()
            value = value.replace("\n...", "")
            lines.append(f"{indent}{f.name}: {value}  # {doc}")

    emit(RunConfig, "")
    return "\n".join(lines) + "\n"
