"""Measurements on the worker-stacked state ``W`` (m, d). The weight diversity matrix ``Xi`` is never formed.

With ``w_a = (1/m) sum_j w_j`` and deviations ``d_j = w_j - w_a`` (rows of ``D``), ``Xi = D^T D / m`` (d x d,
rank <= m - 1) and every quantity below is computed from D (m x d):

- consensus distance ``Tr Xi = (1/m) sum_j ||d_j||^2``. This paper (Zhu et al. 2023) reports Tr Xi; Kong et
  al. (2021) call its SQUARE ROOT the consensus distance: both are returned, labelled;
- ``Tr(H Xi) = (1/m) sum_j d_j^T H(w_a) d_j`` with one ``HessianOperator.matmat(D^T)`` (m HVPs);
- the decentralisation drift ``||(1/m) sum_j grad L(w_j) - grad L(w_a)||`` (m + 1 full-batch gradients);
- ensemble metrics: the workers' mean softmax vs the average model (accuracy, NLL, 15-bin ECE);
- optional ``Tr H`` and ``lambda_max`` at w_a (:mod:`sharpness.at_point`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sharpness.at_point import sharpness_at as point_sharpness
from sharpness.functional import FunctionalLoss, Params
from sharpness.hvp import HessianOperator

from .problem import Problem

#: The ensemble metrics' columns (:func:`ensemble_scores`).
ENSEMBLE_COLUMNS = ("ensemble_acc", "ensemble_nll", "ece", "avg_acc", "avg_nll", "avg_ece")


def due(s: int, every: int, steps: int) -> bool:
    """Whether a measurement taken every ``every`` steps (0: never) is due at step s (always at the last)."""
    return bool(every) and (s % every == 0 or s == steps)


def deviations(W: Tensor) -> Tensor:
    """``D = W - 1 w_a^T`` (m, d): row j is ``d_j = w_j - w_a``, computed as ``V - mean(V)`` with
    ``V = W - w_1`` (equal in exact arithmetic; exactly 0 when all rows are equal). Cost: O(m d)."""
    V = W - W[:1]
    return V - V.mean(0, keepdim=True)


def consensus_distance(W: Tensor) -> float:
    """``Tr Xi = (1/m) sum_j ||w_j - w_a||^2`` (this paper's consensus distance). Cost: O(m d)."""
    D = deviations(W)
    return float((D * D).sum() / W.shape[0])


def consensus_distance_sqrt(W: Tensor) -> float:
    """``sqrt(Tr Xi)``: the consensus distance as Kong et al. (2021) define it. Cost: O(m d)."""
    return math.sqrt(consensus_distance(W))


def trace_h_xi_fl(fl: FunctionalLoss, D: Tensor) -> float:
    """``Tr(H Xi) = (1/m) sum_j d_j^T H d_j`` for the loss ``fl`` at its point, from deviations D (m, d).
    Cost: m HVPs (one ``matmat``)."""
    op = HessianOperator(fl)
    HD = op.matmat(D.T.to(dtype=op.dtype, device=op.device))  # (d, m)
    return float((D.T.to(HD) * HD).sum() / D.shape[0])


def trace_h_xi(
    problem: Problem, w_a: Tensor, D: Tensor, buffers: Params | None = None, samples: int | None = None
) -> float:
    """``Tr(H(w_a) Xi)`` with H the Hessian of the problem's FULL training loss in eval mode (BatchNorm: the
    given running statistics), or of a fixed seeded subset of ``samples`` training points. Cost: m HVPs over
    that data."""
    return trace_h_xi_fl(problem.functional(w_a, buffers, samples), D)


def drift(problem: Problem, W: Tensor, buffers: Params | None = None) -> float:
    """``||(1/m) sum_j grad L(w_j) - grad L(w_a)||`` with full-batch gradients of ONE function L (eval mode
    with the average model's ``buffers`` at every point). Cost: m + 1 full gradients."""
    ga = problem.full_gradient(W.mean(0), buffers)
    gs = torch.stack([problem.full_gradient(W[j], buffers) for j in range(W.shape[0])])
    return float((gs.mean(0) - ga).norm())


def ece(probs: Tensor, y: Tensor, bins: int = 15) -> float:
    """Expected calibration error ``sum_b (n_b / n) |acc_b - conf_b|`` over ``bins`` equal-width confidence
    bins (confidence = max probability; bin b = (b/B, (b+1)/B], the first one closed at 0). Cost: O(n C)."""
    conf, pred = probs.max(1)
    correct = (pred == y).to(probs.dtype)
    idx = torch.clamp(torch.ceil(conf * bins).long() - 1, 0, bins - 1)
    n = float(y.numel())
    total = 0.0
    for b in range(bins):
        sel = idx == b
        k = int(sel.sum())
        if k:
            total += (k / n) * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return total


def prob_metrics(probs: Tensor, y: Tensor, bins: int = 15) -> tuple[float, float, float]:
    """Accuracy, NLL ``-mean log p_y`` and :func:`ece` of the class probabilities ``probs`` (n, C). Cost:
    O(n C)."""
    acc = float((probs.argmax(1) == y).double().mean())
    nll = float(-torch.log(probs.gather(1, y.reshape(-1, 1)).clamp_min(1e-300)).mean())
    return acc, nll, ece(probs, y, bins)


def ensemble_metrics(
    problem: Problem,
    W: Tensor,
    buffers: Params,
    avg_buffers: Params | None = None,
    split: str = "test",
    bins: int = 15,
) -> dict[str, float]:
    """Ensemble (mean of the m workers' softmax, each worker with its own BatchNorm statistics ``buffers[j]``)
    vs the average model w_a (with ``avg_buffers``): ``ensemble_{acc,nll,ece}`` and ``avg_{acc,nll,ece}`` on
    ``split``. Empty when the problem has no classifier. Cost: m + 1 forward passes over the split."""
    first = problem.logits(W.mean(0), avg_buffers, split)
    if first is None or not getattr(problem, "classify", False):
        return {}
    z_avg, y = first
    probs = torch.zeros_like(z_avg, dtype=torch.float64)
    for j in range(W.shape[0]):
        bj = {k: v[j] for k, v in buffers.items()}
        zj, _ = problem.logits(W[j], bj, split)  # type: ignore[misc]
        probs += F.softmax(zj.double(), 1)
    probs /= W.shape[0]
    return ensemble_scores(probs, y, z_avg, bins)


def ensemble_scores(probs: Tensor, y: Tensor, z_avg: Tensor, bins: int = 15) -> dict[str, float]:
    """:data:`ENSEMBLE_COLUMNS`: :func:`prob_metrics` of the workers' mean softmax ``probs`` (n, C) and of
    the average model's logits ``z_avg``. Cost: O(n C)."""
    scores = (*prob_metrics(probs, y, bins), *prob_metrics(F.softmax(z_avg.double(), 1), y, bins))
    return dict(zip(ENSEMBLE_COLUMNS, scores, strict=True))


def sharpness_at(
    problem: Problem,
    w_a: Tensor,
    buffers: Params | None = None,
    *,
    samples: int | None = None,
    seed: int = 0,
    probes: int = 100,
    trace: bool = True,
    lmax: bool = True,
) -> dict[str, Any]:
    """``trace_h`` and ``lambda_max`` (:func:`sharpness.at_point.sharpness_at`: Tr H by method auto, exact for
    piecewise-linear nets, else to a 2 % standard error with at most ``probes`` probes; Lanczos) of the
    training loss at w_a (eval mode, the given BatchNorm statistics; a fixed seeded subset of ``samples``
    points); ``trace``/``lmax`` choose which. Cost: at most ``probes`` HVPs (+ JVPs) + Lanczos."""
    fl = problem.functional(w_a, buffers, samples)
    at = point_sharpness(fl, probes=probes, seed=seed, trace=trace, lmax=lmax)
    return {k: v for k, v, want in (("trace_h", at.trace, trace), ("lambda_max", at.lmax, lmax)) if want}
