"""T13's criterion (Theorem 1 along whole runs): accepts an arm that reproduces D-SGD's mean path, rejects the
isotropic control, C-SGD itself, and a Xi sampler missing its 1/sqrt(m)."""

import math

import numpy as np
import pytest

from verify.claims.t13_whole_runs import ARMS, Trajectories, criterion, drift_effects, simulate, systematic_sq

ETAS = [0.025, 0.05, 0.1, 0.2]


def constructed(seed: int = 0, S: int = 6, d: int = 50, n_logs: int = 5) -> Trajectories:
    """Streams of the derived law with kappa = 2: C-SGD and the isotropic arm carry a drift eta^2 u plus
    noise eta^1.5; avg-SAM carries the noise only; loss gaps -eta^2 (drift) and eta^1.5 noise / 20."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n_logs, d)) / math.sqrt(n_logs * d) * 3.0
    tr = Trajectories(list(ETAS), list(range(S)))
    tr.paths = {a: [[None] * S for _ in ETAS] for a in ARMS}
    for store in (tr.loss_gap, tr.distance, tr.acc_gap):
        store.update({a: np.zeros((len(ETAS), S)) for a in ARMS})
    tr.trace_xi = np.array([[e**2] * S for e in ETAS]) * np.exp(0.02 * rng.standard_normal((len(ETAS), S)))
    for k, e in enumerate(ETAS):
        for i in range(S):
            for a in ARMS:
                noise = rng.standard_normal((n_logs, d)) / math.sqrt(n_logs * d) * e**1.5
                drift = 0.0 if a == "avgsam-xi" else u * e**2
                tr.paths[a][k][i] = drift + noise
                tr.distance[a][k, i] = np.linalg.norm(drift + noise, axis=1).mean()
                gap = -(e**2) if a != "avgsam-xi" else 0.0
                tr.loss_gap[a][k, i] = gap + e**1.5 * rng.standard_normal() / 20
    return tr


def test_systematic_sq_is_unbiased_for_the_squared_mean():
    rng = np.random.default_rng(1)
    mean = np.ones((2, 3))
    est = [systematic_sq([mean + rng.standard_normal((2, 3)) for _ in range(5)]) for _ in range(4000)]
    assert np.mean(est) == pytest.approx(np.sum(mean**2) / 2, abs=4 * np.std(est) / math.sqrt(4000))


def test_criterion_accepts_the_mean_path_and_rejects_the_isotropic_control():
    tr = constructed()
    holds, effects = criterion(tr, "avgsam-xi", ("csgd", "avgsam-iso"))
    assert holds, [e.text() for e in effects]
    assert all(e.outcome == "supported" for e in drift_effects(tr))
    # the control's output, fed to the same criterion function, is rejected
    iso_holds, iso_effects = criterion(tr, "avgsam-iso", ("csgd", "avgsam-xi"))
    assert not iso_holds
    assert any(e.outcome == "contradicted" for e in iso_effects)


def test_criterion_rejects_csgd_itself_as_the_avgsam_arm():
    tr = constructed(seed=2).with_arm("avgsam-xi", like="csgd")
    holds, effects = criterion(tr, "avgsam-xi", ("csgd", "avgsam-iso"))
    assert not holds
    assert effects[0].outcome == "contradicted"  # systematic distance: exactly as far as C-SGD


def test_criterion_rejects_a_xi_sampler_missing_its_one_over_sqrt_m(monkeypatch):
    import verify.lockstep as lockstep

    def run(streams):
        return simulate(3, [0.1, 0.2], streams, tau=3.0, hidden=8)

    good = run([1, 2, 3, 4])
    ok = criterion(good, "avgsam-xi", ("csgd",))[1][0]
    assert ok.outcome == "supported", ok.text()
    wrong = lockstep.PERTURB["avgsam-xi"]
    monkeypatch.setitem(lockstep.PERTURB, "avgsam-xi", lambda D, s, t: wrong(D, s, t) * math.sqrt(D.shape[0]))
    bad = run([1, 2, 3, 4])
    holds, effects = criterion(bad, "avgsam-xi", ("csgd",))
    assert not holds and effects[0].outcome == "contradicted", effects[0].text()
