"""The weight diversity matrix ``Xi = (1/m) sum_j d_j d_j^T = D^T D / m`` of m deviations, never formed.

``D`` is the (m, d) matrix of deviations ``d_j = w_j - w_a`` (rows). Sampling ``eps = D^T z / sqrt(m)`` with
``z ~ N(0, I_m)`` gives ``Cov(eps) = D^T D / m = Xi`` exactly; after centring (``sum_j d_j = 0``),
``rank Xi <= m - 1``. Used by :mod:`sharpness.sam` and by the ``verify`` package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .functional import FunctionalLoss, Params, SharpnessInputError

Deviations = Tensor | Sequence[Mapping[str, Tensor]] | Mapping[str, Tensor]


def as_deviation_matrix(deviations: Deviations, like_params: Params | FunctionalLoss | None = None) -> Tensor:
    """The (m, d) matrix ``D`` whose rows are the deviations, flattened in ``like_params``' order.

    Accepts an (m, d) tensor, a list of m parameter dicts, or one stacked dict ``{name: (m, *shape)}``. Dict
    entries are taken in ``like_params``' key order (extra keys ignored, so whole worker state dicts work);
    without ``like_params`` the first dict's order is used. The result has ``like_params``' dtype and device.
    """
    like = like_params.params if isinstance(like_params, FunctionalLoss) else like_params
    if isinstance(deviations, Tensor):
        D = deviations
        if D.dim() != 2:
            raise SharpnessInputError(f"deviations must be an (m, d) matrix, got shape {tuple(D.shape)}")
    else:
        if isinstance(deviations, Mapping):  # stacked {name: (m, *shape)}
            first = deviations
            rows = None
        else:
            rows = list(deviations)
            if not rows or not all(isinstance(r, Mapping) for r in rows):
                raise SharpnessInputError("deviations must be an (m, d) tensor or a non-empty list of dicts")
            first = rows[0]
        names = list(like) if like is not None else list(first)
        missing = [n for n in names if n not in first]
        if missing:
            raise SharpnessInputError(f"deviations lack the parameters {missing[:5]}")
        if rows is None:
            m = first[names[0]].shape[0]
            try:
                D = torch.cat([first[n].reshape(m, -1) for n in names], 1)
            except RuntimeError as exc:
                raise SharpnessInputError(f"stacked deviations do not share a leading axis: {exc}") from exc
        else:
            try:
                D = torch.stack([torch.cat([r[n].reshape(-1) for n in names]) for r in rows])
            except (KeyError, RuntimeError) as exc:
                raise SharpnessInputError(f"deviation dicts do not all match: {exc}") from exc
    if like is not None:
        d = sum(p.numel() for p in like.values())
        if D.shape[1] != d:
            raise SharpnessInputError(f"deviations have {D.shape[1]} entries per row, the parameters {d}")
        ref = next(iter(like.values()))
        D = D.to(device=ref.device, dtype=ref.dtype)
    if D.shape[0] < 1:
        raise SharpnessInputError("deviations are empty (m = 0)")
    return D.detach()


def centre(D: Tensor) -> Tensor:
    """``D - mean_j d_j``: deviations from the average model (then ``rank Xi <= m - 1``)."""
    return D - D.mean(0, keepdim=True)


def xi_trace(D: Tensor) -> float:
    """``Tr Xi = (1/m) sum_j ||d_j||^2`` (the consensus distance in squared units)."""
    return float((D * D).sum() / D.shape[0])


def xi_sampler(
    deviations: Deviations,
    n: int,
    generator: torch.Generator | None = None,
    *,
    like: Params | FunctionalLoss | None = None,
) -> Tensor:
    """``n`` draws of ``eps = D^T z / sqrt(m)``, ``z ~ N(0, I_m)``, as an (n, d) block; ``Cov(eps) = Xi``.

    ``z`` is drawn on the generator's device in ``D``'s dtype, then moved to ``D``'s device.
    Cost: one (n, m) x (m, d) product; ``Xi`` is never formed.
    """
    D = as_deviation_matrix(deviations, like)
    m = D.shape[0]
    gen_device = generator.device if generator is not None else torch.device("cpu")
    z = torch.randn(n, m, generator=generator, dtype=D.dtype, device=gen_device).to(D.device)
    return z @ D / math.sqrt(m)
