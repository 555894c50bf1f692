"""T11's experiment (verify.claims.largebatch): the verdict on constructed per-seed numbers, the control fed
to the same rule, flatness at matched loss, the scales, and the paper scale on a tiny CIFAR-format folder."""

import math
import pickle

import numpy as np
import pytest

from verify.claims import largebatch as lb
from verify.claims.flatness import Curve, value_at_loss
from verify.claims.t11_large_batch_gap import control_rejected

ARMS = lb.ARMS


def make_run(seed, batch, acc, lam=None, loss_end=None):
    """A run with two logged rows; ``acc[arm]`` the final test accuracy (fraction); flatness rows at both."""
    lam = lam or {a: 1.0 for a in ARMS}
    loss_end = loss_end or {a: 0.3 for a in ARMS}
    rows = []
    for i, step in enumerate((0, 10)):
        r = {"step": step}
        for a in ARMS:
            r[f"{a}_test_acc"] = acc[a] if i else 0.1
            r[f"{a}_train_loss"] = loss_end[a] if i else 2.3
            r[f"{a}_dist"] = 0.0
            r[f"{a}_lambda_max"] = lam[a] if i else 0.5
            r[f"{a}_lambda_max_err"] = 0.01
            r[f"{a}_trace_h"] = 10 * (lam[a] if i else 0.5)
            r[f"{a}_trace_h_err"] = 0.1
        rows.append(r)
    return {"seed": seed, "batch": batch, "arms": list(ARMS), "wall_s": 1.0, "diverged": {}, "rows": rows}


def runs_from(per_seed):
    """``per_seed``: list of {batch: {arm: acc in pp}}."""
    out = []
    for s, d in enumerate(per_seed):
        for b in lb.BATCHES:
            out.append(make_run(s, b, {a: v / 100 for a, v in d[b].items()}))
    return out


def seeds(c_small, c_large, d_small, d_large, iso=None):
    """Per-seed accuracies (pp); the avg-SAM arm copies D, the isotropic one C unless given."""
    per = []
    for k in range(len(c_small)):
        i_s, i_l = (c_small[k], c_large[k]) if iso is None else (iso[0][k], iso[1][k])
        per.append(
            {
                "small": {"csgd": c_small[k], "dsgd": d_small[k], "avgsam-xi": d_small[k], "avgsam-iso": i_s},
                "large": {"csgd": c_large[k], "dsgd": d_large[k], "avgsam-xi": d_large[k], "avgsam-iso": i_l},
            }
        )
    return per


def decide(per):
    a = lb.analyse(runs_from(per))
    v, notes, ctrl = lb.verdict(a)
    return v, notes, ctrl, a


def test_precondition_absent_is_inconclusive_whatever_d_does():
    # C-SGD improves with batch; D-SGD shows a huge, tight interaction: still INCONCLUSIVE
    v, notes, _, a = decide(seeds([80, 80.2, 79.9], [85, 85.1, 85.2], [80, 80.2, 79.9], [95, 95.1, 95.2]))
    assert a["precondition"].outcome != "supported"
    assert v == "INCONCLUSIVE" and notes[0].startswith("precondition absent")


def test_interaction_containing_zero_and_claim_is_inconclusive():
    c_s, c_l = [85.0, 85.1, 84.9], [80.0, 80.1, 79.9]  # a clear drop of 5 pp
    v, notes, _, a = decide(seeds(c_s, c_l, c_s, [80.0 + 3, 80.1 - 2, 79.9 + 2]))
    iv = a["interaction"].interval
    assert iv.low < 0 < lb.CLAIMED_INTERACTION < iv.high
    assert v == "INCONCLUSIVE" and any("no power" in n for n in notes)


def test_interaction_excluding_the_claim_is_not_supported():
    c_s, c_l = [85.0, 85.1, 84.9], [80.0, 80.1, 79.9]
    v, _, _, a = decide(seeds(c_s, c_l, c_s, [80.05, 80.1, 79.95]))
    assert a["interaction"].outcome == "contradicted" and v == "NOT SUPPORTED"


def test_supported_interaction_passes():
    c_s, c_l = [85.0, 85.1, 84.9], [80.0, 80.1, 79.9]
    v, _, ctrl, a = decide(seeds(c_s, c_l, c_s, [83.0, 83.2, 82.9]))
    assert a["interaction"].outcome == "supported" and ctrl and v == "PASS"


def test_control_showing_the_same_effect_is_not_rejected():
    """The isotropic arm fed to the same rule: when it reproduces D-SGD's interaction the control is not
    rejected and the verdict cannot be PASS; when it shows nothing it is rejected."""
    c_s, c_l = [85.0, 85.1, 84.9], [80.0, 80.1, 79.9]
    d_l = [83.0, 83.2, 82.9]
    v, _, ctrl, a = decide(seeds(c_s, c_l, c_s, d_l, iso=(c_s, d_l)))
    assert a["control"].outcome == "supported" and not control_rejected(a) and not ctrl
    assert v == "FAIL"
    _, _, ctrl, a = decide(seeds(c_s, c_l, c_s, d_l))
    assert control_rejected(a) and ctrl


def test_mechanism_and_flatness_effects_are_differences_per_seed():
    c_s, c_l = [85.0, 85.1, 84.9], [80.0, 80.1, 79.9]
    a = lb.analyse(runs_from(seeds(c_s, c_l, c_s, [81.0, 81.1, 80.9])))
    assert a["mechanism"]["acc_avgsam-xi"]["estimate"] == pytest.approx(0.0, abs=1e-9)
    assert a["mechanism"]["acc_avgsam-iso"]["estimate"] == pytest.approx(-1.0, abs=1e-9)
    assert a["mechanism"]["acc_avgsam-iso"]["sign"] == "< 0"
    small = [r["acc_avgsam-iso_small"] - r["acc_dsgd_small"] for r in a["per_seed"]]
    assert a["mechanism"]["acc_avgsam-iso_small"]["estimate"] == pytest.approx(np.mean(small), abs=1e-12)
    assert "small batch" in a["mechanism"]["acc_avgsam-iso_small"]["name"]
    assert a["dc"]["large"].interval.estimate == pytest.approx(1.0, abs=1e-9)
    assert a["flatness"]["lambda_max_large"]["estimate"] == pytest.approx(0.0, abs=1e-12)


def test_at_matched_loss_reads_t14s_rule_at_the_lowest_common_loss():
    curves = {
        "a": {"train_loss": [1.0, 0.5, 0.2], "lam": [1.0, 2.0, 4.0]},
        "b": {"train_loss": [1.0, 0.8, 0.4, 0.45], "lam": [1.0, 3.0, 5.0, 6.0]},
    }
    m = lb.at_matched_loss(curves, ["lam"])
    assert m["level"] == pytest.approx(0.4)  # b's lowest loss, not its last
    assert m["values"]["b"]["lam"] == pytest.approx(5.0)
    # a crosses 0.4 one third of the way from 0.5 (lam 2) to 0.2 (lam 4): log-linear, as T14 reads it
    assert m["values"]["a"]["lam"] == pytest.approx(2.0 ** (4 / 3))
    assert m["values"]["a"]["lam"] == pytest.approx(
        value_at_loss(
            Curve(np.arange(3), np.array([1.0, 0.5, 0.2]), {"lam": np.array([1.0, 2.0, 4.0])}), "lam", 0.4
        )
    )
    assert m["below_at_first"] == []
    early = lb.at_matched_loss({**curves, "a": {"train_loss": [0.3, 0.2], "lam": [1.0, 2.0]}}, ["lam"])
    assert early["below_at_first"] == ["a"] and early["values"]["a"]["lam"] == 1.0
    with pytest.raises(ValueError, match="no finite"):
        lb.at_matched_loss({"a": {"train_loss": [math.nan], "lam": [1.0]}}, ["lam"])


def test_protocols_follow_the_paper_design():
    f = lb.PROTOCOLS["fmnist"]
    assert f.workers == 16 and f.seeds >= 3
    assert (16 * f.small[0], 16 * f.large[0]) == (1024, 8192)
    assert f.large[1] / f.small[1] == pytest.approx(f.large[0] / f.small[0])  # linear scaling rule
    assert f.milestones == [int(0.4 * f.steps), int(0.8 * f.steps)] and f.warmup > 0
    p = lb.PROTOCOLS["paper"]
    assert (p.steps, p.warmup, p.milestones, p.small, p.large) == (
        6000,
        60,
        [2400, 4800],
        (64, 0.1),
        (512, 0.8),
    )
    assert p.model == "resnet18_micro"
    with pytest.raises(ValueError, match="cifar10:DIR"):
        lb.protocol_for("paper")
    with pytest.raises(ValueError, match="unknown scale"):
        lb.protocol_for("imagenet")


def test_cli_paper_scale_without_data_is_one_line(capsys):
    assert lb.main(["--scale", "paper", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cifar10:DIR" in err[0]


def test_check_cli_paper_scale_without_data_is_one_line(capsys, tmp_path):
    from verify.claims.runner import build_parser, main

    args = build_parser().parse_args(["--only", "T11", "--scale", "paper", "--report", str(tmp_path / "r")])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cifar10:DIR" in err[0] and not (tmp_path / "r").exists()
    args = build_parser().parse_args(
        ["--only", "T11", "--scale", "paper", "--data", f"cifar10:{tmp_path / 'no'}"]
    )
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data folder not found" in err[0]


def write_tiny_cifar(root, n_train=64, n_test=32):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", n_train // 5) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        (d / name).write_bytes(pickle.dumps({b"data": data, b"labels": rng.integers(0, 10, n).tolist()}))


@pytest.mark.slow
def test_paper_scale_runs_a_few_steps_on_a_tiny_cifar_folder(tmp_path):
    """The paper protocol's code path (micro ResNet-18 at width 4, 2 workers and tiny batches so it fits a
    test): paired runs, flatness, the report with a verdict, the cost estimate."""
    write_tiny_cifar(tmp_path / "c")
    p = lb.protocol_for(
        "paper", data=f"cifar10:{tmp_path / 'c'}", model_kwargs={"width": 4}, workers=2, small=(2, 0.1),
        large=(4, 0.8), steps=2, warmup=1, seeds=2, log_every=1, eval_samples=None, flat_samples=16,
        flat_every=2, device="cpu", trace_probes=2, lanczos_iters=4,
    )  # fmt: skip
    est = lb.estimate_cost(p, probe_steps=1)
    assert est["total_s"] > 0 and est["step_s_large"] >= 0
    lb.run_protocol(p, tmp_path / "out")
    rep = (tmp_path / "out" / "report.json").read_text()
    assert '"verdict"' in rep and (tmp_path / "out" / "series_large_seed1.csv").exists()
    assert len(lb.load_runs(tmp_path / "out")) == 4
