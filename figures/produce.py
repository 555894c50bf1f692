"""``--rerun``: produce the missing inputs of the figures through verify's public API, before drawing.

Runs go through :func:`verify.engine.run` (a run directory per :class:`~figures.presets.RunSpec`; an
unfinished one with a checkpoint is resumed, one made with other settings is overwritten); suite checks
through :func:`verify.claims.runner.run_checks` and :func:`verify.claims.report.write_report`. A preset of
T11's runs (``runs_kind == "t11"``) gets its missing seeds and batches from
:func:`verify.claims.largebatch.run_protocol` with ``resume``, the code path of ``python -m
verify.claims.largebatch --scale S --out DIR``, into the same folder. This is the
only place where ``figures`` causes training; without ``--rerun`` the figures only read files.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from sharpness.functional import resolve_device
from verify.claims import largebatch
from verify.claims.registry import get
from verify.claims.report import write_report
from verify.claims.runner import run_checks
from verify.config import RunConfig
from verify.engine import run

from .context import config_mismatch, run_status
from .presets import Preset, RunSpec
from .sources import FiguresError, load_report, load_run
from .t11_scale import protocol_mismatch, saved_protocol


def missing_runs(specs: Iterable[RunSpec], runs_dir: Path) -> list[RunSpec]:
    """The specs whose run directory is missing, unfinished or made with other settings."""
    return [s for s in specs if run_status(s, runs_dir) is not None]


def produce_runs(specs: Iterable[RunSpec], runs_dir: Path, device: str, progress: bool = True) -> list[Path]:
    """Run every spec into ``runs_dir/<label>`` with :func:`verify.engine.run`. Cost: the runs themselves."""
    done = []
    specs = list(specs)
    for i, spec in enumerate(specs, 1):
        out = runs_dir / spec.label
        config = RunConfig.from_dict(dict(spec.config, device=device))
        resume = False
        if (out / "ckpt.pt").is_file() and not (out / "result.json").is_file():
            resume = config_mismatch(load_run(out).config, spec.config) is None
        t0 = time.perf_counter()
        print(
            f"[{i}/{len(specs)}] {'resuming' if resume else 'running'} {spec.label} -> {out}", file=sys.stderr
        )
        res = run(config, out=out, progress=progress, resume=resume, overwrite=not resume)
        if res.diverged:
            print(f"  {spec.label}: {res.message}", file=sys.stderr)
        print(f"  {spec.label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        done.append(out)
    return done


def missing_checks(check_ids: Iterable[str], report_dir: Path) -> list[str]:
    """The check ids absent from the report in ``report_dir`` (all of them when there is no report)."""
    ids = list(dict.fromkeys(check_ids))
    if not (report_dir / "report.json").is_file():
        return ids
    have = load_report(report_dir).checks
    return [c for c in ids if c not in have]


def produce_report(preset: Preset, check_ids: Iterable[str], report_dir: Path, device: str) -> Path:
    """Run ``check_ids`` of the suite in the preset's mode (quick/full); write the report to ``report_dir``.

    The checks already in an existing report there are run again too, so the report stays one consistent
    run."""
    ids = list(dict.fromkeys(check_ids))
    if (report_dir / "report.json").is_file():
        ids = list(dict.fromkeys(list(load_report(report_dir).checks) + ids))
    checks = []
    for i in ids:
        try:
            checks.append(get(i))
        except ValueError:
            print(f"the suite has no check {i}: the figures that read it will say so", file=sys.stderr)
    if not checks:
        raise FiguresError(f"the suite has none of the checks {', '.join(ids)}")
    ids = [c.id for c in checks]
    quick = preset.suite_mode == "quick"
    dev = resolve_device(device)
    print(f"running the {preset.suite_mode} suite checks {', '.join(ids)} -> {report_dir}", file=sys.stderr)
    t0 = time.perf_counter()
    results = run_checks(checks, quick=quick, seed=0, device=dev)
    settings = {
        "mode": preset.suite_mode,
        "seed": 0,
        "device": str(dev),
        "only": ",".join(ids),
        "wall_seconds": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
        "produced_by": f"dsgd-figures --preset {preset.name} --rerun",
    }
    write_report(results, report_dir, settings)
    return report_dir


def missing_t11_runs(protocol: largebatch.Protocol, runs_dir: Path) -> list[tuple[int, str]]:
    """``(seed, batch)`` of the protocol with no saved run in ``runs_dir/runs`` (what
    :func:`verify.claims.largebatch.run_protocol` with ``resume`` would run)."""
    done = {(r["seed"], r["batch"]) for r in largebatch.load_runs(runs_dir)}
    return [(s, b) for s in range(protocol.seeds) for b in largebatch.BATCHES if (s, b) not in done]


def produce_t11_runs(
    protocol: largebatch.Protocol, runs_dir: Path, progress: bool = True
) -> list[tuple[int, str]]:
    """Run the protocol's missing seeds and batches into ``runs_dir`` with
    :func:`verify.claims.largebatch.run_protocol` (``resume=True``: saved runs are kept; each new run is
    saved and the report rewritten as it finishes). A folder whose ``report.json`` records another protocol,
    or that holds runs without a report, is refused (a :class:`FiguresError`): resuming would mix two
    protocols. Returns what was run. Cost: the runs (timed by ``python -m verify.claims.largebatch
    --estimate-only``)."""
    runs_dir = Path(runs_dir)
    saved = saved_protocol(runs_dir)
    if saved is not None:
        diff = protocol_mismatch(saved, protocol)
        if diff:
            raise FiguresError(
                f"{runs_dir} holds T11 runs made with another protocol ({diff}); --rerun would mix them: "
                "choose another --runs"
            )
    elif largebatch.load_runs(runs_dir):
        raise FiguresError(
            f"{runs_dir / 'runs'} holds T11 runs but no report.json: their protocol is unknown"
        )
    todo = missing_t11_runs(protocol, runs_dir)
    if todo:
        print(
            f"running T11 ({protocol.scale}) for {', '.join(f'seed {s} {b}' for s, b in todo)} -> {runs_dir}",
            file=sys.stderr,
        )
        largebatch.run_protocol(
            protocol, runs_dir, progress=progress, resume=True, log=lambda m: print(m, file=sys.stderr)
        )
    return todo
