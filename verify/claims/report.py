"""The suite's report: ``report.json``, ``report.md``, one CSV per series, and the terminal table.

``report.json`` is ``{"checks": [CheckResult.to_dict(), ...], "settings": {...}}``; each check carries at
least ``id, claim, prediction, measured, criterion, control {description, measured, came_out_other_way},
verdict, seconds`` and lists its series by name; series ``S`` of check ``T1`` is ``T1_S.csv`` (header row of
column names, then one row per point). Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sharpness.results import atomic_write_text, jsonable, write_json

from .base import CheckResult, fmt

#: (header, share of the free width) for the terminal table; ID and verdict have fixed widths.
_COLUMNS = (
    ("claim", 15),
    ("evidence", 9),
    ("prediction", 13),
    ("measured", 20),
    ("criterion", 15),
    ("control", 13),
)


def series_filename(check_id: str, name: str) -> str:
    """``<id>_<series>.csv``."""
    return f"{check_id}_{name}.csv"


def series_csv(columns: Mapping[str, Sequence[Any]]) -> str:
    """CSV text of equal-length columns: a header row, then one row per point (floats in repr precision)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    names = list(columns)
    writer.writerow(names)
    for row in zip(*(columns[n] for n in names), strict=True):
        writer.writerow([repr(v) if isinstance(v, float) else v for v in row])
    return buf.getvalue()


def measured_text(values: Mapping[str, Any], limit: int = 4) -> str:
    """``k=v`` pairs of the first ``limit`` entries, numbers to 3 significant figures."""
    items = [f"{k}={fmt(v)}" for k, v in list(values.items())[:limit] if not isinstance(v, (list, dict))]
    return ", ".join(items)


def control_text(r: CheckResult) -> str:
    """Short text for the control column: did it fail as it must, and what it measured."""
    if r.control.came_out_other_way is None:
        return r.control.description
    head = "failed, as required" if r.control.came_out_other_way else "DID NOT FAIL"
    return f"{head}: {r.control_summary or measured_text(r.control.measured, 3)}"


def effects_text(r: CheckResult) -> str:
    """Each effect as ``name est [low, high], MDE m: outcome`` (empty when the check has none)."""
    return "; ".join(
        f"{e.name} {fmt(e.interval.estimate)} [{fmt(e.interval.low)}, {fmt(e.interval.high)}], "
        f"MDE {fmt(e.mde)}: {e.outcome}"
        for e in r.effects
    )


def measured_cell(r: CheckResult) -> str:
    """The measured column: the check's summary, then its effects with their intervals."""
    text = r.summary or measured_text(r.measured)
    extra = effects_text(r)
    return f"{text}; {extra}" if extra and text else (text or extra)


def _cells(r: CheckResult) -> list[str]:
    return [
        r.title or r.claim,
        r.evidence,
        r.prediction,
        measured_cell(r),
        r.criterion,
        control_text(r),
    ]


def format_table(results: Sequence[CheckResult], width: int = 100) -> str:
    """Plain-text table (ID, claim, prediction, measured, criterion, control, verdict) ``width`` wide."""
    id_w, verdict_w, sep = 4, 12, "  "
    free = width - id_w - verdict_w - len(sep) * (len(_COLUMNS) + 1)
    total = sum(share for _, share in _COLUMNS)
    widths = [max(6, free * share // total) for _, share in _COLUMNS]
    headers = ["ID"] + [h for h, _ in _COLUMNS] + ["verdict"]
    all_w = [id_w] + widths + [verdict_w]

    def row(cells: list[str]) -> list[str]:
        pairs = zip(cells, all_w, strict=True)
        wrapped = [textwrap.wrap(c, w, break_on_hyphens=False) or [""] for c, w in pairs]
        height = max(len(c) for c in wrapped)
        lines = []
        for i in range(height):
            parts = [(c[i] if i < len(c) else "").ljust(w) for c, w in zip(wrapped, all_w, strict=True)]
            lines.append(sep.join(parts).rstrip())
        return lines

    out = row(headers)
    rule = sep.join("-" * w for w in all_w)
    out.append(rule)
    for r in results:
        out.extend(row([r.id] + _cells(r) + [r.verdict]))
        out.append("")
    n_fail = sum(r.verdict == "FAIL" for r in results)
    seconds = sum(r.seconds for r in results)
    counts = {
        v: sum(r.verdict == v for r in results) for v in ("PASS", "NOT SUPPORTED", "INCONCLUSIVE", "REPORTED")
    }
    tally = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    out.append(f"{len(results)} checks: {tally}{', ' if tally else ''}{n_fail} FAIL; {seconds:.1f} s")
    return "\n".join(out)


def report_dict(results: Sequence[CheckResult], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document: ``{"checks": [...], "settings": {...}}``; series are named by their CSV file."""
    checks = []
    for r in results:
        d = r.to_dict()
        d["series"] = {name: series_filename(r.id, name) for name in sorted(r.series)}
        checks.append(d)
    return {"checks": checks, "settings": jsonable(dict(settings))}


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(results: Sequence[CheckResult], settings: Mapping[str, Any]) -> str:
    """``report.md``: a summary table, then one section per check with every number and the control."""
    lines = ["# Verification suite report", ""]
    lines.append(
        "Settings: " + ", ".join(f"`{k}` = {_md_escape(str(jsonable(v)))}" for k, v in settings.items())
    )
    lines += ["", "| ID | claim | evidence | prediction | measured | criterion | control | verdict | s |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        cells = [r.id] + [_md_escape(c) for c in _cells(r)]
        lines.append("| " + " | ".join(cells + [f"**{r.verdict}**", f"{r.seconds:.1f}"]) + " |")
    for r in results:
        lines += ["", f"## {r.id}: {r.title}", "", f"**Claim.** {r.claim}", ""]
        lines.append(
            f"**Source.** {r.source}. **Status:** {r.status}. **Evidence:** {r.evidence}. "
            f"**Asserted:** {r.asserted}."
        )
        lines += ["", f"**Prediction.** {r.prediction}", "", f"**Criterion.** {r.criterion}", ""]
        if r.settings:
            protocol = ", ".join(f"`{k}` = {jsonable(v)}" for k, v in r.settings.items())
            lines.append(f"**Protocol.** {protocol}")
            lines.append("")
        lines += ["| measured | value |", "|---|---|"]
        lines += [f"| {k} | {_md_escape(fmt(v))} |" for k, v in r.measured.items()]
        if r.effects:
            lines += ["", "| effect (role) | estimate | 95% interval | method | MDE | claimed | outcome |"]
            lines.append("|---|---|---|---|---|---|---|")
            for e in r.effects:
                iv = e.interval
                lines.append(
                    f"| {_md_escape(e.name)} ({e.role}) | {fmt(iv.estimate)} "
                    f"| [{fmt(iv.low)}, {fmt(iv.high)}] "
                    f"| {_md_escape(iv.method)} | {fmt(e.mde)} | {fmt(e.claimed)} ({_md_escape(e.source)}) "
                    f"| {e.outcome} |"
                )
        lines += ["", f"**Negative control.** {r.control.description}", ""]
        lines += ["| control measured | value |", "|---|---|"]
        lines += [f"| {k} | {_md_escape(fmt(v))} |" for k, v in r.control.measured.items()]
        lines.append(f"| came out the other way | {r.control.came_out_other_way} |")
        lines += ["", f"**Verdict: {r.verdict}** ({r.seconds:.2f} s)."]
        if r.notes:
            lines += [""] + [f"- {_md_escape(n)}" for n in r.notes]
        if r.series:
            files = ", ".join(f"`{series_filename(r.id, n)}`" for n in sorted(r.series))
            lines += ["", f"Series: {files}."]
    return "\n".join(lines) + "\n"


def write_report(
    results: Sequence[CheckResult], directory: str | Path, settings: Mapping[str, Any]
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``<id>_<series>.csv`` into ``directory`` (atomically each).

    Stale CSVs of the checks in ``results`` (from an earlier run into the same folder) are removed first.
    Returns the written paths by name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for r in results:
        for old in directory.glob(f"{r.id}_*.csv"):
            if old.stem[len(r.id) + 1 :] not in r.series:
                old.unlink()
        for name, cols in r.series.items():
            fname = series_filename(r.id, name)
            written[fname] = atomic_write_text(directory / fname, series_csv(cols))
    written["report.json"] = write_json(directory / "report.json", report_dict(results, settings))
    written["report.md"] = atomic_write_text(directory / "report.md", render_markdown(results, settings))
    return written
