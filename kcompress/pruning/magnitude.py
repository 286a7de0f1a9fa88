"""Magnitude (unstructured) pruning through tfmot, with a schedule that leaves time to recover.

:func:`prune_magnitude` wraps only the layers tfmot can prune (convolutions, dense, embeddings: its
``prune_low_magnitude`` on a whole model refuses many real architectures, e.g. MobileNetV3Small, EfficientNetB0),
fine-tunes with the sparsity ramping up over the first ``ramp`` fraction of the steps (60% by default) and then held
at the target so accuracy can recover, strips the wrappers and returns a plain tf_keras model.

Gotchas:
- sparsity does not make a dense ``.tflite`` smaller or faster; it shows in the gzip-compressed size only
  (:func:`sizes`). Quantizing later keeps it only with a prune-preserving scheme.
- ``--block 2:4`` is tfmot's m-by-n sparsity along the input channels; layers whose input channels are not a
  multiple of n are left dense (said in ``skipped``).
- the input model is never modified (pruning works on a copy).
- nested models (a ``keras.applications`` backbone used as a layer) are inlined first
  (:func:`kcompress.graph.flatten_model`), so the backbone is pruned too; the result is one flat functional model
  (``flattened`` names what was inlined).
- layers with weights that tfmot cannot prune (``DepthwiseConv2D``, ``BatchNormalization``'s scales...) stay dense;
  the convolution-like ones are listed in ``skipped`` with the reason and their share of the parameters.
- ``target_met`` is False when the pruned kernels end more than 5 points below the requested sparsity.

Structured pruning (channels physically removed) is in :mod:`kcompress.pruning.structured`.
"""

from __future__ import annotations

import gzip
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from kcompress.backend import keras, tfmot
from kcompress.data import DataSource
from kcompress.errors import UsageError
from kcompress.options import PruneOptions, TrainOptions
from kcompress.types import PruneMethod

__all__ = [
    "MagnitudeResult",
    "prune_magnitude",
    "prunable_layers",
    "resolve_skip",
    "sparsity_report",
    "recommended_epochs",
    "sizes",
    "copy_model",
]



def _prunable_classes() -> tuple:
    L = keras.layers
    return (L.Conv1D, L.Conv2D, L.Conv3D, L.Conv2DTranspose, L.Conv3DTranspose, L.SeparableConv1D,
            L.SeparableConv2D, L.Dense, L.Embedding)


TARGET_SLACK = 0.05  # a stage whose sparsity ends more than this below its target says so (target_met False)
RAMP = 0.6  # fraction of the fine-tuning steps over which sparsity reaches its target


@dataclass(frozen=True)
class _Plan:
    """The magnitude settings of a :class:`PruneOptions`, resolved (block parsed, method's learning rate)."""

    sparsity: float
    schedule: str
    initial_sparsity: float
    block: Optional[tuple[int, int]]
    skip: tuple[str, ...]
    epochs: int
    batch_size: int
    lr: float
    seed: int
    target: float
    ramp: float = RAMP

    @classmethod
    def of(cls, o: PruneOptions, seed: int, ramp: float = RAMP, optimizer=None) -> "_Plan":
        return cls(o.sparsity, o.schedule, o.initial_sparsity, o.block_shape, o.skip, o.epochs, o.batch_size,
                   o.rate(optimizer), seed, o.target_sparsity, ramp)


def recommended_epochs(sparsity: float) -> int:
    """Fine-tuning epochs below which accuracy is likely to collapse (measured: 80% in 2 epochs lost 20 points)."""
    if sparsity <= 0.5:
        return 2
    if sparsity <= 0.75:
        return 4
    if sparsity <= 0.9:
        return 8
    return 12


@dataclass
class MagnitudeResult:
    model: object  # the stripped, plain tf_keras model
    pruned: list[str]  # layer names that were wrapped
    skipped: dict[str, str]  # layer name -> why it stayed dense
    sparsity: dict[str, float]  # per pruned layer, after stripping
    overall_sparsity: float  # zeros / weights over the pruned layers' kernels
    total_sparsity: float  # zeros / all parameters
    accuracy_before: Optional[float]
    accuracy_after: Optional[float]
    history: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    steps: int = 0
    ramp_end_step: int = 0
    target: float = 0.0  # the requested sparsity of the pruned kernels
    flattened: dict = field(default_factory=dict)  # nested model path -> its layer count (empty: nothing nested)

    @property
    def target_met(self) -> bool:
        """The pruned kernels reached the target within :data:`TARGET_SLACK`."""
        return self.overall_sparsity >= self.target - TARGET_SLACK


def copy_model(model):
    """An independent copy (fresh layers, same weights)."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def _kernel(layer):
    """The weight tfmot prunes in this layer (pointwise kernel for separable convolutions)."""
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        return layer.pointwise_kernel
    if isinstance(layer, keras.layers.Embedding):
        return layer.embeddings
    return layer.kernel


def prunable_layers(model) -> list:
    """Layers tfmot can prune (exact built-in classes, or layers implementing tfmot's PrunableLayer)."""
    prunable_iface = tfmot().sparsity.keras.PrunableLayer
    classes = _prunable_classes()
    return [layer for layer in model.layers if type(layer) in classes or isinstance(layer, prunable_iface)]


def _dense_left(model, prunable) -> dict[str, str]:
    """Convolution-like layers tfmot cannot prune (they stay dense), each with why and its share of parameters."""
    names = {layer.name for layer in prunable}
    total = max(1, model.count_params())
    out = {}
    for layer in model.layers:
        if layer.name in names or not isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.DepthwiseConv1D)):
            continue
        share = layer.count_params() / total
        out[layer.name] = f"{type(layer).__name__}: tfmot cannot prune depthwise kernels ({share:.2%} of the parameters)"
    return out


def resolve_skip(model, skip: Sequence[str]) -> dict[str, str]:
    """Maps ``--skip`` entries (names, ``first``/``last`` prunable layer, or regexes) to layer names -> reason."""
    names = [layer.name for layer in model.layers]
    prunable = [layer.name for layer in prunable_layers(model)]
    out: dict[str, str] = {}
    for entry in skip:
        if entry in ("first", "last"):
            if prunable:
                out[prunable[0 if entry == "first" else -1]] = f"--skip {entry}"
            continue
        if entry in names:
            out[entry] = "--skip"
            continue
        try:
            pattern = re.compile(entry)
        except re.error:
            raise UsageError(f"--skip {entry!r}: neither a layer name nor a valid regular expression") from None
        hits = [n for n in names if pattern.fullmatch(n)]
        if not hits:
            raise UsageError(f"--skip {entry!r} matches no layer of the model")
        out.update({n: f"--skip {entry}" for n in hits})
    return out


def _block_ok(layer, block) -> bool:
    if block is None:
        return True
    shape = _kernel(layer).shape
    cin = int(shape[0]) if isinstance(layer, keras.layers.Dense) else int(shape[-2])
    return cin % block[1] == 0


def _schedule(options: _Plan, steps: int):
    sk = tfmot().sparsity.keras
    ramp_end = max(1, int(math.floor(steps * options.ramp)))
    freq = max(1, min(100, ramp_end // 10))
    ramp_end = max(freq, ramp_end - ramp_end % freq)
    if options.block is not None or options.schedule == "constant":
        target = options.target if options.block is None else 0.5  # m-by-n ignores the schedule's value
        return sk.ConstantSparsity(target, begin_step=0, end_step=ramp_end, frequency=freq), ramp_end
    return (
        sk.PolynomialDecay(options.initial_sparsity, options.sparsity, begin_step=0, end_step=ramp_end,
                           frequency=freq),
        ramp_end,
    )


def sparsity_report(model, names: Sequence[str]) -> tuple[dict[str, float], float, float]:
    """Per-layer kernel sparsity of ``names``, overall sparsity over those kernels, and over all parameters."""
    per, zeros, total = {}, 0, 0
    for layer in model.layers:
        if layer.name in names:
            w = _kernel(layer).numpy()
            z = int(np.sum(w == 0))
            per[layer.name] = z / w.size
            zeros += z
            total += w.size
    all_w = [w.numpy() for w in model.weights]
    all_zero = sum(int(np.sum(w == 0)) for w in all_w)
    all_n = sum(w.size for w in all_w)
    return per, (zeros / total if total else 0.0), (all_zero / all_n if all_n else 0.0)


def sizes(tflite_bytes: bytes) -> dict[str, int]:
    """Raw and gzip-compressed (level 9) byte counts: sparsity only shows after compression."""
    return {"raw": len(tflite_bytes), "gzip": len(gzip.compress(tflite_bytes, 9))}


class _BestAfterRamp(keras.callbacks.Callback):
    """Keeps the weights of the best epoch by VAL accuracy (ties: VAL loss) among epochs that ended at the final
    sparsity."""

    def __init__(self, ramp_end: int, steps_per_epoch: int):
        super().__init__()
        self.ramp_end, self.spe = ramp_end, steps_per_epoch
        self.rank, self.weights = None, None

    def on_epoch_end(self, epoch, logs=None):
        from kcompress.train import epoch_rank, ranks_above, weights_unless_last

        rank = epoch_rank(logs)
        if (epoch + 1) * self.spe >= self.ramp_end and ranks_above(rank, self.rank):
            self.rank, self.weights = rank, weights_unless_last(self, epoch)

    def on_train_end(self, logs=None):
        if self.weights is not None:
            self.model.set_weights(self.weights)


def prune_magnitude(
    model, train: DataSource, val: Optional[DataSource] = None, options: Optional[PruneOptions] = None, seed: int = 0,
    verbose: Optional[int] = None, ramp: float = RAMP, train_options: Optional[TrainOptions] = None,
    log: Optional[Callable[[str], None]] = None,
) -> MagnitudeResult:
    """Prunes a copy of ``model`` to ``options.sparsity`` with fine-tuning on ``train``; see the module docstring.

    ``options`` is read for its magnitude settings (``method`` is not checked, so the pipeline can pass its section).

    Accuracy before/after is measured on ``val`` when given. Warns (``warnings`` and ``result.warnings``) when
    the fine-tuning budget is short for the requested sparsity. The fine-tune trains with the ``train_options``
    recipe (optimizer, schedule, augmentation; see :mod:`kcompress.recipe`); ``log`` receives which.
    """
    from kcompress.evaluation import evaluate
    from kcompress.train import compile_classifier, fit

    if not 0.0 < ramp <= 1.0:
        raise UsageError(f"ramp must be in (0, 1], got {ramp}")
    options = _Plan.of(options or PruneOptions(method=PruneMethod.MAGNITUDE), seed, ramp,
                       train_options.optimizer if train_options else None)
    from kcompress.graph import flatten_model

    sk = tfmot().sparsity.keras
    notes: list[str] = []
    source = model
    model, nested = flatten_model(model, with_nesting=True)
    if nested and log is not None:
        log(nested.describe())
    skipped = resolve_skip(model, options.skip)
    base = model if nested else copy_model(model)  # flattening already copied every layer with its weights
    candidates = prunable_layers(base)
    dense = _dense_left(base, candidates)
    if dense and log is not None:
        share = sum(base.get_layer(n).count_params() for n in dense) / max(1, base.count_params())
        log(f"{len(dense)} depthwise layer(s) stay dense ({share:.1%} of the parameters): tfmot cannot prune them")
    to_prune = set()
    for layer in candidates:
        if layer.name in skipped:
            continue
        if not _block_ok(layer, options.block):
            skipped[layer.name] = f"input channels not a multiple of {options.block[1]} (block {options.block})"
            continue
        to_prune.add(layer.name)
    if not to_prune:
        raise UsageError("no layer left to prune (every prunable layer is skipped, or the model has none)")
    steps_per_epoch = -(-train.num_samples // options.batch_size)
    steps = steps_per_epoch * options.epochs
    schedule, ramp_end = _schedule(options, steps)
    need = recommended_epochs(options.target)
    if options.ramp < 1.0:
        need = max(need, math.ceil(1.0 / (1.0 - options.ramp)))  # at least one epoch at the final sparsity
    if options.epochs < need or steps - ramp_end < steps_per_epoch:
        notes.append(
            f"{options.epochs} fine-tuning epoch(s) is short for {options.target:.0%} sparsity "
            f"(recommended: at least {need}); expect an accuracy drop"
        )
    if options.schedule == "constant" and options.target > 0.5 and options.block is None:
        notes.append("a constant schedule jumps to the full sparsity at step 0; polynomial usually recovers better")
    for n in notes:
        warnings.warn(n, stacklevel=2)
    kw = {"pruning_schedule": schedule}
    if options.block is not None:
        kw["sparsity_m_by_n"] = options.block

    def wrap(layer):
        if layer.name in to_prune:
            return sk.prune_low_magnitude(layer, **kw)
        return layer

    # wrapping the copy's own layers keeps their weights; unwrapped layers are shared with ``base`` (a copy)
    wrapped = keras.models.clone_model(base, clone_function=wrap)
    before = evaluate(source, val, description="accuracy before").accuracy if val is not None else None
    keras.utils.set_random_seed(options.seed)
    cbs = [sk.UpdatePruningStep()]
    if val is not None:
        cbs.append(_BestAfterRamp(ramp_end, steps_per_epoch))
    compile_classifier(base, options.lr)  # decides from_logits on the plain last layer (a wrapper hides it)
    hist = fit(wrapped, train, val, epochs=options.epochs, batch_size=options.batch_size, lr=options.lr,
               seed=options.seed, restore_best=False, callbacks=cbs, verbose=verbose, loss=base.loss,
               recalibrate_bn=False,  # a forward pass in training mode would step the pruning wrappers' masks
               train_options=train_options, log=log)
    stripped = sk.strip_pruning(wrapped)
    plain = copy_model(stripped)  # a fresh functional model without tfmot objects in its history
    per, overall, total = sparsity_report(plain, sorted(to_prune))
    after = evaluate(plain, val, description="accuracy after").accuracy if val is not None else None
    return MagnitudeResult(
        model=plain,
        pruned=[layer.name for layer in candidates if layer.name in to_prune],
        skipped={**skipped, **dense},
        sparsity=per,
        overall_sparsity=overall,
        total_sparsity=total,
        accuracy_before=before,
        accuracy_after=after,
        history={k: [float(v) for v in vs] for k, vs in hist.history.items()},
        warnings=notes,
        steps=steps,
        ramp_end_step=ramp_end,
        target=options.target,
        flattened=dict(nested.models),
    )
