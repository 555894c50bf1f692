"""Hostile but fair inputs to ``sharpness`` (issue 10): a file never runs code unless the user says so,
and every bad input or non-finite number is one clear line with exit status 2, never a wrong number."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from sharpness.checkpoint import CheckpointError, load_model, save_checkpoint
from sharpness.cli import main

HOSTILE_SRC = textwrap.dedent(
    """
    import torch
    from torch import nn

    def mlp(d_in=4, hidden=5, d_out=3, dropout=0.0, bn=False):
        layers = [nn.Linear(d_in, hidden)]
        if bn:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.Tanh())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, d_out))
        return nn.Sequential(*layers)

    def points(split="test"):
        g = torch.Generator().manual_seed(1)
        return torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    """
)
MOD = "hostile_arch"
QUIET = ["--no-progress", "--probes", "8"]


@pytest.fixture(scope="module", autouse=True)
def hostile_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / f"{MOD}.py").write_text(HOSTILE_SRC)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    sys.modules.pop(MOD, None)


def build(seed: int = 0, **kw) -> nn.Module:
    import importlib

    torch.manual_seed(seed)
    return importlib.import_module(MOD).mlp(**kw)


def cli(args, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_exit_2(args, capsys, *needles: str) -> str:
    """Run the CLI; assert exit 2 and exactly one line on stderr containing every needle; return it."""
    rc, _, err = cli(args, capsys)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("sharpness: error: ") and "internal error" not in lines[0], err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------- 1. a file never names code that runs
def toolkit_file(path: Path, arch: str, arch_kwargs: dict, state: dict | None = None) -> Path:
    """A file in the toolkit's format, written by hand as an attacker would (no save_checkpoint checks)."""
    payload = {"format": "dsgd-sam/1", "arch": arch, "arch_kwargs": arch_kwargs, "extra": {}}
    payload["state_dict"] = state if state is not None else build().state_dict()
    torch.save(payload, path)
    return path


def attacks(tmp_path: Path) -> list[tuple[Path, Path]]:
    """(checkpoint, marker) pairs: os.system named by a file, and a .py file whose import alone runs code."""
    out = []
    marker = tmp_path / "PWNED_system"
    out.append((toolkit_file(tmp_path / "system.pt", "os:system", {"command": f"touch {marker}"}), marker))
    marker2 = tmp_path / "PWNED_import"
    payload = tmp_path / "payload.py"
    payload.write_text(f"open({str(marker2)!r}, 'w').close()\ndef f():\n    return None\n")
    out.append((toolkit_file(tmp_path / "import.pt", f"{payload}:f", {}), marker2))
    return out


def test_file_named_callable_is_not_imported_or_called_by_the_cli(tmp_path, capsys):
    for ckpt, marker in attacks(tmp_path):
        rc, _, err = cli([ckpt, "--data", f"{MOD}:points", *QUIET], capsys)
        assert not marker.exists(), f"{ckpt.name} ran code: {err}"
        one_line_exit_2(
            [ckpt, "--data", f"{MOD}:points", *QUIET], capsys, "--trust-checkpoint-arch", "--arch"
        )


def test_file_named_callable_is_not_imported_or_called_by_the_api(tmp_path):
    for ckpt, marker in attacks(tmp_path):
        with pytest.raises(CheckpointError, match="trust_checkpoint_arch") as exc:
            load_model(ckpt)
        assert "\n" not in str(exc.value)
        assert not marker.exists()


def test_the_allow_list_covers_every_model_the_toolkit_writes(tmp_path):
    """Every verify model builder and the demo MLP are allow-listed (by exact string), and such a file loads
    with no flag; the allow-list is data: loading a sharpness checkpoint does not import verify."""
    from sharpness.checkpoint import TOOLKIT_ARCHS
    from sharpness.demo import ARCH
    from verify.models import BUILDERS, mlp, small_cnn

    assert ARCH in TOOLKIT_ARCHS
    assert {f"verify.models:{fn.__name__}" for fn in BUILDERS.values()} <= TOOLKIT_ARCHS
    for arch, model, kwargs in [
        (
            "verify.models:mlp",
            mlp(in_features=4, hidden=[5], num_classes=3),
            dict(in_features=4, hidden=[5], num_classes=3),
        ),
        ("verify.models:small_cnn", small_cnn(width=2, bn=True), dict(width=2, bn=True)),
    ]:
        path = save_checkpoint(tmp_path / "avg.pt", model, arch=arch, arch_kwargs={**kwargs})
        loaded, info = load_model(path)
        assert info["arch"] == arch and info["format"] == "toolkit"
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_a_user_arch_in_a_file_loads_with_the_trust_flag_or_an_explicit_arch(tmp_path, capsys):
    path = save_checkpoint(tmp_path / "user.pt", build(), arch=f"{MOD}:mlp")
    one_line_exit_2([path, "--data", f"{MOD}:points", "--metrics", "loss", *QUIET], capsys, f"{MOD}:mlp")
    with pytest.raises(CheckpointError, match="not one of the toolkit's own"):
        load_model(path)
    for flags in (["--trust-checkpoint-arch"], ["--arch", f"{MOD}:mlp"]):
        rc, out, err = cli([path, *flags, "--data", f"{MOD}:points", "--metrics", "loss", *QUIET], capsys)
        assert rc == 0 and "loss L(w)" in out, err
    a, _ = load_model(path, trust_checkpoint_arch=True)
    b, _ = load_model(path, arch=f"{MOD}:mlp")
    assert torch.equal(a[0].weight, b[0].weight)


def test_nothing_else_read_from_a_toolkit_file_becomes_an_import(tmp_path, capsys):
    """A recorded data spec or any other string in ``extra`` is only data; the report runs on --data."""
    marker = tmp_path / "PWNED_extra"
    payload = tmp_path / "datapayload.py"
    payload.write_text(f"open({str(marker)!r}, 'w').close()\ndef data(split='test'):\n    return None\n")
    path = save_checkpoint(
        tmp_path / "x.pt", build(), arch=f"{MOD}:mlp", extra={"data": f"{payload}:data", "arch": "os:system"}
    )
    rc, out, err = cli(
        [path, "--trust-checkpoint-arch", "--data", f"{MOD}:points", "--metrics", "loss", *QUIET], capsys
    )
    assert rc == 0, err
    assert not marker.exists()
