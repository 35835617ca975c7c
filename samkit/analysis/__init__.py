"""Sharpness and curvature diagnostics: Hessian-vector products, trace, eigenvalues, spectral
density, class-wise sharpness, normalised trace, saddle indicators, loss-landscape slices, plots.

Everything here leaves the analysed model exactly as it was (train/eval flags, buffers, parameter
values and ``.grad``): evaluations go through :func:`torch.func.functional_call` and never write into
the model. Estimators take a seeded :class:`torch.Generator` (or an int seed) and report the number of
Hessian-vector products they spent and an error estimate.

Typical use::

    from samkit.analysis import HessianOperator, hutchpp_trace, extreme_eigenvalues

    op = HessianOperator(model, loss_fn, (x, y))          # per-sample loss_fn(logits, y) -> (B,)
    tr = hutchpp_trace(op, num_hvps=60, generator=0)      # tr.estimate +- tr.stderr
    eig = extreme_eigenvalues(op, k=1, generator=0)       # eig.top[0], eig.bottom[0], residuals
"""

from samkit.analysis.estimators import (
    DensityEstimate,
    EigenEstimate,
    LanczosRun,
    ProgressArg,
    TraceEstimate,
    extreme_eigenvalues,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    make_generator,
    spectral_density,
)
from samkit.analysis.hvp import (
    HessianOperator,
    LinearOperator,
    MatrixOperator,
    analysis_mode,
    class_weights,
    dense_hessian,
    hvp,
)
from samkit.analysis.landscape import (
    Slice1D,
    Slice2D,
    filter_normalized_direction,
    interpolation_slice,
    slice_1d,
    slice_2d,
)
from samkit.analysis.plots import (
    plot_sharpness_vs_count,
    plot_slice_1d,
    plot_slice_2d,
    plot_spectrum,
)
from samkit.analysis.sharpness import (
    NormalizedTrace,
    SaddleIndicators,
    SharpnessResult,
    class_groups,
    class_sharpness,
    group_sharpness,
    head_tail_groups,
    normalized_trace,
    saddle_indicators,
    shot_class_groups,
)

__all__ = [
    "DensityEstimate",
    "EigenEstimate",
    "HessianOperator",
    "LanczosRun",
    "LinearOperator",
    "MatrixOperator",
    "NormalizedTrace",
    "ProgressArg",
    "SaddleIndicators",
    "SharpnessResult",
    "Slice1D",
    "Slice2D",
    "TraceEstimate",
    "analysis_mode",
    "class_groups",
    "class_sharpness",
    "class_weights",
    "dense_hessian",
    "extreme_eigenvalues",
    "filter_normalized_direction",
    "group_sharpness",
    "head_tail_groups",
    "hutchinson_trace",
    "hutchpp_trace",
    "hvp",
    "interpolation_slice",
    "lanczos",
    "make_generator",
    "normalized_trace",
    "plot_sharpness_vs_count",
    "plot_slice_1d",
    "plot_slice_2d",
    "plot_spectrum",
    "saddle_indicators",
    "shot_class_groups",
    "slice_1d",
    "slice_2d",
    "spectral_density",
]
