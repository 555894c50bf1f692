"""Tr H and lambda_max of a loss at one point, each with its error: the pair every run log and figure reports.

``Tr H`` by :func:`sharpness.trace.hessian_trace` (method auto: exact for piecewise-linear nets, else stopping
at a 2 % relative standard error; ± its standard error) and ``lambda_max`` by Lanczos
(:func:`sharpness.lanczos.top_eigenvalues`, ± the residual norm ``||H v - lambda v||``), both seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

from .functional import FunctionalLoss
from .lanczos import top_eigenvalues
from .trace import DEFAULT_RTOL, hessian_trace


@dataclass
class Sharpness:
    """``Tr H`` ± its standard error; ``lambda_max`` ± its Lanczos residual norm; HVPs used (NaN for a
    quantity not asked for)."""

    trace: float
    trace_se: float
    lmax: float
    lmax_err: float
    n_hvp: int


def sharpness_at(
    fl: FunctionalLoss,
    probes: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    *,
    trace: bool = True,
    lmax: bool = True,
) -> Sharpness:
    """Tr H (method auto, stopping at a 2 % relative standard error with at most ``probes`` probes) and
    lambda_max (Lanczos to relative tolerance ``tol``) of ``fl`` at its point; ``trace``/``lmax`` choose
    which. Cost: at most ``probes`` HVPs (+ JVPs on the exact paths) + the Lanczos iterations' HVPs."""
    nan = float("nan")
    tr = hessian_trace(fl, rtol=DEFAULT_RTOL, n_probes=int(probes), seed=seed) if trace else None
    ev = top_eigenvalues(fl, k=1, tol=tol, seed=seed) if lmax else None
    return Sharpness(
        float(tr.value) if tr else nan,
        float(tr.stderr) if tr else nan,
        float(ev.values[0]) if ev else nan,
        float(ev.residuals[0]) if ev else nan,
        (tr.n_hvp if tr else 0) + (ev.n_hvp if ev else 0),
    )
