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
