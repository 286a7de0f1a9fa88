"""The sweep's settings: one frozen :class:`SweepOptions`, the CLI's defaults and the API's keyword arguments.

Gotchas: ``sampler`` empty means grid for a space of lists only and NSGA-II otherwise; ``trials`` empty means the
grid's size for the grid sampler and 20 otherwise (a grid never runs more trials than it has points). ``jobs`` is
the number of trials run at once: separate processes locally, Ray tasks (and the local Ray instance's CPUs) with
``backend: ray``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kcompress.optionbase import OptionError, Options, check_at_least, opt
from kcompress.types import Objective, Sampler
from kcompress.types import SweepBackend as Backend

__all__ = ["Sampler", "Backend", "Objective", "SweepOptions", "OBJECTIVE_DIRECTIONS", "DEFAULT_RANDOM_TRIALS"]

DEFAULT_RANDOM_TRIALS = 20


# what each objective measures on a trial's final model, and which way is better
OBJECTIVE_DIRECTIONS = {Objective.ACCURACY: "maximize", Objective.SIZE: "minimize", Objective.LATENCY: "minimize"}


@dataclass(frozen=True)
class SweepOptions(Options):
    trials: Optional[int] = opt(None, "trials to run in all, counting earlier ones on --resume (empty: the grid's "
                                     f"size for the grid sampler, {DEFAULT_RANDOM_TRIALS} otherwise)")
    objectives: tuple[str, ...] = opt(("accuracy", "size"), "what the Pareto front trades off: accuracy (VAL, "
                                                            "maximized), size (bytes of the final .tflite), latency "
                                                            "(p50 ms, 1 thread, batch 1)")
    sampler: Optional[Sampler] = opt(None, "grid (every combination of the listed values), random or nsga2 (empty: "
                                          "grid when every key lists values, nsga2 otherwise)")
    jobs: int = opt(1, "trials run at once (each in its own process, or Ray task)")
    backend: Backend = opt(Backend.LOCAL, "local (this machine) or ray (Ray tasks; pip install 'kcompress[ray]')")
    address: Optional[str] = opt(None, "ray: the cluster to join (ray.init address; empty: start a local instance "
                                      "with jobs CPUs)")
    seed: int = opt(0, "the sampler's seed (random, nsga2, and the grid's order)")

    def _check(self) -> None:
        check_at_least("trials", self.trials, 1)
        check_at_least("jobs", self.jobs, 1)
        names = [str(o).strip().lower() for o in self.objectives]
        bad = [o for o in names if o not in Objective.values()]
        if bad or not names:
            raise OptionError("objectives", f"{','.join(bad) or 'nothing'}: choose from {', '.join(Objective.values())}")
        if len(set(names)) != len(names):
            raise OptionError("objectives", "an objective is given twice")
        object.__setattr__(self, "objectives", tuple(names))
        if self.address and self.backend != Backend.RAY:
            raise OptionError("address", "applies to backend ray only")

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVE_DIRECTIONS[Objective(o)] for o in self.objectives]
