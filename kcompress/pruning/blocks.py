"""Block (layer) pruning and latency targets for structured pruning (``granularity``, ``target_latency_ms``).

A *removable block* is a residual branch ``x -> ... -> Add([x, branch(x)])`` whose shortcut is the identity: the
branch's only input from outside it is ``x`` itself, none of its layers feeds anything but the branch and the
``Add``, and ``x``, the branch's output and the ``Add``'s output have one shape. Bypassing it (the ``Add``'s output
becomes ``x``) keeps the graph valid, and equals the original model with the branch's output forced to zero.
Blocks with a projection on the shortcut (a 1x1 conv where the stride or width changes) are not removable. Only
``keras.layers.Add`` with two inputs in the top-level functional graph is looked at: blocks inside a nested model
and ``x + y`` written as a TF op are not found.

A block's importance is measured, not guessed: the cross-entropy (and accuracy) on a stratified seeded sample of
VAL (:data:`IMPORTANCE_SAMPLES`; TRAIN when there is no VAL) with the block bypassed, minus the intact model's.
Blocks go in order of that loss increase per MAC saved (a block whose removal lowers the loss goes first).

How a step's MACs target is met (:meth:`Staged.reduce`): ``block`` removes the blocks in that order until the MACs
are at or under the target (it overshoots by less than one block, or stops short when no block is left);
``both`` removes blocks for ``block_share`` of the step's MACs reduction, never going below the full
target, then channel-prunes (:func:`~kcompress.pruning.structured.prune_once`) the rest. Importance is measured
again at each round, on the model as the previous round's fine-tuning left it.

Latency targets: each round has a latency goal (geometric steps from the input's latency to the target; the last
round's goal is the target). The fp32 ``.tflite`` (:func:`kcompress.quantization.ptq.convert`) is timed with the
LiteRT interpreter on this host (1 thread, batch 1, median of the trials' p50s); a MACs target is guessed from it,
the round-start model pruned to it, converted and timed, up to :data:`LATENCY_TRIES` times per round: the first
guess scales the MACs by goal/measured, later ones follow the secant through the last two (MACs, latency) points
(removing at most half of what is left per attempt) until a candidate meets the goal, then bisect between the most
pruned candidate that is too slow and the least pruned that is fast enough. The least pruned candidate that meets
the goal is kept (within :data:`LATENCY_SLACK` of it ends the search). When the last round ends above the target,
the result says so and which latency it reached. Latency is not proportional to MACs: the interpreter's per-op
overhead is a large share of a small model's time (a few MMACs: the whole of it), and pruned channel counts that
are not multiples of the SIMD width run below the kernels' best speed, so MACs removed inside every layer buy less
time than their share suggests, while removing a block deletes its ops outright. Measured on ResNet-20 (width 16,
32x32, fp32, 1 thread, 2-core AMD EPYC; ``tools/bench_blocks.py``): ``channel`` at 50% fewer MACs kept 80% of the
latency, ``block`` at 58% fewer kept 41%; to reach 0.6x the latency ``channel`` removed 70% of the MACs, ``both``
63% and ``block`` 46%. Use ``block`` or ``both`` when latency is the goal. ``block_share`` 0.75 (the default) was
chosen on VAL over 0.5 (:class:`~kcompress.options.PruneOptions`); with it ``both`` at 50% of the FLOPs and 6
fine-tuning epochs made the fp32 and int8 ``.tflite`` 1.95-2.1x and 1.8-1.9x faster than the teacher's, channels alone
1.3x and 1.15-1.2x (2-core Intel Xeon, 1 thread; CHANGELOG).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from kcompress.backend import keras
from kcompress.data import DataSource
from kcompress.errors import UsageError
from kcompress.modelinfo import count_macs, input_shape, macs_by_layer
from kcompress.options import PruneOptions
from kcompress.pruning.channels import as_functional
from kcompress.pruning.structured import StructuredPlan, prune_once
from kcompress.types import Granularity

__all__ = ["Block", "find_blocks", "remove_blocks", "block_importance", "fp32_latency_ms", "Staged"]

IMPORTANCE_SAMPLES = 512  # stratified, seeded VAL samples scored with each block bypassed
LATENCY_TRIES = 6  # prune-and-time attempts per round with a latency target
LATENCY_RUNS, LATENCY_TRIALS = 30, 3  # timed runs per trial, trials per measurement
LATENCY_SLACK = 0.05  # a candidate this close under the goal ends the search
MIN_STEP, MAX_CUT = 0.03, 0.5  # an extrapolated attempt removes 3% to 50% of the MACs the last one left


@dataclass(frozen=True)
class Block:
    """A removable residual block: ``name`` is its ``Add`` layer, ``layers`` the branch in model order."""

    name: str
    layers: tuple[str, ...]
    shortcut: tuple[str, int, int]  # (layer, node, tensor) of the tensor that is both the input and the shortcut
    macs: int  # of one sample, in the branch: what removing the block saves

    @property
    def first(self) -> str:
        return self.layers[0]


def _is_ref(obj) -> bool:
    return (isinstance(obj, (list, tuple)) and len(obj) >= 3 and isinstance(obj[0], str)
            and isinstance(obj[1], int) and isinstance(obj[2], int))


def _refs(obj):
    """Every ``(layer, node, tensor)`` reference in a config's inbound nodes (keyword tensors of TF ops too)."""
    if _is_ref(obj):
        yield (obj[0], obj[1], obj[2])
        obj = obj[3:]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _refs(o)


def find_blocks(model) -> list[Block]:
    """The removable blocks of a functional (or Sequential) model, in model order (module docstring)."""
    model = as_functional(model)
    config = model.get_config()
    layers = {lc["name"]: lc for lc in config["layers"]}
    consumers: dict[str, set] = {n: set() for n in layers}
    for lc in config["layers"]:
        for ref in _refs(lc["inbound_nodes"]):
            consumers.setdefault(ref[0], set()).add(lc["name"])
    for ref in _refs(config["output_layers"]):
        consumers.setdefault(ref[0], set()).add(None)  # None: the model output
    macs = {}
    for path, _, m in macs_by_layer(model):
        macs[path] = macs.get(path, 0) + m

    def branch(tip, shortcut, add) -> Optional[set]:
        seen, todo = set(), [tip]
        while todo:
            ref = todo.pop()
            if ref == shortcut or ref[0] in seen:
                continue
            lc = layers[ref[0]]
            if lc["class_name"] == "InputLayer" or len(lc["inbound_nodes"]) != 1 or ref[1:] != (0, 0):
                return None
            seen.add(ref[0])
            todo.extend(_refs(lc["inbound_nodes"]))
        if not seen or shortcut[0] in seen or any(not consumers[n] <= seen | {add} for n in seen):
            return None
        return seen

    out = []
    for lc in config["layers"]:
        if lc["class_name"] != "Add" or len(lc["inbound_nodes"]) != 1:
            continue
        ins = list(_refs(lc["inbound_nodes"]))
        layer = model.get_layer(lc["name"])
        if len(ins) != 2 or len({tuple(t.shape) for t in layer.input} | {tuple(layer.output.shape)}) != 1:
            continue
        for s, t in ((ins[0], ins[1]), (ins[1], ins[0])):
            found = branch(t, s, lc["name"])
            if found:
                names = tuple(n for n in layers if n in found)
                out.append(Block(lc["name"], names, s, int(sum(macs.get(n, 0) for n in names))))
                break
    return out


def remove_blocks(model, blocks) -> keras.Model:
    """A fresh functional model with ``blocks`` bypassed (each ``Add``'s output replaced by its shortcut input) and
    the kept layers' weights copied; the input model is not modified."""
    model = as_functional(model)
    config = model.get_config()
    drop = {n for b in blocks for n in (*b.layers, b.name)}
    sub = {b.name: b.shortcut for b in blocks}

    def resolve(ref):
        while ref[0] in sub:  # a bypassed Add whose shortcut is another bypassed Add
            ref = sub[ref[0]]
        return ref

    def rewrite(obj):
        if _is_ref(obj) and obj[0] in sub:
            return [*resolve(tuple(obj[:3])), *(rewrite(o) for o in obj[3:])]
        if isinstance(obj, dict):
            return {k: rewrite(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [rewrite(o) for o in obj]
        return obj

    config["layers"] = [lc for lc in config["layers"] if lc["name"] not in drop]
    for lc in config["layers"]:
        lc["inbound_nodes"] = rewrite(lc["inbound_nodes"])
    config["output_layers"] = rewrite(config["output_layers"])
    custom = {type(layer).__name__: type(layer) for layer in model.layers}
    with keras.utils.custom_object_scope(custom):
        new = keras.Model.from_config(config)
    for layer in new.layers:
        weights = model.get_layer(layer.name).get_weights()
        if weights:
            layer.set_weights(weights)
    return new


def _sample(model, data: DataSource, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    batches = list(data.subset(n, seed).numpy_batches(input_shape(model), batch_size=256))
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])


def _loss_accuracy(model, x: np.ndarray, y: np.ndarray, kind: str) -> tuple[float, float]:
    from kcompress.evaluation import probabilities

    out = np.concatenate([np.asarray(model(x[i:i + 256], training=False)) for i in range(0, len(x), 256)])
    p = probabilities(out.astype(np.float64), kind)
    loss = -np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)))
    return float(loss), float(np.mean(p.argmax(axis=1) == y))


def block_importance(model, blocks, data: DataSource, n: int = IMPORTANCE_SAMPLES, seed: int = 0) -> dict[str, dict]:
    """Per block name: ``loss_increase`` (cross-entropy with the block bypassed minus the intact model's, on a
    stratified seeded ``n``-sample subset of ``data``), ``accuracy_drop`` (points) and ``loss_per_mmac`` (the
    ranking key: loss increase per million MACs saved)."""
    from kcompress.evaluation import output_kind

    model = as_functional(model)
    kind = output_kind(model) or "logits"
    x, y = _sample(model, data, n, seed)
    loss0, acc0 = _loss_accuracy(model, x, y, kind)
    out = {}
    for b in blocks:
        loss, acc = _loss_accuracy(remove_blocks(model, [b]), x, y, kind)
        out[b.name] = {"loss_increase": loss - loss0, "accuracy_drop": 100 * (acc0 - acc),
                       "loss_per_mmac": (loss - loss0) / max(b.macs / 1e6, 1e-6), "samples": int(len(y))}
    return out


def fp32_latency_ms(model, runs: int = LATENCY_RUNS, trials: int = LATENCY_TRIALS) -> float:
    """p50 latency of the model's fp32 ``.tflite`` in the LiteRT interpreter on this host, 1 thread, batch 1 (the
    median of ``trials`` trials' p50s)."""
    from kcompress.bench.host import bench_tflite
    from kcompress.quantization.ptq import convert

    r = bench_tflite(convert(model), threads=1, batch_size=1, runs=runs, warmup=10, trials=trials)
    return float(r.p50_interval.median)


class Staged:
    """The pruning step of each round of :func:`~kcompress.pruning.structured.prune_structured` when whole blocks
    may go or a latency target is set (module docstring); collects what it removed and measured."""

    def __init__(self, options: PruneOptions, seed: int = 0, train: Optional[DataSource] = None,
                 val: Optional[DataSource] = None, log: Optional[Callable[[str], None]] = None,
                 measure: Callable = fp32_latency_ms):
        self.plan = StructuredPlan.of(options, seed)
        self.granularity = Granularity(options.granularity)
        self.block_share = options.block_share
        self.target_flops, self.target_ms = options.target_flops, options.target_latency_ms
        self.reference = options.latency_reference
        self.device: Optional[dict] = None  # with a reference: the device's target and input p50, and the scale
        self.train, self.data, self.seed = train, val if val is not None else train, seed
        self.log = log or (lambda _msg: None)
        self.measure = measure
        self.removed: list[dict] = []
        self.notes: list[str] = []
        self.timings: list[dict] = []  # {"round", "macs", "p50_ms"} of every architecture timed
        self._now: Optional[tuple[int, float]] = None  # (MACs, p50 ms) of the current model
        self._cache: tuple = (None, None)  # (model, importance) of the last round start
        if self.granularity != Granularity.CHANNEL and self.data is None:
            raise UsageError(f"--granularity {self.granularity} needs data to measure the blocks' importance")

    @classmethod
    def of(cls, options: PruneOptions, seed: int = 0, train=None, val=None, log=None) -> Optional["Staged"]:
        """None when pruning is channels only to a FLOPs target or ratio (the plain path of ``prune_structured``)."""
        if options.granularity == Granularity.CHANNEL and options.target_latency_ms is None:
            return None
        return cls(options, seed, train, val, log)

    def report(self) -> dict:
        """``removed_blocks``, ``notes`` and, with a latency target, ``latency`` (``{"target_ms", "before_ms",
        "reached_ms", "reached", "timings"}``). A removed block is ``{"block"`` (its Add), ``"first"``, ``"layers"``,
        ``"macs"``, ``"importance"`` (the VAL loss increase when bypassed), ``"accuracy_drop"`` (points),
        ``"loss_per_mmac"``, ``"samples"``, ``"round"}``."""
        out: dict = {"removed_blocks": self.removed, "notes": self.notes}
        if self.target_ms is not None and self.timings:
            reached = self._now[1]
            out["latency"] = {"target_ms": self.target_ms, "before_ms": self.timings[0]["p50_ms"],
                              "reached_ms": reached, "reached": reached <= self.target_ms, "timings": self.timings}
            if self.device is not None:
                out["latency"]["device"] = {**self.device, "reached_ms": reached * self.device["scale"]}
        return out

    def state(self) -> dict:
        """What a resumed run needs to carry on (JSON): blocks removed, notes, timings, the current latency."""
        return {"removed": self.removed, "notes": self.notes, "timings": self.timings,
                "now": list(self._now) if self._now is not None else None, "device": self.device}

    def restore(self, state: dict) -> None:
        """Takes back :meth:`state` (of a run with the same settings, checked by the caller)."""
        self.removed, self.notes, self.timings = list(state["removed"]), list(state["notes"]), list(state["timings"])
        self._now = tuple(state["now"]) if state.get("now") is not None else None
        self._cache = (None, None)
        if state.get("device"):
            self.device = dict(state["device"])
            self.target_ms = self.device["target_ms"] / self.device["scale"]

    # ------------------------------------------------------------------------------------------------ a round
    def step(self, model, i: int, k: int, macs0: int):
        """Round ``i`` of ``k``: the model pruned to this round's FLOPs or latency goal (not fine-tuned)."""
        if self.target_ms is None:
            target = int(macs0 * (1 - self.target_flops * i / k))
            new, removed = self.reduce(model, target)
            self._commit(removed, i)
            if i == k and count_macs(new) > target:
                self.notes.append(f"the FLOPs target was not reached: {count_macs(new):,} MACs left, target "
                                  f"{target:,} ({self.granularity} pruning removed all it could)")
            return new
        return self._latency_step(model, i, k)

    def _scale_to_device(self, host_ms: float) -> None:
        """Turns the device's target into this host's: target x (input's host p50 / input's device p50). Assumes
        pruning changes both machines' times in the same ratio (roughly so for the same kernels; the device's
        reached time is an estimate: benchmark the result there)."""
        from kcompress.bench.schema import load_report

        rep = load_report(self.reference)
        rows = [r for r in rep.results if r.threads == 1 and r.batch_size == 1 and r.latency_ms is not None]
        if not rows:
            raise UsageError(f"{self.reference}: no 1-thread, batch-1 latency in it (kcompress device bench "
                             "--threads 1 -o FILE, on the input model's fp32 .tflite)")
        r = rows[0]
        dev = float(r.p50_interval.median if r.p50_interval is not None else r.latency_ms.p50)
        name = " ".join(str(v) for v in (rep.target.get("manufacturer"), rep.target.get("model")) if v) or "device"
        self.device = {"reference": self.reference, "name": name, "model": r.model, "input_p50_ms": dev,
                       "host_p50_ms": host_ms, "scale": dev / host_ms, "target_ms": self.target_ms}
        self.target_ms = self.target_ms * host_ms / dev
        self.log(f"latency target {self.device['target_ms']:.3f} ms on {name} = {self.target_ms:.3f} ms on this host "
                 f"(the input model: {dev:.3f} ms there, {host_ms:.3f} ms here, fp32, 1 thread; {self.reference})")

    def reduce(self, model, target: int):
        """``(model pruned to at most target MACs as the granularity allows, [(block, importance) removed])``."""
        removed = []
        if self.granularity != Granularity.CHANNEL:
            macs = count_macs(model)
            goal = target if self.granularity == Granularity.BLOCK else macs - (macs - target) * self.block_share
            blocks = find_blocks(model) if macs > goal else []
            if blocks:
                imp = self._importance(model, blocks)
                taken: set = set()
                for b in sorted(blocks, key=lambda b: (imp[b.name]["loss_per_mmac"], b.name)):
                    if macs <= goal:
                        break
                    if taken & {*b.layers, b.name}:  # nested in (or around) a block already removed
                        continue
                    if self.granularity == Granularity.BOTH and macs - b.macs < target:
                        break  # channels do the rest
                    removed.append((b, imp[b.name]))
                    taken |= {*b.layers, b.name}
                    macs -= b.macs
                if removed:
                    model = remove_blocks(model, [b for b, _ in removed])
        if self.granularity != Granularity.BLOCK and count_macs(model) > target:
            model, _ = prune_once(model, self.plan, target_macs=max(0, int(target)), data=self.train)
        return model, removed

    def _importance(self, model, blocks) -> dict:
        if self._cache[0] is not model:
            self._cache = (model, block_importance(model, blocks, self.data, seed=self.seed))
        return self._cache[1]

    def _commit(self, removed, i: int) -> None:
        for b, imp in removed:
            self.removed.append({"block": b.name, "first": b.first, "layers": list(b.layers), "macs": b.macs,
                                 "importance": imp["loss_increase"], "accuracy_drop": imp["accuracy_drop"],
                                 "loss_per_mmac": imp["loss_per_mmac"], "samples": imp["samples"], "round": i})
            self.log(f"round {i}: removed block {b.name} ({b.first} .. {b.layers[-1]}, {b.macs / 1e6:.2f} MMACs): "
                     f"VAL loss {imp['loss_increase']:+.4f}, accuracy {-imp['accuracy_drop']:+.2f} points "
                     "when bypassed")

    def _time(self, model, i: int, macs: Optional[int] = None) -> float:
        macs = count_macs(model) if macs is None else macs
        ms = self.measure(model)
        self.timings.append({"round": i, "macs": macs, "p50_ms": ms})
        return ms

    def _latency_step(self, model, i: int, k: int):
        if self._now is None:
            macs = count_macs(model)
            self._now = (macs, self._time(model, 0, macs))
        macs, ms = self._now
        before = self.timings[0]["p50_ms"]
        if self.reference is not None and self.device is None:
            self._scale_to_device(before)
        goal = self.target_ms if i == k else before * (self.target_ms / before) ** (i / k)
        if ms <= goal:
            return model
        # (MACs, p50, model, removed blocks): the most pruned candidate still too slow, the least pruned fast enough
        slow, fast, prev, stuck, tries = (macs, ms, model, []), None, None, False, 0
        guess = macs * goal / ms
        while tries < LATENCY_TRIES:
            cand, rem = self.reduce(model, int(guess))
            m = count_macs(cand)
            if m >= slow[0] or (fast is not None and m <= fast[0]):
                stuck = fast is None  # nothing more can go at this granularity (or no finer step between the two)
                break
            tries += 1
            p = self._time(cand, i, m)
            if p <= goal:
                fast = (m, p, cand, rem)
            else:
                prev, slow = slow, (m, p, cand, rem)
            if fast is not None:  # bisect towards the goal: the fewest MACs removed that still meet it
                if fast[1] >= goal * (1 - LATENCY_SLACK) or slow[0] - fast[0] <= 0.02 * macs:
                    break
                guess = (slow[0] + fast[0]) / 2
            else:  # extrapolate (secant through the last two), removing at most MAX_CUT of what is left
                (m1, l1), (m2, l2) = prev[:2], slow[:2]
                slope = (l1 - l2) / (m1 - m2)
                nxt = m2 - (l2 - goal) / slope if slope > 0 else m2 * goal / l2
                guess = min(max(nxt, m2 * (1 - MAX_CUT)), m2 * (1 - MIN_STEP))
        m, p, best, removed = fast if fast is not None else slow
        self._now = (m, p)
        self._commit(removed, i)
        self.log(f"round {i}: {self._now[0]:,} MACs, fp32 p50 {self._now[1]:.3f} ms (goal {goal:.3f} ms)")
        if i == k and self._now[1] > self.target_ms:
            self.notes.append(f"the latency target {self.target_ms:.3f} ms was not reached: {self._now[1]:.3f} ms "
                              f"(fp32 .tflite, 1 thread, batch 1, from {before:.3f} ms): "
                              + (f"{self.granularity} pruning could remove nothing more" if stuck else
                                 f"{LATENCY_TRIES} prune-and-time attempts in the last round were not enough"))
        return best
