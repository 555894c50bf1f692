"""Shared cases for the curvature tests: matrices with known spectra, tiny float64 models, exact Hessians."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

DT = torch.float64


def spectrum_matrix(eigs: np.ndarray, seed: int = 0, rotate: bool = True) -> np.ndarray:
    """``U diag(eigs) U^T`` with a random orthogonal ``U`` (or the diagonal itself), exactly symmetric."""
    eigs = np.asarray(eigs, dtype=np.float64)
    if not rotate:
        return np.diag(eigs)
    U, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((eigs.size, eigs.size)))
    A = (U * eigs) @ U.T
    return (A + A.T) / 2


def spectra(d: int = 150, seed: int = 0) -> dict[str, np.ndarray]:
    """Named spectra: well separated top, a tight cluster at the top, and one dominated by negatives."""
    rng = np.random.default_rng(seed)
    bulk = rng.uniform(0.0, 1.0, d - 5)
    return {
        "separated": np.concatenate([[10.0, 8.0, 6.5, 5.0, 4.0], bulk]),
        "clustered": np.concatenate([10.0 - 1e-3 * np.arange(5), bulk]),
        "negative": np.concatenate([[3.0, 2.5, 2.0, -6.0, -5.0], rng.uniform(-4.0, 1.5, d - 5)]),
    }


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def mlp_data(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def exact_hessian(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """torch.func.hessian of the flat cross-entropy loss in eval mode, built without ``sharpness``."""
    named = dict(net.named_parameters())
    names = list(named)
    sizes = [named[n].numel() for n in names]
    buffers = {n: b.detach() for n, b in net.named_buffers()}

    def f(theta: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, sizes)
        p = {n: t.reshape(named[n].shape) for n, t in zip(names, parts)}
        return F.cross_entropy(functional_call(net, {**buffers, **p}, (x,)), y)

    theta0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    was = net.training
    net.eval()
    try:
        H = hessian(f)(theta0).numpy()
    finally:
        net.train(was)
    return (H + H.T) / 2


def bn_cnn(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A small float64 CNN with BatchNorm (non-trivial running stats), in train mode, and image data."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).to(DT)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 1, 6, 6, dtype=DT) * 2 + 0.5)
    g = torch.Generator().manual_seed(3)
    return net, (torch.randn(20, 1, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (20,), generator=g))


def snapshot(net: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "flags": [m.training for m in net.modules()],
        "grads": [p.grad for p in net.parameters()],
    }


def assert_unchanged(net: nn.Module, before: dict) -> None:
    after = snapshot(net)
    assert after["flags"] == before["flags"]
    assert all(g is None for g in after["grads"])
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed"
