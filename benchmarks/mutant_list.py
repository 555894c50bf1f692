"""The project's own set of plausible single-point bugs (mutants) in the engine, the measurements and the
sharpness core, for ``benchmarks/mutants.py``.

Each :class:`Mutant` names one file (relative to the repository root), an exact target text that must occur
exactly ONCE in today's code, its replacement, and a one-line description of the bug a developer could
plausibly write. The applier refuses (one line naming the mutant, non-zero exit) a target that is missing or
ambiguous, so this list cannot silently rot as the code changes: update the target with the code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    """One single-point bug: replace ``target`` (exactly one occurrence) in ``file`` by ``replacement``."""

    id: str
    file: str
    target: str
    replacement: str
    description: str


#: the first lines of ``dsgd`` (AWC), where the local gradients are taken
DSGD_GRADS = (
    "    G, losses, buffers = grads(state.W, state.buffers)\n"
    "    V, mom = _direction(state, G, state.W, cfg)\n"
    "    return State(mix(state.W) - lr * V"
)

MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------------------------ engine: algorithms
    Mutant(
        "atc-for-awc",
        "verify/algorithms.py",
        "return State(mix(state.W) - lr * V, buffers, mom, state.step + 1), losses",
        "return State(mix(state.W - lr * V), buffers, mom, state.step + 1), losses",
        "dsgd runs ATC W <- P (W - lr V) instead of the paper's AWC W <- P W - lr V",
    ),
    Mutant(
        "grad-at-mixed",
        "verify/algorithms.py",
        DSGD_GRADS,
        DSGD_GRADS.replace("grads(state.W,", "grads(mix(state.W),"),
        "dsgd takes the local gradients at the mixed P W instead of the un-mixed w_j",
    ),
    Mutant(
        "grad-at-average",
        "verify/algorithms.py",
        DSGD_GRADS,
        DSGD_GRADS.replace("grads(state.W,", "grads(state.W.mean(0, keepdim=True).expand_as(state.W),"),
        "dsgd takes every worker's gradient at the average model w_a instead of at w_j",
    ),
    Mutant(
        "csgd-one-worker",
        "verify/algorithms.py",
        "    G, losses, buffers = grads(state.W, state.buffers)\n    return _centralised(state, G.mean(0),",
        "    G, losses, buffers = grads(state.W, state.buffers)\n    return _centralised(state, G[0],",
        "csgd steps with worker 0's gradient instead of the mean of the m local gradients",
    ),
    Mutant(
        "momentum-dampening",
        "verify/algorithms.py",
        "V = U if state.momentum is None else cfg.momentum * state.momentum + U",
        "V = U if state.momentum is None else cfg.momentum * state.momentum + (1 - cfg.momentum) * U",
        "momentum buffer with dampening (1 - mu) u, not the paper's (PyTorch default) v <- mu v + u",
    ),
    Mutant(
        "weight-decay-sign",
        "verify/algorithms.py",
        "U = G + cfg.weight_decay * W_at if cfg.weight_decay else G",
        "U = G - cfg.weight_decay * W_at if cfg.weight_decay else G",
        "weight decay with the wrong sign: u = g - wd w",
    ),
    Mutant(
        "warmup-off-by-one",
        "verify/algorithms.py",
        "return lr * max(0.1, t / warmup)",
        "return lr * max(0.1, (t + 1) / warmup)",
        "warm-up ramp one step ahead: lr (t + 1) / warmup instead of the official lr t / warmup",
    ),
    Mutant(
        "milestone-off-by-one",
        "verify/algorithms.py",
        "sum(1 for s in milestones if t >= s and s >= warmup)",
        "sum(1 for s in milestones if t > s and s >= warmup)",
        "learning-rate decay applied one step after each milestone (t > s instead of t >= s)",
    ),
    Mutant(
        "sam-no-normalise",
        "verify/algorithms.py",
        "cfg.rho * G / norms.clamp_min(torch.finfo(G.dtype).tiny)",
        "cfg.rho * G",
        "engine SAM ascent step rho g instead of rho g / ||g||",
    ),
    Mutant(
        "avgsam-variance-for-std",
        "verify/algorithms.py",
        "return (sigma * z).to(like)",
        "return (sigma**2 * z).to(like)",
        "engine avg-SAM draws eps = sigma^2 z (variance used as standard deviation)",
    ),
    # ------------------------------------------------------------------ engine: batch stream, noise
    Mutant(
        "batch-overlap",
        "verify/problems.py",
        "return cached[1][pos * self.local_batch : (pos + 1) * self.local_batch]",
        "return cached[1][pos : pos + self.local_batch]",
        "batch stream slices [pos, pos + b) instead of [pos b, (pos + 1) b): successive batches overlap",
    ),
    Mutant(
        "noise-var-over-b",
        "verify/closed_form.py",
        "self.scale = std / math.sqrt(self.local_batch)",
        "self.scale = std / self.local_batch",
        "closed-form gradient noise std divided by b instead of sqrt(b) (variance 1/b^2)",
    ),
    Mutant(
        "loop-grads-worker0-batch",
        "verify/stacked.py",
        "row(new_bufs, j), tuple(b[j] for b in batches))",
        "row(new_bufs, j), tuple(b[0] for b in batches))",
        "loop execution gives every worker worker 0's batch (same batch for all workers)",
    ),
    # ------------------------------------------------------------------ engine: gossip and topology
    Mutant(
        "mix-transpose",
        "verify/mixers.py",
        "            cache[key] = P.to(dtype=W.dtype, device=W.device)\n        return",
        "            cache[key] = P.T.to(dtype=W.dtype, device=W.device)\n        return",
        "dense gossip multiplies by P^T instead of P (differs on directed graphs such as exponential)",
    ),
    Mutant(
        "validate-rows-twice",
        "verify/topology.py",
        "rows, cols = T.sum(1), T.sum(0)",
        "rows, cols = T.sum(1), T.sum(1)",
        "validate checks the row sums twice, never the column sums",
    ),
    Mutant(
        "s-p-no-projection",
        "verify/topology.py",
        "X = scipy.linalg.solve_discrete_lyapunov(A, np.eye(m) - 1.0 / m)",
        "X = scipy.linalg.solve_discrete_lyapunov(A, np.eye(m))",
        "S_P solved with I instead of I - J as the Lyapunov source term",
    ),
    # ------------------------------------------------------------------ engine: what the run loop logs
    Mutant(
        "loop-lr-one-step-ahead",
        "verify/engine.py",
        "lr_t = lr_at(t, config.lr, config.warmup, config.milestones)",
        "lr_t = lr_at(t + 1, config.lr, config.warmup, config.milestones)",
        "the run loop applies the schedule's rate of the next step (warm-up and decays one step early)",
    ),
    Mutant(
        "log-lr-previous-step",
        "verify/transport.py",
        '"lr": lr_at(s, cfg.lr, cfg.warmup, cfg.milestones)',
        '"lr": lr_at(max(s - 1, 0), cfg.lr, cfg.warmup, cfg.milestones)',
        "metrics.csv lr column logs the rate of the previous update, not of the update from s to s + 1",
    ),
    Mutant(
        "log-eval-worker0",
        "verify/transport.py",
        "row.update(problem.evaluate(w_a, bufs, samples=cfg.eval_samples))",
        "row.update(problem.evaluate(W[0], bufs, samples=cfg.eval_samples))",
        "metrics.csv train/test loss and accuracy of worker 0 instead of the average model w_a",
    ),
    Mutant(
        "log-trace-h-xi-at-worker0",
        "verify/transport.py",
        "measures.trace_h_xi(problem, w_a, D, bufs, cfg.hess_samples)",
        "measures.trace_h_xi(problem, W[0], D, bufs, cfg.hess_samples)",
        "metrics.csv Tr(H Xi) with the Hessian at worker 0 instead of at w_a",
    ),
    # ------------------------------------------------------------------ measurements
    Mutant(
        "cd-no-1-over-m",
        "verify/measures.py",
        "return float((D * D).sum() / W.shape[0])",
        "return float((D * D).sum())",
        "consensus distance Tr Xi without the 1/m: sum_j ||w_j - w_a||^2",
    ),
    Mutant(
        "deviations-not-centred",
        "verify/measures.py",
        "return V - V.mean(0, keepdim=True)",
        "return V",
        "engine deviations measured from worker 1 (W - w_1) instead of from w_a",
    ),
    Mutant(
        "trace-h-xi-m-minus-1",
        "verify/measures.py",
        "return float((D.T.to(HD) * HD).sum() / D.shape[0])",
        "return float((D.T.to(HD) * HD).sum() / (D.shape[0] - 1))",
        "Tr(H Xi) normalised by m - 1 (sample covariance) instead of the paper's 1/m",
    ),
    Mutant(
        "xi-sampler-no-sqrt-m",
        "sharpness/xi.py",
        "return z @ D / math.sqrt(m)",
        "return z @ D",
        "Xi sampler eps = D^T z without the 1/sqrt(m): Cov(eps) = m Xi",
    ),
    Mutant(
        "xi-centre-noop",
        "sharpness/xi.py",
        "return D - D.mean(0, keepdim=True)",
        "return D",
        "sharpness.xi.centre returns the deviations unchanged (not centred on their mean)",
    ),
    # ------------------------------------------------------------------ sharpness core
    Mutant(
        "lanczos-no-reorth",
        "sharpness/krylov.py",
        "w = self._orth(w - a * q, self._Q[: j + 1])",
        "w = w - a * q",
        "Lanczos without reorthogonalisation (plain three-term recurrence)",
    ),
    Mutant(
        "lanczos-select-smallest",
        "sharpness/lanczos.py",
        'order = np.argsort(-theta if which == "LA" else theta, kind="stable")',
        'order = np.argsort(theta if which == "LA" else -theta, kind="stable")',
        "Lanczos returns the smallest Ritz values for which='LA' (sign of the sort key swapped)",
    ),
    Mutant(
        "hutchinson-stderr-no-sqrt-n",
        "sharpness/trace.py",
        "return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))",
        "return float(x.mean()), float(x.std(ddof=1))",
        "Hutchinson standard error reported as the probe standard deviation (no 1/sqrt(n))",
    ),
    Mutant(
        "rademacher-01",
        "sharpness/operators.py",
        "return (2 * z - 1).T.to(device=device, dtype=dtype).contiguous()",
        "return z.T.to(device=device, dtype=dtype).contiguous()",
        "Hutchinson probes drawn in {0, 1} instead of {-1, +1}",
    ),
    Mutant(
        "hvp-ignores-batch-weights",
        "sharpness/hvp.py",
        "hv = w * self._backward(t, g, rows, True)",
        "hv = self._backward(t, g, rows, True)",
        "HVP sums the per-batch Hessians instead of their sample-weighted mean (batch-weight dropped)",
    ),
    Mutant(
        "avg-sam-quad-no-1-over-m",
        "sharpness/sam.py",
        "half, se, trace_sigma = 0.5 * tr / D.shape[0], 0.0, xi_trace(D)",
        "half, se, trace_sigma = 0.5 * tr, 0.0, xi_trace(D)",
        "avg-SAM quadratic form 1/2 Tr(H Xi) without the 1/m",
    ),
    Mutant(
        "sam-sharpness-no-normalise",
        "sharpness/sam.py",
        "eps = g * (rho / gnorm) if gnorm > 0 else torch.zeros_like(theta)",
        "eps = g * rho if gnorm > 0 else torch.zeros_like(theta)",
        "worst-case SAM step eps = rho g instead of rho g / ||g||",
    ),
)
