"""``kcompress distill``: a thin command over :func:`kcompress.distill.distill` (TensorFlow imported inside)."""

from __future__ import annotations

import os

import click

from kcompress.cli import handle_errors
from kcompress.commands import preprocess_options
from kcompress.errors import UsageError

__all__ = ["distill_cmd", "default_output"]


def default_output(teacher_path: str) -> str:
    base = teacher_path.rstrip("/")
    stem, ext = os.path.splitext(base)
    return f"{stem}_student{ext if ext in ('.keras', '.h5') else '.keras'}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


@click.command("distill")
@click.option("--teacher", required=True, help="The trained teacher model (SavedModel folder, .keras or .h5).")
@click.option("--data", required=True, help="Training data: image folder, .npz (x, y) or built-in name.")
@click.option("--val-data", default=None, help="Validation data: teacher check, VAL accuracy, best epoch.")
@click.option("--student", default=None, help="A student model file (fresh or pre-trained) to train.")
@click.option("--student-width", type=float, default=None,
              help="Derive the student from the teacher: every width times W (0 < W < 1), classifier kept.")
@click.option("--temperature", type=float, default=4.0, show_default=True, help="Softmax temperature T.")
@click.option("--alpha", type=float, default=0.5, show_default=True,
              help="Weight of the label cross-entropy; 1 - alpha weighs the T^2-scaled KL to the teacher.")
@click.option("--temperature-schedule", default=None,
              help="constant (default), or linear:HIGH:LOW / cosine:HIGH:LOW across the epochs.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--patience", type=int, default=None, help="Stop after N epochs without a better VAL accuracy.")
@click.option("--min-teacher-accuracy", type=float, default=None,
              help="Refuse a teacher below this VAL accuracy [default: chance + 0.10].")
@click.option("--cache-teacher", type=click.Choice(["auto", "memory", "disk", "off"]), default="auto",
              show_default=True, help="Where the teacher's outputs are cached (off: the teacher runs every step).")
@click.option("--seed", type=int, default=0, show_default=True)
@preprocess_options
@click.option("-o", "--out", default=None, help="Output student model [default: TEACHER_student.keras].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoints (OUT.ckpt/).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (and start over its checkpoints).")
@handle_errors
def distill_cmd(teacher, data, val_data, student, student_width, temperature, alpha, temperature_schedule, epochs,
                batch_size, lr, patience, min_teacher_accuracy, cache_teacher, seed, scale, offset, mean, std, out,
                resume, overwrite):
    """Train a smaller student to imitate a teacher (knowledge distillation).

    The loss is alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T). The teacher is
    checked on VAL first, frozen, and its outputs are computed once and cached. The output is the plain student
    (the best epoch by VAL accuracy); it loads with tf_keras alone. Checkpoints go to OUT.ckpt/ each epoch.

    \b
    Examples:
      kcompress distill --teacher cnn.keras --data digits:train --val-data digits:val \\
          --scale 0.00392 --student-width 0.5 -o student.keras
      kcompress distill --teacher resnet.keras --data train/ --val-data val/ --scale 0.00392 \\
          --student small.keras --temperature-schedule linear:8:2 --epochs 30 --patience 5
    """
    if (student is None) == (student_width is None):
        raise UsageError("pass exactly one of --student MODEL or --student-width W")
    from kcompress.data import Preprocess, open_data
    from kcompress.distill import (DistillOptions, TemperatureSchedule, check_compatible, derive_student, distill,
                                   size_warnings, weights_bytes)
    from kcompress.models import check_output_path, count_params, load_model, model_format, save_model

    pre = Preprocess.parse(scale, offset, mean, std)
    TemperatureSchedule.parse(temperature_schedule, temperature)  # reject a bad spec before loading anything
    out = out or default_output(teacher)
    ckpt = out.rstrip("/") + ".ckpt"
    if not resume:
        check_output_path(out, overwrite)
        if os.path.exists(os.path.join(ckpt, "state.json")) and overwrite:
            import shutil

            shutil.rmtree(ckpt)
    else:
        check_output_path(out, True)
    options = DistillOptions(temperature=temperature, alpha=alpha, schedule=temperature_schedule, epochs=epochs,
                             batch_size=batch_size, lr=lr, seed=seed, patience=patience, cache_teacher=cache_teacher,
                             min_teacher_accuracy=min_teacher_accuracy)
    options.validate()
    train = open_data(data, pre)
    val = open_data(val_data, pre) if val_data else None
    teacher_model = load_model(teacher, stage="distill")
    keras3_in = model_format(teacher) == "keras3"
    if student:
        student_model = load_model(student, stage="distill")
    else:
        from kcompress._keras import keras

        keras.utils.set_random_seed(seed)
        student_model = derive_student(teacher_model, student_width)
    check_compatible(teacher_model, student_model)
    t_bytes, s_bytes = weights_bytes(teacher_model), weights_bytes(student_model)
    click.echo(f"teacher: {count_params(teacher_model)['total']:,} params, {_mb(t_bytes)}")
    click.echo(f"student: {count_params(student_model)['total']:,} params, {_mb(s_bytes)} "
               f"({100 * s_bytes / t_bytes:.1f}% of the teacher)")
    for w in size_warnings(t_bytes, s_bytes):
        click.echo(f"warning: {w}")
    if val is None:
        click.echo("note: no --val-data; the teacher is checked and the best epoch chosen on the training data")
    result = distill(teacher_model, student_model, train, val, options, checkpoint_dir=ckpt, resume=resume)

    click.echo(f"teacher accuracy {result.teacher_accuracy:.4f} on {val.name if val else train.name}")
    if result.best_epoch is not None:
        acc = f", VAL accuracy {result.student_accuracy:.4f}" if result.student_accuracy is not None else ""
        click.echo(f"best epoch {result.best_epoch} of {len(result.history)}{acc} "
                   f"(teacher outputs cache: {result.cache})")
    save_model(result.student, out, overwrite=True, keras3=keras3_in and out.endswith(".keras"))
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)
    click.echo(f"wrote {out}")
