"""The channel graph of structured pruning: which channels must be removed together, and the model rebuilt without them.

Every convolution/dense layer creates a *channel space*; layers that keep channels in place (BatchNorm, element-wise
activations, pooling, padding, random-augmentation layers, depthwise convolutions whose channels follow their
input, ...) pass their input's space on. ``Add``/``Multiply``/... join the spaces of their inputs into one group
(a residual group, or a squeeze-excite block's expand conv with the features it scales, is pruned with one shared
mask); ``Concatenate`` lays spaces side by side (offsets); ``Flatten`` repeats the space once per spatial position,
so a ``Dense`` after it drops the matching rows of every spatial block. A group is frozen (left whole) when it
reaches the model input or output, or a layer whose channels cannot be removed safely: these are *barriers*
(``Reshape`` changing the channel axis, grouped convolutions, unknown layers, layers used twice, ...).

Gotchas:

- Activations are element-wise only when known to be: an ``Activation``/``Softmax`` layer or a TF op such as
  ``tf.nn.softmax`` that couples channels (softmax, log_softmax, any function not in
  :data:`ELEMENTWISE_ACTIVATIONS`) is a barrier; a ``Dense``/``Conv`` with such an activation keeps its output
  channels whole (its input channels may still go).
- TF ops written in a functional model (``x * w``, ``x + tf.constant(v)``) keep their constant operands in the
  model config: a scalar or size-1-per-channel constant passes; one with a value per channel is sliced with the
  channels (:meth:`ChannelGraph.rebuild`); one whose shape does not follow the channels is a barrier ("per-channel
  constant operand"). Models tf_keras cannot rebuild from their config cannot be pruned either (nor saved): a
  ``tf.Variable`` operand, or an ``EagerTensor`` first operand of ``+``/``*`` (``tf.constant(v) + x``; write
  ``x + tf.constant(v)``).
- Nested models are inlined first (:func:`kcompress.graph.flatten_model`): :attr:`ChannelGraph.model` is the flat
  model, :attr:`ChannelGraph.nesting` says what was inlined, and the rebuilt model is flat.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from kcompress.backend import keras, tf
from kcompress.errors import KcompressError
from kcompress.graph import AUGMENTATION_LAYERS, flatten_model, model_nodes
from kcompress.internals import call_spec, is_graph_network
from kcompress.modelinfo import macs_by_layer

__all__ = ["ChannelGraph", "ELEMENTWISE_ACTIVATIONS", "as_functional"]

L = keras.layers
_PASS = (L.BatchNormalization, L.Activation, L.ReLU, L.LeakyReLU, L.ELU, L.Dropout, L.SpatialDropout1D,
         L.SpatialDropout2D, L.GaussianNoise, L.GaussianDropout, L.MaxPooling1D, L.MaxPooling2D, L.AveragePooling1D,
         L.AveragePooling2D, L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalMaxPooling1D,
         L.GlobalMaxPooling2D, L.ZeroPadding1D, L.ZeroPadding2D, L.Cropping1D, L.Cropping2D, L.UpSampling1D,
         L.UpSampling2D, L.ActivityRegularization)
_MERGE = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum)
_ELEMENTWISE_OPS = {"__operators__.add", "__operators__.sub", "__operators__.mul", "__operators__.truediv",
                    "math.add", "math.subtract", "math.multiply", "math.truediv", "math.divide", "math.maximum",
                    "math.minimum", "nn.relu", "nn.relu6", "math.sigmoid", "nn.silu", "nn.swish", "math.tanh",
                    "nn.gelu", "math.negative", "compat.v1.nn.relu6", "nn.elu", "nn.selu", "nn.leaky_relu",
                    "math.softplus", "nn.softplus", "math.exp", "math.abs", "math.square", "math.sqrt", "math.erf",
                    "clip_by_value"}
#: Activation function names (``fn.__name__``) that act on each value alone; any other activation is a barrier.
ELEMENTWISE_ACTIVATIONS = frozenset({
    "linear", "relu", "relu6", "sigmoid", "hard_sigmoid", "swish", "silu", "gelu", "tanh", "elu", "selu", "softplus",
    "softsign", "exponential", "mish", "leaky_relu", "hard_swish", "hard_silu"})


def as_functional(model):
    """``model`` as a functional graph (a Sequential is wrapped; the layers are the same objects); a subclassed
    model cannot be traced channel by channel and is refused."""
    if isinstance(model, keras.Sequential):
        if not model.built:
            raise KcompressError("the Sequential model is not built (it has no input shape)")
        return keras.Model(model.inputs, model.outputs, name=model.name)
    if not is_graph_network(model):
        raise KcompressError("structured pruning needs a functional or Sequential model, not a subclassed one")
    return model


def _activation_barrier(fn) -> Optional[str]:
    """None when the activation ``fn`` is element-wise, else why its output channels cannot be removed."""
    name = getattr(fn, "__name__", None) or type(fn).__name__
    if name in ELEMENTWISE_ACTIVATIONS:
        return None
    if "softmax" in name:
        return f"activation {name} couples channels"
    return f"activation {name!r} is not known to be element-wise"


def _is_keras_tensor(v) -> bool:
    try:
        return bool(keras.backend.is_keras_tensor(v))
    except ValueError:  # not a tensor of any kind
        return False


_FIRST = "_CONSTANT_VALUE"  # how tf_keras serializes a constant first operand: [_FIRST, -1, value, {arguments}]


def _constants(layer, node, channels: int) -> tuple[list[str], Optional[str]]:
    """The constant operands of a TF-op layer's call to slice with the channels (their names in the serialized call,
    :data:`_FIRST` for the first operand), or why the op is a barrier. Scalars and constants of size 1 along the
    channel axis need nothing."""
    args, kwargs = node.call_args, node.call_kwargs
    spec = call_spec(layer)
    first, args, kwargs = spec.split_out_first_arg(args, kwargs)  # as tf_keras serializes the node
    named = dict(zip(spec.arg_names[1:], args))
    named.update(kwargs)
    operands = [(_FIRST, first)] + list(named.items())
    sliced = []
    for name, v in operands:
        if _is_keras_tensor(v) or v is None or isinstance(v, (str, bool)):
            continue
        try:
            a = np.asarray(v)
        except (TypeError, ValueError):
            return [], f"unknown operand {name!r}"
        if a.dtype.kind not in "biuf" or a.ndim == 0 or a.shape[-1] == 1:
            continue
        if a.shape[-1] != channels:
            return [], f"per-channel constant operand of shape {a.shape}"
        sliced.append(name)
    return sliced, None


class ChannelGraph:
    """Channel groups of a functional model; ``keep[root]`` is the boolean mask of a group's kept channels."""

    def __init__(self, model):
        self.model, self.nesting = flatten_model(as_functional(model), with_nesting=True)
        self.size: list[int] = []
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}
        self.sources: dict[int, list[str]] = {}  # atom -> layers whose output channels it is
        self.records: dict[str, dict] = {}  # layer name -> {"kind", "in", "out"}
        self._analyse()
        self.keep = {r: np.ones(self.size[r], bool) for r in self.groups()}

    # union-find over channel atoms
    def _atom(self, n: int, frozen: Optional[str] = None) -> int:
        self.size.append(int(n))
        self.parent.append(len(self.parent))
        if frozen:
            self.frozen[len(self.size) - 1] = frozen
        return len(self.size) - 1

    def root(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self.parent[rb] = ra

    def _freeze(self, layout, reason: str) -> None:
        for a in layout[0]:
            self.frozen.setdefault(a, reason)

    def _analyse(self) -> None:
        model = self.model
        layouts: dict = {}

        def key(kt):  # Keras's own tensor identity (Node.flat_input_ids are str(id(tensor)))
            return id(kt)

        def channels(kt) -> int:
            return int(kt.shape[-1]) if kt.shape.rank and kt.shape[-1] is not None else -1

        own = model_nodes(model)
        for layer in model.layers:
            nodes = [n for n in layer.inbound_nodes if id(n) in own]
            for node in nodes:
                ins = [kt for kt in tf.nest.flatten(node.keras_inputs)]
                in_l = [layouts[key(kt)] for kt in ins if key(kt) in layouts]
                outs = tf.nest.flatten(node.outputs)
                out = self._layer_layout(layer, node, ins, in_l, outs, len(nodes), channels)
                for j, kt in enumerate(outs):
                    layouts[key(kt)] = out if j == 0 else ((self._atom(channels(kt), "multi-output"),), 1)
        for kt in model.outputs:
            self._freeze(layouts[key(kt)], "reaches the model output")
        self.frozen = {self.root(a): r for a, r in self.frozen.items()}

    def _layer_layout(self, layer, node, ins, in_l, outs, n_nodes, channels):
        name = layer.name
        out_c = channels(outs[0])

        def barrier(reason):
            for lay in in_l:
                self._freeze(lay, f"feeds {name} ({reason})")
            self.records[name] = {"kind": "fixed"}
            return ((self._atom(max(out_c, 1), f"comes from {name} ({reason})"),), 1)

        if isinstance(layer, L.InputLayer):
            return ((self._atom(max(out_c, 1), "the model input"),), 1)
        if n_nodes > 1:
            return barrier("layer used more than once")
        if len(in_l) != len(ins) or not in_l:
            return barrier("inputs not traced")
        cls = type(layer)
        first = in_l[0]
        if cls in (L.Conv1D, L.Conv2D, L.Conv3D, L.Dense, L.SeparableConv1D, L.SeparableConv2D):
            if getattr(layer, "groups", 1) != 1 or getattr(layer, "data_format", "channels_last") != "channels_last":
                return barrier("grouped or channels-first convolution")
            if len(in_l) != 1:
                return barrier("several inputs")
            coupled = _activation_barrier(layer.activation)
            out = self._atom(out_c, f"{coupled} (in {name})" if coupled else None)
            self.sources.setdefault(out, []).append(name)
            kind = "sep" if cls in (L.SeparableConv1D, L.SeparableConv2D) else "conv"
            self.records[name] = {"kind": kind, "in": first, "out": out}
            return ((out,), 1)
        if cls is L.DepthwiseConv2D:
            if layer.depth_multiplier != 1:
                return barrier("depth multiplier > 1")
            if _activation_barrier(layer.activation):
                return barrier(_activation_barrier(layer.activation))
            self.records[name] = {"kind": "dw", "in": first}
            return first
        if cls is L.Softmax:
            return barrier("softmax couples channels")
        if cls is L.Activation and _activation_barrier(layer.activation):
            return barrier(_activation_barrier(layer.activation))
        if isinstance(layer, _PASS) and cls.__module__.startswith("tf_keras"):
            if isinstance(layer, L.BatchNormalization):
                axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
                if list(axis) not in ([-1], [len(ins[0].shape) - 1]):
                    return barrier("normalizes a non-channel axis")
                self.records[name] = {"kind": "bn", "in": first}
            else:
                self.records[name] = {"kind": "pass", "in": first}
            return first
        if cls in AUGMENTATION_LAYERS or (cls is L.Rescaling and np.ndim(layer.scale) == 0
                                          and np.ndim(layer.offset) == 0):
            self.records[name] = {"kind": "pass", "in": first}  # identity at inference / one scale for all
            return first
        if cls is L.Reshape and len(in_l) == 1 and channels(ins[0]) == out_c and first[1] == 1:
            self.records[name] = {"kind": "reshape", "in": first}
            return first
        if cls is L.Flatten:
            spatial = int(np.prod([d for d in ins[0].shape[1:-1]])) if len(ins[0].shape) > 2 else 1
            if first[1] != 1 and spatial != 1:
                return barrier("flatten of a flattened tensor")
            self.records[name] = {"kind": "pass", "in": first}
            return (first[0], first[1] * spatial)
        if cls is L.Concatenate:
            if layer.axis not in (-1, len(outs[0].shape) - 1) or any(lay[1] != 1 for lay in in_l):
                return barrier("concatenates along a non-channel axis")
            self.records[name] = {"kind": "pass", "in": first}
            return (tuple(a for lay in in_l for a in lay[0]), 1)
        op = getattr(layer, "symbol", "") if cls.__name__ in ("TFOpLambda", "SlicingOpLambda") else None
        if op is not None and "softmax" in op:
            return barrier(f"{op} couples channels")
        if isinstance(layer, _MERGE) or op in _ELEMENTWISE_OPS:
            full = [lay for lay, kt in zip(in_l, ins) if channels(kt) == out_c]
            if any(channels(kt) not in (out_c, 1) for kt in ins) or not full:
                return barrier("broadcasts channels")
            shapes = {tuple(self.size[a] for a in lay[0]) + (lay[1],) for lay in full}
            if len(shapes) != 1:
                return barrier("joins tensors with different channel layouts")
            consts, why = _constants(layer, node, out_c) if op is not None else ([], None)
            if why:
                return barrier(why)
            for lay in full[1:]:
                for a, b in zip(full[0][0], lay[0]):
                    self._union(a, b)
            self.records[name] = {"kind": "const" if consts else "pass", "in": full[0], "consts": consts}
            return full[0]
        return barrier(f"{cls.__name__} is not supported for channel removal")

    # ----- queries
    def groups(self) -> list[int]:
        """Roots of prunable groups: not frozen, produced by at least one convolution/dense layer."""
        roots = {self.root(a) for a in self.sources}
        return sorted(r for r in roots if r not in self.frozen)

    def members(self, root: int) -> list[str]:
        return [n for a, names in self.sources.items() if self.root(a) == root for n in names]

    def frozen_layers(self) -> dict[str, str]:
        out = {}
        for a, names in self.sources.items():
            r = self.root(a)
            if r in self.frozen:
                for n in names:
                    out[n] = self.frozen[r]
        return out

    def frozen_groups(self) -> list[dict]:
        """Frozen groups made by convolution/dense layers, the most MACs first: ``{"layers", "channels", "reason",
        "macs"}``, where ``macs`` are those of the layers that make or take the group's channels (what freezing it
        keeps out of reach)."""
        macs: dict[int, int] = {}
        for layer, m in self._layer_macs():
            rec = self.records.get(layer.name, {})
            if rec.get("kind") not in ("conv", "sep", "dw"):
                continue
            roots = {self.root(a) for a in rec["in"][0]} | ({self.root(rec["out"])} if "out" in rec else set())
            for r in roots:
                macs[r] = macs.get(r, 0) + m
        roots = {self.root(a) for a in self.sources} & set(self.frozen)
        out = [{"layers": self.members(r), "channels": self.size[r], "reason": self.frozen[r],
                "macs": int(macs.get(r, 0))} for r in roots]
        return sorted(out, key=lambda g: -g["macs"])

    def _kept(self, layout) -> np.ndarray:
        parts, off = [], 0
        for a in layout[0]:
            r = self.root(a)
            mask = self.keep.get(r, np.ones(self.size[a], bool))
            parts.append(np.flatnonzero(mask) + off)
            off += self.size[a]
        base = np.concatenate(parts) if parts else np.arange(0)
        return np.concatenate([base + p * off for p in range(layout[1])])

    def _count(self, layout) -> tuple[int, int]:
        kept = sum(int(self.keep.get(self.root(a), np.ones(self.size[a], bool)).sum()) for a in layout[0])
        return kept * layout[1], sum(self.size[a] for a in layout[0]) * layout[1]

    def _layer_macs(self) -> list[tuple[object, int]]:
        """(layer, MACs of its calls in the flat model), traced at the model's input size (not at the shapes a
        reused layer recorded inside a nested model, which may be open)."""
        if not hasattr(self, "_macs"):
            per: dict[str, int] = {}
            for path, _, m in macs_by_layer(self.model):
                per[path] = per.get(path, 0) + m
            self._macs = [(layer, per.get(layer.name, 0)) for layer in self.model.layers]
        return self._macs

    def estimate_macs(self) -> int:
        """MACs of the pruned model from the current masks (exact for the layers this module changes)."""
        if not hasattr(self, "_terms"):
            self._terms = []  # (macs, kind, in layout, out atom, depthwise share of a separable conv's macs)
            for layer, macs in self._layer_macs():
                rec = self.records.get(layer.name, {"kind": "fixed"})
                dw = 0.0
                if rec["kind"] == "sep":
                    k = int(np.prod(layer.kernel_size))
                    dw = k / (k + layer.filters)
                self._terms.append((macs, rec["kind"], rec.get("in"), rec.get("out"), dw))
        total = 0.0
        for macs, kind, lay, out, dw in self._terms:
            if kind in ("conv", "sep", "dw"):
                ki, ni = self._count(lay)
                fin = ki / ni
                if kind == "dw":
                    macs *= fin
                else:
                    ko, no = self._count(((out,), 1))
                    macs = macs * dw * fin + macs * (1 - dw) * fin * ko / no
            total += macs
        return int(round(total))

    # ----- rebuild
    def rebuild(self):
        """A fresh functional model with the kept channels and their weights (and per-channel constants)."""
        config = self.model.get_config()
        for lc in config["layers"]:
            lc.pop("build_config", None)  # the old input shapes; layers rebuild from their new inputs
            rec = self.records.get(lc["config"]["name"])
            if rec is None:
                continue
            if rec["kind"] in ("conv", "sep"):
                kept = self._count(((rec["out"],), 1))[0]
                lc["config"]["units" if lc["class_name"] == "Dense" else "filters"] = kept
            elif rec["kind"] == "reshape":
                lc["config"]["target_shape"] = [*lc["config"]["target_shape"][:-1], self._count(rec["in"])[0]]
            elif rec["kind"] == "const":
                self._slice_constants(lc, rec)
        custom = {type(layer).__name__: type(layer) for layer in self.model.layers}
        with keras.utils.custom_object_scope(custom):
            new = keras.Model.from_config(config)
        for layer in self.model.layers:
            weights = layer.get_weights()
            if weights:
                new.get_layer(layer.name).set_weights(self._slice(layer, weights))
        return new

    def _slice_constants(self, lc: dict, rec: dict) -> None:
        """Keeps the kept channels' entries of a TF op's per-channel constants in its serialized call."""
        kept = self._kept(rec["in"])
        todo = [lc["inbound_nodes"]]
        while todo:  # [layer, node, tensor, {call arguments}] entries, at whatever depth tf_keras nests them
            obj = todo.pop()
            if len(obj) > 3 and isinstance(obj[0], str) and isinstance(obj[3], dict):
                for name in rec["consts"]:
                    if name == _FIRST and obj[0] == _FIRST:
                        obj[2] = np.asarray(obj[2])[..., kept].tolist()
                    elif name in obj[3]:
                        obj[3][name] = np.asarray(obj[3][name])[..., kept].tolist()
            else:
                todo.extend(o for o in obj if isinstance(o, list))

    def _slice(self, layer, w: list) -> list:
        rec = self.records.get(layer.name, {"kind": "fixed"})
        kind = rec["kind"]
        if kind in ("fixed", "const") or kind == "pass" and not isinstance(layer, L.BatchNormalization):
            return w
        i = self._kept(rec["in"])
        if kind in ("bn", "pass"):
            return [v[i] for v in w]
        if kind == "dw":
            return [w[0][..., i, :]] + [v[i] for v in w[1:]]
        o = self._kept(((rec["out"],), 1))
        if kind == "conv":
            k = w[0][i] if isinstance(layer, L.Dense) else w[0][..., i, :]
            return [k[..., o]] + [v[o] for v in w[1:]]
        dm = layer.depth_multiplier  # separable
        pw_in = (i[:, None] * dm + np.arange(dm)[None, :]).ravel()
        return [w[0][..., i, :], w[1][..., pw_in, :][..., o]] + [v[o] for v in w[2:]]
