"""The Hessian trace to 1 % true relative error: ours (each method) against PyHessian, curvlinops,
hessian-eigenthings and BackPACK, side by side in one process, costs in seconds and in gradients.

Models (eval mode, float32, cross-entropy):

- ``tanh-mlp``: the demo tanh MLP (``sharpness.demo.train_demo``, 3,466 parameters) on its digits training
  split (1,438 samples, one batch), near a minimum. Reference: the dense float64 Hessian's trace
  (``HessianOperator.dense`` on a float64 copy). Ours: ``exact`` (Tr G + the tanh units' term; a plain
  ``nn.Sequential``, so the closed form of :mod:`sharpness.mlp_trace`), and the same method on the same
  network behind a module that is not a Sequential (``exact, general path``: the recorded certificate and
  one backward pass per output column and tanh unit, what any other smooth net gets). The exact rows also
  report the first of their timed rounds and the very first call in the process (before any warm-up).
- ``cnn``: ``verify.models.small_cnn(3, image=32, width=16)`` (56,714 parameters, ReLU, max-pool), batch 128
  of CIFAR-shaped random inputs (as ``bench_sharpness.py``). Reference: exact ``Tr G`` in float64, certified
  ``Tr H = Tr G`` (:mod:`sharpness.ggn`).
- ``resnet``: ``verify.models.resnet18_micro(width=15)`` (618,565 parameters, BatchNorm in eval mode,
  residual sums), batch 32. Reference as for ``cnn``.

Every candidate runs with a budget of ``BUDGET[model]`` products (the exact methods: no budget), once, or,
when cheap (every candidate on ``tanh-mlp``, the exact ones elsewhere), ``REPEATS`` = 5 times in interleaved
rounds (median seconds).
Its row:
value's true relative error, seconds, seconds in units of one gradient of the same model and batch, and the
**time to 1 %**: exact methods, their own time; stochastic ones, ``fixed + P x (seconds per product)`` with
``P = m (se / (0.01 |Tr|))^2`` the products at which the estimator's standard error is 1 % (``se`` from the
run's samples; for curvlinops, which returns no samples, from our run of the same estimator with the same
distribution -- the variance is the estimator's, the seconds per product the library's), never below the
run's own budget when the run's error already is below 1 %. Projection assumes ``se ~ m^-1/2``
(conservative for Hutch++ and XTrace on decaying spectra). ``ours auto (rtol 1 %)`` is measured, not
projected. Targets of issue 13 are printed below the table, never asserted.

    nice env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_trace.py [--models tanh-mlp,cnn,resnet]
        [--json out.json]

Peers are imported lazily; a peer that fails to import is skipped with the reason (they are installed with
``pip install --no-deps``: none may pull torchvision).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median  # noqa: E402
from bench_sharpness import build, gradient_fn  # noqa: E402

from sharpness.functional import make_loss  # noqa: E402
from sharpness.ggn import ggn_trace, piecewise_linear  # noqa: E402
from sharpness.hvp import HessianOperator  # noqa: E402
from sharpness.results import write_json  # noqa: E402
from sharpness.trace import hessian_trace  # noqa: E402

BUDGET = {"tanh-mlp": 42, "cnn": 60, "resnet": 30}
TARGET = 0.01
#: timed runs (median) of the cheap candidates: every one on tanh-mlp, the exact ones elsewhere
REPEATS = 5
LOSS = nn.CrossEntropyLoss()
warnings.filterwarnings("ignore")

Data = tuple[Tensor, Tensor]


def tanh_mlp() -> tuple[nn.Module, Data]:
    from sharpness.data import load_dataset
    from sharpness.demo import train_demo

    with tempfile.TemporaryDirectory() as tmp:
        model, _, _ = train_demo(Path(tmp) / "demo.pt", seed=0)
    data = load_dataset("digits", split="train").to("cpu", torch.float32)
    x, y = data.batches(10**6)[0]
    return model.eval(), (x, y)


class Opaque(nn.Module):
    """The same network behind a module of its own: not a plain ``nn.Sequential``, so ``exact`` takes the
    general path (recorded certificate, hooked backward passes)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def load(name: str) -> tuple[nn.Module, Data]:
    if name == "tanh-mlp":
        return tanh_mlp()
    return build(name, torch.device("cpu"))


def reference(name: str, model: nn.Module, data: Data) -> tuple[float, str]:
    """The exact trace in float64 and how it was obtained."""
    m64 = copy.deepcopy(model).double()
    d64 = (data[0].double(), data[1])
    if name == "tanh-mlp":
        return float(HessianOperator(m64, F.cross_entropy, d64).dense().trace()), "dense float64 Hessian"
    fl = make_loss(m64, F.cross_entropy, d64)
    cert = piecewise_linear(fl)
    if not cert.exact:
        raise SystemExit(f"{name}: Tr H = Tr G not certified: {cert.reason}")
    return ggn_trace(fl).value, "exact Tr G, float64 (certified piecewise linear)"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ------------------------------------------------------------------------------------------------ peers
def peer_pyhessian() -> Callable | str:
    try:
        from pyhessian import hessian
    except Exception as exc:  # noqa: BLE001 - any import failure is a skip with its reason
        return f"{type(exc).__name__}: {exc}"

    def run(model: nn.Module, data: Data, m: int, seed: int) -> dict:
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        vhv = hessian(model, LOSS, data=data, cuda=False).trace(maxIter=m, tol=float("-inf"))
        model.zero_grad(set_to_none=True)
        x = np.asarray(vhv, dtype=np.float64)
        return {"value": float(x.mean()), "stderr": float(x.std(ddof=1) / math.sqrt(x.size)), "products": m}

    return run


def peer_curvlinops(which: str) -> Callable | str:
    """curvlinops' estimators on its ``HessianLinearOperator`` (Hutch++ needs a budget divisible by 3,
    XTrace an even one: the budget is rounded down)."""
    try:
        from curvlinops import HessianLinearOperator
        from curvlinops.trace.epperly2024xtrace import xtrace
        from curvlinops.trace.hutchinson import hutchinson_trace
        from curvlinops.trace.meyer2020hutch import hutchpp_trace
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    fn = {"hutchinson": hutchinson_trace, "hutch++": hutchpp_trace, "xtrace": xtrace}[which]

    def run(model: nn.Module, data: Data, m: int, seed: int) -> dict:
        torch.manual_seed(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        op = HessianLinearOperator(model, LOSS, params, [data], check_deterministic=False)
        m = m - m % 3 if which == "hutch++" else m - m % 2
        return {"value": float(fn(op, m)), "stderr": None, "products": m}

    return run


def peer_eigenthings(which: str) -> Callable | str:
    try:
        from hessian_eigenthings import HessianOperator as EHessian
        from hessian_eigenthings.algorithms.trace import trace
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"

    def run(model: nn.Module, data: Data, m: int, seed: int) -> dict:
        op = EHessian(model, [data], lambda mod, b: LOSS(mod(b[0]), b[1]))
        r = trace(op, num_matvecs=m, method=which, seed=seed)
        return {"value": float(r.estimate), "stderr": float(r.stderr), "products": m}

    return run


def peer_backpack(name: str) -> Callable | str:
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact, DiagHessian
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"

    def run(model: nn.Module, data: Data, m: int, seed: int) -> dict:
        net = copy.deepcopy(model)
        # SmallCNN's forward branches on x.dim(), which BackPACK's converter cannot trace: its two
        # Sequentials are the same function on 4-D inputs
        if hasattr(net, "features") and hasattr(net, "head"):
            net = nn.Sequential(net.features, net.head)
            net = extend(net)
        else:
            net = extend(net, use_converter=name == "resnet")
        lossf = extend(nn.CrossEntropyLoss())
        ext, attr = (DiagHessian(), "diag_h") if name == "tanh-mlp" else (DiagGGNExact(), "diag_ggn_exact")
        loss = lossf(net(data[0]), data[1])
        with backpack(ext):
            loss.backward()
        value = sum(float(getattr(p, attr).double().sum()) for p in net.parameters())
        return {"value": value, "stderr": 0.0, "products": 0, "exact": True, "what": attr}

    return run


# ------------------------------------------------------------------------------------------------- ours
def ours(method: str, wrap: bool = False, **kw: Any) -> Callable:
    def run(model: nn.Module, data: Data, m: int, seed: int) -> dict:
        opts = dict(kw) if kw else {"n_probes": m}
        net = Opaque(model) if wrap else model
        r = hessian_trace(net, F.cross_entropy, data, method=method, seed=seed, **opts)
        return {
            "value": r.value,
            "stderr": r.stderr,
            "products": r.n_hvp + r.n_jvp,
            "exact": r.method.startswith("exact"),
            "n_backward": r.n_backward,
            "what": r.method,
            "n_probes": r.n_probes,
            "exact_part": r.exact_part,
            "converged": r.converged,
        }

    return run


def candidates(name: str) -> dict[str, Callable | str]:
    out: dict[str, Callable | str] = {}
    if name == "tanh-mlp":
        out["ours exact"] = ours("exact")
        out["ours exact, general path"] = ours("exact", wrap=True)
        out["ours ggn+hutchinson"] = ours("ggn+hutchinson")
    else:
        out["ours exact-ggn"] = ours("exact-ggn")
    out["ours auto (rtol 1 %)"] = ours("auto", rtol=TARGET, max_probes=2000)
    out["ours hutchinson"] = ours("hutchinson")
    out["ours hutch++"] = ours("hutch++")
    out["ours xtrace"] = ours("xtrace")
    out["BackPACK " + ("DiagHessian" if name == "tanh-mlp" else "DiagGGNExact")] = peer_backpack(name)
    out["PyHessian hutchinson"] = peer_pyhessian()
    out["curvlinops hutchinson"] = peer_curvlinops("hutchinson")
    out["curvlinops hutch++"] = peer_curvlinops("hutch++")
    out["curvlinops xtrace"] = peer_curvlinops("xtrace")
    out["hessian-eigenthings hutchinson"] = peer_eigenthings("hutchinson")
    out["hessian-eigenthings hutch++"] = peer_eigenthings("hutch++")
    return out


SAME_ESTIMATOR = {
    "curvlinops hutchinson": "ours hutchinson",
    "curvlinops hutch++": "ours hutch++",
    "curvlinops xtrace": "ours xtrace",
}


def measure(name: str) -> dict:
    torch.manual_seed(0)
    model, data = load(name)
    d = sum(p.numel() for p in model.parameters())
    grad = gradient_fn(model, data)
    grad()
    unit = median([timed(grad)[0] for _ in range(5)])
    ref, how = reference(name, model, data)
    m = BUDGET[name]
    rows: dict[str, dict] = {}
    cands = candidates(name)
    small = (data[0][:4], data[1][:4])
    cold = {}  # the very first call of each exact method in this process, before any warm-up
    for label in ("ours exact", "ours exact-ggn"):
        if label in cands and not isinstance(cands[label], str):
            cold[label] = timed(lambda label=label: cands[label](model, data, m, 1))[0]
    for fn in cands.values():  # warm-up on 4 samples: imports, first-call paths, thread pools
        if not isinstance(fn, str):
            try:
                fn(model, small, 6, 0)
            except Exception:  # noqa: BLE001, S110 - the timed run reports the failure
                pass
    # the cheap candidates (all on tanh-mlp, the exact ones elsewhere) run in interleaved rounds, so that a
    # load change on the shared machine hits them alike; the rest once each
    exact_ones = ("ours exact", "ours auto", "BackPACK")
    cheap = [
        k
        for k, fn in cands.items()
        if not isinstance(fn, str) and (name == "tanh-mlp" or k.startswith(exact_ones))
    ]
    times: dict[str, list[float]] = {k: [] for k in cheap}
    first: dict[str, Any] = {}
    failed: dict[str, str] = {}

    def attempt(label: str, fn: Callable) -> tuple[float, Any] | None:
        try:
            return timed(lambda: fn(model, data, m, 1))
        except Exception as exc:  # noqa: BLE001 - a failing peer is reported, the rest still runs
            failed[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            return None

    for _ in range(REPEATS):
        for label in cheap:
            if label not in failed and (got := attempt(label, cands[label])) is not None:
                times[label].append(got[0])
                first.setdefault(label, got[1])
    for label, fn in cands.items():
        if isinstance(fn, str):
            rows[label] = {"skipped": fn}
            print(f"  {name}: {label} skipped: {fn}", flush=True)
            continue
        if label in cheap and label not in failed:
            secs, r = median(times[label]), first[label]
            r["first_round_s"] = times[label][0]
            if label in cold:
                r["cold_s"] = cold[label]
        elif label not in failed and (got := attempt(label, fn)) is not None:
            secs, r = got
        if label in failed:
            rows[label] = {"skipped": failed[label]}
            print(f"  {name}: {label} failed: {failed[label]}", flush=True)
            continue
        r["seconds"] = secs
        r["rel_err"] = abs(r["value"] - ref) / abs(ref)
        rows[label] = r
        print(
            f"  {name}: {label}: {r['value']:.6g} (err {100 * r['rel_err']:.3g} %) {secs:.2f} s", flush=True
        )
    model.zero_grad(set_to_none=True)
    unit_after = median([timed(grad)[0] for _ in range(5)])
    unit = median([unit, unit_after])
    ggn_s = None
    if "ours ggn+hutchinson" in rows:  # its fixed cost: the exact Tr G
        ggn_s = median(
            [timed(lambda: ggn_trace(make_loss(model, F.cross_entropy, data)))[0] for _ in range(3)]
        )
    for label, r in rows.items():
        if "seconds" not in r:
            continue
        r["gradients"] = r["seconds"] / unit
        if r.get("exact") or label.startswith("ours auto"):
            r["t1"], r["t1_kind"] = r["seconds"], "measured"
            continue
        se = r["stderr"]
        if se is None:
            se = rows.get(SAME_ESTIMATOR.get(label, ""), {}).get("stderr")
        if not se or not r["products"]:
            r["t1"], r["t1_kind"] = None, "no stderr"
            continue
        fixed = ggn_s if (label == "ours ggn+hutchinson" and ggn_s is not None) else 0.0
        r["fixed_seconds"] = fixed
        per = (r["seconds"] - fixed) / r["products"]
        need = r["products"] * (se / (TARGET * abs(ref))) ** 2
        r["products_1pct"] = need
        r["t1"], r["t1_kind"] = fixed + need * per, "projected"
    return {"model": name, "params": d, "batch": int(data[0].shape[0]), "gradient_s": unit, "reference": ref,
            "reference_how": how, "budget": m, "rows": rows}  # fmt: skip


def fmt_table(res: dict) -> str:
    head = f"{res['model']}: {res['params']:,} parameters, batch {res['batch']}; one gradient "
    lines = [
        f"{head}{res['gradient_s']:.3f} s; Tr H = {res['reference']:.6g} ({res['reference_how']}); "
        f"budget {res['budget']} products",
        f"| {'method':<32} | {'value':>10} | {'true err':>8} | {'stderr':>8} | {'products':>8} "
        f"| {'seconds':>8} | {'gradients':>9} | {'time to 1 %':>18} |",
        "|" + "|".join("-" * w for w in (34, 12, 10, 10, 10, 10, 11, 20)) + "|",
    ]
    unit = res["gradient_s"]
    for label, r in res["rows"].items():
        if "skipped" in r:
            lines.append(f"| {label:<32} | skipped: {r['skipped'][:90]}")
            continue
        se = "-" if r["stderr"] is None else f"{100 * r['stderr'] / abs(res['reference']):.2g} %"
        if r.get("t1") is None:
            t1 = "-"
        else:
            mark = "~" if r["t1_kind"] == "projected" else ""
            t1 = f"{mark}{r['t1']:.3g} s ({mark}{r['t1'] / unit:.3g} g)"
        lines.append(
            f"| {label:<32} | {r['value']:>10.6g} | {100 * r['rel_err']:>6.2g} % | {se:>8} "
            f"| {r['products']:>8} | {r['seconds']:>8.2f} | {r['gradients']:>9.1f} | {t1:>18} |"
        )
    return "\n".join(lines)


def targets(res: dict) -> list[str]:
    rows, out = res["rows"], []
    bp = next((r for k, r in rows.items() if k.startswith("BackPACK") and "seconds" in r), None)
    ph = rows.get("PyHessian hutchinson", {})
    best = min(
        (r for k, r in rows.items() if k.startswith("ours") and r.get("t1") is not None),
        key=lambda r: r["t1"],
        default=None,
    )
    key = next((k for k in ("ours exact-ggn", "ours exact") if k in rows and "seconds" in rows[k]), None)
    if key and bp:
        ex = rows[key]
        diff = abs(ex["value"] - bp["value"]) / abs(bp["value"])
        out.append(
            f"exact at no more than BackPACK's cost: ours {ex['gradients']:.1f} g vs BackPACK "
            f"{bp['gradients']:.1f} g (ratio {ex['seconds'] / bp['seconds']:.2f}); differ by {diff:.1e}"
        )
    if res["model"] == "tanh-mlp" and best:
        g = best["t1"] / res["gradient_s"]
        ok = "met" if g <= 50 and best["rel_err"] <= TARGET else "NOT met"
        out.append(
            f"<= 1 % on the smooth net within 50 gradients: best of ours {g:.1f} g, true error "
            f"{100 * best['rel_err']:.2g} % ({ok}; {best['what']})"
        )
    for k in ("ours exact", "ours exact-ggn", "ours exact, general path"):
        r = rows.get(k, {})
        if "first_round_s" in r:
            cold = (
                f"; very first call in the process {r['cold_s'] / res['gradient_s']:.1f} g"
                if "cold_s" in r
                else ""
            )
            out.append(
                f"{k}: median {r['gradients']:.1f} g, first timed round "
                f"{r['first_round_s'] / res['gradient_s']:.1f} g{cold}"
            )
    if best and ph.get("t1"):
        out.append(
            f">= 5x less time than PyHessian to 1 %: PyHessian / best of ours = {ph['t1'] / best['t1']:.1f}x"
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models", default="tanh-mlp,cnn,resnet", help="comma-separated subset of tanh-mlp,cnn,resnet"
    )
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    unknown = [m for m in args.models.split(",") if m not in BUDGET]
    if unknown:
        print(
            f"bench_trace: unknown model {unknown[0]!r} in --models (known: {', '.join(BUDGET)})",
            file=sys.stderr,
        )
        raise SystemExit(2)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load0 = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {load0[0]:.2f}",
        flush=True,
    )
    results = [measure(name) for name in args.models.split(",")]
    load1 = os.getloadavg()
    print()
    for res in results:
        print(fmt_table(res))
        for line in targets(res):
            print("  " + line)
        print()
    print(
        f"load average (1 min) at start {load0[0]:.2f}, at end {load1[0]:.2f}; g = gradients of the same "
        "model and batch; ~ = projected from the run's standard error"
    )
    if args.json:
        write_json(args.json, {"results": results, "load": [load0, load1]})


if __name__ == "__main__":
    main()
