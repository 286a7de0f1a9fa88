"""One frozen options class per technique: at once the pipeline config section, the CLI's defaults and the API's
keyword arguments, so every setting has one default, documented once (``kcompress config --show-defaults``).

Values are checked when an options object is built, before any work: types (YAML ints become floats, strings become
enums), ranges (``0 < target_flops < 1``, ``temperature > 0``, ...) and mini-languages (``block: 2:4``,
``temperature_schedule: linear:8:2``). A bad value raises :class:`OptionError`, which names the key; the config
loader prefixes the section (``prune.target_flops``), the CLI names the flag (``--target-flops``).

Gotchas: ``PruneOptions.lr`` None means the method's own rate (magnitude 1e-4, structured 1e-3), and ``ratio``, when
set, replaces ``target_flops``. ``QuantizeOptions.io`` None means int8 I/O for ``mode: int8`` and float otherwise.
QAT takes its per-channel, I/O, float-layer and calibration settings from :class:`QuantizeOptions`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from kcompress.errors import UsageError
from kcompress.types import (
    Architecture,
    CacheTeacher,
    Criterion,
    IOType,
    PruneMethod,
    PruneSchedule,
    QATPolicy,
    QuantMode,
)

__all__ = [
    "OptionError",
    "Options",
    "DataOptions",
    "ModelOptions",
    "BaselineOptions",
    "DistillOptions",
    "PruneOptions",
    "QuantizeOptions",
    "QATOptions",
    "BenchmarkOptions",
    "doc",
    "parse_block",
    "parse_temperature_schedule",
    "parse_float_tuple",
]


class OptionError(UsageError):
    """A bad option value; ``key`` is the field's name, ``detail`` what is wrong with it."""

    def __init__(self, key: str, detail: str):
        self.key, self.detail = key, detail
        super().__init__(f"{key}: {detail}")


def _f(default, doc: str):
    return field(default=default, metadata={"doc": doc})


def doc(cls, name: str) -> str:
    """The one-line documentation of a field (what ``--help`` and ``config --show-defaults`` print)."""
    return next(f.metadata.get("doc", "") for f in dataclasses.fields(cls) if f.name == name)


def parse_float_tuple(value: Any) -> tuple[float, ...]:
    """``1/255``, ``0.5``, ``"123.7,116.3,103.5"`` or a list -> a tuple of floats (fractions allowed)."""

    def number(v) -> float:
        if isinstance(v, bool):
            raise ValueError(v)
        if isinstance(v, (int, float)):
            return float(v)
        num, _, den = str(v).strip().partition("/")
        return float(num) / float(den) if den else float(num)

    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        out = tuple(number(v) for v in items)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number, a fraction or comma-separated numbers, got {value!r}") from None
    if not out:
        raise ValueError("expected at least one number")
    return out


def parse_block(text: Optional[str]) -> Optional[tuple[int, int]]:
    """``"2:4"`` -> ``(2, 4)`` (M zeros in every N consecutive weights); None stays None."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[:x/]\s*(\d+)\s*", str(text))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"expected M:N with 0 < M < N such as 2:4, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def parse_temperature_schedule(spec: Optional[str], temperature: float = 4.0) -> tuple[str, float, float]:
    """``constant`` / ``constant:T`` / ``linear:HIGH:LOW`` / ``cosine:HIGH:LOW`` -> ``(kind, start, end)``."""
    if spec is None or str(spec).strip() in ("", "constant"):
        return "constant", temperature, temperature
    parts = str(spec).strip().split(":")
    kind = parts[0].lower()
    if kind == "constant" and len(parts) == 2:
        parts = [kind, parts[1], parts[1]]
    if kind not in ("constant", "linear", "cosine") or len(parts) != 3:
        raise ValueError(f"{spec!r}: expected constant, linear:HIGH:LOW or cosine:HIGH:LOW")
    try:
        start, end = float(parts[1]), float(parts[2])
    except ValueError:
        raise ValueError(f"{spec!r}: HIGH and LOW must be numbers") from None
    if start <= 0 or end <= 0:
        raise ValueError(f"{spec!r}: temperatures must be > 0")
    return kind, start, end


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if typing.get_origin(tp) is typing.Union:  # Optional[X]
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return value
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise OptionError(key, f"{value!r} is not one of {', '.join(m.value for m in tp)}") from None
    if typing.get_origin(tp) is tuple or tp is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str) and args and args[0] in (int, str):  # comma-separated, as on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if args and args[0] is int:
            try:
                items = tuple(int(v) if isinstance(v, str) else v for v in items)
            except ValueError:
                raise OptionError(key, f"expected comma-separated whole numbers, got {value!r}") from None
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items) or not items:
                raise OptionError(key, f"expected whole numbers >= 1, got {value!r}")
        if args and args[0] is float:
            try:
                items = parse_float_tuple(value)
            except ValueError as e:
                raise OptionError(key, str(e)) from None
        if args and args[0] is str:
            items = tuple(str(v) for v in items)
        return items
    if tp is bool:
        if not isinstance(value, bool):
            raise OptionError(key, f"expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return parse_float_tuple(value)[0]
            except ValueError as e:
                raise OptionError(key, str(e)) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise OptionError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(key, f"expected a whole number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise OptionError(key, f"expected text, got {value!r}")
        return value
    return value


@dataclass(frozen=True)
class Options:
    """Base of every options class: coerces each field to its declared type, then runs ``_check``."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _coerce(getattr(self, f.name), _hints(type(self))[f.name], f.name)
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        pass

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Options) else list(v) if isinstance(v, tuple) else (
                v.value if isinstance(v, Enum) else v)
        return out


def _positive(key: str, value, what: str = "> 0") -> None:
    if value is not None and not value > 0:
        raise OptionError(key, f"must be {what}, got {value}")


def _at_least(key: str, value, low) -> None:
    if value is not None and value < low:
        raise OptionError(key, f"must be at least {low}, got {value}")


@dataclass(frozen=True)
class DataOptions(Options):
    train: str = _f("digits:train", "training data: image folder, .npz (x, y) or built-in name")
    val: str = _f("digits:val", "validation data (VAL): chooses the best epoch, PTQ vs QAT, float layers; the gates "
                               "check it")
    test: Optional[str] = _f(None, "test data (TEST): reported only, chooses nothing; the final table leads with it")
    val_split: float = _f(0.0, "instead of val: carve this fraction of train out as VAL (stratified, seeded)")
    test_split: float = _f(0.0, "instead of test: carve this fraction of train out as TEST (stratified, seeded)")
    train_limit: Optional[int] = _f(None, "train on a stratified random subset of this many samples (quick runs)")
    scale: float = _f(1.0, "inputs are multiplied by this (a fraction such as 1/255 is fine)")
    offset: float = _f(0.0, "then this is added")
    mean: tuple[float, ...] = _f((0.0,), "then subtracted (one value, or one per channel: 123.7,116.3,103.5)")
    std: tuple[float, ...] = _f((1.0,), "then divided by (one value or one per channel)")

    def _check(self) -> None:
        _at_least("train_limit", self.train_limit, 1)
        for key in ("val_split", "test_split"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise OptionError(key, "must be a fraction in [0, 1)")
        if self.val_split + self.test_split >= 1.0:
            raise OptionError("val_split", "val_split + test_split must leave some training data")
        if self.test_split and self.test:
            raise OptionError("test_split", "give test or test_split, not both")
        if any(s == 0 for s in self.std):
            raise OptionError("std", "must not be 0")

    def preprocess(self):
        """The :class:`kcompress.data.Preprocess` these settings describe."""
        from kcompress.data import Preprocess

        return Preprocess(scale=self.scale, offset=self.offset, mean=self.mean, std=self.std)

    def open(self, seed: int = 0):
        """The opened and checked :class:`kcompress.data.Splits` these settings describe."""
        from kcompress.data import open_splits

        return open_splits(self.train, None if self.val_split else self.val, self.test, val_split=self.val_split,
                           test_split=self.test_split, seed=seed, preprocess=self.preprocess(),
                           train_limit=self.train_limit)


@dataclass(frozen=True)
class ModelOptions(Options):
    path: Optional[str] = _f(None, "the trained model to compress (SavedModel folder, .h5 or .keras; Keras 2 or 3)")
    architecture: Optional[Architecture] = _f(None, "instead of path: train this built-in model first "
                                                    "(digits_cnn, resnet_cifar, mobilenetv2)")
    epochs: int = _f(15, "training epochs when architecture is given")
    lr: float = _f(0.002, "learning rate when architecture is given")
    batch_size: int = _f(64, "batch size when architecture is given")

    def _check(self) -> None:
        _at_least("epochs", self.epochs, 1)
        _positive("lr", self.lr)
        _at_least("batch_size", self.batch_size, 1)


@dataclass(frozen=True)
class BaselineOptions(Options):
    batch_sizes: tuple[int, ...] = _f((1, 8), "batch sizes timed for the Keras model and its fp32 .tflite")
    threads: int = _f(1, "interpreter threads for the .tflite timings")
    runs: int = _f(30, "timed runs per configuration (after warm-up)")
    warmup: int = _f(5, "warm-up runs, not timed")

    def _check(self) -> None:
        _at_least("threads", self.threads, 1)
        _at_least("runs", self.runs, 1)
        _at_least("warmup", self.warmup, 0)


@dataclass(frozen=True)
class DistillOptions(Options):
    enabled: bool = _f(False, "pipeline: train a smaller student from the model (the teacher)")
    student: Optional[str] = _f(None, "a student model file (fresh or pre-trained); when empty, derive one from the "
                                      "teacher with student_width")
    student_width: float = _f(0.5, "width multiplier of every conv/dense layer of the derived student (0 < W < 1)")
    temperature: float = _f(4.0, "softmax temperature T of the distillation loss")
    alpha: float = _f(0.5, "weight of the label cross-entropy; 1 - alpha weighs T^2 * KL(teacher || student)")
    temperature_schedule: str = _f("constant", "constant, or linear:HIGH:LOW / cosine:HIGH:LOW across the epochs")
    epochs: int = _f(10, "student training epochs")
    batch_size: int = _f(64, "batch size")
    lr: float = _f(1e-3, "Adam learning rate")
    patience: Optional[int] = _f(None, "stop after this many epochs without a better VAL accuracy (empty: never)")
    cache_teacher: CacheTeacher = _f(CacheTeacher.AUTO, "where the teacher's outputs are cached: auto, memory, disk "
                                                        "or off (the teacher runs every step)")
    min_teacher_accuracy: Optional[float] = _f(None, "refuse a teacher below this VAL accuracy (0-1; empty: chance "
                                                     "+ 0.10)")
    max_drop: float = _f(3.0, "largest accuracy drop (points) of the student below the teacher on VAL; more is an "
                              "error (exit 1, the student is still written)")

    def _check(self) -> None:
        if not 0 < self.student_width < 1:
            raise OptionError("student_width", f"must be between 0 and 1 (exclusive), got {self.student_width}")
        _positive("temperature", self.temperature)
        if not 0.0 <= self.alpha <= 1.0:
            raise OptionError("alpha", f"must be between 0 and 1, got {self.alpha}")
        try:
            parse_temperature_schedule(self.temperature_schedule, self.temperature)
        except ValueError as e:
            raise OptionError("temperature_schedule", str(e)) from None
        _at_least("epochs", self.epochs, 1)
        _at_least("batch_size", self.batch_size, 1)
        _positive("lr", self.lr)
        _at_least("patience", self.patience, 1)
        if self.min_teacher_accuracy is not None and not 0 <= self.min_teacher_accuracy <= 1:
            raise OptionError("min_teacher_accuracy", f"must be between 0 and 1, got {self.min_teacher_accuracy}")


@dataclass(frozen=True)
class PruneOptions(Options):
    enabled: bool = _f(False, "pipeline: prune the model")
    method: PruneMethod = _f(PruneMethod.STRUCTURED, "structured (removes channels: faster) or magnitude (sparse "
                                                     "weights: smaller after gzip)")
    target_flops: float = _f(0.3, "structured: fraction of FLOPs to remove (0 < f < 1)")
    ratio: Optional[float] = _f(None, "structured: fraction of channels to remove in every group (replaces "
                                      "target_flops)")
    criterion: Criterion = _f(Criterion.L1, "structured: channel importance l1, l2, bn or taylor")
    rounds: Optional[int] = _f(None, "structured: remove the target in this many steps with fine-tuning between "
                                     "(empty: 10-20% of the FLOPs per step)")
    channel_multiple: int = _f(1, "structured: round kept channel counts up to a multiple of this (4 or 8 suit SIMD)")
    sparsity: float = _f(0.5, "magnitude: final sparsity (0 <= s < 1)")
    schedule: PruneSchedule = _f(PruneSchedule.POLYNOMIAL, "magnitude: polynomial (ramps up) or constant")
    initial_sparsity: float = _f(0.0, "magnitude: sparsity where the polynomial schedule starts")
    block: Optional[str] = _f(None, "magnitude: M:N block sparsity such as 2:4 (M zeros in every N weights)")
    skip: tuple[str, ...] = _f((), "magnitude: layers kept dense (names, regexes, first or last)")
    epochs: int = _f(4, "fine-tuning epochs in total")
    batch_size: int = _f(64, "batch size")
    lr: Optional[float] = _f(None, "fine-tuning learning rate (empty: magnitude 1e-4, structured 1e-3)")
    max_drop: float = _f(1.5, "largest accuracy drop (points) from the input model on VAL; more is an error (exit "
                              "1, the pruned model is still written)")

    def _check(self) -> None:
        if not 0 < self.target_flops < 1:
            raise OptionError("target_flops", f"must be between 0 and 1 (exclusive), got {self.target_flops}")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise OptionError("ratio", f"must be in [0, 1), got {self.ratio}")
        _at_least("rounds", self.rounds, 1)
        _at_least("channel_multiple", self.channel_multiple, 1)
        if not 0.0 <= self.sparsity < 1.0:
            raise OptionError("sparsity", f"must be in [0, 1), got {self.sparsity}")
        if not 0.0 <= self.initial_sparsity <= self.sparsity:
            raise OptionError("initial_sparsity", f"must be between 0 and sparsity ({self.sparsity})")
        try:
            parse_block(self.block)
        except ValueError as e:
            raise OptionError("block", str(e)) from None
        _at_least("epochs", self.epochs, 0 if self.method == PruneMethod.STRUCTURED else 1)
        _at_least("batch_size", self.batch_size, 1)
        _positive("lr", self.lr)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.method == PruneMethod.MAGNITUDE else 1e-3

    @property
    def block_shape(self) -> Optional[tuple[int, int]]:
        return parse_block(self.block)

    @property
    def target_sparsity(self) -> float:
        """The sparsity each magnitude-pruned layer ends with (M/N for block sparsity)."""
        b = self.block_shape
        return b[0] / b[1] if b else self.sparsity

    @property
    def amount(self) -> float:
        """The structured target in force: ``ratio`` when set, else ``target_flops``."""
        return self.ratio if self.ratio is not None else self.target_flops

    def num_rounds(self) -> int:
        """``rounds``, or enough rounds of at most 20% each (no more than the fine-tuning epochs)."""
        if self.rounds is not None:
            return self.rounds
        k = max(1, math.ceil(self.amount / 0.2 - 1e-9))
        return min(k, max(1, self.epochs))


@dataclass(frozen=True)
class QuantizeOptions(Options):
    enabled: bool = _f(True, "pipeline: quantize and convert to .tflite")
    mode: QuantMode = _f(QuantMode.INT8, "int8 (full integer), int16x8 (int16 activations), float16, dynamic (int8 "
                                         "weights, float activations) or fp32 (no quantization)")
    calibration_samples: int = _f(200, "representative samples for int8 calibration (stratified, seeded)")
    per_channel: bool = _f(True, "per-channel weight scales (false: one scale per tensor)")
    io: Optional[IOType] = _f(None, "input/output type of int8 models: int8, uint8 or float (empty: int8 for mode "
                                    "int8, float otherwise)")
    float_layers: tuple[str, ...] = _f((), "Keras layers kept in float: names, first, last (the first/last layer "
                                           "with weights), or auto (the fewest, most sensitive, within max_drop)")
    max_drop: float = _f(1.0, "largest accuracy drop (points) quantization may cause on VAL: the budget of "
                              "float_layers auto and of the QAT decision, and the pipeline's gate")
    qat: QATPolicy = _f(QATPolicy.AUTO, "pipeline: auto (QAT only when PTQ misses max_drop, keeping the better), "
                                        "never or always")

    def _check(self) -> None:
        _at_least("calibration_samples", self.calibration_samples, 1)
        if self.io in (IOType.INT8, IOType.UINT8) and self.mode != QuantMode.INT8:
            raise OptionError("io", f"{self.io} needs mode int8 (mode {self.mode} keeps float inputs)")
        if self.float_layers and self.mode != QuantMode.INT8:
            raise OptionError("float_layers", "applies to mode int8 only")
        if "auto" in self.float_layers and len(self.float_layers) > 1:
            raise OptionError("float_layers", "auto cannot be combined with layer names")

    @property
    def io_type(self) -> IOType:
        if self.io is not None:
            return self.io
        return IOType.INT8 if self.mode == QuantMode.INT8 else IOType.FLOAT

    @property
    def auto_float_layers(self) -> bool:
        return self.float_layers == ("auto",)


@dataclass(frozen=True)
class QATOptions(Options):
    epochs: int = _f(3, "quantization-aware fine-tuning epochs (0: calibrate only)")
    lr: float = _f(1e-4, "QAT learning rate (5-10x below the training rate)")
    batch_size: int = _f(64, "batch size")
    preserve_sparsity: Optional[bool] = _f(None, "keep a pruned model's zeros through QAT (empty: when at least 20% "
                                                 "of its kernel weights are zero)")
    max_tflite_drop: float = _f(1.0, "warn when the int8 .tflite is this many points below the Keras QAT model")

    def _check(self) -> None:
        _at_least("epochs", self.epochs, 0)
        _positive("lr", self.lr)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("max_tflite_drop", self.max_tflite_drop, 0)


@dataclass(frozen=True)
class BenchmarkOptions(Options):
    threads: tuple[int, ...] = _f((1, 2), "interpreter thread counts to time")
    batch_sizes: tuple[int, ...] = _f((1,), "batch sizes to time")
    runs: int = _f(100, "timed runs per configuration")
    warmup: int = _f(10, "warm-up runs, not timed")
    trials: int = _f(5, "repeated trials of RUNS timed runs each; the p50 is reported with its range over them")

    def _check(self) -> None:
        _at_least("runs", self.runs, 1)
        _at_least("warmup", self.warmup, 0)
        _at_least("trials", self.trials, 1)
