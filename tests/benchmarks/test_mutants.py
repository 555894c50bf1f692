"""The mutation-test applier (benchmarks/mutants.py): targets exist exactly once in today's code, a missing or
ambiguous target fails loudly naming the mutant, and a mutated copy really differs. No suite run here."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from benchmarks import mutants
from benchmarks.mutant_list import MUTANTS, Mutant
from benchmarks.mutants import MutantError, apply, check_all, compare, mutated_copy

ROOT = Path(mutants.__file__).resolve().parent.parent


def test_the_list_is_large_unique_and_spans_engine_measures_and_sharpness_core():
    assert len(MUTANTS) >= 18
    assert len({m.id for m in MUTANTS}) == len(MUTANTS)
    files = {m.file for m in MUTANTS}
    for f in ("verify/algorithms.py", "verify/engine.py", "verify/measures.py", "sharpness/xi.py",
              "sharpness/lanczos.py", "sharpness/trace.py", "sharpness/sam.py"):  # fmt: skip
        assert any(x.startswith(f.rsplit(".", 1)[0]) for x in files), f
    assert all(m.description and m.target != m.replacement for m in MUTANTS)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.id)
def test_each_target_occurs_exactly_once_and_the_mutated_file_differs(mutant, tmp_path):
    src = ROOT / mutant.file
    assert src.read_text().count(mutant.target) == 1, f"{mutant.id}: update benchmarks/mutant_list.py"
    (tmp_path / mutant.file).parent.mkdir(parents=True)
    (tmp_path / mutant.file).write_text(src.read_text())
    out = apply(mutant, tmp_path)
    text = out.read_text()
    assert text != src.read_text()
    assert mutant.replacement in text
    assert text == src.read_text().replace(mutant.target, mutant.replacement)


def test_check_all_accepts_todays_code():
    check_all(MUTANTS, ROOT)


def test_missing_or_ambiguous_target_fails_loudly_naming_the_mutant(tmp_path):
    f = tmp_path / "pkg" / "m.py"
    f.parent.mkdir()
    f.write_text("x = 1\nx = 1\ny = 2\n")
    gone = Mutant("gone-target", "pkg/m.py", "z = 3", "z = 4", "a target that is not there")
    twice = Mutant("twice-target", "pkg/m.py", "x = 1", "x = 2", "an ambiguous target")
    nofile = Mutant("no-file", "pkg/none.py", "x", "y", "a file that is not there")
    for mt, why in ((gone, "not found"), (twice, "found 2 times"), (nofile, "does not exist")):
        with pytest.raises(MutantError, match=f"mutant {mt.id}: .*{why}"):
            apply(mt, tmp_path)
        with pytest.raises(MutantError, match=mt.id):
            check_all([mt], tmp_path)
    assert f.read_text() == "x = 1\nx = 1\ny = 2\n"  # untouched


def test_the_command_exits_2_with_one_line_when_a_target_rotted(monkeypatch, capsys):
    rotten = Mutant("rotten", "verify/engine.py", "this text is not in the engine", "x", "rotted")
    monkeypatch.setattr(mutants, "MUTANTS", (*MUTANTS, rotten))
    assert mutants.main(["--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rotten" in err and "not found" in err
    assert mutants.main(["--only", "no-such-mutant", "--list"]) == 2


def test_a_mutated_copy_differs_from_the_baseline_in_exactly_one_file(tmp_path):
    mutant = MUTANTS[0]
    base = mutated_copy(None, tmp_path / "base", ROOT)
    mut = mutated_copy(mutant, tmp_path / "mut", ROOT)
    differing = []

    def walk(cmp: filecmp.dircmp, prefix: str) -> None:
        assert not cmp.left_only and not cmp.right_only
        differing.extend(f"{prefix}{f}" for f in cmp.diff_files)
        for name, sub in cmp.subdirs.items():
            walk(sub, f"{prefix}{name}/")

    walk(filecmp.dircmp(base, mut), "")
    assert differing == [mutant.file]
    assert (base / mutant.file).read_text() == (ROOT / mutant.file).read_text()


def test_compare_counts_a_verdict_change_or_a_new_exit_status_as_caught():
    base = {"rc": 0, "verdicts": {"T0": "PASS", "T10": "NOT SUPPORTED"}}
    same = compare(base, {"rc": 0, "verdicts": dict(base["verdicts"])})
    assert not same["caught"] and not same["changed"]
    flipped = compare(base, {"rc": 1, "verdicts": {"T0": "FAIL", "T10": "NOT SUPPORTED"}})
    assert flipped["caught"] and flipped["changed"] == {"T0": "PASS -> FAIL"}
    crashed = compare(base, {"rc": "timeout", "verdicts": {}})
    assert crashed["caught"] and set(crashed["changed"]) == {"T0", "T10"}
    exit_only = compare(base, {"rc": 1, "verdicts": dict(base["verdicts"])})
    assert exit_only["caught"] and exit_only["exit_differs"]


def test_coverage_selection_runs_only_the_checks_that_run_the_mutated_statement(tmp_path):
    f = tmp_path / "verify" / "m.py"
    f.parent.mkdir()
    f.write_text("def a(x):\n    if x:\n        return (1 +\n                2)\n    return 3\n")
    mt = Mutant("in-a", "verify/m.py", "2)", "5)", "a continuation line of a statement")
    assert mutants.target_line(mt, tmp_path) == 4
    span = mutants.statement_spans(mt, tmp_path)
    assert span == [(3, 4)]  # the whole `return (1 + 2)` statement
    cov = {
        "T0": {"verdict": "PASS", "lines": {"verify/m.py": [1, 2, 5]}},  # a(False): the branch never runs
        "T1": {"verdict": "PASS", "lines": {"verify/m.py": [1, 2, 3], "verify/other.py": [9]}},
        "T2": {"verdict": "PASS", "lines": {}},
    }
    assert mutants.covering(mt, span, cov) == ["T1"]
    timed = Mutant("timed", "verify/stacked.py", "x", "y", "a function picked by timing")
    cov["T2"]["lines"] = {"verify/stacked.py": [200]}
    assert mutants.covering(timed, [(50, 50)], cov) == ["T2"]  # any line run in a timing-dependent file
    # a target over two statements, the first in a branch that never runs: the second one still covers it
    f.write_text("def a(x):\n    if x:\n        y = 1\n    return 3\n")
    two = Mutant("two", "verify/m.py", "        y = 1\n    return 3", "        y = 2\n    return 4", "two")
    assert mutants.statement_spans(two, tmp_path) == [(3, 3), (4, 4)]
    cov2 = {"T0": {"verdict": "PASS", "lines": {"verify/m.py": [1, 2, 4]}}}
    assert mutants.covering(two, mutants.statement_spans(two, tmp_path), cov2) == ["T0"]


def test_compare_on_a_subset_takes_the_runners_exit_rule():
    sub = {"verdicts": {"T4": "PASS"}}
    assert not compare(sub, {"rc": 0, "verdicts": {"T4": "PASS"}})["caught"]
    assert compare(sub, {"rc": 1, "verdicts": {"T4": "PASS"}})["exit_differs"]
    failing = {"verdicts": {"T9": "FAIL"}}
    assert not compare(failing, {"rc": 1, "verdicts": {"T9": "FAIL"}})["caught"]


def test_union_of_sweeps_keeps_every_catch_and_the_checks_run():
    a = [
        {"id": "x", "caught": False, "caught_by": [], "changed": {}, "checks_run": ["T0"]},
        {
            "id": "y",
            "caught": True,
            "caught_by": ["T6"],
            "changed": {"T6": "PASS -> FAIL"},
            "checks_run": "all",
        },
    ]
    b = [{"id": "x", "caught": True, "caught_by": ["T15"], "changed": {"T15": "PASS -> FAIL"},
          "checks_run": ["T15"]},
         {"id": "y", "caught": False, "caught_by": [], "changed": {}, "checks_run": []}]  # fmt: skip
    x, y = mutants.union_rows([a, b])
    assert x["caught"] and x["caught_by"] == ["T15"] and x["checks_run"] == ["T0", "T15"]
    assert y["caught"] and y["caught_by"] == ["T6"] and y["checks_run"] == "all"
