"""The lockstep driver: arms share initialisation and batches; the Xi and isotropic samplers are exact."""

import numpy as np
import pytest
import torch

from verify.config import ConfigError, RunConfig
from verify.engine import run
from verify.lockstep import gaussian_xi, isotropic_like, run_lockstep


def tiny(**kw):
    mlp = {"hidden": [8], "activation": "tanh"}
    base = dict(algo="dsgd", topology="ring", workers=4, local_batch=8, steps=12, lr=0.2, log_every=4,
                dtype="float64", device="cpu", model="mlp", model_kwargs=mlp,
                ensemble=False, samples=200, test_samples=100, seed=3)  # fmt: skip
    base.update(kw)
    return RunConfig(**base)


def test_exact_arm_is_the_averaged_dynamics_and_csgd_arm_is_the_engine_csgd():
    res = run_lockstep(tiny(), arms=("dsgd", "csgd", "avgsam-exact"))
    w_a = res.states["dsgd"].W.mean(0)
    # avg-SAM on the run's own deviations with the same batches is D-SGD's average, to rounding (T0)
    assert torch.allclose(res.states["avgsam-exact"].W[0], w_a, atol=1e-12, rtol=0)
    assert max(res.column("avgsam-exact_dist")) < 1e-12
    eng = run(tiny(algo="csgd"), progress=False)
    assert torch.allclose(res.states["csgd"].W, eng.state.W, atol=1e-13, rtol=0)
    assert res.column("csgd_test_acc")[-1] == pytest.approx(eng.metrics[-1]["test_acc"])
    assert res.column("step") == [0, 4, 8, 12]
    assert res.column("trace_xi")[0] == 0 and res.column("trace_xi")[-1] > 0
    # the D-SGD arm's consensus distance is the engine's (same run)
    eng_d = run(tiny(), progress=False)
    assert res.column("trace_xi")[-1] == pytest.approx(eng_d.metrics[-1]["consensus_distance"], rel=1e-12)


def test_gaussian_xi_has_covariance_xi_and_isotropic_has_its_trace():
    g = torch.Generator().manual_seed(0)
    D = torch.randn(5, 3, generator=g, dtype=torch.float64)
    D -= D.mean(0)
    xi = (D.T @ D / 5).numpy()
    n = 4000
    E = torch.cat([gaussian_xi(D, 1, t) for t in range(n)]).numpy()
    cov = E.T @ E / E.shape[0]
    se = np.sqrt((xi**2 + np.outer(np.diag(xi), np.diag(xi))) / E.shape[0])  # Wishart entry std
    assert np.all(np.abs(cov - xi) < 5 * se)
    iso = torch.cat([isotropic_like(D, 1, t) for t in range(n)]).numpy()
    tr = np.trace(xi)
    assert np.mean((iso**2).sum(1)) == pytest.approx(tr, rel=5 * np.sqrt(2 / (3 * iso.shape[0])))
    cov_i = iso.T @ iso / iso.shape[0]
    assert np.abs(cov_i - np.eye(3) * tr / 3).max() < 0.1 * tr
    # a sampler without the 1/sqrt(m) (a plausible bug) is rejected by the same test
    bad = torch.cat([gaussian_xi(D, 1, t) * np.sqrt(5) for t in range(200)]).numpy()
    assert not np.all(
        np.abs(bad.T @ bad / bad.shape[0] - xi)
        < 5 * np.sqrt((xi**2 + np.outer(np.diag(xi), np.diag(xi))) / bad.shape[0])
    )


def test_lockstep_refuses_a_centralised_driver_and_unknown_arms():
    with pytest.raises(ConfigError, match="gossip"):
        run_lockstep(tiny(algo="csgd"))
    with pytest.raises(ConfigError, match="arms"):
        run_lockstep(tiny(), arms=("dsgd", "sgd-with-vibes"))
