"""``torchrun --nproc-per-node N -m verify.distributed [dsgd-verify run options] [--timeout S] ...``.

Every rank parses the same options (those of ``dsgd-verify run``, plus ``--config FILE`` to replay a run's
``config.json``), joins the process group and runs :func:`verify.distributed.worker.run_rank`. A failure on
any rank ends every rank: the failing rank and those that lose it print one line naming the rank at fault,
record it in the rendezvous store and leave with ``os._exit`` (a broken process group must not hang the exit).
Exit status: 0 done, 1 diverged or a rank failed, 2 bad settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from ..cli import add_run_arguments, config_from_args
from ..config import RunConfig
from ..rundir import read_config
from .comm import Comm, DistributedRunError, close, connect
from .worker import Options, run_rank

EPILOG = """\
Multi-host: the same command on every host with torchrun's --nnodes/--node-rank/--rdzv-endpoint HOST:PORT
(gloo: set GLOO_SOCKET_IFNAME to the interface the hosts share); --out must be writable by rank 0."""


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the distributed engine itself (not part of the run configuration)."""
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds any rank waits for a peer's message or a collective before the run fails with a "
        "message naming the rank at fault (default 60)",
    )
    p.add_argument(
        "--measure-timeout",
        type=float,
        default=3600.0,
        help="seconds the other ranks wait while rank 0 alone evaluates, measures sharpness and writes files "
        "at a log step (default 3600)",
    )
    p.add_argument(
        "--backend", choices=("auto", "gloo", "nccl"), default="auto", help="auto: NCCL on CUDA, gloo on CPU"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m verify.distributed",
        epilog=EPILOG,
        description="Real multi-process D-SGD: one worker per torch.distributed rank.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(p)
    add_distributed_arguments(p)
    p.add_argument(
        "--config",
        help="a run's config.json (or a RunConfig JSON object) to replay; options given here override it",
    )
    return p


def load_config_file(path: str | Path) -> RunConfig:
    """A RunConfig from a run directory's ``config.json`` (``{"config": ...}``) or a bare RunConfig JSON."""
    obj = json.loads(Path(path).read_text())
    return RunConfig.from_dict(obj["config"] if isinstance(obj, dict) and "config" in obj else obj)


def config_for(args: argparse.Namespace, world: int) -> RunConfig:
    """The run configuration: ``--config`` or the resumed run's, overridden by the options given; workers
    defaults to the number of processes."""
    out = args.resume if isinstance(args.resume, str) else args.out
    base = None
    if args.config:
        base = load_config_file(args.config)
    elif args.resume and out is not None:
        base = RunConfig.from_dict(read_config(Path(out))["config"])
    cfg = config_from_args(args, base)
    if args.workers is None and base is None:
        cfg.workers = world
    return cfg


def _die(comm: Comm | None, message: str, code: int, culprit: bool = False) -> None:
    if comm is not None and culprit:
        message = comm.record(message, comm.rank)
    print(f"dsgd-verify distributed: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    comm = None
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = config_for(args, world)
        cfg.validate()
        out = args.resume if isinstance(args.resume, str) else args.out
        comm = connect(args.timeout, args.backend, cfg.device)
        opts = Options(
            args.timeout, args.measure_timeout, not args.no_progress, bool(args.resume), args.overwrite
        )
        res = run_rank(comm, cfg, out, opts)
    except DistributedRunError as exc:
        _die(comm, str(exc), 1)
    except KeyboardInterrupt:
        _die(comm, f"rank {comm.rank if comm else '?'} interrupted", 130, culprit=True)
    except (ValueError, OSError, KeyError) as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        rank = comm.rank if comm else os.environ.get("RANK", "?")
        _die(comm, f"rank {rank} stopped: {text}", 2, culprit=True)
    except BaseException as exc:  # a bug: show it, and tell the other ranks who stopped
        traceback.print_exc()
        rank = comm.rank if comm else os.environ.get("RANK", "?")
        _die(comm, f"rank {rank} crashed: {type(exc).__name__}: {str(exc)[:200]}", 1, culprit=True)
    assert comm is not None
    close(comm)
    code = 0
    if res is not None:
        last = res.metrics[-1] if res.metrics else {}
        status = f"diverged at step {res.diverged_at}" if res.diverged else f"done: {res.state.step} steps"
        print(f"{status} on {comm.world} ranks ({comm.backend}); "
              f"train_loss={last.get('train_loss', math.nan):.6g}, "
              f"Tr Xi={last.get('consensus_distance', math.nan):.6g}; run in {out}", flush=True)  # fmt: skip
        code = 1 if res.diverged else 0
    return code


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # torch's interpreter teardown takes seconds; every file is written and closed by now
