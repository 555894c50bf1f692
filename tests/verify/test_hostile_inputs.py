"""Hostile but fair inputs to ``dsgd-verify`` and ``dsgd-figures`` (issue 10): files that try to run code,
runs that must stay resumable, and bad input that must end in one line and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

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
