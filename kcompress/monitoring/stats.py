"""The statistics of drift monitoring, on plain numpy arrays: PSI, the two-sample KS test, per-channel input moments.

No TensorFlow; scipy is imported inside :func:`ks_test`.

Gotchas:

- :func:`psi` cuts the bins at the *reference's* quantiles (``bins`` equal-mass bins), so the reference has about
  the same share in each bin and the index does not depend on the new data's range. Max-softmax confidences pile up
  at a few values (an int8 softmax has 256 levels; a confident model sits near 1.0): tied quantiles collapse into one
  cut, so there can be fewer bins than asked. Values equal to a cut go to the bin above it, for both samples alike.
- An empty bin would make the index infinite: every share is floored at :data:`PSI_EPSILON` (the usual fix). A class
  the new data never predicts therefore adds ``p_ref * ln(p_ref / 1e-4)`` (0.69 for a class of 10%).
- :class:`ChannelMoments` merges batches with Chan's parallel update in float64, so the mean and std of millions of
  pixels do not lose digits to a running sum of squares.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["PSI_EPSILON", "quantile_cuts", "psi", "psi_terms", "ks_test", "chi_square", "class_frequencies", "ChannelMoments",
           "confidence_histogram"]

PSI_EPSILON = 1e-4  # the floor of a bin's share (an empty bin would make the index infinite)
HIST_BINS = 20  # the fixed histogram of confidences over [0, 1] stored with a reference (for plots)


def quantile_cuts(reference: np.ndarray, bins: int) -> np.ndarray:
    """The inner cut points of ``bins`` equal-mass bins of ``reference`` (its 1/bins, ..., (bins-1)/bins quantiles),
    ties merged: at most ``bins - 1`` increasing values."""
    ref = np.asarray(reference, np.float64)
    if ref.size == 0:
        raise ValueError("the reference sample is empty")
    return np.unique(np.quantile(ref, np.arange(1, bins) / bins))


def _shares(values: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(cuts, np.asarray(values, np.float64), side="right")  # bin i: [cut[i-1], cut[i])
    return np.bincount(idx, minlength=len(cuts) + 1) / max(len(values), 1)


def psi_terms(ref_shares: np.ndarray, new_shares: np.ndarray) -> np.ndarray:
    """Each bin's (or class's) term ``(q - p) * ln(q / p)`` of the population stability index, shares floored at
    :data:`PSI_EPSILON`; their sum is the index (>= 0; 0 for identical distributions)."""
    p = np.maximum(np.asarray(ref_shares, np.float64), PSI_EPSILON)
    q = np.maximum(np.asarray(new_shares, np.float64), PSI_EPSILON)
    return (q - p) * np.log(q / p)


def psi(reference: np.ndarray, new: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``new`` against ``reference`` (1-D samples), over ``bins`` bins cut at the
    reference's quantiles. Read it as: < 0.1 no significant change, 0.1-0.25 moderate, > 0.25 significant."""
    cuts = quantile_cuts(reference, bins)
    return float(psi_terms(_shares(reference, cuts), _shares(new, cuts)).sum())


def ks_test(reference: np.ndarray, new: np.ndarray) -> tuple[float, float]:
    """``(statistic, p_value)`` of the two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``, two-sided)."""
    from scipy.stats import ks_2samp

    r = ks_2samp(np.asarray(reference, np.float64), np.asarray(new, np.float64))
    return float(r.statistic), float(r.pvalue)


def chi_square(ref_frequencies: np.ndarray, predicted: np.ndarray) -> float:
    """p-value of the chi-square goodness-of-fit test (``scipy.stats.chisquare``) of the predicted classes' counts
    against the reference's frequencies (floored at :data:`PSI_EPSILON` and renormalized, so a class the reference
    never predicted does not divide by zero)."""
    from scipy.stats import chisquare

    freq = np.maximum(np.asarray(ref_frequencies, np.float64), PSI_EPSILON)
    counts = np.bincount(np.asarray(predicted, np.int64), minlength=len(freq))[:len(freq)].astype(np.float64)
    return float(chisquare(counts, freq / freq.sum() * counts.sum()).pvalue)


def class_frequencies(predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """The share of each class among the predicted classes (sums to 1)."""
    counts = np.bincount(np.asarray(predicted, np.int64), minlength=num_classes)[:num_classes]
    return counts / max(int(counts.sum()), 1)


def confidence_histogram(confidences: np.ndarray, bins: int = HIST_BINS) -> list[int]:
    """Counts of ``confidences`` in ``bins`` equal bins over [0, 1] (values outside are clipped into the end bins)."""
    return np.histogram(np.clip(confidences, 0.0, 1.0), bins=bins, range=(0.0, 1.0))[0].astype(int).tolist()


class ChannelMoments:
    """Running per-channel mean and std of inputs, channels on the last axis (an image's colour channels, a
    vector's features). ``add`` a batch at a time; ``mean``/``std`` are float64 arrays (population std)."""

    def __init__(self) -> None:
        self.count = 0
        self._mean: Optional[np.ndarray] = None
        self._m2: Optional[np.ndarray] = None

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        flat = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(-1, 1)
        n = flat.shape[0]
        if n == 0:
            return
        mean = flat.mean(axis=0)
        m2 = ((flat - mean) ** 2).sum(axis=0)
        if self._mean is None:
            self.count, self._mean, self._m2 = n, mean, m2
            return
        if mean.shape != self._mean.shape:
            raise ValueError(f"batches with {mean.shape[0]} and {self._mean.shape[0]} channels")
        total = self.count + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    @property
    def mean(self) -> np.ndarray:
        if self._mean is None:
            raise ValueError("no inputs were added")
        return self._mean

    @property
    def std(self) -> np.ndarray:
        if self._m2 is None:
            raise ValueError("no inputs were added")
        return np.sqrt(self._m2 / max(self.count, 1))
