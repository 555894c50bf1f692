"""The run loop: executions, comparability across algorithms, resume, divergence, run directory, CLI."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from sharpness.checkpoint import load_model
from sharpness.data import load_dataset
from verify.cli import main
from verify.config import RunConfig
from verify.engine import average_buffers, run
from verify.models import small_cnn
from verify.problems import ClosedFormProblem, ModelProblem
from verify.rundir import RunDirError

BASE = dict(workers=4, local_batch=8, lr=0.2, dtype="float64", device="cpu", data="digits", model="mlp",
            model_kwargs={"hidden": [12]}, ensemble=False)  # fmt: skip


def cfg(**kw) -> RunConfig:
    return RunConfig(**{**BASE, **kw})


def test_vmap_and_loop_executions_agree():
    a = run(cfg(steps=5, log_every=0, execution="vmap"), progress=False)
    b = run(cfg(steps=5, log_every=0, execution="loop"), progress=False)
    assert a.execution == "vmap" and b.execution == "loop"
    assert (a.state.W - b.state.W).abs().max() < 1e-12
    assert a.state.W.abs().max() > 0 and not torch.equal(a.state.W[0], a.state.W[1])


def test_closed_form_analytic_and_autograd_agree():
    from verify.losses import CosLoss

    L = CosLoss(d=6, K=5, seed=2)
    res = {}
    for ex in ("analytic", "vmap", "loop"):
        prob = ClosedFormProblem(L, torch.zeros(6), m=4, local_batch=2, noise_std=0.5, seed=1)
        res[ex] = run(
            cfg(steps=20, log_every=0, execution=ex, local_batch=2), problem=prob, progress=False
        ).state.W
    assert (res["analytic"] - res["vmap"]).abs().max() < 1e-12
    assert (res["analytic"] - res["loop"]).abs().max() < 1e-12


class Recording(ModelProblem):
    def batches(self, t):
        self.seen.append(torch.stack([self.indices(j, t) for j in range(self.m)]))
        return super().batches(t)


def recording_problem(seed: int) -> Recording:
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    from verify.models import mlp

    p = Recording(mlp(64, (8,), 10), train, test, m=4, local_batch=8, seed=seed)
    p.seen = []
    return p


def test_same_batch_indices_across_algorithms():
    seen = {}
    for algo in ("dsgd", "csgd", "local-sgd", "sam"):
        prob = recording_problem(seed=11)
        run(cfg(algo=algo, steps=60, log_every=0, seed=11, execution="loop"), problem=prob, progress=False)
        seen[algo] = torch.stack(prob.seen[-60:])
    for algo in ("csgd", "local-sgd", "sam"):
        assert torch.equal(seen["dsgd"], seen[algo])
    # 60 steps run through more than one epoch of each 359-point shard (44 batches): indices are re-shuffled
    assert not torch.equal(seen["dsgd"][0], seen["dsgd"][44])
    prob = recording_problem(seed=12)
    run(cfg(steps=3, log_every=0, seed=12, execution="loop"), problem=prob, progress=False)
    assert not torch.equal(torch.stack(prob.seen[-3:]), seen["dsgd"][:3])


def test_complete_dsgd_is_not_csgd_but_atc_is():
    kw = dict(topology="complete", steps=4, log_every=1)
    c = run(cfg(algo="csgd", **kw), progress=False)
    awc = run(cfg(algo="dsgd", **kw), progress=False)
    atc = run(cfg(algo="dsgd-atc", **kw), progress=False)
    assert all(v == 0.0 for v in c.column("consensus_distance"))
    assert awc.metrics[1]["consensus_distance"] > 1e-8
    assert (atc.state.W - c.state.W).abs().max() < 1e-12


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_resume_is_bit_identical(tmp_path):
    full = run(cfg(steps=12, log_every=3, ckpt_every=6, momentum=0.5), tmp_path / "full", progress=False)
    part = run(cfg(steps=6, log_every=3, ckpt_every=6, momentum=0.5), tmp_path / "part", progress=False)
    assert part.state.step == 6
    res = run(
        cfg(steps=12, log_every=3, ckpt_every=6, momentum=0.5), tmp_path / "part", resume=True, progress=False
    )
    assert res.state.step == 12
    assert torch.equal(res.state.W, full.state.W)
    assert torch.equal(res.state.momentum, full.state.momentum)
    a, b = rows(tmp_path / "full" / "metrics.csv"), rows(tmp_path / "part" / "metrics.csv")
    assert [r["step"] for r in a] == [r["step"] for r in b] == ["0", "3", "6", "9", "12"]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]
    assert strip(a) == strip(b)
    ck = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 12 and torch.equal(ck["W"], full.state.W)


def test_resume_refuses_changed_settings(tmp_path):
    run(cfg(steps=2, log_every=0), tmp_path / "r", progress=False)
    with pytest.raises(RunDirError, match="'lr'"):
        run(cfg(steps=4, lr=0.3), tmp_path / "r", resume=True, progress=False)
    with pytest.raises(RunDirError, match="already holds a run"):
        run(cfg(steps=2), tmp_path / "r", progress=False)


def test_divergence_stops_with_message(tmp_path, capsys):
    quad = {"loss": "quadratic", "h": [1.0, 2.0], "w0": [1.0, -1.0], "noise_std": 0.1}
    res = run(
        cfg(lr=1e30, steps=50, log_every=1, ckpt_every=1, closed_form=quad), tmp_path / "d", progress=False
    )
    err = capsys.readouterr().err
    assert res.diverged and res.diverged_at is not None and res.diverged_at < 50
    assert f"diverged at step {res.diverged_at}" in err and len(err.strip().splitlines()) == 1
    info = json.loads((tmp_path / "d" / "result.json").read_text())
    assert info["diverged"] is True and info["diverged_at"] == res.diverged_at
    ck = torch.load(tmp_path / "d" / "ckpt.pt", weights_only=True)
    # ckpt.pt holds the last state whose update came out finite (state diverged_at's did not): one step back
    assert ck["step"] == res.diverged_at - 1 and torch.isfinite(ck["W"]).all()
    assert f"holds step {ck['step']}" in err and res.state.step == res.diverged_at


def test_metrics_columns_and_avg_checkpoint(tmp_path):
    res = run(
        cfg(steps=4, log_every=2, hess_every=4, drift_every=4, ensemble=True), tmp_path / "m", progress=False
    )
    with open(tmp_path / "m" / "metrics.csv", newline="") as fh:
        header = next(csv.reader(fh))
    need = ["step", "lr", "consensus_distance", "consensus_distance_sqrt", "train_loss", "test_loss",
            "test_acc", "trace_h_xi", "drift", "ensemble_acc", "ensemble_nll", "ece", "avg_nll",
            "avg_ece"]  # fmt: skip
    assert all(c in header for c in need), set(need) - set(header)
    r = rows(tmp_path / "m" / "metrics.csv")
    assert [x["step"] for x in r] == ["0", "2", "4"]
    assert r[1]["trace_h_xi"] == "" and float(r[2]["trace_h_xi"]) > 0 and float(r[2]["drift"]) > 0
    cd = float(r[2]["consensus_distance"])
    assert abs(float(r[2]["consensus_distance_sqrt"]) ** 2 - cd) < 1e-15 * max(1, cd) + 1e-18
    cfgjson = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfgjson["config"]["seed"] == 0 and "torch" in cfgjson["run"]["versions"]
    model, info = load_model(tmp_path / "m" / "avg.pt")
    x, _ = load_dataset("digits", split="test").to(dtype=torch.float64).batches(32)[0]
    w_a = res.problem.unflatten(res.state.W.mean(0))
    ref = torch.func.functional_call(res.problem.model, w_a, (x,))
    assert info["arch"] == "verify.models:mlp"
    assert torch.allclose(model.to(torch.float64)(x), ref, atol=1e-12, rtol=0)


def test_batchnorm_average_model_takes_worker0_buffers(tmp_path):
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    torch.manual_seed(0)
    net = small_cnn(1, 10, width=4, image=8, bn=True)
    prob = ModelProblem(net, train, test, m=3, local_batch=8, seed=0, arch="verify.models:small_cnn",
                        arch_kwargs={"in_channels": 1, "width": 4, "image": 8, "bn": True})  # fmt: skip
    c = RunConfig(**{**BASE, "workers": 3, "steps": 3, "log_every": 3})
    res = run(c, tmp_path / "bn", problem=prob, progress=False)
    assert res.execution == "loop"
    rm = res.state.buffers["features.1.running_mean"]
    assert not torch.allclose(rm[0], rm[1])  # each worker keeps its own statistics
    assert int(res.state.buffers["features.1.num_batches_tracked"][0]) == 3
    model, _ = load_model(tmp_path / "bn" / "avg.pt")
    assert torch.equal(model.state_dict()["features.1.running_mean"].double(), rm[0])
    mixed = average_buffers(res.state.buffers, mix_buffers=True)
    assert torch.allclose(mixed["features.1.running_mean"], rm.mean(0))
    res2 = run(RunConfig(**{**c.to_dict(), "mix_buffers": True}), problem=prob, progress=False)
    rm2 = res2.state.buffers["features.1.running_mean"]
    assert not torch.allclose(rm2[0], rm[0])  # gossiped statistics differ from the local ones


def test_cli_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["run", "--algo", "dsgd", "--topology", "exponential", "--workers", "4", "--lr", "0.1",
               "--local-batch", "8", "--steps", "6", "--log-every", "3", "--data", "digits", "--model", "mlp",
               "--model-kwargs", '{"hidden": [8]}', "--dtype", "float64", "--device", "cpu",
               "--out", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0
    assert "done: 6 steps" in capsys.readouterr().out
    assert [r["step"] for r in rows(out / "metrics.csv")] == ["0", "3", "6"]
    rc = main(["run", "--resume", str(out), "--steps", "9", "--no-progress"])
    assert rc == 0 and [r["step"] for r in rows(out / "metrics.csv")][-1] == "9"


@pytest.mark.parametrize(
    "argv,text",
    [
        (["run", "--algo", "nope", "--out", "x"], "unknown algorithm"),
        (["run", "--topology", "hypercube", "--steps", "1", "--workers", "2"], "unknown topology"),
        (["run", "--workers", "0", "--out", "x"], "workers must be >= 1"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, text):
    argv = [a if a != "x" else str(tmp_path / "x") for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "y"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0] and "Traceback" not in err[0]


def test_killed_run_resumes_bit_identical(tmp_path):
    """Kill part-way (after the checkpoint at 4, with rows logged at 6): resume drops the rows after the
    checkpoint and ends equal to an uninterrupted run."""
    c = cfg(steps=12, log_every=2, ckpt_every=4, algo="dsgd", topology="exponential", shuffle="random")
    full = run(c, tmp_path / "full", progress=False)

    def kill(step, state):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(c, tmp_path / "killed", progress=False, on_step=kill)
    assert [r["step"] for r in rows(tmp_path / "killed" / "metrics.csv")] == ["0", "2", "4", "6"]
    assert torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)["step"] == 4
    res = run(c, tmp_path / "killed", resume=True, progress=False)
    assert torch.equal(res.state.W, full.state.W)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]
    assert strip(rows(tmp_path / "killed" / "metrics.csv")) == strip(rows(tmp_path / "full" / "metrics.csv"))
    assert [r["step"] for r in res.metrics] == [0, 2, 4, 6, 8, 10, 12]


def test_callback_columns_and_frozen_state():
    seen = []

    def cb(step, state, problem):
        seen.append((step, state.W.clone()))
        return {"w_norm": float(state.W.norm())}

    res = run(cfg(steps=4, log_every=2), progress=False, callback=cb)
    assert [s for s, _ in seen] == [0, 2, 4]
    assert res.column("w_norm") == [float(W.norm()) for _, W in seen]
    assert torch.equal(seen[-1][1], res.state.W)
