"""One pure step function per algorithm, all with one signature: ``step(state, grads, mix, lr, cfg)``.

Each returns ``(new_state, losses)``:

- ``state``: :class:`State` (``W`` (m, d) worker parameters, stacked BatchNorm ``buffers``, ``momentum`` (m,
  d) or None, ``step`` t); never modified in place, a new state is returned.
- ``grads(W, buffers) -> (G, losses, buffers)``: the m local gradients ``G[j] = grad loss_j(W[j];
  batch_j(t))`` on the step's local batches (the engine closes it over ``problem.batches(t)``); the
  transport-free part.
- ``mix(W) -> P(t) W``: the gossip product (:func:`verify.topology.mixer`); unused by centralised methods.
- ``lr``: this step's learning rate (:func:`lr_at`); ``cfg``: :class:`AlgoConfig`.
- ``losses``: (m,) the local losses at the points where the (first) gradients were taken.

With ``u_j = g_j + wd * w_j`` (the L2-regularised gradient at the same point) and local momentum buffers ``v_j
<- mu v_j + u_j`` (``v_j = u_j`` when mu = 0; buffers are never mixed, as in the paper's code), the update
direction is ``v_j`` and:

- ``dsgd`` (AWC, the paper's form and default): ``w_j <- sum_k P_jk w_k - lr v_j(w_j)``, gradient at the
  UN-mixed w_j;
- ``dsgd-atc``: ``w_j <- sum_k P_jk (w_k - lr v_k)``; with P = J this is exactly C-SGD;
- ``csgd``: one model w (every row of W equal): ``w <- w - lr v``, ``u = mean_j g_j(w) + wd w``; Xi = 0;
- ``sam``: C-SGD with SAM's worst-case perturbation: ``g_j' = grad L_j(w + rho g_j / ||g_j||)``, averaged;
- ``avgsam``: C-SGD on the average-direction SAM loss: ``u = mean_j grad L_j(w + eps_j)``, with eps_j ~ N(0,
  sigma^2 I) drawn from ``(seed, t)``, or ``eps = cfg.perturbation(t)`` (m, d), e.g. a recorded D-SGD run's
  deviations;
- ``local-sgd``: ``w_j <- w_j - lr v_j``, then exact averaging ``w_j <- mean_k w_k`` after every
  ``local_steps``-th step.

Costs per step: m gradients (``sam``: 2m), one gossip product (dsgd/dsgd-atc), O(m d) vector work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from sharpness.functional import Params

from .problems import STREAM_PERTURB, generator

Grads = Callable[[Tensor, Params], tuple[Tensor, Tensor, Params]]
Mix = Callable[[Tensor], Tensor]


class AlgorithmError(ValueError):
    """A bad algorithm setting; the message is one line naming the problem."""


@dataclass
class State:
    """The engine's whole training state (what a checkpoint holds, besides the RNG states)."""

    W: Tensor
    buffers: Params
    momentum: Tensor | None
    step: int

    @property
    def m(self) -> int:
        return self.W.shape[0]

    @property
    def average(self) -> Tensor:
        """``w_a = (1/m) sum_j w_j`` (d,)."""
        return self.W.mean(0)


@dataclass(frozen=True)
class AlgoConfig:
    """Settings the step functions read: ``momentum`` mu, ``weight_decay`` wd, SAM radius ``rho``, avgsam
    ``sigma`` or ``perturbation`` (t -> (m, d) eps), ``local_steps`` H of local SGD, and the run ``seed``."""

    momentum: float = 0.0
    weight_decay: float = 0.0
    rho: float = 0.05
    sigma: float = 0.0
    perturbation: Callable[[int], Tensor] | None = None
    local_steps: int = 1
    seed: int = 0


def lr_at(t: int, lr: float, warmup: int = 0, milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """The paper's schedule (official ``Warmup_MultiStepLR``): ``lr * max(0.1, t / warmup)`` for t < warmup,
    then ``lr * gamma^(number of milestones <= t)``; t is the 0-based step."""
    if t < warmup:
        return lr * max(0.1, t / warmup)
    return lr * gamma ** sum(1 for s in milestones if t >= s and s >= warmup)


def _direction(state: State, G: Tensor, W_at: Tensor, cfg: AlgoConfig) -> tuple[Tensor, Tensor | None]:
    """``u = G + wd W_at``; with momentum ``v = mu v + u``. Returns (direction, new momentum buffer)."""
    U = G + cfg.weight_decay * W_at if cfg.weight_decay else G
    if not cfg.momentum:
        return U, None
    V = U if state.momentum is None else cfg.momentum * state.momentum + U
    return V, V


def _centralised(state: State, g: Tensor, lr: float, cfg: AlgoConfig, buffers: Params) -> State:
    """``w <- w - lr v`` on the single model (row 0), broadcast to every row so Xi stays exactly 0."""
    m = state.m
    w = state.W[0]
    mom = None if state.momentum is None else state.momentum[:1]
    V, newmom = _direction(replace(state, momentum=mom), g.unsqueeze(0), w.unsqueeze(0), cfg)
    W = (w - lr * V[0]).unsqueeze(0).expand(m, -1).clone()
    momentum = None if newmom is None else newmom.expand(m, -1).clone()
    return State(W, buffers, momentum, state.step + 1)


def dsgd(state: State, grads: Grads, mix: Mix, lr: float, cfg: AlgoConfig) -> tuple[State, Tensor]:
    """AWC D-SGD: ``W <- P W - lr V(W)`` (gradient at the un-mixed W). Cost: m gradients, one gossip."""
    G, losses, buffers = grads(state.W, state.buffers)
    V, mom = _direction(state, G, state.W, cfg)
    return State(mix(state.W) - lr * V, buffers, mom, state.step + 1), losses


def dsgd_atc(state: State, grads: Grads, mix: Mix, lr: float, cfg: AlgoConfig) -> tuple[State, Tensor]:
    """ATC D-SGD: ``W <- P (W - lr V(W))``. Cost: m gradients, one gossip."""
    G, losses, buffers = grads(state.W, state.buffers)
    V, mom = _direction(state, G, state.W, cfg)
    return State(mix(state.W - lr * V), buffers, mom, state.step + 1), losses


def csgd(state: State, grads: Grads, mix: Mix, lr: float, cfg: AlgoConfig) -> tuple[State, Tensor]:
    """C-SGD: ``w <- w - lr (mean_j g_j(w) + wd w)`` = SGD on the union of the m local batches. Cost: m
    gradients."""
    G, losses, buffers = grads(state.W, state.buffers)
    return _centralised(state, G.mean(0), lr, cfg, buffers), losses


def sam(state: State, grads: Grads, mix: Mix, lr: float, cfg: AlgoConfig) -> tuple[State, Tensor]:
    """C-SGD with SAM: ``u = mean_j grad L_j(w + rho g_j/||g_j||)`` (per-worker ascent on its own batch).
    BatchNorm statistics are updated by the first (unperturbed) pass only. Cost: 2m gradients."""
    G, losses, buffers = grads(state.W, state.buffers)
    norms = G.norm(dim=1, keepdim=True)
    E = torch.where(norms > 0, cfg.rho * G / norms.clamp_min(torch.finfo(G.dtype).tiny), torch.zeros_like(G))
    G2, _, _ = grads(state.W + E, state.buffers)
    return _centralised(state, G2.mean(0), lr, cfg, buffers), losses


def avgsam_perturbation(t: int, m: int, d: int, sigma: float, seed: int, like: Tensor) -> Tensor:
    """``eps`` (m, d) ~ N(0, sigma^2 I), drawn from ``(seed, t)`` alone (stateless, resumable)."""
    z = torch.randn(m, d, generator=generator(seed, STREAM_PERTURB, t), dtype=torch.float64)
    return (sigma * z).to(like)


def avgsam(state: State, grads: Grads, mix: Mix, lr: float, cfg: AlgoConfig) -> tuple[State, Tensor]:
    """Average-direction SAM: ``u = mean_j grad L_j(w + eps_j)``; losses are at the perturbed points. Cost: m
    gradients."""
    if cfg.perturbation is not None:
        E = cfg.perturbation(state.step).to(state.W)
        if E.shape != state.W.shape:
            raise AlgorithmError(
                f"perturbation({state.step}) has shape {tuple(E.shape)}, need {tuple(state.W.shape)}"
            )
    else:
        E = avgsam_perturbation(state.step, state.m, state.W.shape[1], cfg.sigma, cfg.seed, state.W)
    G, losses, buffers = grads(state.W + E, state.buffers)
    return _centralised(state, G.mean(0), lr, cfg, buffers), losses


def local_sgd(state: State, grads: Grads, mix: Mix, lr: float, cfg: AlgoConfig) -> tuple[State, Tensor]:
    """Local SGD: ``W <- W - lr V``, then every ``local_steps`` steps ``W <- J W`` exactly. Cost: m grads."""
    G, losses, buffers = grads(state.W, state.buffers)
    V, mom = _direction(state, G, state.W, cfg)
    W = state.W - lr * V
    if (state.step + 1) % max(1, cfg.local_steps) == 0:
        W = W.mean(0, keepdim=True).expand_as(W).clone()
    return State(W, buffers, mom, state.step + 1), losses


ALGORITHMS: dict[str, Callable[..., tuple[State, Tensor]]] = {
    "dsgd": dsgd,
    "dsgd-atc": dsgd_atc,
    "csgd": csgd,
    "sam": sam,
    "avgsam": avgsam,
    "local-sgd": local_sgd,
}
#: Algorithms that hold one model (every row of W equal at all times).
CENTRALISED = ("csgd", "sam", "avgsam")
#: Algorithms that apply the gossip product.
GOSSIP = ("dsgd", "dsgd-atc")


def get(name: str) -> Callable[..., tuple[State, Tensor]]:
    """The step function of an algorithm by name."""
    if name not in ALGORITHMS:
        raise AlgorithmError(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]
