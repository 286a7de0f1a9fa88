"""Where trials run: this process, worker processes, or Ray tasks. Every backend takes a trial spec (a plain dict)
and gives a :class:`concurrent.futures.Future` of the trial record (:func:`kcompress.sweeps.trial.run_trial`).

The driver owns the Optuna study (ask/tell); workers only run trials, so the SQLite storage has one writer.
Gotchas: worker processes are started with ``spawn`` and run one trial each (TensorFlow's state is per process, and
forking a process that imported TensorFlow is unsafe); Ray tasks likewise run in a fresh worker each
(``max_calls=1``). Ray tasks write their trial folders straight into SWEEP_DIR, which must therefore be a path
every Ray node sees (one machine, or a shared file system).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from typing import Optional

from kcompress.errors import KcompressError

__all__ = ["make_backend", "LocalBackend", "ProcessBackend", "RayBackend", "RAY_INSTALL"]

RAY_INSTALL = "--backend ray needs Ray, which is not installed: pip install 'kcompress[ray]'"


class LocalBackend:
    """One trial at a time, in this process."""

    jobs = 1

    def submit(self, spec: dict) -> cf.Future:
        from kcompress.sweeps.trial import run_trial

        future: cf.Future = cf.Future()
        future.set_result(run_trial(spec))
        return future

    def close(self) -> None:
        pass


class ProcessBackend:
    """``jobs`` trials at once, each in a fresh spawned process."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self._pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                            max_tasks_per_child=1)

    def submit(self, spec: dict) -> cf.Future:
        from kcompress.sweeps.trial import run_trial

        return self._pool.submit(run_trial, spec)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayBackend:
    """Trials as Ray tasks (one CPU each). Joins ``address``, or starts a local instance with ``jobs`` CPUs; a Ray
    already initialised by the caller is used as it is."""

    def __init__(self, jobs: int, address: Optional[str] = None):
        try:
            import ray
        except ImportError:
            raise KcompressError(RAY_INSTALL) from None
        from kcompress.sweeps.trial import run_trial

        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs = {"address": address} if address else {"num_cpus": jobs, "include_dashboard": False}
            try:
                ray.init(log_to_driver=False, configure_logging=False, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise KcompressError(f"cannot start or join Ray{f' at {address}' if address else ''}: "
                                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            self._started = True
        self.jobs = jobs
        self._task = ray.remote(num_cpus=1, max_calls=1)(run_trial)

    def submit(self, spec: dict) -> cf.Future:
        return self._task.remote(spec).future()

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


def make_backend(kind: str, jobs: int, address: Optional[str] = None):
    if str(kind) == "ray":
        return RayBackend(jobs, address)
    return LocalBackend() if jobs == 1 else ProcessBackend(jobs)
