"""T7: under the linear scaling rule D-SGD's sharpness regularisation grows with the total batch, C-SGD's does
not (paper.md s.2.2 [I] Theorem 2, s.2.3 item 4, s.3 P7, s.6 T7).

Model as T6: ``L = 1/2 sum_i h_i w_i^2``, ``h = linspace(0.1, 2, 10)``, noise ``N(0, I / b)`` per worker and
step, m = 16 workers on the ring, local batch ``b in {2, ..., 32}``, total batch ``B = m b``, LSR
``eta = kappa b`` (``kappa = 0.01 / 8``). Measured (time averages after burn-in, verify engine):

- D-SGD: ``Tr Xi`` and the regulariser ``1/2 Tr(H Xi) = 1/2 sum_i h_i Xi_ii``; predicted exactly by the
  discrete Lyapunov solution (:func:`verify.lyapunov.stationary_consensus`), ``~ kappa^2 m S_P Tr(Sigma) B``
  for small ``eta h``: slope +1 vs B, bent below 1 as ``eta h`` nears the ring's gap;
- C-SGD: the stationary excess loss ``E[L(w) - L*]`` of ``w <- w - eta (grad L(w) + xi)``,
  ``xi ~ N(0, Sigma / B)`` (the mean of the m local gradients), exactly ``sum_i eta sigma_i^2 / (2 B (2 - eta
  h_i))`` (:func:`verify.lyapunov.csgd_excess_loss`), i.e. ``(eta / (4B)) Tr Sigma``: constant under LSR.
  Its slow directions relax in ~1/(2 eta h_min) steps and a single chain is noisy, so this recursion is run as
  16 independent copies in one engine call (``dsgd`` with ``P = I`` and per-copy noise ``Sigma / B``: the
  identical update), started at the exact stationary law ``N(0, diag(v))`` and run ``ceil(c / eta)`` steps
  (same precision at every B). One genuine ``algo="csgd"`` run at the middle B (the engine's C-SGD: the mean
  of the m local gradients) is asserted within ``Z_MAX`` standard errors of the exact value, its standard
  error from the exact model (:func:`verify.lyapunov.csgd_excess_loss_se`: batch means underestimate it, the
  slow directions decorrelate over ~1/(eta h_min) steps). Why it is asserted: a C-SGD that stepped along ONE
  worker's gradient instead of the mean of m has noise ``Sigma / b`` instead of ``Sigma / (m b)`` and an
  excess loss m = 16 times too large (measured 15.9x, z = 147), which the emulated copies above, not being
  the engine's ``csgd``, cannot see;
- the ratio ``(1/2 Tr(H Xi)) / E[L - L*]_C-SGD`` grows with B.

Criterion (:func:`criterion`), with the engine's own logged ``consensus_distance``, ``trace_h_xi`` and ``lr``
(last row of every run) equal to dense references to ``ENGINE_TOL`` and every D-SGD run within ``Z_MAX``
batch-means standard errors of its Lyapunov value.
Negative control, fed to the same criterion in place of the LSR runs: the same D-SGD at a fixed eta = 0.01
(no LSR): ``Tr Xi ~ 1/b``, slope -1, so the "grows with B" part fails (pitfall 6 of paper.md s.7).
Cost: one engine run per grid point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from verify.lyapunov import csgd_excess_loss, csgd_excess_loss_se, csgd_variance, stationary_consensus
from verify.topology import mixing_matrix

from .base import Check, CheckResult, Context
from .fitting import loglog_fit
from .registry import register
from .stationary import ENGINE_TOL, quadratic_problem, run_config, time_average

H = np.linspace(0.1, 2.0, 10).tolist()
KAPPA = 0.01 / 8
#: the criterion's bounds (used by :func:`criterion` and the criterion text)
DSGD_SLOPE = (0.6, 1.2)
DSGD_REL_TOL = 0.10
Z_MAX = 4.0
CSGD_SLOPE = (-0.2, 0.2)
CSGD_REL_TOL = 0.15


def criterion(measured: Mapping[str, Any]) -> bool:
    """The T7 criterion on a ``measured`` dict (keys as in the check's ``measured``)."""
    return (
        DSGD_SLOPE[0] <= measured["dsgd_trace_xi_slope"] <= DSGD_SLOPE[1]
        and DSGD_SLOPE[0] <= measured["dsgd_half_trace_h_xi_slope"] <= DSGD_SLOPE[1]
        and measured["dsgd_max_relative_error_vs_lyapunov"] <= DSGD_REL_TOL
        and measured["dsgd_max_abs_z_vs_lyapunov"] <= Z_MAX
        and CSGD_SLOPE[0] <= measured["csgd_excess_loss_slope"] <= CSGD_SLOPE[1]
        and measured["csgd_max_relative_error_vs_exact"] <= CSGD_REL_TOL
        and abs(measured["csgd_genuine_z"]) <= Z_MAX
        and bool(measured["ratio_increasing"])
        and measured["engine_log_max_relative_error"] < ENGINE_TOL
    )


@register
class LargeBatch(Check):
    id = "T7"
    title = "Large batch under the linear scaling rule (quadratic)"
    claim = (
        "Under the linear scaling rule the sharpness regularisation of D-SGD does not decrease (it grows) "
        "with the total batch, while C-SGD's noise-driven excess loss stays constant."
    )
    source = "abstract [A]; [I] Th. 2; paper.md s.2.3 item 4, s.3 P7, s.6 T7"
    status = "derived"
    evidence = "derived law"
    prediction = "D-SGD Tr Xi, 1/2 Tr(H Xi) ~ B^+1 (bent); C-SGD excess loss ~ B^0 = (eta/4B) Tr Sigma"
    criterion = (
        f"D-SGD Tr Xi and 1/2 Tr(H Xi) slopes vs B in [{DSGD_SLOPE[0]}, {DSGD_SLOPE[1]}]; every D-SGD run "
        f"within {Z_MAX:g} standard errors and {100 * DSGD_REL_TOL:g}% of the Lyapunov value; C-SGD "
        f"excess-loss slope in [{CSGD_SLOPE[0]}, {CSGD_SLOPE[1]}], every value within "
        f"{100 * CSGD_REL_TOL:g}% of the exact discrete form, the engine's genuine C-SGD within {Z_MAX:g} "
        "standard errors of it; ratio (1/2 Tr H Xi) / (C-SGD excess loss) strictly increasing in B; "
        f"engine-logged Tr Xi, Tr(H Xi) (HVPs), lr = dense references to {ENGINE_TOL:g}"
    )
    control = (
        "fixed eta = 0.01 (no LSR) in place of the LSR runs: D-SGD Tr Xi slope vs B ~ -1; the same "
        "criterion must reject it"
    )

    def run(self, ctx: Context) -> CheckResult:
        m = 16
        steps, burn = ctx.pick((4000, 1000), (20000, 2000))
        c_steps = ctx.pick(40.0, 200.0)  # C-SGD runs ceil(c / eta) steps: eta * steps fixed
        bs = ctx.pick([2, 4, 8, 16, 32], [1, 2, 4, 8, 16, 32, 64])
        P = mixing_matrix("ring", m)
        rows = []
        for k, b in enumerate(ctx.progress(bs, desc="T7 batch sizes")):
            eta, B, seed = KAPPA * b, m * b, ctx.seed * 1000 + k
            pred = stationary_consensus(P, eta, H, 1.0, b)
            d_avg = time_average(
                run_config(m=m, b=b, lr=eta, steps=steps, seed=seed, hess_every=steps),
                quadratic_problem(H, m=m, b=b, seed=seed), burn, h=H,
            )  # fmt: skip
            # C-SGD: 16 independent copies of w <- w - eta (grad L + N(0, I/B)) from the stationary law
            v = csgd_variance(eta, H, 1.0, B)
            g = torch.Generator().manual_seed(seed + 500)
            w0 = torch.as_tensor(np.sqrt(v)) * torch.randn(m, len(H), generator=g, dtype=torch.float64)
            n_c = int(math.ceil(c_steps / eta))
            c_avg = time_average(
                run_config(topology="disconnected", m=m, b=B, lr=eta, steps=n_c, seed=seed + 500),
                quadratic_problem(H, m=m, b=B, seed=seed + 500, w0=w0), 0, loss="rows",
            )  # fmt: skip
            fixed = time_average(
                run_config(m=m, b=b, lr=0.01, steps=steps, seed=seed + 900, hess_every=steps),
                quadratic_problem(H, m=m, b=b, seed=seed + 900), burn, h=H,
            )  # fmt: skip
            rows.append({
                "b": b, "B": B, "eta": eta,
                "dsgd_trace_xi": d_avg.trace_xi, "dsgd_trace_xi_se": d_avg.trace_xi_se,
                "dsgd_trace_xi_predicted": pred.trace_xi,
                "dsgd_half_trace_h_xi": 0.5 * d_avg.trace_h_xi,
                "dsgd_half_trace_h_xi_predicted": 0.5 * pred.trace_h_xi,
                "dsgd_z": (d_avg.trace_xi - pred.trace_xi) / d_avg.trace_xi_se,
                "csgd_excess_loss": c_avg.loss, "csgd_excess_loss_se": c_avg.loss_se, "csgd_steps": n_c,
                "csgd_excess_loss_exact": csgd_excess_loss(eta, H, 1.0, B),
                "csgd_excess_loss_continuous": csgd_excess_loss(eta, H, 1.0, B, exact=False),
                "ratio_dsgd_over_csgd": 0.5 * d_avg.trace_h_xi / c_avg.loss,
                "fixed_eta_trace_xi": fixed.trace_xi, "fixed_eta_half_trace_h_xi": 0.5 * fixed.trace_h_xi,
                "engine_log_error": max(a.engine_log_error for a in (d_avg, c_avg, fixed)),
                "fixed_eta_trace_xi_predicted": stationary_consensus(P, 0.01, H, 1.0, b).trace_xi,
            })  # fmt: skip
        # one genuine C-SGD run (algo csgd: mean of m local gradients of batch b) at the middle batch size
        b_mid = bs[len(bs) // 2]
        eta_mid = KAPPA * b_mid
        v = csgd_variance(eta_mid, H, 1.0, m * b_mid)
        g = torch.Generator().manual_seed(ctx.seed * 1000 + 777)
        w0 = torch.as_tensor(np.sqrt(v)) * torch.randn(len(H), generator=g, dtype=torch.float64)
        n_genuine = int(math.ceil(c_steps / eta_mid))
        genuine = time_average(
            run_config(algo="csgd", m=m, b=b_mid, lr=eta_mid, steps=n_genuine,
                       seed=ctx.seed * 1000 + 777),
            quadratic_problem(H, m=m, b=b_mid, seed=ctx.seed * 1000 + 777, w0=w0), 0, loss="average", h=H,
        )  # fmt: skip
        genuine_exact = csgd_excess_loss(eta_mid, H, 1.0, m * b_mid)
        genuine_se = csgd_excess_loss_se(eta_mid, H, 1.0, m * b_mid, n_genuine)
        col = {k: [r[k] for r in rows] for k in rows[0]}
        Bs = col["B"]

        def sl(y: str) -> float:
            return loglog_fit(Bs, col[y]).slope

        d_err = max(
            abs(a / p - 1)
            for a, p in zip(
                col["dsgd_trace_xi"] + col["dsgd_half_trace_h_xi"],
                col["dsgd_trace_xi_predicted"] + col["dsgd_half_trace_h_xi_predicted"],
                strict=True,
            )
        )
        c_err = max(
            abs(a / p - 1)
            for a, p in zip(col["csgd_excess_loss"], col["csgd_excess_loss_exact"], strict=True)
        )
        c_cont = max(
            abs(a / p - 1)
            for a, p in zip(col["csgd_excess_loss"], col["csgd_excess_loss_continuous"], strict=True)
        )
        ratio = col["ratio_dsgd_over_csgd"]
        increasing = all(a < b for a, b in zip(ratio, ratio[1:], strict=False))
        s_xi, s_hxi, s_c = sl("dsgd_trace_xi"), sl("dsgd_half_trace_h_xi"), sl("csgd_excess_loss")
        genuine_z = (genuine.loss - genuine_exact) / genuine_se
        measured = {
            "dsgd_trace_xi_slope": s_xi,
            "dsgd_trace_xi_slope_predicted": sl("dsgd_trace_xi_predicted"),
            "dsgd_half_trace_h_xi_slope": s_hxi,
            "dsgd_half_trace_h_xi_slope_predicted": sl("dsgd_half_trace_h_xi_predicted"),
            "dsgd_max_relative_error_vs_lyapunov": d_err,
            "dsgd_max_abs_z_vs_lyapunov": max(abs(z) for z in col["dsgd_z"]),
            "csgd_excess_loss_slope": s_c,
            "csgd_max_relative_error_vs_exact": c_err,
            "csgd_max_relative_error_vs_continuous": c_cont,
            "ratio_first_last": [ratio[0], ratio[-1]],
            "ratio_increasing": increasing,
            "csgd_genuine_B": m * b_mid,
            "csgd_genuine_excess_loss": genuine.loss,
            "csgd_genuine_exact": genuine_exact,
            "csgd_genuine_relative_error": genuine.loss / genuine_exact - 1,
            "csgd_genuine_model_se": genuine_se,
            "csgd_genuine_z": genuine_z,
            "engine_log_max_relative_error": max(col["engine_log_error"] + [genuine.engine_log_error]),
        }
        s_fixed, s_fixed_h = sl("fixed_eta_trace_xi"), sl("fixed_eta_half_trace_h_xi")
        control = {**measured, "dsgd_trace_xi_slope": s_fixed, "dsgd_half_trace_h_xi_slope": s_fixed_h}
        return self.result(
            settings={
                "h": H,
                "m": m,
                "topology": "ring",
                "bs": bs,
                "kappa": KAPPA,
                "steps": steps,
                "burn_in": burn,
                "csgd_steps": f"ceil({c_steps:g} / eta)",
                "noise": "N(0, I/b)",
            },  # fmt: skip
            measured=measured,
            criterion_holds=criterion(measured),
            control_measured={
                "fixed_eta_trace_xi_slope": s_fixed,
                "fixed_eta_half_trace_h_xi_slope": s_fixed_h,
                "fixed_eta_trace_xi_slope_predicted": sl("fixed_eta_trace_xi_predicted"),
                "accepted_by_criterion": criterion(control),
            },
            control_came_out_other_way=not criterion(control),
            series={"batch": col},
            summary=(
                f"D-SGD Tr Xi slope {s_xi:.2f}, 1/2 Tr(H Xi) {s_hxi:.2f} "
                f"(Lyapunov within {100 * d_err:.1f}%); "
                f"C-SGD slope {s_c:.2f} (exact form within {100 * c_err:.1f}%; engine csgd z "
                f"{genuine_z:.1f}); D/C ratio "
                f"{ratio[0]:.2f} -> {ratio[-1]:.2f}"
            ),
            control_summary=f"fixed eta: Tr Xi slope {s_fixed:.2f}",
        )
