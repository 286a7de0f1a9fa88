"""Runs a config's stages in order, validating after each, with resume.

Stages and their folders under RUN_DIR: ``00-train`` (only with ``model.architecture``), ``01-baseline``,
``02-distill``, ``03-prune``, ``04-quantize``, ``05-benchmark``. Each holds the stage's model, ``metrics.json``
(accuracy on the whole validation set, size, parameters, MACs, fp32/int8 latency), ``outputs.npz`` (validation
outputs, for the report), ``config.yaml`` (the exact config), ``log.txt`` and, written last, ``stage.json``.

Resume: a stage whose ``stage.json`` carries the same chain hash (its own config section hashed together with
every earlier stage's) is skipped; changing one stage's settings reruns it and everything after it. A stage that
a kill interrupted continues from its checkpoints (training, distillation, structured-pruning rounds, QAT: see
:mod:`kcompress.pipeline.stages`) when its settings are unchanged, else starts over.
Gates: a stage whose accuracy falls more than its ``max_drop`` points below the previous stage, or the run more
than ``max_drop`` below the baseline, stops the run with :class:`GateFailed`, keeping every artifact. So does a
prune stage that misses its target (sparsity, or FLOPs) by more than 5 points (``target_met`` in its metrics).
"""

from __future__ import annotations

import json
import os
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
from kcompress.pipeline.stages import stage_baseline, stage_distill, stage_prune, stage_quantize, stage_train
from kcompress.types import Format, QATPolicy

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
        self.baseline_model: Optional[str] = None  # the baseline stage's model file
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
    if stage == "quantize" and Format.ONNX in cfg.convert.formats:  # (only then: older runs' chains stay valid)
        settings["convert_settings"] = cfg.convert.to_dict()
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
                 log: Callable[[str], None] = print, report: bool = True, trust_model: bool = False) -> RunResult:
    """Runs a pipeline: ``config`` is a YAML path, a dict or a RunConfig; ``overrides`` are ``section.key=value``
    strings; ``run_dir`` defaults to ``runs/<name>``. Raises GateFailed when a stage loses more than allowed.
    ``trust_model``: load ``model.path`` and ``distill.student`` even with Lambda layers or unregistered classes
    (files you trust only); deliberately not a config key, so a shared config cannot vouch for its own model."""
    from kcompress.io import trusting_models
    from kcompress.pipeline.config import apply_overrides, config_from_dict, load_config

    if isinstance(config, RunConfig):
        cfg = config_from_dict(apply_overrides(config.to_dict(), list(overrides))) if overrides else config
    elif isinstance(config, dict):
        cfg = config_from_dict(apply_overrides(config, list(overrides)))
    else:
        cfg, _ = load_config(str(config), list(overrides))
    from kcompress.distributed import distribute_early, worker_path

    distribute_early(cfg.train.strategy)  # multi-worker: before any model is loaded
    run_dir = run_dir or os.path.join("runs", cfg.name)
    with trusting_models(trust_model):
        records = execute(cfg, run_dir, resume=resume, log=log)
    run_dir = worker_path(run_dir)  # where execute wrote: a temporary folder on a non-chief worker
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
    from kcompress.distributed import distribute_early, worker_path
    from kcompress.io import atomic_path, atomic_write_bytes, atomic_write_text, load_model, write_json

    distribute_early(cfg.train.strategy)  # multi-worker: before any model is loaded
    run_dir = worker_path(run_dir, copy=resume)  # a non-chief worker runs in a temporary copy (deleted at exit)
    if os.path.exists(run_dir) and os.listdir(run_dir) and not resume:
        raise KcompressError(f"{run_dir} exists and is not empty; pass --resume to continue it or choose another -o")
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_text(os.path.join(run_dir, "config.yaml"), f"# config hash {config_hash(cfg)}\n" + dump_yaml(cfg),
                      overwrite=True)
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
                tfl, extra, evaluation = stage_quantize(ctx, model, sdir, prev_acc)
                plain = len(tfl)
                tfl = _with_metadata(ctx, tfl, records, extra)
                path = os.path.join(sdir, "model.tflite")
                atomic_write_bytes(path, tfl, overwrite=True)
                metrics, outputs = _measure(ctx, stage, tfl, path, evaluation=evaluation, model_bytes=plain)
                metrics["metadata_bytes"] = len(tfl) - plain
                for key in ("params", "macs"):  # the same network, now in int8
                    metrics[key] = records[-1].metrics.get(key)
                if Format.ONNX in cfg.convert.formats:
                    from kcompress.pipeline.formats import write_onnx

                    metrics["onnx"], more = write_onnx(ctx, model, sdir, _split_metrics)
                    outputs.update(more)
                produced = path
            else:
                fn = {"train": stage_train, "baseline": stage_baseline, "distill": stage_distill,
                      "prune": stage_prune}[stage]
                model, produced, extra, known = fn(ctx, model, sdir)
                metrics, outputs = _measure(ctx, stage, model, produced, **known)
            metrics.update(extra)
            metrics["seconds"] = round(time.time() - t0, 1)
            metrics["config_hash"] = config_hash(cfg)
            _write_json(os.path.join(sdir, "metrics.json"), metrics)
            with atomic_path(os.path.join(sdir, "outputs.npz"), overwrite=True) as tmp:
                np.savez_compressed(tmp, **outputs)
            atomic_write_text(os.path.join(sdir, "config.yaml"),
                              f"# config hash {config_hash(cfg)}; stage {stage}\n" + dump_yaml(cfg), overwrite=True)
            atomic_write_text(os.path.join(sdir, "log.txt"), "\n".join(lines) + "\n", overwrite=True)
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
            ctx.baseline_model = records[-1].model_path  # the file: prune.teacher baseline
    from kcompress.monitoring.reference import write_run_reference  # drift monitoring: the final model on VAL

    write_run_reference(run_dir, [r for r in records if r.stage != "benchmark"][-1], ctx.val, log)
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
    onnx = cur.metrics.get("onnx")
    if onnx is not None and 100 * (prev.metrics["accuracy"] - onnx["accuracy"]) > section.max_drop:
        raise GateFailed(
            f"the ONNX file ({onnx['mode']}, onnxruntime) dropped VAL accuracy by "
            f"{100 * (prev.metrics['accuracy'] - onnx['accuracy']):.2f} points ({100 * prev.metrics['accuracy']:.2f}% "
            f"-> {100 * onnx['accuracy']:.2f}%), more than quantize.max_drop {section.max_drop}; artifacts kept in "
            f"{cur.dir}")
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
    files = [final.model_path]
    onnx = os.path.join(os.path.dirname(final.model_path), "model.onnx")
    if final.metrics.get("onnx") and os.path.exists(onnx):
        files.append(onnx)  # the same table for both runtimes, interleaved in one run
    report = bench_report(files, tuple(b.threads), tuple(b.batch_sizes), b.runs, b.warmup, b.trials)
    _write_json(os.path.join(sdir, "bench.json"), report.to_dict())
    metrics = dict(final.metrics)
    metrics["stage"] = "benchmark"
    metrics["bench"] = [
        {"model": os.path.basename(r.model), "runtime": r.runtime, "threads": r.threads, "batch_size": r.batch_size,
         "p50_ms": r.p50_interval.median, "init_ms": r.init_ms, "first_inference_ms": r.first_inference_ms,
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
        ctx.log(f"{os.path.basename(r.model)} ({r.runtime}) threads {r.threads} batch {r.batch_size}: p50 "
                f"{i.median:.3f} ms ({i.low:.3f}-{i.high:.3f}, "
                f"{i.trials} trials), inference memory +{r.memory_mb.get('rss_increase') or 0:.1f} MB")
    return StageRecord("benchmark", sdir, final.model_path, metrics)
