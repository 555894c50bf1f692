"""make_loss: exact losses, parameter selection, BN modes, no side effects, one-line input errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import bn_cnn, mlp
from torch import nn
from torch.func import functional_call

from sharpness.functional import FunctionalLoss, SharpnessInputError, flatten, make_loss, unflatten
from sharpness.hvp import HessianOperator

DT = torch.float64


def cls_data(n: int = 20, seed: int = 1, image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 6, 6) if image else (n, 4)
    return torch.randn(*shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool]]:
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    return state, [m.training for m in model.modules()]


def assert_unchanged(model: nn.Module, snap: tuple[dict[str, torch.Tensor], list[bool]]) -> None:
    state, flags = snap
    now = model.state_dict(keep_vars=True)
    assert set(now) == set(state)
    for k, v in state.items():
        assert torch.equal(now[k].detach(), v), f"{k} changed"
    assert [m.training for m in model.modules()] == flags


def test_loss_equals_direct_evaluation():
    net = mlp()
    x, y = cls_data()
    fl = make_loss(net, F.cross_entropy, (x, y))
    with torch.no_grad():
        direct = F.cross_entropy(net(x), y)
    assert isinstance(fl, FunctionalLoss)
    assert float(fl.loss(fl.params)) == pytest.approx(float(direct), rel=1e-14, abs=0)
    assert fl.num_params == sum(p.numel() for p in net.parameters())


def test_multibatch_is_exact_sample_weighted_mean():
    net = mlp()
    x, y = cls_data(n=23)
    batches = [(x[:5], y[:5]), (x[5:16], y[5:16]), (x[16:], y[16:])]  # unequal sizes
    fl_multi = make_loss(net, F.cross_entropy, batches)
    fl_one = make_loss(net, F.cross_entropy, (x, y))
    a, b = float(fl_multi.loss(fl_multi.params)), float(fl_one.loss(fl_one.params))
    assert abs(a - b) < 1e-14
    # an unweighted mean of batch means would differ: the test can fail
    with torch.no_grad():
        unweighted = sum(float(F.cross_entropy(net(xb), yb)) for xb, yb in batches) / 3
    assert abs(unweighted - b) > 1e-6


def test_params_prefix_selects_one_layer():
    net = mlp()
    fl = make_loss(net, F.cross_entropy, cls_data(), params="2")
    assert list(fl.params) == ["2.weight", "2.bias"]
    fl_w = make_loss(net, F.cross_entropy, cls_data(), params=["0.weight"])
    assert list(fl_w.params) == ["0.weight"]
    with pytest.raises(SharpnessInputError, match="matches no parameter"):
        make_loss(net, F.cross_entropy, cls_data(), params="nope")


def test_flatten_unflatten_round_trip():
    fl = make_loss(bn_cnn(), F.cross_entropy, cls_data(image=True))
    vec = fl.flat_params()
    back = fl.unflatten(vec)
    assert list(back) == list(fl.params)
    assert torch.equal(flatten(back), vec)
    batched = unflatten(torch.stack([vec, 2 * vec]), fl.params)
    assert torch.equal(batched["0.weight"][1], 2 * fl.params["0.weight"])


def test_bn_train_mode_differs_from_eval_and_is_recorded():
    net = bn_cnn()
    data = cls_data(image=True)
    fl_eval = make_loss(net, F.cross_entropy, data)
    fl_train = make_loss(net, F.cross_entropy, data, train_mode=True)
    le, lt = float(fl_eval.loss(fl_eval.params)), float(fl_train.loss(fl_train.params))
    assert abs(le - lt) > 1e-4
    with torch.no_grad():
        assert le == pytest.approx(float(F.cross_entropy(net(data[0]), data[1])), rel=1e-13)
    assert HessianOperator(net, F.cross_entropy, data, train_mode=True).train_mode is True
    assert HessianOperator(net, F.cross_entropy, data).train_mode is False


@pytest.mark.parametrize("train_mode", [False, True])
def test_measurement_never_changes_model(train_mode):
    net = bn_cnn()
    net.train()
    net[1].eval()  # a mixed pattern of flags must be restored exactly
    snap = snapshot(net)
    data = [cls_data(n=8, image=True), cls_data(n=6, seed=2, image=True)]
    fl = make_loss(net, F.cross_entropy, data, train_mode=train_mode)
    fl.loss(fl.params)
    op = HessianOperator(fl)
    op.matvec(torch.randn(op.num_params, dtype=DT))
    op.gradient()
    assert_unchanged(net, snap)


def test_functional_call_in_train_mode_would_mutate_buffers():
    """Negative control for the test above: a plain train-mode forward does change the running stats."""
    net = bn_cnn()
    snap = snapshot(net)
    net.train()
    state = {k: v for k, v in net.state_dict().items()}
    with torch.no_grad():
        functional_call(net, state, (cls_data(image=True)[0],))
    net.eval()
    with pytest.raises(AssertionError):
        assert_unchanged(net, snap)


# ----------------------------------------------------------------------------- bad input
def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def test_targets_of_wrong_shape():
    net = mlp()
    x, _ = cls_data()
    with pytest.raises(SharpnessInputError) as e:
        make_loss(net, F.cross_entropy, (x, torch.zeros(20, 2, dtype=DT)))
    one_line(e)
    with pytest.raises(SharpnessInputError, match="rows") as e:
        make_loss(net, F.cross_entropy, (x, torch.zeros(19, dtype=torch.long)))
    one_line(e)


def test_non_scalar_loss():
    net = mlp()
    with pytest.raises(SharpnessInputError, match="scalar") as e:
        make_loss(net, lambda o, t: F.cross_entropy(o, t, reduction="none"), cls_data())
    one_line(e)


def test_nan_loss():
    net = mlp()
    x, y = cls_data()
    x[3, 1] = math.nan
    with pytest.raises(SharpnessInputError, match="NaN") as e:
        make_loss(net, F.cross_entropy, (x, y))
    one_line(e)


def test_empty_data():
    net = mlp()
    with pytest.raises(SharpnessInputError, match="empty") as e:
        make_loss(net, F.cross_entropy, [])
    one_line(e)
    x, y = cls_data()
    with pytest.raises(SharpnessInputError, match="empty") as e:
        make_loss(net, F.cross_entropy, (x[:0], y[:0]))
    one_line(e)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_cuda():
    with pytest.raises(SharpnessInputError, match="CUDA") as e:
        make_loss(mlp(), F.cross_entropy, cls_data(), device="cuda")
    one_line(e)
    with pytest.raises(SharpnessInputError, match="CUDA"):
        HessianOperator(mlp(), F.cross_entropy, cls_data(), device="cuda")
