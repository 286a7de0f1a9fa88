"""Coverage matrix: every tf_keras.applications family through every stage (issue 14).

Each family's smallest member is built offline (``weights=None``, 10 classes, logits) at the smallest input its
builder accepts, in three variants:

- ``top``: the application itself as the top-level model (``include_top=True``), fed the family's own
  preprocessing (``preprocess_input``'s scale/mean/std, or raw 0-255 pixels where the model rescales itself);
- ``nested``: a transfer-learning model, ``Sequential([Input, Rescaling(1/127.5, -1), backbone(include_top=False),
  GlobalAveragePooling2D(), Dense(10)])``, fed 0-255 pixels;
- ``keras3``: the same transfer model built with Keras 3 (``keras.applications``), saved as ``.keras`` and passed
  to every stage by path (the bridge in :mod:`kcompress.keras3` rebuilds it in tf_keras).

Every (family, variant) goes through five stages of the public API (``import kcompress as kc``), each on a freshly
built model, on real images (scikit-learn digits upsampled to the input size, 64 TRAIN and 64 VAL samples):
``ptq`` (``kc.quantize`` int8), ``magnitude`` (``kc.prune`` 50% sparsity), ``structured`` (``kc.prune``
``target_flops=0.5``), ``qat`` (``kc.qat``, one epoch) and ``distill`` (``kc.distill``, a derived half-width student,
one epoch). What each stage must show to pass is in :data:`CRITERIA`. These are smoke runs of one epoch on untrained
models: accuracies are recorded, not judged (every ``max_drop`` is 100 points, the teacher check is off).

Each stage of each (family, variant) runs in its own process (``--one``), as a user's command would: its peak
resident memory (``VmHWM``) is that stage's own (with the model and data it builds), not what earlier stages left
behind, and a crash or a hang becomes a recorded failure of that stage only. Per-stage wall seconds (the stage
alone, without the build) and peak memory are recorded. Results accumulate in ``--json``: a
(family, variant) already there is skipped unless ``--rerun``, so a long run can be interrupted and resumed. The
Markdown matrix (``--out``, default ``docs/COVERAGE.md``) is rewritten after every (family, variant).

    python tools/coverage.py                                   # everything: 19 families x top, nested, keras3
    python tools/coverage.py --families MobileNetV2 --variants top,nested
    python tools/coverage.py --doc-only                        # rewrite the Markdown from the JSON
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

__all__ = [
    "FAMILIES", "VARIANTS", "STAGES", "CRITERIA", "Family", "Outcome", "family", "make_data", "open_splits",
    "model_source", "run_stage", "stage_ptq", "stage_magnitude", "stage_structured", "stage_qat", "stage_distill",
    "run_one", "write_doc", "main",
]

SAMPLES = 64  # TRAIN and VAL samples each
CLASSES = 10
STAGE_TIMEOUT = 600  # seconds per stage
QAT_BUDGET_S = 180  # issue 14: QAT of any family at 32x32, 64 samples, one epoch, within 3 minutes on 2 cores
MEMORY_BUDGET_MIB = 4096  # "a few GiB"
MIN_PARAMS_CUT = 0.25  # structured pruning at target_flops 0.5 removes at least this share of the parameters
MAX_INT8_RATIO = 0.35  # .tflite bytes / fp32 parameter bytes (kcompress.quantization.qat.MAX_INT8_RATIO)
SPARSITY = 0.5
SPARSITY_SLACK = 0.05

VARIANTS = ("top", "nested", "keras3")
STAGES = ("ptq", "magnitude", "structured", "qat", "distill")

CRITERIA = {
    "ptq": "`kc.quantize(mode=\"int8\")`, 64 calibration samples; the .tflite runs in ai_edge_litert on VAL with "
           "int8 input and output, every compute op int8 and the file at most "
           f"{MAX_INT8_RATIO}x the fp32 parameter bytes",
    "magnitude": f"`kc.prune(method=\"magnitude\", sparsity={SPARSITY}, epochs=1)`; `target_met`, and every "
                 "Conv2D/SeparableConv2D/Dense kernel of the model (the backbone's included), measured on the "
                 f"output model's weights, within {SPARSITY_SLACK:.0%} of {SPARSITY:.0%} zeros (depthwise kernels, "
                 "which tfmot cannot prune, are counted apart)",
    "structured": "`kc.prune(target_flops=0.5, epochs=1)`; at least "
                  f"{MIN_PARAMS_CUT:.0%} fewer parameters and the pruned model runs (finite outputs of the right "
                  "shape); the MACs ratio, `target_met` and the frozen layers with their reasons are recorded",
    "qat": "`kc.qat(epochs=1)`; the int8 .tflite runs in ai_edge_litert on VAL with int8 input and output, at most "
           f"{MAX_INT8_RATIO}x the fp32 parameter bytes, no float compute op (none named float); time budget "
           f"{QAT_BUDGET_S} s at 32x32",
    "distill": "`kc.distill(student_width=0.5, epochs=1)`; the student is derived from the teacher (no nested "
               "model left), has fewer parameters and runs (finite outputs of the right shape)",
}

# preprocess_input of each family, as Preprocess fields (x * scale + offset, then (x - mean) / std). Digits are grey,
# so caffe's RGB->BGR flip changes nothing. "raw": the model rescales 0-255 pixels itself.
_PRE = {
    "tf": {"scale": 1 / 127.5, "offset": -1.0},
    "torch": {"scale": 1 / 255, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "caffe": {"mean": (103.939, 116.779, 123.68)},
    "raw": {},
}


@dataclass(frozen=True)
class Family:
    """One tf_keras.applications family: the member that represents it and the members on the same code path."""

    name: str  # the row's name
    app: str  # the builder in keras.applications
    size: int  # input height and width: the smallest the builder accepts (32 where it allows)
    preprocess: str  # key of _PRE: what the top-level model expects
    kwargs: dict = field(default_factory=dict)  # e.g. alpha
    members: tuple = ()  # builders on the same code path, run with --all-members

    @property
    def label(self) -> str:
        args = ", ".join(f"{k} {v}" for k, v in self.kwargs.items())
        return f"{self.app} ({args})" if args else self.app


# MobileNet/MobileNetV2 at their default width (alpha 1.0): at alpha 0.25-0.35 the per-channel scales and int64 zero
# points TFLite stores (12 bytes per output channel) alone are 0.10x of the fp32 parameter bytes, so no int8 file of
# such a thin model gets under 0.35x. MobileNetV3 at 64x64: at 32x32 its last squeeze-excite multiplies run on 1x1
# maps, which the converter leaves in float (QAT then fails naming those Multiply layers).
FAMILIES: tuple[Family, ...] = (
    Family("MobileNet", "MobileNet", 32, "tf", {"alpha": 1.0}),
    Family("MobileNetV2", "MobileNetV2", 32, "tf", {"alpha": 1.0}),
    Family("MobileNetV3Small", "MobileNetV3Small", 64, "raw", {"minimalistic": False}),
    Family("MobileNetV3Large", "MobileNetV3Large", 64, "raw", {"minimalistic": False}),
    Family("EfficientNet", "EfficientNetB0", 32, "raw",
           members=tuple(f"EfficientNetB{i}" for i in range(1, 8))),
    Family("EfficientNetV2", "EfficientNetV2B0", 32, "raw",
           members=("EfficientNetV2B1", "EfficientNetV2B2", "EfficientNetV2B3", "EfficientNetV2S", "EfficientNetV2M",
                    "EfficientNetV2L")),
    Family("ResNet", "ResNet50", 32, "caffe", members=("ResNet101", "ResNet152")),
    Family("ResNetV2", "ResNet50V2", 32, "tf", members=("ResNet101V2", "ResNet152V2")),
    Family("ResNetRS", "ResNetRS50", 32, "raw",
           members=("ResNetRS101", "ResNetRS152", "ResNetRS200", "ResNetRS270", "ResNetRS350", "ResNetRS420")),
    Family("RegNetX", "RegNetX002", 32, "raw",
           members=tuple(f"RegNetX{n}" for n in ("004", "006", "008", "016", "032", "040", "064", "080", "120",
                                                  "160", "320"))),
    Family("RegNetY", "RegNetY002", 32, "raw",
           members=tuple(f"RegNetY{n}" for n in ("004", "006", "008", "016", "032", "040", "064", "080", "120",
                                                  "160", "320"))),
    Family("DenseNet", "DenseNet121", 32, "torch", members=("DenseNet169", "DenseNet201")),
    Family("NASNet", "NASNetMobile", 32, "tf", members=("NASNetLarge",)),
    Family("Xception", "Xception", 71, "tf"),
    Family("InceptionV3", "InceptionV3", 75, "tf"),
    Family("InceptionResNetV2", "InceptionResNetV2", 75, "tf"),
    Family("ConvNeXt", "ConvNeXtTiny", 32, "raw",
           members=("ConvNeXtSmall", "ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtXLarge")),
    Family("VGG", "VGG16", 32, "caffe", members=("VGG19",)),
)
KERAS3_FAMILIES = ("MobileNetV2", "EfficientNet", "ResNet")  # the families the default run also builds in Keras 3


def family(name: str) -> Family:
    """The registry entry named ``name`` (a row name, or any member's builder name: ``EfficientNetB3``)."""
    for f in FAMILIES:
        if name in (f.name, f.app):
            return f
        if name in f.members:
            return Family(name, name, f.size, f.preprocess)
    raise SystemExit(f"unknown family {name!r}; known: {', '.join(f.name for f in FAMILIES)} (or a member's name)")


# ------------------------------------------------------------------------------------------------ data and models


def make_data(size: int, workdir: str) -> tuple[str, str]:
    """``(train.npz, val.npz)``: 64 + 64 real digits (stratified, disjoint: digits:train and digits:val), pixels
    0-255, upsampled (nearest) from 8x8 to ``size`` x ``size`` x 3. Written once per size, atomically."""
    paths = tuple(os.path.join(workdir, f"digits{size}_{split}.npz") for split in ("train", "val"))
    if all(os.path.exists(p) for p in paths):
        return paths  # type: ignore[return-value]
    from kcompress.data import open_data

    os.makedirs(workdir, exist_ok=True)
    idx = np.arange(size) * 8 // size  # source row/column of each output pixel (for 32: np.kron by 4)
    for spec, path in zip(("digits:train", "digits:val"), paths):
        src = open_data(spec).subset(SAMPLES, seed=0)
        x = np.concatenate([b for b, _ in src.numpy_batches((8, 8, 1), batch_size=SAMPLES)])
        x = np.repeat(x[:, idx][:, :, idx], 3, axis=-1).astype(np.float32)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, x=x, y=src.labels, class_names=np.array([str(i) for i in range(CLASSES)]))
        os.replace(tmp, path)
    return paths  # type: ignore[return-value]


def open_splits(fam: Family, variant: str, workdir: str):
    """``(train, val)`` DataSources for ``fam`` in ``variant``: 0-255 pixels for the transfer models (they rescale),
    the family's own preprocessing for the top-level application."""
    from kcompress.data import Preprocess, open_data

    pre = Preprocess(**_PRE[fam.preprocess]) if variant == "top" else Preprocess()
    train, val = make_data(fam.size, workdir)
    return open_data(train, pre), open_data(val, pre)


def _build(keras, fam: Family, variant: str, seed: int = 0):
    """The model, with the same weights and the same layer names on every call (the layer-name counters are reset,
    so a reason naming an unnamed layer, ``rescaling_1``, names the same layer in every stage and process)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    shape = (fam.size, fam.size, 3)
    builder = getattr(keras.applications, fam.app)
    if variant == "top":
        return builder(include_top=True, weights=None, input_shape=shape, classes=CLASSES,
                       classifier_activation=None, **fam.kwargs)
    L = keras.layers
    backbone = builder(include_top=False, weights=None, input_shape=shape, **fam.kwargs)
    return keras.Sequential([keras.Input(shape, name="image"), L.Rescaling(1 / 127.5, -1, name="scale"), backbone,
                             L.GlobalAveragePooling2D(name="pool"), L.Dense(CLASSES, name="head")],
                            name=f"transfer_{fam.name.lower()}")


def model_source(fam: Family, variant: str, workdir: str) -> Callable[[], Any]:
    """A function giving each stage its own fresh copy of the model: a tf_keras model (built with a fixed seed, so
    every stage starts from the same weights) or, for ``keras3``, the path of the Keras 3 ``.keras`` file (built and
    saved once, here)."""
    if variant != "keras3":
        from kcompress.backend import keras

        return lambda: _build(keras, fam, variant)
    from kcompress.backend import keras3

    path = os.path.join(workdir, f"{fam.app}_keras3.keras")
    k3 = keras3()
    model = _build(k3, fam, "nested")
    tmp = f"{path}.{os.getpid()}.tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)
    return lambda: path


def _tf_keras(model):
    """The tf_keras model a stage sees (a Keras 3 path is rebuilt through the bridge, as the stages do)."""
    from kcompress.inputs import as_model

    return as_model(model).model


def _arrays(data, shape) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*data.numpy_batches(shape, batch_size=SAMPLES))
    return np.concatenate(xs), np.concatenate(ys)


def run_tflite(tflite: bytes, data) -> dict:
    """Runs the ``.tflite`` in ai_edge_litert (the interpreter itself, no kcompress wrapper) over ``data``: its
    accuracy and input/output types, and whether every output was finite."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    delegate = "default (XNNPACK)"
    try:
        it = Interpreter(model_content=bytes(tflite))
        it.allocate_tensors()
    except RuntimeError as e:  # XNNPACK can refuse a valid graph; LiteRT's own kernels still run it
        if "XNNPACK" not in str(e):
            raise
        delegate = "builtin kernels (XNNPACK refused the graph)"
        it = Interpreter(model_content=bytes(tflite),
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    x, y = _arrays(data, tuple(int(d) for d in inp["shape"][1:]))
    preds, finite = [], True
    for row in x:
        v = row[None]
        if inp["dtype"] in (np.int8, np.uint8):
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            v = np.clip(np.round(v / scale + zero), info.min, info.max)
        it.set_tensor(inp["index"], v.astype(inp["dtype"]))
        it.invoke()
        o = it.get_tensor(out["index"])[0].astype(np.float32)
        finite &= bool(np.all(np.isfinite(o)))
        preds.append(int(np.argmax(o)))
    return {"accuracy": float(np.mean(np.array(preds) == y)), "input_dtype": np.dtype(inp["dtype"]).name,
            "output_dtype": np.dtype(out["dtype"]).name, "finite": finite, "samples": int(len(y)),
            "delegate": delegate}


def run_keras(model, data) -> dict:
    """The Keras model over ``data``: accuracy, output shape and whether every output was finite."""
    x, y = _arrays(data, tuple(model.input_shape[1:]))
    out = np.asarray(model(x, training=False))
    return {"accuracy": float(np.mean(out.argmax(axis=1) == y)), "output_shape": list(out.shape),
            "finite": bool(np.all(np.isfinite(out)))}


# ------------------------------------------------------------------------------------------------ stages


@dataclass
class Outcome:
    """What one stage did: pass or fail with the reason, the figures for the matrix, and what it produced
    (``artifact``: the ``.tflite`` bytes or the Keras model; not written to JSON)."""

    ok: bool
    reason: str
    metrics: dict
    artifact: Any = None


def tflite_bytes(tflite: bytes) -> dict[str, int]:
    """Where the bytes of a ``.tflite`` go, read from the flatbuffer: constant buffers by type (``int8``, ``int32``
    biases, ``float32``...), ``quant_params`` (a float32 scale and an int64 zero point per channel of every quantized
    tensor, weights and activations) and ``other`` (the graph, names, alignment)."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(tflite), 0))
    names = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    out: dict[str, int] = {}
    seen, quant = set(), 0
    for g in model.subgraphs:
        for t in g.tensors:
            buf = model.buffers[t.buffer]
            if t.buffer not in seen and buf.data is not None and len(buf.data):
                seen.add(t.buffer)
                key = names.get(t.type, str(t.type))
                out[key] = out.get(key, 0) + len(buf.data)
            q = t.quantization
            if q is not None:
                quant += 4 * len(q.scale if q.scale is not None else []) + 8 * len(
                    q.zeroPoint if q.zeroPoint is not None else [])
    out["quant_params"] = quant
    out["other"] = max(0, len(tflite) - sum(out.values()))
    return out


def _int8_check(tflite: bytes, fp32_bytes: int, size_bytes: Optional[int] = None) -> dict:
    from kcompress.litert.interpreter import _COMPUTE_OPS, float_op_report, tflite_ops  # the ops it counts
    from kcompress.quantization.qat import int8_report

    rep = int8_report(tflite, fp32_bytes)
    # the tensor each float compute op writes: its name is the Keras layer path (up to the first ';')
    at = [{"op": o["op"], "tensor": o["outputs"][0].split(";")[0]} for o in tflite_ops(tflite)
          if o["op"] in _COMPUTE_OPS and o["output_dtypes"][:1] and o["output_dtypes"][0].startswith("float")]
    ratio = (size_bytes if size_bytes is not None else len(tflite)) / fp32_bytes
    return {"int8_ratio": round(ratio, 4), "float_compute_ops": rep["float_compute_ops"],
            "float_compute_op_count": rep["float_compute_op_count"], "dequantize_ops": rep["dequantize_ops"],
            "float_compute_at": at, "op_counts": float_op_report(tflite)["op_counts"],
            "bytes": tflite_bytes(tflite)}


def _int8_problems(m: dict, run: dict, fp32_bytes: int) -> list[str]:
    out = []
    if run["input_dtype"] != "int8" or run["output_dtype"] != "int8":
        out.append(f"input {run['input_dtype']} / output {run['output_dtype']}, not int8")
    if m["float_compute_op_count"]:
        where = "; ".join(f"{o['op']} -> {o['tensor']}" for o in m["float_compute_at"][:3])
        out.append(f"{m['float_compute_op_count']} float compute op(s) left: {where}")
    if m["int8_ratio"] > MAX_INT8_RATIO:
        parts = ", ".join(f"{k} {v / fp32_bytes:.3f}x" for k, v in sorted(m["bytes"].items(), key=lambda kv: -kv[1])
                          if v / fp32_bytes >= 0.001)
        out.append(f".tflite is {m['int8_ratio']:.3f}x the fp32 parameter bytes (at most {MAX_INT8_RATIO}x): {parts}")
    if not run["finite"]:
        out.append("non-finite outputs in LiteRT")
    return out


def stage_ptq(source: Callable[[], Any], train, val) -> Outcome:
    import kcompress as kc
    from kcompress.quantization.qat import fp32_param_bytes

    model = source()
    r = kc.quantize(model, train, mode="int8", val_data=val, calibration_samples=SAMPLES, max_drop=100.0)
    fp32 = fp32_param_bytes(_tf_keras(model))
    m = _int8_check(r.tflite, fp32, r.size_bytes)
    run = run_tflite(r.tflite, val)
    m.update(tflite_bytes=r.size_bytes, fp32_param_bytes=fp32, accuracy_keras=r.before.accuracy,
             accuracy_tflite=run["accuracy"], io=f"{run['input_dtype']}/{run['output_dtype']}")
    problems = _int8_problems(m, run, fp32)
    return Outcome(not problems, "; ".join(problems), m, r.tflite)


def _kernel(layer):
    """The kernel magnitude pruning sparsifies: Conv2D/Dense ``kernel``, SeparableConv2D ``pointwise_kernel``."""
    for w in layer.weights:
        name = w.name.split("/")[-1].split(":")[0]
        if name in ("kernel", "pointwise_kernel"):
            return np.asarray(w)
    return None


def stage_magnitude(source: Callable[[], Any], train, val) -> Outcome:
    import kcompress as kc
    from kcompress.backend import keras
    from kcompress.graph import flatten_model

    L = keras.layers
    model = source()
    # the layer names only: a flattened copy held through the stage would add its weights to the stage's peak
    flat = flatten_model(_tf_keras(model))
    kinds = (L.Conv2D, L.SeparableConv2D, L.Dense)
    names = [la.name for la in flat.layers if isinstance(la, kinds) and not isinstance(la, (L.DepthwiseConv2D,
                                                                                          L.Conv2DTranspose))]
    depthwise = [la.name for la in flat.layers if isinstance(la, L.DepthwiseConv2D)]
    del flat
    gc.collect()
    r = kc.prune(model, train, val, method="magnitude", sparsity=SPARSITY, epochs=1, measure=False, max_drop=100.0)
    sparsity, missing = {}, []
    for name in names:
        try:
            k = _kernel(r.model.get_layer(name))
        except ValueError:
            missing.append(name)
            continue
        if k is not None:
            sparsity[name] = float(np.mean(k == 0))
    low = {n: s for n, s in sparsity.items() if s < SPARSITY - SPARSITY_SLACK}
    m = {"kernels": len(sparsity), "kernels_at_target": len(sparsity) - len(low),
         "min_sparsity": round(min(sparsity.values()), 4) if sparsity else None,
         "overall_sparsity": round(float(r.details["overall_sparsity"]), 4), "target_met": r.target_met,
         "depthwise_dense": len(depthwise), "accuracy_after": r.accuracy_after}
    problems = []
    if not r.target_met:
        problems.append(f"target missed: {r.details.get('shortfall', '')}")
    if missing:
        problems.append(f"{len(missing)} layer(s) missing from the pruned model (first: {missing[0]})")
    if low:
        name = min(low, key=low.get)
        why = r.details["skipped"].get(name)
        problems.append(f"{len(low)} of {len(sparsity)} kernels below {SPARSITY - SPARSITY_SLACK:.0%} zeros; layer "
                        f"{name}: {low[name]:.1%}" + (f" (left dense: {why})" if why else ""))
    m["sparsity"] = {n: round(s, 4) for n, s in sparsity.items()}
    return Outcome(not problems, "; ".join(problems), m, r.model)


def stage_structured(source: Callable[[], Any], train, val) -> Outcome:
    import kcompress as kc
    from kcompress.modelinfo import count_macs, count_params

    model = source()
    base = _tf_keras(model)
    params0, macs0 = count_params(base)["total"], count_macs(base)
    r = kc.prune(model, train, val, method="structured", target_flops=0.5, epochs=1, measure=False, max_drop=100.0)
    params1, macs1 = count_params(r.model)["total"], count_macs(r.model)
    run = run_keras(r.model, val)
    frozen = r.details.get("frozen") or {}
    m = {"params_before": params0, "params_after": params1, "params_ratio": round(params1 / params0, 4),
         "macs_before": macs0, "macs_after": macs1, "macs_ratio": round(macs1 / macs0, 4) if macs0 else None,
         "target_met": r.target_met, "shortfall": r.details.get("shortfall") or "",
         "frozen_count": len(frozen), "frozen": dict(list(frozen.items())[:8]), "accuracy_after": run["accuracy"]}
    problems = []
    if params1 > (1 - MIN_PARAMS_CUT) * params0:
        why = r.details.get("shortfall") or "; ".join(f"{k}: {v}" for k, v in list(frozen.items())[:3])
        problems.append(f"params {params1 / params0:.2f}x of the input (at most {1 - MIN_PARAMS_CUT:.2f}x)"
                        + (f"; {why}" if why else ""))
    if run["output_shape"] != [SAMPLES, CLASSES] or not run["finite"]:
        problems.append(f"the pruned model does not run: outputs {run['output_shape']}, finite {run['finite']}")
    return Outcome(not problems, "; ".join(problems), m, r.model)


def stage_qat(source: Callable[[], Any], train, val) -> Outcome:
    import kcompress as kc
    from kcompress.options import QuantizeOptions

    model = source()
    r = kc.qat(model, train, val_data=val, epochs=1, bench=False,
               quantize=QuantizeOptions(calibration_samples=SAMPLES, max_drop=100.0))
    check = r.info["int8_check"]  # kcompress's own check, on the file before its metadata was added
    fp32 = check["fp32_param_bytes"]
    m = _int8_check(r.tflite, fp32, check["bytes"])
    m.update(tflite_bytes=check["bytes"], fp32_param_bytes=fp32, qat_train_seconds=r.info.get("train_seconds"),
             accuracy_fp32=r.fp32_accuracy, accuracy_ptq=r.ptq_accuracy, accuracy_keras_qat=r.keras_qat_accuracy)
    run = run_tflite(r.tflite, val)
    m.update(accuracy_tflite=run["accuracy"], io=f"{run['input_dtype']}/{run['output_dtype']}")
    problems = _int8_problems(m, run, fp32)
    if r.ptq_tflite is not None:  # the same model converted post-training: ops QAT added (BatchNorm left unfolded)
        from kcompress.litert.interpreter import float_op_report

        ptq_ops = float_op_report(r.ptq_tflite)["op_counts"]
        extra = {k: v - ptq_ops.get(k, 0) for k, v in m["op_counts"].items() if v > ptq_ops.get(k, 0)}
        m["ops_beyond_ptq"] = extra
        if extra and problems:
            why = ", ".join(f"+{v} {k}" for k, v in extra.items())
            bn = [row for row in r.layers if row.get("type") == "BatchNormalization"]
            if bn:
                why += f"; the layer table says of {bn[0]['layer']} (1 of {len(bn)} BatchNormalization): {bn[0]['how']}"
            problems.append(f"{sum(extra.values())} ops more than the PTQ file of the same model ({why})")
    return Outcome(not problems, "; ".join(problems), m, r.tflite)


def stage_distill(source: Callable[[], Any], train, val) -> Outcome:
    import kcompress as kc
    from kcompress.backend import keras

    model = source()
    r = kc.distill(model, train, val, student_width=0.5, epochs=1, min_teacher_accuracy=0.0, max_drop=100.0)
    s = r.student
    run = run_keras(s, val)
    nested = [la.name for la in s.layers if isinstance(la, keras.Model)]
    m = {"teacher_params": r.teacher_params, "student_params": r.student_params,
         "params_ratio": round(r.student_params / r.teacher_params, 4), "accuracy_teacher": r.teacher_accuracy,
         "accuracy_student": run["accuracy"]}
    problems = []
    if r.student_params >= r.teacher_params:
        problems.append(f"student not smaller: {r.student_params:,} params, teacher {r.teacher_params:,}")
    if nested:
        problems.append(f"nested model {nested[0]} left in the student")
    if run["output_shape"] != [SAMPLES, CLASSES] or not run["finite"]:
        problems.append(f"the student does not run: outputs {run['output_shape']}, finite {run['finite']}")
    return Outcome(not problems, "; ".join(problems), m, s)


STAGE_FUNCTIONS: dict[str, Callable[..., Outcome]] = {
    "ptq": stage_ptq, "magnitude": stage_magnitude, "structured": stage_structured, "qat": stage_qat,
    "distill": stage_distill,
}


# ------------------------------------------------------------------------------------------------ one process


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux)
    except OSError:
        pass


def _peak_mib() -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def first_line(e: BaseException) -> str:
    """The exception's first line (kcompress errors name the layer that blocks), prefixed by its type unless it is
    one of kcompress's own errors."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    kind = type(e).__name__
    if kind in ("KcompressError", "UsageError", "OptionError", "GateFailed"):
        return text or kind
    return f"{kind}: {text}" if text else kind


class StageTimeout(BaseException):
    """Raised by the stage's alarm; a BaseException, so no ``except Exception`` inside a stage swallows it."""


def run_stage(name: str, source, train, val, timeout: Optional[int] = None) -> tuple[dict, Optional[Outcome]]:
    """Runs one stage, timed and with its peak memory; ``(record, outcome)`` where ``record`` is what goes to JSON
    (``ok``, ``reason``, ``seconds``, ``peak_mib``, the figures) and ``outcome`` is None when it raised."""
    _reset_peak()
    t0 = time.time()
    outcome = None
    if timeout:
        def _alarm(signum, frame):
            raise StageTimeout(f"timed out after {timeout} s")

        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(timeout)
    try:
        outcome = STAGE_FUNCTIONS[name](source, train, val)
        rec = {"ok": outcome.ok, "reason": outcome.reason, **outcome.metrics}
    except StageTimeout as e:
        rec = {"ok": False, "reason": str(e)}
    except Exception as e:  # noqa: BLE001  (every failure is a recorded cell)
        traceback.print_exc()
        rec = {"ok": False, "reason": first_line(e)}
    finally:
        if timeout:
            signal.alarm(0)
    rec["seconds"] = round(time.time() - t0, 1)
    rec["peak_mib"] = _peak_mib()
    return rec, outcome


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def run_one(fam: Family, variant: str, stages, workdir: str, out: str, timeout: int = STAGE_TIMEOUT) -> dict:
    """Child process: builds the model and runs ``stages`` in turn, rewriting ``out`` after each (with ``running``
    naming the stage under way, so the parent can tell which stage a crash or a hang happened in)."""
    from kcompress.modelinfo import count_params

    rec: dict = {"family": fam.name, "app": fam.app, "label": fam.label, "variant": variant, "input": fam.size,
                 "stages": {}, "running": "build", "running_since": time.time(), "pid": os.getpid()}
    _write_json(out, rec)
    _reset_peak()
    t0 = time.time()
    try:
        source = model_source(fam, variant, workdir)
        train, val = open_splits(fam, variant, workdir)
        rec["params"] = count_params(_tf_keras(source()))["total"]
        gc.collect()  # that model is not the stages' (each builds its own): its weights must not count in their peaks
        rec["build"] = {"ok": True, "seconds": round(time.time() - t0, 1), "peak_mib": _peak_mib()}
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rec["build"] = {"ok": False, "reason": first_line(e), "seconds": round(time.time() - t0, 1),
                        "peak_mib": _peak_mib()}
        for s in stages:
            rec["stages"][s] = {"ok": False, "reason": f"not run: the model did not build ({first_line(e)})"}
        rec.pop("running")
        _write_json(out, rec)
        return rec
    for s in stages:
        rec["running"], rec["running_since"] = s, time.time()
        _write_json(out, rec)
        print(f"== {fam.name} {variant} {s}", flush=True)
        rec["stages"][s], _ = run_stage(s, source, train, val, timeout)
        print(f"== {fam.name} {variant} {s}: {'ok' if rec['stages'][s]['ok'] else 'FAIL'} "
              f"{rec['stages'][s]['seconds']} s", flush=True)
    rec.pop("running", None)
    rec.pop("running_since", None)
    _write_json(out, rec)
    return rec


# ------------------------------------------------------------------------------------------------ parent


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def commit() -> str:
    sha = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "kcompress")
    return f"{sha}{' + uncommitted changes in kcompress/' if dirty else ''}"


def _spawn(fam: Family, variant: str, stages, args, tag: str) -> tuple[dict, Optional[str]]:
    """Runs ``stages`` in one child; ``(record, died)``: ``died`` says how the child ended when it did not finish
    (killed, crashed, timed out), with ``record["running"]`` the stage it was in."""
    os.makedirs(os.path.join(args.workdir, "logs"), exist_ok=True)
    out = os.path.join(args.workdir, f"{tag}.partial.json")
    if os.path.exists(out):
        os.remove(out)
    log = os.path.join(args.workdir, "logs", f"{tag}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--one", fam.app, "--variant", variant, "--stages",
           ",".join(stages), "--json", out, "--workdir", args.workdir, "--stage-timeout", str(args.stage_timeout)]
    with open(log, "a") as logf:
        logf.write(f"$ {shlex.join(cmd)}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
        died = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(1)
            try:
                with open(out) as f:
                    part = json.load(f)
            except (OSError, ValueError):
                continue
            since = part.get("running_since")
            if since and time.time() - since > args.stage_timeout + 60:  # the child's own alarm did not fire
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                died = f"timed out after {args.stage_timeout} s (killed)"
                break
    try:
        with open(out) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        rec = {"stages": {}, "running": "build"}
    rec["max_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    if died is None and "running" in rec:
        code = proc.returncode
        died = (f"the process was killed by signal {-code}" + (" (out of memory?)" if -code == 9 else "")
                if code < 0 else f"the process exited with code {code}")
    return rec, died


def run_family(fam: Family, variant: str, args) -> dict:
    """Runs every stage of one (family, variant), each in its own child process (a crash or a hang fails that stage
    only); a model that does not build fails every stage without trying the rest."""
    tag = f"{fam.app}-{variant}"
    merged = None
    for stage in args.stages:
        rec, died = _spawn(fam, variant, [stage], args, tag)
        if merged is None:
            merged = {k: v for k, v in rec.items() if k not in ("running", "running_since", "pid", "stages")}
            merged["stages"] = {}
        merged["max_rss_mib"] = max(merged.get("max_rss_mib") or 0, rec.get("max_rss_mib") or 0)
        if rec.get("build") and (merged.get("build") or {}).get("peak_mib", 0) < rec["build"].get("peak_mib", 0):
            merged["build"] = rec["build"]
        if stage in rec.get("stages", {}):
            merged["stages"][stage] = rec["stages"][stage]
            if not (rec.get("build") or {}).get("ok", True):  # the model did not build: neither will it next time
                for s in args.stages:
                    merged["stages"].setdefault(s, rec["stages"][stage])
                break
        elif died is not None and rec.get("running") == stage:
            merged["stages"][stage] = {"ok": False, "reason": died,
                                       "seconds": round(time.time() - rec.get("running_since", time.time()), 1)}
        else:
            why = died or (rec.get("build") or {}).get("reason") or "the child ended without a result"
            merged.setdefault("build", {"ok": False, "reason": why})
            for s in args.stages:
                merged["stages"].setdefault(s, {"ok": False, "reason": f"not run: {why} while building"})
            break
    stamp = {"commit": commit(), "date": datetime.datetime.now().isoformat(timespec="seconds"), "host": host()}
    merged.update(stamp)
    for cell in merged["stages"].values():  # each cell says where it was measured: a rerun of some stages keeps the rest
        cell.update(stamp)
    merged["stages"] = {s: merged["stages"][s] for s in STAGES if s in merged["stages"]}
    return merged


def merge_rerun(old: Optional[dict], new: dict) -> dict:
    """``new`` (a run of some stages) over ``old`` (the same family and variant's earlier record): the stages ``new``
    did not run keep their cells, each with the commit, date and host it was measured with."""
    if not old:
        return new
    stages = {}
    for s in STAGES:
        if s in new["stages"]:
            stages[s] = new["stages"][s]
        elif s in old.get("stages", {}):
            stages[s] = {"commit": old.get("commit"), "date": old.get("date"), "host": old.get("host"),
                         **old["stages"][s]}
    return {**new, "stages": stages}


# ------------------------------------------------------------------------------------------------ the document


def _cpu() -> str:
    from kcompress.bench.schema import host_target

    return host_target()["cpu"]


def host() -> str:
    """This machine as the document names it: CPU and usable cores."""
    return f"{_cpu()}, {_cores()} cores"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("tensorflow", "tf_keras", "keras", "tensorflow-model-optimization", "ai-edge-litert"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def _esc(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _short(text: str, n: int = 70) -> str:
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def _gib(mib) -> str:
    return f"{mib / 1024:.1f} GiB" if mib else "?"


VARIANT_TITLES = {
    "top": "Top-level application (`include_top=True`, 10 classes, logits; the family's own preprocessing)",
    "nested": "Nested backbone in a transfer model (`Rescaling(1/127.5, -1)` in front, new head; 0-255 pixels)",
    "keras3": "Keras 3: the nested transfer model built with `keras.applications`, saved as `.keras`, passed by path",
}


def _figures(st: dict) -> dict[str, str]:
    """The key figure of each stage, for the figures table."""
    f = {}
    p = st.get("ptq", {})
    if "int8_ratio" in p:
        f["ptq"] = f"{p['int8_ratio']:.3f}x, acc {p['accuracy_keras']:.2f}->{p['accuracy_tflite']:.2f}"
    m = st.get("magnitude", {})
    if "kernels" in m:
        f["magnitude"] = (f"{m['kernels_at_target']}/{m['kernels']} kernels at 50%, min {m['min_sparsity']:.0%}, "
                          f"{m['depthwise_dense']} depthwise dense")
    s = st.get("structured", {})
    if "params_ratio" in s:
        f["structured"] = (f"params {s['params_ratio']:.2f}x, MACs {s['macs_ratio']:.2f}x, "
                           f"{s['frozen_count']} frozen" + ("" if s.get("target_met") else ", target missed"))
    q = st.get("qat", {})
    if "int8_ratio" in q:
        extra = sum((q.get("ops_beyond_ptq") or {}).values())
        f["qat"] = (f"{q['int8_ratio']:.3f}x, {q['float_compute_op_count']} float ops"
                    + (f", {extra} ops more than PTQ" if extra else "")
                    + f", train {q.get('qat_train_seconds')} s, acc {q['accuracy_fp32']:.2f}->{q['accuracy_tflite']:.2f}")
    d = st.get("distill", {})
    if "params_ratio" in d:
        f["distill"] = f"student {d['params_ratio']:.2f}x params, acc {d['accuracy_student']:.2f}"
    return f


def write_doc(results: dict, path: str, command: str, stages=STAGES) -> str:
    """The Markdown matrix: header (command, date, CPU, commit), then per variant a pass/fail table with stage times,
    the full failure reasons, the key figures; then the summary."""
    entries = list(results.values())
    cells = [{"commit": e.get("commit"), "date": e.get("date"), "host": e.get("host"), **c}
             for e in entries for c in (e.get("stages") or {"": {}}).values()]
    commits = sorted({c.get("commit") or "?" for c in cells})
    dates = sorted(c["date"] for c in cells if c.get("date"))
    hosts = sorted({c.get("host") or "not recorded" for c in cells})
    lines = [
        "# Coverage: tf_keras.applications families through every stage",
        "",
        "Generated by `tools/coverage.py` (issue 14); do not edit by hand. Regenerate with",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- Run: {dates[0] if dates else '?'}" + (f" to {dates[-1]}" if len(dates) > 1 and dates[-1] != dates[0]
                                                  else ""),
        f"- Host: {'; '.join(hosts)}; {platform.system()} {platform.machine()}; Python {platform.python_version()}",
        f"- kcompress commit: {', '.join(commits) or '?'}",
        f"- Packages: {_versions()}",
        f"- Data: scikit-learn digits upsampled (nearest) to the input size, {SAMPLES} TRAIN and {SAMPLES} VAL samples "
        "(stratified, disjoint); models built offline with `weights=None` and 10 classes, untrained, one epoch per "
        "stage: accuracies are recorded, not judged.",
        f"- Each stage runs in its own process (peak memory: that stage's own, with the model it builds); a stage may take {STAGE_TIMEOUT} s. Cells: `ok 12 s` (wall "
        "seconds of the stage) or `FAIL` with the reason (in full below each table). Peak memory: the largest "
        "resident set of any stage.",
        "",
        "What each stage must show to pass:",
        "",
    ]
    lines += [f"- **{s}**: {CRITERIA[s]}" for s in stages]
    total = passed = 0
    slow_qat, heavy = [], []
    for variant in VARIANTS:
        rows = [e for e in entries if e.get("variant") == variant]
        if not rows:
            continue
        order = {f.name: i for i, f in enumerate(FAMILIES)}
        rows.sort(key=lambda e: (order.get(e["family"], len(order)), e.get("app", "")))
        lines += ["", f"## {VARIANT_TITLES[variant]}", "",
                  "| family (member) | input | params | " + " | ".join(stages) + " | peak memory |",
                  "|---|---|---|" + "---|" * len(stages) + "---|"]
        notes, figs = [], []
        for e in rows:
            cells = []
            st = e.get("stages", {})
            peaks = [v.get("peak_mib") for v in [e.get("build", {}), *st.values()] if v.get("peak_mib")]
            for s in stages:
                c = st.get(s)
                if c is None:
                    cells.append("not run")
                    continue
                total += 1
                secs = f" {c['seconds']:.0f} s" if c.get("seconds") is not None else ""
                if c.get("ok"):
                    passed += 1
                    cells.append(f"ok{secs}")
                    if s == "qat" and e.get("input") == 32 and c.get("seconds", 0) > QAT_BUDGET_S:
                        slow_qat.append(f"{e['app']} {variant} ({c['seconds']:.0f} s)")
                else:
                    notes.append(f"{e['app']} / {s}: {c.get('reason', '?')}")
                    cells.append(f"FAIL{secs} [{len(notes)}]: {_esc(_short(c.get('reason', '?')))}")
                if c.get("peak_mib") and c["peak_mib"] > MEMORY_BUDGET_MIB:
                    heavy.append(f"{e['app']} {variant} {s} ({_gib(c['peak_mib'])})")
            params = f"{e['params'] / 1e6:.2f} M" if e.get("params") else "?"
            if not e.get("build", {}).get("ok", True):
                notes.append(f"{e['app']} / build: {e['build'].get('reason', '?')}")
            lines.append(f"| {e.get('label', e['family'])} | {e.get('input', '?')} | {params} | " + " | ".join(cells)
                         + f" | {_gib(max(peaks)) if peaks else '?'} |")
            f = _figures(st)
            figs.append(f"| {e.get('app')} | " + " | ".join(_esc(f.get(s, "")) for s in stages) + " |")
        if notes:
            lines += ["", "Failures, in full:", ""] + [f"{i}. {_esc(n)}" for i, n in enumerate(notes, 1)]
        lines += ["", "Figures (PTQ/QAT: .tflite bytes over fp32 parameter bytes, VAL accuracy before->after):", "",
                  "| member | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)] + figs
    lines += ["", "## Summary", "",
              f"{passed} of {total} cells pass ({len(entries)} family/variant rows, {len(set(e['family'] for e in entries))} "
              "families)."]
    lines.append(f"QAT over {QAT_BUDGET_S} s at 32x32: " + (", ".join(slow_qat) if slow_qat else "none") + ".")
    lines.append(f"Stages above {MEMORY_BUDGET_MIB // 1024} GiB peak memory: " + (", ".join(heavy) if heavy else "none")
                 + ".")
    same = [f"{f.app}: {', '.join(f.members)}" for f in FAMILIES if f.members]
    lines += ["", "Members on the same code path as the row's member (built by the same builder function; "
              "`--all-members` runs them too):", ""] + [f"- {s}" for s in same]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return text


# ------------------------------------------------------------------------------------------------ CLI


def _list(value: str, known, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in known]
    if bad:
        raise SystemExit(f"unknown {what} {bad[0]!r}; known: {', '.join(known)}")
    return items


def _command(argv) -> str:
    return "python tools/coverage.py" + (" " + shlex.join(argv) if argv else "")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", help="comma-separated rows (default: all); a member's name (EfficientNetB3) works")
    p.add_argument("--variants", default=",".join(VARIANTS), help="top, nested, keras3 (default: all)")
    p.add_argument("--keras3-families", default=",".join(KERAS3_FAMILIES),
                   help="the families built with Keras 3 in the keras3 variant (default: %(default)s; 'all')")
    p.add_argument("--stages", default=",".join(STAGES), help="default: all (%(default)s)")
    p.add_argument("--all-members", "--all-variants", action="store_true",
                   help="also every member on the same code path (EfficientNetB1-B7, ResNet101, ...)")
    p.add_argument("--jobs", type=int, default=1, help="(family, variant) processes at once (default 1)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "COVERAGE.md"), help="the Markdown matrix")
    p.add_argument("--json", default=os.path.join(ROOT, "docs", "coverage.json"),
                   help="results, kept in the repo beside --out; read to resume (default: docs/coverage.json)")
    p.add_argument("--workdir", default=os.path.join(ROOT, "build", "coverage"), help="data, Keras 3 files, logs")
    p.add_argument("--rerun", action="store_true", help="run (family, variant) already in the JSON again")
    p.add_argument("--doc-only", action="store_true", help="rewrite --out from --json without running anything")
    p.add_argument("--stage-timeout", type=int, default=STAGE_TIMEOUT, help="seconds per stage (default %(default)s)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child: one family
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.stages = _list(args.stages, STAGES, "stage")
    if args.one:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        rec = run_one(family(args.one), args.variant, args.stages, args.workdir, args.json, args.stage_timeout)
        return 0 if all(s.get("ok") for s in rec["stages"].values()) else 1

    results: dict = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f).get("results", {})
    command = _command(argv)
    if args.doc_only:
        write_doc(results, args.out, command, args.stages)
        print(f"wrote {args.out}")
        return 0
    variants = _list(args.variants, VARIANTS, "variant")
    fams = [family(n.strip()) for n in args.families.split(",")] if args.families else list(FAMILIES)
    if args.all_members:
        fams += [family(m) for f in fams for m in f.members]
    k3 = None if args.keras3_families == "all" else {family(n).name for n in args.keras3_families.split(",")}
    todo = []
    for fam in fams:
        for v in variants:
            if v == "keras3" and k3 is not None and fam.name not in k3 and fam.app not in {family(n).app for n in k3}:
                continue
            key = f"{fam.app}/{v}"
            if key in results and not args.rerun:
                print(f"{key}: in {args.json}, skipped (--rerun runs it again)")
                continue
            todo.append((fam, v))
    lock = threading.Lock()
    os.makedirs(args.workdir, exist_ok=True)

    def work(item):
        fam, v = item
        t0 = time.time()
        rec = run_family(fam, v, args)
        with lock:
            results[f"{fam.app}/{v}"] = rec = merge_rerun(results.get(f"{fam.app}/{v}"), rec)
            _write_json(args.json, {"results": results})
            write_doc(results, args.out, command, STAGES)
            cells = " ".join(f"{s}:{'ok' if c.get('ok') else 'FAIL'}" for s, c in rec["stages"].items())
            print(f"{fam.app}/{v}: {cells} ({time.time() - t0:.0f} s)", flush=True)

    if args.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(work, todo))
    else:
        for item in todo:
            work(item)
    if not todo:
        write_doc(results, args.out, command, STAGES)
    print(f"wrote {args.out} and {args.json}")
    failed = [k for k, r in results.items() if not all(s.get("ok") for s in r.get("stages", {}).values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
