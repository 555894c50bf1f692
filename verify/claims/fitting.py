"""Log-log slope fits: the exponent of a power law ``y ~ C x^k`` by least squares on ``(log x, log y)``.

All fits use :func:`scipy.stats.linregress`, which also gives the standard error of the slope (from the
residual scatter; 0 for an exact power law). Cost: O(n).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from .base import ClaimsError


@dataclass(frozen=True)
class SlopeFit:
    """``log y = intercept + slope * log x``; ``stderr`` of the slope, ``r`` the correlation, ``n`` points."""

    slope: float
    intercept: float
    stderr: float
    r: float
    n: int

    def within(self, lo: float, hi: float) -> bool:
        """``lo <= slope <= hi``."""
        return lo <= self.slope <= hi

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """``{prefix+"slope": ..., prefix+"slope_stderr": ...}`` for a ``measured`` dict."""
        return {f"{prefix}slope": self.slope, f"{prefix}slope_stderr": self.stderr}

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _as_array(v: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    try:
        arr = np.asarray([float(x) for x in np.asarray(v).reshape(-1)], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ClaimsError(f"{name} must be a sequence of numbers") from exc
    return arr


def loglog_fit(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> SlopeFit:
    """Least-squares fit of ``log y`` against ``log x`` (natural logs; the slope does not depend on the base).

    Needs at least 2 points, all ``x`` and ``y`` finite and > 0 (take ``abs`` first for signed quantities),
    and at least two distinct ``x``.
    """
    xa, ya = _as_array(x, "x"), _as_array(y, "y")
    if xa.shape != ya.shape:
        raise ClaimsError(f"x and y have different lengths ({xa.size} and {ya.size})")
    if xa.size < 2:
        raise ClaimsError(f"a slope needs at least 2 points, got {xa.size}")
    for name, arr in (("x", xa), ("y", ya)):
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ClaimsError(f"log-log fit needs finite {name} > 0, got min {arr.min():.3g}")
    if np.ptp(xa) == 0:
        raise ClaimsError("log-log fit needs at least two distinct x values")
    if xa.size == 2:  # linregress leaves stderr undefined for two points: the line is exact
        lx, ly = np.log(xa), np.log(ya)
        slope = float((ly[1] - ly[0]) / (lx[1] - lx[0]))
        return SlopeFit(slope, float(ly[0] - slope * lx[0]), 0.0, math.copysign(1.0, slope), 2)
    res = stats.linregress(np.log(xa), np.log(ya))
    return SlopeFit(
        float(res.slope), float(res.intercept), float(res.stderr), float(res.rvalue), int(xa.size)
    )


def local_slopes(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> np.ndarray:
    """Slopes between consecutive points, ``diff(log y) / diff(log x)`` (to see where a law bends)."""
    xa, ya = _as_array(x, "x"), _as_array(y, "y")
    if np.any(xa <= 0) or np.any(ya <= 0):
        raise ClaimsError("local slopes need x > 0 and y > 0")
    return np.diff(np.log(ya)) / np.diff(np.log(xa))
