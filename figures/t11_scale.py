"""Figures of a scaled T11 run (``python -m verify.claims.largebatch --out DIR``), read from its saved
files: the one drawing code of T11's lockstep runs, used by ``python -m figures.t11_scale DIR`` and by
``dsgd-figures --preset fmnist`` (:mod:`figures.fig9_large_batch_scale`).

A T11 folder holds ``report.json`` (its ``protocol``: :meth:`verify.claims.largebatch.Protocol.describe`),
``runs/seed<S>_<batch>.json`` and ``series_<batch>_seed<S>.csv`` (one lockstep run per seed and batch:
columns ``step``, ``<arm>_test_acc``, ``<arm>_train_loss``, ``<arm>_lambda_max`` (+ ``_err``),
``<arm>_trace_h`` (+ ``_err``) for the arms dsgd, csgd, avgsam-xi, avgsam-iso). ``python -m figures.t11_scale
DIR`` writes

- ``t11_accuracy.png``: test accuracy vs iteration of the four arms at both batches (mean over seeds, band:
  min-max over seeds);
- ``t11_flatness.png``: lambda_max and Tr H of each arm's average model vs its training loss (every seed,
  error bars: the Lanczos residual and the Hutchinson standard error), at both batches.

Reads only; computes nothing but means. Cost: seconds.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from . import style
from .context import config_mismatch
from .sources import FiguresError, read_csv_columns, read_json_file

ARMS = {
    "dsgd": ("D-SGD ring", style.color("ring"), "o"),
    "csgd": ("C-SGD", style.color("csgd"), "s"),
    "avgsam-xi": ("C-SGD + avg-SAM, eps ~ N(0, Xi(t))", style.color("avgsam"), "X"),
    "avgsam-iso": ("C-SGD + isotropic noise, equal Tr Xi(t)", style.OKABE_ITO["grey"], "v"),
}
BATCHES = ("small", "large")
#: The protocol settings (``Protocol.describe()`` keys) that make two T11 folders the same experiment; the
#: data folder, device, seed count and the ``why`` text may differ.
COMPARED = tuple(
    "data model model_kwargs workers small large steps warmup milestones log_every eval_samples flat_samples "
    "flat_steps lanczos_tol lanczos_iters trace_probes dtype".split()
)
_SERIES = re.compile(r"series_(small|large)_seed(\d+)\.csv")


def series_files(folder: Path, seeds: Iterable[int] | None = None) -> dict[str, list[Path]]:
    """``{batch: [series_<batch>_seed<S>.csv, ...]}`` in seed order; ``seeds``: only these seeds."""
    want = None if seeds is None else set(seeds)
    out: dict[str, list[tuple[int, Path]]] = {b: [] for b in BATCHES}
    for p in Path(folder).glob("series_*_seed*.csv"):
        m = _SERIES.fullmatch(p.name)
        if m and (want is None or int(m[2]) in want):
            out[m[1]].append((int(m[2]), p))
    return {b: [p for _, p in sorted(v)] for b, v in out.items()}


def seed_of(path: Path) -> int:
    m = _SERIES.fullmatch(Path(path).name)
    if not m:
        raise FiguresError(f"{path} is not a T11 series file (series_<batch>_seed<S>.csv)")
    return int(m[2])


#: The columns of a series CSV the panels draw, per arm.
DRAWN = ("test_acc", "train_loss", "lambda_max", "lambda_max_err", "trace_h", "trace_h_err")


def read_series(
    folder: Path, seeds: Iterable[int] | None = None, require: Sequence[str] = ("step",)
) -> dict[str, list[dict[str, np.ndarray]]]:
    """``{batch: [columns of each seed's CSV]}`` (empty cells: NaN), in seed order; ``require``: columns
    every file must have (else a one-line :class:`~figures.sources.FiguresError`)."""
    out: dict[str, list[dict[str, np.ndarray]]] = {}
    for b, paths in series_files(folder, seeds).items():
        out[b] = []
        for p in paths:
            cols = read_csv_columns(p)
            missing = [c for c in ("step", *require) if c not in cols]
            if missing:
                raise FiguresError(f"{p} lacks column(s) {', '.join(dict.fromkeys(missing))}")
            out[b].append(cols)
    return out


def saved_protocol(folder: Path) -> dict[str, Any] | None:
    """The ``protocol`` recorded in ``folder/report.json`` (None when there is no report.json)."""
    path = Path(folder) / "report.json"
    if not path.is_file():
        return None
    doc = read_json_file(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("protocol"), dict):
        raise FiguresError(f"{path} is not a T11 report (no 'protocol')")
    return doc["protocol"]


def protocol_mismatch(saved: Mapping[str, Any], protocol: Any) -> str | None:
    """The first :data:`COMPARED` setting where a saved protocol differs from ``protocol`` (a
    :class:`verify.claims.largebatch.Protocol`), as text, or None. The data spec is compared by kind
    (``fashion-mnist``), not by folder."""
    want = {k: v for k, v in protocol.describe().items() if k in COMPARED}
    want["data"] = str(want["data"]).partition(":")[0]
    have = dict(saved, data=str(saved.get("data", "")).partition(":")[0])
    return config_mismatch(have, want)


def check_folder(folder: Path, protocol: Any) -> dict[str, Any]:
    """The saved protocol of a T11 folder, checked against ``protocol``; a one-line
    :class:`~figures.sources.FiguresError` when it is missing or differs."""
    saved = saved_protocol(folder)
    if saved is None:
        raise FiguresError(
            f"{Path(folder) / 'report.json'} not found: no T11 report, so the protocol of its runs is unknown"
        )
    diff = protocol_mismatch(saved, protocol)
    if diff:
        raise FiguresError(f"{folder} holds T11 runs made with another protocol ({diff})")
    return saved


def saved_wall(folder: Path) -> tuple[int, float]:
    """``(number of saved runs, sum of their wall_s)`` in ``folder/runs`` (read with
    :func:`verify.claims.largebatch.load_runs`, the writer's own reader)."""
    from verify.claims.largebatch import load_runs

    runs = load_runs(Path(folder))
    return len(runs), float(sum(float(r.get("wall_s") or 0.0) for r in runs))


def _samples(n: Any, what: str) -> str:
    return f"{what} ({int(n)}-image subset)" if n else f"{what} (all training images)"


def accuracy_panels(axes: Sequence[Any], series: Mapping[str, list[dict]]) -> None:
    """Test accuracy (%) of each arm's average model vs iteration, one panel per batch (``axes[0]``: small):
    mean over the seeds that reached the longest run's last step, band min-max."""
    for ax, b in zip(axes, BATCHES, strict=True):
        runs = series[b]
        for arm, (lab, col, _) in ARMS.items():
            key = f"{arm}_test_acc"
            if not runs or key not in runs[0]:
                continue
            step = max((r["step"] for r in runs), key=np.size)
            acc = np.array([100 * r[key][: step.size] for r in runs if r[key].size >= step.size])
            ax.plot(step, acc.mean(0), color=col, label=lab, lw=1.6 if arm in ("dsgd", "csgd") else 1.2)
            ax.fill_between(step, acc.min(0), acc.max(0), color=col, alpha=0.15, lw=0)
        ax.set_title(f"{b} batch ({len(runs)} seeds)")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%) of the average model")
    axes[0].legend(fontsize=7, loc="lower right")


def flatness_panels(axes: Any, series: Mapping[str, list[dict]], protocol: Mapping[str, Any] | None) -> None:
    """lambda_max (``axes[0][j]``) and Tr H (``axes[1][j]``) of each arm's average model vs its training loss,
    batch ``j``; every seed, error bars from the saved ``_err`` columns; ``protocol``: the saved protocol, for
    the subset sizes in the axis labels."""
    proto = protocol or {}
    for j, b in enumerate(BATCHES):
        for i, (key, ylab) in enumerate((("lambda_max", "lambda_max"), ("trace_h", "Tr H"))):
            ax = axes[i][j]
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
            ax.set_xlabel(_samples(proto.get("eval_samples"), "training loss"))
            ax.set_ylabel(_samples(proto.get("flat_samples"), ylab))
            ax.set_title(f"{ylab}, {b} batch")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)


def final_values(series: Mapping[str, list[dict]], column: str) -> dict[tuple[str, str], np.ndarray]:
    """``{(arm, batch): the last finite value of <arm>_<column> of every seed}`` (seeds without one left
    out)."""
    out: dict[tuple[str, str], np.ndarray] = {}
    for b in BATCHES:
        for arm in ARMS:
            vals = []
            for r in series.get(b, []):
                v = r.get(f"{arm}_{column}")
                if v is not None and np.isfinite(v).any():
                    vals.append(float(v[np.isfinite(v)][-1]))
            if vals:
                out[(arm, b)] = np.array(vals)
    return out


def accuracy_figure(series: dict, title: str):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    accuracy_panels(axes, series)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def flatness_figure(series: dict, title: str, protocol: Mapping[str, Any] | None = None):
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    flatness_panels(axes, series, protocol)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m figures.t11_scale", description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="default: the folder")
    args = ap.parse_args(argv)
    try:
        series = read_series(args.folder)
        protocol = saved_protocol(args.folder)
    except FiguresError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not any(series.values()):
        print(f"error: no series_*_seed*.csv under {args.folder}", file=sys.stderr)
        return 2
    out = args.out or args.folder
    out.mkdir(parents=True, exist_ok=True)
    name = args.folder.name
    m = f", m = {protocol['workers']}" if protocol and "workers" in protocol else ""
    for stem, fig in (
        ("t11_accuracy", accuracy_figure(series, f"T11 ({name}): test accuracy{m}, LSR")),
        (
            "t11_flatness",
            flatness_figure(series, f"T11 ({name}): curvature of the average model vs loss", protocol),
        ),
    ):
        fig.savefig(out / f"{stem}.png", dpi=130)
        plt.close(fig)
        print(out / f"{stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
