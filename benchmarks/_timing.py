"""Timing and peak-memory helpers shared by the benchmarks.

Timing: every candidate is warmed up once, then the candidates run in turn, round after round (interleaved),
so that a load change on a shared machine hits all of them alike; the result is each one's median.
On CUDA every call is bracketed by ``torch.cuda.synchronize``.

Peak memory, two instruments (the result says which):

- ``"rss"`` (CPU): the increase of the process's resident set size over its value just before the call. On
  Linux the kernel's high-water mark ``VmHWM`` is reset through ``/proc/self/clear_refs`` before the call
  and read after it, so no spike is missed; elsewhere a thread samples ``psutil`` RSS every millisecond (it
  can miss short spikes). Run it in a fresh process per measurement (see :func:`run_json_child`): in a
  long-lived process the allocator reuses freed pages and the increase under-reports. With glibc, give the
  child ``MALLOC_MMAP_THRESHOLD_=65536`` (:data:`RSS_CHILD_ENV`): every tensor buffer is then its own mapping,
  returned at free, so RSS follows live memory and repeated measurements agree to ~0.1 MB (with glibc's
  default, dynamic threshold they scatter by +-10%).
  (``tracemalloc`` does not see torch's CPU tensors, which are allocated outside Python's allocator.)
- ``"cuda"``: ``torch.cuda.max_memory_allocated() - memory_allocated()`` around the call, after
  ``reset_peak_memory_stats``; tensors only, not the caching allocator's reserve nor the CUDA context.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

_HWM_FILE = "/proc/self/status"
#: Environment for a peak-RSS child process (see the module docstring); ignored by non-glibc allocators.
RSS_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
_CLEAR_REFS = "/proc/self/clear_refs"


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on a CUDA device; no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, Any]:
    """Wall time in seconds of one call ``fn()`` (device synchronised before and after), and its result."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def interleaved(
    fns: dict[str, Callable[[int], Any]],
    repeats: int,
    device: torch.device | str = "cpu",
    warmup: int = 1,
) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Run every ``fns[name](round)`` ``warmup`` times (round -1, not recorded), then ``repeats`` rounds in
    which each name runs once, in dict order. Returns the recorded times (seconds) and results per name."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            time_call(lambda fn=fn: fn(-1), device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    results: dict[str, list[Any]] = {k: [] for k in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            dt, out = time_call(lambda fn=fn, r=r: fn(r), device)
            times[name].append(dt)
            results[name].append(out)
    return times, results


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence (nan when empty)."""
    return float(statistics.median(xs)) if len(xs) else float("nan")


# ----------------------------------------------------------------------------------------- peak memory
def _read_kb(field: str) -> int:
    with open(_HWM_FILE) as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not found in {_HWM_FILE}")


def _status_kb(*fields: str) -> tuple[int, ...]:
    """Several fields of /proc/self/status from ONE read, so they describe the same instant."""
    with open(_HWM_FILE) as fh:
        found = {ln.split(":")[0]: int(ln.split()[1]) for ln in fh if ln.split(":")[0] in fields}
    if len(found) != len(fields):
        raise OSError(f"{fields} not all found in {_HWM_FILE}")
    return tuple(found[f] for f in fields)


def _hwm_resettable(probe_mib: int = 64) -> bool:
    """Whether writing 5 to clear_refs resets VmHWM to the current RSS.

    VmRSS is only approximate (the kernel batches RSS counters per thread/CPU, hundreds of kB of slack), so
    comparing VmHWM with VmRSS to a few kB raced. Instead: touch and free a ``probe_mib`` buffer (its pages go
    back to the OS), so VmHWM sits at least that far above VmRSS; after a working reset the gap is gone.
    """
    try:
        buf = bytearray(probe_mib * 2**20)
        buf[::4096] = b"\x01" * len(range(0, len(buf), 4096))  # touch every page
        del buf
        with open(_CLEAR_REFS, "w") as fh:
            fh.write("5")
        hwm, rss = _status_kb("VmHWM", "VmRSS")
        return hwm - rss < probe_mib * 1024 // 2
    except OSError:
        return False


def peak_rss_increase(fn: Callable[[], Any]) -> tuple[int, str]:
    """Peak resident set size during ``fn()`` minus the RSS just before it, in bytes, and the method used
    (``"VmHWM"`` or ``"psutil-1ms"``). Call it in a fresh process (see the module docstring)."""
    if _hwm_resettable():
        before = _read_kb("VmRSS")
        with open(_CLEAR_REFS, "w") as fh:
            fh.write("5")
        fn()
        return max(0, _read_kb("VmHWM") - before) * 1024, "VmHWM"
    import psutil  # the bench extra

    proc = psutil.Process()
    before = proc.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return peak[0] - before, "psutil-1ms"


def peak_cuda_increase(fn: Callable[[], Any], device: torch.device | str) -> tuple[int, str]:
    """Peak CUDA tensor memory during ``fn()`` above what was allocated before it, in bytes."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, "cuda"


def run_json_child(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 3600) -> dict:
    """Run ``python argv...`` in a fresh process and parse the last stdout line as JSON. A failing child
    raises ``RuntimeError`` with the tail of its stderr."""
    proc = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"child {' '.join(argv)} failed (rc={proc.returncode}): {' | '.join(tail)}")
    return json.loads(lines[-1])


def fmt_bytes(n: float) -> str:
    """``n`` bytes as MiB with one decimal."""
    return f"{n / 2**20:.1f} MiB"
