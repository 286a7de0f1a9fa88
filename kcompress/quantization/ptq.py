"""TFLite conversion and post-training quantization through the TFLite converter.

Modes (what the converter is asked for):
- ``fp32``: no optimization (the reference);
- ``dynamic``: int8 weights, float activations, quantized on the fly at run time (often SLOWER than fp32 on
  XNNPACK for conv nets; measured and hinted by ``kcompress quantize``);
- ``float16``: float16 weights (for GPU delegates);
- ``int8``: full integer with a representative dataset; per-channel weights unless ``per_channel=False``;
- ``int16x8``: int16 activations, int8 weights (accuracy-sensitive models; few CPU kernels are fast at it).

``float_layers`` keeps named Keras layers in float inside an int8 model (selective quantization) by denylisting
their ops in the converter's QuantizationDebugger. Every flatbuffer this module returns has been loaded and invoked
once in the LiteRT interpreter: a file that does not run is an error, never an output.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import warnings
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from kcompress.backend import tf
from kcompress.errors import KcompressError, UsageError
from kcompress.internals import disable_per_channel, ops_details, quant_interpreter
from kcompress.litert.interpreter import TFLiteModel
from kcompress.options import QuantizeOptions
from kcompress.types import QuantMode, StrEnum

__all__ = [
    "convert",
    "converting",
    "resolve_float_layers",
    "smoke_test",
]

def _keras_layers(model) -> list:
    from kcompress.modelinfo import flat_layers

    return [layer for layer in flat_layers(model) if layer.weights or layer.__class__.__name__ != "InputLayer"]


def resolve_float_layers(model, names: Iterable[str]) -> tuple[str, ...]:
    """Expands ``first``/``last`` (the first/last layer with weights) and checks every name exists."""
    weighted = [layer.name for layer in _keras_layers(model) if layer.weights]
    all_names = {layer.name for layer in _keras_layers(model)}
    out = []
    for name in names:
        if name == "first":
            out.append(weighted[0])
        elif name == "last":
            out.append(weighted[-1])
        elif name in all_names:
            out.append(name)
        else:
            import difflib

            near = difflib.get_close_matches(name, sorted(all_names), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UsageError(f"--float-layers: the model has no layer {name!r}{hint}")
    return tuple(dict.fromkeys(out))


class _Path(StrEnum):
    """How a Keras model reaches the converter, in the order :func:`convert` tries them."""

    MODULE = "module"  # a SavedModel of one inference function and the model's variables (no Keras objects)
    FROZEN = "frozen"  # the same function traced and frozen to constants in memory
    KERAS = "keras"  # the converter's own Keras path: the whole Keras model saved as a SavedModel


#: parameters from which a Keras model is converted through the module path (see :func:`_converter`): below it,
#: saving costs more time than it saves memory (MobileNetV2, 2.2M: 4.8 s vs 1.0 s frozen; ResNet50, 23.6M: 8.8 s
#: either way, 1.5 vs 2.1 GiB peak, int8 at 32x32)
MODULE_MIN_PARAMS = 10_000_000


def _paths(model) -> tuple[_Path, ...]:
    """The paths worth trying for ``model``, in order. The module path needs one input and one output (a SavedModel
    signature orders its tensors by name, which may not be the model's order) and pays off on large models only;
    both traced paths need symbolic inputs."""
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if not inputs:
        return (_Path.KERAS,)
    module = len(inputs) == 1 and outputs is not None and len(outputs) == 1 and \
        model.count_params() >= MODULE_MIN_PARAMS
    return ((_Path.MODULE,) if module else ()) + (_Path.FROZEN, _Path.KERAS)


def _converter(model, path: _Path, workdir: str):
    """The converter for a tf_keras model, by ``path`` (``workdir``: an empty folder the module path writes to).

    Keras models go in as one traced inference function (``model(x, training=False)``, the model's own input
    signature, batch dimension free). ``MODULE`` saves that function with the model's variables (a ``tf.Module``, no
    Keras object) under ``workdir`` and converts the SavedModel: the converter's SavedModel importer lifts the
    variables to constants itself. ``FROZEN`` freezes the function in memory instead
    (``convert_variables_to_constants_v2``), which held about 7 copies of the weights through the whole
    conversion: int8 of InceptionResNetV2 at 75x75 (217 MB of weights) peaked at 3.8 GiB resident that way, 2.4 GiB
    as a module; VGG16 at 32x32 2.3 vs 1.5 GiB (issue 14, ``/proc`` sampled every 20 ms). Time: PTQ the same, the
    QAT export of InceptionResNetV2 13% slower (coverage stages, same session) while every variable was saved;
    saving only those inference reads took that export from 63.8 to 43.9 s (``tools/profile_qat.py``, with the
    other speed-ups of the same change). ``KERAS`` (``from_keras_model``) saves the Keras model itself, tracing
    every layer's call functions for serialization: most of the time on deep models (int8 export of QAT DenseNet121
    at 32x32: 82 CPU s that way, 7 s traced) and up to 2 GiB more memory.
    Gotcha: the frozen path passes the ``tf.function`` as the converter's ``trackable_obj``; passing the Keras model
    would save it as a SavedModel again.
    """
    if path == _Path.KERAS:
        return tf.lite.TFLiteConverter.from_keras_model(model)
    specs = _input_specs(model)
    if path == _Path.MODULE:
        _save_module(model, workdir)
        return tf.lite.TFLiteConverter.from_saved_model(workdir)
    if len(specs) == 1:
        fn = tf.function(lambda x: model(x, training=False))
    else:
        fn = tf.function(lambda *xs: model(list(xs), training=False))
    return tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function(*specs)], fn)


def _input_specs(model) -> list:
    return [tf.TensorSpec(x.shape, x.dtype, name=x.name.split(":")[0]) for x in model.inputs]


def _save_module(model, folder: str) -> None:
    """The module path's SavedModel: the inference function and the variables it captures, no Keras object."""
    serve = tf.function(lambda x: model(x, training=False), input_signature=_input_specs(model))
    fn = serve.get_concrete_function()
    module = tf.Module()
    # tracked so that they are saved: the variables inference reads, no more (a QAT model of InceptionResNetV2 has
    # 2,592, its inference reads 1,850; every variable saved costs time in the save and in both loads)
    module.variables_ = list(fn.variables)
    module.serve = serve
    tf.saved_model.save(module, folder, signatures=fn)


class _Saved:
    """A Keras model with the module path's SavedModel of it already written (see :func:`converting`)."""

    def __init__(self, model, folder: str):
        self.model, self.folder = model, folder


@contextlib.contextmanager
def converting(model) -> Iterator:
    """For several conversions of one Keras model that does not change in between (fp32 and int8, say):
    ``with converting(model) as m: convert(m); convert(m, int8_options, calibration)``. A model that goes the
    module path (:data:`MODULE_MIN_PARAMS`) is saved once for all of them instead of once per conversion (the
    save is a third of an fp32 conversion of InceptionResNetV2); anything else is yielded as it is. A model that
    cannot be saved is yielded as it is too: each conversion then tries the paths in order, as alone."""
    from kcompress.io import ensure_tf_keras

    if isinstance(model, str):
        yield model
        return
    model = ensure_tf_keras(model)
    if _paths(model)[0] != _Path.MODULE:
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="kcompress-convert-") as folder:
        try:
            _save_module(model, folder)
        except Exception:  # noqa: BLE001 - the paths in order will say what fails, as for a single conversion
            yield model
            return
        yield _Saved(model, folder)


def _representative(samples: Callable[[], Iterable[np.ndarray]]):
    def gen():
        for x in samples():
            yield [np.asarray(x, np.float32)]

    return gen


_TF_IO = {"int8": "int8", "uint8": "uint8", "float": "float32"}


def convert(
    model,
    options: Optional[QuantizeOptions] = None,
    calibration: Optional[Callable[[], Iterable[np.ndarray]]] = None,
) -> bytes:
    """The model (tf_keras model, what :func:`converting` yields, or a SavedModel path) as ``.tflite`` bytes,
    smoke-tested in the interpreter.

    ``calibration`` returns a fresh iterable of single-sample batches each time it is called (the converter may
    iterate more than once); required for ``int8`` and ``int16x8``.
    """
    options = options or QuantizeOptions(mode=QuantMode.FP32)
    mode = options.mode
    if mode == QuantMode.INT4_WEIGHTS:  # ai-edge-quantizer rewrites the fp32 file: every conv/dense int4
        from kcompress.quantization.aeq import int4_weights

        if calibration is None:
            raise UsageError(f"mode {mode} needs calibration data (--data)")
        keras_model = model.model if isinstance(model, _Saved) else model
        return int4_weights(None if isinstance(keras_model, str) else keras_model, convert(model), options.recipe,
                            calibration, max_drop=options.max_drop)[0]
    if mode in ("int8", "int16x8") and calibration is None:
        raise UsageError(f"mode {mode} needs calibration data (--data)")
    if mode != "int8" and options.float_layers:
        raise UsageError("--float-layers applies to --mode int8 only")
    if isinstance(model, str):  # a SavedModel directory (e.g. a Keras 3 export)
        try:
            data = _run(tf.lite.TFLiteConverter.from_saved_model(model), options, calibration)
        except KcompressError:
            raise
        except Exception as e:  # the converter raises ConverterError, RuntimeError, ValueError...
            raise _failed(mode, e, model) from None
    else:
        data = _convert_keras(model, options, calibration)
    smoke_test(data)
    return data


def _convert_keras(model, options: QuantizeOptions, calibration) -> bytes:
    """Tries :func:`_paths` in order; a path that fails hands over to the next (tracing, saving or freezing can
    fail where another path works). After a ``ConverterError`` (the MLIR converter refused the graph) the Keras
    path, which imports the same graph the slow way, is skipped, and that error is the one reported."""
    from kcompress.io import ensure_tf_keras

    saved = model.folder if isinstance(model, _Saved) else None
    model = model.model if isinstance(model, _Saved) else ensure_tf_keras(model)
    errors: list[Exception] = []

    def refused(e: Exception) -> bool:
        return type(e).__name__ == "ConverterError"

    for path in _paths(model):
        if path == _Path.KERAS and any(refused(e) for e in errors):
            break
        try:
            if path == _Path.MODULE and saved is not None:
                return _run(tf.lite.TFLiteConverter.from_saved_model(saved), options, calibration)
            with tempfile.TemporaryDirectory(prefix="kcompress-convert-") as workdir:
                return _run(_converter(model, path, workdir), options, calibration)
        except KcompressError:
            raise
        except Exception as e:  # noqa: BLE001 - the converter raises ConverterError, RuntimeError, ValueError...
            errors.append(e)
    raise _failed(options.mode, next((e for e in errors if refused(e)), errors[-1]), model) from None


#: TFLite op (as the converter names it in errors) -> the Keras layer classes that become it
_OP_LAYERS = {"average_pool_2d": ("AveragePooling2D", "GlobalAveragePooling2D"), "max_pool_2d": ("MaxPooling2D",),
              "concatenation": ("Concatenate",), "conv_2d": ("Conv2D",), "depthwise_conv_2d": ("DepthwiseConv2D",),
              "fully_connected": ("Dense",), "mean": ("GlobalAveragePooling2D",), "mul": ("Multiply",),
              "add": ("Add",), "softmax": ("Softmax", "Activation"), "resize_bilinear": ("UpSampling2D", "Resizing")}


def _failed(mode: str, e: Exception, model=None) -> KcompressError:
    """One line: the converter's first error line and, when it names a TFLite op (``'tfl.average_pool_2d' op``),
    the model's layers that become that op (the converter's own message names only a source line)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = f"the TFLite converter failed ({mode}): {first[:400]}"
    op = re.search(r"'tfl\.(\w+)' op", str(e))
    if op and model is not None and not isinstance(model, str):
        from kcompress.graph import flatten_model

        classes = _OP_LAYERS.get(op.group(1), ())
        try:
            inner = [getattr(la, "layer", la) for la in flatten_model(model).layers]  # QAT wraps layers
            layers = [la.name for la in inner if type(la).__name__ in classes]
        except KcompressError:
            layers = []
        if layers:
            more = f" and {len(layers) - 5} more" if len(layers) > 5 else ""
            text += (f" (op {op.group(1).upper()}: layers {', '.join(layers[:5])}{more}; keep them float with "
                     "--float-layers)")
    return KcompressError(text)


def _run(conv, options: QuantizeOptions, calibration) -> bytes:
    """Sets ``options`` on the converter and converts."""
    mode = options.mode
    if mode != "fp32":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        conv.target_spec.supported_types = [tf.float16]
    if mode in ("int8", "int16x8"):
        conv.representative_dataset = _representative(calibration)
        if not options.per_channel:
            disable_per_channel(conv)
    if mode == "int16x8":
        conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    if mode == "int8":
        if options.float_layers:
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        else:
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io = getattr(tf, _TF_IO[options.io_type])
        conv.inference_input_type = io
        conv.inference_output_type = io
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        return _selective(conv, options, calibration) if mode == "int8" and options.float_layers else conv.convert()


def _selective(conv, options: QuantizeOptions, calibration) -> bytes:
    """Full int8 except the ops of ``options.float_layers``, through the QuantizationDebugger's denylist."""
    debug_dataset = _representative(calibration)
    debugger = tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=debug_dataset)
    names = _denylist_nodes(debugger, options.float_layers)
    if not names:
        raise KcompressError(f"--float-layers: no quantized ops found for {', '.join(options.float_layers)}")
    debug_options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=names)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=conv, debug_dataset=debug_dataset, debug_options=debug_options
    )
    return debugger.get_nondebug_quantized_model()


def _denylist_nodes(debugger, layers: tuple[str, ...]) -> list[str]:
    """Tensor names of the quantized model's ops that belong to the given Keras layers.

    The converter names op outputs after the Keras layer path (``model/conv2d/BiasAdd;...``); a layer owns an
    op when ``/<layer>/`` (or ``/<layer>;`` / a trailing ``/<layer>``) occurs in the op's output name.
    """
    interp = quant_interpreter(debugger)
    names = []
    pats = [re.compile(rf"(^|/){re.escape(layer)}(/|;|$)") for layer in layers]
    for op in ops_details(interp):
        for idx in op["outputs"]:
            tname = interp.get_tensor_details()[idx]["name"] if idx >= 0 else ""
            if any(p.search(part) for p in pats for part in tname.split(";")):
                names.append(tname)
    return sorted(set(names))


def smoke_test(data: bytes) -> None:
    """Loads the flatbuffer and runs it once on zeros; raises a KcompressError when it does not run."""
    try:
        m = TFLiteModel(data)
        x = np.zeros((1, *m.input_shape), np.float32)
        m.predict(x)
    except KcompressError as e:
        raise KcompressError(f"the converted model does not run in the LiteRT interpreter: {e}") from None
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KcompressError(f"the converted model does not run in the LiteRT interpreter: {first}") from None
