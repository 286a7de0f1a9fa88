"""One frozen options class per technique: at once the pipeline config section, the CLI's defaults and the API's
keyword arguments, so every setting has one default, documented once (``kcompress config --show-defaults``).

Values are checked when an options object is built, before any work: types (YAML ints become floats, strings become
enums), ranges (``0 < target_flops < 1``, ``temperature > 0``, ...) and mini-languages (``block: 2:4``,
``temperature_schedule: linear:8:2``). A bad value raises :class:`OptionError`, which names the key; the config
loader prefixes the section (``prune.target_flops``), the CLI names the flag (``--target-flops``).

Gotchas: a stage's ``lr`` left empty means the rate that suits ``train.optimizer`` for that stage
(:data:`STAGE_LR`: pruning's depends on its method too; ``rate(optimizer)`` resolves it), and ``ratio``, when
set, replaces ``target_flops``. ``QuantizeOptions.io`` None means int8 I/O for ``mode: int8`` and float otherwise.
QAT takes its per-channel, I/O, float-layer and calibration settings from :class:`QuantizeOptions`.
``PruneOptions.target_latency_ms``, when set, replaces ``target_flops`` too (whose default 0.3 cannot be told
from a given 0.3; the CLI refuses --target-flops with --target-latency-ms); it cannot be combined with ``ratio``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from kcompress.optionbase import (
    DEFAULT_OPTIMIZER,
    SGD_WEIGHT_DECAY,
    STAGE_LR,
    OptionError,
    Options,
    check_at_least,
    check_positive,
    doc,
    lr_doc,
    opt,
    parse_augment,
    parse_block,
    parse_float_tuple,
    parse_temperature_schedule,
    stage_lr,
)
from kcompress.types import (
    Architecture,
    CacheTeacher,
    Criterion,
    Format,
    Granularity,
    IOType,
    LRSchedule,
    Optimizer,
    PruneMethod,
    PruneSchedule,
    QATPolicy,
    QuantMode,
    Strategy,
    StudentInit,
)

__all__ = [
    "OptionError",
    "Options",
    "DataOptions",
    "ModelOptions",
    "BaselineOptions",
    "DistillOptions",
    "PruneOptions",
    "QuantizeOptions",
    "QATOptions",
    "BenchmarkOptions",
    "ConvertOptions",
    "TrainOptions",
    "MonitorOptions",
    "doc",
    "parse_augment",
    "parse_block",
    "parse_temperature_schedule",
    "parse_float_tuple",
    "STAGE_LR",
]


@dataclass(frozen=True)
class DataOptions(Options):
    train: str = opt("digits:train", "training data: image folder, .npz (x, y) or built-in name")
    val: str = opt("digits:val", "validation data (VAL): chooses the best epoch, PTQ vs QAT, float layers; the gates "
                               "check it")
    test: Optional[str] = opt(None, "test data (TEST): reported only, chooses nothing; the final table leads with it")
    val_split: float = opt(0.0, "instead of val: carve this fraction of train out as VAL (stratified, seeded)")
    test_split: float = opt(0.0, "instead of test: carve this fraction of train out as TEST (stratified, seeded)")
    train_limit: Optional[int] = opt(None, "train on a stratified random subset of this many samples (quick runs)")
    scale: float = opt(1.0, "inputs are multiplied by this (a fraction such as 1/255 is fine)")
    offset: float = opt(0.0, "then this is added")
    mean: tuple[float, ...] = opt((0.0,), "then subtracted (one value, or one per channel: 123.7,116.3,103.5)")
    std: tuple[float, ...] = opt((1.0,), "then divided by (one value or one per channel)")

    def _check(self) -> None:
        check_at_least("train_limit", self.train_limit, 1)
        for key in ("val_split", "test_split"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise OptionError(key, "must be a fraction in [0, 1)")
        if self.val_split + self.test_split >= 1.0:
            raise OptionError("val_split", "val_split + test_split must leave some training data")
        if self.test_split and self.test:
            raise OptionError("test_split", "give test or test_split, not both")
        if any(s == 0 for s in self.std):
            raise OptionError("std", "must not be 0")

    def preprocess(self):
        """The :class:`kcompress.data.Preprocess` these settings describe."""
        from kcompress.data import Preprocess

        return Preprocess(scale=self.scale, offset=self.offset, mean=self.mean, std=self.std)

    def open(self, seed: int = 0):
        """The opened and checked :class:`kcompress.data.Splits` these settings describe."""
        from kcompress.data import open_splits

        return open_splits(self.train, None if self.val_split else self.val, self.test, val_split=self.val_split,
                           test_split=self.test_split, seed=seed, preprocess=self.preprocess(),
                           train_limit=self.train_limit)


@dataclass(frozen=True)
class TrainOptions(Options):
    """How every training stage trains (the pipeline's train stage, distill, the pruning fine-tunes, QAT): the
    optimizer, its learning-rate schedule over the stage's steps, and the augmentation of TRAIN batches. The
    learning rate itself is each stage's own ``lr`` (empty: :data:`STAGE_LR` for the optimizer).

    The default optimizer was chosen by measurement on digits (``tools/bench_recipes.py``: digits:train, best epoch
    on digits:val, 3 seeds): SGD with cosine did not clearly win. It lost to Adam training digits_cnn from scratch
    (5 epochs: Adam 1e-3 98.3%, SGD 0.02 98.1%, SGD 0.05 94.8%; 15 epochs: Adam 2e-3 99.3%, SGD 0.02 99.0%), won
    on a small BN CNN (15 epochs: SGD 0.1 98.8%, Adam 2e-3 98.3%) and in distillation (10 epochs: SGD 0.02 99.0%,
    Adam 1e-3 98.1%), and its best rate moved from stage to stage; so Adam at a constant rate stays the default.
    Adam with cosine was below Adam constant everywhere on digits; SGD cosine vs constant was mixed (distill 0.02:
    99.0% vs 98.8%; digits_cnn 5 epochs 0.02: 98.1% vs 98.4%), cosine is kept for sgd as in the usual recipe.

    ``strategy`` chooses the ``tf.distribute`` strategy of every stage (:mod:`kcompress.distributed`). Under a
    strategy of N replicas (GPUs, or workers of a ``TF_CONFIG`` cluster) each stage's ``batch_size`` is the GLOBAL
    batch, split across the replicas (``batch_size / N`` each per step), and the learning rate is NOT scaled:
    when you grow the batch with the replicas, scale ``lr`` yourself (linearly is the usual start, with
    ``warmup_epochs``).
    """

    augment: tuple[str, ...] = opt(("auto",), "augmentation of TRAIN batches, on the fly: flip, crop:PAD (reflect-pad "
                                             "then random crop), rotate:DEG, none, or auto (flip,crop:4 for image "
                                             "folders of at least 16x16, none for arrays: a flip can change a digit)")
    optimizer: Optimizer = opt(DEFAULT_OPTIMIZER, "the optimizer: sgd (Nesterov momentum), adamw or adam (adam: chosen "
                                              "by measurement on digits, see kcompress.options.TrainOptions)")
    momentum: float = opt(0.9, "the Nesterov momentum of sgd")
    weight_decay: Optional[float] = opt(None, "decay of the kernels (not biases, not BatchNorm): L2 for sgd and adam "
                                             "(the gradient term wd*w: tf_keras's kernel_regularizer=l2(5e-4) is "
                                             "1e-3), decoupled for adamw (empty: sgd 1e-3, adamw 0.01, adam 0)")
    lr_schedule: Optional[LRSchedule] = opt(None, "learning rate over a stage's steps: cosine (to 0 at the last "
                                                 "step) or constant (empty: cosine for sgd, as the usual SGD recipe; "
                                                 "constant for adam and adamw, which beat cosine on digits)")
    warmup_epochs: float = opt(0.0, "linear learning-rate warm-up from 0 over this many epochs, then the schedule")
    strategy: Strategy = opt(Strategy.AUTO, "tf.distribute strategy of every training stage: auto "
                                            "(multi_worker when TF_CONFIG names a cluster, mirrored with 2+ GPUs, "
                                            "else one device), none, mirrored or multi_worker; batch_size is "
                                            "the global batch, lr is not scaled")

    def _check(self) -> None:
        try:
            parse_augment(self.augment)
        except ValueError as e:
            raise OptionError("augment", str(e)) from None
        if not 0.0 <= self.momentum < 1.0:
            raise OptionError("momentum", f"must be in [0, 1), got {self.momentum}")
        if self.weight_decay is not None and not 0.0 <= self.weight_decay < 1.0:
            raise OptionError("weight_decay", f"must be in [0, 1), got {self.weight_decay}")
        check_at_least("warmup_epochs", self.warmup_epochs, 0)

    @property
    def augment_steps(self) -> tuple[tuple[str, Any], ...]:
        """The parsed augmentation (see :func:`parse_augment`)."""
        return parse_augment(self.augment)

    @property
    def schedule(self) -> LRSchedule:
        """``lr_schedule``, or the optimizer's default."""
        if self.lr_schedule is not None:
            return self.lr_schedule
        return LRSchedule.COSINE if self.optimizer == Optimizer.SGD else LRSchedule.CONSTANT

    @property
    def decay(self) -> float:
        """``weight_decay``, or the optimizer's default."""
        if self.weight_decay is not None:
            return self.weight_decay
        return {Optimizer.SGD: SGD_WEIGHT_DECAY, Optimizer.ADAMW: 0.01}.get(self.optimizer, 0.0)


@dataclass(frozen=True)
class ModelOptions(Options):
    path: Optional[str] = opt(None, "the trained model to compress (SavedModel folder, .h5 or .keras; Keras 2 or 3)")
    architecture: Optional[Architecture] = opt(None, "instead of path: train this built-in model first "
                                                    "(digits_cnn, resnet_cifar, mobilenetv2)")
    epochs: int = opt(15, "training epochs when architecture is given")
    lr: Optional[float] = opt(None, lr_doc("learning rate when architecture is given", "train"))
    batch_size: int = opt(64, "batch size when architecture is given")

    def _check(self) -> None:
        check_at_least("epochs", self.epochs, 1)
        check_positive("lr", self.lr)
        check_at_least("batch_size", self.batch_size, 1)

    def rate(self, optimizer: Any = None) -> float:
        """``lr``, or the training rate that suits ``optimizer``."""
        return stage_lr("train", self.lr, optimizer)


@dataclass(frozen=True)
class BaselineOptions(Options):
    batch_sizes: tuple[int, ...] = opt((1, 8), "batch sizes timed for the Keras model and its fp32 .tflite")
    threads: int = opt(1, "interpreter threads for the .tflite timings")
    runs: int = opt(30, "timed runs per configuration (after warm-up)")
    warmup: int = opt(5, "warm-up runs, not timed")

    def _check(self) -> None:
        check_at_least("threads", self.threads, 1)
        check_at_least("runs", self.runs, 1)
        check_at_least("warmup", self.warmup, 0)


@dataclass(frozen=True)
class DistillOptions(Options):
    enabled: bool = opt(False, "pipeline: train a smaller student from the model (the teacher)")
    student: Optional[str] = opt(None, "a student model file (fresh or pre-trained); when empty, derive one from the "
                                      "teacher with student_width")
    student_width: float = opt(0.5, "width multiplier of every conv/dense layer of the derived student (0 < W < 1)")
    # auto (the teacher's channels) chosen on VAL: CIFAR-10, ResNet-20-style teacher (77.90% VAL), half-width student,
    # 15 epochs, SGD, flip+crop (tools/bench_recipe_distill.py, seeds 0, 1): teacher-initialised 77.74 / 77.78% VAL
    # (lr 0.05; TEST 77.40 / 77.66), scratch 77.02 / 77.02% VAL (lr 0.1, L2 1e-3; TEST 76.91 / 76.96); digits
    # (digits_cnn width 16, 98.6% VAL): VAL after 1 epoch 96.9% vs 61.8%, after 3 epochs 98.3% vs 92.5%.
    student_init: StudentInit = opt(StudentInit.AUTO, "weights of the derived student: teacher (each layer keeps the "
                                                      "teacher's channels of largest L1 norm), scratch (fresh), or "
                                                      "auto (teacher where its channels can be cut, else scratch)")
    temperature: float = opt(4.0, "softmax temperature T of the distillation loss")
    alpha: float = opt(0.5, "weight of the label cross-entropy; 1 - alpha weighs T^2 * KL(teacher || student)")
    temperature_schedule: str = opt("constant", "constant, or linear:HIGH:LOW / cosine:HIGH:LOW across the epochs")
    epochs: int = opt(10, "student training epochs")
    batch_size: int = opt(64, "batch size")
    lr: Optional[float] = opt(None, lr_doc("learning rate", "distill"))
    patience: Optional[int] = opt(None, "stop after this many epochs without a better VAL accuracy (empty: never)")
    cache_teacher: CacheTeacher = opt(CacheTeacher.AUTO, "where the teacher's outputs are cached: auto, memory, disk "
                                                        "or off (the teacher runs every step)")
    min_teacher_accuracy: Optional[float] = opt(None, "refuse a teacher below this VAL accuracy (0-1; empty: chance "
                                                     "+ 0.10)")
    max_drop: float = opt(3.0, "largest accuracy drop (points) of the student below the teacher on VAL; more is an "
                              "error (exit 1, the student is still written)")

    def _check(self) -> None:
        if not 0 < self.student_width < 1:
            raise OptionError("student_width", f"must be between 0 and 1 (exclusive), got {self.student_width}")
        check_positive("temperature", self.temperature)
        if not 0.0 <= self.alpha <= 1.0:
            raise OptionError("alpha", f"must be between 0 and 1, got {self.alpha}")
        try:
            parse_temperature_schedule(self.temperature_schedule, self.temperature)
        except ValueError as e:
            raise OptionError("temperature_schedule", str(e)) from None
        check_at_least("epochs", self.epochs, 1)
        check_at_least("batch_size", self.batch_size, 1)
        check_positive("lr", self.lr)
        check_at_least("patience", self.patience, 1)
        if self.min_teacher_accuracy is not None and not 0 <= self.min_teacher_accuracy <= 1:
            raise OptionError("min_teacher_accuracy", f"must be between 0 and 1, got {self.min_teacher_accuracy}")

    def rate(self, optimizer: Any = None) -> float:
        """``lr``, or the distillation rate that suits ``optimizer``."""
        return stage_lr("distill", self.lr, optimizer)


CHANNEL_MULTIPLE_AUTO = 0  # PruneOptions.channel_multiple "auto": measure the host's tile (kcompress.pruning.tiles)
EPOCHS_PER_ROUND = 3  # structured pruning: fewer, longer fine-tunes beat many one-epoch rounds at a small budget


@dataclass(frozen=True)
class PruneOptions(Options):
    enabled: bool = opt(False, "pipeline: prune the model")
    method: PruneMethod = opt(PruneMethod.STRUCTURED, "structured (removes channels: faster) or magnitude (sparse "
                                                     "weights: smaller after gzip)")
    target_flops: float = opt(0.3, "structured: fraction of FLOPs to remove (0 < f < 1)")
    ratio: Optional[float] = opt(None, "structured: fraction of channels to remove in every group (replaces "
                                      "target_flops)")
    criterion: Criterion = opt(Criterion.L1, "structured: channel importance l1, l2, bn or taylor")
    rounds: Optional[int] = opt(None, "structured: remove the target in this many steps with fine-tuning between "
                                     "(empty: at most 20% of the FLOPs per step, at least 3 fine-tuning epochs per step; "
                                     "one step for block and both)")
    # auto measured on a 2-core Intel Xeon (AVX-512): 16; ResNet-20 at 50% of the FLOPs then ran 1.72x faster (fp32,
    # after 6 fine-tuning epochs) instead of 1.28x, but ended at 74.94% VAL instead of 78.88% (groups of 16-64 channels
    # rounded to 16), so the default is 1 (kcompress.pruning.tiles); wider models were not measured
    channel_multiple: int = opt(1, "structured: round kept channel counts up to a multiple of this; auto (or 0): "
                                   "the SIMD tile of this host's LiteRT conv kernels, measured (16 on AVX-512)")
    granularity: Granularity = opt(Granularity.CHANNEL, "structured: what goes: channel, block (whole identity "
                                                       "residual blocks, least VAL loss per MAC first) or both "
                                                       "(blocks for block_share of each step's target, channels the rest)")
    # 0.75 chosen on VAL: CIFAR-10, the ResNet-20-style teacher of configs/cifar10_20x.yaml (80.02% VAL), 50% of the
    # FLOPs, 6 sgd epochs (tools/bench_recipe_prune.py): VAL after pruning 79.66% with share 0.5, 80.14% with 0.75
    # (79.26% with 0.75 and channel_multiple 8); its .tflite ran faster too (CHANGELOG), blocks taking their ops along
    block_share: float = opt(0.75, "structured, granularity both: the share of each step's MACs reduction taken by "
                                   "whole blocks (fewer ops: more speed per MAC), channels doing the rest")
    target_latency_ms: Optional[float] = opt(None, "structured: instead of target_flops, prune until the fp32 "
                                                  ".tflite's p50 latency on this host (LiteRT, 1 thread, batch 1) is "
                                                  "at most this (ms)")
    latency_reference: Optional[str] = opt(None, "structured, with target_latency_ms: a benchmark JSON of the input "
                                                  "model's fp32 .tflite on the target device (kcompress device bench "
                                                  "--threads 1 -o FILE); the target is then that device's ms, turned "
                                                  "into this host's by the ratio of the input's two p50s")
    sparsity: float = opt(0.5, "magnitude: final sparsity (0 <= s < 1)")
    schedule: PruneSchedule = opt(PruneSchedule.POLYNOMIAL, "magnitude: polynomial (ramps up) or constant")
    initial_sparsity: float = opt(0.0, "magnitude: sparsity where the polynomial schedule starts")
    block: Optional[str] = opt(None, "magnitude: M:N block sparsity such as 2:4 (M zeros in every N weights)")
    skip: tuple[str, ...] = opt((), "magnitude: layers kept dense (names, regexes, first or last)")
    epochs: int = opt(4, "fine-tuning epochs in total")
    batch_size: int = opt(64, "batch size")
    lr: Optional[float] = opt(None, "fine-tuning learning rate (empty: suits the method and train.optimizer: "
                                   "structured 1e-3, magnitude 1e-4 with adam/adamw; 0.02, 0.01 with sgd)")
    # off by default: measured on CIFAR-10 (0.35-width distilled ResNet-20, two blocks removed, 4 epochs, SGD 0.02) it
    # did not beat the labels: 75.04% VAL (75.21% TEST) with the 78.30% teacher vs 75.72% VAL (75.63% TEST) without
    teacher: Optional[str] = opt(None, "structured: fine-tune against this model's outputs as well as the labels "
                                        "(knowledge distillation with the distill section's temperature and alpha): "
                                        "a model file, or baseline (a pipeline's input model); empty: labels only")
    max_drop: float = opt(1.5, "largest accuracy drop (points) from the input model on VAL; more is an error (exit "
                              "1, the pruned model is still written)")

    def __post_init__(self) -> None:
        m = self.channel_multiple
        if isinstance(m, str) and (m.strip().lower() == "auto" or m.strip().isdigit()):
            object.__setattr__(self, "channel_multiple", CHANNEL_MULTIPLE_AUTO if m.strip().lower() == "auto"
                               else int(m))
        super().__post_init__()

    def _check(self) -> None:
        if self.teacher is not None and self.method == PruneMethod.MAGNITUDE:
            raise OptionError("teacher", "applies to method structured only (magnitude fine-tunes on labels)")
        if not 0 < self.target_flops < 1:
            raise OptionError("target_flops", f"must be between 0 and 1 (exclusive), got {self.target_flops}")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise OptionError("ratio", f"must be in [0, 1), got {self.ratio}")
        check_at_least("rounds", self.rounds, 1)
        check_at_least("channel_multiple", self.channel_multiple, CHANNEL_MULTIPLE_AUTO)
        if not 0 < self.block_share <= 1:
            raise OptionError("block_share", f"must be in (0, 1], got {self.block_share}")
        check_positive("target_latency_ms", self.target_latency_ms)
        if self.latency_reference is not None and self.target_latency_ms is None:
            raise OptionError("latency_reference", "needs target_latency_ms (the target on that device, in ms)")
        if self.target_latency_ms is not None and self.ratio is not None:
            raise OptionError("target_latency_ms", "give target_latency_ms or ratio, not both")
        if self.ratio is not None and self.granularity != Granularity.CHANNEL:
            raise OptionError("granularity", f"{self.granularity} needs target_flops or target_latency_ms, not ratio")
        if self.method == PruneMethod.MAGNITUDE and (self.target_latency_ms is not None
                                                     or self.granularity != Granularity.CHANNEL):
            raise OptionError("target_latency_ms" if self.target_latency_ms is not None else "granularity",
                              "applies to method structured only")
        if not 0.0 <= self.sparsity < 1.0:
            raise OptionError("sparsity", f"must be in [0, 1), got {self.sparsity}")
        if not 0.0 <= self.initial_sparsity <= self.sparsity:
            raise OptionError("initial_sparsity", f"must be between 0 and sparsity ({self.sparsity})")
        try:
            parse_block(self.block)
        except ValueError as e:
            raise OptionError("block", str(e)) from None
        check_at_least("epochs", self.epochs, 0 if self.method == PruneMethod.STRUCTURED else 1)
        check_at_least("batch_size", self.batch_size, 1)
        check_positive("lr", self.lr)

    @property
    def learning_rate(self) -> float:
        """The fine-tuning rate with the default optimizer (see :meth:`rate`)."""
        return self.rate()

    def rate(self, optimizer: Any = None) -> float:
        """``lr``, or the fine-tuning rate that suits the method and ``optimizer``."""
        return stage_lr("magnitude" if self.method == PruneMethod.MAGNITUDE else "structured", self.lr, optimizer)

    @property
    def block_shape(self) -> Optional[tuple[int, int]]:
        return parse_block(self.block)

    @property
    def target_sparsity(self) -> float:
        """The sparsity each magnitude-pruned layer ends with (M/N for block sparsity)."""
        b = self.block_shape
        return b[0] / b[1] if b else self.sparsity

    @property
    def amount(self) -> float:
        """The structured target in force: ``ratio`` when set, else ``target_flops``."""
        return self.ratio if self.ratio is not None else self.target_flops

    def num_rounds(self) -> int:
        """``rounds``, or enough rounds of at most 20% each, but at least :data:`EPOCHS_PER_ROUND` fine-tuning epochs
        per round (measured on CIFAR-10, ResNet-20, 50% of FLOPs in 3 epochs: one round of 3 epochs lost 1.38 TEST
        points, three rounds of one epoch 2.56); with ``target_latency_ms`` (whose FLOPs share is not known
        beforehand) 2, at most one per epoch. With ``granularity`` block or both and a FLOPs target: one round (CIFAR-10, ResNet-20, 50%
        of FLOPs, 6 epochs: block lost 0.67 TEST points in one round and 7.42 in two; both 0.67 and 8.20; the second
        round removes blocks that cost 26-31 VAL points when bypassed, with half the epochs left to recover)."""
        if self.rounds is not None:
            return self.rounds
        if self.target_latency_ms is not None:
            return min(2, max(1, self.epochs))
        if self.granularity != Granularity.CHANNEL:
            return 1
        k = max(1, math.ceil(self.amount / 0.2 - 1e-9))
        return min(k, max(1, self.epochs // EPOCHS_PER_ROUND))


@dataclass(frozen=True)
class QuantizeOptions(Options):
    enabled: bool = opt(True, "pipeline: quantize and convert to .tflite")
    mode: QuantMode = opt(QuantMode.INT8, "int8 (full integer), int16x8 (int16 activations), int4-weights (int4 conv/dense "
                                         "weights, int8 activations; kcompress[aeq]), float16, dynamic (int8 "
                                         "weights, float activations) or fp32 (no quantization)")
    calibration_samples: int = opt(200, "representative samples for int8 calibration (stratified, seeded)")
    per_channel: bool = opt(True, "per-channel weight scales (false: one scale per tensor)")
    io: Optional[IOType] = opt(None, "input/output type of int8 models: int8, uint8 or float (empty: int8 for mode "
                                    "int8, float otherwise)")
    float_layers: tuple[str, ...] = opt((), "Keras layers kept in float: names, first, last (the first/last layer "
                                           "with weights), or auto (the fewest, most sensitive, within max_drop)")
    max_drop: float = opt(1.0, "largest accuracy drop (points) quantization may cause on VAL: the budget of "
                              "float_layers auto and of the QAT decision, and the pipeline's gate")
    qat: QATPolicy = opt(QATPolicy.AUTO, "pipeline: auto (QAT only when PTQ misses max_drop, keeping the better), "
                                        "never or always")
    recipe: Optional[str] = opt(None, "int4-weights: weights per layer, a JSON/YAML file of rules ({layers: names "
                                     "or regex, weights: int4|int8|float}), or auto (int4/int8/float chosen per "
                                     "layer within max_drop on VAL); empty: every conv/dense layer int4")

    def _check(self) -> None:
        check_at_least("calibration_samples", self.calibration_samples, 1)
        if self.io in (IOType.INT8, IOType.UINT8) and self.mode != QuantMode.INT8:
            raise OptionError("io", f"{self.io} needs mode int8 (mode {self.mode} keeps float inputs)")
        if self.float_layers and self.mode != QuantMode.INT8:
            raise OptionError("float_layers", "applies to mode int8 only")
        if "auto" in self.float_layers and len(self.float_layers) > 1:
            raise OptionError("float_layers", "auto cannot be combined with layer names")
        if self.recipe is not None and self.mode != QuantMode.INT4_WEIGHTS:
            raise OptionError("recipe", "applies to mode int4-weights only")

    @property
    def io_type(self) -> IOType:
        if self.io is not None:
            return self.io
        return IOType.INT8 if self.mode in (QuantMode.INT8, QuantMode.INT4_WEIGHTS) else IOType.FLOAT

    @property
    def auto_float_layers(self) -> bool:
        return self.float_layers == ("auto",)


@dataclass(frozen=True)
class QATOptions(Options):
    epochs: int = opt(3, "quantization-aware fine-tuning epochs (0: calibrate only)")
    lr: Optional[float] = opt(None, lr_doc("QAT learning rate, about 10x below fine-tuning", "qat"))
    batch_size: int = opt(64, "batch size")
    preserve_sparsity: Optional[bool] = opt(None, "keep a pruned model's zeros through QAT (empty: when at least 20% "
                                                 "of its kernel weights are zero)")
    max_tflite_drop: float = opt(1.0, "warn when the int8 .tflite is this many points below the Keras QAT model")

    def _check(self) -> None:
        check_at_least("epochs", self.epochs, 0)
        check_positive("lr", self.lr)
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("max_tflite_drop", self.max_tflite_drop, 0)

    def rate(self, optimizer: Any = None) -> float:
        """``lr``, or the QAT rate that suits ``optimizer``."""
        return stage_lr("qat", self.lr, optimizer)


@dataclass(frozen=True)
class BenchmarkOptions(Options):
    threads: tuple[int, ...] = opt((1, 2), "interpreter thread counts to time")
    batch_sizes: tuple[int, ...] = opt((1,), "batch sizes to time")
    runs: int = opt(100, "timed runs per configuration")
    warmup: int = opt(10, "warm-up runs, not timed")
    trials: int = opt(5, "repeated trials of RUNS timed runs each; the p50 is reported with its range over them")

    def _check(self) -> None:
        check_at_least("runs", self.runs, 1)
        check_at_least("warmup", self.warmup, 0)
        check_at_least("trials", self.trials, 1)


@dataclass(frozen=True)
class ConvertOptions(Options):
    """Which deployable files the pipeline's quantize stage writes. ``tflite`` is always written (the stage chooses
    PTQ vs QAT and float layers on it); ``onnx`` adds ``model.onnx`` for ONNX Runtime beside it: the same Keras
    model exported with tf2onnx (checked against Keras on VAL), then quantized by ONNX Runtime with the same
    stratified calibration samples (QDQ, per-channel unless ``quantize.per_channel`` is false). ONNX gets
    ``quantize.mode`` where ONNX Runtime has it (int8, dynamic); fp32 and float16 write the fp32 export; int16x8
    and int4-weights, which ONNX Runtime's CPU kernels lack, write int8 and say so. The ONNX file is measured
    (VAL, TEST, latency) and gated by ``quantize.max_drop`` like the ``.tflite``; the report shows both."""

    formats: tuple[str, ...] = opt(("tflite",), "files the quantize stage writes: tflite, or tflite and onnx")
    onnx_opset: int = opt(17, "ONNX opset of the export")

    def _check(self) -> None:
        known = {f.value for f in Format}
        bad = [f for f in self.formats if f not in known]
        if bad:
            raise OptionError("formats", f"{bad[0]!r} is not one of {', '.join(sorted(known))}")
        if Format.TFLITE.value not in self.formats:
            raise OptionError("formats", "must include tflite (the pipeline chooses its quantization on it)")
        check_at_least("onnx_opset", self.onnx_opset, 13)


@dataclass(frozen=True)
class MonitorOptions(Options):
    """Thresholds of the drift tests (:func:`kcompress.monitor`, ``kcompress monitor``). PSI, the population
    stability index, reads by the usual rule: below 0.1 no significant change, 0.1-0.25 a moderate one (reported as
    ``warn``), above 0.25 a significant one (``drift``)."""

    psi_warn: float = opt(0.1, "confidence and class PSI above this is a moderate change (warn)")
    psi_drift: float = opt(0.25, "confidence PSI above this is drift (0.25: the usual 'significant change')")
    class_psi_drift: float = opt(0.25, "PSI of the predicted-class frequencies above this is drift (so is one above "
                                       "psi_warn whose chi-square p is below alpha)")
    alpha: float = opt(0.01, "significance level of the KS test (confidences) and the chi-square test (classes)")
    ks_min_statistic: float = opt(0.1, "KS drift also needs its statistic (largest CDF gap) at least this (p alone "
                                       "flags negligible shifts on large samples)")
    input_mean_shift: float = opt(0.5, "drift when an input channel's mean moves more than this many reference stds")
    input_std_ratio: float = opt(1.5, "drift when an input channel's std grows or shrinks by more than this factor")
    bins: int = opt(10, "PSI bins of the confidences, cut at the reference's quantiles")

    def _check(self) -> None:
        for key in ("psi_warn", "psi_drift", "class_psi_drift", "input_mean_shift"):
            check_positive(key, getattr(self, key))
        if self.psi_warn > self.psi_drift:
            raise OptionError("psi_warn", f"must not exceed psi_drift ({self.psi_drift}), got {self.psi_warn}")
        if not 0.0 < self.alpha < 1.0:
            raise OptionError("alpha", f"must be a probability in (0, 1), got {self.alpha}")
        if not 0.0 <= self.ks_min_statistic <= 1.0:
            raise OptionError("ks_min_statistic", f"must be in [0, 1], got {self.ks_min_statistic}")
        if not self.input_std_ratio > 1.0:
            raise OptionError("input_std_ratio", f"must be > 1 (a factor either way), got {self.input_std_ratio}")
        check_at_least("bins", self.bins, 2)
