"""T4: the loss-level decomposition of average-direction SAM (paper.md s.2.1 "sharpness-regularization
reading", s.3 P4, s.6 T4).

Formula: ``E_{eps ~ N(0, Xi)} L(w + eps) - L(w) = 1/2 Tr(H(w) Xi) + O(s^4)`` (odd Gaussian moments vanish),
with ``Tr(H Xi) = (1/m) sum_j d_j^T H d_j`` from m exact Hessian-vector products
(:func:`sharpness.sam.avg_sam_quadratic`, built on :class:`sharpness.hvp.HessianOperator`). On ``CosLoss`` the
left side is exact (closed-form smoothing), so both the regulariser (slope 2 in s) and the residual (slope
4) are measured without Monte Carlo. The HVP-based ``Tr(H Xi)`` is compared with the dense Hessian
(``torch.func.hessian``) on CosLoss and on a tiny tanh MLP.
Both at a random point and near a local minimum of CosLoss (L-BFGS), where the paper compares SAM with
avg-SAM. Criterion (:func:`criterion`, at each point): regulariser slope in ``REG_SLOPE``, one sign, residual
slope ``>= RESIDUAL_SLOPE_MIN``, HVP vs dense ``< HVP_TOL``.
Negative control, fed to the same criterion at both points: worst-case SAM,
``max_{||eps|| <= rho} L(w + eps) - L(w)`` with ``rho = sqrt(Tr Xi)`` (:func:`sharpness.sam.sam_sharpness`,
one SAM step plus projected ascent), in place of the avg-SAM gap. At the random point it is first order,
``~ rho ||grad L||`` (slope ~ 1); near the minimum it is ``~ rho^2 v^T H v / 2`` with v near the top
eigenvector (slope 2, so a slope test alone would accept it), which differs from ``1/2 Tr(H Xi)`` at order
s^2: the residual slope (~2) rejects it.
Cost per grid point and point: m HVPs, 1 + ascent-steps gradients; dense check: d HVPs; one L-BFGS.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import hessian

from sharpness.functional import FunctionalLoss, make_loss
from sharpness.sam import avg_sam_quadratic, sam_sharpness
from sharpness.xi import centre, xi_trace
from verify.losses import CosLoss

from .base import Check, CheckResult, Context, fmt
from .fitting import loglog_fit
from .registry import register
from .t09_tradeoff import local_minimum

#: the criterion's bounds (used by :func:`criterion` and the criterion text)
REG_SLOPE = (1.8, 2.2)
RESIDUAL_SLOPE_MIN = 3.7
HVP_TOL = 1e-10


def criterion(measured: Mapping[str, Any]) -> bool:
    """At one point: ``regulariser_slope`` in REG_SLOPE, ``gap_sign_constant``, ``residual_slope >=
    RESIDUAL_SLOPE_MIN`` and ``hvp_vs_dense_rel_error < HVP_TOL``."""
    lo, hi = REG_SLOPE
    return (
        lo <= measured["regulariser_slope"] <= hi
        and bool(measured["gap_sign_constant"])
        and measured["residual_slope"] >= RESIDUAL_SLOPE_MIN
        and measured["hvp_vs_dense_rel_error"] < HVP_TOL
    )


def decomposition(
    loss: CosLoss, w: torch.Tensor, Zc: torch.Tensor, s_grid: list[float], ascent: int
) -> tuple[dict[str, list[float]], dict[str, Any], dict[str, Any]]:
    """At the point ``w``: the columns over ``s_grid`` (avg-SAM gap, 1/2 Tr(H Xi) by HVPs, residual,
    worst-case SAM), and the criterion's inputs for avg-SAM and for worst-case SAM in its place."""
    fl = point_loss(loss, w)
    H = hessian(loss)(w)
    cols: dict[str, list[float]] = {k: [] for k in ("s", "gap", "half_trace", "residual", "worst_sam")}
    trace_err = 0.0
    for s in s_grid:
        D = s * Zc
        gap = float(loss.smoothed(w, deviations=D) - loss(w))
        half = avg_sam_quadratic(fl, deviations=D).half_trace_term
        trace_err = max(trace_err, relative(2 * half, dense_trace(H, D)))
        worst = sam_sharpness(fl, rho=xi_trace(D) ** 0.5, steps=ascent).value
        for k, v in zip(cols, (s, gap, half, abs(gap - half), worst), strict=True):
            cols[k].append(v)

    def inputs(values: list[float]) -> dict[str, Any]:
        resid = [abs(v - h) for v, h in zip(values, cols["half_trace"], strict=True)]
        return {
            "regulariser_slope": loglog_fit(s_grid, np.abs(values)).slope,
            "residual_slope": loglog_fit(s_grid, resid).slope,
            "gap_sign_constant": len({np.sign(v) for v in values}) == 1,
            "hvp_vs_dense_rel_error": trace_err,
        }

    return cols, inputs(cols["gap"]), inputs(cols["worst_sam"])


def point_loss(loss: CosLoss, w: torch.Tensor) -> FunctionalLoss:
    """A closed-form loss at the point ``w`` as a :class:`FunctionalLoss` with one parameter ``"w"``."""
    return FunctionalLoss(loss=lambda p: loss(p["w"]), params={"w": w.clone()})


def dense_trace(H: torch.Tensor, D: torch.Tensor) -> float:
    """``(1/m) sum_j d_j^T H d_j`` with a dense Hessian (the reference)."""
    return float(torch.einsum("ji,ik,jk->", D, H, D) / D.shape[0])


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def tiny_mlp_trace_error(ctx: Context) -> float:
    """Relative error of the HVP ``Tr(H Xi)`` against ``torch.func.hessian``; tanh MLP 3-5-2 (d = 32)."""
    from verify.models import mlp

    gen = ctx.generator(41)
    torch.manual_seed(ctx.seed)
    model = mlp(3, 5, 2, "tanh").double()
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (40,), generator=gen)
    fl = make_loss(model, F.cross_entropy, (x, y))
    theta = fl.flat_params().detach()
    H = hessian(lambda t: fl.loss(fl.unflatten(t)))(theta)
    D = centre(0.1 * torch.randn(16, theta.numel(), generator=gen, dtype=torch.float64))
    hvp = 2 * avg_sam_quadratic(fl, deviations=D).half_trace_term
    return relative(hvp, dense_trace(H, D))


@register
class LossDecomposition(Check):
    id = "T4"
    title = "Loss-level decomposition (P4)"
    claim = (
        "The average-direction SAM loss exceeds the loss by the sharpness regulariser 1/2 Tr(H Xi), "
        "up to O(s^4); worst-case SAM is first order instead."
    )
    source = "poster sharpness-regularization reading [P]; [I] Eq. (3); paper.md s.2.1, s.3 P4, s.6 T4"
    status = "proven"
    evidence = "theorem at a frozen state"
    prediction = "E L(w+eps) - L(w) ~ s^2; minus 1/2 Tr(H Xi) ~ s^4"
    criterion = (
        f"at a random point and near a minimum: regulariser slope in [{REG_SLOPE[0]}, {REG_SLOPE[1]}], one "
        f"sign; residual slope >= {RESIDUAL_SLOPE_MIN}; HVP Tr(H Xi) = dense value to {HVP_TOL:g} (CosLoss "
        "and a tiny MLP)"
    )
    control = (
        "worst-case SAM max_{||eps||<=rho} L(w+eps) - L(w), rho = sqrt(Tr Xi), in place of the avg-SAM gap: "
        "the same criterion must reject it at both points (slope ~1 at the random point; residual slope "
        "~2 near the minimum)"
    )

    def run(self, ctx: Context) -> CheckResult:
        m, d, K = 16, 20, 30
        s_grid = np.logspace(-3, -0.5, ctx.pick(8, 16)).tolist()
        ascent = ctx.pick(5, 20)
        loss = CosLoss(d, K, seed=ctx.seed)
        gen = ctx.generator(4)
        w = torch.randn(d, generator=gen, dtype=torch.float64)
        Zc = centre(torch.randn(m, d, generator=gen, dtype=torch.float64))
        w_min = torch.as_tensor(local_minimum(loss, loss.grad, w.numpy()))
        points = {"random": w, "minimum": w_min}
        series, main, ctrl = {}, {}, {}
        for name, point in ctx.progress(points.items(), desc="points"):
            series[f"decomposition_{name}"], main[name], ctrl[name] = decomposition(
                loss, point, Zc, s_grid, ascent
            )
        mlp_err = tiny_mlp_trace_error(ctx)
        for name in points:
            worst_err = max(main[name]["hvp_vs_dense_rel_error"], mlp_err)
            main[name]["hvp_vs_dense_rel_error"] = ctrl[name]["hvp_vs_dense_rel_error"] = worst_err
        holds = all(criterion(main[name]) for name in points)
        control_accepted = {name: criterion(ctrl[name]) for name in points}
        H_min = np.linalg.eigvalsh(hessian(loss)(w_min).numpy())
        r, n, c = main["random"], main["minimum"], ctrl["minimum"]
        return self.result(
            settings={
                "m": m,
                "d": d,
                "K": K,
                "s_grid": s_grid,
                "worst_case_ascent_steps": ascent,
                "points": "random N(0, I); local minimum of L by L-BFGS from it",
            },  # fmt: skip
            measured={
                **r,
                **{f"minimum_{k}": v for k, v in n.items()},
                "hvp_vs_dense_rel_error_mlp": mlp_err,
                "gradient_norm_at_minimum": float(loss.grad(w_min).norm()),
                "hessian_eigenvalue_range_at_minimum": [float(H_min[0]), float(H_min[-1])],
                "half_trace_at_largest_s": series["decomposition_random"]["half_trace"][-1],
            },
            criterion_holds=holds,
            control_measured={
                **{f"worst_case_sam_{k}": v for k, v in ctrl["random"].items() if k.endswith("slope")},
                **{
                    f"worst_case_sam_minimum_{k}": v
                    for k, v in ctrl["minimum"].items()
                    if k.endswith("slope")
                },
                "accepted_by_criterion": control_accepted,
            },
            control_came_out_other_way=not any(control_accepted.values()),
            series=series,
            summary=(
                f"regulariser slope {r['regulariser_slope']:.2f}, residual {r['residual_slope']:.2f}; near a "
                f"minimum {n['regulariser_slope']:.2f}, {n['residual_slope']:.2f}; HVP vs dense "
                f"{fmt(r['hvp_vs_dense_rel_error'])}"
            ),
            control_summary=(
                f"worst-case SAM: slope {ctrl['random']['regulariser_slope']:.2f}; near a minimum slope "
                f"{c['regulariser_slope']:.2f}, residual {c['residual_slope']:.2f}"
            ),
        )
