"""T7n: T7's large-batch claim on a neural network trained on real data (abstract [A]; [I] Th. 2; paper.md
s.3 P7, s.6 T7; issue: T7 also on the embedded digits).

Protocol: the T6n network (:mod:`verify.claims.network`: tanh MLP on digits, pretrained ``w0``, D-SGD AWC on
the ring with m = 16, i.i.d. local batches), local batch ``b in {2, 4, 8, 16}`` (total ``B = 16 b``) with
the linear scaling rule ``eta = kappa b``, ``kappa = 0.05 / 8``. Measured per window (time averages after
burn-in): ``Tr Xi`` and the sharpness regulariser ``1/2 Tr(H(w_a) Xi) = (1/2m) sum_j d_j^T H d_j`` by m
exact HVPs of the full training loss (:func:`verify.measures.trace_h_xi`). Predicted: the linearised
Lyapunov values (``~ kappa^2 m S_P Tr(Sigma) B`` for small ``eta h``): both grow with B, slope +1 bent below
1 by curvature (more for ``Tr(H Xi)``, which weighs the stiff, more damped directions); the measured slopes
must be positive and within 0.2 of the predicted ones.

Calibrations (named in the criterion, as in T6n): the prediction's noise is rescaled by each window's
measured ``Tr Sigma`` (the un-rescaled error is reported), and the sampler is i.i.d. (the paper's shards are a
separate, reported measurement in the full form).
Criterion (:func:`criterion`): both slopes > 0 and within ``SLOPE_TOL`` of the predicted ones; every LSR run
within ``REL_TOL`` of the rescaled prediction; the engine's logged Tr Xi and lr = dense references.
Negative control, fed to the same criterion in place of the LSR runs: the same windows at a fixed eta = 0.05
(no LSR): ``Tr Xi ~ 1/b``, slope about -1, so "grows with B" fails (an engine that ignored the configured
rate would pass it). Reported beside it in the full form: the paper's sharded sampling under LSR (its
b-independent shard term scales like eta^2 ~ B^2, so Tr Xi grows even faster). Cost: one engine window per
point, m HVPs per snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Check, CheckResult, Context
from .fitting import loglog_fit
from .network import digits_setup, network_run, predict
from .registry import register
from .stationary import ENGINE_TOL
from .t06n_consensus_network import CALIBRATIONS, HIDDEN, PRETRAIN, REL_TOL, window

KAPPA = 0.05 / 8
#: largest allowed |measured slope - predicted slope|
SLOPE_TOL = 0.2


def criterion(measured: Mapping[str, Any]) -> bool:
    """The T7n criterion on a ``measured`` dict (keys as in the check's ``measured``)."""
    s_xi, s_hxi = measured["trace_xi_slope"], measured["half_trace_h_xi_slope"]
    return (
        s_xi > 0
        and s_hxi > 0
        and abs(s_xi - measured["trace_xi_slope_predicted"]) <= SLOPE_TOL
        and abs(s_hxi - measured["half_trace_h_xi_slope_predicted"]) <= SLOPE_TOL
        and measured["max_relative_error_vs_lyapunov"] <= REL_TOL
        and measured["engine_log_max_relative_error"] < ENGINE_TOL
    )


@register
class LargeBatchNetwork(Check):
    id = "T7n"
    title = "Large batch under the linear scaling rule on a digits MLP"
    claim = "On a smooth network trained on real data, D-SGD's consensus distance and sharpness regulariser "
    claim += "1/2 Tr(H Xi) grow with the total batch under the linear scaling rule."
    source = "abstract [A]; [I] Th. 2; paper.md s.2.3 item 4, s.3 P7, s.6 T7"
    status = "derived"
    evidence = "derived law"
    prediction = "Tr Xi, 1/2 Tr(H Xi) ~ B^+1 (bent by curvature); fixed eta: ~ B^-1"
    criterion = (
        f"{CALIBRATIONS}. Tr Xi and 1/2 Tr(H Xi) slopes vs B > 0 and within {SLOPE_TOL} of the linearised "
        f"prediction; Tr Xi within {100 * REL_TOL:g}% of the linearised Lyapunov value at every B; "
        f"engine-logged Tr Xi = dense reference to {ENGINE_TOL:g}"
    )
    control = (
        "fixed eta = 0.05 (no LSR) in place of LSR: Tr Xi slope vs B about -1; the same criterion must reject"
    )

    single_threaded = True

    def run(self, ctx: Context) -> CheckResult:
        steps, burn, reps = window(ctx)
        bs = ctx.pick([2, 4, 8, 16], [1, 2, 4, 8, 16, 32])
        plan = [("lsr", KAPPA * b, b, "iid") for b in bs] + [
            ("control_fixed_eta", 0.05, b, "iid") for b in bs
        ]
        if not ctx.quick:
            plan += [("lsr_shards", KAPPA * b, b, "shards") for b in bs]
        bar = ctx.progress(total=len(plan) + 1, desc="T7n runs")
        setup = digits_setup(ctx.seed, HIDDEN, PRETRAIN)
        bar.update(1)
        rows = []
        for fam, eta, b, sampling in plan:
            r = network_run(ctx.seed, HIDDEN, PRETRAIN, eta, b, sampling, steps, burn, repeats=reps)
            pred = predict(setup, eta, b, r.trace_sigma_window)
            unscaled = predict(setup, eta, b)
            rows.append({
                "family": fam, "b": b, "B": 16 * b, "eta": eta, "sampling": sampling,
                "trace_xi_predicted_w0_noise": unscaled.trace_xi, "engine_log_error": r.engine_log_error,
                "half_trace_h_xi_predicted_w0_noise": 0.5 * unscaled.trace_h_xi,
                "trace_xi": r.trace_xi, "trace_xi_se": r.trace_xi_se, "trace_xi_predicted": pred.trace_xi,
                "half_trace_h_xi": r.half_trace_h_xi, "half_trace_h_xi_predicted": 0.5 * pred.trace_h_xi,
                "ratio": r.trace_xi / pred.trace_xi, "trace_sigma_window": r.trace_sigma_window,
                "train_loss_end": r.train_loss_end,
            })  # fmt: skip
            bar.update(1)
        bar.close()

        def fit(fam: str, y: str) -> float:
            rs = [r for r in rows if r["family"] == fam]
            return loglog_fit([r["B"] for r in rs], [r[y] for r in rs]).slope

        lsr = [r for r in rows if r["family"] == "lsr"]
        worst = max(abs(r["ratio"] - 1) for r in lsr)
        s_xi, s_hxi = fit("lsr", "trace_xi"), fit("lsr", "half_trace_h_xi")
        p_xi, p_hxi = fit("lsr", "trace_xi_predicted"), fit("lsr", "half_trace_h_xi_predicted")
        measured = {
            "trace_xi_slope": s_xi, "trace_xi_slope_predicted": p_xi,
            "half_trace_h_xi_slope": s_hxi, "half_trace_h_xi_slope_predicted": p_hxi,
            "max_relative_error_vs_lyapunov": worst,
            "max_relative_error_vs_lyapunov_unrescaled": max(
                abs(r["trace_xi"] / r["trace_xi_predicted_w0_noise"] - 1) for r in lsr
            ),
            "trace_xi_slope_predicted_unrescaled": fit("lsr", "trace_xi_predicted_w0_noise"),
            "engine_log_max_relative_error": max(r["engine_log_error"] for r in rows),
            "half_trace_h_xi_by_B": {str(r["B"]): r["half_trace_h_xi"] for r in lsr},
        }  # fmt: skip
        if not ctx.quick:
            measured["shards_lsr_trace_xi_slope_reported"] = fit("lsr_shards", "trace_xi")
        s_fixed = fit("control_fixed_eta", "trace_xi")
        p_fixed = fit("control_fixed_eta", "trace_xi_predicted")
        control = {**measured, "trace_xi_slope": s_fixed,
                   "half_trace_h_xi_slope": fit("control_fixed_eta", "half_trace_h_xi")}  # fmt: skip
        return self.result(
            settings={
                "model": f"mlp(64, ({HIDDEN},), 10, tanh)",
                "data": "digits (train split)",
                "m": 16,
                "topology": "ring",
                "form": "AWC",
                "steps": steps,
                "burn_in": burn,
                "windows_per_point": reps,
                "bs": bs,
                "kappa": KAPPA,
                "sampling": "i.i.d. with replacement from the whole training set",
                "calibrations": CALIBRATIONS,
            },  # fmt: skip
            measured=measured,
            criterion_holds=criterion(measured),
            control_measured={
                "fixed_eta_trace_xi_slope": s_fixed,
                "fixed_eta_half_trace_h_xi_slope": control["half_trace_h_xi_slope"],
                "fixed_eta_trace_xi_slope_predicted": p_fixed,
                "accepted_by_criterion": criterion(control),
            },
            control_came_out_other_way=not criterion(control),
            series={"runs": {k: [r[k] for r in rows] for k in rows[0]}},
            summary=(
                f"Tr Xi slope {s_xi:.2f} (pred {p_xi:.2f}), 1/2 Tr(H Xi) slope {s_hxi:.2f} "
                f"(pred {p_hxi:.2f}); "
                f"rescaled Lyapunov within {100 * worst:.0f}% (un-rescaled "
                f"{100 * measured['max_relative_error_vs_lyapunov_unrescaled']:.0f}%)"
            ),
            control_summary=f"fixed eta: Tr Xi slope {s_fixed:.2f}",
        )
