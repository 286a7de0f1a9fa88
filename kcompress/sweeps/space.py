"""SPACE.yaml: the config keys a sweep varies, with their values or ranges, checked against the config schema.

::

    distill.temperature: [2, 4, 8, 16]        # a list: these values (categorical; the grid sampler's axes)
    distill.alpha: {low: 0.3, high: 0.7}      # a range: floats (or whole numbers for an int key) in [low, high]
    distill.epochs: {low: 2, high: 8, step: 2}
    distill.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
    quantize.mode: [int8, int16x8]
    distill.enabled: [true, false]            # ablations: sweeps over the stages' enabled switches

Keys may also be nested (``distill: {temperature: [2, 4]}``). Every key must name a setting of the pipeline config
(not a section), and every listed value, and both ends of a range, must be valid for it in the base config: a bad
key or value is a :class:`~kcompress.errors.UsageError` naming it, raised before any trial starts. For a space of
lists only (or ranges with a step) every combination is checked too, as the grid will run them all.

A trial's config is the base config with the trial's values set (:func:`trial_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from kcompress.errors import KcompressError, UsageError

__all__ = ["Param", "Space", "load_space", "parse_space", "trial_raw", "trial_config"]

_RANGE_KEYS = {"low", "high", "step", "log"}
_GRID_LIMIT = 10_000


@dataclass(frozen=True)
class Param:
    """One swept key: ``values`` (a list), or a range ``low``..``high`` (``step``, ``log``) of ``kind`` int/float."""

    key: str
    values: Optional[tuple] = None
    low: Optional[float] = None
    high: Optional[float] = None
    step: Optional[float] = None
    log: bool = False
    kind: str = "categorical"  # categorical, int or float

    @property
    def grid_values(self) -> Optional[tuple]:
        """Every value the grid visits: the list, or a range with a step laid out; None for a continuous range."""
        if self.values is not None:
            return self.values
        if self.step is None:
            return None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        out = [self.low + i * self.step for i in range(n)]
        return tuple(int(round(v)) if self.kind == "int" else round(v, 12) for v in out)

    def distribution(self):
        """The Optuna distribution this parameter is sampled from."""
        import optuna

        if self.values is not None:
            return optuna.distributions.CategoricalDistribution(list(self.values))
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                        step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def to_dict(self) -> Any:
        if self.values is not None:
            return list(self.values)
        out = {"low": self.low, "high": self.high}
        out.update({"step": self.step} if self.step is not None else {})
        out.update({"log": True} if self.log else {})
        return out


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    @property
    def is_grid(self) -> bool:
        """Every key has a finite list of values (lists, or ranges with a step)."""
        return all(p.grid_values is not None for p in self.params)

    @property
    def grid(self) -> dict[str, list]:
        return {p.key: list(p.grid_values) for p in self.params}

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.grid_values) for p in self.params) if self.is_grid else 0

    @property
    def is_ablation(self) -> bool:
        """Only stages' ``enabled`` switches, each swept over true and false."""
        return all(p.key.endswith(".enabled") and p.values is not None and set(p.values) == {True, False}
                   for p in self.params)

    def distributions(self) -> dict:
        return {p.key: p.distribution() for p in self.params}

    def to_dict(self) -> dict:
        return {p.key: p.to_dict() for p in self.params}


def load_space(path: str, base_raw: dict) -> Space:
    """SPACE.yaml read and checked against ``base_raw`` (the base config as a dict)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise KcompressError(f"{path}: cannot read the space ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_space(raw, base_raw, where=path)


def parse_space(raw: Any, base_raw: dict, where: str = "space") -> Space:
    """A space from its dict form (as in SPACE.yaml), checked against ``base_raw``."""
    if not isinstance(raw, dict) or not raw:
        raise UsageError(f"{where}: expected a mapping of config keys to lists of values or ranges "
                         "(distill.temperature: [2, 4, 8])")
    flat: dict[str, Any] = {}
    _flatten(raw, "", flat)
    params = tuple(_param(key, value, base_raw, where) for key, value in flat.items())
    space = Space(params)
    if space.is_grid:
        size = space.grid_size
        if size > _GRID_LIMIT:
            raise UsageError(f"{where}: the grid has {size} combinations (more than {_GRID_LIMIT}); use ranges or fewer "
                             "values")
        for combo in itertools.product(*(p.grid_values for p in params)):
            values = dict(zip(space.keys, combo))
            _check_config(trial_raw(base_raw, values), where, ", ".join(f"{k}={v}" for k, v in values.items()))
    return space


def _flatten(node: dict, prefix: str, out: dict) -> None:
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not (set(value) & _RANGE_KEYS):
            _flatten(value, name + ".", out)
        else:
            out[name] = value


def _field_type(key: str, where: str):
    """The schema type of a dotted config key; UsageError naming the nearest key when it is not one."""
    from kcompress.pipeline.config import RunConfig

    cls, parts = RunConfig, key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            near = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean {'.'.join([*parts[:i], near[0]])}?)" if near else ""
            raise UsageError(f"{where}: unknown config key {key}{hint}")
        tp = hints[part]
        if dataclasses.is_dataclass(tp):
            if i == len(parts) - 1:
                first = dataclasses.fields(tp)[0].name
                raise UsageError(f"{where}: {key} is a config section; name one of its keys ({key}.{first}, ...)")
            cls = tp
            continue
        if i != len(parts) - 1:
            raise UsageError(f"{where}: unknown config key {key} ({'.'.join(parts[:i + 1])} is not a section)")
        if typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        return tp
    raise UsageError(f"{where}: empty config key")  # pragma: no cover


def _param(key: str, value: Any, base_raw: dict, where: str) -> Param:
    tp = _field_type(key, where)
    if isinstance(value, list):
        if not value:
            raise UsageError(f"{where}: {key}: the list of values is empty")
        for v in value:
            if isinstance(v, (list, dict)):
                raise UsageError(f"{where}: {key}: values must be single values (numbers, text, true/false), got {v!r}")
        if len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
            raise UsageError(f"{where}: {key}: a value is listed twice")
        for v in value:
            _check_config(trial_raw(base_raw, {key: v}), where, f"{key}={v}")
        return Param(key, values=tuple(value))
    if isinstance(value, dict):
        extra = sorted(set(value) - _RANGE_KEYS)
        if extra or not {"low", "high"} <= set(value):
            raise UsageError(f"{where}: {key}: a range is {{low: L, high: H}} with optional step and log"
                             + (f" (unknown: {', '.join(extra)})" if extra else ""))
        if tp not in (int, float):
            raise UsageError(f"{where}: {key}: a range needs a numeric key; list the values instead")
        low, high, step, log = value["low"], value["high"], value.get("step"), value.get("log", False)
        for name, v in (("low", low), ("high", high), ("step", step)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise UsageError(f"{where}: {key}: {name} must be a number, got {v!r}")
        if tp is int and any(v is not None and v != int(v) for v in (low, high, step)):
            raise UsageError(f"{where}: {key} takes whole numbers; low, high and step must be whole")
        if not low < high:
            raise UsageError(f"{where}: {key}: low ({low}) must be below high ({high})")
        if not isinstance(log, bool):
            raise UsageError(f"{where}: {key}: log must be true or false")
        if log and (step is not None or low <= 0):
            raise UsageError(f"{where}: {key}: a log range needs low > 0 and no step")
        if step is not None and not 0 < step <= high - low:
            raise UsageError(f"{where}: {key}: step must be > 0 and at most high - low")
        for v in (low, high):
            _check_config(trial_raw(base_raw, {key: v}), where, f"{key}={v}")
        kind = "int" if tp is int else "float"
        conv = int if kind == "int" else float
        return Param(key, low=conv(low), high=conv(high), step=None if step is None else conv(step), log=log, kind=kind)
    raise UsageError(f"{where}: {key}: expected a list of values or a range {{low: L, high: H}}, got {value!r}")


def trial_raw(base_raw: dict, values: dict) -> dict:
    """The base config (a dict) with ``values`` (dotted key -> value) set; a deep copy."""
    out = json.loads(json.dumps(base_raw))
    for key, value in values.items():
        node = out
        *sections, last = key.split(".")
        for s in sections:
            nxt = node.get(s)
            if not isinstance(nxt, dict):
                nxt = node[s] = {}
            node = nxt
        node[last] = value
    return out


def trial_config(base_raw: dict, values: dict):
    """The validated :class:`~kcompress.pipeline.config.RunConfig` of a trial."""
    from kcompress.pipeline.config import config_from_dict

    return config_from_dict(trial_raw(base_raw, values))


def _check_config(raw: dict, where: str, what: str) -> None:
    from kcompress.pipeline.config import config_from_dict

    try:
        config_from_dict(raw)
    except UsageError as e:
        raise UsageError(f"{where}: {what}: {e}") from None
