"""Closed-form test losses: derivatives against torch.func, smoothed values against Monte Carlo and exact
moments, and one-line input errors."""

import math

import pytest
import torch
from torch.func import grad, hessian, jvp

from verify.losses import (
    AbsLoss,
    CosLoss,
    LossInputError,
    PowerLoss,
    QuadraticLoss,
    covariance_diagonal,
    quadratic_forms,
)

f64 = torch.float64
N_MC = 200_000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mc_mean(values: torch.Tensor) -> tuple[float, float]:
    """Monte Carlo mean and its standard error."""
    return float(values.mean()), float(values.std() / math.sqrt(values.shape[0]))


def centred(m: int, d: int, scale: float, seed: int = 1) -> torch.Tensor:
    D = scale * torch.randn(m, d, generator=gen(seed), dtype=f64)
    return D - D.mean(0)


def xi_draws(D: torch.Tensor, n: int, seed: int = 2) -> torch.Tensor:
    """``eps = D^T z / sqrt(m)`` (Cov = Xi = D^T D / m)."""
    return torch.randn(n, D.shape[0], generator=gen(seed), dtype=f64) @ D / math.sqrt(D.shape[0])


# ----------------------------------------------------------------------------- CosLoss
def test_cos_derivatives_match_autograd():
    L = CosLoss(d=20, K=30, seed=3)
    w = torch.randn(20, generator=gen(), dtype=f64)
    v = torch.randn(5, 20, generator=gen(1), dtype=f64)
    assert torch.allclose(L.grad(w), grad(L)(w), atol=1e-13)
    assert torch.allclose(L.hessian(w), hessian(L)(w), atol=1e-13)
    for j in range(5):
        t = jvp(lambda x: hessian(L)(x) @ v[j], (w,), (v[j],))[1]  # T[v, v] = d/dt H(w + t v) v
        assert torch.allclose(L.third(w, v[j]), t, atol=1e-12)
    assert torch.allclose(L.third(w, v)[2], L.third(w, v[2]), atol=1e-15)


def test_cos_half_grad_trace_is_clairaut_gradient():
    L = CosLoss(seed=1)
    w = torch.randn(20, generator=gen(), dtype=f64)
    D = centred(16, 20, 0.3)
    Xi = D.T @ D / 16  # formed only in the test, as the reference
    ref = 0.5 * grad(lambda x: torch.trace(hessian(L)(x) @ Xi))(w)
    assert torch.allclose(L.half_grad_trace(w, D), ref, atol=1e-12)
    assert torch.allclose(L.half_grad_trace(w, D), 0.5 * L.third(w, D).mean(0), atol=1e-13)


def test_quadratic_forms_match_dense_xi():
    U = torch.randn(7, 20, generator=gen(), dtype=f64)
    D = centred(16, 20, 0.5)
    Xi = D.T @ D / 16
    assert torch.allclose(quadratic_forms(U, deviations=D), torch.einsum("ki,ij,kj->k", U, Xi, U))
    assert torch.allclose(quadratic_forms(U, sigma=0.3), 0.09 * (U * U).sum(1))
    assert torch.allclose(covariance_diagonal(20, deviations=D), torch.diagonal(Xi))


@pytest.mark.parametrize("cov", ["sigma", "deviations"])
def test_cos_smoothed_value_and_gradient_match_monte_carlo(cov):
    L = CosLoss(seed=2)
    w = torch.randn(20, generator=gen(), dtype=f64)
    D = centred(16, 20, 0.4)
    if cov == "sigma":
        kw, eps = {"sigma": 0.25}, 0.25 * torch.randn(N_MC, 20, generator=gen(5), dtype=f64)
    else:
        kw, eps = {"deviations": D}, xi_draws(D, N_MC)
    mean, se = mc_mean(L(w + eps))
    assert abs(float(L.smoothed(w, **kw)) - mean) < 5 * se
    G = L.grad(w + eps)
    for i in range(20):
        gm, gse = mc_mean(G[:, i])
        assert abs(float(L.smoothed_grad(w, **kw)[i]) - gm) < 5 * gse + 1e-12
    # the closed-form gradient is the gradient of the closed-form value
    assert torch.allclose(L.smoothed_grad(w, **kw), grad(lambda x: L.smoothed(x, **kw))(w), atol=1e-13)


def test_cos_zero_covariance_is_the_loss():
    L = CosLoss(seed=0)
    w = torch.randn(3, 20, generator=gen(), dtype=f64)
    assert torch.allclose(L.smoothed(w, sigma=0.0), L(w))
    assert torch.allclose(L.smoothed_grad(w, deviations=torch.zeros(4, 20, dtype=f64)), L.grad(w))


# ----------------------------------------------------------------------------- QuadraticLoss
def test_quadratic_smoothing_is_exact_and_gradient_unchanged():
    h = torch.linspace(0.1, 2, 10, dtype=f64)
    Q = QuadraticLoss(h, center=torch.ones(10, dtype=f64))
    w = torch.randn(10, generator=gen(), dtype=f64)
    D = centred(8, 10, 0.7)
    Xi = D.T @ D / 8
    assert torch.allclose(Q.smoothed(w, deviations=D), Q(w) + 0.5 * torch.trace(torch.diag(h) @ Xi))
    assert torch.equal(Q.smoothed_grad(w, deviations=D), Q.grad(w))
    assert torch.allclose(Q.hessian(w), hessian(Q)(w))


# ----------------------------------------------------------------------------- AbsLoss
def test_abs_smoothed_matches_monte_carlo_and_autograd():
    A = AbsLoss(d=10, K=15, seed=4)
    w = 0.3 * torch.randn(10, generator=gen(), dtype=f64)
    eps = 0.2 * torch.randn(N_MC, 10, generator=gen(6), dtype=f64)
    mean, se = mc_mean(A(w + eps))
    assert abs(float(A.smoothed(w, sigma=0.2)) - mean) < 5 * se
    G = A.grad(w + eps)
    for i in range(10):
        gm, gse = mc_mean(G[:, i])
        assert abs(float(A.smoothed_grad(w, sigma=0.2)[i]) - gm) < 5 * gse
    assert torch.allclose(A.smoothed_grad(w, sigma=0.2), grad(lambda x: A.smoothed(x, sigma=0.2))(w))
    H = hessian(lambda x: A.smoothed(x, sigma=0.2))(w)
    assert torch.allclose(A.smoothed_hessian(w, sigma=0.2), H, atol=1e-12)


def test_abs_lipschitz_bound_holds():
    A = AbsLoss(d=10, K=15, seed=5)
    pts = torch.randn(200, 10, generator=gen(), dtype=f64) * 0.5
    for sigma in (0.01, 0.1):
        lam = max(float(torch.linalg.eigvalsh(A.smoothed_hessian(w, sigma=sigma))[-1]) for w in pts)
        assert lam <= A.lipschitz_bound(sigma)
    one = AbsLoss(d=3, U=torch.tensor([[1.0, 2.0, 2.0]]), b=[0.0])  # ||u|| = 3; sup at the kink is the bound
    assert float(one.smoothed_hessian(torch.zeros(3, dtype=f64), sigma=0.1).trace()) == pytest.approx(
        one.lipschitz_bound(0.1), rel=1e-14
    )


def test_abs_xi_orthogonal_to_u_does_not_smooth():
    u = torch.tensor([[1.0, 0.0, 0.0]], dtype=f64)
    A = AbsLoss(d=3, U=u, b=[0.0])
    D = centred(6, 3, 1.0)
    D[:, 0] = 0.0
    w = torch.tensor([0.2, 0.5, -0.1], dtype=f64)
    assert torch.equal(A.smoothed(w, deviations=D), A(w))
    assert torch.equal(A.smoothed_grad(w, deviations=D), A.grad(w))
    with pytest.raises(LossInputError, match="annihilates"):
        A.smoothed_hessian(w, deviations=D)


# ----------------------------------------------------------------------------- PowerLoss
def test_power_exact_moments():
    w = torch.tensor(0.4, dtype=f64)
    assert float(PowerLoss(2).smoothed(w, sigma=0.5)) == pytest.approx(0.16 + 0.25, rel=1e-13)
    assert float(PowerLoss(4).smoothed(w, sigma=0.5)) == pytest.approx(
        0.4**4 + 6 * 0.16 * 0.25 + 3 * 0.25**2, rel=1e-13
    )
    assert float(PowerLoss(2).smoothed_grad(w, sigma=0.5)) == pytest.approx(0.8, rel=1e-13)
    assert float(PowerLoss(4).smoothed_grad(w, sigma=0.5)) == pytest.approx(4 * 0.4**3 + 12 * 0.4 * 0.25)


@pytest.mark.parametrize("p", [1.5, 3.0])
def test_power_smoothed_matches_monte_carlo_and_difference(p):
    P = PowerLoss(p)
    w = torch.tensor(0.3, dtype=f64)
    eps = 0.5 * torch.randn(N_MC, generator=gen(7), dtype=f64)
    mean, se = mc_mean(P(w + eps))
    assert abs(float(P.smoothed(w, sigma=0.5)) - mean) < 5 * se
    h = 1e-5
    fd = (float(P.smoothed(w + h, sigma=0.5)) - float(P.smoothed(w - h, sigma=0.5))) / (2 * h)
    assert float(P.smoothed_grad(w, sigma=0.5)) == pytest.approx(fd, rel=1e-8)
    D = torch.tensor([[0.5], [-0.5]], dtype=f64)  # Xi = 0.25
    assert float(P.smoothed(w, deviations=D)) == pytest.approx(float(P.smoothed(w, sigma=0.5)), rel=1e-14)


@pytest.mark.parametrize("p", [1.5, 2.0, 3.0])
def test_power_derivatives_match_autograd(p):
    P = PowerLoss(p)
    w = torch.tensor(-0.7, dtype=f64)
    f = P
    for order in range(4):
        assert float(f(w)) == pytest.approx(P.derivative(-0.7, order), rel=1e-12, abs=1e-15)
        f = grad(f)


# ----------------------------------------------------------------------------- errors
def test_input_errors_are_one_line():
    L = CosLoss()
    w = torch.zeros(20, dtype=f64)
    cases = [
        (lambda: L.smoothed(w), "exactly one"),
        (lambda: L.smoothed(w, sigma=0.1, deviations=torch.zeros(2, 20, dtype=f64)), "exactly one"),
        (lambda: L.smoothed(w, sigma=-1.0), ">= 0"),
        (lambda: L.smoothed(w, deviations=torch.zeros(2, 5, dtype=f64)), r"\(m, 20\)"),
        (lambda: L(torch.zeros(7, dtype=f64)), "last dimension 20"),
        (lambda: PowerLoss(0.0), "p > 0"),
        (lambda: PowerLoss(3.0).derivative(0.0, 1), "w != 0"),
        (lambda: AbsLoss(U=torch.ones(2, 3), b=[1.0]), "rows"),
        (lambda: AbsLoss().lipschitz_bound(0.0), "> 0"),
        (lambda: QuadraticLoss([]), "at least one"),
        (lambda: CosLoss(d=0), "d >= 1"),
    ]
    for fn, match in cases:
        with pytest.raises(LossInputError, match=match) as info:
            fn()
        assert "\n" not in str(info.value)
