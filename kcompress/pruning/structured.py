"""Structured pruning: whole filters/channels removed, the result rebuilt as a smaller dense tf_keras model.

Which channels go together (residual and squeeze-excite groups, concatenations, ``Flatten``) and which are left
whole (*frozen*: the model input and output, barriers such as softmax, grouped convolutions, unknown layers) is the
:class:`~kcompress.pruning.channels.ChannelGraph`'s business; frozen layers are listed in
:attr:`StructuredResult.frozen`. Nested models (a ``keras.applications`` backbone used as a layer) are inlined first
(:func:`kcompress.graph.flatten_model`): the backbone is pruned too and the output is one flat functional model
(:attr:`StructuredResult.flattened` names what was inlined).

Gotchas: channels go in order of importance until the estimated MACs reach the target, but frozen groups and the
:data:`MIN_KEEP` floor can leave a FLOPs target out of reach: the result then says so (``target_met`` False when the
reduction ends more than :data:`TARGET_SLACK` below ``target_flops``, and ``shortfall`` names the biggest frozen
groups and why they are frozen). The output is built fresh from the input model's config with smaller
``filters``/``units`` and the kept weights copied, so it saves, loads and converts like any model. The input model is
never modified.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from kcompress.backend import keras, tf
from kcompress.data import DataSource
from kcompress.errors import UsageError
from kcompress.graph import flatten_model
from kcompress.modelinfo import count_macs, count_params
from kcompress.options import CHANNEL_MULTIPLE_AUTO, PruneOptions, TrainOptions
from kcompress.pruning.channels import ChannelGraph, as_functional

__all__ = ["StructuredResult", "StructuredPlan", "ChannelGraph", "prune_structured", "prune_once"]

L = keras.layers

MIN_KEEP = 0.1  # never keep fewer than this fraction of a group's channels (and at least 1)
TARGET_SLACK = 0.05  # a FLOPs reduction this far below target_flops (a latency this share above target_latency_ms)
# is reported: target_met False, with the shortfall
TAYLOR_BATCHES = 8  # training batches scored for the taylor criterion


@dataclass(frozen=True)
class StructuredPlan:
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
    def of(cls, o: PruneOptions, seed: int = 0, optimizer=None) -> "StructuredPlan":
        o = resolve_channel_multiple(o)
        return cls(None if o.ratio is not None else o.target_flops, o.ratio, o.criterion, o.num_rounds(), o.epochs,
                   o.batch_size, o.rate(optimizer), seed, o.channel_multiple)

    def num_rounds(self) -> int:
        return self.rounds


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
        options = StructuredPlan.of(options)
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
        # fill the overshoot: give back the most important removed channels that still fit the target, m at a time
        # per group (the most important m removed from it, fewer where that reaches the group's size)
        full: set = set()  # groups whose next give-back would pass the target
        removed = [(r, c) for _, r, c in reversed(order[:lo]) if not graph.keep[r][c]]
        for r, c in removed[:500]:
            if current >= target_macs * 0.995:
                break
            if r in full or graph.keep[r][c]:
                continue
            back = [j for j in np.argsort(-imp[r], kind="stable") if not graph.keep[r][j]][:m]
            graph.keep[r][back] = True
            trial = graph.estimate_macs()
            if trial <= target_macs:
                current = trial
            else:
                graph.keep[r][back] = False
                full.add(r)
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
    channel_multiple: int = 1  # the one used (auto resolved to the host's measured tile)
    target_met: bool = True  # the FLOPs (or latency) target reached within TARGET_SLACK; True with ratio
    shortfall: str = ""  # when not met: how much was reached and the biggest frozen groups with their reasons
    flattened: dict = field(default_factory=dict)  # nested model path -> its layer count (empty: nothing nested)

    @property
    def flops_reduction(self) -> float:
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0


def resolve_channel_multiple(options: PruneOptions, log: Optional[Callable[[str], None]] = None) -> PruneOptions:
    """``options`` with ``channel_multiple`` auto replaced by the tile measured on this host (logged); else as given."""
    if options.channel_multiple != CHANNEL_MULTIPLE_AUTO:
        return options
    from kcompress.pruning.tiles import channel_tile

    probe = channel_tile()
    if log is not None:
        log(f"channel_multiple auto: {probe.describe()}")
    return options.replace(channel_multiple=probe.tile)


def prune_structured(model, train: Optional[DataSource] = None, val: Optional[DataSource] = None,
                     options: Optional[PruneOptions] = None, seed: int = 0,
                     verbose: Optional[int] = None, train_options: Optional[TrainOptions] = None,
                     log: Optional[Callable[[str], None]] = None, checkpoint_dir: Optional[str] = None,
                     resume: bool = False, fine_tune: Optional[Callable[..., float]] = None) -> StructuredResult:
    """Removes channels in ``options.num_rounds()`` rounds, fine-tuning on ``train`` between rounds (half LR) and
    after the last (full LR), each with the ``train_options`` recipe, keeping its best epoch by VAL accuracy;
    ``epochs=0`` skips training. Whole blocks and latency targets: :mod:`kcompress.pruning.blocks`.

    ``checkpoint_dir``: the model after each round's pruning step and after its fine-tune, and each fine-tune
    epoch (:mod:`kcompress.checkpoint`); ``resume`` continues with the round (and epoch) where a killed run
    stopped, with what the earlier rounds removed and measured. Other settings than the checkpoint's are refused.

    ``fine_tune``: trains each round's model in place instead of the label fine-tune, called as ``fine_tune(model,
    epochs=, lr=, seed=, checkpoint_dir=, resume=, what=)`` and returning the best VAL accuracy (or nan): how
    ``options.teacher`` comes in (:func:`kcompress.distillation.finetune.teacher_fine_tune`), kept out of this
    module so that pruning does not import distillation."""
    from kcompress.evaluation import evaluate
    from kcompress.pruning.blocks import Staged

    asked = options or PruneOptions()
    given = resolve_channel_multiple(asked, log)
    staged = Staged.of(given, seed, train, val, log)  # None: channels only, by MACs or ratio
    options = StructuredPlan.of(given, seed, train_options.optimizer if train_options else None)
    model, nesting = flatten_model(as_functional(model), with_nesting=True)
    if nesting and log is not None:
        log(nesting.describe())
    macs0 = count_macs(model)
    k = options.num_rounds()
    before = evaluate(model, val, description="accuracy before").accuracy if val is not None else None
    ckpt = _Rounds.open(checkpoint_dir, resume, model, asked, seed, train, val, train_options, staged, log)
    current, rounds, first, pending = model, [], 1, None
    if ckpt is not None and ckpt.state is not None:
        current, rounds, first, pending = ckpt.restore(model)
    # epochs split over the rounds, the remainder going to the last rounds (the final model needs them most)
    per_round = [options.epochs // k + (1 if i >= k - options.epochs % k else 0) for i in range(k)]
    if log is not None and train is not None:
        log(f"{k} round(s) of pruning; the {options.epochs} fine-tuning epoch(s) are spent as {per_round} "
            "(earlier rounds at half the learning rate); each round keeps its best epoch by VAL accuracy")
    for i in range(first, k + 1):
        continuing = pending is not None  # this round's pruning step was done before the kill
        if continuing:
            current, pending = pending, None
        elif staged is not None:
            current = staged.step(current, i, k, macs0)
        elif options.ratio is not None:
            # ratio/k of the original channels per round, as a fraction of what is left
            step = (options.ratio / k) / (1 - options.ratio * (i - 1) / k)
            current, graph = prune_once(current, options, ratio=step, data=train)
        else:
            target = int(macs0 * (1 - options.target_flops * i / k))
            current, graph = prune_once(current, options, target_macs=target, data=train)
        if ckpt is not None and not continuing:
            ckpt.pruned(i, current, rounds)
        info = {"round": i, "macs": count_macs(current), "params": count_params(current)["total"]}
        if train is not None and per_round[i - 1] > 0:
            from kcompress.checkpoint import fit_resumable

            lr = options.lr if i == k else options.lr / 2
            fit_dir = ckpt.fit_dir(i, continuing) if ckpt else None
            if fine_tune is not None:
                info["val_accuracy"] = fine_tune(current, epochs=per_round[i - 1], lr=lr, seed=options.seed + i,
                                                 checkpoint_dir=fit_dir, resume=continuing,
                                                 what=f"round {i} fine-tune")
            else:
                tuned = fit_resumable(current, train, val, checkpoint_dir=fit_dir, resume=continuing,
                                      fingerprint={"round": i}, what=f"round {i} fine-tune",
                                      epochs=per_round[i - 1], batch_size=options.batch_size, lr=lr,
                                      seed=options.seed + i, verbose=verbose, train_options=train_options, log=log)
                info["val_accuracy"] = tuned.best if tuned.best is not None else float("nan")
        rounds.append(info)
        if ckpt is not None:
            ckpt.finished(i, current, rounds)
        if log is not None:
            acc = (f", VAL accuracy {100 * info['val_accuracy']:.2f}%"
                   if not math.isnan(info.get("val_accuracy", math.nan)) else "")
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
    macs1 = count_macs(current)
    report = staged.report() if staged else {}
    if report.get("latency"):
        lat = report["latency"]
        met = lat["reached_ms"] <= lat["target_ms"] * (1 + TARGET_SLACK)
        short = "" if met else (f"fp32 p50 {lat['reached_ms']:.3f} ms reached, target {lat['target_ms']:.3f} ms"
                                f"{_frozen_text(final, macs0)}")
    elif options.target_flops is not None:
        reached = 1 - macs1 / macs0 if macs0 else 0.0
        met = reached >= options.target_flops - TARGET_SLACK
        short = "" if met else (f"{reached:.0%} fewer MACs reached of the {options.target_flops:.0%} asked"
                                f"{_frozen_text(final, macs0)}")
    else:
        met, short = True, ""
    if short and log is not None:
        log(f"target missed: {short}")
    return StructuredResult(
        model=current, groups=groups, frozen=final.frozen_layers(),
        params_before=count_params(model)["total"], params_after=count_params(current)["total"],
        macs_before=macs0, macs_after=macs1, accuracy_before=before, accuracy_after=after,
        rounds=rounds, staged=report, target_met=met, shortfall=short, flattened=dict(nesting.models),
        channel_multiple=given.channel_multiple,
    )


class _Rounds:
    """The checkpoints of :func:`prune_structured`'s rounds in one folder: ``state.json`` (rounds done, their
    figures, what :class:`~kcompress.pruning.blocks.Staged` removed and timed) naming ``round-I/`` (the model after
    round I) or, mid-round, ``round-I-pruned/`` (after its pruning step) with ``round-I-fit/`` (its fine-tune's
    epochs). Models are written before the state that names them, so a kill leaves a consistent checkpoint."""

    def __init__(self, folder: str, state: Optional[dict], identity: dict, staged, log):
        self.dir, self.state, self.identity, self.staged, self.log = folder, state, identity, staged, log

    @classmethod
    def open(cls, folder, resume, model, options: PruneOptions, seed, train, val, train_options, staged, log):
        if not folder:
            if resume:
                raise UsageError("--resume needs a checkpoint folder")
            return None
        from kcompress.checkpoint import data_identity, read_state, weights_fingerprint

        identity = {"what": "structured pruning", "model": weights_fingerprint(model), "seed": seed,
                    "options": {k: v for k, v in options.to_dict().items() if k != "max_drop"},
                    "train_options": train_options.to_dict() if train_options else None,
                    "train": data_identity(train), "val": data_identity(val)}
        state = read_state(folder, resume, identity, "structured pruning")
        return cls(folder, state, identity, staged, log)

    def restore(self, model):
        """``(current model, rounds, first round to run, the pruned model of a round cut short or None)``."""
        from kcompress.checkpoint import load_architecture

        st = self.state
        if self.staged is not None and st.get("staged") is not None:
            self.staged.restore(st["staged"])
        current = load_architecture(os.path.join(self.dir, st["model"]), model) if st.get("model") else model
        pending = st.get("pending")
        pruned = load_architecture(os.path.join(self.dir, pending), model) if pending else None
        if self.log is not None:
            cut = f"; round {st['rounds_done'] + 1} continues after its pruning step" if pending else ""
            self.log(f"continuing the interrupted pruning from {self.dir}: {st['rounds_done']} round(s) done{cut}")
        return current, list(st["rounds"]), st["rounds_done"] + 1, pruned

    def fit_dir(self, i: int, continuing: bool) -> str:
        path = os.path.join(self.dir, f"round-{i}-fit")
        if not continuing and os.path.isdir(path):
            shutil.rmtree(path)  # not named by state.json: an interrupted write's leftovers
        return path

    def _commit(self, rounds_done: int, rounds: list, model: Optional[str], pending: Optional[str]) -> None:
        from kcompress.checkpoint import write_state

        write_state(self.dir, {"fingerprint": self.identity, "rounds_done": rounds_done, "rounds": rounds,
                               "model": model, "pending": pending,
                               "staged": self.staged.state() if self.staged is not None else None})
        self.state = {"model": model, "pending": pending}

    def pruned(self, i: int, model, rounds: list) -> None:
        """Round ``i``'s pruning step is done: its model, before the fine-tune."""
        from kcompress.checkpoint import save_architecture

        save_architecture(model, os.path.join(self.dir, f"round-{i}-pruned"))
        self._commit(i - 1, rounds, (self.state or {}).get("model"), f"round-{i}-pruned")

    def finished(self, i: int, model, rounds: list) -> None:
        """Round ``i`` is done (fine-tuned); earlier rounds' files go."""
        from kcompress.checkpoint import save_architecture

        save_architecture(model, os.path.join(self.dir, f"round-{i}"))
        self._commit(i, rounds, f"round-{i}", None)
        for entry in os.listdir(self.dir):
            if entry.startswith("round-") and entry != f"round-{i}":
                shutil.rmtree(os.path.join(self.dir, entry), ignore_errors=True)


def _frozen_text(graph: ChannelGraph, macs0: int, top: int = 3) -> str:
    """``"; biggest frozen groups: ..."`` (their layers, share of the MACs, reason), or why none is to blame."""
    frozen = [g for g in graph.frozen_groups() if g["macs"] > 0][:top]
    if not frozen:
        return f"; no frozen group holds MACs: the groups reached their floor ({MIN_KEEP:.0%} of their channels kept)"
    parts = []
    for g in frozen:
        names = ", ".join(g["layers"][:2]) + (f" +{len(g['layers']) - 2} more" if len(g["layers"]) > 2 else "")
        parts.append(f"{names} ({g['macs'] / max(macs0, 1):.0%} of the MACs: {g['reason']})")
    return "; biggest frozen groups: " + "; ".join(parts)


def _width(layer) -> int:
    return int(layer.units if isinstance(layer, L.Dense) else layer.filters)
