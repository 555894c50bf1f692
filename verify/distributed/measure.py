"""The engine's metrics row, computed with collectives: every rank holds one worker ``w_j``, nothing (m, d) is
formed except on rank 0 for checkpoints.

With ``w_a = (1/m) sum_j w_j`` and ``d_j = w_j - w_a``, computed as ``v_j - mean_k v_k`` with
``v_j = w_j - w_0`` like :func:`verify.measures.deviations` (one ``broadcast`` of w_0, one ``all_reduce``
of the 2d-vectors [w_j, v_j]):

- ``consensus_distance`` ``Tr Xi = (1/m) sum_j ||d_j||^2``: one ``all_reduce`` of the scalars ``||d_j||^2``;
- ``trace_h_xi`` ``Tr(H(w_a) Xi) = (1/m) sum_j d_j^T H(w_a) d_j``: rank j computes its term with ONE HVP
  (:func:`verify.measures.trace_h_xi` on the single row d_j, i.e. ``sharpness.hvp.HessianOperator`` at w_a),
  then one scalar ``all_reduce``; the m HVPs run in parallel;
- ``drift`` ``||(1/m) sum_j grad L(w_j) - grad L(w_a)||``: rank j's full gradient, one ``all_reduce``,
  plus grad L(w_a) on rank 0;
- ensemble metrics: rank j's softmax on the test split, one ``all_reduce`` of (n, C) probabilities;
- ``train/test`` loss and accuracy of w_a, ``trace_h``/``lambda_max``: rank 0, as in the simulation.

The average model's BatchNorm statistics are worker 0's (broadcast from rank 0 when another rank needs
them) or, with ``mix_buffers``, the ranks' mean of every floating-point buffer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sharpness.functional import Params

from .. import measures
from ..algorithms import lr_at
from ..config import RunConfig
from ..problem import Problem
from .comm import Comm


def average_buffers(comm: Comm, buffers: Params, mix_buffers: bool, everywhere: bool) -> Params:
    """The average model's buffers (unstacked): rank 0's, or with ``mix_buffers`` the mean of the ranks'
    floating-point buffers (integer counters: rank 0's). ``everywhere``: every rank needs them."""
    out: Params = {}
    for k, v in buffers.items():
        x = v[0].clone()
        if mix_buffers and x.is_floating_point():
            x = comm.all_reduce(x, f"all_reduce of buffer {k}") / comm.world
        elif everywhere:
            x = comm.broadcast(x, f"broadcast of buffer {k}")
        out[k] = x
    return out


def _ensemble_probs(comm: Comm, problem: Problem, w: Tensor, own: Params) -> tuple[Tensor, Tensor] | None:
    """The sum over ranks of the workers' softmax on the test split and its targets (one ``all_reduce`` of
    (n, C) numbers), or None when the problem has no classifier. Cost: one test pass per rank."""
    res = problem.logits(w, own, "test")
    if res is None or not getattr(problem, "classify", False):
        return None
    zj, y = res
    return comm.all_reduce(F.softmax(zj.double(), 1).contiguous(), "all_reduce of the ensemble softmax"), y


def row(
    comm: Comm,
    problem: Problem,
    cfg: RunConfig,
    s: int,
    w: Tensor,
    buffers: Params,
    local_loss: float | None,
) -> dict[str, Any] | None:
    """The metrics row at step s (the simulated engine's columns, :mod:`verify.engine`) on rank 0, None
    elsewhere. ``w``: this rank's parameters (d,); ``buffers``: its stacked (1, ...) BatchNorm buffers;
    ``local_loss``: its local loss of the update that led to s (None at the first row). All collectives come
    first, then rank 0 alone evaluates w_a (the others move on). Cost: one ``broadcast`` of d numbers, two
    ``all_reduce`` (2d + 1 numbers, 1 number), plus one HVP / one full gradient / one test pass per rank when
    due."""
    m, steps, n = comm.world, cfg.steps, w.numel()
    loss = w.new_tensor([0.0 if local_loss is None else local_loss])
    v = w - comm.broadcast(w.clone(), "broadcast of worker 0's parameters")  # as verify.measures.deviations
    total = comm.all_reduce(torch.cat([w, v, loss]), "all_reduce of the parameters")
    w_a = total[:n] / m
    d = v - total[n : 2 * n] / m  # d_j = (w_j - w_0) - mean_k (w_k - w_0): exactly 0 when all rows are equal
    cd = float(comm.all_reduce((d * d).sum().reshape(1), "all_reduce of |w_j - w_a|^2")[0] / m)
    hess, drift = measures.due(s, cfg.hess_every, steps), measures.due(s, cfg.drift_every, steps)
    avg = average_buffers(comm, buffers, cfg.mix_buffers, everywhere=(hess or drift) and cd != 0)
    extra: dict[str, Any] = {}
    if hess:
        term = 0.0 if cd == 0 else measures.trace_h_xi(problem, w_a, d.unsqueeze(0), avg, cfg.hess_samples)
        if cd != 0:
            term = float(comm.all_reduce(w.new_tensor([term]), "all_reduce of d_j^T H d_j")[0] / m)
        extra["trace_h_xi"] = term
    g_sum = None
    if drift and cd != 0:
        g_sum = comm.all_reduce(
            problem.full_gradient(w, avg).contiguous(), "all_reduce of the full gradients"
        )
    ens = _ensemble_probs(comm, problem, w, {k: v[0] for k, v in buffers.items()}) if cfg.ensemble else None
    if comm.rank != 0:
        return None
    out: dict[str, Any] = {
        "step": s,
        "lr": lr_at(s, cfg.lr, cfg.warmup, cfg.milestones),
        "batch_loss": None if local_loss is None else float(total[-1] / m),
        "consensus_distance": cd,
        "consensus_distance_sqrt": math.sqrt(cd),
    }
    out.update(problem.evaluate(w_a, avg, samples=cfg.eval_samples))
    out.update(extra)
    if drift:
        out["drift"] = 0.0 if g_sum is None else float((g_sum / m - problem.full_gradient(w_a, avg)).norm())
    if ens is not None:
        z_avg, _ = problem.logits(w_a, avg, "test")  # type: ignore[misc]
        out.update(measures.ensemble_scores(ens[0] / m, ens[1], z_avg))
    if measures.due(s, cfg.sharpness_every, steps):
        out.update(measures.sharpness_at(problem, w_a, avg, samples=cfg.hess_samples, seed=cfg.seed))
    return out
