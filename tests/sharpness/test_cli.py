"""The ``sharpness`` command end to end: every checkpoint format, every data spec, every input error, the JSON
file, the plots, and agreement of the printed report with the Python API called directly."""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpness import results
from sharpness.checkpoint import load_model, save_checkpoint
from sharpness.cli import main
from sharpness.data import load_dataset
from sharpness.hvp import HessianOperator
from sharpness.lanczos import spectral_density, top_eigenvalues
from sharpness.report import select_metrics
from sharpness.sam import avg_sam_loss, sam_sharpness
from sharpness.table import fmt_err, fmt_value
from sharpness.trace import hessian_trace
from tests.sharpness.user_module import importable

ARCH_SRC = textwrap.dedent(
    """
    import torch
    from torch import nn

    def mlp(d_in=64, hidden=6, d_out=10):
        return nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))

    def other(d_in=64, d_out=10):  # keys 1.* and 4.*: 3.* unexpected, 4.* missing against mlp
        return nn.Sequential(nn.Flatten(), nn.Linear(d_in, 6), nn.Tanh(), nn.Tanh(), nn.Linear(6, d_out))

    def bn_cnn():
        conv = [nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh()]
        return nn.Sequential(*conv, nn.Flatten(), nn.Linear(72, 10))

    def points(split="test"):
        g = torch.Generator().manual_seed(3 if split == "test" else 4)
        return torch.randn(30, 64, generator=g), torch.randint(0, 10, (30,), generator=g)
    """
)
MOD = "cli_test_arch"
FAST = ["--samples", "40", "--probes", "8", "--rtol", "0", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def arch_module(tmp_path_factory):
    with importable(tmp_path_factory.mktemp("cliarch"), MOD, ARCH_SRC) as root:
        yield root


def build(name="mlp", seed=0, **kw) -> nn.Module:
    import importlib

    torch.manual_seed(seed)
    return getattr(importlib.import_module(MOD), name)(**kw)


def cli(args, capsys):
    """The command in-process. The toolkit checkpoints here name this test's own module, not one of the
    toolkit's models, so every call trusts that recorded arch (test_sharpness_hostile_inputs checks that
    without the flag nothing named by a file runs)."""
    rc = main([str(a) for a in args] + ["--trust-checkpoint-arch"])
    out, err = capsys.readouterr()
    return rc, out, err


def report_json(args, capsys, tmp_path, name="r.json"):
    path = tmp_path / name
    rc, out, err = cli([*args, "--out", path], capsys)
    assert rc == 0, err
    return json.loads(path.read_text()), out


@pytest.fixture(scope="module")
def toolkit_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tk.pt"
    save_checkpoint(path, build(), arch=f"{MOD}:mlp", arch_kwargs={})
    return path


# ------------------------------------------------------------------------------- checkpoint formats
def write_format(fmt: str, model: nn.Module, path: Path) -> tuple[Path, list[str]]:
    sd = model.state_dict()
    arch = ["--arch", f"{MOD}:mlp"]
    if fmt == "toolkit":
        save_checkpoint(path, model, arch=f"{MOD}:mlp")
        return path, []
    if fmt == "state_dict":
        torch.save(sd, path)
        return path, arch
    if fmt == "nested_ddp":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
        return path, arch
    if fmt == "safetensors":
        st = pytest.importorskip("safetensors.torch")
        path = path.with_suffix(".safetensors")
        st.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path, arch
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(model), str(path))
        return path, []
    if fmt == "pickle":
        torch.save(model, path)
        return path, ["--trust-pickle"]
    raise AssertionError(fmt)


FORMATS = ["toolkit", "state_dict", "nested_ddp", "safetensors", "torchscript", "pickle"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_checkpoint_format_gives_the_same_report(fmt, tmp_path, capsys, toolkit_ckpt):
    path, extra = write_format(fmt, build(), tmp_path / "model.pt")
    # one estimator for every format: TorchScript cannot be recorded or hooked, so auto would not be exact
    hut = ["--trace-method", "hutchinson"]
    got, out = report_json([path, *extra, "--metrics", "loss,trace", *FAST, *hut], capsys, tmp_path)
    ref, _ = report_json([toolkit_ckpt, "--metrics", "loss,trace", *FAST, *hut], capsys, tmp_path, "ref.json")
    names = {"nested_ddp": "state_dict", "pickle": "pickled_module"}
    assert got["checkpoint"]["format"] == names.get(fmt, fmt)
    assert got["metrics"]["loss"]["value"] == pytest.approx(ref["metrics"]["loss"]["value"], rel=1e-6)
    assert got["metrics"]["trace"]["value"] == pytest.approx(ref["metrics"]["trace"]["value"], rel=1e-5)
    assert got["metrics"]["loss"]["accuracy"] == ref["metrics"]["loss"]["accuracy"]
    assert "Hessian trace" in out and "loss L(w)" in out


def test_pickled_module_needs_trust_pickle(tmp_path, capsys):
    path, _ = write_format("pickle", build(), tmp_path / "whole.pt")
    rc, out, err = cli([path, *FAST, "--metrics", "loss"], capsys)
    assert rc == 2 and "--trust-pickle" in err and "runs code" in err
    assert_one_line(err)


def test_arch_as_a_file_path(tmp_path, capsys, arch_module):
    torch.save(build().state_dict(), tmp_path / "sd.pt")
    rc, out, err = cli(
        [tmp_path / "sd.pt", "--arch", f"{arch_module / MOD}.py:mlp", *FAST, "--metrics", "loss"], capsys
    )
    assert rc == 0, err
    assert "state_dict" in out


# ------------------------------------------------------------------------------- data specs
def write_cifar(root: Path, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))


def write_idx(root: Path, n: int = 7) -> None:
    rng = np.random.default_rng(1)
    for split in ("train", "t10k"):
        img = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        lab = rng.integers(0, 10, n).astype(np.uint8)
        head_i = bytes([0, 0, 8, 3]) + np.array([n, 28, 28], ">i4").tobytes()
        head_l = bytes([0, 0, 8, 1]) + np.array([n], ">i4").tobytes()
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(head_i + img.tobytes()))
        (root / f"{split}-labels-idx1-ubyte").write_bytes(head_l + lab.tobytes())


@pytest.mark.parametrize("spec", ["digits", "synthetic", "pt", "npz", "cifar10", "fashion-mnist", "callable"])
def test_every_data_spec(spec, tmp_path, capsys):
    d_in, n = {"synthetic": (20, 50), "cifar10": (3072, 6), "fashion-mnist": (784, 7)}.get(spec, (64, None))
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(25, 64, generator=g), torch.randint(0, 10, (25,), generator=g)
    if spec == "digits":
        arg, n = "digits", 359
    elif spec == "synthetic":
        arg = "synthetic:250"
        n = len(load_dataset(arg))  # the stratified 80/20 split's test part
    elif spec == "pt":
        torch.save({"x": x, "y": y}, tmp_path / "d.pt")
        arg, n = str(tmp_path / "d.pt"), 25
    elif spec == "npz":
        np.savez(tmp_path / "d.npz", inputs=x.numpy(), targets=y.numpy())
        arg, n = str(tmp_path / "d.npz"), 25
    elif spec == "cifar10":
        write_cifar(tmp_path)
        arg = f"cifar10:{tmp_path}"
    elif spec == "fashion-mnist":
        write_idx(tmp_path)
        arg = f"fashion-mnist:{tmp_path}"
    else:
        arg, n = f"{MOD}:points", 30
    save_checkpoint(tmp_path / "m.pt", build(d_in=d_in), arch=f"{MOD}:mlp", arch_kwargs={"d_in": d_in})
    got, out = report_json(
        [tmp_path / "m.pt", "--data", arg, "--metrics", "loss,trace", "--probes", "4", "--no-progress"],
        capsys,
        tmp_path,
    )
    assert got["data"]["n_samples"] == n
    assert f"{n} samples" in out
    assert math.isfinite(got["metrics"]["trace"]["value"])


def test_split_and_seeded_subset(toolkit_ckpt, tmp_path, capsys):
    a, out = report_json(
        [toolkit_ckpt, "--split", "train", "--metrics", "loss", "--no-progress"], capsys, tmp_path
    )
    assert a["data"]["n_samples"] == 1438 and "train split" in out
    b, _ = report_json(
        [toolkit_ckpt, "--samples", "50", "--seed", "3", "--metrics", "loss"], capsys, tmp_path
    )
    c, _ = report_json(
        [toolkit_ckpt, "--samples", "50", "--seed", "3", "--metrics", "loss"], capsys, tmp_path
    )
    d, _ = report_json(
        [toolkit_ckpt, "--samples", "50", "--seed", "4", "--metrics", "loss"], capsys, tmp_path
    )
    assert b["data"]["n_samples"] == 50 and b["metrics"] == c["metrics"]
    assert d["metrics"]["loss"]["value"] != b["metrics"]["loss"]["value"]


# ------------------------------------------------------------------------------- errors
def assert_one_line(err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("sharpness: error: ")


def error_case(case: str, tmp_path: Path, toolkit_ckpt: Path) -> tuple[list, str]:
    """(arguments, a fragment the one-line message must contain) for each kind of bad input."""
    sd_path = tmp_path / "sd.pt"
    torch.save(build().state_dict(), sd_path)
    if case == "missing file":
        return [tmp_path / "nope.pt"], "not found"
    if case == "truncated file":
        raw = toolkit_ckpt.read_bytes()
        (tmp_path / "half.pt").write_bytes(raw[: len(raw) // 2])
        return [tmp_path / "half.pt"], "unreadable or truncated"
    if case == "garbage file":
        (tmp_path / "junk.pt").write_bytes(b"\x00\x01 this is not a checkpoint" * 10)
        return [tmp_path / "junk.pt"], "unreadable or truncated"
    if case == "keys do not match":
        return [
            sd_path,
            "--arch",
            f"{MOD}:other",
        ], "2 missing [4.weight, 4.bias], 2 unexpected [3.weight, 3.bias]"
    if case == "shape mismatch":
        return [
            sd_path,
            "--arch",
            f"{MOD}:mlp",
            "--arch-kwargs",
            '{"hidden": 7}',
        ], "shape mismatch for '1.weight'"
    if case == "arch not importable":
        return [sd_path, "--arch", "no_such_module_xyz:net"], "cannot import no_such_module_xyz"
    if case == "state_dict without arch":
        return [sd_path], "--arch"
    if case == "bad arch kwargs":
        return [sd_path, "--arch", f"{MOD}:mlp", "--arch-kwargs", "{hidden: 7"], "not valid JSON"
    if case == "feature shape":
        return [toolkit_ckpt, "--data", "synthetic:100"], "inputs of shape (20,) do not fit the model"
    if case == "labels out of range":
        save_checkpoint(tmp_path / "five.pt", build(d_out=5), arch=f"{MOD}:mlp", arch_kwargs={"d_out": 5})
        return [tmp_path / "five.pt"], "labels range over 0..9 but the model has 5 outputs"
    if case == "cuda without cuda":
        return [toolkit_ckpt, "--device", "cuda"], "CUDA"
    if case == "nan loss":
        m = build()
        with torch.no_grad():
            m[3].bias[0] = float("nan")
        save_checkpoint(tmp_path / "nan.pt", m, arch=f"{MOD}:mlp")
        return [tmp_path / "nan.pt"], "NaN/inf"
    if case == "inf loss":
        m = build()
        with torch.no_grad():
            m[1].weight.fill_(float("inf"))
        save_checkpoint(tmp_path / "inf.pt", m, arch=f"{MOD}:mlp")
        return [tmp_path / "inf.pt"], "NaN/inf"
    if case == "unknown metric":
        return [toolkit_ckpt, "--metrics", "trace,bogus"], "unknown metric(s) bogus"
    if case == "bad option value":
        return [toolkit_ckpt, "--probes", "zero"], "--probes"
    if case == "no checkpoint":
        return [], "no CHECKPOINT"
    raise AssertionError(case)


ERRORS = [
    "missing file", "truncated file", "garbage file", "keys do not match", "shape mismatch",
    "arch not importable", "state_dict without arch", "bad arch kwargs", "feature shape",
    "labels out of range", "cuda without cuda", "nan loss", "inf loss", "unknown metric", "bad option value",
    "no checkpoint",
]  # fmt: skip


@pytest.mark.parametrize("case", ERRORS)
def test_bad_input_is_one_line_and_exit_code_2(case, tmp_path, capsys, toolkit_ckpt):
    if case == "cuda without cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args, fragment = error_case(case, tmp_path, toolkit_ckpt)
    with pytest.raises(SystemExit) if case == "bad option value" else _nothing() as exc:
        rc, out, err = cli([*args, "--no-progress"], capsys)
    if case == "bad option value":
        rc, (out, err) = exc.value.code, capsys.readouterr()
    assert rc == 2, err
    assert_one_line(err)
    assert fragment in err
    assert out == ""


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(Exception, match="not found"):
        main([str(tmp_path / "nope.pt"), "--debug"])


def test_error_in_a_real_process_has_no_traceback(tmp_path, arch_module):
    torch.save(build().state_dict(), tmp_path / "sd.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "sharpness", str(tmp_path / "sd.pt"), "--arch", f"{MOD}:other"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(arch_module), *sys.path])},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_one_line(proc.stderr)
    assert "missing" in proc.stderr and "unexpected" in proc.stderr


# ------------------------------------------------------------------------------- JSON output
def test_json_is_complete_and_written_atomically(toolkit_ckpt, tmp_path, capsys):
    got, out = report_json([toolkit_ckpt, *FAST, "--metrics", "all", "--top-k", "2"], capsys, tmp_path)
    assert set(got["metrics"]) == {"loss", "trace", "eigs", "density", "avg-sam", "sam", "layers"}
    for key in ("settings", "seed", "environment", "checkpoint", "data", "bn_mode", "timings_s"):
        assert key in got
    assert got["environment"]["torch"] == torch.__version__ and got["environment"]["device"]
    assert got["metrics"]["trace"]["method"] == "exact" and got["metrics"]["trace"]["stderr"] == 0  # tanh MLP
    assert len(got["metrics"]["eigs"]["residuals"]) == 2
    assert got["bn_mode"] == "eval" and "eval: BatchNorm uses running statistics" in out
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left


def test_failed_write_leaves_no_half_file(toolkit_ckpt, tmp_path, capsys, monkeypatch):
    target = tmp_path / "keep.json"
    target.write_text('{"old": true}\n')

    def boom(fd):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(results.os, "fsync", boom)
    rc, out, err = cli([toolkit_ckpt, *FAST, "--metrics", "loss", "--out", target], capsys)
    monkeypatch.undo()
    assert rc == 1 and "disk on fire" in err and "Traceback" not in err
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


# ------------------------------------------------------------------------------- metrics
def test_train_mode_is_stated_and_changes_batchnorm(tmp_path, capsys):
    m = build("bn_cnn")
    save_checkpoint(tmp_path / "bn.pt", m, arch=f"{MOD}:bn_cnn")
    ev, out_e = report_json([tmp_path / "bn.pt", *FAST, "--metrics", "loss"], capsys, tmp_path, "e.json")
    tr, out_t = report_json(
        [tmp_path / "bn.pt", *FAST, "--metrics", "loss", "--train-mode"], capsys, tmp_path
    )
    assert ev["bn_mode"] == "eval" and tr["bn_mode"] == "train"
    assert "mode        train: BatchNorm uses batch statistics" in out_t
    assert abs(ev["metrics"]["loss"]["value"] - tr["metrics"]["loss"]["value"]) > 1e-4
    again, _ = report_json([tmp_path / "bn.pt", *FAST, "--metrics", "loss"], capsys, tmp_path, "e2.json")
    assert again["metrics"] == ev["metrics"]  # the checkpoint was not changed


def test_per_layer_traces_match_the_exact_blocks(tmp_path, capsys):
    m = build(hidden=3).double()
    save_checkpoint(tmp_path / "m.pt", m, arch=f"{MOD}:mlp", arch_kwargs={"hidden": 3})
    got, out = report_json(
        [
            tmp_path / "m.pt",
            "--samples",
            "40",
            "--probes",
            "400",
            "--per-layer",
            "--metrics",
            "trace",
            "--no-progress",
        ],
        capsys,
        tmp_path,
    )
    data = load_dataset("digits", samples=40, seed=0).to("cpu", torch.float64)
    H = HessianOperator(m, F.cross_entropy, data.batches(512)).dense()
    diag = H.diagonal()
    blocks = {"1": diag[: 64 * 3 + 3].sum(), "3": diag[64 * 3 + 3 :].sum()}
    assert set(got["metrics"]["layers"]) == set(blocks)
    for name, exact in blocks.items():
        r = got["metrics"]["layers"][name]
        # layer 3 enters the outputs linearly: certified exact (stderr 0); layer 1 is estimated
        assert abs(r["value"] - float(exact)) <= max(4 * r["stderr"], 1e-10 * abs(float(exact))), name
    assert re.search(r"layer 1: Tr H_ll .*1\.weight, 1\.bias \(195 params\)", out)
    assert "sum of layer traces" in out


def test_mse_loss_is_the_mean_squared_error_to_one_hot(toolkit_ckpt, tmp_path, capsys):
    got, out = report_json([toolkit_ckpt, "--loss", "mse", "--metrics", "loss", *FAST], capsys, tmp_path)
    model, _ = load_model(toolkit_ckpt, trust_checkpoint_arch=True)
    data = load_dataset("digits", samples=40, seed=0)
    with torch.no_grad():
        expect = F.mse_loss(model(data.x), F.one_hot(data.y, 10).float())
    assert got["metrics"]["loss"]["value"] == pytest.approx(float(expect), rel=1e-6)


def test_default_metrics_leave_out_what_does_not_fit(monkeypatch):
    import sharpness.report as rep

    assert select_metrics(None, 1000, 4, torch.device("cpu"))[0] == list(rep.DEFAULT_METRICS)
    monkeypatch.setattr(rep, "memory_budget", lambda device: 4 * 1000 * 90)  # room for 90 vectors of d = 1000
    chosen, skipped = select_metrics(None, 1000, 4, torch.device("cpu"), per_layer=True)
    assert chosen == ["loss", "trace", "density", "avg-sam", "sam", "layers"] and list(skipped) == ["eigs"]
    assert select_metrics(["eigs"], 1000, 4, torch.device("cpu"))[0] == ["eigs"]  # asked for: always run


def test_help_explains_metrics_formats_specs_and_pickle_risk(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for word in ("loss", "trace", "eigs", "density", "avg-sam", "sam", "layers", "HVPs", "Rademacher"):
        assert word in out
    for word in ("state_dict", "safetensors", "TorchScript", "toolkit", "--trust-pickle", "RUNS CODE"):
        assert word in out
    for word in ("digits", "synthetic:N", "FILE.npz", "cifar10:DIR", "fashion-mnist:DIR", "MODULE:CALLABLE"):
        assert word in out


def test_progress_bar_goes_to_stderr_after_a_second(capsys):
    import time

    from sharpness.progress import Progress

    bar = Progress(True)
    with bar.task("slow thing", 3, "HVP"):
        for _ in range(3):
            time.sleep(0.4)
            bar.tick()
    out, err = capsys.readouterr()
    assert out == "" and "slow thing" in err
    with bar.task("fast thing", 3, "HVP"):
        bar.tick(3)
    assert "fast thing" not in capsys.readouterr().err


# ------------------------------------------------------------------------------- plots
def test_plot_writes_nonblank_pngs(toolkit_ckpt, tmp_path, capsys):
    import matplotlib.image as mpimg

    rc, out, err = cli(
        [
            toolkit_ckpt,
            *FAST,
            "--metrics",
            "density,eigs",
            "--top-k",
            "2",
            "--plot",
            tmp_path / "p",
            "--plot-eigen",
        ],
        capsys,
    )
    assert rc == 0, err
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == ["landscape_1d.png", "landscape_2d.png", "landscape_2d_eigen.png", "spectral_density.png"]
    for name in names:
        img = mpimg.imread(tmp_path / "p" / name)
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert float(img[..., :3].std()) > 0.05, name  # not a blank canvas


# ------------------------------------------------------------------------------- the demo
def rows(out: str) -> dict[str, tuple[str, str]]:
    """Table rows -> (printed value, printed stderr)."""
    found = {}
    for line in out.splitlines():
        m = re.match(r"^(\S.*?|  \S.*?)\s{2,}(-?[\d.e+-]+(?: %)?)\s+(± \S+)?", line)
        if m:
            found[m.group(1).strip()] = (m.group(2), m.group(3) or "")
    return found


def test_demo_report_agrees_with_the_python_api(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(["--demo", "--out", "demo.json", "--no-progress", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert out.startswith("demo: trained a tanh MLP") and (tmp_path / "runs/demo/model.pt").is_file()
    doc = json.loads((tmp_path / "demo.json").read_text())
    model, info = load_model("runs/demo/model.pt")
    assert info["format"] == "toolkit" and info["arch"] == "sharpness.demo:mlp"
    # --demo measures with one thread; float32 reductions depend on the thread count, so match it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _api_agrees_with_demo_report(model, out, doc)
    finally:
        torch.set_num_threads(threads)


def _api_agrees_with_demo_report(model, out: str, doc: dict) -> None:
    data = load_dataset("digits", split="test").batches(512)
    loss = F.cross_entropy
    table = rows(out)
    tr = hessian_trace(model, loss, data, rtol=0.02, max_probes=1000, seed=0)  # the CLI defaults
    assert table["Hessian trace Tr H"] == (fmt_value(tr.value), fmt_err(tr.stderr))
    eig = top_eigenvalues(model, loss, data, k=5, seed=0)
    for i, lam in enumerate(eig.values):
        assert table[f"eigenvalue lambda_{i + 1}"][0] == fmt_value(lam)
    dens = spectral_density(model, loss, data, seed=0)
    assert table["smallest eigenvalue (SLQ)"][0] == fmt_value(float(dens.nodes.min()))
    for sigma in (0.01, 0.03):
        r = avg_sam_loss(model, loss, data, sigma=sigma, n_samples=100, seed=0)
        assert table[f"avg-SAM E L(w+eps), sigma={sigma:g}"] == (fmt_value(r.value), fmt_err(r.stderr))
    s = sam_sharpness(model, loss, data, rho=0.05)
    assert table["SAM sharpness, rho=0.05"][0] == fmt_value(s.value)
    with torch.no_grad():
        x, y = load_dataset("digits", split="test").x, load_dataset("digits", split="test").y
        acc = float((model(x).argmax(1) == y).float().mean())
        base = float(loss(model(x), y))
    assert table["loss L(w)"][0] == fmt_value(base)
    assert table["accuracy"][0] == f"{100 * acc:.2f} %"
    quad = base + 0.5 * 0.01**2 * tr.value
    assert doc["metrics"]["avg-sam"][0]["quadratic"]["value"] == pytest.approx(quad, rel=1e-12)
    assert doc["metrics"]["trace"]["value"] == pytest.approx(tr.value, rel=1e-12)
    assert doc["metrics"]["eigs"]["values"] == pytest.approx(eig.values, rel=1e-12)
