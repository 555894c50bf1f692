"""Statistical evidence for a verdict: an effect with its interval, and whether it decides the claim.

An :class:`Effect` is one measured quantity ``x`` (a difference, a ratio, a slope) with a two-sided interval
``[low, high]`` at ``level`` (from :func:`t_interval` over seeds or windows, or :func:`paired_bootstrap`), the
value ``null`` that "no effect" means, and the value ``claimed`` the paper claims (its sign gives the claimed
direction; its source is stated). Its :attr:`Effect.outcome` is

- ``supported``: the whole interval lies beyond ``null`` in the claimed direction;
- ``contradicted``: the interval excludes the claimed effect, on the side of ``null`` (it contains no effect
  or the opposite one, but not the claim);
- ``undecided``: the interval contains both ``null`` and the claimed effect: the experiment has no power to
  tell them apart. The verdict is then INCONCLUSIVE, never NOT SUPPORTED.

:attr:`Effect.mde` is the minimum detectable effect at 5 % two-sided significance and 80 % power,
``(z_0.975 + z_0.8) * se = 2.80 se``, with ``se`` the interval's half-width over its critical value: an
effect smaller than it would usually not be seen by this experiment. :func:`decide_verdict`
(``verify.claims.base``) reads the outcomes; roles say how (``precondition``: must be supported, else the
experiment cannot decide; ``criterion``: the check's asserted criterion; ``paper``: the paper's reading).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

ROLES = ("criterion", "paper", "precondition")
OUTCOMES = ("supported", "contradicted", "undecided")
#: z_{0.975} + z_{0.80}: minimum detectable effect in standard errors (two-sided 5 %, power 80 %)
MDE_FACTOR = float(stats.norm.ppf(0.975) + stats.norm.ppf(0.80))


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval at ``level``; ``critical``: the multiplier used (t or z)."""

    estimate: float
    low: float
    high: float
    level: float
    n: int
    method: str
    critical: float

    @property
    def se(self) -> float:
        """Standard error implied by the interval: half-width / critical value."""
        return (self.high - self.low) / (2 * self.critical) if self.critical > 0 else float("nan")


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Student-t interval of the mean of independent ``values`` (seeds): ``mean +- t_{n-1} s/sqrt(n)``.

    Needs ``n >= 2``. Exact for normal data; with 3 seeds ``t_{2, 0.975} = 4.30``, so intervals are wide and
    honest about it.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size < 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"t_interval needs >= 2 finite values, got {x.tolist()}")
    n = x.size
    mean, se = float(x.mean()), float(x.std(ddof=1) / math.sqrt(n))
    crit = float(stats.t.ppf(0.5 + level / 2, df=n - 1))
    return Interval(mean, mean - crit * se, mean + crit * se, level, n, f"t over {n}", crit)


def paired_bootstrap(
    values: Sequence[float], level: float = 0.95, n_boot: int = 20000, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of the mean of paired differences ``values`` (resampling pairs).

    With fewer than ~8 pairs the percentile interval is too narrow (it cannot be wider than the data's
    range); :func:`t_interval` is then the honest choice. ``critical`` is the normal quantile (for the MDE).
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size < 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"paired_bootstrap needs >= 2 finite values, got {x.tolist()}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    crit = float(stats.norm.ppf(0.5 + level / 2))
    return Interval(
        float(x.mean()), float(lo), float(hi), level, x.size, f"paired bootstrap over {x.size}", crit
    )


def z_interval(
    estimate: float, se: float, level: float = 0.95, n: int = 1, method: str = "normal"
) -> Interval:
    """``estimate +- z se`` (a standard error known from elsewhere: batch means, an exact model)."""
    crit = float(stats.norm.ppf(0.5 + level / 2))
    return Interval(float(estimate), estimate - crit * se, estimate + crit * se, level, n, method, crit)


@dataclass(frozen=True)
class Effect:
    """A measured effect, its interval, the null and the claimed value (see the module docstring).

    ``name``: what is measured, with units (e.g. ``"D-C test accuracy at B=8192, pp"``); ``claimed``: the
    paper's value (sign = direction), with ``source`` saying where it comes from (``paper.md`` section).
    """

    name: str
    interval: Interval
    claimed: float
    source: str
    null: float = 0.0
    role: str = "paper"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"effect {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if self.claimed == self.null:
            raise ValueError(f"effect {self.name!r}: claimed value equals the null ({self.null})")

    @property
    def outcome(self) -> str:
        """``supported`` / ``contradicted`` / ``undecided`` (module docstring)."""
        iv = self.interval
        if not (math.isfinite(iv.low) and math.isfinite(iv.high)):
            return "undecided"
        d = 1.0 if self.claimed > self.null else -1.0
        lo, hi = sorted((d * (iv.low - self.null), d * (iv.high - self.null)))
        if lo > 0:
            return "supported"
        if hi < abs(self.claimed - self.null):
            return "contradicted"
        return "undecided"

    @property
    def mde(self) -> float:
        """Minimum detectable effect (5 % two-sided, 80 % power): ``2.80 se``."""
        return MDE_FACTOR * self.interval.se

    def text(self, digits: int = 3) -> str:
        """``name est [low, high] (95% CI, method; MDE m; claimed c): outcome``."""
        iv = self.interval
        g = f".{digits}g"
        return (
            f"{self.name} {iv.estimate:{g}} [{iv.low:{g}}, {iv.high:{g}}] ({iv.level:.0%} CI, {iv.method}; "
            f"MDE {self.mde:{g}}; claimed {self.claimed:{g}}, {self.source}): {self.outcome}"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(outcome=self.outcome, mde=self.mde, se=self.interval.se)
        return d
