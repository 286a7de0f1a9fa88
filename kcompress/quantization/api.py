"""The Python API of quantization: :func:`quantize` (post-training), :func:`qat` and :func:`sensitivity`.

Each takes what the CLI takes (paths, data specs) or loaded objects, and returns a frozen result whose fields hold
everything the command prints. ``save(path, overwrite=False)`` writes the ``.tflite``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from kcompress.bench.schema import SpeedUp, clearly_slower, speedup
from kcompress.errors import UsageError
from kcompress.evaluation import BeforeAfter
from kcompress.inputs import as_data, as_model, as_splits, describe, preprocess_of, resolve_options
from kcompress.options import QATOptions, QuantizeOptions, TrainOptions
from kcompress.types import QuantMode

__all__ = ["QuantizeResult", "SensitivityResult", "quantize", "qat", "sensitivity", "SLOWER_MARGIN"]

SLOWER_MARGIN = 1.05  # slower than fp32: every trial p50 above fp32's, and the median p50 this many times fp32's


def _quiet(_msg: str) -> None:
    pass


@dataclass(frozen=True)
class QuantizeResult(BeforeAfter):
    """Post-training quantization of one model, evaluated before (Keras or fp32) and after (the ``.tflite`` in
    LiteRT) on the same data. Latencies are p50 at 1 thread, batch 1, on this host: ``latency_*_ms`` the median of
    the ``latency_*_trials_ms`` (the p50s of trials timed interleaved, fp32 and quantized in turn)."""

    tflite: bytes = field(repr=False)
    fp32_tflite: bytes = field(repr=False)
    options: QuantizeOptions  # as applied: float layers resolved to names
    model: str
    data: str
    before: Any = field(repr=False)  # Evaluation of the source model (Keras, or its fp32 .tflite for exports)
    after: Any = field(repr=False)  # Evaluation of the quantized .tflite
    source_bytes: Optional[int]
    latency_fp32_ms: float
    latency_ms: float
    float_layer_plan: Optional[dict] = None  # what float_layers auto chose and why
    latency_fp32_trials_ms: tuple = ()  # per-trial p50s; empty: the single value above
    latency_trials_ms: tuple = ()
    test: Optional[dict] = None  # before_accuracy / after_accuracy on TEST (chose nothing), when given
    metadata_bytes: int = 0  # kcompress's metadata in ``tflite`` (preprocessing, class names)
    precision: Optional[dict] = None  # int4-weights: per-layer weights, int8 comparison, slower_than (aeq.py)

    @property
    def smaller_but_slower(self) -> Optional[str]:
        """int4-weights: one line when the file is smaller than int8/fp32 but measured slower than them, else None."""
        slower = (self.precision or {}).get("slower_than") or []
        if not slower:
            return None
        p = self.precision
        return (f"{self.options.mode} is smaller ({self.size_bytes} bytes; int8 {p['int8_bytes']}, fp32 "
                f"{self.fp32_size_bytes}) but measured SLOWER than {' and '.join(slower)} here (p50 "
                f"{self.latency_ms:.3f} ms; int8 {p['latency_int8_ms']:.3f}, fp32 {self.latency_fp32_ms:.3f}; 1 "
                "thread): LiteRT's XNNPACK has no int4 conv/dense kernels. Choose it for size, not speed.")

    @property
    def size_bytes(self) -> int:
        """The model's bytes, without kcompress's metadata entry."""
        return len(self.tflite) - self.metadata_bytes

    @property
    def fp32_size_bytes(self) -> int:
        return len(self.fp32_tflite)

    @property
    def size_ratio(self) -> float:
        """Quantized size over the fp32 ``.tflite``'s (0.26 = about 4x smaller)."""
        return self.size_bytes / self.fp32_size_bytes

    @property
    def speedup(self) -> SpeedUp:
        """fp32 p50 over the quantized p50 per pair of trials, with its interval: above 1 is a speed-up."""
        return speedup(self.latency_fp32_trials_ms or (self.latency_fp32_ms,),
                       self.latency_trials_ms or (self.latency_ms,))

    @property
    def latency_ratio(self) -> float:
        """The median of :attr:`speedup`'s ratios; print it with its interval (``speedup.text()``)."""
        return self.speedup.median

    @property
    def slower(self) -> bool:
        """Slower than fp32 beyond the noise: the trials' p50 ranges do not overlap (and the medians differ by
        ``SLOWER_MARGIN``). Overlapping ranges give no verdict."""
        return clearly_slower(self.latency_fp32_trials_ms or (self.latency_fp32_ms,),
                              self.latency_trials_ms or (self.latency_ms,), SLOWER_MARGIN)

    @property
    def hint(self) -> Optional[str]:
        """Advice when the quantized model measured slower than fp32 (:attr:`slower`), else None."""
        if not self.slower:
            return None
        mode, s = self.options.mode, self.speedup
        return (f"{mode} measured {1 / s.median:.2f}x SLOWER than fp32 here ({1 / s.high:.2f}-{1 / s.low:.2f}x over "
                f"{s.trials} trial{'s' if s.trials != 1 else ''}; 1 thread, batch 1). "
                + ("Dynamic-range kernels quantize activations on the fly; try mode int8. "
                   if mode == QuantMode.DYNAMIC else "")
                + "Measure on the target device before choosing (kcompress device bench).")

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "options": self.options.to_dict(),
                "accuracy_before": self.before.accuracy, "accuracy_after": self.after.accuracy,
                "accuracy_delta": self.accuracy_delta, "samples": self.after.metrics["num_samples"],
                "source_bytes": self.source_bytes, "fp32_tflite_bytes": self.fp32_size_bytes,
                "size_bytes": self.size_bytes, "size_ratio": self.size_ratio,
                "latency_fp32_p50_ms": self.latency_fp32_ms, "latency_p50_ms": self.latency_ms,
                "latency_fp32_p50_trials_ms": list(self.latency_fp32_trials_ms),
                "latency_p50_trials_ms": list(self.latency_trials_ms), "latency_ratio": self.latency_ratio,
                "speedup": self.speedup.to_dict(), "hint": self.hint, "float_layer_plan": self.float_layer_plan,
                "test": self.test, "metadata_bytes": self.metadata_bytes, "precision": self.precision,
                "smaller_but_slower": self.smaller_but_slower}

    def save(self, path: str, overwrite: bool = False) -> str:
        from kcompress.io import atomic_write_bytes

        atomic_write_bytes(path, self.tflite, overwrite=overwrite)
        return path


def quantize(model, data, mode: Optional[str] = None, *, val_data=None, test_data=None, test_split: float = 0.0,
             options: Optional[QuantizeOptions] = None, preprocess=None, limit: Optional[int] = None, seed: int = 0, log: Callable[[str], None] = _quiet,
             trust_model: bool = False, recipe=None, **option_fields) -> QuantizeResult:
    """Post-training quantization of ``model`` to a ``.tflite``, calibrated on ``data`` and checked in LiteRT.

    ``model``: a path (Keras 2/3 file, SavedModel, or a Keras 3 ``model.export()`` folder) or a Keras model; a
    file with ``Lambda`` layers or unregistered custom classes is refused unless ``trust_model=True`` (as in every
    function that takes a model path; see :func:`kcompress.io.load_model`).
    ``data``: calibration data (a spec or a DataSource); evaluation is on ``val_data`` when given, else on ``data``.
    Settings come from ``options`` and/or keywords of :class:`~kcompress.options.QuantizeOptions` (``mode="int8"``,
    ``float_layers=("auto",)``, ``max_drop=0.3`` ...). ``limit`` evaluates a stratified, seeded subset only.
    ``test_data`` (or ``test_split`` of ``data``): TEST, which chose nothing; before and after are measured on it
    too (``result.test``). The ``.tflite`` carries the preprocessing and class names as metadata.
    ``mode="int4-weights"`` (needs ``kcompress[aeq]``): int4 conv/dense weights, int8 activations; ``recipe``
    sets weights per layer (rules, a JSON/YAML file, or ``"auto"``: chosen within ``max_drop`` on VAL; see
    :mod:`kcompress.quantization.aeq`). ``result.precision`` holds the per-layer weights as found in the file, the
    int8 file's size and latency, and ``slower_than`` (see ``result.smaller_but_slower``).
    """
    from kcompress import __version__
    from kcompress.bench.host import bench_tflite_many
    from kcompress.data import check_fits
    from kcompress.evaluation import evaluate, test_figures
    from kcompress.io import model_format, path_size
    from kcompress.litert.interpreter import TFLiteModel
    from kcompress.modelinfo import input_shape, num_classes
    from kcompress.quantization.metadata import add_metadata, deployment_info
    from kcompress.quantization.ptq import convert, converting
    from kcompress.quantization.sensitivity import choose_float_layers

    opts = resolve_options(QuantizeOptions, options, mode=mode, **option_fields)
    if opts.mode == QuantMode.INT4_WEIGHTS:  # fail before any conversion when the extra is missing
        from kcompress.quantization.aeq import require_aeq

        require_aeq()
    preprocess = preprocess_of(data, preprocess)
    if opts.mode == QuantMode.FP32 and opts.float_layers:
        raise UsageError("float_layers has no meaning with mode fp32 (everything is float)")
    path = str(model) if isinstance(model, str) else None
    exported = path is not None and model_format(path) == "exported"  # the converter reads the folder itself
    if exported:
        if opts.float_layers:
            raise UsageError("float_layers needs the Keras model (layer names); an exported SavedModel has none")
        source, fp32 = path, convert(path)
        reference = TFLiteModel(fp32)
        shape, classes = reference.input_shape, int(reference.output["shape"][-1])
    else:
        source = as_model(model, stage="quantize", trust_model=trust_model).model
        shape, classes = input_shape(source), num_classes(source)
        fp32 = None
    src, val, test = as_splits(data, val_data, test_data, test_split=test_split, seed=seed, preprocess=preprocess)
    val = val if val is not None else src
    for d in (src, val, test):
        if d is not None:
            check_fits(d, shape, classes)
    if opts.auto_float_layers:
        log(f"Choosing float layers so the drop stays within {opts.max_drop} points ...")
    opts, plan = choose_float_layers(source, opts, src, val, log=log)  # no-op without float layers (exports)
    log(f"Converting {describe(model)} ({opts.mode}, {'per-channel' if opts.per_channel else 'per-tensor'} "
        "weights) ...")
    calibration = lambda: src.calibration_samples(shape, opts.calibration_samples, seed=seed)  # noqa: E731
    precision, int8 = None, None
    if recipe is not None and opts.mode != QuantMode.INT4_WEIGHTS:
        raise UsageError("recipe applies to mode int4-weights only")
    recipe = recipe if recipe is not None else opts.recipe  # rules (API only), or the option's file / "auto"
    with converting(source) as conv:  # a large model is saved for the converter once for every conversion
        fp32 = fp32 or convert(conv)
        if opts.mode == QuantMode.INT4_WEIGHTS:  # ai-edge-quantizer on the fp32 file; int8 made too, to compare
            from kcompress.quantization.aeq import int4_weights

            quant, precision = int4_weights(None if exported else source, fp32, recipe, calibration, val,
                                            opts.max_drop, log=log)
            int8 = convert(conv, opts.replace(mode=QuantMode.INT8, recipe=None), calibration=calibration)
        else:
            quant = fp32 if opts.mode == QuantMode.FP32 else convert(conv, opts, calibration=calibration)
    before = evaluate(fp32 if exported else source, val, limit=limit,
                      description="evaluating fp32" if exported else "evaluating keras")
    after = evaluate(quant, val, limit=limit, description="evaluating tflite")
    lat_fp32, lat_q, *lat_8 = bench_tflite_many([fp32, quant] + ([int8] if int8 else []), threads=1, runs=20,
                                                warmup=10, trials=5)  # interleaved
    if precision is not None:
        precision.update(int8_bytes=len(int8), latency_int8_ms=lat_8[0].p50_interval.median,
                         latency_int8_trials_ms=list(lat_8[0].trial_p50s), slower_than=[
                             name for name, ref, size in (("int8", lat_8[0], len(int8)), ("fp32", lat_fp32, len(fp32)))
                             if len(quant) < size and clearly_slower(ref.trial_p50s, lat_q.trial_p50s, SLOWER_MARGIN)])
    figures = test_figures({"before": fp32 if exported else source, "after": quant}, test)
    plain = len(quant)
    quant = add_metadata(quant, {"kcompress_version": __version__, **deployment_info(src)})
    return QuantizeResult(tflite=quant, test=figures, metadata_bytes=len(quant) - plain, fp32_tflite=fp32, options=opts, model=describe(model), data=val.name,
                          before=before, after=after, source_bytes=path_size(path) if path else None,
                          latency_fp32_ms=lat_fp32.p50_interval.median, latency_ms=lat_q.p50_interval.median,
                          float_layer_plan=plan, latency_fp32_trials_ms=lat_fp32.trial_p50s,
                          latency_trials_ms=lat_q.trial_p50s, precision=precision)


def qat(model, data, *, val_data=None, test_data=None, test_split: float = 0.0, train_limit: Optional[int] = None,
        options: Optional[QATOptions] = None,
        quantize: Optional[QuantizeOptions] = None, preprocess=None, seed: int = 0, bench: bool = True,
        log: Callable[[str], None] = _quiet, train_options: Optional[TrainOptions] = None, trust_model: bool = False,
        checkpoint_dir: Optional[str] = None, resume: bool = False, overwrite_checkpoints: bool = False,
        **option_fields):
    """Quantization-aware training of ``model`` on ``data``, exported to int8 and compared with fp32 and PTQ int8
    on ``val_data`` (default: ``data``). Returns :class:`~kcompress.quantization.qat.QATResult`.

    Keywords are fields of :class:`~kcompress.options.QATOptions` (``epochs``, ``lr``, ...); the int8 settings
    (``per_channel``, ``io``, ``float_layers`` including ``("auto",)``, ``max_drop``) come from ``quantize``.
    ``test_data`` (or ``test_split`` of ``data``): TEST, chose nothing; the fp32 model and the QAT ``.tflite`` are
    measured on it afterwards (``result.test``). ``train_options``: the fine-tune's optimizer, schedule and
    augmentation (:class:`~kcompress.options.TrainOptions`, the ``train`` section).
    ``checkpoint_dir``: per-epoch checkpoints of the fine-tune; ``resume`` continues from them,
    ``overwrite_checkpoints`` starts over (otherwise an earlier run's checkpoints are an error), as in ``distill``.
    """
    from kcompress.distributed import distribute_early, worker_path
    from kcompress.quantization.qat import qat as run_qat
    from kcompress.quantization.sensitivity import choose_float_layers

    opts = resolve_options(QATOptions, options, **option_fields)
    topts = resolve_options(TrainOptions, train_options)
    distribute_early(topts.strategy)  # multi-worker: before any model is loaded
    checkpoint_dir = worker_path(checkpoint_dir, copy=resume) if checkpoint_dir else None  # the chief's only
    preprocess = preprocess_of(data, preprocess)
    q = (quantize or QuantizeOptions()).replace(mode=QuantMode.INT8, recipe=None)
    m = as_model(model, stage="qat", trust_model=trust_model).model
    train, val, test = as_splits(data, val_data, test_data, test_split=test_split, seed=seed, preprocess=preprocess,
                                 train_limit=train_limit)
    if q.auto_float_layers:
        log(f"choosing float layers (max drop {q.max_drop} points on VAL) ...")
    q, plan = choose_float_layers(m, q, train, val or train, log=log)
    if checkpoint_dir and overwrite_checkpoints and not resume:  # else an earlier run's checkpoints are refused
        import shutil

        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    result = run_qat(m, train, val, opts, q, seed=seed, bench=bench, log=log, train_options=topts,
                     checkpoint_dir=checkpoint_dir, resume=resume)
    if plan is not None:
        result.info["float_layer_plan"] = plan
    from dataclasses import replace

    from kcompress import __version__
    from kcompress.evaluation import test_figures
    from kcompress.quantization.metadata import add_metadata, deployment_info

    figures = test_figures({"fp32": m, "qat": result.tflite}, test)
    return replace(result, test=figures,
                   tflite=add_metadata(result.tflite, {"kcompress_version": __version__, **deployment_info(train)}))


@dataclass(frozen=True)
class SensitivityResult:
    """Per-layer int8 sensitivity, most sensitive (lowest output SQNR) first."""

    model: str
    data: str
    samples: int
    layers: tuple  # dicts: rank, layer, type, params, sqnr_db, accuracy_delta, float_cost_bytes

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "samples": self.samples, "layers": list(self.layers)}

    def save(self, path: str, overwrite: bool = False) -> str:
        from kcompress.io import write_json

        write_json(path, self.to_dict(), overwrite=overwrite)
        return path


def sensitivity(model, data, *, samples: int = 256, preprocess=None,
                log: Callable[[str], None] = _quiet, trust_model: bool = False) -> SensitivityResult:
    """Quantizes one layer at a time to int8 and ranks the layers by the model's output SQNR (lowest first)."""
    from kcompress.quantization.sensitivity import sensitivity as run

    if samples < 1:
        raise UsageError("samples must be at least 1")
    src = as_data(data, preprocess)
    rows = run(as_model(model, stage="sensitivity", trust_model=trust_model).model, src, samples=samples, log=log)
    return SensitivityResult(describe(model), src.name, samples, tuple(rows))
