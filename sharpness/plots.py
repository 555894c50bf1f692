"""PNG pictures for the ``sharpness`` command: spectral density, 1-D and 2-D loss landscapes.

Plain matplotlib on the Agg backend (no display needed). Each function takes arrays, not result objects, so it
can draw anything saved to JSON; each writes its file atomically (temporary file in the same folder, rename).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .functional import make_loss  # noqa: E402
from .lanczos import top_eigenvalues  # noqa: E402
from .landscape import loss_line, loss_surface, random_direction  # noqa: E402
from .progress import Progress, counting_loss  # noqa: E402
from .results import atomic_write  # noqa: E402


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)


def plot_density(
    grid: Sequence[float] | np.ndarray,
    density: Sequence[float] | np.ndarray,
    path: str | os.PathLike[str],
    *,
    eigenvalues: Sequence[float] | None = None,
    title: str = "Hessian spectral density (stochastic Lanczos quadrature)",
) -> Path:
    """Density of the Hessian eigenvalues on a log scale, with the top eigenvalues marked if given."""
    g = np.asarray(grid, dtype=float)
    d = np.asarray(density, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    floor = max(float(d.max()) * 1e-7, 1e-300)  # seven decades below the peak
    ax.semilogy(g, np.maximum(d, floor), color="C0", lw=1.4)
    ax.fill_between(g, floor, np.maximum(d, floor), color="C0", alpha=0.15)
    for i, lam in enumerate(eigenvalues or []):
        ax.axvline(float(lam), color="C3", lw=0.8, ls="--", label="top-k eigenvalues" if i == 0 else None)
    if eigenvalues:
        ax.legend(frameon=False)
    ax.set_xlabel("eigenvalue $\\lambda$")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_line(
    alphas: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray | dict[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str = "1-D loss landscape",
    xlabel: str = "step along the direction $\\alpha$",
) -> Path:
    """``L(theta + alpha d)`` against ``alpha``; ``losses`` may map a direction's label to its curve."""
    a = np.asarray(alphas, dtype=float)
    curves = losses if isinstance(losses, dict) else {"filter-normalised random": losses}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (label, ys) in enumerate(curves.items()):
        ax.plot(a, np.asarray(ys, dtype=float), color=f"C{i}", lw=1.6, label=label)
    ax.axvline(0.0, color="0.6", lw=0.8, ls=":")
    ys_all = np.concatenate([np.asarray(v, dtype=float).ravel() for v in curves.values()])
    if np.all(ys_all > 0) and ys_all.max() > 50 * ys_all.min():
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False)
    return _save(fig, path)


def plot_surface(
    alphas: Sequence[float] | np.ndarray,
    betas: Sequence[float] | np.ndarray,
    losses: Sequence[Sequence[float]] | np.ndarray,
    path: str | os.PathLike[str],
    *,
    title: str = "2-D loss landscape",
) -> Path:
    """Contour map of ``L(theta + alpha d1 + beta d2)``; ``losses[i, j]`` is at ``(alphas[i], betas[j])``."""
    a = np.asarray(alphas, dtype=float)
    b = np.asarray(betas, dtype=float)
    z = np.asarray(losses, dtype=float)
    if z.shape != (a.size, b.size):
        raise ValueError(f"losses has shape {z.shape}, expected {(a.size, b.size)}")
    fig, ax = plt.subplots(figsize=(5, 4.4))
    levels = np.linspace(np.nanmin(z), np.nanmax(z), 25) if np.nanmax(z) > np.nanmin(z) else 10
    cs = ax.contourf(a, b, z.T, levels=levels, cmap="viridis")
    ax.contour(a, b, z.T, levels=levels, colors="k", linewidths=0.3)
    ax.plot([0.0], [0.0], marker="*", color="w", markersize=10, markeredgecolor="k")
    fig.colorbar(cs, ax=ax, label="loss")
    ax.set_xlabel("$\\alpha$ (direction 1)")
    ax.set_ylabel("$\\beta$ (direction 2)")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def report_plots(
    model: Any,
    loss_fn: Callable[[Any, Any], Any],
    batches: list[tuple[Any, Any]],
    report: Any,
    outdir: str | os.PathLike[str],
    *,
    seed: int = 0,
    train_mode: bool = False,
    eigen: bool = False,
    span: float = 1.0,
    n_line: int = 41,
    n_grid: int = 21,
    progress: bool = True,
) -> dict[str, Any]:
    """The ``--plot`` pictures of a report: ``spectral_density.png`` (if the density was measured),
    ``landscape_1d.png`` and ``landscape_2d.png`` along filter-normalised random directions (seeds ``seed``,
    ``seed + 1``), over ``[-span, span]``; with ``eigen`` also along the top Hessian eigenvectors, scaled to
    the random direction's norm (``landscape_1d.png`` gets a second curve, ``landscape_2d_eigen.png``).

    Cost: ``n_line + 1`` and ``n_grid^2 + 1`` forward passes per batch (twice with ``eigen``), plus top-2
    eigenvectors by Lanczos if the report holds none. Returns ``{"files", "results", "notes"}``.
    """
    out = Path(outdir)
    files: list[Path] = []
    results: dict[str, Any] = {}
    notes: list[str] = []
    bar = Progress(progress)
    fl = make_loss(model, loss_fn, batches, train_mode=train_mode)
    counted = counting_loss(fl, bar)
    dens = report.results.get("density")
    if dens is not None:
        top = report.results.get("eigs", {}).get("values")
        files.append(
            plot_density(dens["grid"], dens["density"], out / "spectral_density.png", eigenvalues=top)
        )
    else:
        notes.append("no spectral_density.png: the 'density' metric was not run")
    alphas = np.linspace(-span, span, n_line).tolist()
    grid = np.linspace(-span, span, n_grid).tolist()
    with bar.task("landscape 1-D", n_line + 2, "fwd"):
        line = loss_line(counted, None, alphas, seed=seed)
    results["line_random"] = line.to_dict()
    curves: dict[str, Any] = {"filter-normalised random": line.losses}
    dirs: tuple[Any, Any] = (None, None)
    if eigen:
        V = report.eigenvectors
        if V is None or V.shape[1] < 2:
            V = top_eigenvalues(fl, k=2, seed=seed, train_mode=False).vectors
        scale = float(random_direction(fl, seed).norm())
        dirs = (V[:, 0] * scale, V[:, 1] * scale)
        with bar.task("landscape 1-D (eigen)", n_line + 2, "fwd"):
            eline = loss_line(counted, dirs[0], alphas, seed=seed, norm="none")
        results["line_eigen"] = eline.to_dict()
        curves["top Hessian eigenvector"] = eline.losses
    files.append(plot_line(alphas, curves, out / "landscape_1d.png"))
    for tag, (d1, d2) in [("random", (None, None))] + ([("eigen", dirs)] if eigen else []):
        norm = "filter" if tag == "random" else "none"
        with bar.task(f"landscape 2-D ({tag})", n_grid * n_grid + 2, "fwd"):
            surf = loss_surface(counted, d1, d2, grid, grid, seed=seed, norm=norm)
        results[f"surface_{tag}"] = surf.to_dict()
        name = "landscape_2d.png" if tag == "random" else "landscape_2d_eigen.png"
        title = "2-D loss landscape, " + (
            "filter-normalised random directions" if tag == "random" else "top-2 Hessian eigenvectors"
        )
        files.append(plot_surface(grid, grid, surf.losses, out / name, title=title))
    return {"files": files, "results": results, "notes": notes}
