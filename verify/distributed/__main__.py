"""``torchrun --nproc-per-node N -m verify.distributed [dsgd-verify run options] [--timeout S] ...``.

Every rank parses the same options (those of ``dsgd-verify run``, plus ``--config FILE`` to replay a run's
``config.json``), joins the process group and runs :func:`verify.distributed.transport.run_rank`. A failure on
any rank ends every rank: the failing rank and those that lose it print one line naming the rank at fault,
record it in the rendezvous store and leave with ``os._exit`` (a broken process group must not hang the exit).
Exit status: 0 done, 1 diverged or a rank failed, 2 bad settings, 129 the launcher (or torchrun's agent) went
away (one line per rank, no rank blamed), 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from collections.abc import Sequence

from sharpness.arguments import OneLineParser

from ..options import add_distributed_arguments, add_run_arguments, config_for, run_folder
from .comm import (
    Comm,
    DistributedRunError,
    close,
    connect,
    launcher_gone,
    leave_without_launcher,
    watch_parent,
)
from .transport import Options, run_rank

EPILOG = """\
Multi-host: the same command on every host with torchrun's --nnodes/--node-rank/--rdzv-endpoint HOST:PORT
(gloo: set GLOO_SOCKET_IFNAME to the interface the hosts share); --out must be writable by rank 0."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
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


def _die(comm: Comm | None, message: str, code: int, culprit: bool = False) -> None:
    if launcher_gone():  # whatever failed here, the cause is the launcher's end
        leave_without_launcher()
    if comm is not None and culprit:
        message = comm.record(message, comm.rank)
    print(f"dsgd-verify distributed: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "RANK" in os.environ:  # started by a launcher: stop when it goes away
        watch_parent()
    comm = None
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = config_for(args, world)
        cfg.validate()
        out = run_folder(args)
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
