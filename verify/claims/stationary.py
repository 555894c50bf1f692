"""Shared protocol pieces of the stationary checks T6, T7, T9, T10: time averages of ``Tr Xi`` over
engine runs.

``time_average(config, problem, burn_in)`` runs the verify engine (:func:`verify.engine.run`) and averages,
over every step after ``burn_in``, the consensus distance ``Tr Xi = (1/m) sum_j ||w_j - w_a||^2`` and, for a
diagonal quadratic ``L = 1/2 sum_i h_i w_i^2``, ``Tr(H Xi) = sum_i h_i (1/m) sum_j D_ji^2``; optionally
also the loss of the iterate (C-SGD's excess loss) and the matrix ``Xi = D^T D / m`` (small d only). The
standard error is the batch-means estimate (20 contiguous blocks), which accounts for autocorrelation.
What users read is checked too: :func:`engine_log_errors` compares the engine's own logged row at the last
step (``consensus_distance``, ``trace_h_xi`` when logged, ``lr``) with dense references computed here from
the final state (``TimeAverage.engine_log``); the checks assert it below ``ENGINE_TOL``.
Cost: the run (m gradients and one gossip product per step) plus O(m d) per step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from verify.config import RunConfig
from verify.losses import QuadraticLoss
from verify.problems import ClosedFormProblem, Problem

#: Blocks of the batch-means standard error.
BLOCKS = 20
#: Largest relative difference allowed between an engine-logged value and its dense reference (rounding).
ENGINE_TOL = 1e-10


@dataclass
class TimeAverage:
    """Time averages after burn-in: ``trace_xi`` (+ ``trace_xi_se``), ``trace_h_xi`` (diagonal quadratic
    only), ``loss`` (+ ``loss_se``; the per-sample series in ``extra["loss_series"]``), ``xi`` (mean d x d
    matrix when asked), ``w_mean`` (mean w_a)."""

    trace_xi: float
    trace_xi_se: float
    trace_h_xi: float | None
    loss: float | None
    loss_se: float | None
    xi: np.ndarray | None
    w_mean: np.ndarray
    samples: int
    wall_s: float
    final_W: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)
    #: relative difference of each engine-logged value (last row) from its dense reference
    engine_log: dict[str, float] = field(default_factory=dict)

    @property
    def engine_log_error(self) -> float:
        """The largest of :attr:`engine_log` (0 when nothing was compared)."""
        return max(self.engine_log.values(), default=0.0)


def relative_difference(a: float, b: float) -> float:
    """``|a - b| / |b|`` (0 when both are 0; inf when only b is)."""
    if a == b:
        return 0.0
    return abs(a - b) / abs(b) if b != 0 else math.inf


def engine_log_errors(
    metrics: Sequence[dict[str, Any]], W: torch.Tensor, config: RunConfig, h: Sequence[float] | None = None
) -> dict[str, float]:
    """What the engine logged at its last row vs dense references from the final state ``W`` (m, d):
    ``consensus_distance`` vs ``(1/m) sum_j ||w_j - mean W||^2`` (rows shifted by row 0 first: exact 0 for
    equal rows); ``trace_h_xi`` (when logged and
    ``H = diag(h)``) vs ``sum_i h_i Xi_ii``; ``lr`` at every row vs ``config.lr`` (constant schedule only).
    Cost: O(m d)."""
    last = metrics[-1]
    Wd = W.detach().double().cpu()
    V = Wd - Wd[:1]  # shifted by one row first, so that equal rows (C-SGD) give exactly 0, as they should
    D = V - V.mean(0)
    diag = (D * D).sum(0) / Wd.shape[0]
    out = {"consensus_distance": relative_difference(float(last["consensus_distance"]), float(diag.sum()))}
    if h is not None and last.get("trace_h_xi") is not None:
        ref = float((torch.as_tensor(list(h), dtype=torch.float64) * diag).sum())
        out["trace_h_xi"] = relative_difference(float(last["trace_h_xi"]), ref)
    if not config.warmup and not config.milestones:
        out["lr"] = max(relative_difference(float(r["lr"]), float(config.lr)) for r in metrics)
    return out


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the block with one intra-op torch thread, then restore the previous count. The small models of
    these checks do tiny tensor operations per step, where extra threads mostly add synchronisation: on a
    busy 2-core machine, 2 threads made the network windows 10-15x slower than 1 (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def batch_means_se(x: Sequence[float], blocks: int = BLOCKS) -> float:
    """Standard error of the mean of a correlated series by batch means:
    ``std(block means) / sqrt(blocks)``."""
    a = np.asarray(x, dtype=np.float64)
    k = min(blocks, a.size)
    if k < 2:
        return float("nan")
    n = a.size // k
    means = a[: n * k].reshape(k, n).mean(1)
    return float(means.std(ddof=1) / math.sqrt(k))


def quadratic_problem(
    h: Sequence[float],
    *,
    m: int,
    b: int,
    seed: int,
    noise_std: float | Sequence[float] = 1.0,
    w0: torch.Tensor | None = None,
) -> ClosedFormProblem:
    """``L = 1/2 sum_i h_i w_i^2`` with additive noise ``N(0, diag(noise_std^2) / b)`` per worker and step
    (:class:`verify.problems.ClosedFormProblem` with :class:`verify.losses.QuadraticLoss`); start ``w0``
    (d,) or (m, d), default 0."""
    loss = QuadraticLoss(list(h))
    start = torch.zeros(loss.d, dtype=torch.float64) if w0 is None else w0
    std = torch.as_tensor(noise_std, dtype=torch.float64)
    return ClosedFormProblem(loss, start, m=m, local_batch=b, noise_std=std, seed=seed)


def stationary_deviations(Q: Sequence[np.ndarray], seed: int) -> torch.Tensor:
    """One draw of deviations ``D`` (m, d) with column i ~ N(0, Q_i) (Q_i PSD m x m): a start at the exact
    stationary law of the deviations, so no burn-in bias. Cost: one m x m eigendecomposition per column."""
    rng = np.random.default_rng([int(seed), 77])
    cols = []
    for Qi in Q:
        vals, vecs = np.linalg.eigh(0.5 * (Qi + Qi.T))
        cols.append(vecs @ (np.sqrt(np.clip(vals, 0, None)) * rng.standard_normal(vals.size)))
    D = np.stack(cols, 1)
    return torch.as_tensor(D - D.mean(0, keepdims=True), dtype=torch.float64)  # range(Q_i) is orthogonal to 1


def time_average(
    config: RunConfig,
    problem: Problem,
    burn_in: int,
    *,
    h: Sequence[float] | None = None,
    loss: str | None = None,
    xi_matrix: bool = False,
    every: int = 1,
    on_sample: Callable[[int, torch.Tensor], None] | None = None,
) -> TimeAverage:
    """Run ``config`` on ``problem`` through the engine and average over steps ``s > burn_in`` (every
    ``every``-th): ``Tr Xi``; ``Tr(H Xi)`` for ``H = diag(h)``; the problem's noise-free loss at ``w_a``
    (``loss="average"``) or its mean over the rows ``(1/m) sum_j L(w_j)`` (``loss="rows"``: m independent
    chains); ``Xi`` (``xi_matrix``). ``on_sample(step, W)`` sees each sample.
    Cost: the run plus O(m d) per sample (O(m d^2) with ``xi_matrix``)."""
    from verify.engine import run

    if config.steps <= burn_in:
        raise ValueError(f"steps ({config.steps}) must exceed the burn-in ({burn_in})")
    if loss not in (None, "average", "rows"):
        raise ValueError(f"loss must be None, 'average' or 'rows'; got {loss!r}")
    hv = None if h is None else torch.as_tensor(list(h), dtype=torch.float64)
    cd: list[float] = []
    chx: list[float] = []
    losses: list[float] = []
    xi_sum: torch.Tensor | None = None
    w_sum: torch.Tensor | None = None
    L = getattr(problem, "L", None)

    def on_step(s: int, state: Any) -> None:
        nonlocal xi_sum, w_sum
        if s <= burn_in or (s - burn_in) % every:
            return
        W = state.W
        w_a = W.mean(0)
        D = W - w_a
        sq = (D * D).sum(0) / W.shape[0]  # diag Xi
        cd.append(float(sq.sum()))
        if hv is not None:
            chx.append(float((hv.to(sq) * sq).sum()))
        if loss == "average":
            losses.append(float(L(w_a)) if L is not None else problem.full_loss(w_a))
        elif loss == "rows":
            losses.append(
                float(L(W).mean()) if L is not None else float(np.mean([problem.full_loss(w) for w in W]))
            )
        if xi_matrix:
            X = D.T @ D / W.shape[0]
            xi_sum = X if xi_sum is None else xi_sum + X
        w_sum = w_a.clone() if w_sum is None else w_sum + w_a
        if on_sample is not None:
            on_sample(s, W)

    res = run(config, progress=False, problem=problem, on_step=on_step)
    if res.diverged:
        raise RuntimeError(f"the run diverged: {res.message}")
    n = len(cd)
    return TimeAverage(
        trace_xi=float(np.mean(cd)),
        trace_xi_se=batch_means_se(cd),
        trace_h_xi=float(np.mean(chx)) if chx else None,
        loss=float(np.mean(losses)) if losses else None,
        loss_se=batch_means_se(losses) if losses else None,
        xi=(xi_sum / n).numpy() if xi_sum is not None else None,
        w_mean=(w_sum / n).numpy(),  # type: ignore[union-attr]
        samples=n,
        wall_s=res.wall_s,
        final_W=res.state.W,
        extra={"loss_series": losses} if losses else {},
        engine_log=engine_log_errors(res.metrics, res.state.W, config, h),
    )


def run_config(
    *,
    algo: str = "dsgd",
    topology: str = "ring",
    m: int = 16,
    b: int = 1,
    lr: float,
    steps: int,
    seed: int = 0,
    **extra: Any,
) -> RunConfig:
    """A float64 CPU :class:`RunConfig` that logs only at the start and the end (no ensemble metrics);
    ``hess_every=steps`` in ``extra`` makes the engine log ``trace_h_xi`` there too."""
    return RunConfig(
        algo=algo, topology=topology, workers=m, local_batch=b, lr=lr, steps=steps, seed=seed,
        log_every=steps, ensemble=False, dtype="float64", device="cpu", **extra,
    )  # fmt: skip
