"""Reading a run's per-epoch records (metrics.jsonl), whichever samkit version wrote them.

A record's "epoch" is the 1-based number of the epoch it closes (= epochs completed), so that a
user reading metrics.jsonl or summary.json sees the numbers the progress lines showed. samkit 0.1.0
wrote 0-based indices; such files are recognised (their first epoch is 0: every epoch writes a
record) and shifted when read. Nothing heavy is imported here: the report reads runs without torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `run_dir`/metrics.jsonl with "epoch" counted from 1 ([] if there is none)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = read_jsonl(path)
    if any(r["epoch"] == 0 for r in records):  # written 0-based by samkit 0.1.0
        records = [{**r, "epoch": r["epoch"] + 1} for r in records]
    return records


def _finite_or_null(value: Any) -> Any:
    """NaN and infinities as None (JSON has no such numbers), in nested containers too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def json_text(data: Any, indent: int | None = 2) -> str:
    """Strict JSON (non-finite numbers written as null)."""
    return json.dumps(_finite_or_null(data), indent=indent, default=str, allow_nan=False)


def read_json(path: str | Path) -> Any:
    """A JSON file's contents; a damaged file is a ValueError that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is damaged ({err}); delete it and run again") from None


def read_jsonl(path: str | Path) -> list[Any]:
    """The records of a JSON-lines file ([] if it does not exist); a damaged line names the file
    and the line."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {n} is damaged ({err}); delete that line and run "
                             "again") from None
    return records
