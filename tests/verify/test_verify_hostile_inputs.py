"""Hostile but fair inputs to ``dsgd-verify`` and ``dsgd-figures`` (issue 10): files that try to run code,
runs that must stay resumable, and bad input that must end in one line and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from verify.cli import main

QUAD = {"loss": "quadratic", "h": [1.0, 2.0], "w0": [1.0, -1.0], "noise_std": 0.1}
TINY = ["--workers", "2", "--local-batch", "1", "--steps", "4", "--dtype", "float64", "--device", "cpu",
        "--no-progress", "--log-every", "2"]  # fmt: skip


class Payload:
    """Unpickling this object calls ``open(marker, "w")``: the file appears iff code from the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def one_line_exit_2(code: int, capsys) -> str:
    """The command's status is 2 and its stderr is one line (returned)."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def quad_run(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "run"
    assert main(["run", "--closed-form", json.dumps(QUAD), *TINY, "--out", str(out), *extra]) == 0
    return out


# ---------------------------------------------------------------- item 2: checkpoints never unpickle code
def test_resume_refuses_a_pickle_payload_in_ckpt(tmp_path, capsys):
    out = quad_run(tmp_path)
    marker = tmp_path / "pwned"
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    ck["rng"] = Payload(marker)
    torch.save(ck, out / "ckpt.pt")
    capsys.readouterr()
    err = one_line_exit_2(main(["run", "--resume", str(out), "--steps", "6", "--no-progress"]), capsys)
    assert not marker.exists()
    assert "ckpt.pt" in err


def test_every_checkpoint_written_loads_weights_only(tmp_path):
    out = quad_run(tmp_path, "--momentum", "0.5")
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 4 and ck["rng"]["torch"].dtype == torch.uint8
    mlp = tmp_path / "mlp"
    argv = ["run", *TINY, "--data", "synthetic:64", "--model-kwargs", '{"hidden": [4]}', "--out", str(mlp)]
    assert main(argv) == 0
    for name in ("ckpt.pt", "avg.pt"):
        assert isinstance(torch.load(mlp / name, weights_only=True), dict)


# ---------------------------------------------------------------- item 3: config files name no code
def edit_config(out: Path, **changes) -> None:
    saved = json.loads((out / "config.json").read_text())
    saved["config"].update(changes)
    (out / "config.json").write_text(json.dumps(saved))


def opener(marker: Path) -> dict:
    """Keyword arguments that make ``builtins:open`` create ``marker``: proof that a file called code."""
    return {"file": str(marker), "mode": "w"}


@pytest.mark.parametrize("what", ["model", "closed_form", "data"])
def test_resume_refuses_code_named_by_config_json(tmp_path, capsys, monkeypatch, what):
    marker = tmp_path / "pwned"
    if what == "closed_form":
        out = quad_run(tmp_path)
        edit_config(out, closed_form={**QUAD, "loss": "builtins:open", "kwargs": opener(marker)})
    else:
        args = ["--data", "synthetic:64", "--model-kwargs", '{"hidden": [4]}', "--model", "mlp"]
        out = tmp_path / "run"
        assert main(["run", *TINY, *args, "--out", str(out)]) == 0
        if what == "model":
            edit_config(out, model="builtins:open", model_kwargs=opener(marker))
        else:  # a module on sys.path whose function writes the marker
            (tmp_path / "evilmod.py").write_text(f"def data():\n    open({str(marker)!r}, 'w')\n")
            monkeypatch.syspath_prepend(str(tmp_path))
            edit_config(out, data="evilmod:data")
    capsys.readouterr()
    err = one_line_exit_2(main(["run", "--resume", str(out), "--steps", "6", "--no-progress"]), capsys)
    assert not marker.exists()
    assert "config.json" in err and "--trust-config" in err


def test_trust_config_lets_a_config_name_code(tmp_path, capsys):
    """The negative control of the refusal: with --trust-config the same edit does import and call."""
    marker = tmp_path / "called"
    out = quad_run(tmp_path)
    edit_config(out, closed_form={**QUAD, "loss": "builtins:open", "kwargs": opener(marker)})
    capsys.readouterr()
    code = main(["run", "--resume", str(out), "--steps", "6", "--no-progress", "--trust-config"])
    assert marker.exists() and code == 2  # open() returned a file object, not a loss: refused after the call


def test_toolkit_losses_need_no_trust(tmp_path):
    out = tmp_path / "cos"
    cos = {"loss": "cos", "kwargs": {"d": 3, "K": 4}, "noise_std": 0.1}
    assert main(["run", "--closed-form", json.dumps(cos), *TINY, "--out", str(out)]) == 0
    edit_config(out, closed_form={**cos, "loss": "verify.losses:CosLoss"})
    assert main(["run", "--resume", str(out), "--steps", "6", "--no-progress"]) == 0


def test_distributed_config_file_naming_code_is_refused(tmp_path):
    """``python -m verify.distributed --config FILE``: refused before joining any process group."""
    import os
    import subprocess
    import sys

    marker = tmp_path / "pwned"
    cfg = {"workers": 1, "closed_form": {**QUAD, "loss": "builtins:open", "kwargs": opener(marker)}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "verify.distributed", "--config", str(tmp_path / "cfg.json"), "--out",
           str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "WORLD_SIZE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "--trust-config" in res.stderr, res.stderr
    assert not marker.exists() and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- item 13: one line, no run folder
DIGITS = ["--data", "digits", "--samples", "64", "--test-samples", "32", "--model", "mlp"]


@pytest.mark.parametrize(
    "kwargs, text",
    [('{"in_features": 10}', "do not fit the model"), ('{"num_classes": 3}', "labels range over 0..9"),
     ('{"foo": 1}', "unexpected keyword argument 'foo'")],
)  # fmt: skip
def test_model_that_does_not_fit_the_data_is_one_line_and_no_folder(tmp_path, capsys, kwargs, text):
    out = tmp_path / "run"
    err = one_line_exit_2(main(["run", *TINY, *DIGITS, "--model-kwargs", kwargs, "--out", str(out)]), capsys)
    assert text in err and not out.exists()


BAD_LOSS = """\
class Bad:
    d = 2

    def __call__(self, w):
        raise RuntimeError("boom from the user's loss")
"""


@pytest.mark.parametrize("case", ["h-string", "h-missing", "loss-raises"])
def test_bad_closed_form_is_one_line_and_no_folder(tmp_path, capsys, case):
    spec = {"h-string": {"loss": "quadratic", "h": "abc"}, "h-missing": {"loss": "quadratic"}}.get(case)
    if case == "loss-raises":
        (tmp_path / "badloss.py").write_text(BAD_LOSS)
        spec = {"loss": f"{tmp_path / 'badloss.py'}:Bad", "d": 2}
    out = tmp_path / "run"
    err = one_line_exit_2(main(["run", *TINY, "--closed-form", json.dumps(spec), "--out", str(out)]), capsys)
    assert not out.exists()
    assert (
        ("boom from the user's loss" in err)
        if case == "loss-raises"
        else ('"h"' in err and "quadratic" in err)
    )


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_ckpt_on_resume_is_one_line_naming_it(tmp_path, capsys, damage):
    out = quad_run(tmp_path)
    raw = (out / "ckpt.pt").read_bytes()
    damaged = {"truncated": raw[: len(raw) // 2], "garbage": bytes(range(256)) * 8, "empty": b""}[damage]
    (out / "ckpt.pt").write_bytes(damaged)
    capsys.readouterr()
    err = one_line_exit_2(main(["run", "--resume", str(out), "--steps", "6", "--no-progress"]), capsys)
    assert str(out / "ckpt.pt") in err and "invalid literal" not in err


# ---------------------------------------------------------------- item 18: messages say what is wrong
def test_huge_seed_is_named(tmp_path, capsys):
    err = one_line_exit_2(main(["run", "--closed-form", json.dumps(QUAD), *TINY, "--seed", str(2**80),
                                "--out", str(tmp_path / "r")]), capsys)  # fmt: skip
    assert "seed" in err and "Overflow" not in err


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"config": {"workers": "many"}}'])
def test_corrupt_config_json_names_the_file(tmp_path, capsys, content):
    out = quad_run(tmp_path)
    (out / "config.json").write_text(content)
    capsys.readouterr()
    err = one_line_exit_2(main(["run", "--resume", str(out), "--no-progress"]), capsys)
    assert str(out / "config.json") in err


def test_resume_with_a_different_out_is_refused(tmp_path, capsys):
    out = quad_run(tmp_path)
    capsys.readouterr()
    other = tmp_path / "other"
    err = one_line_exit_2(main(["run", "--resume", str(out), "--out", str(other), "--no-progress"]), capsys)
    assert "--out" in err and not other.exists()
    assert main(["run", "--resume", str(out), "--out", str(out), "--steps", "6", "--no-progress"]) == 0


# ---------------------------------------------------------------- item 19: option errors are one line
@pytest.mark.parametrize(
    "command, argv",
    [("verify", ["run", "--lr", "abc"]), ("verify", ["bogus"]), ("verify", ["run", "--nope"]),
     ("figures", ["--preset", "nope"]), ("figures", ["--seeds", "x"])],
)  # fmt: skip
def test_option_errors_are_one_line_with_a_pointer_to_help(capsys, command, argv):
    from figures.cli import main as figures_main

    with pytest.raises(SystemExit) as exc:
        (main if command == "verify" else figures_main)(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "--help" in err, err


def test_empty_csv_mixing_matrix_is_one_line(tmp_path, capsys):
    (tmp_path / "P.csv").write_text("")
    argv = ["run", "--closed-form", json.dumps(QUAD), *TINY, "--topology", str(tmp_path / "P.csv"),
            "--out", str(tmp_path / "r")]  # fmt: skip
    with warnings_as_output():
        err = one_line_exit_2(main(argv), capsys)
    assert "P.csv" in err


def warnings_as_output():
    """Show warnings on stderr as a user would see them (pytest would otherwise collect them)."""
    import contextlib
    import sys
    import warnings

    @contextlib.contextmanager
    def show():
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            old = warnings.showwarning
            warnings.showwarning = lambda m, c, f, n, file=None, line=None: print(
                warnings.formatwarning(m, c, f, n, line), file=sys.stderr, end=""
            )
            try:
                yield
            finally:
                warnings.showwarning = old

    return show()


# ---------------------------------------------------------------- item 10: non-finite data refused at load
@pytest.mark.parametrize("where", ["x", "y"])
def test_non_finite_training_data_is_refused_naming_the_file(tmp_path, capsys, where):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randn(40, 3, generator=g)
    (x if where == "x" else y)[3, 1] = float("nan")
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    out = tmp_path / "run"
    argv = ["run", *TINY, "--data", str(tmp_path / "data.pt"), "--model", "mlp", "--out", str(out),
            "--model-kwargs", '{"num_classes": 3}']  # fmt: skip
    err = one_line_exit_2(main(argv), capsys)
    assert "data.pt" in err and "NaN" in err and "diverged" not in err and not out.exists()


# ---------------------------------------------------------------- items 8, 9, 11: every run resumable
def quad_config(**kw):
    from verify.config import RunConfig

    base = dict(workers=2, local_batch=1, steps=12, dtype="float64", device="cpu", log_every=2,
                ensemble=False, closed_form=QUAD, lr=0.1)  # fmt: skip
    return RunConfig(**{**base, **kw})


def kill_at(step: int):
    def on_step(s, state):
        if s == step:
            raise KeyboardInterrupt

    return on_step


@pytest.mark.parametrize("seconds", [None, 1e-9])
def test_a_run_killed_with_default_settings_resumes_bit_identical(tmp_path, capsys, seconds):
    """Defaults (no --ckpt-every): the start is checkpointed, and then every --ckpt-seconds of wall time."""
    from verify.engine import run

    c = quad_config() if seconds is None else quad_config(ckpt_seconds=seconds)
    full = run(c, tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(c, tmp_path / "killed", progress=False, on_step=kill_at(7))
    step = torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)["step"]
    assert step == (0 if seconds is None else 6)  # 1e-9 s: held at every step, confirmed by the next one
    argv = ["run", "--resume", str(tmp_path / "killed"), "--no-progress"]
    assert main(argv) == 0
    ck = torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 12 and torch.equal(ck["W"], full.state.W)


def test_rerun_into_a_used_folder_names_both_ways_out(tmp_path, capsys):
    out = quad_run(tmp_path)
    capsys.readouterr()
    err = one_line_exit_2(main(["run", "--closed-form", json.dumps(QUAD), *TINY, "--out", str(out)]), capsys)
    assert f"--resume {out}" in err and "--overwrite" in err


def test_kept_checkpoint_after_divergence_resumes_without_diverging(tmp_path, capsys):
    from verify.engine import run

    c = quad_config(lr=1e30, steps=50, log_every=1, ckpt_every=1)
    res = run(c, tmp_path / "d", progress=False)
    assert res.diverged
    ck = torch.load(tmp_path / "d" / "ckpt.pt", weights_only=True)
    assert ck["step"] < res.diverged_at
    c = quad_config(lr=1e30, steps=ck["step"] + 1, log_every=1, ckpt_every=1)
    again = run(c, tmp_path / "d", resume=True, progress=False)
    assert not again.diverged and again.state.step == ck["step"] + 1
    assert "the last state whose losses were finite" in capsys.readouterr().err


def test_negative_control_a_diverged_state_does_diverge_at_once(tmp_path):
    """The criterion above can fail: resuming from the state of the diverging step itself diverges at once."""
    from verify.engine import run
    from verify.rundir import save_ckpt

    c = quad_config(lr=1e30, steps=50, log_every=1)
    res = run(c, tmp_path / "d", progress=False)
    save_ckpt(tmp_path / "d", res.state, res.execution, c.to_dict())  # the state at diverged_at
    again = run(quad_config(lr=1e30, steps=res.diverged_at + 1, log_every=1), tmp_path / "d", resume=True,
                progress=False)  # fmt: skip
    assert again.diverged


def test_a_torn_last_metrics_row_is_dropped_on_resume(tmp_path):
    from verify.engine import run
    from verify.rundir import read_metrics

    c = quad_config(log_every=1, ckpt_every=4)
    full = run(c, tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(c, tmp_path / "torn", progress=False, on_step=kill_at(6))
    with (tmp_path / "torn" / "metrics.csv").open("a") as fh:
        fh.write("2,0.1")  # the power went out mid-row: the fragment of a later row reads as step 2
    run(c, tmp_path / "torn", resume=True, progress=False)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]
    assert strip(read_metrics(tmp_path / "torn")) == strip(read_metrics(tmp_path / "full"))
    assert [r["step"] for r in full.metrics] == list(range(13))


# ---------------------------------------------------------------- item 17: the launcher checks once
@pytest.mark.parametrize(
    "case, text",
    [("unsupported", "simulated"), ("workers", "workers=3"), ("fit", "labels range"), ("used", "--overwrite"),
     ("payload", "ckpt.pt")],
)  # fmt: skip
def test_launcher_validates_once_before_starting_ranks(tmp_path, capsys, monkeypatch, case, text):
    """Bad settings, a model that does not fit, a used folder, a pickle payload to resume: one line, exit 2,
    and no rank is ever started (the launch functions are replaced by ones that fail the test)."""
    import verify.distributed.launch as launch

    def started(*a, **k):
        raise AssertionError("ranks were started")

    monkeypatch.setattr(launch, "launch_local", started)
    monkeypatch.setattr(launch, "launch_torchrun", started)
    out, marker = tmp_path / "run", tmp_path / "pwned"
    argv = ["run", "--launcher", "local", "--procs", "2", "--closed-form", json.dumps(QUAD), *TINY]
    if case == "unsupported":
        argv += ["--algo", "local-sgd"]
    elif case == "workers":
        argv[argv.index("--workers") + 1] = "3"
    elif case == "fit":
        argv = [a for a in argv if a not in ("--closed-form", json.dumps(QUAD))]
        argv += [*DIGITS, "--model-kwargs", '{"num_classes": 3}']
    elif case in ("used", "payload"):
        quad_run(tmp_path)
        if case == "payload":
            ck = torch.load(out / "ckpt.pt", weights_only=True)
            ck["rng"] = Payload(marker)
            torch.save(ck, out / "ckpt.pt")
            argv = ["run", "--launcher", "local", "--procs", "2", "--resume", str(out), "--no-progress"]
        capsys.readouterr()
    argv += [] if case == "payload" else ["--out", str(out)]
    err = one_line_exit_2(main(argv), capsys)
    assert text in err and not marker.exists()
    if case not in ("used", "payload"):
        assert not out.exists()


def test_killed_launcher_leaves_one_line_per_rank(tmp_path):
    """SIGKILL the local launcher mid-run: each rank says the launcher went away (one line, no rank blamed,
    no C++ store warnings) and ends; nothing is left running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "verify", "run", "--launcher", "local", "--procs", "2", "--closed-form",
           json.dumps(QUAD), *TINY, "--steps", "100000000", "--log-every", "1000", "--out", str(out),
           "--timeout", "5"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    env.pop("TORCH_CPP_LOG_LEVEL", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks: list[int] = []
    outlived: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while not (out / "metrics.csv").is_file() or len((out / "metrics.csv").read_text().splitlines()) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        ranks = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(ranks) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{r}").exists() for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        outlived = [r for r in ranks if Path(f"/proc/{r}").exists()]
    finally:
        if proc.poll() is None:
            proc.kill()
        for r in ranks:  # a regression must not leave the ranks running
            if Path(f"/proc/{r}").exists():
                os.kill(r, signal.SIGKILL)
    err = proc.stderr.read()  # the ranks inherited the launcher's stderr: EOF once both ended
    assert not outlived, "a rank outlived its launcher"
    assert sorted(err.strip().splitlines()) == [
        f"dsgd-verify distributed: rank {r}: the launcher (pid {proc.pid}) went away; stopping"
        for r in (0, 1)
    ], err[:3000]


def test_distributed_resume_refuses_a_pickle_payload(tmp_path):
    """The ranks' own resume path (started without the checking launcher): rank 0 refuses the file, naming
    it; no code from it runs."""
    import sys

    from verify.distributed.launch import launch_local

    out = quad_run(tmp_path)
    marker = tmp_path / "pwned"
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    ck["rng"] = Payload(marker)
    torch.save(ck, out / "ckpt.pt")
    args = ["--resume", str(out), "--steps", "6", "--no-progress", "--timeout", "10"]
    res = launch_local(args, 2, timeout=10.0, log_dir=tmp_path,
                       command=[sys.executable, "-m", "verify.distributed"])  # fmt: skip
    log0 = (tmp_path / "rank0.log").read_text()
    assert res.codes[0] == 2 and not marker.exists()
    assert "ckpt.pt" in log0 and "Traceback" not in log0, log0


@pytest.mark.parametrize("flag", ["--hess-samples", "--eval-samples", "--samples", "--test-samples"])
def test_negative_sample_counts_are_refused_not_sliced(flag, tmp_path, capsys):
    """Issue 10 item 15: ``--hess-samples -5`` used N - 5 points (a Python slice ``[:-5]``)."""
    rc = main(["run", "--steps", "1", "--out", str(tmp_path / "r"), flag, "-5"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "positive" in err, err
    assert not (tmp_path / "r").exists()
