"""Closed-form test losses whose Gaussian smoothing is known exactly (paper.md s.6, "Test losses").

Each loss is a torch function of a flat float64 parameter ``w`` (shape ``(d,)`` or a batch ``(n, d)``)
and knows its exact average-direction SAM objective ``L_Sigma(w) = E_{eps ~ N(0, Sigma)} L(w + eps)`` and
its gradient, so the claims can be checked without Monte Carlo. ``Sigma`` is given either as ``sigma^2 I``
(``sigma=``) or by worker deviations ``D`` (``deviations=``, shape ``(m, d)``) with ``Xi = D^T D / m``;
quadratic forms are evaluated as ``u^T Xi u = ||D u||^2 / m`` and ``Xi`` is never formed. Deviations are
used as given (centre them first when they are ``w_j - w_a``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import special
from torch import Tensor

Sigma = float | Tensor | None
Devs = Tensor | None

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class LossInputError(ValueError):
    """Bad input to a test loss; the message is one line naming the problem."""


def _as_w(w: Tensor, d: int) -> Tensor:
    if not isinstance(w, Tensor):
        w = torch.as_tensor(w, dtype=torch.float64)
    if w.shape[-1:] != (d,):
        raise LossInputError(f"w must have last dimension {d}, got shape {tuple(w.shape)}")
    return w


def _check_cov(d: int, sigma: Sigma, deviations: Devs) -> float | Tensor:
    """Validate the smoothing covariance: exactly one of ``sigma`` (Sigma = sigma^2 I) or ``deviations``."""
    if (sigma is None) == (deviations is None):
        raise LossInputError("give exactly one of sigma= (Sigma = sigma^2 I) or deviations= (Xi = D^T D/m)")
    if sigma is not None:
        s = float(sigma)
        if not math.isfinite(s) or s < 0:
            raise LossInputError(f"sigma must be a finite number >= 0, got {sigma}")
        return s
    D = deviations
    if not isinstance(D, Tensor) or D.dim() != 2 or D.shape[1] != d or D.shape[0] == 0:
        shape = tuple(D.shape) if isinstance(D, Tensor) else type(D).__name__
        raise LossInputError(f"deviations must be an (m, {d}) tensor with m >= 1, got {shape}")
    return D


def quadratic_forms(U: Tensor, sigma: Sigma = None, deviations: Devs = None) -> Tensor:
    """``q_k = u_k^T Sigma u_k`` for the rows of ``U`` (K, d): ``sigma^2 ||u_k||^2`` or ``||D u_k||^2 / m``.

    Cost: one (m x d)(d x K) product; ``Xi`` is never formed.
    """
    cov = _check_cov(U.shape[1], sigma, deviations)
    if isinstance(cov, float):
        return cov**2 * (U * U).sum(-1)
    D = cov.to(U)
    return ((D @ U.T) ** 2).sum(0) / D.shape[0]


def covariance_diagonal(d: int, sigma: Sigma = None, deviations: Devs = None) -> Tensor:
    """``diag(Sigma)`` as a float64 vector: ``sigma^2`` everywhere, or ``(1/m) sum_j D_ji^2``."""
    cov = _check_cov(d, sigma, deviations)
    if isinstance(cov, float):
        return torch.full((d,), cov**2, dtype=torch.float64)
    return (cov * cov).sum(0) / cov.shape[0]


class CosLoss:
    """``L(w) = sum_k c_k cos(u_k^T w + b_k) + 1/2 w^T A w``: smooth (C^inf), non-convex, non-quadratic.

    ``u_k ~ N(0, u_scale^2 I / d)``, ``c_k ~ U[c_range]``, ``b_k ~ U[0, 2 pi]``, ``A = diag(a)``,
    ``a ~ U[a_range]``. Smoothed (exact), with ``q_k = u_k^T Sigma u_k``:
    ``L_Sigma(w) = sum_k c_k cos(u_k^T w + b_k) exp(-q_k/2) + 1/2 w^T A w + 1/2 Tr(A Sigma)``.
    Every method is closed form, O(K d) per point.
    """

    def __init__(
        self,
        d: int = 20,
        K: int = 30,
        seed: int = 0,
        *,
        u_scale: float = 1.0,
        a_range: tuple[float, float] = (0.1, 1.0),
        c_range: tuple[float, float] = (0.5, 1.5),
    ) -> None:
        if d < 1 or K < 1:
            raise LossInputError(f"CosLoss needs d >= 1 and K >= 1, got d={d}, K={K}")
        g = torch.Generator().manual_seed(int(seed))
        f64 = torch.float64
        self.d, self.K = d, K
        self.U = torch.randn(K, d, generator=g, dtype=f64) * (u_scale / math.sqrt(d))
        self.c = c_range[0] + (c_range[1] - c_range[0]) * torch.rand(K, generator=g, dtype=f64)
        self.b = 2 * math.pi * torch.rand(K, generator=g, dtype=f64)
        self.a = a_range[0] + (a_range[1] - a_range[0]) * torch.rand(d, generator=g, dtype=f64)

    def _phase(self, w: Tensor) -> Tensor:
        return _as_w(w, self.d) @ self.U.T + self.b

    def __call__(self, w: Tensor) -> Tensor:
        """``L(w)`` (batched over leading dims; differentiable by autograd)."""
        return (self.c * torch.cos(self._phase(w))).sum(-1) + 0.5 * (self.a * w * w).sum(-1)

    def grad(self, w: Tensor) -> Tensor:
        """``nabla L(w) = -sum_k c_k sin(phi_k) u_k + A w``, ``phi_k = u_k^T w + b_k``."""
        return -(self.c * torch.sin(self._phase(w))) @ self.U + self.a * w

    def hessian(self, w: Tensor) -> Tensor:
        """``nabla^2 L(w) = -sum_k c_k cos(phi_k) u_k u_k^T + A`` for one point ``w`` (d,)."""
        coef = -self.c * torch.cos(self._phase(w))
        return (self.U.T * coef) @ self.U + torch.diag(self.a)

    def third(self, w: Tensor, v: Tensor) -> Tensor:
        """``T(w)[v, v] = sum_k c_k sin(phi_k) (u_k^T v)^2 u_k`` at one ``w``; ``v`` is (d,) or (m, d)."""
        proj = v @ self.U.T
        return (proj**2 * self.c * torch.sin(self._phase(w))) @ self.U

    def half_grad_trace(self, w: Tensor, deviations: Tensor) -> Tensor:
        """``1/2 nabla Tr(H(w) Xi) = 1/2 sum_k c_k sin(phi_k) q_k u_k = 1/2 (1/m) sum_j T(w)[d_j, d_j]``."""
        q = quadratic_forms(self.U, deviations=deviations)
        return 0.5 * (self.c * torch.sin(self._phase(w)) * q) @ self.U

    def smoothed(self, w: Tensor, sigma: Sigma = None, deviations: Devs = None) -> Tensor:
        """``L_Sigma(w) = sum_k c_k cos(phi_k) exp(-q_k/2) + 1/2 w^T A w + 1/2 Tr(A Sigma)`` (exact)."""
        q = quadratic_forms(self.U, sigma, deviations)
        tr = (self.a * covariance_diagonal(self.d, sigma, deviations).to(self.a)).sum()
        cos = (self.c * torch.cos(self._phase(w)) * torch.exp(-q / 2)).sum(-1)
        return cos + 0.5 * (self.a * w * w).sum(-1) + 0.5 * tr

    def smoothed_grad(self, w: Tensor, sigma: Sigma = None, deviations: Devs = None) -> Tensor:
        """``nabla L_Sigma(w) = -sum_k c_k sin(phi_k) exp(-q_k/2) u_k + A w`` (exact)."""
        q = quadratic_forms(self.U, sigma, deviations)
        return -(self.c * torch.sin(self._phase(w)) * torch.exp(-q / 2)) @ self.U + self.a * w


class QuadraticLoss:
    """``L(w) = 1/2 sum_i h_i (w_i - c_i)^2`` (diagonal Hessian ``diag(h)``, centre ``c``, default 0).

    Smoothed (exact): ``L_Sigma(w) = L(w) + 1/2 sum_i h_i Sigma_ii``, so ``nabla L_Sigma = nabla L``: a
    quadratic cannot see the smoothing in its gradient (paper.md s.2.2, [I] Corollary C.1).
    """

    def __init__(self, h: Tensor | list[float] | np.ndarray, center: Tensor | None = None) -> None:
        self.h = torch.as_tensor(h, dtype=torch.float64).reshape(-1)
        if self.h.numel() == 0:
            raise LossInputError("QuadraticLoss needs at least one curvature h_i")
        self.d = self.h.numel()
        self.center = torch.zeros(self.d, dtype=torch.float64) if center is None else _as_w(center, self.d)

    def __call__(self, w: Tensor) -> Tensor:
        r = _as_w(w, self.d) - self.center
        return 0.5 * (self.h * r * r).sum(-1)

    def grad(self, w: Tensor) -> Tensor:
        """``h * (w - c)``."""
        return self.h * (_as_w(w, self.d) - self.center)

    def hessian(self, w: Tensor) -> Tensor:
        """``diag(h)``."""
        return torch.diag(self.h)

    def smoothed(self, w: Tensor, sigma: Sigma = None, deviations: Devs = None) -> Tensor:
        """``L(w) + 1/2 sum_i h_i Sigma_ii``."""
        return self(w) + 0.5 * (self.h * covariance_diagonal(self.d, sigma, deviations)).sum()

    def smoothed_grad(self, w: Tensor, sigma: Sigma = None, deviations: Devs = None) -> Tensor:
        """``nabla L_Sigma = nabla L`` (the covariance is validated, then has no effect)."""
        _check_cov(self.d, sigma, deviations)
        return self.grad(w)


class AbsLoss:
    """``L(w) = sum_k |u_k^T w - b_k|``: Lipschitz (constant ``sum_k ||u_k||``), not differentiable on kinks.

    With ``mu_k = u_k^T w - b_k`` and ``s_k^2 = u_k^T Sigma u_k`` (exact, folded-normal mean):
    ``L_Sigma = sum_k [s_k sqrt(2/pi) exp(-mu_k^2 / (2 s_k^2)) + mu_k erf(mu_k / (s_k sqrt 2))]``,
    ``nabla L_Sigma = sum_k erf(mu_k / (s_k sqrt 2)) u_k``,
    ``nabla^2 L_Sigma = sum_k u_k u_k^T 2 phi(mu_k/s_k)/s_k``.
    A kink with ``s_k = 0`` (Sigma annihilates ``u_k``) is not smoothed at all. Default draw:
    ``u_k ~ N(0, I/d)``, ``b_k ~ N(0, 1/4)``; pass ``U``/``b`` to place kinks by hand.
    """

    def __init__(
        self, d: int = 10, K: int = 15, seed: int = 0, *, U: Tensor | None = None, b: Tensor | None = None
    ) -> None:
        g = torch.Generator().manual_seed(int(seed))
        if U is None:
            U = torch.randn(K, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        U = torch.as_tensor(U, dtype=torch.float64)
        if U.dim() == 1:
            U = U.unsqueeze(0)
        if U.dim() != 2 or U.numel() == 0:
            raise LossInputError(f"U must be a non-empty (K, d) matrix, got shape {tuple(U.shape)}")
        if b is None:
            b = 0.5 * torch.randn(U.shape[0], generator=g, dtype=torch.float64)
        b = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
        if b.numel() != U.shape[0]:
            raise LossInputError(f"b has {b.numel()} entries but U has {U.shape[0]} rows")
        self.U, self.b = U, b
        self.K, self.d = U.shape

    def margins(self, w: Tensor) -> Tensor:
        """``mu_k = u_k^T w - b_k``."""
        return _as_w(w, self.d) @ self.U.T - self.b

    def __call__(self, w: Tensor) -> Tensor:
        return self.margins(w).abs().sum(-1)

    def grad(self, w: Tensor) -> Tensor:
        """A subgradient: ``sum_k sign(mu_k) u_k`` (0 coefficient exactly on a kink)."""
        return torch.sign(self.margins(w)) @ self.U

    def lipschitz_bound(self, sigma: float) -> float:
        """``sqrt(2/pi) sum_k ||u_k|| / sigma``: bounds ``lambda_max(nabla^2 L_Sigma)``, Sigma = sigma^2 I."""
        if not sigma > 0:
            raise LossInputError(f"sigma must be > 0 for a finite bound, got {sigma}")
        return math.sqrt(2 / math.pi) * float(self.U.norm(dim=1).sum()) / sigma

    def _scales(self, sigma: Sigma, deviations: Devs) -> Tensor:
        return quadratic_forms(self.U, sigma, deviations).clamp_min(0).sqrt()

    def smoothed(self, w: Tensor, sigma: Sigma = None, deviations: Devs = None) -> Tensor:
        """Exact ``sum_k E |mu_k + s_k Z|`` (``|mu_k|`` where ``s_k = 0``)."""
        mu, s = self.margins(w), self._scales(sigma, deviations)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        val = safe * math.sqrt(2 / math.pi) * torch.exp(-(mu**2) / (2 * safe**2))
        val = val + mu * torch.erf(mu / (safe * _SQRT2))
        return torch.where(s > 0, val, mu.abs()).sum(-1)

    def smoothed_grad(self, w: Tensor, sigma: Sigma = None, deviations: Devs = None) -> Tensor:
        """``sum_k erf(mu_k / (s_k sqrt 2)) u_k`` (``sign(mu_k)`` where ``s_k = 0``)."""
        mu, s = self.margins(w), self._scales(sigma, deviations)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        coef = torch.where(s > 0, torch.erf(mu / (safe * _SQRT2)), torch.sign(mu))
        return coef @ self.U

    def smoothed_hessian(self, w: Tensor, sigma: Sigma = None, deviations: Devs = None) -> Tensor:
        """``sum_k u_k u_k^T 2 phi(mu_k/s_k) / s_k`` at one point ``w`` (d,); refused if some ``s_k = 0``."""
        mu, s = self.margins(w), self._scales(sigma, deviations)
        if bool((s <= 0).any()):
            raise LossInputError(
                "Sigma annihilates some u_k (s_k = 0): L_Sigma is not twice differentiable (no smoothing)"
            )
        coef = 2 * _INV_SQRT_2PI * torch.exp(-0.5 * (mu / s) ** 2) / s
        return (self.U.T * coef) @ self.U


class PowerLoss:
    """1-D ``L(w) = |w|^p`` (p > 0): at 0 super-quadratic (p > 2), quadratic (p = 2), sub-quadratic (p < 2).

    Derivatives at ``w != 0``: ``L' = p |w|^(p-1) sign w``, ``L'' = p (p-1) |w|^(p-2)``,
    ``L''' = p (p-1) (p-2) |w|^(p-3) sign w``. Smoothed with ``N(0, v)`` (exact Gaussian absolute moment,
    scipy ``hyp1f1``), with ``C_p = 2^(p/2) Gamma((p+1)/2) / sqrt(pi)``:
    ``E|w + sqrt(v) Z|^p = C_p v^(p/2) 1F1(-p/2; 1/2; -w^2/(2v))``,
    ``d/dw = C_p v^(p/2 - 1) p w 1F1(1 - p/2; 3/2; -w^2/(2v))``.
    """

    d = 1

    def __init__(self, p: float) -> None:
        if not (p > 0 and math.isfinite(p)):
            raise LossInputError(f"PowerLoss needs a finite p > 0, got {p}")
        self.p = float(p)

    def __call__(self, w: Tensor) -> Tensor:
        """``|w|^p`` (differentiable by autograd away from 0)."""
        return torch.abs(torch.as_tensor(w, dtype=torch.float64)) ** self.p

    def derivative(self, w: float, order: int) -> float:
        """Closed-form ``d^order L / dw^order`` at ``w != 0`` (order 0..3)."""
        if w == 0 or order not in (0, 1, 2, 3):
            raise LossInputError(f"derivative needs w != 0 and order in 0..3, got w={w}, order={order}")
        p = self.p
        coef = [1.0, p, p * (p - 1), p * (p - 1) * (p - 2)][order]
        return coef * abs(w) ** (p - order) * (math.copysign(1.0, w) if order % 2 else 1.0)

    def _variance(self, sigma: Sigma, deviations: Devs) -> float:
        if isinstance(deviations, Tensor) and deviations.dim() == 1:
            deviations = deviations.reshape(-1, 1)
        return float(covariance_diagonal(1, sigma, deviations)[0])

    def _hyp(self, w: Tensor, v: float, shift: float) -> tuple[float, np.ndarray, np.ndarray]:
        """``(C_p, w, 1F1(-p/2 + shift; 1/2 + shift; -w^2/(2v)))`` as numpy."""
        x = np.asarray(torch.as_tensor(w, dtype=torch.float64).detach().cpu(), dtype=np.float64)
        p = self.p
        const = 2 ** (p / 2) * float(special.gamma((p + 1) / 2)) / math.sqrt(math.pi)
        return const, x, special.hyp1f1(-p / 2 + shift, 0.5 + shift, -(x**2) / (2 * v))

    def smoothed(self, w: Tensor, sigma: Sigma = None, deviations: Devs = None) -> Tensor:
        """``E |w + eps|^p``, ``eps ~ N(0, v)`` (``|w|^p`` when v = 0)."""
        v = self._variance(sigma, deviations)
        if v == 0:
            return self(w)
        const, _, f = self._hyp(w, v, 0.0)
        return torch.as_tensor(const * v ** (self.p / 2) * f, dtype=torch.float64)

    def smoothed_grad(self, w: Tensor, sigma: Sigma = None, deviations: Devs = None) -> Tensor:
        """``d/dw E |w + eps|^p`` (``p |w|^(p-1) sign w`` when v = 0)."""
        v = self._variance(sigma, deviations)
        wt = torch.as_tensor(w, dtype=torch.float64)
        if v == 0:
            return self.p * wt.abs() ** (self.p - 1) * torch.sign(wt)
        const, x, f = self._hyp(w, v, 1.0)
        return torch.as_tensor(const * v ** (self.p / 2 - 1) * self.p * x * f, dtype=torch.float64)
