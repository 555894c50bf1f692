"""Time one D-SGD step four ways, and one C-SGD step, for m workers on a small CNN and an MLP.

For m = 16 workers with local batch 32 (total 512), float32, random inputs:

- ``vmap``: the engine's step (``verify.algorithms.dsgd``) with ``torch.func.vmap(grad)`` over the stacked
  (m, d) parameters, plus one gossip product (``verify.mixers``, auto method);
- ``loop``: the same step with a Python loop of m autograd gradients over the same stacked state;
- ``auto``: the execution ``verify.stacked.choose_execution`` picks (what ``--execution auto`` runs);
- ``modules``: the official code's design: m separate ``nn.Module`` copies, each with its own
  ``torch.optim.SGD``; snapshot the parameters, forward/backward each worker, overwrite every parameter tensor
  with ``sum_k P_jk w_k`` (per-tensor mixing), then ``optimizer.step()``;
- ``csgd``: one model, one SGD step on the whole batch of m * b = 512 samples (the centralised baseline).

Prints the median time per step (ms) and the ratios, then the gossip products alone (dense / sparse / roll for
m = 16, 64, 256, from ``benchmarks/bench_mixing.py``).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_dsgd.py [--repeats 15] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from verify.algorithms import AlgoConfig, State, dsgd
from verify.models import mlp, small_cnn
from verify.problems import ModelProblem
from verify.stacked import choose_execution, local_grads
from verify.topology import mixer, mixing_matrix


def interleaved_ms(fns: dict, repeats: int, cuda: bool) -> dict[str, float]:
    """Median wall time (ms) of each callable; the repeats are interleaved (round robin) so that a change in
    machine load hits every method alike. One warm-up call each."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    sync()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(name, model, shape, m, b, topology, repeats, device) -> dict[str, float]:
    n = m * b * 4
    x = torch.randn(n, *shape)
    y = torch.randint(0, 10, (n,))
    prob = ModelProblem(model, (x, y), None, m=m, local_batch=b, seed=0, device=device, dtype=torch.float32)
    W, bufs = prob.init_stacked()
    W = W + 0.01 * torch.randn_like(W)
    state = State(W, bufs, None, 0)
    batches = prob.batches(0)
    P = mixing_matrix(topology, m)
    mix = mixer(P, "auto")
    cfg, lr, cuda = AlgoConfig(), 0.1, device.type == "cuda"

    def engine_step(execution):
        g = local_grads(prob, execution)
        return lambda: dsgd(state, lambda w, bb: g(w, bb, batches), mix, lr, cfg)

    auto = choose_execution(prob, W, bufs, batches)

    # the official code's design (main.py): m modules, state_dict snapshots, per-tensor mixing with
    # Python-float weights over all m senders, then optimizer.step() on the mixed weights
    mods = [copy.deepcopy(prob.model) for _ in range(m)]
    for j, mod in enumerate(mods):
        with torch.no_grad():
            for p, v in zip(mod.parameters(), prob.unflatten(W[j]).values(), strict=True):
                p.copy_(v)
    opts = [torch.optim.SGD(mod.parameters(), lr=lr) for mod in mods]
    Pl = P.tolist()
    xs, ys = batches

    def module_step():
        snaps = [mod.state_dict() for mod in mods]
        for j, mod in enumerate(mods):
            opts[j].zero_grad()
            F.cross_entropy(mod(xs[j]), ys[j]).backward()
            for name, param in mod.named_parameters():
                param.data = torch.zeros_like(param.data)
                for i in range(m):
                    param.data += snaps[i][name].data * Pl[j][i]
            opts[j].step()

    one = copy.deepcopy(prob.model)
    opt = torch.optim.SGD(one.parameters(), lr=lr)
    xb, yb = xs.reshape(m * b, *xs.shape[2:]), ys.reshape(-1)

    def csgd_step():
        opt.zero_grad()
        F.cross_entropy(one(xb), yb).backward()
        opt.step()

    fns = {
        "vmap": engine_step("vmap"),
        "loop": engine_step("loop"),
        "modules": module_step,
        "csgd": csgd_step,
    }
    out = interleaved_ms(fns, repeats, cuda)
    out["auto"] = out[auto]
    out["d"] = float(prob.num_params)
    out["auto_is_" + auto] = 1.0
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--local-batch", type=int, default=32)
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-mixing", action="store_true", help="skip the gossip-only table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = {
        "small_cnn 3x32x32": (small_cnn(3, 10, width=16, image=32), (3, 32, 32)),
        "mlp tanh 64-64-64-10": (mlp(64, (64, 64), 10, "tanh"), (64,)),
    }
    m, b = args.workers, args.local_batch
    print(f"D-SGD step, m = {m}, local batch {b} (total {m * b}), {args.topology}, float32, {device}, "
          f"CPU threads = {torch.get_num_threads()}, median of {args.repeats} (ms)")  # fmt: skip
    head = f"{'model':22} {'d':>7} {'vmap':>8} {'loop':>8} {'auto':>8} {'modules':>8} {'csgd':>8}"
    print(head + "   modules/auto  modules/vmap  auto/csgd  auto picks")
    print("-" * (len(head) + 50))
    for name, (model, shape) in models.items():
        r = bench_model(name, model, shape, m, b, args.topology, args.repeats, device)
        pick = next(k[8:] for k in r if k.startswith("auto_is_"))
        cells = " ".join(f"{r[k]:8.2f}" for k in ("vmap", "loop", "auto", "modules", "csgd"))
        print(f"{name:22} {int(r['d']):7d} {cells}   {r['modules'] / r['auto']:12.2f}  "
              f"{r['modules'] / r['vmap']:12.2f}  {r['auto'] / r['csgd']:9.2f}  {pick}")  # fmt: skip
    if not args.no_mixing:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_mixing

        print()
        bench_mixing.main(["--ms", "16", "64", "256", "--repeats", "7"])


if __name__ == "__main__":
    main()
