"""One prepared GPU check: correctness on the device, sharpness speed, engine throughput, distributed mode.

Run on a machine with a GPU, with that machine's own Python and torch, installing nothing::

    PYTHONPATH=. python benchmarks/gpu_check.py [--out gpu_check.json]      # < 8 minutes on one GPU
    PYTHONPATH=. python benchmarks/gpu_check.py --cpu-smoke                  # tiny, CPU (a default test)

It prints one table in four parts:

1. **correctness**: the same computation in float64 on the device and on the CPU (same seeds, probes drawn on
   a CPU generator): one HVP, a 20-probe Hutchinson trace, Lanczos top-5, avg-SAM (16 antithetic samples),
   Tr(H Xi) from 4 deviations, and one step of every algorithm of :mod:`verify.algorithms` (m = 4 workers);
   max relative difference each, criterion < 1e-8 (float64 on both sides: only summation order differs).
2. **sharpness speed** (float32, a ReLU CNN at batch 128): one gradient; one HVP per vector, unbatched and in
   batched calls (chunk sweep, both backends ``func`` and ``autograd``), in gradients per vector; a
   100-probe trace and Lanczos top-5 against PyHessian's in the same process when ``pyhessian`` imports.
3. **engine throughput** on the paper's model and batch (micro ResNet-18, CIFAR-shaped synthetic data,
   m = 16, local batch 64 and 512): step time and images/s of a D-SGD step with the engine's own speed
   options (``verify.speed``, the code ``dsgd-verify run --precision/--channels-last/--compile`` runs): fp32,
   tf32, bf16, channels-last, bf16 + channels-last, compile (where each applies; a failure or a no-op is
   printed with its reason), against a centralised step of the same total batch; the projected time of one
   ``paper`` preset seed (``figures.presets``: C-SGD and ring D-SGD at both batches, grid and exponential
   D-SGD at the large one, 6000 steps each) from the measured step times, measurements excluded.
4. **distributed**: ``verify.distributed`` with NCCL needs one GPU per rank; with fewer than 2 GPUs it is
   skipped with that reason (its CPU/gloo equality with the simulation is in the default tests).

Timing: interleaved rounds, medians (``benchmarks/_timing.py``), synchronised on CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved  # noqa: E402


def medians(fns: dict[str, Callable[[int], Any]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, interleaved rounds (``_timing.interleaved``)."""
    times, _ = interleaved(fns, repeats, device)
    return {k: statistics.median(v) for k, v in times.items()}


from sharpness.functional import make_loss  # noqa: E402
from sharpness.hvp import HessianOperator  # noqa: E402
from sharpness.lanczos import top_eigenvalues  # noqa: E402
from sharpness.sam import avg_sam_loss  # noqa: E402
from sharpness.trace import hessian_trace  # noqa: E402
from verify.algorithms import ALGORITHMS, AlgoConfig, State, get  # noqa: E402
from verify.measures import trace_h_xi_fl  # noqa: E402
from verify.models import mlp, resnet18_micro, small_cnn  # noqa: E402
from verify.problems import ModelProblem  # noqa: E402
from verify.speed import Speed, SpeedError, training_grads  # noqa: E402
from verify.stacked import local_grads  # noqa: E402
from verify.topology import mixer, mixing_matrix  # noqa: E402

#: float64 on the device vs float64 on the CPU: only the order of summation differs
CORRECT_RTOL = 1e-8
#: runs of one ``paper`` preset seed (figures.presets): (algorithm, topology, local batch)
PAPER_RUNS = [("csgd", 64), ("ring", 64), ("csgd", 512), ("ring", 512), ("grid", 512), ("exponential", 512)]
PAPER_STEPS = 6000


def rel(a: Any, b: Any) -> float:
    """max |a - b| / max(|b|, tiny) over all entries."""
    a, b = torch.as_tensor(a, dtype=torch.float64).cpu(), torch.as_tensor(b, dtype=torch.float64).cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# ----------------------------------------------------------------------------------------- 1. correctness
def correctness(device: torch.device, smoke: bool) -> list[tuple[str, float]]:
    """Max relative differences, device float64 vs CPU float64."""
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(64 if smoke else 512, 1, 8, 8, generator=g),
        torch.randint(0, 10, (64 if smoke else 512,), generator=g),
    )

    def build(dev: torch.device) -> dict[str, Any]:
        torch.manual_seed(0)
        model = mlp(64, (16,), 10, "tanh").double().to(dev)
        fl = make_loss(model, F.cross_entropy, (x.double(), y), device=dev)
        op = HessianOperator(fl)
        v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        D = (
            torch.randn(4, op.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            * 0.01
        )
        D -= D.mean(0)
        out = {
            "HVP": op.matvec(v.to(dev)),
            "trace (20 probes)": hessian_trace(fl, n_probes=20, seed=0).value,
            "Lanczos top-5": torch.tensor(top_eigenvalues(fl, k=5, seed=0).values),
            "avg-SAM (16 samples)": avg_sam_loss(fl, sigma=0.05, n_samples=16, seed=0).value,
            "Tr(H Xi)": trace_h_xi_fl(fl, D.to(dev)),
        }
        prob = ModelProblem(model, (x, y), None, m=4, local_batch=8, seed=0, device=dev, dtype=torch.float64)
        W, B = prob.init_stacked()
        W = W + 0.01 * torch.randn(W.shape, generator=torch.Generator().manual_seed(3), dtype=W.dtype).to(dev)
        grads = local_grads(prob, "loop")
        batches = prob.batches(0)
        mix = mixer(mixing_matrix("ring", 4), "dense")
        cfg = AlgoConfig(momentum=0.9, weight_decay=1e-4, rho=0.05, sigma=0.01, local_steps=2, seed=0)
        for name in ALGORITHMS:
            new, _ = get(name)(
                State(W.clone(), B, None, 0), lambda W_, B_: grads(W_, B_, batches), mix, 0.1, cfg
            )
            out[f"step {name}"] = new.W
        return out

    ref, dev = build(torch.device("cpu")), build(device)
    return [(k, rel(dev[k], ref[k])) for k in ref]


# --------------------------------------------------------------------------------------- 2. sharpness speed
def sharpness_speed(device: torch.device, smoke: bool, repeats: int) -> list[tuple[str, str]]:
    n = 16 if smoke else 128
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    model = small_cnn(3, 10, width=4 if smoke else 16, image=32).to(device)
    fl = make_loss(model, F.cross_entropy, (x, y), device=device)
    params = {k: v.detach().requires_grad_(True) for k, v in fl.params.items()}

    def gradient(_: int) -> Any:
        return torch.autograd.grad(fl.loss(params), list(params.values()))

    chunks = [1, 4] if smoke else [1, 4, 8, 16, 32]
    ops = {b: HessianOperator(fl, backend=b, chunk=c) for b in ("func", "autograd") for c in [max(chunks)]}
    V = torch.randn(ops["func"].num_params, max(chunks), generator=g).to(device)
    fns: dict[str, Callable[[int], Any]] = {"gradient": gradient}
    for backend in ("func", "autograd"):
        fns[f"HVP {backend} unbatched"] = lambda _, b=backend: ops[b].matvec(V[:, 0])
        for c in chunks:
            op = HessianOperator(fl, backend=backend, chunk=c)
            fns[f"HVP {backend} chunk {c}"] = lambda _, op=op, c=c: op.matmat(V[:, :c])
    med = medians(fns, repeats, device)
    t_grad = med["gradient"]
    rows = [("gradient", f"{t_grad * 1e3:.2f} ms")]
    for k, t in med.items():
        if k == "gradient":
            continue
        per = 1 if "unbatched" in k else int(k.rsplit(" ", 1)[1])
        rows.append((k, f"{t / per / t_grad:.2f} gradients/vector"))
    probes = 10 if smoke else 100
    t_ours, tr = _timed(lambda: hessian_trace(fl, n_probes=probes, seed=0), device)
    t_top, _ = _timed(lambda: top_eigenvalues(fl, k=5, seed=0), device)
    rows += [
        (f"trace {probes} probes (ours)", f"{t_ours:.3f} s, {tr.n_hvp} HVPs"),
        ("top-5 (ours)", f"{t_top:.3f} s"),
    ]
    try:
        from pyhessian import hessian as pyh  # noqa: PLC0415 - optional peer, imported only to compare
    except Exception as exc:  # noqa: BLE001 - any import failure means: skip the comparison
        rows.append(("PyHessian", f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}"))
    else:
        hc = pyh(
            model.eval(), nn.CrossEntropyLoss(), data=(x.to(device), y.to(device)), cuda=device.type == "cuda"
        )
        t_p, _ = _timed(lambda: hc.trace(maxIter=probes, tol=-math.inf), device)
        t_pt, _ = _timed(lambda: hc.eigenvalues(top_n=5, maxIter=100, tol=1e-4), device)
        rows += [
            (f"trace {probes} probes (PyHessian)", f"{t_p:.3f} s: ours {t_p / t_ours:.2f}x faster"),
            ("top-5 (PyHessian)", f"{t_pt:.3f} s: ours {t_pt / t_top:.2f}x faster"),
        ]
    return rows


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


# ------------------------------------------------------------------------------------- 3. engine throughput
#: the variants of section 3: the engine's own speed options (verify.speed), as ``dsgd-verify run`` runs them
VARIANTS = [
    Speed(),
    Speed("tf32"),
    Speed("bf16"),
    Speed(channels_last=True),
    Speed("bf16", channels_last=True),
    Speed(compile=True),
]
#: on the CPU (--cpu-smoke): TF32 is a CUDA mode, compiling would dominate the smoke test's time
CPU_VARIANTS = [Speed(), Speed("bf16"), Speed(channels_last=True)]


def engine_step(
    device: torch.device, m: int, b: int, algo: str, topology: str, speed: Speed, smoke: bool
) -> Callable[[int], None]:
    """A closure running one step of ``algo`` (m workers, local batch b) with the training gradients of
    ``speed`` (:func:`verify.speed.training_grads`, what the engine runs); raises :class:`SpeedError` when an
    option does not apply (its notes too: a variant that would be a no-op is not timed)."""
    n = m * b
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    model = resnet18_micro(num_classes=10, width=4 if smoke else 64)
    prob = ModelProblem(model, (x, y), None, m=m, local_batch=b, seed=0, device=device, dtype=torch.float32)
    W, B = prob.init_stacked()
    said: list[str] = []
    grads = training_grads(prob, "loop", speed, say=said.append)
    if said:
        raise SpeedError(said[0])
    mix = mixer(mixing_matrix(topology, m), "auto") if algo == "dsgd" else (lambda W_: W_)
    step, cfg = get(algo), AlgoConfig()
    batches = prob.batches(0)
    state = [State(W, B, None, 0)]

    def run(_: int) -> None:
        state[0], _losses = step(state[0], lambda W_, B_: grads(W_, B_, batches), mix, 0.1, cfg)

    return run


def engine_throughput(device: torch.device, smoke: bool, repeats: int) -> tuple[list[tuple[str, str]], dict]:
    m = 2 if smoke else 16
    locals_ = [4] if smoke else [64, 512]
    variants = VARIANTS if device.type == "cuda" else CPU_VARIANTS
    rows, times = [], {}
    for b in locals_:
        fns = {}
        for v in variants:
            try:
                fn = engine_step(device, m, b, "dsgd", "ring", v, smoke)
                fn(0)
                fns[f"D-SGD m={m} b={b} {v.label}"] = fn
            except Exception as exc:  # noqa: BLE001 - a variant that does not apply is reported, not fatal
                rows.append(
                    (
                        f"D-SGD m={m} b={b} {v.label}",
                        f"n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}",
                    )
                )
        fns[f"C-SGD batch {m * b} fp32"] = engine_step(device, 1, m * b, "csgd", "ring", Speed(), smoke)
        med = medians(fns, repeats, device)
        central = med[f"C-SGD batch {m * b} fp32"]
        for k, t in med.items():
            times[k] = t
            rows.append(
                (k, f"{t * 1e3:.1f} ms/step, {m * b / t:,.0f} images/s, {t / central:.2f}x centralised")
            )
    if not smoke:
        # one paper seed: every run at its batch, with the fastest measured D-SGD variant (fp32 for C-SGD)
        best = {
            b: min((t, k) for k, t in times.items() if k.startswith(f"D-SGD m={m} b={b} ")) for b in locals_
        }
        total = 0.0
        for key, b in PAPER_RUNS:
            total += PAPER_STEPS * (times[f"C-SGD batch {m * b} fp32"] if key == "csgd" else best[b][0])
        rows.append(
            (
                "paper preset, one seed (projected)",
                f"{total / 60:.1f} min of steps (fastest variants: "
                + ", ".join(f"b={b} {best[b][1].rsplit(' ', 1)[1]}" for b in locals_)
                + "; measurements excluded)",
            )
        )
    return rows, times


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny configuration on the CPU (a test)")
    ap.add_argument("--repeats", type=int, default=None, help="timing rounds (default 10; smoke 2)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device visible (torch.cuda.is_available() is False); use --cpu-smoke",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    repeats = args.repeats or (2 if smoke else 10)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    table: list[tuple[str, str, str]] = []
    corr = correctness(device, smoke)
    ok = all(v < CORRECT_RTOL for _, v in corr)
    table += [("1 correctness", k, f"{v:.2e} {'ok' if v < CORRECT_RTOL else 'FAIL'}") for k, v in corr]
    table += [("2 sharpness", k, v) for k, v in sharpness_speed(device, smoke, repeats)]
    rows, _ = engine_throughput(device, smoke, repeats)
    table += [("3 engine", k, v) for k, v in rows]
    n_gpu = torch.cuda.device_count() if device.type == "cuda" else 0
    table.append(
        (
            "4 distributed",
            "NCCL ranks",
            "skipped: needs one GPU per rank, "
            f"{n_gpu} visible (gloo/CPU equality with the simulation: tests/verify/test_distributed.py)",
        )
    )
    wall = time.perf_counter() - t0
    w = max(len(k) for _, k, _ in table)
    print(
        f"gpu_check on {name}, torch {torch.__version__}, {wall:.0f} s; "
        f"correctness {'ok' if ok else 'FAILED'} (criterion < {CORRECT_RTOL:g})"
    )
    section = None
    for s, k, v in table:
        if s != section:
            print(f"\n{s}")
            section = s
        print(f"  {k.ljust(w)}  {v}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {"device": name, "torch": torch.__version__, "wall_s": wall, "correct": ok, "rows": table},
                indent=1,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
