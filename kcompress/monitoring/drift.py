"""Drift tests: new, unlabelled inputs against a model's :class:`~kcompress.monitoring.reference.Reference`.

Five tests, each with its value, threshold and verdict (``ok``, ``warn`` or ``drift``; thresholds in
:class:`kcompress.options.MonitorOptions`, whose defaults are the CLI's):

- ``confidence_psi``: population stability index of the max-softmax confidences, bins cut at the reference's
  quantiles. Usual reading: < 0.1 no significant change, 0.1-0.25 moderate (warn), > 0.25 significant (drift).
- ``confidence_ks``: two-sample Kolmogorov-Smirnov (``scipy.stats.ks_2samp``) on the same confidences; drift when
  p < ``alpha`` and the statistic is at least ``ks_min_statistic`` (on large samples p alone is tiny for
  negligible shifts). The value is the p-value.
- ``class_psi``: PSI of the predicted-class frequencies (one bin per class); drift above ``class_psi_drift``, or
  above ``psi_warn`` when a chi-square goodness-of-fit test (``scipy.stats.chisquare``, expected counts from the
  reference's frequencies) also gives p < ``alpha``: a vanished class of 10% with a few stray predictions left has
  a PSI near 0.25, and that is drift. Names the class that moved most.
- ``input_mean_shift``: the largest per-channel (last axis) mean shift, in reference standard deviations.
- ``input_std_ratio``: the largest per-channel change of the standard deviation, as a factor >= 1 either way.

Labels of the new data are never used: a deployed model has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from kcompress.errors import KcompressError
from kcompress.monitoring.reference import Collected, Reference, collect, open_inputs
from kcompress.monitoring.stats import chi_square, class_frequencies, ks_test, psi, psi_terms
from kcompress.options import MonitorOptions

__all__ = ["DriftTest", "DriftResult", "monitor", "drift_tests", "OK", "WARN", "DRIFT", "FEW_SAMPLES"]

OK, WARN, DRIFT = "ok", "warn", "drift"
FEW_SAMPLES = 50  # fewer new samples than this: the result says the tests have little power


@dataclass(frozen=True)
class DriftTest:
    """One test: ``value`` against ``threshold`` gives ``verdict``; ``detail`` is its phrase in the summary."""

    name: str
    value: float
    threshold: float
    verdict: str
    detail: str
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "threshold": self.threshold, "verdict": self.verdict,
                "detail": self.detail, **self.extra}


@dataclass(frozen=True)
class DriftResult:
    """Every test's outcome; ``drifted`` when any says drift; ``summary`` is one line."""

    tests: tuple[DriftTest, ...]
    num_samples: int
    reference_samples: int
    model: str
    data: str
    split: str
    options: MonitorOptions
    notes: tuple[str, ...] = ()
    confidences: np.ndarray = field(default=None, repr=False, compare=False)  # the new data's, for plots

    @property
    def drifted(self) -> bool:
        return any(t.verdict == DRIFT for t in self.tests)

    def test(self, name: str) -> DriftTest:
        return next(t for t in self.tests if t.name == name)

    @property
    def summary(self) -> str:
        if self.drifted:
            return "Drift: " + ", ".join(t.detail for t in self.tests if t.verdict == DRIFT)
        warn = [t.detail for t in self.tests if t.verdict == WARN]
        head = "No drift" + (f" (watch: {', '.join(warn)})" if warn else "")
        return (f"{head}: confidence PSI {self.test('confidence_psi').value:.3f}, KS p="
                f"{_p(self.test('confidence_ks').value)}, class PSI {self.test('class_psi').value:.3f}, input mean "
                f"shift {self.test('input_mean_shift').value:.2f} sd, std x{self.test('input_std_ratio').value:.2f} "
                f"({self.num_samples} samples vs {self.reference_samples} of {self.split.upper()})")

    def to_dict(self) -> dict:
        return {"drifted": self.drifted, "summary": self.summary, "model": self.model, "data": self.data,
                "num_samples": self.num_samples, "reference_split": self.split,
                "reference_samples": self.reference_samples, "tests": [t.to_dict() for t in self.tests],
                "options": self.options.to_dict(), "notes": list(self.notes)}


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.0e}"


def _level(value: float, warn: float, drift: float) -> str:
    return DRIFT if value > drift else WARN if value > warn else OK


def drift_tests(ref: Reference, new: Collected, options: MonitorOptions) -> tuple[DriftTest, ...]:
    """The five tests of ``new`` against ``ref`` (see the module docstring)."""
    if new.num_classes != ref.num_classes:
        raise KcompressError(f"the model outputs {new.num_classes} classes but the reference has {ref.num_classes}")
    if len(new.input_mean) != len(ref.input_mean):
        raise KcompressError(f"the inputs have {len(new.input_mean)} channels but the reference has "
                             f"{len(ref.input_mean)}")
    o = options
    ref_conf = np.asarray(ref.confidences, np.float64)
    value = psi(ref_conf, new.confidences, o.bins)
    verdict = _level(value, o.psi_warn, o.psi_drift)
    tests = [DriftTest("confidence_psi", value, o.psi_drift, verdict,
                       f"confidence PSI {value:.2f} {'>' if verdict == DRIFT else '<='} {o.psi_drift:g}",
                       {"warn_threshold": o.psi_warn, "mean_confidence": float(new.confidences.mean()),
                        "reference_mean_confidence": float(ref_conf.mean())})]

    stat, p = ks_test(ref_conf, new.confidences)
    verdict = DRIFT if p < o.alpha and stat >= o.ks_min_statistic else WARN if p < o.alpha else OK
    tests.append(DriftTest("confidence_ks", p, o.alpha, verdict, f"KS p={_p(p)} (D {stat:.2f})",
                           {"statistic": stat, "min_statistic": o.ks_min_statistic}))

    ref_freq = np.asarray(ref.class_frequencies, np.float64)
    new_freq = class_frequencies(new.predicted, ref.num_classes)
    terms = psi_terms(ref_freq, new_freq)
    value, worst = float(terms.sum()), int(np.argmax(terms))
    chi_p = chi_square(ref_freq, new.predicted)
    verdict = _level(value, o.psi_warn, o.class_psi_drift)
    if verdict == WARN and chi_p < o.alpha:
        verdict = DRIFT
    name = ref.class_names[worst]
    detail = f"class {name} frequency {new_freq[worst]:.2f} vs {ref_freq[worst]:.2f} (class PSI {value:.2f})"
    tests.append(DriftTest("class_psi", value, o.class_psi_drift, verdict, detail,
                           {"chi_square_p": chi_p, "class": name, "class_index": worst, "frequency": float(new_freq[worst]),
                            "reference_frequency": float(ref_freq[worst]), "frequencies": new_freq.tolist()}))

    tests.extend(_input_tests(ref, new, o))
    return tuple(tests)


def _input_tests(ref: Reference, new: Collected, o: MonitorOptions) -> list[DriftTest]:
    """Mean shift in reference stds and std ratio, per channel; a channel whose reference std is below 1% of the
    median channel's (a constant border pixel of a vector input) is measured against that floor instead."""
    what = "feature" if len(ref.input_shape) == 1 else "channel"
    r_mean, r_std = np.asarray(ref.input_mean), np.asarray(ref.input_std)
    floor = max(0.01 * float(np.median(r_std)), 1e-12)
    r_sd, n_sd = np.maximum(r_std, floor), np.maximum(new.input_std, floor)
    shift = np.abs(new.input_mean - r_mean) / r_sd
    c = int(np.argmax(shift))
    value = float(shift[c])
    verdict = DRIFT if value > o.input_mean_shift else OK
    tests = [DriftTest("input_mean_shift", value, o.input_mean_shift, verdict,
                       f"input {what} {c} mean moved {value:.2f} sd" + (f" > {o.input_mean_shift:g}"
                                                                       if verdict == DRIFT else ""),
                       {what: c, "mean": float(new.input_mean[c]), "reference_mean": float(r_mean[c])})]
    ratio = n_sd / r_sd
    factor = np.maximum(ratio, 1.0 / ratio)
    c = int(np.argmax(factor))
    value = float(factor[c])
    verdict = DRIFT if value > o.input_std_ratio else OK
    way = "grew" if ratio[c] >= 1 else "shrank"
    tests.append(DriftTest("input_std_ratio", value, o.input_std_ratio, verdict,
                           f"input {what} {c} std {way} x{value:.2f}" + (f" > {o.input_std_ratio:g}"
                                                                         if verdict == DRIFT else ""),
                           {what: c, "std": float(new.input_std[c]), "reference_std": float(r_std[c])}))
    return tests


def _preprocess_from(ref: Reference):
    from kcompress.data import Preprocess

    if not ref.preprocess:
        return None
    p = ref.preprocess
    return Preprocess(scale=float(p["scale"]), offset=float(p["offset"]), mean=tuple(p["mean"]), std=tuple(p["std"]))


def monitor(model, reference, data, options: Optional[MonitorOptions] = None, *, preprocess=None,
            batch_size: int = 64, trust_model: bool = False, check_model: bool = True,
            **thresholds: Any) -> DriftResult:
    """Tests whether ``data`` (new inputs; labels ignored) has drifted from ``reference`` for ``model``.

    ``reference``: a :class:`Reference`, a reference JSON or a pipeline run folder. ``data``: a data spec (image
    folder, ``.npz`` with or without ``y``, built-in name), an opened DataSource or an array of raw inputs.
    ``preprocess``: None reuses the reference's preprocessing for specs and arrays (an opened DataSource keeps its
    own). ``options`` / ``thresholds``: :class:`~kcompress.options.MonitorOptions` (keywords override fields).
    ``check_model``: refuse a model file whose SHA-256 is not the reference's (its confidences are another
    model's). Returns a :class:`DriftResult`; ``result.drifted`` is the verdict."""
    from kcompress.data import DataSource
    from kcompress.inputs import resolve_options
    from kcompress.monitoring.reference import data_name, model_identity

    opts = resolve_options(MonitorOptions, options, **thresholds)
    ref = reference if isinstance(reference, Reference) else Reference.load(reference)
    name, digest = model_identity(model)
    if check_model and digest and ref.model_sha256 and digest != ref.model_sha256:
        raise KcompressError(f"{name} is not the model the reference was made with ({ref.model}, sha256 "
                             f"{ref.model_sha256[:12]} vs {digest[:12]}): make a reference for this model "
                             "(--write-reference), or pass --any-model")
    if preprocess is None and not isinstance(data, DataSource):
        preprocess = _preprocess_from(ref)
    inputs = open_inputs(data, preprocess)
    new = collect(model, inputs, batch_size, trust_model, description="monitoring", name=data_name(data))
    notes = []
    if len(new.confidences) < FEW_SAMPLES:
        notes.append(f"only {len(new.confidences)} new samples: the tests have little power")
    pre = getattr(inputs, "preprocess", preprocess)
    if ref.preprocess and pre is not None and pre.to_dict() != ref.preprocess:
        notes.append(f"the inputs are preprocessed as {pre.to_dict()}, the reference's were {ref.preprocess}")
    return DriftResult(drift_tests(ref, new, opts), len(new.confidences), ref.num_samples, name, new.data, ref.split,
                       opts, tuple(notes), new.confidences)
