"""Figures of a scaled T11 run (``python -m verify.claims.largebatch --out DIR``), read from its saved
files.

``python -m figures.t11_scale DIR`` reads ``DIR/series_{small,large}_seed*.csv`` (one lockstep run per seed
and batch: columns ``step``, ``<arm>_test_acc``, ``<arm>_train_loss``, ``<arm>_lambda_max`` (+ ``_err``),
``<arm>_trace_h`` (+ ``_err``) for the arms dsgd, csgd, avgsam-xi, avgsam-iso) and writes

- ``t11_accuracy.png``: test accuracy vs iteration of the four arms at both batches (mean over seeds, band:
  min-max over seeds);
- ``t11_flatness.png``: lambda_max and Tr H of each arm's average model vs its training loss (every seed,
  error bars: the Lanczos residual and the Hutchinson standard error), at both batches.

Reads only; computes nothing but means. Cost: seconds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from . import style

ARMS = {
    "dsgd": ("D-SGD ring", style.color("ring"), "o"),
    "csgd": ("C-SGD", style.color("csgd"), "s"),
    "avgsam-xi": ("C-SGD + avg-SAM, eps ~ N(0, Xi(t))", style.color("avgsam"), "X"),
    "avgsam-iso": ("C-SGD + isotropic noise, equal Tr Xi(t)", style.OKABE_ITO["grey"], "v"),
}
BATCHES = ("small", "large")


def read_series(folder: Path) -> dict[str, list[dict[str, np.ndarray]]]:
    """``{batch: [columns of each seed's CSV]}``."""
    out: dict[str, list[dict[str, np.ndarray]]] = {b: [] for b in BATCHES}
    for b in BATCHES:
        for p in sorted(folder.glob(f"series_{b}_seed*.csv")):
            raw = np.genfromtxt(p, delimiter=",", names=True, dtype=float, deletechars="")
            out[b].append({k: np.atleast_1d(raw[k]) for k in raw.dtype.names})
    return out


def accuracy_figure(series: dict, title: str):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, b in zip(axes, BATCHES, strict=True):
        runs = series[b]
        for arm, (lab, col, _) in ARMS.items():
            key = f"{arm}_test_acc"
            if not runs or key not in runs[0]:
                continue
            step = runs[0]["step"]
            acc = np.array([100 * r[key][: step.size] for r in runs if r[key].size >= step.size])
            ax.plot(step, acc.mean(0), color=col, label=lab, lw=1.6 if arm in ("dsgd", "csgd") else 1.2)
            ax.fill_between(step, acc.min(0), acc.max(0), color=col, alpha=0.15, lw=0)
        ax.set_title(f"{b} batch ({len(runs)} seeds)")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%) of the average model")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def flatness_figure(series: dict, title: str):
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for j, b in enumerate(BATCHES):
        for i, (key, ylab) in enumerate((("lambda_max", "lambda_max"), ("trace_h", "Tr H"))):
            ax = axes[i, j]
            for arm, (lab, col, mk) in ARMS.items():
                first = True
                for r in series[b]:
                    if f"{arm}_{key}" not in r:
                        continue
                    y, err, x = r[f"{arm}_{key}"], r[f"{arm}_{key}_err"], r[f"{arm}_train_loss"]
                    ok = np.isfinite(y)
                    ax.errorbar(x[ok], y[ok], yerr=err[ok], color=col, marker=mk, ms=4, lw=0.8, capsize=2,
                                label=lab if first else None)  # fmt: skip
                    first = False
            ax.set_xlabel("training loss (10k-image subset)")
            ax.set_ylabel(f"{ylab} (2048-image subset)")
            ax.set_title(f"{ylab}, {b} batch")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m figures.t11_scale", description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="default: the folder")
    args = ap.parse_args(argv)
    series = read_series(args.folder)
    if not any(series.values()):
        print(f"error: no series_*_seed*.csv under {args.folder}", file=sys.stderr)
        return 2
    out = args.out or args.folder
    out.mkdir(parents=True, exist_ok=True)
    name = args.folder.name
    for stem, fig in (
        ("t11_accuracy", accuracy_figure(series, f"T11 ({name}): test accuracy, m = 16, LSR")),
        ("t11_flatness", flatness_figure(series, f"T11 ({name}): curvature of the average model vs loss")),
    ):
        fig.savefig(out / f"{stem}.png", dpi=130)
        print(out / f"{stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
