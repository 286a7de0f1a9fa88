"""The ``sweep`` command: a thin layer over :func:`kcompress.sweep`."""

from __future__ import annotations

from typing import Optional

import click

from kcompress.cli import handle_errors
from kcompress.cli.console import build, console, mb, ms, option, pct, print_table
from kcompress.sweeps.options import SweepOptions

__all__ = ["sweep"]


@click.command()
@click.argument("config_path", metavar="CONFIG.yaml")
@click.option("--space", "space_path", required=True, metavar="SPACE.yaml",
              help="The config keys to vary and their values or ranges (see above).")
@click.option("-o", "--out", "sweep_dir", default=None, help="Sweep folder [default: sweeps/<config name>].")
@option(SweepOptions, "trials")
@option(SweepOptions, "objectives")
@option(SweepOptions, "sampler")
@option(SweepOptions, "jobs")
@option(SweepOptions, "backend")
@option(SweepOptions, "address")
@option(SweepOptions, "seed")
@click.option("--resume", is_flag=True, help="Continue an interrupted sweep; finished trials are never run again.")
@click.option("--overwrite", is_flag=True, help="Delete an existing sweep folder's study and trials, start over.")
@click.option("--trust-model", is_flag=True,
              help="Load the model even if it has Lambda layers or unregistered custom classes, which run their own "
                   "code when loaded (in every trial's process): only for files from a source you trust.")
@handle_errors
def sweep(config_path: str, space_path: str, sweep_dir: Optional[str], resume: bool, overwrite: bool,
          trust_model: bool, **kw) -> None:
    """Sweep pipeline settings (an Optuna study) and show the accuracy/size/latency trade-off.

    Every trial is an ordinary pipeline run of CONFIG.yaml with some keys changed, in SWEEP_DIR/trial-NNN/.
    Trials whose settings are equal up to a stage share it: a sweep over quantization modes trains and distills
    once. A gate failure or an error fails that trial (its reason is recorded) and the sweep goes on. The study
    lives in SWEEP_DIR/study.db, so --resume continues where an interrupted sweep stopped.

    \b
    SPACE.yaml names config keys and their values (a list) or ranges:
      distill.temperature: [2, 4, 8, 16]
      distill.alpha: {low: 0.3, high: 0.7}          # optional: step: 0.1, log: true
      prune.target_flops: [0.3, 0.5]
      quantize.mode: [int8, int16x8]
    An ablation sweeps the stages' switches; the result then has each stage's contribution
    (accuracy, size, latency with and without it):
      distill.enabled: [true, false]
      prune.enabled: [true, false]

    \b
    Samplers: grid (every combination; the default for lists), random, nsga2 (the default with ranges).
    Objectives: accuracy (VAL accuracy of the final model: it chooses; TEST is reported beside it),
    size (bytes of the final .tflite), latency (p50 ms, 1 thread, batch 1, from the benchmark stage).

    \b
    Results: sweep.json, sweep.md (every trial, the Pareto front, contributions) and plots of
    accuracy against size and latency with the front marked.

    \b
    Examples:
      kcompress sweep configs/quickstart.yaml --space configs/sweeps/quickstart_space.yaml -o sweeps/quick
      kcompress sweep configs/quickstart.yaml --space configs/sweeps/quickstart_space.yaml -o sweeps/quick --resume
      kcompress sweep base.yaml --space space.yaml --sampler nsga2 --trials 16 --objectives accuracy,latency
      kcompress sweep base.yaml --space space.yaml --jobs 4 --backend ray --address auto
    """
    import kcompress as kc

    flags = {"objectives": "--objectives", "sampler": "--sampler"}
    opts = build(SweepOptions, flags, **{k: kw.pop(k) for k in ("trials", "objectives", "sampler", "jobs", "backend",
                                                               "address", "seed")})
    con = console()
    result = kc.sweep(config_path, space_path, sweep_dir, opts, resume=resume, overwrite=overwrite,
                      log=lambda m: con.print(m, markup=False, soft_wrap=True), trust_model=trust_model)
    keys = list(result.trials[0].params) if result.trials else []
    rows = [[f"trial-{t.number:03d}", *(str(t.params.get(k)) for k in keys), pct(t.accuracy), pct(t.test_accuracy),
             mb(t.size_bytes), ms(t.latency_ms), str(t.shared_stages)] for t in sorted(
                 result.front, key=lambda t: -(t.accuracy or 0))]
    print_table(f"Pareto front ({', '.join(result.objectives)}); accuracy on VAL chose, TEST reported",
                ["trial", *keys, "val accuracy", "test accuracy", "size", "p50", "shared stages"], rows, con)
    for row in result.contributions or ():
        d = row["delta"]
        con.print(f"{row['stage']}: {100 * (d['accuracy'] or 0):+.2f} points VAL accuracy, "
                  f"{(d['size_bytes'] or 0) / 1e3:+.1f} kB, {d['latency_ms'] or 0:+.3f} ms (with minus without)")
    con.print(f"Results: {result.files['md']} ({len(result.done)} done, {len(result.failed)} failed)")
