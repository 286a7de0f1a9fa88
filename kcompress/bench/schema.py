"""The benchmark result format shared by host (``kcompress bench``) and device (``kcompress device bench``) runs.

One JSON document: ``{"schema": "kcompress.bench/1", "kcompress_version", "created", "target": {...},
"results": [BenchResult, ...]}``. ``target`` describes where it ran (``kind`` is ``host`` or ``android``); each
result is one model x threads x batch size x delegate combination. Fields a runner cannot measure are ``null``,
never guessed. This module imports no TensorFlow, so device tools and report readers stay light.
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

__all__ = [
    "SCHEMA",
    "LatencyStats",
    "BenchResult",
    "BenchReport",
    "latency_stats",
    "host_target",
    "load_report",
    "json_clean",
]

SCHEMA = "kcompress.bench/1"


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


@dataclass(frozen=True)
class BenchResult:
    """One measured configuration.

    ``throughput_per_s`` counts samples (batch_size / mean latency). ``memory_mb`` keys: ``peak_rss`` (host:
    peak resident set of the process while the model ran), ``rss_increase`` (peak minus the resident set before
    the model was loaded), ``init``/``overall`` (device: benchmark_model's footprint), ``peak_periodic`` (device:
    periodic monitoring). ``delegate_coverage``: ``{"delegate", "replaced_nodes", "total_nodes"}``.
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchResult":
        d = dict(d)
        if d.get("latency_ms") is not None:
            d["latency_ms"] = LatencyStats(**d["latency_ms"])
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
    def from_dict(cls, d: dict[str, Any]) -> "BenchReport":
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a kcompress benchmark result (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        return cls(
            target=d["target"],
            results=tuple(BenchResult.from_dict(r) for r in d["results"]),
            created=d.get("created", ""),
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
    with open(path, encoding="utf-8") as f:
        return BenchReport.from_dict(json.load(f))


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
