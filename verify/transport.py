"""What the run loop needs from "where the workers live" (:class:`Transport`), and the simulation's answer,
:class:`Stacked`: all m workers in this process. ``verify.distributed.transport.Ranks`` holds one per rank.

:func:`verify.engine.run_loop` runs on the rows of W the transport holds. The transport gives step t's batches
and gossip product (``begin``), the step functions' ``grads`` (calls numbered in ``reduce`` return the
workers' mean gradient: a no-op when every row is here), BatchNorm buffers mixed or averaged, agreement on
divergence and on the writer's checkpoint clock (``agree``; ``every_step``: agreeing is free), the metrics
row (``row``, on the process that ``writes``), every row gathered for a checkpoint (``gather``), and what it
adds to ``config.json`` / ``result.json`` (``info``, ``summary``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import torch

from sharpness.functional import Params

from . import measures
from .algorithms import Algorithm, Grads, Mix, State, lr_at
from .config import RunConfig
from .problem import Batch, Problem
from .rundir import load_ckpt, prepare_out
from .stacked import GradsFn, choose_execution
from .topology import TopologySchedule, schedule


class Transport(Protocol):
    """The interface (module docstring); :class:`Stacked` and ``verify.distributed.transport.Ranks``. The
    methods with a body answer for one process holding every row: nothing to agree on or gather."""

    writes: bool
    every_step: bool
    first: int
    label: str
    comm_s: float

    def setup(self, problem: Problem, config: RunConfig, algorithm: Algorithm) -> None: ...
    def prepare(self, out: Path | None, resume: bool, overwrite: bool, may_change: tuple) -> None: ...
    def resume(self, out: Path) -> tuple[State, str]: ...
    def execution(self, state: State, batches: Batch) -> str: ...
    def begin(self, t: int) -> tuple[Batch, Mix]: ...
    def grads(self, base: GradsFn, batches: Batch, reduce: tuple[int, ...]) -> Grads: ...
    def mix_buffers(self, buffers: Params, gossip: bool) -> Params: ...
    def row(self, s: int, state: State, losses: torch.Tensor | None) -> dict[str, Any] | None: ...

    def take(self, state: State) -> State:
        return state

    def agree(self, first_bad: int | None, clock: bool) -> tuple[int | None, bool]:
        return first_bad, clock

    def after_log(self, s: int) -> None:
        pass

    def gather(self, state: State) -> State | None:
        return state

    def info(self) -> dict[str, Any]:
        return {}

    def summary(self, step_s: float, comm_s: float, steps: int) -> dict[str, Any]:
        return {}


def average_buffers(buffers: Params, mix_buffers: bool = False) -> Params:
    """The average model's BatchNorm buffers: worker 0's (the paper's code) or, with ``mix_buffers``, the
    workers' mean of every floating-point buffer (integer counters from worker 0)."""
    if not mix_buffers:
        return {k: v[0] for k, v in buffers.items()}
    return {k: (v.mean(0) if v.is_floating_point() else v[0]) for k, v in buffers.items()}


def gossip_schedule(problem: Problem, config: RunConfig, algorithm: Algorithm) -> TopologySchedule | None:
    """P(t) of a gossip algorithm (:func:`verify.topology.schedule`), None for the others."""
    if algorithm.kind != "gossip":
        return None
    return schedule(config.topology, problem.m, config.shuffle, config.seed)


def exact_average(X: torch.Tensor) -> torch.Tensor:
    """``J X``: every row replaced by the rows' mean. Cost: O(m d)."""
    return X.mean(0, keepdim=True).expand_as(X).clone()


class Stacked(Transport):
    """The simulation: the m workers as one stacked (m, d) computation in this process
    (:mod:`verify.stacked`, :mod:`verify.mixers`); nothing to agree on, nothing to gather."""

    writes, every_step, first, label, comm_s = True, True, 0, "", 0.0

    def setup(self, problem: Problem, config: RunConfig, algorithm: Algorithm) -> None:
        self.problem, self.cfg, self.sched = problem, config, gossip_schedule(problem, config, algorithm)
        self.static = self.sched.mixer(0, config.mix_method) if self.sched and self.sched.static else None
        self.mix: Mix = lambda W: W

    def prepare(self, out: Path | None, resume: bool, overwrite: bool, may_change: tuple) -> None:
        if out is not None:
            prepare_out(out, resume, overwrite, self.cfg.to_dict(), may_change)

    def resume(self, out: Path) -> tuple[State, str]:
        p = self.problem
        return load_ckpt(out, p.device, p.m, p.num_params, p.buffers)

    def execution(self, state: State, batches: Batch) -> str:
        if self.cfg.execution != "auto":
            return self.cfg.execution
        return choose_execution(self.problem, state.W, state.buffers, batches)

    def begin(self, t: int) -> tuple[Batch, Mix]:
        if self.sched is not None:
            self.mix = self.static or self.sched.mixer(t, self.cfg.mix_method)
        return self.problem.batches(t), self.mix

    def grads(self, base: GradsFn, batches: Batch, reduce: tuple[int, ...]) -> Grads:
        return lambda W, B: base(W, B, batches)

    def mix_buffers(self, buffers: Params, gossip: bool) -> Params:
        f = self.mix if gossip else exact_average
        return {k: (f(v) if v.is_floating_point() else v) for k, v in buffers.items()}

    def row(self, s: int, state: State, losses: torch.Tensor | None) -> dict[str, Any]:
        """The metrics row at step s from the stacked W. Cost: the measurements due at s."""
        cfg, problem, W = self.cfg, self.problem, state.W
        bufs = average_buffers(state.buffers, cfg.mix_buffers)
        w_a, cd = W.mean(0), measures.consensus_distance(W)
        row: dict[str, Any] = {
            "step": s, "lr": lr_at(s, cfg.lr, cfg.warmup, cfg.milestones),
            "batch_loss": None if losses is None else float(losses.mean()),
            "consensus_distance": cd, "consensus_distance_sqrt": math.sqrt(cd),
        }  # fmt: skip
        row.update(problem.evaluate(w_a, bufs, samples=cfg.eval_samples))
        if measures.due(s, cfg.hess_every, cfg.steps):
            D = measures.deviations(W)
            row["trace_h_xi"] = (
                0.0 if cd == 0 else measures.trace_h_xi(problem, w_a, D, bufs, cfg.hess_samples)
            )
        if measures.due(s, cfg.drift_every, cfg.steps):
            row["drift"] = 0.0 if cd == 0 else measures.drift(problem, W, bufs)
        if cfg.ensemble:
            row.update(measures.ensemble_metrics(problem, W, state.buffers, bufs))
        if measures.due(s, cfg.sharpness_every, cfg.steps):
            row.update(measures.sharpness_at(problem, w_a, bufs, samples=cfg.hess_samples, seed=cfg.seed))
        return row
