"""A sweep's results: the trial records, the Pareto front, the ablation contributions, and the files that show them
(``sweep.json``, ``sweep.md``, ``accuracy_size.png``, ``accuracy_latency.png``), each written atomically.

Accuracy is VAL (the figure that chose, and that the front is computed on); TEST is shown beside it when the runs
have a TEST split. The front is the study's (Optuna's non-dominated COMPLETE trials on the chosen objectives); the
plots mark those trials, so a front over accuracy and latency also shows on the size plot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["TrialResult", "SweepResult", "contributions", "write_results", "RESULT_FILES"]

RESULT_FILES = ("sweep.json", "sweep.md", "accuracy_size.png", "accuracy_latency.png")
_FIGURES = ("accuracy", "test_accuracy", "size_bytes", "latency_ms")


@dataclass(frozen=True)
class TrialResult:
    """One trial: its values, status (``done``, ``failed`` with the reason, ``running`` when interrupted), the
    figures of its final model, and how many stages it shared with earlier trials."""

    number: int
    folder: str
    params: dict
    status: str
    reason: Optional[str] = None
    accuracy: Optional[float] = None
    test_accuracy: Optional[float] = None
    size_bytes: Optional[int] = None
    latency_ms: Optional[float] = None
    shared_stages: int = 0
    seconds: Optional[float] = None
    metrics: dict = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: dict, sweep_dir: str, params: dict, status: Optional[str] = None) -> "TrialResult":
        m = record.get("metrics") or {}
        return cls(number=record["number"], folder=os.path.join(sweep_dir, record["folder"]), params=dict(params),
                   status=status or record["status"], reason=record.get("reason"), accuracy=m.get("accuracy"),
                   test_accuracy=m.get("test_accuracy"), size_bytes=m.get("size_bytes"),
                   latency_ms=m.get("latency_ms"), shared_stages=record.get("shared_stages", 0),
                   seconds=record.get("seconds"), metrics=m)

    def value(self, objective: str) -> Optional[float]:
        return {"accuracy": self.accuracy, "size": self.size_bytes, "latency": self.latency_ms}[objective]

    def to_dict(self) -> dict:
        return {"number": self.number, "folder": os.path.basename(self.folder), "params": self.params,
                "status": self.status, "reason": self.reason, "val_accuracy": self.accuracy,
                "test_accuracy": self.test_accuracy, "size_bytes": self.size_bytes, "latency_ms": self.latency_ms,
                "latency_source": self.metrics.get("latency_source"), "shared_stages": self.shared_stages,
                "seconds": self.seconds, "final_stage": self.metrics.get("final_stage")}


@dataclass(frozen=True)
class SweepResult:
    """A sweep: every trial, the Pareto front on ``objectives``, the contribution table of an ablation space
    (None otherwise) and the files written (kind -> path)."""

    sweep_dir: str
    objectives: tuple
    trials: tuple
    front: tuple
    contributions: Optional[tuple] = None
    files: dict = field(default_factory=dict)

    @property
    def done(self) -> list:
        return [t for t in self.trials if t.status == "done"]

    @property
    def failed(self) -> list:
        return [t for t in self.trials if t.status == "failed"]

    def trial(self, number: int) -> TrialResult:
        return next(t for t in self.trials if t.number == number)

    def to_dict(self) -> dict:
        return {"sweep_dir": self.sweep_dir, "objectives": list(self.objectives),
                "accuracy_split": "val (chooses; test_accuracy is reported beside it)",
                "trials": [t.to_dict() for t in self.trials], "front": [t.number for t in self.front],
                "contributions": list(self.contributions) if self.contributions is not None else None,
                "shared_stages": sum(t.shared_stages for t in self.trials)}


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def contributions(trials, keys) -> tuple:
    """For each ``*.enabled`` switch: the mean figures of the finished trials with the stage and without it (the
    other switches averaged over), and their difference (with minus without)."""
    rows = []
    done = [t for t in trials if t.status == "done"]
    for key in keys:
        side = {}
        for label, flag in (("with", True), ("without", False)):
            group = [t for t in done if t.params.get(key) is flag]
            side[label] = {"trials": [t.number for t in group],
                           **{f: _mean(getattr(t, f) for t in group) for f in _FIGURES}}
        delta = {f: None if side["with"][f] is None or side["without"][f] is None else
                 side["with"][f] - side["without"][f] for f in _FIGURES}
        rows.append({"stage": key.rsplit(".", 1)[0], "switch": key, **side, "delta": delta})
    return tuple(rows)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _kb(v) -> str:
    return "-" if v is None else f"{v / 1e3:.1f} kB"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _markdown(result: SweepResult, keys: list[str], plots: list[str], header: dict) -> str:
    test = any(t.test_accuracy is not None for t in result.trials)
    lines = [f"# Sweep {header.get('name', '')}".rstrip(), "",
             f"{len(result.trials)} trials ({len(result.done)} done, {len(result.failed)} failed), sampler "
             f"{header.get('sampler')}, objectives {', '.join(result.objectives)}; "
             f"{sum(t.shared_stages for t in result.trials)} stages shared between trials.",
             "Accuracy is VAL (it chose the front)" + ("; TEST is reported beside it and chose nothing." if test else
                                                      "; there is no TEST split, so it is optimistic."
                                                      if result.done else "."), ""]

    def table(title: str, rows) -> None:
        head = ["trial", *keys, "status", "val accuracy", *(["test accuracy"] if test else []), "size", "p50",
                "shared stages"]
        lines.extend([f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)])
        for t in rows:
            cells = [os.path.basename(t.folder), *(_value(t.params.get(k)) for k in keys),
                     t.status if t.status != "failed" else f"failed: {(t.reason or '').splitlines()[0][:120]}",
                     _pct(t.accuracy), *([_pct(t.test_accuracy)] if test else []), _kb(t.size_bytes),
                     _ms(t.latency_ms), str(t.shared_stages)]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        lines.append("")

    table("Pareto front", sorted(result.front, key=lambda t: -(t.accuracy or 0)))
    lines += _slow_front(result)
    table("All trials", result.trials)
    if result.contributions:
        lines += ["## Contribution of each stage", "",
                  "Mean over the finished trials with the stage and without it (the other switches averaged over).",
                  "", "| stage | | trials | val accuracy | " + ("test accuracy | " if test else "") + "size | p50 |",
                  "|---|---|---|---|---|---|" + ("---|" if test else "")]
        for row in result.contributions:
            for label in ("with", "without"):
                s = row[label]
                cells = [row["stage"], label, ", ".join(map(str, s["trials"])), _pct(s["accuracy"]),
                         *([_pct(s["test_accuracy"])] if test else []), _kb(s["size_bytes"]), _ms(s["latency_ms"])]
                lines.append("| " + " | ".join(cells) + " |")
            d = row["delta"]
            cells = [row["stage"], "change", "", "-" if d["accuracy"] is None else f"{100 * d['accuracy']:+.2f} points",
                     *(["-" if d["test_accuracy"] is None else f"{100 * d['test_accuracy']:+.2f} points"] if test
                       else []), "-" if d["size_bytes"] is None else f"{d['size_bytes'] / 1e3:+.1f} kB",
                     "-" if d["latency_ms"] is None else f"{d['latency_ms']:+.3f} ms"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    return "\n".join(lines)


SLOW_FACTOR = 3.0  # a front trial this many times slower than the front's fastest is called out


def _slow_front(result: SweepResult) -> list[str]:
    """A warning line per front trial that latency was not an objective for and that runs ``SLOW_FACTOR`` times
    slower than the fastest on the front (e.g. int16x8, which LiteRT's XNNPACK does not accelerate)."""
    if "latency" in result.objectives:
        return []
    timed = [t for t in result.front if t.latency_ms]
    if len(timed) < 2:
        return []
    fastest = min(timed, key=lambda t: t.latency_ms)
    slow = [t for t in timed if t.latency_ms > SLOW_FACTOR * fastest.latency_ms]
    notes = [f"Note: {os.path.basename(t.folder)} is on the front, but its p50 is "
             f"{t.latency_ms / fastest.latency_ms:.1f}x {os.path.basename(fastest.folder)}'s; add latency to the "
             "objectives if speed matters." for t in slow]
    return notes + [""] if notes else []


def _plots(result: SweepResult, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kcompress.io import atomic_path

    done = result.done
    front = {t.number for t in result.front}
    written = []
    for name, attr, label, scale in (("accuracy_size.png", "size_bytes", "size of the final .tflite (kB)", 1e-3),
                                     ("accuracy_latency.png", "latency_ms", "p50 latency (ms, 1 thread, batch 1)", 1)):
        pts = [(getattr(t, attr) * scale, 100 * t.accuracy, t) for t in done
               if getattr(t, attr) is not None and t.accuracy is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c="tab:gray", label="trials", zorder=2)
        fp = sorted((p for p in pts if p[2].number in front), key=lambda p: p[0])
        if fp:
            ax.plot([p[0] for p in fp], [p[1] for p in fp], "o-", c="tab:red", zorder=3,
                    label=f"Pareto front ({', '.join(result.objectives)})")
        for x, y, t in pts:
            ax.annotate(str(t.number), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("VAL accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(os.path.join(out_dir, name), overwrite=True) as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def write_results(result: SweepResult, keys: list[str], header: dict, plots: bool = True) -> SweepResult:
    """Writes sweep.json and sweep.md (and the plots) into the sweep folder; returns the result with ``files``."""
    from kcompress.io import atomic_write_text, write_json

    out = result.sweep_dir
    names = _plots(result, out) if plots else [p for p in RESULT_FILES[2:] if os.path.exists(os.path.join(out, p))]
    files = {"json": os.path.join(out, "sweep.json"), "md": os.path.join(out, "sweep.md"),
             **{n: os.path.join(out, n) for n in names}}
    result = SweepResult(result.sweep_dir, result.objectives, result.trials, result.front, result.contributions, files)
    write_json(files["json"], {**header, **result.to_dict(), "plots": names}, overwrite=True)
    atomic_write_text(files["md"], _markdown(result, keys, names, header), overwrite=True)
    return result

