"""The drift plot: the reference's and the new data's confidence histograms on one figure (PNG, written atomically).

matplotlib is imported inside :func:`plot_confidences` with the Agg backend (no display needed)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from kcompress.monitoring.reference import Reference
from kcompress.monitoring.stats import confidence_histogram

__all__ = ["plot_confidences"]


def plot_confidences(reference: Reference, confidences: np.ndarray, path: str, overwrite: bool = False,
                     title: Optional[str] = None) -> str:
    """Writes both confidence distributions (shares of samples in 20 bins over [0, 1]) to the PNG ``path``.

    The reference's bars are its stored histogram of every sample; the new data's come from ``confidences``
    (``DriftResult.confidences``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kcompress.atomic import atomic_path, check_output_path

    check_output_path(path, overwrite)
    ref = np.asarray(reference.confidence_histogram, np.float64)
    new = np.asarray(confidence_histogram(np.asarray(confidences), bins=len(ref)), np.float64)
    edges = np.linspace(0.0, 1.0, len(ref) + 1)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    try:
        ax.stairs(ref / max(ref.sum(), 1), edges, fill=True, alpha=0.35,
                  label=f"reference ({reference.split.upper()}, {reference.num_samples})")
        ax.stairs(new / max(new.sum(), 1), edges, lw=2, label=f"new data ({len(confidences)})")
        ax.set_xlabel("top-1 confidence (max softmax)")
        ax.set_ylabel("share of samples")
        ax.set_xlim(0, 1)
        ax.legend(loc="upper left")
        ax.set_title(title or "confidence: reference vs new data", fontsize=10)
        fig.tight_layout()
        with atomic_path(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path
