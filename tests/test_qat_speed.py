"""The fast conversion paths (issue 14): Keras models reach the TFLite converter as one traced inference function,
frozen in memory or (large models) saved alone as a small SavedModel, not through the Keras SavedModel round trip,
and give the same .tflite results as the converter's own Keras path.

The reference in every test is TensorFlow's ``TFLiteConverter.from_keras_model`` with the same settings; the
time saved is measured by ``tools/profile_qat.py``, not here.
"""

import numpy as np
import pytest
from tensorflow.python.saved_model import save as tf_save

from kcompress import graph
from kcompress.backend import keras, tf
from kcompress.litert.interpreter import TFLiteModel, tflite_ops
from kcompress.modelinfo import input_shape
from kcompress.options import QuantizeOptions
from kcompress.quantization import ptq, qat_graph
from kcompress.quantization.ptq import convert
from kcompress.quantization.qat import export_tflite, fp32_param_bytes, int8_report
from kcompress.quantization.qat_graph import calibrate, qat_model

L = keras.layers
CALIB = 64
pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs")  # the reference converter's


@pytest.fixture
def savedmodel_writes(monkeypatch):
    """Counts SavedModel writes (TensorFlow's own ``save``, called through)."""
    calls = []
    real = tf_save.save

    def counting(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs.get("export_dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tf_save, "save", counting)
    return calls


def _reference_int8(model, data) -> bytes:
    """TensorFlow's Keras path (a SavedModel round trip), full int8 with int8 I/O, calibrated on the same samples."""
    shape = input_shape(model)
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: (
        [np.asarray(s, np.float32)] for s in data.calibration_samples(shape, CALIB, seed=0)
    )
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    return conv.convert()


def _op_counts(tflite: bytes) -> dict:
    counts: dict = {}
    for op in tflite_ops(tflite):
        counts[op["op"]] = counts.get(op["op"], 0) + 1
    return counts


def _same_int8_results(fast: bytes, ref: bytes, x: np.ndarray) -> None:
    assert _op_counts(fast) == _op_counts(ref)
    a, b = TFLiteModel(fast), TFLiteModel(ref)
    assert a.input["shape_signature"].tolist() == b.input["shape_signature"].tolist()  # batch left free in both
    assert a.output["quantization"] == pytest.approx(b.output["quantization"])
    ya, yb = a.predict(x), b.predict(x)
    step = a.output["quantization"][0]
    assert np.abs(ya - yb).max() <= step + 1e-7  # at most one int8 step apart (identical in practice)
    assert (ya.argmax(1) == yb.argmax(1)).mean() >= 0.99


def _val_arrays(val, shape):
    return np.concatenate([b for b, _ in val.numpy_batches(shape, batch_size=256)])


def test_qat_export_writes_no_savedmodel_and_matches_the_keras_path(trained_cnn, digits, savedmodel_writes):
    train, val = digits
    q, _ = qat_model(trained_cnn)
    calibrate(q, train)
    fast = export_tflite(q, train, QuantizeOptions(calibration_samples=CALIB))
    assert savedmodel_writes == []
    report = int8_report(fast, fp32_param_bytes(trained_cnn))
    assert not report["problems"] and report["dequantize_ops"] == 0  # still fully int8
    ref = _reference_int8(q, train)
    assert len(savedmodel_writes) == 1  # the reference did go through a SavedModel
    _same_int8_results(fast, ref, _val_arrays(val, (8, 8, 1)))


def test_fp32_conversion_matches_the_keras_path(trained_cnn, digits, savedmodel_writes):
    _, val = digits
    fast = convert(trained_cnn)
    assert savedmodel_writes == []
    ref = tf.lite.TFLiteConverter.from_keras_model(trained_cnn).convert()
    x = _val_arrays(val, (8, 8, 1))
    np.testing.assert_allclose(TFLiteModel(fast).predict(x), TFLiteModel(ref).predict(x), atol=1e-6)
    np.testing.assert_allclose(TFLiteModel(fast).predict(x), trained_cnn.predict(x, verbose=0), atol=1e-5)


def test_nested_model_qat_export_matches_the_keras_path(digits, savedmodel_writes):
    """A backbone used as one layer (the transfer-learning shape): flattened by kcompress.graph, then exported."""
    train, val = digits
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential(
        [
            L.Conv2D(8, 3, padding="same", input_shape=(8, 8, 1)),
            L.BatchNormalization(),
            L.ReLU(),
            L.Conv2D(16, 3, strides=2, padding="same"),
            L.ReLU(),
        ],
        name="backbone",
    )
    inp = L.Input((8, 8, 1))
    out = L.Dense(10)(L.GlobalAveragePooling2D()(backbone(inp)))
    model = keras.Model(inp, out)
    assert qat_graph.flatten_model is graph.flatten_model and qat_graph.is_nested(model)
    q, info = qat_model(model)
    assert info["flattened"] and "'backbone'" in info["nesting"]
    calibrate(q, train)
    fast = export_tflite(q, train, QuantizeOptions(calibration_samples=CALIB))
    assert savedmodel_writes == []
    _same_int8_results(fast, _reference_int8(q, train), _val_arrays(val, (8, 8, 1)))


def _signatures(tflite: bytes) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=tflite).get_signature_list()


@pytest.fixture
def module_path(monkeypatch, tmp_path):
    """Large-model conversion on the small test model: the threshold at its size; temporary files under tmp_path."""
    monkeypatch.setattr(ptq, "MODULE_MIN_PARAMS", 1)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    return tmp_path


def test_large_models_convert_through_a_saved_module_with_the_keras_paths_results(trained_cnn, digits, module_path):
    train, val = digits
    x = _val_arrays(val, (8, 8, 1))
    fp32 = convert(trained_cnn)
    assert list(_signatures(fp32)) == ["serving_default"]  # the module's signature: this went through the module
    np.testing.assert_allclose(TFLiteModel(fp32).predict(x), trained_cnn.predict(x, verbose=0), atol=1e-5)
    int8 = convert(trained_cnn, QuantizeOptions(mode="int8", calibration_samples=CALIB),
                   calibration=lambda: train.calibration_samples((8, 8, 1), CALIB, seed=0))
    assert list(_signatures(int8)) == ["serving_default"]
    _same_int8_results(int8, _reference_int8(trained_cnn, train), x)
    # the QAT graph (fake-quant ops) too: the large models' QAT export is where the memory went
    q, _ = qat_model(trained_cnn)
    calibrate(q, train)
    qat_int8 = export_tflite(q, train, QuantizeOptions(calibration_samples=CALIB))
    assert list(_signatures(qat_int8)) == ["serving_default"]
    _same_int8_results(qat_int8, _reference_int8(q, train), x)
    assert not list(module_path.glob("kcompress-convert-*"))  # every temporary SavedModel was removed


def test_conversions_of_one_model_share_one_saved_module_and_give_the_same_files(trained_cnn, digits, module_path,
                                                                                  monkeypatch):
    """fp32 and int8 of one model (what kc.quantize and kc.qat convert) save it for the converter once; the files are
    those of conversions made one by one."""
    import os

    train, _ = digits
    saves, real = [], ptq._save_module

    def counted(model, folder):
        saves.append(folder)
        real(model, folder)

    monkeypatch.setattr(ptq, "_save_module", counted)
    opts = QuantizeOptions(mode="int8", calibration_samples=CALIB)
    calib = lambda: train.calibration_samples((8, 8, 1), CALIB, seed=0)  # noqa: E731
    alone = [convert(trained_cnn), convert(trained_cnn, opts, calibration=calib)]
    assert len(saves) == 2
    with ptq.converting(trained_cnn) as m:
        shared = [convert(m), convert(m, opts, calibration=calib)]
        assert len(saves) == 3 and os.path.isdir(saves[-1])
    assert shared == alone
    assert not list(module_path.glob("kcompress-convert-*"))  # removed with the context
    monkeypatch.setattr(ptq, "MODULE_MIN_PARAMS", 10**9)  # below the threshold: nothing to share
    with ptq.converting(trained_cnn) as m:
        assert m is trained_cnn and len(saves) == 3


def test_quantize_wrappers_traced_without_autograph_compute_what_autograph_traces(trained_cnn, digits, monkeypatch):
    """kcompress traces tfmot's ``QuantizeWrapper`` as plain Python (``kcompress.backend.tfmot``). Reference: the same
    QAT model built and traced through AutoGraph, tf_keras's default for a layer class defined outside Keras; in
    training mode (the fake-quant ranges move) and then in inference mode."""
    from kcompress.backend import tfmot

    wrapper = tfmot().quantization.keras.QuantizeWrapper
    x = _val_arrays(digits[1], (8, 8, 1))[:64]
    outs = []
    for autograph in (False, True):
        with monkeypatch.context() as m:
            if autograph:
                m.setattr(wrapper, "_should_use_autograph", keras.layers.Layer._should_use_autograph)
            q, _ = qat_model(trained_cnn)
            assert wrapper._should_use_autograph(next(la for la in q.layers if isinstance(la, wrapper))) is autograph
            train_out = tf.function(lambda a: q(a, training=True))(x).numpy()
            outs.append((train_out, tf.function(lambda a: q(a, training=False))(x).numpy()))
    for plain, reference in zip(*outs):
        np.testing.assert_array_equal(plain, reference)
