"""T9: the regularisation-optimisation trade-off (paper.md s.2.3 item 1, s.3 P9, s.6 T9). Full suite only.

Claim [P]: a larger consensus distance means more sharpness regularisation and less optimisation. Prediction
(s.3 P9): larger ``Tr Xi`` (sparser P, larger eta) -> larger regulariser ``1/2 Tr(H Xi)`` -> the stationary
``w_a`` is pulled from ``argmin L`` toward ``argmin L_Xi``, ``L_Xi(w) = E_{eps ~ N(0, Xi)} L(w + eps)``, so
its loss rises.

Protocol: ``CosLoss`` (d = 20, K = 30, u scaled x2, ``A = diag U[0.05, 0.2]``) started at a local minimum
``w*`` (L-BFGS); D-SGD (AWC) on complete / exponential / grid / ring, m = 16, additive noise ``N(0, I)``,
eta in {0.02, 0.03}, through the verify engine; time averages after burn-in of ``Tr Xi``, of
``1/2 Tr(H(w_a) Xi)`` (m HVPs per snapshot, :func:`verify.measures.trace_h_xi`), of ``L(w_a)``, of ``w_a``
(``w_bar``) and of ``Xi`` (``Xi_bar``, 20 x 20). C-SGD with the SAME noise stream (common random numbers)
gives the noise-only reference ``w_bar_C``: by the exact averaged dynamics D-SGD's ``w_a`` receives the same
mean noise, so ``b_D = w_bar - w_bar_C`` isolates the effect of Xi. ``p = argmin L_Xi_bar - w*`` (closed-form
smoothed loss with deviations ``sqrt(d) Xi_bar^(1/2)``, L-BFGS from w*).

Criterion: Spearman rho(Tr Xi, 1/2 Tr(H Xi)) > 0.8 and rho(Tr Xi, Delta L) > 0.8 over the 8 runs, with
``Delta L = E L(w_a) - E L(w_C) > 0``; and in every run ``||b_D - p|| < ||b_D||`` (w_bar is closer to
``argmin L_Xi_bar`` than to ``argmin L``, noise bias removed). Negative control: the quadratic with the same
Hessian ``H(w*)``: ``grad L_Xi = grad L``, so ``p = 0``, the averaged dynamics equal C-SGD's exactly and
``b_D``, ``Delta L`` vanish to rounding: the criterion fails. Cost: 20 engine runs of ``steps`` steps.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import torch
from scipy import stats
from torch import Tensor

from verify import measures
from verify.losses import CosLoss
from verify.problems import ClosedFormProblem

from .base import Check, CheckResult, Context
from .registry import register
from .stationary import run_config, time_average

TOPOLOGIES = ("complete", "exponential", "grid", "ring")


class DenseQuadratic:
    """``L(w) = L0 + 1/2 (w - c)^T A (w - c)`` with its batched gradient ``(w - c) A`` (A symmetric)."""

    def __init__(self, A: np.ndarray, c: np.ndarray, L0: float = 0.0) -> None:
        self.A = torch.as_tensor(0.5 * (A + A.T), dtype=torch.float64)
        self.c = torch.as_tensor(c, dtype=torch.float64)
        self.L0, self.d = float(L0), int(len(c))

    def __call__(self, w: Tensor) -> Tensor:
        r = w - self.c
        return self.L0 + 0.5 * ((r @ self.A) * r).sum(-1)

    def grad(self, w: Tensor) -> Tensor:
        return (w - self.c) @ self.A

    def smoothed_grad(self, w: Tensor, deviations: Tensor | None = None) -> Tensor:
        """``grad L_Xi = grad L`` for a quadratic."""
        return self.grad(w)


def local_minimum(fn, gradient, w0: np.ndarray) -> np.ndarray:
    """L-BFGS-B to gradient norm ~1e-12 from ``w0``. Cost: the optimiser's function and gradient calls."""
    res = scipy.optimize.minimize(
        lambda w: float(fn(torch.as_tensor(w))), w0, jac=lambda w: gradient(torch.as_tensor(w)).numpy(),
        method="L-BFGS-B", options={"gtol": 1e-13, "ftol": 1e-16, "maxiter": 20000},
    )  # fmt: skip
    return res.x


def xi_root_deviations(xi: np.ndarray) -> Tensor:
    """Deviations ``D = sqrt(d) Xi^(1/2)`` (d rows), so that ``D^T D / d = Xi``."""
    vals, vecs = np.linalg.eigh(0.5 * (xi + xi.T))
    root = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    return torch.as_tensor(np.sqrt(xi.shape[0]) * root)


@register
class Tradeoff(Check):
    id = "T9"
    title = "Regularisation-optimisation trade-off (CosLoss)"
    claim = (
        "A larger consensus distance gives more sharpness regularisation and less optimisation: the "
        "stationary average model moves from argmin L toward argmin L_Xi and its loss rises."
    )
    source = "ICML poster [P]; abstract [A]; paper.md s.2.3 item 1, s.3 P9, s.6 T9"
    status = "argued"
    evidence = "derived law"
    prediction = (
        "1/2 Tr(H Xi) and L(w_a) - L* increase with Tr Xi; w_bar_a closer to argmin L_Xi than argmin L"
    )
    criterion = (
        "Spearman(Tr Xi, 1/2 Tr H Xi) > 0.8 and Spearman(Tr Xi, Delta L) > 0.8 with Delta L > 0; "
        "||b_D - p|| < ||b_D|| in every run (b_D = w_bar - w_bar_C, p = argmin L_Xi_bar - w*)"
    )
    control = "quadratic with the same Hessian: p = 0, b_D = Delta L = 0 to rounding (criterion fails)"
    full_only = True

    def run(self, ctx: Context) -> CheckResult:
        m, d, K = 16, 20, 30
        steps, burn, hess_every = ctx.pick((6000, 1000, 100), (20000, 2000, 100))
        etas = [0.02, 0.03]
        loss = CosLoss(d, K, seed=ctx.seed, u_scale=2.0, a_range=(0.05, 0.2))
        w_star = local_minimum(loss, loss.grad, np.zeros(d))
        H_star = loss.hessian(torch.as_tensor(w_star)).numpy()
        quad = DenseQuadratic(H_star, w_star, float(loss(torch.as_tensor(w_star))))
        jobs = [
            (L, eta, topo) for L in ("cos", "quadratic") for eta in etas for topo in ("csgd",) + TOPOLOGIES
        ]
        rows, ref = [], {}
        for L_name, eta, topo in ctx.progress(jobs, desc="T9 runs"):
            L = loss if L_name == "cos" else quad
            seed = ctx.seed * 1000 + int(round(eta * 1000))  # the same noise stream for every topology
            prob = ClosedFormProblem(L, torch.as_tensor(w_star), m=m, local_batch=1, noise_std=1.0, seed=seed)
            hx: list[float] = []

            def on_sample(s: int, W: Tensor, prob=prob, hx=hx, L_name=L_name) -> None:
                if L_name == "cos" and s % hess_every == 0:
                    D = W - W.mean(0)
                    hx.append(0.5 * measures.trace_h_xi(prob, W.mean(0), D) if bool((D != 0).any()) else 0.0)

            algo = "csgd" if topo == "csgd" else "dsgd"
            cfg = run_config(algo=algo, topology="ring" if topo == "csgd" else topo, m=m, b=1, lr=eta,
                             steps=steps, seed=seed)  # fmt: skip
            avg = time_average(cfg, prob, burn, xi_matrix=True, loss="average", on_sample=on_sample)
            if topo == "csgd":
                ref[(L_name, eta)] = avg
                continue
            base = ref[(L_name, eta)]
            b_D = avg.w_mean - base.w_mean
            if L_name == "cos":
                Dbar = xi_root_deviations(avg.xi)
                w_xi = local_minimum(
                    lambda w, D=Dbar: loss.smoothed(w, deviations=D),
                    lambda w, D=Dbar: loss.smoothed_grad(w, deviations=D),
                    w_star,
                )
            else:
                w_xi = w_star  # grad L_Xi = grad L: the smoothed minimum is the minimum
            p = w_xi - w_star
            lam = float(np.linalg.eigvalsh(L.hessian(torch.as_tensor(avg.w_mean)).numpy())[-1]) \
                if L_name == "cos" else float(np.linalg.eigvalsh(H_star)[-1])  # fmt: skip
            rows.append({
                "loss": L_name, "eta": eta, "topology": topo, "trace_xi": avg.trace_xi,
                "half_trace_h_xi": float(np.mean(hx)) if hx else float("nan"),
                "delta_loss": avg.loss - base.loss, "bias_norm": float(np.linalg.norm(b_D)),
                "predicted_bias_norm": float(np.linalg.norm(p)),
                "bias_minus_predicted": float(np.linalg.norm(b_D - p)),
                "bias_cosine": float(b_D @ p / (np.linalg.norm(b_D) * np.linalg.norm(p)))
                if np.linalg.norm(p) > 0 and np.linalg.norm(b_D) > 0 else float("nan"),
                "lambda_max_at_w_bar": lam,
            })  # fmt: skip
        cos_rows = [r for r in rows if r["loss"] == "cos"]
        q_rows = [r for r in rows if r["loss"] == "quadratic"]
        tr = [r["trace_xi"] for r in cos_rows]
        rho_h = float(stats.spearmanr(tr, [r["half_trace_h_xi"] for r in cos_rows])[0])
        rho_l = float(stats.spearmanr(tr, [r["delta_loss"] for r in cos_rows])[0])
        closer = [r["bias_minus_predicted"] < r["bias_norm"] for r in cos_rows]
        holds = rho_h > 0.8 and rho_l > 0.8 and all(r["delta_loss"] > 0 for r in cos_rows) and all(closer)
        q_closer = [r["bias_minus_predicted"] < r["bias_norm"] for r in q_rows]
        q_rho = stats.spearmanr([r["trace_xi"] for r in q_rows], [r["delta_loss"] for r in q_rows])[0]
        q_max_bias = max(r["bias_norm"] for r in q_rows)
        q_max_dl = max(abs(r["delta_loss"]) for r in q_rows)
        q_holds = (
            (not np.isnan(q_rho) and q_rho > 0.8)
            and all(r["delta_loss"] > 0 for r in q_rows)
            and all(q_closer)
        )
        rel = [abs(r["bias_norm"] / r["predicted_bias_norm"] - 1) for r in cos_rows]
        return self.result(
            settings={
                "loss": "CosLoss(d=20, K=30, u_scale=2, a=[0.05,0.2])",
                "m": m,
                "noise": "N(0, I)",
                "etas": etas,
                "topologies": list(TOPOLOGIES),
                "steps": steps,
                "burn_in": burn,
                "start": "local minimum w* (L-BFGS)",
                "reference": "C-SGD, same noise stream",
            },  # fmt: skip
            measured={
                "spearman_trace_xi_vs_half_trace_h_xi": rho_h,
                "spearman_trace_xi_vs_delta_loss": rho_l,
                "closer_to_argmin_L_xi_in_every_run": all(closer),
                "min_bias_cosine": min(r["bias_cosine"] for r in cos_rows),
                "max_relative_error_bias_norm": max(rel),
                "lambda_max_w_star": float(np.linalg.eigvalsh(H_star)[-1]),
                "lambda_max_at_w_bar": {
                    f"{r['topology']}@{r['eta']}": r["lambda_max_at_w_bar"] for r in cos_rows
                },
            },  # fmt: skip
            criterion_holds=holds,
            control_measured={
                "quadratic_max_bias_norm": q_max_bias,
                "quadratic_max_abs_delta_loss": q_max_dl,
                "quadratic_spearman_trace_xi_vs_delta_loss": q_rho,
                "quadratic_closer_in_any_run": any(q_closer),
            },  # fmt: skip
            control_came_out_other_way=not q_holds,
            series={"runs": {k: [r[k] for r in rows] for k in rows[0]}},
            summary=(
                f"rho(TrXi, 1/2 Tr HXi) {rho_h:.2f}, rho(TrXi, dL) {rho_l:.2f}; D-SGD - C-SGD mean shift = "
                f"argmin L_Xi - w* within {100 * max(rel):.1f}% "
                f"(cos >= {min(r['bias_cosine'] for r in cos_rows):.3f})"
            ),
            control_summary=f"quadratic: max shift {q_max_bias:.1e}, max |dL| {q_max_dl:.1e}",
        )
