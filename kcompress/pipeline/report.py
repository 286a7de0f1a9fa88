"""Reports over one or more run folders: report.json, report.md and PNG plots.

Plots: the Pareto frontier of accuracy against size and against latency over every stage of every run
(``pareto_size.png``, ``pareto_latency.png``), per-class recall change from the baseline, most-hurt classes first
(``per_class_delta.png``), and confidence histograms per stage (``confidence.png``). Agreement with the baseline's
top-1 predictions comes from the stages' saved validation outputs. Device benchmark files
(``kcompress device bench -o``) placed in a run folder as ``device*.json`` are listed next to the host numbers.
No TensorFlow needed.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from kcompress.atomic import atomic_path, atomic_write_bytes, check_output_path
from kcompress.bench.schema import json_clean, load_report
from kcompress.errors import KcompressError
from kcompress.evaluation import probabilities

__all__ = ["build_report", "write_report", "pareto_front", "read_run", "expand_sweeps", "STAGE_DIRS", "REPORT_FILES"]

# every file write_report may write into its folder
REPORT_FILES = ("report.json", "report.md", "pareto_size.png", "pareto_latency.png", "per_class_delta.png",
                "confidence.png")

STAGE_DIRS = {
    "train": "00-train",
    "baseline": "01-baseline",
    "distill": "02-distill",
    "prune": "03-prune",
    "quantize": "04-quantize",
    "benchmark": "05-benchmark",
}



def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when smaller x and larger y are better, sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def build_report(run_dirs: Sequence[str]) -> dict[str, Any]:
    runs = []
    for run_dir in run_dirs:
        stages = read_run(run_dir)
        base = next((s for s in stages if s["stage"] == "baseline"), stages[0])
        split = "test" if all("test" in s["metrics"] for s in stages if s["stage"] != "train") else "val"
        rows = []
        for s in stages:
            if s["stage"] in ("benchmark", "train"):  # train's model is the baseline's
                continue
            m = s["metrics"]
            figures, base_figures = _on(m, split), _on(base["metrics"], split)
            row = {
                "run": os.path.basename(os.path.normpath(run_dir)),
                "stage": s["stage"],
                "kind": m.get("kind"),
                "split": split,
                "num_samples": figures.get("num_samples"),
                "accuracy": figures["accuracy"],
                "accuracy_delta_points": 100 * (figures["accuracy"] - base_figures["accuracy"]),
                "val_accuracy": m["accuracy"],
                "test_accuracy": m.get("test", {}).get("accuracy"),
                "size_bytes": m.get("tflite_bytes") or m.get("tflite_fp32_bytes") or m["size_bytes"],
                "file_bytes": m["size_bytes"],
                "params": m.get("params"),
                "macs": m.get("macs"),
                "latency_p50_ms": m.get("latency_p50_ms"),
                "agreement_with_baseline": None,
                "mean_confidence": figures.get("mean_confidence"),
                "method": m.get("method"),
            }
            out, base_out = s["outputs"].get(split), base["outputs"].get(split)
            if out is not None and base_out is not None and len(out) == len(base_out):
                row["agreement_with_baseline"] = float((out.argmax(1) == base_out.argmax(1)).mean())
            per_class, base_pc = _per_class(figures), _per_class(base_figures)
            row["per_class_delta_points"] = dict(
                sorted(((k, 100 * (v - base_pc[k])) for k, v in per_class.items() if k in base_pc),
                       key=lambda kv: kv[1])
            )
            rows.append(row)
            if m.get("onnx"):  # convert.formats [tflite, onnx]: the ONNX file of the same stage, beside it
                rows.append(_onnx_row(row, m["onnx"], split, base_figures, s["outputs"].get("onnx_" + split),
                                      base_out))
        bench = next((s["metrics"].get("bench") for s in stages if s["stage"] == "benchmark"), None)
        devices = []
        for path in sorted(glob.glob(os.path.join(run_dir, "device*.json"))):
            rep = load_report(path)  # a malformed device*.json: one error naming the file and key, not skipped
            for r in rep.results:
                devices.append({"file": os.path.basename(path), "device": rep.target.get("model"),
                                "model": os.path.basename(r.model), "threads": r.threads, "delegate": r.delegate,
                                "p50_ms": r.latency_ms.p50 if r.latency_ms else None,
                                "mean_ms": r.latency_ms.mean if r.latency_ms else None})
        runs.append({"run_dir": run_dir, "split": split, "stages": rows, "host_benchmark": bench,
                     "device_benchmark": devices,
                     "_outputs": {s["stage"]: (s["outputs"][split], _on(s["metrics"], split).get("output_kind"))
                                  for s in stages if s["outputs"].get(split) is not None
                                  and s["stage"] not in ("train", "benchmark")}})
    all_rows = [r for run in runs for r in run["stages"]]
    for key, name in (("size_bytes", "pareto_size"), ("latency_p50_ms", "pareto_latency")):
        pts = [(r[key] if r[key] is not None else np.inf, r["accuracy"]) for r in all_rows]
        front = set(pareto_front(pts))
        for i, r in enumerate(all_rows):
            r[name] = i in front
    return {"runs": runs}


def _onnx_row(tflite_row: dict, onnx: dict, split: str, base_figures: dict, out, base_out) -> dict:
    """The report row of a quantize stage's ONNX file (see :mod:`kcompress.pipeline.formats`)."""
    figures = _on(onnx, split) if split == "val" or "test" in onnx else {}
    row = {**tflite_row, "kind": "onnx", "method": f"onnx {onnx['mode']}", "num_samples": figures.get("num_samples"),
           "accuracy": figures.get("accuracy", float("nan")), "val_accuracy": onnx["accuracy"],
           "test_accuracy": onnx.get("test", {}).get("accuracy"), "size_bytes": onnx["size_bytes"],
           "file_bytes": onnx["size_bytes"], "latency_p50_ms": onnx.get("latency_p50_ms"),
           "agreement_with_baseline": None, "mean_confidence": figures.get("mean_confidence")}
    row["accuracy_delta_points"] = 100 * (row["accuracy"] - base_figures["accuracy"])
    if out is not None and base_out is not None and len(out) == len(base_out):
        row["agreement_with_baseline"] = float((out.argmax(1) == base_out.argmax(1)).mean())
    pc, base_pc = _per_class(figures), _per_class(base_figures)
    row["per_class_delta_points"] = dict(sorted(((k, 100 * (v - base_pc[k])) for k, v in pc.items() if k in base_pc),
                                                key=lambda kv: kv[1]))
    return row


def _on(metrics: dict, split: str) -> dict:
    """A stage's figures on ``split``: the top-level ones are VAL's, ``test`` holds TEST's."""
    return metrics["test"] if split == "test" else metrics


def _per_class(figures: dict) -> dict:
    return figures.get("per_class_recall", figures.get("per_class_accuracy", {}))  # the older name


SPLIT_NOTE = {"test": "TEST: data that chose nothing", "val": "VAL: the data that chose the best epochs, PTQ vs QAT "
              "and float layers (no test split given, so these figures are optimistic)"}


def _plots(report: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = [r for run in report["runs"] for r in run["stages"]]
    for key, xlabel, fname in (("size_bytes", "size (kB, .tflite)", "pareto_size.png"),
                               ("latency_p50_ms", "p50 latency (ms, 1 thread, batch 1)", "pareto_latency.png")):
        pts = [(r[key], r["accuracy"]) for r in rows if r[key] is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        scale = 1e3 if key == "size_bytes" else 1.0
        for r in rows:
            if r[key] is None:
                continue
            ax.scatter(r[key] / scale, 100 * r["accuracy"], s=40)
            ax.annotate(f"{r['run']}:{r['stage']}" if len(report["runs"]) > 1 else r["stage"],
                        (r[key] / scale, 100 * r["accuracy"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        front = [pts[i] for i in pareto_front(pts)]
        ax.plot([p[0] / scale for p in front], [100 * p[1] for p in front], "--", color="gray", label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{report['runs'][0]['split']} accuracy (%)")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        _savefig(fig, os.path.join(out_dir, fname))
        written.append(fname)
    last = report["runs"][0]["stages"][-1]
    if last["per_class_delta_points"]:
        items = list(last["per_class_delta_points"].items())
        fig, ax = plt.subplots(figsize=(6.5, 0.3 * len(items) + 1.2))
        ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1],
                color=["#c44" if v < 0 else "#4a4" for _, v in items][::-1])
        ax.set_xlabel(f"recall change from baseline (points, {last['split']}), stage {last['stage']}")
        ax.axvline(0, color="black", lw=0.8)
        fig.tight_layout()
        _savefig(fig, os.path.join(out_dir, "per_class_delta.png"))
        written.append("per_class_delta.png")
    outputs = report["runs"][0]["_outputs"]
    if outputs:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for stage, (out, kind) in outputs.items():  # kind: read from the graph (None in older runs: guessed)
            ax.hist(probabilities(out, kind).max(axis=1), bins=20, range=(0, 1), histtype="step", label=stage, lw=1.5)
        ax.set_xlabel("top-1 confidence")
        ax.set_ylabel(f"{report['runs'][0]['split']} samples")
        ax.legend(loc="upper left")
        fig.tight_layout()
        _savefig(fig, os.path.join(out_dir, "confidence.png"))
        written.append("confidence.png")
    return written


def _savefig(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, overwrite=True) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def _markdown(report: dict, plots: list[str]) -> str:
    lines = ["# kcompress report", ""]
    for run in report["runs"]:
        split = run["split"]
        n = run["stages"][0]["num_samples"] if run["stages"] else None
        other = " | val accuracy" if split == "test" else ""
        lines += [f"## {run['run_dir']}", "", f"Accuracy, Δ and agreement on {SPLIT_NOTE[split]}"
                  + (f" ({n} samples)." if n else "."), "",
                  f"| stage | {split} accuracy | Δ points{other} | agreement | size | params | MACs | p50 latency | "
                  "Pareto |", "|---|---|---|---|---|---|---|---|---|" + ("---|" if other else "")]
        for r in run["stages"]:
            val = f" {100 * r['val_accuracy']:.2f}% |" if other else ""
            agree = "-" if r["agreement_with_baseline"] is None else f"{100 * r['agreement_with_baseline']:.1f}%"
            lat = "-" if r["latency_p50_ms"] is None else f"{r['latency_p50_ms']:.3f} ms"
            pareto = "size" * r["pareto_size"] + (" + " if r["pareto_size"] and r["pareto_latency"] else "") + \
                "latency" * r["pareto_latency"]
            lines.append(
                f"| {r['stage']}{' (' + r['method'] + ')' if r.get('method') else ''} | {100 * r['accuracy']:.2f}% | "
                f"{r['accuracy_delta_points']:+.2f} |{val} {agree} | {r['size_bytes'] / 1e3:.1f} kB | "
                f"{r['params'] if r['params'] is not None else '-'} | {r['macs'] if r['macs'] is not None else '-'} | "
                f"{lat} | {pareto or '-'} |"
            )
        last = [r for r in run["stages"] if r["kind"] != "onnx"][-1]
        hurt = list(last["per_class_delta_points"].items())[:5]
        if hurt:
            lines += ["", f"Most-hurt classes at the last stage ({last['stage']}, recall change on {split}): "
                      + ", ".join(f"{k} {v:+.1f}" for k, v in hurt)]
        if run["host_benchmark"]:
            lines += ["", "Host benchmark of the final model (memory: a clean child process's peak RSS increase "
                      "while loading and running the model; load and first inference: cold start, outside the "
                      "warm percentiles):", "",
                      "| file | runtime | threads | batch | p50 (range over trials) | p95 | throughput | delegate | "
                      "inference memory | load | first inference |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for b in run["host_benchmark"]:
                spread = (f" ({b['p50_interval_ms'][0]:.3f}-{b['p50_interval_ms'][1]:.3f}, {b['trials']} trials)"
                          if b.get("p50_interval_ms") else "")
                mem = f"+{b['rss_increase_mb']:.1f} MB" if b.get("rss_increase_mb") is not None else "-"
                cold = " | ".join("-" if b.get(k) is None else f"{b[k]:.1f} ms" for k in ("init_ms", "first_inference_ms"))
                lines.append(f"| {b.get('model', 'model.tflite')} | {b.get('runtime', 'litert-python')} | "
                             f"{b['threads']} | {b['batch_size']} | {b['p50_ms']:.3f} ms{spread} | "
                             f"{b['p95_ms']:.3f} ms | {b['throughput_per_s']:.0f}/s | {b.get('delegate') or '-'} | "
                             f"{mem} | {cold} |")
        if run["device_benchmark"]:
            lines += ["", "Device benchmarks:", "", "| device | model | threads | delegate | p50 |", "|---|---|---|---|---|"]
            for d in run["device_benchmark"]:
                p50 = "-" if d["p50_ms"] is None else f"{d['p50_ms']:.3f} ms"
                lines.append(f"| {d['device']} | {d['model']} | {d['threads']} | {d['delegate']} | {p50} |")
        lines.append("")
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(run_dirs: Sequence[str], out_dir: Optional[str] = None, overwrite: bool = True) -> dict[str, str]:
    """Writes report.json, report.md and the plots into ``out_dir`` (default: the first run folder), each file
    atomically. Without ``overwrite`` an existing report file (any of :data:`REPORT_FILES`) is an error raised
    before anything is written."""
    if not run_dirs:
        raise KcompressError("give at least one run folder")
    out_dir = out_dir or run_dirs[0]
    report = build_report(expand_sweeps(run_dirs))
    if os.path.isdir(out_dir):
        for name in REPORT_FILES:
            check_output_path(os.path.join(out_dir, name), overwrite)
    os.makedirs(out_dir, exist_ok=True)
    plots = _plots(report, out_dir)
    clean = {"runs": [{k: v for k, v in run.items() if k != "_outputs"} for run in report["runs"]], "plots": plots}
    paths = {"json": os.path.join(out_dir, "report.json"), "md": os.path.join(out_dir, "report.md")}
    for key, text in (("json", json.dumps(json_clean(clean), indent=2)), ("md", _markdown(report, plots))):
        atomic_write_bytes(paths[key], text.encode("utf-8"), overwrite=overwrite)
    return {**paths, **{p: os.path.join(out_dir, p) for p in plots}}


def expand_sweeps(run_dirs: Sequence[str]) -> list[str]:
    """Run folders, with a sweep folder (``kcompress sweep``'s, holding ``sweep.json``) replaced by its trial folders
    that finished at least one stage (a failed trial's finished stages are reported too)."""
    out = []
    for d in run_dirs:
        if not os.path.isfile(os.path.join(d, "sweep.json")):
            out.append(d)
            continue
        trials = sorted(os.path.join(d, t) for t in os.listdir(d) if os.path.isdir(os.path.join(d, t)) and
                        os.path.isfile(os.path.join(d, t, "run.json")))
        finished = [t for t in trials if _has_finished_stage(t)]
        if not finished:
            raise KcompressError(f"{d}: a sweep folder without a finished trial stage yet")
        out.extend(finished)
    return out


def _has_finished_stage(run_dir: str) -> bool:
    try:
        return bool(read_run(run_dir))
    except KcompressError:
        return False


def read_run(run_dir: str) -> list[dict]:
    """The finished stages of a run folder, in order: ``[{"stage", "dir", "metrics", "outputs"}]`` where ``outputs``
    maps a split ("val", "test") to that split's saved model outputs.

    Only the stages of the run's latest config count (``run.json``): the folder of a stage a later config disabled
    stays on disk but is not reported."""
    out = []
    if not os.path.isdir(run_dir):
        raise KcompressError(f"{run_dir}: no such run folder")
    planned = None
    try:
        with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as f:
            planned = set(json.load(f)["stages"])
    except (OSError, ValueError, KeyError):
        pass  # a run written before run.json: every finished stage
    for stage, name in STAGE_DIRS.items():
        sdir = os.path.join(run_dir, name)
        mpath = os.path.join(sdir, "metrics.json")
        if planned is not None and stage not in planned:
            continue
        if not os.path.exists(os.path.join(sdir, "stage.json")) or not os.path.exists(mpath):
            continue
        with open(mpath, encoding="utf-8") as f:
            metrics = json.load(f)
        entry = {"stage": stage, "dir": sdir, "metrics": metrics, "outputs": {}}
        opath = os.path.join(sdir, "outputs.npz")
        if os.path.exists(opath):
            with np.load(opath) as z:
                entry["outputs"] = {"val": z["outputs"], **({"test": z["test_outputs"]} if "test_outputs" in z else {})}
                for key, name in (("onnx_outputs", "onnx_val"), ("onnx_test_outputs", "onnx_test")):
                    if key in z:
                        entry["outputs"][name] = z[key]
        out.append(entry)
    if not out:
        raise KcompressError(f"{run_dir}: no finished stages (not a kcompress run folder?)")
    return out
