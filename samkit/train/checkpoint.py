"""Run-directory files that are never half written and never silently damaged.

Every file is written to a temporary file beside its target, fsynced and renamed into place, with
the mode the umask gives an ordinary file. A checkpoint also stores a SHA-256 of its contents
(every tensor's bytes, dtype and shape, and every plain value), checked when it is loaded, so a
damaged file is refused instead of resuming a corrupted model. Temporary files left by a process
killed during a write are removed by `remove_stale_temporaries`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from samkit.train.records import json_text, read_json, read_jsonl  # noqa: F401 (re-exported)

CHECKSUM = "sha256"
TMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fallback."""


def _umask_mode() -> int:
    """The mode (0o666 less the umask) that open() would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _pause(path: Path) -> None:
    """Testing hook: with SAMKIT_SLOW_WRITES=seconds, every write of a checkpoint says so on
    stderr and pauses before its rename, so a fault-injection test can kill the process there."""
    delay = os.environ.get("SAMKIT_SLOW_WRITES")
    if delay and path.suffix == ".pt":
        print(f"samkit: writing {path.name}", file=sys.stderr, flush=True)
        time.sleep(float(delay))


def atomic_write(path: str | Path, write: Any) -> None:
    """Call write(file) on a temporary file beside `path`, then move it into place atomically.

    An OSError (disk full, read-only folder) is re-raised as one whose message says which file
    could not be written and why, with the previous version of the file left in place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as err:
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            _pause(path)
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from None
        if isinstance(err, RuntimeError) and "unexpected pos" in str(err):
            # torch.save's zip writer hides the OSError (ENOSPC) behind its own message
            raise OSError(errno.ENOSPC, f"cannot write {path}: no space left on device "
                          "(torch.save could not finish the file)") from None
        raise


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete `.NAME.*.tmp` files that a killed write left in `folder`; return them. Call it only
    while holding the folder's lock, so no live writer's file is taken."""
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _digest(value: Any, h: Any) -> None:
    """Feed a canonical encoding of `value` (tensors, containers, plain scalars) into `h`."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _digest(key, h)
            _digest(item, h)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for item in value:
            _digest(item, h)
    elif isinstance(value, bytes):
        h.update(b"B" + value)
    else:
        h.update(f"V{type(value).__name__}:{value!r};".encode())


def checksum(state: dict[str, Any]) -> str:
    """The SHA-256 (hex) of a checkpoint's contents, its own checksum entry left out."""
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != CHECKSUM}, h)
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` atomically with the checksum of its contents."""
    state = {**state, CHECKSUM: checksum(state)}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: Any = "cpu",
                    keys: tuple[str, ...] = ("model",)) -> dict[str, Any]:
    """Load with weights_only=True (a checkpoint holds tensors and plain containers only), check
    its checksum and that it holds `keys`; a file that fails is refused with a CheckpointError."""
    path = Path(path)
    fallback = ("use best.pt (samkit sharpness --checkpoint best) or start the run again"
                if path.name != "best.pt" else "train the run again")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({str(err).splitlines()[0]}); "
                              f"it is damaged or from another program: {fallback}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a samkit "
                              f"checkpoint: {fallback}")
    if CHECKSUM in state and state.pop(CHECKSUM) != checksum(state):
        raise CheckpointError(f"checkpoint {path} is damaged (its checksum does not match its "
                              f"contents): {fallback}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; it is not a samkit "
                              f"checkpoint of this kind: {fallback}")
    return state


def write_json(path: str | Path, data: Any) -> None:
    text = json_text(data) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


