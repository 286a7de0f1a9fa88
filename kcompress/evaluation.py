"""Accuracy of Keras models, ``.tflite`` files (LiteRT) and ``.onnx`` files (ONNX Runtime) on a data set, and
comparisons between two models.

Both kinds run on the same :class:`~kcompress.data.DataSource` pipeline (same preprocessing); ``.tflite`` files
with integer I/O get their inputs quantized with the file's own scale and zero point (see :mod:`runtime`).
Metrics are computed from the predictions with scikit-learn, so Keras and TFLite numbers are comparable to the digit.

Whether a model outputs probabilities or logits is read once from its graph (:func:`output_kind`), never guessed
from the values: dequantized int8 softmax rows do not sum to 1 (0.87-0.98 with 1000 classes), so a value test would
apply softmax a second time. The kind travels with the :class:`Predictor` and the :class:`Evaluation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from kcompress.errors import KcompressError
from kcompress.internals import keras3_history_layer
from kcompress.progress import progress

if TYPE_CHECKING:  # the data module imports TensorFlow; report readers use the metrics here without it
    from kcompress.data import DataSource

__all__ = [
    "BeforeAfter",
    "PROBABILITIES",
    "LOGITS",
    "output_kind",
    "probabilities",
    "Predictor",
    "predictor",
    "Evaluation",
    "evaluate",
    "metrics_from_outputs",
    "compare",
    "test_figures",
]

PROBABILITIES, LOGITS = "probabilities", "logits"
_SOFTMAX_NAMES = ("softmax", "softmax_v2")  # keras.activations.softmax, tf.nn.softmax
_SOFTMAX_SYMBOLS = ("nn.softmax", "math.softmax")  # tf.nn.softmax applied in a functional model (TFOpLambda)



class BeforeAfter:
    """Accuracy change of a result with ``before`` and ``after`` evaluations (on the same data) and ``options``
    carrying ``max_drop``: shared by the quantization results of every format."""

    @property
    def accuracy_delta(self) -> float:
        """After minus before, as a fraction (-0.003 = 0.3 points lost)."""
        return self.after.accuracy - self.before.accuracy  # type: ignore[attr-defined]

    @property
    def drop_points(self) -> float:
        return -100 * self.accuracy_delta

    @property
    def within_max_drop(self) -> bool:
        """The drop stayed within ``options.max_drop`` points (the CLI exits 1 otherwise)."""
        return self.drop_points <= self.options.max_drop  # type: ignore[attr-defined]


def output_kind(model) -> Optional[str]:
    """``"probabilities"`` when the model's output is a softmax, ``"logits"`` otherwise; ``None`` when the model has
    no graph to read (a subclassed Keras model).

    ``model``: a Keras model (tf_keras or Keras 3), a model path, or ``.tflite`` bytes. Keras: the layer that produces
    ``model.outputs[0]`` (through nested models and pruning/QAT wrappers; not ``model.layers[-1]``, which need not
    be the output layer) is a ``Softmax``, a layer with ``activation=softmax`` or ``tf.nn.softmax``. TFLite: the op
    producing the output tensor is ``SOFTMAX``, possibly behind ``DEQUANTIZE``/``QUANTIZE``.
    """
    from kcompress.io import model_format
    from kcompress.onnx.runtime import is_onnx, onnx_output_kind

    if is_onnx(model):
        return onnx_output_kind(model)
    if isinstance(model, (bytes, bytearray)) or (isinstance(model, str) and model_format(model) == "tflite"):
        from kcompress.litert.inspect import tflite_output_kind

        return tflite_output_kind(model)
    if isinstance(model, str):
        from kcompress.io import load_model

        model = load_model(model)
    layer = _output_layer(model)
    if layer is None:
        return None
    return PROBABILITIES if _is_softmax(layer) else LOGITS


def _output_layer(model):
    """The layer that produces the model's (first) output, looked up through nested models and wrappers."""
    layer = model
    for _ in range(1000):  # a graph is finite; this only guards against a malformed one
        inner = getattr(layer, "layer", None)  # pruning / QAT wrappers hold the real layer
        if inner is not None and not hasattr(layer, "layers"):
            layer = inner
            continue
        if not hasattr(layer, "layers"):  # a plain layer
            return layer
        outputs = getattr(layer, "outputs", None)
        if outputs:
            layer = keras3_history_layer(outputs[0])  # the layer (Keras 3: or operation) that produced it
            if layer is None:
                return None
        elif type(layer).__name__ == "Sequential" and layer.layers:  # not built yet: its last layer is the output
            layer = layer.layers[-1]
        else:  # a subclassed model: no graph to read
            return None
    return None


def _is_softmax(layer) -> bool:
    if type(layer).__name__ == "Softmax":
        return True
    if getattr(layer, "symbol", None) in _SOFTMAX_SYMBOLS:
        return True
    for fn in (getattr(layer, "activation", None), getattr(layer, "function", None)):  # Dense/Activation, Lambda
        fn = getattr(fn, "activation", fn)  # tfmot's QuantizeAwareActivation wraps the function
        if getattr(fn, "__name__", None) in _SOFTMAX_NAMES:
            return True
    return False


@dataclass
class Predictor:
    """Something that maps a float batch to float outputs, with the shape facts evaluation needs."""

    name: str
    kind: str  # "keras", "tflite" or "onnx"
    input_shape: tuple
    num_classes: int
    predict: Callable[[np.ndarray], np.ndarray]
    output_kind: Optional[str] = None  # "probabilities" or "logits" (see output_kind); None: unknown

    @property
    def runtime(self) -> str:
        """What runs the model: ``keras``, ``litert`` or ``onnxruntime`` (:class:`~kcompress.types.Runtime`)."""
        return {"tflite": "litert", "onnx": "onnxruntime"}.get(self.kind, self.kind)


def predictor(model_or_path, batch_size: int = 64, num_threads: Optional[int] = None,
              trust_model: bool = False) -> Predictor:
    """A Predictor for a tf_keras model object, a Keras model path (loaded safely unless ``trust_model``), a
    ``.tflite`` path/bytes (LiteRT) or an ``.onnx`` path/bytes (ONNX Runtime, CPU)."""
    from kcompress.io import ensure_tf_keras, load_model, model_format
    from kcompress.litert.interpreter import TFLiteModel
    from kcompress.modelinfo import input_shape, num_classes
    from kcompress.onnx.runtime import ONNXModel, is_onnx

    if is_onnx(model_or_path):
        om = ONNXModel(model_or_path, num_threads=num_threads, batch_size=batch_size)
        classes = om.num_classes or int(om.predict(np.zeros((1, *(d or 1 for d in om.input_shape)))).shape[-1])
        name = model_or_path if isinstance(model_or_path, str) else "<onnx>"
        return Predictor(name, "onnx", om.input_shape, classes, lambda x: om.predict(x, batch_size),
                         output_kind(model_or_path))
    if isinstance(model_or_path, (bytes, bytearray)) or (
        isinstance(model_or_path, str) and model_format(model_or_path) == "tflite"
    ):
        m = TFLiteModel(model_or_path, num_threads=num_threads, batch_size=batch_size)
        classes = int(m.output["shape"][-1])
        name = model_or_path if isinstance(model_or_path, str) else "<tflite>"
        return Predictor(name, "tflite", m.input_shape, classes, m.predict, output_kind(model_or_path))
    model = (load_model(model_or_path, trust_model=trust_model) if isinstance(model_or_path, str)
             else ensure_tf_keras(model_or_path))
    name = model_or_path if isinstance(model_or_path, str) else model.name

    from kcompress.backend import tf

    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(fn(tf.constant(x, tf.float32)), np.float32)

    return Predictor(name, "keras", input_shape(model), num_classes(model), predict, output_kind(model))


@dataclass(frozen=True)
class Evaluation:
    """Metrics plus the raw outputs (kept for comparisons; not written to JSON)."""

    metrics: dict[str, Any]
    outputs: np.ndarray
    labels: np.ndarray
    output_kind: Optional[str] = None  # what ``outputs`` hold: "probabilities" or "logits"; None: unknown
    runtime: Optional[str] = None  # what ran the model: "keras", "litert" or "onnxruntime"

    @property
    def accuracy(self) -> float:
        return float(self.metrics["accuracy"])

    @property
    def predictions(self) -> np.ndarray:
        return self.outputs.argmax(axis=1)


def probabilities(outputs: np.ndarray, kind: Optional[str] = None) -> np.ndarray:
    """The outputs as probabilities: unchanged for ``kind="probabilities"``, softmax for ``kind="logits"``.

    Pass the kind read from the graph (``Predictor.output_kind``, ``Evaluation.output_kind``): dequantized int8
    softmax rows are probabilities that do not sum to 1, and they are not renormalized (that would inflate the
    confidence). ``kind=None`` is only for raw arrays with no graph behind them: the outputs are then taken as
    probabilities when they are non-negative and every row sums to 1 within 1e-2, else as logits.
    """
    if kind is None:
        kind = (
            PROBABILITIES
            if outputs.size and np.all(outputs >= -1e-6) and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-2)
            else LOGITS
        )
    if kind == PROBABILITIES:
        return outputs
    if kind != LOGITS:
        raise ValueError(f"output kind must be {PROBABILITIES!r} or {LOGITS!r}, got {kind!r}")
    z = outputs - outputs.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def metrics_from_outputs(
    outputs: np.ndarray, labels: np.ndarray, class_names, output_kind: Optional[str] = None
) -> dict[str, Any]:
    """top-1, top-5 (more than 5 classes), per-class recall, macro F1, confusion matrix, mean confidence.

    Every class of the output counts (``labels=range(n_classes)``): macro F1 averages all of them, a class absent
    from ``labels`` but predicted scoring 0; ``per_class_recall`` lists the classes present in ``labels`` (recall
    is undefined for the others). ``output_kind`` is passed to :func:`probabilities` for the confidence.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score, top_k_accuracy_score

    n_classes = outputs.shape[1]
    classes = np.arange(n_classes)
    pred = outputs.argmax(axis=1)
    recall = recall_score(labels, pred, labels=classes, average=None, zero_division=0)
    present = np.bincount(labels, minlength=n_classes)[:n_classes] > 0
    names = list(class_names) + [str(i) for i in range(len(class_names), n_classes)]
    probs = probabilities(outputs, output_kind)
    out: dict[str, Any] = {
        "num_samples": int(len(labels)),
        "accuracy": float(accuracy_score(labels, pred)),
        "top5_accuracy": None,
        "macro_f1": float(f1_score(labels, pred, labels=classes, average="macro", zero_division=0)),
        "per_class_recall": {names[i]: float(recall[i]) for i in range(n_classes) if present[i]},
        "confusion_matrix": confusion_matrix(labels, pred, labels=classes).tolist(),
        "class_names": names[:n_classes],
        "mean_confidence": float(probs.max(axis=1).mean()),
        "output_kind": output_kind,
    }
    if n_classes > 5:
        out["top5_accuracy"] = float(top_k_accuracy_score(labels, outputs, k=5, labels=classes))
    return out


def evaluate(
    model_or_path,
    data: DataSource,
    batch_size: int = 64,
    limit: Optional[int] = None,
    description: str = "evaluating",
    trust_model: bool = False,
) -> Evaluation:
    """Runs the model over ``data`` (all of it unless ``limit``) and computes the metrics.

    ``model_or_path``: a Keras model (tf_keras or Keras 3), a model path, a ``.tflite`` or ``.onnx`` path or bytes;
    ``data``: an opened DataSource or a data spec (image folder, ``.npz``, built-in name). ``trust_model``: load a
    model file even with Lambda layers or unregistered classes (files you trust only).
    """
    from kcompress.data import DataSource
    from kcompress.errors import UsageError

    if int(batch_size) < 1 or (limit is not None and int(limit) < 1):
        raise UsageError(f"batch size and limit must be at least 1, got {batch_size} and {limit}")
    if not isinstance(data, DataSource):
        from kcompress.inputs import as_data

        data = as_data(data)
    pred = (model_or_path if isinstance(model_or_path, Predictor)
            else predictor(model_or_path, batch_size, trust_model=trust_model))
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
    kind = pred.output_kind
    return Evaluation(metrics_from_outputs(outputs, y, data.class_names, kind), outputs, y, kind, pred.runtime)


def test_figures(models: dict, data: Optional[DataSource]) -> Optional[dict]:
    """Accuracy of each of ``models`` (name -> model or .tflite) on TEST, the split that chose nothing; None
    without TEST. ``{"split": "test", "data", "num_samples", "<name>_accuracy", ...}``."""
    if data is None:
        return None
    out: dict[str, Any] = {"split": "test", "data": data.name, "num_samples": data.num_samples}
    for name, model in models.items():
        out[f"{name}_accuracy"] = evaluate(model, data, description=f"testing {name} (test)").accuracy
    return out


def compare(a: Evaluation, b: Evaluation) -> dict[str, Any]:
    """How ``a`` differs from the reference ``b`` on the same samples: agreement, accuracy and per-class recall
    deltas (most hurt first), confidence shift and the RMSE between the two models' probabilities."""
    if len(a.labels) != len(b.labels) or not np.array_equal(a.labels, b.labels):
        raise KcompressError("the two evaluations were not made on the same samples")
    pa, pb = probabilities(a.outputs, a.output_kind), probabilities(b.outputs, b.output_kind)
    per_class = {}
    for name, recall in a.metrics["per_class_recall"].items():
        ref = b.metrics["per_class_recall"].get(name)
        if ref is not None:
            per_class[name] = recall - ref
    return {
        "agreement": float((a.predictions == b.predictions).mean()),
        "accuracy_delta": a.accuracy - b.accuracy,
        "per_class_recall_delta": dict(sorted(per_class.items(), key=lambda kv: kv[1])),
        "mean_confidence_delta": float(pa.max(axis=1).mean() - pb.max(axis=1).mean()),
        "output_rmse": float(np.sqrt(np.mean((pa - pb) ** 2))),
    }
