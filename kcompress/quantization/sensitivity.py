"""Per-layer int8 sensitivity and mixed precision (the fewest float layers that keep the drop within a budget).

:func:`sensitivity` quantizes ONE layer at a time in Keras and measures what that alone does to the model output:
the layer's weights are rounded to int8 the way the TFLite converter does (symmetric, narrow range, per output
channel), and its output activation to int8 per tensor (asymmetric, range of the scored batch) at the point
TFLite quantizes it: after a following BatchNormalization and ReLU, which the converter fuses into the conv.
Layers are ranked by the SQNR (dB) of the model output against the float output, lowest (most sensitive) first;
the accuracy change on the scored samples is reported alongside. A weight outlier (one huge weight stretches the
channel's scale and rounds the rest to zero) or a wide activation range shows up as a low SQNR.

:func:`auto_float_layers` then converts for real: all-int8 first; if the VAL accuracy drop exceeds ``max_drop``
points it keeps the top-k most sensitive layers float (``QuantizeOptions(float_layers=...)``), doubling k and then
bisecting for the smallest k within budget. Each float layer costs about 3 bytes per weight (float32 vs int8).
Gotcha: the drop is measured on VAL, so with small VAL sets it is noisy at the 0.1-point level.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from kcompress.backend import keras, tf
from kcompress.data import DataSource
from kcompress.errors import KcompressError, UsageError

__all__ = ["sensitivity", "auto_float_layers", "choose_float_layers", "fake_quant_weights"]

L = keras.layers
_WEIGHTED = (L.Conv2D, L.DepthwiseConv2D, L.Dense, L.SeparableConv2D, L.Conv1D)
_MERGE = (L.Add, L.Concatenate, L.Multiply)
_FUSED = (L.BatchNormalization, L.ReLU)


def fake_quant_weights(kernel: np.ndarray, depthwise: bool = False) -> np.ndarray:
    """Symmetric narrow-range int8 per output channel (last axis; depthwise: per input channel x multiplier)."""
    axes = (0, 1) if depthwise else tuple(range(kernel.ndim - 1))
    amax = np.max(np.abs(kernel), axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    return (np.clip(np.round(kernel / scale), -127, 127) * scale).astype(kernel.dtype)


def _fake_quant_act(y):
    lo = tf.minimum(tf.reduce_min(y), 0.0)
    hi = tf.maximum(tf.reduce_max(y), 0.0)
    scale = tf.maximum((hi - lo) / 255.0, 1e-12)
    return tf.round((y - lo) / scale) * scale + lo


def _consumers(model) -> dict[str, list[str]]:
    """Layer name -> names of the layers that take its output (from the functional config)."""
    out: dict[str, list[str]] = {}
    for spec in model.get_config()["layers"]:
        for node in spec.get("inbound_nodes", []):
            for entry in node if isinstance(node, list) else []:
                if isinstance(entry, (list, tuple)) and entry and isinstance(entry[0], str):
                    out.setdefault(entry[0], []).append(spec["name"])
    return out


def _quant_point(model, layer, consumers) -> object:
    """The layer whose output TFLite quantizes for ``layer``: follow a single BN / ReLU / relu Activation."""
    cur = layer
    while True:
        nxt = consumers.get(cur.name, [])
        if len(nxt) != 1:
            return cur
        cand = model.get_layer(nxt[0])
        act = getattr(getattr(cand, "activation", None), "__name__", "")
        if isinstance(cand, _FUSED) or (isinstance(cand, L.Activation) and act in ("relu", "relu6", "linear")):
            cur = cand
        else:
            return cur


def candidate_layers(model) -> list:
    """Layers whose int8 quantization can be switched off by name: weighted layers and merges (flat model)."""
    from kcompress.graph import flatten_model

    flat = flatten_model(model)
    return [la for la in flat.layers if isinstance(la, _WEIGHTED + _MERGE)]


def sensitivity(model, data: DataSource, samples: int = 256, log: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Per-layer rows ranked most sensitive first: ``{"rank", "layer", "type", "params", "sqnr_db",
    "accuracy_delta", "agreement", "float_cost_bytes"}`` (accuracy in points on ``samples`` samples of ``data``)."""
    from kcompress.graph import flatten_model
    from kcompress.modelinfo import input_shape
    from kcompress.progress import progress

    flat = flatten_model(model)
    shape = input_shape(flat)
    xs, ys = [], []
    for x, y in data.numpy_batches(shape, batch_size=64, limit=samples):
        xs.append(x)
        ys.append(y)
    if not xs:
        raise KcompressError(f"{data.name}: the data set is empty")
    x = tf.constant(np.concatenate(xs))
    y = np.concatenate(ys)

    def run() -> np.ndarray:
        return np.concatenate([np.asarray(flat(x[i : i + 64], training=False)) for i in range(0, len(y), 64)])

    ref = run()
    ref_acc = float((ref.argmax(1) == y).mean())
    consumers = _consumers(flat)
    layers = [la for la in flat.layers if isinstance(la, _WEIGHTED + _MERGE)]
    if not layers:
        raise KcompressError("the model has no layer that int8 quantization would change (no conv/dense/add)")
    rows = []
    with progress("per-layer sensitivity", total=len(layers)) as bar:
        for layer in layers:
            saved = layer.get_weights()
            point = _quant_point(flat, layer, consumers)
            orig_call = point.call
            try:
                if isinstance(layer, _WEIGHTED):
                    new = []
                    for w, v in zip(layer.weights, saved):
                        name = w.name.split("/")[-1]
                        is_kernel = "kernel" in name and v.ndim >= 2
                        new.append(fake_quant_weights(v, "depthwise" in name) if is_kernel else v)
                    layer.set_weights(new)

                def quantized_call(*args, __orig=orig_call, **kwargs):
                    return _fake_quant_act(__orig(*args, **kwargs))

                point.call = quantized_call
                out = run()
            finally:
                if "call" in point.__dict__:
                    del point.__dict__["call"]
                layer.set_weights(saved)
            noise = float(np.sum((out - ref) ** 2))
            sqnr = 10 * np.log10(float(np.sum(ref**2)) / noise) if noise > 0 else float("inf")
            params = int(sum(np.prod(w.shape) for w in layer.weights if "kernel" in w.name))
            rows.append(
                {
                    "layer": layer.name,
                    "type": layer.__class__.__name__,
                    "params": int(layer.count_params()),
                    "sqnr_db": float(sqnr),
                    "accuracy_delta": (float((out.argmax(1) == y).mean()) - ref_acc) * 100,
                    "agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
                    "float_cost_bytes": 3 * params,
                }
            )
            bar.advance(1)
    rows.sort(key=lambda r: (r["sqnr_db"], r["accuracy_delta"]))
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    return rows


def auto_float_layers(
    model,
    calibration_data: DataSource,
    val_data: DataSource,
    max_drop: float = 0.3,
    max_layers: Optional[int] = None,
    calibration_samples: int = 200,
    sensitivity_samples: int = 256,
    per_channel: bool = True,
    io: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> tuple[tuple[str, ...], dict]:
    """The fewest most-sensitive layers to keep float so int8 VAL accuracy drops at most ``max_drop`` points.

    Returns ``(layers, report)``; ``layers`` is empty when plain int8 is already within budget. ``report`` has
    ``float_accuracy``, ``int8_accuracy``, ``trials`` (k, layers, accuracy, drop, bytes), ``chosen`` (each layer
    with ``float_cost_bytes``), ``bytes``, ``int8_bytes``, ``met`` and ``ranking``. When no k within
    ``max_layers`` meets the budget the best trial is returned with ``met`` False.
    """
    from kcompress.evaluation import evaluate
    from kcompress.modelinfo import input_shape
    from kcompress.options import QuantizeOptions
    from kcompress.quantization.ptq import convert

    if max_drop < 0:
        raise UsageError("--max-drop must be 0 or more (points of accuracy)")
    shape = input_shape(model)
    calib = lambda: calibration_data.calibration_samples(shape, calibration_samples)  # noqa: E731
    float_acc = evaluate(model, val_data, description="float (Keras)").accuracy

    def trial(layers: tuple[str, ...]) -> dict:
        opts = QuantizeOptions(mode="int8", per_channel=per_channel, io=io, float_layers=layers)
        tfl = convert(model, opts, calibration=calib)
        acc = evaluate(tfl, val_data, description=f"int8, {len(layers)} float").accuracy
        t = {"k": len(layers), "layers": list(layers), "accuracy": acc, "drop": (float_acc - acc) * 100}
        t["bytes"] = len(tfl)
        log(f"  {len(layers):3d} float layer(s): VAL {acc:.2%} (drop {t['drop']:+.2f} points), {len(tfl)} bytes")
        return t

    base = trial(())
    report = {
        "max_drop": max_drop,
        "float_accuracy": float_acc,
        "int8_accuracy": base["accuracy"],
        "int8_bytes": base["bytes"],
        "trials": [base],
        "ranking": [],
        "chosen": [],
        "bytes": base["bytes"],
        "met": base["drop"] <= max_drop,
    }
    if report["met"]:
        return (), report
    ranking = sensitivity(model, calibration_data, samples=sensitivity_samples)
    report["ranking"] = ranking
    names = [r["layer"] for r in ranking]
    limit = min(len(names), max_layers or len(names))
    tried: dict[int, dict] = {0: base}

    def at(k: int) -> dict:
        if k not in tried:
            tried[k] = trial(tuple(names[:k]))
            report["trials"].append(tried[k])
        return tried[k]

    lo, k, hi = 0, 1, None
    while k <= limit:
        if at(k)["drop"] <= max_drop:
            hi = k
            break
        lo = k
        if k == limit:
            break
        k = min(2 * k, limit)
    if hi is not None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if at(mid)["drop"] <= max_drop:
                hi = mid
            else:
                lo = mid
        best = tried[hi]
    else:
        best = min(tried.values(), key=lambda t: t["drop"])
        log(f"no choice of up to {limit} float layers keeps the drop within {max_drop} points; best kept")
    by_name = {r["layer"]: r for r in ranking}
    chosen = tuple(best["layers"])
    report.update(
        met=best["drop"] <= max_drop,
        bytes=best["bytes"],
        accuracy=best["accuracy"],
        drop=best["drop"],
        chosen=[
            {"layer": n, "float_cost_bytes": by_name[n]["float_cost_bytes"], "sqnr_db": by_name[n]["sqnr_db"]}
            for n in chosen
        ],
    )
    return chosen, report


def choose_float_layers(model, options, calibration_data: DataSource, val_data: DataSource,
                        log: Callable[[str], None] = print):
    """``(options, plan)``: ``options.float_layers`` resolved to layer names for ``model``. ``first``/``last`` are
    expanded; ``auto`` is chosen on ``val_data`` within ``options.max_drop`` by :func:`auto_float_layers`, whose
    report is the plan (None otherwise). The one place the API, the CLI and the pipeline resolve float layers."""
    from kcompress.quantization.ptq import resolve_float_layers

    if options.auto_float_layers:
        names, plan = auto_float_layers(model, calibration_data, val_data, max_drop=options.max_drop,
                                        calibration_samples=options.calibration_samples,
                                        per_channel=options.per_channel, io=options.io_type, log=log)
        return options.replace(float_layers=tuple(names)), plan
    if options.float_layers:
        return options.replace(float_layers=resolve_float_layers(model, options.float_layers)), None
    return options, None
