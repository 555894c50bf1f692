"""The run loop of one rank: worker j = rank j, with the simulated engine's configuration, batches, rules
and metrics.

Per step t, rank j takes its local batch ``problem.batch(j, t)`` (the simulation's stateless stream), its
gradient ``g_j`` at w_j, and applies the engine's own step function (:mod:`verify.algorithms`) to a one-row
state, with:

- ``dsgd`` (AWC): ``mix`` = the gossip exchange with the in/out-neighbours read off the nonzeros of P(t)
  (:meth:`TopologySchedule.neighbours`, recomputed from (seed, t) by every rank), so
  ``w_j <- sum_k P_jk w_k - lr v_j``; ``dsgd-atc``: ``w_j <- sum_k P_jk (w_k - lr v_k)``;
- ``csgd``/``avgsam``: the gradients are averaged with one ``all_reduce`` (``sam``: the second, perturbed
  one); every rank then applies the same update to its copy of the one model.

Logging (rank 0 writes ``metrics.csv``), checkpoints (rows gathered to rank 0, in the engine's ``ckpt.pt``
format, so either engine can resume the other's run; when and which state:
:class:`verify.rundir.Checkpoints`),
``avg.pt`` and ``result.json`` are the engine's (:mod:`verify.rundir`); ``result.json`` also gets a
``distributed`` block with the time per step split into compute and communication. Divergence is checked at
every log and checkpoint step and at the step after a checkpoint was held (one ``all_reduce``, which also
carries rank 0's checkpoint clock), so a run stops at the first of those after the step that diverged; the
step itself is reported, and ``steps_done`` equals the simulation's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from sharpness.functional import Params, flatten
from sharpness.results import write_json

from ..algorithms import CENTRALISED, GOSSIP, AlgoConfig, State, avgsam_perturbation, get, lr_at
from ..config import DTYPES, ConfigError, RunConfig, build_problem
from ..engine import RESUMABLE_CHANGES, RunResult, _finish, _Runner
from ..problems import Problem
from ..rundir import Checkpoints, check_out, load_ckpt, prepare_out, read_ckpt, versions, write_config
from ..stacked import local_grads
from ..topology import schedule
from . import measure
from .comm import Comm, DistributedRunError
from .measure import due

#: Algorithms the distributed engine runs (local-sgd: use the simulation).
SUPPORTED = ("dsgd", "dsgd-atc", "csgd", "sam", "avgsam")


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
    if config.algo not in SUPPORTED:
        raise ConfigError(f"the distributed engine runs {', '.join(SUPPORTED)}; run {config.algo} simulated")
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


def resolve_execution(problem: Problem, config: RunConfig, w: torch.Tensor, batch: tuple) -> str:
    """``analytic`` when the problem has batched closed-form gradients, else ``loop`` (one autograd gradient
    per rank, and no timing that could differ between ranks), unless the configuration names one."""
    if config.execution != "auto":
        return config.execution
    return "analytic" if problem.analytic_grads(w, batch) is not None else "loop"


def _config_hash(config: RunConfig) -> float:
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).digest()
    return float(int.from_bytes(digest[:6], "big"))


def _start(comm: Comm, config: RunConfig, out: Path | None, opts: Options) -> str | None:
    """Rank 0 prepares ``out``; all ranks check they hold the same configuration. Returns rank 0's error."""
    err = ""
    if comm.rank == 0 and out is not None:
        try:
            prepare_out(out, opts.resume, opts.overwrite, config.to_dict(), RESUMABLE_CHANGES)
        except (ValueError, OSError) as exc:
            err = str(exc).splitlines()[0]
        comm.store.set(f"start_error/{comm.runs}", err)
    flags = torch.zeros(comm.world, 2, dtype=torch.float64)
    flags[comm.rank] = torch.tensor([_config_hash(config), float(bool(err))], dtype=torch.float64)
    flags = comm.all_reduce(flags.to(comm.device), "the start-up check").cpu()
    bad = [k for k in range(comm.world) if flags[k, 0] != flags[0, 0]]
    if bad:
        raise DistributedRunError(f"rank {bad[0]}'s run configuration differs from rank 0's")
    if flags[0, 1]:
        return comm.store.get(f"start_error/{comm.runs}").decode() if comm.rank else err
    return None


class _Grads:
    """The step functions' ``grads(W, B)`` on this rank's batch; for centralised algorithms the calls listed
    in ``reduce`` return the ranks' mean gradient (one ``all_reduce``), the others the local one."""

    def __init__(self, base: Any, comm: Comm, batch: tuple, reduce: tuple[int, ...]) -> None:
        self.base, self.comm, self.batch, self.reduce, self.calls = base, comm, batch, reduce, 0

    def __call__(self, W: torch.Tensor, B: Params) -> tuple[torch.Tensor, torch.Tensor, Params]:
        G, losses, B2 = self.base(W, B, self.batch)
        if self.calls in self.reduce:
            G = self.comm.all_reduce(G.contiguous().clone(), "all_reduce of the gradients") / self.comm.world
        self.calls += 1
        return G, losses, B2


def _gather_state(comm: Comm, state: State) -> State | None:
    """All rows on rank 0 as the engine's stacked State (None elsewhere)."""
    W = comm.gather(state.W[0], "gather of the parameters")
    bufs = {k: comm.gather(v[0], f"gather of buffer {k}") for k, v in state.buffers.items()}
    mom = None if state.momentum is None else comm.gather(state.momentum[0], "gather of the momentum")
    return State(W, bufs, mom, state.step) if comm.rank == 0 else None  # type: ignore[arg-type]


def _resume_state(comm: Comm, out: Path, like: State) -> State:
    """Rank 0 reads ``out/ckpt.pt``; row j goes to rank j."""
    full = None
    if comm.rank == 0:
        bufs = {k: v[0] for k, v in like.buffers.items()}
        full = load_ckpt(out, torch.device("cpu"), comm.world, like.W.shape[1], bufs)[0]
    head = torch.tensor([full.step, full.momentum is not None] if full else [0, 0], dtype=torch.float64)
    step, has_mom = (int(v) for v in comm.broadcast(head.to(comm.device), "broadcast of the checkpoint step"))
    dev = comm.device
    W = comm.scatter(full.W.to(dev) if full else None, like.W[0], "scatter of the parameters").unsqueeze(0)
    bufs = {}
    for k, v in like.buffers.items():
        rows = full.buffers[k].to(dev) if full else None
        bufs[k] = comm.scatter(rows, v[0], f"scatter of buffer {k}").unsqueeze(0)
    mom = None
    if has_mom:
        mom = comm.scatter(full.momentum.to(dev) if full else None, like.W[0], "scatter of the momentum")
        mom = mom.unsqueeze(0)
    return State(W, bufs, mom, step)


class _Logger(_Runner):
    """The engine's metrics writer on rank 0, fed the row computed with collectives."""

    row: dict[str, Any] = {}

    def measure(self, s: int, state: State, batch_loss: float | None) -> dict[str, Any]:
        return {**self.row, "elapsed_s": time.perf_counter() - self.t0}


def run_rank(
    comm: Comm, config: RunConfig, out: str | Path | None = None, opts: Options | None = None
) -> RunResult | None:
    """Run ``config`` with this process as worker ``comm.rank``; rank 0 writes ``out`` and returns the
    :class:`~verify.engine.RunResult` (all workers gathered); other ranks return None.
    Cost per step: one local gradient (sam: two), one gossip exchange (or one gradient ``all_reduce``)."""
    opts = opts or Options()
    j, m = comm.rank, comm.world
    comm.runs += 1
    config = check_config(config, m)
    dtype = DTYPES[config.dtype]
    problem = build_problem(dataclasses.replace(config, device=str(comm.device)), comm.device, dtype)
    config.device, config.dtype = str(problem.device), str(problem.dtype).replace("torch.", "")
    outp = Path(out) if out is not None else None
    err = _start(comm, config, outp, opts)
    if err is not None:
        raise ConfigError(err)
    W, B = problem.init_stacked()
    if config.algo in CENTRALISED:
        W = W.mean(0, keepdim=True).expand_as(W).clone()
    state = State(W[j : j + 1].clone(), {k: v[j : j + 1].clone() for k, v in B.items()}, None, 0)
    if opts.resume:
        if outp is None:
            raise ConfigError("resume needs the run directory (out)")
        state = _resume_state(comm, outp, state)
    batch0 = tuple(b.unsqueeze(0) for b in problem.batch(j, state.step))
    execution = resolve_execution(problem, config, state.W, batch0)
    grads_base = local_grads(problem, execution)
    d = problem.num_params
    perturb = None
    if config.algo == "avgsam":
        perturb = lambda t: avgsam_perturbation(t, m, d, config.sigma, config.seed, state.W)[j : j + 1]
    c = config
    acfg = AlgoConfig(c.momentum, c.weight_decay, c.rho, c.sigma, perturb, c.local_steps, c.seed)
    algo = get(config.algo)
    reduce = {"csgd": (0,), "avgsam": (0,), "sam": (1,)}.get(config.algo, ())
    sched = schedule(config.topology, m, config.shuffle, config.seed) if config.algo in GOSSIP else None
    static_nb = sched.neighbours(0, j) if sched is not None and sched.static else None
    logger = _Logger(config, problem, outp, None, None) if j == 0 else None
    if logger is not None and outp is not None and not opts.resume:
        info = {"execution": execution, "m": m, "d": d, "problem": type(problem).__name__}
        info.update(
            device=str(problem.device), dtype=config.dtype, versions=versions(), problem_source="config"
        )
        info.update(engine="torch.distributed", backend=comm.backend, world_size=m)
        write_config(outp, config.to_dict(), info)
    start = state.step
    if logger is not None and opts.resume:
        logger.reopen(start)
    t_begin = time.perf_counter()

    def log(s: int, local_loss: float | None) -> None:
        r = measure.row(comm, problem, config, s, state.W[0], state.buffers, local_loss)
        if logger is not None:
            logger.row = r  # type: ignore[assignment]
            logger.log(s, state, r["batch_loss"])  # type: ignore[index]
            shown = r.get("train_loss", r["batch_loss"] or math.nan)  # type: ignore[union-attr,index]
            bar.set_postfix(loss=f"{shown:.4g}", TrXi=f"{r['consensus_distance']:.3g}")  # type: ignore[index]
        comm.wait_for_rank0(f"logged/{comm.runs}/{s}", "its logging", opts.measure_timeout)
        if j == 0:
            comm.release(f"logged/{comm.runs}/{s}")

    bar = tqdm(total=config.steps, initial=start, disable=not (opts.progress and j == 0), file=sys.stderr,
               desc=f"{config.algo} x{m} ranks", dynamic_ncols=True, mininterval=0.5)  # fmt: skip
    ckpts = Checkpoints(outp if j == 0 else None, execution, config.to_dict())
    if not opts.resume:
        log(0, None)
        if outp is not None:
            ckpts.write(_gather_state(comm, state))
    first_bad, local_loss, diverged_at, message = math.inf, None, None, None
    step_s = comm_s = 0.0
    for t in range(start, config.steps):
        comm.step = t
        c0, t0 = comm.comm_s, time.perf_counter()
        lr_t = lr_at(t, config.lr, config.warmup, config.milestones)
        batch = batch0 if t == start else tuple(b.unsqueeze(0) for b in problem.batch(j, t))
        nb = static_nb or (sched.neighbours(t, j) if sched is not None else None)
        mix = (lambda X: comm.gossip(X[0], nb).unsqueeze(0)) if nb is not None else (lambda X: X)
        new, losses = algo(state, _Grads(grads_base, comm, batch, reduce), mix, lr_t, acfg)
        if config.mix_buffers and new.buffers:
            new = dataclasses.replace(new, buffers=_mix_buffers(comm, new.buffers, nb))
        state, local_loss = new, float(losses[0])
        if first_bad == math.inf and not (math.isfinite(local_loss) and bool(torch.isfinite(state.W).all())):
            first_bad = t
        step_s += time.perf_counter() - t0
        comm_s += comm.comm_s - c0
        s = state.step
        logging = (
            due(s, config.log_every, config.steps)
            or s == config.steps
            or any(
                due(s, e, config.steps)
                for e in (config.hess_every, config.drift_every, config.sharpness_every)
            )
        )
        may_ckpt = outp is not None and s < config.steps
        step_due, holding, ckpt = may_ckpt and ckpts.step_due(s), ckpts.pending is not None, False
        if logging or step_due or holding:  # a held checkpoint is confirmed at the very next step
            clock = may_ckpt and j == 0 and ckpts.clock_due()  # rank 0's clock decides for all
            flag = torch.tensor([first_bad, 0.0 if clock else 1.0], dtype=torch.float64, device=comm.device)
            flag = comm.all_reduce(flag, "the divergence check", op=dist.ReduceOp.MIN).cpu()
            if math.isfinite(float(flag[0])):
                diverged_at = int(flag[0])
                ckpts.drop()
                lr_bad = lr_at(diverged_at, config.lr, config.warmup, config.milestones)
                message = (
                    f"diverged at step {diverged_at}: a worker's local loss or parameters became non-finite "
                    f"(lr={lr_bad:g}); stopped; {ckpts.note()}"
                )
                break
            ckpts.confirm()
            ckpt = step_due or float(flag[1]) == 0.0
        if logging:
            log(s, local_loss)
        if ckpt:
            ckpts.hold(_gather_state(comm, state))
        bar.update(1)
    bar.close()
    full = None if diverged_at is not None else _gather_state(comm, state)
    mine = torch.tensor([step_s, comm_s], dtype=torch.float64, device=comm.device)
    timing = comm.all_reduce(mine.clone(), "the timing summary").cpu() / m
    slowest = comm.all_reduce(mine.clone(), "the timing summary", op=dist.ReduceOp.MAX).cpu()
    steps_done = max(1, state.step - start)
    if j != 0:
        return None
    if message is not None:
        print(message, file=sys.stderr)
    assert logger is not None
    wall = time.perf_counter() - t_begin
    res = RunResult(config, logger.metrics, full or state, diverged_at is not None, diverged_at, outp,
                    execution, problem, message, wall)  # fmt: skip
    if outp is not None:
        _finish(outp, res)
        info = json.loads((outp / "result.json").read_text())
        n = steps_done
        info["distributed"] = {
            "world_size": m, "backend": comm.backend, "device": str(comm.device), "steps_timed": n,
            "step_s_mean": float(timing[0]) / n, "comm_s_mean": float(timing[1]) / n,
            "compute_s_mean": float(timing[0] - timing[1]) / n,
            "step_s_slowest_rank": float(slowest[0]) / n, "comm_s_slowest_rank": float(slowest[1]) / n,
        }  # fmt: skip
        write_json(outp / "result.json", info)
    return res


def _mix_buffers(comm: Comm, buffers: Params, nb: Any) -> Params:
    """The floating-point buffers gossiped with the same P(t) (``nb``), or averaged (``nb`` None)."""
    keys = [k for k, v in buffers.items() if v.is_floating_point()]
    if not keys:
        return buffers
    flat = flatten({k: buffers[k] for k in keys})
    if nb is not None:
        flat = comm.gossip(flat, nb, "the gossip exchange of buffers")
    else:
        flat = comm.all_reduce(flat.clone(), "all_reduce of the buffers") / comm.world
    out = dict(buffers)
    offset = 0
    for k in keys:
        n = buffers[k].numel()
        out[k] = flat[offset : offset + n].reshape(buffers[k].shape)
        offset += n
    return out
