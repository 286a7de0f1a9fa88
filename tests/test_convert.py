import numpy as np
import pytest

from kcompress.errors import UsageError
from kcompress.evaluation import evaluate
from kcompress.litert.interpreter import TFLiteModel, float_op_report, tflite_tensors
from kcompress.modelinfo import count_params
from kcompress.options import QuantizeOptions
from kcompress.quantization import ptq
from kcompress.quantization.ptq import convert, resolve_float_layers


@pytest.fixture(scope="module")
def calib(digits_train):
    return lambda: digits_train.calibration_samples((8, 8, 1), 100)


@pytest.fixture(scope="module")
def int8_bytes(trained_cnn, calib):
    return convert(trained_cnn, QuantizeOptions(mode="int8"), calibration=calib)


def test_int8_keeps_accuracy_within_one_point(trained_cnn, int8_bytes, digits_val):
    keras_acc = evaluate(trained_cnn, digits_val).accuracy
    tfl_acc = evaluate(int8_bytes, digits_val).accuracy
    assert keras_acc > 0.9
    assert abs(tfl_acc - keras_acc) <= 0.01


def test_int8_is_fully_integer_and_small(trained_cnn, int8_bytes):
    params = count_params(trained_cnn)["total"]
    assert params >= 100_000
    assert len(int8_bytes) <= 0.3 * params * 4
    report = float_op_report(int8_bytes)
    assert report["float_compute_op_count"] == 0
    assert report["quantize_ops"] == 0 and report["dequantize_ops"] == 0  # int8 I/O: no float hops at all
    m = TFLiteModel(int8_bytes)
    assert m.input_dtype == np.int8 and m.output_dtype == np.int8


def test_per_channel_by_default_and_per_tensor_on_request(trained_cnn, int8_bytes, calib):
    def conv_weight_scales(data):
        return max(len(t.scales) for t in tflite_tensors(data) if t.dtype == "int8" and len(t.shape) == 4)

    assert conv_weight_scales(int8_bytes) == 64  # conv2 has 64 filters, one scale each
    per_tensor = convert(trained_cnn, QuantizeOptions(mode="int8", per_channel=False), calibration=calib)
    assert conv_weight_scales(per_tensor) == 1


def test_uint8_io_evaluates_like_int8(trained_cnn, int8_bytes, calib, digits_val):
    u8 = convert(trained_cnn, QuantizeOptions(mode="int8", io="uint8"), calibration=calib)
    assert TFLiteModel(u8).input_dtype == np.uint8
    a, b = evaluate(u8, digits_val), evaluate(int8_bytes, digits_val)
    assert (a.predictions == b.predictions).mean() > 0.98


@pytest.mark.parametrize("mode", ["dynamic", "float16", "int16x8"])
def test_other_modes_run_and_keep_accuracy(trained_cnn, calib, digits_val, mode):
    data = convert(trained_cnn, QuantizeOptions(mode=mode), calibration=calib)
    keras_acc = evaluate(trained_cnn, digits_val).accuracy
    assert abs(evaluate(data, digits_val).accuracy - keras_acc) <= 0.01
    assert TFLiteModel(data).input_dtype == np.float32


@pytest.mark.parametrize("path", ["frozen", "module"])
def test_float_layers_stay_float(trained_cnn, calib, digits_val, path, monkeypatch):
    if path == "module":  # the large models' conversion path, forced on the small test model
        monkeypatch.setattr(ptq, "MODULE_MIN_PARAMS", 1)
    layers = resolve_float_layers(trained_cnn, ["first", "last"])
    assert layers == ("conv1", "classifier")
    data = convert(trained_cnn, QuantizeOptions(mode="int8", float_layers=layers), calibration=calib)
    report = float_op_report(data)
    assert report["float_compute_op_count"] == 2
    assert set(report["float_compute_ops"]) == {"CONV_2D", "FULLY_CONNECTED"}
    assert report["op_counts"]["CONV_2D"] == 2  # the other conv is still int8
    assert evaluate(data, digits_val).accuracy > 0.9


def test_unknown_float_layer_names_the_nearest(trained_cnn):
    with pytest.raises(UsageError, match="no layer 'conv3'.*did you mean 'conv[12]'"):
        resolve_float_layers(trained_cnn, ["conv3"])


def test_int8_needs_calibration(trained_cnn):
    with pytest.raises(UsageError, match="needs calibration data"):
        convert(trained_cnn, QuantizeOptions(mode="int8"))
