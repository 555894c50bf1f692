"""Figure 2: the loss landscape around the C-SGD and D-SGD average models, at a small and a large total batch.

The paper's Figure 3 (Li et al. 2018 visualisation): ``L(w_a + alpha d1 + beta d2)`` on a grid, along two
filter-normalised Gaussian directions (the same seeds for every model, each normalised to its own weights), as
3-D surfaces and contours on one shared height/colour scale, and the 1-D slice ``L(w_a + alpha d1)``. Each
panel gives Tr H (Hutchinson, ± standard error) and lambda_max (Lanczos, ± residual ||Hv - lambda v||) of the
same loss. Computed from each run's ``avg.pt`` and its training data (:mod:`figures.checkpoints`); the numbers
are cached in ``<out>/.cache`` keyed by the checkpoint's size and time and the settings, so re-drawing is
cheap.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from matplotlib import colors

from sharpness.at_point import sharpness_at as sharpness_of
from sharpness.landscape import loss_line, loss_surface
from sharpness.results import jsonable, write_json

from . import style
from .captions import Caption, fmt
from .checkpoints import average_loss
from .context import FigureContext
from .presets import Preset, RunSpec
from .sources import RunData

NAME = "fig2_landscape"
TITLE = "Figure 2. Loss landscape around the C-SGD and D-SGD (ring) minima at a small and a large total batch"
PANELS = (("csgd", "small"), ("ring", "small"), ("csgd", "large"), ("ring", "large"))
DIRECTION_SEED = 0
CMAP = "viridis"


def needs(preset: Preset) -> list[RunSpec]:
    return [s for k, b in PANELS if (s := preset.first(k, b)) is not None]


def landscape(run: RunData, settings: dict[str, Any], device: str, cache_dir: Any) -> dict[str, Any]:
    """Surface, line and sharpness of one run's average model (cached). Cost: grid^2 + line forward passes
    over the data, plus ``trace_probes`` HVPs and the Lanczos iterations."""
    avg = run.path / "avg.pt"
    st = avg.stat() if avg.is_file() else None
    key = {
        "avg": str(avg.resolve()),
        "size": st.st_size if st else None,
        "mtime": st.st_mtime_ns if st else None,
        "settings": settings,
        "seed": DIRECTION_SEED,
    }
    cache = cache_dir / f"{NAME}-{run.name}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == jsonable(key):
            return saved["value"]
    fl = average_loss(run, settings["samples"], device)
    span = float(settings["span"])
    grid = np.linspace(-span, span, int(settings["grid"])).tolist()
    line = np.linspace(-span, span, int(settings["line"])).tolist()
    surf = loss_surface(fl, alphas=grid, betas=grid, seed=DIRECTION_SEED)
    ln = loss_line(fl, alphas=line, seed=DIRECTION_SEED)
    sh = sharpness_of(fl, settings["trace_probes"], settings["lanczos_tol"], seed=DIRECTION_SEED)
    value = {
        "grid": grid,
        "surface": surf.losses,
        "line_alphas": line,
        "line": ln.losses,
        "base": surf.base_loss,
        "trace": sh.trace,
        "trace_se": sh.trace_se,
        "lmax": sh.lmax,
        "lmax_err": sh.lmax_err,
        "n_hvp": sh.n_hvp,
        "num_params": fl.num_params,
    }
    write_json(cache, {"key": key, "value": value})
    return value


def nice_ticks(lo: float, hi: float, most: int = 6) -> np.ndarray:
    """Round values ``{1, 2, 5} x 10^k`` inside ``[lo, hi]``, thinned to at most ``most``."""
    ks = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
    t = np.array([m * 10.0**k for k in ks for m in (1, 2, 5) if lo <= m * 10.0**k <= hi])
    while t.size > most:
        t = t[::2]
    return t


def _label(run: RunData, key: str) -> str:
    c = run.config
    return f"{style.label(key)}, total batch {c['local_batch'] * c['workers']}"


def _stats(v: dict[str, Any]) -> str:
    return (
        f"Tr H = {fmt(v['trace'])} ± {fmt(v['trace_se'], 2)}\n"
        f"$\\lambda_{{\\max}}$ = {fmt(v['lmax'])} ± {fmt(v['lmax_err'], 2)}"
    )


def draw(ctx: FigureContext) -> tuple[Any, Caption]:
    settings = dict(ctx.preset.landscape)
    runs = [ctx.seed0(k, b) for k, b in PANELS]
    vals = [landscape(r, settings, ctx.device, ctx.out / ".cache") for r in runs]
    Z = [np.asarray(v["surface"], dtype=float) for v in vals]
    lo = max(min(float(z.min()) for z in Z), 1e-6)
    hi = max(float(z.max()) for z in Z)
    norm = colors.LogNorm(lo, hi)
    levels = np.geomspace(lo, hi, 22)
    ticks = nice_ticks(lo, hi)
    with style.look():
        fig = style.plt.figure(figsize=(14.5, 10.2))
    gs = fig.add_gridspec(3, 4, height_ratios=[1.15, 1.0, 0.9])
    g = np.asarray(vals[0]["grid"])
    A, B = np.meshgrid(g, g, indexing="ij")
    cs, contour_axes = None, []
    for i, (run, v, z, (key, _)) in enumerate(zip(runs, vals, Z, PANELS, strict=True)):
        ax3 = fig.add_subplot(gs[0, i], projection="3d")
        ax3.plot_surface(
            A,
            B,
            np.log10(z),
            cmap=CMAP,
            norm=colors.Normalize(np.log10(lo), np.log10(hi)),
            linewidth=0,
            antialiased=True,
            rcount=z.shape[0],
            ccount=z.shape[1],
        )
        ax3.set_zlim(np.log10(lo), np.log10(hi))
        ax3.set_zticks(np.log10(ticks), [f"{t:g}" for t in ticks])
        ax3.set_xticks([g[0], 0, g[-1]])
        ax3.set_yticks([g[0], 0, g[-1]])
        ax3.set_xlabel(r"$\alpha$", labelpad=-8)
        ax3.set_ylabel(r"$\beta$", labelpad=-8)
        ax3.set_zlabel("loss (log axis)", labelpad=-4)
        ax3.tick_params(labelsize=6.5, pad=-2)
        ax3.set_title(f"({'abcd'[i]}) {_label(run, key)}\n{_stats(v)}", fontsize=8.5, color=style.color(key))
        ax = fig.add_subplot(gs[1, i])
        contour_axes.append(ax)
        cs = ax.contourf(g, g, z.T, levels=levels, norm=norm, cmap=CMAP)
        ax.contour(g, g, z.T, levels=levels, colors="k", linewidths=0.25)
        ax.plot([0], [0], marker="*", color="w", mec="k", ms=10)
        ax.set_xlabel(r"$\alpha$ (direction 1, filter-normalised)")
        ax.set_ylabel(r"$\beta$ (direction 2)")
        ax.set_aspect("equal")
        ax.grid(False)
        style.title(ax, "efgh"[i], f"contours: {_label(run, key)}", fontsize=8, color=style.color(key))
    cb = fig.colorbar(cs, ax=contour_axes, label="training loss (log colour scale, shared)", shrink=0.9)
    cb.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    cb.minorticks_off()
    for j, batch in enumerate(("small", "large")):
        ax = fig.add_subplot(gs[2, 2 * j : 2 * j + 2])
        for run, v, (key, b) in zip(runs, vals, PANELS, strict=True):
            if b != batch:
                continue
            ax.semilogy(
                v["line_alphas"],
                v["line"],
                color=style.color(key),
                marker=style.marker(key),
                ms=3,
                markevery=4,
                label=f"{_label(run, key)}: Tr H {fmt(v['trace'])}, $\\lambda_{{\\max}}$ {fmt(v['lmax'])}",
            )
        ax.set_ylim(lo, hi)
        ax.set_xlabel(r"$\alpha$ along direction 1 (filter-normalised)")
        ax.set_ylabel("training loss")
        style.title(ax, "ij"[j], f"1-D slice, {batch} total batch")
        ax.legend(loc="upper center")
    fig.suptitle(
        r"Training loss $L(w_a + \alpha d_1 + \beta d_2)$ around the average model (Li et al. 2018 "
        "directions, same seeds for every model)"
    )
    return fig, _caption(ctx, runs, vals, settings)


def compare(d: dict[str, float], c: dict[str, float]) -> str:
    """``flatter`` / ``sharper`` when Tr H and lambda_max of D-SGD (``d``) both differ from C-SGD's (``c``)
    in the same direction by more than twice their combined errors; else which measure separates them."""
    names = ("Tr H", "lambda_max")
    signs = []
    for v, e in (("trace", "trace_se"), ("lmax", "lmax_err")):
        diff, err = d[v] - c[v], 2 * float(np.hypot(d[e], c[e]))
        signs.append(0 if abs(diff) <= err else int(np.sign(diff)))
    if signs[0] == signs[1]:
        return {-1: "flatter", 1: "sharper", 0: "indistinguishable (both within 2 errors)"}[signs[0]]
    if 0 in signs:
        k = 1 - signs.index(0)
        word = "flatter" if signs[k] < 0 else "sharper"
        return f"{word} by {names[k]} only ({names[1 - k]} within 2 errors)"
    return "mixed (the two measures disagree)"


def _caption(ctx: FigureContext, runs: list[RunData], vals: list[dict], settings: dict) -> Caption:
    numbers = {}
    for run, v, (key, _) in zip(runs, vals, PANELS, strict=True):
        numbers[_label(run, key)] = (
            f"L(w_a) = {fmt(v['base'])}; Tr H = {fmt(v['trace'])} ± {fmt(v['trace_se'], 2)}; lambda_max = "
            f"{fmt(v['lmax'])} ± {fmt(v['lmax_err'], 2)}; loss at the grid corners (mean) = "
            f"{fmt(np.mean(np.asarray(v['surface'])[[0, 0, -1, -1], [0, -1, 0, -1]]))}"
        )
    ratio = {b: vals[2 * i + 1]["lmax"] / vals[2 * i]["lmax"] for i, b in enumerate(("small", "large"))}
    tr_ratio = {b: vals[2 * i + 1]["trace"] / vals[2 * i]["trace"] for i, b in enumerate(("small", "large"))}
    verdict = {b: compare(vals[2 * i + 1], vals[2 * i]) for i, b in enumerate(("small", "large"))}
    notes = [
        f"lambda_max(D-SGD) / lambda_max(C-SGD) = {fmt(ratio['small'])} at the small and "
        f"{fmt(ratio['large'])} "
        f"at the large batch; Tr H ratios {fmt(tr_ratio['small'])} and {fmt(tr_ratio['large'])}. By these "
        f"measures the D-SGD minimum is {verdict['small']} at the small batch and {verdict['large']} at the "
        f"large "
        "batch (the paper's Figure 3 claims flatter, increasingly so at larger batch)."
    ]
    c = runs[0].config
    s = {
        "data": f"{c['data']}, training split"
        + (f", {settings['samples']} points" if settings["samples"] else ""),
        "model": c["model"],
        "grid": f"{settings['grid']} x {settings['grid']} on [-{settings['span']}, {settings['span']}]^2",
        "1-D slice": f"{settings['line']} points",
        "directions": "Gaussian, "
        "filter-normalised, biases and BatchNorm parameters not perturbed, seeds 0 and 1",
        "BatchNorm": "eval mode, the average model's saved running statistics",
        "Tr H": f"Hutchinson, {settings['trace_probes']} Rademacher probes",
        "lambda_max": f"Lanczos, tol {settings['lanczos_tol']:g}, error = residual norm",
    }
    return Caption(
        NAME,
        TITLE,
        "(a-d) 3-D surfaces of log10 of the training loss around the average model w_a of seed-0 runs, "
        "(e-h) the "
        "same as contours, all on one shared colour scale; (i, j) the 1-D slice along the first direction, "
        "C-SGD "
        "vs ring D-SGD at the small and the large total batch. Panel titles give Tr H and lambda_max of the "
        "training loss at w_a with their errors.",
        s,
        [],
        numbers,
        notes,
        [ctx.rel(r.path / "avg.pt") for r in runs],
    )
