"""The sweep driver: an Optuna study over a space of config values, stored in ``SWEEP_DIR/study.db`` (SQLite).

The driver owns the study (ask/tell) and hands each trial to a backend (:mod:`kcompress.sweeps.backends`), which
runs it as an ordinary pipeline run in ``SWEEP_DIR/trial-NNN/``. Resume: COMPLETE and FAIL trials are never run
again; a trial left RUNNING by an interrupted sweep is finished in its own folder (the pipeline resumes its finished
stages; a folder whose ``trial.json`` says it finished is only read). With ``jobs > 1`` and no finished trial yet,
the first trial runs alone, so the others can share its stages.

Gotchas: a gate failure or an error fails that trial (recorded with its reason) and the sweep goes on. The grid
sampler never runs more trials than the grid has points. The random and NSGA-II samplers are seeded with
``seed`` plus the number of trials already in the study, so a resumed sweep does not draw the same values again.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
from typing import Callable, Optional

from kcompress.errors import KcompressError, UsageError
from kcompress.sweeps.options import DEFAULT_RANDOM_TRIALS, Sampler, SweepOptions
from kcompress.sweeps.results import SweepResult, TrialResult, contributions, write_results
from kcompress.sweeps.space import Space, load_space, parse_space
from kcompress.sweeps.trial import TRIAL_FILE, trial_dir_name

__all__ = ["sweep", "OPTUNA_INSTALL"]

OPTUNA_INSTALL = "kcompress sweep needs Optuna, which is not installed: pip install 'kcompress[sweep]'"
SPEC_FILE = "sweep_spec.json"
_SWEEP_MARKERS = ("study.db", SPEC_FILE, "sweep.json")


def sweep(config, space, sweep_dir: Optional[str] = None, options: Optional[SweepOptions] = None, *,
          resume: bool = False, overwrite: bool = False, log: Callable[[str], None] = print,
          trust_model: bool = False, **fields) -> SweepResult:
    """Runs a sweep: ``config`` is the base pipeline config (a YAML path, a dict or a RunConfig), ``space`` a
    SPACE.yaml path or its dict (see :mod:`kcompress.sweeps.space`); keywords are fields of :class:`SweepOptions`
    (``trials=8``, ``objectives=("accuracy", "latency")``, ``sampler="nsga2"``, ``jobs=2``, ``backend="ray"``).
    ``sweep_dir`` defaults to ``sweeps/<config name>``. Returns the trials, the Pareto front and (for a space of
    ``enabled`` switches) each stage's contribution; writes sweep.json, sweep.md and the plots there."""
    from kcompress.inputs import resolve_options

    opts = resolve_options(SweepOptions, options, **fields)
    cfg = _base_config(config)
    base = cfg.to_dict()
    if isinstance(space, Space):
        space = parse_space(space.to_dict(), base)
    elif isinstance(space, dict):
        space = parse_space(space, base)
    else:
        space = load_space(str(space), base)
    kind = opts.sampler or (Sampler.GRID if space.is_grid else Sampler.NSGA2)
    if kind == Sampler.GRID and not space.is_grid:
        key = next(p.key for p in space.params if p.grid_values is None)
        raise UsageError(f"the grid sampler needs lists of values (or ranges with a step); {key} is a continuous "
                         "range: use --sampler random or nsga2")
    target = opts.trials or (space.grid_size if kind == Sampler.GRID else DEFAULT_RANDOM_TRIALS)
    if kind == Sampler.GRID and target > space.grid_size:
        log(f"the grid has {space.grid_size} points: running {space.grid_size} trials, not {target}")
        target = space.grid_size
    try:
        import optuna
    except ImportError:
        raise KcompressError(OPTUNA_INSTALL) from None
    from kcompress.sweeps.backends import make_backend

    sweep_dir = os.path.abspath(sweep_dir or os.path.join("sweeps", cfg.name))
    header = {"name": cfg.name, "config": base, "space": space.to_dict(), "objectives": list(opts.objectives),
              "sampler": str(kind), "seed": opts.seed}
    _prepare(sweep_dir, header, resume, overwrite)
    backend = make_backend(opts.backend, opts.jobs, opts.address)
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = f"sqlite:///{os.path.join(sweep_dir, 'study.db')}"
        earlier = _trial_count(storage)
        study = optuna.create_study(study_name="kcompress", storage=storage, directions=opts.directions,
                                    sampler=_sampler(kind, space, opts.seed + earlier, target), load_if_exists=True)
        log(f"Sweep {cfg.name}: {len(space.params)} keys ({', '.join(space.keys)}), sampler {kind}, {target} trials, "
            f"objectives {', '.join(opts.objectives)}, {opts.jobs} at a time ({opts.backend}) -> {sweep_dir}")
        _drive(study, space, opts, target, backend, {"base": base, "sweep_dir": sweep_dir, "cwd": os.getcwd(),
                                                     "trust_model": trust_model}, header, log)
    finally:
        backend.close()
    result = write_results(_collect(study, sweep_dir, opts, space), space.keys, header)
    log(f"Sweep finished: {len(result.done)} done, {len(result.failed)} failed; front: {_front_text(result.front)}")
    return result


def _base_config(config):
    from kcompress.pipeline.config import RunConfig, config_from_dict, load_config

    if isinstance(config, RunConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(str(config))[0]


def _trial_count(storage: str) -> int:
    """Trials already in the sweep's study (0 when there is none yet)."""
    import optuna

    path = storage[len("sqlite:///"):]
    if not os.path.exists(path):
        return 0
    try:
        return len(optuna.load_study(study_name="kcompress", storage=storage).trials)
    except KeyError:
        return 0


def _prepare(sweep_dir: str, header: dict, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise UsageError("give --resume or --overwrite, not both")
    if os.path.isdir(sweep_dir) and os.listdir(sweep_dir):
        if overwrite:
            if not any(os.path.exists(os.path.join(sweep_dir, m)) for m in _SWEEP_MARKERS):
                raise KcompressError(f"{sweep_dir} is not a sweep folder (no study.db); not deleting it")
            shutil.rmtree(sweep_dir)
        elif not resume:
            raise KcompressError(f"{sweep_dir} exists and is not empty; pass --resume to continue the sweep, "
                                 "--overwrite to start over, or choose another -o")
    os.makedirs(sweep_dir, exist_ok=True)
    spec_path = os.path.join(sweep_dir, SPEC_FILE)
    if os.path.exists(spec_path):
        with open(spec_path, encoding="utf-8") as f:
            old = json.load(f)
        changed = [k for k in ("config", "space", "objectives", "sampler", "seed")
                   if json.dumps(old.get(k), sort_keys=True) != json.dumps(header[k], sort_keys=True, default=str)]
        if changed:
            raise UsageError(f"{sweep_dir} holds a sweep with another {', '.join(changed)}; resume it with the same "
                             "settings, or choose another -o (or --overwrite)")
        return
    from kcompress.io import write_json

    write_json(spec_path, header, overwrite=True)


def _sampler(kind: Sampler, space: Space, seed: int, target: int):
    import optuna

    if kind == Sampler.GRID:
        class _Grid(optuna.samplers.GridSampler):
            def after_trial(self, study, trial, state, values):  # the driver stops at the grid's size itself;
                pass  # GridSampler's own study.stop() only works inside study.optimize

        return _Grid(space.grid, seed=seed)
    if kind == Sampler.RANDOM:
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, min(50, target // 2)))


def _read_record(sweep_dir: str, number: int) -> Optional[dict]:
    try:
        with open(os.path.join(sweep_dir, trial_dir_name(number), TRIAL_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _drive(study, space: Space, opts: SweepOptions, target: int, backend, spec: dict, header: dict, log) -> None:
    from optuna.trial import TrialState

    sweep_dir = spec["sweep_dir"]
    existing = study.get_trials(deepcopy=False)
    queue = []
    for t in existing:
        if t.state != TrialState.RUNNING:
            continue
        if set(t.params) != set(space.keys):
            study.tell(t.number, state=TrialState.FAIL)  # interrupted before its values were chosen
            continue
        record = _read_record(sweep_dir, t.number)
        if record is not None and record.get("params") == t.params:
            _tell(study, opts, record)  # finished, but the sweep stopped before recording it
            log(f"{record['folder']} had finished before the interruption: recorded")
        else:
            queue.append((t.number, dict(t.params)))
    if queue:
        log(f"continuing {len(queue)} interrupted trial(s): {', '.join(trial_dir_name(n) for n, _ in queue)}")
    new = max(0, target - len(existing))
    finished_any = any(t.state == TrialState.COMPLETE for t in existing)
    running: dict = {}
    dists = space.distributions()
    while queue or new or running:
        limit = 1 if (backend.jobs > 1 and not finished_any and running) else backend.jobs
        while len(running) < limit and (queue or new):
            if queue:
                number, params = queue.pop(0)
            else:
                trial = study.ask(fixed_distributions=dists)
                number, params, new = trial.number, dict(trial.params), new - 1
            values = ", ".join(f"{k}={v}" for k, v in params.items())
            log(f"{trial_dir_name(number)} started: {values}")
            running[backend.submit({**spec, "number": number, "params": params})] = (number, params)
            if backend.jobs > 1 and not finished_any:
                break
        done, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
        for future in done:
            number, params = running.pop(future)
            try:
                record = future.result()
            except Exception as e:  # the worker itself died (out of memory, killed): the trial fails
                record = {"number": number, "folder": trial_dir_name(number), "params": params, "status": "failed",
                          "reason": f"the trial's worker died: {type(e).__name__}: {e}", "shared_stages": 0}
            _tell(study, opts, record)
            finished_any = finished_any or record["status"] == "done"
            _progress(study, sweep_dir, opts, space, record, len(running), header, log)


def _tell(study, opts: SweepOptions, record: dict) -> None:
    from optuna.trial import TrialState

    if record["status"] == "done":
        m = record["metrics"]
        values = [{"accuracy": m["accuracy"], "size": m["size_bytes"], "latency": m["latency_ms"]}[o]
                  for o in opts.objectives]
        if all(v is not None for v in values):
            study.tell(record["number"], values)
            return
        record["status"], record["reason"] = "failed", "an objective was not measured"
    study.tell(record["number"], state=TrialState.FAIL)


def _collect(study, sweep_dir: str, opts: SweepOptions, space: Space) -> SweepResult:
    from optuna.trial import TrialState

    trials = []
    for t in study.get_trials(deepcopy=False):
        record = _read_record(sweep_dir, t.number) or {"number": t.number, "folder": trial_dir_name(t.number),
                                                       "status": "failed", "reason": "no trial record"}
        status = {TrialState.COMPLETE: "done", TrialState.RUNNING: "running"}.get(t.state, "failed")
        if status == "failed" and record.get("status") == "done":
            record = {**record, "reason": "an objective was not measured"}
        trials.append(TrialResult.from_record(record, sweep_dir, t.params, status))
    numbers = {t.number for t in study.best_trials}
    front = tuple(t for t in trials if t.number in numbers)
    contrib = contributions(trials, space.keys) if space.is_ablation else None
    return SweepResult(sweep_dir, tuple(opts.objectives), tuple(trials), front, contrib)


def _front_text(front) -> str:
    if not front:
        return "none yet"
    return ", ".join(f"{trial_dir_name(t.number)} ({100 * t.accuracy:.2f}%, {t.size_bytes / 1e3:.1f} kB, "
                     f"{t.latency_ms:.3f} ms)" for t in sorted(front, key=lambda t: -t.accuracy))


def _progress(study, sweep_dir, opts, space, record: dict, running: int, header: dict, log) -> None:
    result = write_results(_collect(study, sweep_dir, opts, space), space.keys, header, plots=False)
    if record["status"] == "done":
        m = record["metrics"]
        what = (f"done in {record.get('seconds', 0):.0f} s: val {100 * m['accuracy']:.2f}%"
                + (f" (test {100 * m['test_accuracy']:.2f}%)" if m.get("test_accuracy") is not None else "")
                + f", {m['size_bytes'] / 1e3:.1f} kB, p50 {m['latency_ms']:.3f} ms, "
                  f"{record.get('shared_stages', 0)} stage(s) shared")
    else:
        what = f"failed: {(record.get('reason') or '').splitlines()[0][:200]}"
    log(f"{record['folder']} {what}")
    log(f"  {len(result.done)} done, {running} running, {len(result.failed)} failed; front so far: "
        f"{_front_text(result.front)}")
