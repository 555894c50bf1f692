"""Mutation test of the verification suite: does ``dsgd-verify check --quick`` notice a plausible bug?

For each mutant of :mod:`benchmarks.mutant_list` (one single-point bug in the engine, the measurements or the
sharpness core) this copies the packages ``sharpness/``, ``verify/`` and ``figures/`` to a temporary folder,
applies exactly that one replacement, and runs ``python -m verify check --quick --report DIR`` there
(``PYTHONPATH`` = the copy, ``OMP_NUM_THREADS=1``). The unmutated copy is run the same way as the baseline. A
mutant is *caught* when any check's verdict differs from the baseline's, or when the suite exits with a
status, crashes or times out where the baseline did not. Prints one row per mutant (the checks that changed
verdict) and the kill rate, and writes ``summary.json`` and ``summary.md`` under ``--out``.

    python benchmarks/mutants.py [--only ID,...] [--list] [--jobs N] [--checks T0,T1,...] [--out DIR]
                                 [--timeout S] [--merge OLD/summary.json]

``--merge`` adds the checks that caught each mutant in an earlier sweep (e.g. all checks) to this one's (e.g.
``--checks T15``): valid because every check runs on its own seeded protocol, so a check's verdict does not
depend on which other checks ran. A target text that is missing or occurs more than once stops everything
with one line naming the mutant (exit 2): the list cannot silently rot. Cost: one quick suite per mutant plus
one for the baseline (about 60-90 s each on a quiet CPU core). Not part of the default test run.
"""

from __future__ import annotations

import argparse
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
    """Which checks changed verdict against the baseline, and whether the suite's exit/crash differs."""
    changed = {
        cid: f"{v} -> {mut['verdicts'].get(cid, 'missing')}"
        for cid, v in base["verdicts"].items()
        if mut["verdicts"].get(cid) != v
    }
    exit_differs = mut["rc"] != base["rc"] and not changed
    return {
        "changed": changed,
        "exit_differs": exit_differs,
        "caught": bool(changed) or mut["rc"] != base["rc"],
    }


def one(mutant: Mutant | None, work: Path, checks: str | None, timeout: float, root: Path) -> dict[str, Any]:
    """Copy ``root``'s packages, apply ``mutant`` (None: baseline), run the suite; the copy is removed."""
    name = BASELINE if mutant is None else mutant.id
    tree = mutated_copy(mutant, work / name / "src", root)
    res = run_suite(tree, work / name / "report", checks, timeout)
    shutil.rmtree(tree, ignore_errors=True)
    return res


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| mutant | bug | caught by | verdict changes |", "|---|---|---|---|"]
    for r in rows:
        by = ", ".join(r["caught_by"]) or ("exit status" if r["caught"] else "SURVIVED")
        ch = "; ".join(f"{k}: {v}" for k, v in r["changed"].items()) or (
            f"rc {r['rc']}" if r["caught"] else "-"
        )
        lines.append(f"| {r['id']} | {r['description']} | {by} | {ch} |")
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
    except (MutantError, OSError, ValueError) as exc:
        print(f"mutants: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.id:<28} {m.file:<24} {m.description}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        work = Path(tmp)
        # one snapshot of today's code: edits made while the sweep runs do not leak into later mutants
        snapshot = copy_packages(work / "pristine")
        jobs: list[Mutant | None] = [None, *chosen]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {
                (m.id if m else BASELINE): pool.submit(one, m, work, args.checks, args.timeout, snapshot)
                for m in jobs
            }
            raw: dict[str, dict[str, Any]] = {}
            for name, fut in futures.items():
                raw[name] = fut.result()
                r = raw[name]
                print(f"  {name:<28} rc={r['rc']} {r['wall_s']:>6.1f} s  {r['verdicts']}", flush=True)
    base = raw[BASELINE]
    if base["rc"] not in (0, 1) or not base["verdicts"]:
        print(
            f"mutants: the baseline suite did not run (rc {base['rc']}):\n{base['stderr_tail']}",
            file=sys.stderr,
        )
        return 1
    old = {r["id"]: r for r in merged["mutants"]} if merged else {}
    rows = []
    for m in chosen:
        c = compare(base, raw[m.id])
        prev = old.get(m.id, {})
        changed = {**prev.get("changed", {}), **c["changed"]}
        caught = c["caught"] or bool(prev.get("caught"))
        rows.append({
            "id": m.id, "file": m.file, "description": m.description, "caught": caught,
            "caught_by": sorted(changed), "changed": changed, "rc": raw[m.id]["rc"],
            "exit_differs": c["exit_differs"], "wall_s": raw[m.id]["wall_s"],
            "notes": {k: raw[m.id]["notes"].get(k) for k in c["changed"]},
            "stderr_tail": raw[m.id]["stderr_tail"] if raw[m.id]["rc"] not in (0, 1) else "",
        })  # fmt: skip
    line = summarise(rows)
    text = table(rows)
    print(text)
    print(line)
    summary = {
        "command": "python benchmarks/mutants.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "checks": args.checks or "all quick checks",
        "merged_from": args.merge,
        "baseline": base,
        "mutants": rows,
        "killed": sum(r["caught"] for r in rows),
        "total": len(rows),
        "summary": line,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(f"# Mutation test\n\n{text}\n\n{line}\n")
    print(f"written: {out / 'summary.json'}, {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
