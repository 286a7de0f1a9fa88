"""Drift monitoring of a deployed model: reference statistics on VAL (:func:`monitor_reference`), drift tests of
new unlabelled inputs against them (:func:`monitor`), and the confidence plot (:func:`plot_confidences`).

The package is ``monitoring`` (not ``monitor``) so that ``kcompress.monitor`` stays the function of the facade: a
subpackage of that name would replace it as an attribute of ``kcompress`` once imported.
"""

from kcompress.monitoring.drift import DRIFT, OK, WARN, DriftResult, DriftTest, drift_tests, monitor
from kcompress.monitoring.plot import plot_confidences
from kcompress.monitoring.reference import REFERENCE_FILE, Reference, monitor_reference, reference_path

__all__ = ["monitor", "monitor_reference", "Reference", "DriftResult", "DriftTest", "drift_tests",
           "plot_confidences", "reference_path", "REFERENCE_FILE", "OK", "WARN", "DRIFT"]
