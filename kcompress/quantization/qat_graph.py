"""The QAT model: nested models flattened, the layers tfmot knows annotated, ``quantize_apply`` in scope.

See :mod:`kcompress.quantization.qat` for the whole flow.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from kcompress.backend import keras, tf, tfmot
from kcompress.data import DataSource
from kcompress.errors import KcompressError, UsageError
from kcompress.graph import flatten_model, is_nested  # noqa: F401 - re-exported: the project's one graph view
from kcompress.internals import averaged_moving_quantize, default_8bit_config, ops_details, output_quantize_config

__all__ = ["SPARSE_THRESHOLD", "flatten_model", "weight_sparsity", "tflite_weight_sparsity", "qat_model", "calibrate",
           "layer_table", "is_nested"]

SPARSE_THRESHOLD = 0.2  # fraction of exactly-zero kernel weights from which a model counts as pruned

L = keras.layers


def _kernels(model) -> list[np.ndarray]:
    out = []
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)  # QAT wrappers
        for w in inner.weights:
            name = w.name.split("/")[-1]
            if w.shape.rank is not None and w.shape.rank >= 2 and ("kernel" in name):
                out.append(np.asarray(w.numpy()))
    return out


def weight_sparsity(model) -> float:
    """Fraction of exactly-zero weights over all conv/dense kernels (0 when the model has none)."""
    ks = _kernels(model)
    total = sum(k.size for k in ks)
    return float(sum(int(np.sum(k == 0)) for k in ks) / total) if total else 0.0


def tflite_weight_sparsity(tflite: bytes) -> float:
    """Fraction of exactly-zero weights over the conv/dense weight tensors of a ``.tflite`` (int8 or float)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=bytes(tflite))
    zeros = total = 0
    for op in ops_details(interp):
        if op["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") or len(op["inputs"]) < 2:
            continue
        try:
            w = interp.get_tensor(int(op["inputs"][1]))
        except ValueError:  # not a constant
            continue
        zeros += int(np.sum(w == 0))
        total += int(w.size)
    return zeros / total if total else 0.0


def _registry():
    return tfmot().quantization.keras.default_8bit.Default8BitQuantizeRegistry()


def quantizable_layers(model) -> list[str]:
    """Names of the (flat) model's layers that tfmot's default 8-bit registry can quantize."""
    reg = _registry()
    return [layer.name for layer in model.layers if _supported(reg, layer)]


def _supported(reg, layer) -> bool:
    if isinstance(layer, (L.InputLayer, keras.Model)):
        return False
    try:
        return bool(reg.supports(layer))
    except Exception:  # noqa: BLE001 - a registry that cannot judge a layer means "no"
        return False


def _bn_after_conv(model, reg, float_layers) -> set[str]:
    """BatchNormalization layers fed by a single quantizable Conv2D/DepthwiseConv2D (tfmot folds these)."""
    out = set()
    for layer in model.layers:
        if not isinstance(layer, L.BatchNormalization) or layer.name in float_layers:
            continue
        nodes = layer.inbound_nodes
        if len(nodes) != 1:
            continue
        prev = tf.nest.flatten(nodes[0].inbound_layers)
        if (
            len(prev) == 1
            and isinstance(prev[0], (L.Conv2D, L.DepthwiseConv2D))
            and not isinstance(prev[0], L.Conv2DTranspose)
            and prev[0].name not in float_layers
            and _supported(reg, prev[0])
            and len(prev[0]._outbound_nodes) == 1
        ):
            out.add(layer.name)
    return out


def _per_tensor_config(layer):
    """tfmot config with per-tensor weights for convs (the default 8-bit scheme is per-channel)."""
    if isinstance(layer, L.DepthwiseConv2D):
        return default_8bit_config(["depthwise_kernel"], ["activation"], False)
    if isinstance(layer, L.Conv2D) and not isinstance(layer, L.Conv2DTranspose):
        return default_8bit_config(["kernel"], ["activation"], False)
    return None


def _custom_objects(model) -> dict:
    objs = {}
    for layer in model.layers:
        objs[layer.__class__.__name__] = layer.__class__
    return objs


#: Layers QAT leaves to the converter (calibrated in the export, still int8): TFLite's int8 AVERAGE_POOL_2D needs
#: its output scale equal to its input's, while tfmot fake-quantizes the pool's output on its own; when the pool also
#: feeds a Concatenate (DenseNet's transition blocks) the converter refuses the graph ("same scale constraint").
CONVERTER_QUANTIZED = (L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D)


def qat_model(
    model,
    float_layers: tuple[str, ...] = (),
    per_channel: bool = True,
    preserve_sparsity: Optional[bool] = None,
):
    """``(qat_model, info)``: the float model wrapped for QAT, with fake-quant ops where tfmot supports them.

    ``info`` holds ``flattened`` (``nesting``: what was inlined, one line), ``annotated``, ``left_float``, ``scheme``
    and ``sparsity_before``.
    The input model is not changed (tfmot clones it with its weights).
    """
    Q = tfmot().quantization.keras
    flat, nesting = flatten_model(model, with_nesting=True)
    names = {layer.name for layer in flat.layers}
    unknown = [n for n in float_layers if n not in names]
    if unknown:
        raise UsageError(f"--float-layers: the model has no layer {unknown[0]!r}")
    reg = _registry()
    annotated, left_float = [], []

    after_conv = _bn_after_conv(flat, reg, float_layers)

    def annotate(layer):
        if isinstance(layer, L.InputLayer):
            return layer
        if layer.name not in float_layers and not isinstance(layer, CONVERTER_QUANTIZED) and (
                _supported(reg, layer) or layer.name in after_conv):
            annotated.append(layer.name)
            config = None if per_channel else (
                output_quantize_config() if layer.name in after_conv else _per_tensor_config(layer))
            return Q.quantize_annotate_layer(layer, quantize_config=config)
        left_float.append(layer.name)
        return layer

    sparsity = weight_sparsity(flat)
    if preserve_sparsity is None:
        preserve_sparsity = sparsity >= SPARSE_THRESHOLD
    scheme_name = "Default8BitPrunePreserveQuantizeScheme" if preserve_sparsity else "Default8BitQuantizeScheme"
    info = {
        "flattened": flat is not model,
        "nesting": nesting.describe(),
        "annotated": annotated,
        "left_float": left_float,
        "scheme": scheme_name,
        "sparsity_before": sparsity,
        "per_channel": per_channel,
    }
    if not any(_supported(reg, layer) and layer.name not in float_layers for layer in flat.layers):
        raise KcompressError("no layer of this model can be quantized by tfmot (no Conv/Dense/... layers)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            annotated_model = keras.models.clone_model(flat, clone_function=annotate)
            if preserve_sparsity:
                scheme = tfmot().experimental.combine.Default8BitPrunePreserveQuantizeScheme()
            else:
                scheme = Q.default_8bit.Default8BitQuantizeScheme()
            with Q.quantize_scope(_custom_objects(flat)):
                q = Q.quantize_apply(annotated_model, scheme)
    except KcompressError:
        raise
    except Exception as e:  # noqa: BLE001 - tfmot raises ValueError/TypeError/RuntimeError; never show them raw
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KcompressError(f"tfmot could not build the QAT model ({type(e).__name__}: {first[:300]})") from None
    return q, info


def calibrate(qmodel, data: DataSource, samples: int = 256, batch_size: Optional[int] = None) -> None:
    """Sets the QAT model's quantizer ranges from data, changing nothing else.

    tfmot starts every activation range at [-6, 6] and moves it by an EMA with decay 0.999 per training step,
    and weight ranges are only set by a training step: a fresh QAT model is far from the float model, and short
    fine-tunes never recover. Here a few forward passes in training mode average the batch ranges exactly (the
    EMA decay is set to k/(k+1) for batch k; one batch of ``samples`` when the inputs are small), then every
    non-quantizer variable (BatchNorm statistics, ...) is restored.
    """
    from kcompress.modelinfo import input_shape

    keep = []
    for layer in qmodel.layers:
        inner = getattr(layer, "layer", None)
        keep.extend(inner.weights if inner is not None else layer.weights if not _is_quant_layer(layer) else [])
    saved = [(v, v.numpy()) for v in keep]
    if batch_size is None:  # one batch when it fits in memory: its min/max are the exact calibration ranges
        batch_size = int(min(samples, max(8, 2_000_000 // max(1, int(np.prod(input_shape(qmodel)))))))
    step = {"k": 0}
    try:
        with averaged_moving_quantize(lambda: step["k"] / (step["k"] + 1.0)):
            for x, _ in data.numpy_batches(input_shape(qmodel), batch_size=batch_size, limit=samples):
                qmodel(tf.constant(x), training=True)
                step["k"] += 1
    finally:
        for v, value in saved:
            v.assign(value)


def _is_quant_layer(layer) -> bool:
    return layer.__class__.__name__ == "QuantizeLayer"


def layer_table(qmodel, info: dict) -> list[dict]:
    """One row per layer of the QAT model: ``{"layer", "type", "how"}``."""
    rows = []
    float_set = set(info.get("float_layers", ()))
    for layer in qmodel.layers:
        inner = getattr(layer, "layer", None)
        cls = layer.__class__.__name__
        if cls == "QuantizeLayer":
            rows.append({"layer": layer.name, "type": cls, "how": "int8 input quantizer"})
            continue
        if isinstance(layer, L.InputLayer):
            continue
        if inner is not None and cls.startswith("QuantizeWrapper"):
            cfg = layer.quantize_config.__class__.__name__
            typ = inner.__class__.__name__
            if "NoOp" in cfg:
                how = "int8, fused with the next layer (e.g. BN folded)"
            elif "Output" in cfg:
                how = "int8 output only"
            elif typ in ("Conv2D", "DepthwiseConv2D", "Dense", "SeparableConv2D", "Conv2DTranspose"):
                how = "int8 weights" + (" per-channel" if "Conv" in cfg and info.get("per_channel") else "") + " + act"
            else:
                how = "int8 (QAT)"
            if typ == "BatchNormalization":
                how = "folded into the conv before it (int8 output)"
            rows.append({"layer": inner.name, "type": typ, "how": how})
        elif layer.name in float_set:
            rows.append({"layer": layer.name, "type": cls, "how": "float (kept float on request)"})
        else:
            rows.append({"layer": layer.name, "type": cls, "how": "no fake-quant; converter int8 (PTQ)"})
    return rows


# --------------------------------------------------------------------------------------------------- export
