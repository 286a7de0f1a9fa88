"""Sweeps and ablations over pipeline settings: Optuna studies whose trials are ordinary pipeline runs.

``kc.sweep("base.yaml", "space.yaml", "sweeps/s", trials=8)`` runs the trials (locally, in worker processes, or as
Ray tasks), shares stages whose settings are equal, and returns a :class:`SweepResult` with every trial, the Pareto
front and, for a space of ``enabled`` switches, each stage's contribution. The package is named ``sweeps`` so that
``kcompress.sweep`` stays the function.
"""

from kcompress.sweeps.options import Backend, Objective, Sampler, SweepOptions
from kcompress.sweeps.results import SweepResult, TrialResult
from kcompress.sweeps.space import Param, Space, load_space, parse_space
from kcompress.sweeps.study import sweep

__all__ = ["sweep", "SweepOptions", "Sampler", "Backend", "Objective", "SweepResult", "TrialResult", "Space",
           "Param", "load_space", "parse_space"]
