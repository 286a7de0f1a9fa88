"""The Python API of pruning: :func:`prune` (magnitude or structured) with the before/after measurements the CLI
prints, returned as a frozen :class:`PruneResult` with ``save()``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from kcompress.errors import UsageError
from kcompress.inputs import as_model, as_splits, preprocess_of, resolve_options
from kcompress.options import PruneOptions, TrainOptions
from kcompress.types import PruneMethod

__all__ = ["PruneResult", "prune", "measure_models"]


def _quiet(_msg: str) -> None:
    pass


@dataclass(frozen=True)
class PruneResult:
    """A pruned model and what changed. ``details`` is the method's own report (magnitude: pruned/skipped layers
    and sparsities; structured: channel groups, frozen layers, rounds, ``removed_blocks`` and, with
    ``target_latency_ms``, ``latency``: see :mod:`kcompress.pruning.blocks`); ``before``/``after`` hold the
    measurements of the input and the pruned model: parameters, MACs, fp32 ``.tflite`` size (raw and gzip) and,
    for structured pruning, int8 size and fp32/int8 p50 latency (1 thread, batch 1)."""

    model: Any = field(repr=False)
    method: PruneMethod
    options: PruneOptions
    accuracy_before: Optional[float]  # on VAL
    accuracy_after: Optional[float]
    details: dict
    before: dict
    after: dict
    warnings: tuple = ()
    keras3: bool = False
    test: Optional[dict] = None  # before_accuracy / after_accuracy on TEST (chose nothing), when given

    @property
    def drop_points(self) -> Optional[float]:
        if self.accuracy_before is None or self.accuracy_after is None:
            return None
        return 100 * (self.accuracy_before - self.accuracy_after)

    @property
    def within_max_drop(self) -> bool:
        return self.drop_points is None or self.drop_points <= self.options.max_drop

    @property
    def hint(self) -> Optional[str]:
        """Said when the pruned model's int8 file measured slower than its fp32 file on this host (every trial)."""
        from kcompress.bench.schema import clearly_slower, speedup

        a = self.after
        if not a.get("int8_p50_trials_ms") or not clearly_slower(a["fp32_p50_trials_ms"], a["int8_p50_trials_ms"],
                                                                   1.05):
            return None
        s = speedup(a["fp32_p50_trials_ms"], a["int8_p50_trials_ms"])
        return (f"int8 measured {1 / s.median:.2f}x SLOWER than fp32 here ({s.trials} trials, 1 thread); measure on "
                "the target device before choosing int8 (kcompress device bench)")

    @property
    def hints(self) -> list[str]:
        """Every hint: int8 slower than fp32 here (:attr:`hint`), and the speed that lags the MACs removed
        (``details["speed_hint"]``, with this host's measured SIMD tile: :mod:`kcompress.pruning.tiles`)."""
        return [h for h in (self.hint, self.details.get("speed_hint")) if h]

    def speedups(self) -> dict:
        """``{"fp32": SpeedUp, "int8": SpeedUp}`` of the pruned model over the input (structured, measured), from
        their interleaved trials: the median and range of trial i's ratio; empty when not measured."""
        from kcompress.bench.schema import speedup

        b, a = self.before, self.after
        return {k: speedup(b[f"{k}_p50_trials_ms"], a[f"{k}_p50_trials_ms"]) for k in ("fp32", "int8")
                if b.get(f"{k}_p50_trials_ms") and a.get(f"{k}_p50_trials_ms")}

    @property
    def target_met(self) -> bool:
        """The method reached its target (sparsity, or FLOPs) within 5 points; see ``details["target_met"]``."""
        return bool(self.details.get("target_met", True))

    @property
    def flops_reduction(self) -> float:
        return 1.0 - self.after["macs"] / self.before["macs"] if self.before.get("macs") else 0.0

    def to_dict(self) -> dict:
        return {"method": str(self.method), "options": self.options.to_dict(),
                "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
                "drop_points": self.drop_points, "details": self.details, "before": self.before,
                "after": self.after, "warnings": list(self.warnings), "test": self.test, "hint": self.hint,
                "target_met": self.target_met, "speedups": {k: v.to_dict() for k, v in self.speedups().items()},
                "hints": self.hints}

    def save(self, path: str, overwrite: bool = False) -> str:
        """Writes the pruned model (Keras 3 ``.keras`` when the input was Keras 3, else by extension)."""
        from kcompress.io import save_model

        save_model(self.model, path, overwrite=overwrite, keras3=self.keras3 and path.endswith(".keras"))
        return path


LATENCY_TRIALS = 7  # interleaved trials of the four .tflite files (fp32/int8, before/after)


def measure_models(models, train, structured: bool = True, seed: int = 0, trials: int = LATENCY_TRIALS,
                   runs: int = 30, warmup: int = 5) -> list[dict]:
    """Sizes of each model (``prune`` passes the input and the pruned one) and, with ``structured``, int8 size
    (calibrated on 100 stratified ``train`` samples) and fp32/int8 latency, 1 thread, batch 1. All the files are
    timed in one run with their trials interleaved, so speed-ups between the models compare trials timed side by
    side (the host's load drifts between runs: timed apart, the same file's int8 p50 moved from 0.24 to 0.38 ms on
    a 2-core machine)."""
    from kcompress.bench.host import bench_tflite_many
    from kcompress.modelinfo import count_macs, count_params, input_shape
    from kcompress.options import QuantizeOptions
    from kcompress.pruning.magnitude import sizes
    from kcompress.quantization.ptq import convert

    outs, files = [], []
    for model in models:
        fp32 = convert(model)
        out = {"params": count_params(model)["total"], "macs": count_macs(model, input_shape=train.sample_shape),
               "fp32_tflite": sizes(fp32)}
        if structured:
            shape = input_shape(model)
            int8 = convert(model, QuantizeOptions(mode="int8", io="float"),
                           calibration=lambda: train.calibration_samples(shape, 100, seed=seed))
            out["int8_tflite_bytes"] = len(int8)
            files += [fp32, int8]
        outs.append(out)
    if files:
        timed = bench_tflite_many(files, threads=1, runs=runs, warmup=warmup, trials=trials)
        for i, out in enumerate(outs):
            f, q = timed[2 * i], timed[2 * i + 1]
            out["fp32_p50_ms"], out["int8_p50_ms"] = f.p50_interval.median, q.p50_interval.median
            out["fp32_p50_trials_ms"], out["int8_p50_trials_ms"] = list(f.trial_p50s), list(q.trial_p50s)
    return outs


def _speed_hint(before: dict, after: dict, details: dict, opts: PruneOptions) -> Optional[str]:
    """A hint when the measured fp32 speed-up lags the MACs removed (probes the host's tile only then)."""
    from kcompress.bench.schema import speedup
    from kcompress.pruning.tiles import channel_tile, slow_speedup, tile_hint

    s = speedup(before["fp32_p50_trials_ms"], after["fp32_p50_trials_ms"]).median
    if not slow_speedup(before["macs"], after["macs"], s):
        return None
    return tile_hint(details.get("groups") or [], channel_tile().tile, before["macs"] / max(after["macs"], 1), s,
                     str(opts.granularity))


def prune(model, train, val=None, *, test=None, test_split: float = 0.0, train_limit: Optional[int] = None,
          method: Optional[str] = None,
          options: Optional[PruneOptions] = None, preprocess=None, seed: int = 0, measure: bool = True, verbose: Optional[int] = None,
          log: Callable[[str], None] = _quiet, train_options: Optional[TrainOptions] = None,
          trust_model: bool = False, checkpoint_dir: Optional[str] = None, resume: bool = False,
          overwrite_checkpoints: bool = False, teacher=None, **option_fields) -> PruneResult:
    """Prunes ``model`` with fine-tuning on ``train`` (best epoch chosen on ``val`` when given).

    Keywords are fields of :class:`~kcompress.options.PruneOptions` (``target_flops=0.5``, ``sparsity=0.8``,
    ``block="2:4"`` ...). ``measure=False`` skips the before/after conversion and timing. ``train_options``:
    the fine-tunes' optimizer, schedule and augmentation (:class:`~kcompress.options.TrainOptions`).
    ``trust_model``: load a model file even with Lambda layers or unregistered classes (files you trust only).
    ``checkpoint_dir`` (structured pruning): the model after each round and each fine-tune epoch; ``resume``
    continues from them, ``overwrite_checkpoints`` starts over (otherwise an earlier run's checkpoints are an
    error), as in ``distill``. ``teacher`` (a model or a path; else the ``teacher`` option): structured pruning's
    fine-tunes distill it into the pruned model (the ``distill`` defaults' temperature and alpha) instead of
    training on the labels alone.
    """
    import warnings

    from kcompress.data import check_fits
    from kcompress.distributed import distribute_early, worker_path
    from kcompress.modelinfo import input_shape, num_classes

    opts = resolve_options(PruneOptions, options, method=method, **option_fields)
    topts = resolve_options(TrainOptions, train_options)
    distribute_early(topts.strategy)  # multi-worker: before any model is loaded
    checkpoint_dir = worker_path(checkpoint_dir, copy=resume) if checkpoint_dir else None  # the chief's only
    preprocess = preprocess_of(train, preprocess)
    m = as_model(model, stage="prune", trust_model=trust_model)
    tr, va, te = as_splits(train, val, test, test_split=test_split, seed=seed, preprocess=preprocess,
                           train_limit=train_limit)
    for d in (tr, va, te):
        if d is not None:
            check_fits(d, input_shape(m.model), num_classes(m.model))
    structured = opts.method == PruneMethod.STRUCTURED
    if teacher is not None and not structured:
        raise UsageError("a teacher applies to method structured only (magnitude fine-tunes on labels)")
    log(f"pruning ({opts.method}) with {opts.epochs} fine-tuning epoch(s) ...")
    if structured:
        from kcompress.pruning.structured import prune_structured

        if checkpoint_dir and overwrite_checkpoints and not resume:  # else an earlier run's are refused
            import shutil

            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        fine_tune = None
        teacher = teacher if teacher is not None else opts.teacher
        if teacher is not None:
            from kcompress.distillation.finetune import teacher_fine_tune

            if teacher == "baseline":
                raise UsageError("teacher 'baseline' names a pipeline's input model; give a model file")
            t = as_model(teacher, stage="prune", trust_model=trust_model).model
            check_fits(tr, input_shape(t), num_classes(t))
            fine_tune = teacher_fine_tune(t, tr, va, opts.batch_size, train_options=topts, verbose=verbose, log=log)
        r = prune_structured(m.model, tr, va, opts, seed=seed, verbose=verbose, train_options=topts, log=log,
                             checkpoint_dir=checkpoint_dir, resume=resume, fine_tune=fine_tune)
        details = {"groups": r.groups, "frozen": r.frozen, "rounds": r.rounds,
                   "removed_blocks": r.staged.get("removed_blocks", []), "latency": r.staged.get("latency"),
                   "target_met": r.target_met, "shortfall": r.shortfall, "flattened": r.flattened,
                   "channel_multiple": r.channel_multiple}
        notes: list[str] = list(r.staged.get("notes", [])) + ([f"target missed: {r.shortfall}"] if r.shortfall else [])
    else:
        from kcompress.pruning.magnitude import prune_magnitude

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # kept in the result's warnings instead
            r = prune_magnitude(m.model, tr, va, opts, seed=seed, verbose=verbose, train_options=topts, log=log)
        details = {"pruned": r.pruned, "skipped": r.skipped, "sparsity": r.sparsity,
                   "overall_sparsity": r.overall_sparsity, "total_sparsity": r.total_sparsity,
                   "target_sparsity": opts.target_sparsity, "target_met": r.target_met, "flattened": r.flattened}
        notes = list(r.warnings)
        if not r.target_met:
            details["shortfall"] = (f"sparsity {r.overall_sparsity:.1%} of the pruned kernels, target "
                                    f"{r.target:.0%}")
            notes.append(f"sparsity {r.overall_sparsity:.1%} of the pruned kernels missed the target "
                         f"{r.target:.0%} by more than 5 points")
    before, after = measure_models((m.model, r.model), tr, structured, seed) if measure else ({}, {})
    if structured and after.get("fp32_p50_trials_ms"):
        details["speed_hint"] = _speed_hint(before, after, details, opts)
    from kcompress.evaluation import test_figures

    figures = test_figures({"before": m.model, "after": r.model}, te)
    return PruneResult(model=r.model, method=opts.method, options=opts, accuracy_before=r.accuracy_before,
                       accuracy_after=r.accuracy_after, details=details, before=before, after=after,
                       warnings=tuple(notes), keras3=m.keras3, test=figures)
