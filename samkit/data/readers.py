"""Readers for the file formats the benchmark data sets come in.

- IDX (MNIST, Fashion-MNIST), gzip-compressed or not: :func:`read_idx`, :func:`read_idx_images`,
  :func:`read_idx_labels`.
- The official CIFAR-10 / CIFAR-100 python pickles, from their directory or straight from the
  official ``.tar.gz``: :func:`read_cifar10`, :func:`read_cifar100`.
- Image folders (``root/<split>/<class>/*.jpg|png``), from a directory or straight from a ``.tar``
  / ``.tar.gz`` without extracting it, with a decoded on-disk cache: :func:`read_image_folder`,
  :func:`read_image_folder_splits`.

Every reader checks what it reads (magic numbers, shapes, sizes, label ranges) and raises an error
that names the file, says what is wrong and what to do, so that a truncated download or a wrong
file fails loudly instead of training on garbage. Images come back as uint8 tensors (N, C, H, W),
labels as int64 tensors (N,).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import io
import json
import os
import pickle
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ImageArrays",
    "IMAGE_EXTENSIONS",
    "default_cache_dir",
    "read_idx",
    "read_idx_images",
    "read_idx_labels",
    "read_cifar10",
    "read_cifar100",
    "read_image_folder",
    "read_image_folder_splits",
]

PathLike = str | os.PathLike

#: File name endings (lower case) :func:`read_image_folder` treats as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")

_REFETCH = "delete it and fetch it again (`samkit download <name>`) or restore a good copy"


class ImageArrays(NamedTuple):
    """What a reader returns: images uint8 (N, C, H, W), labels int64 (N,), class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]


# --------------------------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------------------------

# IDX type codes -> big-endian NumPy dtypes.
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def _read_maybe_gzip(path: Path) -> bytes:
    """Whole content of ``path``, gunzipped if it starts with the gzip magic bytes."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (or is not a file)")
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(
            f"{path} is a truncated or corrupted gzip file ({exc}); {_REFETCH}"
        ) from exc


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not, into a NumPy array.

    The header is checked (two zero bytes, a known type code, the number of dimensions) and the
    payload must hold exactly the product of the dimensions, so truncated or padded files fail.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: on a corrupted gzip stream, a bad header or a payload of the wrong size.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise ValueError(f"{path} is too short to be an IDX file ({len(data)} bytes); {_REFETCH}")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{path} is not an IDX file: magic number starts with bytes "
            f"{data[0]:#04x} {data[1]:#04x}, expected 0x00 0x00; check that this is the "
            "MNIST-format file you meant, or " + _REFETCH
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(
            f"{path} has unknown IDX type code {code:#04x} (valid: "
            f"{', '.join(f'{c:#04x}' for c in _IDX_DTYPES)}); {_REFETCH}"
        )
    if ndim == 0:
        raise ValueError(f"{path} declares 0 dimensions in its IDX header; {_REFETCH}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"{path} is truncated inside its IDX header ({len(data)} bytes, header needs "
            f"{header_len}); {_REFETCH}"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header_len
    if payload != expected:
        what = "truncated" if payload < expected else "longer than its header says"
        raise ValueError(
            f"{path} is {what}: header declares shape {dims} of {dtype.name} "
            f"({expected} bytes of data) but the file holds {payload}; {_REFETCH}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx_images(path: PathLike) -> torch.Tensor:
    """Read an IDX image file (N, H, W) of uint8 into a uint8 tensor (N, 1, H, W).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a valid IDX file of 3-dimensional uint8 data.
    """
    arr = read_idx(path)
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise ValueError(
            f"{path} is not an IDX image file: expected 3-dimensional uint8 data (N, H, W), "
            f"got shape {arr.shape} of {arr.dtype}; is it the labels file?"
        )
    return torch.from_numpy(arr).unsqueeze(1)


def read_idx_labels(path: PathLike, num_classes: int | None = None) -> torch.Tensor:
    """Read an IDX label file (N,) of uint8 into an int64 tensor (N,).

    If ``num_classes`` is given, every label must lie in [0, num_classes).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a valid 1-dimensional uint8 IDX file, or a label is out
            of range.
    """
    arr = read_idx(path)
    if arr.ndim != 1 or arr.dtype != np.uint8:
        raise ValueError(
            f"{path} is not an IDX label file: expected 1-dimensional uint8 data (N,), "
            f"got shape {arr.shape} of {arr.dtype}; is it the images file?"
        )
    labels = torch.from_numpy(arr.astype(np.int64))
    if num_classes is not None:
        _check_label_range(labels, num_classes, str(path))
    return labels


def _check_label_range(labels: torch.Tensor, num_classes: int, where: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{where} holds labels from {int(labels.min())} to {int(labels.max())}, outside "
            f"[0, {num_classes}) for a {num_classes}-class data set; the file is corrupted or "
            f"belongs to another data set ({_REFETCH})"
        )


# --------------------------------------------------------------------------------------------
# CIFAR python pickles
# --------------------------------------------------------------------------------------------

# What the official CIFAR pickles (and NumPy arrays pickled by any NumPy version) need; anything
# else in a pickle stream is refused, so a malicious file cannot run code.
_PICKLE_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only builds plain containers, bytes, numbers and NumPy arrays."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR pickle holds only NumPy arrays, "
                "lists, bytes and numbers"
            )
        # Pickles name numpy.core (NumPy 1) or numpy._core (NumPy 2): use whichever exists.
        candidates = [module]
        if module.startswith("numpy.core"):
            candidates.insert(0, "numpy._core" + module[len("numpy.core") :])
        elif module.startswith("numpy._core"):
            candidates.append("numpy.core" + module[len("numpy._core") :])
        for candidate in candidates:
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot find {module}.{name} in this NumPy version")


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(
            f"{where} is not a readable CIFAR pickle (truncated or corrupted: {exc}); {_REFETCH}"
        ) from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{where} should hold a dict, holds a {type(obj).__name__}; {_REFETCH}")
    return obj


def _key(d: dict, key: str, where: str) -> object:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    found = ", ".join(sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d))
    raise ValueError(f"{where} has no '{key}' entry (found: {found}); {_REFETCH}")


def _read_members(path: Path, folder: str, names: Sequence[str]) -> dict[str, tuple[bytes, str]]:
    """Bytes of the files ``names`` of a CIFAR pickle directory or official tar archive.

    ``path`` is the pickle folder itself, its parent, or the ``.tar.gz``. Returns
    name -> (bytes, description of where it came from).
    """
    if path.is_dir():
        base = path / folder if (path / folder).is_dir() else path
        out = {}
        for name in names:
            file = base / name
            if not file.is_file():
                raise FileNotFoundError(
                    f"{file} is missing: a complete '{folder}' folder holds {', '.join(names)}; "
                    f"extract the official archive there, or run `samkit download cifar10` (or cifar100)"
                )
            out[name] = (file.read_bytes(), str(file))
        return out
    if path.is_file():
        wanted = set(names)
        out = {}
        try:
            with tarfile.open(path, mode="r|*") as tar:
                for member in tar:
                    base_name = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and base_name in wanted and base_name not in out:
                        handle = tar.extractfile(member)
                        assert handle is not None
                        out[base_name] = (handle.read(), f"{path}:{member.name}")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise ValueError(
                f"{path} is not a readable tar archive (truncated or corrupted: {exc}); {_REFETCH}"
            ) from exc
        missing = [n for n in names if n not in out]
        if missing:
            raise ValueError(
                f"{path} lacks {', '.join(missing)}: it is not the official '{folder}' archive "
                f"or it is truncated; {_REFETCH}"
            )
        return out
    raise FileNotFoundError(
        f"{path} does not exist: give the '{folder}' folder, its parent or the official tar.gz"
    )


def _decode_names(raw: object, where: str, count: int) -> list[str]:
    if not isinstance(raw, (list, tuple)) or len(raw) != count:
        raise ValueError(f"{where}: expected a list of {count} class names, got {raw!r:.80}")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw]


def _cifar_batch(
    blob: bytes, where: str, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(blob, where)
    data = _key(d, "data", where)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{where}: 'data' must be a uint8 array (N, 3072), got {desc}; {_REFETCH}")
    if data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{where}: 'data' rows hold {data.shape[1]} values, expected 3072 (3 x 32 x 32); "
            f"{_REFETCH}"
        )
    raw_labels = _key(d, label_key, where)
    try:
        labels = np.asarray(raw_labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: '{label_key}' is not a list of integers; {_REFETCH}") from exc
    if labels.shape != (data.shape[0],):
        raise ValueError(
            f"{where}: {data.shape[0]} images but '{label_key}' has shape {labels.shape}; "
            f"{_REFETCH}"
        )
    _check_label_range(torch.from_numpy(labels), num_classes, where)
    return data.reshape(-1, 3, 32, 32), labels


def _split_name(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def read_cifar10(path: PathLike, split: str = "train") -> ImageArrays:
    """Read the official CIFAR-10 python version (``cifar-10-batches-py``).

    ``path`` is the ``cifar-10-batches-py`` folder, its parent, or the official
    ``cifar-10-python.tar.gz`` (read without extracting it). ``split`` is "train" (data_batch_1
    to 5, 50,000 images) or "test" (test_batch, 10,000). Class names come from batches.meta.

    Raises:
        FileNotFoundError: if the folder or a batch file is missing.
        ValueError: on a corrupted file, missing keys, wrong shapes or labels out of range.
    """
    split = _split_name(split)
    batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    files = _read_members(Path(path), "cifar-10-batches-py", [*batches, "batches.meta"])
    meta_blob, meta_where = files["batches.meta"]
    classes = _decode_names(
        _key(_unpickle(meta_blob, meta_where), "label_names", meta_where), meta_where, 10
    )
    parts = [_cifar_batch(*files[b], "labels", 10) for b in batches]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageArrays(torch.from_numpy(images), torch.from_numpy(labels), classes)


def read_cifar100(path: PathLike, split: str = "train", label_kind: str = "fine") -> ImageArrays:
    """Read the official CIFAR-100 python version (``cifar-100-python``).

    ``path`` is the ``cifar-100-python`` folder, its parent, or the official
    ``cifar-100-python.tar.gz``. ``split`` is "train" (50,000 images) or "test" (10,000);
    ``label_kind`` "fine" gives the 100 classes, "coarse" the 20 super-classes (present in the
    official files). Class names come from ``meta``.

    Raises:
        FileNotFoundError: if the folder or a file is missing.
        ValueError: on a corrupted file, missing keys, wrong shapes or labels out of range.
    """
    split = _split_name(split)
    if label_kind not in ("fine", "coarse"):
        raise ValueError(f"label_kind must be 'fine' or 'coarse', got {label_kind!r}")
    num_classes = 100 if label_kind == "fine" else 20
    files = _read_members(Path(path), "cifar-100-python", [split, "meta"])
    meta_blob, meta_where = files["meta"]
    meta = _unpickle(meta_blob, meta_where)
    classes = _decode_names(
        _key(meta, f"{label_kind}_label_names", meta_where), meta_where, num_classes
    )
    images, labels = _cifar_batch(*files[split], f"{label_kind}_labels", num_classes)
    return ImageArrays(torch.from_numpy(images), torch.from_numpy(labels), classes)


# --------------------------------------------------------------------------------------------
# Image folders (directories or tar archives)
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Directory for samkit's caches: ``$SAMKIT_CACHE`` if set, else ``~/.cache/samkit``."""
    env = os.environ.get("SAMKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "samkit"


def _is_image_name(name: str) -> bool:
    parts = name.split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return name.lower().endswith(IMAGE_EXTENSIONS)


# An entry: relative posix path -> a function giving its bytes.
_Entries = dict[str, Callable[[], bytes]]


def _scan_directory(root: Path) -> _Entries:
    entries: _Entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for filename in sorted(filenames):
            rel = filename if rel_dir == "." else f"{rel_dir}/{filename}"
            if _is_image_name(rel):
                file = Path(dirpath) / filename
                entries[rel] = file.read_bytes
    return entries


def _scan_tar(path: Path) -> _Entries:
    entries: _Entries = {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if member.isfile() and _is_image_name(name):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    blob = handle.read()
                    entries[name] = lambda blob=blob: blob
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ValueError(
            f"{path} is not a readable tar archive (truncated or corrupted: {exc}); "
            "check the file (e.g. against its checksum) and fetch it again"
        ) from exc
    return entries


def _is_tar_name(path: Path) -> bool:
    return path.name.lower().endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


def _source_fingerprint(path: Path) -> dict:
    """What the cache key depends on: the path and size/mtime of the file(s)."""
    if path.is_file():
        st = path.stat()
        return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for filename in sorted(filenames):
            file = Path(dirpath) / filename
            st = file.stat()
            digest.update(f"{file}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"path": str(path), "listing": digest.hexdigest()}


def _layout(entries: _Entries, with_splits: bool, source: Path) -> dict[str, dict[str, list[str]]]:
    """Group image entries by split and class: {split: {class: [sorted names]}}.

    With ``with_splits`` the layout is ``[prefix/]<split>/<class>/<file>``, else
    ``[prefix/]<class>/<file>`` (split key ""); all images must share one prefix.
    """
    depth = 3 if with_splits else 2
    prefixes: dict[tuple[str, ...], str] = {}
    tree: dict[str, dict[str, list[str]]] = {}
    for name in entries:
        parts = tuple(name.split("/"))
        if len(parts) < depth:
            where = "<split>/<class>/" if with_splits else "<class>/"
            raise ValueError(
                f"{source}: image '{name}' is not inside a {where} folder; move it or give the "
                "folder that holds the class folders"
            )
        prefixes.setdefault(parts[:-depth], name)
        split = parts[-3] if with_splits else ""
        tree.setdefault(split, {}).setdefault(parts[-2], []).append(name)
    if len(prefixes) > 1:
        shown = ", ".join(sorted("/".join(p) or "." for p in prefixes)[:6])
        hint = (
            "give the folder that holds the split folders"
            if with_splits
            else "if these are splits (e.g. train, test), pass split=..."
        )
        raise ValueError(
            f"{source}: images sit under several different folders ({shown}), so the "
            f"{'split' if with_splits else 'class'} folders are ambiguous; {hint}"
        )
    for classes in tree.values():
        for names in classes.values():
            names.sort()
    return tree


def decompression_bomb_error(file: object, exc: Exception) -> ValueError:
    """The one-line error for an image whose declared size exceeds PIL's limit
    (``Image.MAX_IMAGE_PIXELS``, against decompression bombs): what it is and the two fixes."""
    return ValueError(
        f"{file} declares more pixels than PIL's decompression-bomb limit allows ({exc}); if the "
        "image is genuine, raise PIL.Image.MAX_IMAGE_PIXELS (None disables the check) before "
        "loading, else remove the file"
    )


@contextlib.contextmanager
def decompression_bombs_as_errors() -> Iterator[None]:
    """PIL only warns (``DecompressionBombWarning``) for an image between once and twice its pixel
    limit: within the block that warning is raised, so that it is reported with the file's name
    like ``DecompressionBombError``. Enter it in the thread that starts the decoding."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _decode_all(
    items: list[tuple[str, Callable[[], bytes]]], mode: str, source: Path, num_threads: int
) -> np.ndarray:
    """Decode images to one uint8 array (N, H, W, C); all must share the first one's size."""
    with decompression_bombs_as_errors():
        return _decode_each(items, mode, source, num_threads)


def _decode_each(
    items: list[tuple[str, Callable[[], bytes]]], mode: str, source: Path, num_threads: int
) -> np.ndarray:
    def decode(name: str, read: Callable[[], bytes]) -> Image.Image:
        try:
            img = Image.open(io.BytesIO(read()), formats=("JPEG", "PNG"))
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise decompression_bomb_error(f"{source}: image '{name}'", exc) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ValueError(
                f"{source}: cannot decode image '{name}' ({exc}); the file is corrupted or not "
                "a JPEG/PNG: replace or remove it"
            ) from exc
        return img if img.mode == mode else img.convert(mode)

    first = decode(*items[0])
    width, height = first.size
    channels = len(first.getbands())
    out = np.empty((len(items), height, width, channels), dtype=np.uint8)
    out[0] = np.asarray(first).reshape(height, width, channels)

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            img = decode(*items[i])
            if img.size != (width, height):
                raise ValueError(
                    f"{source}: image '{items[i][0]}' is {img.size[0]}x{img.size[1]} but "
                    f"'{items[0][0]}' is {width}x{height}; all images must share one size "
                    "(resize them beforehand)"
                )
            out[i] = np.asarray(img).reshape(height, width, channels)

    chunk = 2048
    ranges = [(s, min(s + chunk, len(items))) for s in range(1, len(items), chunk)]
    if num_threads <= 1 or len(ranges) <= 1:
        for start, stop in ranges:
            work(start, stop)
    else:
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            for future in [pool.submit(work, s, e) for s, e in ranges]:
                future.result()
    return out


def _save_cache(file: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz atomically (temporary file in the same folder, then rename)."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        warnings.warn(
            f"could not write the decoded-image cache {file} ({exc}); the next load will "
            "decode again (set SAMKIT_CACHE or cache_dir to a writable folder)",
            stacklevel=3,
        )


def _load_cache(
    file: Path, splits: Sequence[str] | None
) -> tuple[list[str], dict[str, ImageArrays]] | None:
    """(every split the cache holds, the cached splits: only ``splits`` if given), or None when
    there is no usable cache. The names of all are kept so that a missing split's error lists
    them without decoding the others."""
    try:
        with np.load(file, allow_pickle=False) as npz:
            found = [str(s) for s in npz["splits"]]
            return found, {
                s: ImageArrays(
                    torch.from_numpy(npz[f"images_{i}"]),
                    torch.from_numpy(npz[f"labels_{i}"]),
                    [str(c) for c in npz[f"classes_{i}"]],
                )
                for i, s in enumerate(found)
                if splits is None or s in splits
            }
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zlib.error) as exc:
        warnings.warn(f"ignoring unreadable cache {file} ({exc}); decoding again", stacklevel=3)
        return None


def read_image_folder_splits(
    path: PathLike,
    splits: Sequence[str] | None = None,
    *,
    with_splits: bool = True,
    mode: str = "RGB",
    classes: Sequence[str] | None = None,
    limit_per_class: int | None = None,
    cache: bool = True,
    cache_dir: PathLike | None = None,
    num_threads: int | None = None,
) -> dict[str, ImageArrays]:
    """Read several splits of an image folder in one pass (one read of a tar archive).

    Layout: ``[prefix/]<split>/<class>/<file>.{jpg,jpeg,png}`` (or ``[prefix/]<class>/<file>``
    with ``with_splits=False``, returned under the key ""), in a directory or a .tar/.tar.gz
    read as a stream without extracting it; one leading folder (any prefix shared by all images)
    is allowed. ``splits`` None reads every split found. Classes are the sorted class-folder
    names of each split unless ``classes`` fixes the list (and so the label numbers). Images
    are decoded with Pillow to ``mode`` ("RGB" or "L"); all must share one size. Within a class
    files are taken in sorted name order, the first ``limit_per_class`` only if given.

    With ``cache`` the decoded arrays of all splits go to an .npz under ``cache_dir`` (default
    :func:`default_cache_dir`), written atomically and keyed on the source's path, size and
    modification time (for a directory: of every file) and on the options, so a second load
    only reads that file.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: on an unreadable archive or image, a bad layout, an image size mismatch, a
            class folder outside ``classes``, a requested split that is absent, or bad options.
    """
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: give a folder laid out as <split>/<class>/<image> or a "
            ".tar/.tar.gz of one"
        )
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    if limit_per_class is not None and (
        isinstance(limit_per_class, bool)
        or not isinstance(limit_per_class, int)
        or limit_per_class < 1
    ):
        raise ValueError(
            f"limit_per_class must be None or an integer >= 1, got {limit_per_class!r}"
        )
    if path.is_file() and not _is_tar_name(path) and not tarfile.is_tarfile(path):
        raise ValueError(f"{path} is neither a folder nor a tar archive (.tar, .tar.gz, .tgz)")
    if num_threads is None:
        num_threads = min(8, os.cpu_count() or 1)
    class_list = list(classes) if classes is not None else None

    cache_file = None
    if cache:
        key = {
            "format": 1,
            "source": _source_fingerprint(path),
            "with_splits": with_splits,
            "mode": mode,
            "classes": class_list,
            "limit_per_class": limit_per_class,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        stem = path.name.split(".")[0] or "images"
        base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        cache_file = base / "image-folder" / f"{stem}-{digest}.npz"
        cached = _load_cache(cache_file, splits)
        if cached is not None:
            available, arrays = cached
            return _select_splits(arrays, splits, path, available)

    entries = _scan_tar(path) if path.is_file() else _scan_directory(path)
    if not entries:
        raise ValueError(
            f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); check the path"
        )
    tree = _layout(entries, with_splits, path)
    requested = sorted(tree) if splits is None else list(splits)
    _check_splits(requested, tree, path)
    # Without a cache only the requested splits are decoded; with one, all (for the next call).
    wanted = sorted(tree) if cache else requested

    result: dict[str, ImageArrays] = {}
    for split in wanted:
        names = class_list if class_list is not None else sorted(tree[split])
        unknown = sorted(set(tree[split]) - set(names))
        if unknown:
            raise ValueError(
                f"{path}: split '{split}' has class folders {unknown} that are not in "
                f"classes={names}; add them to classes or remove the folders"
            )
        items: list[tuple[str, Callable[[], bytes]]] = []
        labels: list[int] = []
        for label, cls in enumerate(names):
            members = tree[split].get(cls, [])
            if limit_per_class is not None:
                members = members[:limit_per_class]
            items.extend((m, entries[m]) for m in members)
            labels.extend([label] * len(members))
        hwc = _decode_all(items, mode, path, num_threads)
        images = torch.from_numpy(np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)))
        result[split] = ImageArrays(images, torch.tensor(labels, dtype=torch.int64), list(names))

    if cache_file is not None:
        arrays: dict[str, np.ndarray] = {"splits": np.array(list(result), dtype=str)}
        for i, arrs in enumerate(result.values()):
            arrays[f"images_{i}"] = arrs.images.numpy()
            arrays[f"labels_{i}"] = arrs.labels.numpy()
            arrays[f"classes_{i}"] = np.array(arrs.classes, dtype=str)
        _save_cache(cache_file, arrays)
    return _select_splits(result, splits, path, list(tree))


def _check_splits(requested: Sequence[str], available: Iterable[str], path: Path) -> None:
    """A clear error when a requested split is not among those the folder or archive holds."""
    have = sorted(available)
    missing = [s for s in requested if s not in have]
    if missing:
        raise ValueError(
            f"{path} has no split {', '.join(map(repr, missing))}; splits found: "
            f"{', '.join(map(repr, have)) or 'none'}"
        )


def _select_splits(
    found: dict[str, ImageArrays], splits: Sequence[str] | None, path: Path,
    available: Iterable[str],
) -> dict[str, ImageArrays]:
    """The requested splits of `found` (all with ``splits`` None); `available`: every split the
    folder or archive holds, named when one is missing."""
    if splits is None:
        return found
    _check_splits(splits, available, path)
    return {s: found[s] for s in splits}


def read_image_folder(
    path: PathLike,
    split: str | None = "train",
    *,
    mode: str = "RGB",
    classes: Sequence[str] | None = None,
    limit_per_class: int | None = None,
    cache: bool = True,
    cache_dir: PathLike | None = None,
    num_threads: int | None = None,
) -> ImageArrays:
    """Read one split of an image folder (directory or .tar/.tar.gz) into uint8 (N, C, H, W).

    ``split`` names the folder level above the class folders (``<split>/<class>/<image>``);
    ``split=None`` reads a folder laid out as ``<class>/<image>``. See
    :func:`read_image_folder_splits` for the options, the cache and the errors.
    """
    result = read_image_folder_splits(
        path,
        None if split is None else [split],
        with_splits=split is not None,
        mode=mode,
        classes=classes,
        limit_per_class=limit_per_class,
        cache=cache,
        cache_dir=cache_dir,
        num_threads=num_threads,
    )
    return result["" if split is None else split]
