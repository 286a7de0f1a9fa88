"""Quantization-aware training (tfmot's 8-bit scheme) for any tf_keras model, exported to int8 ``.tflite``.

:func:`qat_model` turns a trained float model into a QAT model that tfmot accepts whatever the architecture:

1. nested models (ConvNeXt's stem/downsampling ``Sequential``\\ s, a backbone inside a classifier) are inlined
   into one flat functional graph (:func:`kcompress.graph.flatten_model`), reusing the trained layers;
2. only the layers tfmot's default 8-bit registry knows are annotated (``quantize_annotate_layer``); the rest
   (``TFOpLambda`` adds, ``Rescaling``, ``LayerScale``, a BatchNormalization that does not follow a conv, ...)
   stay float in Keras, and the TFLite converter quantizes them post-training from the representative data;
3. ``quantize_apply`` runs inside ``quantize_scope`` with the model's own layer classes, so custom layers clone.

BatchNormalization right after a Conv2D/DepthwiseConv2D is matched by tfmot's layout transforms and folded into
the conv by the converter; :func:`layer_table` shows, per layer, what happened to it.
When the input model is sparse (magnitude-pruned: at least :data:`SPARSE_THRESHOLD` of its kernel weights are
exactly zero), tfmot's prune-preserving scheme keeps the zeros through QAT.

:func:`qat` is the whole flow: PTQ baseline, QAT fine-tune, export with a representative dataset (from one traced
inference function, not a SavedModel round trip: see :func:`kcompress.quantization.ptq.convert`), LiteRT
evaluation, the Keras-vs-TFLite check (within 1 point, else a warning naming the diverging layers) and the int8
checks (size at most :data:`MAX_INT8_RATIO` of the fp32 parameter bytes, no DEQUANTIZE hops outside float layers).
Per-layer sensitivity and mixed precision (:func:`sensitivity`, :func:`auto_float_layers`) live in
:mod:`kcompress.sensitivity`.

Gotchas: QAT fine-tunes with the same loss as training (sparse categorical cross-entropy; logits or softmax as the
last layer says); the default learning rate (1e-4) is 10x below Adam's default, pass ``lr`` when the model was
trained at another rate. QAT is not automatically better than PTQ: the result says so when PTQ was as good.
A one-epoch fine-tune runs without VAL (there is no best epoch to keep); VAL is measured once, after it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from kcompress.backend import keras
from kcompress.data import DataSource
from kcompress.errors import UsageError
from kcompress.graph import node_of
from kcompress.options import QATOptions, QuantizeOptions, TrainOptions
from kcompress.quantization.qat_graph import calibrate, layer_table, qat_model, tflite_weight_sparsity
from kcompress.types import QuantMode

__all__ = [
    "QATResult",
    "MAX_INT8_RATIO",
    "export_tflite",
    "tidy_name",
    "tidy_tensor_names",
    "int8_report",
    "diverging_layers",
    "qat",
]

MAX_INT8_RATIO = 0.35  # .tflite bytes / fp32 parameter bytes above which an int8 model is "mostly float"

L = keras.layers


def _ends_in_softmax(model) -> bool:
    from kcompress.evaluation import PROBABILITIES, output_kind

    return output_kind(model) == PROBABILITIES


def export_tflite(qmodel, data: DataSource, quantize: QuantizeOptions, seed: int = 0) -> bytes:
    """The QAT model as int8 ``.tflite`` bytes, calibrated on ``data`` for the layers without fake-quant."""
    from kcompress.modelinfo import input_shape
    from kcompress.quantization.ptq import convert

    shape = input_shape(qmodel)
    opts = quantize.replace(mode=QuantMode.INT8, io=quantize.io_type, recipe=None)
    return tidy_tensor_names(
        convert(qmodel, opts,
                calibration=lambda: data.calibration_samples(shape, quantize.calibration_samples, seed=seed)))


# a tfmot quantizer's own op path inside a layer (the fake-quant ops, gone from the int8 model)
_QUANTIZER_PATH = re.compile(r"/(LastValueQuant|MovingAvgQuantize|AllValuesQuantize|FixedQuantize)\b.*$")
_WRAPPER_PREFIX = re.compile(r"(^|/)quant_")


def tidy_name(name: str) -> str:
    """A QAT export's tensor name as the PTQ export of the same float model spells it: without the QuantizeWrapper's
    ``quant_`` prefix on layer paths and without the fake-quant op paths the converter fused into the name, e.g.
    ``m/quant_conv/Conv2D;m/quant_conv/LastValueQuant/FakeQuantWithMinMaxVarsPerChannel`` -> ``m/conv/Conv2D``.
    (A layer of the user's own whose name starts with ``quant_`` loses that prefix too.)"""
    fused = name.split(";")
    parts = []
    for part in fused:
        tidy = _WRAPPER_PREFIX.sub(r"\1", part)
        stripped = _QUANTIZER_PATH.sub("", tidy)
        if stripped != tidy and len(fused) > 1:
            continue  # the quantizer's op, fused with the layer's own op named in another part
        if stripped not in parts:
            parts.append(stripped)
    return ";".join(parts) or name


def tidy_tensor_names(tflite: bytes) -> bytes:
    """The flatbuffer with every tensor named by :func:`tidy_name`. Names are for people and tools, not for the
    interpreter; the tfmot parts name training-time ops and cost ~1/3 more name bytes than a PTQ export (2.7 kB of a
    57 kB CIFAR student). Input/output names and signatures are left as they are."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite))
    for sg in model.subgraphs:
        keep = set(sg.inputs or ()) | set(sg.outputs or ())
        for i, t in enumerate(sg.tensors):
            if i not in keep and t.name:
                raw = t.name.decode() if isinstance(t.name, bytes) else t.name
                t.name = tidy_name(raw).encode()
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def fp32_param_bytes(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.weights)) * 4


def int8_report(tflite: bytes, fp32_bytes: int, float_layers=()) -> dict[str, Any]:
    """Is the file really int8? Size ratio to the fp32 parameter bytes and where it hops back to float."""
    from kcompress.litert.interpreter import TFLiteModel, float_op_report, tflite_ops

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
    node = node_of(model, layer)
    return layer.output if node is None else node.outputs


def diverging_layers(kmodel, tflite: bytes, x: np.ndarray, top: int = 5) -> list[dict]:
    """Layers whose TFLite outputs differ most from the Keras model's on ``x`` (relative RMSE), worst first.

    TFLite tensors are matched to Keras layers by name (the converter names tensors after the layer path) and
    shape; layers without a match (e.g. a conv whose BN and ReLU were fused into it) are skipped.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    layers = [la for la in kmodel.layers if not isinstance(la, L.InputLayer)]
    probe = keras.Model(kmodel.inputs, [_output_in(kmodel, la) for la in layers])
    # LiteRT's own kernels: XNNPACK would hide intermediate tensors inside its fused nodes (and may refuse the graph)
    interp = Interpreter(model_content=bytes(tflite), experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    details = interp.get_tensor_details()
    x = np.asarray(x[:4], np.float32)
    outs = probe(x, training=False)  # one batched call
    kouts = [np.asarray(k, np.float32) for k in (outs if len(layers) > 1 else [outs])]
    # each layer's TFLite tensor, matched once (not per sample): the first ';'-part of a tensor name names the op
    # that produced it (later parts are ops fused into it)
    heads = [t["name"].split(";")[0] for t in details]
    matched = []
    for li, (layer, ko) in enumerate(zip(layers, kouts)):
        inner = getattr(layer, "layer", layer)
        act_fn = getattr(inner, "activation", None)
        act_fn = getattr(act_fn, "activation", act_fn)  # tfmot's QuantizeAwareActivation wraps the function
        if getattr(act_fn, "__name__", "linear") not in ("linear", "relu", "relu6"):
            continue  # TFLite runs softmax etc. as a separate op: no match
        names = {layer.name, inner.name}
        shape = (1, *ko.shape[1:])
        cands = [
            t
            for t, head in zip(details, heads)
            if tuple(t["shape"]) == shape and any(f"/{n}/" in head or head.endswith(f"/{n}") for n in names)
        ]
        if cands:
            matched.append((li, max(cands, key=lambda t: t["index"])))
    errs: dict[str, list[float]] = {}
    for i, sample in enumerate(x):
        s = sample[None]
        if inp["dtype"] in (np.int8, np.uint8):
            sc, zp = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            s = np.clip(np.round(s / sc + zp), info.min, info.max).astype(inp["dtype"])
        interp.set_tensor(inp["index"], s)
        interp.invoke()
        for li, t in matched:
            try:
                v = interp.get_tensor(t["index"]).astype(np.float32)
            except ValueError:
                continue
            sc, zp = t["quantization"]
            if t["dtype"] in (np.int8, np.uint8, np.int16) and sc:
                v = (v - zp) * sc
            ko = kouts[li][i : i + 1]
            denom = float(np.std(ko)) or 1.0
            errs.setdefault(layers[li].name, []).append(float(np.sqrt(np.mean((v - ko) ** 2))) / denom)
    ranked = sorted(((n, float(np.mean(e))) for n, e in errs.items()), key=lambda kv: -kv[1])
    return [{"layer": n, "relative_rmse": e} for n, e in ranked[:top]]


# --------------------------------------------------------------------------------------------------- flow


@dataclass(frozen=True)
class QATResult:
    """Everything :func:`qat` measured. ``rows`` is the fp32 / PTQ int8 / QAT int8 comparison table on VAL;
    ``save(path)`` writes the QAT int8 ``.tflite``."""

    qat_model: Any = field(repr=False)
    tflite: bytes = field(repr=False)
    ptq_tflite: Optional[bytes] = field(repr=False)
    rows: tuple
    layers: tuple
    info: dict
    keras_qat_accuracy: Optional[float]
    warnings: tuple
    verdict: str
    evaluation: Any = field(default=None, repr=False)  # the QAT int8 .tflite in LiteRT on VAL
    test: Optional[dict] = None  # fp32_accuracy / qat_accuracy on TEST (chose nothing), when given

    def accuracy(self, model: str) -> Optional[float]:
        """The VAL accuracy of the row named ``fp32``, ``PTQ int8`` or ``QAT int8`` (None when not measured)."""
        return next((r["accuracy"] for r in self.rows if r["model"] == model), None)

    @property
    def fp32_accuracy(self) -> float:
        return self.accuracy("fp32")

    @property
    def ptq_accuracy(self) -> Optional[float]:
        return self.accuracy("PTQ int8")

    @property
    def qat_accuracy(self) -> float:
        return self.accuracy("QAT int8")

    def save(self, path: str, overwrite: bool = False) -> str:
        from kcompress.io import atomic_write_bytes

        atomic_write_bytes(path, self.tflite, overwrite=overwrite)
        return path

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "layers": self.layers,
            "info": {k: v for k, v in self.info.items() if k not in ("annotated", "left_float")},
            "annotated_layers": len(self.info.get("annotated", [])),
            "float_layers_in_keras": self.info.get("left_float", []),
            "keras_qat_accuracy": self.keras_qat_accuracy,
            "warnings": list(self.warnings),
            "verdict": self.verdict,
            "test": self.test,
        }


def _bench(tflite: bytes) -> Optional[float]:
    from kcompress.bench.host import bench_tflite

    r = bench_tflite(tflite, threads=1, batch_size=1, runs=30, warmup=5)
    return r.latency_ms.mean if r.latency_ms else None


def qat(
    model,
    train: DataSource,
    val: Optional[DataSource] = None,
    options: Optional[QATOptions] = None,
    quantize: Optional[QuantizeOptions] = None,
    seed: int = 0,
    ptq: bool = True,
    bench: bool = True,
    verbose: Optional[int] = None,
    log=print,
    train_options: Optional[TrainOptions] = None,
    checkpoint_dir: Optional[str] = None,
    resume: bool = False,
) -> QATResult:
    """Fine-tunes ``model`` with QAT on ``train``, exports int8, and compares fp32 / PTQ int8 / QAT int8 on VAL.

    ``quantize`` gives the int8 settings (per-channel, I/O type, float layers as resolved names, calibration samples);
    ``val`` defaults to ``train`` (then the accuracies are training accuracies: pass VAL data).
    ``log`` receives progress lines (``print`` by default; pass ``lambda s: None`` to silence).
    ``train_options``: the fine-tune's optimizer, schedule and augmentation (the ``train`` section).
    ``checkpoint_dir``: per-epoch checkpoints of the fine-tune (the QAT model's weights, its quantizers' ranges and
    the optimizer); ``resume`` rebuilds the same QAT model, loads the last one and continues at the next epoch
    (:mod:`kcompress.checkpoint`; other settings than the checkpoint's are refused).
    """
    from kcompress.evaluation import evaluate
    from kcompress.modelinfo import input_shape
    from kcompress.quantization.ptq import convert, converting

    options = options or QATOptions()
    q = (quantize or QuantizeOptions()).replace(mode=QuantMode.INT8, recipe=None)
    if q.auto_float_layers:
        raise UsageError("qat takes resolved float layer names; choose them with auto_float_layers first")
    q = q.replace(io=q.io_type)
    val = val or train
    shape = input_shape(model)
    calib = lambda: train.calibration_samples(shape, q.calibration_samples, seed=seed)  # noqa: E731
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

    ptq_tfl = None
    with converting(model) as source:  # a large model is saved for the converter once, not twice
        fp32_tfl = convert(source)
        fp32_acc = evaluate(fp32_tfl, val, description="fp32 (LiteRT)").accuracy
        row("fp32", fp32_acc, fp32_tfl)
        if ptq:
            ptq_tfl = convert(source, q, calibration=calib)
            row("PTQ int8", evaluate(ptq_tfl, val, description="PTQ int8 (LiteRT)").accuracy, ptq_tfl)
    # only its row is kept: the bytes (the size of the fp32 weights) would sit in memory through the QAT export
    del fp32_tfl

    keras.utils.set_random_seed(seed)  # the QAT model's random layers (dropout) are seeded: runs are reproducible
    qmodel, info = qat_model(model, q.float_layers, q.per_channel, options.preserve_sparsity)
    info["float_layers"] = list(q.float_layers)
    log(
        f"QAT model: {len(info['annotated'])} layers with fake-quant, {len(info['left_float'])} left to the "
        f"converter; scheme {info['scheme']}" + (f"; {info['nesting']}" if info["flattened"] else "")
    )
    calibrate(qmodel, train)
    if options.epochs > 0:
        from kcompress.checkpoint import data_identity, fit_resumable, weights_fingerprint

        from_logits = not _ends_in_softmax(model)
        topts = train_options or TrainOptions()
        # what the fine-tune's checkpoints depend on (epochs is added by fit_resumable)
        identity = {"what": "qat", "model": weights_fingerprint(model), "float_layers": list(q.float_layers),
                    "per_channel": q.per_channel, "preserve_sparsity": options.preserve_sparsity,
                    "lr": options.rate(topts.optimizer), "batch_size": options.batch_size, "seed": seed,
                    "train_options": topts.to_dict(), "train": data_identity(train),
                    "val": data_identity(val) if options.epochs > 1 else None}
        t0 = time.time()
        fit_resumable(
            qmodel,
            train,
            val if options.epochs > 1 else None,  # one epoch: no best epoch to pick; VAL is measured right after
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            fingerprint=identity,
            what="QAT fine-tune",
            epochs=options.epochs,
            batch_size=options.batch_size,
            lr=options.rate(topts.optimizer),
            seed=seed,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
            recalibrate_bn=False,  # BatchNorm is folded into the convolutions' fake-quant scheme here
            verbose=verbose,
            train_options=train_options,
            log=log,
        )
        info["train_seconds"] = round(time.time() - t0, 1)
    keras_acc = evaluate(qmodel, val, description="QAT (Keras)").accuracy
    tfl = export_tflite(qmodel, train, q, seed)
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
    check = int8_report(tfl, fp32_param_bytes(model), q.float_layers)
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
    return QATResult(qmodel, tfl, ptq_tfl, tuple(rows), tuple(rows_layers), info, keras_acc, tuple(warn), verdict,
                     tfl_eval)
