"""One sweep trial: an ordinary pipeline run folder ``SWEEP_DIR/trial-NNN/``, with stages shared from earlier trials.

:func:`run_trial` is what every backend runs (in this process, a worker process, or a Ray task): it takes a plain
dict and returns one, never raises for a failed trial (a gate, a bad combination of values, an error: the reason is
recorded) and writes ``trial.json`` in the trial folder last, so a trial folder with a ``trial.json`` is finished.

Stage sharing: before the run, the finished stage folders of an earlier trial whose settings are equal up to that
stage (the data, seed, model and train sections, and every planned stage's section up to it: the settings the
pipeline's resume chain hashes, compared here section by section, conservatively) are copied in (hard links where
the file system allows) and the run resumes, so the runner skips them after checking their chain hash itself. A
copy whose chain does not match is simply rerun (every runner write replaces files by renaming, so a hard-linked
original is never changed). ``shared_stages`` counts the copied stages the runner then skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from typing import Any, Optional

__all__ = ["run_trial", "trial_dir_name", "plan_stages", "share_keys", "share_stages", "trial_metrics", "TRIAL_FILE"]

TRIAL_FILE = "trial.json"
STAGE_DIRS = {"train": "00-train", "baseline": "01-baseline", "distill": "02-distill", "prune": "03-prune",
              "quantize": "04-quantize", "benchmark": "05-benchmark"}  # as kcompress.pipeline.report.STAGE_DIRS


def trial_dir_name(number: int) -> str:
    return f"trial-{number:03d}"


def plan_stages(cfg) -> list[str]:
    """The stages a config runs, in order (as the runner plans them)."""
    plan = ["train"] if cfg.model.architecture else []
    plan += ["baseline"] + [name for name in ("distill", "prune", "quantize") if getattr(cfg, name).enabled]
    return plan + (["benchmark"] if cfg.quantize.enabled else [])


def share_keys(cfg) -> list[tuple[str, str]]:
    """``[(stage, key)]``: two configs' stage can be shared when their keys for it are equal. A key covers what the
    resume chain covers up to the stage, and a little more (every stage's max_drop but the quantize stage's is left
    out, as in the chain; the qat section always counts for quantize), so equal keys imply equal chains."""
    d = cfg.to_dict()
    key = json.dumps({s: d[s] for s in ("data", "seed", "model", "train")}, sort_keys=True)
    out = []
    for stage in plan_stages(cfg):
        section = dict(d["model" if stage == "train" else stage])
        if stage != "quantize":
            section.pop("max_drop", None)
        extra = [d["qat"], d.get("convert")] if stage == "quantize" else None
        key = json.dumps([key, stage, section, extra], sort_keys=True)
        out.append((stage, key))
    return out


def _stage_finished(stage_dir: str) -> bool:
    return os.path.exists(os.path.join(stage_dir, "stage.json")) and os.path.exists(
        os.path.join(stage_dir, "metrics.json"))


def _read_config(run_dir: str):
    import yaml

    from kcompress.pipeline.config import config_from_dict

    try:
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
            return config_from_dict(yaml.safe_load(f))
    except Exception:  # an unreadable or older folder: nothing to share from it
        return None


def _copy_tree(src: str, dst: str) -> None:
    ignore = shutil.ignore_patterns("checkpoints", "started.json")
    try:
        shutil.copytree(src, dst, copy_function=os.link, ignore=ignore)
    except OSError:  # no hard links here (another file system, or not allowed): plain copies
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=ignore)


def share_stages(cfg, trial_dir: str, sweep_dir: str) -> tuple[list[str], Optional[str]]:
    """Copies into ``trial_dir`` the longest run of finished stages an earlier trial folder has with equal settings;
    returns the stages copied and the folder they came from. Stages ``trial_dir`` already finished are kept."""
    mine = share_keys(cfg)
    best: tuple[int, Optional[str]] = (0, None)
    for name in sorted(os.listdir(sweep_dir)):
        other = os.path.join(sweep_dir, name)
        if not name.startswith("trial-") or os.path.abspath(other) == os.path.abspath(trial_dir):
            continue
        other_cfg = _read_config(other)
        if other_cfg is None:
            continue
        n = 0
        for (stage, key), (ostage, okey) in zip(mine, share_keys(other_cfg)):
            if key != okey or not _stage_finished(os.path.join(other, STAGE_DIRS[stage])):
                break
            n += 1
        if n > best[0]:
            best = (n, other)
    n, source = best
    copied = []
    for stage, _ in mine[:n]:
        dst = os.path.join(trial_dir, STAGE_DIRS[stage])
        if _stage_finished(dst):
            continue
        shutil.rmtree(dst, ignore_errors=True)  # an interrupted attempt's leftovers
        os.makedirs(trial_dir, exist_ok=True)
        _copy_tree(os.path.join(source, STAGE_DIRS[stage]), dst)
        copied.append(stage)
    return copied, (os.path.basename(source) if copied else None)


def trial_metrics(result) -> dict:
    """The figures a sweep compares, from a finished :class:`~kcompress.pipeline.runner.RunResult`: VAL accuracy of
    the final stage (what chooses), TEST beside it when the run has a TEST split, bytes of the final .tflite
    (without kcompress's metadata; a final Keras stage counts as its fp32 .tflite), and the p50 latency (1 thread,
    batch 1) from the benchmark stage, or the final stage's own measurement when there is no benchmark stage."""
    final = result.final.metrics
    bench = next((r.metrics for r in result.stages if r.stage == "benchmark"), None)
    latency, source = final.get("latency_p50_ms"), f"{result.final.stage} stage (1 thread, batch 1)"
    rows = (bench or {}).get("bench") or []
    row = next((r for r in rows if r["threads"] == 1 and r["batch_size"] == 1), rows[0] if rows else None)
    if row is not None:
        latency, source = row["p50_ms"], f"benchmark stage ({row['threads']} thread(s), batch {row['batch_size']})"
    return {
        "accuracy": final["accuracy"],
        "test_accuracy": (final.get("test") or {}).get("accuracy"),
        "size_bytes": final.get("tflite_bytes") or final.get("tflite_fp32_bytes") or final.get("size_bytes"),
        "latency_ms": latency,
        "latency_source": source,
        "final_stage": result.final.stage,
        "final_model": os.path.relpath(result.final_model, result.run_dir),
        "stages": {r.stage: {"accuracy": r.metrics.get("accuracy"),
                             "test_accuracy": (r.metrics.get("test") or {}).get("accuracy"),
                             "skipped": r.skipped} for r in result.stages},
    }


def run_trial(spec: dict) -> dict:
    """Runs one trial: ``spec`` has ``number``, ``params`` (dotted key -> value), ``base`` (the base config as a
    dict), ``sweep_dir`` (absolute), ``cwd`` (where relative paths in the config start) and ``trust_model``.
    Returns the trial record that is also written to ``trial.json``."""
    if spec.get("cwd") and os.getcwd() != spec["cwd"]:
        os.chdir(spec["cwd"])  # a worker process or Ray task: relative paths in the config start where the sweep did
    number, params = spec["number"], spec["params"]
    trial_dir = os.path.join(spec["sweep_dir"], trial_dir_name(number))
    record: dict[str, Any] = {"number": number, "folder": trial_dir_name(number), "params": params,
                              "status": "failed", "reason": None, "shared_stages": 0, "shared_from": None}
    t0 = time.time()
    os.makedirs(trial_dir, exist_ok=True)
    log_path = os.path.join(trial_dir, "run.log")
    with open(log_path, "a", encoding="utf-8") as logf:
        def log(msg: str) -> None:
            logf.write(msg + "\n")
            logf.flush()

        try:
            record.update(_run(spec, trial_dir, log, record))
            record["status"] = "done"
        except Exception as e:  # a failed trial is recorded, and the sweep goes on
            from kcompress.errors import KcompressError

            # the shared stages it did not redo: those copied whose stage.json the runner left in place (it deletes
            # a stage's stage.json before rerunning it)
            kept = [st for st in record.pop("copied", ())
                    if os.path.exists(os.path.join(trial_dir, STAGE_DIRS[st], "stage.json"))]
            record.update(shared_stages=len(kept), shared=kept, shared_from=record["shared_from"] if kept else None)
            record["reason"] = str(e) if isinstance(e, KcompressError) else f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
    record["seconds"] = round(time.time() - t0, 1)
    from kcompress.io import write_json

    write_json(os.path.join(trial_dir, TRIAL_FILE), record, overwrite=True)
    return record


def _run(spec: dict, trial_dir: str, log, record: dict) -> dict:
    from kcompress.pipeline.runner import run_pipeline
    from kcompress.sweeps.space import trial_config

    cfg = trial_config(spec["base"], spec["params"])
    cfg = cfg.replace(name=f"{cfg.name}-{trial_dir_name(spec['number'])}")
    copied, source = share_stages(cfg, trial_dir, spec["sweep_dir"])
    if copied:
        log(f"sharing {', '.join(copied)} from {source}")
        record.update(copied=list(copied), shared_from=source)
    result = run_pipeline(cfg, trial_dir, resume=True, log=log, report=False,
                          trust_model=bool(spec.get("trust_model")))
    shared = [r.stage for r in result.stages if r.skipped and r.stage in copied]
    record.pop("copied", None)
    return {"shared_stages": len(shared), "shared": shared, "shared_from": source if shared else None,
            "metrics": trial_metrics(result)}
