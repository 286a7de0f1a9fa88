"""Pipeline configuration: frozen dataclasses, YAML in and out, ``section.key=value`` overrides.

Every key has a default and a one-line doc (``field(metadata={"doc": ...})``), printed by
``kcompress config --show-defaults``. Unknown keys are errors that name the nearest valid key. The config hash
(:func:`config_hash`) identifies a run's settings in every artifact and in the final ``.tflite``'s metadata.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from kcompress.errors import KcompressError, UsageError

__all__ = [
    "DataConfig",
    "ModelConfig",
    "BaselineConfig",
    "DistillConfig",
    "PruneConfig",
    "QuantizeConfig",
    "BenchmarkConfig",
    "RunConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "config_hash",
    "defaults_yaml",
    "dump_yaml",
]


def _f(default, doc: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class DataConfig:
    train: str = _f("digits:train", "training data: image folder, .npz (x, y) or built-in name")
    val: str = _f("digits:val", "validation data; every stage is validated on all of it")
    train_limit: Optional[int] = _f(None, "train on a random subset of this many samples (quick experiments)")
    scale: float = _f(1.0, "inputs are multiplied by this (1/255 = 0.00392156862745098 for 0-255 pixels)")
    offset: float = _f(0.0, "then this is added")
    mean: tuple = _f((0.0,), "then subtracted (one value or one per channel)")
    std: tuple = _f((1.0,), "then divided by (one value or one per channel)")


@dataclass(frozen=True)
class ModelConfig:
    path: Optional[str] = _f(None, "the trained tf_keras model to compress (SavedModel, .h5 or .keras)")
    architecture: Optional[str] = _f(
        None, "instead of path: train this built-in model first (digits_cnn, resnet_cifar, mobilenetv2)"
    )
    epochs: int = _f(15, "training epochs when architecture is given")
    lr: float = _f(0.002, "learning rate when architecture is given")
    batch_size: int = _f(64, "batch size when architecture is given")


@dataclass(frozen=True)
class BaselineConfig:
    batch_sizes: tuple = _f((1, 8), "batch sizes timed for the Keras model and its fp32 .tflite")
    runs: int = _f(30, "timed runs per configuration")


@dataclass(frozen=True)
class DistillConfig:
    enabled: bool = _f(False, "train a smaller student from the model (the teacher)")
    student: Optional[str] = _f(None, "a student model file; when empty, derive one with student_width")
    student_width: float = _f(0.5, "width multiplier of every conv/dense layer for the derived student")
    temperature: float = _f(4.0, "softmax temperature T of the distillation loss")
    alpha: float = _f(0.5, "weight of the label cross-entropy; 1 - alpha weighs T^2 * KL(teacher || student)")
    temperature_schedule: str = _f("constant", "constant, or linear:HIGH:LOW / cosine:HIGH:LOW across epochs")
    epochs: int = _f(10, "student training epochs")
    batch_size: int = _f(64, "batch size")
    lr: float = _f(0.002, "learning rate")
    max_drop: float = _f(3.0, "largest accuracy drop (points) this stage may cause before the run stops")


@dataclass(frozen=True)
class PruneConfig:
    enabled: bool = _f(False, "prune the model")
    method: str = _f("structured", "structured (removes channels: faster) or magnitude (sparse weights: smaller gzip)")
    target_flops: Optional[float] = _f(0.3, "structured: fraction of FLOPs to remove")
    ratio: Optional[float] = _f(None, "structured: fraction of channels to remove (instead of target_flops)")
    criterion: str = _f("l1", "structured: channel importance l1, l2, bn or taylor")
    rounds: int = _f(1, "structured: remove the target in this many steps with fine-tuning between")
    sparsity: float = _f(0.5, "magnitude: final sparsity")
    block: Optional[str] = _f(None, "magnitude: m-by-n sparsity such as 2:4")
    epochs: int = _f(3, "fine-tuning epochs")
    batch_size: int = _f(64, "batch size")
    lr: float = _f(0.001, "fine-tuning learning rate")
    max_drop: float = _f(1.5, "largest accuracy drop (points) this stage may cause")


@dataclass(frozen=True)
class QuantizeConfig:
    enabled: bool = _f(True, "quantize and convert to .tflite")
    mode: str = _f("int8", "int8 (full integer), int16x8, float16 or dynamic")
    calibration_samples: int = _f(200, "representative samples drawn from the training data")
    per_channel: bool = _f(True, "per-channel weight scales (false: one per tensor)")
    io: str = _f("int8", "input/output type of int8 models: int8, uint8 or float")
    qat: str = _f("auto", "auto: QAT only when PTQ misses max_drop, keeping the better; never; always")
    qat_epochs: int = _f(2, "quantization-aware fine-tuning epochs")
    qat_lr: Optional[float] = _f(None, "QAT learning rate (default: a small fine-tuning rate)")
    max_drop: float = _f(1.0, "largest accuracy drop (points) quantization may cause")


@dataclass(frozen=True)
class BenchmarkConfig:
    threads: tuple = _f((1, 2), "interpreter thread counts to time")
    batch_sizes: tuple = _f((1,), "batch sizes to time")
    runs: int = _f(100, "timed runs per configuration")
    warmup: int = _f(10, "warm-up runs, not timed")


@dataclass(frozen=True)
class RunConfig:
    name: str = _f("run", "the run's name (used in reports and the .tflite metadata)")
    seed: int = _f(0, "random seed for training, shuffling and calibration")
    max_drop: float = _f(3.0, "largest overall accuracy drop (points) from the baseline to the final model")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "the model to compress"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "data and preprocessing"})
    baseline: BaselineConfig = field(default_factory=BaselineConfig, metadata={"doc": "baseline measurement"})
    distill: DistillConfig = field(default_factory=DistillConfig, metadata={"doc": "knowledge distillation"})
    prune: PruneConfig = field(default_factory=PruneConfig, metadata={"doc": "pruning"})
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig, metadata={"doc": "quantization"})
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig, metadata={"doc": "host benchmark"})


_CHOICES = {
    ("prune", "method"): ("structured", "magnitude"),
    ("prune", "criterion"): ("l1", "l2", "bn", "taylor"),
    ("quantize", "mode"): ("int8", "int16x8", "float16", "dynamic"),
    ("quantize", "io"): ("int8", "uint8", "float"),
    ("quantize", "qat"): ("auto", "never", "always"),
    ("model", "architecture"): (None, "digits_cnn", "resnet_cifar", "mobilenetv2"),
}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{where}: expected true or false, got {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where}: expected a whole number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(f"{where}: expected text, got {value!r}")
        return value
    return value


def _build(cls, raw: Any, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError(f"{prefix or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else f" (valid: {', '.join(fields)})"
            raise UsageError(f"unknown config key {where}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, where + ".")
        else:
            kwargs[key] = _coerce(value, tp, where)
            section = prefix.rstrip(".")
            choices = _CHOICES.get((section, key))
            if choices and kwargs[key] not in choices:
                raise UsageError(f"{where}: {kwargs[key]!r} is not one of {', '.join(str(c) for c in choices)}")
    return cls(**kwargs)


def config_from_dict(raw: dict) -> RunConfig:
    cfg = _build(RunConfig, raw, "")
    if cfg.model.path is None and cfg.model.architecture is None:
        raise UsageError("the config needs model.path (a trained model) or model.architecture (train one first)")
    return cfg


def config_to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UsageError(f"override {text!r} is not of the form section.key=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``["prune.epochs=2", "quantize.qat=never"]`` applied to a raw config dict (a deep copy)."""
    out = json.loads(json.dumps(raw))
    for text in overrides:
        keys, value = _parse_override(text)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
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
        obj = cls() if cls is not RunConfig else None
        for f in dataclasses.fields(cls):
            doc = f.metadata.get("doc", "")
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                lines.append(f"{indent}{f.name}:  # {doc}")
                emit(tp, indent + "  ")
                continue
            default = getattr(obj, f.name) if obj is not None else f.default
            value = yaml.safe_dump(list(default) if isinstance(default, tuple) else default,
                                   default_flow_style=True).strip()
            if value.endswith("\n..."):
                value = value[:-4].strip()
            value = value.replace("\n...", "")
            lines.append(f"{indent}{f.name}: {value}  # {doc}")

    emit(RunConfig, "")
    return "\n".join(lines) + "\n"
