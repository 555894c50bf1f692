"""The gallery page ``<out>/index.md``: every figure found in the output folder with its caption, in order.

It lists what is on disk (``<NAME>.png`` with its ``<NAME>.md`` caption), so rendering one figure later keeps
the others on the page. Figures that could not be drawn are listed with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from sharpness.results import atomic_write_text

from .catalog import MODULES


def write_gallery(
    out: str | Path,
    header: str = "",
    failures: Mapping[str, str] | None = None,
    names: Sequence[str] | None = None,
) -> Path:
    """Write ``out/index.md``; ``header``: a paragraph on how the figures were made; ``failures``: name ->
    why; ``names``: the figures the page may list (default all; the CLI passes the preset's, so figures of
    another preset left in the folder stay off a page whose header describes this one)."""
    out = Path(out)
    lines = ["# Figures: decentralized SGD and average-direction SAM", ""]
    if header:
        lines += [header, ""]
    failures = dict(failures or {})
    for name in [m for m in MODULES if names is None or m in names]:
        png, md = out / f"{name}.png", out / f"{name}.md"
        if png.is_file() and md.is_file() and name not in failures:
            text = md.read_text().rstrip().split("\n")
            title = text[0].lstrip("#").strip() if text else name
            lines += [f"## {title}", "", f"![{name}]({name}.png)", "", f"PDF: [{name}.pdf]({name}.pdf)", ""]
            lines += text[1:] + [""]
        elif name in failures:
            lines += [f"## {name}", "", f"Not drawn: {failures[name]}", ""]
    return atomic_write_text(out / "index.md", "\n".join(lines).rstrip() + "\n")
