"""``dsgd-verify``: run D-SGD / C-SGD / SAM side by side on one machine, and check the paper's claims.

``dsgd-verify run --algo dsgd --topology ring --workers 16 --lr 0.1 --local-batch 16 --steps 500
--data digits --model mlp --out runs/x`` (also ``python -m verify run ...``). ``dsgd-verify check ...`` runs
the claim checks (:mod:`verify.claims.runner`) once that module is installed. Bad input exits with status 2
and one line.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sharpness.arguments import OneLineParser

from .distributed.launch import add_launch_arguments, cmd_launch
from .engine import run
from .options import DESCRIPTION, add_run_arguments, config_from_args, run_folder, trusted_base
from .rundir import read_config


def cmd_run(args: argparse.Namespace) -> int:
    if getattr(args, "launcher", "none") != "none":  # one process per worker: verify.distributed
        return cmd_launch(args)
    out = run_folder(args)
    if out is None:
        raise ValueError("give --out DIR (or --resume RUN)")
    base = None
    if args.resume:
        base = trusted_base(read_config(Path(out))["config"], f"{out}/config.json", args)
    cfg = config_from_args(args, base)
    res = run(cfg, out, progress=not args.no_progress, resume=bool(args.resume), overwrite=args.overwrite)
    last = res.metrics[-1] if res.metrics else {}
    tl = last.get("train_loss", math.nan)
    status = f"diverged at step {res.diverged_at}" if res.diverged else f"done: {res.state.step} steps"
    print(f"{status}; train_loss={tl:.6g}, Tr Xi={last.get('consensus_distance', math.nan):.6g}, "
          f"test_acc={last.get('test_acc', math.nan):.4g}; run in {out}")  # fmt: skip
    return 1 if res.diverged else 0


def build_parser(with_check: bool = False) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dsgd-verify", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("run", help="train with one algorithm, log measurements", description=DESCRIPTION,
                       formatter_class=raw)  # fmt: skip
    add_run_arguments(p)
    add_launch_arguments(p)  # --launcher torchrun|local, --procs, --timeout
    p.set_defaults(func=cmd_run)
    c = sub.add_parser("check", help="run the claim checks of the paper (verify.claims)")
    runner = _claims_runner() if with_check else None
    if runner is not None:
        runner.add_arguments(c)
        c.set_defaults(func=runner.main)
    else:
        c.add_argument("rest", nargs=argparse.REMAINDER)
        c.set_defaults(func=_no_claims)
    try:
        c.add_argument("--debug", action="store_true", help="show tracebacks")
    except argparse.ArgumentError:  # the claims runner defines it already
        pass
    return parser


def _claims_runner() -> Any:
    try:
        from .claims import runner  # written by the claims helper
    except ImportError:
        return None
    return runner if hasattr(runner, "add_arguments") and hasattr(runner, "main") else None


def _no_claims(args: argparse.Namespace) -> int:
    raise ValueError("the claim checks are not installed here (verify.claims.runner is missing)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(with_check="check" in argv[:1])
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        where = args.resume if isinstance(getattr(args, "resume", None), str) else getattr(args, "out", None)
        how = f"dsgd-verify run --resume {where}" if where else "--resume RUN"
        print(f"dsgd-verify: interrupted; continue from the last checkpoint with {how}", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError) as exc:
        if getattr(args, "debug", False):
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"dsgd-verify: error: {text}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, or user code that failed mid-run: one line unless --debug
        if getattr(args, "debug", False):
            raise
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        print(f"dsgd-verify: internal error: {type(exc).__name__}: {text} (rerun with --debug for the "
              "traceback)", file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
