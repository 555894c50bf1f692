"""Cost of the sharpness core against PyHessian 0.1, measured side by side in one process.

Models (eval mode, seeded weights, CIFAR-shaped random inputs 3x32x32, 10 classes, cross-entropy):
``cnn`` = ``verify.models.small_cnn(in_channels=3, image=32, width=16)`` (56,714 parameters), batch 128;
``resnet`` = ``verify.models.resnet18_micro(width=15)`` (618,565 parameters, BatchNorm), batch 32.
On CPU, and on CUDA when present, it prints one table:

- one gradient (the unit), one HVP (``HessianOperator.matvec``), one HVP inside a batched ``matmat`` of
  16 columns (default chunk, chunk 8, and the ``func`` backend with chunk 8), PyHessian's HVP;
- 100-probe Hutchinson trace (``hessian_trace``) vs PyHessian ``trace(maxIter=100, tol=-inf)`` (at tol=0
  it stops early once its running mean is negative), both timed from the model (each builds its own
  gradient graph);
- top-1 and top-5 to 1e-4 relative residual (``top_eigenvalues``) vs PyHessian ``eigenvalues(top_n=5)``
  (power iteration, its defaults ``maxIter=100, tol=1e-3``): HVPs, time, and the relative error of the
  eigenvalues against a float64 Lanczos reference (tol 1e-8);
- peak memory of one gradient and of the 100-probe traces (CPU: RSS high-water mark in a fresh process per
  measurement; CUDA: ``max_memory_allocated``; see ``benchmarks/_timing.py``).

Timed candidates run interleaved, round after round, and each cell is a median. Ratios are printed, never
asserted; the targets of issue 2 are printed beside them.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sharpness.py [--quick] [--device cpu|cuda|all]
        [--models cnn,resnet] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    RSS_CHILD_ENV,
    interleaved,
    median,
    peak_cuda_increase,
    peak_rss_increase,
    run_json_child,
    time_call,
)

from sharpness.hvp import HessianOperator  # noqa: E402
from sharpness.lanczos import top_eigenvalues  # noqa: E402
from sharpness.results import write_json  # noqa: E402
from sharpness.trace import hessian_trace  # noqa: E402
from verify.models import resnet18_micro, small_cnn  # noqa: E402

MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "cnn": (lambda: small_cnn(in_channels=3, image=32, width=16), 128),
    "resnet": (lambda: resnet18_micro(width=15), 32),
}
N_PROBES = 100
TOL = 1e-4
BATCH_COLS = 16
LOSS = nn.CrossEntropyLoss()
warnings.filterwarnings("ignore", message=".*create_graph=True will create a reference cycle.*")


def build(name: str, device: torch.device) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """The seeded model (eval mode) and one batch of CIFAR-shaped random inputs with random labels."""
    make, batch = MODELS[name]
    torch.manual_seed(0)
    model = make().to(device).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return model, (x.to(device), y.to(device))


def gradient_fn(model: nn.Module, data: tuple[Tensor, Tensor]) -> Callable[[], Any]:
    """One plain autograd gradient of the loss: the unit of every cost below."""
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = data
    return lambda: torch.autograd.grad(LOSS(model(x), y), params)


# ------------------------------------------------------------------------------------------- PyHessian
class PyHessian:
    """PyHessian 0.1 with its HVPs counted. It puts the model in eval mode (ours are already) and leaves a
    create_graph gradient in ``.grad``; every use starts and ends with ``zero_grad(set_to_none=True)``."""

    def __init__(self) -> None:
        try:
            from pyhessian import hessian  # noqa: F401
        except ImportError as exc:
            raise SystemExit("PyHessian is missing: pip install --no-deps pyhessian==0.1") from exc
        self.mod = sys.modules["pyhessian.hessian"]
        self.count = 0
        original = self.mod.hessian_vector_product

        def counted(*args: Any) -> Any:
            self.count += 1
            return original(*args)

        self.mod.hessian_vector_product = counted
        self.hvp = counted

    def make(self, model: nn.Module, data: tuple[Tensor, Tensor]) -> Any:
        model.zero_grad(set_to_none=True)
        return self.mod.hessian(model, LOSS, data=data, cuda=data[0].is_cuda)

    def trace(self, model: nn.Module, data: tuple[Tensor, Tensor], seed: int) -> tuple[float, float, int]:
        torch.manual_seed(seed)
        # tol=-inf: its stopping test |mean - prev| / (prev + 1e-6) < tol fires at tol=0 once the running mean
        # is negative, so only -inf guarantees maxIter probes
        vhv = self.make(model, data).trace(maxIter=N_PROBES, tol=float("-inf"))
        model.zero_grad(set_to_none=True)
        x = np.asarray(vhv)
        return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size)), int(x.size)

    def top5(self, model: nn.Module, data: tuple[Tensor, Tensor], seed: int) -> tuple[list[float], int]:
        torch.manual_seed(seed)
        start = self.count
        vals, _ = self.make(model, data).eigenvalues(top_n=5)
        model.zero_grad(set_to_none=True)
        return [float(v) for v in vals], self.count - start


# ------------------------------------------------------------------------------------------ measurements
def hvp_costs(model: nn.Module, data: tuple[Tensor, Tensor], ph: PyHessian, repeats: int) -> dict:
    """Seconds per gradient and per HVP (matvec; matmat of 16 columns per vector), interleaved."""
    dev = data[0].device
    ops = {
        "matvec": HessianOperator(model, LOSS, data),
        "matmat_default": HessianOperator(model, LOSS, data),
        "matmat_chunk8": HessianOperator(model, LOSS, data, chunk=8),
        "matmat_func8": HessianOperator(model, LOSS, data, backend="func", chunk=8),
    }
    d = ops["matvec"].num_params
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(d, generator=gen).to(dev)
    V = torch.randn(d, BATCH_COLS, generator=gen).to(dev)
    h = ph.make(model, data)
    vl = [torch.randn(p.shape, generator=gen).to(dev) for p in h.params]
    grad = gradient_fn(model, data)
    fns: dict[str, Callable[[int], Any]] = {"gradient": lambda r: grad()}
    fns["matvec"] = lambda r: ops["matvec"].matvec(v)
    for key in ("matmat_default", "matmat_chunk8", "matmat_func8"):
        fns[key] = lambda r, op=ops[key]: op.matmat(V)
    fns["pyhessian_hvp"] = lambda r: ph.hvp(h.gradsH, h.params, vl)
    times, _ = interleaved(fns, repeats, dev)
    model.zero_grad(set_to_none=True)
    out = {k: median(t) for k, t in times.items()}
    for key in ("matmat_default", "matmat_chunk8", "matmat_func8"):
        out[key] /= BATCH_COLS
    out["default_chunk"] = ops["matmat_default"].chunk
    return out


def trace_costs(model: nn.Module, data: tuple[Tensor, Tensor], ph: PyHessian, repeats: int) -> dict:
    """100-probe Hutchinson trace, ours vs PyHessian, each from the model, interleaved over seeds."""
    fns = {
        "ours": lambda r: hessian_trace(model, LOSS, data, n_probes=N_PROBES, seed=max(r, 0)),
        "pyhessian": lambda r: ph.trace(model, data, seed=max(r, 0)),
    }
    times, res = interleaved(fns, repeats, data[0].device, warmup=0)
    ours = res["ours"][0]
    return {
        "ours_s": median(times["ours"]),
        "pyhessian_s": median(times["pyhessian"]),
        "ours_value": (ours.value, ours.stderr, ours.n_hvp),
        "pyhessian_value": res["pyhessian"][0],
    }


def reference_eigenvalues(model: nn.Module, data: tuple[Tensor, Tensor]) -> dict:
    """Top-5 by float64 Lanczos to tol 1e-8 (the accuracy reference), its time and convergence, and the
    rounding level of the float32 HVP: ``||H32 v - H64 v|| / ||H64 v||`` for one Gaussian ``v``."""
    m64 = copy.deepcopy(model).double()
    x, y = data
    data64 = (x.double(), y)
    dt, res = time_call(
        lambda: top_eigenvalues(m64, LOSS, data64, k=5, tol=1e-8, max_iter=400, seed=123), x.device
    )
    v = torch.randn(res.vectors.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h64 = HessianOperator(m64, LOSS, data64).matvec(v.to(x.device))
    h32 = HessianOperator(model, LOSS, data).matvec(v.float().to(x.device)).double()
    err = float((h32 - h64).norm() / h64.norm())
    return {"values": res.values, "s": dt, "converged": res.converged, "hvp32_rel_err": err}


def rel_errors(values: list[float], ref: list[float]) -> list[float]:
    """``|v_i - r_i| / |r_i|`` after sorting both in decreasing order."""
    v, r = sorted(values, reverse=True), sorted(ref, reverse=True)[: len(values)]
    return [abs(a - b) / abs(b) for a, b in zip(v, r, strict=True)]


def eig_costs(model: nn.Module, data: tuple[Tensor, Tensor], ph: PyHessian, repeats: int) -> dict:
    """Top-1 and top-5 to 1e-4 (ours) vs PyHessian's top-5, interleaved over seeds; errors vs reference."""
    reference = reference_eigenvalues(model, data)
    ref = reference["values"]
    fns = {
        "top1": lambda r: top_eigenvalues(model, LOSS, data, k=1, tol=TOL, seed=max(r, 0)),
        "top5": lambda r: top_eigenvalues(model, LOSS, data, k=5, tol=TOL, seed=max(r, 0)),
        "pyhessian": lambda r: ph.top5(model, data, seed=max(r, 0)),
    }
    times, res = interleaved(fns, repeats, data[0].device, warmup=0)
    out: dict[str, Any] = {"reference": reference}
    for k in ("top1", "top5"):
        out[k] = {
            "s": median(times[k]),
            "n_hvp": median([r.n_hvp for r in res[k]]),
            "n_iter": median([r.n_iter for r in res[k]]),
            "converged": all(r.converged for r in res[k]),
            "max_rel_err": max(max(rel_errors(r.values, ref)) for r in res[k]),
        }
    out["pyhessian"] = {
        "s": median(times["pyhessian"]),
        "n_hvp": median([n for _, n in res["pyhessian"]]),
        "max_rel_err": max(max(rel_errors(v, ref)) for v, _ in res["pyhessian"]),
        "values": res["pyhessian"][0][0],
    }
    return out


def _memory_target(what: str, model: nn.Module, data: tuple[Tensor, Tensor]) -> Callable[[], Any]:
    if what == "gradient":
        return gradient_fn(model, data)
    if what == "trace":
        return lambda: hessian_trace(model, LOSS, data, n_probes=N_PROBES, seed=0)
    ph = PyHessian()
    return lambda: ph.trace(model, data, seed=0)


def memory_child(model_name: str, what: str) -> dict:
    """In a fresh CPU process: the RSS increase of one gradient / our trace / PyHessian's trace."""
    model, data = build(model_name, torch.device("cpu"))
    nbytes, method = peak_rss_increase(_memory_target(what, model, data))
    return {"bytes": nbytes, "method": method}


def memory_costs(model_name: str, device: torch.device, threads: int | None) -> dict:
    """Peak memory of one gradient and of the two 100-probe traces (bytes) and the instrument used."""
    out: dict[str, Any] = {}
    for what in ("gradient", "trace", "pyhessian_trace"):
        if device.type == "cuda":
            model, data = build(model_name, device)
            out[what], out["method"] = peak_cuda_increase(_memory_target(what, model, data), device)
            del model, data
        else:
            argv = [__file__, "--memory-child", f"{model_name}:{what}"]
            argv += ["--threads", str(threads)] if threads else []
            res = run_json_child(argv, env=RSS_CHILD_ENV)
            out[what], out["method"] = res["bytes"], res["method"]
    return out


# ------------------------------------------------------------------------------------------------ report
def fmt(x: float, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def rows_for(name: str, dev: str, r: dict) -> list[list[str]]:
    """Table rows: model, quantity, ours, PyHessian, ours/PyHessian, target, met."""
    c, t, e, m = r["hvp"], r["trace"], r["eig"], r["memory"]
    g = c["gradient"]
    tag = f"{name} ({r['num_params']:,} p., {dev})"
    rows = [
        [tag, "one gradient [ms] (unit)", fmt(1e3 * g, ".1f"), "", "", "", ""],
        [tag, "one HVP, matvec [gradients]", fmt(c["matvec"] / g), fmt(c["pyhessian_hvp"] / g),
         fmt(c["matvec"] / c["pyhessian_hvp"]), "", ""],
    ]  # fmt: skip
    for key, label in (
        ("matmat_default", f"HVP in matmat, default chunk {c['default_chunk']} [gradients/vector]"),
        ("matmat_chunk8", "HVP in matmat, chunk 8 [gradients/vector]"),
        ("matmat_func8", "HVP in matmat, func backend, chunk 8 [gradients/vector]"),
    ):
        target, met = "", ""
        if key == "matmat_default" and name == "cnn":
            target, met = "<= 1.5", verdict(c[key] / g <= 1.5)
        rows.append([tag, label, fmt(c[key] / g), "", "", target, met])
    ratio = t["ours_s"] / t["pyhessian_s"]
    (ov, ose, _), (pv, pse, pn) = t["ours_value"], t["pyhessian_value"]
    rows += [
        [tag, f"{N_PROBES}-probe trace [s]", fmt(t["ours_s"]), fmt(t["pyhessian_s"]), fmt(ratio),
         "<= 0.40 (2.5x faster)", verdict(ratio <= 0.4)],
        [tag, "trace estimate (seed 0) +- stderr", f"{ov:.4g} +- {ose:.2g}",
         f"{pv:.4g} +- {pse:.2g} ({pn} probes)", "", "", ""],
    ]  # fmt: skip
    p = e["pyhessian"]
    for k, hvp_target in (("top1", 25), ("top5", 60)):
        s = e[k]
        rows.append([tag, f"{k} to {TOL:g}: HVPs (Lanczos steps + {k[-1]} residual)",
                     f"{s['n_hvp']:.0f} ({s['n_iter']:.0f}+{int(k[-1])})",
                     f"{p['n_hvp']:.0f}" if k == "top5" else "", "", f"<= {hvp_target}",
                     verdict(s["n_hvp"] <= hvp_target)])  # fmt: skip
        ratio = s["s"] / p["s"]
        rows.append([tag, f"{k} time [s]", fmt(s["s"]), fmt(p["s"]) if k == "top5" else "",
                     fmt(ratio) if k == "top5" else "", "<= 0.5" if k == "top5" else "",
                     verdict(ratio <= 0.5) if k == "top5" else ""])  # fmt: skip
        rows.append([tag, f"{k} max rel. error vs float64 reference", fmt(s["max_rel_err"], ".1e"),
                     fmt(p["max_rel_err"], ".1e") if k == "top5" else "", "", "", ""])  # fmt: skip
    ratio = m["trace"] / m["gradient"]
    rows += [
        [tag, f"peak memory, one gradient [MiB] ({m['method']})", fmt(m["gradient"] / 2**20, ".1f"),
         "", "", "", ""],
        [tag, f"peak memory, {N_PROBES}-probe trace [MiB]", fmt(m["trace"] / 2**20, ".1f"),
         fmt(m["pyhessian_trace"] / 2**20, ".1f"), fmt(m["trace"] / m["pyhessian_trace"]), "", ""],
        [tag, "trace peak / gradient peak", fmt(ratio), fmt(m["pyhessian_trace"] / m["gradient"]), "", "<= 3",
         verdict(ratio <= 3)],
    ]  # fmt: skip
    return rows


def markdown(rows: list[list[str]]) -> str:
    head = ["model", "quantity", "ours", "PyHessian", "ours/PyHessian", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats: 3 / 1 instead of 7 / 3")
    parser.add_argument("--device", default="all", help="cpu, cuda or all (cuda only when present)")
    parser.add_argument("--models", default="cnn,resnet", help="comma-separated subset of cnn,resnet")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        import json

        name, what = args.memory_child.split(":")
        print(json.dumps(memory_child(name, what)))
        return
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if bad := [m for m in names if m not in MODELS]:
        parser.error(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    if args.device not in ("cpu", "cuda", "all"):
        parser.error(f"--device must be cpu, cuda or all, not {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but this machine has no CUDA device")
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu"]
    if args.device == "all" and torch.cuda.is_available():
        devices.append("cuda")
    fast, slow = (3, 1) if args.quick else (7, 3)
    ph = PyHessian()
    env = (
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} CPU thread(s)"
        + (f", {torch.cuda.get_device_name(0)}" if "cuda" in devices else "")
    )
    results: dict[str, Any] = {"environment": env, "repeats": {"fast": fast, "slow": slow}, "runs": {}}
    rows: list[list[str]] = []
    for dev in devices:
        device = torch.device(dev)
        for name in names:
            model, data = build(name, device)
            r: dict[str, Any] = {"num_params": sum(p.numel() for p in model.parameters())}
            log(f"{name} on {dev}: gradient and HVP costs ({fast} rounds)")
            r["hvp"] = hvp_costs(model, data, ph, fast)
            log(f"{name} on {dev}: {N_PROBES}-probe traces ({slow} rounds)")
            r["trace"] = trace_costs(model, data, ph, slow)
            log(f"{name} on {dev}: eigenvalues (reference, then {slow} rounds)")
            r["eig"] = eig_costs(model, data, ph, slow)
            log(f"{name} on {dev}: peak memory")
            r["memory"] = memory_costs(name, device, args.threads)
            results["runs"][f"{name}/{dev}"] = r
            rows += rows_for(name, dev, r)
            del model, data
    print(f"# bench_sharpness: {env}; medians of {fast} (HVP costs) / {slow} (trace, eigenvalues) rounds")
    print(markdown(rows))
    for key, r in results["runs"].items():
        ref, p = r["eig"]["reference"], r["eig"]["pyhessian"]
        print(
            f"{key}: float64 reference top-5 {[f'{v:.6g}' for v in ref['values']]} "
            f"(converged {ref['converged']}, {ref['s']:.0f} s); float32 HVP rel. error vs float64 "
            f"{ref['hvp32_rel_err']:.1e}; PyHessian top-5 {[f'{v:.6g}' for v in p['values']]}"
        )
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
