"""Reading what the figures draw: verify run directories and verification-suite reports (files only).

- a run directory (``dsgd-verify run --out DIR``): ``config.json`` (``{"config": RunConfig, "run": {...}}``),
  ``metrics.csv`` (one row per logged step; empty cells where a quantity was not measured), ``result.json``,
  ``ckpt.pt`` (all workers stacked) and ``avg.pt`` (the average model, self-describing);
- a suite report (``dsgd-verify check --report DIR``): ``report.json`` (``{"checks": [...], "settings"}``) and
  one ``<id>_<series>.csv`` per raw series of a check.

Run directories are read with :mod:`verify.rundir`'s readers (the files' one writer); nothing here trains or
measures; a missing or malformed file raises :class:`FiguresError` with one line naming it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from verify.rundir import RunDirError, parse_metrics, read_config, read_json


class FiguresError(ValueError):
    """A missing or malformed input of a figure; the message is one line naming the problem."""


def read_json_file(path: Path) -> Any:
    """A JSON file's content; one-line :class:`FiguresError` naming the file if it cannot be read or
    parsed (:func:`verify.rundir.read_json`)."""
    try:
        return read_json(path)
    except RunDirError as exc:
        raise FiguresError(str(exc)) from None


def read_csv_columns(path: Path) -> dict[str, np.ndarray]:
    """A CSV with a header row as columns: numeric columns as float arrays (empty cells -> NaN), others as
    strings."""
    if not path.is_file():
        raise FiguresError(f"{path} not found")
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise FiguresError(f"{path} is empty") from None
        rows = [r for r in reader if r]
    bad = [i for i, r in enumerate(rows) if len(r) != len(header)]
    if bad:
        raise FiguresError(
            f"{path}: row {bad[0] + 2} has {len(rows[bad[0]])} cells, the header {len(header)}"
        )
    out: dict[str, np.ndarray] = {}
    for k, name in enumerate(header):
        cells = [r[k] for r in rows]
        try:
            out[name] = np.array([float(c) if c not in ("", "None") else np.nan for c in cells], dtype=float)
        except ValueError:
            out[name] = np.array(cells, dtype=object)
    return out


@dataclass
class RunData:
    """One run directory: ``config`` (RunConfig dict), ``run`` (resolved settings), ``metrics`` (column ->
    array), ``result`` (result.json, or None while running)."""

    path: Path
    config: dict[str, Any]
    run: dict[str, Any]
    metrics: dict[str, np.ndarray]
    result: dict[str, Any] | None

    @property
    def name(self) -> str:
        return self.path.name

    def has(self, column: str) -> bool:
        """Whether ``column`` holds at least one finite value."""
        v = self.metrics.get(column)
        return v is not None and v.dtype != object and bool(np.isfinite(v).any())

    def series(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one metric at the steps where it was measured (finite values only)."""
        if not self.has(column):
            raise FiguresError(f"run {self.path} has no measured column {column!r} in metrics.csv")
        steps, vals = self.metrics["step"], self.metrics[column]
        keep = np.isfinite(vals)
        return steps[keep], vals[keep]

    def last(self, column: str) -> float:
        """The last measured value of a column."""
        return float(self.series(column)[1][-1])

    @property
    def diverged(self) -> bool:
        return bool(self.result and self.result.get("diverged"))


def load_run(path: str | Path) -> RunData:
    """Read a run directory (config.json, metrics.csv, result.json if present) with verify's own readers
    (:mod:`verify.rundir`: a torn or unparsable metrics row is dropped, as a resumed run drops it)."""
    path = Path(path)
    if not path.is_dir():
        raise FiguresError(f"run directory {path} not found")
    try:
        cfg = read_config(path)
        if not (path / "metrics.csv").is_file():
            raise FiguresError(f"{path / 'metrics.csv'} not found")
        header, rows = parse_metrics(path / "metrics.csv")
        result = read_json(path / "result.json") if (path / "result.json").is_file() else None
    except RunDirError as exc:
        raise FiguresError(str(exc)) from None
    if "step" not in header:
        raise FiguresError(f"{path / 'metrics.csv'} has no 'step' column")
    metrics = {
        k: np.array([float(r[k]) if r[k] != "" else np.nan for r in rows], dtype=float) for k in header
    }
    return RunData(path, dict(cfg["config"]), dict(cfg.get("run", {})), metrics, result)


@dataclass
class Report:
    """A suite report folder: ``checks`` by id, ``settings``; :meth:`series` reads a check's CSV."""

    path: Path
    checks: dict[str, dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)

    def check(self, check_id: str) -> dict[str, Any]:
        if check_id not in self.checks:
            have = ", ".join(self.checks) or "none"
            raise FiguresError(f"report {self.path} has no check {check_id} (it has: {have})")
        return self.checks[check_id]

    def has_series(self, check_id: str, name: str) -> bool:
        return check_id in self.checks and (self.path / f"{check_id}_{name}.csv").is_file()

    def series(self, check_id: str, name: str, columns: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
        """Columns of ``<id>_<name>.csv``; ``columns`` that must be present (else a one-line error)."""
        self.check(check_id)
        path = self.path / f"{check_id}_{name}.csv"
        if not path.is_file():
            listed = self.checks[check_id].get("series") or {}
            raise FiguresError(
                f"report {self.path}: check {check_id} has no series {name!r} "
                f"(it has: {', '.join(listed) or 'none'})"
            )
        data = read_csv_columns(path)
        missing = [c for c in columns if c not in data]
        if missing:
            raise FiguresError(f"{path} lacks column(s) {', '.join(missing)} (it has: {', '.join(data)})")
        return data

    def measured(self, check_id: str) -> dict[str, Any]:
        return dict(self.check(check_id).get("measured") or {})


def load_report(path: str | Path) -> Report:
    """Read ``report.json`` of a suite report folder."""
    path = Path(path)
    doc = read_json_file(path / "report.json")
    if not isinstance(doc, dict) or not isinstance(doc.get("checks"), list):
        raise FiguresError(f"{path / 'report.json'} is not a suite report (no 'checks' list)")
    checks = {str(c.get("id")): c for c in doc["checks"] if isinstance(c, dict)}
    return Report(path, checks, dict(doc.get("settings") or {}))
