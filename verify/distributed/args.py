"""Command-line options of the distributed engine, shared by ``python -m verify.distributed`` and
``dsgd-verify run --launcher ...``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import RunConfig
from ..options import config_from_args, run_folder, trusted_base
from ..rundir import read_config, read_json


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


def load_config_file(path: str | Path) -> object:
    """The settings in a run directory's ``config.json`` (``{"config": ...}``) or a bare RunConfig JSON
    object (checked by :func:`verify.cli.trusted_base`); one line naming the file if it is not JSON."""
    obj = read_json(Path(path))
    return obj["config"] if isinstance(obj, dict) and "config" in obj else obj


def config_for(args: argparse.Namespace, world: int) -> RunConfig:
    """The run configuration: ``--config`` or the resumed run's, overridden by the options given; workers
    defaults to the number of processes."""
    out = run_folder(args)
    base = None
    if getattr(args, "config", None):
        base = trusted_base(load_config_file(args.config), str(args.config), args)
    elif args.resume and out is not None:
        base = trusted_base(read_config(Path(out))["config"], f"{out}/config.json", args)
    cfg = config_from_args(args, base)
    if args.workers is None and base is None:
        cfg.workers = world
    return cfg
