"""Time one gossip step ``W -> P W`` three ways (dense matmul, torch.sparse_csr, circulant roll).

Stacked W of shape (m, d), d = 100k float32 by default, for m = 16, 64, 256 and the ring, exponential,
grid and complete topologies, on CPU and (when present) CUDA. Prints one row per (device, m, topology) with
the median time of each method in milliseconds (nan: not applicable), the method
``verify.mixers.mixer(P, "auto")`` picks, and the fastest measured one. The ``auto`` rule in
``verify/mixers.py`` was chosen from this table.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_mixing.py [--d 100000] [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from verify.mixers import auto_method, circulant_coefficients, mixer
from verify.topology import mixing_matrix

TOPOLOGIES = ("ring", "exponential", "grid", "complete")


def time_ms(fn, W: torch.Tensor, repeats: int) -> float:
    """Median wall time of ``fn(W)`` in ms over ``repeats`` runs after one warm-up run."""
    sync = torch.cuda.synchronize if W.is_cuda else (lambda: None)
    fn(W)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(W)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=100_000)
    parser.add_argument("--ms", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"d = {args.d}, {args.dtype}, median of {args.repeats}, CPU threads = {torch.get_num_threads()}")
    header = f"{'device':6} {'m':>4} {'topology':12} {'dense':>9} {'sparse':>9} {'roll':>9}  auto    fastest"
    print(header)
    print("-" * len(header))
    for device in devices:
        for m in args.ms:
            W = torch.randn(m, args.d, dtype=dtype, device=device)
            for name in TOPOLOGIES:
                P = mixing_matrix(name, m)
                methods = ["dense", "sparse"] + (["roll"] if circulant_coefficients(P) else [])
                ms = {meth: time_ms(mixer(P, meth), W, args.repeats) for meth in methods}
                cells = " ".join(f"{ms.get(k, float('nan')):9.3f}" for k in ("dense", "sparse", "roll"))
                print(f"{device:6} {m:4d} {name:12} {cells}  {auto_method(P):7} {min(ms, key=ms.get)}")
            del W


if __name__ == "__main__":
    main()
