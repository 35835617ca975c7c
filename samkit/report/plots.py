"""Plots of a run directory: per-class accuracy against training count, and training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from samkit.report.axes import log_count_axis  # noqa: E402
from samkit.train.records import read_json, read_metrics  # noqa: E402

GROUP_COLOURS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}


def plot_per_class(run_dir: str | Path, out: str | Path) -> None:
    """Per-class test accuracy (last epoch) against the class's training count, log scale, each
    class labelled by name; groups with no class are left out of the legend."""
    summary = read_json(Path(run_dir) / "summary.json")
    counts, acc, groups = summary["counts"], summary["per_class"], summary["groups"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for group, colour in GROUP_COLOURS.items():
        xs = [c for c, g in zip(counts, groups, strict=True) if g == group]
        ys = [a for a, g in zip(acc, groups, strict=True) if g == group]
        if xs:
            ax.scatter(xs, ys, color=colour, label=f"{group} ({len(xs)})")
    for i, (name, c, a) in enumerate(zip(summary.get("classes") or [], counts, acc,
                                         strict=False)):
        if a is not None:  # labels of neighbouring classes alternate above and below
            ax.annotate(name, (c, a), textcoords="offset points", xytext=(4, 5 - 14 * (i % 2)),
                        fontsize=7)
    log_count_axis(ax, counts)
    ax.set_xlabel("training images of the class")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{Path(run_dir).name} ({summary['method']}): overall "
                 f"{summary['last']['overall']:.3f}, last epoch")
    ax.legend(title="classes per group", fontsize=8)
    _save(fig, out)


def plot_curves(run_dir: str | Path, out: str | Path) -> None:
    """Training loss and test (and validation) accuracy (overall, many, medium, few) per epoch,
    from 1."""
    records = read_metrics(run_dir)
    summary_path = Path(run_dir) / "summary.json"
    method = read_json(summary_path)["method"] if summary_path.exists() else None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([r["epoch"] for r in records], [r["train_loss"] for r in records], marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    evals = [r for r in records if "overall" in r or "val_overall" in r]
    for key, colour in [("overall", "black"), *GROUP_COLOURS.items()]:
        for name, style in ((key, "-"), (f"val_{key}", ":")):  # validation dotted
            pts = [(r["epoch"], r[name]) for r in evals if r.get(name) is not None]
            if pts:
                ax2.plot(*zip(*pts, strict=True), style, marker="o", color=colour, label=name)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test (solid) and validation (dotted) accuracy")
    if evals:
        ax2.legend()
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(Path(run_dir).name + (f" ({method})" if method else ""))
    _save(fig, out)


def _save(fig: plt.Figure, out: str | Path) -> None:
    """Write the figure with nothing clipped (tight layout and bounding box) and close it."""
    fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the run's plots into run_dir/plots and return their paths."""
    plots = Path(run_dir) / "plots"
    plots.mkdir(exist_ok=True)
    paths = [plots / "per_class.png", plots / "curves.png"]
    if read_json(Path(run_dir) / "summary.json").get("per_class") is None:
        paths = paths[1:]  # run.eval_test=false: no test accuracy per class
    else:
        plot_per_class(run_dir, paths[0])
    plot_curves(run_dir, paths[-1])
    return paths
