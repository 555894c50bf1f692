"""Stochastic estimates of the Hessian trace: Hutchinson and Hutch++, with stopping on the standard error.

Hutchinson: ``Tr H = E[z^T H z]`` for Rademacher ``z`` (entries +-1), so ``Tr H ~ (1/n) sum_i z_i^T H z_i``
with standard error ``std(z_i^T H z_i) / sqrt(n)``. Hutch++ (Meyer, Musco, Musco & Woodruff 2021) first
removes the dominant part of the spectrum exactly: ``Q = qr(H S)`` for a Rademacher sketch ``S``, then
``Tr H = tr(Q^T H Q) + Tr((I - QQ^T) H (I - QQ^T))`` with Hutchinson on the second term only.
Probes are drawn on a seeded CPU ``torch.Generator`` and moved to the operator's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .functional import Batch, FunctionalLoss, SharpnessInputError, seeded
from .operators import apply_blocks, rademacher, recorded_mode, release, resolve_operator
from .results import Result

#: Stopping on ``rtol`` never happens before this many Hutchinson probes.
MIN_PROBES = 10


@dataclass
class TraceResult(Result):
    """``value ~ Tr H`` with its standard error ``stderr``.

    ``n_probes``: random vectors drawn (Hutch++: sketch columns + residual probes). ``n_hvp``: Hessian-vector
    products spent. ``samples``: the Hutchinson quadratic forms ``z^T H z`` (Hutch++: ``w^T H w`` with
    ``w = (I - QQ^T) z``). ``converged``: whether ``rtol`` was met (``None`` without ``rtol``).
    """

    value: float
    stderr: float
    n_hvp: int
    n_probes: int
    method: str
    converged: bool | None = None
    samples: list[float] = field(default_factory=list)
    sketch_trace: float | None = None
    n_sketch: int = 0


def _quad_forms(Z: Tensor, HZ: Tensor) -> list[float]:
    """Column-wise ``z^T H z``, summed in float64."""
    return [float(torch.dot(Z[:, i].double(), HZ[:, i].double())) for i in range(Z.shape[1])]


def _mean_stderr(samples: list[float]) -> tuple[float, float]:
    x = np.asarray(samples, dtype=np.float64)
    if x.size < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def _hutchinson(
    op: Any,
    gen: torch.Generator,
    n: int,
    batch: int,
    stop: Callable[[float, float], bool] | None,
    Q: Tensor | None = None,
) -> tuple[list[float], bool]:
    """Up to ``n`` samples ``w^T H w`` (``w = z``, or ``(I - QQ^T) z``), ``batch`` per block;
    ``stop(mean, se)`` is asked after each block once ``MIN_PROBES`` samples exist. Cost: 1 HVP per sample."""
    samples: list[float] = []
    while len(samples) < n:
        b = min(batch, n - len(samples))
        Z = rademacher(gen, op.num_params, b, op.dtype, op.device)
        if Q is not None:
            Z = Z - Q @ (Q.T @ Z)
        samples += _quad_forms(Z, op.matmat(Z))
        if stop is not None and len(samples) >= MIN_PROBES and stop(*_mean_stderr(samples)):
            return samples, True
    return samples, False


@seeded
def hessian_trace(
    model: nn.Module | FunctionalLoss | Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    data: Batch | Iterable[Batch] | None = None,
    *,
    n_probes: int = 100,
    method: str = "hutchinson",
    rtol: float | None = None,
    batch: int | None = None,
    seed: int = 0,
    params: Sequence[str] | str | None = None,
    device: str | torch.device | None = None,
    train_mode: bool = False,
) -> TraceResult:
    """Estimate ``Tr H`` of the loss Hessian (or of any symmetric operator passed as ``model``).

    ``method="hutchinson"``: ``(1/n) sum_i z_i^T H z_i``, ``stderr = std_i / sqrt(n)``.
    Cost: ``n_probes`` HVPs.

    ``method="hutch++"``: ``n_probes`` is the HVP budget ``m``: ``s = m // 3`` products for ``H S``,
    ``s`` for ``H Q``, and the remaining ``m - 2s`` for Hutchinson on ``(I - QQ^T) H (I - QQ^T)``. The
    estimate is ``tr(Q^T H Q) + mean_i w_i^T H w_i``; ``stderr`` is the standard error of the residual
    Hutchinson mean, which is the whole sampling error given the sketch (``tr(Q^T H Q)`` is exact for the
    ``Q`` drawn).

    ``rtol``: probes go in blocks of ``batch``; stop after the first block where ``stderr < rtol |value|``
    (or ``stderr == 0``) once at least ``MIN_PROBES`` = 10 Hutchinson probes are in; ``n_probes`` stays the
    cap.
    Products are formed ``batch`` columns at a time through ``matmat`` (default: the operator's ``chunk``).
    """
    if method not in ("hutchinson", "hutch++"):
        raise SharpnessInputError(f"method must be 'hutchinson' or 'hutch++', not {method!r}")
    least = 2 if method == "hutchinson" else 4
    if not isinstance(n_probes, (int, np.integer)) or n_probes < least:
        raise SharpnessInputError(f"n_probes must be an integer >= {least} for {method}, got {n_probes!r}")
    if batch is not None and (not isinstance(batch, (int, np.integer)) or batch < 1):
        raise SharpnessInputError(f"batch must be a positive integer, got {batch!r}")
    if rtol is not None and not rtol > 0:
        raise SharpnessInputError(f"rtol must be positive, got {rtol!r}")
    op, created = resolve_operator(model, loss_fn, data, params=params, train_mode=train_mode, device=device)
    # Default block: the operator's own chunk (1 on CPU, 8 on CUDA). Larger blocks buy no speed on CPU but
    # hold several d x batch blocks at once (5.3x a gradient's peak memory on a 0.6M ResNet at batch 16).
    batch = int(batch) if batch is not None else int(getattr(op, "chunk", 16))
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    start = op.hvp_count
    stop = None
    if rtol is not None:

        def stop(mean: float, se: float) -> bool:
            return se == 0.0 or se < rtol * abs(mean)

    try:
        if method == "hutchinson":
            samples, hit = _hutchinson(op, gen, int(n_probes), int(batch), stop)
            value, stderr = _mean_stderr(samples)
            sketch, n_sketch = None, 0
        else:
            value, stderr, samples, hit, sketch, n_sketch = _hutchpp(op, gen, int(n_probes), int(batch), stop)
    finally:
        release(op, created)
    settings = dict(
        n_probes=int(n_probes), method=method, rtol=rtol, batch=int(batch), params=params,
        device=None if device is None else str(device), train_mode=recorded_mode(model, train_mode),
    )  # fmt: skip
    return TraceResult(
        value=value,
        stderr=stderr,
        n_hvp=op.hvp_count - start,
        n_probes=n_sketch + len(samples),
        method=method,
        converged=hit if rtol is not None else None,
        samples=samples,
        sketch_trace=sketch,
        n_sketch=n_sketch,
        settings=settings,
        seed=int(seed),
        device=str(op.device),
    )


def _hutchpp(
    op: Any, gen: torch.Generator, m: int, batch: int, stop: Callable[[float, float], bool] | None
) -> tuple[float, float, list[float], bool, float, int]:
    """Hutch++ with HVP budget ``m``; returns value, stderr, residual samples, stopped, sketch trace, s."""
    d = op.num_params
    s = min(m // 3, d)
    S = rademacher(gen, d, s, op.dtype, op.device)
    Q = torch.linalg.qr(apply_blocks(op, S, batch)).Q
    del S
    sketch = sum(_quad_forms(Q, apply_blocks(op, Q, batch)))
    stop_total = None
    if stop is not None:

        def stop_total(mean: float, se: float) -> bool:
            return stop(sketch + mean, se)

    samples, hit = _hutchinson(op, gen, m - 2 * s, batch, stop_total, Q=Q)
    mean, stderr = _mean_stderr(samples)
    return sketch + mean, stderr, samples, hit, sketch, s
