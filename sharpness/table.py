"""The report's table: rows of ``label  value  ± stderr  note`` and how numbers are printed.

Values are printed with 5 significant digits (:func:`fmt_value`), standard errors with 2 (:func:`fmt_err`);
the JSON keeps every digit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .results import jsonable


@dataclass
class Row:
    """One line of the table: ``label  value  ± stderr  note``."""

    label: str
    value: float | str | None
    stderr: float | None = None
    note: str = ""
    percent: bool = False


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    eigenvectors: torch.Tensor | None = None
    products: dict[str, Any] = field(default_factory=dict)


def fmt_value(x: float | None, sig: int = 5) -> str:
    """A value as printed: ``sig`` significant digits."""
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{sig}g}"


def fmt_err(x: float | None) -> str:
    """A standard error as printed: ``± `` and 2 significant digits."""
    return "" if x is None else ("± nan" if not math.isfinite(x) else f"± {x:.2g}")


def format_table(header: list[tuple[str, str]], report: Report) -> str:
    """The text report: ``header`` lines (key, text), then one line per value (label, value, stderr, note)."""
    lines = ["sharpness report"]
    lines += [f"  {k:<11} {v}" for k, v in header]
    lines.append("")
    width = max([len(r.label) for r in report.rows] + [6])
    lines.append(f"{'metric':<{width}}  {'value':>12}  {'± stderr':<10}  notes")
    for r in report.rows:
        if isinstance(r.value, str):
            val = r.value
        elif r.percent and r.value is not None:
            val = f"{100 * r.value:.2f} %"
        else:
            val = fmt_value(r.value)
        lines.append(f"{r.label:<{width}}  {val:>12}  {fmt_err(r.stderr):<10}  {r.note}".rstrip())
    for m, why in report.skipped.items():
        lines.append(f"(skipped {m}: {why}; ask for it with --metrics {m})")
    return "\n".join(lines)


def report_json(report: Report) -> dict[str, Any]:
    """JSON-ready metric results, skipped metrics and timings."""
    return jsonable(
        {
            "metrics": report.results,
            "skipped": report.skipped,
            "timings_s": report.timings,
            "hvp_products": report.products,
        }
    )
