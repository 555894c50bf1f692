"""Figure 8: uncertainty. Calibration and NLL of the D-SGD worker ensemble vs the average model, and what
shape the weight diversity matrix Xi actually has.

(a) reliability diagram on the test split: accuracy against mean confidence in equal-width confidence bins,
for the average model w_a and the worker ensemble (mean of the m workers' softmax) of ring D-SGD at the large
batch, and for C-SGD, computed from the runs' ``ckpt.pt`` / ``avg.pt``
(:func:`figures.checkpoints.worker_probabilities`); (b) test NLL along training from ``metrics.csv``
(``ensemble_nll``, ``avg_nll``); (c) the suite's T10 measurement (paper.md s.3 P10): Frobenius cosines of the
time-averaged Xi with the gradient-noise covariance, H, the Lyapunov prediction, the exact posterior
covariance and I (``report.json``, T10 ``measured`` and ``control``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from verify.claims.t10_uncertainty import BAR
from verify.measures import ece

from . import style
from .captions import Caption
from .checkpoints import worker_probabilities
from .context import FigureContext
from .presets import Preset, RunSpec
from .sources import RunData

NAME = "fig8_uncertainty"
TITLE = "Figure 8. Uncertainty: worker ensemble vs average model, and the shape of Xi"
CHECKS = ("T10",)
BINS = 10
COSINES = (
    ("cos_xi_gradient_noise", r"$\Sigma_g$: gradient noise"),
    ("cos_xi_H", "H: Hessian"),
    ("cos_xi_lyapunov_prediction", "Lyapunov prediction"),
    ("cos_xi_identity", "I: isotropic"),
    ("cos_xi_posterior", r"$\Sigma_{post}$: posterior"),
)
MIN_BIN = 5


def needs(preset: Preset) -> list[RunSpec]:
    return [s for k in ("ring", "csgd") if (s := preset.first(k, "large")) is not None]


def reliability(probs: torch.Tensor, y: torch.Tensor, bins: int = BINS) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin ((b/B, (b+1)/B], the first closed at 0): mean confidence, accuracy and
    count."""
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    idx = torch.clamp(torch.ceil(conf * bins).long() - 1, 0, bins - 1)
    out = {"conf": np.full(bins, np.nan), "acc": np.full(bins, np.nan), "n": np.zeros(bins)}
    for b in range(bins):
        sel = idx == b
        if sel.any():
            out["conf"][b], out["acc"][b] = float(conf[sel].mean()), float(correct[sel].mean())
            out["n"][b] = int(sel.sum())
    return out


def scores(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy, NLL and 15-bin ECE (the engine's :func:`verify.measures.ece`)."""
    nll = float(-torch.log(probs.gather(1, y.reshape(-1, 1)).clamp_min(1e-300)).mean())
    return {"acc": float((probs.argmax(1) == y).double().mean()), "nll": nll, "ece": ece(probs, y)}


def _label(run: RunData, key: str) -> str:
    c = run.config
    return f"{style.label(key)}, B = {c['local_batch'] * c['workers']}"


def draw(ctx: FigureContext) -> tuple[Any, Caption]:
    ring, csgd = ctx.seed0("ring", "large"), ctx.seed0("csgd", "large")
    P, p_avg, y = worker_probabilities(ring, ctx.device)
    _, c_avg, yc = worker_probabilities(csgd, ctx.device)
    models = {
        f"{_label(ring, 'ring')}: worker ensemble": (P.mean(0), y, style.color("ring"), "--", "^"),
        f"{_label(ring, 'ring')}: average model $w_a$": (p_avg, y, style.color("ring"), "-", "o"),
        f"{_label(csgd, 'csgd')}: model": (c_avg, yc, style.color("csgd"), "-", "s"),
    }
    fig, axes = style.subplots(1, 3, width=3.7, height=3.3)
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1, label="perfect calibration")
    numbers: dict[str, str] = {}
    for lab, (pr, yy, c, ls, mk) in models.items():
        r = reliability(pr, yy)
        ok = r["n"] >= MIN_BIN
        sc = scores(pr, yy)
        ax.plot(
            r["conf"][ok],
            r["acc"][ok],
            color=c,
            ls=ls,
            marker=mk,
            ms=4,
            label=f"{lab.replace(': ', chr(10), 1)} (ECE {sc['ece']:.3f})",
        )
        numbers[lab.replace("$w_a$", "w_a")] = (
            f"test accuracy {100 * sc['acc']:.2f} %, NLL {sc['nll']:.4f}, ECE (15 bins) {sc['ece']:.4f}"
        )
    ax.set_xlabel("confidence (max softmax probability)")
    ax.set_ylabel("accuracy in the bin")
    style.title(ax, "a", f"reliability, test split ({BINS} bins, >= {MIN_BIN} points)")
    ax.legend(fontsize=6.0, loc="upper left")

    ax = axes[0, 1]
    for run, key in ((ring, "ring"), (csgd, "csgd")):
        s, v = run.series("avg_nll")
        ax.plot(s, v, color=style.color(key), label=f"{_label(run, key)}: average model")
        if key != "csgd" and run.has("ensemble_nll"):
            s, v = run.series("ensemble_nll")
            ax.plot(s, v, color=style.color(key), ls="--", label=f"{_label(run, key)}: worker ensemble")
    late = [
        run.series(c)[1][len(run.series(c)[1]) // 10 :]
        for run in (ring, csgd)
        for c in ("avg_nll", "ensemble_nll")
        if run.has(c)
    ]
    lo, hi = min(v.min() for v in late), max(v.max() for v in late)
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_xlabel("iteration")
    ax.set_ylabel("test NLL (nats per example)")
    style.title(ax, "b", "test NLL (y zoomed past the first 10%)")
    ax.legend(fontsize=6.3)
    _cosine_panel(axes[0, 2], ctx, numbers)
    fig.suptitle("Does D-SGD give uncertainty for free? Ensemble calibration, and the shape of Xi")
    c = ring.config
    settings = {
        "preset": ctx.preset.name,
        "data": c["data"],
        "model": c["model"],
        "workers": c["workers"],
        "ring / C-SGD total batch": c["local_batch"] * c["workers"],
        "steps": c["steps"],
        "reliability bins": BINS,
        "ECE": "15 equal-width bins (verify.measures.ece)",
    }
    sources = [ctx.rel(ring.path / "ckpt.pt"), ctx.rel(csgd.path / "avg.pt")]
    if (ctx.report_dir / "report.json").is_file():
        sources.append(ctx.rel(ctx.report_dir / "report.json"))
    return fig, Caption(
        NAME,
        TITLE,
        f"(a) Reliability diagram on the test split: accuracy against mean confidence per confidence bin "
        f"(bins "
        f"with fewer than {MIN_BIN} test points not drawn) for the "
        "ring D-SGD worker ensemble (mean of the 16 workers' softmax, dashed), its average model w_a "
        "(solid) and "
        "the C-SGD model (black), from the final checkpoints. (b) test NLL along training. (c) the suite's "
        "T10 "
        "(Bayesian linear regression, ring D-SGD): Frobenius cosine of the time-averaged Xi with each "
        "candidate "
        "shape; the paper reads Xi as the posterior covariance, the linear-Gaussian analysis predicts the "
        "gradient-noise covariance. Grey bar: negative control (isotropic additive noise).",
        settings,
        [],
        numbers,
        _notes(ctx),
        sources,
    )


def _cosine_panel(ax: Any, ctx: FigureContext, numbers: dict[str, str]) -> None:
    rep = ctx.report()
    chk = rep.check("T10")
    meas = chk.get("measured") or {}
    ctrl = (chk.get("control") or {}).get("measured") or {}
    items = [(lab, meas[k]) for k, lab in COSINES if k in meas]
    if "isotropic_noise_cos_xi_gradient_noise" in ctrl:
        items.append(
            (r"$\Sigma_g$ [control: isotropic noise]", ctrl["isotropic_noise_cos_xi_gradient_noise"])
        )
    cols = [style.color("ring")] * (len(items) - 1) + [style.CONTROL_COLOR]
    labels = [lab for lab, _ in items]
    if COSINES[-1][1] in labels:
        cols[labels.index(COSINES[-1][1])] = style.OKABE_ITO["reddish_purple"]
    y = np.arange(len(items))[::-1]
    ax.barh(y, [v for _, v in items], color=cols, height=0.6)
    for yi, (lab, v) in zip(y, items, strict=True):
        ax.text(
            v + 0.01 if v < 0.85 else v - 0.01,
            yi,
            f"{v:.3f}",
            va="center",
            ha="left" if v < 0.85 else "right",
            fontsize=7,
            color="k" if v < 0.85 else "w",
        )
        numbers[f"T10 cos(Xi, {_plain(lab)})"] = f"{v:.4f}"
    ax.set_yticks(y, [f"cos($\\Xi$, {lab})" for lab, _ in items], fontsize=7)
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("Frobenius cosine with the time-averaged $\\Xi$")
    ax.grid(axis="y", visible=False)
    style.title(ax, "c", f"shape of $\\Xi$ (T10: {chk.get('verdict')})")
    numbers["T10 verdict"] = str(chk.get("verdict"))


def _plain(label: str) -> str:
    return label.replace(r"$\Sigma_g$", "Sigma_g").replace(r"$\Sigma_{post}$", "Sigma_post").replace("$", "")


def _notes(ctx: FigureContext) -> list[str]:
    rep = ctx.report()
    meas = rep.measured("T10")
    out = []
    if "cos_xi_posterior" in meas and "cos_xi_gradient_noise" in meas:
        out.append(
            f"Xi has cosine {meas['cos_xi_gradient_noise']:.3f} with the gradient-noise covariance and "
            f"{meas['cos_xi_posterior']:.3f} with the posterior covariance: "
            + (
                "the measurement supports the paper's reading 'Xi ~ posterior covariance'."
                if meas["cos_xi_posterior"] > BAR  # T10's own bar
                else "the measurement does not support the paper's reading 'Xi ~ posterior covariance'."
            )
        )
    return out
