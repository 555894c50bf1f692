"""sharpness: Hessian-based sharpness of any PyTorch model, built on a functional core.

A model becomes ``(params, loss(params))`` once (:func:`make_loss`); exact Hessian-vector
products (:class:`HessianOperator`) are built on that, and the trace, eigenvalues, spectral density
and SAM losses on those. Every measurement takes ``(model, loss_fn, data)`` (or a ready
:class:`FunctionalLoss` / :class:`HessianOperator`) and returns a dataclass with ``to_dict()``. In train mode
dropout masks are drawn from the measurement's ``seed``; the caller's global RNG state is left as it was.
A NaN/inf loss, gradient or Hessian-vector product raises :class:`NonFiniteError` (a
:class:`SharpnessInputError`) naming it.
"""

from .functional import FunctionalLoss, NonFiniteError, SharpnessInputError, make_loss
from .hvp import HessianOperator
from .lanczos import DensityResult, EigenResult, spectral_density, top_eigenvalues
from .landscape import LandscapeResult, loss_line, loss_surface, normalize_direction, random_direction
from .operators import MatrixOperator
from .parallel import DataParallel, data_parallel
from .sam import (
    AvgSamQuadResult,
    AvgSamResult,
    SamResult,
    as_deviation_matrix,
    avg_sam_loss,
    avg_sam_quadratic,
    centre,
    sam_sharpness,
    xi_sampler,
    xi_trace,
)
from .trace import TraceResult, hessian_trace

__all__ = [
    "AvgSamQuadResult",
    "AvgSamResult",
    "DataParallel",
    "DensityResult",
    "EigenResult",
    "FunctionalLoss",
    "HessianOperator",
    "LandscapeResult",
    "MatrixOperator",
    "NonFiniteError",
    "SamResult",
    "SharpnessInputError",
    "TraceResult",
    "as_deviation_matrix",
    "avg_sam_loss",
    "avg_sam_quadratic",
    "centre",
    "data_parallel",
    "hessian_trace",
    "loss_line",
    "loss_surface",
    "make_loss",
    "normalize_direction",
    "random_direction",
    "sam_sharpness",
    "spectral_density",
    "top_eigenvalues",
    "xi_sampler",
    "xi_trace",
]
__version__ = "0.1.0"
