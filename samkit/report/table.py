"""One report from many runs: a Markdown and a CSV table (means and intervals over seeds) and plots.

A row averages one label's runs over distinct seeds: two runs of a label with the same seed are
refused (their spread would read as a spread over seeds), with a message naming both.

Statistics (samkit.report.stats): each accuracy is given as the mean over seeds with the
half-width of its 95% Student-t interval (n - 1 degrees of freedom; the standard deviation is in
report.csv). Paired differences against plain SGD (method ``plain``) and SAM (method ``sam``)
take, seed by seed, a row's accuracy minus the reference's on the same seed, and give the mean
difference with its 95% t interval; "within noise" when the interval contains 0. Runs of one
seed are paired only if they share the split, the initial weights and the batch order (the
digests each run records in summary.json's ``pairing``); a seed whose runs differ is left out
of the pair and named in the report.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from samkit.report.axes import log_count_axis  # noqa: E402
from samkit.report.stats import mean_interval, paired_interval, within_noise  # noqa: E402
from samkit.train.records import read_json, read_metrics  # noqa: E402

GROUPS = ("overall", "many", "medium", "few")
REFERENCES = ("plain", "sam")  # the methods paired differences are taken against
MAX_CLASS_COLUMNS = 100  # a wider per-class table goes to report.csv only


@dataclass
class Row:
    """One method (label) over its seeds."""

    label: str
    method: str
    seeds: list[int] = field(default_factory=list)
    last: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    best_overall: list[float] = field(default_factory=list)
    best_on: list[str] = field(default_factory=list)  # where each run's best epoch was chosen
    pairing: list[dict[str, str] | None] = field(default_factory=list)
    images_per_second: list[float] = field(default_factory=list)
    forwards_per_step: list[float] = field(default_factory=list)
    peak_memory_mb: list[float] = field(default_factory=list)
    train_time_s: list[float] = field(default_factory=list)
    per_class: list[list[float]] = field(default_factory=list)
    curves: list[list[tuple[int, float]]] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    thresholds: dict[str, int] = field(default_factory=dict)
    sharpness: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def sharpness_of(run_dir: Path, groups: list[str]) -> dict[str, float]:
    """The headline numbers of a run's `samkit sharpness` results (empty if it has none)."""
    path = run_dir / "sharpness" / "sharpness.json"
    if not path.exists():
        return {}
    r = json.loads(path.read_text())
    out = {}
    if "trace" in r:
        out["trace"] = r["trace"]["estimate"]
        out["normalized_trace"] = r["normalized_trace"]["value"]
    if "eigen" in r:
        out["lambda_max"] = r["eigen"]["top"][0]
        out["lambda_min"] = r["eigen"]["bottom"][0]
    if "classwise" in r:
        values = r["classwise"]["multi_step"]
        for g in GROUPS[1:]:
            mine = [v for v, name in zip(values, groups, strict=True) if name == g and v is not None]
            if mine:
                out[f"sharpness_{g}"] = statistics.fmean(mine)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN for no values."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def load_runs(run_dirs: list[str | Path]) -> list[Row]:
    """Group finished runs by label (run.label, else the method), in first-seen order."""
    rows: dict[str, Row] = {}
    seen: dict[tuple[str, int], Path] = {}  # (label, seed) -> its run
    for run_dir in map(Path, run_dirs):
        path = run_dir / "summary.json"
        if not path.exists():
            raise FileNotFoundError(f"{run_dir} has no summary.json: it is not a finished run")
        s = read_json(path)
        label = s.get("label") or s["method"]
        row = rows.setdefault(label, Row(label, s["method"]))
        if row.counts and (row.counts != s["counts"] or row.thresholds != s["thresholds"]):
            raise ValueError(f"{run_dir} was trained on another split than the other runs of "
                             f"{label}; a row must share one protocol")
        row.counts, row.thresholds = s["counts"], s["thresholds"]
        seed = s.get("seed", 0)
        if (label, seed) in seen:
            raise ValueError(
                f"{seen[label, seed]} and {run_dir} are both seed {seed} of {label}: a row is "
                "a mean over distinct seeds; report one of them, or give them different "
                "run.label values to see them as separate rows")
        seen[label, seed] = run_dir
        row.seeds.append(seed)
        for g in GROUPS:
            row.last[g].append(math.nan if s["last"][g] is None else s["last"][g])
        best = s.get("best") or {}
        row.best_overall.append(math.nan if best.get("overall") is None else best["overall"])
        row.best_on.append(best.get("chosen_on", "test (optimistic)"))
        row.pairing.append(s.get("pairing"))
        row.images_per_second.append(s["images_per_second"] or math.nan)
        row.forwards_per_step.append(s.get("forwards_per_step", math.nan))
        row.peak_memory_mb.append(s.get("peak_memory_mb", math.nan))
        row.train_time_s.append(s["train_time_s"])
        row.per_class.append([math.nan if a is None else a
                              for a in s.get("per_class") or [None] * len(s["counts"])])
        row.curves.append([(r["epoch"], r["overall"]) for r in read_metrics(run_dir)
                           if r.get("overall") is not None])
        for key, value in sharpness_of(run_dir, s["groups"]).items():
            row.sharpness[key].append(value)
    return list(rows.values())


def _passes(method: str) -> str:
    import samkit.optim as so

    try:
        return so.get(method).passes
    except ValueError:
        return "?"


def table_rows(rows: list[Row]) -> list[dict[str, Any]]:
    """The report's numbers, one dict per row (the CSV's rows)."""
    out = []
    for row in rows:
        record: dict[str, Any] = {"label": row.label, "method": row.method, "seeds": len(row.seeds)}
        for g in GROUPS:
            record[f"{g}_mean"], record[f"{g}_std"] = mean_std(row.last[g])
            record[f"{g}_ci95"] = mean_interval(row.last[g])[1]
        record["best_overall_mean"], _ = mean_std(row.best_overall)
        record["best_chosen_on"] = "/".join(sorted(set(row.best_on)))
        record["images_per_second"], _ = mean_std(row.images_per_second)
        record["forwards_per_step"], _ = mean_std(row.forwards_per_step)
        record["passes"] = _passes(row.method)
        record["peak_memory_mb"] = max(row.peak_memory_mb)
        record["train_time_s"], _ = mean_std(row.train_time_s)
        for key, values in row.sharpness.items():
            record[key], record[f"{key}_std"] = mean_std(values)
        for ref_name, (ref, _) in references(rows).items():
            if ref is None or ref is row:
                continue
            for g, (mean, half, seeds) in paired(row, ref).items():
                record[f"{g}_vs_{ref_name}"], record[f"{g}_vs_{ref_name}_ci95"] = mean, half
                record[f"{g}_vs_{ref_name}_seeds"] = len(seeds)
                noise = within_noise(mean, half)
                record[f"{g}_vs_{ref_name}_within_noise"] = "" if noise is None else noise
        for k, values in enumerate(zip(*row.per_class, strict=True)):
            record[f"class_{k}"] = mean_std(list(values))[0]
        out.append(record)
    return out


def references(rows: list[Row]) -> dict[str, tuple[Row | None, str]]:
    """For plain and sam: the one row of that method and "", or None and why there is none."""
    out: dict[str, tuple[Row | None, str]] = {}
    for name in REFERENCES:
        mine = [r for r in rows if r.method == name]
        if len(mine) == 1:
            out[name] = (mine[0], "")
        else:
            out[name] = (None, f"no run of method {name}" if not mine else
                         f"{len(mine)} rows of method {name} ({', '.join(r.label for r in mine)})"
                         ": no single reference")
    return out


def unpaired_seeds(row: Row, ref: Row) -> dict[int, str]:
    """Seeds both rows have whose runs differ in split, initial weights or batch order (seed ->
    what differs); runs without pairing digests (older samkit) are taken as paired."""
    mine = dict(zip(row.seeds, row.pairing, strict=True))
    theirs = dict(zip(ref.seeds, ref.pairing, strict=True))
    out = {}
    for seed in sorted(mine.keys() & theirs.keys()):
        a, b = mine[seed], theirs[seed]
        if a and b:
            differ = [k for k in ("split", "init", "batches") if a.get(k) != b.get(k)]
            if differ:
                out[seed] = ", ".join(differ)
    return out


def paired(row: Row, ref: Row) -> dict[str, tuple[float, float, list[int]]]:
    """Per group: (mean of row - ref over the paired seeds, 95% t half-width, those seeds)."""
    bad = unpaired_seeds(row, ref)
    out = {}
    for g in GROUPS:
        mine = {s: v for s, v in zip(row.seeds, row.last[g], strict=True) if s not in bad}
        theirs = dict(zip(ref.seeds, ref.last[g], strict=True))
        out[g] = paired_interval(mine, theirs)
    return out


def _pct(mean: float, half: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.1f}" + ("" if math.isnan(half) else f" ± {100 * half:.1f}")


def _diff(mean: float, half: float) -> str:
    """A paired difference in points: +1.2 [-0.3, 2.7], marked when within noise."""
    if math.isnan(mean):
        return "n/a"
    if math.isnan(half):
        return f"{100 * mean:+.1f} (one seed: no interval)"
    text = f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]"
    return text + (" within noise" if within_noise(mean, half) else "")


def markdown(rows: list[Row], tuning: dict[str, Any] | None = None) -> str:
    records = table_rows(rows)
    th = rows[0].thresholds if rows else {}
    lines = [
        "Accuracy (%) at the last epoch on the balanced test set: mean over seeds ± the "
        "half-width of its 95% Student-t interval (n - 1 degrees of freedom; standard deviations "
        f"in report.csv); many > {th.get('many')} and few < {th.get('few')} training images. "
        "'best' is the test overall accuracy at the epoch of best validation overall accuracy; "
        "marked † where a run had no validation set and its best epoch was chosen on the test "
        "set (optimistic).",
        "",
        "| method | seeds | overall | many | medium | few | best | images/s | passes | "
        "forwards/step | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        mark = "" if r["best_chosen_on"] == "validation" else " †"
        lines.append(
            f"| {r['label']} | {r['seeds']} | {_pct(r['overall_mean'], r['overall_ci95'])} | "
            f"{_pct(r['many_mean'], r['many_ci95'])} | {_pct(r['medium_mean'], r['medium_ci95'])} | "
            f"{_pct(r['few_mean'], r['few_ci95'])} | {100 * r['best_overall_mean']:.1f}{mark} | "
            f"{r['images_per_second']:.0f} | {r['passes']} | {r['forwards_per_step']:.2f} | "
            f"{r['peak_memory_mb']:.0f} |")
    lines += _paired_markdown(rows, records)
    lines += _per_class_markdown(rows)
    if tuning is not None:
        lines += _tuning_markdown(tuning)
    keys = [k for k in SHARPNESS_COLUMNS if any(k in r for r in records)]
    if keys:
        lines += [
            "",
            "Curvature and sharpness at the last checkpoint (`samkit sharpness`, on a class-stratified "
            "batch of the training set), mean ± standard deviation over seeds. Class-wise sharpness "
            "(rho as run) is averaged over the classes of each group.",
            "",
            "| method | " + " | ".join(SHARPNESS_COLUMNS[k] for k in keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for r in records:
            cells = [f"{r[k]:.4g} ± {r[k + '_std']:.2g}" if k in r else "n/a" for k in keys]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _paired_markdown(rows: list[Row], records: list[dict[str, Any]]) -> list[str]:
    lines = []
    for name, (ref, why) in references(rows).items():
        lines += ["", f"Paired differences against {name} (accuracy points, row minus {name}, seed "
                  "by seed on the same split, initial weights and batch order): mean [95% "
                  "t interval]; 'within noise' when the interval contains 0.", ""]
        if ref is None:
            lines.append(f"None: {why}.")
            continue
        lines += ["| method | paired seeds | overall | many | medium | few |",
                  "|---|---|---|---|---|---|"]
        notes = []
        for row, r in zip(rows, records, strict=True):
            if row is ref:
                continue
            cells = [_diff(r[f"{g}_vs_{name}"], r[f"{g}_vs_{name}_ci95"]) for g in GROUPS]
            lines.append(f"| {row.label} | {r[f'overall_vs_{name}_seeds']} | "
                         + " | ".join(cells) + " |")
            notes += [f"seed {s} of {row.label} differs from {name}'s in {what}: not paired"
                      for s, what in unpaired_seeds(row, ref).items()]
        lines += ["", *notes] if notes else []
    return lines


def _per_class_markdown(rows: list[Row]) -> list[str]:
    counts = rows[0].counts
    if len(counts) > MAX_CLASS_COLUMNS:
        return ["", f"Per-class test accuracy: {len(counts)} classes, in report.csv (class_k)."]
    lines = ["", "Per-class test accuracy (%) at the last epoch, mean over seeds; classes by "
             "training count (n), head first.", "",
             "| method | " + " | ".join(f"{k} (n={n})" for k, n in enumerate(counts)) + " |",
             "|---|" + "---|" * len(counts)]
    for row in rows:
        acc = [mean_std(list(v))[0] for v in zip(*row.per_class, strict=True)]
        lines.append(f"| {row.label} | " + " | ".join(
            "n/a" if math.isnan(a) else f"{100 * a:.1f}" for a in acc) + " |")
    return lines


def _tuning_markdown(tuning: dict[str, Any]) -> list[str]:
    """The tuning stage's choices (samkit compare's tuning.json)."""
    lines = ["", f"Settings chosen on validation, never on test: {tuning['rule']}"
             + (f"; {tuning['epochs']} epochs per tuning run" if tuning.get("epochs") else "")
             + ".", "", f"| method | chosen | {tuning['metric']} (%) | all settings tried |",
             "|---|---|---|---|"]
    for method, m in tuning["methods"].items():
        tried = "; ".join(
            f"{p['row']}: " + ("stopped or n/a" if p["score"] is None else f"{100 * p['score']:.1f}")
            for p in m["points"]) or m["why"]
        score = "—" if m["score"] is None else f"{100 * m['score']:.1f}"
        lines.append(f"| {method} | {m['chosen']} | {score} | {tried} |")
    return lines


SHARPNESS_COLUMNS = {
    "trace": "Hessian trace", "normalized_trace": "trace / ‖g‖", "lambda_max": "lambda_max",
    "lambda_min": "lambda_min", "sharpness_many": "sharpness many",
    "sharpness_medium": "sharpness medium", "sharpness_few": "sharpness few",
}


def write_report(run_dirs: list[str | Path], out: str | Path,
                 tuning: dict[str, Any] | None = None) -> list[Path]:
    """Write report.md, report.csv and the plots for `run_dirs` into `out`; return the paths.
    `tuning`: a compare's tuning record, else the tuning.json beside the runs if they share a
    folder that has one."""
    rows = load_runs(run_dirs)
    if not rows:
        raise ValueError("no runs to report")
    parents = {Path(d).resolve().parent for d in run_dirs}
    beside = parents.pop() / "tuning.json" if len(parents) == 1 else None
    if tuning is None and beside is not None and beside.is_file():
        tuning = read_json(beside)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.md", out / "report.csv", out / "accuracy_vs_throughput.png",
             out / "per_class.png", out / "curves.png"]
    paths[0].write_text(markdown(rows, tuning))
    records = table_rows(rows)
    with open(paths[1], "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in records for k in r))
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(records)
    _plot_tradeoff(records, paths[2])
    _plot_per_class(rows, paths[3])
    _plot_curves(rows, paths[4])
    return paths


def _plot_tradeoff(records: list[dict[str, Any]], path: Path) -> None:
    """Overall and few-shot test accuracy (mean, 95% interval over seeds) against the training
    cost per image: relative to the plain run when there is one (its images/s over the row's),
    else in ms per image. Rows measured side by side share the machine, so the cost is the
    measured one, noise included."""
    plain = [r for r in records if r["method"] == "plain" and r["images_per_second"] > 0]
    base = plain[0]["images_per_second"] if plain else None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, group in zip(axes, ("overall", "few"), strict=True):
        for r in records:
            ips = r["images_per_second"]
            if not ips or math.isnan(ips) or math.isnan(r[f"{group}_mean"]):
                continue
            x = base / ips if base else 1e3 / ips
            half = r[f"{group}_ci95"]
            ax.errorbar(x, 100 * r[f"{group}_mean"],
                        yerr=None if math.isnan(half) else 100 * half, fmt="o", capsize=3)
            ax.annotate(r["label"], (x, 100 * r[f"{group}_mean"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=7)
        ax.set_xlabel("training time per image, x the plain run's" if base
                      else "training time per image (ms)")
        ax.set_ylabel(f"{group}{'-shot' if group == 'few' else ''} test accuracy (%)")
    fig.suptitle("accuracy against training cost (mean and 95% interval over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_per_class(rows: list[Row], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        acc = [statistics.fmean(v) for v in zip(*row.per_class, strict=True)]
        order = sorted(range(len(row.counts)), key=lambda i: row.counts[i])
        ax.plot([row.counts[i] for i in order], [100 * acc[i] for i in order], marker="o",
                label=row.label, alpha=0.8)
    log_count_axis(ax, [c for row in rows for c in row.counts])
    ax.set_xlabel("training images of the class")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_curves(rows: list[Row], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        by_epoch: dict[int, list[float]] = defaultdict(list)
        for curve in row.curves:
            for epoch, value in curve:
                by_epoch[epoch].append(value)
        epochs = sorted(by_epoch)
        ax.plot(epochs, [100 * statistics.fmean(by_epoch[e]) for e in epochs], marker=".",
                label=row.label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("overall test accuracy (%), mean over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
