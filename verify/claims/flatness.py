"""Flatness of two runs compared at MATCHED training loss (paper.md s.6 T11: "flatness compared at matched
training loss"), reusable by any check that logs sharpness along a loss curve.

A :class:`Curve` is one run's train loss and sharpness values (``lambda_max``, ``trace_h``, ...) at its
logged steps. Comparing two models at the same step mixes flatness with progress: the run that is further
along usually sits in a sharper (or flatter) region for that reason alone. So each value is read at common
loss LEVELS instead, at the first logged step where the run's loss is at or below the level, interpolated
linearly (in log value against loss) with the logged step before it (:func:`value_at_loss`). The levels
(:func:`matched_levels`) start at the lowest loss both runs reach and go up geometrically, so the last
level is "stop both at the same train loss". :func:`matched_log_ratio` gives ``log(value_a / value_b)`` at
each level; :func:`sharpness_measure` is a :func:`verify.lockstep.run_lockstep` ``measure`` callback that
logs ``lambda_max`` (Lanczos, :func:`sharpness.lanczos.top_eigenvalues`) and ``trace_h`` with its standard
error (Hutchinson, :func:`sharpness.trace.hessian_trace`) on a fixed training subset. Cost: per logged model,
the Lanczos iterations (~10-30 HVPs) plus ``probes`` HVPs; the matching is O(n_logs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


class FlatnessError(ValueError):
    """Curves that cannot be compared (no common loss range); the message is one line."""


@dataclass
class Curve:
    """``loss[k]`` and ``values[name][k]`` at the logged steps ``step[k]`` of one run."""

    step: np.ndarray
    loss: np.ndarray
    values: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_rows(
        cls, rows: Sequence[dict], prefix: str, keys: Sequence[str], loss: str = "train_loss"
    ) -> Curve:
        """From :class:`verify.lockstep.LockstepResult` rows: columns ``<prefix>_<loss>``, ``<prefix>_<key>``
        (rows without the sharpness columns, e.g. step 0 when not measured, are skipped)."""
        keep = [r for r in rows if all(f"{prefix}_{k}" in r for k in (loss, *keys))]
        return cls(
            np.array([r["step"] for r in keep], dtype=float),
            np.array([r[f"{prefix}_{loss}"] for r in keep], dtype=float),
            {k: np.array([r[f"{prefix}_{k}"] for r in keep], dtype=float) for k in keys},
        )


def value_at_loss(curve: Curve, key: str, level: float) -> float:
    """``values[key]`` where the loss first reaches ``level`` (first k with ``loss[k] <= level``),
    interpolated linearly in ``log value`` against loss with point k - 1; NaN if it never does. A first point
    already below the level gives its own value."""
    below = np.flatnonzero(curve.loss <= level)
    if below.size == 0:
        return float("nan")
    k = int(below[0])
    v = curve.values[key]
    if k == 0 or curve.loss[k - 1] == curve.loss[k] or v[k] <= 0 or v[k - 1] <= 0:
        return float(v[k])
    f = (curve.loss[k - 1] - level) / (curve.loss[k - 1] - curve.loss[k])
    return float(np.exp((1 - f) * np.log(v[k - 1]) + f * np.log(v[k])))


def matched_levels(curves: Sequence[Curve], n: int = 3, span: float = 1.5) -> np.ndarray:
    """``n`` loss levels from the lowest loss every curve reaches, ``max_c min(loss_c)``, up to ``span`` times
    it (geometric). Raises :class:`FlatnessError` when a curve never gets below another's start."""
    lowest = max(float(np.min(c.loss)) for c in curves)
    top = min(float(np.max(c.loss)) for c in curves)
    if not lowest < top:
        raise FlatnessError(f"the loss curves do not overlap (lowest common loss {lowest:.3g} >= {top:.3g})")
    return lowest * np.geomspace(1.0, min(span, top / lowest), n)


def matched_log_ratio(a: Curve, b: Curve, key: str, levels: Sequence[float]) -> np.ndarray:
    """``log(value_a / value_b)`` at each loss level (negative: ``a`` flatter)."""
    return np.array([np.log(value_at_loss(a, key, lv) / value_at_loss(b, key, lv)) for lv in levels])


def sharpness_measure(
    problem, samples: int, probes: int = 30, tol: float = 1e-3, seed: int = 0
) -> Callable[..., dict[str, float]]:
    """A lockstep ``measure(step, arm, w, buffers)``: ``lambda_max`` (Lanczos, ``tol``) and ``trace_h`` +-
    ``trace_h_se`` (Hutchinson, ``probes`` Rademacher probes from ``seed``: the same probes for every model,
    common random numbers for the comparison) of the training loss on a fixed subset of ``samples`` points.
    Cost: the Lanczos iterations plus ``probes`` HVPs per call."""
    from sharpness.lanczos import top_eigenvalues
    from sharpness.trace import hessian_trace

    def measure(step: int, arm: str, w, buffers) -> dict[str, float]:
        fl = problem.functional(w, buffers, samples)
        lam = top_eigenvalues(fl, k=1, tol=tol, seed=seed, true_residuals=False).values[0]
        tr = hessian_trace(fl, n_probes=probes, seed=seed)
        return {"lambda_max": float(lam), "trace_h": tr.value, "trace_h_se": tr.stderr}

    return measure
