"""The benchmark result format shared by host (``kcompress bench``) and device (``kcompress device bench``) runs.

One JSON document: ``{"schema": "kcompress.bench/1", "kcompress_version", "created", "target": {...},
"results": [BenchResult, ...]}``. ``target`` describes where it ran (``kind`` is ``host`` or ``android``); each
result is one model x threads x batch size x delegate combination. Fields a runner cannot measure are ``null``,
never guessed. This module imports no TensorFlow, so device tools and report readers stay light.

Repeated trials (host runs): ``latency_ms`` pools every timed run of every trial; ``extra["trials"]`` holds each
trial's own statistics and ``extra["p50_interval_ms"]`` (``{"median", "low", "high", "trials"}``) the median of
the trials' p50s and their range. They live in ``extra`` so that every ``kcompress.bench/1`` reader, older
ones included, loads new documents; :attr:`BenchResult.trials` and :attr:`BenchResult.p50_interval` read them and
fall back to one trial (``latency_ms.p50``) for documents written before trials existed. Speed-ups between two
models are :class:`SpeedUp` intervals (:func:`speedup`), never a bare ratio of two single runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from kcompress import __version__
from kcompress.errors import KcompressError

__all__ = [
    "SCHEMA",
    "BenchFormatError",
    "LatencyStats",
    "Spread",
    "SpeedUp",
    "BenchResult",
    "BenchReport",
    "latency_stats",
    "speedup",
    "clearly_slower",
    "host_target",
    "load_report",
    "json_clean",
]

SCHEMA = "kcompress.bench/1"


class BenchFormatError(KcompressError, ValueError):
    """A document that is not a valid ``kcompress.bench/1`` result: names the file, the key and what is wrong.
    A ValueError too, for callers that caught the ValueError this used to be."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_CHECKS = {  # field -> (test, what it must be); None is allowed for every field but model, runtime, batch_size
    "model": (lambda v: isinstance(v, str), "text"),
    "runtime": (lambda v: isinstance(v, str), "text"),
    "threads": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "batch_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1"),
    "delegate": (lambda v: isinstance(v, str), "text"),
    "model_bytes": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "warmup_runs": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "latency_ms": (lambda v: isinstance(v, dict), "an object"),
    "throughput_per_s": (_is_number, "a number"),
    "init_ms": (_is_number, "a number"),
    "first_inference_ms": (_is_number, "a number"),
    "warmup_mean_ms": (_is_number, "a number"),
    "memory_mb": (lambda v: isinstance(v, dict), "an object"),
    "delegate_coverage": (lambda v: isinstance(v, dict), "an object"),
    "op_profile": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of objects"),
    "extra": (lambda v: isinstance(v, dict), "an object"),
}
_REQUIRED = ("model", "runtime", "batch_size")


def _bad(where: str, key: str, what: str, value: Any) -> BenchFormatError:
    text = json.dumps(value, default=str)
    return BenchFormatError(f"{where}: {key} must be {what}, got {text[:60]}{'...' if len(text) > 60 else ''}")


def _checked_result(d: Any, where: str) -> dict[str, Any]:
    """``d`` with its known fields type-checked (a clear :class:`BenchFormatError` naming the key otherwise)."""
    if not isinstance(d, dict):
        raise BenchFormatError(f"{where}: a result must be an object, got {type(d).__name__}")
    for key in _REQUIRED:
        if d.get(key) is None:
            raise BenchFormatError(f"{where}: the result has no {key}")
    for key, (ok, what) in _CHECKS.items():
        if d.get(key) is not None and not ok(d[key]):
            raise _bad(where, key, what, d[key])
    lat = d.get("latency_ms")
    if lat is not None:
        for k in _STATS:  # NaN statistics are written as null (strict JSON)
            if k not in lat:
                raise BenchFormatError(f"{where}: latency_ms has no {k}")
            if lat[k] is not None and not _is_number(lat[k]):
                raise _bad(where, f"latency_ms.{k}", "a number", lat[k])
    return d


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one inference (one batch) in milliseconds, warm-up excluded."""

    count: int
    mean: float
    std: float
    min: float
    max: float
    p50: float
    p95: float
    p99: float


_STATS = tuple(f.name for f in dataclasses.fields(LatencyStats))


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (numpy's default method)."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_stats(times_ms: list[float]) -> LatencyStats:
    """Summary statistics of per-run latencies in milliseconds."""
    values = sorted(float(t) for t in times_ms)
    n = len(values)
    mean = sum(values) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n) if n else math.nan
    return LatencyStats(
        count=n,
        mean=mean,
        std=std,
        min=values[0] if n else math.nan,
        max=values[-1] if n else math.nan,
        p50=_percentile(values, 50),
        p95=_percentile(values, 95),
        p99=_percentile(values, 99),
    )


def _median(values: list[float]) -> float:
    return _percentile(sorted(values), 50)


@dataclass(frozen=True)
class Spread:
    """One statistic over repeated trials: the median of the trials' values and their range ``low..high``."""

    median: float
    low: float
    high: float
    trials: int

    @classmethod
    def of(cls, values) -> "Spread":
        values = [float(v) for v in values]
        if not values:
            raise ValueError("a spread needs at least one value")
        return cls(median=_median(values), low=min(values), high=max(values), trials=len(values))

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def overlaps(self, other: "Spread") -> bool:
        return self.low <= other.high and other.low <= self.high

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SpeedUp:
    """How many times faster ``new`` ran than ``base``: ``median`` of the per-trial ratios base p50 / new p50 and
    their range ``low..high``. ``paired``: trial i of one model was timed next to trial i of the other (interleaved
    trials), so ratio i compares like with like; otherwise every trial of one is divided by every trial of the
    other. Above 1 the new model is faster."""

    median: float
    low: float
    high: float
    trials: int
    paired: bool

    def text(self) -> str:
        """``"1.85x (1.70-1.95x, 5 trials)"``: the ratio is never printed without its interval."""
        n = f"{self.trials} trial{'s' if self.trials != 1 else ''}"
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f}x, {n})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def speedup(base_p50s, new_p50s, paired: Optional[bool] = None) -> SpeedUp:
    """Speed-up of ``new`` over ``base`` from their trials' p50 latencies (see :class:`SpeedUp`). ``paired`` (default:
    equal counts) gives ratio i = base[i] / new[i], for trials timed interleaved; otherwise every pairwise ratio,
    for models timed at different times."""
    base, new = [float(v) for v in base_p50s], [float(v) for v in new_p50s]
    if not base or not new or min(base + new) <= 0:
        raise ValueError("speed-up needs at least one positive p50 per model")
    if paired is None:
        paired = len(base) == len(new)
    elif paired and len(base) != len(new):
        raise ValueError(f"paired trials need equal counts, got {len(base)} and {len(new)}")
    ratios = [b / n for b, n in zip(base, new)] if paired else [b / n for b in base for n in new]
    s = Spread.of(ratios)
    return SpeedUp(median=s.median, low=s.low, high=s.high, trials=min(len(base), len(new)), paired=paired)


def clearly_slower(base_p50s, new_p50s, margin: float = 1.0) -> bool:
    """``new`` is slower than ``base`` beyond the noise: its trial p50s all lie above ``base``'s (the two ranges
    do not overlap) and its median p50 is at least ``margin`` times ``base``'s."""
    base, new = Spread.of(base_p50s), Spread.of(new_p50s)
    return new.low > base.high and new.median >= base.median * margin


@dataclass(frozen=True)
class BenchResult:
    """One measured configuration.

    ``throughput_per_s`` counts samples (batch_size / mean latency). ``memory_mb`` keys: ``peak_rss`` (host:
    peak resident set of a child process that imports only the LiteRT interpreter and runs the model; for Keras
    models the whole TensorFlow process, see ``extra["memory_scope"]``), ``rss_increase`` (peak minus the resident
    set before the model was loaded: after the child's imports), ``baseline_rss`` (that resident set), ``arena``
    (the interpreter's tensor arena; null: ``ai_edge_litert`` does not expose it), ``init``/``overall`` (device:
    benchmark_model's footprint), ``peak_periodic`` (device: periodic monitoring). ``delegate`` is what ran the
    graph (host: read from the interpreter; ``cpu`` is the builtin kernels, no delegate). ``delegate_coverage``:
    ``{"delegate", "replaced_nodes", "total_nodes", "partitions"}``. Host ``extra`` keys: ``trials``,
    ``p50_interval_ms`` (module docstring), ``io`` (``{"input", "output"}`` dtypes of the timed model: an int8
    model with int8 I/O is timed without the float<->int8 conversion a float-I/O model includes).
    """

    model: str
    runtime: str  # "litert-python", "keras", "benchmark_model", "benchmark_apk"
    threads: Optional[int]
    batch_size: int
    delegate: str = "cpu"
    model_bytes: Optional[int] = None
    warmup_runs: Optional[int] = None
    latency_ms: Optional[LatencyStats] = None
    throughput_per_s: Optional[float] = None
    init_ms: Optional[float] = None
    first_inference_ms: Optional[float] = None
    warmup_mean_ms: Optional[float] = None
    memory_mb: dict[str, float] = field(default_factory=dict)
    delegate_coverage: Optional[dict[str, Any]] = None
    op_profile: Optional[list[dict[str, Any]]] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def trials(self) -> tuple[LatencyStats, ...]:
        """Each trial's statistics (host runs with repeated trials), else empty."""
        return tuple(LatencyStats(**t) for t in self.extra.get("trials") or ())

    @property
    def trial_p50s(self) -> tuple[float, ...]:
        """The trials' p50s; one value (the pooled p50) for results without trials, none without latency."""
        if self.trials:
            return tuple(t.p50 for t in self.trials)
        return (self.latency_ms.p50,) if self.latency_ms is not None else ()

    @property
    def p50_interval(self) -> Optional[Spread]:
        """Median of the trials' p50s and their range (one trial for results written without trials)."""
        p = self.extra.get("p50_interval_ms")
        if p:
            return Spread(**p)
        return Spread.of(self.trial_p50s) if self.trial_p50s else None

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "benchmark result") -> "BenchResult":
        """The result a dict describes. Keys this version does not know (a newer writer's) are kept in ``extra``;
        keys unknown inside ``latency_ms`` are ignored. A wrong type, or a missing ``model``/``runtime``/
        ``batch_size``/statistic, raises :class:`BenchFormatError` naming ``where`` and the key."""
        d = dict(_checked_result(d, where))
        if d.get("latency_ms") is not None:
            d["latency_ms"] = LatencyStats(**{k: d["latency_ms"][k] for k in _STATS})
        for key in ("memory_mb", "extra"):
            if d.get(key) is None:
                d.pop(key, None)  # null: the default (empty)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = {k: d.pop(k) for k in list(d) if k not in known}  # written by a newer kcompress: kept, not lost
        if unknown:
            d["extra"] = {**unknown, **(d.get("extra") or {})}
        return cls(**d)


@dataclass(frozen=True)
class BenchReport:
    """A set of results measured on one target."""

    target: dict[str, Any]
    results: tuple[BenchResult, ...]
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "kcompress_version": __version__,
            "created": self.created,
            "target": self.target,
            "results": [r.to_dict() for r in self.results],
        }

    def to_json(self) -> str:
        return json.dumps(json_clean(self.to_dict()), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "benchmark result") -> "BenchReport":
        """The report a parsed document describes; anything malformed raises :class:`BenchFormatError` (a
        ValueError) naming ``source`` and the key. Top-level keys it does not know are ignored."""
        if not isinstance(d, dict):
            raise BenchFormatError(f"{source}: not a kcompress benchmark result (a JSON {type(d).__name__}, not an "
                                   "object)")
        if d.get("schema") != SCHEMA:
            raise BenchFormatError(f"{source}: not a kcompress benchmark result (schema {d.get('schema')!r}, "
                                   f"expected {SCHEMA!r})")
        if not isinstance(d.get("target"), dict):
            raise _bad(source, "target", "an object", d.get("target"))
        if not isinstance(d.get("results"), list):
            raise _bad(source, "results", "a list", d.get("results"))
        created = d.get("created", "")
        return cls(
            target=d["target"],
            results=tuple(BenchResult.from_dict(r, f"{source}: results[{i}]") for i, r in enumerate(d["results"])),
            created=created if isinstance(created, str) else str(created),
        )


def json_clean(obj: Any) -> Any:
    """Makes ``obj`` strict JSON: NaN/inf become null, numpy scalars and arrays become Python values."""
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return json_clean(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def load_report(path: str) -> BenchReport:
    """A ``kcompress.bench/1`` JSON file; unreadable, not JSON or malformed: one :class:`BenchFormatError` line
    naming the file (and the key)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise BenchFormatError(f"{path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise BenchFormatError(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else e})") from None
    return BenchReport.from_dict(doc, path)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_target(**versions: str) -> dict[str, Any]:
    """Describes this machine (``kind: host``); ``versions`` adds package versions such as tensorflow=..."""
    return {
        "kind": "host",
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {"kcompress": __version__, **versions},
    }
