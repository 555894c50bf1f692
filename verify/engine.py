"""The run loop, with logging, checkpoints, resume and divergence: one loop for the simulation and for
``torch.distributed``, which differ only in their transport (:mod:`verify.transport`).

``run(config)`` trains ``config.workers`` models with one algorithm of :mod:`verify.algorithms` on a
:class:`~verify.problems.Problem` (built from the config, or passed in memory), all m in this process
(:class:`verify.transport.Stacked`), and measures, every ``log_every`` steps, the average model ``w_a`` and
the spread of the workers (:mod:`verify.measures`). :func:`run_loop` is the loop itself, for any transport
(:mod:`verify.distributed` gives one rank per worker).

Per step t: batches ``problem.batches(t)`` (stateless in (seed, j, t)), learning rate ``lr_at(t)``, gossip
``P(t)`` from :func:`verify.topology.schedule` (its ``mixer``), then ``state <- step(state, grads, mix, lr,
cfg)``. A row logged at step s describes the state after s updates. Metrics columns: ``step``; ``lr`` (the
rate of the update from s to s + 1); ``batch_loss`` (mean of the m local mini-batch losses of the update that
led to s); ``consensus_distance`` = Tr Xi (this paper's unit) and ``consensus_distance_sqrt`` (Kong et al.'s
unit); ``train_loss``/``train_acc``/``test_loss``/``test_acc`` of w_a (eval mode; BatchNorm: worker 0's
running statistics, or the workers' mean with ``mix_buffers``); ``trace_h_xi`` (every ``hess_every``),
``drift`` (every ``drift_every``),
``ensemble_acc``/``ensemble_nll``/``ece``/``avg_acc``/``avg_nll``/``avg_ece`` (``ensemble``),
``trace_h``/``lambda_max`` (every ``sharpness_every``), ``elapsed_s``, and whatever ``callback`` returns.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sharpness.functional import resolve_device
from sharpness.results import environment, write_json

from . import measures
from .algorithms import AlgoConfig, State, lr_at, record
from .config import DTYPES, ConfigError, RunConfig, build_problem
from .problem import Problem
from .rundir import Checkpoints, MetricsWriter, read_metrics, save_average, save_ckpt, write_config
from .speed import RESUMABLE, training_grads
from .speed import check as check_speed
from .transport import Stacked, Transport, average_buffers

Callback = Callable[[int, State, Problem], "dict[str, Any] | None"]
BASE_COLUMNS = ["step", "lr", "batch_loss", "consensus_distance", "consensus_distance_sqrt",
                "train_loss", "train_acc", "test_loss", "test_acc"]  # fmt: skip
#: Settings a resumed run may change (everything else must match the saved config).
RESUMABLE_CHANGES = ("steps", "log_every", "ckpt_every", "ckpt_seconds", "device", *RESUMABLE)


@dataclass
class RunResult:
    """What a run returns: its ``metrics`` rows, final ``state`` (the last finite one if it diverged) and
    flags."""

    config: RunConfig
    metrics: list[dict[str, Any]]
    state: State
    diverged: bool
    diverged_at: int | None
    out: Path | None
    execution: str
    problem: Problem
    message: str | None = None
    wall_s: float = 0.0

    def column(self, name: str) -> list[Any]:
        """One metric over the logged rows (None where it was not measured)."""
        return [row.get(name) for row in self.metrics]


class _Log:
    """The metrics rows: kept in memory and, on the writing process, appended to ``metrics.csv``."""

    def __init__(self, config: RunConfig, out: Path | None) -> None:
        self.cfg, self.out = config, out
        self.metrics: list[dict[str, Any]] = []
        self.writer: MetricsWriter | None = None

    def reopen(self, step: int) -> None:
        """Resume: keep the rows logged up to ``step`` (file and memory), append after them."""
        if self.out is not None:
            self.writer = MetricsWriter(self.out / "metrics.csv", BASE_COLUMNS, keep_until=step)
            self.metrics = [{k: v for k, v in r.items() if v is not None} for r in read_metrics(self.out)]

    def add(self, row: dict[str, Any]) -> None:
        self.metrics.append(row)
        if self.out is None:
            return
        if self.writer is None:
            cfg = self.cfg
            cols = BASE_COLUMNS + (["trace_h_xi"] if cfg.hess_every else [])
            cols += (["drift"] if cfg.drift_every else []) + (
                list(measures.ENSEMBLE_COLUMNS) if cfg.ensemble else []
            )
            cols += (["trace_h", "lambda_max"] if cfg.sharpness_every else []) + ["elapsed_s"]
            cols += [k for k in row if k not in cols]
            self.writer = MetricsWriter(self.out / "metrics.csv", cols)
        self.writer.write(row)


def run(
    config: RunConfig,
    out: str | Path | None = None,
    *,
    progress: bool = True,
    resume: bool = False,
    problem: Problem | None = None,
    callback: Callback | None = None,
    on_step: Callable[[int, State], None] | None = None,
    perturbation: Callable[[int], torch.Tensor] | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Run ``config`` (module docstring) with all m workers in this process; write the run directory ``out``
    when given.

    ``problem``: a ready problem (its m, local batch, device and dtype win over the config's device/dtype);
    ``callback(step, state, problem)`` at every logged step (a returned dict joins the row); ``on_step(step,
    state)`` after every update; ``perturbation(t) -> (m, d)``: avgsam's eps at step t (e.g. a D-SGD run's
    deviations); ``resume``: continue ``out`` from its checkpoint, ending bit-identical to an uninterrupted
    run. Cost per step: the algorithm's gradients (m, or 2m for sam) and one gossip product; per log: the
    measurements.
    """
    config = dataclasses.replace(config).validate()
    source = "config" if problem is None else "in-memory"
    if problem is None:
        device, dtype = resolve_device(config.device), DTYPES[config.dtype]
        problem = build_problem(config, device, dtype)
    elif problem.m != config.workers or problem.local_batch != config.local_batch:
        raise ConfigError(f"the problem has m={problem.m}, b={problem.local_batch}; the config says "
                          f"workers={config.workers}, local_batch={config.local_batch}")  # fmt: skip
    result = run_loop(config, problem, Stacked(), out, progress=progress, resume=resume,
                      overwrite=overwrite, callback=callback, on_step=on_step, perturbation=perturbation,
                      source=source)  # fmt: skip
    assert result is not None  # the stacked transport writes
    return result


def run_loop(
    config: RunConfig,
    problem: Problem,
    transport: Transport,
    out: str | Path | None = None,
    *,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callback | None = None,
    on_step: Callable[[int, State], None] | None = None,
    perturbation: Callable[[int], torch.Tensor] | None = None,
    source: str = "config",
) -> RunResult | None:
    """The run loop of :func:`run` over the rows ``transport`` holds (:mod:`verify.transport`); returns the
    result on the process that writes (``transport.writes``), None elsewhere.

    Per step t: ``(batches, mix) = transport.begin(t)``, the algorithm's step on the rows held, a
    divergence flag (a non-finite local loss or parameter), the BatchNorm buffers mixed or averaged as the
    algorithm says. Divergence is agreed on at every step the transport agrees for free, else at every log
    and checkpoint step and the step after a checkpoint was held; the step reported is the first that
    diverged anywhere, and each row keeps its last finite state."""
    config.device, config.dtype = str(problem.device), str(problem.dtype).replace("torch.", "")
    algorithm = record(config.algo)
    outp = Path(out) if out is not None else None
    if resume and outp is None:
        raise ConfigError("resume needs the run directory (out)")
    transport.setup(problem, config, algorithm)
    check_speed(problem, config)  # before the run folder is touched (a compilation can still fail later)
    transport.prepare(outp, resume, overwrite, RESUMABLE_CHANGES)
    acfg = AlgoConfig.of(config, perturbation=perturbation, workers=problem.m, first=transport.first)
    t_start = time.perf_counter()
    if resume:
        assert outp is not None
        state, execution = transport.resume(outp)
        if state.step > config.steps:
            raise ConfigError(f"the checkpoint is at step {state.step}, beyond steps={config.steps}")
    else:
        W, B = problem.init_stacked()
        if algorithm.kind == "centralised":
            W = W.mean(0, keepdim=True).expand_as(W).clone()
        state = transport.take(State(W, B, None, 0))
        execution = transport.execution(state, transport.begin(0)[0])
    grads_base = training_grads(problem, execution, config)  # the speed options (verify.speed)
    writes = transport.writes
    if writes and outp is not None and not resume:
        info = {"execution": execution, "m": problem.m, "d": problem.num_params,
                "problem": type(problem).__name__, "device": str(problem.device), "dtype": config.dtype,
                "versions": environment(problem.device), "source": source, **transport.info()}  # fmt: skip
        write_config(outp, config.to_dict(), info)
    start, t0 = state.step, time.perf_counter()
    ckpts = Checkpoints(outp if writes else None, execution, config.to_dict())
    log = _Log(config, outp if writes else None)
    bar = tqdm(total=config.steps, initial=start, disable=not (progress and writes), file=sys.stderr,
               desc=config.algo + transport.label, dynamic_ncols=True, mininterval=0.5)  # fmt: skip

    def measure(s: int, losses: torch.Tensor | None) -> None:
        row = transport.row(s, state, losses)
        if row is not None:
            row["elapsed_s"] = time.perf_counter() - t0
            if callback is not None:
                row.update(callback(s, state, problem) or {})
            log.add(row)
            shown = row.get("train_loss", row["batch_loss"])
            if shown is not None:
                bar.set_postfix(loss=f"{shown:.4g}", TrXi=f"{row['consensus_distance']:.3g}")
        transport.after_log(s)

    if resume:
        log.reopen(start)
    else:
        measure(0, None)
        if outp is not None:
            ckpts.write(transport.gather(state))
    first_bad, what, diverged_at, message = None, "", None, None
    step_s = comm_s = 0.0
    every_bar = max(1, config.steps // 200)
    for t in range(start, config.steps):
        c0, ts = transport.comm_s, time.perf_counter()
        lr_t = lr_at(t, config.lr, config.warmup, config.milestones)
        batches, mix = transport.begin(t)
        new, losses = algorithm.step(state, transport.grads(grads_base, batches, algorithm.reduce), mix,
                                     lr_t, acfg)  # fmt: skip
        if config.mix_buffers and new.buffers:
            if algorithm.kind == "gossip" or algorithm.averages(t, acfg):
                new = dataclasses.replace(
                    new, buffers=transport.mix_buffers(new.buffers, algorithm.kind == "gossip")
                )
        if first_bad is None and not bool(torch.isfinite(losses).all() & torch.isfinite(new.W).all()):
            bad = losses[~torch.isfinite(losses)]
            first_bad = t
            what = f"the local loss is {float(bad[0])}" if bad.numel() else "the parameters became non-finite"
        if first_bad is None:
            state = new
        step_s += time.perf_counter() - ts
        comm_s += transport.comm_s - c0
        s = t + 1
        logging = s == config.steps or any(
            measures.due(s, e, config.steps)
            for e in (config.log_every, config.hess_every, config.drift_every, config.sharpness_every)
        )
        may_ckpt = outp is not None and s < config.steps
        step_due, ckpt = may_ckpt and ckpts.step_due(s), False
        if transport.every_step or logging or step_due or ckpts.pending is not None:
            clock = may_ckpt and writes and ckpts.clock_due()
            agreed, clock = transport.agree(first_bad, clock)
            if agreed is not None:
                diverged_at = agreed
                ckpts.drop()
                if agreed != first_bad:
                    what = "a worker's local loss or parameters became non-finite"
                lr_bad = lr_at(agreed, config.lr, config.warmup, config.milestones)
                message = f"diverged at step {agreed}: {what} (lr={lr_bad:g}); stopped; {ckpts.note()}"
                break
            ckpts.confirm()  # the held state's local losses (computed in this update) were finite
            ckpt = step_due or clock
        if on_step is not None and first_bad is None:
            on_step(state.step, state)
        if logging:
            measure(s, losses)
        elif progress and s % every_bar == 0 and state.m == problem.m:
            bar.set_postfix(
                loss=f"{float(losses.mean()):.4g}", TrXi=f"{measures.consensus_distance(state.W):.3g}"
            )
        if ckpt:
            ckpts.hold(transport.gather(state))
        bar.update(1)
    bar.close()
    final = transport.gather(state)
    extra = transport.summary(step_s, comm_s, max(1, state.step - start))
    if not writes:
        return None
    if message is not None:
        print(message, file=sys.stderr)
    result = RunResult(config, log.metrics, final or state, diverged_at is not None, diverged_at, outp,
                       execution, problem, message, time.perf_counter() - t_start)  # fmt: skip
    if outp is not None:
        finish(outp, result, extra)
    return result


def finish(out: Path, res: RunResult, extra: dict[str, Any] | None = None) -> None:
    """The end of a run in ``out``: ``ckpt.pt`` and ``avg.pt`` unless it diverged, and ``result.json`` (plus
    the transport's ``extra`` entries)."""
    if not res.diverged:
        save_ckpt(out, res.state, res.execution, res.config.to_dict())
        bufs = average_buffers(res.state.buffers, res.config.mix_buffers)
        save_average(
            out, res.problem, res.state.W.mean(0), bufs, {"step": res.state.step, "algo": res.config.algo}
        )
    write_json(out / "result.json", {
        "diverged": res.diverged, "diverged_at": res.diverged_at, "message": res.message,
        "steps_done": res.diverged_at if res.diverged else res.state.step,
        "execution": res.execution, "wall_s": res.wall_s,
        "last": res.metrics[-1] if res.metrics else None, **(extra or {}),
    })  # fmt: skip
