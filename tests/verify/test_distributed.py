"""verify.distributed: real processes on 127.0.0.1 (gloo, float64) against the simulated engine.

Each launch pays the start-up of 4 Python processes importing torch, so the tests are few: one launch runs
five configurations in turn (ring; exponential with momentum and weight decay; time-varying exponential with
ATC; C-SGD; a simulated run's checkpoint resumed by the distributed engine), then one launch per failure mode
(a rank that exits, a rank that hangs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from verify.config import RunConfig
from verify.distributed.launch import launch_local
from verify.engine import run
from verify.rundir import read_config, read_metrics

HERE = Path(__file__).resolve().parent
PROCS = 4


def _children() -> list[tuple[int, str]]:
    """(pid, state) of this process's child processes, zombies included, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == os.getpid():
                out.append((int(d.name), fields[0]))
    return out


def _digits(**kw) -> RunConfig:
    base = dict(workers=PROCS, lr=0.2, local_batch=8, steps=20, dtype="float64", device="cpu", data="digits",
                model="mlp", model_kwargs={"hidden": [16]}, samples=400, test_samples=200, log_every=5,
                hess_every=10, drift_every=10)  # fmt: skip
    base.update(kw)
    return RunConfig(**base)


CASES = {
    "ring": _digits(algo="dsgd", topology="ring"),
    "exponential": _digits(algo="dsgd", topology="exponential", momentum=0.9, weight_decay=1e-3),
    "exp-random-atc": _digits(algo="dsgd-atc", topology="exponential", shuffle="random"),
    "csgd": _digits(algo="csgd", topology="ring"),
}


#: lr 1e30 on a quadratic: the parameters overflow to inf after a few steps (issue 10, item 12)
QUAD = {"loss": "quadratic", "h": [1.0, 2.0], "w0": [1.0, -1.0], "noise_std": 0.1}
DIVERGING = RunConfig(algo="dsgd", topology="ring", workers=PROCS, lr=1e30, local_batch=1, steps=50,
                      dtype="float64", device="cpu", log_every=1, ckpt_every=1, ensemble=False,
                      closed_form=QUAD)  # fmt: skip


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    plan = [{"config": cfg.to_dict(), "out": str(tmp / name)} for name, cfg in CASES.items()]
    # the simulated engine runs the first half of a ring run; the distributed engine resumes its checkpoint
    half = dataclasses.replace(CASES["ring"], steps=10, ckpt_every=5)
    run(half, tmp / "resumed", progress=False)
    plan.append({"config": CASES["ring"].to_dict(), "out": str(tmp / "resumed"), "resume": True})
    plan.append({"config": DIVERGING.to_dict(), "out": str(tmp / "diverged")})
    (tmp / "plan.json").write_text(json.dumps(plan))
    res = launch_local([str(tmp / "plan.json")], PROCS, timeout=20.0, log_dir=tmp,
                       command=[sys.executable, str(HERE / "dist_ranks.py")])  # fmt: skip
    logs = "\n".join((tmp / f"rank{r}.log").read_text() for r in range(PROCS))
    assert res.returncode == 0, logs
    return tmp


@pytest.mark.parametrize("name", [*CASES, "resumed"])
def test_ranks_equal_simulation(launched, name):
    out = launched / name
    saved = read_config(out)
    if name == "resumed":  # config.json is the simulated run's; the distributed one resumed it to 20 steps
        assert "engine" not in saved["run"]
        saved["config"]["steps"] = 20
    else:
        assert saved["run"]["engine"] == "torch.distributed" and saved["run"]["world_size"] == PROCS
    sim = run(RunConfig.from_dict(saved["config"]), None, progress=False)  # replay its config.json simulated
    W = torch.load(out / "ckpt.pt", weights_only=True)["W"]  # every rank's row, gathered by rank 0
    assert W.shape == sim.state.W.shape and W.dtype == torch.float64
    assert float((W - sim.state.W).abs().max()) < 1e-12
    if name == "csgd":
        assert float((W - W[0]).abs().max()) == 0.0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [float(r["step"]) for r in sim.metrics]
    assert list(rows[0]) == [*sim.metrics[0].keys()]  # same columns, same order
    for got, want in zip(rows, sim.metrics, strict=True):
        for key, value in want.items():
            if key == "elapsed_s" or value is None:
                continue
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-13), (name, got["step"], key)
    cd = [r["consensus_distance"] for r in rows]
    assert (max(cd) == 0.0) == (name == "csgd")
    info = json.loads((out / "result.json").read_text())["distributed"]
    assert info["world_size"] == PROCS and info["comm_s_mean"] <= info["step_s_mean"]


@pytest.mark.parametrize("kind", ["exit", "hang"])
def test_failed_rank_is_named_and_nothing_is_left(tmp_path, kind):
    timeout = 5.0
    stamp = tmp_path / "fault_time"
    faulty = {"loss": f"{HERE / 'dist_faults.py'}:FaultyLoss", "d": 3, "w0": [1.0, 1.0, 1.0],
              "kwargs": {"rank": 2, "step": 7, "kind": kind, "stamp": str(stamp)}}  # fmt: skip
    cfg = RunConfig(algo="dsgd", topology="ring", workers=PROCS, lr=0.1, local_batch=1, steps=50,
                    dtype="float64", device="cpu", log_every=10, ensemble=False,
                    closed_form=faulty)  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    args = ["--config", str(tmp_path / "cfg.json"), "--trust-config", "--out", str(tmp_path / "run"),
            "--timeout", str(timeout), "--no-progress"]  # fmt: skip
    res = launch_local(args, PROCS, timeout=timeout, log_dir=tmp_path)
    end = time.time()
    fault = float(stamp.read_text())
    assert end - fault < timeout + 4.0, f"the run took {end - fault:.1f} s to end after the fault"
    assert res.returncode != 0 and all(c != 0 for c in res.codes)
    assert res.culprit == 2 and res.failure is not None and res.failure.startswith("rank 2 ")
    for r in (0, 1, 3):  # each survivor failed by itself, naming rank 2 first
        log = (tmp_path / f"rank{r}.log").read_text()
        assert f"rank {r}: the run failed: rank 2 " in log, log
        assert "Traceback" not in log, log
    assert res.codes[2] == (3 if kind == "exit" else -15)
    assert _children() == []
    assert not (tmp_path / "run" / "result.json").exists()


def test_diverged_run_reports_the_simulations_steps(launched, tmp_path):
    """result.json's steps_done and diverged_at, and the step ckpt.pt keeps, equal the simulation's."""
    sim = run(DIVERGING, tmp_path / "sim", progress=False)
    assert sim.diverged
    want = json.loads((tmp_path / "sim" / "result.json").read_text())
    got = json.loads((launched / "diverged" / "result.json").read_text())
    assert got["diverged"] is True
    assert (got["steps_done"], got["diverged_at"]) == (want["steps_done"], want["diverged_at"])
    steps = [
        torch.load(d / "ckpt.pt", weights_only=True)["step"]
        for d in (tmp_path / "sim", launched / "diverged")
    ]
    assert steps[0] == steps[1] == sim.diverged_at - 1
