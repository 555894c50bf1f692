"""T15 (what users read is what is checked): its references and its criterion, and that its negative
control, the planted bugs, is rejected by that same criterion."""

from __future__ import annotations

import math

import numpy as np
import pytest

from verify.claims import Context
from verify.claims.runner import execute
from verify.claims.t15_logged_measures import (
    Comparison,
    LoggedMeasures,
    all_rejected,
    close,
    consensus,
    exponential_matrix,
    failures,
    hutchinson_se,
    official_lr,
    quadratic_reference,
    ring_matrix,
    se_ratio,
    trace_h_xi,
    within_se,
)
from verify.topology import mixing_matrix


def test_reference_matrices_are_the_official_ones():
    for m in (5, 8, 16):
        assert np.allclose(exponential_matrix(m), mixing_matrix("exponential", m).numpy(), atol=0)
        assert np.allclose(ring_matrix(m), mixing_matrix("ring", m).numpy(), atol=1e-15)


def test_official_lr_is_the_paper_schedule():
    # paper.md s.4: warm-up multiplier max(0.1, t / warmup), then x 0.1 at 2400 and 4800
    lr = lambda t: official_lr(t, 0.1, 60, [2400, 4800])  # noqa: E731
    assert lr(0) == pytest.approx(0.01) and lr(3) == pytest.approx(0.01) and lr(30) == pytest.approx(0.05)
    assert lr(60) == pytest.approx(0.1) and lr(2399) == pytest.approx(0.1)
    assert lr(2400) == pytest.approx(0.01) and lr(4800) == pytest.approx(0.001)


def test_hutchinson_se_is_the_exact_rademacher_variance():
    rng = np.random.default_rng(0)
    B = rng.normal(size=(5, 5))
    H = B + B.T
    Z = rng.choice([-1.0, 1.0], size=(200_000, 5))
    q = np.einsum("ni,ij,nj->n", Z, H, Z)
    assert abs(q.mean() - np.trace(H)) < 5 * hutchinson_se(H, q.size)
    assert hutchinson_se(H, 1) == pytest.approx(q.std(), rel=0.02)


def test_criterion_accepts_rounding_and_rejects_the_planted_bugs():
    m, ref = 8, 0.123
    good = [
        close("x", ref * (1 + 1e-13), ref),
        within_se("mc", 1.0 + 0.03, 1.0, 0.01),
        se_ratio("se", 1.2, 1.0),
    ]
    assert failures(good) == []
    planted = [
        close("Tr Xi without 1/m", m * ref, ref),
        close("Tr(H Xi) with 1/(m-1)", ref * m / (m - 1), ref),
        within_se("Xi sampler without 1/sqrt(m)", m * 1.0, 1.0, 0.03),
        se_ratio("stderr without 1/sqrt(n)", math.sqrt(100) * 0.5, 0.5),
        Comparison("overlapping batches", 15, 0, 0),
        close("nan", math.nan, 1.0),
    ]
    assert failures(planted) == [c.name for c in planted]
    assert all_rejected(planted) and not all_rejected(planted + good[:1]) and not all_rejected([])


def test_planted_engine_bugs_fail_the_trajectory_comparison():
    """The control of T15's quadratic part, fed to its criterion: ATC, P^T and gradients at w_a each move
    the trajectory far beyond the tolerance, while the reference agrees with itself."""
    rng = np.random.default_rng(1)
    m, d, steps = 8, 4, 10
    B = rng.normal(size=(d, d))
    A, c = B @ B.T / d + np.eye(d), rng.normal(size=d)
    W0 = rng.normal(size=(m, d))
    noise = {t: rng.normal(size=(m, d)) for t in range(steps)}
    lrs = [official_lr(t, 0.05, 3, [6]) for t in range(steps)]
    P = exponential_matrix(m)
    ref = quadratic_reference("awc", P, A, c, W0, noise.__getitem__, lrs, 0.9, 0.01)
    scale = float(np.abs(ref[-1]).max())
    same = max(float(np.abs(a - b).max()) for a, b in zip(ref, ref, strict=True))
    assert close("awc", same, 0, scale).holds
    for kind in ("atc", "pt", "awc-at-average"):
        alt = quadratic_reference(kind, P, A, c, W0, noise.__getitem__, lrs, 0.9, 0.01)
        e = max(float(np.abs(a - b).max()) for a, b in zip(alt, ref, strict=True))
        assert not close(kind, e, 0, scale).holds, kind
    # the measurement references: Tr Xi with 1/m and Tr(H Xi) of the centred deviations
    W = ref[-1]
    D = W - W.mean(0)
    assert consensus(W) == pytest.approx((D**2).sum() / m, rel=1e-14)
    assert trace_h_xi(W, A) == pytest.approx(np.trace(A @ D.T @ D) / m, rel=1e-12)
    not_centred = float(((W - W[0]) ** 2).sum() / m)  # deviations from worker 1, a planted bug
    assert not close("cd not centred", not_centred, consensus(W)).holds


def test_t15_quick_passes_with_its_control_rejected():
    res = execute(LoggedMeasures, Context(quick=True, seed=0))
    assert res.verdict == "PASS", res.notes
    assert (
        res.control.came_out_other_way and res.control.measured["rejected"] == res.control.measured["planted"]
    )
    assert res.measured["failed"] == 0 and res.measured["worst_ratio"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_t15_passes_at_seeds_1_to_4(seed):
    res = execute(LoggedMeasures, Context(quick=True, seed=seed))
    assert res.verdict == "PASS", (res.notes, res.measured.get("worst"))
    assert res.control.came_out_other_way
