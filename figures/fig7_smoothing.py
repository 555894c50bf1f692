"""Figure 7: gradient smoothing. The Lipschitz constant of the smoothed gradient falls as 1/sigma; the raw
loss's gradient has none.

Reads the suite's T8 series (paper.md s.3 P8, s.6 T8) on ``AbsLoss`` ``L(w) = sum_k |u_k^T w - b_k|``:
``T8_beta.csv`` (``sigma``, ``beta_1``, ``bound_1``, ``beta_15``, ``bound_15``: ``beta(sigma) = sup_w
lambda_max(nabla^2 L_Sigma(w))`` for Sigma = sigma^2 I with one and with 15 kinks, and the bound
``sqrt(2/pi) sum_k ||u_k|| / sigma``) and ``T8_difference_ratio.csv`` (``h``, ``smoothed``, ``raw``,
``xi_orthogonal``, ``xi_along_u``: ``||g(w + h e) - g(w - h e)|| / 2h`` across a kink).
"""

from __future__ import annotations

from typing import Any

from . import style
from .captions import Caption, fmt
from .context import FigureContext
from .presets import Preset, RunSpec
from .slopes import draw_fit, draw_predicted, fit_slope

NAME = "fig7_smoothing"
TITLE = "Figure 7. Gradient smoothing: the smoothed gradient's Lipschitz constant scales as 1/sigma"
CHECKS = ("T8",)
SMOOTH = style.color("avgsam")


def needs(preset: Preset) -> list[RunSpec]:
    return []


def draw(ctx: FigureContext) -> tuple[Any, Caption]:
    rep = ctx.report()
    beta = rep.series("T8", "beta", ("sigma", "beta_1", "bound_1", "beta_15", "bound_15"))
    diff = rep.series("T8", "difference_ratio", ("h", "smoothed", "raw", "xi_orthogonal", "xi_along_u"))
    suite = rep.measured("T8")
    fig, axes = style.subplots(1, 2, width=3.9, height=3.1)
    ax = axes[0, 0]
    s1 = fit_slope(
        beta["sigma"], beta["beta_1"], "beta vs sigma, one kink", -1.0, suite.get("beta_single_kink_slope")
    )
    s15 = fit_slope(
        beta["sigma"], beta["beta_15"], "beta vs sigma, 15 kinks", -1.0, suite.get("beta_15_kinks_slope")
    )
    ax.loglog(beta["sigma"], beta["beta_1"], "o", color=SMOOTH, label="one kink: measured beta")
    ax.loglog(beta["sigma"], beta["bound_1"], ":", color=SMOOTH, lw=1.2, label="one kink: bound")
    ax.loglog(beta["sigma"], beta["beta_15"], "^", color=SMOOTH, mfc="none", label="15 kinks: measured beta")
    ax.loglog(beta["sigma"], beta["bound_15"], "-.", color=SMOOTH, lw=1.0, label="15 kinks: bound")
    draw_fit(ax, s1, SMOOTH, f"fit, one kink: slope {s1.shown}")
    draw_predicted(ax, beta["sigma"], beta["beta_1"], -1.0, "predicted slope -1")
    ax.set_xlabel(r"smoothing scale $\sigma$ ($\Xi = \sigma^2 I$)")
    ax.set_ylabel(r"$\beta(\sigma) = \sup_w \lambda_{\max}(\nabla^2 L_\Xi(w))$")
    style.title(ax, "a", "Lipschitz constant of the smoothed gradient")
    ax.legend(loc="lower left")

    ax = axes[0, 1]
    h = diff["h"]
    lines = {
        "raw": ("raw loss L (no smoothing)", style.CONTROL_COLOR, "s", "-"),
        "xi_orthogonal": (
            r"$\Xi$ of rank 15, range $\perp u$ but $10^{-12}$ along $u$",
            style.CONTROL_COLOR,
            "x",
            "--",
        ),
        "smoothed": (r"smoothed, $\Xi = \sigma^2 I$, $\sigma = 10^{-2}$", SMOOTH, "o", "-"),
        "xi_along_u": (r"smoothed, rank-1 $\Xi$ along $u$", SMOOTH, "D", "--"),
    }
    plain = {
        "raw": "raw loss L",
        "xi_orthogonal": "Xi of rank 15, orthogonal to u but for a 1e-12 component along it",
        "smoothed": "smoothed, Xi = sigma^2 I, sigma = 0.01",
        "xi_along_u": "smoothed, rank-1 Xi along u",
    }
    slopes = {k: fit_slope(h, diff[k], f"difference ratio vs h, {plain[k]}") for k in lines}
    slopes["raw"].predicted = -1.0
    slopes["xi_orthogonal"].predicted = -1.0
    slopes["smoothed"].predicted = 0.0
    for k, (lab, c, mk, ls) in lines.items():
        ax.loglog(
            h,
            diff[k],
            marker=mk,
            ls=ls,
            color=c,
            mfc="none" if k != "smoothed" else c,
            label=f"{lab} (slope {slopes[k].shown})",
        )
    draw_predicted(ax, h, diff["raw"], -1.0, "slope -1 (unbounded)")
    ax.set_xlabel("finite-difference step h across the kink")
    ax.set_ylabel(r"$\|g(w+he) - g(w-he)\| / 2h$")
    style.title(ax, "b", "Gradient change across a kink")
    ax.legend(loc="upper right", fontsize=6.8)
    fig.suptitle(
        r"Average-direction SAM smooths the gradient, but only along the range of $\Xi$ (AbsLoss, d = 10)"
    )
    numbers = {
        "max beta / bound over all samples": fmt(
            max(max(beta["beta_1"] / beta["bound_1"]), max(beta["beta_15"] / beta["bound_15"]))
        ),
        "smoothed ratio at the smallest h": fmt(diff["smoothed"][0]),
        "raw ratio at the smallest h": fmt(diff["raw"][0]),
        "T8 verdict": str(rep.check("T8").get("verdict")),
    }
    settings = {k: v for k, v in (rep.check("T8").get("settings") or {}).items()}
    caption = Caption(
        NAME,
        TITLE,
        "(a) beta(sigma), the largest Hessian eigenvalue of the Gaussian-smoothed loss L_Xi(w) = E L(w + "
        "eps), "
        "eps ~ N(0, sigma^2 I), over points near the kinks of L(w) = sum_k |u_k^T w - b_k|, against sigma "
        "(log-log), for one kink and for 15 kinks, with the bound sqrt(2/pi) sum_k ||u_k|| / sigma; the "
        "fitted "
        "slope (solid) and the predicted slope -1 (dashed). (b) the finite-difference ratio of the gradient "
        "across one kink against the step h: the raw loss grows as 1/h (no Lipschitz gradient), the smoothed "
        "one stays flat; a degenerate Xi whose range is orthogonal to u smooths nothing (D-SGD's Xi has rank "
        "<= m - 1). Blue: smoothed (average-direction SAM); grey: controls.",
        settings,
        [s1, s15] + list(slopes.values()),
        numbers,
        [],
        [ctx.rel(rep.path / "T8_beta.csv"), ctx.rel(rep.path / "T8_difference_ratio.csv")],
    )
    return fig, caption
