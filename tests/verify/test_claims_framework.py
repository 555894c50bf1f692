"""The claims framework: verdict rule, results, registry, log-log fits, report files, runner."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from verify.claims import base, registry, report, runner
from verify.claims.base import NO_DISCRIMINATION, Check, CheckResult, ClaimsError, Context, decide_verdict
from verify.claims.fitting import local_slopes, loglog_fit


# ----------------------------------------------------------------------------- verdict rule
@pytest.mark.parametrize(
    "asserted, holds, other_way, supported, verdict",
    [
        (True, True, True, None, "PASS"),
        (True, False, True, None, "FAIL"),
        (True, True, False, None, "FAIL"),
        (True, False, False, None, "FAIL"),
        (True, True, True, False, "NOT SUPPORTED"),
        (True, False, True, False, "FAIL"),
        (False, False, False, None, "REPORTED"),
        (False, True, True, None, "REPORTED"),
        (False, True, True, False, "NOT SUPPORTED"),
    ],
)
def test_verdict_rule(asserted, holds, other_way, supported, verdict):
    got, notes = decide_verdict(
        asserted=asserted,
        criterion_holds=holds,
        control_came_out_other_way=other_way,
        paper_reading_supported=supported,
    )
    assert got == verdict
    assert (NO_DISCRIMINATION in notes) == (not other_way)


class Fake(Check):
    id = "T98"
    title = "fake"
    claim = "a claim"
    source = "nowhere"
    status = "derived"
    evidence = "derived law"
    prediction = "slope 2"
    criterion = "slope in [1.8, 2.2]"
    control = "a control"
    outcome = (True, True)

    def run(self, ctx: Context) -> CheckResult:
        holds, other = self.outcome
        return self.result(
            measured={"slope": np.float64(2.0)},
            criterion_holds=holds,
            control_measured={"slope": 1.0},
            control_came_out_other_way=other,
            series={"curve": {"x": np.arange(3), "y": [1.0, 2.0, 4.0]}},
            settings={"grid": [1, 2, 3]},
        )


def test_control_that_does_not_fail_makes_the_check_fail():
    class Blind(Fake):
        outcome = (True, False)

    r = Blind().run(Context())
    assert r.verdict == "FAIL"
    assert r.notes == ["control did not fail: the check cannot discriminate"]
    assert r.control.came_out_other_way is False
    assert Fake().run(Context()).verdict == "PASS"


def test_result_validation():
    r = Fake().run(Context())
    assert r.measured == {"slope": 2.0} and isinstance(r.measured["slope"], float)
    assert r.series["curve"] == {"x": [0, 1, 2], "y": [1.0, 2.0, 4.0]}
    with pytest.raises(ClaimsError, match="unequal length"):
        Fake().result(
            measured={},
            criterion_holds=True,
            control_measured={},
            control_came_out_other_way=True,
            series={"bad": {"x": [1, 2], "y": [1]}},
        )
    with pytest.raises(ClaimsError, match="verdict"):
        CheckResult(**{**r.__dict__, "verdict": "MAYBE"})


def test_context_pick_and_seeded_streams():
    q, f = Context(quick=True, seed=3), Context(quick=False, seed=3)
    assert q.pick(1, 2) == 1 and f.pick(1, 2) == 2 and q.mode == "quick"
    import torch

    assert torch.equal(torch.rand(3, generator=q.generator(1)), torch.rand(3, generator=f.generator(1)))
    assert not torch.equal(torch.rand(3, generator=q.generator(1)), torch.rand(3, generator=q.generator(2)))


def test_fmt():
    assert [base.fmt(v) for v in (2.0, 0.0123, 1.234e-9, 0, True)] == [
        "2.00",
        "0.0123",
        "1.23e-09",
        "0",
        "True",
    ]


# ----------------------------------------------------------------------------- registry
@pytest.fixture
def empty_registry(monkeypatch):
    monkeypatch.setattr(registry, "_CHECKS", {})
    monkeypatch.setattr(registry, "_DISCOVERED", True)
    return registry


def make_check(check_id: str, **attrs):
    return type(f"C{check_id}", (Fake,), {"id": check_id, **attrs})


def test_registry_order_lookup_and_errors(empty_registry):
    for cid in ("T10", "T1b", "T2", "T1", "T0", "T1c"):
        registry.register(make_check(cid))
    assert [c.id for c in registry.all_checks()] == ["T0", "T1", "T1b", "T1c", "T2", "T10"]
    assert registry.get("t1B").id == "T1b"
    with pytest.raises(ClaimsError, match="unknown check id 'T7'"):
        registry.get("T7")
    with pytest.raises(ClaimsError, match="duplicate"):
        registry.register(type("Other", (Fake,), {"id": "T2"}))
    with pytest.raises(ClaimsError, match="must look like"):
        registry.register(make_check("X1"))
    with pytest.raises(ClaimsError, match="status"):
        registry.register(make_check("T3", status="likely"))
    with pytest.raises(ClaimsError, match="'control'"):
        registry.register(make_check("T4", control=""))


def test_real_checks_are_discovered():
    ids = [c.id for c in registry.all_checks()]
    for cid in ("T0", "T1", "T1b", "T1c", "T4", "T8", "T12"):
        assert cid in ids
    assert ids == sorted(ids, key=registry.sort_key)


# ----------------------------------------------------------------------------- fitting
def test_loglog_fit_exact_and_noisy():
    x = np.logspace(-3, 0, 7)
    fit = loglog_fit(x, 3.0 * x**2.5)
    assert fit.slope == pytest.approx(2.5, abs=1e-12) and fit.stderr < 1e-12
    assert np.exp(fit.intercept) == pytest.approx(3.0)
    y = x**2 * np.exp(np.random.default_rng(0).normal(0, 0.1, x.size))
    ref = stats.linregress(np.log(x), np.log(y))
    fit = loglog_fit(x, y)
    assert (fit.slope, fit.stderr) == (pytest.approx(ref.slope), pytest.approx(ref.stderr))
    assert fit.stderr > 0 and fit.within(1.5, 2.5)
    assert loglog_fit([1, 2], [1, 8]).slope == pytest.approx(3)
    assert local_slopes([1, 10, 100], [1, 100, 1e3]) == pytest.approx([2, 1])


@pytest.mark.parametrize(
    "x, y, match",
    [
        ([1, 2], [1, -1], "y > 0"),
        ([1], [1], "at least 2"),
        ([2, 2], [1, 3], "distinct"),
        ([1, 2], [1], "lengths"),
    ],
)
def test_loglog_fit_errors(x, y, match):
    with pytest.raises(ClaimsError, match=match):
        loglog_fit(x, y)


# ----------------------------------------------------------------------------- report
def test_report_files(tmp_path):
    r = Fake().run(Context())
    r.seconds = 0.5
    (tmp_path / "T98_stale.csv").write_text("old\n")
    (tmp_path / "T5_other.csv").write_text("kept\n")
    paths = report.write_report([r], tmp_path, {"mode": "quick", "seed": 0})
    assert set(paths) == {"report.json", "report.md", "T98_curve.csv"}
    doc = json.loads((tmp_path / "report.json").read_text())
    assert set(doc) == {"checks", "settings"} and doc["settings"] == {"mode": "quick", "seed": 0}
    (check,) = doc["checks"]
    for key in ("id", "claim", "prediction", "measured", "criterion", "control", "verdict", "seconds"):
        assert key in check
    assert set(check["control"]) == {"description", "measured", "came_out_other_way"}
    assert check["control"]["came_out_other_way"] is True and check["verdict"] == "PASS"
    assert check["series"] == {"curve": "T98_curve.csv"}
    assert (tmp_path / "T98_curve.csv").read_text() == "x,y\n0,1.0\n1,2.0\n2,4.0\n"
    assert not (tmp_path / "T98_stale.csv").exists() and (tmp_path / "T5_other.csv").exists()
    md = (tmp_path / "report.md").read_text()
    assert "| T98 |" in md and "## T98: fake" in md and "came out the other way | True" in md


def test_table_fits_100_columns():
    long = make_check("T97", criterion="word " * 60, title="a long title " * 5)
    rows = [Fake().run(Context()), long().run(Context())]
    text = report.format_table(rows, width=100)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "PASS" in text and "T97" in text and "2 checks: 2 PASS, 0 FAIL" in text


# ----------------------------------------------------------------------------- runner
def parse(argv):
    p = argparse.ArgumentParser()
    runner.add_arguments(p)
    return p.parse_args(argv)


def test_arguments():
    a = parse([])
    assert (a.full, a.only, a.seed, a.device, a.report, a.list) == (
        False,
        None,
        0,
        "auto",
        "reports/latest",
        False,
    )
    assert parse(["--full", "--only", "T1,T6", "--seed", "3"]).full is True
    with pytest.raises(SystemExit):
        parse(["--quick", "--full"])


def test_main_exit_status_and_selection(empty_registry, tmp_path, capsys):
    class Boom(Fake):
        id = "T96"

        def run(self, ctx):
            raise RuntimeError("kaput")

    registry.register(Fake)
    registry.register(make_check("T95", full_only=True))
    assert runner.main(parse(["--report", str(tmp_path), "--device", "cpu"])) == 0
    out = capsys.readouterr().out
    assert "T98" in out and "T95" not in out.split("skipped")[0] and "skipped in --quick" in out
    assert runner.main(parse(["--only", "T95", "--report", str(tmp_path), "--device", "cpu"])) == 0

    registry.register(make_check("T94", outcome=(True, False)))
    assert runner.main(parse(["--only", "T94", "--report", str(tmp_path), "--device", "cpu"])) == 1

    registry.register(Boom)
    assert runner.main(parse(["--only", "T96", "--report", str(tmp_path), "--device", "cpu"])) == 1
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["checks"][0]["verdict"] == "FAIL" and "kaput" in doc["checks"][0]["notes"][0]

    assert runner.main(parse(["--only", "T7", "--report", str(tmp_path)])) == 2
    assert "unknown check id" in capsys.readouterr().err
    assert runner.main(parse(["--list"])) == 0
    assert "T96" in capsys.readouterr().out


def test_python_dash_m_lists_the_checks():
    out = subprocess.run(
        [sys.executable, "-m", "verify.claims", "--list"], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[0].startswith("T0 ")
    assert "T12" in out
