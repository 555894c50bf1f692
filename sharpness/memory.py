"""How much memory the cached gradient graphs of a :class:`~sharpness.hvp.HessianOperator` may take.

The autograd backend forms ``H v = sum_b w_b d/dtheta <grad L_b(theta), v>`` by a second backward pass through
the graph of ``grad L_b``. Keeping that graph between products (one per batch) saves one forward and one
backward pass per batch and product, but the graphs grow with the data: a CNN at batch 256 keeps about 120 MB
per batch. So graphs are cached only while their total stays under a budget (bytes); every batch beyond it is
*streamed*: its graph is rebuilt for each product and freed at once, so memory stays at one batch's graph.

- :func:`default_graph_budget`: a quarter of the memory available now (Linux ``MemAvailable`` from
  ``/proc/meminfo``, else a quarter of physical RAM; on CUDA a quarter of ``torch.cuda.mem_get_info``'s free
  memory).
- :func:`parse_budget`: ``auto``, a number of bytes, or ``512M`` / ``2G`` / ``1.5GiB``; ``0`` streams all.
- :func:`graph_bytes`: the bytes one graph holds, counted as it is built (CPU: the storages saved for
  backward, through ``torch.autograd.graph.saved_tensors_hooks``; CUDA: ``memory_allocated`` before/after).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .functional import SharpnessInputError

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free now: CUDA ``mem_get_info`` free memory; CPU ``MemAvailable`` (Linux), else physical RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def default_graph_budget(device: torch.device | str = "cpu") -> int:
    """A quarter of :func:`available_memory`: what the cached gradient graphs may take by default."""
    return available_memory(device) // 4


def parse_budget(value: int | float | str | None, device: torch.device | str = "cpu") -> int:
    """Bytes from ``None``/``"auto"`` (:func:`default_graph_budget`), a number, or ``"512M"``, ``"2G"``,
    ``"1.5GiB"`` (binary units); ``0`` means stream every batch."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return default_graph_budget(device)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?\s*", str(value).lower())
        if m is None:
            raise SharpnessInputError(
                f"graph memory budget {value!r} is not 'auto', a number of bytes, or e.g. 512M / 2G"
            )
        number, unit = float(m.group(1)), m.group(2)
    if not number >= 0 or number == float("inf"):
        raise SharpnessInputError(f"graph memory budget must be >= 0 bytes, got {value!r}")
    return int(number * _UNITS[unit])


@contextmanager
def graph_bytes(device: torch.device) -> Iterator[Callable[[], int]]:
    """Within the block, count the bytes held by graphs built there; the yielded function returns the count.

    CUDA: ``memory_allocated`` after minus before. CPU: the distinct storages packed for backward (each
    counted once; inputs and parameters the graph merely references are included, so it errs high).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        after = [before]
        yield lambda: max(0, after[0] - before)
        torch.cuda.synchronize(device)
        after[0] = torch.cuda.memory_allocated(device)
        return
    seen: dict[Any, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            seen[(st.data_ptr(), st.device)] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. functorch wrappers)
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield lambda: sum(seen.values())


def fmt_bytes(n: int) -> str:
    """Bytes as KiB below 1 MiB, GiB above 10 GiB, else MiB, for reports."""
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**30:.1f} GiB" if n >= 10 * 2**30 else f"{n / 2**20:.1f} MiB"


def describe_products(info: dict[str, Any]) -> str:
    """One line for the report: how the HVPs were formed (from ``HessianOperator.graph_info()``)."""
    mode, n = info.get("mode"), info.get("batches")
    if mode == "func":
        return f"forward-over-reverse (torch.func), nothing kept between products; {n} batches"
    budget = info.get("budget_bytes")
    limit = f"budget {fmt_bytes(budget)}" if budget is not None else "no budget"
    if mode == "cached":
        return (f"gradient graphs of all {n} batches cached ({fmt_bytes(info['cached_bytes'])}, {limit}, "
                "--graph-memory)")  # fmt: skip
    if mode == "streamed":
        return (f"streamed: each of the {n} batches' gradient graph rebuilt per product and freed "
                f"({limit}, --graph-memory)")  # fmt: skip
    if mode == "mixed":
        size = fmt_bytes(info["cached_bytes"])
        return (f"gradient graphs of {info['cached']} of {n} batches cached ({size}, {limit}), "
                f"the other {info['streamed']} streamed (rebuilt per product)")  # fmt: skip
    return f"no Hessian-vector product was formed ({n} batches)"
