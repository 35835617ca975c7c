"""Reading a run's per-epoch records (metrics.jsonl), whichever samkit version wrote them.

A record's "epoch" is the 1-based number of the epoch it closes (= epochs completed), so that a
user reading metrics.jsonl or summary.json sees the numbers the progress lines showed. samkit 0.1.0
wrote 0-based indices; such files are recognised (their first epoch is 0: every epoch writes a
record) and shifted when read. Nothing heavy is imported here: the report reads runs without torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `run_dir`/metrics.jsonl with "epoch" counted from 1 ([] if there is none)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if any(r["epoch"] == 0 for r in records):  # written 0-based by samkit 0.1.0
        records = [{**r, "epoch": r["epoch"] + 1} for r in records]
    return records
