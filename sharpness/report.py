"""The sharpness report: which metrics to run, and running them (tqdm bars on stderr; table in :mod:`.table`).

Every metric is one call of the public API on one shared :class:`~sharpness.functional.FunctionalLoss` and
one :class:`~sharpness.hvp.HessianOperator`, with the same ``seed``; so ``hessian_trace(model, loss_fn, data,
n_probes=P, seed=S)`` called directly gives the number the report prints. Progress bars count HVPs or forward
passes and appear only for work that takes more than a second.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .evaluate import loss_at
from .functional import SharpnessInputError, make_loss
from .lanczos import spectral_density, top_eigenvalues
from .progress import Progress, ProgressOperator, counting_loss
from .sam import avg_sam_loss, sam_sharpness
from .table import Report, Row, fmt_value
from .trace import hessian_trace

#: name -> one line: what it computes (formula) and what it costs. ``--help`` prints these.
METRICS: dict[str, str] = {
    "loss": "L(w) = mean_i loss(f(x_i; w), y_i), and the accuracy; 1 forward pass",
    "trace": "Tr H +- stderr: exact for piecewise-linear nets (Tr G, C backward passes) and MLP-like nets "
    "with tanh/sigmoid/GELU/softplus (+ 1 pass per unit), else Tr G + mean of z^T (H - G) z over Rademacher "
    "z (Hutchinson) until stderr < RTOL |Tr H|; HVP + JVP per probe",
    "eigs": "top-K eigenvalues of H (Lanczos, to 1e-4 relative), residuals ||Hv - lambda v||; ~20-100 HVPs",
    "density": "eigenvalue density of H (stochastic Lanczos quadrature, 10 runs x 80 steps); 800 HVPs",
    "avg-sam": "E_{eps~N(0,sigma^2 I)} L(w+eps) sampled +- stderr, and L + sigma^2/2 Tr H; PROBES fwd/sigma",
    "sam": "max_{||eps||<=rho} L(w+eps) - L(w) at SAM's eps = rho g/||g||; 1 gradient + 2 fwd per rho",
    "layers": "per layer l, its diagonal Hessian block H_ll: Tr H_ll (Hutchinson) +- stderr and "
    "lambda_max(H_ll) (Lanczos to 1e-4); PROBES + ~20-100 HVPs per layer",
}
DEFAULT_METRICS = ("loss", "trace", "eigs", "density", "avg-sam", "sam")
#: Parameter vectors each metric keeps at once (Lanczos bases; probe and noise blocks).
KRYLOV_VECTORS = {"eigs": 101, "density": 81}


@dataclass
class ReportSettings:
    """Every knob of the report; recorded in the JSON."""

    probes: int = 100
    rtol: float | None = 0.02
    max_probes: int = 1000
    trace_method: str = "auto"
    top_k: int = 5
    eig_tol: float = 1e-4
    sigmas: list[float] = field(default_factory=lambda: [0.01, 0.03])
    rhos: list[float] = field(default_factory=lambda: [0.05])
    density_vectors: int = 10
    density_steps: int = 80
    seed: int = 0
    train_mode: bool = False
    graph_memory: int | str | None = "auto"


def parse_metrics(text: str | None, per_layer: bool = False) -> list[str] | None:
    """``"trace,eigs"`` -> ``["trace", "eigs"]`` in canonical order; empty -> ``None`` (the defaults)."""
    if not text:
        return None
    names = [t.strip().lower().replace("_", "-") for t in text.split(",") if t.strip()]
    if "all" in names:
        names = list(METRICS)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise SharpnessInputError(
            f"unknown metric(s) {', '.join(unknown)}: choose from {', '.join(METRICS)}, all"
        )
    if per_layer:
        names.append("layers")
    return [m for m in METRICS if m in names]


def memory_budget(device: torch.device) -> int:
    """Bytes the Krylov bases may take: a quarter of free GPU memory, or of physical RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 2 << 30


def select_metrics(
    requested: list[str] | None, num_params: int, itemsize: int, device: torch.device, per_layer: bool = False
) -> tuple[list[str], dict[str, str]]:
    """Metrics to run and why any default one was left out: explicitly requested ones always run; by default
    ``eigs``/``density`` run only if their Lanczos basis fits :func:`memory_budget`."""
    if requested is not None:
        return list(requested), {}
    chosen, skipped = [], {}
    budget = memory_budget(device)
    for m in DEFAULT_METRICS:
        need = KRYLOV_VECTORS.get(m, 0) * num_params * itemsize
        if need > budget:
            skipped[m] = f"needs {need / 2**30:.1f} GiB for its Lanczos basis (> {budget / 2**30:.1f} GiB)"
        else:
            chosen.append(m)
    if per_layer:
        chosen.append("layers")
    return chosen, skipped


def layer_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Trainable parameters grouped by the module that owns them: ``{"0": ["0.weight", "0.bias"], ...}``."""
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return groups


def check_settings(settings: ReportSettings, metrics: list[str], num_params: int) -> None:
    """One line for a setting the metrics cannot honour: more eigenvalues than parameters, a noise scale whose
    square overflows. Cost: none; called before any measurement."""
    if "eigs" in metrics and settings.top_k > num_params:
        raise SharpnessInputError(
            f"--top-k {settings.top_k} asks for more eigenvalues than the model's {num_params} parameters"
        )
    if "avg-sam" in metrics:
        for sigma in settings.sigmas:
            if not math.isfinite(sigma * sigma):
                raise SharpnessInputError(f"--sigmas {sigma:g} is too large: sigma^2 overflows")


def run_report(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    metrics: list[str],
    settings: ReportSettings,
    *,
    accuracy: Callable[[], tuple[int, int] | None] | None = None,
    progress: bool = True,
    keep_vectors: bool = False,
) -> Report:
    """Run ``metrics`` on ``L(w)``, the loss over ``batches``, at the model's weights, all with one seed.

    ``accuracy()`` returns ``(correct, total)`` or ``None`` when targets are not class labels. Each metric
    draws train-mode dropout masks from ``settings.seed``; the ``sharpness`` command runs the whole report
    under :func:`~sharpness.functional.private_rng` with that seed, so the loss and accuracy do too. Cost: the
    sum of the metrics' costs (see :data:`METRICS`), plus one forward pass.
    """
    check_settings(settings, metrics, sum(p.numel() for p in model.parameters() if p.requires_grad))
    s, rep, bar = settings, Report(), Progress(progress)
    fl = make_loss(model, loss_fn, batches, train_mode=s.train_mode)
    op = ProgressOperator(fl, graph_memory=s.graph_memory)
    op.progress = bar
    op.train_mode = s.train_mode
    seed, tm = s.seed, s.train_mode
    base = loss_at(fl, fl.flat_params().detach())
    want = set(metrics)
    need_trace = "trace" in want or "avg-sam" in want

    def timed(name: str, desc: str, total: int | None, unit: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        with bar.task(desc, total, unit):
            out = fn()
        rep.timings[name] = round(time.perf_counter() - t0, 3)
        return out

    if "loss" in want:
        acc = accuracy() if accuracy is not None else None
        rep.results["loss"] = {"value": base, "accuracy": None if acc is None else acc[0] / acc[1]}
        n = sum(len(x) for x, _ in batches)
        n = n if fl.parallel is None else int(fl.parallel.sum_float(n, "the count of samples"))
        rep.rows.append(Row("loss L(w)", base, note=f"mean over {n} samples"))
        if acc is not None:
            rep.rows.append(Row("accuracy", acc[0] / acc[1], note=f"{acc[0]}/{acc[1]} correct", percent=True))
    trace = None
    if need_trace:
        trace = timed(
            "trace",
            "trace",
            s.probes,
            "HVP",
            lambda: hessian_trace(op, seed=seed, train_mode=tm, **trace_options(s)),
        )
        rep.results["trace"] = trace.to_dict()
        rep.rows.append(Row("Hessian trace Tr H", trace.value, trace.stderr, trace_note(trace)))
    if "eigs" in want:
        k = s.top_k
        eig = timed(
            "eigs",
            f"top-{k} eigenvalues",
            None,
            "HVP",
            lambda: top_eigenvalues(op, k=k, tol=s.eig_tol, seed=seed, train_mode=tm),
        )
        rep.results["eigs"] = eig.to_dict()
        rep.eigenvectors = eig.vectors if keep_vectors else None
        status = "converged" if eig.converged else "NOT converged"
        for i, (lam, res) in enumerate(zip(eig.values, eig.residuals, strict=True)):
            note = f"residual ||Hv - lambda v|| = {res:.2g}"
            if i == 0:
                note += f"; Lanczos {status} to rel. {s.eig_tol:.0e} in {eig.n_hvp} HVPs"
            rep.rows.append(Row(f"eigenvalue lambda_{i + 1}", lam, note=note))
    if "density" in want:
        total = s.density_vectors * min(s.density_steps, op.num_params)
        dens = timed(
            "density",
            "spectral density",
            total,
            "HVP",
            lambda: spectral_density(
                op, n_vectors=s.density_vectors, n_steps=s.density_steps, seed=seed, train_mode=tm
            ),
        )
        rep.results["density"] = dens.to_dict()
        neg = float(dens.weights[dens.nodes < 0].sum())
        lo, hi = float(dens.nodes.min()), float(dens.nodes.max())
        rep.rows.append(
            Row(
                "smallest eigenvalue (SLQ)",
                lo,
                note=f"density: Ritz nodes in [{fmt_value(lo)}, {fmt_value(hi)}], "
                f"{100 * neg:.3g}% of the mass below 0; {dens.n_hvp} HVPs "
                f"({s.density_vectors} x {s.density_steps})",
            )
        )
    if "avg-sam" in want:
        counted = counting_loss(fl, bar)
        rep.results["avg-sam"] = []
        for sigma in s.sigmas:
            total = 2 * math.ceil(s.probes / 2)
            r = timed(
                f"avg-sam sigma={sigma:g}",
                f"avg-SAM sigma={sigma:g}",
                total,
                "fwd",
                lambda sigma=sigma: avg_sam_loss(counted, sigma=sigma, n_samples=s.probes, seed=seed),
            )
            q = base + 0.5 * sigma**2 * trace.value  # type: ignore[union-attr]
            q_se = 0.5 * sigma**2 * trace.stderr  # type: ignore[union-attr]
            rep.results["avg-sam"].append(
                {
                    "sigma": sigma,
                    "sampled": r.to_dict(),
                    "quadratic": {
                        "value": q,
                        "stderr": q_se,
                        "increase": q - base,
                        "formula": "L(w) + sigma^2/2 * Tr H, Tr H from the 'trace' metric",
                    },
                }
            )
            rep.rows.append(
                Row(
                    f"avg-SAM E L(w+eps), sigma={sigma:g}",
                    r.value,
                    r.stderr,
                    f"increase {fmt_value(r.increase)}; {r.n_samples} samples (antithetic)",
                )
            )
            rep.rows.append(Row("  quadratic L + sigma^2/2 Tr H", q, q_se, f"increase {fmt_value(q - base)}"))
    if "sam" in want:
        rep.results["sam"] = []
        for rho in s.rhos:
            r = timed(
                f"sam rho={rho:g}",
                f"SAM rho={rho:g}",
                None,
                "step",
                lambda rho=rho: sam_sharpness(fl, rho=rho, steps=1, seed=seed),
            )
            rep.results["sam"].append(r.to_dict())
            rep.rows.append(
                Row(
                    f"SAM sharpness, rho={rho:g}",
                    r.value,
                    note=f"L(w + rho g/||g||) - L(w); ||g|| = {fmt_value(r.grad_norm)}",
                )
            )
    if "layers" in want:
        rep.results["layers"] = _layer_traces(model, loss_fn, batches, s, bar, rep)
    op.release()
    rep.products = op.graph_info()
    return rep


def trace_options(s: ReportSettings) -> dict[str, Any]:
    """``hessian_trace`` keywords: stop on ``rtol`` (cap ``max_probes``), or a fixed ``probes``."""
    if s.rtol:
        return {"rtol": s.rtol, "max_probes": s.max_probes, "method": s.trace_method}
    return {"n_probes": s.probes, "method": s.trace_method}


def trace_note(t: Any) -> str:
    """The table's note on a trace: method, cost, achieved relative error against the target."""
    if t.method == "exact-ggn":
        return f"exact: Tr H = Tr G (piecewise-linear net), {t.n_backward} backward passes, 0 HVPs"
    if t.method == "exact":
        return f"exact: Tr G + smooth activations' term, {t.n_backward} backward passes, 0 HVPs"
    cost = f"{t.n_probes} probes, {t.n_hvp} HVPs" + (f" + {t.n_jvp} JVPs" if t.n_jvp else "")
    head = "exact Tr G + Hutchinson on H - G" if t.method == "ggn+hutchinson" else t.method
    rel = abs(t.stderr / t.value) if t.value else float("inf")
    target = "" if t.rtol is None else f" (target {100 * t.rtol:.3g} %{'' if t.converged else ', NOT met'})"
    return f"{head}, {cost}; rel. stderr {100 * rel:.2g} %{target}"


def _layer_traces(model, loss_fn, batches, s: ReportSettings, bar: Progress, rep: Report) -> dict[str, Any]:
    out: dict[str, Any] = {}
    total, total_var = 0.0, 0.0
    for layer, names in layer_groups(model).items():
        flx = make_loss(model, loss_fn, batches, params=layer, train_mode=s.train_mode, check=False)
        opx = ProgressOperator(flx, graph_memory=s.graph_memory)
        opx.progress, opx.train_mode = bar, s.train_mode
        t0 = time.perf_counter()
        with bar.task(f"trace {layer}", s.probes, "HVP"):
            r = hessian_trace(opx, seed=s.seed, train_mode=s.train_mode, **trace_options(s))
        with bar.task(f"lambda_max {layer}", None, "HVP"):
            top = top_eigenvalues(opx, k=1, tol=s.eig_tol, seed=s.seed, train_mode=s.train_mode)
        opx.release()
        rep.timings[f"layer {layer}"] = round(time.perf_counter() - t0, 3)
        out[layer] = {**r.to_dict(), "parameters": names, "num_params": opx.num_params,
                      "top_eigenvalue": top.to_dict()}  # fmt: skip
        total += r.value
        total_var += r.stderr**2
        rep.rows.append(
            Row(
                f"layer {layer}: Tr H_ll",
                r.value,
                r.stderr,
                f"{', '.join(names)} ({opx.num_params:,} params)",
            )
        )
        status = "" if top.converged else ", NOT converged"
        rep.rows.append(Row(f"layer {layer}: lambda_max(H_ll)", top.values[0],
                            note=f"residual {top.residuals[0]:.2g}; {top.n_hvp} HVPs{status}"))  # fmt: skip
    rep.rows.append(Row("sum of layer traces", total, math.sqrt(total_var), "= Tr H in expectation"))
    return out
