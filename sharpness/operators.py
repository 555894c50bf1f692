"""Symmetric linear operators for the curvature routines, and how their inputs become one.

The trace, Lanczos and density routines only need ``matmat(V)`` / ``matvec(v)`` / ``num_params`` /
``dtype`` / ``device`` / ``hvp_count``. A :class:`~sharpness.hvp.HessianOperator` has them; so has
:class:`MatrixOperator`, a dense symmetric matrix with a known spectrum (tests; users who hold a matrix).
:func:`resolve_operator` turns ``(model, loss_fn, data)``, a :class:`FunctionalLoss` or an operator into one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from .functional import Batch, FunctionalLoss, SharpnessInputError
from .hvp import HessianOperator, scipy_view

_OPERATOR_ATTRS = ("matmat", "matvec", "num_params", "dtype", "device", "hvp_count")


class MatrixOperator:
    """``v -> A v`` for a dense symmetric matrix ``A`` (d x d); ``hvp_count`` counts vectors multiplied.

    Same interface as :class:`~sharpness.hvp.HessianOperator`. Non-float input becomes float64. ``A`` must be
    symmetric to ``100 eps max|A|``.
    """

    def __init__(self, A: Tensor | np.ndarray) -> None:
        A = torch.as_tensor(A)
        if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
            raise SharpnessInputError(f"MatrixOperator needs a square non-empty matrix, got {tuple(A.shape)}")
        if not A.is_floating_point():
            A = A.double()
        scale = float(A.abs().max())
        if float((A - A.T).abs().max()) > 100 * torch.finfo(A.dtype).eps * max(scale, 1e-300):
            raise SharpnessInputError("MatrixOperator needs a symmetric matrix (A != A.T)")
        self.A = A
        self.hvp_count = 0

    @property
    def num_params(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a flat vector (d,). Cost: 1 product."""
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for a (d, k) block. Cost: k products."""
        if V.dim() != 2 or V.shape[0] != self.num_params:
            raise SharpnessInputError(f"matmat expects a ({self.num_params}, k) block, got {tuple(V.shape)}")
        self.hvp_count += V.shape[1]
        return self.A @ V.to(device=self.device, dtype=self.dtype)

    def dense(self) -> Tensor:
        return self.A.clone()

    def to_scipy(self) -> LinearOperator:
        """A float64 ``scipy.sparse.linalg.LinearOperator`` view that counts its products."""
        return scipy_view(self)

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)


def is_operator(obj: Any) -> bool:
    """Whether ``obj`` offers the operator interface (``matmat``, ``matvec``, ``num_params``, ...)."""
    return all(hasattr(obj, a) for a in _OPERATOR_ATTRS)


def _same_device(requested: str | torch.device, actual: torch.device) -> bool:
    req = torch.device(requested)
    return req.type == actual.type and (req.index is None or req.index == (actual.index or 0))


def resolve_operator(
    model: nn.Module | FunctionalLoss | Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    data: Batch | Iterable[Batch] | None = None,
    *,
    params: Sequence[str] | str | None = None,
    train_mode: bool = False,
    device: str | torch.device | None = None,
) -> tuple[Any, bool]:
    """The operator to measure, and whether it was built here (so the caller may free its cached graphs).

    A model builds a :class:`HessianOperator` (one forward pass per batch). A ready operator or
    :class:`FunctionalLoss` already fixes the parameters, mode and device: ``params=`` must then be None,
    ``device=`` None or the operator's device, and ``train_mode=True`` is accepted only from an operator whose
    ``train_mode`` is True (see :func:`recorded_mode`).
    """
    ready = is_operator(model) or isinstance(model, FunctionalLoss)
    if not ready:
        if not isinstance(model, nn.Module):
            raise SharpnessInputError(
                "the first argument must be an nn.Module, a FunctionalLoss or an operator with "
                f"{'/'.join(_OPERATOR_ATTRS)}; got {type(model).__name__}"
            )
        op = HessianOperator(model, loss_fn, data, params, train_mode=train_mode, device=device)
        return op, True
    kind = type(model).__name__
    if loss_fn is not None or data is not None:
        raise SharpnessInputError(f"loss_fn and data apply only to a model, not to a {kind}")
    if params is not None:
        raise SharpnessInputError(
            f"params= applies only to a model; this {kind} already fixes its parameters"
        )
    if train_mode and not getattr(model, "train_mode", False):
        raise SharpnessInputError(
            f"train_mode=True applies only to a model (or a HessianOperator built in train mode), "
            f"not to this {kind}"
        )
    op = model if is_operator(model) else HessianOperator(model)
    if device is not None and str(device) != "auto" and not _same_device(device, op.device):
        raise SharpnessInputError(
            f"device={device} disagrees with the given {kind}, which lives on {op.device}"
        )
    return op, isinstance(model, FunctionalLoss)


def recorded_mode(model: Any, train_mode: bool) -> bool | None:
    """The train/eval mode to record: the argument for a model, the operator's own ``train_mode`` for an
    operator, ``None`` for a :class:`FunctionalLoss` (which fixed its mode when it was made)."""
    if isinstance(model, nn.Module):
        return bool(train_mode)
    if isinstance(model, FunctionalLoss):
        return None
    own = getattr(model, "train_mode", None)
    return None if own is None else bool(own)


def rademacher(gen: torch.Generator, d: int, b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A (d, b) block of independent +-1 entries drawn on the CPU generator ``gen``, then moved."""
    z = torch.randint(0, 2, (b, d), generator=gen, dtype=torch.int8)
    return (2 * z - 1).T.to(device=device, dtype=dtype).contiguous()


def gaussian(gen: torch.Generator, d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A standard normal vector (d,) drawn in float64 on the CPU generator ``gen``, then moved."""
    return torch.randn(d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def apply_blocks(op: Any, V: Tensor, batch: int) -> Tensor:
    """``op V`` computed ``batch`` columns at a time. Cost: ``V.shape[1]`` products."""
    return torch.cat([op.matmat(V[:, i : i + batch]) for i in range(0, V.shape[1], batch)], 1)


def release(op: Any, created: bool) -> None:
    """Free the cached gradient graphs of an operator built by the measurement itself."""
    if created and hasattr(op, "release"):
        op.release()
