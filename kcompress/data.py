"""Data sources -> ``tf.data`` pipelines, with the preprocessing made explicit.

DATA is one of:
- an ``.npz`` with arrays ``x`` (samples) and ``y`` (integer labels, or one-hot rows);
- an image folder with one sub-folder per class (sorted names are the class indices, as in
  ``image_dataset_from_directory``); non-image and corrupt files are skipped with one warning that counts them;
- a built-in name that an installed package ships: ``digits`` (scikit-learn's 8x8 handwritten digits, 1797 samples,
  pixels scaled to 0-255), ``digits:train`` (a fixed stratified 80%) and ``digits:val`` (the other 20%).

No hidden preprocessing: npz arrays reach the model as stored, images as float pixels 0-255 resized to the model's
input size. :class:`Preprocess` (``x * scale + offset``, then ``(x - mean) / std``) is the only transformation, and
the same pipeline feeds Keras evaluation, calibration and TFLite evaluation.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from kcompress.backend import tf
from kcompress.errors import KcompressError, UsageError

__all__ = ["Preprocess", "DataSource", "Splits", "open_data", "open_splits", "stratified_indices", "BUILTIN_DATASETS",
           "check_fits", "check_same_classes"]

BUILTIN_DATASETS = ("digits", "digits:train", "digits:val")
IGNORED_FOLDERS = ("__MACOSX",)  # archive litter, never a class
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"BM", b"GIF8")


@dataclass(frozen=True)
class Preprocess:
    """``x * scale + offset``, then ``(x - mean) / std`` (per channel when mean/std are sequences)."""

    scale: float = 1.0
    offset: float = 0.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.offset == 0.0 and set(self.mean) == {0.0} and set(self.std) == {1.0}

    def apply(self, x):
        if self.is_identity:
            return x
        x = x * self.scale + self.offset
        mean = tf.constant(self.mean, tf.float32)
        std = tf.constant(self.std, tf.float32)
        return (x - mean) / std

    def to_dict(self) -> dict:
        return {"scale": self.scale, "offset": self.offset, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def parse(cls, scale=None, offset=None, mean=None, std=None) -> "Preprocess":
        """From CLI strings (fractions such as ``1/255``, comma-separated per-channel ``mean``/``std``); None keeps
        the default. The parsing and checks are :class:`kcompress.options.DataOptions`'s."""
        from kcompress.options import DataOptions

        given = {"scale": scale, "offset": offset, "mean": mean, "std": std}
        return DataOptions(**{k: v for k, v in given.items() if v not in (None, "")}).preprocess()


@dataclass(frozen=True)
class DataSource:
    """A labelled data set, opened but not loaded: :meth:`dataset` streams it.

    ``labels`` holds every label (small even for large sets); the samples themselves are read batch by batch.
    """

    name: str
    kind: str  # "npz", "folder", "builtin"
    labels: np.ndarray
    class_names: tuple[str, ...]
    sample_shape: Optional[tuple[int, ...]]  # None for image folders (images come in any size)
    preprocess: Preprocess = field(default_factory=Preprocess)
    _arrays: Optional[np.ndarray] = field(default=None, repr=False)
    _files: tuple[str, ...] = field(default=(), repr=False)
    explicit_classes: bool = True  # False for an .npz without class_names: the classes are only 0..max(label)

    @property
    def num_samples(self) -> int:
        return int(len(self.labels))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    def with_preprocess(self, preprocess: Preprocess) -> "DataSource":
        return dataclasses.replace(self, preprocess=preprocess)

    def take(self, indices: np.ndarray, name: str) -> "DataSource":
        """The samples at ``indices`` (in that order), as a data set called ``name``."""
        idx = np.asarray(indices, np.int64)
        arrays = self._arrays[idx] if self._arrays is not None else None
        files = tuple(np.asarray(self._files)[idx]) if self._files else ()
        return dataclasses.replace(self, name=name, labels=self.labels[idx], _arrays=arrays, _files=files)

    def subset(self, n: int, seed: int = 0) -> "DataSource":
        """A stratified random ``n``-sample subset (seeded, see :func:`stratified_indices`), original order kept."""
        if n >= self.num_samples:
            return self
        return self.take(stratified_indices(self.labels, n, seed), f"{self.name}[{n}]")

    def split(self, fraction: float, seed: int = 0, what: str = "held out") -> tuple["DataSource", "DataSource"]:
        """``(rest, part)``: a stratified, seeded ``fraction`` of the samples carved out, and the others.

        The same data, fraction and seed always carve the same samples; the two parts never share a sample."""
        if not 0.0 < fraction < 1.0:
            raise UsageError(f"a split fraction must be between 0 and 1 (exclusive), got {fraction}")
        n = int(round(fraction * self.num_samples))
        if n < 1 or n >= self.num_samples:
            raise UsageError(f"{self.name}: {fraction:g} of {self.num_samples} samples leaves an empty split")
        part = stratified_indices(self.labels, n, seed)
        rest = np.setdiff1d(np.arange(self.num_samples), part)
        tag = f"{100 * fraction:g}%"
        return (self.take(rest, f"{self.name}[-{tag}]"), self.take(part, f"{self.name}[{tag} {what}]"))

    def dataset(
        self,
        input_shape: Sequence[Optional[int]],
        batch_size: int = 32,
        shuffle: bool = False,
        seed: int = 0,
        limit: Optional[int] = None,
        repeat: bool = False,
    ):
        """A ``tf.data.Dataset`` of ``(x float32 [B, *input_shape], y int32 [B])``.

        ``input_shape`` is the model's input shape without the batch axis; images are resized and given its
        channel count. ``limit`` draws a stratified, seeded sample of N (never "the first N": image folders are
        sorted by class), kept in data-set order unless ``shuffle``.
        """
        n = self.num_samples if limit is None else min(limit, self.num_samples)
        order = np.arange(self.num_samples) if n == self.num_samples else stratified_indices(self.labels, n, seed)
        if shuffle:
            order = np.random.default_rng(seed).permutation(order)
        labels = self.labels[order].astype(np.int32)
        if self.kind == "folder":
            h, w, c = _image_hwc(input_shape)
            files = np.asarray(self._files)[order]
            ds = tf.data.Dataset.from_tensor_slices((files, labels))

            def load(path, y):
                raw = tf.io.read_file(path)
                img = tf.io.decode_image(raw, channels=c, expand_animations=False)
                img = tf.image.resize(tf.cast(img, tf.float32), (h, w))
                img.set_shape((h, w, c))
                return img, y

            ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors().batch(batch_size)
        else:
            arrays = self._arrays

            def gen():
                for start in range(0, n, batch_size):
                    xs = np.asarray(arrays[order[start : start + batch_size]], dtype=np.float32)
                    yield xs, labels[start : start + batch_size]

            shape = tuple(self.sample_shape or ())
            ds = tf.data.Dataset.from_generator(
                gen,
                output_signature=(
                    tf.TensorSpec((None, *shape), tf.float32),
                    tf.TensorSpec((None,), tf.int32),
                ),
            )
            ds = ds.apply(tf.data.experimental.assert_cardinality(-(-n // batch_size)))
        pre = self.preprocess
        if not pre.is_identity:
            ds = ds.map(lambda x, y: (pre.apply(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        if repeat:
            ds = ds.repeat()
        return ds.prefetch(tf.data.AUTOTUNE)

    def numpy_batches(self, input_shape, batch_size: int = 32, limit: Optional[int] = None) -> Iterator:
        """Yields ``(x, y)`` numpy batches in the data set's order (``limit``: a stratified seeded sample)."""
        for x, y in self.dataset(input_shape, batch_size=batch_size, limit=limit):
            yield x.numpy(), y.numpy()

    def calibration_samples(self, input_shape, n: int = 200, seed: int = 0) -> Iterator[np.ndarray]:
        """``n`` samples for a converter's representative dataset, one per batch: stratified by class, seeded,
        in shuffled order (so every class is seen, whatever order the files are in)."""
        for x, _ in self.dataset(input_shape, batch_size=1, shuffle=True, seed=seed, limit=n):
            yield x.numpy()

    def fingerprint(self) -> str:
        """A hash that changes when the samples or labels do: labels, class names, the npz file's bytes or each
        image file's name and size (not its bytes: a folder of 50,000 images is fingerprinted in a second)."""
        import hashlib

        h = hashlib.sha256(np.ascontiguousarray(self.labels).tobytes())
        h.update("\0".join(self.class_names).encode())
        if self._arrays is not None:
            h.update(np.ascontiguousarray(self._arrays).tobytes())
        for f in self._files:  # class folder/file name: the same wherever the data folder lives
            rel = os.path.join(os.path.basename(os.path.dirname(f)), os.path.basename(f))
            h.update(f"{rel}:{os.path.getsize(f)}\0".encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "class_counts": self.class_counts(),
            "preprocess": self.preprocess.to_dict(),
        }


def _image_hwc(input_shape) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[0] is None or shape[1] is None:
        if len(shape) == 3 and shape[2] in (1, 3):
            raise UsageError(
                f"the model takes images of any size {shape}; image folders need a fixed size: "
                "rebuild the model with a fixed input shape"
            )
        raise KcompressError(f"an image folder cannot feed a model whose input shape is {shape} (need H, W, C)")
    c = shape[2] if shape[2] is not None else 3
    if c not in (1, 3, 4):
        raise KcompressError(f"an image folder cannot feed a model with {c} input channels (need 1, 3 or 4)")
    return int(shape[0]), int(shape[1]), int(c)


def _is_image(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return any(head.startswith(m) for m in _MAGIC)


def _open_folder(path: str) -> DataSource:
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith(".")
                     and d not in IGNORED_FOLDERS)
    if not classes:
        raise KcompressError(f"{path}: no class sub-folders (an image folder needs one sub-folder per class)")
    if len(classes) == 1:
        raise KcompressError(f"{path}: only one class sub-folder ({classes[0]}); an image folder needs one sub-folder "
                             "per class, at least two")
    files, labels, skipped = [], [], 0
    for i, cls in enumerate(classes):
        for root, _, names in sorted(os.walk(os.path.join(path, cls))):
            for name in sorted(names):
                full = os.path.join(root, name)
                if name.lower().endswith(IMAGE_EXTENSIONS) and _is_image(full):
                    files.append(full)
                    labels.append(i)
                elif not name.startswith("."):
                    skipped += 1
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} file(s) that are not readable images", stacklevel=2)
    if not files:
        raise KcompressError(f"{path}: the data set is empty (no images in {len(classes)} class folders)")
    return DataSource(
        name=path,
        kind="folder",
        labels=np.asarray(labels, np.int64),
        class_names=tuple(classes),
        sample_shape=None,
        _files=tuple(files),
    )


def _open_npz(path: str) -> DataSource:
    from kcompress.npzfile import read_npz

    x, y, class_names = read_npz(path)  # allow_pickle=False; every check of the file itself
    named = class_names is not None
    names = class_names if named else [str(i) for i in range(int(y.max()) + 1)]
    if named and int(y.max()) >= len(names):
        raise KcompressError(f"{path}: label {int(y.max())} is out of range for its {len(names)} class_names "
                             f"(labels must be 0..{len(names) - 1})")
    if named and len(set(names)) != len(names):
        raise KcompressError(f"{path}: class_names repeats a name")
    return DataSource(
        name=path,
        kind="npz",
        labels=y,
        class_names=tuple(names),
        sample_shape=tuple(int(d) for d in x.shape[1:]),
        _arrays=x,
        explicit_classes=named,
    )


def _open_builtin(name: str) -> DataSource:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) * (255.0 / 16.0))[..., None]  # 8x8x1 pixels 0-255
    y = digits.target.astype(np.int64)
    if name != "digits":
        rng = np.random.default_rng(1234)
        val_idx = np.concatenate(
            [rng.permutation(np.flatnonzero(y == c))[: int(round(0.2 * np.sum(y == c)))] for c in range(10)]
        )
        mask = np.zeros(len(y), bool)
        mask[val_idx] = True
        keep = mask if name == "digits:val" else ~mask
        x, y = x[keep], y[keep]
    return DataSource(
        name=name,
        kind="builtin",
        labels=y,
        class_names=tuple(str(i) for i in range(10)),
        sample_shape=(8, 8, 1),
        _arrays=x,
    )


def open_data(spec: str, preprocess: Preprocess = Preprocess()) -> DataSource:
    """Opens DATA (see the module docstring) without loading the samples."""
    if spec in BUILTIN_DATASETS:
        src = _open_builtin(spec)
    elif os.path.isdir(spec):
        src = _open_folder(spec)
    elif os.path.isfile(spec):
        if not spec.endswith(".npz"):
            raise KcompressError(f"{spec}: unsupported data file (expected an .npz with x and y, or an image folder)")
        src = _open_npz(spec)
    else:
        raise KcompressError(
            f"{spec}: no such data (expected an .npz file, an image folder, or one of {', '.join(BUILTIN_DATASETS)})"
        )
    return src.with_preprocess(preprocess)


def check_fits(data: DataSource, input_shape: Sequence[Optional[int]], num_classes: int) -> None:
    """Raises a clear error when ``data`` cannot feed a model with this input shape and class count.

    A data set that names its classes (image folders, built-ins, an ``.npz`` with ``class_names``) must have
    exactly the model's output width; one that does not must keep its labels below it."""
    if data.sample_shape is not None:
        want = tuple(input_shape)
        got = data.sample_shape
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
            raise KcompressError(
                f"{data.name}: samples have shape {got} but the model expects {tuple(want)} "
                "(npz data must already have the model's input shape)"
            )
    else:
        _image_hwc(input_shape)
    channels = tuple(input_shape)[-1] if len(tuple(input_shape)) else None
    for key in ("mean", "std"):  # per-channel values would broadcast into more channels, or fail mid-run
        values = getattr(data.preprocess, key)
        if len(values) > 1 and channels is not None and len(values) != channels:
            raise UsageError(f"--{key} / data.{key} has {len(values)} values, but the model's input has "
                             f"{channels} channels (give one value, or one per channel)")
    if data.explicit_classes and data.num_classes != num_classes:
        raise KcompressError(
            f"{data.name}: the data has {data.num_classes} classes but the model outputs {num_classes}"
            + (" (is an extra or a missing class folder in there?)" if data.kind == "folder" else "")
        )
    top = int(data.labels.max())
    if top >= num_classes:
        raise KcompressError(
            f"{data.name}: label {top} is outside the model's {num_classes} classes (0..{num_classes - 1})"
        )


def check_same_classes(reference: DataSource, other: Optional[DataSource]) -> None:
    """Raises one clear error when ``other``'s classes are not ``reference``'s (same names, same order).

    Class indices come from each split's own folder names, so a val folder missing a class, or holding an extra
    folder, would silently shift every label after it."""
    if other is None:
        return
    if reference.explicit_classes and other.explicit_classes:
        a, b = list(reference.class_names), list(other.class_names)
        if a == b:
            return
        missing = [c for c in a if c not in b]
        extra = [c for c in b if c not in a]
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing)}" if missing else "",
            f"extra {', '.join(extra)}" if extra else "",
        ) if part) or "the same names in another order"
        raise KcompressError(f"{other.name}: its classes differ from {reference.name}'s ({detail}); every split "
                             "must have the same class list")
    top = int(other.labels.max())
    if top >= reference.num_classes:
        raise KcompressError(f"{other.name}: label {top} is not one of {reference.name}'s {reference.num_classes} "
                             "classes")


def stratified_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random sample of ``n`` that keeps the class proportions of ``labels``.

    Each class gets its proportional share (largest remainders first); when ``n`` is at least the number of
    classes present, every class gets one or more. Within a class the samples are drawn at random."""
    labels = np.asarray(labels)
    total = len(labels)
    if n >= total:
        return np.arange(total)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / total
    take = np.floor(quota).astype(np.int64)
    order = np.lexsort((rng.random(len(classes)), -(quota - take)))  # largest remainder, ties at random
    take[order[: n - take.sum()]] += 1
    if n >= len(classes):
        for i in np.flatnonzero(take == 0):  # a rare class still gets one, from the class with the most
            take[np.argmax(take - (take <= 1) * n)] -= 1
            take[i] = 1
    picked = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, take) if k]
    return np.sort(np.concatenate(picked))


@dataclass(frozen=True)
class Splits:
    """TRAIN (fits), VAL (chooses: best epoch, PTQ vs QAT, float layers) and optional TEST (reported, chose
    nothing)."""

    train: DataSource
    val: Optional[DataSource]
    test: Optional[DataSource] = None

    def describe(self) -> str:
        return ", ".join(f"{name} {src.name} ({src.num_samples})" for name in ("train", "val", "test")
                         if (src := getattr(self, name)) is not None)


def open_splits(
    train,
    val=None,
    test=None,
    *,
    val_split: float = 0.0,
    test_split: float = 0.0,
    seed: int = 0,
    preprocess: Preprocess = Preprocess(),
    train_limit: Optional[int] = None,
    require_val: bool = True,
) -> Splits:
    """Opens and checks the three splits (specs or opened DataSources). ``val_split``/``test_split`` carve VAL/TEST
    out of TRAIN (stratified, seeded; TEST first, then VAL from the rest), replacing ``val``/``test``. ``train_limit``
    then keeps a stratified subset of what is left for training. Every split must have TRAIN's classes.
    ``require_val=False`` lets VAL be None (the API's techniques then choose on TRAIN and say so)."""

    def opened(spec):
        if spec is None or isinstance(spec, DataSource):
            return spec
        return open_data(str(spec), preprocess)

    tr = opened(train)
    te = opened(test)
    if test_split:
        if te is not None:
            raise UsageError("give test data or test_split, not both")
        tr, te = tr.split(test_split, seed=seed, what="test")
    va = opened(val)
    if val_split:
        tr, va = tr.split(val_split, seed=seed + 1, what="val")
    if va is None and require_val:
        raise UsageError("no validation data: give val (a data set) or val_split (a fraction of train)")
    if train_limit:
        tr = tr.subset(train_limit, seed=seed)
    check_same_classes(tr, va)
    check_same_classes(tr, te)
    return Splits(tr, va, te)
