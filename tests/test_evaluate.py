import numpy as np

from kcompress.evaluation import compare, evaluate, metrics_from_outputs


def test_metrics_against_hand_computed_values():
    outputs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 1])
    m = metrics_from_outputs(outputs, labels, ["a", "b"])
    assert m["accuracy"] == 0.75
    assert m["confusion_matrix"] == [[1, 0], [1, 2]]
    assert m["per_class_accuracy"] == {"a": 1.0, "b": 2 / 3}
    # F1: a = 2*0.5*1/1.5 = 0.667, b = 2*1*(2/3)/(5/3) = 0.8
    assert abs(m["macro_f1"] - (2 / 3 + 0.8) / 2) < 1e-9
    assert m["top5_accuracy"] is None  # two classes: top-5 means nothing


def test_keras_and_fp32_tflite_agree(trained_cnn, digits_val):
    from kcompress.quantization.ptq import convert

    a = evaluate(convert(trained_cnn), digits_val)
    b = evaluate(trained_cnn, digits_val)
    c = compare(a, b)
    assert c["agreement"] == 1.0
    assert abs(c["accuracy_delta"]) < 1e-9
    assert a.metrics["top5_accuracy"] >= a.accuracy
