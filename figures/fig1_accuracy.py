"""Figure 1: test accuracy of the average model vs iteration, C-SGD vs D-SGD, small vs large total batch.

The paper's Figure 1 (and its appendix topologies): C-SGD and ring D-SGD at a small and a large total batch
under the linear scaling rule; grid and exponential D-SGD at the large batch. Lines are the mean over seeds,
bands the min-max over seeds; the last panel gives the final accuracy per seed. Reads ``metrics.csv``
(``step``, ``test_acc``) of the preset's runs; no computation beyond averages.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import style
from .captions import Caption
from .context import FigureContext
from .presets import KEYS, Preset, RunSpec
from .sources import FiguresError, RunData

NAME = "fig1_accuracy"
TITLE = "Figure 1. Test accuracy of the average model: C-SGD vs D-SGD at a small and a large total batch"
ROLES = {"small": ("csgd", "ring"), "large": KEYS}


def needs(preset: Preset) -> list[RunSpec]:
    return [r for r in preset.runs if r.key in ROLES[r.batch]]


def seed_curves(runs: list[RunData], column: str = "test_acc") -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values (n_seeds, n_steps))`` on the steps logged by every seed (a diverged run ends
    early)."""
    series = [r.series(column) for r in runs]
    common = series[0][0]
    for s, _ in series[1:]:
        common = np.intersect1d(common, s)
    if common.size == 0:
        raise FiguresError(f"the seeds of {runs[0].name} share no logged step")
    vals = np.stack([v[np.isin(s, common)] for s, v in series])
    return common, vals


def _setting(run: RunData) -> str:
    c = run.config
    b, m = c["local_batch"], c["workers"]
    return f"local batch {b} x {m} workers = {b * m}, lr {c['lr']:g}"


def draw(ctx: FigureContext) -> tuple[Any, Caption]:
    fig, axes = style.subplots(1, 3, width=3.5, height=2.9)
    finals: dict[tuple[str, str], np.ndarray] = {}
    sources, settings = [], {}
    lo, top = 1.0, 0.0
    for ax, batch, letter in ((axes[0, 0], "small", "a"), (axes[0, 1], "large", "b")):
        first = None
        for key in ROLES[batch]:
            runs = ctx.runs(key, batch)
            first = first or runs[0]
            steps, acc = seed_curves(runs)
            acc = 100 * acc
            c = style.color(key)
            ax.plot(steps, acc.mean(0), color=c, label=f"{style.label(key)} ({len(runs)} seeds)")
            if len(runs) > 1:
                ax.fill_between(steps, acc.min(0), acc.max(0), color=c, alpha=0.18, lw=0)
            finals[(key, batch)] = acc[:, -1]
            top = max(top, float(acc.max()))
            lo = min(lo, float(np.percentile(acc[:, steps >= steps[-1] * 0.1], 5)) / 100)
            sources += [ctx.rel(r.path) for r in runs]
        assert first is not None
        settings[f"{batch} batch"] = _setting(first)
        style.title(
            ax,
            letter,
            f"total batch {first.config['local_batch'] * first.config['workers']} "
            f"(lr {first.config['lr']:g})",
        )
        ax.set_xlabel("iteration")
        ax.set_ylabel("test accuracy of $w_a$ (%)")
        ax.legend(loc="lower right")
    ylo = max(0.0, 100 * lo - 2)
    yhi = min(100.0, top + 1.0)
    for ax in axes[0, :2]:
        ax.set_ylim(ylo, yhi)
    ax = axes[0, 2]
    xs = {"small": 0, "large": 1}
    for i, key in enumerate(KEYS):
        for batch in ("small", "large"):
            if (key, batch) not in finals:
                continue
            v = finals[(key, batch)]
            x = xs[batch] + (i - 1.5) * 0.12
            ax.scatter(
                np.full(v.size, x),
                v,
                color=style.color(key),
                marker=style.marker(key),
                s=18,
                alpha=0.8,
                label=style.label(key) if batch == "large" else None,
                zorder=3,
            )
            ax.errorbar(
                x + 0.05,
                v.mean(),
                yerr=v.std(ddof=1) if v.size > 1 else 0,
                color=style.color(key),
                capsize=2,
                lw=1,
                marker="_",
            )
    ax.set_xticks([0, 1], ["small total batch", "large total batch"])
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylabel("final test accuracy (%)")
    style.title(ax, "c", "final accuracy per seed, mean ± sd")
    ax.legend(loc="upper left")
    fig.suptitle("Test accuracy of the average model $w_a$ along training (mean over seeds, band: min–max)")
    return fig, _caption(ctx, finals, settings, sources)


def _gap(finals: dict, key: str, batch: str) -> str:
    d, c = finals[(key, batch)], finals[("csgd", batch)]
    n = min(d.size, c.size)
    diff = d[:n] - c[:n]
    sd = f" ± {diff.std(ddof=1):.2f}" if n > 1 else ""
    return f"{diff.mean():+.2f}{sd} points (paired by seed, n = {n})"


def _caption(ctx: FigureContext, finals: dict, settings: dict, sources: list[str]) -> Caption:
    numbers = {}
    for (key, batch), v in finals.items():
        sd = f" ± {v.std(ddof=1):.2f}" if v.size > 1 else ""
        numbers[f"final accuracy, {style.label(key)}, {batch} batch"] = (
            f"{v.mean():.2f}{sd} % ({v.size} seeds)"
        )
    for batch in ("small", "large"):
        for key in ROLES[batch][1:]:
            numbers[f"D - C gap, {style.label(key)}, {batch} batch"] = _gap(finals, key, batch)
    drop = {k: finals[(k, "large")].mean() - finals[(k, "small")].mean() for k in ("csgd", "ring")}
    notes = [
        f"From the small to the large total batch the final accuracy changes by {drop['csgd']:+.2f} points "
        f"for "
        f"C-SGD and {drop['ring']:+.2f} for ring D-SGD. Both batches train for the same number of "
        f"iterations, so "
        "the large batch sees 8x more samples, as in the paper (whose ResNet-18 on CIFAR-10 loses accuracy "
        "at the "
        "large batch, D-SGD less than C-SGD)."
    ]
    run0 = ctx.run(ctx.preset.runs[0])
    c = run0.config
    settings = {
        "preset": ctx.preset.name,
        "data": c["data"],
        "model": f"{c['model']} {c.get('model_kwargs') or ''}".strip(),
        "workers": c["workers"],
        **settings,
        "steps": c["steps"],
        "warm-up": c["warmup"],
        "lr decays (x0.1)": c["milestones"],
        "momentum": c["momentum"],
        "weight decay": c["weight_decay"],
        "evaluation": f"test split, every {c['log_every']} steps, eval mode",
    }
    return Caption(
        NAME,
        TITLE,
        "(a, b) test accuracy of the average model w_a = (1/m) sum_j w_j against the iteration, mean over "
        "seeds "
        "with the min-max band, (a) at the small and (b) at the large total batch (linear scaling rule: "
        "local "
        "batch and learning rate both x8). (c) final test accuracy of every seed. Colours: C-SGD black, ring "
        "vermillion, grid green, exponential blue. Unsmoothed (the paper smooths its curves with an EMA of "
        "0.8).",
        settings,
        [],
        numbers,
        notes,
        sorted(set(sources)),
    )
