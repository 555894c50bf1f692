"""Tests of verify.topology / verify.mixers / verify.graphs against exact answers (float64)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verify.mixers import auto_method, circulant_coefficients
from verify.topology import (
    BUILTINS,
    TopologyError,
    is_symmetric,
    load_matrix,
    mixer,
    mixing_matrix,
    s_p,
    schedule,
    spectral_gap,
    validate,
)

SIZES = (4, 8, 16, 32)


def eigenvalues_sorted(P: torch.Tensor) -> np.ndarray:
    ev = np.linalg.eigvals(P.numpy())
    return np.array(sorted(ev, key=lambda z: (round(z.real, 9), round(z.imag, 9))))


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("m", SIZES)
def test_builtins_doubly_stochastic_nonnegative(name: str, m: int) -> None:
    P = mixing_matrix(name, m)
    assert P.dtype == torch.float64 and P.shape == (m, m)
    assert float(P.min()) >= 0.0
    torch.testing.assert_close(P.sum(1), torch.ones(m, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(P.sum(0), torch.ones(m, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("m", (1, 2, 3, 5, 7))
def test_builtins_small_and_odd_sizes(name: str, m: int) -> None:
    P = validate(mixing_matrix(name, m))
    assert P.shape == (m, m)


def test_small_ring_conventions() -> None:
    assert mixing_matrix("ring", 1).tolist() == [[1.0]]
    torch.testing.assert_close(
        mixing_matrix("ring", 2), torch.tensor([[1, 2], [2, 1]], dtype=torch.float64) / 3, rtol=0, atol=1e-15
    )
    # m = 3: every node neighbours every other one, so the ring is J.
    torch.testing.assert_close(mixing_matrix("ring", 3), torch.full((3, 3), 1 / 3, dtype=torch.float64))


# Spectral gap 1 - ||P - J||_2 at m = 16 (paper section 4.1 / table of section 3), 4 decimals.
@pytest.mark.parametrize(
    "name, gap", [("ring", 0.0507), ("grid", 0.1314), ("exponential", 0.4000), ("complete", 1.0)]
)
def test_spectral_gaps_m16(name: str, gap: float) -> None:
    assert round(spectral_gap(mixing_matrix(name, 16)), 4) == pytest.approx(gap, abs=1e-12)


@pytest.mark.parametrize("name", ["ring", "grid", "torus", "star", "complete"])
@pytest.mark.parametrize("m", (8, 16))
def test_gap_equals_second_eigenvalue_for_symmetric(name: str, m: int) -> None:
    P = mixing_matrix(name, m)
    ev = np.sort(np.abs(np.linalg.eigvalsh(P.numpy())))[::-1]  # ev[0] = 1 (the consensus direction)
    assert ev[0] == pytest.approx(1.0, abs=1e-12)
    assert spectral_gap(P) == pytest.approx(1 - ev[1], abs=1e-12)


def test_exponential_gap_is_second_eigenvalue_modulus() -> None:
    P = mixing_matrix("exponential", 16)
    ev = np.sort(np.abs(np.linalg.eigvals(P.numpy())))[::-1]
    assert spectral_gap(P) == pytest.approx(1 - ev[1], abs=1e-12)  # normal matrix: singular = |eigen|


def test_disconnected_has_zero_gap_and_infinite_s_p() -> None:
    P = mixing_matrix("disconnected", 8)
    assert torch.equal(P, torch.eye(8, dtype=torch.float64))
    assert spectral_gap(P) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(TopologyError, match="S_P is infinite"):
        s_p(P)


# S_P at m = 16, paper section 3 table, 3 decimals; complete is exactly (m - 1)/m.
@pytest.mark.parametrize("name, value", [("exponential", 1.119), ("grid", 1.494), ("ring", 2.410)])
def test_s_p_m16(name: str, value: float) -> None:
    assert abs(s_p(mixing_matrix(name, 16)) - value) < 5e-4


def test_s_p_complete_exact() -> None:
    assert s_p(mixing_matrix("complete", 16)) == pytest.approx(15 / 16, abs=1e-14)


@pytest.mark.parametrize("name", ["ring", "grid", "torus"])
def test_s_p_matches_eigen_formula_and_series(name: str) -> None:
    P = mixing_matrix(name, 12)
    lam = np.sort(np.linalg.eigvalsh(P.numpy()))[:-1]  # drop the eigenvalue 1
    assert s_p(P) == pytest.approx(np.sum(1 / (1 - lam**2)) / 12, rel=1e-10)
    # the defining series, truncated where it has converged (non-symmetric P)
    E = mixing_matrix("exponential", 12).numpy()
    A, Q = E - 1 / 12, np.eye(12) - 1 / 12
    total, term = np.zeros((12, 12)), Q.copy()
    for _ in range(400):
        total += term
        term = A @ term @ A.T
    assert s_p(torch.from_numpy(E)) == pytest.approx(np.trace(total) / 12, rel=1e-10)


def test_symmetry() -> None:
    for name in ("ring", "grid", "torus", "complete", "star", "disconnected"):
        assert is_symmetric(mixing_matrix(name, 16)), name
    assert not is_symmetric(mixing_matrix("exponential", 16), atol=1e-3)


def test_exponential_orientation_and_weights() -> None:
    P = mixing_matrix("exponential", 16)
    for i in range(16):
        support = sorted(torch.nonzero(P[i]).flatten().tolist())
        assert support == sorted({i, (i + 1) % 16, (i + 2) % 16, (i + 4) % 16, (i + 8) % 16})
        torch.testing.assert_close(P[i, support], torch.full((5,), 0.2, dtype=torch.float64))
    P5 = mixing_matrix("exponential", 5)  # 1 + ceil(log2 5) = 4 entries of 1/4: i, i+1, i+2, i+4
    assert sorted(torch.nonzero(P5[0]).flatten().tolist()) == [0, 1, 2, 4]
    assert float(P5[0, 4]) == 0.25


def test_grid_is_metropolis_without_wrap() -> None:
    P = mixing_matrix("grid", 16)  # 4 x 4: corners n = 3, edges n = 4, inner n = 5 (incl. self)
    assert float(P[0, 1]) == pytest.approx(1 / 4) and float(P[0, 4]) == pytest.approx(1 / 4)
    assert float(P[0, 3]) == 0.0 and float(P[0, 12]) == 0.0  # no wrap-around
    assert float(P[5, 6]) == pytest.approx(1 / 5)
    assert float(P[0, 0]) == pytest.approx(1 / 2)
    assert mixing_matrix("grid", 12).equal(mixing_matrix("grid", 12, shape=(3, 4)))
    assert mixing_matrix("meshgrid", 16).equal(P)
    # prime m: a path
    path = mixing_matrix("grid", 7)
    assert int(torch.count_nonzero(path - torch.diag(torch.diag(path)))) == 2 * 6
    with pytest.raises(TopologyError, match="does not have 16 nodes"):
        mixing_matrix("grid", 16, shape=(3, 5))


def test_torus_and_star() -> None:
    T = mixing_matrix("torus", 16)  # 4 x 4 torus: every node has 4 neighbours, weight 1/5
    assert torch.all((T == 0) | ((T - 0.2).abs() < 1e-15))
    assert float(T[0, 3]) == pytest.approx(0.2) and float(T[0, 12]) == pytest.approx(0.2)
    S = mixing_matrix("star", 6)
    assert torch.allclose(S[0], torch.full((6,), 1 / 6, dtype=torch.float64))
    assert float(S[3, 3]) == pytest.approx(5 / 6) and float(S[3, 4]) == 0.0


def test_unknown_names_and_options_refused() -> None:
    with pytest.raises(TopologyError, match="unknown topology 'hypercube'"):
        mixing_matrix("hypercube", 8)
    with pytest.raises(TopologyError, match="takes no option"):
        mixing_matrix("ring", 8, shape=(2, 4))
    with pytest.raises(TopologyError, match="positive integer"):
        mixing_matrix("ring", 0)


def test_validate_refuses_each_reason() -> None:
    ring = mixing_matrix("ring", 4)
    with pytest.raises(TopologyError, match="square"):
        validate(torch.ones(3, 4) / 4)
    bad = ring.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(TopologyError, match="NaN"):
        validate(bad)
    neg = torch.tensor([[1.5, -0.5], [-0.5, 1.5]], dtype=torch.float64)  # rows and columns sum to 1
    with pytest.raises(TopologyError, match="negative entry"):
        validate(neg)
    rows = ring * 1.01
    with pytest.raises(TopologyError, match="rows of the mixing matrix must sum to 1; row"):
        validate(rows)
    row_only = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]], dtype=torch.float64)
    with pytest.raises(TopologyError, match=r"needs column sums of 1; column 0 sums to 1\.5"):
        validate(row_only)
    with pytest.raises(TopologyError, match="not a numeric"):
        validate([[1, 0], [0]])
    # messages are one line
    with pytest.raises(TopologyError) as info:
        validate(row_only)
    assert "\n" not in str(info.value)
    # tolerance: off by 1e-12 passes, off by 1e-6 is refused
    validate(ring + torch.tensor(1e-12) * torch.eye(4))
    with pytest.raises(TopologyError):
        validate(ring + 1e-6 * torch.eye(4, dtype=torch.float64))


def test_load_matrix_npy_and_csv(tmp_path) -> None:
    P = mixing_matrix("exponential", 8)
    np.save(tmp_path / "p.npy", P.numpy())
    np.savetxt(tmp_path / "p.csv", P.numpy(), delimiter=",")
    assert load_matrix(tmp_path / "p.npy").equal(P)
    torch.testing.assert_close(load_matrix(str(tmp_path / "p.csv")), P, rtol=0, atol=1e-15)
    assert mixing_matrix(str(tmp_path / "p.npy"), 8).equal(P)
    assert schedule(str(tmp_path / "p.csv"), 8).at(3).shape == (8, 8)
    with pytest.raises(TopologyError, match="but 4 workers"):
        mixing_matrix(str(tmp_path / "p.npy"), 4)
    with pytest.raises(TopologyError, match="no such mixing matrix file"):
        load_matrix(tmp_path / "missing.npy")
    np.savetxt(tmp_path / "bad.csv", np.array([[0.5, 0.5], [0.9, 0.1]]), delimiter=",")
    with pytest.raises(TopologyError, match="column sums"):
        mixing_matrix(str(tmp_path / "bad.csv"), 2)


@pytest.mark.parametrize("name", ["ring", "exponential", "grid"])
def test_random_shuffle_same_spectrum_and_deterministic(name: str) -> None:
    P = mixing_matrix(name, 16)
    s = schedule(name, 16, shuffle="random", seed=7)
    assert not s.static and schedule(name, 16).static
    mats = [s.at(t) for t in range(5)]
    assert not mats[0].equal(mats[1])  # relabelled each step
    for Pt in mats:
        validate(Pt)
        np.testing.assert_allclose(eigenvalues_sorted(Pt), eigenvalues_sorted(P), atol=1e-10)
        assert spectral_gap(Pt) == pytest.approx(spectral_gap(P), abs=1e-12)
    # deterministic in (seed, t): a fresh object, any order of steps
    again = schedule(name, 16, shuffle="random", seed=7)
    assert again.at(3).equal(mats[3]) and again.at(0).equal(mats[0])
    assert not schedule(name, 16, shuffle="random", seed=8).at(3).equal(mats[3])
    # Pi^T P Pi with the permutation matrix of the drawn relabelling
    rows, _ = s.permutations(2)
    Pi = torch.eye(16, dtype=torch.float64)[:, rows]
    torch.testing.assert_close(Pi.T @ P @ Pi, mats[2], rtol=0, atol=0)


def test_two_sided_shuffle_as_official_code() -> None:
    s = schedule("ring", 16, shuffle="two-sided", seed=1)
    P1 = validate(s.at(1))
    rows, cols = s.permutations(1)
    assert not rows.equal(cols)
    np.testing.assert_allclose(
        np.linalg.svd(P1.numpy())[1], np.linalg.svd(mixing_matrix("ring", 16).numpy())[1]
    )


@pytest.mark.parametrize("m", (6, 7, 16))
def test_random_matchings(m: int) -> None:
    s = schedule("random_matching", m, seed=3)
    for t in range(6):
        P = validate(s.at(t))
        assert is_symmetric(P)
        off = P - torch.diag(torch.diag(P))
        assert set(off.unique().tolist()) <= {0.0, 0.5}
        assert torch.all(torch.count_nonzero(off, dim=1) <= 1)  # a matching
        assert int(torch.count_nonzero(off)) == 2 * (m // 2)  # perfect (maximal for odd m)
    assert s.at(4).equal(schedule("random_matching", m, seed=3).at(4))
    assert any(not s.at(t).equal(s.at(0)) for t in range(1, 6))


def test_matching_on_base_graph_edges() -> None:
    s = schedule("ring", 10, shuffle="matching", seed=0)
    ring = mixing_matrix("ring", 10)
    for t in range(5):
        P = validate(s.at(t))
        assert torch.all((P == 0) | (ring > 0))  # only ring edges
        # maximal: no ring edge joins two unmatched nodes
        free = torch.diag(P) == 1
        assert not any(bool(free[i] and free[(i + 1) % 10]) for i in range(10))


def test_neighbours() -> None:
    s = schedule("exponential", 8)
    nb = s.neighbours(0, 0)
    assert nb.incoming == [1, 2, 4]  # row 0: receives from 0+1, 0+2, 0+4
    assert nb.outgoing == [4, 6, 7]  # column 0: sent to 0-4, 0-2, 0-1 (mod 8)
    assert nb.in_weights == [0.25] * 3 and nb.self_weight == 0.25
    sh = schedule("ring", 8, shuffle="random", seed=2)
    P = sh.at(9)
    for j in range(8):
        nb = sh.neighbours(9, j)
        assert nb.incoming == [k for k in range(8) if k != j and P[j, k] > 0]
        assert nb.outgoing == [k for k in range(8) if k != j and P[k, j] > 0]


@pytest.mark.parametrize("name", ["ring", "exponential", "grid", "complete", "star", "torus"])
@pytest.mark.parametrize("m", (4, 16, 33))
def test_mixers_agree_with_dense(name: str, m: int) -> None:
    P = mixing_matrix(name, m)
    g = torch.Generator().manual_seed(m)
    W = torch.randn(m, 3, 7, generator=g, dtype=torch.float64)
    ref = (P @ W.reshape(m, -1)).reshape(W.shape)
    methods = ["auto", "dense", "sparse"] + (["roll"] if circulant_coefficients(P) is not None else [])
    for method in methods:
        torch.testing.assert_close(mixer(P, method)(W), ref, rtol=0, atol=1e-12, msg=method)


def test_roll_detection_and_refusal() -> None:
    assert circulant_coefficients(mixing_matrix("ring", 8)) == {0: 1 / 3, 1: 1 / 3, 7: 1 / 3}
    assert len(circulant_coefficients(mixing_matrix("exponential", 16))) == 5
    assert circulant_coefficients(mixing_matrix("grid", 16)) is None
    with pytest.raises(ValueError, match="circulant"):
        mixer(mixing_matrix("grid", 16), "roll")
    with pytest.raises(ValueError, match="unknown mixing method"):
        mixer(mixing_matrix("ring", 4), "fft")
    assert auto_method(mixing_matrix("ring", 64)) == "roll"
    assert auto_method(mixing_matrix("ring", 16)) == "dense"
    assert auto_method(mixing_matrix("grid", 256)) == "sparse"


@pytest.mark.parametrize("shuffle", [None, "random", "two-sided", "matching"])
def test_schedule_mixer_matches_at(shuffle: str | None) -> None:
    s = schedule("ring", 12, shuffle=shuffle, seed=5)
    W = torch.randn(12, 9, dtype=torch.float64)
    for t in (0, 1, 17):
        for method in ("auto", "dense", "roll" if shuffle in (None, "random") else "sparse"):
            torch.testing.assert_close(s.mixer(t, method)(W), s.at(t) @ W, rtol=0, atol=1e-12)


def test_float32_mixing_casts_p() -> None:
    P = mixing_matrix("exponential", 16)
    W = torch.randn(16, 100)
    for method in ("dense", "sparse", "roll"):
        out = mixer(P, method)(W)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, (P @ W.double()).float(), rtol=1e-5, atol=1e-6)


def convex_permutations(m: int, weights: list[float], seeds: list[int]) -> torch.Tensor:
    """sum_k a_k Pi_k with a_k >= 0, sum a_k = 1: doubly stochastic (Birkhoff)."""
    a = torch.tensor(weights, dtype=torch.float64)
    a = a / a.sum()
    P = torch.zeros(m, m, dtype=torch.float64)
    for ak, seed in zip(a, seeds):
        perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
        P += ak * torch.eye(m, dtype=torch.float64)[perm]
    return P


@settings(max_examples=40, deadline=None, database=None)
@given(
    m=st.integers(2, 12),
    weights=st.lists(st.floats(0.05, 1.0), min_size=1, max_size=4),
    seed=st.integers(0, 10_000),
    eta=st.floats(1e-3, 1.0),
)
def test_exact_averaging_identity(m: int, weights: list[float], seed: int, eta: float) -> None:
    """Paper P1 / T0: mean_j (P W - eta G)_j = mean(W) - eta mean(G) for doubly stochastic P."""
    P = validate(convex_permutations(m, weights, [seed + k for k in range(len(weights))]))
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, 5, generator=g, dtype=torch.float64)
    G = torch.randn(m, 5, generator=g, dtype=torch.float64)
    for method in ("dense", "sparse"):
        err = (mixer(P, method)(W) - eta * G).mean(0) - (W.mean(0) - eta * G.mean(0))
        assert float(err.abs().max()) < 1e-12


@settings(max_examples=25, deadline=None, database=None)
@given(m=st.integers(3, 12), seed=st.integers(0, 10_000))
def test_row_stochastic_breaks_identity_and_is_refused(m: int, seed: int) -> None:
    """Negative control: row-stochastic P with column sums != 1 breaks the identity (and is refused)."""
    g = torch.Generator().manual_seed(seed)
    P = torch.eye(m, dtype=torch.float64) * 0.5
    P[:, 0] += 0.5  # every row gives half its weight to node 0: rows sum to 1, column 0 to (m + 1) / 2
    W = torch.randn(m, 5, generator=g, dtype=torch.float64)
    W[0] += 3.0  # make node 0 differ from the mean so the bias shows
    err = (P @ W).mean(0) - W.mean(0)
    assert float(err.abs().max()) > 1e-3
    with pytest.raises(TopologyError, match="column sums of 1"):
        validate(P)


def test_every_topology_identity_t0() -> None:
    """Paper T0 at m = 16 for the four official topologies, float64, error < 1e-12."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 50, generator=g, dtype=torch.float64)
    G = torch.randn(16, 50, generator=g, dtype=torch.float64)
    for name, method in itertools.product(("ring", "grid", "exponential", "complete"), ("auto", "dense")):
        P = mixing_matrix(name, 16)
        err = (mixer(P, method)(W) - 0.1 * G).mean(0) - (W.mean(0) - 0.1 * G.mean(0))
        assert float(err.abs().max()) < 1e-12
