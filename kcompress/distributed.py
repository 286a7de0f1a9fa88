"""The ``tf.distribute`` strategy every training stage runs under, one per process, and which worker writes outputs.

``train.strategy`` (:class:`~kcompress.types.Strategy`) chooses it:

- ``auto`` (default): ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` names a cluster of more than one task,
  ``MirroredStrategy`` when more than one GPU is visible, else TensorFlow's default strategy (one device);
- ``none``: the default strategy, whatever the machine;
- ``mirrored``: ``MirroredStrategy`` over the visible GPUs; fewer than two GPUs is a usage error (``auto`` is the
  setting that falls back to one device);
- ``multi_worker``: ``MultiWorkerMirroredStrategy`` over the cluster in ``TF_CONFIG``; without ``TF_CONFIG`` it is
  a usage error.

:func:`strategy` creates the strategy once per process and returns the same object after. Every worker of a
multi-worker run executes the same command (or script) with its own ``TF_CONFIG``; the workers train in lockstep
and end with identical weights.

Gotchas:

- ``MultiWorkerMirroredStrategy`` configures TensorFlow's collective ops, which TensorFlow allows only before it runs
  its first op: call :func:`strategy` (``kc.distribute("multi_worker")`` in the Python API) first thing, before
  loading a model or data. The CLI's training commands and :func:`kcompress.run_pipeline` do it for you
  (:func:`distribute_early`); a late call is refused with a message saying so.
- The configured ``batch_size`` is the global batch: each of N replicas gets ``batch_size / N`` samples per step.
  The learning rate is not scaled with the number of replicas: scale ``lr`` yourself if you also scale the batch.
- Only the chief (task ``chief``, else worker 0) writes the user's outputs: the others write theirs, checkpoints
  included, to a temporary folder deleted when the process ends (:func:`worker_path`, as TensorFlow's
  multi-worker guide does). A worker that fails alone (a bad path only it sees) leaves the others waiting in
  their collective ops: give every worker the same inputs and run the same command.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from typing import Any, Optional

from kcompress.errors import UsageError
from kcompress.types import Strategy

__all__ = ["cluster_tasks", "resolve", "strategy", "distribute_early", "is_multi_worker", "is_chief", "worker_path",
           "describe", "shard_by_data"]

_STRATEGIES: dict[str, Any] = {}  # resolved kind -> the process's strategy object
_TEMP: list[str] = []  # this worker's temporary output folder, when it is not the chief


def _tf_config() -> Optional[dict]:
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        cfg = json.loads(text)
    except ValueError as e:
        raise UsageError(f"TF_CONFIG is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UsageError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    return cfg


def cluster_tasks() -> int:
    """How many tasks the cluster in ``TF_CONFIG`` names (0: no ``TF_CONFIG``, or no cluster in it)."""
    cfg = _tf_config()
    cluster = (cfg or {}).get("cluster") or {}
    if not isinstance(cluster, dict):
        raise UsageError("TF_CONFIG's 'cluster' must map task types to lists of host:port")
    return sum(len(v) for k, v in cluster.items() if k != "evaluator" and isinstance(v, (list, tuple)))


def _gpus() -> int:
    from kcompress.backend import tf

    return len(tf.config.list_physical_devices("GPU"))  # physical: does not start TensorFlow's runtime


def _parse(kind) -> Strategy:
    try:
        return Strategy(kind or Strategy.AUTO)
    except ValueError:
        raise UsageError(f"strategy must be one of {', '.join(Strategy.values())}, got {kind!r}") from None


def resolve(kind: "Strategy | str | None" = Strategy.AUTO) -> Strategy:
    """The strategy ``kind`` means on this machine (``auto`` resolved; see the module docstring); a request this
    machine cannot honour is a :class:`~kcompress.errors.UsageError`."""
    kind = _parse(kind)
    if kind == Strategy.AUTO:
        if cluster_tasks() > 1:
            return Strategy.MULTI_WORKER
        return Strategy.MIRRORED if _gpus() > 1 else Strategy.NONE
    if kind == Strategy.MULTI_WORKER and cluster_tasks() == 0:
        raise UsageError("strategy multi_worker needs TF_CONFIG naming the cluster and this worker's task, e.g. "
                         '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", '
                         '"index": 0}}')
    if kind == Strategy.MIRRORED and _gpus() < 2:
        raise UsageError(f"strategy mirrored needs at least 2 visible GPUs, found {_gpus()} (use auto or none)")
    return kind


def strategy(kind: "Strategy | str | None" = Strategy.AUTO):
    """The process's ``tf.distribute`` strategy for ``kind`` (created on first use, then the same object).

    ``none`` is TensorFlow's default strategy. Build models inside ``strategy(...).scope()`` to train them under
    it; :func:`kcompress.train.fit` copies a model built outside into the scope itself."""
    from kcompress.backend import tf

    kind = resolve(kind)
    if kind == Strategy.NONE:
        return tf.distribute.get_strategy()
    if kind not in _STRATEGIES:
        if kind == Strategy.MIRRORED:
            _STRATEGIES[kind] = tf.distribute.MirroredStrategy()
        else:
            try:
                _STRATEGIES[kind] = tf.distribute.MultiWorkerMirroredStrategy()
            except (RuntimeError, ValueError) as e:
                if "startup" not in str(e) and "initialized" not in str(e):
                    raise
                raise UsageError("multi-worker training must be set up before TensorFlow runs anything: call "
                                 'kcompress.distribute("multi_worker") first, before loading models or data') from None
    return _STRATEGIES[kind]


def distribute_early(kind: "Strategy | str | None" = Strategy.AUTO) -> None:
    """Creates the multi-worker strategy now when ``TF_CONFIG`` is set and ``kind`` asks for it (``auto`` with a
    cluster of several tasks, or ``multi_worker``), and refuses a ``mirrored`` or ``multi_worker`` this machine
    cannot run (:class:`~kcompress.errors.UsageError`); otherwise nothing happens. Called first by every training
    command and by the pipeline runner, before any model is loaded."""
    kind = _parse(kind)
    if kind in (Strategy.MIRRORED, Strategy.MULTI_WORKER) or os.environ.get("TF_CONFIG", "").strip():
        if resolve(kind) == Strategy.MULTI_WORKER:  # a request this machine cannot honour fails here, before work
            strategy(Strategy.MULTI_WORKER)


def is_multi_worker() -> bool:
    """Whether this process created a multi-worker strategy."""
    return Strategy.MULTI_WORKER in _STRATEGIES


def is_chief() -> bool:
    """Whether this process writes the outputs: True unless it is a non-chief worker of a multi-worker run (the
    chief is the ``chief`` task, or worker 0 when the cluster has no ``chief``)."""
    if not is_multi_worker():
        return True
    resolver = _STRATEGIES[Strategy.MULTI_WORKER].cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in (resolver.cluster_spec().as_dict() or {})
    return task_type in (None, "worker") and not task_id and not has_chief


def worker_path(path: str, copy: bool = False) -> str:
    """``path`` on the chief; on another worker, the same file name inside this process's temporary folder (deleted
    when the process ends), so the worker's copy of an output never reaches the user's path. ``copy``: start from a
    copy of what is at ``path`` (e.g. checkpoints to resume, when the chief's folder is on a shared file system)."""
    if is_chief():
        return path
    if not _TEMP:
        _TEMP.append(tempfile.mkdtemp(prefix="kcompress-worker-"))
        atexit.register(shutil.rmtree, _TEMP[0], True)
    base = os.path.basename(os.path.abspath(path)) or "out"
    target = os.path.join(_TEMP[0], base)
    if copy and os.path.exists(path) and not os.path.exists(target):
        if os.path.isdir(path):
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)
    return target


def describe(strat, batch_size: int) -> str:
    """A log line's tail naming the strategy and the per-replica batch ("" on one device)."""
    n = strat.num_replicas_in_sync
    if n == 1 and not is_multi_worker():
        return ""
    names = {id(v): {Strategy.MIRRORED: "MirroredStrategy", Strategy.MULTI_WORKER: "MultiWorkerMirroredStrategy"}[k]
             for k, v in _STRATEGIES.items()}
    return (f"; {names.get(id(strat), type(strat).__name__)}, {n} replicas: global batch {batch_size}, "
            f"{batch_size / n:g} per replica (lr not scaled)")


def shard_by_data(dataset):
    """``dataset`` with auto-sharding by data (each worker takes its share of every global batch), the only policy
    for in-memory data; a no-op outside multi-worker runs. Every worker must build the same dataset (same seed)."""
    if not is_multi_worker():
        return dataset
    from kcompress.backend import tf

    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(opts)
