"""The enums of kcompress's settings: every mode, method, criterion and target a user can name.

Each is a ``str`` enum, so ``QuantMode.INT8 == "int8"`` holds, YAML and JSON see plain strings, and ``str()`` /
f-strings give the value (``"int8"``), not ``"QuantMode.INT8"``.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "StrEnum",
    "QuantMode",
    "IOType",
    "QATPolicy",
    "PruneMethod",
    "Criterion",
    "Granularity",
    "PruneSchedule",
    "CacheTeacher",
    "StudentInit",
    "Optimizer",
    "LRSchedule",
    "Strategy",
    "Target",
    "Architecture",
    "Delegate",
    "Sampler",
    "SweepBackend",
    "Objective",
    "Runtime",
    "Format",
]


class StrEnum(str, Enum):
    """A str enum whose ``str()`` and ``format()`` are the value (as ``enum.StrEnum`` in Python 3.11+)."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class QuantMode(StrEnum):
    """What the TFLite converter is asked for. ``fp32`` is no quantization (the reference)."""

    FP32 = "fp32"
    DYNAMIC = "dynamic"  # int8 weights, float activations quantized on the fly
    FLOAT16 = "float16"  # float16 weights (GPU delegates)
    INT8 = "int8"  # full integer, calibrated on representative samples
    INT16X8 = "int16x8"  # int16 activations, int8 weights
    INT4_WEIGHTS = "int4-weights"  # int4 conv/dense weights, int8 activations (ai-edge-quantizer)


class IOType(StrEnum):
    """Input/output tensor type of a full-integer model."""

    INT8 = "int8"
    UINT8 = "uint8"
    FLOAT = "float"


class QATPolicy(StrEnum):
    """When the pipeline's quantize stage runs quantization-aware training."""

    AUTO = "auto"  # only when post-training int8 misses the stage's max_drop; the better on VAL is kept
    NEVER = "never"
    ALWAYS = "always"


class PruneMethod(StrEnum):
    STRUCTURED = "structured"  # removes whole channels: a smaller, faster dense model
    MAGNITUDE = "magnitude"  # sparse weights (tfmot): smaller after compression, same latency


class Criterion(StrEnum):
    """Channel importance for structured pruning."""

    L1 = "l1"
    L2 = "l2"
    BN = "bn"  # |gamma| of the BatchNormalization after the conv
    TAYLOR = "taylor"  # |activation x gradient|, from a few training batches


class Granularity(StrEnum):
    """What structured pruning removes."""

    CHANNEL = "channel"  # filters/channels (every group keeps some)
    BLOCK = "block"  # whole identity residual blocks (the least important on VAL first)
    BOTH = "both"  # blocks for half of the target, then channels for the rest


class PruneSchedule(StrEnum):
    POLYNOMIAL = "polynomial"
    CONSTANT = "constant"


class StudentInit(StrEnum):
    """Where a width-derived student's weights come from."""

    AUTO = "auto"  # teacher when the teacher has channel groups that can be cut, else scratch (said in the log)
    SCRATCH = "scratch"  # freshly initialised
    TEACHER = "teacher"  # the teacher's most important channels (structured pruning's L1 ranking)


class CacheTeacher(StrEnum):
    """Where distillation keeps the teacher's outputs."""

    AUTO = "auto"  # memory or disk by size
    MEMORY = "memory"
    DISK = "disk"
    OFF = "off"  # the teacher runs every step


class Optimizer(StrEnum):
    """The optimizer of every training stage (the ``train`` section)."""

    SGD = "sgd"  # Nesterov momentum; weight decay as L2 on the kernels' gradients
    ADAMW = "adamw"  # Adam with decoupled weight decay
    ADAM = "adam"  # weight decay (when given) as L2 on the kernels' gradients


class LRSchedule(StrEnum):
    """How a training stage's learning rate moves over its steps (after the linear warm-up)."""

    COSINE = "cosine"  # half a cosine from the stage's rate to 0 at its last step
    CONSTANT = "constant"


class Strategy(StrEnum):
    """The ``tf.distribute`` strategy of every training stage (see :mod:`kcompress.distributed`)."""

    AUTO = "auto"  # multi_worker when TF_CONFIG names a cluster of several tasks, mirrored with 2+ GPUs, else none
    NONE = "none"  # TensorFlow's default strategy: one device
    MIRRORED = "mirrored"  # MirroredStrategy over this machine's GPUs (at least 2)
    MULTI_WORKER = "multi_worker"  # MultiWorkerMirroredStrategy over the cluster in TF_CONFIG


class Target(StrEnum):
    """Deployment targets ``recommend`` plans for."""

    MOBILE_CPU = "mobile-cpu"
    MOBILE_GPU = "mobile-gpu"
    EDGE_TPU = "edge-tpu"
    MCU = "mcu"
    SERVER_CPU = "server-cpu"


class Architecture(StrEnum):
    """Built-in models the pipeline can train first (``kcompress.zoo``)."""

    DIGITS_CNN = "digits_cnn"
    RESNET_CIFAR = "resnet_cifar"
    MOBILENETV2 = "mobilenetv2"


class Delegate(StrEnum):
    """LiteRT delegates of ``benchmark_model`` on Android."""

    CPU = "cpu"
    XNNPACK = "xnnpack"
    GPU = "gpu"
    NNAPI = "nnapi"


class Sampler(StrEnum):
    """How ``kcompress sweep`` picks its trials (Optuna samplers)."""

    GRID = "grid"  # every combination of the listed values
    RANDOM = "random"
    NSGA2 = "nsga2"  # multi-objective genetic search; the default when the space has a continuous range


class SweepBackend(StrEnum):
    """Where a sweep's trials run."""

    LOCAL = "local"  # processes on this machine
    RAY = "ray"  # Ray tasks (a local instance, or the cluster at --address)


class Runtime(StrEnum):
    """What runs a model when kcompress evaluates or times it."""

    LITERT = "litert"  # the LiteRT interpreter (.tflite)
    ONNXRUNTIME = "onnxruntime"  # ONNX Runtime, CPU execution provider (.onnx)
    KERAS = "keras"  # the Keras model itself in TensorFlow (the float reference)


class Format(StrEnum):
    """The deployable file a model is written as."""

    TFLITE = "tflite"
    ONNX = "onnx"


class Objective(StrEnum):
    """What a sweep's Pareto front trades off."""

    ACCURACY = "accuracy"
    SIZE = "size"
    LATENCY = "latency"
