"""sharpness: Hessian-based sharpness of any PyTorch model, built on a functional core.

A model becomes ``(params, loss(params))`` once (:func:`make_loss`); exact Hessian-vector products
(:class:`HessianOperator`) are built on that, and the trace, eigenvalues, spectral density and SAM losses on those.
"""

from .functional import FunctionalLoss, SharpnessInputError, make_loss
from .hvp import HessianOperator

__all__ = ["FunctionalLoss", "HessianOperator", "SharpnessInputError", "make_loss"]
__version__ = "0.1.0"
