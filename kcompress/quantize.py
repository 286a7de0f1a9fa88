"""Quantization-aware training (tfmot's 8-bit scheme) for any tf_keras model, exported to int8 ``.tflite``.

:func:`qat_model` turns a trained float model into a QAT model that tfmot accepts whatever the architecture:

1. nested models (ConvNeXt's stem/downsampling ``Sequential``\\ s, a backbone inside a classifier) are inlined
   into one flat functional graph (:func:`flatten_model`), reusing the trained layers;
2. only the layers tfmot's default 8-bit registry knows are annotated (``quantize_annotate_layer``); the rest
   (``TFOpLambda`` adds, ``Rescaling``, ``LayerScale``, a BatchNormalization that does not follow a conv, ...)
   stay float in Keras, and the TFLite converter quantizes them post-training from the representative data;
3. ``quantize_apply`` runs inside ``quantize_scope`` with the model's own layer classes, so custom layers clone.

BatchNormalization right after a Conv2D/DepthwiseConv2D is matched by tfmot's layout transforms and folded into
the conv by the converter; :func:`layer_table` shows, per layer, what happened to it.
When the input model is sparse (magnitude-pruned: at least :data:`SPARSE_THRESHOLD` of its kernel weights are
exactly zero), tfmot's prune-preserving scheme keeps the zeros through QAT.

:func:`qat` is the whole flow: PTQ baseline, QAT fine-tune, export with a representative dataset, LiteRT
evaluation, the Keras-vs-TFLite check (within 1 point, else a warning naming the diverging layers) and the int8
checks (size at most :data:`MAX_INT8_RATIO` of the fp32 parameter bytes, no DEQUANTIZE hops outside float layers).
Per-layer sensitivity and mixed precision (:func:`sensitivity`, :func:`auto_float_layers`) live in
:mod:`kcompress.sensitivity`.

Gotchas: QAT fine-tunes with the same loss as training (sparse categorical cross-entropy; logits or softmax as the
last layer says); the default learning rate (1e-4) is 10x below Adam's default, pass ``lr`` when the model was
trained at another rate. QAT is not automatically better than PTQ: the result says so when PTQ was as good.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from kcompress._keras import keras, tf, tfmot
from kcompress.data import DataSource
from kcompress.errors import KcompressError, UsageError

__all__ = [
    "QATOptions",
    "QATResult",
    "SPARSE_THRESHOLD",
    "MAX_INT8_RATIO",
    "flatten_model",
    "weight_sparsity",
    "tflite_weight_sparsity",
    "quantizable_layers",
    "qat_model",
    "calibrate",
    "layer_table",
    "export_tflite",
    "int8_report",
    "diverging_layers",
    "qat",
]

SPARSE_THRESHOLD = 0.2  # fraction of exactly-zero kernel weights from which a model counts as pruned
MAX_INT8_RATIO = 0.35  # .tflite bytes / fp32 parameter bytes above which an int8 model is "mostly float"
DEFAULT_LR = 1e-4

L = keras.layers


@dataclass(frozen=True)
class QATOptions:
    """How to fine-tune and export. ``preserve_sparsity`` None means: when the model is sparse."""

    epochs: int = 3
    lr: float = DEFAULT_LR
    batch_size: int = 64
    per_channel: bool = True
    io: str = "int8"
    float_layers: tuple[str, ...] = field(default=())
    calibration_samples: int = 200
    seed: int = 0
    preserve_sparsity: Optional[bool] = None
    max_tflite_drop: float = 1.0  # points; a larger Keras-vs-TFLite gap is warned about

    def __post_init__(self):
        if self.epochs < 0:
            raise UsageError("--epochs must be 0 or more")
        if not self.lr > 0:
            raise UsageError("--lr must be positive")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.io not in ("int8", "uint8", "float"):
            raise UsageError(f"unknown --io {self.io!r}; choose int8, uint8 or float")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


# --------------------------------------------------------------------------------------------------- graph


def _is_nested(model) -> bool:
    return any(isinstance(layer, keras.Model) for layer in model.layers)


def flatten_model(model):
    """The same network as one flat functional model (nested models inlined); the trained layers are reused.

    Returns ``model`` itself when nothing is nested. Subclassed models (no layer graph) cannot be flattened.
    """
    if not _is_nested(model):
        return model
    if not getattr(model, "_is_graph_network", False) and not isinstance(model, keras.Sequential):
        raise KcompressError(f"model {model.name!r} is a subclassed model; QAT needs a functional or Sequential model")

    def call(layer, args, kwargs):
        if isinstance(layer, keras.Model):
            outs = run(layer, tf.nest.flatten((args, kwargs)))
            return outs[0] if len(outs) == 1 else outs
        return layer(*args, **kwargs)

    def run(m, inputs):
        if not getattr(m, "_is_graph_network", False):
            if not isinstance(m, keras.Sequential):
                raise KcompressError(f"nested model {m.name!r} is subclassed; QAT cannot see inside it")
            x = inputs[0]
            for layer in m.layers:
                x = call(layer, (x,), {})
            return [x]
        tensors: dict[str, list] = {}
        for x, y in zip(m.inputs, inputs):
            key = str(id(x))
            tensors[key] = [y] * m._tensor_usage_count[key]
        for depth in sorted(m._nodes_by_depth.keys(), reverse=True):
            for node in m._nodes_by_depth[depth]:
                if node.is_input or any(t not in tensors for t in node.flat_input_ids):
                    continue
                args, kwargs = node.map_arguments(tensors)
                outs = call(node.layer, args, kwargs)
                for key, y in zip(node.flat_output_ids, tf.nest.flatten(outs)):
                    tensors[key] = [y] * m._tensor_usage_count[key]
        return [tensors[str(id(x))].pop() for x in m.outputs]

    inputs = [L.Input(batch_shape=x.shape, dtype=x.dtype, name=x.name.split(":")[0]) for x in model.inputs]
    try:
        outputs = run(model, inputs)
        return keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=model.name)
    except ValueError as e:  # e.g. two nested models with layers of the same name
        raise KcompressError(f"cannot flatten the nested model {model.name!r}: {str(e).splitlines()[0]}") from None


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
    for op in interp._get_ops_details():
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
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry as reg,
    )

    return reg.Default8BitQuantizeRegistry()


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
        nodes = layer._inbound_nodes
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
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_configs as cfgs,
    )

    if isinstance(layer, L.DepthwiseConv2D):
        return cfgs.Default8BitQuantizeConfig(["depthwise_kernel"], ["activation"], False)
    if isinstance(layer, L.Conv2D) and not isinstance(layer, L.Conv2DTranspose):
        return cfgs.Default8BitQuantizeConfig(["kernel"], ["activation"], False)
    return None


def _custom_objects(model) -> dict:
    objs = {}
    for layer in model.layers:
        objs[layer.__class__.__name__] = layer.__class__
    return objs


def qat_model(
    model,
    float_layers: tuple[str, ...] = (),
    per_channel: bool = True,
    preserve_sparsity: Optional[bool] = None,
):
    """``(qat_model, info)``: the float model wrapped for QAT, with fake-quant ops where tfmot supports them.

    ``info`` holds ``flattened``, ``annotated``, ``left_float``, ``scheme`` and ``sparsity_before``.
    The input model is not changed (tfmot clones it with its weights).
    """
    Q = tfmot().quantization.keras
    flat = flatten_model(model)
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
        if layer.name not in float_layers and (_supported(reg, layer) or layer.name in after_conv):
            annotated.append(layer.name)
            config = None if per_channel else _per_tensor_config(layer)
            return Q.quantize_annotate_layer(layer, quantize_config=config)
        left_float.append(layer.name)
        return layer

    sparsity = weight_sparsity(flat)
    if preserve_sparsity is None:
        preserve_sparsity = sparsity >= SPARSE_THRESHOLD
    scheme_name = "Default8BitPrunePreserveQuantizeScheme" if preserve_sparsity else "Default8BitQuantizeScheme"
    info = {
        "flattened": flat is not model,
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
    from tensorflow_model_optimization.python.core.quantization.keras import quantizers

    from kcompress.models import input_shape

    keep = []
    for layer in qmodel.layers:
        inner = getattr(layer, "layer", None)
        keep.extend(inner.weights if inner is not None else layer.weights if not _is_quant_layer(layer) else [])
    saved = [(v, v.numpy()) for v in keep]
    if batch_size is None:  # one batch when it fits in memory: its min/max are the exact calibration ranges
        batch_size = int(min(samples, max(8, 2_000_000 // max(1, int(np.prod(input_shape(qmodel)))))))
    original = quantizers.quant_ops.MovingAvgQuantize
    step = {"k": 0}

    def averaged(*args, **kwargs):
        kwargs["ema_decay"] = step["k"] / (step["k"] + 1.0)
        return original(*args, **kwargs)

    quantizers.quant_ops.MovingAvgQuantize = averaged
    try:
        for x, _ in data.numpy_batches(input_shape(qmodel), batch_size=batch_size, limit=samples):
            qmodel(tf.constant(x), training=True)
            step["k"] += 1
    finally:
        quantizers.quant_ops.MovingAvgQuantize = original
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


def _ends_in_softmax(model) -> bool:
    last = model.layers[-1]
    last = getattr(last, "layer", last)
    act = getattr(getattr(last, "activation", None), "__name__", "")
    return act == "softmax" or isinstance(last, L.Softmax)


def export_tflite(qmodel, data: DataSource, options: QATOptions) -> bytes:
    """The QAT model as int8 ``.tflite`` bytes, calibrated on ``data`` for the layers without fake-quant."""
    from kcompress.convert import QuantizeOptions, convert
    from kcompress.models import input_shape

    shape = input_shape(qmodel)
    opts = QuantizeOptions(
        mode="int8",
        per_channel=options.per_channel,
        io=options.io,
        float_layers=tuple(options.float_layers),
        calibration_samples=options.calibration_samples,
    )
    return convert(qmodel, opts, calibration=lambda: data.calibration_samples(shape, options.calibration_samples))


def fp32_param_bytes(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.weights)) * 4


def int8_report(tflite: bytes, fp32_bytes: int, float_layers=()) -> dict[str, Any]:
    """Is the file really int8? Size ratio to the fp32 parameter bytes and where it hops back to float."""
    from kcompress.runtime import float_op_report, tflite_ops

    from kcompress.runtime import TFLiteModel

    rep = float_op_report(tflite)
    ops = tflite_ops(tflite)
    m = TFLiteModel(tflite, delegates=False)
    io_names = {m.input["name"], m.output["name"]}  # float I/O: one QUANTIZE in, one DEQUANTIZE out are expected
    dequant = [o for o in ops if o["op"] == "DEQUANTIZE" and not set(o["outputs"]) & io_names]
    requant_from_float = [
        o
        for o in ops
        if o["op"] == "QUANTIZE" and o["input_dtypes"][:1] == ["float32"] and not set(o["inputs"]) & io_names
    ]
    ratio = len(tflite) / fp32_bytes if fp32_bytes else None
    problems = []
    if ratio is not None and ratio > MAX_INT8_RATIO:
        problems.append(f".tflite is {ratio:.2f}x the fp32 parameter bytes (int8 should be <= {MAX_INT8_RATIO}x)")
    if not float_layers and (dequant or requant_from_float or rep["float_compute_op_count"]):
        problems.append(
            f"{len(dequant)} DEQUANTIZE op(s) and {rep['float_compute_op_count']} float compute op(s) "
            f"({', '.join(rep['float_compute_ops'])}) in a model meant to be fully int8"
        )
    return {
        "bytes": len(tflite),
        "fp32_param_bytes": fp32_bytes,
        "ratio": ratio,
        "dequantize_ops": len(dequant),
        "quantize_from_float_ops": len(requant_from_float),
        "float_compute_ops": rep["float_compute_ops"],
        "float_compute_op_count": rep["float_compute_op_count"],
        "op_counts": rep["op_counts"],
        "problems": problems,
    }


def _output_in(model, layer):
    """The layer's output in ``model``'s own graph. Gotcha: ``layer.output`` is its FIRST call's output, which for
    layers shared with the model a nested model was flattened from (ConvNeXt) belongs to the other graph."""
    for i, node in enumerate(layer._inbound_nodes):
        if f"{layer.name}_ib-{i}" in model._network_nodes:
            return node.outputs
    return layer.output


def diverging_layers(kmodel, tflite: bytes, x: np.ndarray, top: int = 5) -> list[dict]:
    """Layers whose TFLite outputs differ most from the Keras model's on ``x`` (relative RMSE), worst first.

    TFLite tensors are matched to Keras layers by name (the converter names tensors after the layer path) and
    shape; layers without a match (e.g. a conv whose BN and ReLU were fused into it) are skipped.
    """
    from ai_edge_litert.interpreter import Interpreter

    layers = [la for la in kmodel.layers if not isinstance(la, L.InputLayer)]
    probe = keras.Model(kmodel.inputs, [_output_in(kmodel, la) for la in layers])
    interp = Interpreter(model_content=bytes(tflite), experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    details = interp.get_tensor_details()
    errs: dict[str, list[float]] = {}
    for sample in x[:4]:
        kouts = probe(sample[None], training=False)
        s = np.asarray(sample[None], np.float32)
        if inp["dtype"] in (np.int8, np.uint8):
            sc, zp = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            s = np.clip(np.round(s / sc + zp), info.min, info.max).astype(inp["dtype"])
        interp.set_tensor(inp["index"], s)
        interp.invoke()
        for layer, ko in zip(layers, kouts):
            ko = np.asarray(ko, np.float32)
            inner = getattr(layer, "layer", layer)
            act_fn = getattr(inner, "activation", None)
            act_fn = getattr(act_fn, "activation", act_fn)  # tfmot's QuantizeAwareActivation wraps the function
            act = getattr(act_fn, "__name__", "linear")
            if act not in ("linear", "relu", "relu6"):  # TFLite runs softmax etc. as a separate op: no match
                continue
            names = {layer.name, inner.name}
            # the first ';'-part names the op that produced the tensor (later parts are ops fused into it)
            cands = [
                t
                for t in details
                if tuple(t["shape"]) == ko.shape
                and any(f"/{n}/" in t["name"].split(";")[0] or t["name"].split(";")[0].endswith(f"/{n}") for n in names)
            ]
            if not cands:
                continue
            t = max(cands, key=lambda t: t["index"])
            try:
                v = interp.get_tensor(t["index"]).astype(np.float32)
            except ValueError:
                continue
            sc, zp = t["quantization"]
            if t["dtype"] in (np.int8, np.uint8, np.int16) and sc:
                v = (v - zp) * sc
            denom = float(np.std(ko)) or 1.0
            errs.setdefault(layer.name, []).append(float(np.sqrt(np.mean((v - ko) ** 2))) / denom)
    ranked = sorted(((n, float(np.mean(e))) for n, e in errs.items()), key=lambda kv: -kv[1])
    return [{"layer": n, "relative_rmse": e} for n, e in ranked[:top]]


# --------------------------------------------------------------------------------------------------- flow


@dataclass
class QATResult:
    """Everything :func:`qat` measured. ``rows`` is the fp32 / PTQ int8 / QAT int8 comparison table."""

    qat_model: Any
    tflite: bytes
    ptq_tflite: Optional[bytes]
    rows: list[dict]
    layers: list[dict]
    info: dict
    keras_qat_accuracy: Optional[float]
    warnings: list[str]
    verdict: str

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "layers": self.layers,
            "info": {k: v for k, v in self.info.items() if k not in ("annotated", "left_float")},
            "annotated_layers": len(self.info.get("annotated", [])),
            "float_layers_in_keras": self.info.get("left_float", []),
            "keras_qat_accuracy": self.keras_qat_accuracy,
            "warnings": self.warnings,
            "verdict": self.verdict,
        }


def _compile(qmodel, from_logits: bool, lr: float) -> None:
    qmodel.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def _bench(tflite: bytes) -> Optional[float]:
    from kcompress.benchmark import bench_tflite

    r = bench_tflite(tflite, threads=1, batch_size=1, runs=30, warmup=5)
    return r.latency_ms.mean if r.latency_ms else None


def qat(
    model,
    train: DataSource,
    val: Optional[DataSource] = None,
    options: QATOptions = QATOptions(),
    ptq: bool = True,
    bench: bool = True,
    verbose: Optional[int] = None,
    log=print,
) -> QATResult:
    """Fine-tunes ``model`` with QAT on ``train``, exports int8, and compares fp32 / PTQ int8 / QAT int8 on VAL.

    ``val`` defaults to ``train`` (then the accuracies are training accuracies: pass VAL data).
    ``log`` receives progress lines (``print`` by default; pass ``lambda s: None`` to silence).
    """
    from kcompress.convert import QuantizeOptions, convert
    from kcompress.evaluate import evaluate
    from kcompress.models import input_shape
    from kcompress.train import fit

    val = val or train
    shape = input_shape(model)
    calib = lambda: train.calibration_samples(shape, options.calibration_samples)  # noqa: E731
    warn: list[str] = []
    rows: list[dict] = []

    def row(name, acc, tfl):
        rows.append(
            {
                "model": name,
                "accuracy": acc,
                "bytes": len(tfl) if tfl is not None else None,
                "latency_ms": _bench(tfl) if (bench and tfl is not None) else None,
            }
        )

    fp32_tfl = convert(model, QuantizeOptions(mode="fp32"))
    fp32_acc = evaluate(fp32_tfl, val, description="fp32 (LiteRT)").accuracy
    row("fp32", fp32_acc, fp32_tfl)
    ptq_tfl = None
    if ptq:
        popts = QuantizeOptions(
            mode="int8", per_channel=options.per_channel, io=options.io, float_layers=tuple(options.float_layers)
        )
        ptq_tfl = convert(model, popts, calibration=calib)
        row("PTQ int8", evaluate(ptq_tfl, val, description="PTQ int8 (LiteRT)").accuracy, ptq_tfl)

    qmodel, info = qat_model(model, options.float_layers, options.per_channel, options.preserve_sparsity)
    info["float_layers"] = list(options.float_layers)
    log(
        f"QAT model: {len(info['annotated'])} layers with fake-quant, {len(info['left_float'])} left to the "
        f"converter; scheme {info['scheme']}" + (" (nested model flattened)" if info["flattened"] else "")
    )
    calibrate(qmodel, train)
    if options.epochs > 0:
        from_logits = not _ends_in_softmax(model)
        _compile(qmodel, from_logits, options.lr)
        t0 = time.time()
        fit(
            qmodel,
            train,
            val,
            epochs=options.epochs,
            batch_size=options.batch_size,
            lr=options.lr,
            seed=options.seed,
            compile=False,
            verbose=verbose,
        )
        info["train_seconds"] = round(time.time() - t0, 1)
    keras_acc = evaluate(qmodel, val, description="QAT (Keras)").accuracy
    tfl = export_tflite(qmodel, train, options)
    # measured in the exported file: prune-preserving QAT masks the fake-quantized weights, not the float variables
    info["sparsity_after"] = tflite_weight_sparsity(tfl)
    if info["scheme"].startswith("Default8BitPrunePreserve") or info["sparsity_before"] > 0.05:
        log(f"sparsity: {info['sparsity_before']:.1%} before QAT, {info['sparsity_after']:.1%} in the int8 .tflite")
    tfl_eval = evaluate(tfl, val, description="QAT int8 (LiteRT)")
    row("QAT int8", tfl_eval.accuracy, tfl)

    gap = (keras_acc - tfl_eval.accuracy) * 100
    info["keras_vs_tflite_points"] = gap
    if abs(gap) > options.max_tflite_drop:
        x = next(iter(val.numpy_batches(shape, batch_size=4, limit=4)))[0]
        div = diverging_layers(qmodel, tfl, x)
        names = ", ".join(f"{d['layer']} ({d['relative_rmse']:.2f})" for d in div) or "none matched by name"
        warn.append(
            f"the .tflite scores {tfl_eval.accuracy:.2%} but the Keras QAT model {keras_acc:.2%} "
            f"({gap:+.2f} points); layers diverging most (relative RMSE): {names}"
        )
        info["diverging_layers"] = div
    check = int8_report(tfl, fp32_param_bytes(model), options.float_layers)
    info["int8_check"] = check
    warn.extend(check["problems"])

    base = rows[0]["accuracy"]
    for r in rows:
        r["drop_points"] = (base - r["accuracy"]) * 100
    qat_acc = tfl_eval.accuracy
    if ptq_tfl is not None:
        ptq_acc = rows[1]["accuracy"]
        if ptq_acc >= qat_acc:
            verdict = (
                f"PTQ int8 was as good or better than QAT ({ptq_acc:.2%} vs {qat_acc:.2%} on VAL): "
                "keep the PTQ model unless you train QAT longer"
            )
        else:
            verdict = f"QAT int8 beat PTQ int8 by {(qat_acc - ptq_acc) * 100:.2f} points on VAL"
    else:
        verdict = f"QAT int8 {qat_acc:.2%} on VAL (fp32 {base:.2%})"
    rows_layers = layer_table(qmodel, info)
    return QATResult(qmodel, tfl, ptq_tfl, rows, rows_layers, info, keras_acc, warn, verdict)
