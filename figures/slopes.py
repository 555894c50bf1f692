"""Power-law fits drawn on log-log axes: the fitted line and the predicted slope as a reference line.

The fit is the suite's own (:func:`verify.claims.fitting.loglog_fit`: least squares of ``log y`` on
``log x``), so a slope in a caption is the slope the report would compute from the same points. The predicted
line has the theory's exponent and passes through the centroid of the data in log-log space
(``log y = mean(log y) + k (log x - mean(log x))``): it shows the exponent, not a fitted prefactor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from verify.claims.fitting import loglog_fit

from .sources import FiguresError
from .style import PREDICTION


@dataclass
class Slope:
    """One fitted exponent for a caption: ``what`` was fitted, ``fitted`` ± ``stderr`` over ``n`` points,
    the ``predicted`` exponent (None if the theory gives none) and the suite's own value if it reported
    one."""

    what: str
    fitted: float
    stderr: float
    n: int
    predicted: float | None = None
    intercept: float = 0.0
    suite: float | None = None
    x_range: tuple[float, float] = (0.0, 0.0)

    @property
    def tag(self) -> str:
        """``slope 1.93 (pred. 2)`` for a legend label."""
        return f"slope {self.shown}" + (f" (pred. {self.predicted:g})" if self.predicted is not None else "")

    @property
    def shown(self) -> str:
        """The fitted slope to 2 decimals, as printed in captions and legends (never ``-0.00``)."""
        return two(self.fitted)

    def text(self) -> str:
        """``<what>: fitted slope 1.93 ± 0.02 (n = 4); predicted 2; suite 1.93``."""
        s = f"{self.what}: fitted slope {self.shown} ± {self.stderr:.2f} (n = {self.n} points)"
        if self.predicted is not None:
            s += f"; predicted {self.predicted:g}"
        if self.suite is not None:
            s += f"; the suite's report: {two(self.suite)}"
        return s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def two(x: float) -> str:
    """``x`` to 2 decimals, with ``-0.00`` shown as ``0.00``."""
    text = f"{x:.2f}"
    return "0.00" if text == "-0.00" else text


def positive_points(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """The points with finite, strictly positive x and y (a log-log fit needs them)."""
    xa, ya = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if xa.shape != ya.shape:
        raise FiguresError(f"x and y have different lengths ({xa.size} and {ya.size})")
    keep = np.isfinite(xa) & np.isfinite(ya) & (xa > 0) & (ya > 0)
    return xa[keep], ya[keep]


def fit_slope(x: Any, y: Any, what: str, predicted: float | None = None, suite: float | None = None) -> Slope:
    """Fit ``y ~ C x^k`` on the finite positive points; needs at least two distinct x."""
    xa, ya = positive_points(x, y)
    if xa.size < 2 or np.ptp(xa) == 0:
        raise FiguresError(f"{what}: fewer than two usable points (finite, > 0) for a log-log slope")
    f = loglog_fit(xa, ya)
    return Slope(
        what, f.slope, f.stderr, f.n, predicted, f.intercept, suite, (float(xa.min()), float(xa.max()))
    )


def draw_fit(ax: Any, s: Slope, color: str, label: str | None = None, **kw: Any) -> None:
    """The fitted line ``exp(intercept) x^slope`` across the fitted x range (solid, the data's colour)."""
    x = np.geomspace(*s.x_range, 50)
    text = label if label is not None else f"fit: slope {s.shown}"
    text = text or "_nolegend_"
    ax.plot(x, np.exp(s.intercept) * x**s.fitted, color=color, lw=1.0, alpha=0.9, label=text, **kw)


def draw_predicted(ax: Any, x: Any, y: Any, k: float, label: str | None = None) -> None:
    """A reference line of exponent ``k`` through the centroid of ``(log x, log y)`` (dashed dark grey)."""
    xa, ya = positive_points(x, y)
    if xa.size == 0:
        return
    lx, ly = np.log(xa), np.log(ya)
    xs = np.geomspace(xa.min(), xa.max(), 50)
    ys = np.exp(ly.mean() + k * (np.log(xs) - lx.mean()))
    text = label if label is not None else f"predicted slope {k:g}"
    ax.plot(xs, ys, label=text or "_nolegend_", **PREDICTION)


def style_legend_entries(ax: Any) -> None:
    """Two legend-only entries explaining the line styles: solid = fit, dashed = prediction."""
    ax.plot([], [], color="0.3", lw=1.0, label="solid: least-squares fit")
    ax.plot([], [], label="dashed: predicted slope", **PREDICTION)
