"""T6n: the consensus-distance scaling of T6 on a neural network trained on real data (paper.md s.3 P6a/P6b
and "Exact stationary consensus distance", s.6 T6; issue: T6 also on the embedded digits).

Protocol (:mod:`verify.claims.network`): ``mlp(64, (16,), 10, tanh)`` (smooth, d = 1210) on the digits train
split, pretrained by C-SGD; from the pretrained ``w0`` D-SGD (AWC, ring, m = 16) windows through the verify
engine, each worker drawing its local batch i.i.d. from the whole training set (the theory's sampling).
Measured: the time average of ``Tr Xi = (1/m) sum_j ||w_j - w_a||^2`` after burn-in, over an eta grid at b = 8
and a b grid at eta = 0.05. Predicted: the linearised discrete Lyapunov value
``E Tr Xi = (1/m) sum_i Tr Q_i``, ``Q_i = A_i Q_i A_i^T + eta^2 (sigma_i^2 / b)(I - J)``,
``A_i = (P - J) - eta h_i (I - J)``, with ``h_i`` the eigenvalues of the Hessian at ``w0`` and ``sigma_i^2``
the per-sample gradient variances along its eigenvectors; its eta-slope is just below 2 (curvature bends it)
and its b-slope is exactly -1.

Two calibrations, named in the criterion: (1) the prediction's noise is RESCALED by each window's own
measured ``Tr Sigma(w_a)`` (the loss keeps falling during a window, so the noise of ``w0`` overstates it);
the error of the un-rescaled prediction (noise of ``w0`` alone) is reported beside it, not asserted.
(2) The 1/b law is asserted under the I.I.D. SAMPLER (the theory's sampling). The paper's code's sampling
(disjoint shards of 89 points, one permutation per epoch) keeps a persistent shard term
``grad L_j - grad L`` that the local batch cannot average away ([I] Th. 2's gradient term), so there Tr Xi
stops falling like 1/b: that is the paper's setting, not a wrong implementation, and it is run and REPORTED
as a separate measurement (its b-slope), not used as a control.

Criterion (:func:`criterion`): every i.i.d. run within ``REL_TOL`` of the rescaled linearised Lyapunov value;
eta-slope in ``ETA_SLOPE``; b-slope in ``B_SLOPE``; the engine's logged Tr Xi and lr = dense references.
Negative control, fed to the same criterion: the adapt-then-combine order (``dsgd-atc``, ``W' = P(W - eta
G)``) at (eta0, b0) in place of AWC, against the AWC prediction: its noise enters through ``(P-J)(P-J)^T``,
not ``I - J``, so it sits far below (an engine that mixed in the wrong order would pass the control). Its
agreement with its own ATC prediction is reported. Cost: one engine window per grid point (m gradients per
step), a dense Hessian (d HVPs) once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Check, CheckResult, Context
from .fitting import loglog_fit
from .network import digits_setup, network_run, predict
from .registry import register
from .stationary import ENGINE_TOL

HIDDEN, PRETRAIN = 16, 1500
#: the criterion's bounds (used by :func:`criterion` and the criterion text)
REL_TOL = 0.15
ETA_SLOPE = (1.7, 2.1)
B_SLOPE = (-1.15, -0.85)
#: the calibrations, named in T6n's and T7n's criterion texts
CALIBRATIONS = (
    "calibrated: prediction's noise rescaled by each window's measured Tr Sigma; i.i.d. sampler "
    "(not the paper's shards)"
)


def criterion(measured: Mapping[str, Any]) -> bool:
    """The T6n criterion on a ``measured`` dict (keys as in the check's ``measured``)."""
    return (
        measured["max_relative_error_vs_lyapunov"] <= REL_TOL
        and ETA_SLOPE[0] <= measured["eta_slope"] <= ETA_SLOPE[1]
        and B_SLOPE[0] <= measured["b_slope"] <= B_SLOPE[1]
        and measured["engine_log_max_relative_error"] < ENGINE_TOL
    )


def window(ctx: Context) -> tuple[int, int, int]:
    """(steps, burn-in, repeats) of the network windows. The full form averages more windows instead of
    longer ones: a window must stay short next to the drift of ``w_a`` for the linearisation at ``w0``."""
    return ctx.pick((800, 300, 1), (800, 300, 2))


@register
class ConsensusNetwork(Check):
    id = "T6n"
    title = "Consensus-distance scaling on a digits MLP"
    claim = "On a smooth network trained on real data, D-SGD's consensus distance Tr Xi grows like eta^2 and "
    claim += "falls like 1/b, as the linearised stationary (Lyapunov) analysis predicts."
    source = "[I] Th. 2 (bound form); paper.md s.3 P6a/P6b, 'Exact stationary consensus distance'; s.6 T6"
    status = "derived"
    evidence = "derived law"
    prediction = "Tr Xi = linearised Lyapunov value; eta-slope ~2 (bent), b-slope -1"
    criterion = (
        f"{CALIBRATIONS}. Every run within {100 * REL_TOL:g}% of the linearised Lyapunov value; eta-slope in "
        f"[{ETA_SLOPE[0]}, {ETA_SLOPE[1]}]; b-slope in [{B_SLOPE[0]}, {B_SLOPE[1]}]; engine-logged Tr Xi = "
        f"dense reference to {ENGINE_TOL:g}"
    )
    control = (
        "adapt-then-combine (dsgd-atc) against the AWC prediction: the same criterion must reject it. "
        "Reported apart: the paper's sharded sampling (b-slope)"
    )

    single_threaded = True

    def run(self, ctx: Context) -> CheckResult:
        steps, burn, reps = window(ctx)
        etas = ctx.pick([0.0125, 0.025, 0.05, 0.1], [0.00625, 0.0125, 0.025, 0.05, 0.1])
        bs = ctx.pick([2, 8, 32], [1, 2, 4, 8, 16, 32])
        eta0, b0 = 0.05, 8
        plan = [("eta", e, b0, "iid") for e in etas] + [("b", eta0, b, "iid") for b in bs]
        plan += [("control_atc", eta0, b0, "iid")]
        plan += [("reported_shards", eta0, b, "shards") for b in bs]
        bar = ctx.progress(total=len(plan) + 1, desc="T6n runs")
        setup = digits_setup(ctx.seed, HIDDEN, PRETRAIN)
        bar.update(1)
        rows = []
        for fam, eta, b, sampling in plan:
            algo = "dsgd-atc" if fam == "control_atc" else "dsgd"
            r = network_run(
                ctx.seed, HIDDEN, PRETRAIN, eta, b, sampling, steps, burn, repeats=reps, algo=algo
            )
            pred = predict(setup, eta, b, r.trace_sigma_window)
            own = predict(setup, eta, b, r.trace_sigma_window, form="atc") if algo == "dsgd-atc" else pred
            unscaled = predict(setup, eta, b).trace_xi
            rows.append({
                "family": fam, "algo": algo, "eta": eta, "b": b, "sampling": sampling, "trace_xi": r.trace_xi,
                "trace_xi_se": r.trace_xi_se, "predicted": pred.trace_xi, "predicted_own_form": own.trace_xi,
                "predicted_w0_noise": unscaled, "ratio": r.trace_xi / pred.trace_xi,
                "ratio_unrescaled": r.trace_xi / unscaled, "engine_log_error": r.engine_log_error,
                "half_trace_h_xi": r.half_trace_h_xi, "half_trace_h_xi_predicted": 0.5 * pred.trace_h_xi,
                "trace_sigma_window": r.trace_sigma_window, "train_loss_end": r.train_loss_end,
            })  # fmt: skip
            bar.update(1)
        bar.close()

        def fit(fam: str, x: str, y: str = "trace_xi") -> float:
            rs = [r for r in rows if r["family"] == fam]
            return loglog_fit([r[x] for r in rs], [r[y] for r in rs]).slope

        iid = [r for r in rows if r["family"] in ("eta", "b")]
        worst = max(abs(r["ratio"] - 1) for r in iid)
        s_eta, s_b = fit("eta", "eta"), fit("b", "b")
        measured = {
            "max_relative_error_vs_lyapunov": worst,
            "max_relative_error_vs_lyapunov_unrescaled": max(abs(r["ratio_unrescaled"] - 1) for r in iid),
            "eta_slope": s_eta,
            "eta_slope_predicted": fit("eta", "eta", "predicted"),
            "b_slope": s_b,
            "b_slope_predicted": fit("b", "b", "predicted"),
            "engine_log_max_relative_error": max(r["engine_log_error"] for r in rows),
            "hessian_lambda_max_w0": float(setup.h[-1]),
            "hessian_lambda_min_w0": float(setup.h[0]),
            "trace_sigma_w0": setup.trace_sigma0,
            "shards_b_slope_reported": fit("reported_shards", "b"),
            "shards_ratio_to_iid_prediction_reported": {
                str(r["b"]): r["ratio"] for r in rows if r["family"] == "reported_shards"
            },
        }
        atc = next(r for r in rows if r["family"] == "control_atc")
        control = {**measured, "max_relative_error_vs_lyapunov": abs(atc["ratio"] - 1)}
        return self.result(
            settings={
                "model": f"mlp(64, ({HIDDEN},), 10, tanh)",
                "d": setup.d,
                "data": "digits (train split)",
                "pretrain": setup.pretrain,
                "m": 16,
                "topology": "ring",
                "form": "AWC",
                "steps": steps,
                "burn_in": burn,
                "windows_per_point": reps,
                "etas": etas,
                "bs": bs,
                "eta0": eta0,
                "b0": b0,
                "sampling": "i.i.d. with replacement from the whole training set (shards: reported apart)",
                "calibrations": CALIBRATIONS,
            },  # fmt: skip
            measured=measured,
            criterion_holds=criterion(measured),
            control_measured={
                "atc_over_awc_prediction": atc["ratio"],
                "atc_over_own_atc_prediction": atc["trace_xi"] / atc["predicted_own_form"],
                "accepted_by_criterion": criterion(control),
            },
            control_came_out_other_way=not criterion(control),
            series={"runs": {k: [r[k] for r in rows] for k in rows[0]}},
            notes=[
                f"reported, not asserted: with the paper's disjoint shards the b-slope is "
                f"{measured['shards_b_slope_reported']:.2f}; Tr Xi exceeds the i.i.d. prediction more and "
                "more as b grows: the shard gradients grad L_j - grad L act as a persistent, b-independent "
                "forcing ([I] Th. 2's gradient term), so 1/b holds only for the sampling-noise part",
                f"un-rescaled prediction (noise of w0): worst error "
                f"{100 * measured['max_relative_error_vs_lyapunov_unrescaled']:.0f}% (reported)",
            ],
            summary=(
                f"rescaled linearised Lyapunov within {100 * worst:.0f}% (un-rescaled "
                f"{100 * measured['max_relative_error_vs_lyapunov_unrescaled']:.0f}%); eta-slope {s_eta:.2f} "
                f"(pred {fit('eta', 'eta', 'predicted'):.2f}); b-slope {s_b:.2f}; shards b-slope "
                f"{measured['shards_b_slope_reported']:.2f} (reported)"
            ),
            control_summary=f"ATC/AWC prediction {atc['ratio']:.2f}",
        )
