"""Tr H and lambda_max of a loss at one point, each with its error: the pair every run log and figure reports.

``Tr H`` by Hutchinson (:func:`sharpness.trace.hessian_trace`, ± its standard error) and ``lambda_max`` by
Lanczos (:func:`sharpness.lanczos.top_eigenvalues`, ± the residual norm ``||H v - lambda v||``), both seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

from .functional import FunctionalLoss
from .lanczos import top_eigenvalues
from .trace import hessian_trace


@dataclass
class Sharpness:
    """``Tr H`` ± its Hutchinson standard error; ``lambda_max`` ± its Lanczos residual norm; HVPs used."""

    trace: float
    trace_se: float
    lmax: float
    lmax_err: float
    n_hvp: int


def sharpness_at(fl: FunctionalLoss, probes: int = 100, tol: float = 1e-4, seed: int = 0) -> Sharpness:
    """Tr H (``probes`` Rademacher probes) and lambda_max (Lanczos to relative tolerance ``tol``) of ``fl`` at
    its point. Cost: ``probes`` HVPs + the Lanczos iterations' HVPs."""
    tr = hessian_trace(fl, n_probes=int(probes), seed=seed)
    ev = top_eigenvalues(fl, k=1, tol=tol, seed=seed)
    return Sharpness(
        float(tr.value), float(tr.stderr), float(ev.values[0]), float(ev.residuals[0]), tr.n_hvp + ev.n_hvp
    )
