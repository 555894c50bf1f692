"""Constructions of the built-in mixing matrices (unvalidated); the door is ``verify.topology.mixing_matrix``.

Each returns an (m, m) float64 tensor, O(m^2) memory and time. Formulas are in :mod:`verify.topology`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ring(m: int) -> Tensor:
    """``(I + S + S^T) / 3``, S the cyclic shift; for m = 2 both neighbours coincide and their weights add."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    eye = torch.eye(m, dtype=torch.float64)
    S = torch.roll(eye, 1, dims=1)
    return (eye + S + S.T) / 3


def metropolis(m: int, edges: set[tuple[int, int]]) -> Tensor:
    """Metropolis-Hastings weights: ``P_ij = 1/max(n_i, n_j)`` on undirected edges (n = degree + 1, i.e.
    counting self), ``P_ii = 1 - sum_{j != i} P_ij``. Edges are pairs i < j without repeats."""
    n = [1] * m
    for i, j in edges:
        n[i] += 1
        n[j] += 1
    P = torch.zeros(m, m, dtype=torch.float64)
    for i, j in edges:
        P[i, j] = P[j, i] = 1.0 / max(n[i], n[j])
    return P + torch.diag(1.0 - P.sum(1))


def lattice(r: int, c: int, wrap: bool) -> Tensor:
    """Metropolis-Hastings weights on the r x c grid (node a*c + b), with wrap-around (torus) or without.

    On a torus a neighbour reached twice (side of length 2) counts once; a side of length 1 adds no edge."""
    edges: set[tuple[int, int]] = set()
    for a in range(r):
        for b in range(c):
            i = a * c + b
            for a2, b2 in ((a, b + 1), (a + 1, b)):
                if wrap:
                    a2, b2 = a2 % r, b2 % c
                elif a2 >= r or b2 >= c:
                    continue
                j = a2 * c + b2
                if j != i:
                    edges.add((min(i, j), max(i, j)))
    return metropolis(r * c, edges)


def exponential(m: int) -> Tensor:
    """Directed circulant ``P[i, (i + s) mod m] = x[s]``, x uniform on s = 0 and every power of two below m
    (1 + ceil(log2 m) entries), as ``np.roll(x, i)`` in the official ``generate_P``."""
    x = torch.tensor([1.0 if s & (s - 1) == 0 else 0.0 for s in range(m)], dtype=torch.float64)
    x /= x.sum()
    return torch.stack([torch.roll(x, i) for i in range(m)])


def star(m: int) -> Tensor:
    """Metropolis-Hastings weights on the star, hub 0: ``P_0i = P_i0 = P_00 = 1/m``, ``P_ii = 1 - 1/m``."""
    return metropolis(m, {(0, i) for i in range(1, m)})


def complete(m: int) -> Tensor:
    """``J = 11^T / m``."""
    return torch.full((m, m), 1.0 / m, dtype=torch.float64)


def disconnected(m: int) -> Tensor:
    """``I`` (no communication)."""
    return torch.eye(m, dtype=torch.float64)
