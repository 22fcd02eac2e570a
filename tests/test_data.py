"""Tests for dm_jax.data: local sources, decode cache, TFDS fallback, batching, augmentation."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dm_jax import data
from dm_jax.data import DatasetNotFoundError, load_dataset


def _real_data_dir() -> Path:
    env = os.environ.get("DM_JAX_DATA_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


REAL_DATA = _real_data_dir()
needs_real_data = pytest.mark.skipif(
    not REAL_DATA.is_dir(), reason=f"real data directory {REAL_DATA} not present")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Keeps tests off the user's cache and data dir."""
    monkeypatch.setenv("DM_JAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DM_JAX_DATA_DIR", raising=False)


def _cache_files(tmp_path: Path) -> list[Path]:
    cdir = tmp_path / "cache"
    return sorted(cdir.glob("*.npz")) if cdir.is_dir() else []


# ---------------------------------------------------------------------------
# Fixtures on disk
# ---------------------------------------------------------------------------


@pytest.fixture
def keras_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(12) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "y_test": np.array([9, 8, 7, 6, 5], np.uint8),
    }
    d = tmp_path / "npzdata"
    d.mkdir()
    np.savez(d / "mnist.npz", **arrays)
    return d, arrays


# CIFAR-10 names deliberately not in CIFAR order and not in sorted-by-index order.
TREE_CLASSES = {"truck": 9, "cat": 3, "airplane": 0}


def _write_cifar_tree(base: Path, seed: int = 0) -> dict[tuple[str, str, str], np.ndarray]:
    """Writes base/{train,test}/<class>/NNNN.png; returns {(split, class, file): pixels}."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for split, per_class in (("train", 3), ("test", 2)):
        for cls in TREE_CLASSES:
            (base / split / cls).mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                fname = f"{i:04d}.png"
                Image.fromarray(img).save(base / split / cls / fname)
                pixels[(split, cls, fname)] = img
    return pixels


def _expected_from_tree(pixels, split):
    """Expected (x uint8, y) in the loader's order: by label, then file name."""
    keys = sorted((TREE_CLASSES[c], f, c) for (s, c, f) in pixels if s == split)
    x = np.stack([pixels[(split, c, f)] for _, f, c in keys])
    y = np.array([lab for lab, _, _ in keys])
    return x, y


@pytest.fixture
def cifar_tree(tmp_path):
    root = tmp_path / "treedata"
    pixels = _write_cifar_tree(root / "cifar10")
    return root, pixels


def _zip_tree(tree: Path, zpath: Path, prefix: str = "") -> None:
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(tree.rglob("*")):
            rel = p.relative_to(tree).as_posix()
            zf.write(p, prefix + rel + ("/" if p.is_dir() else ""))
        if prefix:  # macOS archivers add resource forks; they must be ignored
            zf.writestr(f"__MACOSX/{prefix}train/cat/._0000.png", b"junk")


# ---------------------------------------------------------------------------
# Keras npz
# ---------------------------------------------------------------------------


def test_keras_npz(keras_npz):
    d, arrays = keras_npz
    ds = load_dataset("mnist", data_dir=d)
    assert ds.name == "mnist" and ds.num_classes == 10 and ds.input_shape == (28, 28, 1)
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (5, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.y_test.dtype == np.int32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    np.testing.assert_allclose(ds.x_train[..., 0] * 255.0, arrays["x_train"], atol=1e-4)
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert "mnist.npz" in ds.source
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.x_train = ds.x_test  # type: ignore[misc]
    assert _cache_files(d.parent) == []  # npz sources are not cached


def test_env_var_data_dir(keras_npz, monkeypatch):
    d, _ = keras_npz
    monkeypatch.setenv("DM_JAX_DATA_DIR", str(d))
    assert load_dataset("mnist").x_train.shape == (12, 28, 28, 1)


def test_split_slicing(keras_npz):
    d, arrays = keras_npz
    ds = load_dataset("mnist", data_dir=d, split=("train[:8]", "train[8:]"))
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"][:8])
    np.testing.assert_array_equal(ds.y_test, arrays["y_train"][8:])
    ds = load_dataset("mnist", data_dir=d, split=("train[:50%]", "test[-2:]"))
    assert ds.num_train == 6 and ds.num_test == 2
    for bad in (("train",), "train", ("val", "test"), ("train[1:2:3]", "test")):
        with pytest.raises(ValueError):
            load_dataset("mnist", data_dir=d, split=bad)


def test_malformed_npz_is_an_error_not_a_fallback(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="lacks keys"):
        load_dataset("mnist", data_dir=tmp_path)
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((2, 32, 32), np.uint8),
             y_train=np.zeros(2, np.uint8), x_test=np.zeros((1, 32, 32), np.uint8),
             y_test=np.zeros(1, np.uint8))
    with pytest.raises(ValueError, match="shape"):
        load_dataset("mnist", data_dir=tmp_path)


def test_subset(keras_npz):
    d, arrays = keras_npz
    ds = load_dataset("mnist", data_dir=d)
    small = data.subset(ds, 4, 2)
    assert small.x_train.shape == (4, 28, 28, 1) and small.x_test.shape == (2, 28, 28, 1)
    np.testing.assert_array_equal(small.y_train, arrays["y_train"][:4])
    assert small.num_classes == 10 and small.name == "mnist"
    assert data.subset(ds, None, 0).num_train == 12
    with pytest.raises(ValueError):
        data.subset(ds, 13, 1)
    with pytest.raises(ValueError):
        data.subset(ds, -1, 1)


# ---------------------------------------------------------------------------
# Image folders and zips, with the decode cache
# ---------------------------------------------------------------------------


def _check_against_tree(ds, pixels):
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        ex, ey = _expected_from_tree(pixels, split)
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.shape == ex.shape
        np.testing.assert_array_equal(y, ey)
        np.testing.assert_allclose(x * 255.0, ex, atol=1e-3)  # PNG is lossless
    assert set(ds.y_train.tolist()) == {0, 3, 9}  # CIFAR-10 order, not sorted order


def _fail_decode(*args, **kwargs):
    raise AssertionError("decoder called although the cache should have been used")


def test_image_folder_tree_and_cache(cifar_tree, tmp_path, monkeypatch):
    root, pixels = cifar_tree
    ds = load_dataset("cifar10", data_dir=root)
    assert ds.x_train.shape == (9, 32, 32, 3) and ds.x_test.shape == (6, 32, 32, 3)
    _check_against_tree(ds, pixels)
    caches = _cache_files(tmp_path)
    assert len(caches) == 1
    with np.load(caches[0], allow_pickle=False) as f:
        assert sorted(f.files) == ["x_test", "x_train", "y_test", "y_train"]
        assert f["x_train"].dtype == np.uint8

    # Second load: from the cache, no decoding.
    monkeypatch.setattr(data, "_decode_image", _fail_decode)
    ds2 = load_dataset("cifar10", data_dir=root)
    _check_against_tree(ds2, pixels)
    assert "cached" in ds2.source
    assert _cache_files(tmp_path) == caches

    # Changing the tree invalidates the cache (so the failing decoder is reached).
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "cifar10/test/cat/0009.png")
    with pytest.raises(AssertionError, match="decoder called"):
        load_dataset("cifar10", data_dir=root)


@pytest.mark.parametrize("zip_name,prefix", [("cifar10.zip", ""),
                                             ("cifar10-jpeg.zip", "cifar10/")])
def test_zip_and_cache(cifar_tree, tmp_path, monkeypatch, zip_name, prefix):
    tree_root, pixels = cifar_tree
    zroot = tmp_path / "zipdata"
    zroot.mkdir()
    _zip_tree(tree_root / "cifar10", zroot / zip_name, prefix)
    ds = load_dataset("cifar10", data_dir=zroot)
    _check_against_tree(ds, pixels)
    assert zip_name in ds.source
    assert len(_cache_files(tmp_path)) == 1

    monkeypatch.setattr(data, "_decode_image", _fail_decode)
    ds2 = load_dataset("cifar10", data_dir=zroot)
    _check_against_tree(ds2, pixels)
    assert len(_cache_files(tmp_path)) == 1

    # A new mtime means a new cache key, so the zip is decoded again.
    st = os.stat(zroot / zip_name)
    os.utime(zroot / zip_name, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoder called"):
        load_dataset("cifar10", data_dir=zroot)


def test_grayscale_tree_numeric_classes(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "d"
    expected = {}
    for split in ("train", "test"):
        for cls in ("7", "2", "0"):
            (root / "mnist" / split / cls).mkdir(parents=True)
            img = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(img).save(root / "mnist" / split / cls / "a.png")
            expected[(split, int(cls))] = img
    ds = load_dataset("mnist", data_dir=root)
    assert ds.x_train.shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(ds.y_train, [0, 2, 7])
    for i, lab in enumerate(ds.y_test):
        np.testing.assert_allclose(ds.x_test[i, ..., 0] * 255, expected[("test", lab)],
                                   atol=1e-3)


def test_tree_sorted_names_and_resize(tmp_path):
    """Non-CIFAR, non-numeric names: sorted order; odd-sized images: bilinear resize."""
    root = tmp_path / "d"
    rng = np.random.default_rng(2)
    big = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    for split in ("train", "test"):
        for cls in ("yield", "stop"):
            (root / "gtsrb" / split / cls).mkdir(parents=True)
            Image.fromarray(big).save(root / "gtsrb" / split / cls / "x.ppm")
    ds = load_dataset("gtsrb", data_dir=root)
    np.testing.assert_array_equal(ds.y_train, [0, 1])  # stop=0, yield=1
    want = np.asarray(Image.fromarray(big).resize((32, 32), Image.BILINEAR))
    np.testing.assert_allclose(ds.x_train[0] * 255, want, atol=1e-3)


# ---------------------------------------------------------------------------
# Official GTSRB layout
# ---------------------------------------------------------------------------

GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def _gtsrb_official(base: Path, rng) -> dict:
    """Writes a tiny official-layout GTSRB under base; returns {(split, file): (img, box, y)}."""
    info = {}

    def make(folder: Path, fname: str, label: int):
        w, h = int(rng.integers(30, 60)), int(rng.integers(30, 60))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / fname)  # .ppm
        box = (int(rng.integers(1, 6)), int(rng.integers(1, 6)),
               w - int(rng.integers(1, 6)), h - int(rng.integers(1, 6)))
        return img, box, f"{fname};{w};{h};{box[0]};{box[1]};{box[2]};{box[3]};{label}\n"

    for label in (0, 5, 42):
        cdir = base / "Final_Training" / "Images" / f"{label:05d}"
        cdir.mkdir(parents=True)
        lines = [GT_HEADER]
        for i in range(2):
            fname = f"{i:05d}_{i:05d}.ppm"
            img, box, line = make(cdir, fname, label)
            info[("train", f"{label:05d}/{fname}")] = (img, box, label)
            lines.append(line)
        (cdir / f"GT-{label:05d}.csv").write_text("".join(lines))

    tdir = base / "Final_Test" / "Images"
    tdir.mkdir(parents=True)
    lines = [GT_HEADER]
    for i, label in enumerate((42, 0, 5, 5)):
        fname = f"{i:05d}.ppm"
        img, box, line = make(tdir, fname, label)
        info[("test", fname)] = (img, box, label)
        lines.append(line)
    (tdir / "GT-final_test.csv").write_text("".join(lines))
    return info


def _pil_roi_resize(img: np.ndarray, box) -> np.ndarray:
    return np.asarray(Image.fromarray(img).crop(box).resize((32, 32), Image.BILINEAR))


@pytest.mark.parametrize("nested", [True, False])
def test_gtsrb_official_layout(tmp_path, monkeypatch, nested):
    root = tmp_path / "g"
    info = _gtsrb_official(root / "GTSRB" if nested else root, np.random.default_rng(3))
    ds = load_dataset("gtsrb", data_dir=root)
    assert ds.num_classes == 43 and ds.input_shape == (32, 32, 3)
    assert ds.x_train.shape == (6, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(ds.y_train, [0, 0, 5, 5, 42, 42])
    np.testing.assert_array_equal(ds.y_test, [42, 0, 5, 5])  # csv file-name order

    train_keys = sorted(k for k in info if k[0] == "train")
    test_keys = sorted(k for k in info if k[0] == "test")
    for x, keys in ((ds.x_train, train_keys), (ds.x_test, test_keys)):
        for i, k in enumerate(keys):
            img, box, _ = info[k]
            np.testing.assert_allclose(x[i] * 255, _pil_roi_resize(img, box), atol=1e-3)
    # The crop matters: whole-image resize gives something else.
    img, box, _ = info[train_keys[0]]
    whole = np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR))
    assert np.abs(ds.x_train[0] * 255 - whole).max() > 1
    assert len(_cache_files(tmp_path)) == 1

    monkeypatch.setattr(data, "_decode_image", _fail_decode)
    ds2 = load_dataset("gtsrb", data_dir=root)
    np.testing.assert_array_equal(ds2.x_test, ds.x_test)


def test_gtsrb_csv_size_mismatch_ignores_roi(tmp_path):
    root = tmp_path / "GTSRB"
    info = _gtsrb_official(root, np.random.default_rng(5))
    gt = root / "Final_Test/Images/GT-final_test.csv"
    lines = gt.read_text().splitlines(keepends=True)
    f = lines[1].split(";")
    f[1] = str(int(f[1]) + 7)  # Width no longer matches the image
    lines[1] = ";".join(f)
    gt.write_text("".join(lines))
    with pytest.warns(UserWarning, match="ROI was ignored"):
        ds = load_dataset("gtsrb", data_dir=tmp_path)
    img, _, _ = info[("test", f[0])]
    whole = np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR))
    np.testing.assert_allclose(ds.x_test[0] * 255, whole, atol=1e-3)


def test_gtsrb_missing_test_labels(tmp_path):
    _gtsrb_official(tmp_path / "GTSRB", np.random.default_rng(4))
    (tmp_path / "GTSRB/Final_Test/Images/GT-final_test.csv").unlink()
    with pytest.raises(ValueError, match="GT-final_test.csv"):
        load_dataset("gtsrb", data_dir=tmp_path)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_unknown_name():
    with pytest.raises(ValueError, match="imagenet"):
        load_dataset("imagenet")


def test_missing_gtsrb_lists_paths(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as ei:
        load_dataset("gtsrb", data_dir=empty)
    assert isinstance(ei.value, FileNotFoundError)
    msg = str(ei.value)
    for p in (empty / "gtsrb.npz", empty / "gtsrb", empty / "gtsrb.zip",
              empty / "gtsrb-jpeg.zip", empty / "GTSRB" / "Final_Training" / "Images",
              empty / "Final_Training" / "Images"):
        assert str(p) in msg
    assert "DM_JAX_DATA_DIR" in msg and "not available in TensorFlow Datasets" in msg


def test_missing_mnist_without_tfds(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import -> ImportError
    with pytest.raises(DatasetNotFoundError) as ei:
        load_dataset("mnist", data_dir=tmp_path)
    msg = str(ei.value)
    assert str(tmp_path / "mnist.npz") in msg and str(tmp_path / "mnist-jpeg.zip") in msg
    assert "tensorflow_datasets is not importable" in msg
    tfds_line = [ln for ln in msg.splitlines() if "TensorFlow Datasets fallback" in ln]
    assert len(tfds_line) == 1

    with pytest.raises(DatasetNotFoundError, match="is not set"):
        load_dataset("mnist")  # neither data_dir nor DM_JAX_DATA_DIR


# ---------------------------------------------------------------------------
# TFDS fallback
# ---------------------------------------------------------------------------


def test_tfds_fallback_mock(tmp_path):
    """Falls back to TFDS when the data directory holds nothing.

    ``tfds.testing.mock_data`` cannot mock ``tfds.load`` without TensorFlow: its
    ``as_dataset`` mock builds a ``tf.data`` pipeline and patches ``tf.io.gfile``.  So
    without TensorFlow the loader uses TFDS's TF-free ``tfds.data_source`` reader, which
    ``mock_data`` does support; this test then covers that branch (with TensorFlow
    installed it covers the ``tfds.load(batch_size=-1)`` branch instead).
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    empty = tmp_path / "empty"
    empty.mkdir()
    with tfds.testing.mock_data(num_examples=6):
        ds = load_dataset("mnist", data_dir=empty)
    assert ds.source.startswith("tfds:mnist")
    assert ds.x_train.shape == (6, 28, 28, 1) and ds.x_test.shape == (6, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.y_train.min() >= 0 and ds.y_train.max() < 10


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------


def _order(n, bs, seed, epoch, drop=True):
    x = np.arange(n)
    y = np.arange(n) * 10
    out = []
    for xb, yb in data.batches(x, y, bs, seed, epoch=epoch, drop_remainder=drop):
        np.testing.assert_array_equal(yb, xb * 10)
        out.append(xb)
    return out


def test_batches_deterministic_and_complete():
    a = _order(103, 10, 7, 0)
    assert len(a) == 10 == data.num_batches(103, 10, True)
    assert all(len(b) == 10 for b in a)
    b = _order(103, 10, 7, 0)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    c = _order(103, 10, 7, 1)
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    d = _order(103, 10, 8, 0)
    assert not np.array_equal(np.concatenate(a), np.concatenate(d))
    # The documented permutation, exactly.
    np.testing.assert_array_equal(np.concatenate(a),
                                  np.random.default_rng([7, 0]).permutation(103)[:100])

    full = _order(103, 10, 7, 3, drop=False)
    assert len(full) == 11 == data.num_batches(103, 10, False) and len(full[-1]) == 3
    np.testing.assert_array_equal(np.sort(np.concatenate(full)), np.arange(103))
    dropped = np.concatenate(_order(103, 10, 7, 3))
    assert len(np.unique(dropped)) == 100


def test_batches_with_jax_key():
    for key in (jax.random.PRNGKey(3), jax.random.key(3)):
        a = np.concatenate(_order(20, 5, key, 0))
        b = np.concatenate(_order(20, 5, key, 0))
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.sort(a), np.arange(20))


def test_batches_validation():
    x, y = np.zeros(10), np.zeros(10)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError):
            data.batches(x, y, bad, 0)
    with pytest.raises(ValueError):
        data.batches(x, np.zeros(9), 2, 0)
    with pytest.raises(ValueError):
        data.batches(x, y, 2, -1)
    with pytest.raises(ValueError):
        data.batches(x, y, 2, 0, epoch=-1)
    with pytest.raises(ValueError):
        data.num_batches(10, 0)
    assert data.num_batches(3, 5, True) == 0 and list(data.batches(x[:3], y[:3], 5, 0)) == []


# ---------------------------------------------------------------------------
# Augmentation and constants
# ---------------------------------------------------------------------------


def test_cifar_augment_jit():
    b, h, w, c = 16, 32, 32, 3
    x = (jnp.arange(b * h * w * c, dtype=jnp.float32).reshape(b, h, w, c) + 1.0) / (b * h * w * c)
    out = jax.jit(data.cifar_augment)(jax.random.PRNGKey(0), x)
    assert out.shape == x.shape and out.dtype == x.dtype

    padded = np.pad(np.asarray(x), ((0, 0), (4, 4), (4, 4), (0, 0)))
    out = np.asarray(out)
    transforms = set()
    for i in range(b):
        found = None
        for dy in range(9):
            for dx in range(9):
                crop = padded[i, dy:dy + h, dx:dx + w]
                for flip in (False, True):
                    if np.array_equal(out[i], crop[:, ::-1] if flip else crop):
                        found = (dy, dx, flip)
        assert found is not None, f"example {i} is not a (flipped) crop of its padded input"
        transforms.add(found)
    assert len(transforms) > 1  # per-example randomness
    assert any(t[2] for t in transforms) and not all(t[2] for t in transforms)

    again = jax.jit(data.cifar_augment)(jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(out, np.asarray(again))
    with pytest.raises(ValueError):
        data.cifar_augment(jax.random.PRNGKey(0), x[0])


def test_constants():
    np.testing.assert_allclose(data.CIFAR10_MEAN, [0.4914, 0.4822, 0.4465])
    np.testing.assert_allclose(data.CIFAR10_STD, [0.2023, 0.1994, 0.2010])
    assert data.CIFAR10_MEAN.shape == (3,) and data.CIFAR10_MEAN.dtype == np.float32
    with pytest.raises(ValueError):
        data.CIFAR10_MEAN[0] = 0.0  # read-only


# ---------------------------------------------------------------------------
# The real data sets (skipped when ../shared/data is absent)
# ---------------------------------------------------------------------------


@needs_real_data
def test_real_mnist():
    ds = load_dataset("mnist", data_dir=REAL_DATA)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int32
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    np.testing.assert_array_equal(
        np.bincount(ds.y_test, minlength=10),
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


@needs_real_data
def test_real_gtsrb():
    ds = load_dataset("gtsrb", data_dir=REAL_DATA)
    assert ds.x_train.shape == (25087, 32, 32, 3) and ds.x_test.shape == (7949, 32, 32, 3)
    assert ds.num_classes == 43
    assert set(np.unique(ds.y_train).tolist()) == set(range(43))
    np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=43), [
        39, 511, 525, 261, 441, 357, 64, 304, 294, 342, 361, 274, 528, 395, 205, 135, 113,
        52, 232, 45, 60, 70, 68, 102, 61, 326, 133, 21, 123, 71, 90, 169, 28, 110, 75, 263,
        99, 34, 371, 47, 68, 32, 50])  # shared/data/README.md
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() <= ds.x_train.max() <= 1.0


@pytest.mark.slow
@needs_real_data
def test_real_cifar10_zip(tmp_path, monkeypatch):
    t0 = time.perf_counter()
    ds = load_dataset("cifar10", data_dir=REAL_DATA)
    t_decode = time.perf_counter() - t0
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(ds.y_train, minlength=10), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=10), [1000] * 10)
    # Channel means close to the official CIFAR-10 statistics (JPEG copy).
    mean = ds.x_train.mean(axis=(0, 1, 2), dtype=np.float64)  # float32 sums saturate here
    np.testing.assert_allclose(mean, data.CIFAR10_MEAN, atol=0.01)
    assert len(_cache_files(tmp_path)) == 1

    monkeypatch.setattr(data, "_decode_image", _fail_decode)
    t0 = time.perf_counter()
    ds2 = load_dataset("cifar10", data_dir=REAL_DATA)
    t_cached = time.perf_counter() - t0
    np.testing.assert_array_equal(ds2.y_train, ds.y_train)
    print(f"cifar10 zip: decode {t_decode:.1f}s, cached load {t_cached:.1f}s")
