"""Loss landscapes: filter normalisation (Li et al. 2018), lines and surfaces."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpness.functional import SharpnessInputError, make_loss
from sharpness.landscape import loss_line, loss_surface, normalize_direction, random_direction

DT = torch.float64


def bn_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).to(DT)
    return net.eval()


def data(n: int = 12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def test_filter_normalisation_matches_each_filter():
    net = bn_cnn()
    fl = make_loss(net, F.cross_entropy, data())
    d = fl.unflatten(random_direction(fl, seed=3))
    for name, w in fl.params.items():
        if w.dim() >= 2:
            dn = d[name].reshape(w.shape[0], -1).norm(dim=1)
            wn = w.reshape(w.shape[0], -1).norm(dim=1)
            assert torch.allclose(dn, wn, rtol=1e-12, atol=0), name
        else:  # biases and BN parameters: zero by default
            assert torch.count_nonzero(d[name]) == 0, name
    # ignore_1d=False: each 1-D tensor is one filter with the tensor's norm
    d2 = fl.unflatten(random_direction(fl, seed=3, ignore_1d=False))
    for name, w in fl.params.items():
        if w.dim() == 1:
            assert float(d2[name].norm()) == pytest.approx(float(w.norm()), rel=1e-12)


def test_random_direction_from_model_equals_from_functional_loss():
    net = bn_cnn()
    fl = make_loss(net, F.cross_entropy, data())
    assert torch.equal(random_direction(net, seed=5), random_direction(fl, seed=5))
    assert not torch.equal(random_direction(fl, seed=5), random_direction(fl, seed=6))
    sub = random_direction(net, seed=5, params="4")
    assert sub.numel() == 4 * 16 * 3 + 3


def test_layer_and_model_norms_for_a_given_direction():
    fl = make_loss(bn_cnn(), F.cross_entropy, data())
    v = torch.randn(fl.num_params, dtype=DT)
    v = v / v.norm()  # e.g. a unit Hessian eigenvector
    scaled = normalize_direction(v, fl, norm="model")
    assert float(scaled.norm()) == pytest.approx(float(fl.flat_params().norm()), rel=1e-12)
    assert torch.allclose(scaled / scaled.norm(), v, atol=1e-14)
    layer = fl.unflatten(normalize_direction(fl.unflatten(v), fl, norm="layer"))
    assert float(layer["0.weight"].norm()) == pytest.approx(float(fl.params["0.weight"].norm()), rel=1e-12)
    assert torch.equal(normalize_direction(v, fl, norm="none"), v)
    with pytest.raises(SharpnessInputError, match="norm"):
        normalize_direction(v, fl, norm="bogus")
    with pytest.raises(SharpnessInputError, match="flat vector"):
        normalize_direction(v[:-1], fl)


@pytest.mark.parametrize("chunk", [1, 8])
def test_loss_line_at_zero_is_base_loss(chunk):
    net = bn_cnn()
    x, y = data()
    with torch.no_grad():
        direct = float(F.cross_entropy(net(x), y))
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
    r = loss_line(net, None, alphas, loss_fn=F.cross_entropy, data=(x, y), seed=2, chunk=chunk)
    assert r.kind == "1d" and len(r.losses) == 5 and r.n_forward == 6
    assert abs(r.losses[2] - direct) < 1e-12 and abs(r.base_loss - direct) < 1e-14
    assert max(abs(v - direct) for v in r.losses) > 1e-3  # the direction does move the loss
    # each point equals a direct evaluation at the perturbed weights
    fl = make_loss(net, F.cross_entropy, (x, y))
    d = random_direction(fl, seed=2)
    with torch.no_grad():
        at_one = float(fl.loss(fl.unflatten(fl.flat_params() + d)))
    assert abs(r.losses[4] - at_one) < 1e-12
    json.dumps(r.to_dict())


def test_loss_surface_grid_and_given_directions():
    net = bn_cnn()
    fl = make_loss(net, F.cross_entropy, data())
    d1, d2 = random_direction(fl, seed=0), random_direction(fl, seed=1)
    r = loss_surface(fl, d1, d2, alphas=[-0.5, 0.0, 0.5], betas=[0.0, 1.0], norm="none")
    assert r.kind == "2d" and len(r.losses) == 3 and len(r.losses[0]) == 2
    assert abs(r.losses[1][0] - r.base_loss) < 1e-12
    with torch.no_grad():
        ref = float(fl.loss(fl.unflatten(fl.flat_params() + 0.5 * d1 + 1.0 * d2)))
    assert abs(r.losses[2][1] - ref) < 1e-12
    # the default random directions use seeds seed and seed + 1
    r2 = loss_surface(fl, alphas=[-0.5, 0.0, 0.5], betas=[0.0, 1.0])
    assert torch.allclose(torch.tensor(r2.losses), torch.tensor(r.losses), rtol=0, atol=1e-12)
