"""The large-batch experiment behind T11, at three scales: protocol, paired runs, flatness at matched loss,
effects and the per-seed report.

One protocol (:class:`Protocol`) per scale fixes data, model, workers, the two (local batch, lr) pairs of the
linear scaling rule, the iteration count (the same for both batches), warm-up, step decays at 40 % and 80 %,
seeds and what is measured. For each seed and batch, one :func:`verify.lockstep.run_lockstep` run steps
D-SGD (ring), C-SGD, C-SGD + avg-SAM with ``eps ~ N(0, Xi(t))`` of that D-SGD run and C-SGD + isotropic noise
of equal ``Tr Xi(t)``, from the same initialisation on the same batch stream: the C/D pair is paired by
construction. Logged rows hold test accuracy (full test split) and a training-subset loss per arm; at the
flatness steps, ``lambda_max`` (Lanczos, its residual as error bar) and ``Tr H`` (Hutchinson, its standard
error) of each arm's average model on a fixed training subset.

Effects (t intervals over seeds, pp of test accuracy at the end):

- precondition: C-SGD's accuracy drop from the small to the large batch, ``acc_C(small) - acc_C(large)``;
- endpoint (the paper's reading): the interaction ``(D - C)_large - (D - C)_small``; each ``D - C`` reported;
- control (a counterfactual dynamics fed to the same rule): the interaction with the isotropic arm in place
  of D-SGD, ``(I - C)_large - (I - C)_small``; it must not come out supported;
- mechanism (large batch; the small batch reported too): ``avgsam-xi - D`` and ``avgsam-iso - D`` in
  accuracy and, at matched training loss, in ``lambda_max`` and ``Tr H``;
- flatness: ``D - C`` of ``lambda_max`` and ``Tr H`` at matched training loss (:func:`at_matched_loss`).

Cost per seed: ``steps`` lockstep steps per batch (m gradients per arm per step) plus, per flatness point and
arm, one Lanczos run (``n_iter`` HVPs) and ``trace_probes`` HVPs on ``flat_samples`` points.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .evidence import Effect, paired_bootstrap, t_interval
from .flatness import Curve, value_at_loss

ARMS = ("dsgd", "csgd", "avgsam-xi", "avgsam-iso")
BATCHES = ("small", "large")
#: claimed effects, pp of test accuracy: ResNet-18 from scratch on CIFAR-10, ring vs C-SGD (paper.md s.4.3)
CLAIM_SOURCE = "paper.md s.4.3 (CIFAR-10, ResNet-18 from scratch, ring), s.6 T11"
CLAIMED_C_DROP = 83.99 - 80.37  # C-SGD 1024 -> 8192: -3.63 pp
CLAIMED_DC = {"small": 83.56 - 83.99, "large": 82.83 - 80.37}  # -0.43, +2.46 pp
CLAIMED_INTERACTION = CLAIMED_DC["large"] - CLAIMED_DC["small"]  # +2.89 pp


@dataclass(frozen=True)
class Protocol:
    """Everything one scale of the experiment fixes (module docstring)."""

    scale: str
    data: str
    model: str
    model_kwargs: dict[str, Any]
    small: tuple[int, float]  # (local batch, lr)
    large: tuple[int, float]
    steps: int
    warmup: int
    seeds: int = 3
    workers: int = 16
    log_every: int = 50
    eval_samples: int | None = None  # training subset for the logged train loss / accuracy
    flat_samples: int | None = None  # fixed training subset for lambda_max and Tr H
    flat_from: float = 0.4  # measure flatness from this fraction of the steps on ...
    flat_every: int = 100  # ... every this many steps (and at the end)
    lanczos_tol: float = 1e-3
    lanczos_iters: int | None = None  # Lanczos step cap (None: the sharpness default)
    trace_probes: int = 20
    dtype: str = "float32"
    device: str = "cpu"
    why: str = ""

    @property
    def milestones(self) -> list[int]:
        return [int(0.4 * self.steps), int(0.8 * self.steps)]

    def batch(self, which: str) -> tuple[int, float]:
        return self.small if which == "small" else self.large

    def flat_steps(self) -> list[int]:
        start = int(math.ceil(self.flat_from * self.steps))
        steps = [
            s for s in range(0, self.steps + 1, self.log_every) if s >= start and s % self.flat_every == 0
        ]
        return sorted(set(steps) | {self.steps})

    def run_config(self, seed: int, which: str):
        from verify.config import RunConfig

        b, lr = self.batch(which)
        return RunConfig(
            algo="dsgd", topology="ring", workers=self.workers, local_batch=b, lr=lr, steps=self.steps,
            warmup=self.warmup, milestones=self.milestones, dtype=self.dtype, device=self.device, seed=seed,
            data=self.data, model=self.model, model_kwargs=dict(self.model_kwargs), log_every=self.log_every,
            eval_samples=self.eval_samples, ensemble=False,
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            milestones=self.milestones,
            total_batch={w: self.workers * self.batch(w)[0] for w in BATCHES},
            flat_steps=self.flat_steps(),
            topology=f"ring (AWC), m = {self.workers}",
        )
        return d


PROTOCOLS: dict[str, Protocol] = {
    "digits": Protocol(
        scale="digits", data="digits", model="mlp", model_kwargs={"hidden": [64], "activation": "tanh"},
        small=(8, 0.1), large=(64, 0.8), steps=2000, warmup=0, log_every=100, flat_every=400,
        why="today's digits design (1438 train points, total batch 128 / 1024 = 9 % / 71 %): cheap, no power",
    ),
    "fmnist": Protocol(
        scale="fmnist", data="fashion-mnist", model="mlp",
        model_kwargs={"hidden": [256, 256], "activation": "gelu"},
        small=(64, 0.05), large=(512, 0.4), steps=3000, warmup=150, log_every=50, eval_samples=10000,
        flat_samples=2048, flat_from=0.1, flat_every=300, lanczos_tol=1e-2,
        why=(
            "the paper's design at a size 2 CPU cores run in about 1.5 hours: m = 16, total batch 1024 / "
            "8192 (1.7 % / 13.7 % of 60k; paper 2 % / 16 %), the linear scaling rule (lr x 8), decays at "
            "40 % / 80 %, warm-up 5 % of the iterations, 3000 iterations at both batches (51 / 410 "
            "epochs; the paper's 6000 are 125 / 1000 epochs of CIFAR-10): 300 iterations "
            "(results/t11-fmnist-300) left the small batch at 62 % test accuracy, untrained, so that run "
            "could not decide; 3000 is what the measured step time (0.18 / 0.32 s for all four arms) "
            "allows in the issue's 90 minutes. A 784-256-256-10 GELU MLP (smooth, so the Hessian is well "
            "defined; a small BN CNN step at 8192 took ~7 s). lr 0.05 / 0.4, half the paper's 0.1 / 0.8: "
            "at 0.8 ring D-SGD diverged at step 24-27 in all 3 seeds (Tr Xi 1.6e7 at step 20) while C-SGD"
            " trained (results/t11-fmnist-attempt1); halving is the first stable step of the LSR pair, "
            "chosen for stability before any accuracy was compared. Flatness every 300 iterations from 10"
            " % on, so curves of different speed still cross a common train loss"
        ),
    ),
    "paper": Protocol(
        scale="paper", data="cifar10", model="resnet18_micro", model_kwargs={},
        small=(64, 0.1), large=(512, 0.8), steps=6000, warmup=60, log_every=50, eval_samples=10000,
        flat_samples=2048, flat_every=600, device="auto",
        why="paper.md s.4.1: CIFAR-10, micro ResNet-18 from scratch, 6000 iterations, warm-up 60",
    ),
}  # fmt: skip


def protocol_for(scale: str, data: str | None = None, **overrides: Any) -> Protocol:
    """The protocol of ``scale``; ``data`` replaces its data spec (the paper scale needs ``cifar10:DIR``)."""
    if scale not in PROTOCOLS:
        raise ValueError(f"unknown scale {scale!r}; choose from {', '.join(PROTOCOLS)}")
    p = PROTOCOLS[scale]
    if data is not None:
        p = replace(p, data=data)
    if p.data == "cifar10":
        raise ValueError("the paper scale needs the CIFAR-10 folder: --data cifar10:DIR (python pickles)")
    return replace(p, **overrides) if overrides else p


# ------------------------------------------------------------------------------------------ flatness
def flatness(
    fl: Any, seed: int, tol: float = 1e-3, probes: int = 20, max_iter: int | None = None
) -> dict[str, float]:
    """``lambda_max`` (Lanczos, error bar: the residual ``||H v - lambda v||``, which bounds the distance to
    an eigenvalue) and ``Tr H`` (Hutchinson, error bar: its standard error) of the loss ``fl``
    (a :class:`sharpness.functional.FunctionalLoss`). Cost: ``n_iter + 1`` HVPs plus ``probes`` HVPs."""
    from sharpness.lanczos import top_eigenvalues
    from sharpness.trace import hessian_trace

    eig = top_eigenvalues(fl, k=1, tol=tol, seed=seed, max_iter=max_iter)
    tr = hessian_trace(fl, n_probes=probes, seed=seed)
    return {
        "lambda_max": float(eig.values[0]),
        "lambda_max_err": float(eig.residuals[0]),
        "trace_h": float(tr.value),
        "trace_h_err": float(tr.stderr),
    }


def at_matched_loss(
    curves: Mapping[str, Mapping[str, Sequence[float]]], keys: Sequence[str], loss: str = "train_loss"
) -> dict[str, Any]:
    """Compare runs at one common training loss: the level is the lowest loss every arm reaches (the highest
    of the arms' lowest losses); each ``key`` is read there by :func:`verify.claims.flatness.value_at_loss`
    (T14's rule: the first point at or below the level, interpolated in log value with the point before).
    ``curves[arm] = {loss: [...], key: [...]}`` at the measured points, in step order. Returns ``{"level":
    L, "values": {arm: {key: value}}, "below_at_first": [arms]}``: an arm already below the level at its
    first point is read there (not matched: its loss is lower than the level). Cost: nothing."""
    cs = {}
    for arm, c in curves.items():
        ls = np.asarray(c[loss], dtype=float)
        if not np.isfinite(ls).any():
            raise ValueError(f"arm {arm}: no finite {loss}")
        cs[arm] = Curve(np.arange(ls.size), ls, {k: np.asarray(c[k], dtype=float) for k in keys})
    level = max(float(np.nanmin(c.loss)) for c in cs.values())
    values = {arm: {k: value_at_loss(c, k, level) for k in keys} for arm, c in cs.items()}
    return {
        "level": level,
        "values": values,
        "below_at_first": [a for a, c in cs.items() if c.loss[0] < level],
    }


# ------------------------------------------------------------------------------------------ runs
def run_one(
    protocol: Protocol,
    seed: int,
    which: str,
    *,
    arms: Sequence[str] = ARMS,
    steps: int | None = None,
    progress: bool = False,
    problem: Any = None,
    flat: bool = True,
) -> dict[str, Any]:
    """One lockstep run (all ``arms``) at batch ``which`` and ``seed``: its rows and wall time."""
    import torch

    from sharpness.functional import resolve_device
    from verify.config import DTYPES, build_problem
    from verify.lockstep import run_lockstep

    cfg = protocol.run_config(seed, which)
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    if problem is None:
        problem = build_problem(cfg, resolve_device(cfg.device), DTYPES[cfg.dtype])
    flat_at = (set(protocol.flat_steps()) if steps is None else {cfg.steps}) if flat else set()

    def measure(step: int, arm: str, w: torch.Tensor, bufs: Any) -> dict[str, float] | None:
        if step not in flat_at:
            return None
        fl = problem.functional(w, bufs, samples=protocol.flat_samples)
        return flatness(fl, seed, protocol.lanczos_tol, protocol.trace_probes, protocol.lanczos_iters)

    t0 = time.perf_counter()
    res = run_lockstep(cfg, arms, problem=problem, measure=measure, progress=progress)
    return {
        "seed": seed,
        "batch": which,
        "arms": list(arms),
        "wall_s": time.perf_counter() - t0,
        "diverged": res.diverged,
        "rows": res.rows,
    }


def curves(run: Mapping[str, Any], arm: str, keys: Sequence[str]) -> dict[str, list[float]]:
    """The ``keys`` of ``arm`` at the rows where flatness was measured."""
    rows = [r for r in run["rows"] if f"{arm}_lambda_max" in r]
    return {k: [float(r.get(f"{arm}_{k}", float("nan"))) for r in rows] for k in keys}


def final(run: Mapping[str, Any], arm: str, key: str) -> float:
    return float(run["rows"][-1].get(f"{arm}_{key}", float("nan")))


# ------------------------------------------------------------------------------------------ effects
def effect(name: str, values: Sequence[float], claimed: float, source: str, role: str = "paper") -> Effect:
    """A t interval over seeds (NaN interval with fewer than 2 finite values: undecided)."""
    from .evidence import Interval

    vals = [v for v in values if math.isfinite(v)]
    if len(vals) >= 2:
        iv = t_interval(vals)
    else:
        est = vals[0] if vals else float("nan")
        iv = Interval(est, float("nan"), float("nan"), 0.95, len(vals), "t (needs >= 2 seeds)", float("nan"))
    return Effect(name, iv, claimed, source, role=role)


def summary(name: str, values: Sequence[float]) -> dict[str, Any]:
    """A reported difference (no claimed value): mean, 95 % t interval over seeds, MDE, and its sign
    (``"> 0"`` / ``"< 0"`` when the interval excludes 0, else ``"contains 0"``); ``values`` per seed."""
    from .evidence import MDE_FACTOR

    vals = [v for v in values if math.isfinite(v)]
    out: dict[str, Any] = {"name": name, "values": list(values), "n": len(vals)}
    if len(vals) < 2:
        return {**out, "estimate": vals[0] if vals else math.nan, "low": math.nan, "high": math.nan,
                "mde": math.nan, "sign": "undecided (< 2 seeds)"}  # fmt: skip
    iv = t_interval(vals)
    sign = "> 0" if iv.low > 0 else "< 0" if iv.high < 0 else "contains 0"
    return {
        **out,
        "estimate": iv.estimate,
        "low": iv.low,
        "high": iv.high,
        "mde": MDE_FACTOR * iv.se,
        "sign": sign,
    }


def summary_text(d: Mapping[str, Any]) -> str:
    """``name est [low, high] (95% t, n seeds; MDE m): sign``."""
    return (
        f"{d['name']} {d['estimate']:.3g} [{d['low']:.3g}, {d['high']:.3g}] (95% t over {d['n']}; "
        f"MDE {d['mde']:.3g}): {d['sign']}"
    )


FLAT_KEYS = ("train_loss", "lambda_max", "lambda_max_err", "trace_h", "trace_h_err")


def analyse(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-seed numbers and effects from the finished runs (a seed counts once both batches are in)."""
    by = {(r["seed"], r["batch"]): r for r in runs}
    seeds = sorted({s for s, _ in by if (s, "small") in by and (s, "large") in by})
    per_seed: list[dict[str, Any]] = []
    for s in seeds:
        row: dict[str, Any] = {"seed": s}
        for b in BATCHES:
            run = by[(s, b)]
            for arm in run["arms"]:
                row[f"acc_{arm}_{b}"] = 100 * final(run, arm, "test_acc")
                row[f"train_loss_{arm}_{b}"] = final(run, arm, "train_loss")
                row[f"dist_{arm}_{b}"] = final(run, arm, "dist")
                row[f"diverged_{arm}_{b}"] = run["diverged"].get(arm)
            flat_arms = [a for a in run["arms"] if curves(run, a, ("lambda_max",))["lambda_max"]]
            if not flat_arms:  # a run stopped (diverged) before its first flatness step
                row[f"matched_loss_{b}"] = math.nan
                continue
            m = at_matched_loss({a: curves(run, a, FLAT_KEYS) for a in flat_arms}, FLAT_KEYS[1:])
            row[f"matched_loss_{b}"] = m["level"]
            row[f"not_matched_{b}"] = ",".join(m["below_at_first"])
            for a, vals in m["values"].items():
                for k, v in vals.items():
                    row[f"{k}_{a}_{b}_matched"] = v
        per_seed.append(row)

    def col(f: Callable[[dict], float]) -> list[float]:
        return [f(r) for r in per_seed]

    src = CLAIM_SOURCE
    drop = col(lambda r: r["acc_csgd_small"] - r["acc_csgd_large"])
    pre = effect(
        "C-SGD test accuracy drop small -> large batch, pp", drop, CLAIMED_C_DROP, src, "precondition"
    )
    dc = {}
    for b in BATCHES:
        vals = col(lambda r, b=b: r[f"acc_dsgd_{b}"] - r[f"acc_csgd_{b}"])
        dc[b] = effect(f"D-C test accuracy at the {b} batch, pp", vals, CLAIMED_DC[b], src)

    def interaction(arm: str) -> list[float]:
        def one(r: dict) -> float:
            return (r[f"acc_{arm}_large"] - r["acc_csgd_large"]) - (
                r[f"acc_{arm}_small"] - r["acc_csgd_small"]
            )

        return col(one)

    inter = effect("interaction (D-C)_large - (D-C)_small, pp", interaction("dsgd"), CLAIMED_INTERACTION, src)
    ctrl_name = "control: interaction with isotropic noise of equal Tr Xi in place of D-SGD, pp"
    ctrl = effect(ctrl_name, interaction("avgsam-iso"), CLAIMED_INTERACTION, src)

    def matched(r: dict, k: str, arm: str, b: str) -> float:
        return float(r.get(f"{k}_{arm}_{b}_matched", math.nan))

    mech: dict[str, dict] = {}  # keys without a suffix: the large batch (the issue's); "_small": the other
    for b, suffix in (("large", ""), ("small", "_small")):
        for arm, label in (("avgsam-xi", "avg-SAM(Xi)"), ("avgsam-iso", "isotropic")):
            vals = col(lambda r, a=arm, b=b: r[f"acc_{a}_{b}"] - r[f"acc_dsgd_{b}"])
            mech[f"acc_{arm}{suffix}"] = summary(f"{label} - D test accuracy, {b} batch, pp", vals)
            for k in ("lambda_max", "trace_h"):
                vals = col(lambda r, a=arm, k=k, b=b: matched(r, k, a, b) - matched(r, k, "dsgd", b))
                name = f"{label} - D {k} at matched train loss, {b} batch"
                mech[f"{k}_{arm}{suffix}"] = summary(name, vals)
    flat: dict[str, dict] = {}
    for k in ("lambda_max", "trace_h"):
        for b in BATCHES:
            vals = col(lambda r, k=k, b=b: matched(r, k, "dsgd", b) - matched(r, k, "csgd", b))
            flat[f"{k}_{b}"] = summary(f"D-C {k} at matched train loss, {b} batch", vals)

        def change(r: dict, k: str = k) -> float:
            ratio = {b: matched(r, k, "dsgd", b) / matched(r, k, "csgd", b) for b in BATCHES}
            return ratio["large"] - ratio["small"]

        flat[f"{k}_ratio_change"] = summary(
            f"D/C {k} ratio at matched loss, large minus small batch", col(change)
        )
    return {
        "seeds": seeds,
        "per_seed": per_seed,
        "precondition": pre,
        "interaction": inter,
        "interaction_values": interaction("dsgd"),
        "dc": dc,
        "control": ctrl,
        "mechanism": mech,
        "flatness": flat,
    }


def verdict(analysis: Mapping[str, Any], diverged_ok: bool = True) -> tuple[str, list[str], bool]:
    """The shared rule (:func:`verify.claims.base.decide_verdict`) on the T11 effects: precondition, the
    interaction as the paper's reading, and the control (isotropic arm through the same rule) that must not
    come out supported. Returns ``(verdict, notes, control_came_out_other_way)``."""
    from .base import decide_verdict

    control_other = analysis["control"].outcome != "supported"
    v, notes = decide_verdict(
        asserted=True,
        criterion_holds=diverged_ok,
        control_came_out_other_way=control_other,
        effects=[analysis["precondition"], analysis["interaction"]],
    )
    return v, notes, control_other


# ------------------------------------------------------------------------------------------ reports
def write_outputs(
    out: Path, protocol: Protocol, runs: Sequence[Mapping[str, Any]], extra: Mapping | None = None
):
    """report.json, report.md and one CSV series per run under ``out`` (each file written whole, then
    renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        keys = sorted({k for r in run["rows"] for k in r}, key=lambda k: (k != "step", k))
        _atomic(out / f"series_{run['batch']}_seed{run['seed']}.csv", _csv(run["rows"], keys))
    a = analyse(runs) if runs else None
    rep: dict[str, Any] = {
        "protocol": protocol.describe(),
        "runs": [{k: r[k] for k in ("seed", "batch", "arms", "wall_s", "diverged")} for r in runs],
        **(extra or {}),
    }
    lines = [f"# T11 at {protocol.scale} scale", "", f"Protocol: {protocol.why}.", ""]
    d = protocol.describe()
    lines += [
        f"- {k}: {d[k]}"
        for k in (
            "data",
            "model",
            "model_kwargs",
            "workers",
            "small",
            "large",
            "total_batch",
            "steps",
            "warmup",
            "milestones",
            "seeds",
            "flat_samples",
            "flat_steps",
        )
    ]
    done = ", ".join(
        f"seed {r['seed']} {r['batch']} {r['wall_s']:.0f} s"
        + (f" (diverged at step: {r['diverged']})" if r["diverged"] else "")
        for r in runs
    )
    lines += ["", f"Runs finished: {len(runs)} ({done})", ""]
    if a and a["seeds"]:
        ok = not any(
            r["diverged"].get("dsgd") is not None or r["diverged"].get("csgd") is not None for r in runs
        )
        v, notes, ctrl_other = verdict(a, ok)
        rep.update(
            verdict=v,
            verdict_notes=notes,
            control_came_out_other_way=ctrl_other,
            seeds_complete=a["seeds"],
            per_seed=a["per_seed"],
        )
        eff = {"precondition": a["precondition"], "interaction": a["interaction"], "control": a["control"],
               **{f"dc_{b}": e for b, e in a["dc"].items()}}  # fmt: skip
        reported = {**{f"mechanism_{k}": d for k, d in a["mechanism"].items()},
                    **{f"flatness_{k}": d for k, d in a["flatness"].items()}}  # fmt: skip
        rep["effects"] = {k: e.to_dict() for k, e in eff.items()}
        rep["reported"] = reported
        lines += [f"## Verdict: {v} ({len(a['seeds'])} paired seeds: {a['seeds']})", ""]
        lines += [f"- {n}" for n in notes]
        lines += ["", f"- control rejected (not supported): {ctrl_other}", ""]
        lines += ["## Effects (95 % t intervals over seeds)", ""]
        lines += [f"- **{k}**: {e.text()}" for k, e in eff.items()]
        vals = [v for v in a["interaction_values"] if math.isfinite(v)]
        if len(vals) >= 2:
            bs = paired_bootstrap(vals)
            rep["interaction_paired_bootstrap"] = asdict(bs)
            lines += [
                f"- interaction, paired percentile bootstrap over {bs.n} seeds: "
                f"[{bs.low:.3g}, {bs.high:.3g}] "
                "(with this few seeds it cannot be wider than the data's range; the t interval above decides)"
            ]
        lines += ["", "## Mechanism (both batches) and flatness at matched train loss (reported)", ""]
        lines += [f"- **{k}**: {summary_text(d)}" for k, d in reported.items()]
        first = protocol.flat_steps()[0]
        lines += [
            f"- not matched: seed {r['seed']}, {b} batch: {r[f'not_matched_{b}']} already below the matched "
            f"train loss at the first flatness step ({first}); read there, at a lower loss"
            for r in a["per_seed"]
            for b in BATCHES
            if r.get(f"not_matched_{b}")
        ]
        lines += ["", "## Per seed", ""]
        keys = [
            k
            for k in a["per_seed"][0]
            if k.startswith(("acc_", "lambda_max_", "trace_h_", "matched_loss", "not_matched"))
            and "_err_" not in k
        ]
        lines += [
            "| key | " + " | ".join(f"seed {s}" for s in a["seeds"]) + " |",
            "|---|" + "---|" * len(a["seeds"]),
        ]
        lines += [
            f"| {k} | "
            + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for r in a["per_seed"])
            + " |"
            for k in keys
        ]
    else:
        lines += ["No seed has both batches yet: no verdict."]
    _atomic(out / "report.json", json.dumps(rep, indent=1, default=_jsonable))
    _atomic(out / "report.md", "\n".join(lines) + "\n")
    return rep


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def _csv(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(keys)
    for r in rows:
        w.writerow([r.get(k, "") for k in keys])
    return buf.getvalue()


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_runs(out: Path) -> list[dict[str, Any]]:
    """The finished runs saved under ``out/runs`` (one JSON per seed and batch)."""
    d = out / "runs"
    return [json.loads(p.read_text()) for p in sorted(d.glob("seed*_*.json"))] if d.is_dir() else []


def estimate_cost(protocol: Protocol, seed: int = 0, probe_steps: int = 2) -> dict[str, float]:
    """Seconds per seed and in all, from timed work at each batch (wall clock): a lockstep step of all arms
    (the difference between runs of ``1 + probe_steps`` and 1 steps, after one untimed run), a logged row
    (evaluation of every arm) and one flatness measurement; printed before a run starts. Cost:
    ``3 + probe_steps`` steps, 6 evaluations of each arm and one flatness measurement per batch."""
    from sharpness.functional import resolve_device
    from verify.config import DTYPES, build_problem

    out: dict[str, float] = {}
    n_rows = protocol.steps // protocol.log_every + 2
    n_flat = len(protocol.flat_steps()) * len(ARMS)
    for b in BATCHES:
        cfg = protocol.run_config(seed, b)
        problem = build_problem(cfg, resolve_device(cfg.device), DTYPES[cfg.dtype])
        run_one(protocol, seed, b, steps=1, problem=problem, flat=False)  # untimed: execution choice, caches
        t0 = time.perf_counter()
        run_one(protocol, seed, b, steps=1, problem=problem, flat=False)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_one(protocol, seed, b, steps=1 + probe_steps, problem=problem, flat=False)
        per_step = max(0.0, time.perf_counter() - t0 - one) / probe_steps
        per_row = max(0.0, one - per_step) / 2
        w = problem.init_stacked()[0].mean(0)
        t0 = time.perf_counter()
        fl = problem.functional(w, None, samples=protocol.flat_samples)
        flatness(fl, seed, protocol.lanczos_tol, protocol.trace_probes, protocol.lanczos_iters)
        per_flat = time.perf_counter() - t0
        out.update({f"step_s_{b}": per_step, f"row_s_{b}": per_row, f"flatness_s_{b}": per_flat})
        out[f"seed_s_{b}"] = protocol.steps * per_step + n_rows * per_row + n_flat * per_flat
        del problem
    out["seed_s"] = out["seed_s_small"] + out["seed_s_large"]
    out["total_s"] = protocol.seeds * out["seed_s"]
    return out


def run_protocol(
    protocol: Protocol,
    out: Path | None = None,
    *,
    progress: bool = False,
    resume: bool = True,
    log: Callable[[str], None] = lambda s: None,
    seeds: Sequence[int] | None = None,
    batches: Sequence[str] = BATCHES,
) -> list[dict[str, Any]]:
    """Every seed, small batch then large; after each run, the run is saved (``out/runs``) and the report
    rewritten, so a cut-short run still leaves its data. ``resume``: skip runs already saved."""
    runs = load_runs(out) if (out is not None and resume) else []
    done = {(r["seed"], r["batch"]) for r in runs}
    for seed in range(protocol.seeds) if seeds is None else seeds:
        for b in batches:
            if (seed, b) in done:
                continue
            t0 = time.perf_counter()
            run = run_one(protocol, seed, b, progress=progress)
            runs.append(run)
            log(f"seed {seed} {b}: {time.perf_counter() - t0:.0f} s")
            if out is not None:
                (out / "runs").mkdir(parents=True, exist_ok=True)
                _atomic(out / "runs" / f"seed{seed}_{b}.json", json.dumps(run, default=_jsonable))
                write_outputs(out, protocol, load_runs(out))  # with runs other processes saved
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m verify.claims.largebatch --scale fmnist --out DIR``: run a scale, writing as it goes."""
    ap = argparse.ArgumentParser(prog="python -m verify.claims.largebatch", description=main.__doc__)
    ap.add_argument("--scale", choices=list(PROTOCOLS), default="fmnist")
    ap.add_argument("--data", default=None, help="data spec (the paper scale: cifar10:DIR)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--estimate-only", action="store_true", help="print the cost estimate and stop")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument(
        "--seeds", default=None, help="comma-separated seeds to run in this process (default all)"
    )
    ap.add_argument("--no-estimate", action="store_true", help="skip the timed cost estimate")
    ap.add_argument("--batches", default="small,large", help="which batches this process runs (default both)")
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite the report from the saved runs, run nothing"
    )
    args = ap.parse_args(argv)
    try:
        protocol = protocol_for(args.scale, args.data)
        seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",")]
        est = {} if (args.no_estimate or args.report_only) else estimate_cost(protocol)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if est:
        print(
            f"cost estimate ({protocol.scale}, timed): step {est['step_s_small']:.3f} s small / "
            f"{est['step_s_large']:.3f} s large (all arms); {est['seed_s'] / 60:.1f} min per seed, "
            f"{est['total_s'] / 60:.1f} min for {protocol.seeds} seeds",
            flush=True,
        )
    if args.estimate_only:
        return 0
    if args.report_only:
        rep = write_outputs(args.out, protocol, load_runs(args.out))
        print(f"{len(load_runs(args.out))} saved runs: {rep.get('verdict', 'no verdict')}", flush=True)
        return 0
    t0 = time.perf_counter()
    batches = [b.strip() for b in args.batches.split(",")]
    log = lambda s: print(s, flush=True)  # noqa: E731
    run_protocol(protocol, args.out, resume=not args.no_resume, log=log, seeds=seeds, batches=batches)
    rep = write_outputs(
        args.out, protocol, load_runs(args.out), {"estimate": est, "wall_s": time.perf_counter() - t0}
    )
    print(f"done in {time.perf_counter() - t0:.0f} s: {rep.get('verdict', 'no verdict')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
