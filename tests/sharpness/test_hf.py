"""Optional (issue 12, item 3): a HuggingFace causal LM, random weights from a config, saved with
``save_pretrained`` and measured from the command line. Skipped when ``transformers`` is not installed."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sharpness.cli import main  # noqa: E402
from sharpness.data import load_dataset  # noqa: E402
from sharpness.sequence import lm_loss  # noqa: E402
from sharpness.trace import hessian_trace  # noqa: E402
from tests.sharpness.hf_lm import tiny_llama  # noqa: E402


def test_cli_measures_a_save_pretrained_llama(tmp_path, capsys):
    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)
    text = tmp_path / "c.txt"
    text.write_bytes(b"sharpness of a tiny llama, measured from its safetensors. " * 2)
    argv = [str(folder / "model.safetensors"), "--arch", "tests.sharpness.hf_lm:from_folder", "--arch-kwargs",
            json.dumps({"folder": str(folder)}), "--data", f"text:{text}:seq=12", "--loss", "lm", "--metrics",
            "loss,trace,eigs,avg-sam", "--probes", "4", "--top-k", "1", "--sigmas", "0.01",
            "--batch-size", "4", "--no-progress", "--out", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "r.json").read_text())
    batches = load_dataset(f"text:{text}:seq=12").batches(4)
    tr = hessian_trace(tiny_llama(), lm_loss, batches, n_probes=4)
    assert doc["metrics"]["trace"]["value"] == pytest.approx(tr.value, rel=1e-10)
    assert doc["metrics"]["eigs"]["converged"]
    assert doc["checkpoint"]["dtype"] == str(torch.float64)
