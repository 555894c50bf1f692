"""The Lanczos process with full reorthogonalisation, one HVP per step, the product supplied by the caller.

After ``m`` steps from a unit vector ``q_1``: an orthonormal basis ``Q_m`` of the Krylov space
``span{q_1, H q_1, ..., H^{m-1} q_1}`` and a tridiagonal ``T_m = Q_m^T H Q_m`` with
``H Q_m = Q_m T_m + beta_m q_{m+1} e_m^T``. Every new vector is orthogonalised against the whole basis
(classical Gram-Schmidt twice, a third time when the second pass still removes much), so no ghost copies of
converged eigenvalues appear. The tridiagonal eigenproblem is solved in float64 on the CPU.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from .operators import gaussian


class Lanczos:
    """One Lanczos run with full reorthogonalisation; the caller supplies each product.

    ``absorb(H @ current)`` advances one step (one HVP), so several runs can share a ``matmat``. On breakdown
    (``beta <= 100 eps ||H||``: an invariant subspace) the run restarts on a random vector orthogonal to the
    basis drawn from ``generator`` (``beta`` recorded as 0), or stops if ``generator`` is None. Any
    ``beta <= sqrt(eps) ||H||`` (the space may be exhausted up to rounding; it happens when ``H`` has repeated
    eigenvalues) starts a new *block* at ``block_start``: the vectors after it explore the rest of the space.
    Memory: ``m + 1`` vectors of length ``d``, allocated as the run grows.
    """

    def __init__(self, v0: Tensor, max_steps: int, generator: torch.Generator | None = None) -> None:
        self.d = v0.numel()
        self.max_steps = min(int(max_steps), self.d)
        self.gen = generator
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self.anorm = 0.0
        self.done = False
        self.block_start = 0
        self._Q = v0.new_empty((min(self.max_steps + 1, 32), self.d))
        self._Q[0] = v0.reshape(-1) / v0.norm()

    @property
    def m(self) -> int:
        return len(self.alpha)

    @property
    def current(self) -> Tensor:
        """The vector whose product the next ``absorb`` expects."""
        return self._Q[self.m]

    @property
    def basis(self) -> Tensor:
        """``Q_m^T`` as an (m, d) tensor."""
        return self._Q[: self.m]

    def _orth(self, w: Tensor, B: Tensor) -> Tensor:
        for i in range(3):
            before = w.norm()
            w = w - B.T @ (B @ w)
            if i >= 1 and w.norm() > 0.7 * before:
                break
        return w

    def absorb(self, w: Tensor) -> None:
        """One step given ``w = H q_m`` (the product of :attr:`current`)."""
        j = self.m
        q = self._Q[j]
        w = w.to(q).reshape(-1)
        self.anorm = max(self.anorm, float(w.norm()))
        if j > 0:
            w = w - self.beta[-1] * self._Q[j - 1]
        a = float(torch.dot(q, w))
        w = self._orth(w - a * q, self._Q[: j + 1])
        b = float(w.norm())
        self.alpha.append(a)
        if j + 1 >= self.max_steps:
            self.beta.append(b if j + 1 < self.d else 0.0)
            self.done = True
            return
        eps = torch.finfo(q.dtype).eps
        if b <= eps**0.5 * self.anorm:
            self.block_start = j + 1
        if b <= 100 * eps * self.anorm:
            w = None
            if self.gen is not None:
                z = gaussian(self.gen, self.d, q.dtype, q.device)
                size = float(z.norm())
                z = self._orth(z, self._Q[: j + 1])
                w = z / z.norm() if z.norm() > 1e3 * eps * size else None
            self.beta.append(0.0)
            if w is None:
                self.done = True
                return
        else:
            self.beta.append(b)
            w = w / b
        if j + 2 > self._Q.shape[0]:
            grown = self._Q.new_empty((min(2 * self._Q.shape[0], self.max_steps + 1), self.d))
            grown[: j + 1] = self._Q[: j + 1]
            self._Q = grown
        self._Q[j + 1] = w

    def ritz(self, start: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), eigenvectors ``S`` of ``T_m`` (columns), and the bounds
        ``|beta_m S[m-1, i]| = ||H y_i - theta_i y_i||`` for the Ritz vectors ``y_i = Q_m s_i`` (by the Krylov
        relation, exact up to rounding). ``start``: use only the trailing block ``T[start:, start:]``."""
        a = np.asarray(self.alpha[start:], dtype=np.float64)
        theta, S = scipy.linalg.eigh_tridiagonal(a, np.asarray(self.beta[start:-1], dtype=np.float64))
        return theta, S, np.abs(self.beta[-1] * S[-1, :])

    def vectors(self, S: np.ndarray) -> Tensor:
        """Ritz vectors ``Q_m S`` as a (d, r) tensor, columns normalised."""
        Y = self.basis.T @ torch.as_tensor(S, dtype=self._Q.dtype, device=self._Q.device)
        return Y / Y.norm(dim=0, keepdim=True)
