"""HessianOperator against torch.func.hessian of the flat loss (float64), backends, batches, views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import bn_cnn, mlp
from torch import nn
from torch.func import functional_call, hessian

from sharpness.functional import SharpnessInputError, make_loss
from sharpness.hvp import HessianOperator

DT = torch.float64


def cls_data(n: int = 20, seed: int = 1, image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 6, 6) if image else (n, 4)
    return torch.randn(*shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def reference_hessian(net: nn.Module, x: torch.Tensor, y: torch.Tensor, names=None) -> torch.Tensor:
    """torch.func.hessian of the flat loss, built without sharpness (eval mode, buffers as they are)."""
    names = names or [n for n, _ in net.named_parameters()]
    named = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    fixed = {n: t.detach() for n, t in named.items() if n not in names}
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]

    def f(theta: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, sizes)
        p = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return F.cross_entropy(functional_call(net, {**fixed, **p}, (x,)), y)

    theta0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    was = net.training
    net.eval()
    try:
        return hessian(f)(theta0)
    finally:
        net.train(was)


@pytest.mark.parametrize("backend", ["func", "autograd"])
@pytest.mark.parametrize("kind", ["mlp", "bn_cnn"])
def test_dense_equals_torch_func_hessian(kind, backend):
    net = mlp() if kind == "mlp" else bn_cnn()
    x, y = cls_data(image=kind == "bn_cnn")
    H_ref = reference_hessian(net, x, y)
    op = HessianOperator(net, F.cross_entropy, (x, y), backend=backend, chunk=4)
    H = op.dense()
    assert H.shape == H_ref.shape == (op.num_params, op.num_params)
    assert float((H - H_ref).abs().max()) < 1e-10
    assert float(H_ref.abs().max()) > 1e-2  # not trivially zero
    assert op.hvp_count == op.num_params


def test_backends_agree_on_random_block():
    net = bn_cnn()
    data = cls_data(image=True)
    V = torch.randn(sum(p.numel() for p in net.parameters()), 5, dtype=DT)
    a = HessianOperator(net, F.cross_entropy, data, backend="func", chunk=3).matmat(V)
    b = HessianOperator(net, F.cross_entropy, data, backend="autograd", chunk=2).matmat(V)
    assert float((a - b).abs().max()) < 1e-11


def test_multibatch_hessian_is_sample_weighted_mean():
    net = mlp()
    x, y = cls_data(n=23)
    batches = [(x[:4], y[:4]), (x[4:15], y[4:15]), (x[15:], y[15:])]
    H_multi = HessianOperator(net, F.cross_entropy, batches).dense()
    H_one = reference_hessian(net, x, y)
    assert float((H_multi - H_one).abs().max()) < 1e-10
    # the plain mean of per-batch Hessians differs (unequal batch sizes): the check can fail
    H_plain = sum(reference_hessian(net, xb, yb) for xb, yb in batches) / 3
    assert float((H_plain - H_one).abs().max()) > 1e-4


def test_params_prefix_gives_sub_block():
    net = bn_cnn()
    data = cls_data(image=True)
    names = [n for n, _ in net.named_parameters()]
    H_full = reference_hessian(net, *data)
    op = HessianOperator(net, F.cross_entropy, data, params="4")
    assert list(op.fl.params) == ["4.weight", "4.bias"]
    start = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("4."))
    assert names[-2:] == ["4.weight", "4.bias"]
    block = H_full[start:, start:]
    assert float((op.dense() - block).abs().max()) < 1e-10
    # the conv layer alone, in the middle of the vector
    op0 = HessianOperator(net, F.cross_entropy, data, params="0")
    k = op0.num_params
    assert float((op0.dense() - H_full[:k, :k]).abs().max()) < 1e-10


def test_train_mode_hessian_differs_for_bn():
    net = bn_cnn()
    data = cls_data(image=True)
    V = torch.randn(sum(p.numel() for p in net.parameters()), 3, dtype=DT)
    he = HessianOperator(net, F.cross_entropy, data).matmat(V)
    ht = HessianOperator(net, F.cross_entropy, data, train_mode=True).matmat(V)
    assert float((he - ht).abs().max()) > 1e-4


def test_matmat_equals_loop_of_matvec_and_scipy_view():
    op = HessianOperator(bn_cnn(), F.cross_entropy, cls_data(image=True), chunk=3)
    V = torch.randn(op.num_params, 7, dtype=DT)
    block = op.matmat(V)
    loop = torch.stack([op.matvec(V[:, i]) for i in range(7)], 1)
    assert float((block - loop).abs().max()) < 1e-12
    A = op.to_scipy()
    assert A.shape == (op.num_params, op.num_params)
    np.testing.assert_allclose(A.matvec(V[:, 0].numpy()), loop[:, 0].numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(A.matmat(V[:, :3].numpy()), loop[:, :3].numpy(), rtol=0, atol=1e-12)
    assert torch.equal(op @ V[:, 0], op.matvec(V[:, 0]))


def test_gradient_matches_autograd():
    net = mlp()
    x, y = cls_data()
    op = HessianOperator(net, F.cross_entropy, [(x[:7], y[:7]), (x[7:], y[7:])])
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    g_ref = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    net.zero_grad()
    assert float((op.gradient() - g_ref).abs().max()) < 1e-13


def test_operator_from_functional_loss_and_bad_block():
    net = mlp()
    fl = make_loss(net, F.cross_entropy, cls_data())
    op = HessianOperator(fl)
    assert op.num_params == fl.num_params
    with pytest.raises(SharpnessInputError, match="block"):
        op.matmat(torch.zeros(op.num_params + 1, 2, dtype=DT))
    with pytest.raises(SharpnessInputError, match="backend"):
        HessianOperator(fl, backend="nope")
