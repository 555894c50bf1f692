"""verify.lyapunov against closed forms, truncated series and a direct simulation (float64)."""

import numpy as np
import pytest
import torch

from verify.lyapunov import (
    LyapunovError,
    csgd_excess_loss,
    csgd_excess_loss_se,
    csgd_variance,
    direction_covariance,
    stationary_consensus,
    stationary_xi,
    transition,
)
from verify.topology import mixing_matrix, s_p

H = np.linspace(0.1, 2.0, 10)


def series(A: np.ndarray, C: np.ndarray, B: np.ndarray | None = None, terms: int = 4000) -> np.ndarray:
    """sum_t A^t C (B^t)^T, truncated (the spectral radii here are <= 0.97, so 4000 terms are exact)."""
    B = A if B is None else B
    out = np.zeros_like(C)
    L, R = np.eye(len(A)), np.eye(len(A))
    for _ in range(terms):
        out += L @ C @ R.T
        L, R = L @ A, R @ B
    return out


@pytest.mark.parametrize("topology", ["ring", "exponential", "grid", "complete"])
def test_direction_covariance_is_the_series(topology):
    m, eta, h, s2, b = 8, 0.05, 0.7, 1.3, 4
    P = mixing_matrix(topology, m)
    A = transition(P, eta, h)
    C = eta**2 * s2 / b * (np.eye(m) - 1.0 / m)
    Q = direction_covariance(P, eta, h, s2, b)
    np.testing.assert_allclose(Q, series(A, C), rtol=0, atol=1e-14)


def test_symmetric_closed_form():
    """Symmetric P, eigenvalues lambda_k off the 1-vector: Tr Q = c sum_k 1/(1 - (lambda_k - eta h)^2)."""
    m, eta, b = 16, 0.02, 8
    P = mixing_matrix("ring", m).numpy()
    lam = np.sort(np.linalg.eigvalsh(P))[:-1]  # drop the eigenvalue 1 of the 1-vector
    pred = stationary_consensus(P, eta, H, 1.0, b)
    exact = sum(eta**2 / b * np.sum(1.0 / (1.0 - (lam - eta * h) ** 2)) / m for h in H)
    assert pred.trace_xi == pytest.approx(exact, rel=1e-12)
    exact_h = sum(h * eta**2 / b * np.sum(1.0 / (1.0 - (lam - eta * h) ** 2)) / m for h in H)
    assert pred.trace_h_xi == pytest.approx(exact_h, rel=1e-12)


@pytest.mark.parametrize("topology", ["ring", "exponential", "grid"])
def test_small_eta_limit_is_s_p(topology):
    P = mixing_matrix(topology, 16)
    eta, sig = 1e-6, np.linspace(0.5, 2.0, 10)
    pred = stationary_consensus(P, eta, H, sig, b=2)
    assert pred.s_p == pytest.approx(s_p(P), rel=1e-12)
    assert pred.trace_xi / (eta**2 / 2 * sig.sum()) == pytest.approx(s_p(P), rel=1e-4)
    assert pred.small_eta == pytest.approx(pred.trace_xi, rel=1e-4)


def test_complete_and_disconnected_closed_forms():
    m, eta, b = 16, 0.05, 4
    comp = stationary_consensus(mixing_matrix("complete", m), eta, H, 1.0, b)
    assert comp.trace_xi == pytest.approx(np.sum(eta**2 * (m - 1) / (m * b * (1 - eta**2 * H**2))), rel=1e-12)
    iso = stationary_consensus(mixing_matrix("disconnected", m), eta, H, 1.0, b)
    assert iso.trace_xi == pytest.approx((m - 1) / m * np.sum(eta / (b * H * (2 - eta * H))), rel=1e-12)
    assert iso.small_eta == float("inf")


def test_atc_complete_is_csgd():
    atc = stationary_consensus(mixing_matrix("complete", 8), 0.05, H, 1.0, 1, form="atc")
    assert atc.trace_xi == 0.0
    awc = stationary_consensus(mixing_matrix("complete", 8), 0.05, H, 1.0, 1)
    assert awc.trace_xi > 0


def test_atc_is_its_series():
    m, eta, h = 8, 0.05, 1.1
    P = mixing_matrix("ring", m).numpy()
    A = (1 - eta * h) * (P - 1.0 / m)
    C = eta**2 * (P - 1.0 / m) @ (P - 1.0 / m).T
    np.testing.assert_allclose(direction_covariance(P, eta, h, 1.0, 1, "atc"), series(A, C), atol=1e-14)


def test_stationary_xi_matrix():
    rng = np.random.default_rng(0)
    d, m, eta, b = 5, 8, 0.03, 2
    R, _ = np.linalg.qr(rng.standard_normal((d, d)))
    h = np.array([0.2, 0.5, 1.0, 1.5, 3.0])
    Hm = R @ np.diag(h) @ R.T
    G = rng.standard_normal((d, d))
    Sigma = G @ G.T
    P = mixing_matrix("ring", m)
    X = stationary_xi(P, eta, Hm, Sigma, b)
    np.testing.assert_allclose(X, X.T, atol=1e-15)
    s2 = np.diag(R.T @ Sigma @ R)
    assert np.trace(X) == pytest.approx(stationary_consensus(P, eta, h, s2, b).trace_xi, rel=1e-10)
    # one off-diagonal entry in H's eigenbasis against the series
    Xp = R.T @ X @ R
    Ai, Ak = transition(P, eta, h[1]), transition(P, eta, h[3])
    C = eta**2 * (R.T @ Sigma @ R)[1, 3] / b * (np.eye(m) - 1.0 / m)
    assert Xp[1, 3] == pytest.approx(np.trace(series(Ai, C, Ak)) / m, rel=1e-10)


def test_csgd_forms():
    eta, B, sig = 0.05, 64, np.linspace(0.5, 1.5, 10)
    v = np.zeros_like(H)
    for _ in range(20000):  # the variance recursion v <- (1 - eta h)^2 v + eta^2 sigma^2 / B
        v = (1 - eta * H) ** 2 * v + eta**2 * sig / B
    np.testing.assert_allclose(csgd_variance(eta, H, sig, B), v, rtol=1e-12)
    assert csgd_excess_loss(eta, H, sig, B) == pytest.approx(0.5 * np.sum(H * v), rel=1e-12)
    assert csgd_excess_loss(eta, H, sig, B, exact=False) == pytest.approx(
        eta / (4 * B) * sig.sum(), rel=1e-15
    )
    assert csgd_excess_loss(1e-6, H, sig, B) == pytest.approx(
        csgd_excess_loss(1e-6, H, sig, B, exact=False), rel=1e-6
    )


def test_simulation_matches():
    """An independent numpy simulation of AWC D-SGD (400 chains) agrees with the Lyapunov value."""
    m, d, eta, b, steps, burn, chains = 4, 2, 0.1, 2, 1500, 300, 400
    h, sig = np.array([0.5, 2.0]), np.array([1.0, 0.5])
    P = mixing_matrix("ring", m).numpy()
    rng = np.random.default_rng(1)
    W = np.zeros((chains, m, d))
    acc = np.zeros(chains)
    for t in range(steps):
        N = rng.standard_normal((chains, m, d)) * np.sqrt(sig / b)
        W = np.einsum("jk,ckd->cjd", P, W) - eta * (W * h + N)
        if t >= burn:
            D = W - W.mean(1, keepdims=True)
            acc += (D**2).sum((1, 2)) / m
    per_chain = acc / (steps - burn)
    sim, se = per_chain.mean(), per_chain.std(ddof=1) / np.sqrt(chains)
    pred = stationary_consensus(P, eta, h, sig, b).trace_xi
    assert abs(sim - pred) < 4 * se
    assert abs(sim / pred - 1) < 0.03


def test_errors():
    P = mixing_matrix("ring", 8)
    with pytest.raises(LyapunovError, match="spectral radius"):
        direction_covariance(P, 1.0, 2.5, 1.0)
    row_only = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    with pytest.raises(LyapunovError, match="column"):
        stationary_consensus(row_only, 0.01, [1.0])
    with pytest.raises(LyapunovError, match="entries"):
        stationary_consensus(P, 0.01, [1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(LyapunovError, match="learning rate"):
        stationary_consensus(P, 0.0, [1.0])
    with pytest.raises(LyapunovError, match="form"):
        transition(P, 0.1, 1.0, form="xyz")
    with pytest.raises(LyapunovError, match="2"):
        csgd_excess_loss(1.5, [2.0], 1.0, 8)
    with pytest.raises(LyapunovError, match="64"):
        stationary_xi(P, 0.01, np.eye(65), np.eye(65))


def test_accepts_torch_and_scalar_noise():
    P = mixing_matrix("grid", 9)
    a = stationary_consensus(P, 0.02, torch.tensor([0.5, 1.0]), 2.0, 3).trace_xi
    b = stationary_consensus(P.numpy(), 0.02, [0.5, 1.0], [2.0, 2.0], 3).trace_xi
    assert a == pytest.approx(b, rel=1e-15)


def test_csgd_excess_loss_se_matches_simulation():
    """The model SE of a time-averaged excess loss against the spread of 2000 simulated stationary chains."""
    eta, B, T, chains = 0.05, 16, 400, 2000
    h, sig = np.array([0.2, 1.0, 3.0]), np.array([1.0, 2.0, 0.5])
    rng = np.random.default_rng(5)
    v = csgd_variance(eta, h, sig, B)
    w = rng.standard_normal((chains, 3)) * np.sqrt(v)
    acc = np.zeros(chains)
    for _ in range(T):
        w = w - eta * (h * w + rng.standard_normal((chains, 3)) * np.sqrt(sig / B))
        acc += 0.5 * (h * w * w).sum(1)
    means = acc / T
    assert means.mean() == pytest.approx(csgd_excess_loss(eta, h, sig, B), rel=0.02)
    assert means.std(ddof=1) == pytest.approx(csgd_excess_loss_se(eta, h, sig, B, T), rel=0.1)
    assert csgd_excess_loss_se(eta, h, sig, B, T, chains=4) == pytest.approx(
        csgd_excess_loss_se(eta, h, sig, B, T) / 2, rel=1e-12
    )
