"""Figure 3: sharpness along training. Tr H and lambda_max of the average model, Tr(H Xi) and Tr Xi, vs
iteration.

Reads ``metrics.csv`` of the seed-0 runs (logged by the engine every ``sharpness_every`` / ``hess_every``
steps): ``trace_h`` (Hutchinson), ``lambda_max`` (Lanczos) of the training loss at w_a, ``trace_h_xi`` = (1/m)
sum_j d_j^T H(w_a) d_j and ``consensus_distance`` = Tr Xi = (1/m) sum_j ||w_j - w_a||^2. C-SGD has Xi = 0
exactly, so it appears only in the sharpness panels. Dotted verticals: the learning-rate decays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import style
from .captions import Caption, fmt
from .context import FigureContext
from .presets import KEYS, Preset, RunSpec
from .sources import FiguresError, RunData

NAME = "fig3_sharpness"
TITLE = "Figure 3. Sharpness of the average model along training, and the D-SGD curvature term Tr(H Xi)"
ROLES = [(k, "large") for k in KEYS] + [("csgd", "small"), ("ring", "small")]
PANELS = (
    ("trace_h", "Tr H", "Tr H of the training loss at $w_a$", "a"),
    ("lambda_max", r"$\lambda_{\max}$", r"$\lambda_{\max}$ of the training loss at $w_a$", "b"),
    ("trace_h_xi", r"Tr$(H\Xi)$", r"Tr$(H\Xi) = \frac{1}{m}\sum_j d_j^\top H(w_a)\, d_j$", "c"),
    ("consensus_distance", r"Tr $\Xi$ (parameter units$^2$)", r"consensus distance Tr $\Xi$", "d"),
)


def needs(preset: Preset) -> list[RunSpec]:
    return [s for k, b in ROLES if (s := preset.first(k, b)) is not None]


def draw(ctx: FigureContext) -> tuple[Any, Caption]:
    runs = {(k, b): ctx.seed0(k, b) for k, b in ROLES if ctx.preset.first(k, b) is not None}
    for col in ("trace_h", "lambda_max"):
        if not any(r.has(col) for r in runs.values()):
            raise FiguresError(f"no run logged {col!r}: the preset's seed-0 runs need sharpness_every > 0")
    fig, axes = style.subplots(2, 2, width=4.3, height=2.9)
    numbers: dict[str, str] = {}
    dropped: dict[str, int] = {}
    for (col, ylabel, title, letter), ax in zip(PANELS, axes.ravel(), strict=True):
        for (key, batch), run in runs.items():
            if not run.has(col) or (key == "csgd" and col in ("trace_h_xi", "consensus_distance")):
                continue
            steps, v = run.series(col)
            keep = v > 0
            if not keep.all():
                dropped[col] = dropped.get(col, 0) + int((~keep).sum())
            c = run.config
            lab = f"{style.label(key)}, B = {c['local_batch'] * c['workers']}"
            ax.plot(
                steps[keep],
                v[keep],
                color=style.color(key),
                ls="-" if batch == "large" else "--",
                marker=style.marker(key),
                ms=3,
                label=lab,
            )
            numbers[f"{col} at the end, {lab}"] = fmt(v[-1])
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        style.title(ax, letter, title)
        style.plain_log_ticks(ax)
        for t in next(iter(runs.values())).config.get("milestones") or []:
            ax.axvline(t, color="0.55", ls=":", lw=1)
    for col, n in dropped.items():
        numbers[f"{col}: values <= 0 not drawn on the log axis"] = str(n)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncol=3)
    fig.suptitle("Sharpness and consensus along training (solid: large total batch, dashed: small; seed 0)")
    return fig, _caption(ctx, runs, numbers)


def _ratio_note(runs: dict, col: str) -> str:
    d, c = runs.get(("ring", "large")), runs.get(("csgd", "large"))
    if d is None or c is None or not (d.has(col) and c.has(col)):
        return ""
    sd, vd = d.series(col)
    sc, vc = c.series(col)
    common = np.intersect1d(sd, sc)
    r = vd[np.isin(sd, common)] / vc[np.isin(sc, common)]
    return (
        f"{col} of ring D-SGD / C-SGD at the large batch: {fmt(r[-1])} at the end, below 1 at "
        f"{int((r < 1).sum())} of {r.size} measured steps."
    )


def _caption(ctx: FigureContext, runs: dict[tuple[str, str], RunData], numbers: dict[str, str]) -> Caption:
    c = next(iter(runs.values())).config
    settings = {
        "preset": ctx.preset.name,
        "data": c["data"],
        "model": c["model"],
        "Tr H / lambda_max every": c.get("sharpness_every"),
        "Tr(H Xi) every": c.get("hess_every"),
        "Hessian data": f"{c.get('hess_samples') or 'all'} training points, eval mode",
        "lr decays at": c.get("milestones"),
    }
    notes = [n for n in (_ratio_note(runs, "trace_h"), _ratio_note(runs, "lambda_max")) if n]
    return Caption(
        NAME,
        TITLE,
        "(a) Hutchinson estimate of Tr H and (b) the Lanczos top eigenvalue of the full training loss at the "
        "average model w_a, for C-SGD and D-SGD on ring, grid and exponential graphs at the large total "
        "batch "
        "(solid) and C-SGD and ring at the small total batch (dashed); (c) Tr(H Xi), the curvature along the "
        "workers' deviations that D-SGD's implicit regulariser 1/2 Tr(H Xi) penalises, and (d) the consensus "
        "distance Tr Xi, for the D-SGD runs (C-SGD has Xi = 0). Log y axes; dotted verticals: lr decays.",
        settings,
        [],
        numbers,
        notes,
        [ctx.rel(r.path / "metrics.csv") for r in runs.values()],
    )
