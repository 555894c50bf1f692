"""hessian_trace: Hutchinson and Hutch++ against exact traces (torch.func.hessian, known matrices)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch.nn.functional as F
from curvature_cases import (
    assert_unchanged,
    bn_cnn,
    exact_hessian,
    mlp_data,
    snapshot,
    spectrum_matrix,
    tiny_mlp,
)

from sharpness.functional import SharpnessInputError, make_loss
from sharpness.hvp import HessianOperator
from sharpness.operators import MatrixOperator
from sharpness.trace import MIN_PROBES, TraceResult, hessian_trace


def dominant_matrix(seed: int = 8) -> tuple[np.ndarray, float]:
    """d = 300: five eigenvalues 100..400 over a bulk in [0, 1], randomly rotated."""
    eigs = np.concatenate([[400.0, 300.0, 200.0, 150.0, 100.0], np.random.default_rng(0).uniform(0, 1, 295)])
    return spectrum_matrix(eigs, seed=seed), float(eigs.sum())


@pytest.mark.parametrize("method,n", [("hutchinson", 200), ("hutch++", 90)])
def test_trace_within_4_stderr_of_exact_on_tiny_model(method: str, n: int) -> None:
    net, data = tiny_mlp(), mlp_data()
    exact = float(np.trace(exact_hessian(net, *data)))
    r = hessian_trace(net, F.cross_entropy, data, n_probes=n, method=method, seed=1)
    assert r.stderr > 0 and abs(r.value - exact) < 4 * r.stderr
    assert r.n_hvp == n and r.method == method and isinstance(r, TraceResult)


def test_hutchinson_value_and_stderr_formulas() -> None:
    A, _ = dominant_matrix()
    r = hessian_trace(MatrixOperator(A), n_probes=37, batch=5, seed=2)
    x = np.array(r.samples)
    assert len(x) == 37 == r.n_probes == r.n_hvp and r.converged is None
    assert r.value == pytest.approx(x.mean(), rel=1e-14)
    assert r.stderr == pytest.approx(x.std(ddof=1) / np.sqrt(37), rel=1e-12)


def test_exact_cases() -> None:
    eigs = np.random.default_rng(1).uniform(-3, 5, 40)
    r = hessian_trace(MatrixOperator(np.diag(eigs)), n_probes=12)  # z^T D z = Tr D for +-1 entries
    assert r.value == pytest.approx(eigs.sum(), rel=1e-12) and r.stderr == pytest.approx(0.0, abs=1e-12)
    A = spectrum_matrix(eigs[:10], seed=3)  # d = 10 <= m // 3: the sketch spans everything
    pp = hessian_trace(MatrixOperator(A), n_probes=60, method="hutch++")
    assert pp.n_sketch == 10 and pp.n_hvp == 2 * 10 + 40
    assert pp.value == pytest.approx(eigs[:10].sum(), rel=1e-12) and pp.stderr < 1e-12
    assert pp.sketch_trace == pytest.approx(eigs[:10].sum(), rel=1e-12)


def test_stderr_falls_like_one_over_sqrt_n() -> None:
    op = MatrixOperator(spectrum_matrix(np.random.default_rng(2).uniform(-1, 2, 60), seed=9))
    ratios = [
        hessian_trace(op, n_probes=400, seed=s).stderr / hessian_trace(op, n_probes=1600, seed=s).stderr
        for s in range(3)
    ]
    assert 1.8 < np.mean(ratios) < 2.2, ratios


def test_hutchpp_has_lower_variance_with_dominant_eigenvalues() -> None:
    A, exact = dominant_matrix()
    op = MatrixOperator(A)
    runs = {
        m: [hessian_trace(op, n_probes=60, method=m, seed=s) for s in range(20)]
        for m in ("hutchinson", "hutch++")
    }
    spread = {m: np.std([r.value for r in rs], ddof=1) for m, rs in runs.items()}
    assert spread["hutch++"] < 0.1 * spread["hutchinson"], spread
    pp = runs["hutch++"]
    assert all(r.n_hvp == 60 and r.n_sketch == 20 and r.n_probes == 40 for r in pp)
    values = np.array([r.value for r in pp])
    assert abs(values.mean() - exact) < 4 * spread["hutch++"] / np.sqrt(20)
    mean_se = np.mean([r.stderr for r in pp])  # the residual stderr is an honest scale of the spread
    assert 0.5 < mean_se / spread["hutch++"] < 2.0


@pytest.mark.parametrize("batch,expected", [(1, 10), (3, 12), (16, 16)])
def test_rtol_stops_at_block_ends_never_before_ten_probes(batch: int, expected: int) -> None:
    A, _ = dominant_matrix()
    r = hessian_trace(MatrixOperator(A), n_probes=500, rtol=1e9, batch=batch)
    assert MIN_PROBES == 10 and r.n_probes == expected and r.n_hvp == expected and r.converged
    exact_diag = hessian_trace(MatrixOperator(np.diag(np.arange(1.0, 9.0))), n_probes=50, rtol=1e-3, batch=2)
    assert exact_diag.n_probes == 10 and exact_diag.stderr == 0.0  # stderr 0 still waits for the floor


def test_rtol_met_or_budget_spent() -> None:
    A, _ = dominant_matrix()
    op = MatrixOperator(A)
    r = hessian_trace(op, n_probes=400, rtol=0.1, batch=4, seed=3)
    assert r.converged and r.stderr < 0.1 * abs(r.value) and r.n_probes % 4 == 0 and r.n_probes < 400
    # one block earlier the target was not met
    prev = np.array(r.samples[:-4])
    assert len(prev) < MIN_PROBES or prev.std(ddof=1) / np.sqrt(len(prev)) >= 0.1 * abs(prev.mean())
    miss = hessian_trace(op, n_probes=30, rtol=1e-9, batch=8)
    assert miss.converged is False and miss.n_probes == 30
    pp = hessian_trace(op, n_probes=300, method="hutch++", rtol=1e9, batch=4)
    assert pp.converged and pp.n_probes - pp.n_sketch == 12 and pp.n_hvp == 2 * 100 + 12


def test_operator_forms_agree_and_settings_recorded() -> None:
    net, data = tiny_mlp(), mlp_data()
    a = hessian_trace(net, F.cross_entropy, data, n_probes=20, seed=4, device="cpu")
    b = hessian_trace(make_loss(net, F.cross_entropy, data), n_probes=20, seed=4)
    c = hessian_trace(HessianOperator(net, F.cross_entropy, data), n_probes=20, seed=4, batch=3)
    assert a.value == pytest.approx(b.value, rel=1e-12) and a.value == pytest.approx(c.value, rel=1e-12)
    sub = hessian_trace(net, F.cross_entropy, data, n_probes=10, params=["0"], method="hutchinson")
    H = exact_hessian(net, *data)
    assert sub.stderr > 0 and abs(sub.value - np.trace(H[:30, :30])) < 5 * sub.stderr
    d = json.loads(json.dumps(a.to_dict()))
    assert d["settings"]["device"] == "cpu" and d["seed"] == 4 and d["settings"]["n_probes"] == 20
    assert sub.settings["params"] == ["0"] and a.settings["train_mode"] is False
    assert b.settings["train_mode"] is None  # a FunctionalLoss fixed its own mode
    net_bn, bn_data = bn_cnn()
    op_train = HessianOperator(net_bn, F.cross_entropy, bn_data, train_mode=True)
    t = hessian_trace(op_train, n_probes=10, seed=4)
    assert t.settings["train_mode"] is True
    assert t.value == pytest.approx(
        hessian_trace(net_bn, F.cross_entropy, bn_data, n_probes=10, seed=4, train_mode=True).value, rel=1e-12
    )
    with pytest.raises(SharpnessInputError, match="train_mode=True"):
        hessian_trace(make_loss(net, F.cross_entropy, data), n_probes=10, train_mode=True)


def test_input_errors() -> None:
    op = MatrixOperator(np.eye(5))
    for kwargs, msg in (
        (dict(method="lanczos"), "method"),
        (dict(n_probes=1), "n_probes"),
        (dict(n_probes=3, method="hutch++"), "n_probes"),
        (dict(batch=0), "batch"),
        (dict(rtol=0.0), "rtol"),
        (dict(train_mode=True), "train_mode"),
        (dict(device="meta"), "device"),
    ):
        with pytest.raises(SharpnessInputError, match=msg):
            hessian_trace(op, **kwargs)
    with pytest.raises(SharpnessInputError, match="loss_fn and data"):
        hessian_trace(make_loss(tiny_mlp(), F.cross_entropy, mlp_data()), F.cross_entropy, mlp_data())


def test_model_state_unchanged_bn_cnn() -> None:
    net, data = bn_cnn()
    net.eval()
    net[2].train()  # mixed flags must come back exactly
    before = snapshot(net)
    for train_mode in (False, True):
        for method in ("hutchinson", "hutch++"):
            r = hessian_trace(net, F.cross_entropy, data, n_probes=12, method=method, train_mode=train_mode)
            assert np.isfinite(r.value) and r.settings["train_mode"] is train_mode
            assert_unchanged(net, before)
