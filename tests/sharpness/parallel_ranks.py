"""One rank of tests/sharpness/test_parallel.py: ``python parallel_ranks.py MODE OUT TIMEOUT`` (loopback).

MODE ``report``: the whole sharpness report (every metric, per-layer included) on this rank's share of the
batches of :func:`problem`; rank 0 writes its JSON to OUT. MODE ``hang``/``die``: rank 1 sleeps / exits before
the first collective; every rank writes the error line it got to OUT.rank<r>.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sharpness.hvp import HessianOperator
from sharpness.parallel import DataParallel, DistributedSharpnessError, data_parallel
from sharpness.report import ReportSettings, run_report
from sharpness.table import report_json
from sharpness.trace import hessian_trace

SETTINGS = ReportSettings(
    probes=6,
    trace_method="hutchinson",
    top_k=2,
    sigmas=[0.05],
    rhos=[0.1],
    density_vectors=2,
    density_steps=12,
)
METRICS = ["loss", "trace", "eigs", "density", "avg-sam", "sam", "layers"]


def problem():
    """A float64 MLP with BatchNorm-free layers, 48 seeded points in 8 batches of 6."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=g)
    return model, F.cross_entropy, [(x[i : i + 6], y[i : i + 6]) for i in range(0, 48, 6)]


def report(batches, model, group=None):
    """The report's JSON (inside the active data-parallel context, if any), plus ``api_trace``:
    ``hessian_trace`` of a ``HessianOperator`` given ``group=`` directly."""
    rep = run_report(model, F.cross_entropy, batches, METRICS, SETTINGS, progress=False)
    return report_json(rep)


def api_trace(batches, model, group=None) -> float:
    op = HessianOperator(model, F.cross_entropy, batches, group=group)
    return hessian_trace(op, n_probes=5, method="hutchinson").value


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=float(sys.argv[3])))
    dp = DataParallel(timeout=float(sys.argv[3]))
    model, _, batches = problem()
    t0 = time.monotonic()
    try:
        if mode != "report" and dp.rank == 1:
            if mode == "die":
                os._exit(3)
            time.sleep(3 * float(sys.argv[3]))
        with data_parallel(dp):
            doc = report(dp.shard(batches), model)
        doc["api_trace"] = api_trace(dp.shard(batches), model, dist.group.WORLD)
        # ranks that chose different metrics (free memory differs) run what all of them chose
        assert dp.agree(["a", "b"] if dp.rank == 0 else ["b", "c"], ["a", "b", "c"]) == ["b"]
        if dp.rank == 0:
            with open(out, "w") as fh:
                json.dump(doc, fh)
        dist.destroy_process_group()
    except DistributedSharpnessError as exc:
        with open(f"{out}.rank{dp.rank}", "w") as fh:
            fh.write(str(exc))
        with open(f"{out}.rank{dp.rank}.seconds", "w") as fh:
            fh.write(str(time.monotonic() - t0))
        sys.stderr.write(f"{exc}\n")
        os._exit(1)
