"""`samkit sharpness`: the diagnostics of `samkit.analysis` on a run's model and its own data.

The analysis batch is drawn from the run's long-tailed training set (the same split, normalisation
and loss), at most `per_class` images of each class, so that every class, tail included, is present.
A set streamed from its files (a file list) has those images decoded through the run's evaluation
transform (resize, centre crop to data.image_size), deterministic where the training crops are
random. Results go to RUN_DIR/sharpness/sharpness.json with plots beside it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samkit.analysis.estimators import extreme_eigenvalues, spectral_density
from samkit.analysis.hvp import HessianOperator
from samkit.analysis.landscape import slice_1d, slice_2d
from samkit.analysis.plots import (
    plot_sharpness_vs_count,
    plot_slice_1d,
    plot_slice_2d,
    plot_spectrum,
)
from samkit.analysis.sharpness import (
    class_sharpness,
    group_sharpness,
    head_tail_groups,
    normalized_trace,
    saddle_indicators,
    shot_class_groups,
)
from samkit.data import FileList, StreamingDataset, normalize
from samkit.losses import build_loss
from samkit.train.checkpoint import load_checkpoint, write_json
from samkit.train.config import load_config
from samkit.train.loop import make_model, prepare_data

QUANTITIES = ("trace", "eigen", "density", "classwise", "groups", "saddle", "landscape")


def _analysis_batch(data: Any, per_class: int, device: torch.device,
                    image_size: int) -> tuple[torch.Tensor, ...]:
    """Up to `per_class` training images of every class (file order), normalised like training;
    a streamed set's images (`image_size` square) decoded through its evaluation transform."""
    labels = data.train.labels
    picks = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(len(data.counts))]
    index = torch.cat(picks)
    if isinstance(data.train, FileList):
        decode = StreamingDataset(data.train, image_size, train=False)
        x = torch.stack([decode[int(i)][0] for i in index]).to(device)
    else:
        x = data.train.images[index].to(device)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if data.mean is not None:
        x = normalize(x, torch.tensor(data.mean, device=device),
                      torch.tensor(data.std, device=device))
    return x, labels[index].to(device)


def analyse_run(run_dir: str | Path, *, what: tuple[str, ...] = QUANTITIES,
                checkpoint: str = "last", per_class: int = 64, rho: float = 0.05,
                eta: int | None = None, hvps: int = 60, seed: int = 0,
                out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Compute the chosen quantities on a run's model; write sharpness.json and plots into `out`
    (default RUN_DIR/sharpness) and return the results.

    `eta` sets the head/tail split for the saddle indicators and group sharpness (default: the
    few-shot threshold of the run, so tail = the few-shot classes).
    """
    unknown = sorted(set(what) - set(QUANTITIES))
    if unknown:
        raise ValueError(f"unknown quantity {unknown[0]}; choose from {', '.join(QUANTITIES)}")
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    ckpt_path = run_dir / ("best.pt" if checkpoint == "best" else "checkpoint.pt")
    if not ckpt_path.exists():
        raise FileNotFoundError(f"{ckpt_path} does not exist; train the run first")
    config = load_config(run_dir / "config.yaml")
    device = torch.device("cpu")
    data = prepare_data(config, progress=False)
    model = make_model(config, len(data.counts), data.in_channels)
    model.load_state_dict(load_checkpoint(ckpt_path)["model"])
    model.to(device).eval()
    loss_fn = build_loss(config.loss.name, class_counts=data.counts, **config.loss.kwargs)
    loss_fn.set_epoch(config.schedule.epochs)
    batch = _analysis_batch(data, per_class, device, config.data.image_size)
    out = Path(out) if out is not None else run_dir / "sharpness"
    out.mkdir(parents=True, exist_ok=True)
    bar = True if progress else None
    few = data.thresholds[1]
    split = head_tail_groups(data.counts, eta if eta is not None else few)
    results: dict[str, Any] = {
        "run": str(run_dir), "checkpoint": str(ckpt_path), "samples": int(batch[1].numel()),
        "per_class": per_class, "rho": rho, "seed": seed, "counts": data.counts,
        "head_tail": split, "eta": eta if eta is not None else few,
    }
    timings: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        start = time.perf_counter()
        value = fn()
        timings[name] = time.perf_counter() - start
        return value

    eigen = density = None
    if "trace" in what:
        nt = timed("trace", lambda: normalized_trace(model, loss_fn, batch, method="hutch++",
                                                     num_hvps=hvps, generator=seed, progress=bar))
        results["trace"] = nt.trace.to_dict() | {"samples": None}
        results["normalized_trace"] = {k: v for k, v in nt.to_dict().items() if k != "trace"}
    if "eigen" in what or "density" in what:
        op = HessianOperator(model, loss_fn, batch)
        if "eigen" in what:
            eigen = timed("eigen", lambda: extreme_eigenvalues(op, k=3, generator=seed,
                                                               progress=bar))
            results["eigen"] = eigen.to_dict()
        if "density" in what:
            density = timed("density", lambda: spectral_density(op, num_probes=4, num_steps=40,
                                                                 generator=seed, progress=bar))
            results["density"] = density.to_dict()
        op.release()
    if density is not None:
        plot_spectrum(density, out / "spectrum.png", eigen=eigen, title=run_dir.name)
    if "classwise" in what:
        cls = timed("classwise", lambda: class_sharpness(
            model, loss_fn, batch, num_classes=len(data.counts), rho=rho, progress=bar))
        results["classwise"] = cls.to_dict()
        plot_sharpness_vs_count(cls, data.counts, out / "class_sharpness.png",
                                labels=data.train.classes or None,
                                title=f"{run_dir.name}: class-wise sharpness, rho {rho}")
    if "groups" in what:
        groups = {**shot_class_groups(data.counts, *data.thresholds), **split}
        groups = {k: v for k, v in groups.items() if v}
        results["groups"] = timed("groups", lambda: group_sharpness(
            model, loss_fn, batch, groups, rho=rho, progress=bar)).to_dict()
    if "saddle" in what:
        saddles = timed("saddle", lambda: saddle_indicators(
            model, loss_fn, batch, {k: v for k, v in split.items() if v}, generator=seed,
            progress=bar))
        results["saddle"] = {k: _plain(dataclasses.asdict(v)) for k, v in saddles.items()}
    if "landscape" in what:
        one = timed("landscape_1d", lambda: slice_1d(model, loss_fn, batch, generator=seed,
                                                     progress=bar))
        two = timed("landscape_2d", lambda: slice_2d(model, loss_fn, batch, generator=seed,
                                                     progress=bar))
        results["landscape_1d"] = one.to_dict()
        results["landscape_2d"] = two.to_dict()
        plot_slice_1d(one, out / "landscape_1d.png", title=run_dir.name)
        plot_slice_2d(two, out / "landscape_2d.png", title=run_dir.name)
    results["seconds"] = timings
    write_json(out / "sharpness.json", _plain(results))
    return results


def _plain(value: Any) -> Any:
    """JSON-ready: arrays to lists, non-finite floats to None."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return _plain(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
