"""Loss values and gradients of a :class:`~sharpness.functional.FunctionalLoss` at perturbed points.

Shared by the SAM losses (:mod:`sharpness.sam`) and the loss landscapes (:mod:`sharpness.landscape`):
both evaluate ``L(theta)`` at many flat parameter vectors near the measured point, never touching a module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from .functional import (
    Batch,
    FunctionalLoss,
    SharpnessInputError,
    check_loss,
    private_rng,
    require_finite,
    require_finite_gradient,
)
from .hvp import as_functional


def prepare(
    model: nn.Module | FunctionalLoss,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
    data: Batch | Iterable[Batch] | None,
    *,
    params: Sequence[str] | str | None,
    train_mode: bool,
    device: str | torch.device | None,
    seed: int | None,
    **extra: Any,
) -> tuple[FunctionalLoss, dict[str, Any]]:
    """The :class:`FunctionalLoss` to measure (:func:`sharpness.hvp.as_functional`, the one door) and the
    settings dict to record with the result. Cost: one forward pass per batch (the input check)."""
    fl = as_functional(model, loss_fn, data, params=params, train_mode=train_mode, device=device)
    if fl is model:
        with private_rng(0):  # dropout in a train-mode FunctionalLoss: the caller's RNG is not advanced
            check_loss(fl)
        settings: dict[str, Any] = {"input": "FunctionalLoss", "params": None, "train_mode": None}
    else:
        settings = {"input": "model", "params": params, "train_mode": bool(train_mode)}
    settings.update(
        {
            "seed": seed,
            "device": str(fl.device),
            "dtype": str(fl.dtype),
            "num_params": fl.num_params,
            "num_batches": len(fl.terms()),
        }
    )
    if fl.parallel is not None:  # the batches of all ranks, and how many ranks hold them
        settings["num_batches"] = int(fl.parallel.sum_float(len(fl.terms()), "the count of batches"))
        settings["ranks"] = fl.parallel.world
    settings.update(extra)
    return fl, settings


def default_chunk(fl: FunctionalLoss) -> int:
    """Points per vectorised forward call: 1 on CPU (a plain loop), 16 on CUDA."""
    return 16 if fl.device.type == "cuda" else 1


def loss_at(fl: FunctionalLoss, theta: Tensor, where: str = "the measured weights") -> float:
    """``L(theta)`` for one flat vector; NaN/inf raises :class:`~sharpness.functional.NonFiniteError` naming
    ``where``. Cost: one forward pass per batch."""
    with torch.no_grad():
        value = fl.loss(fl.unflatten(theta.to(device=fl.device, dtype=fl.dtype))).reshape(1)
        value = fl.allsum(value, "a loss value")[0]
    return float(require_finite(value, f"the loss at {where}"))


def loss_values(
    fl: FunctionalLoss, points: Tensor, *, chunk: int | None = None, where: str = "perturbed weights"
) -> Tensor:
    """``[L(theta_1), ..., L(theta_k)]`` for a (k, d) block of flat vectors, under ``torch.no_grad``.

    ``chunk`` points go through one ``vmap``-ed forward call; a model that cannot be vmapped (e.g. BatchNorm
    in train mode, which writes running statistics) falls back to a loop. A NaN/inf value raises
    :class:`~sharpness.functional.NonFiniteError` naming ``where``. Cost: k forward passes per batch.
    """
    if points.dim() != 2 or points.shape[1] != fl.num_params:
        raise SharpnessInputError(
            f"expected a (k, {fl.num_params}) block of points, got {tuple(points.shape)}"
        )
    chunk = default_chunk(fl) if chunk is None else max(1, int(chunk))
    points = points.to(device=fl.device, dtype=fl.dtype)
    out: list[Tensor] = []
    flat = lambda t: fl.loss(fl.unflatten(t))
    vmappable = chunk > 1
    with torch.no_grad():
        for i in range(0, points.shape[0], chunk):
            block = points[i : i + chunk]
            if vmappable and block.shape[0] > 1:
                try:
                    out.append(vmap(flat)(block).reshape(-1))
                    continue
                except Exception:  # noqa: BLE001 - not vmappable: the loop below re-raises real errors
                    vmappable = False
            out.append(torch.stack([flat(t).reshape(()) for t in block]))
    values = torch.cat(out) if out else points.new_zeros(0)
    return require_finite(fl.allsum(values.detach(), "a block of loss values"), f"the loss at {where}")


def value_and_grad(
    fl: FunctionalLoss, theta: Tensor, where: str = "the measured weights"
) -> tuple[float, Tensor]:
    """``(L(theta), nabla L(theta))`` at a flat vector, batch by batch; a NaN/inf loss or gradient raises
    :class:`~sharpness.functional.NonFiniteError` naming ``where``. Cost: one gradient."""
    theta = theta.detach().to(device=fl.device, dtype=fl.dtype)
    value = 0.0
    g = torch.zeros_like(theta)
    for w, f in fl.terms():
        t = theta.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = f(fl.unflatten(t))
            (gb,) = torch.autograd.grad(loss, t)
        value += w * float(require_finite(loss.detach(), f"the loss at {where}"))
        g += w * gb
    if fl.parallel is not None:  # one all_reduce for the value and the gradient
        both = fl.allsum(torch.cat([g.new_tensor([value]), g]), "a gradient")
        value, g = float(both[0]), both[1:]
    return value, require_finite_gradient(g, fl.params, where)
