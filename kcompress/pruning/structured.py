"""Structured pruning: whole filters/channels removed, the result rebuilt as a smaller dense tf_keras model.

How channels are tracked: every convolution/dense layer creates a *channel space*; layers that keep channels in
place (BatchNorm, activations, pooling, padding, depthwise convolutions whose channels follow their input, ...) pass
their input's space on. ``Add``/``Multiply``/... join the spaces of their inputs into one group (a residual group
is pruned with one shared mask); ``Concatenate`` lays spaces side by side (offsets); ``Flatten`` repeats the space
once per spatial position, so a ``Dense`` after it drops the matching rows of every spatial block. A group is
frozen (left whole) when it reaches the model input or output, or a layer whose channels cannot be removed safely
(``Reshape`` changing the channel axis, grouped convolutions, ``Softmax``, unknown layers, ...): these are listed
in :attr:`StructuredResult.frozen`.

The output is built fresh from the input model's config with smaller ``filters``/``units`` and the kept weights
copied, so it saves, loads and converts like any model. The input model is never modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from kcompress.backend import keras, tf
from kcompress.data import DataSource
from kcompress.errors import KcompressError, UsageError
from kcompress.modelinfo import count_macs, count_params, layer_macs
from kcompress.options import PruneOptions, TrainOptions

__all__ = ["StructuredResult", "ChannelGraph", "prune_structured", "prune_once"]

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
                    "nn.gelu", "math.negative", "compat.v1.nn.relu6"}


MIN_KEEP = 0.1  # never keep fewer than this fraction of a group's channels (and at least 1)
TAYLOR_BATCHES = 8  # training batches scored for the taylor criterion


@dataclass(frozen=True)
class _Plan:
    """The structured settings of a :class:`PruneOptions`, resolved (``ratio`` replaces ``target_flops``)."""

    target_flops: Optional[float]
    ratio: Optional[float]
    criterion: str
    rounds: int
    epochs: int
    batch_size: int
    lr: float
    seed: int
    multiple: int
    min_keep: float = MIN_KEEP
    taylor_batches: int = TAYLOR_BATCHES

    @classmethod
    def of(cls, o: PruneOptions, seed: int = 0, optimizer=None) -> "_Plan":
        return cls(None if o.ratio is not None else o.target_flops, o.ratio, o.criterion, o.num_rounds(), o.epochs,
                   o.batch_size, o.rate(optimizer), seed, o.channel_multiple)

    def num_rounds(self) -> int:
        return self.rounds


def _functional(model):
    if isinstance(model, keras.Sequential):
        if not model.built:
            raise KcompressError("the Sequential model is not built (it has no input shape)")
        return keras.Model(model.inputs, model.outputs, name=model.name)
    if not getattr(model, "_is_graph_network", False):
        raise KcompressError("structured pruning needs a functional or Sequential model, not a subclassed one")
    return model


class ChannelGraph:
    """Channel groups of a functional model; ``keep[root]`` is the boolean mask of a group's kept channels."""

    def __init__(self, model):
        self.model = _functional(model)
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

        def key(kt):
            h = kt._keras_history
            return (h.layer.name, h.node_index, h.tensor_index)

        def channels(kt) -> int:
            return int(kt.shape[-1]) if kt.shape.rank and kt.shape[-1] is not None else -1

        for layer in model.layers:
            nodes = [(i, n) for i, n in enumerate(layer._inbound_nodes)
                     if f"{layer.name}_ib-{i}" in model._network_nodes]
            for i, node in nodes:
                ins = [kt for kt in tf.nest.flatten(node.keras_inputs)]
                in_l = [layouts[key(kt)] for kt in ins if key(kt) in layouts]
                outs = tf.nest.flatten(node.outputs)
                out = self._layer_layout(layer, ins, in_l, outs, len(nodes), channels)
                for j, kt in enumerate(outs):
                    layouts[(layer.name, i, j)] = out if j == 0 else ((self._atom(channels(kt), "multi-output"),), 1)
        for kt in model.outputs:
            self._freeze(layouts[key(kt)], "reaches the model output")
        self.frozen = {self.root(a): r for a, r in self.frozen.items()}

    def _layer_layout(self, layer, ins, in_l, outs, n_nodes, channels):
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
            out = self._atom(out_c)
            self.sources.setdefault(out, []).append(name)
            kind = "sep" if cls in (L.SeparableConv1D, L.SeparableConv2D) else "conv"
            self.records[name] = {"kind": kind, "in": first, "out": out}
            return ((out,), 1)
        if cls is L.DepthwiseConv2D:
            if layer.depth_multiplier != 1:
                return barrier("depth multiplier > 1")
            self.records[name] = {"kind": "dw", "in": first}
            return first
        if isinstance(layer, _PASS) and cls.__module__.startswith("tf_keras"):
            if isinstance(layer, L.BatchNormalization):
                axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
                if list(axis) not in ([-1], [len(ins[0].shape) - 1]):
                    return barrier("normalizes a non-channel axis")
                self.records[name] = {"kind": "bn", "in": first}
            else:
                self.records[name] = {"kind": "pass", "in": first}
            return first
        if cls is L.Rescaling and np.ndim(layer.scale) == 0 and np.ndim(layer.offset) == 0:
            self.records[name] = {"kind": "pass", "in": first}
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
        elementwise = isinstance(layer, _MERGE) or (
            cls.__name__ in ("TFOpLambda", "SlicingOpLambda") and getattr(layer, "symbol", "") in _ELEMENTWISE_OPS
        )
        if elementwise:
            full = [lay for lay, kt in zip(in_l, ins) if channels(kt) == out_c]
            if any(channels(kt) not in (out_c, 1) for kt in ins) or not full:
                return barrier("broadcasts channels")
            shapes = {tuple(self.size[a] for a in lay[0]) + (lay[1],) for lay in full}
            if len(shapes) != 1:
                return barrier("joins tensors with different channel layouts")
            for lay in full[1:]:
                for a, b in zip(full[0][0], lay[0]):
                    self._union(a, b)
            self.records[name] = {"kind": "pass", "in": full[0]}
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

    def estimate_macs(self) -> int:
        """MACs of the pruned model from the current masks (exact for the layers this module changes)."""
        if not hasattr(self, "_terms"):
            self._terms = []  # (macs, kind, in layout, out atom, depthwise share of a separable conv's macs)
            for layer in self.model.layers:
                rec = self.records.get(layer.name, {"kind": "fixed"})
                dw = 0.0
                if rec["kind"] == "sep":
                    k = int(np.prod(layer.kernel_size))
                    dw = k / (k + layer.filters)
                self._terms.append((layer_macs(layer), rec["kind"], rec.get("in"), rec.get("out"), dw))
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
        """A fresh functional model with the kept channels and their weights."""
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
        custom = {type(layer).__name__: type(layer) for layer in self.model.layers}
        with keras.utils.custom_object_scope(custom):
            new = keras.Model.from_config(config)
        for layer in self.model.layers:
            weights = layer.get_weights()
            if weights:
                new.get_layer(layer.name).set_weights(self._slice(layer, weights))
        return new

    def _slice(self, layer, w: list) -> list:
        rec = self.records.get(layer.name, {"kind": "fixed"})
        kind = rec["kind"]
        if kind == "fixed" or kind == "pass" and not isinstance(layer, L.BatchNormalization):
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


def _importance(graph: ChannelGraph, criterion: str, data: Optional[DataSource], options) -> dict[int, np.ndarray]:
    model = graph.model
    grads = {}
    if criterion == "taylor":
        if data is None:
            raise UsageError("--criterion taylor needs training data")
        from kcompress.modelinfo import input_shape

        kernels = {n: _out_kernel(model.get_layer(n)) for r in graph.groups() for n in graph.members(r)}
        acc = {n: np.zeros(v.shape, np.float64) for n, v in kernels.items()}
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=not _ends_in_softmax(model))
        ds = data.dataset(input_shape(model), batch_size=options.batch_size, shuffle=True, seed=options.seed)
        for x, y in ds.take(options.taylor_batches):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=False))
            gs = tape.gradient(loss, list(kernels.values()))
            for (n, v), g in zip(kernels.items(), gs):
                acc[n] += np.abs(v.numpy() * g.numpy())
        grads = acc
    out = {}
    for r in graph.groups():
        score = np.zeros(graph.size[r])
        for n in graph.members(r):
            layer = model.get_layer(n)
            k = _out_kernel(layer).numpy()
            k = k.reshape(-1, k.shape[-1])
            if criterion == "l2":
                score += np.sqrt((k**2).sum(0))
            elif criterion == "taylor":
                score += grads[n].reshape(-1, k.shape[-1]).sum(0)
            else:
                score += np.abs(k).sum(0)
        if criterion == "bn":
            gammas = [np.abs(model.get_layer(n).gamma.numpy()) for n, rec in graph.records.items()
                      if rec["kind"] == "bn" and len(rec["in"][0]) == 1 and rec["in"][1] == 1
                      and graph.root(rec["in"][0][0]) == r and model.get_layer(n).scale]
            if gammas:
                score = np.sum(gammas, axis=0)
        out[r] = score / (score.mean() + 1e-12)
    return out


def _out_kernel(layer):
    """The kernel whose last axis is the layer's output channels (pointwise kernel of a separable conv)."""
    return layer.pointwise_kernel if isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)) else layer.kernel


def _ends_in_softmax(model) -> bool:
    from kcompress.evaluation import PROBABILITIES, output_kind

    return output_kind(model) == PROBABILITIES


def prune_once(model, options, target_macs: Optional[int] = None, ratio: Optional[float] = None,
               data: Optional[DataSource] = None):
    """One pruning step without fine-tuning: returns ``(new_model, graph)``.

    With ``ratio``, every group loses that fraction of its channels; with ``target_macs``, channels go in order of
    group-normalised importance until the estimated MACs are at or below the target.
    """
    if isinstance(options, PruneOptions):
        options = _Plan.of(options)
    graph = ChannelGraph(model)
    imp = _importance(graph, options.criterion, data, options)
    floor = {r: max(1, math.ceil(options.min_keep * graph.size[r])) for r in imp}
    m = options.multiple

    def rounded(r: int, kept: int) -> int:  # up to a multiple of m, never above the group's size
        return min(graph.size[r], max(floor[r], -(-kept // m) * m))

    if ratio is not None:
        for r, s in imp.items():
            n = graph.size[r] - rounded(r, graph.size[r] - int(math.floor(ratio * graph.size[r] + 1e-9)))
            graph.keep[r][np.argsort(s, kind="stable")[:n]] = False
    elif target_macs is not None:
        order = sorted(((s, r, c) for r, sc in imp.items() for c, s in enumerate(sc)), key=lambda t: t[0])

        def drop(prefix: int) -> int:  # removes the first ``prefix`` channels of the order (floors respected)
            for r in graph.keep:
                graph.keep[r][:] = True
            left = {r: graph.size[r] for r in graph.keep}
            for _, r, c in order[:prefix]:
                if left[r] > floor[r]:
                    left[r] -= 1
            for r, n in left.items():  # drop each group's n - rounded(n) least important channels
                cut = graph.size[r] - rounded(r, n)
                graph.keep[r][np.argsort(imp[r], kind="stable")[:cut]] = False
            return graph.estimate_macs()

        lo, hi = 0, len(order)  # the smallest prefix that reaches the target (MACs fall as the prefix grows)
        while lo < hi:
            mid = (lo + hi) // 2
            if drop(mid) <= target_macs:
                hi = mid
            else:
                lo = mid + 1
        current = drop(lo)
        if m == 1:  # fill the overshoot: give back the most important removed channels that still fit the target
            removed = [(r, c) for _, r, c in reversed(order[:lo]) if not graph.keep[r][c]]
            for r, c in removed[:500]:
                if current >= target_macs * 0.995:
                    break
                graph.keep[r][c] = True
                trial = graph.estimate_macs()
                if trial <= target_macs:
                    current = trial
                else:
                    graph.keep[r][c] = False
    return graph.rebuild(), graph


@dataclass
class StructuredResult:
    model: object
    groups: list[dict]  # {"layers": [...], "channels": n, "kept": k} for every group that lost channels
    frozen: dict[str, str]  # conv/dense layer -> why its channels were left alone
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    accuracy_before: Optional[float]
    accuracy_after: Optional[float]
    rounds: list[dict] = field(default_factory=list)
    staged: dict = field(default_factory=dict)  # removed_blocks, notes, latency (kcompress.pruning.blocks)

    @property
    def flops_reduction(self) -> float:
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0


def prune_structured(model, train: Optional[DataSource] = None, val: Optional[DataSource] = None,
                     options: Optional[PruneOptions] = None, seed: int = 0,
                     verbose: Optional[int] = None, train_options: Optional[TrainOptions] = None,
                     log: Optional[Callable[[str], None]] = None) -> StructuredResult:
    """Removes channels in ``options.num_rounds()`` rounds, fine-tuning on ``train`` between rounds (half LR) and
    after the last (full LR), each with the ``train_options`` recipe, keeping its best epoch by VAL accuracy;
    ``epochs=0`` skips training. Whole blocks and latency targets: :mod:`kcompress.pruning.blocks`."""
    from kcompress.evaluation import evaluate
    from kcompress.pruning.blocks import Staged
    from kcompress.train import fit

    staged = Staged.of(options or PruneOptions(), seed, train, val, log)  # None: channels only, by MACs or ratio
    options = _Plan.of(options or PruneOptions(), seed, train_options.optimizer if train_options else None)
    model = _functional(model)
    macs0 = count_macs(model)
    k = options.num_rounds()
    before = evaluate(model, val, description="accuracy before").accuracy if val is not None else None
    current, rounds = model, []
    # epochs split over the rounds, the remainder going to the last rounds (the final model needs them most)
    per_round = [options.epochs // k + (1 if i >= k - options.epochs % k else 0) for i in range(k)]
    if log is not None and train is not None:
        log(f"{k} round(s) of pruning; the {options.epochs} fine-tuning epoch(s) are spent as {per_round} "
            "(earlier rounds at half the learning rate); each round keeps its best epoch by VAL accuracy")
    for i in range(1, k + 1):
        if staged is not None:
            current = staged.step(current, i, k, macs0)
        elif options.ratio is not None:
            # ratio/k of the original channels per round, as a fraction of what is left
            step = (options.ratio / k) / (1 - options.ratio * (i - 1) / k)
            current, graph = prune_once(current, options, ratio=step, data=train)
        else:
            target = int(macs0 * (1 - options.target_flops * i / k))
            current, graph = prune_once(current, options, target_macs=target, data=train)
        info = {"round": i, "macs": count_macs(current), "params": count_params(current)["total"]}
        if train is not None and per_round[i - 1] > 0:
            lr = options.lr if i == k else options.lr / 2
            hist = fit(current, train, val, epochs=per_round[i - 1], batch_size=options.batch_size, lr=lr,
                       seed=options.seed + i, verbose=verbose, train_options=train_options, log=log)
            info["val_accuracy"] = max(hist.history.get("val_accuracy", [float("nan")]))
        rounds.append(info)
        if log is not None:
            acc = f", VAL accuracy {100 * info['val_accuracy']:.2f}%" if "val_accuracy" in info else ""
            log(f"round {i}/{k}: {info['macs'] / macs0:.0%} of the MACs left{acc}")
    final = ChannelGraph(model)  # report per group by comparing layer widths
    groups = []
    present = {layer.name for layer in current.layers}  # the layers of removed blocks are gone
    for r in final.groups():
        names = [n for n in final.members(r) if n in present]
        new_n = _width(current.get_layer(names[0])) if names else final.size[r]
        if new_n != final.size[r]:
            groups.append({"layers": names, "channels": final.size[r], "kept": new_n})
    after = evaluate(current, val, description="accuracy after").accuracy if val is not None else None
    return StructuredResult(
        model=current, groups=groups, frozen=final.frozen_layers(),
        params_before=count_params(model)["total"], params_after=count_params(current)["total"],
        macs_before=macs0, macs_after=count_macs(current), accuracy_before=before, accuracy_after=after,
        rounds=rounds, staged=staged.report() if staged else {},
    )


def _width(layer) -> int:
    return int(layer.units if isinstance(layer, L.Dense) else layer.filters)
