"""Accuracy of Keras models and ``.tflite`` files on a data set, and comparisons between two models.

Both kinds run on the same :class:`~kcompress.data.DataSource` pipeline (same preprocessing); ``.tflite`` files
with integer I/O get their inputs quantized with the file's own scale and zero point (see :mod:`runtime`).
Metrics are computed from the predictions in numpy, so Keras and TFLite numbers are comparable to the digit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from kcompress.errors import KcompressError
from kcompress.progress import progress

if TYPE_CHECKING:  # the data module imports TensorFlow; report readers use the metrics here without it
    from kcompress.data import DataSource

__all__ = ["probabilities", "Predictor", "predictor", "Evaluation", "evaluate", "metrics_from_outputs", "compare"]


@dataclass
class Predictor:
    """Something that maps a float batch to float outputs, with the shape facts evaluation needs."""

    name: str
    kind: str  # "keras" or "tflite"
    input_shape: tuple
    num_classes: int
    predict: Callable[[np.ndarray], np.ndarray]


def predictor(model_or_path, batch_size: int = 64, num_threads: Optional[int] = None) -> Predictor:
    """A Predictor for a tf_keras model object, a Keras model path, or a ``.tflite`` path/bytes."""
    from kcompress.io import ensure_tf_keras, load_model, model_format
    from kcompress.litert.interpreter import TFLiteModel
    from kcompress.modelinfo import input_shape, num_classes

    if isinstance(model_or_path, (bytes, bytearray)) or (
        isinstance(model_or_path, str) and model_format(model_or_path) == "tflite"
    ):
        m = TFLiteModel(model_or_path, num_threads=num_threads, batch_size=batch_size)
        classes = int(m.output["shape"][-1])
        name = model_or_path if isinstance(model_or_path, str) else "<tflite>"
        return Predictor(name, "tflite", m.input_shape, classes, m.predict)
    model = load_model(model_or_path) if isinstance(model_or_path, str) else ensure_tf_keras(model_or_path)
    name = model_or_path if isinstance(model_or_path, str) else model.name

    from kcompress.backend import tf

    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(fn(tf.constant(x, tf.float32)), np.float32)

    return Predictor(name, "keras", input_shape(model), num_classes(model), predict)


@dataclass(frozen=True)
class Evaluation:
    """Metrics plus the raw outputs (kept for comparisons; not written to JSON)."""

    metrics: dict[str, Any]
    outputs: np.ndarray
    labels: np.ndarray

    @property
    def accuracy(self) -> float:
        return float(self.metrics["accuracy"])

    @property
    def predictions(self) -> np.ndarray:
        return self.outputs.argmax(axis=1)


def probabilities(outputs: np.ndarray) -> np.ndarray:
    """Softmax when the outputs are logits (rows not already non-negative and summing to 1)."""
    if outputs.size and np.all(outputs >= -1e-6) and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-2):
        return outputs
    z = outputs - outputs.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def metrics_from_outputs(outputs: np.ndarray, labels: np.ndarray, class_names) -> dict[str, Any]:
    """top-1, top-5 (more than 5 classes), per-class accuracy, macro F1, confusion matrix, confidence."""
    n_classes = outputs.shape[1]
    pred = outputs.argmax(axis=1)
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (labels, pred), 1)
    support = cm.sum(axis=1)
    tp = np.diag(cm).astype(np.float64)
    precision = np.divide(tp, cm.sum(axis=0), out=np.zeros(n_classes), where=cm.sum(axis=0) > 0)
    recall = np.divide(tp, support, out=np.zeros(n_classes), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n_classes), where=precision + recall > 0)
    present = support > 0
    names = list(class_names) + [str(i) for i in range(len(class_names), n_classes)]
    probs = probabilities(outputs)
    out: dict[str, Any] = {
        "num_samples": int(len(labels)),
        "accuracy": float((pred == labels).mean()),
        "top5_accuracy": None,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_accuracy": {names[i]: float(recall[i]) for i in range(n_classes) if present[i]},
        "confusion_matrix": cm.tolist(),
        "class_names": names[:n_classes],
        "mean_confidence": float(probs.max(axis=1).mean()),
    }
    if n_classes > 5:
        top5 = np.argsort(-outputs, axis=1)[:, :5]
        out["top5_accuracy"] = float((top5 == labels[:, None]).any(axis=1).mean())
    return out


def evaluate(
    model_or_path,
    data: DataSource,
    batch_size: int = 64,
    limit: Optional[int] = None,
    description: str = "evaluating",
) -> Evaluation:
    """Runs the model over ``data`` (all of it unless ``limit``) and computes the metrics.

    ``model_or_path``: a Keras model (tf_keras or Keras 3), a model path, or a ``.tflite`` path or bytes;
    ``data``: an opened DataSource or a data spec (image folder, ``.npz``, built-in name).
    """
    from kcompress.data import DataSource

    if not isinstance(data, DataSource):
        from kcompress.inputs import as_data

        data = as_data(data)
    pred = model_or_path if isinstance(model_or_path, Predictor) else predictor(model_or_path, batch_size)
    from kcompress.data import check_fits

    check_fits(data, pred.input_shape, pred.num_classes)
    outs, labels = [], []
    total = data.num_samples if limit is None else min(limit, data.num_samples)
    with progress(description, total=total) as bar:
        for x, y in data.numpy_batches(pred.input_shape, batch_size=batch_size, limit=limit):
            outs.append(pred.predict(x))
            labels.append(y)
            bar.advance(len(y))
    if not outs:
        raise KcompressError(f"{data.name}: the data set is empty")
    outputs = np.concatenate(outs)
    y = np.concatenate(labels).astype(np.int64)
    return Evaluation(metrics_from_outputs(outputs, y, data.class_names), outputs, y)


def compare(a: Evaluation, b: Evaluation) -> dict[str, Any]:
    """How ``a`` differs from the reference ``b`` on the same samples: agreement, accuracy and per-class deltas."""
    if len(a.labels) != len(b.labels) or not np.array_equal(a.labels, b.labels):
        raise KcompressError("the two evaluations were not made on the same samples")
    pa, pb = probabilities(a.outputs), probabilities(b.outputs)
    per_class = {}
    for name, acc in a.metrics["per_class_accuracy"].items():
        ref = b.metrics["per_class_accuracy"].get(name)
        if ref is not None:
            per_class[name] = acc - ref
    return {
        "agreement": float((a.predictions == b.predictions).mean()),
        "accuracy_delta": a.accuracy - b.accuracy,
        "per_class_accuracy_delta": dict(sorted(per_class.items(), key=lambda kv: kv[1])),
        "mean_confidence_delta": float(pa.max(axis=1).mean() - pb.max(axis=1).mean()),
        "output_rmse": float(np.sqrt(np.mean((pa - pb) ** 2))),
    }
