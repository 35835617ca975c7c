"""PNG plots of the diagnostics: spectrum, sharpness against class size, 1D and 2D loss slices.

Figures are drawn on matplotlib's Agg canvas directly (:class:`matplotlib.figure.Figure` with
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`), so importing or calling these functions
never changes the global pyplot backend and works without a display. Every function writes one PNG and
returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from samkit.analysis.estimators import DensityEstimate, EigenEstimate
from samkit.analysis.landscape import Slice1D, Slice2D
from samkit.analysis.sharpness import SharpnessResult
from samkit.report.axes import log_count_axis

__all__ = ["plot_sharpness_vs_count", "plot_slice_1d", "plot_slice_2d", "plot_spectrum"]

PathLike = str | Path


def _save(fig: Figure, path: PathLike, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")  # nothing clipped
    return path


def plot_spectrum(
    density: DensityEstimate,
    path: PathLike,
    *,
    eigen: EigenEstimate | None = None,
    log: bool = True,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """The SLQ density (log scale by default, as in Ghorbani et al. 2019), with the largest and the
    most negative eigenvalues of ``eigen`` (if given) marked by vertical lines."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    values = np.maximum(density.density, 1e-12) if log else density.density
    ax.plot(density.grid, values, color="black", lw=1.2, label="SLQ density")
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(1e-8, float(values.min())))
    if eigen is not None:
        for i, lam in enumerate(eigen.top):
            ax.axvline(lam, color="tab:red", ls="--", lw=1, label="largest" if i == 0 else None)
        for i, lam in enumerate(eigen.bottom):
            ax.axvline(lam, color="tab:blue", ls="--", lw=1, label="smallest" if i == 0 else None)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(
        title
        or f"Hessian spectrum: {len(density.nodes)} probes, {density.num_hvps} HVPs, "
        f"trace {density.trace:.4g}"
    )
    ax.legend(fontsize=8)
    return _save(fig, path, dpi)


def plot_sharpness_vs_count(
    result: SharpnessResult,
    train_counts: Sequence[int] | np.ndarray,
    path: PathLike,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Per-class sharpness (one-step and multi-step) against the class's training count (log x),
    each class labelled by ``labels`` (its name; default the result's group names)."""
    counts = np.asarray(train_counts, dtype=float)
    if counts.size != len(result.names):
        raise ValueError(
            f"{counts.size} training counts for {len(result.names)} classes in the result"
        )
    labels = list(result.names if labels is None else labels)
    if len(labels) != counts.size:
        raise ValueError(f"{len(labels)} labels for {counts.size} classes; give one per class")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.scatter(counts, result.multi_step, color="tab:red", label=f"{result.steps}-step ascent")
    ax.scatter(counts, result.one_step, color="tab:blue", marker="x", label="one step (SAM)")
    for i, (name, c, s) in enumerate(zip(labels, counts, result.multi_step, strict=True)):
        if np.isfinite(s):  # labels of neighbouring classes alternate above and below
            ax.annotate(name, (c, s), textcoords="offset points", xytext=(3, 4 - 13 * (i % 2)),
                        fontsize=7)
    log_count_axis(ax, counts)
    ax.set_xlabel("training images of the class")
    ax.set_ylabel(f"sharpness (rho = {result.rho:g}, {result.normalize}-normalised)")
    ax.set_title(title or "class-wise sharpness")
    ax.legend(fontsize=8)
    return _save(fig, path, dpi)


def plot_slice_1d(
    result: Slice1D,
    path: PathLike,
    *,
    accuracy: bool = True,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """The loss along a 1D slice, with the accuracy on a second axis (if available)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(result.coords, result.loss, color="tab:blue", marker="o", ms=3, label="loss")
    ax.set_xlabel("t (0 = start, 1 = end)" if result.kind == "interpolation" else "step along d")
    ax.set_ylabel("loss", color="tab:blue")
    if accuracy and np.isfinite(result.accuracy).any():
        ax2 = ax.twinx()
        ax2.plot(result.coords, result.accuracy, color="tab:orange", marker="s", ms=3)
        ax2.set_ylabel("accuracy", color="tab:orange")
        ax2.set_ylim(-0.02, 1.02)
    ax.set_title(title or ("interpolation" if result.kind == "interpolation" else "1D loss slice"))
    return _save(fig, path, dpi)


def plot_slice_2d(
    result: Slice2D,
    path: PathLike,
    *,
    levels: int = 20,
    log: bool = False,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Contours of the loss on a 2D slice (``log``: of its logarithm), the centre marked."""
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    z = np.log(np.maximum(result.loss, 1e-12)) if log else result.loss
    a, b = np.meshgrid(result.alphas, result.betas, indexing="ij")
    filled = ax.contourf(a, b, z, levels=levels, cmap="viridis")
    ax.contour(a, b, z, levels=levels, colors="white", linewidths=0.4)
    fig.colorbar(filled, ax=ax, label="log loss" if log else "loss")
    ax.plot([0], [0], marker="*", color="red", ms=10)
    ax.set_xlabel("d1")
    ax.set_ylabel("d2")
    ax.set_title(title or "2D loss slice")
    return _save(fig, path, dpi)
