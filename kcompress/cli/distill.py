"""``kcompress distill``: a thin command over :func:`kcompress.distill` (TensorFlow imported inside)."""

from __future__ import annotations

import os
import sys

import click

from kcompress.cli import handle_errors
from kcompress.cli.console import (
    build,
    failed_name,
    option,
    pct,
    preprocess,
    preprocess_options,
    print_json,
    print_test,
    test_options,
    train_limit_option,
    train_options,
    train_settings,
    trust_model_option,
    wrote,
)
from kcompress.options import DistillOptions

__all__ = ["distill_cmd", "default_output"]


def default_output(teacher_path: str) -> str:
    base = teacher_path.rstrip("/")
    stem, ext = os.path.splitext(base)
    return f"{stem}_student{ext if ext in ('.keras', '.h5') else '.keras'}"


@click.command("distill")
@click.option("--teacher", required=True, help="The trained teacher model (SavedModel folder, .keras or .h5).")
@click.option("--data", required=True, help="Training data: image folder, .npz (x, y) or built-in name.")
@click.option("--val-data", default=None, help="Validation data (VAL): teacher check, best epoch.")
@test_options
@train_limit_option
@option(DistillOptions, "student")
@option(DistillOptions, "student_width")
@option(DistillOptions, "student_init")
@option(DistillOptions, "temperature")
@option(DistillOptions, "alpha")
@option(DistillOptions, "temperature_schedule")
@option(DistillOptions, "epochs")
@option(DistillOptions, "batch_size")
@option(DistillOptions, "lr")
@option(DistillOptions, "patience")
@option(DistillOptions, "min_teacher_accuracy")
@option(DistillOptions, "cache_teacher")
@option(DistillOptions, "max_drop")
@train_options
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (config: seed).")
@preprocess_options
@click.option("-o", "--out", default=None, help="Output student model [default: TEACHER_student.keras].")
@click.option("--json", "as_json", is_flag=True, help="Print the result (history, accuracies, sizes) as JSON.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoints (OUT.ckpt/).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (and start over its checkpoints).")
@trust_model_option
@handle_errors
def distill_cmd(teacher, data, val_data, student, student_width, student_init, temperature, alpha, temperature_schedule,
                epochs, batch_size, lr, patience, min_teacher_accuracy, cache_teacher, max_drop, seed, out, as_json, resume,
                overwrite, test_data, test_split, train_limit, **kw):
    """Train a smaller student to imitate a teacher (knowledge distillation).

    The loss is alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T). The teacher is
    checked on VAL first, frozen, and its outputs are computed once and cached. The output is the plain student
    (the best epoch by VAL accuracy); it loads with tf_keras alone (Keras 3 in, Keras 3 out). Checkpoints go to
    OUT.ckpt/ each epoch. A student more than --max-drop points below the teacher on VAL is written, and the
    command exits 1 saying so.

    \b
    Examples:
      kcompress distill --teacher cnn.keras --data digits:train --val-data digits:val \\
          --scale 0.00392 --student-width 0.5 -o student.keras
      kcompress distill --teacher resnet.keras --data train/ --val-data val/ --scale 0.00392 \\
          --student small.keras --temperature-schedule linear:8:2 --epochs 30 --patience 5
    """
    import kcompress as kc
    from kcompress.distributed import worker_path
    from kcompress.errors import KcompressError
    from kcompress.io import check_output_path

    opts = build(DistillOptions, student=student, student_width=student_width, student_init=student_init,
                 temperature=temperature, alpha=alpha,
                 temperature_schedule=temperature_schedule, epochs=epochs, batch_size=batch_size, lr=lr,
                 patience=patience, min_teacher_accuracy=min_teacher_accuracy, cache_teacher=cache_teacher,
                 max_drop=max_drop)
    out = out or default_output(teacher)
    check_output_path(out, overwrite or resume)
    log = (lambda m: None) if as_json else click.echo
    topts = train_settings(kw)
    result = kc.distill(teacher, data, val_data, test=test_data, test_split=test_split, train_limit=train_limit,
                        options=opts, preprocess=preprocess(kw), seed=seed,
                        checkpoint_dir=out.rstrip("/") + ".ckpt", resume=resume, overwrite_checkpoints=overwrite,
                        log=log, train_options=topts)
    out = worker_path(out)  # only the chief writes the user's files
    final = out
    if not result.within_max_drop:
        final = failed_name(out)
        check_output_path(final, True)
    result.save(final, overwrite=True)
    result.discard_checkpoints()
    if as_json:
        print_json({**result.to_dict(), "out": final})
    else:
        click.echo(f"teacher accuracy {pct(result.teacher_accuracy)} on {'VAL' if val_data else 'the training data'}")
        if result.best_epoch is not None:
            acc = f", VAL accuracy {pct(result.student_accuracy)}" if result.student_accuracy is not None else ""
            click.echo(f"best epoch {result.best_epoch} of {len(result.history)}{acc} "
                       f"(teacher outputs cache: {result.cache})")
        print_test(result.test, ("teacher", "student"))
        wrote(final, "as a Keras 3 model, like the teacher" if result.keras3 else "")
    if not result.within_max_drop:
        click.echo(f"Error: the student is {result.drop_points:.2f} points below the teacher on VAL, more than "
                   f"--max-drop {opts.max_drop} (kept as {final}, not {out}; train longer, use --augment, or widen "
                   "the student)", err=True)
        sys.exit(KcompressError.exit_code)
