"""Worker-stacked state and the m local gradients, as one vectorised call or as a loop.

The engine keeps the m worker models as ONE flat matrix ``W`` of shape (m, d) (row j = worker j's parameters,
flattened in the problem's parameter order), so gossip is one product ``P W`` and the measurements read rows
directly. Parameter dicts are views of a row (:meth:`Problem.unflatten`). BatchNorm running statistics are a
dict of stacked buffers (m, ...), one set per worker.

``grads_fn(W, buffers, batches) -> (G, losses, new_buffers)`` computes ``G[j] = grad_w loss(w_j; batch_j)``
for every worker. Executions (the same numbers up to rounding):

- ``vmap``: ``torch.func.vmap(torch.func.grad_and_value(loss))`` over (W, buffers, batches): one call, m
  gradients;
- ``loop``: a Python loop of m autograd gradients over the same stacked state (required with BatchNorm, whose
  running statistics are updated in train mode, per worker, as in the paper's code);
- ``analytic``: closed-form problems whose loss has a batched ``grad`` (:meth:`Problem.analytic_grads`): no
  autograd;
- ``auto``: ``analytic`` when available, ``loop`` for BatchNorm models, else whichever of vmap/loop a one-time
  timing (3 calls each after a warm-up) finds faster for this model, m, batch, device and dtype; cached per
  process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from sharpness.functional import Params

from .problem import Batch, Problem

GradsFn = Callable[[Tensor, Params, Batch], tuple[Tensor, Tensor, Params]]
EXECUTIONS = ("auto", "vmap", "loop", "analytic")

_AUTO_CACHE: dict[tuple, str] = {}


class ExecutionError(ValueError):
    """A bad execution choice; the message is one line naming the problem."""


# --------------------------------------------------------------------------- stacking helpers
def stack(dicts: Sequence[Params]) -> Params:
    """``{k: torch.stack([p[k] for p in dicts])}``: a leading worker axis on every tensor."""
    return {k: torch.stack([p[k] for p in dicts]) for k in dicts[0]} if dicts else {}


def repeat(params: Params, m: int) -> Params:
    """m copies of one dict, stacked."""
    return {k: v.unsqueeze(0).repeat(m, *([1] * v.dim())).clone() for k, v in params.items()}


def row(stacked: Params, j: int) -> Params:
    """Worker j's slice of a stacked dict (views)."""
    return {k: v[j] for k, v in stacked.items()}


# --------------------------------------------------------------------------- local gradients
def vmap_grads(problem: Problem) -> GradsFn:
    """All m local gradients in one ``vmap(grad_and_value)`` call. Cost: m gradients, one dispatch."""
    if problem.stateful:
        raise ExecutionError(
            "vmap execution cannot update per-worker BatchNorm statistics; use execution='loop'"
        )

    def flat_loss(w: Tensor, buffers: Params, batch: Batch) -> Tensor:
        return problem.loss(problem.unflatten(w), buffers, batch)

    fn = vmap(grad_and_value(flat_loss), in_dims=(0, 0, 0))

    def grads(W: Tensor, buffers: Params, batches: Batch) -> tuple[Tensor, Tensor, Params]:
        G, losses = fn(W, buffers, batches)
        return G, losses.detach(), buffers

    return grads


def loop_grads(problem: Problem) -> GradsFn:
    """A loop of m autograd gradients over the stacked state; BatchNorm buffers of worker j are updated on a
    copy (``new_buffers``), the input stays untouched. Cost: m gradients, m dispatches."""

    def grads(W: Tensor, buffers: Params, batches: Batch) -> tuple[Tensor, Tensor, Params]:
        G = torch.empty_like(W)
        losses = torch.empty(W.shape[0], dtype=W.dtype, device=W.device)
        new_bufs = {k: v.clone() for k, v in buffers.items()}
        for j in range(W.shape[0]):
            w = W[j].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                loss = problem.loss(problem.unflatten(w), row(new_bufs, j), tuple(b[j] for b in batches))
                (G[j],) = torch.autograd.grad(loss, w)
            losses[j] = loss.detach()
        return G, losses, new_bufs

    return grads


def analytic_grads(problem: Problem) -> GradsFn:
    """The problem's closed-form batched gradients (:meth:`Problem.analytic_grads`). Cost: one call."""

    def grads(W: Tensor, buffers: Params, batches: Batch) -> tuple[Tensor, Tensor, Params]:
        out = problem.analytic_grads(W, batches)
        if out is None:
            raise ExecutionError(
                "this problem has no closed-form batched gradient; use execution='vmap' or 'loop'"
            )
        return out[0], out[1], buffers

    return grads


def _timed(fn: GradsFn, W: Tensor, buffers: Params, batches: Batch, repeats: int = 3) -> float:
    fn(W, buffers, batches)  # warm-up
    if W.is_cuda:
        torch.cuda.synchronize(W.device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(W, buffers, batches)
        if W.is_cuda:
            torch.cuda.synchronize(W.device)
        best = min(best, time.perf_counter() - t0)
    return best


def choose_execution(problem: Problem, W: Tensor, buffers: Params, batches: Batch) -> str:
    """``analytic`` when the problem has closed-form batched gradients, ``loop`` for BatchNorm models, else
    the faster of vmap/loop on this state (timed once, cached)."""
    if problem.analytic_grads(W, batches) is not None:
        return "analytic"
    if problem.stateful:
        return "loop"
    key = (
        type(problem).__name__,
        type(getattr(problem, "model", None)).__name__,
        problem.num_params,
        tuple(W.shape),
        tuple(tuple(b.shape) for b in batches),
        str(W.device),
        str(W.dtype),
    )
    if key not in _AUTO_CACHE:
        try:
            tv = _timed(vmap_grads(problem), W, buffers, batches)
        except (RuntimeError, NotImplementedError):  # an op without a batching rule
            tv = float("inf")
        tl = _timed(loop_grads(problem), W, buffers, batches)
        _AUTO_CACHE[key] = "vmap" if tv <= tl else "loop"
    return _AUTO_CACHE[key]


def local_grads(problem: Problem, execution: str) -> GradsFn:
    """The grads function of a resolved execution (``vmap``, ``loop`` or ``analytic``)."""
    if execution == "vmap":
        return vmap_grads(problem)
    if execution == "loop":
        return loop_grads(problem)
    if execution == "analytic":
        return analytic_grads(problem)
    raise ExecutionError(f"unknown execution {execution!r}; choose from {', '.join(EXECUTIONS)}")
