"""Parser for the text that LiteRT's ``benchmark_model`` (native binary or benchmark APK) prints.

``parse_benchmark_log(text)`` turns one run's output into a ``BenchmarkLog``; ``split_runs`` cuts a capture that holds
several runs (one per ``STARTING!`` line) into pieces; ``BenchmarkLog.to_result`` makes a ``BenchResult`` in the
``kcompress.bench/1`` schema. Accepted input, any mix of:

- plain lines, ``INFO: ``/``WARN: ``/``WARNING: ``/``ERROR: ``/``VERBOSE: `` prefixed lines, and logcat lines
  (``threadtime``, ``time``, ``brief`` and ``tag`` formats) from the benchmark APK;
- the warm-up and measured ``count=`` lines, with or without the newer ``p5=.. median=.. p95=..`` fields, and the
  ``count=N curr=X(all same)`` form; numbers such as ``2.95034e+06`` (C++ streams print 6 significant digits);
- ``Inference timings in us: Init: .., First inference: .., Warmup (avg): .., Inference (avg): ..``;
- memory as ``Memory footprint delta from the start of the tool (MB): init=.. overall=..`` (newer), ``Peak memory
  footprint (MB): init=.. overall=..`` (older) and ``Overall peak memory footprint (MB) via periodic monitoring: ..``;
- ``Replacing X out of Y node(s) with delegate (NAME) node, yielding P partitions`` (delegate coverage);
- ``--enable_op_profiling`` tables (the "Summary by node type" and "Top by Computation Time" tables of the regular
  runs).

Gotchas: benchmark_model reports microseconds, results are milliseconds. Fields the log does not contain stay
``None``/NaN (``null`` in JSON); nothing is guessed. A line with the word "failed" marks the run failed even when
timings follow, because benchmark_model keeps printing after some failures. Imports no TensorFlow.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from kcompress.bench.schema import BenchResult, LatencyStats

__all__ = ["RunStats", "BenchmarkLog", "parse_benchmark_log", "split_runs", "strip_log_prefix"]

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf"

# Logcat prefixes, most specific first. threadtime: "11-27 10:13:27.530  9157  9157 I tflite  : msg";
# time: "11-27 10:13:27.530 I/tflite  ( 9157): msg"; brief: "I/tflite  ( 9157): msg"; tag: "I/tflite: msg".
_LOGCAT_PREFIXES = [
    re.compile(r"^(?:\d{4}-)?\d{2}-\d{2}\s+\d{2}:\d{2}:\d{2}\.\d+\s+\d+\s+\d+\s+[VDIWEFA]\s+[^:]*?\s*:\s?"),
    re.compile(r"^(?:\d{4}-)?\d{2}-\d{2}\s+\d{2}:\d{2}:\d{2}\.\d+\s+[VDIWEFA]/[^(]*\(\s*\d+\):\s?"),
    re.compile(r"^[VDIWEFA]/[^(:]*\(\s*\d+\):\s?"),
    re.compile(r"^[VDIWEFA]/[A-Za-z0-9_.-]+\s*:\s?"),
]
_SEVERITY = re.compile(r"^(INFO|WARN|WARNING|ERROR|VERBOSE|DEBUG|FATAL):\s?")
_COUNT = re.compile(r"^count=(\d+)")
_PAIR = re.compile(rf"(\w+)=({_NUM})")
_TIMINGS = re.compile(
    rf"Inference timings in us: Init: ({_NUM}), First inference: ({_NUM}), "
    rf"Warmup \(avg\): ({_NUM}), Inference \(avg\): ({_NUM})"
)
_MEM_DELTA = re.compile(rf"(?:Memory footprint delta from the start of the tool|Peak memory footprint) \(MB\): "
                        rf"init=({_NUM}) overall=({_NUM})")
_MEM_PERIODIC = re.compile(rf"Overall peak memory footprint \(MB\) via periodic monitoring: ({_NUM})")
_REPLACING = re.compile(r"Replacing (\d+) out of (\d+) node\(s\) with delegate \(([^)]+)\) node"
                        r"(?:, yielding (\d+) partitions?)?")
_NOT_EXECUTED = re.compile(r"Though (\S+) delegate is explicitly applied, the model graph will not be executed")
_PARAM = re.compile(r"^([A-Za-z#][^:\[\]]*): \[(.*)\]$")
_MODEL_SIZE = re.compile(rf"The input model file size \(MB\): ({_NUM})")
_FAILED = re.compile(r"\bfail(?:ed|ure)\b", re.IGNORECASE)


def strip_log_prefix(line: str) -> tuple[str, str]:
    """Removes a logcat prefix and a severity prefix; returns ``(severity, message)``.

    The severity is ``INFO``/``WARN``/``ERROR``/... from benchmark_model's own prefix, or the logcat level letter
    (``I``, ``E``...) when only that is present, or ``""``. Leading tabs of table rows are kept.
    """
    line = line.rstrip("\r\n")
    severity = ""
    for pattern in _LOGCAT_PREFIXES:
        m = pattern.match(line)
        if m:
            severity = m.group(0).lstrip("0123456789-:. ")[:1]
            line = line[m.end():]
            break
    m = _SEVERITY.match(line)
    if m:
        severity = m.group(1)
        line = line[m.end():]
    return severity, line


def _ms(us: float) -> float:
    """Microseconds to milliseconds without float noise (the log has at most 6 significant digits)."""
    return round(us / 1000.0, 9)


@dataclass(frozen=True)
class RunStats:
    """One ``count=`` line of benchmark_model, in microseconds as printed (``None`` where not printed)."""

    count: int
    avg_us: float
    std_us: Optional[float] = None
    min_us: Optional[float] = None
    max_us: Optional[float] = None
    first_us: Optional[float] = None
    curr_us: Optional[float] = None
    p5_us: Optional[float] = None
    median_us: Optional[float] = None
    p95_us: Optional[float] = None
    all_same: bool = False

    @classmethod
    def from_line(cls, line: str) -> "RunStats":
        """Parses ``count=50 first=.. curr=.. min=.. max=.. avg=.. std=.. [p5=.. median=.. p95=..]`` or
        ``count=N curr=X(all same)`` (every run took the same time: min = max = avg = X, std = 0)."""
        pairs: dict[str, float] = {}
        for k, v in _PAIR.findall(line):
            pairs.setdefault(k, float(v))  # the first of a repeated key, as the count below
        m = _COUNT.match(line.strip())
        count = int(m.group(1)) if m else 0  # digits only: a later "count=nan" or "count=1e999" cannot replace it
        if "avg" not in pairs:  # all-same form: only count and curr are printed
            curr = pairs.get("curr", math.nan)
            return cls(count=count, avg_us=curr, std_us=0.0, min_us=curr, max_us=curr, first_us=curr, curr_us=curr,
                       p5_us=curr, median_us=curr, p95_us=curr, all_same=True)
        return cls(
            count=count,
            avg_us=pairs["avg"],
            std_us=pairs.get("std"),
            min_us=pairs.get("min"),
            max_us=pairs.get("max"),
            first_us=pairs.get("first"),
            curr_us=pairs.get("curr"),
            p5_us=pairs.get("p5"),
            median_us=pairs.get("median"),
            p95_us=pairs.get("p95"),
        )

    def latency_ms(self) -> LatencyStats:
        """As the schema's LatencyStats in milliseconds; percentiles the log lacks (p99 unless all runs took the
        same time) are NaN."""

        def ms(v: Optional[float]) -> float:
            return math.nan if v is None else _ms(v)

        return LatencyStats(count=self.count, mean=ms(self.avg_us), std=ms(self.std_us), min=ms(self.min_us),
                            max=ms(self.max_us), p50=ms(self.median_us), p95=ms(self.p95_us),
                            p99=ms(self.avg_us) if self.all_same else math.nan)


@dataclass(frozen=True)
class BenchmarkLog:
    """What one benchmark_model run printed. Times in microseconds as in the log, memory in MB."""

    warmup: Optional[RunStats] = None
    measured: Optional[RunStats] = None
    init_us: Optional[float] = None
    first_inference_us: Optional[float] = None
    warmup_avg_us: Optional[float] = None
    inference_avg_us: Optional[float] = None
    memory_mb: dict[str, float] = field(default_factory=dict)
    delegate_lines: tuple[dict[str, Any], ...] = ()
    op_profile: tuple[dict[str, Any], ...] = ()
    op_profile_top: tuple[dict[str, Any], ...] = ()
    params: dict[str, str] = field(default_factory=dict)
    model_size_mb: Optional[float] = None
    failures: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    logcat: bool = False  # the lines carried logcat prefixes (benchmark APK)

    @property
    def failed(self) -> bool:
        """True when a line reported a failure or no measured timing was printed."""
        return bool(self.failures) or (self.measured is None and self.inference_avg_us is None)

    def failure_reason(self) -> str:
        if self.failures:
            specific = [f for f in self.failures if f.startswith("Failed")]
            return (specific or list(self.failures))[0]
        if self.errors:
            return self.errors[0]
        return "no inference timings in the output"

    @property
    def threads(self) -> Optional[int]:
        for key in ("Num threads", "#threads used for CPU inference"):
            value = self.params.get(key, "")
            if re.fullmatch(r"[0-9]+", value) and int(value) > 0:  # ASCII digits only: "²".isdigit() is True
                return int(value)
        return None

    @property
    def graph(self) -> Optional[str]:
        return self.params.get("Graph") or None

    def delegate(self) -> str:
        """The delegate the run used, from the logged flags and delegate lines: gpu, nnapi, xnnpack or cpu."""
        flags = {k.lower(): v for k, v in self.params.items()}
        if flags.get("use gpu") in ("1", "true"):
            return "gpu"
        if flags.get("use nnapi") in ("1", "true"):
            return "nnapi"
        names = " ".join(d["delegate"] for d in self.delegate_lines).lower()
        if "gpu" in names:
            return "gpu"
        if "nnapi" in names:
            return "nnapi"
        if flags.get("use xnnpack") in ("1", "true") or "xnnpack" in names:
            return "xnnpack"
        return "cpu"

    def delegate_coverage(self, delegate: Optional[str] = None) -> Optional[dict[str, Any]]:
        """The ``Replacing X out of Y node(s)`` line of ``delegate`` (by name), else the last such line."""
        if not self.delegate_lines:
            return None
        if delegate:
            key = {"xnnpack": "xnnpack", "gpu": "gpu", "nnapi": "nnapi"}.get(delegate, delegate).lower()
            for line in reversed(self.delegate_lines):
                if key in line["delegate"].lower():
                    return dict(line)
        return dict(self.delegate_lines[-1])

    def to_result(
        self,
        model: Optional[str] = None,
        runtime: str = "benchmark_model",
        threads: Optional[int] = None,
        delegate: Optional[str] = None,
        batch_size: int = 1,
        model_bytes: Optional[int] = None,
        extra: Optional[dict[str, Any]] = None,
    ) -> BenchResult:
        """A schema result. Arguments left ``None`` are taken from the log (Graph, Num threads, delegate flags).

        ``batch_size`` is the model's own batch dimension: benchmark_model feeds the input shape stored in the
        file, so 1 unless the model was converted with a larger batch.
        """
        delegate = delegate or self.delegate()
        latency = self.measured.latency_ms() if self.measured else None
        mean_ms = latency.mean if latency else (_ms(self.inference_avg_us) if self.inference_avg_us else None)
        more: dict[str, Any] = {}
        if self.measured and self.measured.p5_us is not None:
            more["latency_p5_ms"] = _ms(self.measured.p5_us)
        if latency is None and mean_ms is not None:
            more["inference_avg_ms"] = mean_ms  # only the summary line was captured: no count/percentiles
        if self.model_size_mb is not None:
            more["model_file_size_mb"] = self.model_size_mb
        if self.op_profile_top:
            more["op_profile_top"] = [dict(r) for r in self.op_profile_top]
        if len(self.delegate_lines) > 1:
            more["delegate_lines"] = [dict(d) for d in self.delegate_lines]
        if self.errors:
            more["log_errors"] = list(self.errors)
        more.update(extra or {})
        warmup_mean = self.warmup_avg_us if self.warmup_avg_us is not None else (
            self.warmup.avg_us if self.warmup else None)
        first = self.first_inference_us if self.first_inference_us is not None else (
            self.warmup.first_us if self.warmup else None)
        return BenchResult(
            model=model or (os.path.basename(self.graph) if self.graph else "unknown"),
            runtime=runtime,
            threads=threads if threads is not None else self.threads,
            batch_size=batch_size,
            delegate=delegate,
            model_bytes=model_bytes,
            warmup_runs=self.warmup.count if self.warmup else None,
            latency_ms=latency,
            throughput_per_s=round(batch_size * 1000.0 / mean_ms, 6) if mean_ms else None,
            init_ms=None if self.init_us is None else _ms(self.init_us),
            first_inference_ms=None if first is None else _ms(first),
            warmup_mean_ms=None if warmup_mean is None else _ms(warmup_mean),
            memory_mb=dict(self.memory_mb),
            delegate_coverage=self.delegate_coverage(delegate),
            op_profile=[dict(r) for r in self.op_profile] or None,
            extra=more,
        )


def split_runs(text: str) -> list[str]:
    """Cuts a capture into one piece per benchmark_model run (each starts at a ``STARTING!`` line).

    Text before the first ``STARTING!`` joins the first run; a capture without ``STARTING!`` is one run.
    """
    pieces: list[list[str]] = [[]]
    started = False
    for line in text.splitlines():
        if strip_log_prefix(line)[1].strip() == "STARTING!":
            if started:
                pieces.append([])
            started = True
        pieces[-1].append(line)
    return ["\n".join(p) for p in pieces if any(s.strip() for s in p)]


def _column_key(name: str) -> str:
    name = name.strip().lower().replace("%", " pct").replace("#", "num")
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def _parse_table(lines: list[str], start: int) -> tuple[list[dict[str, Any]], int]:
    """Parses a profiling table whose ``[col] [col]`` header is at ``lines[start]``; returns rows and next index.

    Numeric columns are parsed from the right of each row, so names with spaces survive; a trailing ``[Name]``
    column (run-order tables) is the rest of the row after the numbers.
    """
    cols = [_column_key(c) for c in re.findall(r"\[([^\]]+)\]", lines[start])]
    has_name = cols and cols[-1] == "name"
    rows: list[dict[str, Any]] = []
    i = start + 1
    while i < len(lines):
        text = lines[i].strip()
        if not text or text.startswith("=") or text.startswith("Timings") or ":" in text.split()[0]:
            break
        tokens = text.split()
        try:
            if has_name:  # node type, numbers..., name (may hold spaces)
                n_num = len(cols) - 2
                values = [float(t.rstrip("%")) for t in tokens[1:1 + n_num]]
                row: dict[str, Any] = {cols[0]: tokens[0], **dict(zip(cols[1:-1], values))}
                row["name"] = " ".join(tokens[1 + n_num:])
            else:  # name (may hold spaces), numbers...
                n_num = len(cols) - 1
                values = [float(t.rstrip("%")) for t in tokens[-n_num:]]
                row = {cols[0]: " ".join(tokens[:-n_num]), **dict(zip(cols[1:], values))}
        except (ValueError, IndexError):
            break
        for key in ("count", "times_called"):
            if isinstance(row.get(key), float) and math.isfinite(row[key]):
                row[key] = int(row[key])
        rows.append(row)
        i += 1
    return rows, i


def _parse_op_profile(lines: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(summary by node type, top by computation time) of the regular runs' profiling section, if printed."""
    start = 0
    for i, line in enumerate(lines):
        if "Profiling Info for Regular Benchmark Runs" in line:
            start = i
    summary: list[dict[str, Any]] = []
    top: list[dict[str, Any]] = []
    section = ""
    i = start
    while i < len(lines):
        text = lines[i].strip()
        if text.startswith("====="):
            section = text.strip("= ").lower()
        elif text.startswith("[") and section:
            rows, i = _parse_table(lines, i)
            if section.startswith("summary by node type") and not summary:
                summary = rows
            elif section.startswith("top by computation time") and not top:
                top = rows
            section = ""
            continue
        i += 1
    return summary, top


def parse_benchmark_log(text: str) -> BenchmarkLog:
    """Parses the output of one benchmark_model run (use ``split_runs`` first when a capture holds several).

    The first ``count=`` line after a ``Running benchmark for at least`` line belongs to that phase (warm-up, then
    measured); without those lines the first of two ``count=`` lines is the warm-up and a lone one is the
    measured runs. ``Timings (microseconds): count=`` lines of profiling tables are not run lines.
    """
    messages: list[str] = []
    severities: list[str] = []
    logcat = False
    for raw in text.splitlines():
        logcat = logcat or any(p.match(raw) for p in _LOGCAT_PREFIXES)
        sev, msg = strip_log_prefix(raw)
        messages.append(msg)
        severities.append(sev)

    phases: list[Optional[RunStats]] = []
    loose: list[RunStats] = []
    waiting = False
    saw_running = False
    values: dict[str, Any] = {"memory_mb": {}, "params": {}}
    delegate_lines: list[dict[str, Any]] = []
    failures: list[str] = []
    errors: list[str] = []
    for sev, msg in zip(severities, messages):
        text_ = msg.strip()
        if not text_:
            continue
        if text_.startswith("Running benchmark for at least"):
            if waiting:
                phases.append(None)
            waiting, saw_running = True, True
            continue
        if _COUNT.match(text_):
            stats = RunStats.from_line(text_)
            if waiting:
                phases.append(stats)
                waiting = False
            else:
                loose.append(stats)
            continue
        m = _TIMINGS.search(text_)
        if m:
            values.update(init_us=float(m.group(1)), first_inference_us=float(m.group(2)),
                          warmup_avg_us=float(m.group(3)), inference_avg_us=float(m.group(4)))
            continue
        m = _MEM_DELTA.search(text_)
        if m:
            values["memory_mb"].update(init=float(m.group(1)), overall=float(m.group(2)))
            continue
        m = _MEM_PERIODIC.search(text_)
        if m:
            values["memory_mb"]["peak_periodic"] = float(m.group(1))
            continue
        m = _REPLACING.search(text_)
        if m:
            delegate_lines.append({"delegate": m.group(3), "replaced_nodes": int(m.group(1)),
                                   "total_nodes": int(m.group(2)),
                                   "partitions": int(m.group(4)) if m.group(4) else None})
            continue
        m = _NOT_EXECUTED.search(text_)
        if m:
            delegate_lines.append({"delegate": m.group(1), "replaced_nodes": 0, "total_nodes": None,
                                   "partitions": 0})
            continue
        m = _MODEL_SIZE.search(text_)
        if m:
            values["model_size_mb"] = float(m.group(1))
            continue
        m = _PARAM.match(text_)
        if m:
            values["params"].setdefault(m.group(1).strip(), m.group(2).strip())
            continue
        if _FAILED.search(text_):
            failures.append(text_)
        elif sev in ("ERROR", "E", "FATAL", "F"):
            errors.append(text_)

    if saw_running:
        warmup = phases[0] if len(phases) > 0 else None
        measured = phases[1] if len(phases) > 1 else None
    else:
        warmup = loose[0] if len(loose) >= 2 else None
        measured = loose[1] if len(loose) >= 2 else (loose[0] if loose else None)
    summary, top = _parse_op_profile(messages)
    return BenchmarkLog(
        warmup=warmup,
        measured=measured,
        delegate_lines=tuple(delegate_lines),
        op_profile=tuple(summary),
        op_profile_top=tuple(top[:20]),
        failures=tuple(failures),
        errors=tuple(errors),
        logcat=logcat,
        **values,
    )
