"""Closed-form problems: a loss ``L(w)`` on one flat parameter with additive Gaussian gradient noise.

The claim checks of the paper (section 6) run D-SGD on losses whose Gaussian smoothing is known in closed
form (:mod:`verify.losses`); the noise model stands in for mini-batch sampling: worker j's stochastic gradient
at step t is ``grad L(w) + xi_j(t)``, ``xi_j(t) ~ N(0, diag(noise_std^2) / b)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sharpness.functional import FunctionalLoss, Params

from .problem import STREAM_INIT, STREAM_NOISE, Batch, Problem, ProblemError, generator


class ClosedFormProblem(Problem):
    """A closed-form ``L(w)`` on one flat parameter ``"w"`` (d,) with additive Gaussian gradient noise.

    Worker j's batch at step t is a noise vector ``xi_j(t) ~ N(0, diag(noise_std^2) / b)`` and its loss is
    ``L(w) + xi . w``, so its gradient is ``grad L(w) + xi``. The noise of steps ``[256 c, 256 (c+1))`` is one
    ``(256, m, d)`` standard-normal block drawn from ``(seed, c)``: a pure function of ``(seed, t)`` (row j is
    worker j's), the same for every algorithm at the same m. ``L``: any torch-differentiable callable ``L(w:
    (d,)) -> scalar`` (e.g. the objects of :mod:`verify.losses`). ``w0``: (d,) start of every worker, or (m,
    d) per-worker starts; ``init_spread`` s adds centred ``s * N(0, I)`` deviations (mean kept at w0).
    """

    CHUNK = 256

    def __init__(
        self,
        L: Callable[[Tensor], Tensor],
        w0: Tensor,
        *,
        m: int,
        local_batch: int = 1,
        noise_std: float | Tensor = 0.0,
        seed: int = 0,
        init_spread: float = 0.0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if m < 1 or local_batch < 1:
            raise ProblemError(f"workers and local batch must be >= 1; got m={m}, b={local_batch}")
        self.L, self.m, self.local_batch, self.seed = L, int(m), int(local_batch), int(seed)
        self.device, self.dtype = torch.device(device), dtype
        w0 = torch.as_tensor(w0, dtype=dtype, device=self.device)
        if w0.dim() == 2 and w0.shape[0] != self.m:
            raise ProblemError(f"w0 has {w0.shape[0]} rows but there are {self.m} workers")
        if w0.dim() not in (1, 2):
            raise ProblemError(f"w0 must be (d,) or (m, d); got shape {tuple(w0.shape)}")
        self.w0_rows = w0 if w0.dim() == 2 else None
        self.params = {"w": (w0.mean(0) if w0.dim() == 2 else w0).clone()}
        self.buffers = {}
        d = self.params["w"].numel()
        std = torch.as_tensor(noise_std, dtype=dtype, device=self.device)
        if std.dim() > 1 or (std.dim() == 1 and std.numel() != d) or bool((std < 0).any()):
            raise ProblemError(f"noise_std must be a nonnegative scalar or a ({d},) vector")
        self.scale = std / math.sqrt(self.local_batch)
        self.init_spread = float(init_spread)
        self._chunk: tuple[int, Tensor] | None = None

    def loss(self, params: Params, buffers: Params, batch: Batch) -> Tensor:
        """``L(w) + xi . w`` (gradient ``grad L(w) + xi``)."""
        w = params["w"]
        return self.L(w) + (batch[0] * w).sum()

    def _noise(self, t: int) -> Tensor:
        c, r = divmod(int(t), self.CHUNK)
        if self._chunk is None or self._chunk[0] != c:
            z = torch.randn(
                self.CHUNK,
                self.m,
                self.num_params,
                generator=generator(self.seed, STREAM_NOISE, c),
                dtype=torch.float64,
            )
            self._chunk = (c, z.to(device=self.device, dtype=self.dtype) * self.scale)
        return self._chunk[1][r]

    def batch(self, j: int, t: int) -> Batch:
        return (self._noise(t)[j],)

    def batches(self, t: int) -> Batch:
        return (self._noise(t),)

    def init_stacked(self) -> tuple[Tensor, Params]:
        W = (
            self.w0_rows.clone()
            if self.w0_rows is not None
            else self.params["w"].unsqueeze(0).repeat(self.m, 1)
        )
        if self.init_spread > 0:
            Z = torch.randn(
                self.m, self.num_params, generator=generator(self.seed, STREAM_INIT), dtype=torch.float64
            )
            W = W + self.init_spread * (Z - Z.mean(0)).to(W)
        return W, {}

    def functional(
        self, w: Tensor, buffers: Params | None = None, samples: int | None = None
    ) -> FunctionalLoss:
        """``L`` itself (noise-free) as a :class:`FunctionalLoss` at ``w``."""
        return FunctionalLoss(loss=lambda p: self.L(p["w"]), params={"w": w.detach().reshape(-1)})

    def evaluate(
        self, w: Tensor, buffers: Params | None = None, samples: int | None = None
    ) -> dict[str, float]:
        """``{"train_loss": L(w)}``. Cost: one evaluation of L."""
        return {"train_loss": self.full_loss(w)}

    def analytic_grads(self, W: Tensor, batches: Batch) -> tuple[Tensor, Tensor] | None:
        """When ``L`` has a ``grad`` method that accepts a batch (m, d) of points: ``G = L.grad(W) + Xi`` and
        ``losses = L(W) + sum(Xi * W, -1)``, with no autograd. Cost: one batched evaluation of L and its
        gradient."""
        g = getattr(self.L, "grad", None)
        if g is None:
            return None
        with torch.no_grad():
            G = g(W)
            vals = self.L(W)
        if not isinstance(G, Tensor) or G.shape != W.shape or vals.shape != W.shape[:1]:
            return None
        xi = batches[0]
        return G.to(W) + xi, (vals.to(W) + (xi * W).sum(-1))
