"""The speed options of the training gradients (verify.speed): bf16 checked against fp32 with a criterion a
different run fails, tf32 / channels-last on the CPU equal to fp32, config and command-line hooks, resume."""

from __future__ import annotations

import json

import pytest
import torch

from verify.cli import main
from verify.config import ConfigError, RunConfig, build_problem
from verify.engine import run
from verify.rundir import RunDirError
from verify.speed import Speed, SpeedError, first_call_checked, notes, tf32, training_grads

#: bfloat16's unit roundoff: 8 significant bits
U_BF16 = 2.0**-8
MLP = dict(workers=4, local_batch=16, lr=0.1, steps=40, log_every=5, data="digits", model="mlp",
           model_kwargs={"hidden": [32], "activation": "tanh"}, dtype="float32", device="cpu",
           ensemble=False)  # fmt: skip
CNN = dict(MLP, model="small_cnn", model_kwargs={"width": 4}, steps=10, execution="loop")


def losses(**kw) -> list[float]:
    return [row["train_loss"] for row in run(RunConfig(**{**MLP, **kw}), progress=False).metrics]


def curve_gap(a: list[float], b: list[float]) -> float:
    """max_t |a_t - b_t| over the loss decrease of ``b``, b_0 - min_t b_t: the criterion of
    :func:`test_bf16_loss_curve_agrees_with_fp32_and_another_run_does_not`."""
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) / (b[0] - min(b))


def test_bf16_gradients_differ_from_fp32_by_bf16_rounding():
    """One step's m gradients, same W and batches: ``|G_bf16 - G_fp32| / |G_fp32|`` lies in [u/4, 4u], u =
    2^-8. Autocast rounds the operands of every matmul to 8 bits (relative error <= u each) and accumulates
    in float32; the errors of a 2-layer net's forward and backward have random signs and add in quadrature,
    so the gradient's relative error is of order u: well above float32's 2^-24 (the option acts), nowhere
    near 1 (it computes the same gradient). Measured: 0.84u (MLP), 1.13u (CNN)."""
    for base in (MLP, CNN):
        problem = build_problem(RunConfig(**base), torch.device("cpu"), torch.float32)
        W, B = problem.init_stacked()
        batches = problem.batches(0)
        G32, l32, _ = training_grads(problem, "loop", Speed())(W, B, batches)
        G16, l16, _ = training_grads(problem, "loop", Speed("bf16"))(W, B, batches)
        assert G16.dtype == l16.dtype == torch.float32  # parameters and gradients stay float32
        rel = float((G16 - G32).norm() / G32.norm())
        assert U_BF16 / 4 < rel < 4 * U_BF16, rel


def test_bf16_loss_curve_agrees_with_fp32_and_another_run_does_not():
    """Same seed, 40 steps, m = 4, tanh MLP on digits: fp32 vs bf16 training gradients; the logged train loss
    of w_a (measured in float32 in both runs) every 5 steps.

    Criterion: ``max_t |L_bf16(t) - L_fp32(t)| <= u (L_fp32(0) - min_t L_fp32(t))``, u = 2^-8. Why: to first
    order the two runs' losses differ by ``sum_s lr grad L . dg_s``, the rounding error dg_s of each step's
    gradient projected on the descent direction; with ``|dg_s| <~ u |g_s|`` (the test above: 0.84u) and
    ``lr |g_s|^2`` the loss decrease of step s, the sum is at most about u times the total decrease even if
    every error pointed the same way (errors of random sign cancel further: measured ~0.02u). The tolerance
    is relative to the decrease, not to the loss level, because the start is shared (row 0 is bit-identical:
    the measurements are not under autocast).

    Negative control: the same criterion on a genuinely different run, seed 1 (another initialisation and
    other batches; measured ~29u), must reject it."""
    fp32, bf16, other = losses(), losses(precision="bf16"), losses(seed=1)
    assert bf16[0] == fp32[0]  # the same start, measured in float32 in both runs
    assert bf16 != fp32  # autocast changed the training
    assert curve_gap(bf16, fp32) <= U_BF16, curve_gap(bf16, fp32) / U_BF16
    assert curve_gap(other, fp32) > U_BF16  # the control: rejected by the same criterion


def test_tf32_and_channels_last_on_the_cpu_equal_fp32(monkeypatch, capsys):
    """On the CPU tf32 is a stated no-op (bit-identical); channels-last really lays out the conv weights
    and activations (seen by a spy on Conv2d) and changes only the kernels' summation order (<= 1e-6)."""
    seen: list[bool] = []
    forward = torch.nn.Conv2d._conv_forward

    def spy(self, x, weight, bias):  # noqa: ANN001, ANN202
        seen.append(weight.dim() == 4 and weight.shape[1] > 1 and weight.is_contiguous(
            memory_format=torch.channels_last) and not weight.is_contiguous())  # fmt: skip
        return forward(self, x, weight, bias)

    fp32 = run(RunConfig(**CNN), progress=False)
    tf = run(RunConfig(**CNN, precision="tf32"), progress=False)
    assert "precision tf32 has no effect on cpu" in capsys.readouterr().err
    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward", spy)
    cl = run(RunConfig(**CNN, channels_last=True), progress=False)
    assert any(seen)  # the training gradients' conv weights were channels-last
    assert torch.equal(tf.state.W, fp32.state.W)
    assert float((cl.state.W - fp32.state.W).abs().max() / fp32.state.W.abs().max()) <= 1e-6
    assert [r["train_loss"] for r in tf.metrics] == [r["train_loss"] for r in fp32.metrics]


def test_noops_are_stated():
    mlp = build_problem(RunConfig(**MLP), torch.device("cpu"), torch.float32)
    cnn = build_problem(RunConfig(**CNN), torch.device("cpu"), torch.float32)
    assert notes(mlp, Speed(channels_last=True), "loop") == [
        "channels_last has no effect: the model has no 4-d (convolution) weights"
    ]
    assert "inside vmap" in notes(cnn, Speed(channels_last=True), "vmap")[0]
    assert notes(cnn, Speed(channels_last=True), "loop") == []
    assert notes(cnn, Speed("tf32"), "loop") == [
        "precision tf32 has no effect on cpu (TF32 is a CUDA tensor-core mode)"
    ]


def test_tf32_flags_are_set_for_the_block_and_restored():
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (m.allow_tf32, c.allow_tf32)
    for enabled in (True, False):
        with tf32(enabled):
            assert m.allow_tf32 is enabled and c.allow_tf32 is enabled
        assert (m.allow_tf32, c.allow_tf32) == before


def test_config_round_trip_validation_and_old_configs():
    cfg = RunConfig(precision="bf16", channels_last=True, compile=True)
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = {
        k: v for k, v in RunConfig().to_dict().items() if k not in ("precision", "channels_last", "compile")
    }
    back = RunConfig.from_dict(old).validate()  # a config.json that predates the options
    assert (back.precision, back.channels_last, back.compile) == ("fp32", False, False)
    with pytest.raises(ConfigError, match="precision must be one of fp32, tf32, bf16; got 'fp16'"):
        RunConfig(precision="fp16").validate()
    with pytest.raises(
        ConfigError, match="precision bf16 applies to float32 runs; this run has dtype float64"
    ):
        RunConfig(precision="bf16", dtype="float64").validate()
    with pytest.raises(ConfigError, match="setting compile must be true or false"):
        RunConfig(compile="yes").validate()


@pytest.mark.parametrize(
    "argv,text",
    [
        (["--precision", "fp16"], "precision must be one of fp32, tf32, bf16; got 'fp16'"),
        (["--precision", "bf16", "--dtype", "float64"], "precision bf16 applies to float32 runs"),
    ],
)
def test_cli_bad_precision_exits_2_with_one_line(tmp_path, capsys, argv, text):
    rc = main(["run", *argv, "--steps", "1", "--workers", "2", "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and text in err[0], err
    assert not (tmp_path / "r").exists()


def test_compile_without_a_compiler_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    """No C++ compiler for inductor on the CPU: one line, exit 2, before any run file is written (no
    fallback to eager: the user asked for compile)."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    out = tmp_path / "r"
    argv = ["run", "--compile", "--steps", "2", "--workers", "2", "--local-batch", "4", "--device", "cpu",
            "--model-kwargs", '{"hidden": [4]}', "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a C++ compiler" in err[0] and "run without --compile" in err[0], err
    assert not (out / "config.json").exists()
    # over a finished run with --overwrite: refused before the folder is touched, the old run intact
    monkeypatch.delenv("CXX")
    assert main([*argv[:1], *argv[2:]]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    assert main([*argv, "--overwrite"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_compilation_that_fails_is_one_line():
    def broken(W, buffers, batches):  # noqa: ANN001, ANN202
        raise RuntimeError("inductor: something\nlong trace")

    with pytest.raises(
        SpeedError, match="^torch.compile of the gradients failed: RuntimeError: inductor: something;"
    ):
        first_call_checked(broken)(torch.zeros(1), {}, ())


def test_resume_old_run_and_speed_knobs(tmp_path):
    """A run whose config.json predates the options resumes (they read as the defaults); channels_last and
    compile may change on resume (rounding only), precision may not."""
    out = tmp_path / "r"
    run(RunConfig(**{**MLP, "steps": 2, "log_every": 0}), out, progress=False)
    saved = json.loads((out / "config.json").read_text())
    for k in ("precision", "channels_last", "compile"):
        del saved["config"][k]
    (out / "config.json").write_text(json.dumps(saved))
    res = run(RunConfig(**{**MLP, "steps": 3, "log_every": 0, "channels_last": True}), out, resume=True,
              progress=False)  # fmt: skip
    assert res.state.step == 3
    with pytest.raises(RunDirError, match="setting 'precision' was 'fp32', now 'bf16'"):
        run(RunConfig(**{**MLP, "steps": 4, "precision": "bf16"}), out, resume=True, progress=False)


@pytest.mark.slow
def test_compile_gives_the_eager_numbers():
    """torch.compile of the gradients (inductor on the CPU: needs g++): the same run to rounding. Slow: the
    first compilation takes 10-60 s on 2 cores."""
    eager = run(RunConfig(**{**MLP, "steps": 10, "execution": "loop"}), progress=False)
    comp = run(RunConfig(**{**MLP, "steps": 10, "execution": "loop", "compile": True}), progress=False)
    assert float((comp.state.W - eager.state.W).abs().max() / eager.state.W.abs().max()) <= 1e-6
