"""What the Python API accepts wherever it takes a model or data: what the CLI accepts (a path, a built-in data
name) as well as loaded objects (a tf_keras or Keras 3 model, an opened :class:`~kcompress.data.DataSource`, a
``.tflite`` as bytes). Each helper turns one of those into the one form the techniques work on.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

from kcompress.errors import UsageError

__all__ = ["LoadedModel", "as_model", "as_data", "as_splits", "preprocess_of", "as_tflite", "is_tflite", "resolve_options", "describe"]


@dataclass(frozen=True)
class LoadedModel:
    """A tf_keras model and where it came from. ``keras3``: the user brought Keras 3 (give Keras 3 back)."""

    model: Any
    path: Optional[str]
    format: str  # savedmodel, h5, keras, keras3, object, keras3-object

    @property
    def keras3(self) -> bool:
        return self.format in ("keras3", "keras3-object")


def describe(model: Any) -> str:
    """A short name for messages and reports: the path, or the model's name."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    if isinstance(model, (bytes, bytearray)):
        return f"<.tflite, {len(model):,} bytes>"
    return getattr(model, "name", type(model).__name__)


def is_tflite(model: Any) -> bool:
    """True for ``.tflite`` bytes or a path to a ``.tflite`` file."""
    if isinstance(model, (bytes, bytearray)):
        return True
    if isinstance(model, (str, os.PathLike)):
        from kcompress.io import model_format

        return model_format(str(model)) == "tflite"
    return False


def as_model(model: Any, stage: str = "this step", trust_model: bool = False) -> LoadedModel:
    """A path (any format kcompress reads) or a Keras model object (tf_keras or Keras 3) -> :class:`LoadedModel`.

    A path is loaded safely unless ``trust_model`` (see :func:`kcompress.io.load_model`)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (bytes, bytearray)):
        raise UsageError(f"{stage} needs a Keras model, not .tflite bytes")
    if isinstance(model, (str, os.PathLike)):
        from kcompress.io import load_model, model_format

        path = str(model)
        return LoadedModel(load_model(path, stage=stage, trust_model=trust_model), path, model_format(path))
    from kcompress.keras3 import is_keras3_model, to_tf_keras

    if is_keras3_model(model):
        return LoadedModel(to_tf_keras(model), None, "keras3-object")
    if not hasattr(model, "layers") or not hasattr(model, "predict"):
        raise UsageError(f"{stage} needs a Keras model or a path to one, got {type(model).__name__}")
    return LoadedModel(model, None, "object")


def preprocess_of(data: Any, preprocess=None):
    """``preprocess`` when given, else the preprocessing of an opened DataSource (so a second split given as a spec
    is read the same way as the first), else None."""
    if preprocess is not None:
        return preprocess
    return getattr(data, "preprocess", None)


def as_data(data: Any, preprocess=None, what: str = "data"):
    """A data spec (image folder, ``.npz``, built-in name) or a DataSource -> a DataSource.

    ``preprocess`` (a :class:`~kcompress.data.Preprocess`) is applied to a spec, and replaces an opened source's own
    only when given.
    """
    from kcompress.data import DataSource, open_data

    if data is None:
        return None
    if isinstance(data, DataSource):
        return data.with_preprocess(preprocess) if preprocess is not None else data
    if isinstance(data, (str, os.PathLike)):
        from kcompress.data import Preprocess

        return open_data(str(data), preprocess if preprocess is not None else Preprocess())
    raise UsageError(f"{what}: expected a path, a built-in data name or an opened data source, got "
                     f"{type(data).__name__}")


def as_splits(train: Any, val: Any = None, test: Any = None, *, test_split: float = 0.0, seed: int = 0,
              preprocess=None, train_limit: Optional[int] = None):
    """``(train, val, test)`` DataSources for the API's techniques: ``test_split`` carves TEST out of TRAIN
    (stratified, seeded) instead of ``test``; ``train_limit`` then keeps a stratified seeded subset of TRAIN for
    quick runs; VAL and TEST must have TRAIN's classes. ``val``/``test`` may be None."""
    from kcompress.data import open_splits

    s = open_splits(as_data(train, preprocess, "train"), as_data(val, preprocess, "val"),
                    as_data(test, preprocess, "test"), test_split=test_split, seed=seed, train_limit=train_limit,
                    require_val=False)
    return s.train, s.val, s.test


def as_tflite(model: Any) -> bytes:
    """``.tflite`` bytes, or a path to a ``.tflite`` file -> bytes."""
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    with open(model, "rb") as f:
        return f.read()


def resolve_options(cls, options=None, **fields):
    """``options`` (or the class defaults) with the keyword ``fields`` that are not None applied, validated."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], sorted(names), n=1)
        raise UsageError(f"unknown option {unknown[0]!r} for {cls.__name__}" + (f" (did you mean {near[0]!r}?)"
                                                                                 if near else ""))
    changes = {k: v for k, v in fields.items() if v is not None}
    if options is None:
        return cls(**changes)
    if not isinstance(options, cls):
        raise UsageError(f"options must be a {cls.__name__}, got {type(options).__name__}")
    return options.replace(**changes) if changes else options
