"""Gossip steps ``W -> P W`` for worker-stacked tensors (leading axis = worker), three ways.

For a stacked tensor ``W`` of shape ``(m, ...)`` the gossip step is ``(P W)_j = sum_k P_jk W_k``. Costs with
``d = W[0].numel()``:

- ``dense``: one matmul ``P @ W.reshape(m, d)``, ``2 m^2 d`` flops.
- ``sparse``: ``torch.sparse_csr`` matmul, ``2 nnz(P) d`` flops plus indexing overhead.
- ``roll``: only for circulant ``P`` (``P_jk = c[(k - j) mod m]``, e.g. ring and exponential):
  ``P W = sum_s c_s roll(W, -s, 0)``, computed as in-place slice adds, ``2 K d`` flops for ``K`` nonzero
  diagonals and no matmul.

``auto`` rule, from ``benchmarks/bench_mixing.py`` (d = 100k float32, CPU, 2 threads, median of 7 runs, ms):

  m    topology      dense   sparse   roll
  16   ring          0.39    1.07     0.74
  16   exponential   0.26    1.03     1.01
  16   grid          0.22    3.32     -
  64   ring          6.64    14.8     2.87
  64   exponential   3.39    16.5     5.42
  64   grid          3.18    15.7     -
  256  ring          74.7    57.8     42.6
  256  exponential   75.6    70.7     91.8
  256  grid          75.0    60.1     -
  256  complete      74.1    1206     4671

BLAS wins while P is small (it reads W once; roll and sparse make several passes over memory), so ``auto``
picks ``roll`` for circulant P with at most 3 nonzero diagonals (ring) when m >= 64, ``sparse`` when m >= 128
and nnz(P) <= m^2 / 8, else ``dense``. The same rule is used on CUDA, where it was not measured (no GPU was
available when it was written). Every method gives the same result up to rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

Mixer = Callable[[Tensor], Tensor]
METHODS = ("auto", "dense", "sparse", "roll")


def circulant_coefficients(P: Tensor, atol: float = 0.0) -> dict[int, float] | None:
    """Return ``{s: c_s}`` (nonzero ``c_s`` only) when ``P_jk = c[(k - j) mod m]`` for all j, k, else None.

    Cost: O(m^2) comparisons. ``atol`` is the largest entry-wise deviation from circulant allowed.
    """
    m = P.shape[0]
    first = P[0]
    idx = (torch.arange(m).unsqueeze(1) + torch.arange(m).unsqueeze(0)) % m  # idx[j, s] = (j + s) mod m
    shifted = torch.gather(P, 1, idx)  # shifted[j, s] = P[j, j + s]
    if not bool(torch.all(torch.abs(shifted - first.unsqueeze(0)) <= atol)):
        return None
    return {int(s): float(first[s]) for s in range(m) if float(first[s]) != 0.0}


def _flat(W: Tensor, m: int) -> Tensor:
    if W.dim() == 0 or W.shape[0] != m:
        raise ValueError(
            f"the stacked tensor needs a leading worker axis of size {m}; got shape {tuple(W.shape)}"
        )
    return W.reshape(m, -1)


def dense_mixer(P: Tensor) -> Mixer:
    """``W -> (P @ W.reshape(m, -1)).reshape(W.shape)``; 2 m^2 d flops. P is cast to W's dtype and device."""
    m = P.shape[0]
    cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def apply(W: Tensor) -> Tensor:
        key = (W.dtype, W.device)
        if key not in cache:
            cache[key] = P.to(dtype=W.dtype, device=W.device)
        return (cache[key] @ _flat(W, m)).reshape(W.shape)

    return apply


def sparse_mixer(P: Tensor) -> Mixer:
    """``W -> P_csr @ W`` with P stored as ``torch.sparse_csr``; 2 nnz(P) d flops."""
    m = P.shape[0]
    cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def apply(W: Tensor) -> Tensor:
        key = (W.dtype, W.device)
        if key not in cache:
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                cache[key] = P.to(dtype=W.dtype, device=W.device).to_sparse_csr()
        return (cache[key] @ _flat(W, m)).reshape(W.shape)

    return apply


def roll_mixer(P: Tensor) -> Mixer:
    """Circulant P: ``W -> sum_s c_s roll(W, -s, 0)`` as in-place slice adds; 2 K d flops (K diagonals)."""
    m = P.shape[0]
    coeffs = circulant_coefficients(P)
    if coeffs is None:
        raise ValueError("the 'roll' mixer needs a circulant P (P[j, k] depends only on (k - j) mod m)")
    c0 = coeffs.pop(0, 0.0)
    shifts = sorted(coeffs.items())

    def apply(W: Tensor) -> Tensor:
        X = _flat(W, m)
        out = X * c0
        for s, c in shifts:  # out[j] += c * X[(j + s) mod m]
            out[: m - s].add_(X[s:], alpha=c)
            out[m - s :].add_(X[:s], alpha=c)
        return out.reshape(W.shape)

    return apply


def auto_method(P: Tensor) -> str:
    """The method ``auto`` picks for P (rule and measurements in the module docstring). Cost O(m^2)."""
    m = P.shape[0]
    coeffs = circulant_coefficients(P)
    if m >= 64 and coeffs is not None and len(coeffs) <= 3:
        return "roll"
    if m >= 128 and int(torch.count_nonzero(P)) * 8 <= m * m:
        return "sparse"
    return "dense"


def mixer(P: Tensor, method: str = "auto") -> Mixer:
    """A callable ``W -> P W`` for stacked ``W`` of shape ``(m, ...)``; ``method`` in auto/dense/sparse/roll.

    P is taken as given (validate it first: ``verify.topology.validate``); costs in the module docstring.
    """
    if method not in METHODS:
        raise ValueError(f"unknown mixing method {method!r}; choose from {', '.join(METHODS)}")
    if method == "auto":
        method = auto_method(P)
    return {"dense": dense_mixer, "sparse": sparse_mixer, "roll": roll_mixer}[method](P)


def mix(P: Tensor, W: Tensor, method: str = "dense") -> Tensor:
    """One gossip step ``P W`` for stacked ``W`` (m, ...); a one-off convenience around :func:`mixer`."""
    return mixer(P, method)(W)
