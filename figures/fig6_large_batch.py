"""Figure 6: large batch. D-SGD's sharpness regulariser 1/2 Tr(H Xi) grows with the total batch under the
linear scaling rule, C-SGD's gradient-noise term does not; at a fixed learning rate both fall.

Reads the suite's T7 series ``T7_batch.csv`` (paper.md s.3 P7, s.6 T7; quadratic, ring, m = 16, LSR eta =
kappa b): ``B``, ``b``, ``eta``, ``dsgd_half_trace_h_xi`` (+ ``_predicted``, Lyapunov), ``dsgd_trace_xi`` (+
``_se``, ``_predicted``), ``csgd_excess_loss`` (+ ``_se``, ``_exact`` = sum_i eta sigma_i^2 / (2B(2 - eta
h_i)), ~ (eta / 4B) Tr Sigma), ``ratio_dsgd_over_csgd``, ``fixed_eta_trace_xi`` (+ ``_predicted``); and, when
the suite provides them, ``fixed_eta_half_trace_h_xi`` and ``fixed_eta_csgd_excess_loss`` (+ ``_exact``).
Panel (d) reads the preset's ring D-SGD runs at the small and large total batch (seed 0): ``trace_h_xi`` from
``metrics.csv``, averaged over each constant-learning-rate phase.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import style
from .captions import Caption, fmt
from .context import FigureContext
from .presets import Preset, RunSpec
from .slopes import Slope, draw_fit, draw_predicted, fit_slope, style_legend_entries
from .sources import RunData

NAME = "fig6_large_batch"
TITLE = "Figure 6. Large batch: D-SGD's regulariser 1/2 Tr(H Xi) vs C-SGD's noise term, with and without LSR"
CHECKS = ("T7",)
COLUMNS = (
    "B",
    "eta",
    "dsgd_half_trace_h_xi",
    "dsgd_half_trace_h_xi_predicted",
    "csgd_excess_loss",
    "csgd_excess_loss_exact",
    "ratio_dsgd_over_csgd",
    "fixed_eta_trace_xi",
    "fixed_eta_trace_xi_predicted",
)
D, C = style.color("ring"), style.color("csgd")


def needs(preset: Preset) -> list[RunSpec]:
    return [s for b in ("small", "large") if (s := preset.first("ring", b)) is not None]


def _pair(
    ax: Any,
    B: np.ndarray,
    y: np.ndarray,
    pred: np.ndarray,
    color: str,
    mk: str,
    lab: str,
    yerr: np.ndarray | None = None,
    open_marker: bool = False,
) -> None:
    ax.errorbar(
        B, y, yerr=yerr, fmt=mk, color=color, mfc="none" if open_marker else color, capsize=2, label=lab
    )
    ax.plot(B, pred, color=color, lw=0.9, alpha=0.8)


def phase_means(run: RunData, column: str = "trace_h_xi") -> dict[int, tuple[float, float]]:
    """Phase index k -> ``(lr, mean of column)`` over each constant-learning-rate phase after warm-up (phase k
    runs at ``lr * 0.1^k``), at the steps where the column was logged; phases without a value are left out."""
    steps, v = run.series(column)
    c = run.config
    edges = [int(c.get("warmup") or 0)] + [int(t) for t in c.get("milestones") or []] + [int(c["steps"]) + 1]
    out = {}
    for k, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        sel = (steps > a) & (steps <= b)
        if sel.any():
            out[k] = (float(c["lr"]) * 0.1**k, float(v[sel].mean()))
    return out


def draw(ctx: FigureContext) -> tuple[Any, Caption]:
    rep = ctx.report()
    t = rep.series("T7", "batch", COLUMNS)
    meas = rep.measured("T7")
    B = t["B"]
    fig, axes = style.subplots(2, 2, width=4.0, height=3.1)
    slopes: list[Slope] = []

    ax = axes[0, 0]
    sd = fit_slope(
        B,
        t["dsgd_half_trace_h_xi"],
        "LSR: D-SGD 1/2 Tr(H Xi) vs total batch B",
        1.0,
        meas.get("dsgd_half_trace_h_xi_slope"),
    )
    sc = fit_slope(
        B,
        t["csgd_excess_loss"],
        "LSR: C-SGD excess loss vs total batch B",
        0.0,
        meas.get("csgd_excess_loss_slope"),
    )
    _pair(
        ax,
        B,
        t["dsgd_half_trace_h_xi"],
        t["dsgd_half_trace_h_xi_predicted"],
        D,
        "o",
        r"D-SGD ring: $\frac{1}{2}$Tr$(H\Xi)$, " + sd.tag,
    )
    _pair(
        ax,
        B,
        t["csgd_excess_loss"],
        t["csgd_excess_loss_exact"],
        C,
        "s",
        r"C-SGD: excess loss $\approx \frac{\eta}{4B}$Tr$\Sigma$, " + sc.tag,
        t.get("csgd_excess_loss_se"),
    )
    draw_fit(ax, sd, D, "")
    draw_fit(ax, sc, C, "")
    draw_predicted(ax, B, t["dsgd_half_trace_h_xi"], 1.0, "")
    draw_predicted(ax, B, t["csgd_excess_loss"], 0.0, "")
    ax.plot(
        [], [], color="0.3", lw=0.9, alpha=0.8, label="thin: exact prediction (Lyapunov / discrete C-SGD)"
    )
    style_legend_entries(ax)
    slopes += [sd, sc]
    ax.set_ylabel("loss units")
    style.title(ax, "a", r"linear scaling rule: $\eta \propto B$")
    ax.legend(fontsize=6.0, loc="upper left")

    ax = axes[0, 1]
    sf = fit_slope(
        B,
        t["fixed_eta_trace_xi"],
        "fixed eta: D-SGD Tr Xi vs total batch B",
        -1.0,
        rep.check("T7").get("control", {}).get("measured", {}).get("fixed_eta_trace_xi_slope"),
    )
    _pair(
        ax,
        B,
        t["fixed_eta_trace_xi"],
        t["fixed_eta_trace_xi_predicted"],
        D,
        "o",
        r"D-SGD ring: Tr $\Xi$, " + sf.tag,
        open_marker=True,
    )
    draw_fit(ax, sf, D, "")
    slopes.append(sf)
    if "fixed_eta_half_trace_h_xi" in t:
        _pair(
            ax,
            B,
            t["fixed_eta_half_trace_h_xi"],
            t.get("fixed_eta_half_trace_h_xi_predicted", t["fixed_eta_half_trace_h_xi"]),
            D,
            "D",
            r"D-SGD: $\frac{1}{2}$Tr$(H\Xi)$",
            open_marker=True,
        )
        slopes.append(
            fit_slope(B, t["fixed_eta_half_trace_h_xi"], "fixed eta: D-SGD 1/2 Tr(H Xi) vs B", -1.0)
        )
    if "fixed_eta_csgd_excess_loss" in t:
        _pair(
            ax,
            B,
            t["fixed_eta_csgd_excess_loss"],
            t.get("fixed_eta_csgd_excess_loss_exact", t["fixed_eta_csgd_excess_loss"]),
            C,
            "s",
            "C-SGD: excess loss",
            open_marker=True,
        )
        slopes.append(
            fit_slope(B, t["fixed_eta_csgd_excess_loss"], "fixed eta: C-SGD excess loss vs B", -1.0)
        )
    draw_predicted(ax, B, t["fixed_eta_trace_xi"], -1.0, "")
    style_legend_entries(ax)
    ax.set_ylabel(r"Tr $\Xi$ (parameter units$^2$)")
    style.title(ax, "b", "control: fixed learning rate (no LSR)")
    ax.legend(fontsize=6.3, loc="upper right")

    ax = axes[1, 0]
    sr = fit_slope(B, t["ratio_dsgd_over_csgd"], "LSR: ratio (1/2 Tr(H Xi)) / (C-SGD excess loss) vs B", 1.0)
    ax.plot(B, t["ratio_dsgd_over_csgd"], "o-", color=D, label="measured, " + sr.tag)
    slopes.append(sr)
    draw_predicted(ax, B, t["ratio_dsgd_over_csgd"], 1.0, "predicted slope 1 (small-eta law)")
    ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
    ax.set_ylabel("D-SGD regulariser / C-SGD noise term")
    style.title(ax, "c", "ratio of the two terms in (a)")
    ax.legend(fontsize=6.5, loc="upper left")
    for a in axes.ravel()[:3]:
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("total batch B = m b (m = 16)")
        style.data_ticks(a, B)
        style.plain_log_ticks(a)
    numbers = {
        "T7 verdict": str(rep.check("T7").get("verdict")),
        "D-SGD largest |simulation / Lyapunov - 1|": fmt(
            meas.get("dsgd_max_relative_error_vs_lyapunov", float("nan"))
        ),
    }
    sources = [ctx.rel(rep.path / "T7_batch.csv")]
    _runs_panel(axes[1, 1], ctx, slopes, numbers, sources)
    fig.suptitle(
        "Large total batch on a quadratic (ring, m = 16): sharpness regularisation of D-SGD vs C-SGD"
    )
    missing = [c for c in ("fixed_eta_half_trace_h_xi", "fixed_eta_csgd_excess_loss") if c not in t]
    notes = (
        [f"The suite's T7 series has no {' / '.join(missing)}: panel (b) shows D-SGD's Tr Xi only."]
        if missing
        else []
    )
    return fig, Caption(
        NAME,
        TITLE,
        "(a) Under the linear scaling rule (eta = kappa b, kappa = 0.01/8), the time-averaged regulariser "
        "1/2 Tr(H Xi) of ring D-SGD (vermillion) and C-SGD's stationary excess loss E[L - L*] (black, the "
        "gradient-noise term ~ (eta/4B) Tr Sigma) against the total batch B; thin lines: exact predictions "
        "(Lyapunov; discrete C-SGD formula). (b) the negative control at a fixed eta: D-SGD's Tr Xi falls "
        "as 1/B. "
        "(c) the ratio of the two terms in (a). (d) the same quantity on the preset's neural-network runs: "
        "Tr(H Xi) of ring D-SGD averaged over each constant-lr phase, small vs large total batch (LSR).",
        dict(rep.check("T7").get("settings") or {}),
        slopes,
        numbers,
        notes,
        sources,
    )


def _runs_panel(ax: Any, ctx: FigureContext, slopes: list, numbers: dict, sources: list) -> None:
    runs = [ctx.seed0("ring", b) for b in ("small", "large")]
    per = [phase_means(r) for r in runs]
    Bs = [r.config["local_batch"] * r.config["workers"] for r in runs]
    allpos = True
    for i, k in enumerate(sorted(set(per[0]) & set(per[1]))):
        y = [0.5 * p[k][1] for p in per]
        lab = f"phase {k + 1}: lr {per[0][k][0]:g} -> {per[1][k][0]:g}"
        if min(y) > 0:
            s = fit_slope(
                Bs,
                y,
                f"{ctx.preset.name} runs, ring, lr phase {k + 1}: 1/2 Tr(H Xi) vs B (LSR, 2 points)",
                1.0,
            )
            slopes.append(s)
            lab += f", {s.tag}"
        else:
            allpos = False
            lab += ", not > 0: no log slope"
        ax.plot(Bs, y, "o-", color=style.color("ring"), alpha=max(0.3, 1.0 - 0.3 * i), lw=1.2, label=lab)
        numbers[f"{ctx.preset.name} runs, lr phase {k + 1}: 1/2 Tr(H Xi) at B = {Bs[0]} / {Bs[1]}"] = (
            f"{fmt(y[0])} / {fmt(y[1])}"
        )
    ax.set_xscale("log", base=2)
    if allpos:
        ax.set_yscale("log")
    else:
        ax.axhline(0.0, color="0.5", lw=0.8, ls=":")
        numbers["panel (d)"] = (
            "some phase means of Tr(H Xi) are <= 0 (negative curvature along Xi): linear y axis"
        )
    style.data_ticks(ax, Bs)
    ax.set_xlabel("total batch B (LSR)")
    ax.set_ylabel(r"$\frac{1}{2}$Tr$(H\Xi)$, phase mean")
    style.title(ax, "d", f"{ctx.preset.name} preset runs: ring D-SGD, seed 0")
    ax.legend(fontsize=6.3)
    sources += [ctx.rel(r.path / "metrics.csv") for r in runs]
