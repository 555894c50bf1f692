"""Helpers of the stationary checks (T5-T7, T6n/T7n, T9-T11): registration, time averages, i.i.d. sampling,
closed-form pieces. The checks themselves run in tests/test_claims.py."""

import numpy as np
import pytest
import torch

from verify.claims import all_checks
from verify.claims.network import IIDSampling
from verify.claims.stationary import (
    batch_means_se,
    quadratic_problem,
    run_config,
    stationary_deviations,
    time_average,
)
from verify.claims.t05_trajectory import frozen_ratios
from verify.claims.t09_tradeoff import xi_root_deviations
from verify.claims.t10_uncertainty import LeastSquares, frobenius_cosine
from verify.losses import CosLoss
from verify.lyapunov import direction_covariance
from verify.models import mlp
from verify.topology import mixing_matrix


def test_checks_registered():
    checks = {c.id: c for c in all_checks()}
    for cid in ("T5", "T6", "T6n", "T7", "T7n", "T9", "T10", "T11"):
        assert cid in checks
    assert checks["T9"].full_only and checks["T11"].full_only
    assert not any(checks[c].full_only for c in ("T5", "T6", "T6n", "T7", "T7n", "T10"))
    assert checks["T10"].expected_verdict() == "NOT SUPPORTED"


def test_batch_means_se_iid_and_correlated():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(20000)
    assert batch_means_se(x) == pytest.approx(1 / np.sqrt(x.size), rel=0.4)
    ar = np.zeros(20000)  # AR(1) with rho = 0.9: SE inflated by sqrt((1 + rho) / (1 - rho)) ~ 4.36
    for t in range(1, ar.size):
        ar[t] = 0.9 * ar[t - 1] + rng.standard_normal()
    naive = ar.std() / np.sqrt(ar.size)
    assert batch_means_se(ar) / naive == pytest.approx(np.sqrt(19), rel=0.4)


def test_time_average_csgd_has_no_consensus_distance_and_tracks_loss():
    h = [0.5, 1.0]
    prob = quadratic_problem(h, m=4, b=2, seed=1, w0=torch.tensor([1.0, -1.0], dtype=torch.float64))
    avg = time_average(run_config(algo="csgd", m=4, b=2, lr=0.1, steps=200), prob, 50, h=h, loss="average")
    assert avg.trace_xi == 0.0 and avg.trace_h_xi == 0.0
    assert avg.samples == 150 and avg.loss > 0
    with pytest.raises(ValueError, match="burn-in"):
        time_average(run_config(m=4, b=2, lr=0.1, steps=10), prob, 10)


def test_time_average_xi_matrix_matches_trace():
    h = [0.5, 1.0, 2.0]
    prob = quadratic_problem(h, m=8, b=1, seed=2)
    avg = time_average(run_config(m=8, b=1, lr=0.05, steps=300), prob, 100, h=h, xi_matrix=True)
    assert np.trace(avg.xi) == pytest.approx(avg.trace_xi, rel=1e-12)
    assert float(np.diag(avg.xi) @ np.asarray(h)) == pytest.approx(avg.trace_h_xi, rel=1e-12)


def test_stationary_deviations_have_the_covariance():
    P = mixing_matrix("ring", 6)
    Q = [direction_covariance(P, 0.1, h, 1.0, 1) for h in (0.5, 1.5)]
    draws = torch.stack([stationary_deviations(Q, s) for s in range(4000)])  # (n, m, d)
    assert float(draws.sum(1).abs().max()) < 1e-12  # centred: deviations sum to zero over workers
    emp = torch.einsum("nj,nk->jk", draws[:, :, 0], draws[:, :, 0]).numpy() / draws.shape[0]
    np.testing.assert_allclose(emp, Q[0], atol=0.08 * np.abs(Q[0]).max())


def test_iid_sampling_is_stateless_and_with_replacement():
    x = torch.arange(40, dtype=torch.float64).reshape(20, 2)
    y = torch.arange(20) % 3
    p = IIDSampling(mlp(2, (3,), 3), (x, y), None, m=4, local_batch=5, seed=7)
    xb, yb = p.batches(11)
    assert xb.shape == (4, 5, 2)
    xj, _ = p.batch(2, 11)
    assert torch.equal(xj, xb[2])
    assert torch.equal(p.batches(11)[0], xb)  # a pure function of (seed, t)
    assert not torch.equal(p.batches(12)[0], xb)
    seen = torch.cat([p.indices(j, t) for t in range(50) for j in range(4)])
    assert seen.unique().numel() == 20  # draws from the whole set, not a shard


def test_closed_form_helpers():
    rng = np.random.default_rng(3)
    G = rng.standard_normal((5, 5))
    A = G @ G.T
    W = torch.as_tensor(rng.standard_normal((3, 5)))
    xi = A / 10
    D = xi_root_deviations(xi).numpy()
    np.testing.assert_allclose(D.T @ D / D.shape[0], xi, atol=1e-12)
    X, yv = torch.as_tensor(rng.standard_normal((50, 5))), torch.as_tensor(rng.standard_normal(50))
    ls = LeastSquares(X, yv)
    torch.testing.assert_close(ls.grad(W), torch.func.vmap(torch.func.grad(ls))(W), rtol=1e-12, atol=1e-12)
    assert frobenius_cosine(A, 3 * A) == pytest.approx(1.0, abs=1e-15)
    assert frobenius_cosine(np.diag([1.0, 0]), np.diag([0, 1.0])) == 0.0


def test_frozen_ratio_is_small_for_small_deviations():
    loss = CosLoss(20, 30, seed=0, u_scale=2.0, a_range=(0.05, 0.2))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, generator=g, dtype=torch.float64)
    Z = torch.randn(16, 20, generator=g, dtype=torch.float64)
    small = frozen_ratios(loss, w + 1e-3 * (Z - Z.mean(0)))
    large = frozen_ratios(loss, w + 1e-1 * (Z - Z.mean(0)))
    assert small[0] < 0.01 and 50 < large[0] / small[0] < 200  # r = O(s): s grows 100x
    assert small[1] > 0.1 and 0.5 < large[1] / small[1] < 2  # the isotropic surrogate's ratio stays O(1)
