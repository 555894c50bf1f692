"""1-D and 2-D loss landscapes ``L(w + a d1 + b d2)`` along normalised directions (Li et al., NeurIPS 2018).

Filter normalisation: a random Gaussian direction ``d`` is rescaled, for every filter ``i`` of every weight
(the output row ``W[i]`` of a Linear or Conv weight, any tensor with ``dim >= 2``), to
``d[i] <- d[i] / ||d[i]|| * ||w[i]||``. One-dimensional tensors (biases, BatchNorm scales and shifts) get a
zero direction by default (``ignore_1d=True``); otherwise each is treated as one filter. A given direction
(e.g. the top Hessian eigenvector) can be used as is, filter-normalised, or scaled to the parameter norm.
Forward passes only, under ``torch.no_grad``, batched through ``vmap`` on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .evaluate import loss_at, loss_values, prepare
from .functional import (
    Batch,
    FunctionalLoss,
    Params,
    SharpnessInputError,
    check_seed,
    flatten,
    seeded,
    select_params,
)
from .results import Result

LossFn = Callable[[Tensor, Tensor], Tensor]
Direction = Tensor | Mapping[str, Tensor] | None
NORMS = ("filter", "layer", "model", "none")
LINE_ALPHAS = tuple(-1.0 + 0.1 * i for i in range(21))
GRID_COORDS = tuple(-1.0 + 0.2 * i for i in range(11))


@dataclass
class LandscapeResult(Result):
    """A line, ``losses[i] = L(w + alphas[i] d1)``, or a grid, where ``losses[i][j]`` adds ``betas[j] d2``."""

    kind: str
    alphas: list[float]
    betas: list[float] | None
    losses: list[float] | list[list[float]]
    base_loss: float
    n_forward: int
    direction_norms: list[float]
    norm: str


def normalize_direction(
    direction: Tensor | Mapping[str, Tensor],
    like: Params | FunctionalLoss,
    *,
    norm: str = "filter",
    ignore_1d: bool = True,
) -> Tensor:
    """Rescale a direction to the parameters ``w`` it perturbs; returns a flat vector in ``like``'s order.

    ``norm="filter"``: ``d[i] <- d[i] ||w[i]|| / ||d[i]||`` per filter (output row) of each tensor with
    ``dim >= 2``; ``"layer"``: per tensor; ``"model"``: ``d ||w|| / ||d||`` over all parameters (use it for an
    eigenvector); ``"none"``: unchanged. With ``ignore_1d`` (filter/layer only) 1-D tensors get a zero
    direction, else each counts as one filter. Cost: O(d), no forward pass.
    """
    params = like.params if isinstance(like, FunctionalLoss) else dict(like)
    if norm not in NORMS:
        raise SharpnessInputError(f"norm must be one of {NORMS}, not {norm!r}")
    if isinstance(direction, Mapping):
        missing = [n for n in params if n not in direction]
        if missing:
            raise SharpnessInputError(f"direction lacks the parameters {missing[:5]}")
        parts = {n: direction[n].detach().reshape(p.shape) for n, p in params.items()}
    else:
        d = sum(p.numel() for p in params.values())
        if direction.dim() != 1 or direction.numel() != d:
            raise SharpnessInputError(
                f"direction must be a flat vector of {d} entries, got {tuple(direction.shape)}"
            )
        i, parts = 0, {}
        for n, p in params.items():
            parts[n] = direction.detach()[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
    parts = {n: t.to(device=params[n].device, dtype=params[n].dtype) for n, t in parts.items()}
    if norm == "none":
        return flatten(parts)
    if norm == "model":
        dn = float(flatten(parts).norm())
        if dn == 0:
            raise SharpnessInputError("the direction is zero: cannot scale it to the parameter norm")
        return flatten(parts) * (float(flatten(params).norm()) / dn)
    out: Params = {}
    for n, t in parts.items():
        w = params[n].detach()
        if t.dim() <= 1 and ignore_1d:
            out[n] = torch.zeros_like(t)
        elif norm == "layer" or t.dim() <= 1:
            out[n] = t * (w.norm() / t.norm().clamp_min(1e-30))
        else:
            rows_d = t.reshape(t.shape[0], -1)
            rows_w = w.reshape(w.shape[0], -1)
            scale = rows_w.norm(dim=1) / rows_d.norm(dim=1).clamp_min(1e-30)
            out[n] = (rows_d * scale[:, None]).reshape(t.shape)
    return flatten(out)


def random_direction(
    model: nn.Module | FunctionalLoss,
    seed: int = 0,
    *,
    params: Sequence[str] | str | None = None,
    norm: str = "filter",
    ignore_1d: bool = True,
) -> Tensor:
    """A Gaussian direction ``N(0, I)`` (CPU generator, ``seed``), normalised by :func:`normalize_direction`.

    From a model, the direction covers its trainable parameters (or the ``params`` prefix) in the same order
    as ``make_loss``; no data needed. Cost: O(d).
    """
    if isinstance(model, FunctionalLoss):
        if params is not None:
            raise SharpnessInputError("params applies only when a model is given, not a FunctionalLoss")
        like = model.params
    else:
        named = dict(model.named_parameters())
        like = {n: named[n].detach() for n in select_params(model, params)}
    gen = torch.Generator().manual_seed(check_seed(seed))
    d = sum(p.numel() for p in like.values())
    raw = torch.randn(d, generator=gen, dtype=torch.float64)
    return normalize_direction(raw, like, norm=norm, ignore_1d=ignore_1d)


def _grid_losses(
    model: nn.Module | FunctionalLoss,
    loss_fn: LossFn | None,
    data: Batch | Iterable[Batch] | None,
    dirs: list[Direction],
    coords: list[list[float]],
    seed: int,
    norm: str,
    ignore_1d: bool,
    params: Sequence[str] | str | None,
    device: str | torch.device | None,
    train_mode: bool,
    chunk: int | None,
) -> tuple[Tensor, float, list[float], dict]:
    fl, settings = prepare(
        model,
        loss_fn,
        data,
        params=params,
        train_mode=train_mode,
        device=device,
        seed=seed,
        norm=norm,
        ignore_1d=ignore_1d,
        given_directions=[d is not None for d in dirs],
        chunk=chunk,
    )
    vecs = []
    for k, d in enumerate(dirs):
        if d is None:
            vecs.append(random_direction(fl, seed + k, norm=norm, ignore_1d=ignore_1d))
        else:
            vecs.append(normalize_direction(d, fl, norm=norm, ignore_1d=ignore_1d))
    theta = fl.flat_params().detach()
    grids = torch.meshgrid(*[torch.as_tensor(c, dtype=theta.dtype) for c in coords], indexing="ij")
    shape = grids[0].shape
    coeff = torch.stack([g.reshape(-1) for g in grids], 1).to(theta.device)  # (k, n_dirs)
    V = torch.stack(vecs, 0)  # (n_dirs, d)
    losses = torch.empty(coeff.shape[0], dtype=torch.float64)
    for i in range(0, coeff.shape[0], 64):
        block = theta + coeff[i : i + 64] @ V
        losses[i : i + 64] = (
            loss_values(fl, block, chunk=chunk, where="points of the landscape").double().cpu()
        )
    base = loss_at(fl, theta)
    return losses.reshape(shape), base, [float(v.norm()) for v in vecs], settings


@seeded
def loss_line(
    model: nn.Module | FunctionalLoss,
    direction: Direction = None,
    alphas: Sequence[float] | Tensor = LINE_ALPHAS,
    *,
    loss_fn: LossFn | None = None,
    data: Batch | Iterable[Batch] | None = None,
    seed: int = 0,
    norm: str = "filter",
    ignore_1d: bool = True,
    params: Sequence[str] | str | None = None,
    device: str | torch.device | None = None,
    train_mode: bool = False,
    chunk: int | None = None,
) -> LandscapeResult:
    """``L(w + alpha d)`` for each ``alpha``; ``d`` random (``direction=None``, seeded) or given, then
    normalised by ``norm``. Cost: ``len(alphas) + 1`` forward passes per batch.
    """
    a = [float(x) for x in alphas]
    losses, base, norms, settings = _grid_losses(
        model, loss_fn, data, [direction], [a], seed, norm, ignore_1d, params, device, train_mode, chunk
    )
    return LandscapeResult(
        kind="1d",
        alphas=a,
        betas=None,
        losses=losses.tolist(),
        base_loss=base,
        n_forward=len(a) + 1,
        direction_norms=norms,
        norm=norm,
        settings=settings,
        seed=seed,
        device=settings["device"],
    )


@seeded
def loss_surface(
    model: nn.Module | FunctionalLoss,
    dir1: Direction = None,
    dir2: Direction = None,
    alphas: Sequence[float] | Tensor = GRID_COORDS,
    betas: Sequence[float] | Tensor = GRID_COORDS,
    *,
    loss_fn: LossFn | None = None,
    data: Batch | Iterable[Batch] | None = None,
    seed: int = 0,
    norm: str = "filter",
    ignore_1d: bool = True,
    params: Sequence[str] | str | None = None,
    device: str | torch.device | None = None,
    train_mode: bool = False,
    chunk: int | None = None,
) -> LandscapeResult:
    """``losses[i][j] = L(w + alphas[i] d1 + betas[j] d2)``; random directions: seeds ``seed``, ``seed + 1``.

    Cost: ``len(alphas) * len(betas) + 1`` forward passes per batch.
    """
    a, b = [float(x) for x in alphas], [float(x) for x in betas]
    losses, base, norms, settings = _grid_losses(
        model, loss_fn, data, [dir1, dir2], [a, b], seed, norm, ignore_1d, params, device, train_mode, chunk
    )
    return LandscapeResult(
        kind="2d",
        alphas=a,
        betas=b,
        losses=losses.tolist(),
        base_loss=base,
        n_forward=len(a) * len(b) + 1,
        direction_norms=norms,
        norm=norm,
        settings=settings,
        seed=seed,
        device=settings["device"],
    )
