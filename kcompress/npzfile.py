"""Reading a user's ``.npz`` data file safely: arrays ``x`` (samples), ``y`` (labels) and optional ``class_names``.

The file is opened with ``allow_pickle=False``: an object array (which numpy can only unpickle, running whatever
code the pickle names) is refused with one clear line, never loaded. Every problem of the file itself (not a zip,
truncated, a missing array, wrong shapes or dtypes, NaN or infinite samples, labels that are not class indices) is
a :class:`~kcompress.errors.KcompressError` naming the file and the array. Gotcha: ``x`` is read into memory whole.
No TensorFlow.
"""

from __future__ import annotations

import zipfile
import zlib
from typing import Optional

import numpy as np

from kcompress.errors import KcompressError

__all__ = ["read_npz", "labels_from", "MAX_CLASSES"]

MAX_CLASSES = 100_000  # more classes than any classifier kcompress can compress: a label above is a broken file

# What numpy and zipfile raise for a file that is not a readable archive of arrays.
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _array(npz, key: str, path: str) -> np.ndarray:
    try:
        return np.asarray(npz[key])
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise KcompressError(f"{path}: array {key!r} holds Python objects, which can only be unpickled (that can "
                                 "run code, so kcompress never does): save plain numeric arrays") from None
        raise KcompressError(f"{path}: array {key!r} is not readable ({_first_line(e)})") from None
    except _UNREADABLE as e:
        raise KcompressError(f"{path}: array {key!r} is not readable; is the file truncated? ({_first_line(e)})") \
            from None


def read_npz(path: str) -> tuple[np.ndarray, np.ndarray, Optional[list[str]]]:
    """``(x, labels, class_names or None)`` of an ``.npz``, checked (see the module docstring)."""
    try:
        npz = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e):  # neither a zip nor an .npy: numpy would have to unpickle it
            raise KcompressError(f"{path}: not an .npz file (expected a zip archive of numpy arrays x and y)") \
                from None
        raise KcompressError(f"{path}: not a readable .npz file ({_first_line(e)})") from None
    except _UNREADABLE as e:
        raise KcompressError(f"{path}: not a readable .npz file ({_first_line(e)})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise KcompressError(f"{path}: a single .npy array, not an .npz with arrays x and y (np.savez(path, x=..., "
                             "y=...))")
    with npz:
        missing = {"x", "y"} - set(npz.files)
        if missing:
            raise KcompressError(f"{path}: the .npz needs arrays 'x' and 'y' (found: {', '.join(npz.files) or 'none'})")
        x, y = _array(npz, "x", path), _array(npz, "y", path)
        names = _array(npz, "class_names", path) if "class_names" in npz.files else None
    if x.ndim == 0 or y.ndim == 0:
        raise KcompressError(f"{path}: x and y must be arrays with one row per sample (found shapes {x.shape} and "
                             f"{y.shape})")
    if x.dtype.kind not in "biuf":
        raise KcompressError(f"{path}: x must hold numbers (found dtype {x.dtype})")
    if len(x) == 0:
        raise KcompressError(f"{path}: the data set is empty")
    if len(x) != len(y):
        raise KcompressError(f"{path}: x has {len(x)} samples but y has {len(y)} labels")
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            raise KcompressError(f"{path}: {int(bad.sum())} sample(s) of x hold NaN or infinite values (the first is "
                                 f"sample {int(np.argmax(bad))})")
    labels = labels_from(y, path)
    class_names = None
    if names is not None:
        class_names = [str(n) for n in np.ravel(names).tolist()]
    elif int(labels.max()) >= MAX_CLASSES:
        raise KcompressError(f"{path}: label {int(labels.max())} is not a plausible class index (at most "
                             f"{MAX_CLASSES} classes)")
    return x, labels, class_names


def labels_from(y: np.ndarray, where: str) -> np.ndarray:
    """Integer class indices from integer labels, whole-number float labels or one-hot rows."""
    if y.dtype.kind not in "biuf":
        raise KcompressError(f"{where}: labels must be integer class indices or one-hot rows (found dtype {y.dtype})")
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] == 0):
        raise KcompressError(f"{where}: y must hold one label or one one-hot row per sample (found shape {y.shape})")
    if y.ndim == 2 and y.shape[1] > 1:
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            raise KcompressError(f"{where}: the one-hot rows of y hold NaN or infinite values")
        y = y.argmax(axis=1)
    y = y.reshape(len(y))
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not np.all(np.equal(np.mod(y, 1), 0)):
            raise KcompressError(f"{where}: labels must be integer class indices or one-hot rows")
        if y.max() >= 2**62:
            raise KcompressError(f"{where}: label {y.max():g} is not a plausible class index")
        y = y.astype(np.int64)
    if y.dtype.kind == "u" and int(y.max()) >= 2**62:
        raise KcompressError(f"{where}: label {int(y.max())} is not a plausible class index")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise KcompressError(f"{where}: labels must be >= 0 (found {int(y.min())})")
    return y
