"""The machinery under :mod:`kcompress.options`: the :class:`Options` base (type coercion, checks, ``replace``,
``to_dict``), :class:`OptionError`, the field helper :func:`opt`, the value parsers of the small option languages
(``block: 2:4``, ``temperature_schedule: linear:8:2``, ``augment: [flip, crop:4]``) and the per-stage learning
rates. No TensorFlow.
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
from kcompress.types import Optimizer

__all__ = ["OptionError", "Options", "opt", "doc", "check_positive", "check_at_least", "stage_lr", "lr_doc",
           "STAGE_LR", "AUGMENTATIONS", "parse_float_tuple", "parse_block", "parse_temperature_schedule",
           "parse_augment", "DEFAULT_OPTIMIZER", "SGD_WEIGHT_DECAY"]


class OptionError(UsageError):
    """A bad option value; ``key`` is the field's name, ``detail`` what is wrong with it."""

    def __init__(self, key: str, detail: str):
        self.key, self.detail = key, detail
        super().__init__(f"{key}: {detail}")


def opt(default, doc: str):
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
    except (ValueError, ZeroDivisionError, OverflowError):
        raise ValueError(f"expected a number, a fraction or comma-separated numbers, got {value!r:.80}") from None
    if not out:
        raise ValueError("expected at least one number")
    if any(math.isnan(v) for v in out):
        raise ValueError(f"expected numbers, got nan in {value!r:.80}")
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


AUGMENTATIONS = {"flip": None, "crop": 4, "rotate": 10.0}  # each step and its default parameter


def parse_augment(spec: Any) -> tuple[tuple[str, Any], ...]:
    """``("flip", "crop:4")`` -> ``(("flip", None), ("crop", 4))``; ``none`` (or nothing) -> ``()``; ``auto`` ->
    ``(("auto", None),)`` (resolved against the data by :func:`kcompress.augment.resolve_augment`).

    Steps: ``flip`` (random horizontal mirror), ``crop:PAD`` (reflect-pad by PAD pixels, then a random crop back
    to the input size; PAD 4 when omitted), ``rotate:DEG`` (a random angle in [-DEG, DEG], 10 when omitted)."""
    items = [spec] if isinstance(spec, str) else list(spec or ())
    items = [p.strip().lower() for item in items for p in str(item).split(",") if p.strip()]
    if not items or items == ["none"]:
        return ()
    if "none" in items or "auto" in items:
        if len(items) > 1:
            raise ValueError(f"{','.join(items)}: none and auto cannot be combined with other steps")
        return (("auto", None),)
    steps: list[tuple[str, Any]] = []
    for item in items:
        name, _, arg = item.partition(":")
        if name not in AUGMENTATIONS:
            raise ValueError(f"{item!r} is not an augmentation (flip, crop:PAD, rotate:DEG, none or auto)")
        if any(name == s[0] for s in steps):
            raise ValueError(f"{name} is given twice")
        if name == "flip":
            if arg:
                raise ValueError(f"{item!r}: flip takes no parameter")
            steps.append((name, None))
            continue
        try:
            value = float(arg) if arg else AUGMENTATIONS[name]
        except ValueError:
            raise ValueError(f"{item!r}: the parameter after {name}: must be a number") from None
        if name == "crop":
            if value != int(value) or not 1 <= value <= 64:
                raise ValueError(f"{item!r}: crop needs a whole number of pixels from 1 to 64 (crop:4)")
            value = int(value)
        elif not 0 < value <= 180:
            raise ValueError(f"{item!r}: rotate needs degrees in (0, 180] (rotate:10)")
        steps.append((name, value))
    return tuple(steps)


# Each training stage's learning rate when its ``lr`` is empty, by ``train.optimizer``. adam/adamw: the rates the
# stages had before the train section. sgd (Nesterov, cosine): the best of those measured on digits with
# tools/bench_recipes.py, 3 seeds (train: digits_cnn best at 0.02, a small BN CNN at 0.1; distill 10 epochs: 0.01
# 98.4%, 0.02 99.0%, 0.05 98.5%, 0.1 97.2%; structured 50% FLOPs: 0.01 98.8%, 0.02 99.2%, 0.05 98.9%; magnitude 80%:
# 0.001 94.8%, 0.005 97.2%, 0.01 97.6%; QAT: 0.0005 and 0.001 98.9%, 0.005 98.2%): fine-tunes at 1/5 to 1/2 of
# the training rate, QAT 10-20x below the fine-tunes, as the usual recipe advises. Magnitude sgd was then raised to
# 0.02 by CIFAR-10 (ResNet-20 teacher 79.47% TEST, 80%, 6 epochs, tools/bench_recipe_prune.py): 0.01 lost 1.04 TEST
# points, 0.02 lost 0.15 and 0.55 (seeds 0, 1); digits had stopped at 0.01, its largest rate tried.
STAGE_LR = {
    "train": {"adam": 2e-3, "adamw": 2e-3, "sgd": 0.05},
    "distill": {"adam": 1e-3, "adamw": 1e-3, "sgd": 0.02},
    "structured": {"adam": 1e-3, "adamw": 1e-3, "sgd": 0.02},
    "magnitude": {"adam": 1e-4, "adamw": 1e-4, "sgd": 0.02},
    "qat": {"adam": 1e-4, "adamw": 1e-4, "sgd": 0.001},
}


DEFAULT_OPTIMIZER = Optimizer.ADAM  # TrainOptions.optimizer's default, named here for the stage rates

# sgd's L2 on the kernels when ``train.weight_decay`` is empty, as the gradient term ``wd * w`` (PyTorch's
# ``weight_decay``). A hand-written tf_keras recipe's ``kernel_regularizer=l2(5e-4)`` adds ``5e-4 * sum(w**2)`` to the
# loss, whose gradient is ``1e-3 * w``: that is this 1e-3. Measured (issue 13, CIFAR-10 ResNet-20-style teacher, 15
# epochs, seed 0, TRAIN 20k / VAL 5k / TEST 10k): 5e-4 gave 78.30% TEST (77.90% VAL), 1e-3 79.65% TEST (80.02% VAL),
# the hand-written recipe's 79.84%. Students distilled from scratch were best at 1e-3 too (tools/bench_recipe_distill.py).
SGD_WEIGHT_DECAY = 1e-3


def stage_lr(stage: str, lr: Optional[float], optimizer: Any = None) -> float:
    """``lr``, or ``stage``'s rate for ``optimizer`` (None: the train section's default optimizer)."""
    if lr is not None:
        return float(lr)
    return STAGE_LR[stage][str(optimizer if optimizer is not None else DEFAULT_OPTIMIZER)]


def lr_doc(what: str, stage: str) -> str:
    rates = STAGE_LR[stage]
    return f"{what} (empty: suits train.optimizer: adam/adamw {rates['adam']:g}, sgd {rates['sgd']:g})"


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
                value = parse_float_tuple(value)[0]
            except ValueError as e:
                raise OptionError(key, str(e)) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(key, f"expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an int beyond float's range
            raise OptionError(key, f"expected a number, got one too large ({str(value)[:12]}...)") from None
        if math.isnan(number):
            raise OptionError(key, "expected a number, got nan")
        return number
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


def check_positive(key: str, value, what: str = "> 0") -> None:
    if value is not None and not value > 0:
        raise OptionError(key, f"must be {what}, got {value}")


def check_at_least(key: str, value, low) -> None:
    if value is not None and value < low:
        raise OptionError(key, f"must be at least {low}, got {value}")
