"""The benchmark helpers: interleaved medians, peak-memory instruments, JSON children, the report table."""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks import _timing
from benchmarks._timing import interleaved, median, peak_rss_increase, run_json_child

MiB = 2**20


def test_interleaved_runs_rounds_in_turn_and_skips_warmup():
    calls: list[tuple[str, int]] = []
    fns = {name: (lambda r, name=name: calls.append((name, r)) or r) for name in ("a", "b")}
    times, results = interleaved(fns, repeats=3, warmup=1)
    assert calls == [("a", -1), ("b", -1), ("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert results == {"a": [0, 1, 2], "b": [0, 1, 2]}
    assert all(len(t) == 3 and min(t) >= 0 for t in times.values())
    with pytest.raises(ValueError):
        interleaved(fns, repeats=0)


def test_median():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([]) != median([])  # nan


def _alloc_64mib() -> None:
    t = torch.ones(16 * MiB, dtype=torch.float32)  # 64 MiB, every page touched
    assert float(t[-1]) == 1.0
    del t


def test_peak_rss_sees_a_transient_allocation():
    nbytes, method = peak_rss_increase(_alloc_64mib)
    assert 60 * MiB <= nbytes <= 100 * MiB, (nbytes / MiB, method)
    small, _ = peak_rss_increase(lambda: None)
    assert small < 8 * MiB


def test_peak_rss_psutil_fallback(monkeypatch):
    pytest.importorskip("psutil")
    monkeypatch.setattr(_timing, "_hwm_resettable", lambda: False)

    def slow_alloc() -> None:
        t = torch.ones(16 * MiB, dtype=torch.float32)
        time.sleep(0.05)  # long enough for the 1 ms sampler
        del t

    nbytes, method = peak_rss_increase(slow_alloc)
    assert method == "psutil-1ms"
    assert 60 * MiB <= nbytes <= 100 * MiB


def test_run_json_child_parses_last_line_and_reports_failure():
    out = run_json_child(["-c", "print('noise'); import json; print(json.dumps({'x': 2}))"])
    assert out == {"x": 2}
    with pytest.raises(RuntimeError, match="boom"):
        run_json_child(["-c", "raise SystemExit('boom')"])


def test_report_rows_compute_ratios_and_verdicts():
    from benchmarks import bench_sharpness as bs

    r = {
        "num_params": 1000,
        "hvp": dict(gradient=0.1, matvec=0.14, matmat_default=0.16, matmat_chunk8=0.3, matmat_func8=0.35,
                    pyhessian_hvp=0.14, default_chunk=1),
        "trace": dict(ours_s=10.0, pyhessian_s=20.0, ours_value=(5.0, 0.1, 100),
                      pyhessian_value=(5.1, 0.1, 100)),
        "eig": {"top1": dict(s=1.0, n_hvp=16, n_iter=15, max_rel_err=1e-6),
                "top5": dict(s=4.0, n_hvp=61, n_iter=56, max_rel_err=1e-6),
                "pyhessian": dict(s=10.0, n_hvp=100, max_rel_err=1e-2)},
        "memory": dict(gradient=100 * MiB, trace=250 * MiB, pyhessian_trace=200 * MiB, method="VmHWM"),
    }  # fmt: skip
    rows = {row[1]: row for row in bs.rows_for("cnn", "cpu", r)}
    assert rows["one HVP, matvec [gradients]"][2] == "1.40"
    assert rows["HVP in matmat, default chunk 1 [gradients/vector]"][5:] == ["<= 1.5", "**no**"]
    assert rows["100-probe trace [s]"][4:] == ["0.50", "<= 0.40 (2.5x faster)", "**no**"]
    assert rows["top1 to 0.0001: HVPs (Lanczos steps + 1 residual)"][-1] == "yes"
    assert rows["top5 to 0.0001: HVPs (Lanczos steps + 5 residual)"][-1] == "**no**"
    assert rows["top5 time [s]"][4:] == ["0.40", "<= 0.5", "yes"]
    assert rows["trace peak / gradient peak"][2:] == ["2.50", "2.00", "", "<= 3", "yes"]
    assert bs.rel_errors([1.0, 3.0], [3.0, 2.0, 1.0]) == [0.0, 0.5]


def test_peak_rss_in_a_child_with_fixed_mmap_threshold_is_tight():
    code = (
        # warm-up large enough to take the parallel path: the first parallel reduction starts the OpenMP
        # thread pool (~3 MiB of stacks with 2 threads), a one-time cost that is not the buffer being measured
        "import json, torch; from benchmarks._timing import peak_rss_increase; torch.ones(2**20).sum(); "
        "print(json.dumps(peak_rss_increase(lambda: torch.ones(16 * 2**20).sum())))"
    )
    nbytes, method = run_json_child(["-c", code], env=_timing.RSS_CHILD_ENV)
    assert abs(nbytes - 64 * MiB) <= 1 * MiB, (nbytes / MiB, method)  # the 64 MiB buffer, to 1 MiB
