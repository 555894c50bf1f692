"""Quantities computed from a run's saved checkpoints (never by training): the average model from ``avg.pt``,
the training loss around it, its sharpness, and the workers' predictions from ``ckpt.pt``.

- :func:`average_loss`: ``L(w) = (1/n) sum_i CE(f(w; x_i), y_i)`` over the run's training data (re-read from
  its ``config.json``: data spec, ``samples``, seed), in eval mode (BatchNorm: the running statistics saved
  with the average model), as a :class:`~sharpness.functional.FunctionalLoss`. Cost: one forward pass (the
  input check).
- its ``Tr H`` and ``lambda_max``, with their errors: :func:`sharpness.at_point.sharpness_at`.
- :func:`worker_probabilities`: softmax outputs of every worker ``w_j`` (rows of ``ckpt.pt``'s ``W``, each
  with its own BatchNorm buffers) and of the average model on the run's test split. Cost: m + 1 forward
  passes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from sharpness.checkpoint import load_model
from sharpness.data import load_dataset
from sharpness.functional import FunctionalLoss, make_loss, unflatten
from verify.rundir import RunDirError, read_ckpt

from .sources import FiguresError, RunData


def average_model(run: RunData, device: str = "cpu") -> nn.Module:
    """The average model of a finished run, from ``avg.pt`` (eval mode)."""
    path = run.path / "avg.pt"
    if not path.is_file():
        raise FiguresError(f"{path} not found (the run diverged or is unfinished; it has no average model)")
    model, _ = load_model(path, device=device)
    return model


def run_data(run: RunData, split: str, samples: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The run's ``split`` data as the engine loaded it (its ``samples``/``test_samples`` subset), then an
    optional seeded subset of ``samples`` points."""
    c = run.config
    if c.get("closed_form") is not None:
        raise FiguresError(f"run {run.path} is a closed-form problem: it has no data set")
    n = c.get("samples") if split == "train" else c.get("test_samples")
    ds = load_dataset(c["data"], split=split, samples=n, seed=int(c.get("seed", 0)))
    if samples is not None and samples < len(ds):
        ds = ds.subset(int(samples), seed)
    return ds.x, ds.y


def _batches(x: Tensor, y: Tensor, dtype: torch.dtype, size: int = 1024) -> list[tuple[Tensor, Tensor]]:
    x = x.to(dtype)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def average_loss(run: RunData, samples: int | None = None, device: str = "cpu") -> FunctionalLoss:
    """The training cross-entropy of the average model as a functional loss (module docstring)."""
    model = average_model(run, device)
    x, y = run_data(run, "train", samples)
    dtype = next(model.parameters()).dtype
    return make_loss(model, F.cross_entropy, _batches(x, y, dtype), device=device)


def _load_ckpt(run: RunData) -> dict[str, Any]:
    path = run.path / "ckpt.pt"
    if not path.is_file():
        raise FiguresError(f"{path} not found: the workers' final state is needed")
    try:
        return read_ckpt(path)
    except RunDirError as exc:
        raise FiguresError(str(exc)) from None


def worker_probabilities(run: RunData, device: str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """``(P (m, n, C), p_avg (n, C), y (n,))``: the softmax of each worker and of the average model on the
    test split."""
    model = average_model(run, device)
    ck = _load_ckpt(run)
    W, bufs = ck["W"], ck.get("buffers") or {}
    like = {k: v.detach() for k, v in model.named_parameters()}
    d = sum(p.numel() for p in like.values())
    if W.shape[1] != d:
        raise FiguresError(f"{run.path}: ckpt.pt has {W.shape[1]} parameters per worker, avg.pt {d}")
    x, y = run_data(run, "test")
    dtype = next(model.parameters()).dtype
    x = x.to(device=device, dtype=dtype)
    own = dict(model.named_buffers())
    probs = []
    with torch.no_grad():
        for j in range(W.shape[0]):
            p = unflatten(W[j].to(device=device, dtype=dtype), like)
            b = {k: v[j].to(device) for k, v in bufs.items()} if bufs else own
            probs.append(
                torch.cat(
                    [F.softmax(functional_call(model, {**b, **p}, (xb,)).double(), 1) for xb in x.split(1024)]
                )
            )
        p_avg = torch.cat([F.softmax(model(xb).double(), 1) for xb in x.split(1024)])
    return torch.stack(probs).cpu(), p_avg.cpu(), y.cpu()
