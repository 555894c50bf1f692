"""Speed-up of data-parallel Hessian-vector products at 1, 2 and 4 gloo processes on this machine (loopback).

Model: ``verify.models.small_cnn(in_channels=1, image=28, width=W)`` in float64 (MNIST-shaped random inputs,
seeded weights, eval mode, cross-entropy), B batches of size S split across the ranks
(``sharpness.parallel``). Each configuration starts its ranks with ``sharpness.parallel.launch_loopback``
(``--threads`` per rank, default 1), builds the operator, runs one warm-up product, then times ``--hvps``
products (each one ``all_reduce``); rank 0 reports the median time per product and the product itself, so the
parent prints the speed-up against 1 process and the largest difference from the 1-process product.

    .venv/bin/python benchmarks/bench_parallel.py [--procs 1,2,4] [--batches 8] [--batch 128] [--hvps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def rank(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch import nn

    from sharpness.hvp import HessianOperator
    from sharpness.parallel import DataParallel
    from verify.models import small_cnn

    dist.init_process_group("gloo")
    dp = DataParallel()
    torch.manual_seed(0)
    model = small_cnn(in_channels=1, image=28, width=args.width).double().eval()
    gen = torch.Generator().manual_seed(1)
    n = args.batch * args.batches
    x = torch.randn(n, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=gen)
    batches = dp.shard([(x[i : i + args.batch], y[i : i + args.batch]) for i in range(0, n, args.batch)])
    op = HessianOperator(model, nn.CrossEntropyLoss(), batches, group=dp)
    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    hv = op.matvec(v)  # warm-up: builds the graphs
    times = []
    for _ in range(args.hvps):
        t0 = time.perf_counter()
        hv = op.matvec(v)
        times.append(time.perf_counter() - t0)
    if dp.rank == 0:
        Path(args.out).write_text(json.dumps({"median_s": statistics.median(times), "hv": hv.tolist()}))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", default="1,2,4")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--hvps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank:
        rank(args)
        return
    from sharpness.parallel import launch_loopback

    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    print(f"small_cnn width {args.width}, float64, {args.batches} batches of {args.batch}, {args.threads} "
          f"thread(s) per rank, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")  # fmt: skip
    ref = None
    with tempfile.TemporaryDirectory() as tmp:
        for procs in [int(k) for k in args.procs.split(",")]:
            out = Path(tmp) / f"{procs}.json"
            argv = [str(HERE / "bench_parallel.py"), "--rank", "--out", str(out)]
            argv += ["--batches", str(args.batches), "--batch", str(args.batch), "--width", str(args.width)]
            argv += ["--hvps", str(args.hvps)]
            codes = launch_loopback(argv, procs, timeout=1800, threads=args.threads)
            if any(codes):
                sys.exit(f"{procs} processes failed: exit codes {codes}")
            r = json.loads(out.read_text())
            hv = torch.tensor(r["hv"], dtype=torch.float64)
            if ref is None:
                ref = (r["median_s"], hv)
            diff = float((hv - ref[1]).abs().max() / ref[1].abs().max())
            speed = ref[0] / r["median_s"]
            print(f"{procs} process(es): {1000 * r['median_s']:.0f} ms per HVP, speed-up x{speed:.2f}, "
                  f"max |Hv - Hv_1| / max |Hv_1| = {diff:.1e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
