"""The run loop: m simulated workers as one stacked computation, with logging, checkpoints, resume and
divergence.

``run(config)`` trains ``config.workers`` models with one algorithm of :mod:`verify.algorithms` on a
:class:`~verify.problems.Problem` (built from the config, or passed in memory) and measures, every
``log_every`` steps, the average model ``w_a`` and the spread of the workers (:mod:`verify.measures`).

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
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sharpness.functional import Params, resolve_device

from . import measures
from .algorithms import CENTRALISED, GOSSIP, AlgoConfig, State, get, lr_at
from .config import DTYPES, ConfigError, RunConfig, build_problem
from .problems import Problem
from .rundir import (
    Checkpoints,
    MetricsWriter,
    load_ckpt,
    prepare_out,
    read_metrics,
    save_average,
    save_ckpt,
    versions,
    write_config,
)  # fmt: skip
from .stacked import choose_execution, local_grads
from .topology import schedule

Callback = Callable[[int, State, Problem], "dict[str, Any] | None"]
BASE_COLUMNS = ["step", "lr", "batch_loss", "consensus_distance", "consensus_distance_sqrt",
                "train_loss", "train_acc", "test_loss", "test_acc"]  # fmt: skip
ENSEMBLE_COLUMNS = ["ensemble_acc", "ensemble_nll", "ece", "avg_acc", "avg_nll", "avg_ece"]
#: Settings a resumed run may change (everything else must match the saved config).
RESUMABLE_CHANGES = ("steps", "log_every", "ckpt_every", "ckpt_seconds", "device")


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

    @property
    def columns(self) -> dict[str, list[Any]]:
        keys: list[str] = []
        for row in self.metrics:
            keys += [k for k in row if k not in keys]
        return {k: self.column(k) for k in keys}


def average_buffers(buffers: Params, mix_buffers: bool = False) -> Params:
    """The average model's BatchNorm buffers: worker 0's (the paper's code) or, with ``mix_buffers``, the
    workers' mean of every floating-point buffer (integer counters from worker 0)."""
    if not mix_buffers:
        return {k: v[0] for k, v in buffers.items()}
    return {k: (v.mean(0) if v.is_floating_point() else v[0]) for k, v in buffers.items()}


def _due(s: int, every: int, steps: int) -> bool:
    return bool(every) and (s % every == 0 or s == steps)


class _Runner:
    """One run's fixed parts (problem, algorithm, schedule, metrics writer); the loop is in :func:`run`."""

    def __init__(
        self,
        config: RunConfig,
        problem: Problem,
        out: Path | None,
        callback: Callback | None,
        perturbation: Any,
    ) -> None:
        self.cfg, self.problem, self.out, self.callback = config, problem, out, callback
        self.algo = get(config.algo)
        self.acfg = AlgoConfig(config.momentum, config.weight_decay, config.rho, config.sigma,
                               perturbation, config.local_steps, config.seed)  # fmt: skip
        self.sched = (
            schedule(config.topology, problem.m, config.shuffle, config.seed)
            if config.algo in GOSSIP
            else None
        )
        self.static_mix = self.sched.mixer(0, config.mix_method) if self.sched and self.sched.static else None
        self.metrics: list[dict[str, Any]] = []
        self.writer: MetricsWriter | None = None
        self.t0 = time.perf_counter()

    def mixer(self, t: int) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.sched is None:
            return lambda W: W
        return self.static_mix or self.sched.mixer(t, self.cfg.mix_method)

    def mix_buffers(self, buffers: Params, t: int, mix: Callable) -> Params:
        algo, avg = self.cfg.algo, lambda v: v.mean(0, keepdim=True).expand_as(v).clone()
        if algo == "local-sgd" and (t + 1) % self.cfg.local_steps:
            return buffers
        f = mix if algo in GOSSIP else avg
        return {k: (f(v) if v.is_floating_point() else v) for k, v in buffers.items()}

    def measure(self, s: int, state: State, batch_loss: float | None) -> dict[str, Any]:
        cfg, problem, W = self.cfg, self.problem, state.W
        bufs = average_buffers(state.buffers, cfg.mix_buffers)
        w_a, cd = W.mean(0), measures.consensus_distance(W)
        row: dict[str, Any] = {"step": s, "lr": lr_at(s, cfg.lr, cfg.warmup, cfg.milestones),
                               "batch_loss": batch_loss, "consensus_distance": cd,
                               "consensus_distance_sqrt": math.sqrt(cd)}  # fmt: skip
        row.update(problem.evaluate(w_a, bufs, samples=cfg.eval_samples))
        if _due(s, cfg.hess_every, cfg.steps):
            D = measures.deviations(W)
            row["trace_h_xi"] = (
                0.0 if cd == 0 else measures.trace_h_xi(problem, w_a, D, bufs, cfg.hess_samples)
            )
        if _due(s, cfg.drift_every, cfg.steps):
            row["drift"] = 0.0 if cd == 0 else measures.drift(problem, W, bufs)
        if cfg.ensemble:
            row.update(measures.ensemble_metrics(problem, W, state.buffers, bufs))
        if _due(s, cfg.sharpness_every, cfg.steps):
            row.update(measures.sharpness_at(problem, w_a, bufs, samples=cfg.hess_samples, seed=cfg.seed))
        row["elapsed_s"] = time.perf_counter() - self.t0
        if self.callback is not None:
            row.update(self.callback(s, state, problem) or {})
        return row

    def reopen(self, step: int) -> None:
        """Resume: keep the rows logged up to ``step`` (file and memory), append after them."""
        assert self.out is not None
        self.writer = MetricsWriter(self.out / "metrics.csv", BASE_COLUMNS, keep_until=step)
        self.metrics = [{k: v for k, v in r.items() if v is not None} for r in read_metrics(self.out)]

    def log(self, s: int, state: State, batch_loss: float | None) -> dict[str, Any]:
        row = self.measure(s, state, batch_loss)
        self.metrics.append(row)
        if self.out is not None:
            if self.writer is None:
                cols = BASE_COLUMNS + (["trace_h_xi"] if self.cfg.hess_every else [])
                cols += (["drift"] if self.cfg.drift_every else []) + (
                    ENSEMBLE_COLUMNS if self.cfg.ensemble else []
                )
                cols += (["trace_h", "lambda_max"] if self.cfg.sharpness_every else []) + ["elapsed_s"]
                cols += [k for k in row if k not in cols]
                self.writer = MetricsWriter(self.out / "metrics.csv", cols)
            self.writer.write(row)
        return row


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
    """Run ``config`` (module docstring); write the run directory ``out`` when given.

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
    config.device, config.dtype = str(problem.device), str(problem.dtype).replace("torch.", "")
    outp = Path(out) if out is not None else None
    if outp is not None:
        prepare_out(outp, resume, overwrite, config.to_dict(), RESUMABLE_CHANGES)
    runner = _Runner(config, problem, outp, callback, perturbation)
    t_start = time.perf_counter()
    if resume:
        if outp is None:
            raise ConfigError("resume needs the run directory (out)")
        state, execution = load_ckpt(outp, problem.device, problem.m, problem.num_params, problem.buffers)
        if state.step > config.steps:
            raise ConfigError(f"the checkpoint is at step {state.step}, beyond steps={config.steps}")
    else:
        W, B = problem.init_stacked()
        if config.algo in CENTRALISED:
            W = W.mean(0, keepdim=True).expand_as(W).clone()
        state = State(W, B, None, 0)
        execution = config.execution
        if execution == "auto":
            execution = choose_execution(problem, state.W, state.buffers, problem.batches(0))
    grads_base = local_grads(problem, execution)
    if outp is not None and not resume:
        info = {
            "execution": execution,
            "m": problem.m,
            "d": problem.num_params,
            "problem": type(problem).__name__,
            "device": str(problem.device),
            "dtype": config.dtype,
            "versions": versions(),
            "source": source,
        }
        write_config(outp, config.to_dict(), info)
    start = state.step
    ckpts = Checkpoints(outp, execution, config.to_dict())
    if resume:
        runner.reopen(start)
    else:
        runner.log(0, state, None)
        ckpts.write(state)
    diverged_at, message, batch_loss = None, None, None
    bar = tqdm(total=config.steps, initial=start, disable=not progress, file=sys.stderr, desc=config.algo,
               dynamic_ncols=True, mininterval=0.5)  # fmt: skip
    every_bar = max(1, config.steps // 200)
    for t in range(start, config.steps):
        lr_t = lr_at(t, config.lr, config.warmup, config.milestones)
        batches = problem.batches(t)
        mix = runner.mixer(t)
        new, losses = runner.algo(state, lambda W, B: grads_base(W, B, batches), mix, lr_t, runner.acfg)
        if not bool(torch.isfinite(losses).all() & torch.isfinite(new.W).all()):
            bad = losses[~torch.isfinite(losses)]
            what = f"the local loss is {float(bad[0])}" if bad.numel() else "the parameters became non-finite"
            diverged_at = t
            ckpts.drop()
            message = f"diverged at step {t}: {what} (lr={lr_t:g}); stopped; {ckpts.note()}"
            break
        ckpts.confirm()  # the held state's local losses (computed in this update) were finite
        if config.mix_buffers and new.buffers:
            new = dataclasses.replace(new, buffers=runner.mix_buffers(new.buffers, t, mix))
        state, batch_loss = new, float(losses.mean())
        if on_step is not None:
            on_step(state.step, state)
        s = state.step
        if (
            _due(s, config.log_every, config.steps)
            or s == config.steps
            or any(
                _due(s, e, config.steps)
                for e in (config.hess_every, config.drift_every, config.sharpness_every)
            )
        ):
            row = runner.log(s, state, batch_loss)
            bar.set_postfix(
                loss=f"{row.get('train_loss', batch_loss):.4g}", TrXi=f"{row['consensus_distance']:.3g}"
            )
        elif s % every_bar == 0 and progress:
            bar.set_postfix(loss=f"{batch_loss:.4g}", TrXi=f"{measures.consensus_distance(state.W):.3g}")
        if s < config.steps and (ckpts.step_due(s) or ckpts.clock_due()):
            ckpts.hold(state)
        bar.update(1)
    bar.close()
    if message is not None:
        print(message, file=sys.stderr)
    result = RunResult(config, runner.metrics, state, diverged_at is not None, diverged_at, outp, execution,
                       problem, message, time.perf_counter() - t_start)  # fmt: skip
    if outp is not None:
        _finish(outp, result)
    return result


def _finish(out: Path, res: RunResult) -> None:
    from sharpness.results import write_json

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
        "last": res.metrics[-1] if res.metrics else None,
    })  # fmt: skip
