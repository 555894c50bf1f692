"""The checkpoint files people have (issue 12, item 4): Lightning .ckpt, EMA weights, HuggingFace folders."""

from __future__ import annotations

import json

import pytest
import torch

from sharpness.checkpoint import load_model
from sharpness.cli import main
from sharpness.demo import mlp
from sharpness.formats import FormatError

ARCH = "sharpness.demo:mlp"
KW = {"hidden": 4, "depth": 1}


def _net(seed):
    torch.manual_seed(seed)
    return mlp(**KW).double()


def _same(model, ref) -> bool:
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def _lightning(tmp_path, extra=None):
    net = _net(0)
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    state.update(extra or {})
    ckpt = {"pytorch-lightning_version": "2.4.0", "epoch": 3, "global_step": 120, "state_dict": state,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
            "hyper_parameters": {"lr": 0.1}}  # fmt: skip
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    return path, net


def test_lightning_ckpt_prefix_is_stripped(tmp_path):
    path, net = _lightning(tmp_path)
    model, info = load_model(path, arch=ARCH, arch_kwargs=KW)
    assert _same(model, net) and info["stripped_prefix"] == "model." and info["nested_key"] == "state_dict"


def test_lightning_ckpt_with_several_modules_needs_prefix(tmp_path):
    path, net = _lightning(tmp_path, {"loss_fn.weight": torch.ones(3, dtype=torch.float64)})
    with pytest.raises(FormatError, match=r"--prefix.*|loss_fn\."):
        load_model(path, arch=ARCH, arch_kwargs=KW)
    model, info = load_model(path, arch=ARCH, arch_kwargs=KW, prefix="model")
    assert _same(model, net) and info["stripped_prefix"] == "model."
    with pytest.raises(FormatError, match="no key starts with"):
        load_model(path, arch=ARCH, arch_kwargs=KW, prefix="encoder.")


def test_ema_weights_by_key(tmp_path):
    net, ema = _net(0), _net(1)
    path = tmp_path / "ema.pt"
    torch.save({"state_dict": net.state_dict(), "ema_state_dict": ema.state_dict(),
                "callbacks": {"EMA": {"ema_weights": ema.state_dict()}}}, path)  # fmt: skip
    assert _same(load_model(path, arch=ARCH, arch_kwargs=KW)[0], net)
    assert _same(load_model(path, arch=ARCH, arch_kwargs=KW, weights_key="ema_state_dict")[0], ema)
    assert _same(load_model(path, arch=ARCH, arch_kwargs=KW, weights_key="callbacks.EMA.ema_weights")[0], ema)
    assert not _same(load_model(path, arch=ARCH, arch_kwargs=KW)[0], ema)  # the control: a different model
    with pytest.raises(FormatError, match="--weights-key 'ema' not found"):
        load_model(path, arch=ARCH, arch_kwargs=KW, weights_key="ema")


def test_cli_reads_ema_weights_of_a_lightning_ckpt(tmp_path, capsys):
    net, ema = _net(0), _net(1)
    path = tmp_path / "e.ckpt"
    wrap = lambda m: {f"model.{k}": v for k, v in m.state_dict().items()}
    torch.save({"pytorch-lightning_version": "2.4.0", "state_dict": wrap(net), "ema": wrap(ema)}, path)
    out = tmp_path / "r.json"
    argv = [str(path), "--arch", ARCH, "--arch-kwargs", json.dumps(KW), "--weights-key", "ema", "--prefix",
            "model.", "--metrics", "loss", "--samples", "30", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    from sharpness.data import load_dataset

    data = load_dataset("digits", samples=30, seed=0).to("cpu", torch.float64)
    with torch.no_grad():
        expect = float(torch.nn.functional.cross_entropy(ema(data.x), data.y))
    assert json.loads(out.read_text())["metrics"]["loss"]["value"] == pytest.approx(expect, rel=1e-12)


def test_huggingface_folder(tmp_path, capsys):
    pytest.importorskip("transformers")
    from tests.sharpness.hf_lm import tiny_llama

    ref = tiny_llama()
    ref.save_pretrained(tmp_path / "safe")
    model, info = load_model(tmp_path / "safe")
    assert info["format"] == "huggingface" and info["dtype"] == "torch.float64"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    ref.save_pretrained(
        tmp_path / "bin"
    )  # then the older pickle layout: pytorch_model.bin beside config.json
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(FormatError, match="--trust-pickle"):
        load_model(tmp_path / "bin")
    assert load_model(tmp_path / "bin", trust_pickle=True)[1]["format"] == "huggingface"
    text = tmp_path / "c.txt"
    text.write_bytes(b"a folder measured as it was saved. " * 2)
    argv = [str(tmp_path / "safe"), "--data", f"text:{text}:seq=10", "--loss", "lm", "--metrics",
            "loss,trace", "--probes", "3", "--batch-size", "4", "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
