"""One look for every figure: the Okabe-Ito colour-blind-safe palette, one colour per algorithm, rcParams,
saving.

Colours (Okabe & Ito 2008, safe for the common colour-vision deficiencies) are fixed per algorithm or
topology, so C-SGD is black and ring D-SGD vermillion in every figure. Predictions are dashed dark grey,
negative controls light grey with open markers, fits solid in the colour of their data. :func:`save` writes
PNG (150 dpi) and PDF atomically. Matplotlib runs on the Agg backend (no display).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator  # noqa: E402

from sharpness.results import atomic_write  # noqa: E402
from verify.algorithms import ALGORITHMS  # noqa: E402

#: The Okabe-Ito palette.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
    "grey": "#999999",
}

#: One colour, legend name and marker per key: a topology for the gossip algorithms (D-SGD), the algorithm
#: itself for the others (from its record in ``verify.algorithms``), the same in every figure.
TOPOLOGY_STYLE = {  # colour, legend name, marker
    "ring": ("vermillion", "D-SGD ring", "o"),
    "grid": ("bluish_green", "D-SGD grid", "^"),
    "exponential": ("blue", "D-SGD exponential", "D"),
    "complete": ("orange", "D-SGD complete (AWC)", "v"),
    "disconnected": ("grey", "no communication (P = I)", "x"),
    "torus": ("yellow", "D-SGD torus", "<"),
}
_OTHERS = {k: a for k, a in ALGORITHMS.items() if a.kind != "gossip"}
ALGO_COLORS = {k: OKABE_ITO[c] for k, (c, _, _) in TOPOLOGY_STYLE.items()}
ALGO_COLORS.update({k: OKABE_ITO[a.color] for k, a in _OTHERS.items()})
ALGO_LABELS = {**{k: v[1] for k, v in TOPOLOGY_STYLE.items()}, **{k: a.label for k, a in _OTHERS.items()}}
ALGO_MARKERS = {**{k: v[2] for k, v in TOPOLOGY_STYLE.items()}, **{k: a.marker for k, a in _OTHERS.items()}}

PREDICTION = {"color": "#444444", "ls": "--", "lw": 1.3}
CONTROL_COLOR = OKABE_ITO["grey"]
DPI = 150

RC = {
    "figure.dpi": 100,
    "savefig.dpi": DPI,
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "legend.fontsize": 7.5,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.6,
    "lines.markersize": 5,
    "legend.frameon": False,
    "figure.constrained_layout.use": True,
    "pdf.fonttype": 42,
}


def algo_key(algo: str, topology: Any = None) -> str:
    """The colour key of a run: ``csgd``/``sam``/``avgsam`` by algorithm, D-SGD by its topology name."""
    if algo in ALGORITHMS and ALGORITHMS[algo].kind == "gossip":
        return str(topology) if isinstance(topology, str) else "ring"
    return algo


def color(key: str) -> str:
    """The colour of an algorithm/topology key (grey for anything unknown)."""
    return ALGO_COLORS.get(key, OKABE_ITO["grey"])


def label(key: str) -> str:
    return ALGO_LABELS.get(key, key)


def marker(key: str) -> str:
    return ALGO_MARKERS.get(key, "o")


@contextlib.contextmanager
def look() -> Iterator[None]:
    """Apply the house rcParams inside a ``with`` block."""
    with plt.rc_context(RC):
        yield


def subplots(nrows: int = 1, ncols: int = 1, *, width: float = 3.4, height: float = 2.8, **kw: Any) -> tuple:
    """``plt.subplots`` with the house look; ``width``/``height`` are per panel, in inches."""
    with look():
        fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kw)
    return fig, axes


def title(ax: Any, letter: str, text: str, **kw: Any) -> None:
    """A left-aligned panel title ``(a) text``."""
    ax.set_title(f"({letter}) {text}", loc="left", **kw)


def plain_log_ticks(ax: Any, axis: str = "y") -> None:
    """Plain-number tick labels (``20``, ``0.6``) on a log axis spanning < 2 decades; minor ticks are labelled
    at 2, 3 and 5 x 10^k (all of 2-8 below a factor 3), and only when the axis spans less than a factor 30."""
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if not (lo > 0 and hi / lo < 100):
        return
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))

    keep = (2.0, 3.0, 4.0, 5.0, 6.0, 8.0) if hi / lo < 3 else (2.0, 3.0, 5.0)

    def minor(v: float, _: Any) -> str:
        mant = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
        return f"{v:g}" if mant in keep else ""

    target.set_minor_formatter(FuncFormatter(minor) if hi / lo < 30 else NullFormatter())


def data_ticks(ax: Any, values: Any, axis: str = "x") -> None:
    """Major ticks at the (few) distinct data values, labelled as plain numbers; no minor labels."""
    v = np.unique(np.asarray(values, dtype=float))
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(FixedLocator(v))
    target.set_ticklabels([f"{x:g}" for x in v])
    target.set_minor_locator(NullLocator())
    target.set_minor_formatter(NullFormatter())


def _atomic_savefig(fig: Figure, path: Path, **kw: Any) -> Path:
    fmt = path.suffix.lstrip(".")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kw))


def save(fig: Figure, out: str | os.PathLike[str], name: str) -> dict[str, Path]:
    """Write ``out/name.png`` (150 dpi) and ``out/name.pdf``, atomically; close the figure."""
    out = Path(out)
    try:
        with look():
            png = _atomic_savefig(fig, out / f"{name}.png", dpi=DPI, facecolor="white")
            pdf = _atomic_savefig(fig, out / f"{name}.pdf", facecolor="white")
    finally:
        plt.close(fig)
    return {"png": png, "pdf": pdf}
