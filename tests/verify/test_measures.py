"""Measurements against exact answers: dense Hessians (torch.func.hessian), hand gradients and ECE."""

from __future__ import annotations

import math

import pytest
import torch

from sharpness.data import load_dataset
from sharpness.functional import flatten
from verify import measures
from verify.models import mlp
from verify.problems import ClosedFormProblem, ModelProblem


@pytest.fixture(scope="module")
def tiny() -> ModelProblem:
    torch.manual_seed(0)
    train = load_dataset("digits", split="train", samples=40, seed=1)
    test = load_dataset("digits", split="test", samples=30, seed=1)
    return ModelProblem(mlp(64, (3,), 10, "tanh"), train, test, m=4, local_batch=5, seed=0)


def spread(problem, m=4, scale=0.1, seed=0):
    W, _ = problem.init_stacked()
    g = torch.Generator().manual_seed(seed)
    return W + scale * torch.randn(W.shape, generator=g, dtype=W.dtype)


def test_consensus_distance_and_rank():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 9, generator=g, dtype=torch.float64)
    D = measures.deviations(W)
    expected = sum(float((W[j] - W.mean(0)).norm() ** 2) for j in range(6)) / 6
    assert abs(measures.consensus_distance(W) - expected) < 1e-13
    assert abs(measures.consensus_distance_sqrt(W) - math.sqrt(expected)) < 1e-13
    Xi = D.T @ D / 6  # formed here only to check the identities on a tiny case
    assert abs(float(torch.trace(Xi)) - expected) < 1e-13
    assert int(torch.linalg.matrix_rank(Xi)) == 5  # rank <= m - 1
    assert measures.consensus_distance(W[:1].expand(6, -1)) == 0.0


def test_trace_h_xi_equals_dense_hessian(tiny):
    W = spread(tiny)
    w_a, D = W.mean(0), measures.deviations(W)
    fl = tiny.functional(w_a)
    H = torch.func.hessian(lambda v: fl.loss(tiny.unflatten(v)))(w_a)
    dense = float(torch.trace(H @ (D.T @ D / W.shape[0])))
    ours = measures.trace_h_xi(tiny, w_a, D)
    assert abs(ours - dense) < 1e-10 * max(1.0, abs(dense)), (ours, dense)
    assert abs(dense) > 1e-6
    # the full training loss: the same value as the sum over all training points in one batch
    x, y = tiny.x, tiny.y
    loss = lambda v: torch.nn.functional.cross_entropy(
        torch.func.functional_call(tiny.model, tiny.unflatten(v), (x,)), y
    )
    H1 = torch.func.hessian(loss)(w_a)
    assert (H1 - H).abs().max() < 1e-12


def test_drift_by_hand_and_zero_for_quadratic(tiny):
    W = spread(tiny)
    grads = []
    for w in [*W, W.mean(0)]:
        v = w.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(
            torch.func.functional_call(tiny.model, tiny.unflatten(v), (tiny.x,)), tiny.y
        )
        grads.append(torch.autograd.grad(loss, v)[0])
    expected = float((torch.stack(grads[:-1]).mean(0) - grads[-1]).norm())
    assert abs(measures.drift(tiny, W) - expected) < 1e-13
    assert expected > 1e-6
    h = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    quad = ClosedFormProblem(lambda w: 0.5 * (h * w * w).sum(), torch.ones(3), m=5, init_spread=0.3)
    Wq, _ = quad.init_stacked()
    assert measures.consensus_distance(Wq) > 0.01
    assert measures.drift(quad, Wq) < 1e-14  # quadratic: the gradient diversity vanishes identically


def test_ece_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 1])
    # confidences 0.9 (right), 0.6 (wrong), 0.7 (right), 0.55 (right); 15 bins of width 1/15
    bins = {}
    for c, ok in [(0.9, 1.0), (0.6, 0.0), (0.7, 1.0), (0.55, 1.0)]:
        bins.setdefault(math.ceil(c * 15) - 1, []).append((c, ok))
    expected = sum(
        len(v) / 4 * abs(sum(o for _, o in v) / len(v) - sum(c for c, _ in v) / len(v)) for v in bins.values()
    )
    assert abs(measures.ece(probs, y, 15) - expected) < 1e-15
    assert abs(measures.ece(probs, y, 1) - abs(0.75 - (0.9 + 0.6 + 0.7 + 0.55) / 4)) < 1e-15


def test_ensemble_metrics(tiny):
    W, bufs = tiny.init_stacked()
    same = measures.ensemble_metrics(tiny, W, bufs)
    assert same["ensemble_acc"] == same["avg_acc"]
    assert abs(same["ensemble_nll"] - same["avg_nll"]) < 1e-12
    W2 = spread(tiny, scale=0.5)
    m = measures.ensemble_metrics(tiny, W2, bufs)
    z = torch.stack([tiny.logits(w)[0] for w in W2]).softmax(-1).mean(0)
    y = tiny.test[1]
    assert abs(m["ensemble_acc"] - float((z.argmax(1) == y).double().mean())) < 1e-15
    assert abs(m["ensemble_nll"] - float(-z[torch.arange(len(y)), y].log().mean())) < 1e-12
    assert abs(m["avg_nll"] - tiny.evaluate(W2.mean(0))["test_loss"]) < 1e-12


def test_sharpness_at_matches_dense(tiny):
    w = flatten(tiny.params)
    fl = tiny.functional(w)
    H = torch.func.hessian(lambda v: fl.loss(tiny.unflatten(v)))(w)
    out = measures.sharpness_at(tiny, w, probes=2000)
    lam = float(torch.linalg.eigvalsh(H)[-1])
    assert abs(out["lambda_max"] - lam) < 1e-4 * abs(lam)
    assert abs(out["trace_h"] - float(torch.trace(H))) < 0.2 * abs(float(torch.trace(H)))


def test_sharpness_at_is_exact_on_a_relu_net():
    """Problem.functional carries its network, so the logged Tr H of a ReLU MLP is the exact Tr G = Tr H."""
    torch.manual_seed(0)
    train = load_dataset("digits", split="train", samples=40, seed=1)
    relu = ModelProblem(mlp(64, (3,), 10, "relu"), train, None, m=4, local_batch=5, seed=0)
    w = flatten(relu.params)
    fl = relu.functional(w)
    H = torch.func.hessian(lambda v: fl.loss(relu.unflatten(v)))(w)
    out = measures.sharpness_at(relu, w, lmax=False, probes=10)
    assert abs(out["trace_h"] - float(torch.trace(H))) < 1e-5 * abs(float(torch.trace(H)))
