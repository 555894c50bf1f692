"""Per-layer spectra (issue 12, item 5): ``--per-layer`` gives each layer's Tr H_ll and lambda_max(H_ll)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sharpness.checkpoint import save_checkpoint
from sharpness.cli import main
from sharpness.data import load_dataset
from sharpness.demo import mlp
from sharpness.hvp import HessianOperator


def test_per_layer_top_eigenvalue_is_that_of_the_exact_diagonal_block(tmp_path, capsys):
    torch.manual_seed(0)
    kwargs = {"hidden": 4, "depth": 1}
    path = save_checkpoint(tmp_path / "m.pt", mlp(**kwargs).double(), arch="sharpness.demo:mlp",
                           arch_kwargs=kwargs)  # fmt: skip
    argv = [str(path), "--samples", "60", "--metrics", "loss", "--per-layer", "--probes", "4",
            "--no-progress", "--out", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    layers = json.loads((tmp_path / "r.json").read_text())["metrics"]["layers"]
    data = load_dataset("digits", samples=60, seed=0).to("cpu", torch.float64)
    model = mlp(**kwargs).double()
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    H = HessianOperator(model, F.cross_entropy, data.batches(512)).dense()
    cut = 64 * 4 + 4
    blocks = {"1": H[:cut, :cut], "3": H[cut:, cut:]}
    assert set(layers) == set(blocks)
    exact = {k: float(torch.linalg.eigvalsh(b)[-1]) for k, b in blocks.items()}
    for name, lam in exact.items():
        top = layers[name]["top_eigenvalue"]
        assert top["converged"] and top["values"][0] == pytest.approx(lam, rel=1e-8)
        assert f"layer {name}: lambda_max(H_ll)" in out
    # the criterion can fail: the other layer's eigenvalue is rejected
    assert layers["1"]["top_eigenvalue"]["values"][0] != pytest.approx(exact["3"], rel=1e-8)
