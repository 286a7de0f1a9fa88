"""Translate layer configs between Keras 3 and tf_keras and copy weights: the machinery behind kcompress.keras3.

Private: use :mod:`kcompress.keras3`. Config rules (see that module's docstring for the user-facing summary):
arguments renamed per class (``_RENAMES_TO_TFK``); an argument one side lacks is dropped only when it is off (its
default, ``None``/``False``, ``data_format="channels_last"``) or only chooses how the layer computes
(``implementation``, ``rng_type``...), otherwise refused; dtype policies become dtype names; initializers,
regularizers and constraints are rebuilt by class name with their arguments filtered the same way; functional nodes
are written in the Keras 2 form, which both versions read.
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

from kcompress.backend import keras, keras3
from kcompress.errors import KcompressError

__all__ = ["register_layer_converter", "unregister_layer_converter", "find_converter", "convert_entry", "Side", "k3_side",
           "tfk_side", "MODEL_CLASSES"]


# Activation names that exist in both Keras versions and compute the same function. Keras 3 has more (hard_silu,
# celu, ...) that tf_keras lacks, and `hard_sigmoid` is a different piecewise function in each.
_SAME_ACTIVATIONS = frozenset(
    "elu exponential gelu leaky_relu linear log_softmax mish relu relu6 selu sigmoid silu softmax softplus softsign "
    "swish tanh".split()
)

# Per-class argument renames, Keras 3 name -> tf_keras name.
_RENAMES_TO_TFK: dict[str, dict[str, str]] = {
    "InputLayer": {"batch_shape": "batch_input_shape"},
    "LeakyReLU": {"negative_slope": "alpha"},
}

# Layers that exist in both but cannot be rebuilt faithfully from config.
_REFUSED = {
    "Lambda": "it wraps a Python function that was written for one Keras version's ops",
    "TFSMLayer": "it wraps a SavedModel, not layers",
}

MODEL_CLASSES = ("Functional", "Model", "Sequential")


# --------------------------------------------------------------------------------------------------------------------
# Converter registry


@dataclass(frozen=True)
class _Converter:
    to_tf_keras: Callable | None
    to_keras3: Callable | None
    weights_to_tf_keras: Callable | None
    weights_to_keras3: Callable | None


_CONVERTERS: dict[str, _Converter] = {}


def register_layer_converter(
    class_name: str,
    to_tf_keras: Callable[[dict], tuple[Any, dict]] | None = None,
    to_keras3: Callable[[dict], tuple[Any, dict]] | None = None,
    weights_to_tf_keras: Callable[[list], list] | None = None,
    weights_to_keras3: Callable[[list], list] | None = None,
) -> None:
    """Teach the bridge a layer it does not know (a custom layer, or one only one Keras version has).

    ``class_name`` is the layer's class name, or its registered name (``"package>Name"``). ``to_tf_keras(config)``
    gets the Keras 3 layer config (a dict, e.g. ``{"name": ..., "factor": 2.0, "dtype": {...}}``) and returns
    ``(target, config)``: ``target`` is a tf_keras layer class (or the name of a built-in one) and ``config`` the
    arguments to build it from (``target.from_config(config)``); keep ``config["name"]``. ``to_keras3`` is the same
    the other way. Weights are copied in ``layer.get_weights()`` order with shapes checked; give
    ``weights_to_tf_keras(list_of_arrays) -> list_of_arrays`` (or ``weights_to_keras3``) when they must be reordered.
    The result is verified like any other layer.
    """
    _CONVERTERS[class_name] = _Converter(to_tf_keras, to_keras3, weights_to_tf_keras, weights_to_keras3)


def unregister_layer_converter(class_name: str) -> None:
    """Forget a converter registered with :func:`register_layer_converter` (no error if there is none)."""
    _CONVERTERS.pop(class_name, None)


def find_converter(entry: dict) -> _Converter | None:
    for key in (entry.get("registered_name"), entry.get("class_name")):
        if key and key in _CONVERTERS:
            return _CONVERTERS[key]
    return None


# --------------------------------------------------------------------------------------------------------------------
# Conversion


class Side:
    """One Keras version, as the conversion code needs it."""

    def __init__(self, name: str, pkg):
        self.name = name
        self.pkg = pkg

    @property
    def layers(self):
        return self.pkg.layers

    def namespace(self, kind: str):
        return {
            "initializers": self.pkg.initializers,
            "regularizers": self.pkg.regularizers,
            "constraints": self.pkg.constraints,
        }[kind]


def k3_side() -> Side:
    return Side("Keras 3", keras3())


def tfk_side() -> Side:
    return Side("tf_keras", keras)


def convert_entry(entry: dict, src: Side, dst: Side, custom_objects: dict, graph: _Graph | None = None) -> dict:
    """Translate one serialized layer (``{"class_name", "config", "name", "inbound_nodes", ...}``)."""
    class_name = entry["class_name"]
    config = entry.get("config", {})
    name = config.get("name", entry.get("name", "?"))
    out: dict[str, Any] = {}
    if class_name in MODEL_CLASSES and isinstance(config, dict) and "layers" in config:
        out["class_name"] = "Sequential" if class_name == "Sequential" else "Functional"
        out["config"] = _convert_model_config(config, class_name == "Sequential", src, dst, custom_objects)
    else:
        converter = find_converter(entry)
        direction_fn = None
        if converter is not None:
            direction_fn = converter.to_tf_keras if dst.pkg is keras else converter.to_keras3
        if direction_fn is not None:
            target, new_config = direction_fn(copy.deepcopy(config))
            if isinstance(target, str):
                out["class_name"] = target
            else:
                out["class_name"] = target.__name__
                custom_objects[target.__name__] = target
                out["registered_name"] = target.__name__
            out["config"] = new_config
        else:
            out["class_name"] = class_name
            out["config"] = _convert_layer_config(entry, name, src, dst)
    out.setdefault("registered_name", None)
    if out["class_name"] not in custom_objects:
        out["module"] = "keras.layers" if out["class_name"] not in MODEL_CLASSES else "keras"
    out["name"] = name
    if "inbound_nodes" in entry:
        out["inbound_nodes"] = _convert_nodes(entry["inbound_nodes"], name, class_name, dst, graph or _Graph())
    return out


@dataclass
class _Graph:
    """What converting one functional graph's nodes needs to know about the graph."""

    # Node-index shift per nested model: tf_keras counts a nested model's own construction as its node 0, so the
    # outer call is node 1 there and node 0 in Keras 3.
    node_shift: dict[str, int] | None = None
    # Keras 3 `keras.ops` layers whose outputs are only used as `mask=` arguments (Embedding(mask_zero=True) adds
    # a NotEqual op); tf_keras propagates masks by itself, so they and the mask arguments are dropped.
    mask_ops: frozenset = frozenset()


def _convert_model_config(config: dict, sequential: bool, src, dst, custom_objects) -> dict:
    new = {"name": config.get("name"), "layers": []}
    if "trainable" in config:
        new["trainable"] = config["trainable"]
    graph = _Graph()
    if not sequential:
        sign = 1 if dst.pkg is keras else -1
        graph = _Graph({e["name"]: sign for e in config["layers"] if _has_own_node(e)}, _mask_only_ops(config))
    for layer_entry in config["layers"]:
        if layer_entry.get("name") in graph.mask_ops:
            continue
        new["layers"].append(convert_entry(layer_entry, src, dst, custom_objects, graph))
    if sequential:
        if config.get("build_input_shape") is not None:
            new["build_input_shape"] = config["build_input_shape"]
    else:
        for key in ("input_layers", "output_layers"):
            value = _shift_refs(copy.deepcopy(config[key]), graph.node_shift)
            if dst.pkg is not keras and _is_single_node_list(value):
                value = value[0]  # Keras 3 writes one input/output as a bare triple; a list would make it a list
            new[key] = value
    return new


def _has_own_node(entry: dict) -> bool:
    """True for nested models that tf_keras gives a node of their own before the outer call."""
    if entry["class_name"] in ("Functional", "Model"):
        return True
    layers = entry.get("config", {}).get("layers", [])
    return entry["class_name"] == "Sequential" and bool(layers) and layers[0]["class_name"] == "InputLayer"


def _shift_refs(value, shift: dict[str, int] | None):
    """Shift node indices in ``[layer, node, tensor]`` references (nested lists) by ``shift[layer]``."""
    if not shift or not isinstance(value, list):
        return value
    if len(value) == 3 and isinstance(value[0], str) and isinstance(value[1], int):
        return [value[0], value[1] + shift.get(value[0], 0), value[2]]
    return [_shift_refs(v, shift) for v in value]


def _mask_only_ops(config: dict) -> frozenset:
    """Names of Keras 3 op layers (``keras.src.ops.*``) whose outputs feed nothing but ``mask=`` arguments."""
    ops = {e["name"] for e in config["layers"] if str(e.get("module") or "").startswith("keras.src.ops")}
    if not ops:
        return frozenset()
    used_otherwise: set[str] = set()
    for entry in config["layers"]:
        for node in entry.get("inbound_nodes", []):
            if not isinstance(node, dict):
                continue
            refs = _keras3_tensors(node.get("args", []))
            refs += [t for k, v in node.get("kwargs", {}).items() if k != "mask" for t in _keras3_tensors(v)]
            used_otherwise.update(t[0] for t in refs)
    used_otherwise.update(ref[0] for ref in _flat_refs(config.get("output_layers", [])))
    return frozenset(ops - used_otherwise)


def _flat_refs(value) -> list:
    if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
        return [value]
    return [r for v in value for r in _flat_refs(v)] if isinstance(value, list) else []


def _is_single_node_list(value) -> bool:
    return isinstance(value, list) and len(value) == 1 and isinstance(value[0], list) and len(value[0]) == 3 and (
        isinstance(value[0][0], str)
    )


def _unsupported(name: str, class_name: str, why: str, dst: Side, hint: bool = True) -> KcompressError:
    if not hint:
        return KcompressError(f"layer {name!r} ({class_name}) {why}")
    direction = "to_tf_keras" if dst.pkg is keras else "to_keras3"
    return KcompressError(
        f"layer {name!r} ({class_name}) {why}; to convert it, register a converter first: "
        f"kcompress.keras3.register_layer_converter({class_name!r}, {direction}=fn), where fn(config) returns "
        f"(layer class in {dst.name}, config)"
    )


def _is_builtin(entry: dict, side: Side) -> bool:
    module = entry.get("module") or ""
    registered = entry.get("registered_name")
    if module.split(".")[0] not in ("keras", "tf_keras"):
        return False
    if registered and registered != entry["class_name"]:
        return False
    return getattr(side.layers, entry["class_name"], None) is not None


def _convert_layer_config(entry: dict, name: str, src: Side, dst: Side) -> dict:
    class_name = entry["class_name"]
    if class_name in _REFUSED:
        raise _unsupported(name, class_name, f"cannot be converted: {_REFUSED[class_name]}", dst)
    module = str(entry.get("module") or "")
    if module.startswith("keras.src.ops"):
        raise _unsupported(name, class_name, f"is a keras.ops call ({module}) in the graph, not a layer", dst)
    if not _is_builtin(entry, src):
        raise _unsupported(name, class_name, f"is a custom layer ({module or 'no module'})", dst)
    target_cls = getattr(dst.layers, class_name, None)
    if target_cls is None or not isinstance(target_cls, type):
        raise _unsupported(name, class_name, f"has no {dst.name} counterpart", dst)
    src_cls = getattr(src.layers, class_name)
    config = dict(entry["config"])
    renames = _RENAMES_TO_TFK.get(class_name, {})
    if dst.pkg is not keras:
        renames = {v: k for k, v in renames.items()}
    for old, new in renames.items():
        if old in config:
            config[new] = config.pop(old)
    if dst.pkg is not keras and class_name != "InputLayer" and config.get("batch_input_shape"):
        config["input_shape"] = config.pop("batch_input_shape")[1:]  # tf_keras' first-layer shape; Keras 3 form
    if class_name == "BatchNormalization" and isinstance(config.get("axis"), list) and len(config["axis"]) == 1:
        config["axis"] = config["axis"][0]  # tf_keras stores [3] after building; Keras 3 wants an int
    accepted = _accepted_args(target_cls, dst)
    src_defaults = _defaults(src_cls)
    out = {}
    for key, value in config.items():
        value = _convert_value(value, key, name, class_name, src, dst)
        if key in accepted:
            out[key] = value
        elif _is_default(key, entry["config"].get(key, value), src_defaults):
            continue
        else:
            raise _unsupported(
                name, class_name, f"sets {key}={entry['config'].get(key, value)!r}, which {dst.name} does not have", dst
            )
    return out


_TFK_LAYER_KWARGS = {"input_dim", "input_shape", "batch_input_shape", "batch_size", "weights", "activity_regularizer",
                     "autocast", "trainable", "name", "dtype", "dynamic"}
_K3_LAYER_KWARGS = {"input_dim", "input_shape", "activity_regularizer", "trainable", "dtype", "autocast", "name"}


def _accepted_args(cls, side: Side) -> set[str]:
    """Keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the class hierarchy."""
    keys: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            break
        var_kw = False
        for p in params:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                var_kw = True
            elif p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
                keys.add(p.name)
        if not var_kw:
            break
    keys.discard("self")
    if issubclass(cls, side.pkg.layers.Layer):
        keys |= _TFK_LAYER_KWARGS if side.pkg is keras else _K3_LAYER_KWARGS
    if side.pkg is keras and issubclass(cls, keras.layers.RNN):
        keys |= {"zero_output_for_mask"}  # popped from **kwargs by tf_keras' RNN
    return keys


def _defaults(cls) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in params:
            if p.default is not inspect.Parameter.empty:
                out[p.name] = p.default
    return out


# Values that mean "the usual behaviour" where one side has no such argument.
_NEUTRAL = {"data_format": "channels_last"}
# Arguments that choose how a layer computes (kernels, random generators), not what: dropped when the other side lacks
# them.
_HOW_NOT_WHAT = frozenset({"implementation", "rng_type", "fused", "use_cudnn"})


def _is_default(key: str, value: Any, defaults: dict[str, Any]) -> bool:
    if key in _HOW_NOT_WHAT or value is None or value is False or value in ([], {}, ()):
        return True
    if _NEUTRAL.get(key, object()) == value:
        return True
    if key in defaults:
        default = defaults[key]
        if isinstance(default, tuple):
            default = list(default)
        if isinstance(value, dict) and isinstance(default, str) and "class_name" in value:
            # a serialized initializer against its default name: GlorotUniform(seed=None) == "glorot_uniform"
            snake = re.sub(r"(?<!^)(?=[A-Z])", "_", value["class_name"]).lower()
            return snake == default and all(v is None for v in (value.get("config") or {}).values())
        try:
            return bool(value == default)
        except Exception:  # noqa: BLE001 - incomparable values are not defaults
            return False
    return False


def _convert_value(value, key: str, name: str, class_name: str, src: Side, dst: Side):
    """Translate one layer argument: dtype policies, serialized initializers/regularizers/constraints, activations."""
    if key == "dtype":
        return _convert_dtype(value, name, class_name, dst)
    if key == "activation" or key == "recurrent_activation":
        return _convert_activation(value, name, class_name, dst)
    if isinstance(value, dict) and "class_name" in value and "config" in value:
        module = value.get("module") or ""
        kind = module.split(".")[-1] if module else ""
        if kind == "layers" or value["class_name"] in MODEL_CLASSES:
            # a wrapped layer (Bidirectional, TimeDistributed)
            inner = convert_entry(value, src, dst, {})
            return {k: inner[k] for k in ("class_name", "config", "module", "registered_name") if k in inner}
        if kind in ("initializers", "regularizers", "constraints"):
            return _convert_object(value, kind, name, class_name, key, src, dst)
        if value["class_name"] in ("DTypePolicy", "FloatDTypePolicy", "Policy"):
            return _convert_dtype(value, name, class_name, dst)
    return value


def _convert_object(value: dict, kind: str, name: str, class_name: str, key: str, src: Side, dst: Side) -> dict:
    obj_name = value["class_name"]
    target = getattr(dst.namespace(kind), obj_name, None)
    source = getattr(src.namespace(kind), obj_name, None)
    if target is None or source is None or (value.get("registered_name") not in (None, obj_name)):
        raise _unsupported(name, class_name, f"uses {key}={obj_name}, which has no {dst.name} counterpart", dst)
    accepted = _accepted_args(target, dst)
    defaults = _defaults(source)
    config = {}
    for k, v in (value.get("config") or {}).items():
        if k in accepted:
            config[k] = v
        elif not _is_default(k, v, defaults):
            raise _unsupported(name, class_name, f"uses {key}={obj_name}({k}={v!r}), which {dst.name} lacks", dst)
    return {"module": f"keras.{kind}", "class_name": obj_name, "config": config, "registered_name": None}


def _convert_dtype(value, name: str, class_name: str, dst: Side):
    if isinstance(value, dict):
        policy = value.get("class_name")
        if policy not in ("DTypePolicy", "FloatDTypePolicy", "Policy"):
            raise _unsupported(name, class_name, f"uses the dtype policy {policy} (quantized?), not a float one", dst)
        value = value["config"]["name"]
    return value


def _convert_activation(value, name: str, class_name: str, dst: Side):
    if value is None:
        return value
    if isinstance(value, dict):
        act = value.get("config") if value.get("class_name") == "function" else None
        if not isinstance(act, str):
            raise _unsupported(name, class_name, f"uses a custom activation ({value.get('class_name')})", dst)
        value = act
    if value not in _SAME_ACTIVATIONS:
        raise _unsupported(
            name, class_name, f"uses the activation {value!r}, which does not compute the same in both Keras versions",
            dst,
        )
    return value


def _convert_nodes(nodes: list, name: str, class_name: str, dst: Side, graph: _Graph) -> list:
    """Keras 3 nodes ``{"args": [...], "kwargs": {...}}`` -> Keras 2 nodes ``[[layer, node, tensor, kwargs], ...]``.

    Keras 3 reads the Keras 2 form too (its legacy path), so the Keras 2 form is produced in both directions.
    """
    out = []
    for node in nodes:
        if isinstance(node, dict):
            args, kwargs = node.get("args", []), node.get("kwargs", {})
            tensors = _keras3_tensors(args)
            if len(args) > 1 or not tensors:
                raise _unsupported(
                    name, class_name, "is called with several tensor arguments or none (like MultiHeadAttention"
                    "(query, value)); only layers called on one tensor or one list of tensors can be converted",
                    dst, hint=False,
                )
            plain_kwargs = {}
            for k, v in kwargs.items():
                refs = _keras3_tensors(v)
                if k == "mask" and refs and all(r[0] in graph.mask_ops for r in refs):
                    continue  # tf_keras propagates the mask itself
                if refs:
                    raise _unsupported(
                        name, class_name, f"is called with a tensor argument {k}=; only layers called on one tensor "
                        "or one list of tensors can be converted", dst, hint=False,
                    )
                if v is not None and k != "training":
                    plain_kwargs[k] = v  # Keras 3 records call defaults such as training=True; the outer call decides
            node = [[t[0], t[1], t[2], plain_kwargs] for t in tensors]
        out.append(_shift_node(node, graph.node_shift))
    return out


def _shift_node(node: list, shift: dict[str, int] | None) -> list:
    if not shift:
        return node
    out = []
    for ref in node:
        if isinstance(ref, list) and ref and isinstance(ref[0], str):
            ref = [ref[0], ref[1] + shift.get(ref[0], 0), *ref[2:]]
        out.append(ref)
    return out


def _keras3_tensors(obj) -> list:
    """The ``keras_history`` triples of the serialized Keras 3 tensors in ``obj``, in order."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            return [obj["config"]["keras_history"]]
        return [t for v in obj.values() for t in _keras3_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _keras3_tensors(v)]
    return []
