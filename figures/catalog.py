"""The list of figures and how one is rendered: draw, save PNG + PDF, write the caption.

The figures are the package's ``figN_topic`` modules (:data:`MODULES`, found on disk). Each defines ``NAME``
(``figN_topic``), ``TITLE``, ``needs(preset) -> list[RunSpec]`` (the runs it reads), ``CHECKS`` (the suite
checks it reads; may be empty) and ``draw(ctx) -> (Figure, Caption)``; optionally ``RUNS_KIND``, the kind of
data it draws (:data:`figures.presets.RUNS_KINDS`; default ``"engine"``: engine runs and the suite report).
A figure applies to a preset whose ``runs_kind`` is its ``RUNS_KIND`` (:func:`applies`): ``all`` means the
figures of the preset (:func:`modules_for`), and naming another is a bad argument.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from . import style
from .context import FigureContext
from .presets import RUNS_KINDS, Preset, RunSpec
from .sources import FiguresError

#: Every ``figN_topic.py`` module of this package, in figure order: adding a figure is adding its module.
MODULES = tuple(
    sorted(
        (
            m.name
            for m in pkgutil.iter_modules([str(Path(__file__).parent)])
            if re.fullmatch(r"fig\d+_\w+", m.name)
        ),
        key=lambda n: int(n[3:].partition("_")[0]),
    )
)


def module(name: str) -> ModuleType:
    """The figure module for ``fig4``, ``fig4_consensus``, ``consensus`` or ``4``."""
    want = name.strip().lower().removesuffix(".py")
    for mod in MODULES:
        num, _, topic = mod.partition("_")
        if want in (mod, num, topic, num.removeprefix("fig")):
            return importlib.import_module(f"figures.{mod}")
    raise FiguresError(f"unknown figure {name!r}; choose from all, {', '.join(MODULES)}")


def all_modules() -> list[ModuleType]:
    return [importlib.import_module(f"figures.{m}") for m in MODULES]


#: The kind of data a figure module draws when it does not say (``RUNS_KIND``).
DEFAULT_RUNS_KIND = "engine"


def runs_kind(mod: ModuleType) -> str:
    return getattr(mod, "RUNS_KIND", DEFAULT_RUNS_KIND)


def applies(mod: ModuleType, preset: Preset) -> bool:
    """Whether the figure draws the kind of data the preset has (``RUNS_KIND == preset.runs_kind``)."""
    return runs_kind(mod) == preset.runs_kind


def modules_for(preset: Preset) -> list[ModuleType]:
    """The figures of a preset: what ``all`` means for it."""
    return [m for m in all_modules() if applies(m, preset)]


def check_applies(mods: list[ModuleType], preset: Preset) -> None:
    """A one-line :class:`FiguresError` naming the first figure that does not apply to ``preset``."""
    for m in mods:
        if not applies(m, preset):
            mine = ", ".join(x.NAME for x in modules_for(preset)) or "none"
            raise FiguresError(
                f"{m.NAME} draws {RUNS_KINDS[runs_kind(m)]}; preset {preset.name} has "
                f"{RUNS_KINDS[preset.runs_kind]}: its figures are {mine}"
            )


def runs_needed(mods: list[ModuleType], preset: Preset) -> list[RunSpec]:
    """The union of the runs the figures read, in the preset's order."""
    want = {r.label for m in mods for r in m.needs(preset)}
    return [r for r in preset.runs if r.label in want]


def checks_needed(mods: list[ModuleType]) -> list[str]:
    return list(dict.fromkeys(c for m in mods for c in getattr(m, "CHECKS", ())))


@dataclass
class Rendered:
    """One rendered figure: its files and how long it took."""

    name: str
    png: Path
    pdf: Path
    caption_md: Path
    caption_json: Path
    seconds: float


def render(mod: ModuleType, ctx: FigureContext) -> Rendered:
    """Draw one figure and write ``<out>/<NAME>.png`` (150 dpi), ``.pdf``, ``.md`` and ``.json``."""
    t0 = time.perf_counter()
    with style.look():
        fig, caption = mod.draw(ctx)
    files = style.save(fig, ctx.out, mod.NAME)
    cap = caption.write(ctx.out)
    return Rendered(mod.NAME, files["png"], files["pdf"], cap["md"], cap["json"], time.perf_counter() - t0)
