"""Data-parallel sharpness (issue 12, item 2): 2 and 4 gloo ranks on loopback equal one process to 1e-10.

Each launch pays the start of several Python processes importing torch; the tests are few and tiny.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sharpness.parallel import launch_loopback

HERE = Path(__file__).resolve().parent
RANKS = str(HERE / "parallel_ranks.py")
TOL = 1e-10
SKIP = {"timings_s", "hvp_products", "device", "torch_version", "ranks"}


def _env() -> None:
    os.environ.setdefault("PYTHONPATH", str(HERE.parents[1]))


def _diff(a, b, path="") -> list[str]:
    """Every place where two JSON documents differ by more than TOL (relative to max(1, |value|))."""
    if isinstance(a, dict):
        keys = (set(a) | set(b)) - SKIP
        return [d for k in sorted(keys) for d in _diff(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)):
        if math.isnan(a) and math.isnan(b):
            return []
        return [] if abs(a - b) <= TOL * max(1.0, abs(a)) else [f"{path}: {a!r} != {b!r}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.fixture(scope="module")
def single():
    sys.path.insert(0, str(HERE))
    from parallel_ranks import api_trace, problem, report

    model, _, batches = problem()
    doc = report(batches, model)
    doc["api_trace"] = api_trace(batches, model)
    return json.loads(json.dumps(doc))


@pytest.mark.parametrize("procs", [2, 4])
def test_every_metric_equals_one_process(single, procs, tmp_path):
    _env()
    out = tmp_path / "rank0.json"
    codes = launch_loopback([RANKS, "report", str(out), "30"], procs, timeout=120, threads=1)
    assert codes == [0] * procs
    doc = json.loads(out.read_text())
    assert set(doc["metrics"]) == {"loss", "trace", "eigs", "density", "avg-sam", "sam", "layers"}
    assert _diff(single, doc) == []
    # the criterion can fail: a perturbed copy is rejected
    bad = json.loads(out.read_text())
    bad["metrics"]["trace"]["value"] *= 1 + 1e-9
    assert _diff(single, bad) != []


@pytest.mark.parametrize("mode,word", [("die", "closed its connection"), ("hang", "timed out after 4 s")])
def test_a_dead_or_hung_rank_is_named_within_the_timeout(mode, word, tmp_path):
    """Rank 1 of 3 exits (or sleeps) before the first collective: ranks 0 and 2 each fail with one line naming
    rank 1; the first to notice saw the peer's socket close (or the 4 s timeout expire), the other may see
    either that or rank 0's own exit."""
    _env()
    out = tmp_path / "x.json"
    codes = launch_loopback([RANKS, mode, str(out), "4"], 3, timeout=40, threads=1)
    assert codes[0] == 1 and codes[2] == 1, codes
    lines = [(tmp_path / f"x.json.rank{r}").read_text() for r in (0, 2)]
    for line in lines:
        assert line.startswith("rank 1 of 3 died or hung before its first collective"), line
    assert any(word in line for line in lines), lines
    seconds = [float((tmp_path / f"x.json.rank{r}.seconds").read_text()) for r in (0, 2)]
    assert max(seconds) < 4 + 6, seconds  # within the 4 s timeout, plus slack for a loaded machine


def test_cli_under_torchrun_writes_one_json_equal_to_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m sharpness CKPT ...`` on a float64 checkpoint: rank 0 alone prints and
    writes the JSON, whose every metric (per-layer included) equals the single-process command's to 1e-10."""
    import torch

    from sharpness.checkpoint import save_checkpoint
    from sharpness.cli import main
    from sharpness.demo import mlp

    _env()
    torch.manual_seed(0)
    kwargs = {"hidden": 8, "depth": 1}
    ckpt = save_checkpoint(
        tmp_path / "m.pt", mlp(**kwargs).double(), arch="sharpness.demo:mlp", arch_kwargs=kwargs
    )
    base = [str(ckpt), "--metrics", "all", "--probes", "5", "--trace-method", "hutchinson", "--top-k", "2",
            "--samples", "120", "--batch-size", "30", "--no-progress", "--rhos", "0.1"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "1.json")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--local-addr", "127.0.0.1",
           "--max-restarts", "0", "-m", "sharpness", *base, "--out", str(tmp_path / "2.json")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("sharpness report") == 1  # rank 0 alone prints
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in (1, 2))
    assert b["data_parallel"] == {"world": 2, "backend": "gloo", "batches_per_rank": [2, 2]}
    assert a["metrics"]["layers"] and a["metrics"]["density"]
    assert _diff(a["metrics"], b["metrics"]) == []
