"""SAM losses against exact answers: quadratic losses, dense Hessians from torch.func.hessian."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from sharpness.functional import SharpnessInputError, make_loss
from sharpness.sam import (
    as_deviation_matrix,
    avg_sam_loss,
    avg_sam_quadratic,
    centre,
    sam_sharpness,
    xi_sampler,
    xi_trace,
)

DT = torch.float64


def linear_mse(seed: int = 0):
    """A quadratic loss: linear model + MSE, so E L(w + eps) = L(w) + Tr(H Sigma) / 2 exactly."""
    torch.manual_seed(seed)
    net = nn.Linear(6, 2).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(50, 6, generator=g, dtype=DT)
    y = torch.randn(50, 2, generator=g, dtype=DT)
    return net, F.mse_loss, (x, y)


def tanh_mlp(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(30, 4, generator=g, dtype=DT)
    return net, F.cross_entropy, (x, torch.randint(0, 3, (30,), generator=g))


def flat_loss(net, loss_fn, data):
    x, y = data
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]

    def f(theta):
        p = {n: t.reshape(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}
        return loss_fn(functional_call(net, p, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return f, theta


def dense_hessian(net, loss_fn, data):
    f, theta = flat_loss(net, loss_fn, data)
    return hessian(f)(theta)


def deviations(d: int, m: int = 6, scale: float = 0.3, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return centre(scale * torch.randn(m, d, generator=g, dtype=DT))


# ----------------------------------------------------------------------------- Xi sampler
def test_xi_sampler_covariance_matches_xi():
    D = deviations(7, m=4, scale=1.0)
    Xi = D.T @ D / D.shape[0]
    eps = xi_sampler(D, 100_000, torch.Generator().manual_seed(0))
    assert eps.shape == (100_000, 7)
    cov = eps.T @ eps / eps.shape[0]  # mean is zero by construction
    rel = float(torch.linalg.norm(cov - Xi) / torch.linalg.norm(Xi))
    assert rel < 0.02
    # negative control: isotropic noise with the same trace fails the same criterion
    iso = torch.randn(100_000, 7, dtype=DT) * (xi_trace(D) / 7) ** 0.5
    rel_iso = float(torch.linalg.norm(iso.T @ iso / 1e5 - Xi) / torch.linalg.norm(Xi))
    assert rel_iso > 0.02


def test_xi_rank_after_centring():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 12, generator=g, dtype=DT)  # raw worker models
    Dc = centre(W)
    assert float(Dc.sum(0).abs().max()) < 1e-13
    rank = lambda D: int(torch.linalg.matrix_rank(D.T @ D / D.shape[0]))
    assert rank(Dc) <= 4
    assert rank(W) == 5  # without centring the rank is m: the check can fail
    eps = xi_sampler(Dc, 50, torch.Generator().manual_seed(1))
    assert int(torch.linalg.matrix_rank(eps)) <= 4
    assert xi_trace(Dc) == pytest.approx(float((Dc**2).sum(1).mean()), rel=1e-14)


def test_deviation_matrix_from_dicts_follows_functional_order():
    net, loss_fn, data = tanh_mlp()
    fl = make_loss(net, loss_fn, data)
    D = deviations(fl.num_params, m=3)
    rows = [dict(reversed(list(fl.unflatten(D[j]).items()))) for j in range(3)]  # keys out of order
    rows[0]["extra.buffer"] = torch.zeros(2)  # extra keys are ignored
    assert torch.equal(as_deviation_matrix(rows, fl), D)
    stacked = {n: torch.stack([r[n] for r in rows]) for n in fl.params}
    assert torch.equal(as_deviation_matrix(stacked, fl.params), D)
    with pytest.raises(SharpnessInputError, match="lack"):
        as_deviation_matrix([{"0.weight": D[0, :24].reshape(6, 4)}], fl)
    with pytest.raises(SharpnessInputError, match="entries per row"):
        as_deviation_matrix(D[:, :-1], fl)


# ----------------------------------------------------------------------------- average-direction SAM
@pytest.mark.parametrize("antithetic", [True, False])
def test_avg_sam_loss_sigma_on_quadratic(antithetic):
    net, loss_fn, data = linear_mse()
    H = dense_hessian(net, loss_fn, data)
    sigma = 0.2
    r = avg_sam_loss(net, loss_fn, data, sigma=sigma, n_samples=400, antithetic=antithetic, seed=1)
    exact = r.base_loss + 0.5 * sigma**2 * float(torch.trace(H))
    assert r.stderr > 0
    assert abs(r.value - exact) < 4 * r.stderr
    assert abs(r.value - r.base_loss) > 4 * r.stderr  # the smoothing term is resolved: the test can fail
    assert r.covariance == "sigma^2 I" and r.n_samples == 400 and r.n_forward == 401
    assert r.trace_sigma == pytest.approx(sigma**2 * H.shape[0])


def test_avg_sam_loss_xi_on_quadratic():
    net, loss_fn, data = linear_mse()
    H = dense_hessian(net, loss_fn, data)
    D = deviations(H.shape[0], m=6, scale=0.3)
    r = avg_sam_loss(net, loss_fn, data, deviations=D, n_samples=400, seed=2)
    exact = r.base_loss + 0.5 * float(torch.trace(H @ (D.T @ D)) / D.shape[0])
    assert abs(r.value - exact) < 4 * r.stderr
    assert abs(r.value - r.base_loss) > 4 * r.stderr
    assert r.covariance == "Xi" and r.sigma is None
    assert r.increase == pytest.approx(r.value - r.base_loss, abs=1e-15)


def test_avg_sam_quadratic_xi_is_exact():
    net, loss_fn, data = tanh_mlp()
    H = dense_hessian(net, loss_fn, data)
    D = deviations(H.shape[0], m=5, scale=0.1)
    r = avg_sam_quadratic(net, loss_fn, data, deviations=D)
    exact = sum(float(D[j] @ H @ D[j]) for j in range(5)) / 5
    assert abs(2 * r.half_trace_term - exact) < 1e-10
    assert r.value == pytest.approx(r.base_loss + r.half_trace_term, abs=1e-15)
    assert r.n_hvp == 5 and r.stderr == 0.0
    list_input = [make_loss(net, loss_fn, data).unflatten(D[j]) for j in range(5)]
    r2 = avg_sam_quadratic(net, loss_fn, data, deviations=list_input)
    assert abs(r2.half_trace_term - r.half_trace_term) < 1e-14


def test_avg_sam_quadratic_sigma_hutchinson():
    net, loss_fn, data = tanh_mlp()
    H = dense_hessian(net, loss_fn, data)
    sigma = 0.1
    r = avg_sam_quadratic(net, loss_fn, data, sigma=sigma, n_probes=200, seed=4)
    exact = 0.5 * sigma**2 * float(torch.trace(H))
    assert r.stderr > 0 and r.n_hvp == 200
    assert abs(r.half_trace_term - exact) < 4 * r.stderr


def test_avg_sam_matches_quadratic_on_mlp_for_small_xi():
    """Monte Carlo and second-order forms agree on a non-quadratic loss when Xi is small."""
    net, loss_fn, data = tanh_mlp()
    D = deviations(sum(p.numel() for p in net.parameters()), m=8, scale=0.05)
    mc = avg_sam_loss(net, loss_fn, data, deviations=D, n_samples=200, seed=5)
    quad = avg_sam_quadratic(net, loss_fn, data, deviations=D)
    assert abs(mc.value - quad.value) < 4 * mc.stderr + 1e-6


# ----------------------------------------------------------------------------- worst-case SAM
def test_sam_one_step_is_exact_sam_perturbation():
    net, loss_fn, data = tanh_mlp()
    f, theta = flat_loss(net, loss_fn, data)
    g = torch.func.grad(f)(theta)
    rho = 0.05
    expected = float(f(theta + rho * g / g.norm()) - f(theta))
    r = sam_sharpness(net, loss_fn, data, rho=rho)
    assert abs(r.value - expected) < 1e-13
    assert r.method == "sam-one-step" and r.n_grad == 1
    assert r.eps_norm == pytest.approx(rho, rel=1e-12)
    assert r.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)


def test_sam_on_quadratic_first_and_second_order():
    net, loss_fn, data = linear_mse()
    H = dense_hessian(net, loss_fn, data)
    f, theta = flat_loss(net, loss_fn, data)
    g = torch.func.grad(f)(theta)
    u = g / g.norm()
    for rho in (1e-1, 1e-3):
        r = sam_sharpness(net, loss_fn, data, rho=rho)
        exact = rho * float(g.norm()) + 0.5 * rho**2 * float(u @ H @ u)  # exact for a quadratic
        assert abs(r.value - exact) < 1e-12
    small = sam_sharpness(net, loss_fn, data, rho=1e-4)
    assert abs(small.value / (1e-4 * float(g.norm())) - 1) < 1e-3


def test_multi_step_at_least_one_step():
    net, loss_fn, data = tanh_mlp()
    one = sam_sharpness(net, loss_fn, data, rho=0.5)
    many = sam_sharpness(net, loss_fn, data, rho=0.5, steps=10)
    assert many.value >= one.value
    assert many.eps_norm <= 0.5 * (1 + 1e-12)
    assert many.method == "projected-gradient-ascent-10" and many.n_grad == 10
    # on a quadratic with a large ball the ascent finds strictly more than the first-order step
    lnet, lfn, ldata = linear_mse()
    a = sam_sharpness(lnet, lfn, ldata, rho=3.0)
    b = sam_sharpness(lnet, lfn, ldata, rho=3.0, steps=20)
    assert b.value > a.value + 1e-6


# ----------------------------------------------------------------------------- settings and errors
def test_settings_recorded_and_json_ready():
    net, loss_fn, data = tanh_mlp()
    r = avg_sam_loss(net, loss_fn, data, sigma=0.01, n_samples=8, seed=7, params="2", train_mode=False)
    s = r.settings
    assert s["seed"] == 7 and s["params"] == "2" and s["train_mode"] is False and s["device"] == "cpu"
    assert s["num_params"] == 21
    json.dumps(r.to_dict())
    json.dumps(avg_sam_quadratic(net, loss_fn, data, sigma=0.01, n_probes=4).to_dict())
    json.dumps(sam_sharpness(net, loss_fn, data, rho=0.01, train_mode=True).to_dict())


def test_bn_train_mode_falls_back_and_leaves_model_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3))
    net = net.to(DT).eval()
    data = (torch.randn(10, 1, 6, 6, dtype=DT), torch.randint(0, 3, (10,)))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    a = avg_sam_loss(net, F.cross_entropy, data, sigma=0.05, n_samples=8, train_mode=True, chunk=4)
    b = avg_sam_loss(net, F.cross_entropy, data, sigma=0.05, n_samples=8, train_mode=True, chunk=1)
    c = avg_sam_loss(net, F.cross_entropy, data, sigma=0.05, n_samples=8, chunk=4)
    assert abs(a.value - b.value) < 1e-12
    assert abs(a.value - c.value) > 1e-6 and a.settings["train_mode"] is True
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert not any(m.training for m in net.modules())


def test_bad_input():
    net, loss_fn, data = tanh_mlp()
    fl = make_loss(net, loss_fn, data)
    D = deviations(fl.num_params, m=3)
    with pytest.raises(SharpnessInputError, match="exactly one"):
        avg_sam_loss(fl, sigma=0.1, deviations=D)
    with pytest.raises(SharpnessInputError, match="exactly one"):
        avg_sam_quadratic(fl)
    with pytest.raises(SharpnessInputError, match="sigma"):
        avg_sam_loss(fl, sigma=-1.0)
    with pytest.raises(SharpnessInputError, match="entries per row"):
        avg_sam_loss(fl, deviations=D[:, 1:])
    with pytest.raises(SharpnessInputError, match="only when a model"):
        sam_sharpness(fl, train_mode=True)
    with pytest.raises(SharpnessInputError, match="rho"):
        sam_sharpness(fl, rho=-0.1)
    with pytest.raises(SharpnessInputError, match="steps"):
        sam_sharpness(fl, steps=0)
    with pytest.raises(SharpnessInputError, match="too few"):
        avg_sam_loss(fl, sigma=0.1, n_samples=2)
