"""T14: D-SGD's average model is flatter than C-SGD's at matched training loss, and more so at large total
batch under the linear scaling rule (abstract [A]; paper.md s.2.3 item 4, s.3 P11, s.6 T11 "flatness
compared at matched training loss"; [I] Th. 2). An empirical claim: the paper's evidence is landscape plots.

Protocol (the digits setting of T11): ``mlp(64, (HIDDEN,), 10, tanh)``, m = 16, ring (AWC), the paper's
code's sampling (disjoint shards), plain SGD, total batch B = 16 b small (b = 8, lr 0.1) and large (b = 64,
lr 0.8: the linear scaling rule), the paper's schedule shape (lr x 0.1 at 40 % and 80 % of the steps).
D-SGD and C-SGD run in lockstep (:func:`verify.lockstep.run_lockstep`: same initialisation and batches);
at every logged step :func:`verify.claims.flatness.sharpness_measure` gives ``lambda_max`` (Lanczos) and
``Tr H`` +- its Hutchinson standard error on a fixed training subset for the D-SGD average and for C-SGD.
The two are compared at MATCHED train loss (:mod:`verify.claims.flatness`): ``log(value_D / value_C)`` at
three common loss levels from the lowest loss both reach (x1 to x1.5), averaged over the levels.

Effects (t over seeds, role "paper"; claimed: ``log 0.95``, the 5 % flatness margin paper.md s.6 T11 sets
for the paper's "flatter minima" — the paper gives no number): at large B, ``log lambda_max`` and
``log Tr H`` ratios D/C < 0; growth: (large B ratio) - (small B ratio) < 0, paired by seed. An interval that
contains both 0 and the claimed value gives INCONCLUSIVE, one that excludes the claim on the null side NOT
SUPPORTED. The criterion asserted: the loss curves overlap (matched levels exist) in every run.
Negative control (the same effect function): C-SGD of seed s against C-SGD of seed s + 1 (cyclic), matched
the same way: no systematic gap, so "flatter" must not be supported. Cost: per seed and batch, one lockstep
run (2 arms x m gradients per step) and at each of ~13 logged steps, for 2 models, ~20 Lanczos HVPs + PROBES.
"""

from __future__ import annotations

import math

import numpy as np

from .base import Check, CheckResult, Context
from .evidence import Effect, t_interval
from .flatness import Curve, matched_levels, matched_log_ratio, sharpness_measure
from .registry import register

HIDDEN, SUBSET, PROBES, LOGS = 32, 512, 30, 12
BATCHES = {"small": (8, 0.1), "large": (64, 0.8)}  # (local batch, lr): the linear scaling rule
KEYS = ("lambda_max", "trace_h")
CLAIMED = math.log(0.95)
SOURCE = "paper.md s.6 T11 (5% flatness margin for the paper's 'flatter minima', s.2.3 item 4)"


def flatness_effects(small: dict[str, np.ndarray], large: dict[str, np.ndarray], who: str) -> list[Effect]:
    """From per-seed matched-loss log ratios ``a/b`` (``small[key]``, ``large[key]``): ``a`` flatter at large
    B, and more than at small B (paired by seed), for each key. Role "paper"."""
    out = []
    for key in KEYS:
        out.append(Effect(f"log {key} ratio {who} at large B", t_interval(large[key]), CLAIMED, SOURCE))
        growth = t_interval(large[key] - small[key])
        out.append(Effect(f"growth of log {key} ratio {who}, large - small B", growth, CLAIMED, SOURCE))
    return out


def flatter(effects: list[Effect]) -> bool:
    """The flatness claim holds: every effect supported."""
    return all(e.outcome == "supported" for e in effects)


def run_pair(seed: int, b: int, lr: float, steps: int) -> dict[str, Curve]:
    """One lockstep run (D-SGD driver and C-SGD) with sharpness along the way; curves per arm."""
    from sharpness.functional import resolve_device
    from verify.config import DTYPES, RunConfig, build_problem
    from verify.lockstep import run_lockstep

    cfg = RunConfig(algo="dsgd", topology="ring", workers=16, local_batch=b, lr=lr, steps=steps, seed=seed,
                    log_every=max(1, steps // LOGS), dtype="float64", device="cpu", data="digits",
                    model="mlp",
                    model_kwargs={"hidden": [HIDDEN], "activation": "tanh"}, ensemble=False,
                    milestones=[int(0.4 * steps), int(0.8 * steps)])  # fmt: skip
    problem = build_problem(cfg, resolve_device("cpu"), DTYPES[cfg.dtype])
    res = run_lockstep(cfg, arms=("dsgd", "csgd"), problem=problem,
                       measure=sharpness_measure(problem, SUBSET, PROBES, seed=seed))  # fmt: skip
    if res.diverged:
        raise RuntimeError(f"T14: run diverged (seed {seed}, b {b}): {res.diverged}")
    return {arm: Curve.from_rows(res.rows, arm, (*KEYS, "trace_h_se")) for arm in ("dsgd", "csgd")}


def matched(a: Curve, b: Curve) -> dict[str, float]:
    """Mean over the matched loss levels of ``log(value_a / value_b)`` per key."""
    levels = matched_levels([a, b])
    return {key: float(np.mean(matched_log_ratio(a, b, key, levels))) for key in KEYS}


@register
class Flatness(Check):
    id = "T14"
    title = "Flatness at matched train loss, D-SGD vs C-SGD, small and large batch (digits MLP)"
    claim = (
        "D-SGD's average model is flatter (lambda_max, Tr H) than C-SGD's, and the gap grows with the total "
        "batch under the linear scaling rule."
    )
    source = "abstract [A]; [I] Th. 2; paper.md s.2.3 item 4, s.3 P11, s.6 T11"
    status = "empirical"
    evidence = "empirical"
    prediction = "log ratio D/C < 0 at large B (lambda_max, Tr H), more negative than at small B"
    criterion = "loss curves overlap (matched levels exist); effects with t intervals over seeds decide"
    control = "C-SGD seed s vs C-SGD seed s+1, matched the same way: 'flatter' not supported"
    single_threaded = True

    def run(self, ctx: Context) -> CheckResult:
        steps = ctx.pick(300, 600)
        seeds = [ctx.seed + k for k in range(ctx.pick(4, 6))]
        curves = {}
        jobs = [(s, name) for s in seeds for name in BATCHES]
        for s, name in ctx.progress(jobs, desc="T14 runs"):
            b, lr = BATCHES[name]
            curves[s, name] = run_pair(s, b, lr, steps)
        ratio = {name: {k: [] for k in KEYS} for name in BATCHES}
        ctrl = {name: {k: [] for k in KEYS} for name in BATCHES}
        rows = []
        for i, s in enumerate(seeds):
            other = seeds[(i + 1) % len(seeds)]
            for name in BATCHES:
                dc = matched(curves[s, name]["dsgd"], curves[s, name]["csgd"])
                cc = matched(curves[s, name]["csgd"], curves[other, name]["csgd"])
                for k in KEYS:
                    ratio[name][k].append(dc[k])
                    ctrl[name][k].append(cc[k])
                cd, cs = curves[s, name]["dsgd"], curves[s, name]["csgd"]
                rows.append({"seed": s, "batch": name, **{f"log_ratio_{k}": dc[k] for k in KEYS},
                             **{f"control_log_ratio_{k}": cc[k] for k in KEYS},
                             "final_loss_D": cd.loss[-1], "final_loss_C": cs.loss[-1],
                             "final_lambda_max_D": cd.values["lambda_max"][-1],
                             "final_lambda_max_C": cs.values["lambda_max"][-1],
                             "final_trace_h_D": cd.values["trace_h"][-1],
                             "final_trace_h_C": cs.values["trace_h"][-1],
                             "final_trace_h_se_D": cd.values["trace_h_se"][-1]})  # fmt: skip
        arr = {n: {k: np.array(v) for k, v in d.items()} for n, d in ratio.items()}
        carr = {n: {k: np.array(v) for k, v in d.items()} for n, d in ctrl.items()}
        effects = flatness_effects(arr["small"], arr["large"], "D/C")
        control_effects = flatness_effects(carr["small"], carr["large"], "C/C'")
        measured = {f"mean_log_ratio_{k}_{n}": float(arr[n][k].mean()) for n in BATCHES for k in KEYS}
        measured.update({f"ratio_{k}_{n}": float(np.exp(arr[n][k].mean())) for n in BATCHES for k in KEYS})
        rel_se = [
            c.values["trace_h_se"] / c.values["trace_h"] for pair in curves.values() for c in pair.values()
        ]
        measured["median_relative_trace_h_stderr"] = float(np.median(np.concatenate(rel_se)))
        curve_series = {
            "seed": [], "batch": [], "arm": [], "step": [], "train_loss": [],
            **{k: [] for k in (*KEYS, "trace_h_se")},
        }  # fmt: skip
        for (s, name), pair in curves.items():
            for arm, c in pair.items():
                for j in range(c.loss.size):
                    for col, v in (("seed", s), ("batch", name), ("arm", arm), ("step", c.step[j]),
                                   ("train_loss", c.loss[j])):  # fmt: skip
                        curve_series[col].append(v)
                    for k in (*KEYS, "trace_h_se"):
                        curve_series[k].append(c.values[k][j])
        lam = effects[0].interval
        return self.result(
            settings={
                "data": "digits (train split, 16 disjoint i.i.d. shards)",
                "model": f"mlp(64, ({HIDDEN},), 10, tanh)",
                "dtype": "float64",
                "steps": steps,
                "milestones": [int(0.4 * steps), int(0.8 * steps)],
                "seeds": seeds,
                "batches": {n: {"b": b, "B": 16 * b, "lr": lr} for n, (b, lr) in BATCHES.items()},
                "topology": "ring (AWC)",
                "sharpness": f"Lanczos lambda_max, Hutchinson Tr H ({PROBES} probes) on "
                f"{SUBSET} fixed training points, eval mode",
                "matching": "3 loss levels, lowest common x1-x1.5",
            },  # fmt: skip
            measured=measured,
            criterion_holds=True,
            effects=effects,
            control_measured={"effects": [e.text() for e in control_effects]},
            control_came_out_other_way=not flatter(control_effects),
            series={"runs": {k: [r[k] for r in rows] for k in rows[0]}, "curves": curve_series},
            summary=(
                f"large B: lambda_max D/C {math.exp(lam.estimate):.2f} [{math.exp(lam.low):.2f}, "
                f"{math.exp(lam.high):.2f}], Tr H D/C {math.exp(effects[2].interval.estimate):.2f}; "
                f"small B: lambda_max D/C {math.exp(arr['small']['lambda_max'].mean()):.2f}"
            ),
            control_summary="C vs C': " + ", ".join(sorted({e.outcome for e in control_effects})),
        )
