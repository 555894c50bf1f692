"""The options of one run, shared by ``dsgd-verify run`` and ``python -m verify.distributed``: one per
:class:`~verify.config.RunConfig` field (:data:`RUN_OPTIONS`, defaults from RunConfig), the run folder
(``--out`` / ``--resume``), the configuration they give on top of a trusted saved one (``--config``, a
resumed run's), and the distributed engine's own options."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from .algorithms import ALGORITHMS
from .config import CODE_OPTIONS, ConfigError, RunConfig, check_trusted
from .models import BUILDERS
from .rundir import read_config, read_json
from .speed import PRECISIONS
from .stacked import EXECUTIONS
from .topology import BUILTINS, SCHEDULES, SHUFFLES

UPDATES = "\n".join(f"  {name:<9} {a.update}" for name, a in ALGORITHMS.items())
DESCRIPTION = f"""\
Simulate m workers as one stacked computation. Updates (g_j = gradient of worker j's local mini-batch loss):
{UPDATES}
Logged: Tr Xi = (1/m) sum_j |w_j - w_a|^2 (this paper's consensus distance; its square root is Kong et al.'s),
Tr(H Xi) = (1/m) sum_j d_j^T H(w_a) d_j, drift |mean_j grad L(w_j) - grad L(w_a)|, loss/accuracy of w_a and of
the workers' softmax ensemble (NLL, 15-bin ECE)."""


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _json_obj(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return obj


def _opt_int(text: str) -> int | None:
    return None if text.lower() in ("none", "all", "0") else int(text)


# (flag, RunConfig field, type, help); defaults come from RunConfig
RUN_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--algo", "algo", str, f"algorithm: {', '.join(ALGORITHMS)} (updates above)"),
    ("--topology", "topology", str, f"{', '.join(BUILTINS + SCHEDULES)}, or a .npy/.csv P"),
    ("--shuffle", "shuffle", str, f"time-varying P: {', '.join(s for s in SHUFFLES if s)}"
     " (random: P(t) = Pi_t^T P Pi_t)"),
    ("--mix-method", "mix_method", str, "gossip product: auto, dense (P @ W), sparse (CSR),"
     " roll (circulant P)"),
    ("--workers", "workers", int, "m, the number of simulated workers"),
    ("--lr", "lr", float, "base learning rate lr"),
    ("--local-batch", "local_batch", int, "b, samples per worker and step (total batch m*b)"),
    ("--steps", "steps", int, "number of updates"),
    ("--momentum", "momentum", float, "heavy-ball momentum mu, local buffers"
     " v_j <- mu v_j + g_j (never mixed)"),
    ("--weight-decay", "weight_decay", float, "L2 weight decay wd: g_j <- g_j + wd w_j"),
    ("--warmup", "warmup", int, "warm-up steps: lr * max(0.1, t/warmup) for t < warmup"),
    ("--milestones", "milestones", _int_list, "comma-separated steps where lr is multiplied by 0.1"),
    ("--dtype", "dtype", str, "float32 or float64"),
    ("--device", "device", str, "auto (CUDA when present), cpu, cuda, cuda:N"),
    ("--seed", "seed", int, "seed of the shards, batches, noise and initialisation"),
    ("--data", "data", str, "digits, synthetic:N, cifar10:DIR, fashion-mnist:DIR,"
     " FILE.pt/.npz, MODULE:CALLABLE"),
    ("--samples", "samples", _opt_int, "use a seeded subset of this many training points"),
    ("--test-samples", "test_samples", _opt_int, "use a seeded subset of this many test points"),
    ("--alpha", "alpha", float, "Dirichlet(alpha) label-skewed shards instead of i.i.d. ones"),
    ("--model", "model", str, f"{', '.join(BUILDERS)} or MODULE:CALLABLE"),
    ("--model-kwargs", "model_kwargs", _json_obj, 'JSON keyword arguments of the model,'
     ' e.g. \'{"hidden": [64]}\''),
    ("--init", "init", str, "same (every worker starts equal) or independent"
     " (worker j: its own seeded init)"),
    ("--closed-form", "closed_form", _json_obj,
     'closed-form loss instead of data+model, e.g. \'{"loss": "quadratic", "h": [1, 2], "noise_std": 1}\''),
    ("--log-every", "log_every", int, "log metrics every N steps (0: first and last only)"),
    ("--eval-samples", "eval_samples", _opt_int, "evaluate train loss/acc on a seeded subset of this size"),
    ("--hess-every", "hess_every", int, "Tr(H Xi) every N steps, m HVPs (0: never)"),
    ("--hess-samples", "hess_samples", _opt_int, "HVPs on a fixed seeded subset of the training set"),
    ("--drift-every", "drift_every", int, "drift every N steps, m+1 full gradients (0: never)"),
    ("--sharpness-every", "sharpness_every", int, "Tr H (Hutchinson) and lambda_max (Lanczos) every N steps"),
    ("--ckpt-every", "ckpt_every", int, "also checkpoint every N steps (always at the start and the end)"),
    ("--ckpt-seconds", "ckpt_seconds", float, "also checkpoint once this much wall time (s) has passed since"
     " the last checkpoint (0: off)"),
    ("--execution", "execution", str, f"{', '.join(EXECUTIONS)}: how the m local gradients are computed"),
    ("--rho", "rho", float, "SAM radius rho"),
    ("--sigma", "sigma", float, "avgsam perturbation scale sigma"),
    ("--local-steps", "local_steps", int, "local-sgd: H local steps between exact averagings"),
    ("--precision", "precision", str, f"{', '.join(PRECISIONS)}: the arithmetic of the training gradients"
     " only (tf32: CUDA; bf16: autocast, float32 runs); measurements stay in --dtype (verify.speed)"),
]  # fmt: skip


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    defaults = RunConfig()
    for flag, name, typ, text in RUN_OPTIONS:
        p.add_argument(
            flag, dest=name, type=typ, default=None, help=f"{text} (default {getattr(defaults, name)!r})"
        )
    p.add_argument(
        "--no-ensemble",
        dest="ensemble",
        action="store_false",
        default=None,
        help="skip the worker-ensemble metrics (m forward passes over the test set per log)",
    )
    p.add_argument(
        "--mix-buffers",
        dest="mix_buffers",
        action="store_true",
        default=None,
        help="gossip BatchNorm running statistics too (default: local, w_a takes worker 0's)",
    )
    p.add_argument(
        "--channels-last",
        dest="channels_last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="4-d inputs and conv weights in the channels-last memory format for the training gradients "
        "(a stated no-op without them; default off)",
    )
    p.add_argument(
        "--compile",
        dest="compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the training gradients; no compiler here: one line, exit 2 (default off)",
    )
    p.add_argument("--out", required=False, help="run directory (config.json, metrics.csv, ckpt.pt, avg.pt)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN",
        help="continue RUN (or --out) from its checkpoint; the result equals an uninterrupted run",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run files already in --out")
    p.add_argument(
        "--trust-config",
        action="store_true",
        help="let a configuration read from a file (--resume's config.json, --config) import and call the "
        "MODULE:CALLABLE models, losses and data specs it names; without it only the toolkit's own are used",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")  # fmt: skip


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """A RunConfig: ``base`` (defaults, or a resumed run's saved config) overridden by the options given."""
    cfg = dataclasses.replace(base) if base is not None else RunConfig()
    for f in dataclasses.fields(RunConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            setattr(cfg, f.name, v)
    return cfg


def run_folder(args: argparse.Namespace) -> str | None:
    """The run directory: ``--resume RUN`` or ``--out DIR``; refuses both naming different folders (a resumed
    run continues in its own folder)."""
    if isinstance(args.resume, str):
        if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
            raise ValueError(
                f"--resume {args.resume} continues that run in its own folder, but --out says {args.out}: "
                "give one of them"
            )
        return args.resume
    return args.out


def trusted_base(saved: object, source: str, args: argparse.Namespace) -> RunConfig:
    """The configuration ``saved`` read from the file ``source`` (errors name the file), once
    :func:`verify.config.check_trusted` lets it name the code it names (given on the command line, or
    ``--trust-config``)."""
    if not isinstance(saved, dict):
        raise ConfigError(f"{source} does not hold a run configuration (a JSON object of settings)")
    try:
        config = RunConfig.from_dict(saved).validate()
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{source}: {str(exc).splitlines()[0]}") from None
    given = {name for name in CODE_OPTIONS if getattr(args, name, None) is not None}
    check_trusted(config, source, given, bool(getattr(args, "trust_config", False)))
    return config


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
