"""Every checkpoint format round-trips to the same function; every bad checkpoint gives one clear line."""

from __future__ import annotations

import argparse
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from sharpness.checkpoint import CheckpointError, ScriptedModel, load_model, save_checkpoint
from sharpness.functional import SharpnessInputError
from sharpness.hvp import HessianOperator
from sharpness.importing import import_callable
from tests.sharpness.user_module import importable

ARCH_SRC = textwrap.dedent(
    """
    from torch import nn

    def mlp(d_in=4, hidden=5, d_out=3):
        return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))

    def cnn():
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3))

    def wide(n=12):
        return nn.Sequential(*[nn.Linear(2, 2) for _ in range(n)])

    def broken():
        raise RuntimeError("boom in constructor")

    def not_a_module():
        return 3

    CONSTANT = 7
    """
)
ARCH = "ckpt_test_arch:mlp"
X = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", autouse=True)
def arch_module(tmp_path_factory):
    with importable(tmp_path_factory.mktemp("archmod"), "ckpt_test_arch", ARCH_SRC) as root:
        yield root


def make_mlp(dtype=torch.float64, hidden=5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(dtype)


def same_function(a: nn.Module, b: nn.Module, x=X) -> None:
    x = x.to(next(a.parameters()).dtype)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError, match=match) as exc:
        fn(*args, **kwargs)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------- round trips


def test_toolkit_format_needs_no_arch_and_loads_weights_only(tmp_path):
    m = make_mlp(hidden=6)
    path = save_checkpoint(tmp_path / "avg.pt", m, arch=ARCH, arch_kwargs={"hidden": 6}, extra={"step": 5})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "dsgd-sam/1" and raw["arch"] == ARCH and raw["arch_kwargs"] == {"hidden": 6}
    loaded, info = load_model(
        path, trust_checkpoint_arch=True
    )  # ARCH is the test's module, not the toolkit's
    assert info["format"] == "toolkit" and info["extra"] == {"step": 5} and info["dtype"] == "torch.float64"
    assert info["num_params"] == sum(p.numel() for p in m.parameters())
    assert not loaded.training
    same_function(m, loaded)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


def test_save_refuses_unimportable_arch_and_unpicklable_extra(tmp_path):
    m = make_mlp()
    one_line_error("no_such_module_xyz", save_checkpoint, tmp_path / "a.pt", m, arch="no_such_module_xyz:f")
    one_line_error("extra", save_checkpoint, tmp_path / "a.pt", m, arch=ARCH, extra={"obj": object()})
    assert not (tmp_path / "a.pt").exists()


@pytest.mark.parametrize("nest", [None, "state_dict", "model", "model_state_dict"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_plain_state_dict_nested_and_prefixed(tmp_path, nest, prefix):
    m = make_mlp()
    sd = {prefix + k: v for k, v in m.state_dict().items()}
    obj = sd if nest is None else {nest: sd, "epoch": 3, "optimizer": {"lr": 0.1}}
    torch.save(obj, tmp_path / "c.pt")
    loaded, info = load_model(tmp_path / "c.pt", arch=ARCH)
    assert info["format"] == "state_dict" and info["nested_key"] == nest
    assert info["stripped_prefix"] == (prefix or None)
    same_function(m, loaded)


def test_dataparallel_keys_really_have_the_prefix(tmp_path):
    m = make_mlp()
    torch.save(nn.DataParallel(m).state_dict(), tmp_path / "dp.pt")
    assert all(k.startswith("module.") for k in torch.load(tmp_path / "dp.pt", weights_only=True))
    same_function(m, load_model(tmp_path / "dp.pt", arch=ARCH)[0])


def test_common_extras_load_without_trusting_pickles(tmp_path):
    m = make_mlp()
    obj = {"state_dict": m.state_dict(), "best_acc": np.float64(0.9), "args": argparse.Namespace(lr=0.1)}
    torch.save(obj, tmp_path / "c.pt")
    loaded, info = load_model(tmp_path / "c.pt", arch=ARCH)
    assert info["unpickled"] is False
    same_function(m, loaded)


def test_float32_checkpoint_gives_float32_model(tmp_path):
    m = make_mlp(torch.float32)
    torch.save(m.state_dict(), tmp_path / "c.pt")
    loaded, info = load_model(tmp_path / "c.pt", arch=ARCH)
    assert info["dtype"] == "torch.float32"
    same_function(m, loaded)


def test_safetensors_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    m = make_mlp()
    st.save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    loaded, info = load_model(tmp_path / "w.safetensors", arch=ARCH)
    assert info["format"] == "safetensors"
    same_function(m, loaded)


def test_safetensors_missing_dependency_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "w.safetensors").write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    one_line_error("pip install safetensors", load_model, tmp_path / "w.safetensors", arch=ARCH)


def test_torchscript_round_trip_and_hessian_matches_eager(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)
    ).double()
    m.train()
    m(torch.randn(8, 1, 6, 6, dtype=torch.float64))  # non-trivial BatchNorm running statistics
    m.eval()
    torch.jit.script(m).save(str(tmp_path / "s.pt"))
    loaded, info = load_model(tmp_path / "s.pt")
    assert info["format"] == "torchscript" and isinstance(loaded, ScriptedModel)
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in m.named_parameters()]
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 1, 0])
    same_function(m, loaded, x)
    for train_mode in (False, True):
        h_eager = HessianOperator(m, nn.functional.cross_entropy, (x, y), train_mode=train_mode).dense()
        h_script = HessianOperator(loaded, nn.functional.cross_entropy, (x, y), train_mode=train_mode).dense()
        torch.testing.assert_close(h_script, h_eager, rtol=1e-12, atol=1e-12)
        assert h_eager.abs().max() > 1e-3
    # the scripted module's own tensors are restored after every call
    sm = loaded.scripted
    torch.testing.assert_close(sm.state_dict()["4.weight"], m.state_dict()["4.weight"], rtol=0, atol=0)


def test_pickled_module_needs_trust(tmp_path):
    m = make_mlp()
    torch.save(m, tmp_path / "whole.pt")
    msg = one_line_error("pickle", load_model, tmp_path / "whole.pt")
    assert "trust_pickle" in msg and "runs code" in msg and "Sequential" in msg
    loaded, info = load_model(tmp_path / "whole.pt", trust_pickle=True)
    assert info["format"] == "pickled_module" and info["unpickled"] is True
    same_function(m, loaded)
    torch.save({"model": m, "epoch": 1}, tmp_path / "nested.pt")
    one_line_error("trust_pickle", load_model, tmp_path / "nested.pt")
    loaded, info = load_model(tmp_path / "nested.pt", trust_pickle=True)
    assert info["format"] == "pickled_module" and info["nested_key"] == "model"
    same_function(m, loaded)


# ------------------------------------------------------------------------------------------------ errors


def test_error_class_is_a_sharpness_input_error():
    assert issubclass(CheckpointError, SharpnessInputError) and issubclass(CheckpointError, ValueError)


def test_missing_file_and_folder(tmp_path):
    one_line_error("not found", load_model, tmp_path / "nope.pt", arch=ARCH)
    one_line_error("not a file", load_model, tmp_path, arch=ARCH)


@pytest.mark.parametrize("cut", [10, 200, -40])
def test_truncated_file(tmp_path, cut):
    torch.save(make_mlp().state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:cut])
    one_line_error("unreadable or truncated", load_model, tmp_path / "cut.pt", arch=ARCH)


def test_garbage_file(tmp_path):
    (tmp_path / "g.pt").write_bytes(b"this is not a checkpoint at all")
    one_line_error("unreadable or truncated", load_model, tmp_path / "g.pt", arch=ARCH)


def test_truncated_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    st.save_file(make_mlp().state_dict(), str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error("unreadable or truncated", load_model, tmp_path / "w.safetensors", arch=ARCH)


def test_key_mismatch_lists_missing_and_unexpected(tmp_path):
    sd = make_mlp().state_dict()
    sd["extra.weight"] = torch.zeros(2)
    del sd["2.bias"]
    torch.save(sd, tmp_path / "c.pt")
    msg = one_line_error("do not match", load_model, tmp_path / "c.pt", arch=ARCH)
    assert "1 missing [2.bias]" in msg and "1 unexpected [extra.weight]" in msg


def test_key_mismatch_lists_at_most_ten(tmp_path):
    torch.save({f"layer{i}.w": torch.zeros(1) for i in range(15)}, tmp_path / "c.pt")
    msg = one_line_error("do not match", load_model, tmp_path / "c.pt", arch="ckpt_test_arch:wide")
    assert "24 missing" in msg and "15 unexpected" in msg and "(14 more)" in msg and "(5 more)" in msg
    assert "layer9.w" in msg and "layer10.w" not in msg


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    torch.save(make_mlp(hidden=7).state_dict(), tmp_path / "c.pt")
    msg = one_line_error("shape mismatch", load_model, tmp_path / "c.pt", arch=ARCH)
    assert "'0.weight'" in msg and "(7, 4)" in msg and "(5, 4)" in msg and "2 more" in msg  # 0.bias, 2.weight


def test_arch_errors(tmp_path):
    torch.save(make_mlp().state_dict(), tmp_path / "c.pt")
    one_line_error("no_such_pkg_abc", load_model, tmp_path / "c.pt", arch="no_such_pkg_abc.models:net")
    one_line_error("has no attribute 'nope'", load_model, tmp_path / "c.pt", arch="ckpt_test_arch:nope")
    one_line_error("MODULE:CALLABLE", load_model, tmp_path / "c.pt", arch="ckpt_test_arch.mlp")
    one_line_error("boom in constructor", load_model, tmp_path / "c.pt", arch="ckpt_test_arch:broken")
    one_line_error("not an nn.Module", load_model, tmp_path / "c.pt", arch="ckpt_test_arch:not_a_module")
    one_line_error("not a callable", load_model, tmp_path / "c.pt", arch="ckpt_test_arch:CONSTANT")


def test_state_dict_without_arch(tmp_path):
    torch.save(make_mlp().state_dict(), tmp_path / "c.pt")
    one_line_error("pass --arch", load_model, tmp_path / "c.pt")


def test_dict_without_weights(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "c.pt")
    one_line_error("without weights", load_model, tmp_path / "c.pt", arch=ARCH)
    torch.save([1, 2, 3], tmp_path / "l.pt")
    one_line_error("holds a list", load_model, tmp_path / "l.pt", arch=ARCH)


def test_import_callable_from_a_file(tmp_path):
    (tmp_path / "my_models.py").write_text("def f():\n    return 41 + 1\n")
    assert import_callable(f"{tmp_path / 'my_models.py'}:f")() == 42
    with pytest.raises(SharpnessInputError, match="not found"):
        import_callable(f"{tmp_path / 'none.py'}:f")
