"""The model-producing stages of a pipeline run (train, baseline, distill, prune, quantize), each in its folder.

Each takes the runner's context (``cfg``, the ``train``/``val`` splits, ``log``, ``resume_stage``: whether an
interrupted run of the same settings left work in the folder) and the previous stage's model; the runner
(:mod:`kcompress.pipeline.runner`) measures what it returns and writes ``stage.json`` last.

Stages that train keep checkpoints in ``<stage folder>/checkpoints`` (:func:`checkpoints`): per-epoch for training,
distillation and QAT, per round and per epoch for structured pruning. A killed run resumed with the same settings
continues them; otherwise (other settings, or a checkpoint whose recorded settings turn out to differ:
:func:`resumable`) they are deleted and the stage starts over.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from kcompress.types import PruneMethod, QATPolicy, QuantMode

__all__ = ["checkpoints", "resumable", "stage_train", "stage_baseline", "stage_distill", "stage_prune", "stage_quantize"]


def checkpoints(ctx, out_dir: str) -> tuple[str, bool]:
    """The stage's checkpoint folder and whether to continue it: yes when an interrupted run of these settings
    left a checkpoint there; a stale folder (other settings, or none to continue) is deleted."""
    ckpt = os.path.join(out_dir, "checkpoints")
    resume = ctx.resume_stage and os.path.exists(os.path.join(ckpt, "state.json"))
    if not resume and os.path.isdir(ckpt):
        shutil.rmtree(ckpt)  # checkpoints of other settings: this run starts over
    return ckpt, resume


def resumable(ctx, out_dir: str, what: str, run):
    """``run(checkpoint_dir, resume)`` with the stage's checkpoints (:func:`checkpoints`). A checkpoint that turns
    out not to be this run's (its recorded settings differ) is deleted and the stage starts over."""
    from kcompress.checkpoint import StaleCheckpoint

    ckpt, resume = checkpoints(ctx, out_dir)
    try:
        return run(ckpt, resume)
    except StaleCheckpoint as e:
        if not resume:
            raise
        ctx.log(f"{e}; starting the {what} over")
        shutil.rmtree(ckpt, ignore_errors=True)
        return run(ckpt, False)


def stage_train(ctx, model, out_dir: str):
    from kcompress import zoo as architectures
    from kcompress.backend import keras
    from kcompress.checkpoint import fit_resumable
    from kcompress.io import save_model

    mc = ctx.cfg.model
    shape = ctx.train.sample_shape or (32, 32, 3)
    build = getattr(architectures, mc.architecture)
    keras.utils.set_random_seed(ctx.cfg.seed)  # the initial weights too come from the seed
    model = build(input_shape=tuple(shape), num_classes=ctx.train.num_classes)
    ctx.log(f"training {mc.architecture} for {mc.epochs} epochs on {ctx.train.name}")
    resumable(ctx, out_dir, "training", lambda ckpt, resume: fit_resumable(
        model, ctx.train, ctx.val, checkpoint_dir=ckpt, resume=resume, what="training", epochs=mc.epochs,
        batch_size=mc.batch_size, lr=mc.rate(ctx.cfg.train.optimizer), seed=ctx.cfg.seed, train_options=ctx.cfg.train,
        log=ctx.log))
    path = os.path.join(out_dir, "model.keras")
    save_model(model, path, overwrite=True)
    return model, path, {}, {}


def stage_baseline(ctx, model, out_dir: str):
    from kcompress.io import save_model, write_json
    from kcompress.pipeline.baseline import baseline_run

    record, evaluation, fp32 = baseline_run(model, ctx.val, ctx.cfg.baseline)
    write_json(os.path.join(out_dir, "baseline.json"), record, overwrite=True)
    path = os.path.join(out_dir, "model.keras")
    save_model(model, path, overwrite=True)
    return model, path, {"flops": record["flops"]}, {"evaluation": evaluation, "fp32": fp32}


def stage_distill(ctx, model, out_dir: str):
    from kcompress.distillation.trainer import distill
    from kcompress.io import load_model, save_model

    c = ctx.cfg.distill
    student = load_model(c.student, stage="distill") if c.student else c.student_width
    ckpt, resume = checkpoints(ctx, out_dir)
    if resume:  # the trainer says nothing about it
        ctx.log(f"continuing the interrupted distillation from {ckpt}")
    result = distill(model, student, ctx.train, ctx.val, c, seed=ctx.cfg.seed, checkpoint_dir=ckpt, resume=resume,
                     train_options=ctx.cfg.train, log=ctx.log)
    path = os.path.join(out_dir, "model.keras")
    save_model(result.student, path, overwrite=True)
    extra = {"teacher_params": result.teacher_params, "student_params": result.student_params,
             "best_epoch": result.best_epoch, "warnings": list(result.warnings)}
    return result.student, path, extra, {}


def stage_prune(ctx, model, out_dir: str):
    from kcompress.io import save_model

    c = ctx.cfg.prune
    if c.method == PruneMethod.MAGNITUDE:
        from kcompress.pruning.magnitude import prune_magnitude

        result = prune_magnitude(model, ctx.train, ctx.val, c, seed=ctx.cfg.seed, train_options=ctx.cfg.train,
                                 log=ctx.log)
        extra = {"method": "magnitude", "overall_sparsity": result.overall_sparsity, "pruned_layers": result.pruned,
                 "warnings": list(result.warnings), "target_met": result.target_met, "flattened": result.flattened,
                 "shortfall": "" if result.target_met else
                 f"sparsity {result.overall_sparsity:.1%} of the pruned kernels, target {result.target:.0%}"}
    else:
        from kcompress.pruning.structured import prune_structured

        fine_tune = _teacher_fine_tune(ctx) if c.teacher else None
        result = resumable(ctx, out_dir, "pruning", lambda ckpt, resume: prune_structured(
            model, ctx.train, ctx.val, c, seed=ctx.cfg.seed, train_options=ctx.cfg.train, log=ctx.log,
            checkpoint_dir=ckpt, resume=resume, fine_tune=fine_tune))
        extra = {"method": "structured", "macs_before": result.macs_before, "macs_after": result.macs_after,
                 "params_before": result.params_before, "params_after": result.params_after,
                 "removed_blocks": result.staged.get("removed_blocks", []), "latency": result.staged.get("latency"),
                 "warnings": list(result.staged.get("notes", [])), "target_met": result.target_met,
                 "shortfall": result.shortfall, "flattened": result.flattened,
                 "channel_multiple": result.channel_multiple}
        for note in extra["warnings"]:
            ctx.log(f"note: {note}")
    path = os.path.join(out_dir, "model.keras")
    save_model(result.model, path, overwrite=True)
    return result.model, path, extra, {}


def _teacher_fine_tune(ctx):
    """The pruning fine-tunes' teacher hook: ``prune.teacher`` baseline is the model the pipeline started from
    (what the baseline stage measured), else a model file; the ``distill`` section gives temperature and alpha."""
    from kcompress.distillation.finetune import teacher_fine_tune
    from kcompress.io import load_model

    c = ctx.cfg.prune
    path = ctx.baseline_model if c.teacher == "baseline" else c.teacher
    ctx.log(f"fine-tunes learn from the teacher {path} (knowledge distillation) as well as the labels")
    return teacher_fine_tune(load_model(path, stage="prune"), ctx.train, ctx.val, c.batch_size, ctx.cfg.distill,
                             ctx.cfg.train, log=ctx.log)


def stage_quantize(ctx, model, out_dir: str, prev_accuracy: float):
    """PTQ first; QAT when PTQ misses max_drop (qat: auto) or always; keeps the better on VAL."""
    from kcompress.evaluation import evaluate
    from kcompress.modelinfo import input_shape
    from kcompress.quantization.ptq import convert
    from kcompress.quantization.sensitivity import choose_float_layers

    c = ctx.cfg.quantize
    opts, _ = choose_float_layers(model, c, ctx.train, ctx.val, log=ctx.log)
    if c.mode == QuantMode.INT4_WEIGHTS:  # ai-edge-quantizer; recipe auto chooses per layer on VAL
        from kcompress.quantization.aeq import int4_weights

        ptq, _ = int4_weights(model, convert(model), c.recipe, ctx.calibration(input_shape(model)), ctx.val,
                              c.max_drop, log=ctx.log)
    else:
        ptq = convert(model, opts, calibration=ctx.calibration(input_shape(model)))
    ptq_ev = evaluate(ptq, ctx.val, description="validating PTQ")
    ptq_acc = ptq_ev.accuracy
    drop = 100 * (prev_accuracy - ptq_acc)
    ctx.log(f"PTQ {c.mode}: {100 * ptq_acc:.2f}% ({-drop:+.2f} points against the previous stage)")
    extra: dict[str, Any] = {"ptq_accuracy": ptq_acc, "method": "ptq", "mode": str(c.mode),
                             "float_layers": list(opts.float_layers)}
    chosen, chosen_ev = ptq, ptq_ev
    want_qat = c.mode == QuantMode.INT8 and (
        c.qat == QATPolicy.ALWAYS or (c.qat == QATPolicy.AUTO and drop > c.max_drop))
    if want_qat:
        from kcompress.quantization.qat import qat

        ctx.log("running quantization-aware training" + (" (PTQ missed the stage's floor)" if c.qat == "auto" else ""))
        result = resumable(ctx, out_dir, "QAT", lambda ckpt, resume: qat(
            model, ctx.train, ctx.val, ctx.cfg.qat, opts, seed=ctx.cfg.seed, ptq=False, bench=False, log=ctx.log,
            train_options=ctx.cfg.train, checkpoint_dir=ckpt, resume=resume))
        qat_ev = result.evaluation  # the QAT .tflite in LiteRT on ctx.val, as qat() measured it
        qat_acc = extra["qat_accuracy"] = qat_ev.accuracy
        if qat_acc > ptq_acc:
            chosen, chosen_ev, extra["method"] = result.tflite, qat_ev, "qat"
        ctx.log(f"QAT int8: {100 * qat_acc:.2f}%; keeping {extra['method'].upper()}")
    extra["accuracy"] = max(ptq_acc, extra.get("qat_accuracy", -1.0))
    if ctx.baseline_accuracy is not None:
        extra["baseline_accuracy"] = ctx.baseline_accuracy
    return chosen, extra, chosen_ev
