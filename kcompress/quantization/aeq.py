"""Lower-precision weights through ai-edge-quantizer (AEQ): int4 weights, per-layer recipes, mixed precision.

Takes the fp32 ``.tflite`` of :func:`kcompress.quantization.ptq.convert` and rewrites it with AEQ's static recipe:
every op int8 (weights and activations, calibrated on the same stratified samples as the int8 path), then the
CONV_2D and FULLY_CONNECTED ops of the layers given ``int4`` with int4 weights (``static_wi4_ai8``: per output
channel, symmetric), and the ops of layers given ``float`` left unquantized (AEQ inserts the QUANTIZE/DEQUANTIZE
around them). Input and output are int8, as in mode int8.

Why static (int8 activations): measured with ai-edge-litert 2.3 on a ResNet-20 (1 thread, batch 1), static int4
ran at 0.79 ms, dynamic-range int4 (float activations quantized on the fly) at 1.03 ms, weight-only int4 (a
DEQUANTIZE before every float op) at 2.86 ms; int8 0.34 ms, fp32 0.73 ms. All of them run correctly in LiteRT.
Gotcha: XNNPACK takes no int4 CONV_2D/FULLY_CONNECTED, so those run on LiteRT's builtin kernels and the graph is
split into many delegate partitions: int4 is about half the int8 size but usually SLOWER than int8 (and near
fp32) on CPU. Measure on the target. DEPTHWISE_CONV_2D (and any other op) has no int4 kernel in AEQ's policy: a
layer asked for int4 there stays int8, and the report says so (it is read from the file, not from the request).

A recipe is a list of rules ``{"layers": ..., "weights": "int4" | "int8" | "float"}``, later rules winning; layers
no rule names are int4. ``layers`` is a list of Keras layer names (``first``/``last``: the first/last weighted
layer) or one string, a regular expression matched against whole layer names. A JSON or YAML file holds the list
(or ``{"recipe": [...]}``). ``"auto"`` chooses per layer under ``max_drop`` (:func:`mixed_precision`).
Gotcha: the converter names a fused op after all its layers (``conv1/Conv2D;bn1/...;relu1/Relu``); a layer's ops
are those whose output name contains ``/<layer>/`` (or ``/<layer>;``), as for ``--float-layers``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterable, Optional

import numpy as np

from kcompress.errors import KcompressError, UsageError

__all__ = ["PRECISIONS", "INSTALL_HINT", "require_aeq", "load_recipe", "resolve_recipe", "weighted_layers",
           "quantize_weights", "weight_precisions", "layer_report", "mixed_precision",
           "int4_weights", "SCHEME"]

PRECISIONS = ("int4", "int8", "float")
INSTALL_HINT = "mode int4-weights needs ai-edge-quantizer: pip install 'kcompress[aeq]'"
SCHEME = "static: int4 weights (CONV_2D, FULLY_CONNECTED), int8 activations, int8 everything else"
_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D", "BATCH_MATMUL")
_INT4_OPS = ("CONV_2D", "FULLY_CONNECTED")  # static_wi4_ai8 in AEQ's default policy
_WEIGHTED_TYPES = ("Conv2D", "DepthwiseConv2D", "Dense", "SeparableConv2D", "Conv1D", "Conv2DTranspose")
_SIGNATURE = "serving_default"


def _quiet(_msg: str) -> None:
    pass


def require_aeq():
    """The ``ai_edge_quantizer`` package, or a KcompressError (exit 1) with the install hint."""
    try:
        import ai_edge_quantizer  # noqa: F401
        from ai_edge_quantizer import quantizer
    except ImportError:
        raise KcompressError(INSTALL_HINT) from None
    return quantizer


# --- recipes ------------------------------------------------------------------------------------------------------


def load_recipe(recipe) -> Any:
    """``None``, ``"auto"`` or the list of rules: from a JSON/YAML file path, a list, or ``{"recipe": [...]}``.
    Checks the shape (unknown keys and precisions are errors); layer names are checked by :func:`resolve_recipe`."""
    if recipe is None or recipe == "auto":
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        path = str(recipe)
        if not os.path.isfile(path):
            raise UsageError(f"--recipe: no such file {path!r} (a JSON/YAML list of {{layers, weights}}, or auto)")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            if path.lower().endswith((".yaml", ".yml")):
                import yaml

                recipe = yaml.safe_load(text)
            else:
                recipe = json.loads(text)
        except Exception as e:  # noqa: BLE001  (json/yaml parse errors)
            raise UsageError(f"--recipe {path}: not valid {'YAML' if path.endswith(('yaml', 'yml')) else 'JSON'}: "
                             f"{str(e).splitlines()[0]}") from None
    if isinstance(recipe, dict):
        if set(recipe) != {"recipe"}:
            raise UsageError(f"recipe: expected a list of rules or {{recipe: [...]}}, got keys {sorted(recipe)}")
        recipe = recipe["recipe"]
    if not isinstance(recipe, (list, tuple)) or not recipe:
        raise UsageError("recipe: expected a non-empty list of {layers: names or regex, weights: int4|int8|float}")
    rules = []
    for i, rule in enumerate(recipe):
        if not isinstance(rule, dict) or set(rule) != {"layers", "weights"}:
            keys = sorted(rule) if isinstance(rule, dict) else type(rule).__name__
            raise UsageError(f"recipe rule {i + 1}: expected exactly the keys layers and weights, got {keys}")
        weights = str(rule["weights"]).lower()
        if weights not in PRECISIONS:
            raise UsageError(f"recipe rule {i + 1}: weights {rule['weights']!r} is not one of {', '.join(PRECISIONS)}")
        layers = rule["layers"]
        if isinstance(layers, (list, tuple)):
            if not layers or not all(isinstance(n, str) for n in layers):
                raise UsageError(f"recipe rule {i + 1}: layers must be a non-empty list of names or one regex")
            layers = tuple(layers)
        elif not isinstance(layers, str) or not layers:
            raise UsageError(f"recipe rule {i + 1}: layers must be a non-empty list of names or one regex")
        rules.append({"layers": layers, "weights": weights})
    return tuple(rules)


def weighted_layers(model) -> list[str]:
    """Names of the layers whose weights a recipe sets (conv and dense layers, nested models flattened)."""
    from kcompress.graph import flatten_model

    return [la.name for la in flatten_model(model).layers if type(la).__name__ in _WEIGHTED_TYPES]


def resolve_recipe(model_or_names, rules) -> dict[str, str]:
    """Layer name -> ``int4``/``int8``/``float`` for every weighted layer; layers no rule names are int4."""
    names = list(model_or_names) if isinstance(model_or_names, (list, tuple)) else weighted_layers(model_or_names)
    if not names:
        raise KcompressError("the model has no conv or dense layer whose weights int4 could quantize")
    out = dict.fromkeys(names, "int4")
    for i, rule in enumerate(rules or ()):
        layers = rule["layers"]
        if isinstance(layers, str) and layers not in ("first", "last"):
            try:
                pat = re.compile(layers)
            except re.error as e:
                raise UsageError(f"recipe rule {i + 1}: bad regex {layers!r}: {e}") from None
            hit = [n for n in names if pat.fullmatch(n)]
            if not hit:
                raise UsageError(f"recipe rule {i + 1}: regex {layers!r} matches no weighted layer "
                                 f"({', '.join(names[:6])}{' ...' if len(names) > 6 else ''})")
        else:
            hit = []
            for n in (layers,) if isinstance(layers, str) else layers:
                n = names[0] if n == "first" else names[-1] if n == "last" else n
                if n not in out:
                    import difflib

                    near = difflib.get_close_matches(n, names, n=1)
                    raise UsageError(f"recipe rule {i + 1}: no weighted layer {n!r}"
                                     + (f" (did you mean {near[0]!r}?)" if near else ""))
                hit.append(n)
        for n in hit:
            out[n] = rule["weights"]
    return out


# --- conversion ---------------------------------------------------------------------------------------------------


def _layer_regex(names: Iterable[str]) -> str:
    alt = "|".join(re.escape(n) for n in sorted(names))
    return rf"(^|/)({alt})(/|;|$)"


def _with_signature(tflite: bytes) -> bytes:
    """``tflite`` with a ``serving_default`` signature (AEQ calibrates through signatures; the traced converter
    path writes none)."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite))
    if model.signatureDefs:
        return tflite
    sg = model.subgraphs[0]
    model.signatureDefs = [fb.SignatureDefT(
        inputs=[fb.TensorMapT(f"input_{k}", int(i)) for k, i in enumerate(sg.inputs)],
        outputs=[fb.TensorMapT(f"output_{k}", int(i)) for k, i in enumerate(sg.outputs)],
        signatureKey=_SIGNATURE, subgraphIndex=0)]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def quantize_weights(fp32: bytes, assignment: dict[str, str], calibration: Callable[[], Iterable[np.ndarray]],
                     names_known: bool = True) -> bytes:
    """``fp32`` (a ``.tflite``) with each layer's weights at its precision in ``assignment`` (layer -> int4, int8,
    float) and int8 activations, calibrated on ``calibration()`` (single-sample batches). ``names_known=False``
    (no Keras model: an exported SavedModel): every CONV_2D/FULLY_CONNECTED gets int4."""
    quantizer = require_aeq()
    from ai_edge_quantizer import algorithm_manager, qtyping

    op = qtyping.TFLOperationName
    src = _with_signature(fp32)
    q = quantizer.Quantizer(src)
    q.add_static_config(".*", op.ALL_SUPPORTED, activation_num_bits=8, weight_num_bits=8)
    int4 = [n for n, p in assignment.items() if p == "int4"]
    fl = [n for n, p in assignment.items() if p == "float"]
    if int4 or not names_known:
        regex = _layer_regex(int4) if names_known else ".*"
        for kind in _INT4_OPS:
            q.add_static_config(regex, getattr(op, kind), activation_num_bits=8, weight_num_bits=4)
    if fl:
        q.update_quantization_recipe(_layer_regex(fl), op.ALL_SUPPORTED,
                                     algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE)
    from kcompress.litert.interpreter import TFLiteModel

    inp = TFLiteModel(fp32, delegates=False).input
    samples = [{"input_0": np.asarray(x, np.float32).reshape(inp["shape"])} for x in calibration()]
    if not samples:
        raise KcompressError("int4-weights: no calibration samples (check --data)")
    try:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
            qsv = q.calibrate({_SIGNATURE: samples})
            out = bytes(q.quantize(qsv, enable_progress_report=False).quantized_model)
    except (ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KcompressError(f"ai-edge-quantizer failed (int4-weights): {first[:300]}") from None
    try:  # runs in LiteRT (ptq.smoke_test's check, kept here so this module imports nothing above it)
        m = TFLiteModel(out)
        m.predict(np.zeros((1, *m.input_shape), np.float32))
    except (KcompressError, RuntimeError, ValueError) as e:
        raise KcompressError(f"the int4 model does not run in the LiteRT interpreter: {str(e)[:300]}") from None
    return out


def weight_precisions(tflite: bytes, layers: Optional[Iterable[str]] = None) -> list[dict]:
    """Per weighted op of ``tflite``: ``{"op", "name", "weights", "layer"}`` with ``weights`` read from the
    flatbuffer's tensor type (``int4``, ``int8``, ``float`` for float32/float16, or a DEQUANTIZEd int's source
    type + ``-dequantized``). ``layer``: the first of ``layers`` the op's output name belongs to (None if none).
    The interpreter reports int4 tensors as int8, so this reads the file itself."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite))
    type_names = {v: k.lower() for k, v in vars(fb.TensorType).items() if not k.startswith("_")}
    op_names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    codes = [op_names.get(flatbuffer_utils.get_builtin_code_from_operator_code(c), "CUSTOM")
             for c in model.operatorCodes]
    sg = model.subgraphs[0]
    producer = {int(t): o for o in sg.operators for t in o.outputs}

    def name(i: int) -> str:
        n = sg.tensors[i].name
        return n.decode() if isinstance(n, bytes) else str(n)

    pats = [(n, re.compile(_layer_regex([n]))) for n in (layers or ())]
    rows = []
    for o in sg.operators:
        kind = codes[o.opcodeIndex]
        if kind not in _WEIGHT_OPS or len(o.inputs) < 2:
            continue
        w = int(o.inputs[1])
        t = type_names.get(sg.tensors[w].type, "?")
        src = producer.get(w)
        if src is not None and codes[src.opcodeIndex] == "DEQUANTIZE":
            t = type_names.get(sg.tensors[int(src.inputs[0])].type, "?") + "-dequantized"
        t = "float" if t in ("float32", "float16") else t
        out_name = name(int(o.outputs[0]))
        layer = next((n for n, p in pats if any(p.search(part) for part in out_name.split(";"))), None)
        rows.append({"op": kind, "name": out_name, "weights": t, "layer": layer})
    return rows


def layer_report(tflite: bytes, assignment: dict[str, str]) -> list[dict]:
    """Per layer of ``assignment``: ``{"layer", "requested", "weights", "ops"}``, ``weights`` as found in the file
    (``int4``, ``int8``, ``float``; several values joined by ``+`` when the layer's ops differ; ``none`` when no
    weighted op carries its name, e.g. folded away)."""
    rows = weight_precisions(tflite, list(assignment))
    out = []
    for layer, requested in assignment.items():
        found = [r for r in rows if r["layer"] == layer]
        kinds = sorted({"float" if r["weights"].endswith("-dequantized") else r["weights"] for r in found})
        out.append({"layer": layer, "requested": requested, "weights": "+".join(kinds) or "none",
                    "ops": [r["op"] for r in found]})
    return out


# --- mixed precision ----------------------------------------------------------------------------------------------


def mixed_precision(model, fp32: bytes, calibration: Callable[[], Iterable[np.ndarray]], val, max_drop: float,
                    sensitivity_samples: int = 256, log: Callable[[str], None] = _quiet) -> tuple[bytes, dict]:
    """Per-layer int4/int8/float within ``max_drop`` points of the Keras model's accuracy on ``val`` (VAL).

    All int4 first; if the drop is over budget, the k most sensitive layers (kcompress's int8 sensitivity ranking
    on ``val``, lowest output SQNR first) go to int8, k found by doubling and then bisecting; if even all-int8
    misses, the k most sensitive go float (the rest int8) the same way. Returns ``(tflite, plan)``; ``plan`` has
    ``float_accuracy``, ``trials`` (each assignment's VAL accuracy, drop and bytes), ``assignment``, ``met`` and
    ``ranking``; with no trial within budget the best one is kept and ``met`` is False. Gotcha: the ranking is
    for int8 noise, a proxy for int4's; and the choice is made on VAL, so VAL accuracy is optimistic.
    """
    from kcompress.evaluation import evaluate
    from kcompress.quantization.sensitivity import sensitivity

    if max_drop < 0:
        raise UsageError("--max-drop must be 0 or more (points of accuracy)")
    names = weighted_layers(model)
    float_acc = evaluate(model, val, description="float (Keras)").accuracy
    plan: dict = {"max_drop": max_drop, "float_accuracy": float_acc, "trials": [], "ranking": []}
    cache: dict[tuple, dict] = {}

    def trial(assignment: dict[str, str]) -> dict:
        key = tuple(sorted(assignment.items()))
        if key not in cache:
            tfl = quantize_weights(fp32, assignment, calibration)
            acc = evaluate(tfl, val, description="int4-weights trial").accuracy
            counts = {p: sum(1 for v in assignment.values() if v == p) for p in PRECISIONS}
            t = {"counts": counts, "accuracy": acc, "drop": (float_acc - acc) * 100, "bytes": len(tfl),
                 "assignment": dict(assignment), "tflite": tfl}
            log(f"  int4 {counts['int4']:3d} / int8 {counts['int8']:3d} / float {counts['float']:3d}: VAL {acc:.2%} "
                f"(drop {t['drop']:+.2f} points), {len(tfl)} bytes")
            plan["trials"].append(t)
            cache[key] = t
        return cache[key]

    def ok(t: dict) -> bool:
        return t["drop"] <= max_drop

    best = trial(dict.fromkeys(names, "int4"))
    if not ok(best):
        ranking = [r for r in sensitivity(model, val, samples=sensitivity_samples) if r["layer"] in set(names)]
        plan["ranking"] = [{k: r[k] for k in ("rank", "layer", "sqnr_db")} for r in ranking]
        order = [r["layer"] for r in ranking]
        phases = (("int8", "int4"), ("float", "int8"))
        for up, rest in phases:
            def at(k: int, up=up, rest=rest) -> dict:
                return trial({n: (up if n in order[:k] else rest) for n in names})

            hit, lo, k, n = None, 0, 1, len(order)
            while True:
                if ok(at(k)):
                    hit = k
                    break
                lo = k
                if k == n:
                    break
                k = min(2 * k, n)
            if hit is not None:
                while hit - lo > 1:
                    mid = (lo + hit) // 2
                    lo, hit = (lo, mid) if ok(at(mid)) else (mid, hit)
                best = at(hit)
                break
        else:
            best = min(plan["trials"], key=lambda t: t["drop"])
            log(f"no mix of int4/int8/float keeps the VAL drop within {max_drop} points; the best trial is kept")
    plan.update(met=ok(best), assignment=best["assignment"], accuracy=best["accuracy"], drop=best["drop"],
                bytes=best["bytes"])
    tfl = best["tflite"]
    plan["trials"] = [{k: v for k, v in t.items() if k != "tflite"} for t in plan["trials"]]
    return tfl, plan


def int4_weights(model, fp32: bytes, recipe, calibration: Callable[[], Iterable[np.ndarray]], val=None,
                 max_drop: float = 1.0, log: Callable[[str], None] = _quiet) -> tuple[bytes, dict]:
    """``(tflite, report)``: ``fp32`` with int4 weights by ``recipe`` (None: every layer int4; rules, a file path
    or ``"auto"``: :func:`mixed_precision` on ``val`` within ``max_drop`` points). ``model``: the Keras model the
    ``.tflite`` came from (layer names), or None for an exported SavedModel (then only ``recipe=None``).
    ``report``: ``scheme``, ``recipe``, ``layers`` (:func:`layer_report`), ``counts`` (layers per precision as
    found in the file), ``plan`` (the mixed-precision search, or None), ``size_bytes``."""
    require_aeq()
    rules = load_recipe(recipe)
    plan = None
    if model is None:
        if rules is not None:
            raise UsageError("--recipe needs the Keras model (layer names); an exported SavedModel has none")
        tfl = quantize_weights(fp32, {}, calibration, names_known=False)
        layers = [{"layer": r["name"], "requested": "int4", "weights": r["weights"], "ops": [r["op"]]}
                  for r in weight_precisions(tfl)]
    else:
        if rules == "auto":
            if val is None:
                raise UsageError("--recipe auto needs VAL data to measure the accuracy drop")
            log(f"Choosing int4/int8/float per layer so the VAL drop stays within {max_drop} points ...")
            tfl, plan = mixed_precision(model, fp32, calibration, val, max_drop, log=log)
            assignment = plan["assignment"]
        else:
            assignment = resolve_recipe(model, rules)
            tfl = quantize_weights(fp32, assignment, calibration)
        layers = layer_report(tfl, assignment)
    counts = {p: sum(1 for r in layers if r["weights"] == p) for p in PRECISIONS}
    return tfl, {"scheme": SCHEME, "recipe": recipe if isinstance(recipe, str) or recipe is None else list(rules),
                 "layers": layers, "counts": counts, "plan": plan, "size_bytes": len(tfl)}
