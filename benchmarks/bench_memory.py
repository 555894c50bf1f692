"""Peak memory and time per HVP of a Hessian trace over 1, 8 and 32 batches, cached against streamed graphs.

Model: ``verify.models.small_cnn(in_channels=1, image=28, width=W)`` (MNIST-shaped random inputs, seeded
weights, eval mode, cross-entropy), batch size B (default 256). For each number of batches N and each mode
a fresh child process builds the data, then measures

- the peak memory of ``hessian_trace(op, n_probes=P)`` above the memory held before it (CPU: RSS high-water
  mark, ``VmHWM``; CUDA: ``max_memory_allocated``; see ``benchmarks/_timing.py``); the operator builds its
  graphs inside this call, so they are counted;
- the time per HVP of a second ``hessian_trace`` on the same operator (graphs already cached), divided by P.

Then, in this process, ``--timing-batches`` batches: the time of one HVP cached, one streamed and one
gradient, run interleaved round after round (``--rounds``; medians), so that load changes on a shared machine
hit all three alike: streamed / cached is the price of bounded memory (about one more gradient per product).

Modes: ``cached`` (``graph_memory`` large: every batch's gradient graph kept, the behaviour before issue 12),
``streamed`` (``graph_memory=0``: each batch's graph is rebuilt per product and freed), ``auto`` (the default
budget). ``--before DIR`` also runs the children with ``PYTHONPATH=DIR`` (e.g. a checkout of main) and no
``graph_memory`` argument. The ratio peak(N) / peak(1) is printed beside the target 1.3 of issue 12.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py [--batches 1,8,32] [--batch 256]
        [--probes 3] [--modes cached,streamed] [--before /path/to/main] [--device cpu|cuda] [--json out.json]
        [--timing-batches 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import RSS_CHILD_ENV, fmt_bytes, peak_cuda_increase, peak_rss_increase, run_json_child  # noqa: E402

warnings.filterwarnings("ignore", message=".*create_graph=True will create a reference cycle.*")
BUDGETS = {"cached": "1T", "streamed": 0, "auto": "auto"}


def problem(
    args: argparse.Namespace, n_batches: int
) -> tuple[torch.device, nn.Module, list, torch.Generator]:
    """The device, the seeded model (eval mode), ``n_batches`` batches of random MNIST-shaped inputs with
    random labels, and the generator (for further draws)."""
    from verify.models import small_cnn

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = small_cnn(in_channels=1, image=28, width=args.width).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    n = args.batch * n_batches
    x = torch.randn(n, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    return (
        device,
        model,
        [(x[i : i + args.batch], y[i : i + args.batch]) for i in range(0, n, args.batch)],
        gen,
    )


def child(args: argparse.Namespace) -> None:
    """One configuration in this (fresh) process; prints one JSON line."""
    from sharpness.hvp import HessianOperator
    from sharpness.trace import hessian_trace

    device, model, batches, _ = problem(args, args.n_batches)
    kw = {} if args.mode == "before" else {"graph_memory": BUDGETS[args.mode]}
    op = HessianOperator(model, nn.CrossEntropyLoss(), batches, **kw)
    run = lambda: hessian_trace(op, n_probes=args.probes, seed=0)
    if device.type == "cuda":
        peak, how = peak_cuda_increase(run, device)
    else:
        peak, how = peak_rss_increase(run)
    t0 = time.perf_counter()
    tr = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per_hvp = (time.perf_counter() - t0) / args.probes
    info = op.graph_info() if hasattr(op, "graph_info") else {"mode": "cached (before)"}
    out = {"peak": peak, "how": how, "per_hvp_s": per_hvp, "trace": tr.value, "info": info,
           "params": op.num_params}  # fmt: skip
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--probes", type=int, default=3)
    p.add_argument("--modes", default="cached,streamed")
    p.add_argument("--before", metavar="DIR", help="also run the code in DIR (e.g. main) as mode 'before'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--timing-batches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (0: none)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--n-batches", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    modes = [m for m in args.modes.split(",") if m] + (["before"] if args.before else [])
    counts = [int(c) for c in args.batches.split(",")]
    rows: dict[str, dict[int, dict]] = {}
    print(f"small_cnn width {args.width} on 1x28x28, batch {args.batch}, trace with {args.probes} probes, "
          f"device {args.device}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, load "
          f"{os.getloadavg()[0]:.2f}")  # fmt: skip
    for mode in modes:
        rows[mode] = {}
        for nb in counts:
            env = dict(RSS_CHILD_ENV)
            root = args.before if mode == "before" else str(HERE.parent)
            env["PYTHONPATH"] = os.pathsep.join([root, str(HERE.parent)])
            argv = [str(HERE / "bench_memory.py"), "--child", "--mode", mode, "--n-batches", str(nb),
                    "--batch", str(args.batch), "--width", str(args.width), "--probes", str(args.probes),
                    "--device", args.device]  # fmt: skip
            r = run_json_child(argv, env=env)
            rows[mode][nb] = r
            base = rows[mode][counts[0]]["peak"]
            print(f"{mode:>9} {nb:>3} batches: peak {fmt_bytes(r['peak']):>11} ({r['how']}), "
                  f"x{r['peak'] / max(base, 1):.2f} of {counts[0]} batch (target <= 1.3 for streamed), "
                  f"{1000 * r['per_hvp_s']:.0f} ms/HVP, {r['info'].get('mode')}, "
                  f"{r['params']:,} params", flush=True)  # fmt: skip
    timing = interleaved_timing(args) if args.rounds > 0 else {}
    if args.json:
        Path(args.json).write_text(
            json.dumps({"settings": vars(args), "rows": rows, "timing": timing}, indent=2)
        )


def interleaved_timing(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of one HVP (cached, streamed) and one gradient over ``--timing-batches`` batches."""
    from _timing import interleaved, median

    from sharpness.hvp import HessianOperator

    device, model, batches, gen = problem(args, args.timing_batches)
    loss = nn.CrossEntropyLoss()
    ops = {m: HessianOperator(model, loss, batches, graph_memory=BUDGETS[m]) for m in ("cached", "streamed")}
    v = torch.randn(ops["cached"].num_params, generator=gen).to(device)
    fns = {f"HVP {m}": (lambda r, op=op: op.matvec(v)) for m, op in ops.items()}
    fns["gradient"] = lambda r: ops["cached"].gradient()
    times, _ = interleaved(fns, args.rounds, device)
    out = {k: median(t) for k, t in times.items()}
    load = os.getloadavg()[0]
    print(f"interleaved, {args.timing_batches} batches, {args.rounds} rounds (load {load:.2f}): "
          + ", ".join(f"{k} {1000 * t:.0f} ms" for k, t in out.items())
          + f"; streamed / cached = {out['HVP streamed'] / out['HVP cached']:.2f}")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
