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

The driver is one :func:`verify.engine.run` (the one run loop); the arms step in its hooks with the driver's
learning-rate schedule, momentum and weight decay. Rows are logged at step 0, every ``log_every`` steps and at
the end: ``step``, ``lr``, ``trace_xi`` (of the driver), and per arm
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

from sharpness.functional import resolve_device

from . import measures
from .algorithms import ALGORITHMS, AlgoConfig, State, get, lr_at
from .config import DTYPES, ConfigError, RunConfig, build_problem
from .engine import run
from .problem import Problem, generator
from .speed import training_grads
from .stacked import choose_execution
from .transport import average_buffers, exact_average

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


PERTURB: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "csgd": lambda D, seed, t: torch.zeros_like(D),
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
) -> LockstepResult:
    """Run the driver ``config`` (a gossip algorithm) and the centralised ``arms`` in lockstep (module doc).

    The driver is an ordinary :func:`verify.engine.run` (its loop, schedule and divergence rule); the other
    arms step in its ``on_step`` hook with the driver's ``D(t)`` from before the update and are measured in
    its ``callback``. An arm that becomes non-finite stops (its columns are absent from then on,
    ``diverged[arm] = step``); the driver diverging stops everything.
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
    states = {
        a: State(W0.mean(0, keepdim=True).expand_as(W0).clone(), B0, None, 0) for a in arms if a != "dsgd"
    }
    execution = config.execution
    if execution == "auto":
        execution = choose_execution(problem, W0, B0, problem.batches(0))
    grads_fn = training_grads(problem, execution, config)  # the run's speed options, as the driver's
    acfg = AlgoConfig.of(config, sigma=0.0, local_steps=1)
    avgsam = get("avgsam")
    diverged: dict[str, int] = {}
    before = {"D": measures.deviations(W0)}  # the driver's deviations at the start of the current step

    def step_arms(s: int, driver: State) -> None:
        t, D = s - 1, before["D"]
        lr, batches = lr_at(t, config.lr, config.warmup, config.milestones), problem.batches(t)
        for arm in [a for a in states if a not in diverged]:
            eps = PERTURB[arm](D, config.seed, t)
            cfg = replace(acfg, perturbation=lambda _step, eps=eps: eps)
            new, losses = avgsam(states[arm], lambda W, B: grads_fn(W, B, batches), exact_average, lr, cfg)
            if bool(torch.isfinite(losses).all() & torch.isfinite(new.W).all()):
                states[arm] = new
            else:
                diverged[arm] = t
        before["D"] = measures.deviations(driver.W)

    def row(s: int, driver: State, _problem: Problem) -> dict[str, float]:
        out: dict[str, float] = {"trace_xi": measures.consensus_distance(driver.W)}
        w_a = driver.W.mean(0)
        for arm, state in {"dsgd": driver, **states}.items():
            if arm in diverged:
                continue
            w = state.W.mean(0)
            bufs = average_buffers(state.buffers, config.mix_buffers)  # as the engine logs w_a
            if arm != "dsgd":
                evals = problem.evaluate(w, bufs or None, samples=config.eval_samples)
                out.update({f"{arm}_{k}": v for k, v in evals.items()})
            out[f"{arm}_dist"] = float((w - w_a).norm())
            for k, v in ((measure(s, arm, w, bufs or None) if measure else None) or {}).items():
                out[f"{arm}_{k}"] = float(v)
        return out

    driven = replace(config, execution=execution, sharpness_every=0, hess_every=0, drift_every=0)
    res = run(driven, problem=problem, progress=progress, callback=row, on_step=step_arms)
    if res.diverged_at is not None:
        diverged["dsgd"] = res.diverged_at
    rows = [_with_driver_evals(r) for r in res.metrics]
    return LockstepResult(rows, {"dsgd": res.state, **states}, problem, diverged)


def _with_driver_evals(row: dict[str, Any]) -> dict[str, float]:
    """A driver row of the engine as a lockstep row: its evaluation of ``w_a`` as the ``dsgd_`` columns."""
    out = {"step": row["step"], "lr": row["lr"]}
    out.update({f"dsgd_{k}": v for k, v in row.items() if k.split("_")[0] in ("train", "test")})
    out.update({k: v for k, v in row.items() if k == "trace_xi" or "_" in k and k.split("_")[0] in ARMS})
    return out
