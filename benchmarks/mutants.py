"""Mutation test of the verification suite: does ``dsgd-verify check --quick`` notice a plausible bug?

For each mutant of :mod:`benchmarks.mutant_list` (one single-point bug in the engine, the measurements or the
sharpness core) this copies the packages ``sharpness/``, ``verify/`` and ``figures/`` to a temporary folder,
applies exactly that one replacement, and runs ``python -m verify check --quick --report DIR [--only ...]``
there (``PYTHONPATH`` = the copy, ``OMP_NUM_THREADS=1``). A mutant is *caught* when any check's verdict
differs from the baseline's, or when the suite exits with a status, crashes or times out where the baseline
did not. Prints one row per mutant (the checks that changed verdict) and the kill rate, and writes
``summary.json`` and ``summary.md`` under ``--out``.

    python benchmarks/mutants.py [--only ID,...] [--list] [--jobs N] [--checks T0,T1,...] [--out DIR]
                                 [--select coverage|all] [--timeout S] [--merge OLD/summary.json]
                                 [--combine A/summary.json,B/summary.json]

``--select coverage`` (default): the unmutated suite runs once under a call-only ``sys.settrace``, which
records each check's verdict (the baseline) and the functions of the mutated files it calls; each mutant then
runs only the checks that call the function holding its target (any function of ``verify/stacked.py``,
whose vmap/loop path is chosen by timing). Sound because a check that never executes the mutated code gives
the baseline's verdict (every check is seeded and independent of the others); a mutant no check executes
survives without a run. ``--select all``: every check on every mutant plus an untraced baseline run.
``--merge`` adds the checks that caught each mutant in an earlier sweep (e.g. T0-T12) to this one's (e.g.
``--checks T15``), valid for the same reason; ``--combine`` does the same for finished sweeps without running
anything. A target text that is missing or occurs more than once stops
everything with one line naming the mutant (exit 2): the list cannot silently rot. Cost: one quick suite for
the baseline and, per mutant, the checks that execute it (a whole quick suite is about 60-90 s on a quiet CPU
core). Not part of the default test run.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.mutant_list import MUTANTS, Mutant  # noqa: E402

PACKAGES = ("sharpness", "verify", "figures")
BASELINE = "baseline"


class MutantError(RuntimeError):
    """A mutant that cannot be applied (target text missing or ambiguous); the message names it."""


def copy_packages(dest: Path, root: Path = ROOT) -> Path:
    """Copy ``sharpness/``, ``verify/``, ``figures/`` (no caches) from ``root`` into ``dest``; returns it."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "out", ".pytest_cache")
    for pkg in PACKAGES:
        shutil.copytree(root / pkg, dest / pkg, ignore=ignore)
    return dest


def apply(mutant: Mutant, tree: Path) -> Path:
    """Replace ``mutant.target`` by ``mutant.replacement`` in ``tree / mutant.file``; it must occur exactly
    once (else :class:`MutantError` naming the mutant). Returns the mutated file."""
    path = tree / mutant.file
    if not path.is_file():
        raise MutantError(f"mutant {mutant.id}: file {mutant.file} does not exist")
    text = path.read_text()
    n = text.count(mutant.target)
    if n != 1:
        where = "not found" if n == 0 else f"found {n} times"
        raise MutantError(
            f"mutant {mutant.id}: target text {where} in {mutant.file} (update benchmarks/mutant_list.py)"
        )
    path.write_text(text.replace(mutant.target, mutant.replacement, 1))
    return path


def mutated_copy(mutant: Mutant | None, dest: Path, root: Path = ROOT) -> Path:
    """A copy of the packages under ``dest`` with ``mutant`` applied (None: the unmutated baseline)."""
    copy_packages(dest, root)
    if mutant is not None:
        apply(mutant, dest)
    return dest


def check_all(mutants: tuple[Mutant, ...] | list[Mutant], root: Path = ROOT) -> None:
    """Raise :class:`MutantError` for the first mutant whose target is not in ``root``'s code exactly once,
    or whose id repeats. Cost: reads the files."""
    seen: set[str] = set()
    for mt in mutants:
        if mt.id in seen:
            raise MutantError(f"mutant {mt.id}: duplicate id")
        seen.add(mt.id)
        if mt.target == mt.replacement:
            raise MutantError(f"mutant {mt.id}: replacement equals the target")
        path = root / mt.file
        if not path.is_file():
            raise MutantError(f"mutant {mt.id}: file {mt.file} does not exist")
        n = path.read_text().count(mt.target)
        if n != 1:
            where = "not found" if n == 0 else f"found {n} times"
            raise MutantError(f"mutant {mt.id}: target text {where} in {mt.file}")


def run_suite(tree: Path, report: Path, checks: str | None, timeout: float) -> dict[str, Any]:
    """``python -m verify check --quick --report REPORT [--only CHECKS]`` with PYTHONPATH=tree; returns the
    exit status, the verdict per check (from report.json), the wall time and the tail of stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "verify", "check", "--quick", "--report", str(report)]
    if checks:
        cmd += ["--only", checks]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, err = (
            "timeout",
            (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else "",
        )
    wall = time.perf_counter() - t0
    verdicts: dict[str, str] = {}
    notes: dict[str, str] = {}
    rj = report / "report.json"
    if rj.is_file():
        try:
            data = json.loads(rj.read_text())
            for r in data["checks"]:
                verdicts[r["id"]] = r["verdict"]
                if r.get("notes"):
                    notes[r["id"]] = str(r["notes"][0])[:160]
        except (ValueError, KeyError, TypeError):
            verdicts = {}
    tail = "\n".join(line for line in err.splitlines() if "it/s" not in line and "s/it" not in line)[-600:]
    return {"rc": rc, "verdicts": verdicts, "notes": notes, "wall_s": round(wall, 1), "stderr_tail": tail}


def compare(base: dict[str, Any], mut: dict[str, Any]) -> dict[str, Any]:
    """Which of the baseline's checks changed verdict, and whether the exit status differs (``base["rc"]``,
    or when absent the runner's rule: 1 if a baseline verdict is FAIL, else 0)."""
    changed = {
        cid: f"{v} -> {mut['verdicts'].get(cid, 'missing')}"
        for cid, v in base["verdicts"].items()
        if mut["verdicts"].get(cid) != v
    }
    base_rc = base.get("rc", 1 if "FAIL" in base["verdicts"].values() else 0)
    exit_differs = mut["rc"] != base_rc and not changed
    return {"changed": changed, "exit_differs": exit_differs, "caught": bool(changed) or mut["rc"] != base_rc}


# The coverage run (a child process in a copy of the tree): each check's verdict and seconds, and the lines
# of the mutated files it executes (``sys.settrace``; line events only inside those files).
TRACER = """
import json, sys
from verify.claims.base import Context
from verify.claims.runner import execute, select_checks
out, only, files = sys.argv[1], sys.argv[2] or None, set(sys.argv[3:])
checks, _ = select_checks(only, False)
result = {}
for cls in checks:
    lines = set()
    def local(frame, event, arg, lines=lines):
        if event == "line":
            lines.add((frame.f_code.co_filename, frame.f_lineno))
        return local
    def trace(frame, event, arg):
        if frame.f_code.co_filename in files:
            lines.add((frame.f_code.co_filename, frame.f_code.co_firstlineno))
            return local
        return None
    sys.settrace(trace)
    try:
        res = execute(cls, Context(quick=True, seed=0))
    finally:
        sys.settrace(None)
    by_file = {}
    for f, n in lines:
        by_file.setdefault(f, []).append(n)
    result[cls.id] = {"verdict": res.verdict, "seconds": res.seconds,
                      "lines": {f: sorted(v) for f, v in by_file.items()}}
json.dump(result, open(out, "w"))
"""
# A mutant's checks in one process, one at a time, stopping at the first verdict that differs from the
# baseline's.
STAGED = """
import json, sys
from verify.claims.base import Context
from verify.claims.registry import get
from verify.claims.runner import execute
out, base = sys.argv[1], json.loads(sys.argv[2])
result = {}
for cid, verdict in base.items():
    res = execute(get(cid), Context(quick=True, seed=0))
    result[cid] = {"verdict": res.verdict, "note": (res.notes or [""])[0][:160], "seconds": res.seconds}
    json.dump(result, open(out, "w"))
    if res.verdict != verdict:
        break
"""
#: files whose functions are picked by timing (``choose_execution``): a line run in the file covers all of it
TIMING_DEPENDENT = ("verify/stacked.py",)


def target_line(mutant: Mutant, tree: Path) -> int:
    """The 1-based line where the mutant's target starts in ``tree``."""
    text = (tree / mutant.file).read_text()
    return text[: text.index(mutant.target)].count("\n") + 1


def statement_spans(mutant: Mutant, tree: Path) -> list[tuple[int, int]]:
    """For each line of the mutant's target, the lines ``[first, last]`` of the innermost statement holding it
    (``ast``): the mutated code runs only if some line of one of those statements runs (a continuation line
    of a long statement may emit no line event of its own; a target spanning two statements, one of them in
    a branch, is covered by either)."""
    text = (tree / mutant.file).read_text()
    first = target_line(mutant, tree)
    stmts = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.stmt)]
    spans = []
    for line in range(first, first + mutant.target.count("\n") + 1):
        best = (1, len(text.splitlines()))
        for node in stmts:
            last = node.end_lineno or node.lineno
            if node.lineno <= line <= last and last - node.lineno <= best[1] - best[0]:
                best = (node.lineno, last)
        spans.append(best)
    return spans


def trace_checks(tree: Path, checks: str | None, files: list[str], timeout: float) -> dict[str, Any]:
    """Run the quick checks once, unmutated, in ``tree`` under the line tracer: ``{id: {"verdict",
    "seconds", "lines": {file: [line, ...]}}}`` with files relative to ``tree``. Cost: one quick suite plus
    a Python call per line run in the traced files."""
    out = tree.parent / "coverage.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    absolute = [str((tree / f).resolve()) for f in files]
    cmd = [sys.executable, "-c", TRACER, str(out), checks or "", *absolute]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        raise MutantError(
            f"the coverage run of the baseline failed (rc {proc.returncode}): {proc.stderr[-400:]}"
        )
    data = json.loads(out.read_text())
    root = str(tree.resolve()) + os.sep
    for entry in data.values():
        entry["lines"] = {f.removeprefix(root): v for f, v in entry["lines"].items()}
    return data


def covering(mutant: Mutant, spans: list[tuple[int, int]], coverage: dict[str, Any]) -> list[str]:
    """The checks that run a line of a statement in ``spans`` (those holding the mutant's target; any line of
    a timing-dependent file): only their verdicts can change, the others never execute the mutated code."""
    out = []
    for cid, entry in coverage.items():
        ran = entry["lines"].get(mutant.file, [])
        hit = any(a <= n <= b for n in ran for a, b in spans)
        if ran and (mutant.file in TIMING_DEPENDENT or hit):
            out.append(cid)
    return out


def one(mutant: Mutant | None, work: Path, checks: str | None, timeout: float, root: Path) -> dict[str, Any]:
    """Copy ``root``'s packages, apply ``mutant`` (None: baseline), run the suite; the copy is removed."""
    name = BASELINE if mutant is None else mutant.id
    tree = mutated_copy(mutant, work / name / "src", root)
    res = run_suite(tree, work / name / "report", checks, timeout)
    shutil.rmtree(tree, ignore_errors=True)
    return res


def one_staged(
    mutant: Mutant, work: Path, base: dict[str, str], timeout: float, root: Path
) -> dict[str, Any]:
    """``--stop-at-first``: the checks of ``base`` (id -> baseline verdict, in that order) one at a time in
    ONE process on one mutated copy, stopping at the first verdict that differs. A crash or a timeout counts
    as caught. Returns the result with ``checks_done``."""
    tree = mutated_copy(mutant, work / mutant.id / "src", root)
    out = work / mutant.id / "staged.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-c", STAGED, str(out), json.dumps(base)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        rc, err = "timeout", ""
    done = json.loads(out.read_text()) if out.is_file() else {}
    shutil.rmtree(tree, ignore_errors=True)
    verdicts = {k: v["verdict"] for k, v in done.items()}
    notes = {k: v["note"] for k, v in done.items()}
    if rc != 0 and len(done) < len(base):  # the child crashed or timed out inside the next check
        nxt = list(base)[len(done)]
        verdicts[nxt], notes[nxt] = f"CRASH ({rc})", "\n".join(err.splitlines()[-3:])[-160:]
    tail = "\n".join(line for line in err.splitlines() if "it/s" not in line)[-600:]
    return {
        "rc": 1 if any(v == "FAIL" or v.startswith("CRASH") for v in verdicts.values()) else 0,
        "verdicts": verdicts, "notes": notes, "wall_s": round(time.perf_counter() - t0, 1),
        "stderr_tail": tail, "checks_done": list(verdicts),
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| mutant | bug | checks run | caught by | verdict changes |", "|---|---|---|---|---|"]
    for r in rows:
        run = r.get("checks_run", "all")
        run = "all" if run == "all" else (", ".join(run) or "none executes it")
        by = ", ".join(r["caught_by"]) or ("exit status" if r["caught"] else "SURVIVED")
        ch = "; ".join(f"{k}: {v}" for k, v in r["changed"].items()) or (
            f"rc {r['rc']}" if r["caught"] else "-"
        )
        lines.append(f"| {r['id']} | {r['description']} | {run} | {by} | {ch} |")
    return "\n".join(lines)


def summarise(results: list[dict[str, Any]]) -> str:
    caught = sum(r["caught"] for r in results)
    n = len(results)
    rate = 100.0 * caught / n if n else float("nan")
    surv = [r["id"] for r in results if not r["caught"]]
    return f"killed {caught} of {n} mutants ({rate:.0f} %); survivors: {', '.join(surv) or 'none'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, metavar="IDS", help="comma-separated mutant ids")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--jobs", type=int, default=1, help="suites run in parallel (default 1)")
    p.add_argument("--checks", default=None, metavar="IDS", help="run only these checks (--only of check)")
    p.add_argument("--out", default="reports/mutants", metavar="DIR", help="default: reports/mutants")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per suite run (default 1800)")
    p.add_argument("--merge", default=None, metavar="JSON", help="an earlier summary.json to add to this one")
    p.add_argument(
        "--combine", default=None, metavar="JSON,JSON",
        help="run nothing: the union of earlier summary.json files (e.g. T0-T12 and T15 sweeps) into --out",
    )  # fmt: skip
    p.add_argument(
        "--coverage", default=None, metavar="JSON",
        help="reuse the coverage.json of an earlier sweep (same code) instead of the traced baseline run",
    )  # fmt: skip
    p.add_argument(
        "--stop-at-first", action="store_true",
        help="with coverage: run a mutant's checks one at a time, fastest first, and stop at the first catch "
        "(cheaper on a busy machine; 'caught by' then names that check only)",
    )  # fmt: skip
    p.add_argument(
        "--select", choices=("coverage", "all"), default="coverage",
        help="coverage (default): run on each mutant only the checks that call the mutated function, found "
        "by one traced baseline run; all: every check on every mutant, plus an untraced baseline",
    )  # fmt: skip
    args = p.parse_args(argv)
    try:
        check_all(MUTANTS)
        chosen = list(MUTANTS)
        if args.only:
            want = [s.strip() for s in args.only.split(",") if s.strip()]
            known = {m.id: m for m in MUTANTS}
            bad = [w for w in want if w not in known]
            if bad:
                raise MutantError(f"unknown mutant id(s) {', '.join(bad)}; see --list")
            chosen = [known[w] for w in want]
        if args.jobs < 1:
            raise MutantError(f"--jobs must be >= 1, got {args.jobs}")
        merged = json.loads(Path(args.merge).read_text()) if args.merge else None
        combined = [json.loads(Path(f).read_text()) for f in (args.combine or "").split(",") if f]
    except (MutantError, OSError, ValueError) as exc:
        print(f"mutants: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.id:<28} {m.file:<24} {m.description}")
        return 0
    if combined:
        sweeps = [[r for r in doc["mutants"] if r["id"] in {m.id for m in chosen}] for doc in combined]
        extra = {"combined_from": args.combine.split(","), "checks": [doc["checks"] for doc in combined]}
        write_summary(Path(args.out), union_rows(sweeps), argv, extra, 0.0)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    raw: dict[str, dict[str, Any]] = {}
    selected: dict[str, list[str] | None] = {}
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        work = Path(tmp)
        # one snapshot of today's code: edits made while the sweep runs do not leak into later mutants
        snapshot = copy_packages(work / "pristine")
        if args.select == "coverage":
            try:
                if args.coverage:
                    cov = json.loads(Path(args.coverage).read_text())
                else:
                    cov = trace_checks(
                        copy_packages(work / "trace" / "src", snapshot), args.checks,
                        sorted({m.file for m in chosen}), args.timeout,
                    )  # fmt: skip
            except (MutantError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
                print(f"mutants: {exc}", file=sys.stderr)
                return 1
            out.mkdir(parents=True, exist_ok=True)
            (out / "coverage.json").write_text(json.dumps(cov) + "\n")
            if args.checks:
                want = {c.strip() for c in args.checks.split(",")}
                cov = {k: v for k, v in cov.items() if k in want}
            base = {"verdicts": {cid: e["verdict"] for cid, e in cov.items()}, "coverage": True}
            print(f"  {BASELINE:<28} (coverage run) {base['verdicts']}", flush=True)
            for m in chosen:
                selected[m.id] = covering(m, statement_spans(m, snapshot), cov)
        else:
            selected = {m.id: None for m in chosen}
        jobs: list[Mutant | None] = ([] if args.select == "coverage" else [None]) + [
            m for m in chosen if selected[m.id] != []
        ]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {}
            for m in jobs:
                if m is not None and args.stop_at_first and selected[m.id]:
                    order = sorted(selected[m.id], key=lambda c: cov[c].get("seconds", 0.0))
                    verdicts = {c: base["verdicts"][c] for c in order}
                    futures[m.id] = pool.submit(one_staged, m, work, verdicts, args.timeout, snapshot)
                    continue
                ids = args.checks if m is None or selected[m.id] is None else ",".join(selected[m.id])
                futures[m.id if m else BASELINE] = pool.submit(one, m, work, ids, args.timeout, snapshot)
            for name, fut in futures.items():
                raw[name] = fut.result()
                r = raw[name]
                print(f"  {name:<28} rc={r['rc']} {r['wall_s']:>6.1f} s  {r['verdicts']}", flush=True)
    if args.select == "all":
        base = raw[BASELINE]
        if base["rc"] not in (0, 1) or not base["verdicts"]:
            print(f"mutants: the baseline suite did not run (rc {base['rc']}):\n{base['stderr_tail']}",
                  file=sys.stderr)  # fmt: skip
            return 1
    none = {"rc": 0, "verdicts": {}, "notes": {}, "wall_s": 0.0, "stderr_tail": ""}
    rows = []
    for m in chosen:
        ids, res = selected[m.id], raw.get(m.id, none)
        if ids and "checks_done" in res:
            ids = res["checks_done"]
        sub = base if ids is None else {"verdicts": {k: base["verdicts"][k] for k in ids}}
        c = compare(sub, res) if ids != [] else {"changed": {}, "exit_differs": False,
                                                                   "caught": False}  # fmt: skip
        rows.append({
            "id": m.id, "file": m.file, "description": m.description, "caught": c["caught"],
            "caught_by": sorted(c["changed"]), "changed": c["changed"], "rc": res["rc"],
            "exit_differs": c["exit_differs"], "wall_s": res["wall_s"],
            "checks_run": "all" if ids is None else ids,
            "notes": {k: res["notes"].get(k) for k in c["changed"]},
            "stderr_tail": res["stderr_tail"] if res["rc"] not in (0, 1) else "",
        })  # fmt: skip
    if merged:
        rows = union_rows([merged["mutants"], rows])
    extra = {"checks": args.checks or "all quick checks", "merged_from": args.merge, "baseline": base}
    write_summary(out, rows, argv, extra, time.perf_counter() - t0)
    return 0


def union_rows(sweeps: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per mutant id (first sweep's order), the union over sweeps of the checks run and the verdict changes;
    caught if any sweep caught it."""
    rows: dict[str, dict[str, Any]] = {}
    for sweep in sweeps:
        for r in sweep:
            cur = rows.get(r["id"])
            if cur is None:
                rows[r["id"]] = {**r, "changed": dict(r["changed"]), "notes": dict(r.get("notes", {}))}
                continue
            cur["changed"].update(r["changed"])
            cur["notes"].update(r.get("notes", {}))
            cur["caught"] = bool(cur["caught"] or r["caught"])
            cur["caught_by"] = sorted(cur["changed"])
            runs = [cur.get("checks_run", "all"), r.get("checks_run", "all")]
            cur["checks_run"] = "all" if "all" in runs else sorted(set(runs[0]) | set(runs[1]))
    return list(rows.values())


def write_summary(
    out: Path, rows: list[dict[str, Any]], argv: list[str] | None, extra: dict[str, Any], wall: float
) -> None:
    """Print the table and the kill rate; write ``summary.json`` and ``summary.md`` under ``out``."""
    line = summarise(rows)
    text = table(rows)
    print(text)
    print(line)
    summary = {
        "command": "python benchmarks/mutants.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **extra,
        "mutants": rows,
        "killed": sum(r["caught"] for r in rows),
        "total": len(rows),
        "summary": line,
        "wall_s": round(wall, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(f"# Mutation test\n\n{text}\n\n{line}\n")
    print(f"written: {out / 'summary.json'}, {out / 'summary.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
