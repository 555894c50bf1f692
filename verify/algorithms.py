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
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from sharpness.functional import Params

from .problem import STREAM_PERTURB, generator

Grads = Callable[[Tensor, Params], tuple[Tensor, Tensor, Params]]
Mix = Callable[[Tensor], Tensor]
Step = Callable[..., "tuple[State, Tensor]"]


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
    ``sigma`` or ``perturbation`` (t -> (m, d) eps), ``local_steps`` H of local SGD, the run ``seed``, and
    which of the ``workers`` rows the state holds: rows ``first, first + 1, ...`` (a distributed rank holds
    one; ``workers`` 0: all of them)."""

    momentum: float = 0.0
    weight_decay: float = 0.0
    rho: float = 0.05
    sigma: float = 0.0
    perturbation: Callable[[int], Tensor] | None = None
    local_steps: int = 1
    seed: int = 0
    workers: int = 0
    first: int = 0

    @classmethod
    def of(cls, settings: Any, **given: Any) -> AlgoConfig:
        """The fields a run's settings (a :class:`~verify.config.RunConfig`) have, then ``given``."""
        names = [f.name for f in fields(cls) if f.name not in given and hasattr(settings, f.name)]
        return cls(**{n: getattr(settings, n) for n in names}, **given)


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
    """Average-direction SAM: ``u = mean_j grad L_j(w + eps_j)``; losses are at the perturbed points (the
    state's rows of the (m, d) eps). Cost: m gradients."""
    m, rows = cfg.workers or state.m, slice(cfg.first, cfg.first + state.m)
    if cfg.perturbation is not None:
        E = cfg.perturbation(state.step).to(state.W)
        if E.shape != (m, state.W.shape[1]):
            raise AlgorithmError(
                f"perturbation({state.step}) has shape {tuple(E.shape)}, need {(m, state.W.shape[1])}"
            )
    else:
        E = avgsam_perturbation(state.step, m, state.W.shape[1], cfg.sigma, cfg.seed, state.W)
    E = E[rows]
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


@dataclass(frozen=True)
class Algorithm:
    """Everything the toolkit knows about one algorithm; :func:`register` adds one, and the engine (both
    transports), the configuration, the command line and the figures read it from :data:`ALGORITHMS`.

    - ``step``: the step function (module docstring);
    - ``kind``: ``gossip`` (``mix`` is the gossip product P(t) every step, BatchNorm buffers mixed with it),
      ``centralised`` (one model: every row of W equal; ``mix`` unused, buffers averaged every step) or
      ``local`` (rows evolve apart and the step function averages them exactly every ``local_steps``
      steps, buffers with them);
    - ``reduce``: in a distributed run (one row per process), which calls of ``grads`` (0 = first) return
      the workers' mean gradient instead of the local one (one ``all_reduce`` each);
    - ``distributed``: whether ``verify.distributed`` runs it (it needs no other collective than
      ``reduce``'s and the gossip);
    - ``label``, ``update``: its display name and one-line update rule (``dsgd-verify run --help``);
    - ``color``, ``marker``: figure style of a non-gossip algorithm (an Okabe-Ito colour name of
      ``figures.style``, a matplotlib marker); gossip runs are styled by their topology.
    """

    name: str
    step: Step
    kind: str
    label: str
    update: str
    reduce: tuple[int, ...] = ()
    distributed: bool = True
    color: str = "grey"
    marker: str = "o"

    def averages(self, t: int, cfg: AlgoConfig) -> bool:
        """Whether the update from t to t + 1 ends with every row equal to the workers' mean (so BatchNorm
        buffers are averaged with it): every step when centralised, every ``local_steps``-th when local."""
        if self.kind == "local":
            return (t + 1) % max(1, cfg.local_steps) == 0
        return self.kind == "centralised"


KINDS = ("gossip", "centralised", "local")
#: Every algorithm by name, in the order of the command line's help.
ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Add (or replace) an algorithm in :data:`ALGORITHMS`; returns it."""
    if algorithm.kind not in KINDS:
        raise AlgorithmError(f"algorithm kind must be one of {', '.join(KINDS)}; got {algorithm.kind!r}")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


for _a in (
    Algorithm("dsgd", dsgd, "gossip", "D-SGD", "w_j <- sum_k P_jk w_k - lr g_j(w_j)       (AWC, the "
              "paper's form: gradient at the un-mixed w_j)"),
    Algorithm("dsgd-atc", dsgd_atc, "gossip", "D-SGD (ATC)", "w_j <- sum_k P_jk (w_k - lr g_k(w_k))     "
              "(ATC; with --topology complete it equals csgd)"),
    Algorithm("csgd", csgd, "centralised", "C-SGD", "w <- w - lr mean_j g_j(w)                 (one model, "
              "batch m*b; Tr Xi = 0)", reduce=(0,), color="black", marker="s"),
    Algorithm("sam", sam, "centralised", "SAM", "w <- w - lr mean_j g_j(w + rho g_j/|g_j|) (worst-case SAM, "
              "per-worker ascent)", reduce=(1,), color="reddish_purple", marker="P"),
    Algorithm("avgsam", avgsam, "centralised", "average-direction SAM", "w <- w - lr mean_j g_j(w + eps_j), "
              "eps_j ~ N(0, sigma^2 I) (average-direction SAM)", reduce=(0,), color="sky_blue", marker="X"),
    Algorithm("local-sgd", local_sgd, "local", "local SGD", "w_j <- w_j - lr g_j(w_j), then w_j <- mean_k "
              "w_k every --local-steps steps", distributed=False),
):  # fmt: skip
    register(_a)


def record(name: str) -> Algorithm:
    """The :class:`Algorithm` of a name; one-line :class:`AlgorithmError` for an unknown one."""
    if name not in ALGORITHMS:
        raise AlgorithmError(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def get(name: str) -> Step:
    """The step function of an algorithm by name."""
    return record(name).step
