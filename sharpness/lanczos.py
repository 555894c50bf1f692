"""Extreme eigenvalues and the spectral density of the Hessian, by Lanczos with full reorthogonalisation.

Both routines run :class:`~sharpness.krylov.Lanczos` (one HVP per step, every new vector orthogonalised
against the whole basis, tridiagonal eigenproblem in float64 on the CPU) on a Hessian or any symmetric
operator.

Limitation of any single-vector Krylov method: of an eigenvalue of multiplicity ``r > 1`` it finds one copy
until the Krylov space is exhausted (then it restarts on a fresh random vector orthogonal to the basis).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from torch import Tensor, nn

from .functional import Batch, FunctionalLoss, SharpnessInputError, seeded
from .krylov import Lanczos
from .operators import (
    apply_blocks,
    gaussian,
    rademacher,
    recorded_mode,
    release,
    resolve_operator,
    scipy_view,
)
from .results import Result, jsonable


@dataclass
class EigenResult(Result):
    """Extreme eigenpairs: ``values`` (LA: largest first; SA: most negative first), unit ``vectors`` (d, k),
    ``residuals`` ``||H v - lambda v||`` (``residual_kind`` says how they were obtained), ``n_hvp`` products
    spent, ``n_iter`` the Krylov dimension (lanczos) and ``ritz_bounds`` the Krylov-relation bounds at the
    stop.
    ``to_dict()`` leaves out the vectors (only their shape); save them with ``atomic_torch_save``."""

    values: list[float]
    vectors: Tensor | None
    residuals: list[float]
    n_hvp: int
    converged: bool
    which: str
    backend: str
    n_iter: int = 0
    ritz_bounds: list[float] = field(default_factory=list)
    residual_kind: str = "true"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without the (d, k) eigenvectors: only their shape."""
        out = {f.name: jsonable(getattr(self, f.name)) for f in fields(self) if f.name != "vectors"}
        out["vectors_shape"] = None if self.vectors is None else list(self.vectors.shape)
        return out


def _select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    order = np.argsort(-theta if which == "LA" else theta, kind="stable")
    return order[:k]


def _lanczos_top(op: Any, k: int, tol: float, which: str, max_iter: int, gen: torch.Generator) -> tuple:
    lz = Lanczos(gaussian(gen, op.num_params, op.dtype, op.device), max_iter, generator=gen)
    eps = torch.finfo(op.dtype).eps
    while True:
        lz.absorb(op.matvec(lz.current))
        if lz.m >= k:
            theta, S, bounds = lz.ritz()
            idx = _select(theta, k, which)
            floor = 10 * eps * np.abs(theta).max()
            converged = bool(np.all(bounds[idx] <= np.maximum(tol * np.abs(theta[idx]), floor)))
            if converged and lz.block_start > 0 and not lz.done:
                # a new block explores the rest of the space: its own extreme Ritz value must settle too
                converged = lz.block_start < lz.m
                if converged:
                    tb, _, bb = lz.ritz(start=lz.block_start)
                    e = int(np.argmax(tb) if which == "LA" else np.argmin(tb))
                    converged = bool(bb[e] <= max(tol * abs(tb[e]), floor))
            if converged or lz.done:
                return theta[idx], lz.vectors(S[:, idx]), bounds[idx], converged, lz.m
        elif lz.done:  # only when max_iter < k, which the caller refuses
            raise SharpnessInputError("Lanczos stopped before k Ritz values existed")


def _scipy_top(op: Any, k: int, tol: float, which: str, max_iter: int | None, gen: torch.Generator) -> tuple:
    d = op.num_params
    if k >= d - 1:
        raise SharpnessInputError(f"backend='scipy' (ARPACK) needs k < num_params - 1 = {d - 1}, got k={k}")
    v0 = gaussian(gen, d, torch.float64, torch.device("cpu")).numpy()
    try:
        vals, vecs = eigsh(scipy_view(op), k=k, which=which, tol=tol, v0=v0, maxiter=max_iter)
        converged = True
    except ArpackNoConvergence as exc:
        vals, vecs, converged = exc.eigenvalues, exc.eigenvectors, False
    order = np.argsort(-vals if which == "LA" else vals, kind="stable")
    Y = torch.as_tensor(vecs[:, order], dtype=op.dtype, device=op.device)
    return vals[order], Y, np.full(len(order), np.nan), converged, 0


@seeded
def top_eigenvalues(
    model: nn.Module | FunctionalLoss | Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    data: Batch | Iterable[Batch] | None = None,
    *,
    k: int = 5,
    tol: float = 1e-4,
    which: str = "LA",
    backend: str = "lanczos",
    max_iter: int | None = None,
    seed: int = 0,
    true_residuals: bool = True,
    params: Sequence[str] | str | None = None,
    device: str | torch.device | None = None,
    train_mode: bool = False,
) -> EigenResult:
    """The ``k`` largest (``which="LA"``) or most negative (``"SA"``) eigenpairs of the Hessian (or operator).

    ``backend="lanczos"``: one Lanczos run with full reorthogonalisation from a seeded Gaussian start, growing
    the Krylov space one HVP at a time and checking after every step; it stops when every wanted Ritz pair has
    ``|beta_m s_{m,i}| <= max(tol |theta_i|, 10 eps max|theta|)`` (the Krylov-relation residual; the absolute
    floor at the HVP's rounding level lets zero eigenvalues converge), or at ``max_iter`` steps
    (default ``min(d, max(100, 20k))``), or when the space is exhausted. Cost: ``n_iter`` HVPs, memory
    ``n_iter + 1`` vectors. ``backend="scipy"``: ARPACK ``eigsh`` on ``HessianOperator.to_scipy()`` with
    ``tol``, ``maxiter=max_iter`` (restarts); its HVPs are counted as they happen.

    ``residuals``: with ``true_residuals`` (default, and always for scipy) ``||H v_i - lambda_i v_i||``
    recomputed with ``k`` extra HVPs (counted in ``n_hvp``); otherwise the Krylov-relation bounds
    ``|beta_m s_{m,i}|``.
    """
    if which not in ("LA", "SA"):
        raise SharpnessInputError(f"which must be 'LA' or 'SA', not {which!r}")
    if backend not in ("lanczos", "scipy"):
        raise SharpnessInputError(f"backend must be 'lanczos' or 'scipy', not {backend!r}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise SharpnessInputError(f"k must be a positive integer, got {k!r}")
    if not tol > 0:
        raise SharpnessInputError(f"tol must be positive, got {tol!r}")
    op, created = resolve_operator(model, loss_fn, data, params=params, train_mode=train_mode, device=device)
    d = op.num_params
    if k > d:
        raise SharpnessInputError(f"k={k} eigenvalues requested but the operator has only {d} parameters")
    if backend == "lanczos":
        max_iter = min(d, max(100, 20 * k)) if max_iter is None else int(max_iter)
        if max_iter < k:
            raise SharpnessInputError(f"max_iter={max_iter} must be at least k={k}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    start = op.hvp_count
    try:
        run = _lanczos_top if backend == "lanczos" else _scipy_top
        values, Y, bounds, converged, n_iter = run(op, int(k), float(tol), which, max_iter, gen)
        kind = "krylov"
        residuals = [float(b) for b in bounds]
        if true_residuals or backend == "scipy":
            lam = torch.as_tensor(values, dtype=Y.dtype, device=Y.device)
            R = apply_blocks(op, Y, Y.shape[1]) - Y * lam
            residuals = R.double().norm(dim=0).cpu().tolist()
            kind = "true"
    finally:
        release(op, created)
    settings = dict(
        k=int(k), tol=float(tol), which=which, backend=backend, max_iter=max_iter,
        true_residuals=true_residuals, params=params, train_mode=recorded_mode(model, train_mode),
        device=None if device is None else str(device),
    )  # fmt: skip
    return EigenResult(
        values=[float(v) for v in values],
        vectors=Y,
        residuals=residuals,
        n_hvp=op.hvp_count - start,
        converged=converged,
        which=which,
        backend=backend,
        n_iter=n_iter,
        ritz_bounds=[float(b) for b in bounds],
        residual_kind=kind,
        settings=settings,
        seed=int(seed),
        device=str(op.device),
    )


@dataclass
class DensityResult(Result):
    """Smoothed spectral density ``density`` on ``grid``; the quadrature ``nodes`` (Ritz values of all runs,
    concatenated) and ``weights`` (squared first eigenvector components / n_vectors, summing to 1)."""

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    n_hvp: int
    sigma: float = 0.0
    n_steps_used: list[int] = field(default_factory=list)


@seeded
def spectral_density(
    model: nn.Module | FunctionalLoss | Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    data: Batch | Iterable[Batch] | None = None,
    *,
    n_vectors: int = 10,
    n_steps: int = 80,
    grid: np.ndarray | Sequence[float] | None = None,
    n_grid: int = 1000,
    sigma: float | None = None,
    batch: int = 1,
    seed: int = 0,
    params: Sequence[str] | str | None = None,
    device: str | torch.device | None = None,
    train_mode: bool = False,
) -> DensityResult:
    """Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani, Krishnan & Xiao 2019).

    For each of ``n_vectors`` normalised Rademacher starts ``v``, ``min(n_steps, d)`` Lanczos steps give
    ``T = S diag(theta) S^T``; ``v^T f(H) v ~ sum_j tau_j f(theta_j)`` with ``tau_j = S[0, j]^2`` (exact for
    polynomials of degree < 2m). The density is
    ``phi(t) = (1/n_vectors) sum_v sum_j tau_j N(t; theta_j, sigma^2)``, with default
    ``sigma = 0.01 (max theta - min theta)`` and default grid ``n_grid`` points on
    ``[min theta - 5 sigma, max theta + 5 sigma]``, so it integrates to ~1 there. A run that breaks down stops
    early (its quadrature is then exact). ``batch`` runs advance together through one ``matmat``.
    Cost: ``n_vectors * min(n_steps, d)`` HVPs; memory ``batch * (n_steps + 1)`` vectors.
    """
    for name, val in (("n_vectors", n_vectors), ("n_steps", n_steps), ("n_grid", n_grid), ("batch", batch)):
        if not isinstance(val, (int, np.integer)) or val < 1:
            raise SharpnessInputError(f"{name} must be a positive integer, got {val!r}")
    if sigma is not None and not sigma > 0:
        raise SharpnessInputError(f"sigma must be positive, got {sigma!r}")
    op, created = resolve_operator(model, loss_fn, data, params=params, train_mode=train_mode, device=device)
    d = op.num_params
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    start = op.hvp_count
    nodes, weights, used = [], [], []
    try:
        for first in range(0, n_vectors, batch):
            runs = [
                Lanczos(rademacher(gen, d, 1, op.dtype, op.device).reshape(-1), n_steps)
                for _ in range(min(batch, n_vectors - first))
            ]
            while active := [r for r in runs if not r.done]:
                W = op.matmat(torch.stack([r.current for r in active], 1))
                for i, r in enumerate(active):
                    r.absorb(W[:, i])
            for r in runs:
                theta, S, _ = r.ritz()
                nodes.append(theta)
                weights.append(S[0, :] ** 2 / n_vectors)
                used.append(r.m)
            del runs
    finally:
        release(op, created)
    theta, tau = np.concatenate(nodes), np.concatenate(weights)
    if sigma is None:
        spread = float(theta.max() - theta.min())
        sigma = 0.01 * spread if spread > 0 else 1e-3 * max(float(np.abs(theta).max()), 1.0)
    if grid is None:
        grid = np.linspace(theta.min() - 5 * sigma, theta.max() + 5 * sigma, int(n_grid))
    grid = np.asarray(grid, dtype=np.float64).reshape(-1)
    density = np.zeros_like(grid)
    for i in range(0, theta.size, 256):  # bounded memory: grid x 256 nodes at a time
        z = (grid[:, None] - theta[None, i : i + 256]) / sigma
        density += np.exp(-0.5 * z**2) @ tau[i : i + 256]
    density /= sigma * np.sqrt(2 * np.pi)
    settings = dict(
        n_vectors=int(n_vectors), n_steps=int(n_steps), n_grid=int(grid.size), sigma=float(sigma),
        batch=int(batch), params=params, train_mode=recorded_mode(model, train_mode),
        device=None if device is None else str(device),
    )  # fmt: skip
    return DensityResult(
        grid=grid,
        density=density,
        nodes=theta,
        weights=tau,
        n_hvp=op.hvp_count - start,
        sigma=float(sigma),
        n_steps_used=used,
        settings=settings,
        seed=int(seed),
        device=str(op.device),
    )
