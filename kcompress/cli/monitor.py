"""The ``monitor`` command: drift of new inputs against a model's reference statistics, or writing that reference.

Thin: parse options, call :mod:`kcompress.monitoring`, print. Exit 0 within thresholds, 1 on drift (the summary
line says which tests flagged it) or a user error. TensorFlow is imported inside the functions only.
"""

from __future__ import annotations

import sys
from typing import Optional

import click

from kcompress.cli import EXIT_USER, handle_errors
from kcompress.cli.console import (
    build,
    console,
    option,
    preprocess,
    preprocess_options,
    print_json,
    print_table,
    trust_model_option,
    wrote,
)
from kcompress.errors import UsageError
from kcompress.options import MonitorOptions

__all__ = ["monitor"]

THRESHOLDS = ("psi_warn", "psi_drift", "class_psi_drift", "alpha", "ks_min_statistic", "input_mean_shift",
              "input_std_ratio", "bins")
PREPROCESS_FLAGS = ("scale", "offset", "mean", "std")


def _threshold_options(fn):
    for name in reversed(THRESHOLDS):
        fn = option(MonitorOptions, name)(fn)
    return fn


@click.command()
@click.argument("model")
@click.option("--data", required=True, help="New inputs: image folder, .npz (x; y optional, ignored) or built-in "
                                            "name. With --write-reference: the reference split (VAL).")
@click.option("--reference", default=None, metavar="RUN_DIR|STATS.json",
              help="A pipeline run folder (its monitor_reference.json) or a reference JSON.")
@click.option("--write-reference", default=None, metavar="OUT.json",
              help="Instead of testing: write the reference statistics of MODEL on --data here.")
@click.option("--split", default="val", show_default=True, help="The split name recorded by --write-reference.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--plot", default=None, metavar="PATH.png", help="Also write the two confidence histograms here.")
@click.option("--any-model", is_flag=True, help="Test even if MODEL is not the file the reference was made with.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --write-reference or --plot file.")
@_threshold_options
@preprocess_options
@trust_model_option
@handle_errors
def monitor(model: str, data: str, reference: Optional[str], write_reference: Optional[str], split: str,
            as_json: bool, plot: Optional[str], any_model: bool, batch_size: int, overwrite: bool, **kw) -> None:
    """Has the data drifted? Compares new, unlabelled inputs with MODEL's reference statistics.

    Tests the max-softmax confidences (PSI over the reference's quantile bins: < 0.1 stable, 0.1-0.25 moderate,
    > 0.25 drift; two-sample Kolmogorov-Smirnov), the predicted-class frequencies (PSI) and the inputs' per-channel
    mean (shift in reference stds) and std (ratio). Exit 0 within the thresholds; exit 1 with a one-line summary
    when drifted. Without preprocessing flags, the reference's preprocessing is reused.

    A pipeline run writes its reference (the final model on VAL) to RUN_DIR/monitor_reference.json; for any other
    model, write one with --write-reference.

    \b
    Examples:
      kcompress monitor runs/a/04-quantize/model.tflite --reference runs/a --data new_inputs.npz
      kcompress monitor model.keras --write-reference ref.json --data val/ --scale 1/255
      kcompress monitor model.keras --reference ref.json --data today/ --plot drift.png --json
    """
    from kcompress.atomic import check_output_path
    from kcompress.monitoring import monitor as run_monitor
    from kcompress.monitoring import monitor_reference, plot_confidences

    ctx = click.get_current_context()
    given = any(ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT for k in PREPROCESS_FLAGS)
    pre = preprocess(kw) if given else None
    for k in PREPROCESS_FLAGS:
        kw.pop(k, None)
    opts = build(MonitorOptions, **{k: kw.pop(k) for k in THRESHOLDS})
    if (reference is None) == (write_reference is None):
        raise UsageError("give --reference RUN_DIR|STATS.json to test, or --write-reference OUT.json to make one")
    if plot:
        check_output_path(plot, overwrite)
    if write_reference:
        check_output_path(write_reference, overwrite)
        ref = monitor_reference(model, data, split=split, preprocess=pre, batch_size=batch_size)
        ref.save(write_reference, overwrite=overwrite)
        if as_json:
            print_json({k: v for k, v in ref.to_dict().items() if k != "confidences"})
        if plot:
            import numpy as np

            plot_confidences(ref, np.asarray(ref.confidences), plot, overwrite=overwrite,
                             title=f"reference confidences ({split.upper()})")
        wrote(write_reference, err=as_json)
        return
    result = run_monitor(model, reference, data, opts, preprocess=pre, batch_size=batch_size,
                         check_model=not any_model)
    if plot:
        from kcompress.monitoring import Reference

        plot_confidences(Reference.load(reference), result.confidences, plot, overwrite=overwrite)
    if as_json:
        print_json(result.to_dict())
    else:
        rows = [[t.name, f"{t.value:.3g}", f"{t.threshold:g}", t.verdict.upper() if t.verdict != "ok" else "ok",
                 t.detail] for t in result.tests]
        print_table(f"{result.data}: {result.num_samples} samples vs {result.reference_samples} of "
                    f"{result.split.upper()} ({result.model})", ["test", "value", "threshold", "verdict", ""],
                    rows, console())
        for note in result.notes:
            click.echo(f"note: {note}")
        if plot:
            wrote(plot)
        click.echo(result.summary)
    if result.drifted:
        if as_json:
            click.echo(result.summary, err=True)
        sys.exit(EXIT_USER)
