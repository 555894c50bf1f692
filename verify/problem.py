"""The :class:`Problem` interface: what the workers train = initial parameters, a pure per-worker loss and a
stateless batch stream; and the seeded random streams every problem draws from.

A problem holds everything the engine needs and nothing about the algorithm:

- ``params`` (the initial single model, a dict) and ``buffers`` (BatchNorm running statistics, may be empty);
- ``loss(params, buffers, batch) -> scalar``: worker j's training loss on one local batch. It is pure except
  that BatchNorm (train mode) updates the running statistics in the ``buffers`` tensors it is given, as in the
  paper's code; it is ``vmap``-able when the model has no BatchNorm (``stateful`` is False);
- ``batch(j, t)``: worker j's local batch at step t, a function of ``(seed, j, t)`` alone, so the same seed
  gives the same samples for the same worker and step whatever the algorithm (runs are comparable pair by
  pair) and a resumed run sees exactly the batches an uninterrupted one would; ``batches(t)`` stacks the m of
  them;
- ``full_loss``/``full_gradient``/``functional``/``evaluate``/``logits``: the full training loss of ONE model
  and its test metrics, for the measurements.

Two families: :class:`verify.problems.ModelProblem` (an ``nn.Module`` and a data set split into worker
shards) and :class:`verify.closed_form.ClosedFormProblem` (a closed-form ``L(w)`` with additive Gaussian
gradient noise, for the claim checks); :mod:`verify.problems` exports both.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sharpness.functional import FunctionalLoss, Params, flatten, unflatten

Batch = tuple[Tensor, ...]

#: Independent random streams derived from the run seed.
STREAM_BATCH, STREAM_NOISE, STREAM_PERTURB, STREAM_INIT = 0, 1, 2, 3


class ProblemError(ValueError):
    """A bad problem setting; the message is one line naming the problem."""


def generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by ``numpy.random.SeedSequence(keys)``: a pure function of the integer keys."""
    if any(int(k) < 0 for k in keys):
        raise ProblemError(f"seeds and stream keys must be nonnegative integers; got {keys}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


class Problem:
    """Base class; see the module docstring. Subclasses set the attributes below in ``__init__``."""

    params: Params
    buffers: Params
    m: int
    local_batch: int
    seed: int
    stateful: bool = False
    device: torch.device
    dtype: torch.dtype

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def loss(self, params: Params, buffers: Params, batch: Batch) -> Tensor:
        raise NotImplementedError

    def batch(self, j: int, t: int) -> Batch:
        raise NotImplementedError

    def batches(self, t: int) -> Batch:
        """The m local batches of step t stacked on a leading worker axis (default: stack ``batch(j, t)``)."""
        parts = [self.batch(j, t) for j in range(self.m)]
        return tuple(torch.stack([p[i] for p in parts]) for i in range(len(parts[0])))

    def init_stacked(self) -> tuple[Tensor, Params]:
        """Initial ``(W, buffers)``: W (m, d) flat worker parameters, buffers stacked (m, ...). Default: all
        equal."""
        W = flatten(self.params).detach().unsqueeze(0).repeat(self.m, 1)
        return W, {k: v.unsqueeze(0).repeat(self.m, *([1] * v.dim())) for k, v in self.buffers.items()}

    def unflatten(self, w: Tensor) -> Params:
        """A flat vector (d,) or block (..., d) as a parameter dict (views, no copy)."""
        return unflatten(w, self.params)

    def functional(
        self, w: Tensor, buffers: Params | None = None, samples: int | None = None
    ) -> FunctionalLoss:
        raise NotImplementedError

    def full_loss(self, w: Tensor, buffers: Params | None = None) -> float:
        """``L(w)``: the full training loss of one model (eval mode). Cost: one pass over the training set."""
        with torch.no_grad():
            fl = self.functional(w, buffers)
            return float(fl.loss(fl.params))

    def full_gradient(self, w: Tensor, buffers: Params | None = None) -> Tensor:
        """Flat ``grad L(w)`` of the full training loss. Cost: one gradient over the training data."""
        fl = self.functional(w, buffers)
        p = {k: v.detach().requires_grad_(True) for k, v in fl.params.items()}
        with torch.enable_grad():
            g = torch.autograd.grad(fl.loss(p), list(p.values()))
        return torch.cat([x.reshape(-1) for x in g])

    def evaluate(
        self, w: Tensor, buffers: Params | None = None, samples: int | None = None
    ) -> dict[str, float]:
        raise NotImplementedError

    def analytic_grads(self, W: Tensor, batches: Batch) -> tuple[Tensor, Tensor] | None:
        """``(G, losses)`` of all m workers in closed form, or None when the problem has none."""
        return None

    def logits(
        self, w: Tensor, buffers: Params | None = None, split: str = "test", samples: int | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """``(logits, targets)`` of one model on a split, or None when the problem has no classifier."""
        return None
