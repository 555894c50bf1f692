"""SAM losses: average-direction SAM (Gaussian-smoothed loss) and worst-case SAM sharpness.

* ``avg_sam_loss``: ``E_{eps ~ N(0, Sigma)} L(w + eps)`` by Monte Carlo, ``Sigma = sigma^2 I`` or the weight
  diversity matrix ``Xi = (1/m) sum_j d_j d_j^T = D^T D / m`` of ``m`` deviations ``d_j = w_j - w_a``.
* ``avg_sam_quadratic``: its second-order form ``L(w) + 1/2 Tr(H Sigma)`` from exact Hessian-vector products.
* ``sam_sharpness``: ``max_{||eps|| <= rho} L(w + eps) - L(w)`` (SAM's one step, or projected ascent).

``Xi`` is never formed: ``eps = D^T z / sqrt(m)``, ``z ~ N(0, I_m)`` (:mod:`sharpness.xi`, re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .evaluate import loss_at, loss_values, prepare, value_and_grad
from .functional import Batch, FunctionalLoss, SharpnessInputError, seeded
from .hvp import HessianOperator
from .results import Result
from .trace import hessian_trace
from .xi import Deviations, as_deviation_matrix, centre, xi_sampler, xi_trace

__all__ = [
    "AvgSamQuadResult",
    "AvgSamResult",
    "SamResult",
    "as_deviation_matrix",
    "avg_sam_loss",
    "avg_sam_quadratic",
    "centre",
    "sam_sharpness",
    "xi_sampler",
    "xi_trace",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

#: Perturbations drawn (and HVP columns formed) per block, to bound memory at (block, d).
BLOCK = 32


# --------------------------------------------------------------------------- results
@dataclass
class AvgSamResult(Result):
    """Monte Carlo ``E_{eps ~ N(0, Sigma)} L(w + eps)``; ``increase = value - base_loss``."""

    value: float
    stderr: float
    base_loss: float
    increase: float
    n_forward: int
    sigma: float | None
    covariance: str
    trace_sigma: float
    n_samples: int


@dataclass
class AvgSamQuadResult(Result):
    """``L(w) + 1/2 Tr(H Sigma)``; ``stderr``: 0 for ``Xi`` (exact), Hutchinson's error for ``sigma^2 I``."""

    value: float
    base_loss: float
    half_trace_term: float
    stderr: float
    n_hvp: int
    sigma: float | None
    covariance: str
    trace_sigma: float


@dataclass
class SamResult(Result):
    """Worst-case SAM sharpness ``max_{||eps|| <= rho} L(w + eps) - L(w)`` (lower bound: the best iterate)."""

    value: float
    rho: float
    steps: int
    method: str
    eps_norm: float
    n_grad: int
    base_loss: float
    grad_norm: float
    step_size: float | None
    n_forward: int


# --------------------------------------------------------------------------- helpers
def _covariance(fl: FunctionalLoss, sigma: float | None, deviations: Deviations | None) -> Tensor | None:
    if (sigma is None) == (deviations is None):
        raise SharpnessInputError("give exactly one of sigma (Sigma = sigma^2 I) and deviations (Sigma = Xi)")
    if sigma is not None:
        if not math.isfinite(sigma * sigma) or sigma < 0:
            raise SharpnessInputError(f"sigma must be a number >= 0 whose square is finite, got {sigma}")
        return None
    return as_deviation_matrix(deviations, fl)  # type: ignore[arg-type]


def _draw(
    n: int, d: int, sigma: float | None, D: Tensor | None, gen: torch.Generator, like: Tensor
) -> Tensor:
    if D is not None:
        return xi_sampler(D, n, gen)
    return sigma * torch.randn(n, d, generator=gen, dtype=like.dtype).to(like.device)  # type: ignore[operator]


# --------------------------------------------------------------------------- measurements
@seeded
def avg_sam_loss(
    model: nn.Module | FunctionalLoss,
    loss_fn: LossFn | None = None,
    data: Batch | Iterable[Batch] | None = None,
    *,
    sigma: float | None = None,
    deviations: Deviations | None = None,
    n_samples: int = 64,
    antithetic: bool = True,
    seed: int = 0,
    params: Sequence[str] | str | None = None,
    device: str | torch.device | None = None,
    train_mode: bool = False,
    chunk: int | None = None,
) -> AvgSamResult:
    """Average-direction SAM loss ``E_{eps ~ N(0, Sigma)} L(w + eps)`` by Monte Carlo.

    ``Sigma = sigma^2 I`` or ``Sigma = Xi = D^T D / m`` (``eps = D^T z / sqrt(m)``); give exactly one of
    ``sigma``/``deviations``. With ``antithetic`` the ``ceil(n_samples / 2)`` pairs ``(eps, -eps)`` are
    averaged and ``stderr`` is the standard error of the pair means (odd Taylor terms cancel within a pair);
    otherwise ``stderr = std / sqrt(n)``. Cost: ``n_samples`` (rounded up to even) + 1 loss evaluations, each
    one forward pass per batch; no gradients.
    """
    fl, settings = prepare(
        model,
        loss_fn,
        data,
        params=params,
        train_mode=train_mode,
        device=device,
        seed=seed,
        sigma=sigma,
        n_samples=n_samples,
        antithetic=antithetic,
        covariance="sigma^2 I" if deviations is None else "Xi",
    )
    D = _covariance(fl, sigma, deviations)
    n_draw = math.ceil(n_samples / 2) if antithetic else int(n_samples)
    if n_draw < 2:
        raise SharpnessInputError(f"n_samples = {n_samples} is too few for a standard error")
    gen = torch.Generator().manual_seed(seed)
    theta = fl.flat_params().detach()
    base = loss_at(fl, theta)
    noise = f"sigma = {sigma:g}" if D is None else "the deviations"
    where = f"the noisy weights w + eps ({noise}: too large?)"
    samples: list[Tensor] = []
    for i in range(0, n_draw, BLOCK):
        eps = _draw(min(BLOCK, n_draw - i), theta.numel(), sigma, D, gen, theta)
        vals = loss_values(fl, theta + eps, chunk=chunk, where=where)
        if antithetic:
            vals = 0.5 * (vals + loss_values(fl, theta - eps, chunk=chunk, where=where))
        samples.append(vals.double().cpu())
    s = torch.cat(samples)
    value = float(s.mean())
    n_eval = n_draw * (2 if antithetic else 1)
    trace_sigma = xi_trace(D) if D is not None else float(sigma) ** 2 * theta.numel()  # type: ignore[arg-type]
    settings["n_samples"] = n_eval
    return AvgSamResult(
        value=value,
        stderr=float(s.std(unbiased=True) / math.sqrt(n_draw)),
        base_loss=base,
        increase=value - base,
        n_forward=n_eval + 1,
        sigma=sigma,
        covariance=settings["covariance"],
        trace_sigma=trace_sigma,
        n_samples=n_eval,
        settings=settings,
        seed=seed,
        device=str(fl.device),
    )


@seeded
def avg_sam_quadratic(
    model: nn.Module | FunctionalLoss,
    loss_fn: LossFn | None = None,
    data: Batch | Iterable[Batch] | None = None,
    *,
    sigma: float | None = None,
    deviations: Deviations | None = None,
    n_probes: int = 100,
    seed: int = 0,
    params: Sequence[str] | str | None = None,
    device: str | torch.device | None = None,
    train_mode: bool = False,
    backend: str = "autograd",
) -> AvgSamQuadResult:
    """Second-order average-direction SAM loss ``L(w) + 1/2 Tr(H Sigma)``.

    For ``Sigma = Xi``: exact, ``Tr(H Xi) = (1/m) sum_j d_j^T H d_j`` from one ``matmat`` (m HVPs).
    For ``Sigma = sigma^2 I``: ``sigma^2 Tr(H) / 2`` with a Rademacher Hutchinson estimate of ``Tr H``
    (``n_probes`` HVPs); ``stderr`` is ``sigma^2 / 2`` times its standard error. Plus one forward pass per
    batch.
    """
    fl, settings = prepare(
        model,
        loss_fn,
        data,
        params=params,
        train_mode=train_mode,
        device=device,
        seed=seed,
        sigma=sigma,
        n_probes=n_probes,
        backend=backend,
        covariance="sigma^2 I" if deviations is None else "Xi",
    )
    D = _covariance(fl, sigma, deviations)
    op = HessianOperator(fl, backend=backend)
    base = op.loss()
    if D is not None:
        tr = 0.0
        for i in range(0, D.shape[0], BLOCK):
            V = D[i : i + BLOCK].T.contiguous()
            tr += float((V * op.matmat(V)).sum())
        half, se, trace_sigma = 0.5 * tr / D.shape[0], 0.0, xi_trace(D)
        settings["n_probes"] = None
    else:
        if n_probes < 2:
            raise SharpnessInputError(f"n_probes = {n_probes}: need at least 2 for a standard error")
        tr = hessian_trace(op, n_probes=n_probes, seed=seed, method="hutchinson")
        tr_h, se_h = tr.value, tr.stderr
        s2 = float(sigma) ** 2  # type: ignore[arg-type]
        half, se, trace_sigma = 0.5 * s2 * tr_h, 0.5 * s2 * se_h, s2 * op.num_params
    op.release()
    return AvgSamQuadResult(
        value=base + half,
        base_loss=base,
        half_trace_term=half,
        stderr=se,
        n_hvp=op.hvp_count,
        sigma=sigma,
        covariance=settings["covariance"],
        trace_sigma=trace_sigma,
        settings=settings,
        seed=seed,
        device=str(fl.device),
    )


@seeded
def sam_sharpness(
    model: nn.Module | FunctionalLoss,
    loss_fn: LossFn | None = None,
    data: Batch | Iterable[Batch] | None = None,
    *,
    rho: float = 0.05,
    steps: int = 1,
    step_size: float | None = None,
    seed: int | None = None,
    params: Sequence[str] | str | None = None,
    device: str | torch.device | None = None,
    train_mode: bool = False,
) -> SamResult:
    """Worst-case SAM sharpness ``max_{||eps||_2 <= rho} L(w + eps) - L(w)``.

    ``steps = 1``: SAM's first-order maximiser ``eps = rho g / ||g||``, ``g = nabla L(w)`` (value
    ~ ``rho ||g||`` for small rho). ``steps > 1``: that step, then ``steps - 1`` projected
    normalised-gradient ascent steps
    ``eps <- Proj_{||eps|| <= rho}(eps + a g(w + eps) / ||g(w + eps)||)``, ``a = step_size`` (default
    ``2 rho / steps``); the best iterate is reported, so the value is never below the one-step value.
    Deterministic (``seed`` is only recorded). Cost: ``steps`` gradients and ``steps + 1`` forward passes
    per batch.
    """
    if not math.isfinite(rho) or rho < 0:
        raise SharpnessInputError(f"rho must be a finite number >= 0, got {rho}")
    if int(steps) < 1:
        raise SharpnessInputError(f"steps must be >= 1, got {steps}")
    steps = int(steps)
    if steps > 1 and step_size is None:
        step_size = 2.0 * rho / steps
    fl, settings = prepare(
        model,
        loss_fn,
        data,
        params=params,
        train_mode=train_mode,
        device=device,
        seed=seed,
        rho=rho,
        steps=steps,
        step_size=step_size,
    )
    theta = fl.flat_params().detach()
    base = loss_at(fl, theta)
    _, g = value_and_grad(fl, theta)
    gnorm = float(g.norm())
    eps = g * (rho / gnorm) if gnorm > 0 else torch.zeros_like(theta)
    where = f"the SAM-perturbed weights w + eps, ||eps|| <= rho = {rho:g}"
    best_eps, best = eps, loss_at(fl, theta + eps, where)
    n_forward, n_grad = 2, 1
    for _ in range(steps - 1):
        _, gk = value_and_grad(fl, theta + eps, where)
        n_grad += 1
        nk = float(gk.norm())
        if nk == 0:
            break
        eps = eps + gk * (step_size / nk)  # type: ignore[operator]
        norm = float(eps.norm())
        if norm > rho:
            eps = eps * (rho / norm)
        val = loss_at(fl, theta + eps, where)
        n_forward += 1
        if val > best:
            best, best_eps = val, eps
    method = "sam-one-step" if steps == 1 else f"projected-gradient-ascent-{steps}"
    return SamResult(
        value=best - base,
        rho=rho,
        steps=steps,
        method=method,
        eps_norm=float(best_eps.norm()),
        n_grad=n_grad,
        base_loss=base,
        grad_norm=gnorm,
        step_size=step_size,
        n_forward=n_forward,
        settings={**settings, "method": method},
        seed=seed,
        device=str(fl.device),
    )
