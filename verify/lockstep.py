"""One D-SGD run driving centralised runs that see its weight diversity, in lockstep.

The paper's central claim (Theorem 1): the D-SGD average ``w_a`` follows SGD on the average-direction SAM
loss ``E_{eps ~ N(0, Xi(t))} L(w + eps)``. To test it along a whole run, :func:`run_lockstep` steps, from one
initialisation and on one batch stream (worker j's batch at step t is the same for every arm):

- ``dsgd``: the driver (``config.algo``, a gossip algorithm), whose deviations ``D(t)`` (m, d) give
  ``Xi(t) = D^T D / m``;
- ``csgd``: C-SGD, ``w <- w - lr mean_j grad L_j(w)``;
- ``avgsam-xi``: C-SGD on avg-SAM with ``eps_j = (Z D(t))_j / sqrt(m)``, ``Z`` (m, m) fresh standard normal
  from ``(seed, t)``: each ``eps_j ~ N(0, Xi(t))`` exactly, independent of the batches — the paper's claim;
- ``avgsam-iso``: the same with ``eps_j ~ N(0, (Tr Xi(t) / d) I)``: equal consensus distance, no direction
  (the counterfactual: the size of the spread without its shape);
- ``avgsam-exact``: ``eps_j = d_j(t)``, the run's own deviations. With AWC mixing and the same batches this
  *is* D-SGD's averaged dynamics (``verify.claims.t00_averaging``): it equals ``w_a`` up to rounding and is
  an identity, not evidence.

Every arm uses the driver's learning-rate schedule, momentum and weight decay. Rows are logged at step 0,
every ``log_every`` steps and at the end: ``step``, ``lr``, ``trace_xi`` (of the driver), and per arm
``<arm>_{train,test}_{loss,acc}`` (eval mode, :meth:`Problem.evaluate`) and ``<arm>_dist = ||w_arm - w_a||``
(0 for ``dsgd``); ``measure(step, arm, w, buffers)`` may add ``<arm>_<key>`` columns (e.g. ``lambda_max``).
Cost per step: m gradients per arm (the driver included) and one gossip product; memory: one (m, d) state
per arm, no history (``Xi(t)`` is used at step t and dropped).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from sharpness.functional import resolve_device

from . import measures
from .algorithms import ALGORITHMS, AlgoConfig, State, get, lr_at
from .config import DTYPES, ConfigError, RunConfig, build_problem
from .problem import Problem, generator
from .stacked import choose_execution, local_grads
from .topology import schedule
from .transport import average_buffers

ARMS = ("dsgd", "csgd", "avgsam-xi", "avgsam-iso", "avgsam-exact")
#: a stream id for the lockstep perturbations, distinct from the engine's streams (verify.algorithms)
STREAM_LOCKSTEP = 0x10C5
Measure = Callable[[int, str, Tensor, Any], "dict[str, float] | None"]


def gaussian_xi(D: Tensor, seed: int, t: int) -> Tensor:
    """``eps = Z D / sqrt(m)``, ``Z`` (m, m) ~ N(0, 1) from ``(seed, t)``: rows ~ N(0, D^T D / m) = N(0, Xi).

    Cost: one (m, m) x (m, d) product; Xi is never formed."""
    m = D.shape[0]
    Z = torch.randn(m, m, generator=generator(seed, STREAM_LOCKSTEP, t), dtype=torch.float64).to(D)
    return Z @ D / math.sqrt(m)


def isotropic_like(D: Tensor, seed: int, t: int) -> Tensor:
    """``eps`` (m, d) with rows ~ N(0, (Tr Xi / d) I), ``Tr Xi = ||D||_F^2 / m``: the same expected
    ``(1/m) sum_j ||eps_j||^2`` as the deviations, no shape."""
    m, d = D.shape
    z = torch.randn(m, d, generator=generator(seed, STREAM_LOCKSTEP + 1, t), dtype=torch.float64).to(D)
    return z * (D.pow(2).sum() / (m * d)).sqrt()


PERTURB: dict[str, Callable[[Tensor, int, int], Tensor] | None] = {
    "csgd": None,
    "avgsam-xi": gaussian_xi,
    "avgsam-iso": isotropic_like,
    "avgsam-exact": lambda D, seed, t: D,
}


@dataclass
class LockstepResult:
    """Rows (one dict per logged step), the final state of each arm, the problem, and divergence notes."""

    rows: list[dict[str, float]]
    states: dict[str, State]
    problem: Problem
    diverged: dict[str, int]

    def column(self, name: str) -> list[float]:
        return [float(r.get(name, float("nan"))) for r in self.rows]


def run_lockstep(
    config: RunConfig,
    arms: Sequence[str] = ("dsgd", "csgd", "avgsam-xi", "avgsam-iso"),
    *,
    problem: Problem | None = None,
    measure: Measure | None = None,
    progress: bool = False,
    desc: str = "lockstep",
) -> LockstepResult:
    """Run the driver ``config`` (a gossip algorithm) and the centralised ``arms`` in lockstep (module doc).

    An arm that becomes non-finite stops (its columns are NaN from then on, ``diverged[arm] = step``); the
    driver diverging stops everything.
    """
    config = replace(config).validate()
    gossip = [name for name, a in ALGORITHMS.items() if a.kind == "gossip"]
    if config.algo not in gossip:
        raise ConfigError(f"the lockstep driver must be gossip ({', '.join(gossip)}), not {config.algo}")
    unknown = [a for a in arms if a not in ARMS]
    if unknown or "dsgd" not in arms:
        raise ConfigError(f"arms must include 'dsgd' and come from {', '.join(ARMS)}; got {list(arms)}")
    if problem is None:
        problem = build_problem(config, resolve_device(config.device), DTYPES[config.dtype])
    W0, B0 = problem.init_stacked()
    states = {"dsgd": State(W0, B0, None, 0)}
    for arm in arms:
        if arm != "dsgd":
            states[arm] = State(W0.mean(0, keepdim=True).expand_as(W0).clone(), B0, None, 0)
    execution = config.execution
    if execution == "auto":
        execution = choose_execution(problem, W0, B0, problem.batches(0))
    grads_fn = local_grads(problem, execution)
    acfg = AlgoConfig.of(config, sigma=0.0, local_steps=1)
    sched = schedule(config.topology, problem.m, config.shuffle, config.seed)
    step_of = {arm: get(config.algo if arm == "dsgd" else "avgsam") for arm in arms}
    diverged: dict[str, int] = {}
    rows = [_row(0, config, states, problem, measure, diverged)]
    for t in tqdm(range(config.steps), disable=not progress, desc=desc, mininterval=1.0):
        lr = lr_at(t, config.lr, config.warmup, config.milestones)
        batches = problem.batches(t)
        D = measures.deviations(states["dsgd"].W)
        mix = sched.mixer(t, config.mix_method)
        for arm in arms:
            if arm in diverged:
                continue
            perturb = PERTURB.get(arm)
            cfg = acfg if arm == "dsgd" else replace(acfg, perturbation=_fixed(perturb, D, config.seed, t))
            new, losses = step_of[arm](states[arm], lambda W, B: grads_fn(W, B, batches), mix, lr, cfg)
            if not bool(torch.isfinite(losses).all() & torch.isfinite(new.W).all()):
                diverged[arm] = t
                continue
            states[arm] = new
        if "dsgd" in diverged:
            break
        s = t + 1
        if s % max(1, config.log_every) == 0 or s == config.steps:
            rows.append(_row(s, config, states, problem, measure, diverged))
    return LockstepResult(rows, states, problem, diverged)


def _fixed(perturb: Callable | None, D: Tensor, seed: int, t: int) -> Callable[[int], Tensor]:
    eps = torch.zeros_like(D) if perturb is None else perturb(D, seed, t)
    return lambda _step: eps


def _row(
    s: int,
    config: RunConfig,
    states: dict[str, State],
    problem: Problem,
    measure: Measure | None,
    diverged: dict[str, int],
) -> dict[str, float]:
    w_a = states["dsgd"].W.mean(0)
    row: dict[str, float] = {
        "step": s,
        "lr": lr_at(s, config.lr, config.warmup, config.milestones),
        "trace_xi": measures.consensus_distance(states["dsgd"].W),
    }
    for arm, state in states.items():
        if arm in diverged:
            continue
        w = state.W.mean(0)
        bufs = average_buffers(state.buffers, config.mix_buffers)  # as the engine logs w_a
        for k, v in problem.evaluate(w, bufs or None, samples=config.eval_samples).items():
            row[f"{arm}_{k}"] = v
        row[f"{arm}_dist"] = float((w - w_a).norm())
        for k, v in ((measure(s, arm, w, bufs or None) if measure else None) or {}).items():
            row[f"{arm}_{k}"] = float(v)
    return row
