"""``dsgd-figures all|NAME... [--preset quick|fmnist|paper] [--runs DIR] [--rerun] [--out DIR]``.

Draws the figures of the preset from saved run directories (``--runs``, default the preset's:
``runs/figures-<preset>``, with ``-<precision>`` appended for a precision other than fp32, or for ``fmnist``
T11's folder ``results/t11-fmnist``) and the suite report (``--report``, default ``<runs>/suite``);
``--rerun`` first produces whatever is missing through verify's API. Which figures ``all`` means depends on
the preset (:func:`figures.catalog.modules_for`); naming one that does not apply to it is a bad argument.
Writes ``<out>/<figN_topic>.png`` (150 dpi), ``.pdf``, the caption ``.md`` / ``.json`` and ``<out>/index.md``.
Exit status 1 if a figure could not be drawn (the reason is printed and put in the gallery), 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from sharpness.arguments import OneLineParser
from sharpness.functional import resolve_device
from verify.speed import PRECISIONS, Speed

from .catalog import MODULES, check_applies, checks_needed, module, modules_for, render, runs_needed
from .context import FigureContext
from .gallery import write_gallery
from .presets import PRESETS, Preset, get_preset
from .sources import FiguresError
from .t11_scale import BATCHES, protocol_mismatch, saved_protocol, saved_wall, series_files


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="dsgd-figures", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "figures",
        nargs="*",
        default=["all"],
        metavar="all|NAME",
        help=f"'all' or figure names ({', '.join(MODULES)}; 'fig4' or 'consensus' also work)",
    )
    p.add_argument("--preset", default="quick", choices=PRESETS, help="default: quick")
    p.add_argument(
        "--runs",
        default=None,
        metavar="DIR",
        help="run directories (default the preset's: runs/figures-<preset>; fmnist: results/t11-fmnist)",
    )
    p.add_argument("--report", default=None, metavar="DIR", help="suite report folder (default <runs>/suite)")
    p.add_argument("--rerun", action="store_true", help="produce missing runs and suite checks first")
    p.add_argument("--out", default="figures/out", metavar="DIR", help="output folder (default figures/out)")
    p.add_argument("--data", default=None, metavar="DIR", help="data folder for the fmnist / paper presets")
    p.add_argument("--seeds", type=int, default=None, help="seeds per run (default: the preset's)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: the preset's")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="arithmetic of the runs' training gradients (verify.speed; default fp32); a non-default one "
        "keeps its runs in runs/figures-<preset>-<precision>",
    )
    p.add_argument("--channels-last", action="store_true", help="channels-last training gradients (--rerun)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training gradients (--rerun)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list the figures and the preset's runs, then exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        speed = Speed(args.precision, args.channels_last, args.compile)
        preset = get_preset(args.preset, data=args.data, seeds=args.seeds, speed=speed)
        names = args.figures or ["all"]
        mods = modules_for(preset) if "all" in names else [module(n) for n in names]
        check_applies(mods, preset)
    except FiguresError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    suffix = "" if args.precision == "fp32" else f"-{args.precision}"
    runs_dir = Path(args.runs or preset.runs_dir + suffix)
    report_dir = Path(args.report) if args.report else runs_dir / "suite"
    device = args.device or preset.device
    expected = _expected_time(preset, runs_dir)
    if args.list:
        for m in mods:
            print(f"{m.NAME}: {m.TITLE}")
        print(f"\npreset {preset.name}: {preset.description}\nexpected time: {expected}")
        if preset.runs_kind == "t11":
            _list_t11(preset, runs_dir)
        for r in runs_needed(mods, preset):
            print(f"  {runs_dir / r.label}")
        return 0
    t0 = time.perf_counter()
    if args.rerun:
        try:
            if preset.runs_kind == "t11":
                _produce_t11(preset, runs_dir, args.device, not args.quiet)
            else:
                _produce(preset, mods, runs_dir, report_dir, device, not args.quiet)
        except (FiguresError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    t_inputs = time.perf_counter() - t0
    ctx = FigureContext(preset, runs_dir, report_dir, Path(args.out), str(resolve_device(device)))
    failures: dict[str, str] = {}
    for m in mods:
        try:
            r = render(m, ctx)
            print(f"{m.NAME}: {r.png} ({r.seconds:.1f} s)")
        except FiguresError as exc:
            failures[m.NAME] = str(exc)
            print(f"{m.NAME}: NOT DRAWN: {exc}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - one broken figure must not stop the others
            traceback.print_exc(file=sys.stderr)
            failures[m.NAME] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"{m.NAME}: NOT DRAWN: {failures[m.NAME]}", file=sys.stderr)
    total = time.perf_counter() - t0
    inputs = (
        f"T11's runs from `{runs_dir}` (`python -m verify.claims.largebatch --scale {preset.protocol.scale} "
        f"--out {runs_dir}`)"
        if preset.runs_kind == "t11"
        else f"Runs from `{runs_dir}`, suite report from `{report_dir}`"
    )
    header = (
        f"Preset `{preset.name}`: {preset.description}. {inputs}. Regenerate with `dsgd-figures all --preset "
        f"{preset.name}{preset.flags} --rerun` (expected time: {expected}; this rendering took "
        f"{time.perf_counter() - t0:.0f} s, of which {t_inputs:.0f} s producing missing inputs)."
    )
    index = write_gallery(ctx.out, header, failures, [m.NAME for m in modules_for(preset)])
    print(
        f"gallery: {index}; {len(mods) - len(failures)}/{len(mods)} figures in {total:.0f} s "
        f"(inputs {t_inputs:.0f} s, drawing {total - t_inputs:.0f} s)"
    )
    return 1 if failures else 0


def _expected_time(preset: Preset, runs_dir: Path) -> str:
    """The preset's expected time, and for T11's runs what the saved ones took (their ``wall_s``)."""
    if preset.runs_kind != "t11":
        return preset.expected_time
    try:
        n, wall = saved_wall(runs_dir)
    except (OSError, ValueError):
        return preset.expected_time
    if not n:
        return preset.expected_time
    took = f"the {n} runs saved in {runs_dir} took {wall / 60:.1f} min (wall_s summed; parallel ones overlap)"
    return f"{preset.expected_time}; {took}"


def _list_t11(preset: Preset, runs_dir: Path) -> None:
    """What the T11 figure reads: the protocol check and each series file, saved or missing."""
    try:
        saved = saved_protocol(runs_dir)
        diff = protocol_mismatch(saved, preset.protocol) if saved is not None else None
    except FiguresError as exc:
        saved, diff = None, str(exc)
    state = "no report.json yet" if saved is None and diff is None else diff and f"other protocol: {diff}"
    print(f"T11 folder {runs_dir} ({state or 'protocol matches'}):")
    have = {p.name for ps in series_files(runs_dir).values() for p in ps}
    for s in range(preset.protocol.seeds):
        for b in BATCHES:
            name = f"series_{b}_seed{s}.csv"
            print(f"  {runs_dir / name} ({'saved' if name in have else 'missing'})")


def _produce_t11(preset: Preset, runs_dir: Path, device: str | None, progress: bool) -> None:
    from .produce import produce_t11_runs

    protocol = preset.protocol if device is None else replace(preset.protocol, device=device)
    t = time.perf_counter()
    todo = produce_t11_runs(protocol, runs_dir, progress)
    if todo:
        print(f"{len(todo)} T11 runs in {time.perf_counter() - t:.0f} s", file=sys.stderr)


def _produce(preset, mods, runs_dir: Path, report_dir: Path, device: str, progress: bool) -> None:  # noqa: ANN001
    from .produce import missing_checks, missing_runs, produce_report, produce_runs

    todo = missing_runs(runs_needed(mods, preset), runs_dir)
    if todo:
        t = time.perf_counter()
        produce_runs(todo, runs_dir, device, progress)
        print(f"{len(todo)} runs in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    from verify.claims.registry import sort_key

    checks = sorted((c for c in checks_needed(mods) if c in preset.suite_checks), key=sort_key)
    if checks and missing_checks(checks, report_dir):
        t = time.perf_counter()
        produce_report(preset, checks, report_dir, device)
        print(f"suite checks in {time.perf_counter() - t:.0f} s", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
