"""Figure 9: the large-batch experiment T11 at scale, from T11's own saved runs: test accuracy along
training and the curvature of the average model at matched training loss, for ring D-SGD, C-SGD, C-SGD +
avg-SAM with eps ~ N(0, Xi(t)) of that D-SGD run and C-SGD + isotropic noise of equal Tr Xi(t).

Reads a T11 folder (``--runs``; the ``fmnist`` preset's default is ``results/t11-fmnist``, written by ``python
-m verify.claims.largebatch --scale fmnist --out DIR``): ``report.json`` (its ``protocol``, which must be the
preset's, :func:`figures.t11_scale.check_folder`) and ``series_<batch>_seed<S>.csv`` (one lockstep run per
seed and batch, the four arms from one initialisation on one batch stream). (a, b) test accuracy (%) of each
arm's average model vs iteration at the small and the large total batch, mean over seeds, band min-max;
(c-f) lambda_max (Lanczos, error bar its residual) and Tr H (Hutchinson, error bar its standard error) of
each arm's average model against its training loss, every seed. The panels are drawn by
:mod:`figures.t11_scale` (the same code as ``python -m figures.t11_scale DIR``). Caption numbers: the final
test accuracy of each arm and batch (mean ± sd over seeds), D - C per batch paired by seed (the two arms of
one run), lambda_max and Tr H at the last flatness step. Reads only; cost: seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import style
from .captions import Caption, fmt
from .context import FigureContext
from .presets import Preset, RunSpec
from .sources import FiguresError
from .t11_scale import (
    ARMS,
    BATCHES,
    DRAWN,
    accuracy_panels,
    check_folder,
    final_values,
    flatness_panels,
    read_series,
    seed_of,
    series_files,
)

NAME = "fig9_large_batch_scale"
TITLE = (
    "Figure 9. The large-batch experiment at scale (T11's runs): accuracy and curvature of D-SGD, C-SGD, "
    "avg-SAM(Xi) and isotropic noise"
)
CHECKS: tuple[str, ...] = ()
RUNS_KIND = "t11"


def needs(preset: Preset) -> list[RunSpec]:
    """No engine runs: the data are T11's lockstep runs in ``--runs``."""
    return []


def _mean_sd(v: np.ndarray, unit: str = "", digits: int = 2) -> str:
    sd = f" ± {v.std(ddof=1):.{digits}f}" if v.size > 1 else ""
    return f"{v.mean():.{digits}f}{sd}{unit} ({v.size} seed{'s' if v.size != 1 else ''})"


def _last(v: np.ndarray) -> float:
    """The last finite value (NaN when there is none)."""
    ok = np.isfinite(v)
    return float(v[ok][-1]) if ok.any() else float("nan")


def draw(ctx: FigureContext) -> tuple[Any, Caption]:
    p = ctx.preset.protocol
    folder = Path(ctx.runs_dir)
    seeds = range(p.seeds)
    files = series_files(folder, seeds)
    if not any(files.values()):
        raise FiguresError(
            f"no T11 series (series_<batch>_seed<S>.csv) in {folder}; produce them with: dsgd-figures all "
            f"--preset {ctx.preset.name} --runs {folder} --rerun"
        )
    saved = check_folder(folder, p)
    series = read_series(folder, seeds, [f"{a}_{c}" for a in ARMS for c in DRAWN])
    fig, axes = style.subplots(3, 2, width=4.6, height=3.0)
    accuracy_panels(axes[0], series)
    flatness_panels(axes[1:], series, saved)
    tb = saved.get("total_batch") or {}
    for ax, letter in zip(axes.ravel(), "abcdef", strict=True):
        text = ax.get_title()
        for b in BATCHES:
            if b in tb:
                text = text.replace(f"{b} batch", f"{b} batch B = {tb[b]}")
        ax.set_title("")
        style.title(ax, letter, text)
    fig.suptitle(
        f"T11 at {saved.get('scale', p.scale)} scale (m = {saved['workers']}, linear scaling rule): accuracy "
        "and curvature of the average model"
    )
    return fig, _caption(ctx, folder, saved, files, series)


def _caption(ctx: FigureContext, folder: Path, saved: dict, files: dict, series: dict) -> Caption:
    p = ctx.preset.protocol
    numbers: dict[str, str] = {}
    acc = final_values(series, "test_acc")
    for b in BATCHES:
        for arm, (lab, _, _) in ARMS.items():
            if (arm, b) in acc:
                numbers[f"final test accuracy, {lab}, {b} batch"] = _mean_sd(100 * acc[(arm, b)], " %")
        runs = [r for r in series[b] if "dsgd_test_acc" in r and "csgd_test_acc" in r]
        dc = np.array([100 * (_last(r["dsgd_test_acc"]) - _last(r["csgd_test_acc"])) for r in runs])
        dc = dc[np.isfinite(dc)]
        if dc.size:
            numbers[f"D - C, {b} batch (paired: the two arms of one run)"] = _mean_sd(dc, " points")
    for key, what in (("lambda_max", "lambda_max"), ("trace_h", "Tr H")):
        vals = final_values(series, key)
        for b in BATCHES:
            parts = [f"{ARMS[arm][0]} {fmt(vals[(arm, b)].mean())}" for arm in ARMS if (arm, b) in vals]
            if parts:
                numbers[f"{what} at the last flatness step, {b} batch (mean over seeds)"] = "; ".join(parts)
    notes = []
    for b in BATCHES:
        have = [seed_of(f) for f in files[b]]
        missing = [s for s in range(p.seeds) if s not in have]
        if missing:
            notes.append(
                f"{b} batch: seed(s) {', '.join(map(str, missing))} of {p.seeds} not in {ctx.rel(folder)} "
                f"(dsgd-figures all --preset {ctx.preset.name} --rerun runs them)"
            )
        for f, r in zip(files[b], series[b], strict=True):
            last = int(np.nanmax(r["step"]))
            if last < int(saved["steps"]):
                notes.append(f"seed {seed_of(f)}, {b} batch: the run ends at step {last} of {saved['steps']}")
    settings = {
        "preset": ctx.preset.name,
        "scale": saved.get("scale", p.scale),
        "data": saved["data"],
        "model": f"{saved['model']} {saved.get('model_kwargs') or ''}".strip(),
        "workers": f"{saved['workers']} (ring, AWC)",
        **{
            f"{b} batch": f"local batch {saved[b][0]} x {saved['workers']} workers = "
            f"{saved[b][0] * saved['workers']}, lr {saved[b][1]:g}"
            for b in BATCHES
        },
        "steps": saved["steps"],
        "warm-up": saved["warmup"],
        "lr decays (x0.1)": saved["milestones"],
        "seeds": {b: [seed_of(f) for f in files[b]] for b in BATCHES},
        "test accuracy": f"full test split, every {saved['log_every']} steps",
        "training loss": f"{saved.get('eval_samples') or 'all'} training images",
        "flatness steps": saved["flat_steps"],
        "flatness subset": f"{saved.get('flat_samples') or 'all'} training images, Lanczos tol "
        f"{saved['lanczos_tol']:g}, {saved['trace_probes']} Hutchinson probes",
    }
    ratio = saved["large"][0] / saved["small"][0]
    sources = [ctx.rel(f) for b in BATCHES for f in files[b]] + [ctx.rel(folder / "report.json")]
    return Caption(
        NAME,
        TITLE,
        f"(a, b) test accuracy of each arm's average model against the iteration at (a) the small and (b) "
        f"the large total batch (linear scaling rule: local batch and learning rate both x{ratio:g}), mean "
        "over seeds with the min-max band; (c, d) lambda_max and (e, f) Tr H of the training loss at each "
        "arm's average model against its training loss, every seed and flatness step (error bars: the "
        "Lanczos residual and the Hutchinson standard error). Arms of one run share the initialisation and "
        "the batch stream: D-SGD ring (vermillion), C-SGD (black), C-SGD + avg-SAM with eps ~ N(0, Xi(t)) "
        "of the D-SGD run (sky blue), C-SGD + isotropic noise of equal Tr Xi(t) (grey). T11's verdict and "
        "effects are in the folder's report.md.",
        settings,
        [],
        numbers,
        notes,
        sources,
    )
