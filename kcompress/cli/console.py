"""What every command shares: the console, the one table printer, number formats, "Wrote PATH", JSON output, and
click options built from the options classes (so a flag's default and help are the option's own).

Public within ``kcompress.cli``; imports neither TensorFlow nor rich at load.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import typing
from enum import Enum
from typing import Any, Iterable, Optional, Sequence

import click

from kcompress.errors import UsageError
from kcompress.options import DataOptions, OptionError, TrainOptions, doc

__all__ = [
    "console",
    "print_table",
    "print_json",
    "wrote",
    "mb",
    "ms",
    "pct",
    "points",
    "option",
    "flag_name",
    "build",
    "preprocess_options",
    "train_options",
    "train_settings",
    "test_options",
    "train_limit_option",
    "failed_name",
    "print_test",
    "preprocess",
    "int_list",
    "default_out",
    "trust_model_option",
]


def console():
    from rich.console import Console

    # tables must not wrap into unreadable columns in logs and pipes
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def print_table(title: Optional[str], headers: Sequence[str], rows: Iterable[Sequence[Any]], out=None) -> None:
    """The one table printer: first column left, the rest right-aligned."""
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[str(c) for c in r])
    (out or console()).print(t)


def print_json(obj: Any) -> None:
    """One JSON document on stdout (NaN as null, numpy as Python)."""
    from kcompress.bench.schema import json_clean

    click.echo(json.dumps(json_clean(obj), indent=2))


def wrote(path: str, what: str = "", err: bool = False) -> None:
    click.echo(f"Wrote {path}" + (f" ({what})" if what else ""), err=err)


def mb(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def points(delta: Optional[float]) -> str:
    """An accuracy change given as a fraction, in points."""
    return "-" if delta is None else f"{100 * delta:+.2f} pts"


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _field(cls, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _show(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) if value else None
    if isinstance(value, Enum):
        return value.value
    return str(value)


def option(cls, name: str, *decls: str, **kw):
    """A click option for field ``name`` of options class ``cls``: the field's default, doc and choices.

    Tuples are comma-separated text on the command line; the command passes the text on and the options class
    parses it. ``decls`` default to the field's flag (``--target-flops``).
    """
    f = _field(cls, name)
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    params: dict[str, Any] = {"help": doc(cls, name)[:1].upper() + doc(cls, name)[1:] + "."}
    if isinstance(tp, type) and issubclass(tp, Enum):
        params["type"] = click.Choice([m.value for m in tp])
    elif tp is int:
        params["type"] = int
    elif tp is float:
        params["type"] = str  # fractions such as 1/255 are parsed by the options class
    default = f.default if tp is int else _show(f.default)
    if tp is bool:
        params["is_flag"] = True
        params["default"] = f.default
    else:
        params["default"] = default
        params["show_default"] = default is not None
    params.update(kw)
    return click.option(*(decls or (flag_name(name),)), name, **params)


def build(cls, flags: Optional[dict[str, str]] = None, **values):
    """An options object from CLI values; a bad value is a usage error naming the flag (exit 2)."""
    values = {k: v for k, v in values.items() if v is not None}
    try:
        return cls(**values)
    except OptionError as e:
        raise UsageError(f"{(flags or {}).get(e.key, flag_name(e.key))}: {e.detail}") from None


def preprocess_options(fn):
    """--scale/--offset/--mean/--std (the data section's keys), applied identically to Keras evaluation,
    calibration and TFLite evaluation."""
    for name in reversed(("scale", "offset", "mean", "std")):
        fn = option(DataOptions, name)(fn)
    return fn


TRAIN_FLAGS = ("augment", "optimizer", "momentum", "weight_decay", "lr_schedule", "warmup_epochs", "strategy")


def train_options(fn):
    """--augment/--optimizer/--momentum/--weight-decay/--lr-schedule/--warmup-epochs/--strategy (the train
    section's keys), shared by every command that trains; :func:`train_settings` turns them into a TrainOptions."""
    for name in reversed(TRAIN_FLAGS):
        fn = option(TrainOptions, name)(fn)
    return fn


def train_settings(kw: dict) -> TrainOptions:
    """Pops the train section's values from a command's keyword arguments -> a TrainOptions (bad value: exit 2).

    Also sets up multi-worker training when TF_CONFIG asks for it (:func:`kcompress.distributed.distribute_early`):
    call it before the command loads any model."""
    from kcompress.distributed import distribute_early

    opts = build(TrainOptions, **{name: kw.pop(name) for name in TRAIN_FLAGS})
    distribute_early(opts.strategy)
    return opts


def train_limit_option(fn):
    """--train-limit N: train on a stratified seeded subset (the data section's train_limit)."""
    return click.option("--train-limit", type=int, default=None,
                        help="Train on a stratified random subset of this many samples of --data (seeded; for "
                             "quick runs; config: data.train_limit).")(fn)


def test_options(fn):
    """--test-data / --test-split: TEST, the split that chooses nothing and is only reported."""
    fn = click.option("--test-split", type=float, default=0.0, show_default=True,
                      help="Instead of --test-data: carve this fraction of --data out as TEST (stratified, seeded); "
                           "it is then not trained on.")(fn)
    return click.option("--test-data", default=None,
                        help="Test data (TEST): measured after the work is done, chooses nothing.")(fn)


def print_test(figures: Optional[dict], names: Sequence[str]) -> None:
    """One line with each model's TEST accuracy, when there was TEST."""
    if not figures:
        return
    parts = ", ".join(f"{n} {pct(figures[f'{n}_accuracy'])}" for n in names)
    click.echo(f"TEST ({figures['data']}, {figures['num_samples']} samples, chose nothing): {parts}")


def failed_name(out: str) -> str:
    """Where a result that missed its --max-drop is written: ``student.keras`` -> ``student.FAILED.keras``, so a
    file at OUT is always one that passed, and the failed one is kept for inspection."""
    base = out.rstrip("/")
    stem, ext = os.path.splitext(base)
    return f"{stem}.FAILED{ext}" if ext else f"{base}.FAILED"


def preprocess(kw: dict):
    """Pops the preprocessing values from a command's keyword arguments -> a Preprocess."""
    opts = build(DataOptions, scale=kw.pop("scale"), offset=kw.pop("offset"), mean=kw.pop("mean"),
                 std=kw.pop("std"))
    return opts.preprocess()


def int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated whole numbers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{what}: expected comma-separated numbers >= 1, got {text!r}")
    return values


def default_out(path: str, suffix: str) -> str:
    """``model.keras`` + ``_int8.tflite`` -> ``model_int8.tflite`` (next to the input)."""
    base = str(path).rstrip("/")
    for ext in (".keras", ".h5", ".tflite"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base + suffix


def trust_model_option(fn):
    """--trust-model: load model files with Lambda layers or unregistered custom classes, which run code when
    loaded; the whole command then runs inside :func:`kcompress.io.trusting_models`. Put it above
    ``@handle_errors``."""

    @functools.wraps(fn)
    def wrapper(*args, trust_model: bool = False, **kwargs):
        if not trust_model:
            return fn(*args, **kwargs)
        from kcompress.io import trusting_models

        with trusting_models(True):
            return fn(*args, **kwargs)

    return click.option("--trust-model", is_flag=True,
                        help="Load the model even if it has Lambda layers or unregistered custom classes, which run "
                             "their own code when loaded: only for files from a source you trust.")(wrapper)
