import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score, recall_score, top_k_accuracy_score

from kcompress.evaluation import compare, evaluate, metrics_from_outputs, output_kind, predictor, probabilities


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_metrics_against_sklearn_when_a_class_is_predicted_but_absent_from_labels():
    # 4 classes; class "d" never occurs in the labels but is predicted once (sample 1)
    labels = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([0, 3, 1, 1, 0, 2])
    outputs = np.full((6, 4), 0.05)
    outputs[np.arange(6), pred] = 0.85
    m = metrics_from_outputs(outputs, labels, ["a", "b", "c", "d"], "probabilities")
    every = list(range(4))
    assert m["accuracy"] == 4 / 6
    assert m["confusion_matrix"] == confusion_matrix(labels, pred, labels=every).tolist()
    assert m["confusion_matrix"][0] == [1, 0, 0, 1]  # the sample of class a predicted as d
    # F1 per class: a 0.5, b 0.8, c 1.0, d 0 (predicted once, never right); the macro mean counts d
    expected_f1 = f1_score(labels, pred, labels=every, average="macro", zero_division=0)
    assert abs(expected_f1 - (0.5 + 0.8 + 1.0 + 0.0) / 4) < 1e-12
    assert abs(m["macro_f1"] - expected_f1) < 1e-12
    # recall of the classes present in the labels ("d" has none: its recall is undefined)
    recall = recall_score(labels, pred, labels=every, average=None, zero_division=0)
    assert m["per_class_recall"] == {"a": recall[0], "b": recall[1], "c": recall[2]}
    assert m["per_class_recall"] == {"a": 0.5, "b": 2 / 3, "c": 1.0}
    assert "per_class_accuracy" not in m
    assert m["top5_accuracy"] is None  # four classes: top-5 means nothing
    assert abs(m["mean_confidence"] - 0.85) < 1e-12  # probabilities are taken as they are


def test_top5_against_sklearn_and_numpy():
    rng = np.random.default_rng(0)
    outputs = rng.normal(size=(200, 12))
    labels = rng.integers(0, 12, 200)
    labels[labels == 11] = 10  # class 11 absent from the labels
    m = metrics_from_outputs(outputs, labels, [], "logits")
    top5 = np.argsort(-outputs, axis=1)[:, :5]
    assert abs(m["top5_accuracy"] - (top5 == labels[:, None]).any(axis=1).mean()) < 1e-12
    assert abs(m["top5_accuracy"] - top_k_accuracy_score(labels, outputs, k=5, labels=np.arange(12))) < 1e-12
    assert abs(m["mean_confidence"] - _softmax(outputs).max(axis=1).mean()) < 1e-9
    assert m["class_names"] == [str(i) for i in range(12)]


def test_probabilities_follows_the_kind_it_is_given():
    rows = np.array([[0.5, 0.3, 0.1], [0.2, 0.2, 0.5]])  # int8-like probability rows: they sum to 0.9
    assert np.array_equal(probabilities(rows, "probabilities"), rows)
    np.testing.assert_allclose(probabilities(rows, "logits"), _softmax(rows), rtol=1e-12)
    # no kind (a raw array, no graph): guessed from the values, rows summing to 0.9 count as logits
    np.testing.assert_allclose(probabilities(rows), _softmax(rows), rtol=1e-12)
    exact = rows / rows.sum(axis=1, keepdims=True)
    assert np.array_equal(probabilities(exact), exact)
    with pytest.raises(ValueError):
        probabilities(rows, "softmax")


def _dense_classifier(n_classes, keras, seed=0):
    """32 features -> Dense(64, relu) -> Dense(n, softmax), confident enough to tell one softmax from two."""
    L = keras.layers
    init = keras.initializers
    inp = keras.Input((32,))
    h = L.Dense(64, activation="relu", kernel_initializer=init.GlorotUniform(seed=seed))(inp)
    out = L.Dense(n_classes, activation="softmax", kernel_initializer=init.RandomNormal(stddev=1.0, seed=seed + 1))(h)
    return keras.Model(inp, out)


@pytest.mark.parametrize("n_classes,io", [(100, "int8"), (1000, "int8"), (1000, "float")])
def test_int8_softmax_confidence_matches_the_float_model(n_classes, io, tmp_path):
    from kcompress.backend import keras
    from kcompress.litert.inspect import inspect_model
    from kcompress.litert.interpreter import TFLiteModel
    from kcompress.options import QuantizeOptions
    from kcompress.quantization.ptq import convert
    from kcompress.types import QuantMode

    model = _dense_classifier(n_classes, keras)
    x = np.random.default_rng(1).normal(size=(256, 32)).astype(np.float32)
    ref = model.predict(x, verbose=0)  # the float model's probabilities
    np.savez(tmp_path / "data.npz", x=x, y=ref.argmax(axis=1))
    options = QuantizeOptions(mode=QuantMode.INT8, io=io)
    tfl = convert(model, options, lambda: (x[i : i + 1] for i in range(128)))
    raw = TFLiteModel(tfl, batch_size=64).predict(x)  # dequantized int8 softmax
    assert (np.abs(raw.sum(axis=1) - 1) > 1e-2).any()  # the rows a value test would take for logits

    assert predictor(tfl).output_kind == "probabilities"
    (tmp_path / "m.tflite").write_bytes(tfl)
    assert inspect_model(str(tmp_path / "m.tflite"))["output_kind"] == "probabilities"
    q = evaluate(tfl, str(tmp_path / "data.npz"))
    f = evaluate(model, str(tmp_path / "data.npz"))
    assert q.output_kind == f.output_kind == "probabilities"
    conf = probabilities(q.outputs, q.output_kind).max(axis=1)
    assert conf.min() >= 0 and conf.max() <= 1
    assert np.array_equal(probabilities(q.outputs, q.output_kind), raw)  # not softmaxed a second time
    assert abs(q.metrics["mean_confidence"] - raw.max(axis=1).mean()) < 1e-6
    float_conf = ref.max(axis=1).mean()
    assert float_conf > 0.3  # a second softmax over n classes would bring it near 1/n
    assert abs(f.metrics["mean_confidence"] - float_conf) < 1e-5
    assert abs(q.metrics["mean_confidence"] - float_conf) < 0.05
    c = compare(q, f)
    assert abs(c["mean_confidence_delta"]) < 0.05
    assert c["output_rmse"] < 0.005  # one int8 step is 1/256
    assert c["output_rmse"] == pytest.approx(np.sqrt(np.mean((raw - ref) ** 2)), rel=1e-4)


def _shared_layer_models(keras):
    """Single-output functional models whose last listed layer is not the output layer (a layer is reused)."""
    L = keras.layers
    inp = keras.Input((8,))
    act = L.Activation("softmax")
    probs = keras.Model(inp, act(L.Dense(8, name="d2")(act(L.Dense(8, name="d1")(inp)))))
    inp = keras.Input((8,))
    dense = L.Dense(8, name="shared")
    logits = keras.Model(inp, dense(L.Softmax(name="sm")(dense(inp))))
    return {"probabilities": probs, "logits": logits}


@pytest.mark.parametrize("kind", ["probabilities", "logits"])
def test_output_kind_follows_the_output_tensor_not_the_last_layer(kind):
    from kcompress.backend import keras
    from kcompress.litert.inspect import tflite_output_kind
    from kcompress.quantization.ptq import convert

    model = _shared_layer_models(keras)[kind]
    assert model.layers[-1] is not model.outputs[0]._keras_history[0]
    x = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    out = model.predict(x, verbose=0)
    sums_to_one = np.allclose(out.sum(axis=1), 1, atol=1e-5) and (out >= 0).all()
    assert sums_to_one == (kind == "probabilities")  # the float model is the reference
    assert output_kind(model) == kind
    assert tflite_output_kind(convert(model)) == kind
    m = metrics_from_outputs(out, np.zeros(16, np.int64), [], output_kind(model))
    assert abs(m["mean_confidence"] - (out if sums_to_one else _softmax(out)).max(axis=1).mean()) < 1e-6


def test_output_kind_through_nested_models():
    from kcompress.backend import keras

    L = keras.layers
    inner = keras.Sequential([keras.Input((4,)), L.Dense(3), L.Softmax()])
    inp = keras.Input((4,))
    assert output_kind(keras.Model(inp, inner(inp))) == "probabilities"
    inner_logits = keras.Sequential([keras.Input((4,)), L.Dense(3, activation="softmax"), L.Dense(3)])
    assert output_kind(keras.Model(inp, inner_logits(inp))) == "logits"


def test_keras_and_fp32_tflite_agree(trained_cnn, digits_val):
    from kcompress.quantization.ptq import convert

    a = evaluate(convert(trained_cnn), digits_val)
    b = evaluate(trained_cnn, digits_val)
    assert a.output_kind == b.output_kind == "probabilities"
    c = compare(a, b)
    assert c["agreement"] == 1.0
    assert abs(c["accuracy_delta"]) < 1e-9
    assert a.metrics["top5_accuracy"] >= a.accuracy
    assert set(c["per_class_recall_delta"]) == set(a.metrics["per_class_recall"])
