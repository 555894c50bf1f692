"""What a figure reads: the preset's run directories under ``--runs`` and the suite report, checked on access.

A run directory is accepted only if its ``config.json`` matches the preset's settings for that run (the device
aside), so a figure never silently mixes runs made with other settings; a missing or different run is a
one-line :class:`~figures.sources.FiguresError` that says how to produce it (``--rerun``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from verify.config import RunConfig
from verify.speed import RESUMABLE

from .presets import Preset, RunSpec
from .sources import FiguresError, Report, RunData, load_report, load_run

#: Settings that may differ between a saved run and the preset without making it another run (rounding or
#: bookkeeping only; verify.speed.RESUMABLE: the speed options that do not change the arithmetic's precision).
IGNORED_SETTINGS = ("device", "execution", "mix_method", "ckpt_every", *RESUMABLE)
#: What a run's config.json that predates a setting meant by it.
DEFAULTS = RunConfig().to_dict()


def config_mismatch(saved: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """The first setting where a saved run's config differs from the wanted one, as text, or None; a setting
    the saved config predates is RunConfig's default."""
    for k, v in wanted.items():
        if k in IGNORED_SETTINGS:
            continue
        if k not in saved and k not in DEFAULTS:
            return f"{k} is not recorded"
        s = saved.get(k, DEFAULTS.get(k))
        if isinstance(v, (int, float)) and isinstance(s, (int, float)) and not isinstance(v, bool):
            if float(s) != float(v):
                return f"{k} = {s!r}, the preset wants {v!r}"
        elif (list(s) if isinstance(s, tuple) else s) != (list(v) if isinstance(v, tuple) else v):
            return f"{k} = {s!r}, the preset wants {v!r}"
    return None


def run_status(spec: RunSpec, runs_dir: Path) -> str | None:
    """Why the run directory of ``spec`` cannot be used (missing, unfinished, other settings), or None."""
    path = runs_dir / spec.label
    if not (path / "config.json").is_file():
        return f"run {path} is missing"
    try:
        run = load_run(path)
    except FiguresError as exc:
        return str(exc)
    diff = config_mismatch(run.config, spec.config)
    if diff:
        return f"run {path} was made with other settings ({diff})"
    if run.result is None:
        return f"run {path} is unfinished (no result.json)"
    return None


@dataclass
class FigureContext:
    """The preset, where runs and the report live, where figures go, and the device for checkpoint work."""

    preset: Preset
    runs_dir: Path
    report_dir: Path
    out: Path
    device: str = "cpu"
    _runs: dict[str, RunData] = field(default_factory=dict)
    _report: Report | None = None

    def run(self, spec: RunSpec) -> RunData:
        """The run directory of ``spec``, checked against the preset."""
        if spec.label not in self._runs:
            why = run_status(spec, self.runs_dir)
            if why:
                raise FiguresError(
                    f"{why}; produce it with: dsgd-figures all --preset {self.preset.name}"
                    f"{self.preset.flags} --runs {self.runs_dir} --rerun"
                )
            self._runs[spec.label] = load_run(self.runs_dir / spec.label)
        return self._runs[spec.label]

    def runs(self, key: str, batch: str) -> list[RunData]:
        """All seeds of one role (at least one must exist)."""
        specs = self.preset.find(key, batch)
        if not specs:
            raise FiguresError(f"preset {self.preset.name} has no {key} run at the {batch} batch")
        return [self.run(s) for s in sorted(specs, key=lambda s: s.seed)]

    def seed0(self, key: str, batch: str) -> RunData:
        spec = self.preset.first(key, batch)
        if spec is None:
            raise FiguresError(f"preset {self.preset.name} has no {key} run at the {batch} batch")
        return self.run(spec)

    def report(self) -> Report:
        if self._report is None:
            if not (self.report_dir / "report.json").is_file():
                raise FiguresError(
                    f"no suite report in {self.report_dir}; produce it with: dsgd-figures all "
                    f"--preset {self.preset.name} --runs {self.runs_dir} --rerun, or "
                    f"dsgd-verify check --{self.preset.suite_mode} --report {self.report_dir}"
                )
            self._report = load_report(self.report_dir)
        return self._report

    def rel(self, path: Path) -> str:
        """A path for a caption: relative to the current folder when it lies below it."""
        try:
            return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(path)
