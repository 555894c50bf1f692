"""The closed-form exact trace of a plain nn.Sequential MLP (sharpness.mlp_trace) against dense float64
Hessians, and when a network is (not) taken for one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from curvature_cases import DT
from test_ggn import Wrapped, data_for, dense, relu_mlp
from torch import nn

from sharpness.functional import SharpnessInputError, make_loss
from sharpness.ggn import ggn_trace, piecewise_linear
from sharpness.mlp_trace import chain_of
from sharpness.trace import hessian_trace


def deep_chain() -> nn.Module:
    """Every branch of the closed form: a flattened (n, 2, 3) input, two Linears with nothing between
    them, two activations in a row (GELU then Sigmoid), piecewise-linear ones, a smooth one on the output,
    so sites sit one, two and four layers behind the output."""
    torch.manual_seed(8)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Linear(5, 4), nn.GELU(), nn.Sigmoid(),
        nn.Linear(4, 5), nn.LeakyReLU(0.1), nn.Identity(), nn.Linear(5, 4), nn.Softplus(),
    )  # fmt: skip
    return net.to(DT).eval()


def chain_data(mse: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 2, 3, generator=g, dtype=DT)
    y = torch.randn(11, 4, generator=g, dtype=DT) if mse else torch.randint(0, 4, (11,), generator=g)
    return [(x[:7], y[:7]), (x[7:], y[7:])]


def block_traces(net: nn.Module, names: list[str], H: np.ndarray) -> float:
    """Trace of the diagonal block of ``H`` (over all parameters) belonging to ``names``."""
    out, at = 0.0, 0
    for k, p in net.named_parameters():
        if k in names:
            out += float(np.trace(H[at : at + p.numel(), at : at + p.numel()]))
        at += p.numel()
    return out


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("params", [None, ["4.weight", "7.bias", "10.weight"]])
def test_deep_chain_equals_dense_trace(loss: str, params: list[str] | None) -> None:
    net, batches = deep_chain(), chain_data(mse=loss == "mse")
    loss_fn = F.cross_entropy if loss == "ce" else nn.MSELoss()
    assert chain_of(net) is not None
    H, G = dense(net, loss_fn, batches)
    names = params or [k for k, _ in net.named_parameters()]
    tr_h, tr_g = block_traces(net, names, H), block_traces(net, names, G)
    assert abs(tr_h - tr_g) > 1e-3 * abs(tr_h)  # the activation term matters
    r = hessian_trace(net, loss_fn, batches, params=params, method="exact")
    assert "certified from its modules" in r.why and r.n_backward == 0  # the closed form ran
    assert r.value == pytest.approx(tr_h, rel=1e-10)
    assert r.exact_part == pytest.approx(tr_g, rel=1e-10)
    g = ggn_trace(make_loss(net, loss_fn, batches, params=params))
    assert g.settings["backend"] == "mlp" and set(g.per_param) == set(names)
    at = 0
    for k, p in net.named_parameters():  # the split over tensors is each diagonal block's trace of G
        if k in names:
            block = float(np.trace(G[at : at + p.numel(), at : at + p.numel()]))
            assert g.per_param[k] == pytest.approx(block, rel=1e-9, abs=1e-13), k
        at += p.numel()
    # the hooked backward passes (same function, not a plain Sequential) agree
    w = hessian_trace(Wrapped(net), loss_fn, batches, method="exact",
                      params=None if params is None else [f"net.{k}" for k in params])  # fmt: skip
    assert "certified from its modules" not in w.why and w.n_backward > 0
    assert w.value == pytest.approx(tr_h, rel=1e-10)


@pytest.mark.parametrize("make", [relu_mlp, deep_chain])
@pytest.mark.parametrize("params", [None, ["4.weight"]])
def test_certificate_from_modules_agrees_with_recording(make, params) -> None:
    net = make()
    params = params if make is deep_chain else None
    batches = chain_data() if make is deep_chain else data_for("relu_mlp")
    fl = make_loss(net, F.cross_entropy, batches, params=params)
    for smooth in (False, True):
        a, b = piecewise_linear(fl, smooth), piecewise_linear(fl, smooth, record=True)
        assert (a.exact, a.sites, a.units) == (b.exact, b.sites, b.units), (a.reason, b.reason)
        if a.exact:
            assert "certified from its modules" in a.reason and "certified from its modules" not in b.reason
        else:  # refused naming the same first smooth operation
            assert a.reason == b.reason
    if make is deep_chain:  # smooth sites: refused as Tr H = Tr G, certified with the activation term
        assert not piecewise_linear(fl).exact and piecewise_linear(fl, True).units > 0


class Doubled(nn.Sequential):
    """A Sequential subclass whose forward squares the output: not the chain its modules describe."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = super().forward(x)
        return h * h


def test_only_a_plain_chain_is_certified_from_its_modules() -> None:
    batches = data_for("relu_mlp")
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    hooked = relu_mlp()
    hooked[1].register_forward_hook(lambda m, i, o: o * i[0])  # relu(z) * z: quadratic in the weights
    cases = {
        "hook": hooked,
        "subclass": Doubled(*relu_mlp()),
        "shared weights": nn.Sequential(nn.Linear(5, 4), nn.ReLU(), lin, nn.ReLU(), lin).to(DT).eval(),
        "tanh-approximate gelu": nn.Sequential(nn.Linear(5, 4), nn.GELU("tanh"), nn.Linear(4, 4)).to(DT),
    }
    for why, net in cases.items():
        assert chain_of(net) is None, why
        cert = piecewise_linear(make_loss(net, F.cross_entropy, batches), smooth=True)
        assert not cert.exact and "certified from its modules" not in cert.reason, why
    # negative control: the same criterion accepts the plain chain (so the refusals above are not vacuous)
    plain = piecewise_linear(make_loss(relu_mlp(), F.cross_entropy, batches))
    assert plain.exact and "certified from its modules" in plain.reason


def test_swapping_an_activation_is_seen_at_the_next_call() -> None:
    """Nothing is kept between calls: a ReLU replaced by a Tanh in the same Sequential object changes
    the method (exact-ggn -> exact) and the value follows the dense Hessian."""
    net, batches = relu_mlp(), data_for("relu_mlp")
    for act, method in ((nn.ReLU(), "exact-ggn"), (nn.Tanh(), "exact"), (nn.ReLU(), "exact-ggn")):
        net[1] = act
        H, _ = dense(net, F.cross_entropy, batches)
        r = hessian_trace(net, F.cross_entropy, batches)
        assert r.method == method
        assert r.value == pytest.approx(float(np.trace(H)), rel=1e-10)


def test_linear_on_sequences_takes_the_layer_path() -> None:
    """A Linear applied per position (inputs (n, 3, 5)) is outside the closed form: ggn_trace falls back
    to the per-layer closed forms, and the value still matches the dense trace."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Flatten(), nn.Linear(18, 4)).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 5, generator=g, dtype=DT), torch.randint(0, 4, (6,), generator=g))]
    H, G = dense(net, F.cross_entropy, batches)
    fl = make_loss(net, F.cross_entropy, batches)
    assert ggn_trace(fl).settings["backend"] == "layers"
    with pytest.raises(SharpnessInputError, match="backend='mlp' needs"):
        ggn_trace(fl, backend="mlp")
    r = hessian_trace(net, F.cross_entropy, batches, method="exact")
    assert r.value == pytest.approx(float(np.trace(H)), rel=1e-10)
    assert r.exact_part == pytest.approx(float(np.trace(G)), rel=1e-10)
