"""The ``check`` command: run the registered checks, print the table, write the report.

``dsgd-verify check [--quick|--full] [--only T1,T6] [--seed S] [--device auto|cpu|cuda] [--report DIR]
[--scale digits|fmnist|paper] [--data SPEC] [--list]`` (also ``python -m verify.claims ...``). Quick mode
skips ``full_only`` checks unless ``--only`` names them. Exit status 1 when a check FAILs (an asserted
criterion or control, or a crash), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sharpness.functional import SharpnessInputError, resolve_device

from .base import Check, CheckResult, ClaimsError, Context, ControlResult
from .registry import all_checks, get
from .report import format_table, write_report
from .stationary import single_thread


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``check`` options to ``parser``."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", dest="full", action="store_false", help="small protocols, minutes on CPU (default)"
    )
    mode.add_argument("--full", dest="full", action="store_true", help="more grid points, seeds, steps")
    parser.set_defaults(full=False)
    parser.add_argument("--only", default=None, metavar="IDS", help="comma-separated check ids, e.g. T1,T6")
    parser.add_argument("--seed", type=int, default=0, help="base seed of every check (default 0)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    parser.add_argument("--report", default="reports/latest", metavar="DIR", help="default: reports/latest")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument(
        "--scale", default=None, choices=["digits", "fmnist", "paper"],
        help="scale of the empirical check T11: digits (default), fmnist or paper (CIFAR-10, needs --data)",
    )  # fmt: skip
    parser.add_argument(
        "--data", default=None, metavar="SPEC", help="data of the scaled check, e.g. cifar10:DIR"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsgd-verify check", description="Check the claims of Zhu et al. (ICML 2023) numerically."
    )
    add_arguments(parser)
    return parser


def select_checks(only: str | None, full: bool) -> tuple[list[type[Check]], list[str]]:
    """The checks to run and the ids skipped (``full_only`` ones in quick mode, unless named in ``only``)."""
    if only:
        ids = [s for s in (p.strip() for p in only.split(",")) if s]
        if not ids:
            raise ClaimsError("--only names no check id")
        chosen = [get(i) for i in ids]
        return list(dict.fromkeys(chosen)), []
    checks = all_checks()
    if full:
        return checks, []
    return [c for c in checks if not c.full_only], [c.id for c in checks if c.full_only]


def execute(cls: type[Check], ctx: Context) -> CheckResult:
    """Run one check, timing it; an exception becomes a FAIL whose note is the error (traceback on stderr)."""
    start = time.perf_counter()
    try:
        with single_thread() if cls.single_threaded else contextlib.nullcontext():
            result = cls().run(ctx)
        if not isinstance(result, CheckResult) or result.id != cls.id:
            raise ClaimsError(f"{cls.id}.run() must return its CheckResult (use self.result(...))")
    except Exception as exc:  # noqa: BLE001 - a crashing check is reported, the suite goes on
        traceback.print_exc(file=sys.stderr)
        result = CheckResult(
            id=cls.id,
            title=cls.title,
            claim=cls.claim,
            source=cls.source,
            status=cls.status,
            prediction=cls.prediction,
            measured={},
            criterion=cls.criterion,
            control=ControlResult(cls.control, {}, False),
            verdict="FAIL",
            notes=[f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"],
            asserted=cls.asserted,
            evidence=cls.evidence,
        )
    result.seconds = time.perf_counter() - start
    return result


def _progress_factory(check_id: str) -> Callable[..., Any]:
    """Inner progress bars of a check: on stderr, below the check's own bar, removed when done."""
    return partial(_inner_bar, check_id)


def _inner_bar(check_id: str, iterable: Any = None, *, desc: str | None = None, **kwargs: Any) -> Any:
    kwargs.setdefault("leave", False)
    kwargs.setdefault("position", 1)
    return tqdm(iterable, desc=f"  {check_id} {desc or ''}".rstrip(), file=sys.stderr, disable=None, **kwargs)


def run_checks(
    checks: Sequence[type[Check]],
    *,
    quick: bool = True,
    seed: int = 0,
    device: torch.device | None = None,
    show_progress: bool = True,
    options: dict[str, Any] | None = None,
) -> list[CheckResult]:
    """Run ``checks`` in order with one progress bar each (``options``: :attr:`Context.options`); returns
    their results."""
    device = device or torch.device("cpu")
    results = []
    for cls in checks:
        bar = tqdm(
            total=1,
            desc=f"{cls.id} {cls.title}"[:48],
            file=sys.stderr,
            disable=None if show_progress else True,
            leave=True,
            position=0,
        )
        progress = _progress_factory(cls.id) if show_progress else Context().progress
        ctx = Context(quick=quick, seed=seed, device=device, progress=progress, options=dict(options or {}))
        result = execute(cls, ctx)
        bar.set_postfix_str(f"{result.verdict} {result.seconds:.1f}s")
        bar.update(1)
        bar.close()
        results.append(result)
    return results


def list_text(checks: Sequence[type[Check]]) -> str:
    lines = []
    for c in checks:
        kind = "asserted" if c.asserted else "report"
        flag = "  (--full only)" if c.full_only else ""
        lines.append(f"{c.id:<5} {c.status:<9} {kind:<8} {c.title}{flag}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the suite as selected by ``args``; print the table, write the report; 1 if any check FAILed."""
    try:
        if getattr(args, "list", False):
            print(list_text(all_checks()))
            return 0
        checks, skipped = select_checks(args.only, args.full)
        device = resolve_device(args.device)
        if getattr(args, "scale", None) is not None or getattr(args, "data", None) is not None:
            from sharpness.data import load_dataset

            from .largebatch import protocol_for  # the scaled check's protocol: fail here, in one line

            load_dataset(protocol_for(args.scale or "digits", args.data).data, split="test")
    except (ClaimsError, SharpnessInputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    options = {"report": args.report}
    options.update({k: getattr(args, k) for k in ("scale", "data") if getattr(args, k, None) is not None})
    results = run_checks(checks, quick=not args.full, seed=args.seed, device=device, options=options)
    wall = time.perf_counter() - start
    settings = {
        "mode": "full" if args.full else "quick",
        "seed": args.seed,
        "device": str(device),
        "only": args.only,
        "scale": getattr(args, "scale", None),
        "skipped_full_only": skipped,
        "wall_seconds": wall,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    print(format_table(results))
    if skipped:
        print(f"skipped in --quick (full only): {', '.join(skipped)}")
    paths = write_report(results, args.report, settings)
    print(f"report: {paths['report.md'].parent}/report.md, report.json, {len(paths) - 2} CSV series")
    return 1 if any(r.verdict == "FAIL" for r in results) else 0


def cli(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m verify.claims``)."""
    return main(build_parser().parse_args(argv))
