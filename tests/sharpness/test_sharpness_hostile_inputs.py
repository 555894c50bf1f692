"""Hostile but fair inputs to ``sharpness`` (issue 10): a file never runs code unless the user says so,
and every bad input or non-finite number is one clear line with exit status 2, never a wrong number."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sharpness
from sharpness.checkpoint import CheckpointError, load_model, save_checkpoint
from sharpness.cli import main
from sharpness.functional import SharpnessInputError
from tests.sharpness.user_module import importable

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

    def inf_point(split="test"):  # finite loss (tanh saturates), non-finite gradient (0 * inf)
        x, y = points()
        x[0, 0] = float("inf")
        return x, y

    def column_labels(split="test"):
        x, y = points()
        return x, y[:, None]

    def ragged(split="test"):
        x, y = points()
        return [(x[:10], y[:10]), (x[10:, :3], y[10:])]
    """
)
MOD = "hostile_arch"
QUIET = ["--no-progress", "--probes", "8"]


@pytest.fixture(scope="module", autouse=True)
def hostile_module(tmp_path_factory):
    with importable(tmp_path_factory.mktemp("hostile"), MOD, HOSTILE_SRC) as root:
        yield root


def build(seed: int = 0, **kw) -> nn.Module:
    import importlib

    torch.manual_seed(seed)
    return importlib.import_module(MOD).mlp(**kw)


def cli(args, capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # option errors: argparse exits with 2 after one line
        rc = exc.code
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


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A toolkit checkpoint of the hostile module's 4-5-3 tanh MLP (43 parameters)."""
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "m.pt", build(), arch=f"{MOD}:mlp")


def run_args(path: Path, *more) -> list:
    return [path, "--trust-checkpoint-arch", "--data", f"{MOD}:points", *QUIET, *more]


# ----------------------------------------------------------- 4. integer weights are not cast into floats
@pytest.mark.parametrize("fmt", ["safetensors", "state_dict", "toolkit"])
def test_integer_weights_for_float_parameters_are_refused(fmt, tmp_path, capsys):
    state = {k: (v * 100).to(torch.int32) for k, v in build().state_dict().items()}
    if fmt == "safetensors":
        st = pytest.importorskip("safetensors.torch")
        path = tmp_path / "w.safetensors"
        st.save_file(state, str(path))
    elif fmt == "state_dict":
        torch.save(state, path := tmp_path / "w.pt")
    else:
        path = toolkit_file(tmp_path / "w.pt", f"{MOD}:mlp", {}, state)
    with pytest.raises(CheckpointError, match=r"'0.weight' is torch.int32, not floating point"):
        load_model(path, arch=f"{MOD}:mlp")
    one_line_exit_2([path, "--arch", f"{MOD}:mlp", "--data", f"{MOD}:points", *QUIET], capsys, "torch.int32")
    # the control: the same weights as float64 load (the model takes the checkpoint's float dtype)
    torch.save({k: v.double() for k, v in state.items()}, tmp_path / "f.pt")
    model, info = load_model(tmp_path / "f.pt", arch=f"{MOD}:mlp")
    assert info["dtype"] == "torch.float64" and torch.equal(model[0].weight, state["0.weight"].double())


# ---------------------------------------------------- 5. non-finite gradients, HVPs and perturbed losses
@pytest.mark.parametrize("metric", ["trace", "eigs", "density", "sam", "layers"])
def test_finite_loss_with_non_finite_gradient_is_one_line(metric, ckpt, capsys):
    args = [ckpt, "--trust-checkpoint-arch", "--data", f"{MOD}:inf_point", *QUIET, "--metrics", metric]
    line = one_line_exit_2(args, capsys, "gradient", "not finite")
    assert "0.weight" in line  # names where: the inf input meets the first layer's weights


def test_non_finite_gradient_raises_in_the_api():
    import importlib

    x, y = importlib.import_module(MOD).inf_point()
    model = build()
    for fn in (sharpness.hessian_trace, sharpness.top_eigenvalues, sharpness.sam_sharpness):
        with pytest.raises(sharpness.NonFiniteError, match="gradient .* not finite"):
            fn(model, F.cross_entropy, (x, y))
    op = sharpness.HessianOperator(model, F.cross_entropy, (x, y), backend="func")
    with pytest.raises(sharpness.NonFiniteError, match="Hessian-vector product"):
        op.matvec(torch.ones(op.num_params))


def test_huge_radius_or_noise_is_one_line_not_nan(ckpt, capsys):
    one_line_exit_2(run_args(ckpt, "--metrics", "sam", "--rhos", "1e300"), capsys, "loss", "not finite")
    one_line_exit_2(run_args(ckpt, "--metrics", "avg-sam", "--sigmas", "1e100"), capsys, "loss", "not finite")
    one_line_exit_2(run_args(ckpt, "--metrics", "avg-sam", "--sigmas", "1e300"), capsys, "sigma")


# -------------------------------------------------------------------- 6. more eigenvalues than parameters
def test_top_k_above_the_parameter_count_is_refused(ckpt, capsys, tmp_path):
    one_line_exit_2(run_args(ckpt, "--metrics", "eigs", "--top-k", "5000"), capsys, "--top-k 5000", "43")
    rc, out, err = cli(
        run_args(ckpt, "--metrics", "eigs", "--top-k", "43", "--out", tmp_path / "r.json"), capsys
    )
    assert rc == 0, err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["settings"]["top_k"] == 43 and len(doc["metrics"]["eigs"]["values"]) == 43


# ------------------------------------------------------- 7. dropout masks follow the seed, not global RNG
def dropout_setup():
    import importlib

    model = build(hidden=40, dropout=0.5)
    x, y = importlib.import_module(MOD).points()
    return model, (x, y)


MEASURES = {
    "trace": lambda m, d, s: sharpness.hessian_trace(
        m, F.cross_entropy, d, n_probes=4, seed=s, train_mode=True
    ),
    "eigs": lambda m, d, s: sharpness.top_eigenvalues(m, F.cross_entropy, d, k=1, seed=s, train_mode=True),
    "density": lambda m, d, s: sharpness.spectral_density(
        m, F.cross_entropy, d, n_vectors=1, n_steps=5, seed=s, train_mode=True
    ),
    "avg-sam": lambda m, d, s: sharpness.avg_sam_loss(
        m, F.cross_entropy, d, sigma=0.01, n_samples=4, seed=s, train_mode=True
    ),
    "avg-sam-quad": lambda m, d, s: sharpness.avg_sam_quadratic(
        m, F.cross_entropy, d, sigma=0.01, n_probes=4, seed=s, train_mode=True
    ),
    "sam": lambda m, d, s: sharpness.sam_sharpness(m, F.cross_entropy, d, rho=0.05, seed=s, train_mode=True),
}


def value_of(result) -> float:
    out = result.to_dict()
    return float(out["values"][0]) if "values" in out else float(out.get("value", out.get("nodes", [0])[0]))


@pytest.mark.parametrize("name", list(MEASURES))
def test_dropout_masks_follow_the_seed_and_leave_the_callers_rng_alone(name):
    model, data = dropout_setup()
    measure = MEASURES[name]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = value_of(measure(model, data, 7))
    assert torch.equal(torch.get_rng_state(), before), "the call advanced the caller's global RNG"
    torch.manual_seed(456)  # a different global state: the same seed must give the same number
    b = value_of(measure(model, data, 7))
    assert a == b
    if name != "density":  # the control: another seed draws other masks (density's nodes barely move)
        assert value_of(measure(model, data, 8)) != a


def test_cli_train_mode_dropout_is_reproducible(tmp_path, capsys):
    path = save_checkpoint(
        tmp_path / "d.pt",
        build(hidden=40, dropout=0.5),
        arch=f"{MOD}:mlp",
        arch_kwargs={"hidden": 40, "dropout": 0.5},
    )
    values = []
    for glob, seed in ((1, 0), (2, 0), (3, 1)):
        torch.manual_seed(glob)
        before = torch.get_rng_state()
        out = tmp_path / f"r{glob}.json"
        rc, _, err = cli(
            run_args(path, "--metrics", "loss,trace", "--train-mode", "--seed", seed, "--out", out), capsys
        )
        assert rc == 0, err
        assert torch.equal(torch.get_rng_state(), before)
        doc = json.loads(out.read_text())
        values.append((doc["metrics"]["loss"]["value"], doc["metrics"]["trace"]["value"]))
    assert values[0] == values[1]
    assert values[2] != values[0]  # the control: seed 1 draws other masks


# ------------------------------------------------------------- 14. bad inputs that were "internal error"
def test_column_labels_are_squeezed(ckpt, capsys, tmp_path):
    ref = tmp_path / "ref.json"
    got = tmp_path / "got.json"
    rc, _, err = cli(run_args(ckpt, "--metrics", "loss", "--out", ref), capsys)
    assert rc == 0, err
    args = [ckpt, "--trust-checkpoint-arch", "--data", f"{MOD}:column_labels", *QUIET, "--metrics", "loss"]
    rc, _, err = cli([*args, "--out", got], capsys)
    assert rc == 0, err
    a, b = (json.loads(p.read_text())["metrics"]["loss"] for p in (ref, got))
    assert a == b


def test_bad_inputs_are_one_line_exit_2(ckpt, tmp_path, capsys):
    bn = save_checkpoint(tmp_path / "bn.pt", build(bn=True), arch=f"{MOD}:mlp", arch_kwargs={"bn": True})
    data = [ckpt, "--trust-checkpoint-arch", *QUIET, "--metrics", "loss", "--data"]
    one_line_exit_2([*data, f"{MOD}:ragged"], capsys, "batch 1", "(3,)", "(4,)")
    one_line_exit_2(
        run_args(bn, "--metrics", "loss", "--train-mode", "--batch-size", "1"),
        capsys,
        "batch",
        "--train-mode",
    )
    one_line_exit_2(run_args(ckpt, "--metrics", "trace", "--seed", str(2**70)), capsys, "--seed")
    one_line_exit_2(run_args(ckpt, "--metrics", "trace", "--seed", "-1"), capsys, "--seed")
    one_line_exit_2(run_args(ckpt, "--metrics", "loss", "--device", "banana"), capsys, "banana")
    state = build().state_dict()
    torch.save({"format": "dsgd-sam/1", "state_dict": state}, tmp_path / "noarch.pt")
    one_line_exit_2([tmp_path / "noarch.pt", "--data", f"{MOD}:points", *QUIET], capsys, "'arch'", "--arch")
    with pytest.raises(SharpnessInputError, match="seed"):
        sharpness.hessian_trace(build(), F.cross_entropy, dropout_setup()[1], seed=2**70)


# ---------------------------------------------------------------- 16. destinations checked before measuring
def test_out_onto_the_checkpoint_is_refused_before_measuring(ckpt, tmp_path, capsys):
    path = tmp_path / "m.pt"
    path.write_bytes(ckpt.read_bytes())
    alias = tmp_path / "sub" / ".." / "m.pt"
    (tmp_path / "sub").mkdir()
    one_line_exit_2(run_args(path, "--metrics", "loss", "--out", alias), capsys, "--out", "checkpoint")
    assert path.read_bytes() == ckpt.read_bytes()


def test_unwritable_destinations_are_refused_before_measuring(ckpt, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for opt, dest in (
        ("--out", blocker / "r.json"),
        ("--out", tmp_path),
        ("--plot", blocker),
        ("--plot", blocker / "p"),
    ):
        rc, out, err = cli(run_args(ckpt, "--metrics", "trace", opt, dest), capsys)
        assert rc == 2 and out == "", (opt, dest, out, err)  # nothing measured, nothing printed
        assert len(err.strip().splitlines()) == 1 and opt in err, err
