"""The Python API of distillation: :func:`distill` takes paths or objects and returns a
:class:`~kcompress.distillation.trainer.DistillResult` with ``save()``."""

from __future__ import annotations

import shutil
from dataclasses import replace
from typing import Callable, Optional

from kcompress.inputs import as_model, as_splits, preprocess_of, resolve_options
from kcompress.options import DistillOptions, TrainOptions

__all__ = ["distill"]


def _quiet(_msg: str) -> None:
    pass


def distill(teacher, train, val=None, *, test=None, test_split: float = 0.0, train_limit: Optional[int] = None,
            student=None,
            options: Optional[DistillOptions] = None, preprocess=None, seed: int = 0, checkpoint_dir: Optional[str] = None, resume: bool = False,
            overwrite_checkpoints: bool = False, augment: Optional[Callable] = None, verbose: Optional[int] = None,
            log: Callable[[str], None] = _quiet, train_options: Optional[TrainOptions] = None,
            trust_model: bool = False, **option_fields):
    """Trains a smaller student to imitate ``teacher``; returns a DistillResult (``.student``, ``.save(path)``).

    ``student``: a model or a path (fresh or pre-trained); None derives one from the teacher with
    ``student_width`` (an option, 0.5 by default) and ``student_init`` (the teacher's own channels, or fresh
    weights). Keywords are fields of :class:`~kcompress.options.DistillOptions` (``temperature``, ``alpha``, ...).
    ``checkpoint_dir``: per-epoch checkpoints; ``resume`` continues from them, ``overwrite_checkpoints`` starts
    over (otherwise an earlier run's checkpoints are an error). The result says whether the student stayed within
    ``max_drop`` points of the teacher on VAL (``within_max_drop``); the CLI turns a miss into exit 1.
    ``test`` (or ``test_split``, a stratified fraction carved out of ``train``): TEST, which chooses nothing;
    teacher and student are measured on it afterwards (``result.test``).
    ``train_options``: optimizer, schedule and augmentation (:class:`~kcompress.options.TrainOptions`, the
    ``train`` section); with augmentation the teacher runs on each augmented batch (no cache). ``augment`` (a
    function on a batch of inputs) replaces its augmentation. ``trust_model``: load teacher and student files even
    with Lambda layers or unregistered classes (files you trust only).
    """
    from kcompress.backend import keras
    from kcompress.distillation.students import make_student
    from kcompress.distillation.trainer import distill as run
    from kcompress.distillation.trainer import size_warnings, weights_bytes
    from kcompress.distributed import distribute_early, worker_path
    from kcompress.modelinfo import count_params

    opts = resolve_options(DistillOptions, options, **option_fields)
    topts = resolve_options(TrainOptions, train_options)
    distribute_early(topts.strategy)  # multi-worker: before any model is loaded
    checkpoint_dir = worker_path(checkpoint_dir, copy=resume) if checkpoint_dir else None  # the chief's only
    preprocess = preprocess_of(train, preprocess)
    t = as_model(teacher, stage="distill", trust_model=trust_model)
    student = student if student is not None else opts.student
    if student is not None:
        student_model = as_model(student, stage="distill", trust_model=trust_model).model
    else:
        keras.utils.set_random_seed(seed)
        student_model = make_student(t.model, opts.student_width, opts.student_init, log=log)
    tr, va, te = as_splits(train, val, test, test_split=test_split, seed=seed, preprocess=preprocess,
                           train_limit=train_limit)
    if checkpoint_dir and overwrite_checkpoints and not resume:  # else the trainer refuses an earlier run's
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    t_bytes, s_bytes = weights_bytes(t.model), weights_bytes(student_model)
    log(f"teacher: {count_params(t.model)['total']:,} params, {t_bytes / 1e6:.2f} MB")
    log(f"student: {count_params(student_model)['total']:,} params, {s_bytes / 1e6:.2f} MB "
        f"({100 * s_bytes / t_bytes:.1f}% of the teacher)")
    for w in size_warnings(t_bytes, s_bytes):
        log(f"warning: {w}")
    if va is None:
        log("note: no validation data; the teacher is checked and the best epoch chosen on the training data")
    result = run(t.model, student_model, tr, va, opts, seed=seed, checkpoint_dir=checkpoint_dir, resume=resume,
                 augment=augment, verbose=verbose, train_options=topts, log=log)
    from kcompress.evaluation import test_figures

    figures = test_figures({"teacher": t.model, "student": result.student}, te)
    return replace(result, keras3=t.keras3, checkpoint_dir=checkpoint_dir, max_drop=opts.max_drop, test=figures)
