"""Export of Keras models to ONNX (``tf2onnx``), checked against Keras in ONNX Runtime before anything is written.

:func:`onnx_bytes` traces the tf_keras model with one float input named ``input`` whose batch axis is free
(``(None, *input_shape)``) and converts it at the given opset; Keras 3 models are first rebuilt in tf_keras by the
bridge (:func:`kcompress.io.ensure_tf_keras`, outputs verified there). :func:`export_onnx` then runs the file in
ONNX Runtime on real samples (stratified, seeded) or, without data, on seeded uniform [0, 1) inputs, and compares
with the Keras model: a max absolute difference above ``rtol`` times the largest Keras output is an error, never a
file. The check's figures are stored in the file (``metadata_props["kcompress"]``) and returned.

Gotchas: ``tf2onnx`` imports TensorFlow (as every Keras path here does) and folds BatchNormalization into the
convolutions, so the graph has fewer nodes than the model has layers. Models with several inputs or outputs are
refused (kcompress evaluates single-input classifiers).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

from kcompress.errors import KcompressError, UsageError

__all__ = ["DEFAULT_OPSET", "CHECK_SAMPLES", "CHECK_RTOL", "onnx_bytes", "check_against_keras", "export_onnx",
           "exported_record"]

DEFAULT_OPSET = 17
CHECK_SAMPLES = 256  # samples the exported file is checked on
CHECK_RTOL = 1e-3  # max |onnx - keras| allowed, relative to the largest |keras output|


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _keras(model, trust_model: bool = False):
    """A tf_keras model from a path, a tf_keras model or a Keras 3 model (rebuilt by the bridge)."""
    from kcompress.inputs import as_model

    return as_model(model, stage="ONNX export", trust_model=trust_model).model


def onnx_bytes(model, opset: int = DEFAULT_OPSET, trust_model: bool = False) -> bytes:
    """The model as a serialized ONNX ``ModelProto`` (not checked; :func:`export_onnx` checks)."""
    from kcompress.backend import tf
    from kcompress.modelinfo import input_shape

    if not 7 <= int(opset) <= 21:
        raise UsageError(f"--opset must be between 7 and 21, got {opset}")
    model = _keras(model, trust_model)
    if len(getattr(model, "outputs", None) or [None]) != 1:
        raise KcompressError("ONNX export takes models with one output")
    shape = input_shape(model)  # one input, or a clear error
    import tf2onnx

    spec = (tf.TensorSpec((None, *shape), tf.float32, name="input"),)
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=int(opset))
    except Exception as e:  # noqa: BLE001  (tf2onnx raises ValueError, RuntimeError, KeyError... on unknown ops)
        raise KcompressError(f"tf2onnx could not convert the model (opset {opset}): {_first_line(e)}") from None
    return proto.SerializeToString()


def _samples(model_shape: tuple, classes: int, data, n: int, seed: int) -> tuple[np.ndarray, str]:
    """``n`` check samples: a stratified seeded sample of ``data`` (preprocessed as for the model), else seeded
    uniform [0, 1) inputs."""
    if data is not None:
        from kcompress.data import check_fits
        from kcompress.inputs import as_data

        src = as_data(data, what="check data")
        check_fits(src, model_shape, classes)
        xs = [x for x, _ in src.numpy_batches(model_shape, batch_size=64, limit=n)]
        return np.concatenate(xs).astype(np.float32), f"{src.name} (stratified, seed 0)"
    if any(d is None for d in model_shape):
        raise UsageError(f"the model's input shape {model_shape} has free dimensions: give --data to check the export")
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, *model_shape)).astype(np.float32), f"uniform [0, 1) inputs (seed {seed})"


def check_against_keras(model, onnx: bytes, data=None, samples: int = CHECK_SAMPLES, rtol: float = CHECK_RTOL,
                        seed: int = 0) -> dict[str, Any]:
    """Runs ``onnx`` in ONNX Runtime and ``model`` (tf_keras) in Keras on the same samples; raises a
    :class:`KcompressError` when the max absolute output difference exceeds ``rtol`` x the largest Keras output.
    Returns ``{"max_abs_diff", "tolerance", "output_scale", "samples", "sample_source", "agreement"}``."""
    from kcompress.backend import tf
    from kcompress.modelinfo import input_shape, num_classes
    from kcompress.onnx.runtime import ONNXModel

    classes = num_classes(model) if data is not None else 0  # a data set must fit the classifier it checks
    x, source = _samples(input_shape(model), classes, data, samples, seed)
    fn = tf.function(lambda t: model(t, training=False), reduce_retracing=True)
    ref = np.concatenate([np.asarray(fn(tf.constant(x[i:i + 64])), np.float32) for i in range(0, len(x), 64)])
    got = ONNXModel(onnx).predict(x, batch_size=64)
    if got.shape != ref.shape:
        raise KcompressError(f"the ONNX model's output shape {got.shape[1:]} is not the Keras model's "
                             f"{ref.shape[1:]}")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    tol = max(rtol * scale, 1e-6)
    out = {"max_abs_diff": diff, "tolerance": tol, "output_scale": scale, "samples": int(len(x)),
           "sample_source": source,
           "agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()) if ref.ndim == 2 else None}
    if not np.isfinite(diff) or diff > tol:
        raise KcompressError(f"the ONNX export differs from the Keras model: max |difference| {diff:.3g} > "
                             f"{tol:.3g} ({rtol:g} x the largest output {scale:.3g}) on {len(x)} samples of "
                             f"{source}; no file written")
    return out


def _with_metadata(onnx: bytes, record: dict) -> bytes:
    """``onnx`` with ``record`` as JSON in ``metadata_props["kcompress"]`` (the graph is untouched)."""
    import onnx as onnx_lib

    proto = onnx_lib.load_model_from_string(onnx)
    for p in list(proto.metadata_props):
        if p.key == "kcompress":
            proto.metadata_props.remove(p)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "kcompress", json.dumps(record, sort_keys=True)
    return proto.SerializeToString()


def export_onnx(model, path: str, *, opset: int = DEFAULT_OPSET, check_data=None, overwrite: bool = False,
                check_samples: int = CHECK_SAMPLES, rtol: float = CHECK_RTOL, trust_model: bool = False) -> dict:
    """Exports ``model`` (a path, a tf_keras or Keras 3 model) to ``path`` as ONNX, after checking it in ONNX
    Runtime against the Keras model (module docstring). ``check_data``: data to check on (a spec or a
    DataSource, preprocessed as the model expects); without it, seeded uniform [0, 1) inputs.

    The file is written atomically; an existing ``path`` is refused unless ``overwrite`` (before any work). Returns
    ``{"path", "max_abs_diff", "tolerance", "samples", "sample_source", "agreement", "opset", "size_bytes",
    "versions"}``."""
    from kcompress import __version__
    from kcompress.atomic import atomic_write_bytes, check_output_path
    from kcompress.onnx.runtime import ort_version

    path = str(path)
    check_output_path(path, overwrite)
    if int(check_samples) < 1:
        raise UsageError(f"check_samples must be at least 1, got {check_samples}")
    keras_model = _keras(model, trust_model)
    data = onnx_bytes(keras_model, opset)
    check = check_against_keras(keras_model, data, check_data, samples=int(check_samples), rtol=rtol)
    import onnx as onnx_lib
    import tf2onnx

    versions = {"kcompress": __version__, "tf2onnx": tf2onnx.__version__, "onnx": onnx_lib.__version__,
                "onnxruntime": ort_version()}
    record = {**check, "opset": int(opset), "versions": versions}
    data = _with_metadata(data, record)
    atomic_write_bytes(path, data, overwrite=overwrite)
    return {"path": path, **record, "size_bytes": len(data)}


def exported_record(model) -> Optional[dict]:
    """The check record :func:`export_onnx` stored in an ONNX file or bytes, None when there is none."""
    import onnx as onnx_lib

    from kcompress.onnx.runtime import read_onnx_bytes

    try:
        proto = onnx_lib.load_model_from_string(read_onnx_bytes(model))
    except Exception:  # noqa: BLE001
        return None
    for p in proto.metadata_props:
        if p.key == "kcompress":
            try:
                return json.loads(p.value)
            except ValueError:
                return None
    return None
