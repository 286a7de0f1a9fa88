"""Click commands for pipelines: run, report, compare, recommend, config."""

from __future__ import annotations

import os
from typing import Optional

import click

from kcompress.cli import handle_errors
from kcompress.cli.console import (
    console,
    mb,
    ms,
    pct,
    points,
    preprocess,
    preprocess_options,
    print_json,
    print_table,
    trust_model_option,
    wrote,
)
from kcompress.errors import UsageError
from kcompress.types import Target

__all__ = ["run", "report", "compare", "recommend", "config"]


@click.command()
@click.argument("config_path", metavar="CONFIG.yaml")
@click.argument("overrides", nargs=-1, metavar="[section.key=value ...]")
@click.option("-o", "--out", "run_dir", default=None, help="Run folder [default: runs/<config name>].")
@click.option("--resume", is_flag=True, help="Continue a run: finished stages with unchanged settings are skipped.")
@trust_model_option
@handle_errors
def run(config_path: str, overrides, run_dir: Optional[str], resume: bool) -> None:
    """Run a pipeline config: baseline -> distill -> prune -> quantize -> benchmark -> report.

    Every stage writes its own folder (model, metrics.json, config.yaml, log.txt) and is validated on the whole
    validation set; a stage that loses more than its max_drop stops the run, keeping all artifacts. The quantize
    stage tries post-training int8 first and runs QAT only when PTQ misses the floor. The final .tflite carries
    the config hash, the stages and the validated metrics as metadata (see `kcompress inspect`).

    \b
    Examples:
      kcompress run configs/quickstart.yaml -o runs/quick
      kcompress run configs/quickstart.yaml -o runs/quick prune.target_flops=0.5 --resume
    """
    import kcompress as kc
    from kcompress.pipeline.config import config_hash

    cfg, _ = kc.load_config(config_path, list(overrides))
    run_dir = run_dir or os.path.join("runs", cfg.name)
    con = console()
    con.print(f"Run {cfg.name} (config hash {config_hash(cfg)}) -> {run_dir}")
    result = kc.run_pipeline(cfg, run_dir, resume=resume, log=lambda m: con.print(m, markup=False, soft_wrap=True))
    _print_stages(con, [(r.stage, r.metrics) for r in result.stages if r.stage != "benchmark"])
    con.print(f"Final model: {result.final_model}")
    plots = ", ".join(os.path.basename(p) for p in result.report.values() if p.endswith(".png"))
    con.print(f"Report: {result.report['md']} (plots: {plots})")


def _print_stages(con, rows) -> None:
    """The stages table, leading with TEST when every stage was measured on one (VAL chose; TEST reports)."""
    split = "test" if rows and all("test" in m for _, m in rows) else "val"
    acc = (lambda m: m["test"]["accuracy"]) if split == "test" else (lambda m: m["accuracy"])
    base = acc(rows[0][1]) if rows else 0.0
    out = []
    for stage, m in rows:
        size = m.get("tflite_bytes") or m.get("tflite_fp32_bytes") or m.get("size_bytes")
        row = [stage + (f" ({m['method']})" if m.get("method") else ""), pct(acc(m)), f"{100 * (acc(m) - base):+.2f}"]
        row += [pct(m["accuracy"])] if split == "test" else []
        out.append(row + [mb(size), f"{m.get('params') or '-'}", ms(m.get("latency_p50_ms"))])
        o = m.get("onnx")
        if o and (split == "val" or "test" in o):  # convert.formats [tflite, onnx]: the ONNX file beside it
            row = [f"{stage} (onnx {o['mode']}, onnxruntime)", pct(acc(o)), f"{100 * (acc(o) - base):+.2f}"]
            row += [pct(o["accuracy"])] if split == "test" else []
            out.append(row + [mb(o["size_bytes"]), f"{m.get('params') or '-'}", ms(o.get("latency_p50_ms"))])
    head = [f"{split} accuracy", "Δ points"] + (["val accuracy"] if split == "test" else [])
    title = ("stages on TEST (chose nothing; VAL chose epochs, PTQ vs QAT, float layers)" if split == "test" else
             "stages on VAL (no test split: VAL also chose, so these figures are optimistic)")
    print_table(f"{title}; size and latency of the .tflite (or .onnx), Keras stages as fp32 .tflite",
                ["stage", *head, "size", "params", "p50 1 thread"], out, con)


@click.command()
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("-o", "--out", "out_dir", default=None, help="Report folder [default: the first RUN_DIR].")
@click.option("--overwrite", is_flag=True, help="Replace an existing report (report.json, report.md, plots).")
@handle_errors
def report(run_dirs, out_dir: Optional[str], overwrite: bool) -> None:
    """Report over one or more run folders: report.json, report.md and Pareto plots (PNG).

    Plots accuracy against size and against latency over every stage of every run, the per-class accuracy change
    from the baseline (most-hurt classes first) and confidence histograms. Device benchmark JSON files saved in a
    run folder as device*.json are listed next to the host numbers.

    \b
    Example:
      kcompress report runs/a runs/b -o reports/ab
    """
    import kcompress as kc

    paths = kc.report(list(run_dirs), out_dir, overwrite=overwrite)
    wrote(", ".join(paths.values()))


@click.command()
@click.argument("model_a")
@click.argument("model_b")
@click.option("--data", required=True, help="Labelled data both models are evaluated on.")
@click.option("--limit", type=int, default=None, help="Only a stratified random sample of N (seeded).")
@click.option("--fraction", type=float, default=1.0, show_default=True,
              help="Evaluate a random share F (0 < F <= 1) of the data, the same samples for A and B, as in a traffic "
                   "split (seeded).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --fraction draw.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@preprocess_options
@trust_model_option
@handle_errors
def compare(model_a: str, model_b: str, data: str, limit: Optional[int], fraction: float, seed: int, as_json: bool,
            **kw) -> None:
    """Two models, .tflite or .onnx files side by side: the A/B test before deployment.

    Accuracy, top-1 agreement, per-class differences (B minus A, most-hurt first), confidence shift, size and
    latency (1 thread, batch 1; .onnx files run in ONNX Runtime; Keras models are timed as their fp32 .tflite, or
    as their fp32 ONNX export when the other model is .onnx).

    \b
    Example:
      kcompress compare model.keras model_int8.tflite --data val/ --scale 0.00392
    """
    import kcompress as kc

    c = kc.compare(model_a, model_b, data, preprocess=preprocess(kw), limit=limit, fraction=fraction, seed=seed)
    if as_json:
        print_json(c.to_dict())
        return
    a, b, diff = c.a, c.b, c.diff
    con = console()
    rows = [["runtime", a["runtime"], b["runtime"], ""],
            ["accuracy", pct(a["accuracy"]), pct(b["accuracy"]), points(c.accuracy_delta)],
            ["size", mb(a["size_bytes"]), mb(b["size_bytes"]), f"{c.size_ratio:.2f}x"],
            ["p50 latency", ms(a["latency_p50_ms"]), ms(b["latency_p50_ms"]), f"{c.speedup.text()} speed-up"],
            ["mean confidence", f"{a['mean_confidence']:.3f}", f"{b['mean_confidence']:.3f}",
             f"{diff['mean_confidence_delta']:+.3f}"]]
    print_table(f"A/B on {c.data}: {c.num_samples} of {c.total_samples} samples"
                + (f" (fraction {c.fraction:g}, seed {c.seed})" if c.fraction != 1.0 else ""),
                ["", "A", "B", "B vs A"], rows, con)
    con.print(f"top-1 agreement: {pct(c.agreement)}")
    worst = list(diff["per_class_recall_delta"].items())[:5]
    con.print("per-class change (B - A), most hurt first: " + ", ".join(f"{k} {100 * v:+.1f}" for k, v in worst))


@click.command()
@click.argument("model")
@click.option("--target", type=click.Choice(Target.values()),
              required=True, help="Where the model will run.")
@click.option("--data", default="digits:train", show_default=True, help="Training data for the config.")
@click.option("--val-data", default="digits:val", show_default=True, help="Validation data for the config.")
@click.option("--max-size-mb", type=float, default=None, help="Size budget of the final file.")
@click.option("--max-latency-ms", type=float, default=None, help="Latency budget (estimated from this host).")
@click.option("--max-drop", type=float, default=2.0, show_default=True, help="Accuracy you can lose (points).")
@click.option("-o", "--out", required=True, help="The config to write (YAML).")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@preprocess_options
@trust_model_option
@handle_errors
def recommend(model: str, target: str, data: str, val_data: str, max_size_mb, max_latency_ms, max_drop: float,
              out: str, overwrite: bool, **kw) -> None:
    """Measure MODEL and write a pipeline config for a target and budgets, with the reason for each choice.

    \b
    Example:
      kcompress recommend model.keras --target mcu --max-size-mb 0.25 --max-drop 2 -o plan.yaml
      kcompress run plan.yaml
    """
    from kcompress.io import atomic_write_bytes, check_output_path
    from kcompress.pipeline.recommend import recommend as plan

    check_output_path(out, overwrite)
    pre = preprocess(kw).to_dict()
    text, facts = plan(model, target, data, val_data, max_size_mb, max_latency_ms, max_drop, pre)
    atomic_write_bytes(out, text.encode(), overwrite=overwrite)
    click.echo(text)
    wrote(out)


@click.command()
@click.option("--show-defaults", is_flag=True, help="Print every key with its default and what it does.")
@click.option("--validate", "validate_path", default=None, metavar="CONFIG.yaml", help="Check a config file.")
@handle_errors
def config(show_defaults: bool, validate_path: Optional[str]) -> None:
    """Pipeline config files: print the documented defaults, or validate a file.

    \b
    Examples:
      kcompress config --show-defaults > my.yaml
      kcompress config --validate configs/quickstart.yaml
    """
    from kcompress.pipeline.config import config_hash, defaults_yaml, load_config

    if show_defaults:
        click.echo(defaults_yaml(), nl=False)
    elif validate_path:
        cfg, _ = load_config(validate_path)
        click.echo(f"{validate_path}: valid (config hash {config_hash(cfg)})")
    else:
        raise UsageError("give --show-defaults or --validate CONFIG.yaml")
