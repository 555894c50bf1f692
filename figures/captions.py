"""One caption per figure: what is plotted, the settings, the measured slopes and numbers, where they came
from.

Written next to the picture as ``<name>.md`` (for people and the gallery) and ``<name>.json`` (the same
numbers at full precision, for tests and scripts). Every number in a caption is computed from the plotted
data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharpness.results import atomic_write_text, jsonable, write_json

from .slopes import Slope


@dataclass
class Caption:
    """``title``; ``what``: what each panel plots; ``settings``: the protocol (name -> value); ``slopes``;
    ``numbers``: other measured values (label -> text); ``notes``: observations computed from the data;
    ``sources``: the run directories and report files read."""

    name: str
    title: str
    what: str
    settings: dict[str, Any] = field(default_factory=dict)
    slopes: list[Slope] = field(default_factory=list)
    numbers: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def markdown(self, heading: str = "###") -> str:
        """The caption as Markdown (no image link)."""
        lines = [f"{heading} {self.title}", "", f"**What is plotted.** {self.what}", ""]
        if self.settings:
            lines.append(
                "**Settings.** " + "; ".join(f"{k}: {_plain(v)}" for k, v in self.settings.items()) + "."
            )
            lines.append("")
        if self.slopes:
            lines.append("**Measured slopes** (least squares on log-log axes):")
            lines += [f"- {s.text()}" for s in self.slopes]
            lines.append("")
        if self.numbers:
            lines.append("**Measured values.**")
            lines += [f"- {k}: {v}" for k, v in self.numbers.items()]
            lines.append("")
        if self.notes:
            lines += [f"*{n}*" if not n.startswith("*") else n for n in self.notes]
            lines.append("")
        if self.sources:
            lines.append("Data: " + ", ".join(f"`{s}`" for s in self.sources) + ".")
        return "\n".join(lines).rstrip() + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "what": self.what,
            "settings": jsonable(self.settings),
            "slopes": [s.to_dict() for s in self.slopes],
            "numbers": dict(self.numbers),
            "notes": list(self.notes),
            "sources": list(self.sources),
        }

    def write(self, out: str | Path) -> dict[str, Path]:
        """Write ``out/<name>.md`` and ``out/<name>.json`` atomically."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        return {
            "md": atomic_write_text(out / f"{self.name}.md", self.markdown()),
            "json": write_json(out / f"{self.name}.json", self.to_dict()),
        }


def _plain(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_plain(x) for x in v) + "]"
    return str(v)


def fmt(x: float, digits: int = 3) -> str:
    """A number to ``digits`` significant figures (``0.0123``, ``1.23e-05``)."""
    x = float(x)
    if x != x:
        return "nan"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.{digits}g}"
    return f"{x:.{digits - 1}e}"
