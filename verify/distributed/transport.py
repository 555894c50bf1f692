"""The torch.distributed transport of the one run loop (:func:`verify.engine.run_loop`): worker j = rank j.

Rank j holds row j of W and takes the simulation's batch stream for worker j; the engine's step functions run
on its one-row state with ``mix`` = the exchange with the neighbours of P(t) (read off its nonzeros,
recomputed from (seed, t) by every rank), and the gradient calls an algorithm's record names in ``reduce``
averaged by one ``all_reduce`` (centralised algorithms: every rank then applies the same update). Rank 0
writes the run directory in the simulation's formats (either engine resumes the other's run): checkpoints
gather the rows, a resume scatters them, the metrics row uses collectives (:mod:`.measure`), and divergence
plus rank 0's checkpoint clock are agreed on with one ``all_reduce`` at every log and checkpoint step and
the step after a checkpoint was held. ``result.json`` gets a ``distributed`` block (compute vs
communication time per step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sharpness.functional import Params, flatten, unflatten

from ..algorithms import ALGORITHMS, Algorithm, Grads, Mix, State
from ..config import DTYPES, ConfigError, RunConfig, build_problem
from ..engine import RESUMABLE_CHANGES, RunResult, run_loop
from ..problem import Batch, Problem
from ..rundir import check_out, load_ckpt, prepare_out, read_ckpt
from ..stacked import GradsFn
from ..topology import Neighbours
from ..transport import gossip_schedule
from . import measure
from .comm import Comm, DistributedRunError


def supported() -> list[str]:
    """The algorithms the distributed engine runs (their record says ``distributed``)."""
    return [name for name, a in ALGORITHMS.items() if a.distributed]


@dataclasses.dataclass
class Options:
    """Distributed settings that are not part of the run's configuration."""

    timeout: float = 60.0
    measure_timeout: float = 3600.0
    progress: bool = True
    resume: bool = False
    overwrite: bool = False


def check_config(config: RunConfig, world: int) -> RunConfig:
    """Validate ``config`` for ``world`` processes (one worker each); raise :class:`ConfigError` otherwise."""
    config = dataclasses.replace(config).validate()
    if config.algo not in supported():
        raise ConfigError(
            f"the distributed engine runs {', '.join(supported())}; run {config.algo} simulated"
        )
    if config.workers != world:
        raise ConfigError(
            f"the configuration has workers={config.workers} but {world} processes were started "
            f"(one worker per process): start {config.workers} processes or set --workers {world}"
        )
    return config


def preflight(config: RunConfig, world: int, out: str | Path | None, resume: bool, overwrite: bool) -> None:
    """Everything a launcher checks once before it starts ``world`` ranks, changing nothing: the settings
    (:func:`check_config`), the data and the model's fit (:func:`~verify.config.build_problem` on the CPU),
    the run folder (:func:`~verify.rundir.check_out`) and, to resume, its checkpoint. Raises a one-line
    ``ValueError``. Cost: loading the data and one gradient, as in one rank's start-up."""
    config = check_config(config, world)
    problem = build_problem(
        dataclasses.replace(config, device="cpu"), torch.device("cpu"), DTYPES[config.dtype]
    )
    if out is None:
        return
    outp = Path(out)
    check_out(outp, resume, overwrite, config.to_dict(), RESUMABLE_CHANGES)
    if resume:
        W = read_ckpt(outp / "ckpt.pt")["W"] if (outp / "ckpt.pt").is_file() else None
        if W is None:
            raise ConfigError(
                f"{outp} holds no checkpoint (ckpt.pt) to resume from: start again with --overwrite"
            )
        if tuple(W.shape) != (world, problem.num_params):
            raise ConfigError(
                f"{outp / 'ckpt.pt'} holds {W.shape[0]} workers of {W.shape[1]} parameters; this run has "
                f"{world} of {problem.num_params}"
            )


def _config_hash(config: RunConfig) -> float:
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).digest()
    return float(int.from_bytes(digest[:6], "big"))


class Ranks:
    """The transport of :mod:`verify.transport` over a :class:`~verify.distributed.comm.Comm`: this rank
    holds row ``comm.rank``; rank 0 writes."""

    every_step = False

    def __init__(self, comm: Comm, opts: Options) -> None:
        self.comm, self.opts = comm, opts
        self.first, self.writes = comm.rank, comm.rank == 0
        self.label = f" x{comm.world} ranks"
        self.nb: Neighbours | None = None

    @property
    def comm_s(self) -> float:
        return self.comm.comm_s

    def setup(self, problem: Problem, config: RunConfig, algorithm: Algorithm) -> None:
        self.problem, self.cfg, self.sched = problem, config, gossip_schedule(problem, config, algorithm)
        self.static = self.sched.neighbours(0, self.first) if self.sched and self.sched.static else None

    def prepare(self, out: Path | None, resume: bool, overwrite: bool, may_change: tuple) -> None:
        """Rank 0 prepares ``out``; all ranks check they hold the same configuration. Cost: one
        ``all_reduce`` of 2 world numbers."""
        comm, err = self.comm, ""
        if comm.rank == 0 and out is not None:
            try:
                prepare_out(out, resume, overwrite, self.cfg.to_dict(), may_change)
            except (ValueError, OSError) as exc:
                err = str(exc).splitlines()[0]
            comm.store.set(f"start_error/{comm.runs}", err)
        flags = torch.zeros(comm.world, 2, dtype=torch.float64)
        flags[comm.rank] = torch.tensor([_config_hash(self.cfg), float(bool(err))], dtype=torch.float64)
        flags = comm.all_reduce(flags.to(comm.device), "the start-up check").cpu()
        bad = [k for k in range(comm.world) if flags[k, 0] != flags[0, 0]]
        if bad:
            raise DistributedRunError(f"rank {bad[0]}'s run configuration differs from rank 0's")
        if flags[0, 1]:
            raise ConfigError(comm.store.get(f"start_error/{comm.runs}").decode() if comm.rank else err)

    def take(self, state: State) -> State:
        rows = slice(self.first, self.first + 1)
        mom = None if state.momentum is None else state.momentum[rows].clone()
        return State(
            state.W[rows].clone(), {k: v[rows].clone() for k, v in state.buffers.items()}, mom, state.step
        )

    def resume(self, out: Path) -> tuple[State, str]:
        """Rank 0 reads ``out/ckpt.pt``; row j goes to rank j. Cost: one broadcast, one scatter per tensor."""
        comm, like = self.comm, self.take(State(*self.problem.init_stacked(), None, 0))
        full = None
        if comm.rank == 0:
            bufs = {k: v[0] for k, v in like.buffers.items()}
            full = load_ckpt(out, torch.device("cpu"), comm.world, like.W.shape[1], bufs)[0]
        head = torch.tensor([full.step, full.momentum is not None] if full else [0, 0], dtype=torch.float64)
        head = comm.broadcast(head.to(comm.device), "broadcast of the checkpoint step")

        def scatter(rows: torch.Tensor | None, one: torch.Tensor, what: str) -> torch.Tensor:
            rows = None if rows is None else rows.to(comm.device)  # rank 0's (m, ...) tensor
            return comm.scatter(rows, one[0], f"scatter of {what}").unsqueeze(0)

        W = scatter(full and full.W, like.W, "the parameters")
        bufs = {k: scatter(full and full.buffers[k], v, f"buffer {k}") for k, v in like.buffers.items()}
        mom = scatter(full and full.momentum, like.W, "the momentum") if head[1] else None
        state = State(W, bufs, mom, int(head[0]))
        return state, self.execution(state, self.begin(state.step)[0])

    def execution(self, state: State, batches: Batch) -> str:
        """``analytic`` when the problem has batched closed-form gradients, else ``loop`` (one autograd
        gradient per rank, and no timing that could differ between ranks), unless the configuration names
        one."""
        if self.cfg.execution != "auto":
            return self.cfg.execution
        return "analytic" if self.problem.analytic_grads(state.W, batches) is not None else "loop"

    def begin(self, t: int) -> tuple[Batch, Mix]:
        self.comm.step = t
        j = self.first
        self.nb = self.static or (self.sched.neighbours(t, j) if self.sched is not None else None)
        nb = self.nb
        mix = (lambda X: self.comm.gossip(X[0], nb).unsqueeze(0)) if nb is not None else (lambda X: X)
        return tuple(b.unsqueeze(0) for b in self.problem.batch(j, t)), mix

    def grads(self, base: GradsFn, batches: Batch, reduce: tuple[int, ...]) -> Grads:
        """The local gradients; the calls numbered in ``reduce`` return the ranks' mean (one ``all_reduce``
        of d numbers each)."""
        calls = [0]

        def grads(W: torch.Tensor, B: Params) -> tuple[torch.Tensor, torch.Tensor, Params]:
            G, losses, B2 = base(W, B, batches)
            if calls[0] in reduce:
                G = (
                    self.comm.all_reduce(G.contiguous().clone(), "all_reduce of the gradients")
                    / self.comm.world
                )
            calls[0] += 1
            return G, losses, B2

        return grads

    def mix_buffers(self, buffers: Params, gossip: bool) -> Params:
        """The floating-point buffers, flattened into one message, gossiped with P(t) or averaged."""
        keys = [k for k, v in buffers.items() if v.is_floating_point()]
        if not keys:
            return buffers
        floats = {k: buffers[k] for k in keys}
        flat = flatten(floats)
        if gossip and self.nb is not None:
            flat = self.comm.gossip(flat, self.nb, "the gossip exchange of buffers")
        else:
            flat = self.comm.all_reduce(flat.clone(), "all_reduce of the buffers") / self.comm.world
        return {**buffers, **unflatten(flat, floats)}

    def agree(self, first_bad: int | None, clock: bool) -> tuple[int | None, bool]:
        """The first step any rank diverged at, and rank 0's checkpoint clock. Cost: one ``all_reduce`` (MIN)
        of 2 numbers."""
        flag = [math.inf if first_bad is None else first_bad, 0.0 if clock else 1.0]
        got = self.comm.all_reduce(torch.tensor(flag, dtype=torch.float64, device=self.comm.device),
                                   "the divergence check", op=dist.ReduceOp.MIN).cpu()  # fmt: skip
        return (int(got[0]) if math.isfinite(float(got[0])) else None), float(got[1]) == 0.0

    def row(self, s: int, state: State, losses: torch.Tensor | None) -> dict[str, Any] | None:
        loss = None if losses is None else float(losses[0])
        return measure.row(self.comm, self.problem, self.cfg, s, state.W[0], state.buffers, loss)

    def after_log(self, s: int) -> None:
        key = f"logged/{self.comm.runs}/{s}"
        self.comm.wait_for_rank0(key, "its logging", self.opts.measure_timeout)
        if self.writes:
            self.comm.release(key)

    def gather(self, state: State) -> State | None:
        """All rows on rank 0 as the engine's stacked State (None elsewhere). Cost: one gather per tensor."""
        comm = self.comm
        W = comm.gather(state.W[0], "gather of the parameters")
        bufs = {k: comm.gather(v[0], f"gather of buffer {k}") for k, v in state.buffers.items()}
        mom = None if state.momentum is None else comm.gather(state.momentum[0], "gather of the momentum")
        return State(W, bufs, mom, state.step) if comm.rank == 0 else None  # type: ignore[arg-type]

    def info(self) -> dict[str, Any]:
        return {"engine": "torch.distributed", "backend": self.comm.backend, "world_size": self.comm.world}

    def summary(self, step_s: float, comm_s: float, steps: int) -> dict[str, Any]:
        """The ``distributed`` block of ``result.json``: mean and slowest time per step, compute vs
        communication. Cost: two ``all_reduce`` of 2 numbers."""
        comm, m, n = self.comm, self.comm.world, steps
        mine = torch.tensor([step_s, comm_s], dtype=torch.float64, device=comm.device)
        mean = comm.all_reduce(mine.clone(), "the timing summary").cpu() / m
        slowest = comm.all_reduce(mine.clone(), "the timing summary", op=dist.ReduceOp.MAX).cpu()
        return {"distributed": {
            "world_size": m, "backend": comm.backend, "device": str(comm.device), "steps_timed": n,
            "step_s_mean": float(mean[0]) / n, "comm_s_mean": float(mean[1]) / n,
            "compute_s_mean": float(mean[0] - mean[1]) / n,
            "step_s_slowest_rank": float(slowest[0]) / n, "comm_s_slowest_rank": float(slowest[1]) / n,
        }}  # fmt: skip


def run_rank(
    comm: Comm, config: RunConfig, out: str | Path | None = None, opts: Options | None = None
) -> RunResult | None:
    """Run ``config`` with this process as worker ``comm.rank``; rank 0 writes ``out`` and returns the
    :class:`~verify.engine.RunResult` (all workers gathered); other ranks return None.
    Cost per step: one local gradient (sam: two), one gossip exchange (or one gradient ``all_reduce``)."""
    opts = opts or Options()
    comm.runs += 1
    config = check_config(config, comm.world)
    device = str(comm.device)
    problem = build_problem(dataclasses.replace(config, device=device), comm.device, DTYPES[config.dtype])
    return run_loop(config, problem, Ranks(comm, opts), out, progress=opts.progress, resume=opts.resume,
                    overwrite=opts.overwrite)  # fmt: skip
