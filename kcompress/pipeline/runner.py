"""Runs a config's stages in order, validating after each, with resume.

Stages and their folders under RUN_DIR: ``00-train`` (only with ``model.architecture``), ``01-baseline``,
``02-distill``, ``03-prune``, ``04-quantize``, ``05-benchmark``. Each holds the stage's model, ``metrics.json``
(accuracy on the whole validation set, size, parameters, MACs, fp32/int8 latency), ``outputs.npz`` (validation
outputs, for the report), ``config.yaml`` (the exact config), ``log.txt`` and, written last, ``stage.json``.

Resume: a stage whose ``stage.json`` carries the same chain hash (its own config section hashed together with
every earlier stage's) is skipped; changing one stage's settings reruns it and everything after it.
Gates: a stage whose accuracy falls more than its ``max_drop`` points below the previous stage, or the run more
than ``max_drop`` below the baseline, stops the run with :class:`GateFailed`, keeping every artifact. So does a
prune stage that misses its target (sparsity, or FLOPs) by more than 5 points (``target_met`` in its metrics).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from kcompress.errors import KcompressError
from kcompress.pipeline.config import RunConfig, config_hash, config_to_dict, dump_yaml
from kcompress.pipeline.report import STAGE_DIRS
from kcompress.pipeline.resume import (
    chain as chain_hash,
)
from kcompress.pipeline.resume import (
    content_fingerprint,
    data_fingerprint,
    finished,
    stage_model,
    started,
)
from kcompress.types import PruneMethod, QATPolicy, QuantMode

__all__ = ["GateFailed", "StageRecord", "RunResult", "run_pipeline", "execute"]



class GateFailed(KcompressError):
    """A stage lost more accuracy than allowed; the run stopped with its artifacts kept."""


@dataclass(frozen=True)
class StageRecord:
    stage: str
    dir: str
    model_path: str
    metrics: dict
    skipped: bool = False


def _write_json(path: str, obj) -> None:
    from kcompress.io import write_json

    write_json(path, obj, overwrite=True)


class _Ctx:
    """What every stage needs: config, the three splits, run folder, log."""

    def __init__(self, cfg: RunConfig, run_dir: str, log: Callable[[str], None]):
        self.cfg = cfg
        self.run_dir = run_dir
        self.log = log
        self.splits = cfg.data.open(seed=cfg.seed)
        self.train, self.val, self.test = self.splits.train, self.splits.val, self.splits.test
        self.baseline_accuracy: Optional[float] = None
        self.resume_stage = False  # the current stage may continue an interrupted run's work

    def calibration(self, shape, n=None):
        n = n or self.cfg.quantize.calibration_samples
        return lambda: self.train.calibration_samples(shape, n, seed=self.cfg.seed)


def _split_metrics(ev) -> dict:
    keys = ("accuracy", "macro_f1", "top5_accuracy", "per_class_recall", "mean_confidence", "num_samples",
            "output_kind")
    return {k: ev.metrics[k] for k in keys if k in ev.metrics}


def _latency(r) -> dict:
    """p50 (median of the trials' p50s, 1 thread, batch 1) with each trial's p50, so speed-ups carry an interval."""
    return {"latency_p50_ms": r.p50_interval.median, "latency_p50_trials_ms": list(r.trial_p50s),
            "delegate": r.delegate}


def _measure(ctx: _Ctx, stage: str, model_or_tflite, path: str, evaluation=None, fp32: Optional[bytes] = None,
             model_bytes: Optional[int] = None) -> tuple[dict, dict]:
    """VAL (and TEST) metrics plus size, params, MACs and measured latency of what a stage produced.

    ``accuracy`` and the other top-level figures are on VAL (what the gates check); ``test`` holds the same figures
    on TEST when there is one. ``evaluation`` (on ``ctx.val``) and ``fp32`` (the Keras model's fp32 .tflite), when
    a stage already made them, are reused. ``model_bytes``: the .tflite's size without kcompress's metadata."""
    from kcompress.bench.host import bench_tflite
    from kcompress.evaluation import evaluate
    from kcompress.io import path_size
    from kcompress.modelinfo import count_macs, count_params
    from kcompress.quantization.ptq import convert

    ev = evaluation or evaluate(model_or_tflite, ctx.val, description=f"validating {stage} (val)")
    m: dict[str, Any] = {"stage": stage, "split": "val", **_split_metrics(ev), "size_bytes": path_size(path)}
    outputs = {"outputs": ev.outputs, "labels": ev.labels}
    if ctx.test is not None:
        tev = evaluate(model_or_tflite, ctx.test, description=f"testing {stage} (test)")
        m["test"] = _split_metrics(tev)
        outputs.update(test_outputs=tev.outputs, test_labels=tev.labels)
    if isinstance(model_or_tflite, (bytes, bytearray)):
        m["kind"] = "tflite"
        m["tflite_bytes"] = model_bytes or len(model_or_tflite)
        m.update(_latency(bench_tflite(model_or_tflite, threads=1, runs=30, warmup=10, trials=5)))
    else:
        model = model_or_tflite
        m["kind"] = "keras"
        m["params"] = count_params(model)["total"]
        m["macs"] = count_macs(model, input_shape=ctx.val.sample_shape)
        fp32 = fp32 or convert(model)
        m["tflite_fp32_bytes"] = len(fp32)
        m.update(_latency(bench_tflite(fp32, threads=1, runs=30, warmup=10, trials=5)))
    return m, outputs


# ------------------------------------------------------------------------------------------------------ stages
def _stage_train(ctx: _Ctx, model, out_dir: str):
    from kcompress import zoo as architectures
    from kcompress.io import save_model
    from kcompress.train import fit

    mc = ctx.cfg.model
    shape = ctx.train.sample_shape or (32, 32, 3)
    build = getattr(architectures, mc.architecture)
    model = build(input_shape=tuple(shape), num_classes=ctx.train.num_classes)
    ctx.log(f"training {mc.architecture} for {mc.epochs} epochs on {ctx.train.name}")
    fit(model, ctx.train, ctx.val, epochs=mc.epochs, batch_size=mc.batch_size, lr=mc.rate(ctx.cfg.train.optimizer),
        seed=ctx.cfg.seed,
        train_options=ctx.cfg.train, log=ctx.log)
    path = os.path.join(out_dir, "model.keras")
    save_model(model, path, overwrite=True)
    return model, path, {}, {}


def _stage_baseline(ctx: _Ctx, model, out_dir: str):
    from kcompress.io import save_model
    from kcompress.pipeline.baseline import baseline_run

    record, evaluation, fp32 = baseline_run(model, ctx.val, ctx.cfg.baseline)
    _write_json(os.path.join(out_dir, "baseline.json"), record)
    path = os.path.join(out_dir, "model.keras")
    save_model(model, path, overwrite=True)
    return model, path, {"flops": record["flops"]}, {"evaluation": evaluation, "fp32": fp32}


def _stage_distill(ctx: _Ctx, model, out_dir: str):
    from kcompress.distillation.trainer import distill
    from kcompress.io import load_model, save_model

    c = ctx.cfg.distill
    student = load_model(c.student, stage="distill") if c.student else c.student_width
    ckpt = os.path.join(out_dir, "checkpoints")
    resume = ctx.resume_stage and os.path.exists(os.path.join(ckpt, "state.json"))
    if resume:
        ctx.log(f"continuing the interrupted distillation from {ckpt}")
    elif os.path.isdir(ckpt):
        shutil.rmtree(ckpt)  # checkpoints of other settings: this run starts over
    result = distill(model, student, ctx.train, ctx.val, c, seed=ctx.cfg.seed, checkpoint_dir=ckpt, resume=resume,
                     train_options=ctx.cfg.train, log=ctx.log)
    path = os.path.join(out_dir, "model.keras")
    save_model(result.student, path, overwrite=True)
    extra = {"teacher_params": result.teacher_params, "student_params": result.student_params,
             "best_epoch": result.best_epoch, "warnings": list(result.warnings)}
    return result.student, path, extra, {}


def _stage_prune(ctx: _Ctx, model, out_dir: str):
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

        result = prune_structured(model, ctx.train, ctx.val, c, seed=ctx.cfg.seed, train_options=ctx.cfg.train,
                                  log=ctx.log)
        extra = {"method": "structured", "macs_before": result.macs_before, "macs_after": result.macs_after,
                 "params_before": result.params_before, "params_after": result.params_after,
                 "removed_blocks": result.staged.get("removed_blocks", []), "latency": result.staged.get("latency"),
                 "warnings": list(result.staged.get("notes", [])), "target_met": result.target_met,
                 "shortfall": result.shortfall, "flattened": result.flattened}
        for note in extra["warnings"]:
            ctx.log(f"note: {note}")
    path = os.path.join(out_dir, "model.keras")
    save_model(result.model, path, overwrite=True)
    return result.model, path, extra, {}


def _stage_quantize(ctx: _Ctx, model, out_dir: str, prev_accuracy: float):
    """PTQ first; QAT when PTQ misses max_drop (qat: auto) or always; keeps the better on VAL."""
    from kcompress.evaluation import evaluate
    from kcompress.modelinfo import input_shape
    from kcompress.quantization.ptq import convert
    from kcompress.quantization.sensitivity import choose_float_layers

    c = ctx.cfg.quantize
    opts, _ = choose_float_layers(model, c, ctx.train, ctx.val, log=ctx.log)
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
        result = qat(model, ctx.train, ctx.val, ctx.cfg.qat, opts, seed=ctx.cfg.seed, ptq=False, bench=False,
                     log=ctx.log, train_options=ctx.cfg.train)
        qat_ev = result.evaluation  # the QAT .tflite in LiteRT on ctx.val, as qat() measured it
        qat_acc = extra["qat_accuracy"] = qat_ev.accuracy
        if qat_acc > ptq_acc:
            chosen, chosen_ev, extra["method"] = result.tflite, qat_ev, "qat"
        ctx.log(f"QAT int8: {100 * qat_acc:.2f}%; keeping {extra['method'].upper()}")
    extra["accuracy"] = max(ptq_acc, extra.get("qat_accuracy", -1.0))
    if ctx.baseline_accuracy is not None:
        extra["baseline_accuracy"] = ctx.baseline_accuracy
    return chosen, extra, chosen_ev


def _with_metadata(ctx: _Ctx, tfl: bytes, records: list[StageRecord], extra: dict) -> bytes:
    """The final .tflite with kcompress's metadata: how to feed it (preprocessing, class names), the stages with
    their settings and accuracies (VAL, and TEST when there is one), and the config hash."""
    from kcompress import __version__
    from kcompress.quantization.metadata import add_metadata, deployment_info

    stages = []
    for r in records:
        section = getattr(ctx.cfg, {"train": "model"}.get(r.stage, r.stage))
        stages.append({"stage": r.stage, "settings": section.to_dict(), "val_accuracy": r.metrics.get("accuracy"),
                       "test_accuracy": r.metrics.get("test", {}).get("accuracy")})
    settings = config_to_dict(ctx.cfg.quantize)
    if extra.get("method") == "qat":
        settings["qat_settings"] = config_to_dict(ctx.cfg.qat)
    stages.append({"stage": "quantize", "settings": settings, "val_accuracy": extra.get("accuracy")})
    return add_metadata(tfl, {
        "model_name": ctx.cfg.name,
        "kcompress_version": __version__,
        "config_hash": config_hash(ctx.cfg),
        **deployment_info(ctx.train),
        "stages": stages,
        "metrics": extra,
    })


# -------------------------------------------------------------------------------------------------------- runner
def _stage_settings(cfg: RunConfig, stage: str) -> dict:
    """What a stage's result depends on, for the resume chain.

    ``max_drop`` is left out where it only gates (loosening a gate and resuming re-checks it without redoing the
    stage), but kept in the quantize stage when it chooses the model (``qat: auto``, ``float_layers: auto``). The
    ``qat`` section counts for the quantize stage only when that stage may run QAT; the ``train`` section
    (optimizer, schedule, augmentation) for every stage that trains."""
    settings = getattr(cfg, {"train": "model"}.get(stage, stage)).to_dict()
    q = cfg.quantize
    if stage == "quantize" and q.qat != QATPolicy.NEVER:
        settings["qat_settings"] = cfg.qat.to_dict()
    if stage in ("train", "distill", "prune") or "qat_settings" in settings:
        settings["train_settings"] = cfg.train.to_dict()
    if not (stage == "quantize" and (q.qat == QATPolicy.AUTO or q.auto_float_layers)):
        settings.pop("max_drop", None)
    return settings


@dataclass(frozen=True)
class RunResult:
    """A finished pipeline run: its config, folder, one record per stage, and the report files."""

    config: RunConfig
    run_dir: str
    stages: tuple
    report: dict  # kind -> path (json, md, and the plots)

    @property
    def final(self) -> StageRecord:
        """The last model-producing stage (the benchmark stage re-reports the final model)."""
        return [r for r in self.stages if r.stage != "benchmark"][-1]

    @property
    def final_model(self) -> str:
        return self.final.model_path

    @property
    def accuracy(self) -> float:
        return self.final.metrics["accuracy"]

    def stage(self, name: str) -> StageRecord:
        return next(r for r in self.stages if r.stage == name)

    def to_dict(self) -> dict:
        return {"config_hash": config_hash(self.config), "run_dir": self.run_dir, "report": self.report,
                "stages": [{"stage": r.stage, "dir": r.dir, "model_path": r.model_path, "skipped": r.skipped,
                            "metrics": r.metrics} for r in self.stages]}


def run_pipeline(config, run_dir: Optional[str] = None, overrides=(), resume: bool = False,
                 log: Callable[[str], None] = print, report: bool = True) -> RunResult:
    """Runs a pipeline: ``config`` is a YAML path, a dict or a RunConfig; ``overrides`` are ``section.key=value``
    strings; ``run_dir`` defaults to ``runs/<name>``. Raises GateFailed when a stage loses more than allowed."""
    from kcompress.pipeline.config import apply_overrides, config_from_dict, load_config

    if isinstance(config, RunConfig):
        cfg = config_from_dict(apply_overrides(config.to_dict(), list(overrides))) if overrides else config
    elif isinstance(config, dict):
        cfg = config_from_dict(apply_overrides(config, list(overrides)))
    else:
        cfg, _ = load_config(str(config), list(overrides))
    run_dir = run_dir or os.path.join("runs", cfg.name)
    records = execute(cfg, run_dir, resume=resume, log=log)
    paths: dict = {}
    if report:
        from kcompress.pipeline.report import write_report

        paths = write_report([run_dir])
    return RunResult(cfg, run_dir, tuple(records), paths)


def execute(cfg: RunConfig, run_dir: str, resume: bool = False, log: Callable[[str], None] = print
            ) -> list[StageRecord]:
    """Runs every enabled stage; returns one record per stage. Raises GateFailed when a gate stops the run.

    The resume chain starts from the model file's and the data's content (not their paths), so retraining
    ``model.keras`` in place reruns every stage; ``run.json`` lists this run's stages, so the report leaves out the
    folders of stages a later config disabled."""
    from kcompress.io import atomic_write_bytes, load_model, write_json

    if os.path.exists(run_dir) and os.listdir(run_dir) and not resume:
        raise KcompressError(f"{run_dir} exists and is not empty; pass --resume to continue it or choose another -o")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(f"# config hash {config_hash(cfg)}\n" + dump_yaml(cfg))
    ctx = _Ctx(cfg, run_dir, log)
    log(f"data: {ctx.splits.describe()}")
    plan = ["train"] if cfg.model.architecture else []
    plan += ["baseline"] + [name for name in ("distill", "prune", "quantize") if getattr(cfg, name).enabled]
    if cfg.quantize.enabled:
        plan.append("benchmark")
    write_json(os.path.join(run_dir, "run.json"), {"stages": plan, "config_hash": config_hash(cfg),
                                                   "splits": ctx.splits.describe()}, overwrite=True)

    records: list[StageRecord] = []
    start = {"data": config_to_dict(cfg.data), "seed": cfg.seed, "model": config_to_dict(cfg.model),
             "data_content": data_fingerprint(ctx.splits)}
    if cfg.model.path:
        start["model_content"] = content_fingerprint(cfg.model.path)
    chain = chain_hash("", start)
    model = None if cfg.model.architecture else cfg.model.path
    base_acc: Optional[float] = None
    for stage in plan:
        chain = chain_hash(chain, _stage_settings(cfg, stage))
        sdir = os.path.join(run_dir, STAGE_DIRS[stage])
        done = finished(sdir, chain) if resume else None
        if done is not None:
            with open(os.path.join(sdir, "metrics.json"), encoding="utf-8") as f:
                metrics = json.load(f)
            model = stage_model(sdir, done)
            records.append(StageRecord(stage, sdir, model, metrics, skipped=True))
            log(f"[{stage}] finished earlier, skipped")
        else:
            os.makedirs(sdir, exist_ok=True)
            if os.path.exists(os.path.join(sdir, "stage.json")):
                os.unlink(os.path.join(sdir, "stage.json"))
            ctx.resume_stage = started(sdir, chain)
            t0 = time.time()
            log(f"[{stage}] running in {sdir}")
            lines: list[str] = []

            def slog(msg: str) -> None:
                lines.append(msg)
                log(f"[{stage}] {msg}")

            ctx.log = slog
            if stage == "benchmark":
                records.append(_run_benchmark(ctx, records, sdir, chain))
                continue
            if isinstance(model, str):
                model = load_model(model)
            prev_acc = records[-1].metrics["accuracy"] if records else None
            if stage == "quantize":
                tfl, extra, evaluation = _stage_quantize(ctx, model, sdir, prev_acc)
                plain = len(tfl)
                tfl = _with_metadata(ctx, tfl, records, extra)
                path = os.path.join(sdir, "model.tflite")
                atomic_write_bytes(path, tfl, overwrite=True)
                metrics, outputs = _measure(ctx, stage, tfl, path, evaluation=evaluation, model_bytes=plain)
                metrics["metadata_bytes"] = len(tfl) - plain
                for key in ("params", "macs"):  # the same network, now in int8
                    metrics[key] = records[-1].metrics.get(key)
                produced = path
            else:
                fn = {"train": _stage_train, "baseline": _stage_baseline, "distill": _stage_distill,
                      "prune": _stage_prune}[stage]
                model, produced, extra, known = fn(ctx, model, sdir)
                metrics, outputs = _measure(ctx, stage, model, produced, **known)
            metrics.update(extra)
            metrics["seconds"] = round(time.time() - t0, 1)
            metrics["config_hash"] = config_hash(cfg)
            _write_json(os.path.join(sdir, "metrics.json"), metrics)
            np.savez_compressed(os.path.join(sdir, "outputs.npz"), **outputs)
            with open(os.path.join(sdir, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(f"# config hash {config_hash(cfg)}; stage {stage}\n" + dump_yaml(cfg))
            with open(os.path.join(sdir, "log.txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            _write_json(os.path.join(sdir, "stage.json"),
                        {"stage": stage, "chain": chain, "config_hash": config_hash(cfg),
                         "model_file": os.path.relpath(produced, sdir), "finished": time.time()})
            records.append(StageRecord(stage, sdir, produced, metrics))
            model = model if stage != "quantize" else produced
            test = f", test {100 * metrics['test']['accuracy']:.2f}%" if "test" in metrics else ""
            log(f"[{stage}] val accuracy {100 * metrics['accuracy']:.2f}%{test}, size "
                f"{metrics['size_bytes'] / 1e3:.1f} kB, p50 {metrics['latency_p50_ms']:.3f} ms "
                f"({metrics['seconds']:.0f} s)")
        _gate(cfg, records, base_acc)
        if stage == "baseline":
            base_acc = ctx.baseline_accuracy = records[-1].metrics["accuracy"]
    return records


def _gate(cfg: RunConfig, records: list[StageRecord], base_acc: Optional[float]) -> None:
    if len(records) < 2:
        return
    cur, prev = records[-1], records[-2]
    if cur.stage in ("train", "baseline", "benchmark") or prev.stage == "train":
        return
    section = getattr(cfg, cur.stage)
    if cur.metrics.get("target_met") is False:
        raise GateFailed(f"stage {cur.stage} missed its target by more than 5 points ({cur.metrics.get('shortfall')}); "
                         f"artifacts kept in {cur.dir}")
    drop = 100 * (prev.metrics["accuracy"] - cur.metrics["accuracy"])
    if drop > section.max_drop:
        raise GateFailed(
            f"stage {cur.stage} dropped VAL accuracy by {drop:.2f} points ({100 * prev.metrics['accuracy']:.2f}% -> "
            f"{100 * cur.metrics['accuracy']:.2f}%), more than its max_drop {section.max_drop}; artifacts kept in "
            f"{cur.dir}"
        )
    if base_acc is not None:
        total = 100 * (base_acc - cur.metrics["accuracy"])
        if total > cfg.max_drop:
            raise GateFailed(
                f"after stage {cur.stage} the run is {total:.2f} points below the baseline on VAL, more than max_drop "
                f"{cfg.max_drop}; artifacts kept in {cur.dir}"
            )


def _run_benchmark(ctx: _Ctx, records: list[StageRecord], sdir: str, chain: str) -> StageRecord:
    from kcompress.bench.host import bench_report

    b = ctx.cfg.benchmark
    final = records[-1]
    report = bench_report([final.model_path], tuple(b.threads), tuple(b.batch_sizes), b.runs, b.warmup, b.trials)
    _write_json(os.path.join(sdir, "bench.json"), report.to_dict())
    metrics = dict(final.metrics)
    metrics["stage"] = "benchmark"
    metrics["bench"] = [
        {"threads": r.threads, "batch_size": r.batch_size, "p50_ms": r.p50_interval.median,
         "p50_interval_ms": [r.p50_interval.low, r.p50_interval.high], "trials": r.p50_interval.trials,
         "p95_ms": r.latency_ms.p95, "throughput_per_s": r.throughput_per_s, "delegate": r.delegate,
         "io": r.extra.get("io"), "peak_rss_mb": r.memory_mb.get("peak_rss"),
         "rss_increase_mb": r.memory_mb.get("rss_increase")}
        for r in report.results
    ]
    _write_json(os.path.join(sdir, "metrics.json"), metrics)
    _write_json(os.path.join(sdir, "stage.json"),
                {"stage": "benchmark", "chain": chain, "model_file": os.path.relpath(final.model_path, sdir),
                 "finished": time.time()})
    for r in report.results:
        i = r.p50_interval
        ctx.log(f"threads {r.threads} batch {r.batch_size}: p50 {i.median:.3f} ms ({i.low:.3f}-{i.high:.3f}, "
                f"{i.trials} trials), inference memory +{r.memory_mb.get('rss_increase') or 0:.1f} MB")
    return StageRecord("benchmark", sdir, final.model_path, metrics)
