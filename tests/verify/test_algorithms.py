"""Step functions against hand-computed updates (float64, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sharpness.data import load_dataset
from sharpness.functional import flatten
from verify import algorithms as A
from verify.algorithms import AlgoConfig, State, lr_at
from verify.models import mlp
from verify.problems import ClosedFormProblem, ModelProblem
from verify.stacked import local_grads
from verify.topology import mixer, mixing_matrix

M, B = 4, 8


@pytest.fixture(scope="module")
def problem() -> ModelProblem:
    torch.manual_seed(0)
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    return ModelProblem(mlp(64, (12,), 10, "tanh"), train, test, m=M, local_batch=B, seed=3)


def spread_state(problem: ModelProblem, scale: float = 0.05, seed: int = 1) -> State:
    W, bufs = problem.init_stacked()
    g = torch.Generator().manual_seed(seed)
    return State(W + scale * torch.randn(W.shape, generator=g, dtype=W.dtype), bufs, None, 0)


def grads_at(problem, t, execution="loop"):
    base = local_grads(problem, execution)
    batches = problem.batches(t)
    return lambda W, bufs: base(W, bufs, batches)


def test_dsgd_step_equals_explicit_module_loop(problem):
    state = spread_state(problem)
    P = mixing_matrix("ring", M)
    lr = 0.3
    new, _ = A.dsgd(state, grads_at(problem, 0, "vmap"), mixer(P, "dense"), lr, AlgoConfig())
    # by hand: m separate nn.Modules, per-tensor mixing of the pre-step weights, gradient at the un-mixed w_j
    mods = []
    for j in range(M):
        mod = copy.deepcopy(problem.model)
        with torch.no_grad():
            for (name, p), v in zip(
                mod.named_parameters(), problem.unflatten(state.W[j]).values(), strict=True
            ):
                p.copy_(v)
        mods.append(mod)
    expected = []
    for j in range(M):
        x, y = problem.batch(j, 0)
        mods[j].zero_grad()
        F.cross_entropy(mods[j](x), y).backward()
        rows = {}
        for name, p in mods[j].named_parameters():
            mixed = sum(P[j, k] * dict(mods[k].named_parameters())[name].detach() for k in range(M))
            rows[name] = mixed - lr * p.grad
        expected.append(flatten(rows))
    assert torch.allclose(new.W, torch.stack(expected), rtol=0, atol=1e-12)
    assert (new.W - torch.stack(expected)).abs().max() < 1e-12


@pytest.mark.parametrize("topo", ["ring", "exponential"])
def test_exact_averaging_identity(problem, topo):
    state = spread_state(problem, seed=7)
    lr = 0.2
    grads = grads_at(problem, 5)
    G, _, _ = grads(state.W, state.buffers)
    for method in ("dense", "roll", "sparse"):
        new, _ = A.dsgd(state, grads, mixer(mixing_matrix(topo, M), method), lr, AlgoConfig())
        err = (new.W.mean(0) - state.W.mean(0) + lr * G.mean(0)).abs().max()
        assert err < 1e-12, (method, float(err))


def test_averaging_identity_fails_for_row_only_stochastic_p(problem):
    """Control: the identity needs column sums of 1; a row-stochastic P breaks it (mixer takes P as given)."""
    state = spread_state(problem, scale=0.5, seed=7)
    P = torch.full((M, M), 0.0, dtype=torch.float64)
    P[:, 0] = 1.0  # every row sums to 1, column 0 sums to m
    new, _ = A.dsgd(state, grads_at(problem, 5), mixer(P, "dense"), 0.2, AlgoConfig())
    G, _, _ = grads_at(problem, 5)(state.W, state.buffers)
    err = (new.W.mean(0) - state.W.mean(0) + 0.2 * G.mean(0)).abs().max()
    assert err > 1e-3


def test_csgd_equals_minibatch_sgd_on_union(problem):
    W, bufs = problem.init_stacked()
    state = State(W, bufs, None, 0)
    ref = copy.deepcopy(problem.model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.25)
    for t in range(3):
        state, _ = A.csgd(state, grads_at(problem, t, "vmap"), lambda X: X, 0.25, AlgoConfig())
        x, y = problem.batches(t)
        opt.zero_grad()
        F.cross_entropy(ref(x.reshape(-1, *x.shape[2:])), y.reshape(-1)).backward()
        opt.step()
    w_ref = flatten({k: v.detach() for k, v in ref.named_parameters()})
    assert (state.W - w_ref).abs().max() < 1e-12
    assert torch.equal(state.W, state.W[:1].expand_as(state.W))  # one model: Xi = 0 exactly


def test_dsgd_momentum_and_weight_decay_match_torch_sgd_per_worker(problem):
    """With P = I, D-SGD is m independent torch.optim.SGD runs (momentum, weight decay, local buffers)."""
    state = spread_state(problem)
    cfg = AlgoConfig(momentum=0.9, weight_decay=1e-3)
    refs = []
    for j in range(M):
        mod = copy.deepcopy(problem.model)
        with torch.no_grad():
            for p, v in zip(mod.parameters(), problem.unflatten(state.W[j]).values(), strict=True):
                p.copy_(v)
        refs.append((mod, torch.optim.SGD(mod.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)))
    for t in range(3):
        state, _ = A.dsgd(state, grads_at(problem, t), lambda X: X, 0.1, cfg)
        for j, (mod, opt) in enumerate(refs):
            x, y = problem.batch(j, t)
            opt.zero_grad()
            F.cross_entropy(mod(x), y).backward()
            opt.step()
    for j, (mod, _) in enumerate(refs):
        assert (state.W[j] - flatten(dict(mod.named_parameters())).detach()).abs().max() < 1e-12


def quad_problem(m=M, d=5, noise=0.3):
    h = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    L = lambda w: 0.5 * (h * w * w).sum(-1) + 0.1 * torch.sin(w).sum(-1)
    w0 = torch.linspace(-1, 1, d, dtype=torch.float64)
    return ClosedFormProblem(L, w0, m=m, local_batch=2, noise_std=noise, seed=5, init_spread=0.2), h


def grad_L(h, w):
    return h * w + 0.1 * torch.cos(w)


def test_sam_step_by_hand():
    prob, h = quad_problem()
    W, _ = prob.init_stacked()
    W = W.mean(0, keepdim=True).expand_as(W).clone()
    state = State(W, {}, None, 0)
    new, _ = A.sam(state, grads_at(prob, 0), lambda X: X, 0.1, AlgoConfig(rho=0.05))
    (xi,) = prob.batches(0)
    w = W[0]
    g = grad_L(h, w) + xi
    e = 0.05 * g / g.norm(dim=1, keepdim=True)
    g2 = grad_L(h, w + e) + xi
    assert (new.W - (w - 0.1 * g2.mean(0))).abs().max() < 1e-14


def test_avgsam_with_recorded_deviations_by_hand():
    prob, h = quad_problem()
    W, _ = prob.init_stacked()
    D = W - W.mean(0)
    state = State(W.mean(0, keepdim=True).expand_as(W).clone(), {}, None, 0)
    cfg = AlgoConfig(perturbation=lambda t: D)
    new, _ = A.avgsam(state, grads_at(prob, 0), lambda X: X, 0.1, cfg)
    (xi,) = prob.batches(0)
    expected = W.mean(0) - 0.1 * (grad_L(h, W) + xi).mean(0)  # gradients at w_a + d_j = w_j
    assert (new.W - expected).abs().max() < 1e-14
    # Gaussian eps is a function of (seed, t) alone: two calls agree, another seed differs
    e1 = A.avgsam_perturbation(3, M, 5, 0.1, 0, W)
    assert torch.equal(e1, A.avgsam_perturbation(3, M, 5, 0.1, 0, W))
    assert not torch.equal(e1, A.avgsam_perturbation(3, M, 5, 0.1, 1, W))


def test_local_sgd_averages_every_h_steps():
    prob, _ = quad_problem()
    W, _ = prob.init_stacked()
    state = State(W, {}, None, 0)
    cfg = AlgoConfig(local_steps=3)
    spreads = []
    for t in range(6):
        state, _ = A.local_sgd(state, grads_at(prob, t), lambda X: X, 0.1, cfg)
        D = state.W - state.W.mean(0)
        spreads.append(float((D * D).sum()))
    assert spreads[2] == 0.0 and spreads[5] == 0.0
    assert min(spreads[0], spreads[1], spreads[3], spreads[4]) > 0


def official_schedule(steps, warmup, milestones, gamma=0.1):
    """The official Warmup_MultiStepLR, transcribed literally (stateful milestone rate)."""
    rate, out = 1.0, []
    for step in range(steps):
        if step < warmup:
            r = float(step) / float(max(1, warmup))
            out.append(0.1 if r <= 0.1 else r)
        else:
            if step in milestones:
                rate *= gamma
            out.append(rate)
    return out


@pytest.mark.parametrize("warmup,milestones", [(60, [2400, 4800]), (0, [10, 20]), (15, [10, 30])])
def test_lr_schedule_matches_official(warmup, milestones):
    ref = official_schedule(5000, warmup, milestones)
    ours = [lr_at(t, 1.0, warmup, milestones) for t in range(5000)]
    assert max(abs(a - b) for a, b in zip(ours, ref, strict=True)) < 1e-15


def test_unknown_algorithm_refused():
    with pytest.raises(A.AlgorithmError, match="unknown algorithm"):
        A.get("gossip-sgd")
