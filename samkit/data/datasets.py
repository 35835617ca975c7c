"""Named data sets: where they are, how to fetch them, and how to load them into memory.

:func:`load_dataset` returns an :class:`ArrayDataset` (whole data set as tensors, ready for
:class:`samkit.data.BatchLoader`) for "fashion-mnist", "mnist", "cifar10", "cifar100",
"image-folder" and "mnist1d". Data are looked for in an explicit ``root`` only when one is given;
otherwise under ``$SAMKIT_DATA``, then the standard places (``~/.cache/samkit/data``, or
``$SAMKIT_CACHE/data``, and Debian's ``/usr/share/datasets/fashion-mnist``). Nothing is
downloaded unless asked (``download=True`` or :func:`download`), and every download is checked
against a published checksum before it is moved into place.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import random
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from samkit.data import readers
from samkit.data.profiles import long_tail_counts, long_tail_indices

__all__ = [
    "ArrayDataset",
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "CIFAR10_CLASSES",
    "Resource",
    "RESOURCES",
    "default_data_dir",
    "download",
    "download_file",
    "find_dataset",
    "load_dataset",
    "long_tailed",
]

PathLike = str | os.PathLike
ProgressArg = bool | Callable[[int, int | None], None]

#: Canonical data set names accepted by :func:`load_dataset`.
DATASET_NAMES: tuple[str, ...] = (
    "fashion-mnist",
    "mnist",
    "cifar10",
    "cifar100",
    "image-folder",
    "mnist1d",
)
_ALIASES = {
    "fashion-mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "mnist": "mnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar100": "cifar100",
    "cifar-100": "cifar100",
    "image-folder": "image-folder",
    "imagefolder": "image-folder",
    "mnist1d": "mnist1d",
    "mnist-1d": "mnist1d",
}

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES: list[str] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
_DIGITS = [str(i) for i in range(10)]

# Official split sizes, checked on load so that a wrong or partial file does not go unnoticed.
_SPLIT_SIZES = {
    "fashion-mnist": {"train": 60000, "test": 10000},
    "mnist": {"train": 60000, "test": 10000},
    "cifar10": {"train": 50000, "test": 10000},
    "cifar100": {"train": 50000, "test": 10000},
}


# --------------------------------------------------------------------------------------------
# The in-memory data set
# --------------------------------------------------------------------------------------------


@dataclass
class ArrayDataset:
    """A whole data set in memory.

    Attributes:
        images: uint8 (N, C, H, W) for image sets, float32 (N, 1, 40) for MNIST-1D.
        labels: int64 (N,), values in [0, len(classes)).
        classes: class names, index = label.
        source: where the data came from and what was done to them (files, split, subset), to
            be recorded with results.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise ValueError(
                f"labels must be a 1-D int64 tensor, got {self.labels.dtype} of shape "
                f"{tuple(self.labels.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"{self.images.shape[0]} images but {self.labels.shape[0]} labels; "
                "they must match one to one"
            )
        if self.classes and self.labels.numel() and int(self.labels.max()) >= len(self.classes):
            raise ValueError(
                f"label {int(self.labels.max())} is out of range for {len(self.classes)} classes"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``classes``)."""
        return len(self.classes)

    def class_counts(self) -> list[int]:
        """Number of examples of each class, in label order."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def subset(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, note: str = ""
    ) -> ArrayDataset:
        """The examples at ``indices`` (in that order); ``note`` is appended to ``source``."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        source = f"{self.source}; {note}" if note else self.source
        return ArrayDataset(self.images[idx], self.labels[idx], list(self.classes), source)


def long_tailed(
    dataset: ArrayDataset,
    ratio: float,
    profile: str = "exp",
    *,
    n_max: int | None = None,
    order: str = "shuffle",
    seed: int = 0,
) -> ArrayDataset:
    """Long-tailed subset of a (balanced) training set, recording how it was made in ``source``.

    ``n_max`` defaults to the largest class count (5000 for CIFAR-10, 500 for CIFAR-100, 6000
    for Fashion-MNIST). See :func:`~samkit.data.long_tail_counts` and
    :func:`~samkit.data.long_tail_indices` for ``profile``, ``order`` and ``seed``.
    """
    if n_max is None:
        n_max = max(dataset.class_counts())
    counts = long_tail_counts(n_max, dataset.num_classes, ratio, profile)
    idx = long_tail_indices(dataset.labels, counts, seed=seed, order=order)
    note = (
        f"long-tailed: profile={profile} ratio={ratio:g} n_max={n_max} order={order} "
        f"seed={seed} -> {len(idx)} examples"
    )
    return dataset.subset(idx, note)


# --------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """One file of a data set with a public address and a published checksum."""

    filename: str  # path relative to the data directory
    urls: tuple[str, ...]  # mirrors, tried in order
    checksum: str
    algorithm: str  # "sha256" or "md5"


_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_URLS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"

#: Downloadable files of each named data set.
RESOURCES: dict[str, tuple[Resource, ...]] = {
    "fashion-mnist": tuple(
        Resource(f"fashion-mnist/{name}", (_FASHION_URL + name,), sha, "sha256")
        for name, sha in [
            (
                "train-images-idx3-ubyte.gz",
                "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            ),
            (
                "train-labels-idx1-ubyte.gz",
                "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            ),
            (
                "t10k-images-idx3-ubyte.gz",
                "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            ),
            (
                "t10k-labels-idx1-ubyte.gz",
                "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
            ),
        ]
    ),
    "mnist": tuple(
        Resource(f"mnist/{name}", tuple(u + name for u in _MNIST_URLS), md5, "md5")
        for name, md5 in [
            ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ]
    ),
    "cifar10": (
        Resource(
            "cifar-10-python.tar.gz",
            (_CIFAR_URL + "cifar-10-python.tar.gz",),
            "c58f30108f718f92721af3b95e74349a",
            "md5",
        ),
    ),
    "cifar100": (
        Resource(
            "cifar-100-python.tar.gz",
            (_CIFAR_URL + "cifar-100-python.tar.gz",),
            "eb9058c3a382ffc7106e4002c42a8d85",
            "md5",
        ),
    ),
}


def default_data_dir() -> Path:
    """Where downloads go and data are looked for by default: ``<cache dir>/data``.

    ``<cache dir>`` is ``$SAMKIT_CACHE`` if set, else ``~/.cache/samkit``.
    """
    return readers.default_cache_dir() / "data"


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _progress_callback(progress: ProgressArg, label: str) -> tuple[Callable, Callable]:
    """(update(done, total), close()) for ``progress``: True = tqdm bar, False = nothing."""
    if callable(progress):
        return progress, lambda: None
    if not progress:
        return (lambda done, total: None), lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)

    def update(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


def download_file(
    url: str,
    dest: PathLike,
    checksum: str,
    algorithm: str = "sha256",
    *,
    progress: ProgressArg = True,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``url`` to ``dest``, verified against ``checksum`` before it appears there.

    The data go to a temporary file beside ``dest``; only when its ``algorithm`` digest ("sha256"
    or "md5") equals ``checksum`` is it renamed to ``dest`` (an atomic move), so ``dest`` is
    never a partial or unverified file. A ``dest`` that already exists with the right checksum is
    kept as is. ``progress`` is True (a tqdm bar on stderr), False, or a callback
    ``(bytes_done, bytes_total_or_None)``. Any URL urllib opens works (https, http, file).

    Raises:
        ValueError: on an unknown algorithm or a checksum mismatch (nothing is left behind).
        OSError: when the URL cannot be fetched (urllib's error, with the URL in the message).
    """
    if algorithm not in ("sha256", "md5"):
        raise ValueError(f"algorithm must be 'sha256' or 'md5', got {algorithm!r}")
    checksum = checksum.strip().lower()
    dest = Path(dest).expanduser()
    if dest.is_file() and _file_digest(dest, algorithm) == checksum:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    update, close = _progress_callback(progress, dest.name)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.new(algorithm)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    length = response.headers.get("Content-Length") if response.headers else None
                    total = int(length) if length and length.isdigit() else None
                    done = 0
                    update(done, total)
                    while block := response.read(1 << 20):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        update(done, total)
            except OSError as exc:
                raise OSError(f"cannot fetch {url}: {exc}") from exc
        got = digest.hexdigest()
        if got != checksum:
            raise ValueError(
                f"checksum mismatch for {url}: {algorithm} {got}, expected {checksum}; the "
                "download is corrupted or the file changed upstream, so it was discarded. "
                "Try again (or another mirror), or fetch the file by hand and check it."
            )
        os.replace(tmp, dest)
    finally:
        close()
        tmp.unlink(missing_ok=True)
    return dest


def download(
    name: str,
    root: PathLike | None = None,
    *,
    progress: ProgressArg = True,
    base_url: str | None = None,
) -> Path:
    """Download a named data set's files into ``root`` and return ``root``.

    ``root`` defaults to ``$SAMKIT_DATA`` if set, else :func:`default_data_dir`. Fashion-MNIST
    and MNIST go to ``root/fashion-mnist/`` and ``root/mnist/`` (IDX .gz files); CIFAR-10 and
    CIFAR-100 to ``root/cifar-10-python.tar.gz`` / ``root/cifar-100-python.tar.gz``, which the
    readers use without extracting. Each file is verified against its published checksum before
    it is moved into place (see :func:`download_file`); files already present and correct are
    kept. ``base_url`` replaces the folder of every URL (a mirror, or a file:// folder).

    Raises:
        ValueError: for a data set without a public address (image-folder, mnist1d) or an
            unknown name, or on a checksum mismatch on every mirror.
        OSError: when no mirror can be reached.
    """
    canonical = _canonical(name)
    if canonical not in RESOURCES:
        raise ValueError(
            f"{canonical!r} has no download address: "
            + (
                "mnist1d is generated offline by the mnist1d package (pip install mnist1d)"
                if canonical == "mnist1d"
                else "give the path of your image folder or archive as root"
            )
        )
    target = _download_root(root)
    for res in RESOURCES[canonical]:
        urls = res.urls
        if base_url is not None:
            urls = (base_url.rstrip("/") + "/" + res.urls[0].rsplit("/", 1)[-1],)
        errors: list[Exception] = []
        for url in urls:
            try:
                download_file(
                    url, target / res.filename, res.checksum, res.algorithm, progress=progress
                )
                break
            except (OSError, ValueError) as exc:
                errors.append(exc)
        else:
            joined = "\n  ".join(str(e) for e in errors)
            bad_data = any(isinstance(e, ValueError) for e in errors)
            raise (ValueError if bad_data else OSError)(
                f"could not download {res.filename} for {canonical}:\n  {joined}"
            )
    return target


_fetch = download  # load_dataset's ``download`` argument shadows the function's name


def _download_root(root: PathLike | None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("SAMKIT_DATA")
    return Path(env).expanduser() if env else default_data_dir()


# --------------------------------------------------------------------------------------------
# Locating data
# --------------------------------------------------------------------------------------------


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    if key not in _ALIASES:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return _ALIASES[key]


def _bases(root: PathLike | None) -> list[tuple[Path, bool]]:
    """Folders to search: (path, explicit). An explicit root is the only place searched."""
    if root is not None:
        return [(Path(root).expanduser(), True)]
    bases = []
    env = os.environ.get("SAMKIT_DATA")
    if env:
        bases.append((Path(env).expanduser(), False))
    bases.append((default_data_dir(), False))
    return bases


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_SUBDIRS = {
    "fashion-mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
    "mnist": ("mnist", "MNIST/raw"),
}


def _locate_idx(name: str, split: str, root: PathLike | None) -> tuple[Path, Path, list[str]]:
    looked = []
    folders = []
    for base, explicit in _bases(root):
        if explicit:
            folders.append(base)
        folders.extend(base / sub for sub in _IDX_SUBDIRS[name])
    if root is None and name == "fashion-mnist":
        folders.append(Path("/usr/share/datasets/fashion-mnist"))
    img_stem, lab_stem = _IDX_STEMS[split]
    for folder in folders:
        images, labels = _idx_file(folder, img_stem), _idx_file(folder, lab_stem)
        if images is not None and labels is not None:
            return images, labels, looked
        looked.append(f"{folder} (no {img_stem}[.gz] + {lab_stem}[.gz])")
    raise _not_found(name, split, root, looked)


def _tar_kind(path: Path) -> str:
    """'pickle' for an official CIFAR python archive, else 'folder' (image-folder archive)."""
    import tarfile

    try:
        with tarfile.open(path, mode="r|*") as tar:
            for i, member in enumerate(tar):
                if member.name.removeprefix("./").startswith(
                    ("cifar-10-batches-py", "cifar-100-python")
                ):
                    return "pickle"
                if i >= 8:
                    break
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable tar archive ({exc})") from exc
    return "folder"


def _locate_cifar(name: str, split: str, root: PathLike | None) -> tuple[str, Path, list[str]]:
    """(kind, path, looked): kind 'pickle' (dir or official tar) or 'folder' (image folder)."""
    looked = []
    ten = name == "cifar10"
    pickle_dir = "cifar-10-batches-py" if ten else "cifar-100-python"
    marker = "data_batch_1" if ten else "meta"
    archive = "cifar-10-python.tar.gz" if ten else "cifar-100-python.tar.gz"
    for base, explicit in _bases(root):
        if explicit:
            if base.is_file():
                return _tar_kind(base), base, looked
            if (base / marker).is_file():
                return "pickle", base, looked
            if ten and (base / split).is_dir():
                return "folder", base, looked
        candidates = [(base / pickle_dir, "pickle"), (base / archive, "pickle")]
        if ten:
            candidates += [
                (base / "cifar10-jpeg.tar.gz", "folder"),
                (base / "cifar10-jpeg.tar", "folder"),
                (base / "cifar10-jpeg", "folder"),
            ]
        for path, kind in candidates:
            if path.is_file() or (
                path.is_dir() and (kind == "folder" or (path / marker).is_file())
            ):
                return kind, path, looked
            looked.append(str(path))
    raise _not_found(name, split, root, looked)


def _not_found(
    name: str, split: str, root: PathLike | None, looked: list[str]
) -> FileNotFoundError:
    places = "\n  - ".join(looked) if looked else "(nowhere)"
    target = _download_root(root)
    how = {
        "fashion-mnist": (
            f"run `samkit download fashion-mnist` (downloads to {target}); or "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, files in "
            "/usr/share/datasets/fashion-mnist); or put train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz "
            "in <dir>/fashion-mnist/ and set data.root=<dir> or SAMKIT_DATA=<dir>"
        ),
        "mnist": (
            f"run `samkit download mnist` (downloads to {target}); or put the four "
            "MNIST IDX files (train-images-idx3-ubyte.gz, ...) in <dir>/mnist/ and set "
            "data.root=<dir> or SAMKIT_DATA=<dir>"
        ),
        "cifar10": (
            f"run `samkit download cifar10` (downloads cifar-10-python.tar.gz to "
            f"{target}); or put cifar-10-python.tar.gz, its extracted cifar-10-batches-py/ "
            "folder, or a JPEG image-folder archive cifar10-jpeg.tar.gz (train/<class>/*.jpg, "
            "test/<class>/*.jpg) in <dir> and set data.root=<dir> or SAMKIT_DATA=<dir>"
        ),
        "cifar100": (
            f"run `samkit download cifar100` (downloads cifar-100-python.tar.gz to "
            f"{target}); or put cifar-100-python.tar.gz or its extracted cifar-100-python/ "
            "folder in <dir> and set data.root=<dir> or SAMKIT_DATA=<dir>"
        ),
    }[name]
    scope = (
        "root was given, so only it was searched"
        if root is not None
        else "searched $SAMKIT_DATA (if set) and the standard places"
    )
    return FileNotFoundError(
        f"{name} ({split} split) not found; {scope}. Looked in:\n  - {places}\nTo get it: {how} "
        f"(in Python: load_dataset({name!r}, download=True))."
    )


def find_dataset(name: str, split: str = "train", root: PathLike | None = None) -> Path:
    """Where :func:`load_dataset` would read a named data set from, without reading it.

    The same search as :func:`load_dataset` (``root`` only when given, else ``$SAMKIT_DATA``
    and the standard places): the folder holding the IDX files for Fashion-MNIST and MNIST, the
    archive or folder for CIFAR. Tests of the real data sets use it to find them, or to skip.

    Raises:
        FileNotFoundError: when it is not found (the message lists every place looked).
        ValueError: for "image-folder" and "mnist1d", which are not searched for.
    """
    canonical = _canonical(name)
    if canonical in ("fashion-mnist", "mnist"):
        return _locate_idx(canonical, split, root)[0].parent
    if canonical in ("cifar10", "cifar100"):
        return _locate_cifar(canonical, split, root)[1]
    raise ValueError(f"{canonical} is not searched for: give its root (image-folder) or "
                     "nothing at all (mnist1d is generated)")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _resolve_split(split: str | None, train: bool | None, default: str | None) -> str | None:
    if train is not None:
        from_train = "train" if train else "test"
        if split is not None and split != from_train:
            raise ValueError(f"split={split!r} contradicts train={train}; give only one of them")
        return from_train
    return default if split is None else split


def _first_per_class(ds: ArrayDataset, limit: int | None) -> ArrayDataset:
    if limit is None:
        return ds
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit_per_class must be None or an integer >= 1, got {limit!r}")
    labels = ds.labels.numpy()
    keep = np.concatenate(
        [np.flatnonzero(labels == c)[:limit] for c in range(max(ds.num_classes, 1))]
    )
    keep.sort()
    return ds.subset(keep, f"first {limit} per class")


def _check_size(name: str, split: str, ds: ArrayDataset, limited: bool, where: str) -> None:
    expected = _SPLIT_SIZES.get(name, {}).get(split)
    if expected is not None and not limited and len(ds) != expected:
        raise ValueError(
            f"{where} holds {len(ds)} {split} images but official {name} has {expected}: the "
            f"file is truncated or is not the official one; fetch it again (`samkit download {name}`)"
        )


def _load_mnist1d(
    split: str, args: dict | None, cache: bool, cache_dir: PathLike | None
) -> ArrayDataset:
    try:
        import mnist1d
        import mnist1d.data as m1d
    except ImportError as exc:
        raise ImportError(
            "the mnist1d data set needs the mnist1d package: pip install mnist1d"
        ) from exc
    params = m1d.get_dataset_args(as_dict=True)
    for key, value in (args or {}).items():
        if key not in params or key == "url":
            valid = ", ".join(sorted(k for k in params if k != "url"))
            raise ValueError(f"unknown mnist1d argument {key!r}; valid: {valid}")
        params[key] = value
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        version = getattr(mnist1d, "__version__", "unknown")
    params_desc = {k: v for k, v in params.items() if k != "url"}
    source = f"mnist1d {split} (generated offline by mnist1d {version} make_dataset, {params_desc})"

    cache_file = None
    if cache:
        key = hashlib.sha256(repr((version, sorted(params_desc.items()))).encode()).hexdigest()
        base = (
            Path(cache_dir).expanduser() if cache_dir is not None else readers.default_cache_dir()
        )
        cache_file = base / "mnist1d" / f"mnist1d-{key[:20]}.npz"
        try:
            with np.load(cache_file, allow_pickle=False) as npz:
                x, y = npz[f"x_{split}"], npz[f"y_{split}"]
                return _mnist1d_dataset(x, y, source)
        except (OSError, KeyError, ValueError):
            pass

    # make_dataset reseeds Python's and NumPy's global generators: put them back afterwards.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        settings = m1d.get_dataset_args()
        for key, value in params.items():
            setattr(settings, key, value)
        data = m1d.make_dataset(settings)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = {
        "x_train": data["x"].astype(np.float32),
        "y_train": data["y"].astype(np.int64),
        "x_test": data["x_test"].astype(np.float32),
        "y_test": data["y_test"].astype(np.int64),
    }
    if cache_file is not None:
        readers._save_cache(cache_file, arrays)
    return _mnist1d_dataset(arrays[f"x_{split}"], arrays[f"y_{split}"], source)


def _mnist1d_dataset(x: np.ndarray, y: np.ndarray, source: str) -> ArrayDataset:
    images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(1)
    return ArrayDataset(images, torch.from_numpy(y.astype(np.int64)), list(_DIGITS), source)


def load_dataset(
    name: str,
    root: PathLike | None = None,
    *,
    split: str | None = None,
    train: bool | None = None,
    download: bool = False,
    progress: ProgressArg = True,
    limit_per_class: int | None = None,
    mode: str = "RGB",
    classes: Sequence[str] | None = None,
    label_kind: str = "fine",
    cache: bool = True,
    cache_dir: PathLike | None = None,
    mnist1d_args: dict | None = None,
) -> ArrayDataset:
    """Load a named data set split into memory.

    Args:
        name: "fashion-mnist", "mnist", "cifar10", "cifar100", "image-folder" or "mnist1d".
        root: where the data are: a folder holding them (or their usual sub-folder, e.g.
            ``root/fashion-mnist/``, ``root/cifar10-jpeg.tar.gz``), or for CIFAR and
            image-folder the archive / folder itself. When given, only ``root`` is searched;
            otherwise ``$SAMKIT_DATA`` and the standard places. Required for "image-folder";
            unused by "mnist1d".
        split: "train" (default) or "test"; for "image-folder" the split folder name, or ""
            for a folder laid out as ``<class>/<image>``. ``train=True/False`` is a synonym.
        download: fetch the data set (checksum-verified) if it is not found. Never implicit.
        progress: download progress: True (tqdm), False, or a callback (done, total).
        limit_per_class: keep only the first k examples of each class (file order); for quick
            checks. The official-size check is skipped then.
        mode: "RGB" or "L", for image folders (including the CIFAR-10 JPEG archive).
        classes: fixed class list for "image-folder" (default: sorted folder names).
        label_kind: "fine" or "coarse" labels for CIFAR-100.
        cache, cache_dir: decoded-image cache for image folders and MNIST-1D (see
            :func:`samkit.data.read_image_folder`).
        mnist1d_args: overrides of ``mnist1d.data.get_dataset_args()`` (e.g. ``{"seed": 0}``).

    Returns:
        An :class:`ArrayDataset`; ``source`` says which files (or generator) it came from.

    Raises:
        FileNotFoundError: when the data set is not found (the message lists every place looked
            and how to get it).
        ValueError: on a bad name or option, or files that fail the readers' checks.
        ImportError: for "mnist1d" without the mnist1d package.
    """
    canonical = _canonical(name)
    split = _resolve_split(split, train, "train")
    if canonical != "image-folder" and split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for {canonical}, got {split!r}")

    if canonical == "mnist1d":
        ds = _load_mnist1d(split, mnist1d_args, cache, cache_dir)
        return _first_per_class(ds, limit_per_class)

    if canonical == "image-folder":
        if root is None:
            raise ValueError(
                "image-folder needs root: the folder or .tar/.tar.gz laid out as "
                "<split>/<class>/<image> (or <class>/<image> with split='')"
            )
        arrays = readers.read_image_folder(
            root,
            split or None,
            mode=mode,
            classes=classes,
            limit_per_class=limit_per_class,
            cache=cache,
            cache_dir=cache_dir,
        )
        where = str(Path(root).expanduser().resolve())
        desc = f"image folder {where}" + (f" split {split}" if split else "")
        if limit_per_class is not None:
            desc += f"; first {limit_per_class} per class"
        return ArrayDataset(arrays.images, arrays.labels, arrays.classes, desc)

    def locate() -> tuple:
        if canonical in ("fashion-mnist", "mnist"):
            return _locate_idx(canonical, split, root)
        return _locate_cifar(canonical, split, root)

    try:
        found = locate()
    except FileNotFoundError:
        if not download:
            raise
        _fetch(canonical, root, progress=progress)
        found = locate()

    if canonical in ("fashion-mnist", "mnist"):
        images_file, labels_file, _ = found
        images = readers.read_idx_images(images_file)
        labels = readers.read_idx_labels(labels_file, num_classes=10)
        if images.shape[0] != labels.shape[0] or images.shape[1:] != (1, 28, 28):
            raise ValueError(
                f"{images_file} holds images of shape {tuple(images.shape)} and {labels_file} "
                f"{labels.shape[0]} labels; expected (N, 1, 28, 28) images and N labels. The "
                "two files do not belong together or are not the official ones; fetch them again"
            )
        names = FASHION_MNIST_CLASSES if canonical == "fashion-mnist" else _DIGITS
        ds = ArrayDataset(images, labels, list(names), f"{canonical} {split}: {images_file}")
        _check_size(canonical, split, ds, limit_per_class is not None, str(images_file))
        return _first_per_class(ds, limit_per_class)

    kind, path, _ = found
    if kind != "pickle" and canonical == "cifar100":
        raise ValueError(
            f"{path} is not the official CIFAR-100 python archive (no cifar-100-python/ inside); "
            "give cifar-100-python.tar.gz or its extracted folder"
        )
    if kind == "pickle":
        if canonical == "cifar10":
            arrays = readers.read_cifar10(path, split)
        else:
            arrays = readers.read_cifar100(path, split, label_kind)
        ds = ArrayDataset(
            arrays.images,
            arrays.labels,
            arrays.classes,
            f"{canonical} {split}: {path} (official python version)",
        )
        _check_size(canonical, split, ds, limit_per_class is not None, str(path))
        return _first_per_class(ds, limit_per_class)

    arrays = readers.read_image_folder(
        path,
        split,
        mode=mode,
        classes=CIFAR10_CLASSES,
        limit_per_class=limit_per_class,
        cache=cache,
        cache_dir=cache_dir,
    )
    if tuple(arrays.images.shape[1:]) != ((3 if mode == "RGB" else 1), 32, 32):
        raise ValueError(
            f"{path} holds images of shape {tuple(arrays.images.shape[1:])}, not CIFAR-10's "
            "32x32; is it the right archive?"
        )
    desc = f"{canonical} {split}: {path} (JPEG image folder)"
    if limit_per_class is not None:
        desc += f"; first {limit_per_class} per class"
    ds = ArrayDataset(arrays.images, arrays.labels, arrays.classes, desc)
    _check_size(canonical, split, ds, limit_per_class is not None, str(path))
    return ds
