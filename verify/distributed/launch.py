"""Start N ranks of ``python -m verify.distributed`` on this machine, on loopback only.

- ``torchrun``: ``python -m torch.distributed.run --nnodes 1 --nproc-per-node N --rdzv-backend c10d
  --rdzv-endpoint 127.0.0.1:0 --local-addr 127.0.0.1 --max-restarts 0 -m verify.distributed ...``: the
  port is picked by the OS when torchrun binds it, so parallel runs never collide; torchrun's agent hosts
  the store, and ends every rank when one fails.
- ``local``: the same without torchrun's agent: this process hosts the ``TCPStore`` on 127.0.0.1 (port
  picked by the OS) and starts the N ranks itself. When one fails, the others get ``timeout + 5`` seconds to
  fail by themselves (each names the rank at fault); the rank recorded as the culprit is ended as soon as it
  is the only one left; then whatever still runs is terminated (SIGTERM, then SIGKILL) and every child is
  reaped.

Both set ``GLOO_SOCKET_IFNAME`` to the loopback interface, so gloo binds nowhere else.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from ..options import add_distributed_arguments, config_for, run_folder
from .comm import HOSTED_STORE_ENV, WATCH_PREFIX, loopback_ifname
from .transport import preflight

LAUNCHERS = ("none", "torchrun", "local")


@dataclass
class LaunchResult:
    """``returncode`` (0 when every rank succeeded, else the first failing rank's code), every rank's exit
    code (``codes``; local launcher only), the first rank to fail and the recorded diagnosis."""

    returncode: int
    codes: list[int] = field(default_factory=list)
    first_failed: int | None = None
    failure: str | None = None
    culprit: int | None = None
    wall_s: float = 0.0


def loopback_env(procs: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the ranks: gloo on loopback, ``OMP_NUM_THREADS`` = cores / procs and
    ``TORCH_CPP_LOG_LEVEL=ERROR`` unless set."""
    out = dict(os.environ if env is None else env)
    lo = loopback_ifname()
    if lo is not None:
        out.setdefault("GLOO_SOCKET_IFNAME", lo)
    out.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, procs))))
    # c10d's C++ warnings (a store write after the launcher went away: 25 lines each) are not for users;
    # the ranks report failures themselves, one line each
    out.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    return out


def torchrun_command(procs: int, args: list[str]) -> list[str]:
    """The torchrun command line that starts ``procs`` ranks of ``verify.distributed`` on loopback."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(procs),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--local-addr", "127.0.0.1",
            "--max-restarts", "0", "-m", "verify.distributed", *args]  # fmt: skip


def _stop(procs: list[subprocess.Popen], which: list[int], grace: float = 3.0) -> None:
    for r in which:
        if procs[r].poll() is None:
            procs[r].terminate()
    deadline = time.monotonic() + grace
    for r in which:
        try:
            procs[r].wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            procs[r].kill()
            procs[r].wait()


def launch_local(
    args: list[str],
    procs: int,
    *,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    log_dir: str | Path | None = None,
    command: list[str] | None = None,
) -> LaunchResult:
    """Start ``procs`` ranks of ``command + args`` (default ``python -m verify.distributed``) with a store
    hosted here; wait for them; return their exit codes. ``log_dir``: write rank r's stdout and stderr to
    ``rank{r}.log`` there (default: inherit this process's). Every child is reaped before returning."""
    if procs < 1:
        raise ValueError(f"--procs must be >= 1; got {procs}")
    t_start = time.monotonic()
    store = dist.TCPStore("127.0.0.1", 0, procs, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=max(timeout, 5.0)))  # fmt: skip
    base = loopback_env(procs, env)
    base.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "WORLD_SIZE": str(procs),
                 "LOCAL_WORLD_SIZE": str(procs), HOSTED_STORE_ENV: "1"})  # fmt: skip
    logs = []
    children: list[subprocess.Popen] = []
    try:
        for r in range(procs):
            out = None
            if log_dir is not None:
                out = open(Path(log_dir) / f"rank{r}.log", "w")  # noqa: SIM115 (closed below)
                logs.append(out)
            cmd = [*(command or [sys.executable, "-m", "verify.distributed"]), *args]
            env_r = {**base, "RANK": str(r), "LOCAL_RANK": str(r)}
            err = subprocess.STDOUT if out else None
            children.append(subprocess.Popen(cmd, env=env_r, stdout=out, stderr=err))
        first, deadline = None, None
        while any(p.poll() is None for p in children):
            codes = [p.poll() for p in children]
            if first is None:
                bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if bad:
                    first, deadline = bad[0], time.monotonic() + timeout + 5.0
            if first is not None:
                alive = [r for r, c in enumerate(codes) if c is None]
                culprit = _culprit(store)
                if time.monotonic() > deadline or alive == [culprit]:  # type: ignore[operator]
                    _stop(children, alive)
            time.sleep(0.05)
        codes = [p.wait() for p in children]
    except BaseException:
        _stop(children, list(range(len(children))))
        raise
    finally:
        for f in logs:
            f.close()
    if first is None and any(codes):
        first = next(r for r, c in enumerate(codes) if c)
    failure = _read(store, "failure")
    res = LaunchResult(codes[first] if first is not None else 0, codes, first, failure, _culprit(store),
                       time.monotonic() - t_start)  # fmt: skip
    del store
    return res


def _read(store: object, key: str) -> str | None:
    full = f"{WATCH_PREFIX}/{key}"
    try:
        return store.get(full).decode() if store.check([full]) else None  # type: ignore[attr-defined]
    except RuntimeError:
        return None


def _culprit(store: object) -> int | None:
    v = _read(store, "culprit")
    return int(v) if v is not None else None


def launch_torchrun(args: list[str], procs: int, env: dict[str, str] | None = None) -> LaunchResult:
    """Run :func:`torchrun_command` (output inherited) and return its exit status."""
    t0 = time.monotonic()
    proc = subprocess.Popen(torchrun_command(procs, args), env=loopback_env(procs, env))
    try:
        code = proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    return LaunchResult(code, wall_s=time.monotonic() - t0)


# ---------------------------------------------------------------------- dsgd-verify run --launcher
def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    """``--launcher``, ``--procs`` and the distributed engine's options, for ``dsgd-verify run``."""
    p.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="none",
        help="none: simulate the workers in this process (default); torchrun: one process per worker via "
        "torchrun on 127.0.0.1; local: the same without torchrun's agent",
    )
    p.add_argument("--procs", type=int, default=None, help="processes (= workers) to start with --launcher")
    add_distributed_arguments(p)


def _terminated(signum: int, frame: object) -> None:
    print(f"dsgd-verify: terminated (signal {signum}); stopping the ranks", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def cmd_launch(args: argparse.Namespace) -> int:
    """``dsgd-verify run --launcher torchrun|local --procs N ...``: write the configuration to a temporary
    ``config.json``, start the ranks on loopback with ``--config`` pointing at it, return their status."""
    out = run_folder(args)
    if out is None:
        raise ValueError("give --out DIR (or --resume RUN)")
    procs = args.procs if args.procs is not None else args.workers
    if procs is None:
        raise ValueError("give --procs N (one process per worker)")
    cfg = config_for(args, procs)
    preflight(cfg, procs, out, bool(args.resume), args.overwrite)  # once here, not in every rank
    with tempfile.TemporaryDirectory(prefix="dsgd-launch-") as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(cfg.to_dict()))
        # the ranks read back the configuration checked above (config_for), written by this process
        rest = [
            "--config",
            str(path),
            "--trust-config",
            "--timeout",
            str(args.timeout),
            "--backend",
            args.backend,
        ]
        rest += ["--measure-timeout", str(args.measure_timeout)]
        rest += ["--resume", str(out)] if args.resume else ["--out", str(out)]
        rest += ["--overwrite"] * bool(args.overwrite) + ["--no-progress"] * bool(args.no_progress)
        previous = signal.signal(signal.SIGTERM, _terminated)  # SIGTERM: stop and reap the ranks first
        try:
            if args.launcher == "torchrun":
                res = launch_torchrun(rest, procs)
            else:
                res = launch_local(rest, procs, timeout=args.timeout)
        finally:
            signal.signal(signal.SIGTERM, previous)
    if res.returncode and res.failure:
        print(f"dsgd-verify: the distributed run failed: {res.failure}", file=sys.stderr)
    return res.returncode
