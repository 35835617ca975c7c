"""Matrix-free estimators of Hessian spectra: trace, extreme eigenvalues, spectral density.

Every estimator works on a :class:`~samkit.analysis.hvp.LinearOperator` (a symmetric map on flat
vectors that counts its products, e.g. :class:`~samkit.analysis.hvp.HessianOperator`), draws its random
vectors from a seeded :class:`torch.Generator` (same seed, same result), and returns a small dataclass
holding the estimate, its uncertainty, the number of Hessian-vector products (HVPs) spent, and the raw
samples where they are useful.

* :func:`hutchinson_trace`: Hutchinson's estimator (Hutchinson 1990) ``tr(H) ~ mean_i z_i^T H z_i`` with
  Rademacher probes ``z_i``, stopping adaptively on its own relative standard error.
* :func:`hutchpp_trace`: Hutch++ (Meyer, Musco, Musco, Woodruff, SOSA 2021): the trace of ``H`` on a
  sketched dominant subspace exactly, plus Hutchinson on the deflated rest; error ``O(1/m)`` instead of
  ``O(1/sqrt(m))`` in the budget ``m`` when the spectrum has a few large eigenvalues (as Hessians of
  trained networks do).
* :func:`extreme_eigenvalues`: Lanczos (Lanczos 1950) with full reorthogonalisation, for the largest and
  the smallest (most negative) eigenvalues, with Ritz residuals as the error estimate.
* :func:`spectral_density`: stochastic Lanczos quadrature (SLQ; Golub & Welsch 1969 for the Gauss
  quadrature from the Lanczos tridiagonal matrix, Lin, Saad & Yang 2016, and Ghorbani, Krishnan & Xiao,
  ICML 2019, for Hessians of networks): nodes and weights per probe and a Gaussian-broadened density.

The estimators read scalars back to the host between products (``.item()``), which is the natural
synchronisation point of an adaptive method and costs nothing next to an HVP.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from samkit.analysis.hvp import LinearOperator

__all__ = [
    "DensityEstimate",
    "EigenEstimate",
    "LanczosRun",
    "ProgressArg",
    "TraceEstimate",
    "extreme_eigenvalues",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "make_generator",
    "spectral_density",
]

#: Progress reporting: None/False (silent, the library default), True (a tqdm bar), or a callback
#: ``progress(hvps_done, hvps_max)`` called after every product.
ProgressArg = bool | Callable[[int, int], None] | None


class _Progress:
    def __init__(self, progress: ProgressArg, total: int, desc: str) -> None:
        self.callback: Callable[[int, int], None] | None = None
        self.bar: Any = None
        self.total = total
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="hvp", leave=False)
        elif callable(progress):
            self.callback = progress
        self.done = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def make_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A ``torch.Generator``: the one given, or a CPU generator seeded with the int (None means 0)."""
    if isinstance(generator, torch.Generator):
        return generator
    seed = 0 if generator is None else int(generator)
    return torch.Generator().manual_seed(seed)


def _rademacher(op: LinearOperator, gen: torch.Generator, k: int | None = None) -> Tensor:
    """Random signs, shape (dim,) or (k, dim), drawn on the generator's device, then moved."""
    shape = (op.dim,) if k is None else (k, op.dim)
    z = torch.randint(0, 2, shape, generator=gen, device=gen.device, dtype=torch.int8)
    return (z.to(device=op.device, dtype=op.dtype) * 2 - 1).contiguous()


def _gaussian(op: LinearOperator, gen: torch.Generator) -> Tensor:
    z = torch.randn(op.dim, generator=gen, device=gen.device, dtype=torch.float64)
    return z.to(device=op.device, dtype=op.dtype)


def _check_positive_int(name: str, value: int, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------------
# Trace


@dataclass
class TraceEstimate:
    """A trace estimate.

    Attributes:
        estimate: the estimated trace.
        stderr: its standard error: the sample standard deviation of the Hutchinson samples over the
            square root of their number (for Hutch++, of the samples on the deflated operator; the
            low-rank part is exact given the sketch).
        num_hvps: Hessian-vector products spent.
        samples: the Hutchinson samples ``z^T H z`` (for Hutch++: of the deflated operator).
        method: ``"hutchinson"`` or ``"hutch++"``.
        converged: Hutchinson: the relative standard error reached ``rtol`` before ``max_probes``.
        low_rank: Hutch++ only: ``tr(Q^T H Q)``, the exact part on the sketched subspace.
    """

    estimate: float
    stderr: float
    num_hvps: int
    samples: np.ndarray
    method: str
    converged: bool = True
    low_rank: float = 0.0

    @property
    def relative_stderr(self) -> float:
        return self.stderr / abs(self.estimate) if self.estimate != 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimate": self.estimate,
            "stderr": self.stderr,
            "num_hvps": self.num_hvps,
            "method": self.method,
            "converged": self.converged,
            "low_rank": self.low_rank,
            "samples": self.samples.tolist(),
        }


def _stderr(samples: np.ndarray) -> float:
    return float(samples.std(ddof=1) / math.sqrt(samples.size)) if samples.size > 1 else math.inf


def hutchinson_trace(
    op: LinearOperator,
    *,
    rtol: float = 1e-2,
    min_probes: int = 10,
    max_probes: int = 100,
    generator: torch.Generator | int | None = None,
    progress: ProgressArg = None,
) -> TraceEstimate:
    """Hutchinson's trace estimator with Rademacher probes (Hutchinson 1990), stopping adaptively.

    ``tr(H) = E[z^T H z]`` for ``z`` with independent random signs; among unit-variance probes the
    Rademacher ones have the smallest variance, ``2 (||H||_F^2 - sum_i H_ii^2)``. Probes are drawn one
    at a time; after at least ``min_probes`` the run stops once ``stderr / |mean| <= rtol`` (or at
    ``max_probes``). ``rtol=0`` with ``min_probes == max_probes`` gives a fixed budget.
    """
    min_probes = _check_positive_int("min_probes", min_probes, 2)
    max_probes = _check_positive_int("max_probes", max_probes, min_probes)
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol!r}")
    gen = make_generator(generator)
    bar = _Progress(progress, max_probes, "hutchinson")
    samples: list[float] = []
    converged = False
    try:
        while len(samples) < max_probes:
            z = _rademacher(op, gen)
            samples.append(float(torch.dot(z, op.matvec(z))))
            bar.update()
            if len(samples) >= min_probes:
                arr = np.asarray(samples)
                mean, se = float(arr.mean()), _stderr(arr)
                if se <= rtol * abs(mean):
                    converged = True
                    break
    finally:
        bar.close()
    arr = np.asarray(samples)
    return TraceEstimate(
        estimate=float(arr.mean()),
        stderr=_stderr(arr),
        num_hvps=len(samples),
        samples=arr,
        method="hutchinson",
        converged=converged,
    )


def hutchpp_trace(
    op: LinearOperator,
    num_hvps: int = 60,
    *,
    generator: torch.Generator | int | None = None,
    progress: ProgressArg = None,
) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021) with a budget of ``num_hvps`` products.

    With ``k = num_hvps // 3`` and ``r = num_hvps - 2k``: sketch ``H S`` with ``k`` Rademacher columns
    (``k`` products), orthonormalise it to ``Q``; ``tr(Q^T H Q)`` exactly (``k`` products); and
    Hutchinson with ``r`` Rademacher probes projected onto the complement,
    ``g' = (I - Q Q^T) g``, for ``tr((I - QQ^T) H (I - QQ^T))`` (``r`` products). The sum is unbiased;
    the error estimate is the standard error of the ``r`` deflated samples (the low-rank part is exact
    given ``Q``). Memory: three ``(k, dim)`` blocks of vectors.
    """
    num_hvps = _check_positive_int("num_hvps", num_hvps, 4)
    k = num_hvps // 3
    r = num_hvps - 2 * k
    gen = make_generator(generator)
    bar = _Progress(progress, num_hvps, "hutch++")
    try:
        s = _rademacher(op, gen, k)
        hs = torch.empty_like(s)
        for i in range(k):
            hs[i] = op.matvec(s[i])
            bar.update()
        q, _ = torch.linalg.qr(hs.T)  # (dim, k), orthonormal columns
        qt = q.T.contiguous()
        low_rank = 0.0
        for i in range(k):
            low_rank += float(torch.dot(qt[i], op.matvec(qt[i])))
            bar.update()
        g = _rademacher(op, gen, r)
        g = g - (g @ q) @ qt
        samples = np.empty(r)
        for i in range(r):
            samples[i] = float(torch.dot(g[i], op.matvec(g[i])))
            bar.update()
    finally:
        bar.close()
    return TraceEstimate(
        estimate=low_rank + float(samples.mean()),
        stderr=_stderr(samples),
        num_hvps=num_hvps,
        samples=samples,
        method="hutch++",
        low_rank=low_rank,
    )


# ----------------------------------------------------------------------------------------------------
# Lanczos


@dataclass
class LanczosRun:
    """A Lanczos decomposition ``H V^T = V^T T + beta_next v_next e_m^T`` (rows of ``basis`` are the
    orthonormal Lanczos vectors).

    Attributes:
        alphas: diagonal of the tridiagonal ``T`` (length m).
        betas: off-diagonal (length m - 1); an exact zero marks a restart after an invariant subspace
            was found (``T`` is then block diagonal and its blocks' Ritz pairs are exact).
        beta_next: the norm of the last, unnormalised residual vector (residual bounds use it).
        basis: ``(m, dim)`` Lanczos vectors, or None if not kept.
        num_hvps: products spent.
        exhausted: the Krylov space (or the whole space) was exhausted before the step budget.
    """

    alphas: np.ndarray
    betas: np.ndarray
    beta_next: float
    basis: Tensor | None
    num_hvps: int
    exhausted: bool
    eps: float = 0.0

    def tridiagonal(self) -> np.ndarray:
        """The dense ``(m, m)`` tridiagonal matrix ``T`` (float64)."""
        m = self.alphas.size
        t = np.diag(self.alphas)
        if m > 1:
            t += np.diag(self.betas, 1) + np.diag(self.betas, -1)
        return t

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), eigenvectors ``Y`` of ``T`` (columns), and the residual estimates
        ``|beta_next * Y[m-1, i]|`` (equal to ``||H u_i - theta_i u_i||`` in exact arithmetic), floored
        at the working precision ``eps * max_i |theta_i|``: below it the bound keeps shrinking while
        the true residual, limited by the rounding of the products, does not."""
        theta, y = np.linalg.eigh(self.tridiagonal())
        floor = self.eps * float(np.abs(theta).max()) if theta.size else 0.0
        return theta, y, np.maximum(np.abs(self.beta_next * y[-1, :]), floor)


class _Lanczos:
    """Incremental Lanczos with full reorthogonalisation (two passes of classical Gram-Schmidt against
    the whole basis after every product, "CGS2"), so the basis stays orthonormal to working precision
    and no spurious copies of converged eigenvalues appear (Paige 1971; Parlett, *The Symmetric
    Eigenvalue Problem*, ch. 13)."""

    def __init__(
        self, op: LinearOperator, max_steps: int, v0: Tensor, gen: torch.Generator, restart: bool
    ) -> None:
        self.op, self.gen, self.restart = op, gen, restart
        self.m = min(max_steps, op.dim)
        # The basis grows by doubling, so a generous step budget that converges early costs no memory.
        self.basis = torch.empty(min(self.m, 16), op.dim, dtype=op.dtype, device=op.device)
        norm = torch.linalg.vector_norm(v0)
        if not float(norm) > 0:
            raise ValueError("the start vector must be nonzero")
        self.basis[0] = v0 / norm
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.beta_next = 0.0
        self.steps = 0
        self.exhausted = False
        self.eps = torch.finfo(op.dtype).eps
        self.scale = 0.0

    def _store(self, j: int, v: Tensor) -> None:
        if j >= self.basis.shape[0]:
            grown = torch.empty(
                min(self.m, 2 * self.basis.shape[0]), self.op.dim, dtype=v.dtype, device=v.device
            )
            grown[:j] = self.basis[:j]
            self.basis = grown
        self.basis[j] = v

    def _orthogonalise(self, w: Tensor, upto: int) -> Tensor:
        v = self.basis[:upto]
        for _ in range(2):
            w = w - (v @ w) @ v
        return w

    def step(self) -> bool:
        """One product; returns False when no further step is possible."""
        if self.exhausted or self.steps >= self.m:
            return False
        j = self.steps
        vj = self.basis[j]
        w = self.op.matvec(vj)
        alpha = float(torch.dot(w, vj))
        w = self._orthogonalise(w, j + 1)
        beta = float(torch.linalg.vector_norm(w))
        self.alphas.append(alpha)
        self.steps = j + 1
        self.scale = max(self.scale, abs(alpha), beta)
        breakdown = beta <= 100 * self.eps * max(self.scale, 1e-300)
        self.beta_next = 0.0 if breakdown else beta
        if self.steps >= self.op.dim:
            self.exhausted = True
            return False
        if self.steps >= self.m:
            return False
        if not breakdown:
            self.betas.append(beta)
            self._store(j + 1, w / beta)
            return True
        if not self.restart:
            self.exhausted = True
            return False
        # Invariant subspace found: continue from a fresh random vector orthogonal to the basis.
        r = self._orthogonalise(_gaussian(self.op, self.gen), j + 1)
        norm = float(torch.linalg.vector_norm(r))
        if norm <= 100 * self.eps * math.sqrt(self.op.dim):
            self.exhausted = True
            return False
        self.betas.append(0.0)
        self._store(j + 1, r / norm)
        return True

    def result(self, keep_basis: bool = True) -> LanczosRun:
        return LanczosRun(
            alphas=np.asarray(self.alphas, dtype=np.float64),
            betas=np.asarray(self.betas[: max(self.steps - 1, 0)], dtype=np.float64),
            beta_next=self.beta_next,
            basis=self.basis[: self.steps] if keep_basis else None,
            num_hvps=self.steps,
            exhausted=self.exhausted,
            eps=float(self.eps),
        )


def lanczos(
    op: LinearOperator,
    num_steps: int,
    *,
    v0: Tensor | None = None,
    generator: torch.Generator | int | None = None,
    restart: bool = True,
    keep_basis: bool = True,
    progress: ProgressArg = None,
) -> LanczosRun:
    """Run ``num_steps`` Lanczos steps (at most ``dim``) with full reorthogonalisation.

    Args:
        op: the symmetric operator.
        num_steps: products (Krylov dimension) to spend.
        v0: start vector (default: Gaussian from ``generator``).
        restart: on an invariant subspace (``beta = 0``), continue from a random vector orthogonal to
            the basis (so repeated eigenvalues are found too); otherwise stop there.
        keep_basis: keep the ``(m, dim)`` basis (needed for Ritz vectors).
    """
    num_steps = _check_positive_int("num_steps", num_steps)
    gen = make_generator(generator)
    start = _gaussian(op, gen) if v0 is None else v0.to(device=op.device, dtype=op.dtype)
    run = _Lanczos(op, num_steps, start, gen, restart)
    bar = _Progress(progress, run.m, "lanczos")
    try:
        while run.step():
            bar.update()
        bar.update(run.steps - bar.done)
    finally:
        bar.close()
    return run.result(keep_basis)


@dataclass
class EigenEstimate:
    """Extreme eigenvalues from Lanczos.

    Attributes:
        top: the ``k`` largest (algebraic) Ritz values, descending.
        top_residuals: their residual norms ``||H u - theta u||`` (the error estimate: for a symmetric
            matrix an eigenvalue lies within the residual of every Ritz value, and within
            ``residual^2 / gap`` once it is separated from the rest by ``gap``), not below the working
            precision ``eps(dtype) * max |theta|``.
        bottom: the ``k`` smallest (most negative) Ritz values, ascending.
        bottom_residuals: their residual norms.
        num_hvps: products spent (including the residual checks of ``exact_residuals``).
        num_steps: Lanczos steps.
        converged: every wanted residual met the tolerance.
        residual_kind: ``"lanczos"`` (the bound ``|beta_m y_mi|``, exact in exact arithmetic with full
            reorthogonalisation) or ``"exact"`` (recomputed with one product per Ritz vector).
        ritz_values: all Ritz values, ascending.
        top_vectors, bottom_vectors: ``(k, dim)`` unit Ritz vectors (rows), if requested.
    """

    top: np.ndarray
    top_residuals: np.ndarray
    bottom: np.ndarray
    bottom_residuals: np.ndarray
    num_hvps: int
    num_steps: int
    converged: bool
    residual_kind: str
    ritz_values: np.ndarray
    top_vectors: Tensor | None = field(default=None, repr=False)
    bottom_vectors: Tensor | None = field(default=None, repr=False)

    @property
    def lambda_max(self) -> float:
        return float(self.top[0])

    @property
    def lambda_min(self) -> float:
        return float(self.bottom[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "top": self.top.tolist(),
            "top_residuals": self.top_residuals.tolist(),
            "bottom": self.bottom.tolist(),
            "bottom_residuals": self.bottom_residuals.tolist(),
            "num_hvps": self.num_hvps,
            "num_steps": self.num_steps,
            "converged": self.converged,
            "residual_kind": self.residual_kind,
        }


WHICH = ("both", "top", "bottom")


def extreme_eigenvalues(
    op: LinearOperator,
    k: int = 1,
    *,
    which: str = "both",
    max_steps: int = 100,
    min_steps: int = 5,
    tol: float = 1e-3,
    atol: float = 0.0,
    generator: torch.Generator | int | None = None,
    return_eigenvectors: bool = False,
    exact_residuals: bool = False,
    progress: ProgressArg = None,
) -> EigenEstimate:
    """The ``k`` largest and ``k`` smallest (most negative) eigenvalues by Lanczos.

    Lanczos with full reorthogonalisation runs from a Gaussian start vector; after each step (from
    ``min_steps`` on) the tridiagonal matrix is diagonalised (numpy, ``O(m^2)``) and the run stops once
    every wanted Ritz value ``theta_i`` (``which``: the top ``k``, the bottom ``k`` or both) has a
    residual ``<= max(tol * |theta_i|, atol)``, or at ``max_steps`` (capped at ``dim``; with
    ``max_steps >= dim`` the result is exact up to rounding). Both ends are always reported, since one
    run gives both; ``which`` only decides what must converge.

    The extreme eigenvalues converge fastest when they are well separated; a dense cluster (the bulk
    near zero of a trained network, where the most negative eigenvalue usually sits) converges slowly,
    which the residuals and ``converged`` show. As with any Krylov method, an eigenvalue whose
    eigenvector is (numerically) orthogonal to the start vector is missed; a random start makes that a
    probability-zero event.
    """
    k = _check_positive_int("k", k)
    max_steps = _check_positive_int("max_steps", max_steps)
    min_steps = _check_positive_int("min_steps", min_steps)
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if not (tol >= 0 and atol >= 0):
        raise ValueError(f"tol and atol must be >= 0, got {tol!r}, {atol!r}")
    gen = make_generator(generator)
    run = _Lanczos(op, max_steps, _gaussian(op, gen), gen, restart=True)
    bar = _Progress(progress, run.m, "lanczos")

    def wanted(theta: np.ndarray) -> np.ndarray:
        n = theta.size
        kk = min(k, n)
        idx = []
        if which in ("both", "bottom"):
            idx += list(range(kk))
        if which in ("both", "top"):
            idx += list(range(n - kk, n))
        return np.unique(np.asarray(idx, dtype=int))

    converged = False
    try:
        while run.step():
            bar.update()
            if run.steps >= min(min_steps, run.m) and run.steps >= k:
                theta, _, res = run.result(keep_basis=False).ritz()
                sel = wanted(theta)
                if np.all(res[sel] <= np.maximum(tol * np.abs(theta[sel]), atol)):
                    converged = True
                    break
        bar.update(run.steps - bar.done)
    finally:
        bar.close()
    lr = run.result(keep_basis=True)
    theta, y, res = lr.ritz()
    n = theta.size
    kk = min(k, n)
    if not converged:
        sel = wanted(theta)
        converged = bool(
            np.all(res[sel] <= np.maximum(tol * np.abs(theta[sel]), atol)) or lr.exhausted
        )
    top_idx = np.arange(n - 1, n - 1 - kk, -1)
    bottom_idx = np.arange(kk)
    hvps = lr.num_hvps
    top_vec = bottom_vec = None
    kind = "lanczos"
    if return_eigenvectors or exact_residuals:
        basis = lr.basis
        assert basis is not None
        y_t = torch.as_tensor(y, dtype=op.dtype, device=op.device)
        top_vec = (y_t[:, torch.as_tensor(top_idx)].T @ basis).contiguous()
        bottom_vec = (y_t[:, torch.as_tensor(bottom_idx)].T @ basis).contiguous()
    if exact_residuals:
        kind = "exact"
        assert top_vec is not None and bottom_vec is not None
        for idx, vecs in ((top_idx, top_vec), (bottom_idx, bottom_vec)):
            for row, i in enumerate(idx):
                u = vecs[row]
                res[i] = float(torch.linalg.vector_norm(op.matvec(u) - theta[i] * u))
                hvps += 1
    return EigenEstimate(
        top=theta[top_idx].copy(),
        top_residuals=res[top_idx].copy(),
        bottom=theta[bottom_idx].copy(),
        bottom_residuals=res[bottom_idx].copy(),
        num_hvps=hvps,
        num_steps=lr.num_hvps,
        converged=converged,
        residual_kind=kind,
        ritz_values=theta,
        top_vectors=top_vec if return_eigenvectors else None,
        bottom_vectors=bottom_vec if return_eigenvectors else None,
    )


# ----------------------------------------------------------------------------------------------------
# Spectral density


def _broaden(
    nodes: list[np.ndarray], weights: list[np.ndarray], grid: np.ndarray, sigma: float
) -> np.ndarray:
    density = np.zeros_like(grid)
    for theta, tau in zip(nodes, weights, strict=True):
        diff = (grid[:, None] - theta[None, :]) / sigma
        density += (np.exp(-0.5 * diff**2) * tau[None, :]).sum(axis=1)
    return density / (len(nodes) * sigma * math.sqrt(2 * math.pi))


@dataclass
class DensityEstimate:
    """A spectral density from stochastic Lanczos quadrature.

    Attributes:
        nodes: per probe, the Gauss quadrature nodes (Ritz values of the probe's tridiagonal matrix).
        weights: per probe, the weights (squared first components of ``T``'s eigenvectors; they sum to
            1 for each probe).
        grid, density: the density ``phi(t) = mean_probes sum_j tau_j N(t; theta_j, sigma^2)`` on a grid
            (it integrates to about 1; multiply by ``dim`` for eigenvalue counts).
        sigma: the Gaussian broadening.
        num_hvps: products spent.
        dim: the operator's dimension.
        trace, trace_stderr: ``dim * mean_probes sum_j tau_j theta_j`` (each probe's first moment is
            ``v^T H v / ||v||^2``, so this is Hutchinson's estimate) and its standard error over probes.
    """

    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    grid: np.ndarray
    density: np.ndarray
    sigma: float
    num_hvps: int
    dim: int
    trace: float
    trace_stderr: float

    def density_on(self, grid: np.ndarray, sigma: float | None = None) -> np.ndarray:
        """The broadened density on another grid (or with another ``sigma``)."""
        return _broaden(
            self.nodes, self.weights, np.asarray(grid, dtype=np.float64), sigma or self.sigma
        )

    def moment(self, order: int) -> float:
        """Estimate of ``tr(H^order) / dim`` (exact for ``order <= 2m - 1`` per probe, up to the
        probe's randomness)."""
        return float(
            np.mean([np.sum(t * th**order) for th, t in zip(self.nodes, self.weights, strict=True)])
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [n.tolist() for n in self.nodes],
            "weights": [w.tolist() for w in self.weights],
            "grid": self.grid.tolist(),
            "density": self.density.tolist(),
            "sigma": self.sigma,
            "num_hvps": self.num_hvps,
            "dim": self.dim,
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
        }


def spectral_density(
    op: LinearOperator,
    num_probes: int = 4,
    num_steps: int = 60,
    *,
    grid_size: int = 1000,
    sigma: float | None = None,
    sigma_rel: float = 0.01,
    generator: torch.Generator | int | None = None,
    progress: ProgressArg = None,
) -> DensityEstimate:
    """Stochastic Lanczos quadrature (SLQ) of the spectral density (Ghorbani et al. 2019).

    For each of ``num_probes`` normalised Rademacher probes ``v``, ``num_steps`` Lanczos steps with full
    reorthogonalisation give ``T``; by Golub-Welsch its eigenvalues ``theta_j`` and the squared first
    components ``tau_j`` of its eigenvectors are the nodes and weights of the Gauss quadrature of the
    measure ``sum_i (v^T q_i)^2 delta(t - lambda_i)``, whose mean over probes is the spectral density
    ``(1/dim) sum_i delta(t - lambda_i)``. A probe stops early (fewer nodes, still exact) if its Krylov
    space is exhausted. The density is broadened by Gaussians of width ``sigma`` (default ``sigma_rel``
    times the spread of the nodes) on ``grid_size`` points covering the nodes with a margin.
    """
    num_probes = _check_positive_int("num_probes", num_probes)
    num_steps = _check_positive_int("num_steps", num_steps)
    grid_size = _check_positive_int("grid_size", grid_size, 2)
    gen = make_generator(generator)
    steps = min(num_steps, op.dim)
    bar = _Progress(progress, num_probes * steps, "slq")
    nodes: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    hvps = 0
    try:
        for _ in range(num_probes):
            run = _Lanczos(op, steps, _rademacher(op, gen), gen, restart=False)
            while run.step():
                bar.update()
            bar.update(hvps + run.steps - bar.done)
            lr = run.result(keep_basis=False)
            hvps += lr.num_hvps
            theta, y = np.linalg.eigh(lr.tridiagonal())
            nodes.append(theta)
            weights.append(y[0, :] ** 2)
    finally:
        bar.close()
    lo = min(float(t.min()) for t in nodes)
    hi = max(float(t.max()) for t in nodes)
    spread = hi - lo if hi > lo else max(abs(hi), 1.0)
    if sigma is None:
        sigma = sigma_rel * spread
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    margin = 0.05 * spread + 3 * sigma
    grid = np.linspace(lo - margin, hi + margin, grid_size)
    first = np.array([np.sum(t * th) for th, t in zip(nodes, weights, strict=True)]) * op.dim
    return DensityEstimate(
        nodes=nodes,
        weights=weights,
        grid=grid,
        density=_broaden(nodes, weights, grid, sigma),
        sigma=float(sigma),
        num_hvps=hvps,
        dim=op.dim,
        trace=float(first.mean()),
        trace_stderr=_stderr(first),
    )
