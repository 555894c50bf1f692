"""Every negative control can fail: its output, fed to the SAME criterion function the check uses, is
rejected, while the check's own measurement is accepted (so each test can fail both ways).

Cheap checks are run for real (quick form); for the slow ones the control's output is a constructed one with
the values a real quick run at seed 0 measured (the numbers are quoted from those runs; the README table is
regenerated from a real run). Identity checks declare no control.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

from verify.claims import Context
from verify.claims.base import NO_CONTROL
from verify.claims.stationary import (
    ENGINE_TOL,
    engine_log_errors,
    quadratic_problem,
    run_config,
    time_average,
)

QUICK = Context(quick=True, seed=0)


def test_t0_row_stochastic_p_is_rejected():
    from verify.claims.t00_averaging import ExactAveraging, criterion

    r = ExactAveraging().run(QUICK)
    assert criterion(r.measured["max_error"])
    assert not criterion(r.control.measured["error"])
    assert r.control.came_out_other_way


def test_t1_isotropic_surrogate_is_rejected():
    from verify.claims.t01_theorem_static import TheoremStatic, criterion

    r = TheoremStatic().run(QUICK)
    m, c = r.measured, r.control.measured
    real = {k: m[k] for k in ("drift_slope", "residual_slope", "residual_over_drift_at_smallest_s")}
    real["symmetric_residual_slope"] = m["symmetric_residual_slope"]
    assert criterion(real)
    iso = {
        **real,
        "residual_slope": c["isotropic_residual_slope"],
        "residual_over_drift_at_smallest_s": c["isotropic_residual_over_drift_at_smallest_s"],
    }
    assert not criterion(iso)
    assert r.control.came_out_other_way


@pytest.mark.parametrize("cid", ["T1b", "T1c"])
def test_t1b_t1c_uncentred_deviations_are_rejected(cid):
    from verify.claims.t01b_mlp_taylor import DigitsTaylor, MlpTaylor, criterion

    r = {"T1b": MlpTaylor, "T1c": DigitsTaylor}[cid]().run(QUICK)
    assert criterion(r.measured)
    c = r.control.measured
    control = {
        "drift_slope": c["uncentred_drift_slope"],
        "residual_slope": c["uncentred_residual_slope"],
        "clairaut_relative_error": r.measured["clairaut_relative_error"],
    }
    assert not criterion(control)
    assert c["uncentred_drift_slope"] < 1.5  # the first-order term H mean(d_j): slope ~1
    # the former control (drop the sharpness term: residual = drift) could not fail: the criterion bounds it
    dropped = {**r.measured, "residual_slope": r.measured["drift_slope"]}
    assert not criterion(dropped)


def test_t4_worst_case_sam_is_rejected_at_a_random_point_and_near_a_minimum():
    from verify.claims.t04_loss_decomposition import LossDecomposition, criterion

    r = LossDecomposition().run(QUICK)
    m, c = r.measured, r.control.measured
    for prefix in ("", "minimum_"):
        main = {k: m[prefix + k] for k in ("regulariser_slope", "residual_slope", "gap_sign_constant")}
        main["hvp_vs_dense_rel_error"] = m[prefix + "hvp_vs_dense_rel_error"]
        assert criterion(main), prefix
        ctrl = {
            **main,
            "regulariser_slope": c[f"worst_case_sam_{prefix}regulariser_slope"],
            "residual_slope": c[f"worst_case_sam_{prefix}residual_slope"],
        }
        assert not criterion(ctrl), prefix
    # near the minimum worst-case SAM has slope 2: a slope test alone would have accepted it
    assert 1.8 <= c["worst_case_sam_minimum_regulariser_slope"] <= 2.2
    assert c["accepted_by_criterion"] == {"random": False, "minimum": False}


def test_t5_isotropic_surrogate_is_rejected():
    from verify.claims.t05_trajectory import criterion

    # quick run, seed 0: median r slope 1.00, r = 0.0095 at eta = 0.005; isotropic: slope -0.04, r = 0.87
    assert criterion(1.00, 0.0095)
    assert not criterion(-0.04, 0.87)


def t6_measured(**changes):
    """T6's measured values at seed 0 (quick), with ``changes``."""
    base = {
        "max_relative_error_vs_lyapunov": 0.022,
        "max_abs_z_vs_lyapunov": 2.04,
        "eta_slope": 1.93,
        "b_slope": -1.00,
        "order_complete<exp<grid<ring": True,
        "ring_m_slope": 0.66,
        "exponential_m_slope": 0.15,
        "engine_log_max_relative_error": 3e-16,
    }
    return {**base, **changes}


def test_t6_controls_are_rejected():
    from verify.claims.t06_consensus_scaling import criterion

    assert criterion(t6_measured())
    assert not criterion(t6_measured(eta_slope=1.07))  # (a) P = I
    # (b) ATC against the AWC prediction: measured 0.59 of it, z = -41
    assert not criterion(t6_measured(max_relative_error_vs_lyapunov=0.41, max_abs_z_vs_lyapunov=41.0))
    # either part alone rejects it: the relative band and the standard errors
    assert not criterion(t6_measured(max_relative_error_vs_lyapunov=0.41))
    assert not criterion(t6_measured(max_abs_z_vs_lyapunov=41.0))
    # a wrong engine log (e.g. sqrt(Tr Xi) logged as Tr Xi) is rejected
    assert not criterion(t6_measured(engine_log_max_relative_error=0.5))


def test_t6_atc_differs_from_the_awc_prediction():
    """The premise of control (b): on the ring the ATC stationary Tr Xi is ~40% below the AWC one."""
    from verify.claims.t06_consensus_scaling import REL_TOL, H
    from verify.lyapunov import stationary_consensus

    P = mixing_matrix_ring()
    awc = stationary_consensus(P, 0.01, H, 1.0, 8).trace_xi
    atc = stationary_consensus(P, 0.01, H, 1.0, 8, form="atc").trace_xi
    assert abs(atc / awc - 1) > 3 * REL_TOL


def mixing_matrix_ring():
    from verify.topology import mixing_matrix

    return mixing_matrix("ring", 16)


def t7_measured(**changes):
    base = {
        "dsgd_trace_xi_slope": 0.91,
        "dsgd_half_trace_h_xi_slope": 0.89,
        "dsgd_max_relative_error_vs_lyapunov": 0.022,
        "dsgd_max_abs_z_vs_lyapunov": 2.04,
        "csgd_excess_loss_slope": 0.005,
        "csgd_max_relative_error_vs_exact": 0.025,
        "csgd_genuine_z": -0.59,
        "ratio_increasing": True,
        "engine_log_max_relative_error": 3e-16,
    }
    return {**base, **changes}


def test_t7_fixed_eta_control_and_a_wrong_csgd_are_rejected():
    from verify.claims.t07_large_batch import criterion

    assert criterion(t7_measured())
    assert not criterion(t7_measured(dsgd_trace_xi_slope=-0.99, dsgd_half_trace_h_xi_slope=-0.99))
    assert not criterion(t7_measured(csgd_genuine_z=147.0))  # C-SGD along one worker's gradient


def test_t7_genuine_csgd_z_detects_a_one_worker_csgd(monkeypatch):
    """The engine's C-SGD is within Z_MAX standard errors of the exact excess loss; a C-SGD stepping along
    worker 0's gradient (noise Sigma/b instead of Sigma/(m b)) is m = 16 times off."""
    import verify.algorithms as algorithms
    from verify.claims.t07_large_batch import KAPPA, Z_MAX, H
    from verify.lyapunov import csgd_excess_loss, csgd_excess_loss_se, csgd_variance

    m, b = 16, 8
    eta, B = KAPPA * b, m * b

    def z_of_run() -> float:
        v = csgd_variance(eta, H, 1.0, B)
        g = torch.Generator().manual_seed(777)
        w0 = torch.as_tensor(np.sqrt(v)) * torch.randn(len(H), generator=g, dtype=torch.float64)
        n = math.ceil(40.0 / eta)
        avg = time_average(run_config(algo="csgd", m=m, b=b, lr=eta, steps=n, seed=777),
                           quadratic_problem(H, m=m, b=b, seed=777, w0=w0), 0, loss="average")  # fmt: skip
        exact = csgd_excess_loss(eta, H, 1.0, B)
        return (avg.loss - exact) / csgd_excess_loss_se(eta, H, 1.0, B, n)

    assert abs(z_of_run()) <= Z_MAX
    record = algorithms.ALGORITHMS["csgd"]

    def one_worker(state, grads, mix, lr, cfg):
        return record.step(state, lambda W, B: (lambda G, L, Bf: (G[:1].expand_as(G), L, Bf))(*grads(W, B)),
                           mix, lr, cfg)  # fmt: skip

    monkeypatch.setitem(algorithms.ALGORITHMS, "csgd", dataclasses.replace(record, step=one_worker))
    assert z_of_run() > 10 * Z_MAX


def test_t6n_t7n_controls_are_rejected():
    from verify.claims.t06n_consensus_network import CALIBRATIONS
    from verify.claims.t06n_consensus_network import criterion as c6
    from verify.claims.t07n_large_batch_network import criterion as c7

    t6n = {
        "max_relative_error_vs_lyapunov": 0.091,
        "eta_slope": 1.86,
        "b_slope": -1.02,
        "engine_log_max_relative_error": 3.5e-16,
    }
    assert c6(t6n)
    assert not c6({**t6n, "max_relative_error_vs_lyapunov": abs(0.538 - 1)})  # ATC / AWC prediction
    # the paper's sharded sampling is reported, not a control; it would fail the i.i.d. law's b-slope
    assert not c6({**t6n, "b_slope": -0.47})
    t7n = {
        "trace_xi_slope": 0.79,
        "trace_xi_slope_predicted": 0.79,
        "half_trace_h_xi_slope": 0.72,
        "half_trace_h_xi_slope_predicted": 0.73,
        "max_relative_error_vs_lyapunov": 0.061,
        "engine_log_max_relative_error": 1.9e-16,
    }
    assert c7(t7n)
    assert not c7({**t7n, "trace_xi_slope": -1.03, "half_trace_h_xi_slope": -1.03})  # fixed eta
    for cls in ("t06n_consensus_network.ConsensusNetwork", "t07n_large_batch_network.LargeBatchNetwork"):
        mod, name = cls.split(".")
        check = getattr(__import__(f"verify.claims.{mod}", fromlist=[name]), name)
        assert CALIBRATIONS in check.criterion  # both calibrations are named where users read them
        assert "rescaled" in check.criterion and "i.i.d." in check.criterion


def test_t8_controls_are_rejected():
    from verify.claims.t08_smoothing import GradientSmoothing, criterion

    r = GradientSmoothing().run(QUICK)
    m, c = r.measured, r.control.measured
    base = {k: m[k] for k in ("beta_single_kink_slope", "bound_holds_everywhere")}
    assert criterion({**base, "h_slopes": [m["smoothed_ratio_h_slope"], m["xi_along_u_h_slope"]]})
    assert not criterion({**base, "h_slopes": [c["raw_ratio_h_slope"]]})
    assert not criterion({**base, "h_slopes": [c["xi_orthogonal_h_slope"]]})
    assert 0 < c["xi_orthogonal_std_along_u"] < 1e-9  # the general branch (s_k > 0), not the fallback


def test_t9_isotropic_smoothing_is_rejected():
    from verify.claims.t09_tradeoff import criterion

    # quick run at seed 0 (6000 steps): per run (eta, topology, Tr Xi, 1/2 Tr HXi, Delta L, ||b_D||,
    # ||b_D - p||, ||b_D - p_iso||)
    recorded = [
        (0.02, "complete", 0.00765, 0.0204, 1.26e-5, 0.00110, 1.78e-5, 0.0426 * 0.00110),
        (0.02, "exponential", 0.00878, 0.0226, 1.40e-5, 0.00122, 2.01e-5, 0.0173 * 0.00122),
        (0.02, "grid", 0.01039, 0.0248, 1.53e-5, 0.00132, 2.36e-5, 0.1015 * 0.00132),
        (0.02, "ring", 0.01331, 0.0287, 1.73e-5, 0.00149, 2.54e-5, 0.2520 * 0.00149),
        (0.03, "complete", 0.01765, 0.0471, 1.09e-5, 0.00263, 2.22e-5, 0.0774 * 0.00263),
        (0.03, "exponential", 0.02000, 0.0514, 1.23e-5, 0.00287, 2.35e-5, 0.0409 * 0.00287),
        (0.03, "grid", 0.02311, 0.0561, 1.45e-5, 0.00312, 2.59e-5, 0.0469 * 0.00312),
        (0.03, "ring", 0.02839, 0.0615, 1.76e-5, 0.00334, 3.20e-5, 0.1908 * 0.00334),
    ]
    keys = ("eta", "topology", "trace_xi", "half_trace_h_xi", "delta_loss", "bias_norm",
            "bias_minus_predicted", "bias_minus_isotropic")  # fmt: skip
    rows = [dict(zip(keys, r, strict=True)) for r in recorded]
    assert criterion(rows)
    assert not criterion([{**r, "bias_minus_predicted": r["bias_minus_isotropic"]} for r in rows])
    # pooling the two learning rates is what made the old criterion fail: per eta the order is perfect
    from scipy import stats

    pooled = stats.spearmanr([r["trace_xi"] for r in rows], [r["delta_loss"] for r in rows])[0]
    assert pooled < 0.8


def test_t10_isotropic_noise_is_rejected():
    from verify.claims.t10_uncertainty import criterion

    assert criterion(0.985)  # quick run, seed 0
    assert not criterion(0.353)  # its isotropic-noise control


def test_t12_is_an_identity_without_control():
    from verify.claims.t12_grandsum import GrandsumSign, criterion

    assert not GrandsumSign.has_control and GrandsumSign.control.startswith(NO_CONTROL)
    assert GrandsumSign.evidence == "identity"
    r = GrandsumSign().run(QUICK)
    assert r.control.came_out_other_way is None and r.verdict == "PASS"
    assert criterion(r.measured)
    assert not criterion({**r.measured, "sign_matches_everywhere": False})


def test_engine_log_errors_compare_what_the_engine_logged():
    h = [0.5, 1.0, 2.0]
    cfg = run_config(m=4, b=2, lr=0.05, steps=50, seed=1, hess_every=50)
    avg = time_average(cfg, quadratic_problem(h, m=4, b=2, seed=1), 10, h=h)
    assert set(avg.engine_log) == {"consensus_distance", "trace_h_xi", "lr"}
    assert avg.engine_log_error < ENGINE_TOL
    W = avg.final_W
    D = W - W.mean(0)
    good = {"consensus_distance": float((D * D).sum() / 4), "lr": 0.05}
    good["trace_h_xi"] = float((torch.tensor(h, dtype=torch.float64) * (D * D).sum(0) / 4).sum())
    assert max(engine_log_errors([good], W, cfg, h).values()) < ENGINE_TOL
    for key, wrong in (("consensus_distance", math.sqrt(good["consensus_distance"])), ("lr", 0.5),
                       ("trace_h_xi", 2 * good["trace_h_xi"])):  # fmt: skip
        assert engine_log_errors([{**good, key: wrong}], W, cfg, h)[key] > 0.1
