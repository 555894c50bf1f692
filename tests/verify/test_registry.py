"""One record per algorithm: a toy algorithm registered in one place runs in the simulation and on 2 gloo
ranks (tests/verify/dist_ranks.py), with equal parameters and metrics; the lists that name algorithms
(configuration, command line, distributed engine, figure style) come from the registry."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from figures import style
from verify import algorithms
from verify.config import ConfigError, RunConfig
from verify.distributed import supported
from verify.distributed.launch import launch_local
from verify.engine import run
from verify.options import DESCRIPTION
from verify.rundir import read_metrics

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from toy_algorithms import TOYS, register_toys  # noqa: E402

QUAD = {
    "loss": "quadratic",
    "h": [1.0, 3.0, 0.5],
    "w0": [1.0, -1.0, 2.0],
    "noise_std": 0.3,
    "init_spread": 0.2,
}


def _toy(algo: str) -> RunConfig:
    return RunConfig(algo=algo, topology="ring", workers=2, lr=0.1, local_batch=2, steps=12, dtype="float64",
                     device="cpu", log_every=4, hess_every=4, drift_every=4, ensemble=False,
                     closed_form=QUAD)  # fmt: skip


@pytest.fixture()
def toys():
    before = dict(algorithms.ALGORITHMS)
    register_toys()
    yield
    algorithms.ALGORITHMS.clear()
    algorithms.ALGORITHMS.update(before)


def test_every_list_of_algorithms_is_the_registry():
    names = list(algorithms.ALGORITHMS)
    assert all(f"  {n:<9} " in DESCRIPTION for n in names)
    assert supported() == [n for n, a in algorithms.ALGORITHMS.items() if a.distributed]
    for name, a in algorithms.ALGORITHMS.items():
        key = style.algo_key(name, "ring")
        assert key == ("ring" if a.kind == "gossip" else name)
    assert style.label("csgd") == algorithms.record("csgd").label


def test_an_unregistered_algorithm_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="unknown algorithm 'lazy-dsgd'"):
        RunConfig(algo="lazy-dsgd").validate()
    with pytest.raises(algorithms.AlgorithmError, match="kind"):
        algorithms.register(algorithms.Algorithm("x", TOYS[0].step, "sideways", "x", "x"))


def _bn(algo: str) -> RunConfig:
    """BatchNorm statistics gossiped (dsgd) or averaged (csgd) with --mix-buffers."""
    return RunConfig(algo=algo, topology="ring", workers=2, lr=0.1, local_batch=4, steps=4, dtype="float64",
                     device="cpu", data="digits", model="small_cnn", model_kwargs={"width": 4, "bn": True},
                     samples=64, test_samples=32, log_every=2, mix_buffers=True)  # fmt: skip


def test_toy_algorithms_run_in_both_engines(toys, tmp_path):
    runs = {t.name: _toy(t.name) for t in TOYS} | {f"bn-{a}": _bn(a) for a in ("dsgd", "csgd")}
    plan = [{"config": c.to_dict(), "out": str(tmp_path / name)} for name, c in runs.items()]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    res = launch_local([str(tmp_path / "plan.json"), "toy_algorithms:register_toys"], 2, timeout=20.0,
                       log_dir=tmp_path, command=[sys.executable, str(HERE / "dist_ranks.py")])  # fmt: skip
    assert res.returncode == 0, "\n".join((tmp_path / f"rank{r}.log").read_text() for r in range(2))
    for name, config in runs.items():
        sim = run(config, None, progress=False)
        ckpt = torch.load(tmp_path / name / "ckpt.pt", weights_only=True)
        assert float((ckpt["W"] - sim.state.W).abs().max()) < 1e-12, name
        for k, v in sim.state.buffers.items():
            assert float((ckpt["buffers"][k].double() - v.double()).abs().max()) < 1e-12, (name, k)
        rows = read_metrics(tmp_path / name)
        assert [r["step"] for r in rows] == [float(r["step"]) for r in sim.metrics]
        for got, want in zip(rows, sim.metrics, strict=True):
            for key, value in want.items():
                if key != "elapsed_s" and value is not None:
                    assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-13), (name, key)
        spread = [r["consensus_distance"] for r in rows]
        assert (max(spread) == 0.0) == (algorithms.record(config.algo).kind == "centralised"), name
