"""Datasets (MNIST, CIFAR-10, GTSRB), seeded batching and CIFAR augmentation.

Everything returned by :func:`load_dataset` is a plain numpy array:

* ``x``: ``float32`` in ``[0, 1]``, shape ``(N, H, W, C)`` (MNIST gets a trailing
  channel axis, so ``(N, 28, 28, 1)``);
* ``y``: ``int32`` class indices, shape ``(N,)``.

Where the data comes from (first match wins):

1. A data directory: the ``data_dir`` argument, else the environment variable
   ``DM_JAX_DATA_DIR``.  Inside it, for dataset ``<name>``:

   a. ``<name>.npz`` in the Keras layout (uint8 ``x_train``, ``y_train``, ``x_test``,
      ``y_test``);
   b. an image-folder tree ``<name>/train/<class>/*.{jpg,png,ppm}`` and
      ``<name>/test/<class>/*``;
   c. a zip ``<name>.zip`` or ``<name>-jpeg.zip`` holding the same tree (optionally
      below one top-level folder);
   d. for ``gtsrb`` only, the official GTSRB release
      (``GTSRB/Final_Training/Images/000NN/*.ppm`` + ``GT-000NN.csv``,
      ``GTSRB/Final_Test/Images/*.ppm`` + ``GT-final_test.csv``), each image cropped
      to its ROI and resized to 32x32 (bilinear).  ``<data_dir>/Final_Training`` is
      accepted too.

   Decoded image trees/zips/GTSRB releases are cached as a Keras-layout uint8 npz
   in ``$DM_JAX_CACHE_DIR`` (default ``~/.cache/dm_jax``), keyed by the source path
   and its size and modification time, so only the first load pays for decoding.

2. TensorFlow Datasets (``mnist``, ``cifar10``; GTSRB is not in TFDS).  With
   TensorFlow installed this is ``tfds.load(..., batch_size=-1, as_supervised=True)``;
   without TensorFlow the TF-free ``tfds.data_source`` reader is used instead.

If nothing works, :class:`DatasetNotFoundError` (a ``FileNotFoundError``) is raised,
listing every path that was looked in and how to provide the data.

Class indices for image folders: the position of the folder name in the standard
CIFAR-10 order when every folder name is a CIFAR-10 class name; the integer value
when every folder name is numeric (``00012`` -> 12); otherwise the position in the
sorted list of folder names.

The module keeps no global mutable state: the cache location is read from the
environment at each call and the shuffles are pure functions of ``(seed, epoch)``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import os
import re
import tempfile
import types
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "Dataset",
    "DatasetNotFoundError",
    "DatasetSpec",
    "batches",
    "cache_dir",
    "cifar_augment",
    "load_dataset",
    "num_batches",
    "subset",
]

DATA_DIR_ENV = "DM_JAX_DATA_DIR"
CACHE_DIR_ENV = "DM_JAX_CACHE_DIR"

# Bump when the decoding of image sources changes, so stale caches are not reused.
_CACHE_FORMAT_VERSION = "1"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm")

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)


def _readonly(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32)
    arr.flags.writeable = False
    return arr


#: Per-channel CIFAR-10 mean / std (RGB, for x in [0, 1]); shape (3,), read-only.
CIFAR10_MEAN = _readonly((0.4914, 0.4822, 0.4465))
CIFAR10_STD = _readonly((0.2023, 0.1994, 0.2010))


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static description of a supported dataset."""

    name: str
    input_shape: tuple[int, int, int]  # (H, W, C)
    num_classes: int
    tfds_name: str | None  # None: not available in TensorFlow Datasets


DATASETS: Mapping[str, DatasetSpec] = types.MappingProxyType({
    "mnist": DatasetSpec("mnist", (28, 28, 1), 10, "mnist"),
    "cifar10": DatasetSpec("cifar10", (32, 32, 3), 10, "cifar10"),
    "gtsrb": DatasetSpec("gtsrb", (32, 32, 3), 43, None),
})


class DatasetNotFoundError(FileNotFoundError):
    """No source for a dataset could be found (local files or TFDS)."""


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A train/test split held in memory.

    Attributes:
      name: dataset name (``"mnist"``, ``"cifar10"``, ``"gtsrb"``).
      x_train: float32 ``(N_train, H, W, C)`` in ``[0, 1]``.
      y_train: int32 ``(N_train,)`` in ``[0, num_classes)``.
      x_test: float32 ``(N_test, H, W, C)`` in ``[0, 1]``.
      y_test: int32 ``(N_test,)``.
      num_classes: number of classes.
      input_shape: ``(H, W, C)``.
      source: human-readable description of where the data came from.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, int, int]
    source: str

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, x_train={self.x_train.shape}, "
                f"x_test={self.x_test.shape}, num_classes={self.num_classes}, "
                f"source={self.source!r})")


# ---------------------------------------------------------------------------
# Public loading API
# ---------------------------------------------------------------------------


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    split: Sequence[str] = ("train", "test"),
) -> Dataset:
    """Loads a dataset as float32 ``(N, H, W, C)`` images in ``[0, 1]`` and int32 labels.

    Args:
      name: one of ``"mnist"``, ``"cifar10"``, ``"gtsrb"`` (case-insensitive).
      data_dir: directory holding the data (see the module docstring for the accepted
        layouts); defaults to ``$DM_JAX_DATA_DIR``.  Also passed to TFDS as its
        ``data_dir`` when falling back to TFDS.
      split: ``(train_split, test_split)``, the splits that fill ``x_train/y_train``
        and ``x_test/y_test``.  Each is ``"train"`` or ``"test"`` with an optional
        TFDS-style slice, e.g. ``("train[:50000]", "train[50000:]")`` or
        ``("train[:10%]", "test")``.  Percent slices round to the nearest example.

    Returns:
      A :class:`Dataset`.

    Raises:
      ValueError: unknown dataset name, malformed ``split``, or a source that exists
        but is malformed (wrong keys / shapes / labels).
      DatasetNotFoundError: no local source and the TFDS fallback is unavailable.
    """
    spec = _get_spec(name)
    splits = _parse_splits(split)

    if data_dir is None:
        env = os.environ.get(DATA_DIR_ENV, "").strip()
        root = Path(env).expanduser() if env else None
    else:
        root = Path(data_dir).expanduser()

    looked_in: list[str] = []
    found = None
    if root is not None:
        found = _load_local(spec, root, looked_in)

    if found is None:
        found, tfds_error = _try_tfds(spec, splits, root)
        if found is None:
            raise DatasetNotFoundError(
                _not_found_message(spec, root, data_dir is None, looked_in, tfds_error))
        (x_tr, y_tr), (x_te, y_te), source = found
    else:
        arrays, source = found
        pools = {"train": (arrays["x_train"], arrays["y_train"]),
                 "test": (arrays["x_test"], arrays["y_test"])}
        (x_tr, y_tr), (x_te, y_te) = (_apply_slice(pools[s.base], s) for s in splits)

    x_train, y_train = _standardize(spec, x_tr, y_tr, f"{source} ({split[0]})")
    x_test, y_test = _standardize(spec, x_te, y_te, f"{source} ({split[1]})")
    return Dataset(
        name=spec.name,
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        num_classes=spec.num_classes, input_shape=spec.input_shape, source=source,
    )


def subset(ds: Dataset, n_train: int | None, n_test: int | None) -> Dataset:
    """Returns a Dataset with the first ``n_train`` training and ``n_test`` test examples.

    ``None`` keeps the whole split.  Raises ``ValueError`` for negative counts or counts
    larger than the split.
    """
    def check(n: int | None, have: int, what: str) -> int:
        if n is None:
            return have
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise ValueError(f"{what} must be an int or None, got {n!r}")
        if n < 0 or n > have:
            raise ValueError(f"{what}={n} out of range: the split has {have} examples")
        return int(n)

    nt = check(n_train, ds.num_train, "n_train")
    ne = check(n_test, ds.num_test, "n_test")
    return dataclasses.replace(
        ds,
        x_train=ds.x_train[:nt], y_train=ds.y_train[:nt],
        x_test=ds.x_test[:ne], y_test=ds.y_test[:ne],
        source=f"{ds.source} [subset: first {nt} train, {ne} test]",
    )


def cache_dir() -> Path:
    """The decode cache directory: ``$DM_JAX_CACHE_DIR`` or ``~/.cache/dm_jax``."""
    env = os.environ.get(CACHE_DIR_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dm_jax"


# ---------------------------------------------------------------------------
# Batching and augmentation
# ---------------------------------------------------------------------------


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Number of batches :func:`batches` yields for ``n`` examples."""
    n = _check_int(n, "n", minimum=0)
    batch_size = _check_int(batch_size, "batch_size", minimum=1)
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    key_or_seed: Any,
    epoch: int = 0,
    drop_remainder: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Iterates over one epoch of shuffled ``(x_batch, y_batch)`` numpy batches.

    The order is ``np.random.default_rng([seed, epoch]).permutation(n)``, a pure
    function of ``(seed, epoch)``: a run resumed at epoch ``e`` sees exactly the batches
    the original run would have seen.  With a JAX PRNG key the seed words are the key's
    data (``[*key_data, epoch]``).

    Args:
      x: array ``(N, ...)``.
      y: array ``(N, ...)``.
      batch_size: examples per batch (> 0).
      key_or_seed: non-negative int seed, or a JAX PRNG key (raw uint32 or typed).
      epoch: non-negative epoch index.
      drop_remainder: drop the last incomplete batch (every batch then has exactly
        ``batch_size`` examples; ``N < batch_size`` yields nothing).

    Yields:
      ``(x[idx], y[idx])`` with ``len(idx) == batch_size`` (the last one may be smaller
      when ``drop_remainder=False``).
    """
    if len(x) != len(y):
        raise ValueError(f"x and y have different lengths: {len(x)} != {len(y)}")
    batch_size = _check_int(batch_size, "batch_size", minimum=1)
    epoch = _check_int(epoch, "epoch", minimum=0)
    seed_words = _seed_words(key_or_seed)
    n = len(x)
    perm = np.random.default_rng([*seed_words, epoch]).permutation(n)
    count = num_batches(n, batch_size, drop_remainder)

    def gen() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for b in range(count):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            yield x[idx], y[idx]

    return gen()


def cifar_augment(key: jax.Array, x: jax.Array, *, pad: int = 4) -> jax.Array:
    """Standard CIFAR augmentation: zero-pad, random crop back, random horizontal flip.

    Every example gets its own crop offset (uniform in ``[0, 2 * pad]`` on each axis)
    and its own flip (probability 1/2).  Works under ``jax.jit`` (``pad`` must be
    static, e.g. ``jax.jit(cifar_augment, static_argnames="pad")`` if you change it).

    Args:
      key: JAX PRNG key (raw or typed).
      x: images ``(B, H, W, C)``.
      pad: zero padding on each side (default 4).

    Returns:
      Augmented images, same shape and dtype as ``x``.
    """
    if x.ndim != 4:
        raise ValueError(f"cifar_augment expects (B, H, W, C) images, got shape {x.shape}")
    pad = _check_int(pad, "pad", minimum=0)
    b, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    keys = jax.random.split(key, b)

    def one(k: jax.Array, img: jax.Array) -> jax.Array:
        k_y, k_x, k_flip = jax.random.split(k, 3)
        dy = jax.random.randint(k_y, (), 0, 2 * pad + 1)
        dx = jax.random.randint(k_x, (), 0, 2 * pad + 1)
        crop = lax.dynamic_slice(img, (dy, dx, jnp.zeros_like(dy)), (h, w, c))
        return jnp.where(jax.random.bernoulli(k_flip), crop[:, ::-1, :], crop)

    return jax.vmap(one)(keys, padded)


# ---------------------------------------------------------------------------
# Argument helpers
# ---------------------------------------------------------------------------


def _get_spec(name: str) -> DatasetSpec:
    if not isinstance(name, str) or name.lower() not in DATASETS:
        raise ValueError(
            f"Unknown dataset {name!r}; supported datasets: {', '.join(DATASETS)}")
    return DATASETS[name.lower()]


def _check_int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def _seed_words(key_or_seed: Any) -> list[int]:
    if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, bool):
        if key_or_seed < 0:
            raise ValueError(f"seed must be non-negative, got {key_or_seed}")
        return [int(key_or_seed)]
    if isinstance(key_or_seed, (jax.Array, np.ndarray)):
        arr = key_or_seed
        if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key):
            arr = jax.random.key_data(arr)
        arr = np.asarray(arr)
        if arr.ndim == 1 and arr.size > 0 and np.issubdtype(arr.dtype, np.unsignedinteger):
            return [int(v) for v in arr]
    raise ValueError(
        "key_or_seed must be a non-negative int or a single JAX PRNG key, "
        f"got {key_or_seed!r}")


@dataclasses.dataclass(frozen=True)
class _Split:
    text: str
    base: str  # "train" | "test"
    start: str | None
    stop: str | None


_SPLIT_RE = re.compile(r"^(train|test)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$")


def _parse_splits(split: Sequence[str]) -> tuple[_Split, _Split]:
    if isinstance(split, str) or len(split) != 2:
        raise ValueError(
            f"split must be a (train_split, test_split) pair such as ('train', 'test'), "
            f"got {split!r}")
    out = []
    for s in split:
        m = _SPLIT_RE.match(s.replace(" ", "")) if isinstance(s, str) else None
        if m is None:
            raise ValueError(
                f"Unsupported split {s!r}: use 'train' or 'test', optionally sliced "
                "like 'train[:50000]', 'train[50000:]' or 'test[:10%]'")
        out.append(_Split(s, m.group(1), m.group(2), m.group(3)))
    return out[0], out[1]


def _apply_slice(pool: tuple[np.ndarray, np.ndarray], s: _Split) -> tuple[np.ndarray, np.ndarray]:
    x, y = pool
    n = len(x)

    def bound(b: str | None) -> int | None:
        if b is None:
            return None
        if b.endswith("%"):
            return int(round(n * int(b[:-1]) / 100))
        return int(b)

    sl = slice(bound(s.start), bound(s.stop))
    return x[sl], y[sl]


def _standardize(spec: DatasetSpec, x: Any, y: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Converts to float32 (N, H, W, C) in [0, 1] and int32 (N,), validating the result."""
    x = np.asarray(x)
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:  # Keras CIFAR layout: (N, 1)
        y = y[:, 0]
    if x.ndim == 3 and spec.input_shape[2] == 1:
        x = x[..., None]
    if x.ndim != 4 or tuple(x.shape[1:]) != spec.input_shape:
        raise ValueError(
            f"{spec.name}: images from {where} have shape {x.shape}, expected "
            f"(N, {', '.join(map(str, spec.input_shape))})")
    if y.shape != (x.shape[0],):
        raise ValueError(
            f"{spec.name}: labels from {where} have shape {y.shape}, expected ({x.shape[0]},)")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{spec.name}: labels from {where} have dtype {y.dtype}, expected ints")
    if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
        raise ValueError(
            f"{spec.name}: labels from {where} span [{y.min()}, {y.max()}], expected "
            f"[0, {spec.num_classes})")
    if x.dtype == np.uint8:
        xf = x.astype(np.float32)
        xf *= np.float32(1.0 / 255.0)
    elif np.issubdtype(x.dtype, np.floating):
        xf = x.astype(np.float32)
        if xf.size and (xf.min() < 0.0 or xf.max() > 1.0):
            raise ValueError(f"{spec.name}: float images from {where} are not in [0, 1]")
    else:
        raise ValueError(
            f"{spec.name}: images from {where} have dtype {x.dtype}, expected uint8")
    return xf, y.astype(np.int32)


# ---------------------------------------------------------------------------
# Local sources
# ---------------------------------------------------------------------------

_KERAS_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _load_local(
    spec: DatasetSpec, root: Path, looked_in: list[str]
) -> tuple[dict[str, np.ndarray], str] | None:
    """Tries every local layout under ``root``; returns (arrays, source) or None."""
    npz = root / f"{spec.name}.npz"
    looked_in.append(f"{npz}  (Keras-layout npz)")
    if npz.is_file():
        return _read_keras_npz(npz, spec.name), f"npz:{npz}"

    folder = root / spec.name
    looked_in.append(f"{folder}/{{train,test}}/<class>/*  (image folders)")
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return _cached(spec, folder, "folder", lambda: _decode_image_tree(spec, folder))

    for zname in (f"{spec.name}.zip", f"{spec.name}-jpeg.zip"):
        zpath = root / zname
        looked_in.append(f"{zpath}  (zip of train/<class>/*, test/<class>/*)")
        if zpath.is_file():
            return _cached(spec, zpath, "zip", lambda z=zpath: _decode_image_zip(spec, z))

    if spec.name == "gtsrb":
        for groot in (root / "GTSRB", root):
            looked_in.append(
                f"{groot / 'Final_Training' / 'Images'}  (official GTSRB release)")
            if (groot / "Final_Training" / "Images").is_dir():
                csvs = _gtsrb_test_csv_candidates(groot, root)
                sig = [groot / "Final_Training", groot / "Final_Test", *csvs]
                return _cached(spec, groot, "gtsrb-official",
                               lambda g=groot, c=csvs: _decode_gtsrb_official(spec, g, c),
                               signature_paths=sig)
    return None


def _read_keras_npz(path: Path, name: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in _KERAS_KEYS if k not in f.files]
            if missing:
                raise ValueError(
                    f"{name}: {path} lacks keys {missing}; expected the Keras layout "
                    f"{list(_KERAS_KEYS)} (found {f.files})")
            return {k: f[k] for k in _KERAS_KEYS}
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{name}: cannot read {path}: {e}") from e


def _decode_image(data: bytes, size: tuple[int, int], mode: str,
                  box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Decodes one encoded image to uint8 ``(H, W, C)``.

    ``size`` is ``(H, W)``; ``mode`` is ``"L"`` or ``"RGB"``; ``box`` an optional PIL
    crop box ``(left, upper, right, lower)`` applied before resizing.  Images whose size
    differs from ``size`` are resized with bilinear interpolation.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert(mode)
        if box is not None:
            im = im.crop(box)
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _class_index_map(names: Sequence[str], num_classes: int, where: str) -> dict[str, int]:
    """Maps class-folder names to indices (CIFAR-10 order / numeric / sorted)."""
    unique = sorted(set(names))
    if all(n in CIFAR10_CLASSES for n in unique):
        mapping = {n: CIFAR10_CLASSES.index(n) for n in unique}
    elif all(n.isdigit() for n in unique):
        mapping = {n: int(n) for n in unique}
    else:
        mapping = {n: i for i, n in enumerate(unique)}
    bad = sorted(n for n, i in mapping.items() if i >= num_classes)
    if bad:
        raise ValueError(
            f"{where}: class folders {bad} map to indices >= num_classes={num_classes}")
    return mapping


def _decode_items(
    spec: DatasetSpec, items: list[tuple[str, str, str]], read: Callable[[str], bytes],
    where: str,
) -> dict[str, np.ndarray]:
    """items: (split, class_name, key) triples; read(key) gives the encoded bytes."""
    h, w, c = spec.input_shape
    mode = "L" if c == 1 else "RGB"
    for split in ("train", "test"):
        if not any(it[0] == split for it in items):
            raise ValueError(f"{spec.name}: no images found for split {split!r} in {where}")
    mapping = _class_index_map([it[1] for it in items], spec.num_classes, where)
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        chosen = sorted(((mapping[cls], key) for s, cls, key in items if s == split))
        x = np.empty((len(chosen), h, w, c), np.uint8)
        for i, (_, key) in enumerate(chosen):
            x[i] = _decode_image(read(key), (h, w), mode)
        out[f"x_{split}"] = x
        out[f"y_{split}"] = np.asarray([lab for lab, _ in chosen], np.uint8)
    return out


def _decode_image_tree(spec: DatasetSpec, folder: Path) -> dict[str, np.ndarray]:
    items = []
    for split in ("train", "test"):
        for cls_dir in sorted(p for p in (folder / split).iterdir() if p.is_dir()):
            for f in sorted(cls_dir.iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    items.append((split, cls_dir.name, str(f)))
    return _decode_items(spec, items, lambda p: Path(p).read_bytes(), str(folder))


def _decode_image_zip(spec: DatasetSpec, zpath: Path) -> dict[str, np.ndarray]:
    try:
        zf = zipfile.ZipFile(zpath)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{spec.name}: cannot open {zpath}: {e}") from e
    with zf:
        items, prefixes = [], set()
        for info in zf.infolist():
            if info.is_dir():
                continue
            parts = info.filename.split("/")
            if parts[0] == "__MACOSX" or parts[-1].startswith("._"):
                continue  # resource forks added by macOS archivers
            if (len(parts) >= 3 and parts[-3] in ("train", "test")
                    and Path(parts[-1]).suffix.lower() in IMAGE_EXTENSIONS):
                prefixes.add("/".join(parts[:-3]))
                items.append((parts[-3], parts[-2], info.filename))
        if len(prefixes) > 1:
            raise ValueError(
                f"{spec.name}: {zpath} holds several train/test trees "
                f"(under {sorted(prefixes)}); expected one")
        return _decode_items(spec, items, zf.read, str(zpath))


def _read_gt_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    need = ("Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
    if rows and any(k not in rows[0] for k in need):
        raise ValueError(f"gtsrb: {path} lacks columns {need} (found {list(rows[0])})")
    return rows


def _gtsrb_rows(spec: DatasetSpec, img_dir: Path, rows: list[dict[str, str]],
                where: Path) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Decodes the csv rows of one folder: ROI crop then 32x32 bilinear resize."""
    h, w, _ = spec.input_shape
    xs, ys, missing, size_mismatch = [], [], 0, 0
    for row in sorted(rows, key=lambda r: r["Filename"]):
        f = img_dir / row["Filename"]
        if not f.is_file():
            missing += 1
            continue
        data = f.read_bytes()
        box = tuple(int(row[k]) for k in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
        if "Width" in row and "Height" in row:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                if im.size != (int(row["Width"]), int(row["Height"])):
                    size_mismatch += 1
                    box = None  # the ROI refers to another image size: use the whole image
        xs.append(_decode_image(data, (h, w), "RGB", box))
        label = int(row["ClassId"])
        if not 0 <= label < spec.num_classes:
            raise ValueError(f"gtsrb: ClassId {label} out of range in {where}")
        ys.append(label)
    x = np.stack(xs) if xs else np.zeros((0, h, w, 3), np.uint8)
    return x, np.asarray(ys, np.uint8), missing, size_mismatch


def _gtsrb_test_csv_candidates(groot: Path, root: Path) -> list[Path]:
    """Where GT-final_test.csv (the test labels, shipped separately) may be."""
    out = [groot / "Final_Test" / "Images" / "GT-final_test.csv",
           groot / "Final_Test" / "GT-final_test.csv",
           groot / "GT-final_test.csv",
           root / "GT-final_test.csv"]
    return list(dict.fromkeys(out))


def _decode_gtsrb_official(spec: DatasetSpec, groot: Path,
                           candidates: Sequence[Path]) -> dict[str, np.ndarray]:
    """Decodes the official GTSRB release rooted at ``groot``.

    ROI boxes are used as a PIL crop box ``(X1, Y1, X2, Y2)`` (X2/Y2 exclusive, which
    leaves the symmetric border the GTSRB documentation describes).
    """
    train_dir = groot / "Final_Training" / "Images"
    xs, ys, missing, mismatch = [], [], 0, 0
    class_dirs = sorted(p for p in train_dir.iterdir() if p.is_dir())
    if not class_dirs:
        raise ValueError(f"gtsrb: no class folders in {train_dir}")
    for cls_dir in class_dirs:
        gt = cls_dir / f"GT-{cls_dir.name}.csv"
        if not gt.is_file():
            raise ValueError(f"gtsrb: missing annotation file {gt}")
        x, y, m, s = _gtsrb_rows(spec, cls_dir, _read_gt_csv(gt), gt)
        xs.append(x)
        ys.append(y)
        missing += m
        mismatch += s

    test_dir = groot / "Final_Test" / "Images"
    gt_test = next((p for p in candidates if p.is_file()), None)
    if gt_test is None:
        raise ValueError(
            "gtsrb: found the official training set but not the test labels "
            "GT-final_test.csv (with a ClassId column; GT-final_test.test.csv has none) "
            f"in any of {[str(p) for p in candidates]}")
    x_te, y_te, m, s = _gtsrb_rows(spec, test_dir, _read_gt_csv(gt_test), gt_test)
    missing += m
    mismatch += s
    if missing:
        warnings.warn(f"gtsrb: {missing} images listed in the csv files of {groot} are "
                      "missing and were skipped", stacklevel=3)
    if mismatch:
        warnings.warn(f"gtsrb: {mismatch} images in {groot} differ in size from their csv "
                      "Width/Height, so their ROI was ignored (whole image resized)",
                      stacklevel=3)
    x_tr, y_tr = np.concatenate(xs), np.concatenate(ys)
    if len(x_tr) == 0 or len(x_te) == 0:
        raise ValueError(f"gtsrb: no images decoded from {groot}")
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}


# ---------------------------------------------------------------------------
# Decode cache
# ---------------------------------------------------------------------------


def _source_signature(path: Path) -> str:
    """Path + size + mtime of a file, or of every file below a directory."""
    if not path.exists():
        return f"absent:{path}"
    st = path.stat()
    if path.is_file():
        return f"file:{path}:{st.st_size}:{st.st_mtime_ns}"
    entries = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for fn in sorted(filenames):
            fp = os.path.join(dirpath, fn)
            s = os.stat(fp)
            entries.append(f"{os.path.relpath(fp, path)}:{s.st_size}:{s.st_mtime_ns}")
    total = sum(int(e.rsplit(":", 2)[1]) for e in entries)
    digest = hashlib.sha256("\n".join(entries).encode()).hexdigest()
    return f"dir:{path}:{len(entries)}:{total}:{digest}"


def _cached(
    spec: DatasetSpec, src: Path, kind: str, decode: Callable[[], dict[str, np.ndarray]],
    signature_paths: Sequence[Path] | None = None,
) -> tuple[dict[str, np.ndarray], str]:
    """Returns the decoded arrays of ``src`` from the cache, decoding and caching on a miss.

    The cache key covers ``src`` (or ``signature_paths``): paths, sizes and mtimes.
    """
    src = src.resolve()
    sig_paths = [src] if signature_paths is None else [p.resolve() for p in signature_paths]
    key = "|".join([_CACHE_FORMAT_VERSION, spec.name, kind, repr(spec.input_shape), str(src),
                    *(_source_signature(p) for p in sig_paths)])
    cdir = cache_dir()
    cfile = cdir / f"{spec.name}-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
    source = f"{kind}:{src}"
    if cfile.is_file():
        try:
            return _read_keras_npz(cfile, spec.name), f"{source} (cached {cfile})"
        except ValueError as e:
            warnings.warn(f"Ignoring unreadable cache {cfile}: {e}", stacklevel=3)

    arrays = decode()
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=cfile.stem, suffix=".tmp.npz", dir=cdir)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, cfile)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        source += f" (decoded, cached to {cfile})"
    except OSError as e:
        warnings.warn(f"Could not write the decode cache {cfile}: {e}", stacklevel=3)
        source += " (decoded, not cached)"
    return arrays, source


# ---------------------------------------------------------------------------
# TensorFlow Datasets fallback
# ---------------------------------------------------------------------------


def _try_tfds(
    spec: DatasetSpec, splits: tuple[_Split, _Split], root: Path | None
) -> tuple[Any, str | None]:
    """Returns ((train, test, source), None) on success, else (None, error line)."""
    if spec.tfds_name is None:
        return None, f"{spec.name} is not available in TensorFlow Datasets"
    try:
        import tensorflow_datasets as tfds
    except Exception as e:  # noqa: BLE001 - any import failure means "no TFDS"
        return None, _one_line(f"tensorflow_datasets is not importable: "
                               f"{type(e).__name__}: {e}")
    tfds_dir = None if root is None else os.fspath(root)
    try:
        if importlib.util.find_spec("tensorflow") is not None:
            out = []
            for s in splits:
                ds = tfds.load(spec.tfds_name, split=s.text, batch_size=-1,
                               as_supervised=True, data_dir=tfds_dir)
                x, y = tfds.as_numpy(ds)
                out.append((np.asarray(x), np.asarray(y)))
            how = "tfds.load"
        else:
            # Without TensorFlow, tfds.load cannot build a tf.data pipeline; the
            # TF-free random-access reader (ArrayRecord files) still works.
            out = []
            for s in splits:
                src = tfds.data_source(spec.tfds_name, split=s.text, data_dir=tfds_dir)
                recs = [src[i] for i in range(len(src))]
                h, w, c = spec.input_shape
                x = (np.stack([np.asarray(r["image"]) for r in recs]) if recs
                     else np.zeros((0, h, w, c), np.uint8))
                y = np.asarray([int(r["label"]) for r in recs], np.int64)
                out.append((x, y))
            how = "tfds.data_source"
    except Exception as e:  # noqa: BLE001 - TFDS raises many types (network, build, ...)
        return None, _one_line(f"{type(e).__name__}: {e}")
    where = tfds_dir if tfds_dir is not None else "default data_dir"
    return (out[0], out[1], f"tfds:{spec.tfds_name} via {how} ({where})"), None


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _not_found_message(spec: DatasetSpec, root: Path | None, from_env: bool,
                       looked_in: list[str], tfds_error: str | None) -> str:
    h, w, c = spec.input_shape
    shape = f"[N, {h}, {w}]" if c == 1 else f"[N, {h}, {w}, {c}]"
    lines = [f"Could not load dataset {spec.name!r}."]
    if root is None:
        lines.append(f"  No data directory: data_dir was not given and ${DATA_DIR_ENV} "
                     "is not set, so no local paths were searched.")
    else:
        origin = f"${DATA_DIR_ENV}" if from_env else "data_dir"
        lines.append(f"  Looked in ({origin}={root}):")
        lines.extend(f"    - {p}" for p in looked_in)
    lines.append(f"  TensorFlow Datasets fallback failed: {tfds_error}")
    lines.append(
        f"  To provide the data, pass --data_dir (data_dir=...) or set {DATA_DIR_ENV} to a "
        f"directory containing {spec.name}.npz in Keras layout (uint8 x_train {shape}, "
        f"y_train [N], x_test, y_test), or an image-folder tree {spec.name}/train/<class>/* "
        f"and {spec.name}/test/<class>/* (or {spec.name}.zip / {spec.name}-jpeg.zip "
        "holding one)")
    if spec.name == "gtsrb":
        lines[-1] += (", or the official GTSRB release (GTSRB/Final_Training/Images/000NN "
                      "with GT-000NN.csv, GTSRB/Final_Test/Images with GT-final_test.csv)")
    if spec.tfds_name is not None:
        lines[-1] += (f"; or install tensorflow-datasets (and tensorflow) with network "
                      f"access so that TFDS can download {spec.tfds_name!r}")
    lines[-1] += "."
    return "\n".join(lines)
