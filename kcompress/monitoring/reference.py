"""Reference statistics for drift monitoring: what a model's confidences, predicted classes and inputs looked like
on a known split (VAL), stored as one JSON file (:class:`Reference`, :func:`monitor_reference`).

The model runs through :func:`kcompress.evaluation.predictor` (a Keras model or file, or a ``.tflite``), and its
outputs become probabilities by the kind read from its graph (:func:`kcompress.evaluation.probabilities`).

Gotchas:

- Input statistics are taken on what the model is fed, i.e. *after* the preprocessing; the reference records that
  preprocessing, and :func:`kcompress.monitor` reuses it for new data unless told otherwise.
- Up to :data:`MAX_STORED` raw confidences are stored (a seeded sample stratified by predicted class above that),
  enough for the KS test and the PSI quantiles; the class frequencies, input moments and the 20-bin histogram
  cover every sample.
- The model is identified by the SHA-256 of its file (every file of a SavedModel folder); an in-memory Keras model
  has no identity (``model_sha256`` None) and is never checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from kcompress.errors import KcompressError
from kcompress.monitoring.stats import ChannelMoments, class_frequencies, confidence_histogram

__all__ = ["REFERENCE_FILE", "SCHEMA", "MAX_STORED", "Reference", "Collected", "monitor_reference", "collect",
           "model_identity", "reference_path", "open_inputs", "data_name", "write_run_reference"]

REFERENCE_FILE = "monitor_reference.json"  # in a pipeline run folder
SCHEMA = "kcompress.monitor_reference/1"
MAX_STORED = 5000  # raw confidences kept in the file


@dataclass(frozen=True)
class Reference:
    """The reference statistics of one model on one split; ``save``/``load`` as JSON."""

    model: str
    model_sha256: Optional[str]
    split: str
    data: str
    num_samples: int
    class_names: tuple[str, ...]
    class_frequencies: tuple[float, ...]
    confidences: tuple[float, ...]  # every sample's max-softmax, or a stratified sample of MAX_STORED
    confidence_histogram: tuple[int, ...]  # 20 equal bins over [0, 1], every sample
    input_shape: tuple[Optional[int], ...]
    input_mean: tuple[float, ...]  # per channel (last axis) of the preprocessed inputs
    input_std: tuple[float, ...]
    preprocess: Optional[dict] = None
    output_kind: Optional[str] = None
    created: str = ""
    kcompress_version: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_frequencies)

    @property
    def sampled(self) -> bool:
        """True when ``confidences`` is a sample of the split rather than all of it."""
        return len(self.confidences) < self.num_samples

    def to_dict(self) -> dict:
        out = {"schema": SCHEMA}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict, source: str = "reference") -> "Reference":
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            found = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise KcompressError(f"{source}: not a kcompress monitor reference (schema {found!r}, expected {SCHEMA})")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in names if n not in d and cls.__dataclass_fields__[n].default is dataclasses.MISSING)
        if missing:
            raise KcompressError(f"{source}: the reference lacks {', '.join(missing)}")
        kw: dict[str, Any] = {}
        for n in names & set(d):
            v = d[n]
            kw[n] = tuple(v) if isinstance(v, list) else v
        ref = cls(**kw)
        sizes = {len(ref.input_mean), len(ref.input_std)}
        if (len(sizes) != 1 or not ref.confidences or len(ref.class_names) != len(ref.class_frequencies)
                or len(ref.confidence_histogram) < 1):
            raise KcompressError(f"{source}: the reference is inconsistent (empty confidences or mismatched lengths)")
        return ref

    def save(self, path: str, overwrite: bool = False) -> str:
        """Writes the JSON atomically; an existing file only with ``overwrite``."""
        from kcompress.io import write_json

        write_json(path, self.to_dict(), overwrite=overwrite)
        return path

    @classmethod
    def load(cls, path: str) -> "Reference":
        """From a reference JSON, or a run folder (its ``monitor_reference.json``)."""
        import json

        path = reference_path(path)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except ValueError as e:
            raise KcompressError(f"{path}: not a readable JSON file ({e})") from None
        return cls.from_dict(d, path)


def reference_path(path: str) -> str:
    """A reference JSON as given, or ``RUN_DIR/monitor_reference.json``; one clear error when neither exists."""
    path = os.fspath(path)
    if os.path.isdir(path):
        inner = os.path.join(path, REFERENCE_FILE)
        if not os.path.isfile(inner):
            raise KcompressError(f"{path}: a folder without {REFERENCE_FILE} (a pipeline run writes one; or build "
                                 "one with kcompress monitor MODEL --write-reference OUT.json --data VAL)")
        return inner
    if not os.path.isfile(path):
        raise KcompressError(f"{path}: no such reference file or run folder")
    return path


def model_identity(model) -> tuple[str, Optional[str]]:
    """``(name, sha256)`` of a model path (file or SavedModel folder) or ``.tflite`` bytes; an in-memory Keras model
    gives ``(its name, None)``."""
    if isinstance(model, (bytes, bytearray)):
        return "<tflite>", hashlib.sha256(bytes(model)).hexdigest()
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        h = hashlib.sha256()
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(root, n) for root, _, names in os.walk(path) for n in names)
        if not files:
            raise KcompressError(f"{path}: no such model file or folder")
        for name in files:
            if name != path:
                h.update(os.path.relpath(name, path).encode() + b"\0")
            with open(name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return path, h.hexdigest()
    return str(getattr(model, "name", type(model).__name__)), None


def _preprocess_np(pre, x: np.ndarray) -> np.ndarray:
    """:class:`kcompress.data.Preprocess` applied in numpy (the same arithmetic as its TensorFlow ``apply``)."""
    if pre is None or pre.is_identity:
        return x
    x = x * np.float32(pre.scale) + np.float32(pre.offset)
    return ((x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)).astype(np.float32)


def open_inputs(data, preprocess=None):
    """What to feed: a :class:`~kcompress.data.DataSource`, or an array of raw inputs (``preprocess`` applied).

    ``data``: an opened DataSource, a data spec (image folder, ``.npz``, built-in name) or a numpy array. An
    ``.npz`` without ``y`` (unlabelled inputs) is read as its array ``x``; labels, where there are any, are ignored."""
    from kcompress.data import DataSource, Preprocess

    if isinstance(data, np.ndarray):
        if data.ndim < 2 or data.dtype.kind not in "biuf" or len(data) == 0:
            raise KcompressError(f"inputs: expected a non-empty numeric array of samples, got shape {data.shape} "
                                 f"dtype {data.dtype}")
        return _preprocess_np(preprocess, data.astype(np.float32))
    if isinstance(data, DataSource):
        return data.with_preprocess(preprocess) if preprocess is not None else data
    spec = os.fspath(data)
    if spec.endswith(".npz") and os.path.isfile(spec):
        try:
            with np.load(spec, allow_pickle=False) as npz:
                unlabelled = "x" in npz.files and "y" not in npz.files
                x = np.asarray(npz["x"]) if unlabelled else None
        except ValueError as e:
            raise KcompressError(f"{spec}: not a readable .npz of numeric arrays ({str(e).splitlines()[0]})") from None
        except (OSError, EOFError, KeyError) as e:
            raise KcompressError(f"{spec}: not a readable .npz file ({e})") from None
        if x is not None:
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise KcompressError(f"{spec}: x holds NaN or infinite values")
            return open_inputs(x, preprocess)
    from kcompress.inputs import as_data

    return as_data(spec, preprocess if preprocess is not None else Preprocess())


@dataclass(frozen=True)
class Collected:
    """What one pass of a model over inputs gives: per-sample confidence and predicted class, input moments."""

    confidences: np.ndarray
    predicted: np.ndarray
    num_classes: int
    input_shape: tuple
    input_mean: np.ndarray
    input_std: np.ndarray
    output_kind: Optional[str]
    data: str


def data_name(data) -> Optional[str]:
    """A data spec's own text (the name of an unlabelled ``.npz`` read as an array); None for arrays."""
    return os.fspath(data) if isinstance(data, (str, os.PathLike)) else None


def _batches(inputs, input_shape, batch_size: int):
    if isinstance(inputs, np.ndarray):
        for start in range(0, len(inputs), batch_size):
            yield inputs[start:start + batch_size]
        return
    for x, _ in inputs.numpy_batches(input_shape, batch_size=batch_size):
        yield x


def collect(model, inputs, batch_size: int = 64, trust_model: bool = False, outputs: Optional[np.ndarray] = None,
            output_kind: Optional[str] = None, description: str = "monitoring", name: Optional[str] = None
            ) -> Collected:
    """Runs ``model`` over ``inputs`` (from :func:`open_inputs`) and gathers the statistics.

    ``outputs`` (with ``output_kind``): the model's outputs on these inputs, in order, when already computed (a
    pipeline's VAL evaluation); the inputs are then only read for their moments."""
    from kcompress.evaluation import Predictor, predictor, probabilities
    from kcompress.progress import progress

    if int(batch_size) < 1:
        raise KcompressError(f"batch size must be at least 1, got {batch_size}")
    pred = model if isinstance(model, Predictor) else predictor(model, batch_size, trust_model=trust_model)
    shape = tuple(pred.input_shape)
    if isinstance(inputs, np.ndarray):
        got = tuple(inputs.shape[1:])
        if len(got) != len(shape) or any(w is not None and w != g for w, g in zip(shape, got)):
            raise KcompressError(f"inputs have shape {got} but the model expects {shape}")
        name, total = name or f"array{tuple(inputs.shape)}", len(inputs)
    else:
        if inputs.sample_shape is not None:
            got = tuple(inputs.sample_shape)
            if len(got) != len(shape) or any(w is not None and w != g for w, g in zip(shape, got)):
                raise KcompressError(f"{inputs.name}: samples have shape {got} but the model expects {shape}")
        name, total = inputs.name, inputs.num_samples
    moments, outs, seen = ChannelMoments(), [], 0
    with progress(description, total=total) as bar:
        for x in _batches(inputs, shape, int(batch_size)):
            moments.add(x)
            if outputs is None:
                outs.append(pred.predict(x))
            seen += len(x)
            bar.advance(len(x))
    if seen == 0:
        raise KcompressError(f"{name}: the data set is empty")
    kind = pred.output_kind
    if outputs is None:
        out = np.concatenate(outs)
    else:
        out, kind = np.asarray(outputs), output_kind if output_kind is not None else kind
    if len(out) != seen:
        raise KcompressError(f"{name}: {len(out)} outputs for {seen} samples")
    probs = probabilities(out, kind)
    return Collected(probs.max(axis=1).astype(np.float64), out.argmax(axis=1).astype(np.int64), int(out.shape[1]),
                     shape, moments.mean, moments.std, kind, name)


def monitor_reference(model, data, *, split: str = "val", preprocess=None, batch_size: int = 64,
                      trust_model: bool = False, seed: int = 0, outputs: Optional[np.ndarray] = None,
                      output_kind: Optional[str] = None, class_names=None) -> Reference:
    """The reference statistics of ``model`` on ``data`` (the split a model was validated on, named ``split``).

    ``model``: a Keras model or file, or a ``.tflite`` path or bytes. ``data``: an opened DataSource, a data spec
    or an array of raw inputs (``preprocess`` applied to specs and arrays). Save it with ``.save(path)``."""
    from kcompress import __version__
    from kcompress.data import stratified_indices

    inputs = open_inputs(data, preprocess)
    c = collect(model, inputs, batch_size, trust_model, outputs, output_kind, description=f"reference ({split})",
                name=data_name(data))
    conf = c.confidences
    if len(conf) > MAX_STORED:
        conf = conf[stratified_indices(c.predicted, MAX_STORED, seed)]
    names = class_names or getattr(inputs, "class_names", None)
    if not names or len(names) != c.num_classes:
        names = tuple(str(i) for i in range(c.num_classes))
    pre = getattr(inputs, "preprocess", None) if not isinstance(inputs, np.ndarray) else preprocess
    name, digest = model_identity(model)
    return Reference(
        model=name, model_sha256=digest, split=str(split), data=c.data, num_samples=int(len(c.confidences)),
        class_names=tuple(str(n) for n in names),
        class_frequencies=tuple(float(v) for v in class_frequencies(c.predicted, c.num_classes)),
        confidences=tuple(float(v) for v in conf), confidence_histogram=tuple(confidence_histogram(c.confidences)),
        input_shape=tuple(c.input_shape), input_mean=tuple(float(v) for v in c.input_mean),
        input_std=tuple(float(v) for v in c.input_std), preprocess=pre.to_dict() if pre is not None else None,
        output_kind=c.output_kind, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), kcompress_version=__version__)


def write_run_reference(run_dir: str, final, val, log: Callable[[str], None] = print) -> str:
    """A pipeline run's ``monitor_reference.json``: the final model (``final``: the run's last model-producing
    :class:`~kcompress.pipeline.runner.StageRecord`) on VAL, reusing the VAL outputs its stage saved."""
    path = os.path.join(run_dir, REFERENCE_FILE)
    saved, kind = os.path.join(final.dir, "outputs.npz"), final.metrics.get("output_kind")
    outputs = None
    if os.path.isfile(saved):
        with np.load(saved, allow_pickle=False) as npz:
            if "outputs" in npz.files and len(npz["outputs"]) == val.num_samples:
                outputs = np.asarray(npz["outputs"])
    ref = monitor_reference(final.model_path, val, split="val", outputs=outputs,
                            output_kind=kind if outputs is not None else None)
    ref.save(path, overwrite=True)
    log(f"drift-monitoring reference of {os.path.basename(final.model_path)} on VAL: {path}")
    return path
