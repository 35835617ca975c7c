"""Tests of samkit.data: profiles, readers, named data sets, downloads, splits, batch pipeline."""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from datagen import write_fashion_mnist
from PIL import Image

from samkit.data import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    GROUPS,
    RESOURCES,
    ArrayDataset,
    BatchLoader,
    Resource,
    channel_stats,
    crop_at,
    crop_flip,
    default_thresholds,
    download,
    download_file,
    find_dataset,
    group_members,
    hflip_where,
    load_dataset,
    long_tail_counts,
    long_tail_indices,
    long_tailed,
    normalize,
    random_crop,
    random_hflip,
    read_cifar10,
    read_cifar100,
    read_idx,
    read_idx_images,
    read_idx_labels,
    read_image_folder,
    read_image_folder_splits,
    readers,
    shot_groups,
)


def _real(name: str) -> Path | None:
    """Where samkit's own search finds a real data set ($SAMKIT_DATA, ~/.cache/samkit/data, the
    Debian path), or None. Runs at import, before _isolated_env hides the user's folders."""
    try:
        return find_dataset(name)
    except FileNotFoundError:
        return None


FASHION_DIR = _real("fashion-mnist")
CIFAR_JPEG_TAR = _real("cifar10")
if CIFAR_JPEG_TAR is not None and not CIFAR_JPEG_TAR.name.startswith("cifar10-jpeg"):
    CIFAR_JPEG_TAR = None  # the official pickles: the JPEG test below needs the JPEG archive


def _needs(found: Path | None, what: str) -> pytest.MarkDecorator:
    """Marks a test of a real data set: `realdata`, and skipped with the reason when absent."""
    reason = (f"real {what} not found by samkit's search: set SAMKIT_DATA to the folder that "
              "holds it (CI: SAMKIT_DATA=../shared/data) or `samkit download` it")

    def mark(test):
        return pytest.mark.realdata(pytest.mark.skipif(found is None, reason=reason)(test))

    return mark


needs_fashion = _needs(FASHION_DIR, "Fashion-MNIST")
needs_cifar_tar = _needs(CIFAR_JPEG_TAR, "CIFAR-10 JPEG archive (cifar10-jpeg.tar.gz)")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep every test away from the user's real data and cache folders."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("SAMKIT_CACHE", str(home / "cache"))
    monkeypatch.delenv("SAMKIT_DATA", raising=False)


# ------------------------------------------------------------------------------------------
# Profiles
# ------------------------------------------------------------------------------------------

# Every row of the table in PROTOCOLS.md: (n_max, classes, ratio, counts or None, total, min).
PROTOCOL_ROWS = [
    (5000, 10, 100, [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50], 12406, 50),
    (5000, 10, 200, [5000, 2775, 1540, 854, 474, 263, 146, 81, 45, 25], 11203, 25),
    (5000, 10, 50, [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100], 13996, 100),
    (5000, 10, 10, None, 20431, 500),
    (500, 100, 100, None, 10847, 5),
    (500, 100, 200, None, 9502, 2),
    (500, 100, 50, None, 12608, 10),
    (500, 100, 10, None, 19573, 50),
    (6000, 10, 100, [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60], 14886, 60),
    (6000, 10, 10, [6000, 4645, 3596, 2784, 2156, 1669, 1292, 1000, 774, 600], 24516, 600),
]


@pytest.mark.parametrize(("n_max", "classes", "ratio", "counts", "total", "minimum"), PROTOCOL_ROWS)
def test_exp_profile_matches_protocol_table(n_max, classes, ratio, counts, total, minimum):
    got = long_tail_counts(n_max, classes, ratio)
    assert len(got) == classes
    assert sum(got) == total
    assert got[0] == n_max and got[-1] == minimum
    assert got == sorted(got, reverse=True)
    if counts is not None:
        assert got == counts
    assert long_tail_counts(n_max, classes, float(ratio), "exp") == got


def test_step_profile():
    assert long_tail_counts(5000, 10, 100, "step") == [5000] * 5 + [50] * 5
    assert long_tail_counts(500, 5, 10, "step") == [500, 500, 50, 50, 50]
    assert long_tail_counts(500, 100, 100, "step") == [500] * 50 + [5] * 50


def test_profile_edge_cases():
    assert long_tail_counts(123, 1, 100) == [123]
    assert long_tail_counts(123, 1, 100, "step") == [123]
    assert long_tail_counts(7, 4, 1) == [7, 7, 7, 7]
    # 49 * 49 ** -1 is 0.9999999999999999 in floating point: still one image, not zero.
    assert long_tail_counts(49, 2, 49) == [49, 1]
    assert long_tail_counts(98, 3, 49)[-1] == 2


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"ratio": 0.5}, ["ratio", "0.5", ">= 1"]),
        ({"ratio": float("nan")}, ["ratio", "nan"]),
        ({"num_classes": 0}, ["num_classes", "0", ">= 1"]),
        ({"n_max": 0}, ["n_max", "0", ">= 1"]),
        ({"n_max": 2.5}, ["n_max", "2.5"]),
        ({"profile": "linear"}, ["profile", "'linear'", "exp", "step"]),
        ({"n_max": 50, "ratio": 200}, ["tail class", "0 images", "ratio"]),
    ],
)
def test_profile_validation(kwargs, words):
    args = {"n_max": 5000, "num_classes": 10, "ratio": 100, "profile": "exp"} | kwargs
    with pytest.raises(ValueError) as info:
        long_tail_counts(**args)
    for word in words:
        assert word in str(info.value)


def _ldam_reference(labels: np.ndarray, counts: list[int]) -> np.ndarray:
    """The LDAM-DRW selection: seed NumPy's global generator with 0, shuffle each class."""
    state = np.random.get_state()
    try:
        np.random.seed(0)
        chosen = []
        for c, n in enumerate(counts):
            idx = np.where(labels == c)[0]
            np.random.shuffle(idx)
            chosen.append(idx[:n])
        return np.concatenate(chosen)
    finally:
        np.random.set_state(state)


def test_long_tail_indices_shuffle_matches_reference():
    labels = np.random.default_rng(3).integers(0, 5, size=500)
    counts = [60, 40, 20, 10, 5]
    got = long_tail_indices(labels, counts, seed=0, order="shuffle")
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, _ldam_reference(labels, counts))
    assert np.bincount(labels[got], minlength=5).tolist() == counts
    assert len(set(got.tolist())) == len(got)
    # Another seed gives another subset; the same seed the same; torch labels work too.
    assert not np.array_equal(got, long_tail_indices(labels, counts, seed=1))
    np.testing.assert_array_equal(got, long_tail_indices(torch.from_numpy(labels), counts))


def test_long_tail_indices_first():
    labels = np.array([1, 0, 1, 0, 1, 2, 0, 2, 1])
    got = long_tail_indices(labels, [2, 3, 1], order="first")
    assert got.tolist() == [1, 3, 0, 2, 4, 5]


def test_long_tail_indices_errors():
    labels = np.array([0, 0, 1])
    with pytest.raises(ValueError, match="class 1 has 1 images but the profile asks for 2"):
        long_tail_indices(labels, [1, 2])
    with pytest.raises(ValueError, match=r"order must be one of .*'sorted'"):
        long_tail_indices(labels, [1, 1], order="sorted")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        long_tail_indices(labels, [1])


@needs_fashion
def test_fashion_mnist_lt_counts_and_groups():
    train = load_dataset("fashion-mnist", FASHION_DIR)
    lt = long_tailed(train, 100)
    assert lt.class_counts() == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    assert len(lt) == 14886
    assert "ratio=100" in lt.source and "order=shuffle" in lt.source
    groups = shot_groups(lt.class_counts(), *default_thresholds(10))
    assert groups == ["many"] * 4 + ["medium"] * 3 + ["few"] * 3
    first = long_tailed(train, 100, order="first")
    assert first.class_counts() == lt.class_counts()
    expected = long_tail_indices(train.labels, lt.class_counts(), order="first")
    assert torch.equal(first.labels, train.labels[torch.from_numpy(expected)])


# ------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------


def test_default_thresholds():
    assert default_thresholds(10) == (1000, 200)
    assert default_thresholds(2) == (1000, 200)
    assert default_thresholds(100) == (100, 20)
    with pytest.raises(ValueError, match="num_classes"):
        default_thresholds(0)


def test_shot_groups_cifar100_lt():
    counts = long_tail_counts(500, 100, 100)
    groups = shot_groups(counts, *default_thresholds(100))
    assert [groups.count(g) for g in GROUPS] == [35, 35, 30]
    members = group_members(groups)
    assert members["many"] == list(range(35))
    assert members["few"] == list(range(70, 100))


def test_shot_groups_boundaries_and_errors():
    assert shot_groups([101, 100, 20, 19, 0]) == ["many", "medium", "medium", "few", "few"]
    assert shot_groups(torch.tensor([5, 50]), many=10, few=10) == ["few", "many"]
    with pytest.raises(ValueError, match=r"few \(30\) must be <= many \(20\)"):
        shot_groups([1, 2], many=20, few=30)
    with pytest.raises(ValueError, match="train_counts must be >= 0"):
        shot_groups([3, -1])
    with pytest.raises(ValueError, match="whole numbers"):
        shot_groups([3.5, 1.0])


# ------------------------------------------------------------------------------------------
# IDX reader
# ------------------------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


@needs_fashion
def test_fashion_mnist_real_files():
    train = load_dataset("fashion-mnist", FASHION_DIR.parent)  # the folder holding fashion-mnist/
    test = load_dataset("fashion-mnist", FASHION_DIR.parent, train=False)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert train.labels.dtype == torch.int64
    assert train.class_counts() == [6000] * 10 and test.class_counts() == [1000] * 10
    assert train.classes == FASHION_MNIST_CLASSES
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert test.labels[:5].tolist() == [9, 2, 1, 1, 6]
    assert int(train.images.sum()) == 3431114169
    assert "train-images-idx3-ubyte.gz" in train.source
    mean, std = channel_stats(train.images)
    assert mean[0] == pytest.approx(0.2860, abs=1e-4)
    assert std[0] == pytest.approx(0.3530, abs=1e-4)
    # The sub-folder itself also works as root.
    again = load_dataset("fashion-mnist", FASHION_DIR, split="test", limit_per_class=3)
    assert again.class_counts() == [3] * 10
    keep = np.sort(long_tail_indices(test.labels, [3] * 10, order="first"))
    assert torch.equal(again.images, test.images[torch.from_numpy(keep)])  # file order kept


def test_idx_roundtrip_gzip_and_plain(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([2, 0, 1], dtype=np.uint8)
    (tmp_path / "img").write_bytes(_idx_bytes(images))
    (tmp_path / "img.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    (tmp_path / "lab.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
    for name in ("img", "img.gz"):
        got = read_idx_images(tmp_path / name)
        assert got.shape == (3, 1, 4, 5) and got.dtype == torch.uint8
        assert torch.equal(got[:, 0], torch.from_numpy(images))
    lab = read_idx_labels(tmp_path / "lab.gz", num_classes=3)
    assert lab.dtype == torch.int64 and lab.tolist() == [2, 0, 1]
    ints = np.array([[1, -2], [300, 4]], dtype=">i4")
    (tmp_path / "ints").write_bytes(_idx_bytes(ints, code=0x0C))
    assert read_idx(tmp_path / "ints").tolist() == [[1, -2], [300, 4]]


def test_idx_errors(tmp_path):
    images = np.zeros((4, 2, 2), dtype=np.uint8)
    good = _idx_bytes(images)
    cases = {
        "truncated": (good[:-3], "truncated"),
        "too_long": (good + b"\0", "longer than its header says"),
        "bad_magic": (b"\x01\x02" + good[2:], "not an IDX file"),
        "bad_code": (good[:2] + b"\x07" + good[3:], "unknown IDX type code 0x07"),
        "short_header": (good[:6], "truncated inside its IDX header"),
        "bad_gzip": (gzip.compress(good)[:-10], "truncated or corrupted gzip"),
    }
    for name, (blob, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(ValueError) as info:
            read_idx(path)
        assert message in str(info.value), name
        assert str(path) in str(info.value)
        assert "samkit download" in str(info.value)
    (tmp_path / "labels").write_bytes(_idx_bytes(np.array([0, 5], dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"labels from 0 to 5, outside \[0, 3\)"):
        read_idx_labels(tmp_path / "labels", num_classes=3)
    with pytest.raises(ValueError, match="is it the labels file"):
        read_idx_images(tmp_path / "labels")
    (tmp_path / "images").write_bytes(good)
    with pytest.raises(ValueError, match="is it the images file"):
        read_idx_labels(tmp_path / "images")
    with pytest.raises(FileNotFoundError, match="missing-file"):
        read_idx(tmp_path / "missing-file")


# ------------------------------------------------------------------------------------------
# CIFAR pickles
# ------------------------------------------------------------------------------------------


def _cifar_arrays(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _write_cifar10(folder: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A small cifar-10-batches-py folder: 2 images per training batch, 3 test images."""
    folder.mkdir(parents=True)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = 3 if name == "test_batch" else 2
        data = _cifar_arrays(n, i)
        labels = [(i + j) % 10 for j in range(n)]
        _dump(folder / name, {b"batch_label": b"x", b"data": data, b"labels": labels})
        written[name] = (data, labels)
    names = [c.encode() for c in CIFAR10_CLASSES]
    _dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return written


def test_read_cifar10_pickles_dir_and_tar(tmp_path):
    written = _write_cifar10(tmp_path / "cifar-10-batches-py")
    train = read_cifar10(tmp_path / "cifar-10-batches-py", "train")
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.classes == CIFAR10_CLASSES
    data1, labels1 = written["data_batch_1"]
    # Row layout: 1024 red values, then green, then blue, each row-major 32 x 32.
    assert int(train.images[1, 2, 5, 7]) == int(data1[1, 2 * 1024 + 5 * 32 + 7])
    expected_labels = [lab for k in range(1, 6) for lab in written[f"data_batch_{k}"][1]]
    assert train.labels.tolist() == expected_labels and train.labels.dtype == torch.int64
    test = read_cifar10(tmp_path, "test")  # the parent folder works too
    assert test.images.shape == (3, 3, 32, 32)
    assert torch.equal(test.images.reshape(3, -1), torch.from_numpy(written["test_batch"][0]))

    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    from_tar = read_cifar10(archive, "train")
    assert torch.equal(from_tar.images, train.images)
    assert torch.equal(from_tar.labels, train.labels)
    # load_dataset finds it, and says the split has not the official size.
    with pytest.raises(ValueError, match="holds 10 train images but official cifar10 has 50000"):
        load_dataset("cifar10", tmp_path)
    tiny = load_dataset("cifar10", archive, split="test", limit_per_class=1)
    assert tiny.labels.tolist() == [5, 6, 7]
    assert "official python version" in tiny.source


def test_read_cifar100_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = _cifar_arrays(4, 0)
    fine, coarse = [99, 0, 42, 7], [19, 0, 3, 1]
    _dump(folder / "train", {b"data": data, b"fine_labels": fine, b"coarse_labels": coarse})
    _dump(folder / "test", {b"data": data[:2], b"fine_labels": fine[:2]})
    fine_names = [f"fine{i}".encode() for i in range(100)]
    coarse_names = [f"coarse{i}".encode() for i in range(20)]
    _dump(folder / "meta", {b"fine_label_names": fine_names, b"coarse_label_names": coarse_names})
    train = read_cifar100(tmp_path)
    assert train.labels.tolist() == fine and train.classes[42] == "fine42"
    assert len(train.classes) == 100
    assert torch.equal(train.images.reshape(4, -1), torch.from_numpy(data))
    coarse_set = read_cifar100(folder, "train", label_kind="coarse")
    assert coarse_set.labels.tolist() == coarse and len(coarse_set.classes) == 20
    with pytest.raises(ValueError, match="no 'coarse_labels' entry"):
        read_cifar100(folder, "test", label_kind="coarse")
    assert read_cifar100(folder, "test").labels.tolist() == [99, 0]


def test_cifar_pickle_written_by_numpy_1(tmp_path):
    """The official files name numpy.core (NumPy 1), not numpy._core: both must load."""
    folder = tmp_path / "cifar-10-batches-py"
    written = _write_cifar10(folder)
    batch = folder / "data_batch_2"
    blob = batch.read_bytes()
    old_style = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old_style != blob
    batch.write_bytes(old_style)
    train = read_cifar10(folder)
    assert torch.equal(
        train.images[2:4].reshape(2, -1), torch.from_numpy(written["data_batch_2"][0])
    )


def test_cifar_pickle_errors(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    batch = folder / "data_batch_3"
    original = batch.read_bytes()

    batch.write_bytes(original[: len(original) // 2])
    with pytest.raises(ValueError, match="data_batch_3 is not a readable CIFAR pickle"):
        read_cifar10(folder)
    _dump(batch, {b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"data_batch_3 has no 'data' entry \(found: labels\)"):
        read_cifar10(folder)
    _dump(batch, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match="rows hold 100 values, expected 3072"):
        read_cifar10(folder)
    _dump(batch, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(ValueError, match=r"2 images but 'labels' has shape \(1,\)"):
        read_cifar10(folder)
    _dump(batch, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        read_cifar10(folder)
    # A pickle that would run code is refused.
    batch.write_bytes(pickle.dumps({b"data": os.getcwd}))
    with pytest.raises(ValueError, match="refusing to load"):
        read_cifar10(folder)
    batch.unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 is missing"):
        read_cifar10(folder)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        read_cifar10(folder, "val")
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(gzip.compress(b"not a tar archive at all" * 100)[:50])
    with pytest.raises(ValueError, match="not a readable tar archive"):
        read_cifar10(broken)


# ------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------


def _pixels(seed: int, size=(6, 5), channels: int = 3) -> np.ndarray:
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _write_folder(root: Path, fmt: str = "PNG") -> dict[tuple[str, str], list[np.ndarray]]:
    """root/{train,test}/{cat,dog,emu}/*.png (dog has 3 train images, others 2)."""
    written: dict[tuple[str, str], list[np.ndarray]] = {}
    seed = 0
    for split in ("train", "test"):
        for cls in ("dog", "cat", "emu"):  # written out of order: classes must come sorted
            n = 3 if (split, cls) == ("train", "dog") else 2 if split == "train" else 1
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in reversed(range(n)):  # files too
                pixels = _pixels(seed)
                seed += 1
                ext = "png" if fmt == "PNG" else "jpg"
                Image.fromarray(pixels).save(folder / f"{i:03d}.{ext}", format=fmt)
                written.setdefault((split, cls), []).insert(0, pixels)
    (root / "README.txt").write_text("not an image")
    return written


def _tar_of(folder: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return archive


def test_image_folder_directory_and_tar(tmp_path):
    written = _write_folder(tmp_path / "pets")
    archive = _tar_of(tmp_path / "pets", tmp_path / "pets.tar.gz", "pets")  # leading folder
    for source in (tmp_path / "pets", archive):
        train = read_image_folder(source, "train", cache=False)
        assert train.classes == ["cat", "dog", "emu"]
        assert train.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
        assert train.images.shape == (7, 3, 5, 6) and train.images.dtype == torch.uint8
        expected = [p for cls in ("cat", "dog", "emu") for p in written[("train", cls)]]
        assert torch.equal(train.images.permute(0, 2, 3, 1), torch.from_numpy(np.stack(expected)))
        test = read_image_folder(source, "test", cache=False)
        assert test.labels.tolist() == [0, 1, 2]
        limited = read_image_folder(source, "train", limit_per_class=1, cache=False)
        assert limited.labels.tolist() == [0, 1, 2]
        assert torch.equal(limited.images[1], train.images[2])
    both = read_image_folder_splits(archive, cache=False)
    assert sorted(both) == ["test", "train"]
    gray = read_image_folder(archive, "train", mode="L", cache=False)
    assert gray.images.shape == (7, 1, 5, 6)
    pil_gray = np.array(Image.fromarray(written[("train", "cat")][0]).convert("L"))
    assert torch.equal(gray.images[0, 0], torch.from_numpy(pil_gray))
    fixed = read_image_folder(archive, "test", classes=["emu", "dog", "cat", "yak"], cache=False)
    assert fixed.labels.tolist() == [0, 1, 2] and fixed.classes[-1] == "yak"
    assert torch.equal(
        fixed.images[0].permute(1, 2, 0), torch.from_numpy(written[("test", "emu")][0])
    )
    ds = load_dataset("image-folder", archive, split="test", cache=False)
    assert ds.labels.tolist() == [0, 1, 2] and "pets.tar.gz" in ds.source


def test_image_folder_jpeg_and_flat_layout(tmp_path):
    _write_folder(tmp_path / "jpg", fmt="JPEG")
    train = read_image_folder(tmp_path / "jpg", "train", cache=False)
    assert train.images.shape == (7, 3, 5, 6)
    flat = read_image_folder(tmp_path / "jpg" / "train", split=None, cache=False)
    assert torch.equal(flat.images, train.images) and flat.classes == train.classes
    ds = load_dataset("image-folder", tmp_path / "jpg" / "test", split="", cache=False)
    assert ds.labels.tolist() == [0, 1, 2]


def test_image_folder_cache(tmp_path, monkeypatch):
    _write_folder(tmp_path / "pets")
    archive = _tar_of(tmp_path / "pets", tmp_path / "pets.tar.gz", "pets")
    cache = tmp_path / "cache"
    first = read_image_folder(archive, "train", cache_dir=cache)
    files = list((cache / "image-folder").glob("*.npz"))
    assert len(files) == 1 and not list((cache / "image-folder").glob("*.tmp"))

    def no_scan(path):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(readers, "_scan_tar", no_scan)
    again = read_image_folder(archive, "train", cache_dir=cache)
    test = read_image_folder(archive, "test", cache_dir=cache)  # decoded in the same pass
    assert torch.equal(again.images, first.images) and again.classes == first.classes
    assert test.labels.tolist() == [0, 1, 2]
    monkeypatch.undo()
    # A changed source (new modification time) is decoded again, into a new cache entry.
    os.utime(archive, ns=(0, 10**9))
    read_image_folder(archive, "train", cache_dir=cache)
    assert len(list((cache / "image-folder").glob("*.npz"))) == 2
    # SAMKIT_CACHE is the default cache folder.
    monkeypatch.setenv("SAMKIT_CACHE", str(tmp_path / "env-cache"))
    read_image_folder(archive, "test")
    assert len(list((tmp_path / "env-cache" / "image-folder").glob("*.npz"))) == 1


def test_a_cached_archive_without_the_split_lists_the_splits_it_holds(tmp_path):
    # issue 11, item 14: the cache held only the requested splits, so the error listed none
    _write_folder(tmp_path / "pets")
    shutil.rmtree(tmp_path / "pets" / "test")
    archive = _tar_of(tmp_path / "pets", tmp_path / "pets.tar.gz", "pets")
    cache = tmp_path / "cache"
    for _ in range(2):  # decoded, then from the cache
        with pytest.raises(ValueError, match=r"no split 'test'; splits found: 'train'$"):
            read_image_folder(archive, "test", cache_dir=cache)
        assert read_image_folder(archive, "train", cache_dir=cache).labels.tolist() == [
            0, 0, 1, 1, 1, 2, 2]
    assert len(list((cache / "image-folder").glob("*.npz"))) == 1


def _bomb(file: Path, monkeypatch, limit: int) -> None:
    """A 6x5 PNG, and PIL's decompression-bomb limit lowered to `limit` pixels (an error above
    twice the limit, a warning above it)."""
    Image.fromarray(_pixels(7)).save(file)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)


@pytest.mark.parametrize("limit", [10, 20])  # 30 pixels: PIL's error (> 2 x 10), its warning
def test_a_decompression_bomb_image_names_the_file_and_the_fix(tmp_path, monkeypatch, limit):
    _write_folder(tmp_path / "pets")
    bomb = tmp_path / "pets" / "train" / "cat" / "000.png"
    _bomb(bomb, monkeypatch, limit)
    pattern = (r"^\S*pets: image 'train/cat/000.png' declares more pixels than PIL's "
               r"decompression-bomb limit allows \(.*\); if the image is genuine, raise "
               r"PIL.Image.MAX_IMAGE_PIXELS .*, else remove the file$")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray warning either
        with pytest.raises(ValueError, match=pattern) as caught:
            read_image_folder(tmp_path / "pets", "train", cache=False)
    assert "\n" not in str(caught.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the file itself is fine
    assert read_image_folder(tmp_path / "pets", "train", cache=False).labels.numel() == 7


def test_image_folder_errors(tmp_path):
    _write_folder(tmp_path / "pets")
    with pytest.raises(ValueError, match="no split 'val'; splits found: 'test', 'train'"):
        read_image_folder(tmp_path / "pets", "val", cache=False)
    with pytest.raises(ValueError, match="if these are splits"):
        read_image_folder(tmp_path / "pets", split=None, cache=False)
    with pytest.raises(ValueError, match=r"class folders \['cat'\] that are not in"):
        read_image_folder(tmp_path / "pets", "train", classes=["dog", "emu"], cache=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image_folder(tmp_path / "nothing", "train", cache=False)
    with pytest.raises(ValueError, match="mode must be 'RGB' or 'L'"):
        read_image_folder(tmp_path / "pets", "train", mode="CMYK", cache=False)

    odd = tmp_path / "pets" / "train" / "cat" / "odd.png"
    Image.fromarray(_pixels(99, size=(7, 5))).save(odd)
    with pytest.raises(ValueError, match=r"'train/cat/odd.png' is 7x5 but .* is 6x5"):
        read_image_folder(tmp_path / "pets", "train", cache=False)
    odd.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="cannot decode image 'train/cat/odd.png'"):
        read_image_folder(tmp_path / "pets", "train", cache=False)
    odd.unlink()

    archive = _tar_of(tmp_path / "pets", tmp_path / "pets.tar.gz", "pets")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(ValueError, match="truncated.tar.gz is not a readable tar archive"):
        read_image_folder(truncated, "train", cache=False)
    with pytest.raises(ValueError, match="needs root"):
        load_dataset("image-folder")


@needs_cifar_tar
def test_cifar10_jpeg_tar_limited(tmp_path):
    cache = tmp_path / "cache"
    train = load_dataset("cifar10", CIFAR_JPEG_TAR.parent, limit_per_class=3, cache_dir=cache)
    assert train.images.shape == (30, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.classes == CIFAR10_CLASSES
    assert train.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert "JPEG image folder" in train.source and "first 3 per class" in train.source
    # The archive itself as root; the test split comes from the cache the first call wrote.
    test = load_dataset("cifar10", CIFAR_JPEG_TAR, train=False, limit_per_class=3, cache_dir=cache)
    assert test.images.shape == (30, 3, 32, 32)
    assert len(list((cache / "image-folder").glob("*.npz"))) == 1
    # Decoded pixels are what Pillow gives for the member.
    with tarfile.open(CIFAR_JPEG_TAR, "r|gz") as tar:
        for member in tar:
            if member.name == "train/bird/0001.jpg":
                blob = tar.extractfile(member).read()
                break
    expected = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(train.images[2 * 3 + 1], torch.from_numpy(expected.copy()))


# ------------------------------------------------------------------------------------------
# Named data sets: locating, downloading
# ------------------------------------------------------------------------------------------


def test_load_dataset_not_found_lists_places(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMKIT_DATA", str(tmp_path / "data-env"))
    monkeypatch.setenv("SAMKIT_CACHE", str(tmp_path / "cache-env"))
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist")
    message = str(info.value)
    assert str(tmp_path / "data-env" / "mnist") in message
    assert str(tmp_path / "cache-env" / "data" / "mnist") in message
    assert "samkit download mnist" in message and "SAMKIT_DATA" in message
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", tmp_path / "empty")
    message = str(info.value)
    assert "only it was searched" in message and str(tmp_path / "empty") in message
    assert "apt-get install dataset-fashion-mnist" in message
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path / "empty")


def test_load_dataset_argument_errors():
    with pytest.raises(ValueError, match="unknown data set 'imagenet'; valid names: fashion-mnist"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="contradicts train=True"):
        load_dataset("mnist", split="test", train=True)
    with pytest.raises(ValueError, match="split must be 'train' or 'test' for mnist"):
        load_dataset("mnist", split="val")


def test_samkit_data_env_is_searched(tmp_path, monkeypatch):
    folder = write_fashion_mnist(tmp_path / "data" / "fashion-mnist", 3, 2)
    monkeypatch.setenv("SAMKIT_DATA", str(tmp_path / "data"))
    ds = load_dataset("FASHION_MNIST", split="test", limit_per_class=1)
    assert sorted(ds.labels.tolist()) == list(range(10))
    assert str(folder) in ds.source
    assert find_dataset("fashion-mnist", "test") == folder


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_file_good_and_bad_checksum(tmp_path):
    source = tmp_path / "mirror" / "blob.bin"
    source.parent.mkdir()
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    dest_dir = tmp_path / "dest"
    calls = []
    got = download_file(
        source.as_uri(),
        dest_dir / "blob.bin",
        _sha256(source),
        progress=lambda d, t: calls.append(d),
    )
    assert got == dest_dir / "blob.bin" and got.read_bytes() == source.read_bytes()
    assert calls[0] == 0 and calls[-1] == source.stat().st_size
    assert sorted(p.name for p in dest_dir.iterdir()) == ["blob.bin"]
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    assert download_file(
        source.as_uri(), dest_dir / "md5.bin", md5, "md5", progress=False
    ).is_file()

    with pytest.raises(ValueError) as info:
        download_file(source.as_uri(), dest_dir / "bad.bin", "0" * 64, progress=False)
    message = str(info.value)
    assert "checksum mismatch" in message and source.as_uri() in message and "0" * 64 in message
    assert not (dest_dir / "bad.bin").exists()
    assert sorted(p.name for p in dest_dir.iterdir()) == ["blob.bin", "md5.bin"]
    with pytest.raises(OSError, match="cannot fetch"):
        download_file(
            (tmp_path / "nope.bin").as_uri(), dest_dir / "nope.bin", "0" * 64, progress=False
        )
    assert sorted(p.name for p in dest_dir.iterdir()) == ["blob.bin", "md5.bin"]
    with pytest.raises(ValueError, match="algorithm must be"):
        download_file(source.as_uri(), dest_dir / "x", "0", "sha1")


@needs_fashion
def test_download_fashion_mnist_from_file_mirror(tmp_path):
    """The official files (found by samkit's search) pass their published checksums."""
    root = download(
        "fashion-mnist", tmp_path / "data", base_url=FASHION_DIR.as_uri(), progress=False
    )
    assert root == tmp_path / "data"
    for res in RESOURCES["fashion-mnist"]:
        assert _sha256(root / res.filename) == res.checksum
    ds = load_dataset("fashion-mnist", root, split="test")
    assert len(ds) == 10000


def test_download_true_fetches_what_is_missing(tmp_path, monkeypatch):
    """load_dataset(download=True) fetches from the mirror (generated files, their checksums)."""
    mirror = write_fashion_mnist(tmp_path / "mirror", 4, 2)
    mirrored = tuple(
        Resource(r.filename, ((mirror / Path(r.filename).name).as_uri(),),
                 _sha256(mirror / Path(r.filename).name), "sha256")
        for r in RESOURCES["fashion-mnist"]
    )
    monkeypatch.setitem(RESOURCES, "fashion-mnist", mirrored)
    fetched = load_dataset(
        "fashion-mnist", tmp_path / "other", download=True, progress=False, limit_per_class=2
    )
    assert fetched.class_counts() == [2] * 10
    for r in RESOURCES["fashion-mnist"]:
        got = tmp_path / "other" / r.filename
        assert got.read_bytes() == (mirror / got.name).read_bytes()
    direct = load_dataset("fashion-mnist", mirror, limit_per_class=2)
    assert torch.equal(fetched.images, direct.images)


def test_download_bad_mirror_leaves_nothing(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for res in RESOURCES["fashion-mnist"]:
        (mirror / Path(res.filename).name).write_bytes(b"corrupted")
    with pytest.raises(ValueError, match="checksum mismatch"):
        download("fashion-mnist", tmp_path / "data", base_url=mirror.as_uri(), progress=False)
    leftovers = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert leftovers == []
    with pytest.raises(ValueError, match="no download address"):
        download("image-folder", tmp_path)


# ------------------------------------------------------------------------------------------
# MNIST-1D and ArrayDataset
# ------------------------------------------------------------------------------------------


def test_mnist1d(tmp_path):
    pytest.importorskip("mnist1d")
    np_state = np.random.get_state()
    train = load_dataset("mnist1d", cache_dir=tmp_path)
    assert np.array_equal(np.random.get_state()[1], np_state[1])  # global RNG left alone
    assert train.images.shape == (4000, 1, 40) and train.images.dtype == torch.float32
    assert train.class_counts() == [398, 396, 411, 394, 394, 402, 401, 404, 402, 398]
    test = load_dataset("mnist1d", split="test", cache_dir=tmp_path)  # from the cache
    assert test.class_counts() == [102, 104, 89, 106, 106, 98, 99, 96, 98, 102]
    assert train.classes == [str(i) for i in range(10)]
    assert "seed': 42" in train.source
    with pytest.raises(ValueError, match="unknown mnist1d argument 'colour'"):
        load_dataset("mnist1d", mnist1d_args={"colour": 1}, cache=False)


def test_array_dataset():
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1)
    ds = ArrayDataset(images, torch.tensor([2, 0, 1, 0, 1, 0]), ["a", "b", "c"], "toy")
    assert len(ds) == 6 and ds.num_classes == 3 and ds.class_counts() == [3, 2, 1]
    sub = ds.subset([5, 0], "picked")
    assert sub.labels.tolist() == [0, 2] and sub.images.flatten().tolist() == [5, 0]
    assert sub.source == "toy; picked"
    lt = long_tailed(ds, 3, order="first")  # n_max = 3 -> counts 3, int(3 / sqrt(3)) = 1, 1
    assert lt.class_counts() == [3, 1, 1]
    assert lt.images.flatten().tolist() == [1, 3, 5, 2, 0]
    assert "ratio=3 n_max=3 order=first" in lt.source
    with pytest.raises(ValueError, match="6 images but 5 labels"):
        ArrayDataset(images, torch.zeros(5, dtype=torch.int64), ["a"])
    with pytest.raises(ValueError, match="int64"):
        ArrayDataset(images, torch.zeros(6, dtype=torch.int32), ["a"])


# ------------------------------------------------------------------------------------------
# Batch transforms and loader
# ------------------------------------------------------------------------------------------


def test_crop_identity_and_known_offsets():
    batch = torch.rand(5, 3, 8, 8)
    assert torch.equal(random_crop(batch, 8, 0, torch.Generator().manual_seed(1)), batch)
    assert torch.equal(crop_at(batch, torch.zeros(5), torch.zeros(5), 8), batch)

    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    out = crop_at(x, torch.tensor([0, 2]), torch.tensor([1, 0]), 3, padding=1)
    expected = torch.tensor(
        [
            [[0, 0, 0], [0, 1, 2], [4, 5, 6]],
            [[0, 20, 21], [0, 24, 25], [0, 28, 29]],
        ],
        dtype=torch.float32,
    ).unsqueeze(1)
    assert torch.equal(out, expected)
    rect = crop_at(x, torch.tensor([1, 0]), torch.tensor([2, 1]), (2, 3), padding=1)
    assert rect.shape == (2, 1, 2, 3)
    assert rect[0, 0].tolist() == [[1, 2, 3], [5, 6, 7]]
    assert rect[1, 0].tolist() == [[0, 0, 0], [16, 17, 18]]
    with pytest.raises(ValueError, match="larger than the padded image"):
        crop_at(x, torch.zeros(2), torch.zeros(2), 7, padding=1)
    with pytest.raises(ValueError, match="offsets must lie in"):
        crop_at(x, torch.tensor([0, 4]), torch.zeros(2), 3, padding=1)
    with pytest.raises(ValueError, match=r"batch of images \(N, C, H, W\)"):
        random_crop(torch.zeros(3, 4, 4), 4)


def test_random_crop_offsets_and_determinism():
    batch = torch.ones(64, 2, 32, 32)
    out = random_crop(batch, 32, 4, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    top = torch.randint(0, 9, (64,), generator=g)
    left = torch.randint(0, 9, (64,), generator=g)
    assert torch.equal(out, crop_at(batch, top, left, 32, 4))
    # Each crop holds (32 - |top - 4|) x (32 - |left - 4|) pixels of the image, zeros elsewhere.
    ones = out[:, 0].sum(dim=(1, 2))
    assert torch.equal(ones, ((32 - (top - 4).abs()) * (32 - (left - 4).abs())).float())
    assert len(set(top.tolist())) > 3
    again = random_crop(batch, 32, 4, torch.Generator().manual_seed(7))
    other = random_crop(batch, 32, 4, torch.Generator().manual_seed(8))
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert random_crop(torch.zeros(4, 1, 6, 6, dtype=torch.uint8), 5, 1).dtype == torch.uint8


def test_hflip():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    out = hflip_where(x, torch.tensor([True, False]))
    assert out[0, 0].tolist() == [[2, 1, 0], [5, 4, 3]] and torch.equal(out[1], x[1])
    assert torch.equal(random_hflip(x, p=0.0), x)
    assert torch.equal(random_hflip(x, p=1.0), x.flip(-1))
    batch = torch.rand(100, 3, 4, 4)
    out = random_hflip(batch, torch.Generator().manual_seed(3))
    coins = torch.rand(100, generator=torch.Generator().manual_seed(3)) < 0.5
    assert torch.equal(out, hflip_where(batch, coins))
    assert 20 < int(coins.sum()) < 80
    with pytest.raises(ValueError, match="probability"):
        random_hflip(x, p=1.5)


def test_normalize_and_channel_stats():
    x = torch.tensor([[[[1.0, 3.0]], [[2.0, 6.0]]]])  # (1, 2, 1, 2)
    out = normalize(x, [1.0, 2.0], [2.0, 4.0])
    assert out.tolist() == [[[[0.0, 1.0]], [[0.0, 1.0]]]]
    with pytest.raises(ValueError, match="one value per channel"):
        normalize(x, [0.0], [1.0])
    with pytest.raises(ValueError, match="std must be positive"):
        normalize(x, [0.0, 0.0], [1.0, 0.0])
    images = torch.tensor(
        [[[[0, 255]], [[51, 51]]], [[[255, 255]], [[102, 102]]]], dtype=torch.uint8
    )
    mean, std = channel_stats(images, chunk=1)
    assert mean == pytest.approx([0.75, 0.3])
    assert std == pytest.approx([math.sqrt(0.75 * 0.25), 0.1])


def _collect(loader, count=None):
    out = []
    for i, (x, y) in enumerate(loader):
        out.append((x.clone(), y.clone()))
        if count is not None and i + 1 == count:
            break
    return out


def test_batch_loader_epochs_and_lengths():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1) * 10
    labels = torch.arange(10)
    loader = BatchLoader(images, labels, 4, shuffle=True, seed=0)
    assert len(loader) == 3
    assert len(BatchLoader(images, labels, 4, drop_last=True)) == 2
    epoch0 = _collect(loader)
    assert [len(y) for _, y in epoch0] == [4, 4, 2]
    seen = torch.cat([y for _, y in epoch0])
    assert sorted(seen.tolist()) == list(range(10))
    x0, y0 = epoch0[0]
    assert x0.dtype == torch.float32 and torch.allclose(x0.flatten(), y0.float() * 10 / 255)
    epoch1 = _collect(loader)
    assert loader.epoch == 2
    assert not torch.equal(torch.cat([y for _, y in epoch1]), seen)
    ordered = _collect(BatchLoader(images, labels, 4, shuffle=False))
    assert torch.cat([y for _, y in ordered]).tolist() == list(range(10))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        BatchLoader(images, labels, 0)
    with pytest.raises(ValueError, match="gives no batch"):
        BatchLoader(images, labels, 11, drop_last=True)


def test_batch_loader_reproducible_and_resumable():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 5, (50,), generator=gen)

    def make(seed=1):
        return BatchLoader(
            images,
            labels,
            8,
            seed=seed,
            augment=crop_flip(8, padding=2),
            mean=[0.5, 0.5, 0.5],
            std=[0.25, 0.25, 0.25],
        )

    full = make()
    reference = _collect(full) + _collect(full)  # epochs 0 and 1
    same = make()
    for (xa, ya), (xb, yb) in zip(reference, _collect(same) + _collect(same), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    different = _collect(make(seed=2))
    assert not torch.equal(different[0][0], reference[0][0])

    # Interrupted after 3 batches of epoch 1: a new loader resumes with the same batches.
    run = make()
    _collect(run)
    _collect(run, count=3)
    state = run.state_dict()
    assert state["epoch"] == 1 and state["position"] == 3
    resumed = make()
    resumed.load_state_dict(state)
    rest = _collect(resumed)
    assert len(rest) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(reference[len(full) + 3 :], rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert resumed.epoch == 2 and resumed.position == 0
    # Augmentation and normalisation were applied: values are not plain pixels / 255.
    x, y = reference[0]
    assert x.min() < 0 and x.shape == (8, 3, 8, 8)
    with pytest.raises(ValueError, match="state was saved with seed=1"):
        make(seed=5).load_state_dict(state)
