"""Figures from a tiny saved run set and a tiny suite report made here: every figure renders to a non-blank
PNG and a PDF, the captions carry the slopes computed from the plotted data, and bad inputs give one-line
errors.

The runs are real engine runs (4 workers, 20 steps, a few hundred digits) produced through ``--rerun``'s code
path; the report is written with the suite's own report writer from synthetic power laws with known noise, and
every slope a caption states is compared with ``numpy.polyfit`` on the logs of the same CSV columns.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from figures import catalog
from figures.captions import fmt
from figures.cli import main
from figures.context import FigureContext, config_mismatch, run_status
from figures.presets import Preset, design, get_preset
from figures.produce import missing_runs, produce_runs
from figures.slopes import two
from figures.sources import FiguresError, load_report
from verify.claims.base import CheckResult, ControlResult
from verify.claims.report import write_report
from verify.speed import Speed

RNG = np.random.default_rng(1234)


def power(x: np.ndarray, k: float, c: float = 1.0, noise: float = 0.05) -> np.ndarray:
    """``c x^k`` times log-normal noise (so a fit does not return k exactly)."""
    return c * np.asarray(x, dtype=float) ** k * np.exp(noise * RNG.standard_normal(np.size(x)))


def loglog(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def tiny_preset() -> Preset:
    base = dict(
        workers=4,
        steps=20,
        warmup=2,
        milestones=[10, 15],
        data="digits",
        samples=256,
        test_samples=120,
        model="mlp",
        model_kwargs={"hidden": [8], "activation": "tanh"},
        dtype="float64",
        log_every=5,
    )
    runs = design(base, (8, 0.1), (32, 0.4), 2, {"hess_every": 5, "sharpness_every": 10})
    land = {"grid": 5, "line": 7, "span": 1.0, "samples": 128, "trace_probes": 4, "lanczos_tol": 1e-3}
    return Preset("tiny", "test preset", runs, "quick", landscape=land, device="cpu")


def check(
    cid: str, series: dict, measured: dict | None = None, control: dict | None = None, verdict: str = "PASS"
):
    return CheckResult(
        id=cid,
        claim="c",
        source="s",
        status="proven",
        prediction="p",
        measured=measured or {},
        criterion="k",
        control=ControlResult("ctrl", control or {}, True),
        verdict=verdict,
        series=series,
        title=cid,
        settings={"tiny": True},
    )


def tiny_report(path: Path) -> dict:
    """A suite report with every series the figures read; returns the data for the slope checks."""
    s = np.logspace(-3, -0.5, 6)
    trace = 3.0 * s**2
    t1 = {
        "s": s,
        "trace_xi": trace,
        "drift": power(s, 2),
        "residual": power(s, 3),
        "residual_isotropic": power(s, 2),
        "residual_symmetric": power(s, 4),
        "seed": np.zeros(6),
    }
    t1b = {"s": s, "drift": power(s, 2), "half_grad_trace": power(s, 2), "residual": power(s, 3)}
    etas = np.array([0.005, 0.01, 0.02, 0.04])
    t5 = {
        "seed": np.zeros(4),
        "eta": etas,
        "median_r": power(etas, 1, 2.0),
        "median_r_isotropic": power(etas, 0, 0.7),
        "mean_trace_xi": etas**2,
        "samples": np.full(4, 10),
    }
    fam, topo, m, b, eta = [], [], [], [], []
    plan = (
        [("eta", "ring", 16, 8, e) for e in (0.0025, 0.005, 0.01, 0.02)]
        + [("b", "ring", 16, bb, 0.01) for bb in (2, 8, 32)]
        + [("topology", t, 16, 8, 0.01) for t in ("complete", "exponential", "grid", "ring")]
        + [("m_" + t, t, mm, 8, 0.01) for t in ("ring", "exponential") for mm in (4, 8, 16, 32)]
        + [("control_P=I", "disconnected", 16, 8, e) for e in (0.0025, 0.005, 0.01, 0.02)]
    )
    for row in plan:
        for lst, v in zip((fam, topo, m, b, eta), row, strict=True):
            lst.append(v)
    eta_a, b_a, m_a = np.array(eta), np.array(b, float), np.array(m, float)
    tr = power(eta_a, 1.9, 10.0) / b_a * np.where(np.array(fam) == "m_ring", m_a / 16, 1.0)
    tr = np.where(np.array(fam) == "control_P=I", power(eta_a, 1.0, 0.1), tr)
    t6 = {
        "family": fam,
        "topology": topo,
        "m": m,
        "b": b,
        "eta": eta,
        "trace_xi": tr,
        "trace_xi_se": 0.01 * tr,
        "predicted": tr * 1.01,
        "predicted_small_eta": tr,
        "ratio": np.full(len(fam), 0.99),
    }
    B = np.array([32, 64, 128, 256, 512], float)
    half, csgd, fixed = power(B, 0.9, 1e-6), power(B, 0.0, 2e-4), power(B, -1.0, 0.03)
    t7 = {
        "b": B / 16,
        "B": B,
        "eta": B / 16 * 0.01 / 8,
        "dsgd_trace_xi": 2 * half,
        "dsgd_trace_xi_se": 0.01 * half,
        "dsgd_trace_xi_predicted": 2 * half,
        "dsgd_half_trace_h_xi": half,
        "dsgd_half_trace_h_xi_predicted": half,
        "csgd_excess_loss": csgd,
        "csgd_excess_loss_se": 0.01 * csgd,
        "csgd_steps": np.full(5, 100),
        "csgd_excess_loss_exact": csgd,
        "csgd_excess_loss_continuous": csgd,
        "ratio_dsgd_over_csgd": half / csgd,
        "fixed_eta_trace_xi": fixed,
        "fixed_eta_trace_xi_predicted": fixed,
    }
    sig, h = np.logspace(-3, -1, 5), np.logspace(-8, -4, 5)
    beta1 = power(sig, -1.0, 0.6)
    t8b = {
        "sigma": sig,
        "beta_1": beta1,
        "bound_1": beta1 * 1.0,
        "beta_15": power(sig, -0.9, 1.5),
        "bound_15": 12 / sig,
    }
    t8d = {
        "h": h,
        "smoothed": power(h, 0.0, 60),
        "raw": power(h, -1.0, 0.8),
        "xi_orthogonal": power(h, -1.0, 0.8),
        "xi_along_u": power(h, 0.0, 0.5),
    }
    cos = {
        "cos_xi_gradient_noise": 0.98,
        "cos_xi_H": 0.97,
        "cos_xi_posterior": 0.01,
        "cos_xi_identity": 0.55,
        "cos_xi_lyapunov_prediction": 0.99,
    }
    results = [
        check("T1", {"slopes": t1}, {"drift_slope": 2.0}),
        check("T1b", {"taylor": t1b}),
        check("T5", {"medians": t5}),
        check("T6", {"runs": t6}, {"topology_s_p": {"ring": 2.41}}),
        check("T7", {"batch": t7}),
        check("T8", {"beta": t8b, "difference_ratio": t8d}),
        check(
            "T10",
            {"xi_entries": {"i": [0], "xi": [1.0]}},
            cos,
            {"isotropic_noise_cos_xi_gradient_noise": 0.35},
            "NOT SUPPORTED",
        ),
    ]
    write_report(results, path, {"mode": "tiny"})
    return {"T1": t1, "T1b": t1b, "T5": t5, "T6": t6, "T7": t7, "T8b": t8b, "T8d": t8d}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("figs")
    preset = tiny_preset()
    runs, report, out = root / "runs", root / "runs" / "suite", root / "out"
    specs = catalog.runs_needed(catalog.modules_for(preset), preset)
    assert len(missing_runs(specs, runs)) == len(specs)
    produce_runs(specs, runs, "cpu", progress=False)
    assert missing_runs(specs, runs) == []
    data = tiny_report(report)
    ctx = FigureContext(preset, runs, report, out, "cpu")
    rendered = {m.NAME: catalog.render(m, ctx) for m in catalog.modules_for(preset)}
    return {"root": root, "preset": preset, "ctx": ctx, "data": data, "rendered": rendered, "out": out}


def caption(made, name: str) -> tuple[str, dict]:
    out = made["out"]
    return (out / f"{name}.md").read_text(), json.loads((out / f"{name}.json").read_text())


def slope_of(doc: dict, what: str) -> dict:
    hits = [s for s in doc["slopes"] if s["what"].startswith(what)]
    assert len(hits) == 1, f"{what!r} matches {[s['what'] for s in doc['slopes']]}"
    return hits[0]


def assert_slope(made, name: str, what: str, expected: float) -> None:
    md, doc = caption(made, name)
    s = slope_of(doc, what)
    assert s["fitted"] == pytest.approx(expected, abs=1e-9)
    assert f"fitted slope {two(expected)}" in md


#: The figures of engine runs and the suite (the T11 figure has its own tests: test_t11_preset.py).
ENGINE_FIGURES = [m.NAME for m in catalog.all_modules() if catalog.runs_kind(m) == "engine"]


@pytest.mark.parametrize("name", ENGINE_FIGURES)
def test_every_figure_renders_png_and_pdf_not_blank(made, name):
    assert_rendered(made["rendered"][name], made["out"])


def assert_rendered(r, out: Path) -> None:
    """A rendered figure: PNG (not blank) and PDF, a caption with what is plotted and its sources."""
    assert r.png.is_file() and r.pdf.is_file() and r.caption_md.is_file() and r.caption_json.is_file()
    img = mpimg.imread(r.png)
    assert img.ndim == 3 and min(img.shape[:2]) > 200
    assert float(img[..., :3].var()) > 1e-3, "the PNG is blank"
    head = r.pdf.read_bytes()[:5]
    assert head == b"%PDF-" and r.pdf.stat().st_size > 5000
    md, doc = (out / f"{r.name}.md").read_text(), json.loads((out / f"{r.name}.json").read_text())
    assert md.startswith("### Figure") and doc["what"] and doc["sources"]


def test_png_is_150_dpi(made):
    from PIL import Image

    with Image.open(made["rendered"]["fig4_consensus"].png) as im:
        assert round(im.info["dpi"][0]) == 150


def test_consensus_slopes_match_the_data(made):
    t6 = made["data"]["T6"]
    fam = np.array(t6["family"])
    for family, x, what in (
        ("eta", "eta", "Tr Xi vs learning rate"),
        ("b", "b", "Tr Xi vs local batch"),
        ("m_ring", "m", "Tr Xi vs workers m, ring"),
        ("m_exponential", "m", "Tr Xi vs workers m, exponential"),
        ("control_P=I", "eta", "control P = I"),
    ):
        sel = fam == family
        assert_slope(made, "fig4_consensus", what, loglog(np.array(t6[x])[sel], t6["trace_xi"][sel]))


def test_equivalence_slopes_match_the_data(made):
    t1, t1b, t5 = made["data"]["T1"], made["data"]["T1b"], made["data"]["T5"]
    x = np.sqrt(t1["trace_xi"])
    assert_slope(made, "fig5_equivalence", "CosLoss drift", loglog(x, t1["drift"]))
    assert_slope(made, "fig5_equivalence", "CosLoss residual vs avg-SAM", loglog(x, t1["residual"]))
    assert_slope(
        made, "fig5_equivalence", "CosLoss residual, +-symmetric", loglog(x, t1["residual_symmetric"])
    )
    assert_slope(made, "fig5_equivalence", "T1b Taylor residual", loglog(t1b["s"], t1b["residual"]))
    assert_slope(made, "fig5_equivalence", "T5 median r", loglog(t5["eta"], t5["median_r"]))


def test_large_batch_and_smoothing_slopes_match_the_data(made):
    t7, t8b, t8d = made["data"]["T7"], made["data"]["T8b"], made["data"]["T8d"]
    assert_slope(
        made, "fig6_large_batch", "LSR: D-SGD 1/2 Tr(H Xi)", loglog(t7["B"], t7["dsgd_half_trace_h_xi"])
    )
    assert_slope(made, "fig6_large_batch", "LSR: C-SGD excess loss", loglog(t7["B"], t7["csgd_excess_loss"]))
    assert_slope(
        made, "fig6_large_batch", "fixed eta: D-SGD Tr Xi", loglog(t7["B"], t7["fixed_eta_trace_xi"])
    )
    assert_slope(made, "fig7_smoothing", "beta vs sigma, one kink", loglog(t8b["sigma"], t8b["beta_1"]))
    assert_slope(made, "fig7_smoothing", "difference ratio vs h, raw", loglog(t8d["h"], t8d["raw"]))


def test_run_based_numbers_come_from_the_runs(made):
    ctx = made["ctx"]
    md, doc = caption(made, "fig1_accuracy")
    finals = [100 * ctx.run(s).last("test_acc") for s in made["preset"].find("ring", "large")]
    assert (
        f"{np.mean(finals):.2f} ± {np.std(finals, ddof=1):.2f} %"
        in doc["numbers"]["final accuracy, D-SGD ring, large batch"]
    )
    _, doc6 = caption(made, "fig6_large_batch")
    ring = ctx.seed0("ring", "large")
    steps, v = ring.series("trace_h_xi")
    first = v[(steps > 2) & (steps <= 10)].mean()
    key = [k for k in doc6["numbers"] if "lr phase 1" in k][0]
    assert doc6["numbers"][key].endswith(fmt(0.5 * first))


def test_landscape_and_reliability_from_checkpoints(made):
    md, doc = caption(made, "fig2_landscape")
    assert "Tr H =" in md and "lambda_max =" in md
    from figures.checkpoints import worker_probabilities

    ring = made["ctx"].seed0("ring", "large")
    P, p_avg, y = worker_probabilities(ring)
    assert P.shape[0] == 4 and torch_allclose(P.sum(-1), 1.0)
    # the engine logged the same ensemble NLL from its own state: the checkpoint reproduces it
    nll = float(-np.log(P.mean(0).numpy()[np.arange(len(y)), y.numpy()]).mean())
    assert nll == pytest.approx(ring.last("ensemble_nll"), rel=1e-9)


def torch_allclose(t, v: float) -> bool:
    return bool(np.allclose(t.numpy(), v, atol=1e-12))


def test_cli_and_gallery(made, capsys):
    root = made["root"]
    out = root / "cli-out"
    code = main(
        [
            "fig4",
            "consensus",
            "fig7_smoothing",
            "--preset",
            "quick",
            "--runs",
            str(root / "runs"),
            "--report",
            str(root / "runs" / "suite"),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    index = (out / "index.md").read_text()
    assert "![fig4_consensus](fig4_consensus.png)" in index and "fig7_smoothing.png" in index
    # the quick preset's runs are not these: run figures fail with a one-line hint, exit status 1
    code = main(["fig1", "--runs", str(root / "runs"), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "was made with other settings (workers = 4, the preset wants 16)" in err
    assert "produce it with: dsgd-figures all --preset quick" in err
    code = main(["fig1", "--runs", str(root / "empty"), "--out", str(out), "--quiet"])
    assert code == 1 and "csgd-b8-s0 is missing; produce it with" in capsys.readouterr().err
    assert "Not drawn:" in (out / "index.md").read_text()


def test_bad_inputs_give_one_line_errors(made, tmp_path):
    with pytest.raises(FiguresError, match="unknown preset"):
        get_preset("huge")
    with pytest.raises(FiguresError, match="unknown figure"):
        catalog.module("fig42")
    with pytest.raises(FiguresError, match="no check T99"):
        load_report(made["ctx"].report_dir).check("T99")
    spec = made["preset"].runs[0]
    changed = type(spec)(spec.label, spec.key, spec.batch, spec.seed, dict(spec.config, lr=0.5))
    why = run_status(changed, made["ctx"].runs_dir)
    assert why is not None and "other settings (lr = 0.1, the preset wants 0.5)" in why
    assert main(["fig99", "--runs", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        main(["--preset", "nope"])


def test_presets_carry_the_speed_options(capsys):
    """verify.speed's options go into every run of a preset; precision makes other runs (an fp32 figure never
    reads a bf16 run), channels_last/compile do not; a run saved before the options existed is fp32."""
    plain = get_preset("paper", data="x")
    fast = get_preset("paper", data="x", speed=Speed("bf16", channels_last=True))
    assert plain.flags == "" and all(r.config["precision"] == "fp32" for r in plain.runs)
    assert fast.flags == " --precision bf16 --channels-last"
    assert "training gradients bf16+channels_last" in fast.description
    assert all(r.config["precision"] == "bf16" and r.config["channels_last"] is True for r in fast.runs)
    old = {
        k: v for k, v in plain.runs[0].config.items() if k not in ("precision", "channels_last", "compile")
    }
    assert config_mismatch(old, plain.runs[0].config) is None
    assert config_mismatch(old, fast.runs[0].config) == "precision = 'fp32', the preset wants 'bf16'"
    assert config_mismatch(dict(old, channels_last=True, compile=True), plain.runs[0].config) is None
    with pytest.raises(FiguresError, match="^preset quick: precision bf16 applies to float32 runs"):
        get_preset("quick", speed=Speed("bf16"))
    with pytest.raises(FiguresError, match="^preset fmnist draws T11's saved runs"):
        get_preset("fmnist", speed=Speed("bf16"))
    assert main(["--list", "--preset", "paper", "--precision", "bf16"]) == 0
    assert "runs/figures-paper-bf16/ring-b64-s0" in capsys.readouterr().out


# ------------------------------------------------------------------- the fmnist preset: T11's saved runs
def t11_run(protocol, seed: int, batch: str, rng: np.random.Generator) -> dict:
    """A lockstep run as :func:`verify.claims.largebatch.run_one` returns it: a row every ``log_every`` steps
    (test accuracy, train loss per arm), lambda_max / Tr H at the protocol's flatness steps."""
    from verify.claims import largebatch as lb

    flat = set(protocol.flat_steps())
    end = {a: 0.6 + 0.3 * rng.random() for a in lb.ARMS}
    rows = []
    for step in range(0, protocol.steps + 1, protocol.log_every):
        f = step / protocol.steps
        r: dict = {"step": step}
        for a in lb.ARMS:
            r[f"{a}_test_acc"] = 0.1 + (end[a] - 0.1) * f
            r[f"{a}_train_loss"] = 2.3 - 1.5 * f - 0.1 * end[a]
            r[f"{a}_dist"] = 0.0
            if step in flat:
                r[f"{a}_lambda_max"] = 5 + 10 * rng.random()
                r[f"{a}_lambda_max_err"] = 0.05
                r[f"{a}_trace_h"] = 50 + 100 * rng.random()
                r[f"{a}_trace_h_err"] = 1.0
        rows.append(r)
    return {"seed": seed, "batch": batch, "arms": list(lb.ARMS), "wall_s": 60.0, "diverged": {}, "rows": rows}


def t11_folder(path: Path, protocol, seeds: range, rng_seed: int = 7) -> list[dict]:
    """A T11 folder as run_protocol leaves it: runs/seed<S>_<batch>.json, then report + series CSVs written
    by T11's own writer (:func:`verify.claims.largebatch.write_outputs`)."""
    from verify.claims import largebatch as lb

    rng = np.random.default_rng(rng_seed)
    runs = [t11_run(protocol, s, b, rng) for s in seeds for b in lb.BATCHES]
    (path / "runs").mkdir(parents=True, exist_ok=True)
    for r in runs:
        (path / "runs" / f"seed{r['seed']}_{r['batch']}.json").write_text(json.dumps(r))
    lb.write_outputs(path, protocol, lb.load_runs(path))
    return runs


@pytest.fixture(scope="module")
def t11(tmp_path_factory):
    """The fmnist preset drawn by the CLI from a fake T11 folder of 2 seeds (``--seeds 2``)."""
    root = tmp_path_factory.mktemp("t11")
    preset = get_preset("fmnist", seeds=2)
    runs = t11_folder(root / "t11-fmnist", preset.protocol, range(2))
    out = root / "out"
    code = main(["all", "--preset", "fmnist", "--seeds", "2", "--runs", str(root / "t11-fmnist"), "--out",
                 str(out), "--quiet"])  # fmt: skip
    return {"root": root, "runs": runs, "out": out, "code": code, "preset": preset}


def test_fmnist_preset_reads_t11_runs_not_engine_runs(tmp_path, capsys):
    from verify.claims.largebatch import PROTOCOLS

    p = get_preset("fmnist")
    assert p.runs == [] and p.runs_kind == "t11" and p.runs_dir == "results/t11-fmnist"
    assert p.protocol == PROTOCOLS["fmnist"]
    mods = catalog.modules_for(p)
    assert [m.NAME for m in mods] == ["fig9_large_batch_scale"]
    assert catalog.runs_needed(mods, p) == [] and catalog.checks_needed(mods) == []
    assert main(["--list", "--preset", "fmnist"]) == 0
    listed = capsys.readouterr().out
    assert "results/t11-fmnist/series_small_seed0.csv (" in listed and "series_large_seed2.csv" in listed
    assert "-b64-s0" not in listed and "-b512-s" not in listed, "the preset lists engine runs"
    # a T11 preset with engine RunSpecs is refused where it is built
    with pytest.raises(FiguresError, match="no engine RunSpecs"):
        Preset("x", "d", tiny_preset().runs[:1], "quick", runs_kind="t11", protocol=p.protocol)


def test_quick_and_paper_all_is_the_design_figures():
    for name in ("quick", "paper"):
        assert [m.NAME for m in catalog.modules_for(get_preset(name))] == ENGINE_FIGURES
    assert ENGINE_FIGURES == [f"fig{i}_{n}" for i, n in enumerate(
        ("accuracy", "landscape", "sharpness", "consensus", "equivalence", "large_batch", "smoothing",
         "uncertainty"), 1)]  # fmt: skip
    assert set(ENGINE_FIGURES) | {"fig9_large_batch_scale"} == set(catalog.MODULES)


def test_fmnist_renders_the_t11_figure_only(t11):
    out = t11["out"]
    assert t11["code"] == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["fig9_large_batch_scale.png"]
    r = catalog.Rendered(
        "fig9_large_batch_scale",
        *(out / f"fig9_large_batch_scale.{x}" for x in ("png", "pdf", "md", "json")),
        0,
    )
    assert_rendered(r, out)
    index = (out / "index.md").read_text()
    assert "![fig9_large_batch_scale]" in index and "fig1_accuracy" not in index
    assert "T11's runs from" in index


def test_t11_caption_numbers_come_from_the_runs(t11):
    from verify.claims.largebatch import BATCHES

    doc = json.loads((t11["out"] / "fig9_large_batch_scale.json").read_text())
    for b in BATCHES:
        runs = [r for r in t11["runs"] if r["batch"] == b]
        for arm, lab in (("dsgd", "D-SGD ring"), ("csgd", "C-SGD")):
            v = np.array([100 * r["rows"][-1][f"{arm}_test_acc"] for r in runs])
            want = f"{v.mean():.2f} ± {v.std(ddof=1):.2f} % (2 seeds)"
            assert doc["numbers"][f"final test accuracy, {lab}, {b} batch"] == want
        dc = np.array([100 * (r["rows"][-1]["dsgd_test_acc"] - r["rows"][-1]["csgd_test_acc"]) for r in runs])
        key = f"D - C, {b} batch (paired: the two arms of one run)"
        assert doc["numbers"][key] == f"{dc.mean():.2f} ± {dc.std(ddof=1):.2f} points (2 seeds)"
        lam = np.mean([r["rows"][-1]["csgd_lambda_max"] for r in runs])
        assert (
            f"C-SGD {fmt(lam)}"
            in doc["numbers"][f"lambda_max at the last flatness step, {b} batch (mean over seeds)"]
        )
    assert doc["settings"]["steps"] == t11["preset"].protocol.steps
    assert any(s.endswith("series_large_seed1.csv") for s in doc["sources"])


def test_t11_figure_refuses_another_protocol_and_design_figures(tmp_path, capsys):
    from dataclasses import replace

    preset = get_preset("fmnist", seeds=1)
    other = tmp_path / "other"
    t11_folder(other, replace(preset.protocol, steps=300), range(1))
    args = [
        "--preset",
        "fmnist",
        "--seeds",
        "1",
        "--runs",
        str(other),
        "--out",
        str(tmp_path / "o"),
        "--quiet",
    ]
    assert main(["all", *args]) == 1
    err = capsys.readouterr().err
    assert "holds T11 runs made with another protocol (steps = 300, the preset wants 3000)" in err
    assert main(["fig1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fig1_accuracy draws engine runs" in err and "fig9" in err
    assert main(["fig9", "--preset", "quick", "--runs", str(other), "--out", str(tmp_path / "o")]) == 2
    assert "fig9_large_batch_scale draws T11's saved lockstep runs" in capsys.readouterr().err
    assert (
        main(["all", "--preset", "fmnist", "--runs", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
        == 1
    )
    assert "no T11 series" in capsys.readouterr().err
    bad = tmp_path / "bad"
    t11_folder(bad, preset.protocol, range(1))
    (bad / "series_large_seed0.csv").write_text("step,dsgd_test_acc\n0,0.1\n")
    assert main(["all", *args[:4], "--runs", str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 1
    assert (
        "series_large_seed0.csv lacks column(s) dsgd_train_loss, dsgd_lambda_max" in capsys.readouterr().err
    )


def test_t11_rerun_calls_run_protocol_with_resume(tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    from verify.claims import largebatch as lb

    calls = []

    def fake_run_protocol(protocol, out, *, progress=False, resume=True, log=print, **kw):
        calls.append((protocol, Path(out), resume))
        done = {(r["seed"], r["batch"]) for r in lb.load_runs(out)}
        rng = np.random.default_rng(3)
        for s in range(protocol.seeds):
            for b in lb.BATCHES:
                if (s, b) not in done:
                    run = t11_run(protocol, s, b, rng)
                    (out / "runs" / f"seed{s}_{b}.json").write_text(json.dumps(run))
        lb.write_outputs(out, protocol, lb.load_runs(out))

    monkeypatch.setattr(lb, "run_protocol", fake_run_protocol)
    preset = get_preset("fmnist", seeds=2)
    folder = tmp_path / "t11"
    t11_folder(folder, preset.protocol, range(1))
    args = ["all", "--preset", "fmnist", "--seeds", "2", "--runs", str(folder), "--out", str(tmp_path / "o")]
    assert main([*args, "--rerun", "--quiet"]) == 0
    assert len(calls) == 1 and calls[0][0] == preset.protocol and calls[0][1:] == (folder, True)
    assert "seed 1 small, seed 1 large" in capsys.readouterr().err
    assert main([*args, "--rerun", "--quiet"]) == 0 and len(calls) == 1, "nothing missing: nothing run"
    # a folder of another protocol is not resumed into: one line, exit 2, nothing run
    other = tmp_path / "other"
    t11_folder(other, replace(preset.protocol, warmup=1), range(1))
    assert main(["all", "--preset", "fmnist", "--runs", str(other), "--rerun", "--quiet"]) == 2
    assert "another protocol (warmup = 1, the preset wants" in capsys.readouterr().err and len(calls) == 1
