"""Time per step of real multi-process D-SGD (``verify.distributed``, one process per worker, gloo on
127.0.0.1) against the simulated engine (``verify.engine``, the m workers stacked in one process), for the
same configuration.

For each case (model, algorithm) the simulation runs ``--steps`` steps in this process and its time per step
is the mean gap between consecutive ``on_step`` calls (logging excluded); the distributed run is started with
the local launcher and reports, per rank, the time per step and the part of it spent waiting for
communication (gossip ``isend``/``irecv``, or the gradient ``all_reduce`` of C-SGD), averaged over the ranks
(``result.json``, block ``distributed``); compute = step - communication. Start-up is the wall time of the
whole launch (process start, ``import torch``, rendezvous, data, the run itself).

    .venv/bin/python benchmarks/bench_distributed.py [--procs 4] [--steps 300] [--sim-threads N]

On a machine with fewer cores than processes the ranks time-share the cores, and time a rank spends
descheduled while a neighbour waits for it is counted as that neighbour's communication.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from verify.config import RunConfig
from verify.distributed.launch import launch_local
from verify.engine import run

CASES = [
    ("mlp [32]", "dsgd", {"model": "mlp", "model_kwargs": {"hidden": [32]}}),
    ("mlp [512, 512]", "dsgd", {"model": "mlp", "model_kwargs": {"hidden": [512, 512]}}),
    ("small_cnn", "dsgd", {"model": "small_cnn"}),
    ("mlp [32]", "csgd", {"model": "mlp", "model_kwargs": {"hidden": [32]}}),
]


def sim_step_s(cfg: RunConfig) -> tuple[float, float, int]:
    """(mean seconds per step, wall seconds of the whole run, d) of the simulated engine on ``cfg``."""
    stamps: list[float] = []
    t0 = time.perf_counter()
    res = run(cfg, None, progress=False, on_step=lambda s, st: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return sum(gaps) / len(gaps), wall, int(res.state.W.shape[1])


def dist_step_s(cfg: RunConfig, procs: int, tmp: Path) -> tuple[dict, float]:
    """(``distributed`` block of result.json, wall seconds of the launch) for ``cfg`` on ``procs`` ranks."""
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    out = tmp / "run"
    args = ["--config", str(path), "--out", str(out), "--overwrite", "--no-progress", "--timeout", "120"]
    t0 = time.perf_counter()
    res = launch_local(args, procs, timeout=120.0, log_dir=tmp)
    wall = time.perf_counter() - t0
    if res.returncode:
        logs = "\n".join((tmp / f"rank{r}.log").read_text() for r in range(procs))
        raise SystemExit(f"the distributed run failed ({res.failure}):\n{logs}")
    return json.loads((out / "result.json").read_text())["distributed"], wall


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--local-batch", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--sim-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the simulation"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.sim_threads)
    # what the local launcher gives each rank: OMP_NUM_THREADS if set, else cores // procs
    rank_threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.procs)))
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores (load average {load}); simulation: "
        f"{args.sim_threads} threads; distributed: {args.procs} processes x {rank_threads} thread(s), gloo"
    )
    print(
        f"m = {args.procs} workers, local batch {args.local_batch}, {args.steps} steps, {args.dtype}, "
        "digits, ring; times in ms per step (dist: mean over ranks; slowest: the slowest rank's)"
    )
    head = (
        f"{'model':<15} {'algo':<5} {'d':>8} | {'sim step':>8} | {'dist step':>9} {'compute':>8} "
        f"{'comm':>8} {'slowest':>8} | {'dist/sim':>8} | {'sim wall s':>10} {'dist wall s':>11}"
    )
    print(head)
    print("-" * len(head))
    for name, algo, extra in CASES:
        cfg = RunConfig(algo=algo, topology="ring", workers=args.procs, lr=0.05, local_batch=args.local_batch,
                        steps=args.steps, dtype=args.dtype, device="cpu", data="digits", log_every=0,
                        ensemble=False, **extra)  # fmt: skip
        sim, sim_wall, d = sim_step_s(cfg)
        with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
            info, wall = dist_step_s(cfg, args.procs, Path(tmp))
        step, comm, comp = info["step_s_mean"], info["comm_s_mean"], info["compute_s_mean"]
        print(f"{name:<15} {algo:<5} {d:>8} | {sim * 1e3:>8.3f} | {step * 1e3:>9.3f} {comp * 1e3:>8.3f} "
              f"{comm * 1e3:>8.3f} {info['step_s_slowest_rank'] * 1e3:>8.3f} | {step / sim:>8.2f} | "
              f"{sim_wall:>10.2f} {wall:>11.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
