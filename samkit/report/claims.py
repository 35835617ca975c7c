"""The seed papers' claims, tested on finished compare runs.

A claim says that one method beats another on one measure: an accuracy group (``overall``,
``many``, ``medium``, ``few``, higher is better) or a sharpness number of ``samkit sharpness``
(``trace``, ``normalized_trace``, ``lambda_max``, ``sharpness_many`` ... ``sharpness_few``, lower
is flatter). It is measured as the paired difference, seed by seed on the same split,
initialisation and batch order, with its 95% Student-t interval (samkit.report.stats), and gets
a verdict:

- **holds**: the interval lies entirely on the claimed side of 0;
- **does not hold**: it lies entirely on the other side (the opposite is measured);
- **inconclusive**: it contains 0 (within noise at this number of seeds), or there is one seed.

A claims file (YAML) names the compares, by their recipes, and the claims::

    compares:
      ce: configs/compare_tuned_mnist1d_lt.yaml
      la: configs/compare_tuned_mnist1d_lt_la.yaml
    claims:
      - {claim: "Focal-SAM beats SAM on the tail with LA", paper: "Li et al. 2025",
         in: la, method: focalsam, than: sam, metric: few}

Each compare's final runs are the ones its tuning stage chose (tuning.json). Run
``python -m samkit.report.claims CLAIMS.yaml`` from the folder the compares ran in; it prints
the Markdown table.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from samkit.report.stats import paired_interval, within_noise
from samkit.report.table import GROUPS, Row, load_runs, unpaired_seeds

#: Sharpness numbers a claim can be about (lower is flatter).
SHARPNESS = ("trace", "normalized_trace", "lambda_max", "sharpness_many", "sharpness_medium",
             "sharpness_few")


@dataclass(frozen=True)
class Claim:
    """One claim: `method` beats `than` on `metric` in the compare `where`."""

    claim: str
    paper: str
    where: str
    method: str
    than: str
    metric: str

    def __post_init__(self) -> None:
        if self.metric not in GROUPS + SHARPNESS:
            raise ValueError(f"claim {self.claim!r}: metric {self.metric!r} is not one of "
                             f"{', '.join(GROUPS + SHARPNESS)}")

    @property
    def higher_is_better(self) -> bool:
        return self.metric in GROUPS


def by_seed(row: Row, metric: str) -> dict[int, float]:
    """A row's value of `metric` per seed (accuracy at the last epoch, or sharpness)."""
    values = row.last[metric] if metric in GROUPS else row.sharpness.get(metric, [])
    if len(values) != len(row.seeds):
        return {}  # sharpness missing on some runs: nothing to pair
    return dict(zip(row.seeds, values, strict=True))


def _row_of(name: str, rows: list[Row], claim: Claim) -> Row:
    """The row labelled `name`, else the one row of method `name` (a tuned row's label carries
    its setting: "sam rho=0.02")."""
    mine = [r for r in rows if r.label == name] or [r for r in rows if r.method == name]
    if len(mine) != 1:
        what = "no runs" if not mine else f"{len(mine)} rows"
        raise ValueError(f"claim {claim.claim!r}: {what} of {name!r} in compare {claim.where!r} "
                         f"(it has {', '.join(r.label for r in rows)})")
    return mine[0]


def measure(claim: Claim, rows: list[Row]) -> dict[str, Any]:
    """The claim's paired difference (method - than), its interval, the seeds and the verdict."""
    row, ref = (_row_of(name, rows, claim) for name in (claim.method, claim.than))
    bad = unpaired_seeds(row, ref)
    mine = {s: v for s, v in by_seed(row, claim.metric).items() if s not in bad}
    mean, half, seeds = paired_interval(mine, by_seed(ref, claim.metric))
    noise = within_noise(mean, half)
    if not seeds and claim.metric in SHARPNESS:
        verdict = "not measured: run the compare with --sharpness"
    elif noise is None:
        verdict = "inconclusive: fewer than 2 paired seeds"
    elif noise:
        verdict = "inconclusive: within noise"
    else:
        verdict = "holds" if (mean > 0) == claim.higher_is_better else "does not hold"
    return {"mean": mean, "half": half, "seeds": seeds, "verdict": verdict}


def _cell(claim: Claim, m: dict[str, Any]) -> str:
    """Accuracy in points with 2 decimals; sharpness with 3 significant digits."""
    scale, unit, form = (100.0, " pts", "+.2f") if claim.higher_is_better else (1.0, "", "+.3g")
    if math.isnan(m["mean"]):
        return "n/a"
    text = f"{scale * m['mean']:{form}}{unit}"
    if not math.isnan(m["half"]):
        lo, hi = scale * (m["mean"] - m["half"]), scale * (m["mean"] + m["half"])
        text += f" [{lo:{form}}, {hi:{form}}]"
    return text


def read_claims(path: str | Path) -> tuple[dict[str, str], list[Claim]]:
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict) or not {"compares", "claims"} <= spec.keys():
        raise ValueError(f"{path}: a claims file is a mapping with 'compares' and 'claims'")
    claims = []
    for item in spec["claims"]:
        item = dict(item)
        item["where"] = item.pop("in")
        if item["where"] not in spec["compares"]:
            raise ValueError(f"{path}: claim {item.get('claim')!r} is in compare "
                             f"{item['where']!r}, which 'compares' does not name")
        claims.append(Claim(**item))
    return dict(spec["compares"]), claims


def final_rows(recipe: str | Path) -> list[Row]:
    """The runs a tuned compare ran over its seeds with the settings its tuning chose."""
    from samkit.report.compare import read_compare, select

    compare = read_compare(recipe)
    chosen = None
    if compare.tune is not None:
        chosen = {m: r["chosen"] for m, r in select(compare, write=False)["methods"].items()}
    return load_runs([r.run_dir for r in compare.final_runs(chosen)])


def claims_markdown(compares: dict[str, list[Row]], claims: list[Claim]) -> str:
    lines = ["| claim | paper | loss | measured (paired, 95% interval) | seeds | verdict |",
             "|---|---|---|---|---|---|"]
    for claim in claims:
        m = measure(claim, compares[claim.where])
        lines.append(f"| {claim.claim} | {claim.paper} | {claim.where} | "
                     f"{claim.method} - {claim.than}, {claim.metric}: {_cell(claim, m)} | "
                     f"{len(m['seeds'])} | {m['verdict']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    usage = ("usage: python -m samkit.report.claims CLAIMS.yaml\n\nPrint the claims table (markdown) "
             "of CLAIMS.yaml, measured on its compares' finished runs (run from the folder "
             "their recipes' out paths are relative to).")
    if args in (["-h"], ["--help"]):
        print(usage)
        return 0
    if len(args) != 1:
        print(usage, file=sys.stderr)
        return 2
    recipes, claims = read_claims(args[0])
    rows = {name: final_rows(recipe) for name, recipe in recipes.items()}
    sys.stdout.write(claims_markdown(rows, claims))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
