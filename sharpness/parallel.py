"""Data-parallel sharpness on ``torch.distributed``: data split across ranks, one ``all_reduce`` per product.

With data split across ``W`` ranks, rank ``r`` holding batches ``B_r`` of the ``N`` samples in all,

    L(theta) = sum_r sum_{b in B_r} (n_b / N) L_b(theta),    H v = sum_r sum_{b in B_r} (n_b / N) H_b v,

so every loss value, gradient and Hessian-vector product is the sum over ranks of a weighted partial one: each
rank forms its own part with the weights ``n_b / N`` (``N`` summed over the ranks once), then one
``all_reduce(SUM)`` makes the total on every rank. Everything else (probes and perturbations drawn from the
seed on a CPU generator, Lanczos, the trace and SAM arithmetic) runs identically on every rank, so every
rank holds the same numbers and rank 0 writes them.

A :class:`DataParallel` is made from a process group (``None``: the default group), and given to
:func:`~sharpness.functional.make_loss` as ``group=``, or made active for a block with :func:`data_parallel`
(every loss made inside the block is data-parallel: the form the ``sharpness`` command uses under
``torchrun``).

Faults: before each collective, rank ``r`` writes ``"<op number>|<what>"`` under ``sharpness/at/r`` in the
group's store. A collective that times out (the process group's timeout) or whose peer closed the connection
raises :class:`DistributedSharpnessError` with one line naming the rank(s) furthest behind in that common
sequence of collectives (the dead or hung ones).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

WATCH = "sharpness/at"
_ACTIVE: list[DataParallel] = []


class DistributedSharpnessError(RuntimeError):
    """A rank died, hung or failed during a data-parallel measurement; the message is one line naming it."""


class DataParallel:
    """Sums over the ranks of ``group`` (``None``: the default process group), with failures named.

    ``rank``/``world`` are this process's rank and the group's size; ``timeout`` (seconds) is only reported
    (the collectives use the process group's own timeout).
    """

    def __init__(self, group: Any = None, timeout: float | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedSharpnessError(
                "data-parallel sharpness needs an initialised torch.distributed process group"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.timeout = timeout
        self.op = 0
        try:
            self.store: Any = dist.PrefixStore(WATCH, dist.distributed_c10d._get_default_store())
        except (RuntimeError, AttributeError, ValueError):  # no store to watch with: failures are not named
            self.store = None

    def _mark(self, what: str) -> None:
        self.op += 1
        if self.store is not None:
            try:
                self.store.set(str(self.rank), f"{self.op}|{what}")
            except RuntimeError:
                pass

    def _behind(self) -> tuple[list[int], dict[int, str]]:
        """Ranks that did not reach this rank's current collective, and where each one last was."""
        ops, where = {}, {}
        if self.store is None:
            return [], {}
        for k in range(self.world):
            if k == self.rank:
                continue
            try:
                if not self.store.check([str(k)]):
                    ops[k], where[k] = 0, "before its first collective"
                    continue
                n, _, what = self.store.get(str(k)).decode().partition("|")
                where[k] = f"after entering collective #{n} ({what})"
            except RuntimeError:
                return [], {}
            ops[k] = int(n)
        low = min(ops.values(), default=self.op)
        return ([k for k, n in ops.items() if n == low] if low < self.op else []), where

    def fail(self, what: str, exc: BaseException) -> DistributedSharpnessError:
        """One line naming the rank at fault (the one furthest behind), seen from this rank."""
        text = str(exc).lower()
        if "timed out" in text or "timeout" in text:
            event = f"timed out after {self.timeout:g} s" if self.timeout else "timed out"
        elif any(w in text for w in ("connection reset", "connection closed", "broken pipe", "end of file")):
            event = "a peer closed its connection (its process ended)"
        else:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            event = f"failed: {first}"
        behind, last = self._behind()
        if behind:
            names = " and ".join(f"rank {k}" for k in behind)
            return DistributedSharpnessError(
                f"{names} of {self.world} died or hung {last[behind[0]]}: rank {self.rank} {event} in "
                f"collective #{self.op} ({what})"
            )
        return DistributedSharpnessError(
            f"rank {self.rank} of {self.world}: {event} in collective #{self.op} ({what}); the other ranks' "
            "progress is unknown (no rank is behind, or the store went away with the rank hosting it)"
        )

    def sum(self, x: Tensor, what: str = "the sum over ranks") -> Tensor:
        """``sum_r x_r`` on every rank (one ``all_reduce``); ``x`` is not modified."""
        out = x.detach().clone().contiguous()
        self._mark(what)
        try:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise self.fail(what, exc) from None
        return out

    def sum_float(self, value: float, what: str = "the sum over ranks") -> float:
        """``sum_r value_r`` of a Python number, in float64."""
        return float(self.sum(torch.tensor([float(value)], dtype=torch.float64, device=self.device), what)[0])

    def agree(self, chosen: list[str], universe: list[str], what: str = "the metrics to run") -> list[str]:
        """The items of ``chosen`` that every rank chose (a choice that depends on free memory may differ
        between ranks, and different work would desynchronise the collectives). One ``all_reduce``."""
        mask = torch.tensor([float(u in chosen) for u in universe], dtype=torch.float64, device=self.device)
        total = self.sum(mask, what)
        return [u for u, n in zip(universe, total.tolist(), strict=True) if u in chosen and n == self.world]

    @property
    def device(self) -> torch.device:
        """Where collectives run: this rank's CUDA device under NCCL, else the CPU."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's contiguous share of ``items`` (sizes differ by at most one, earlier ranks larger)."""
        n, w, r = len(items), self.world, self.rank
        if n < w:
            raise DistributedSharpnessError(
                f"{n} batches cannot be split across {w} ranks: lower the batch size or use fewer processes"
            )
        start = r * (n // w) + min(r, n % w)
        return items[start : start + n // w + (1 if r < n % w else 0)]


def active() -> DataParallel | None:
    """The :class:`DataParallel` made active by :func:`data_parallel`, if any."""
    return _ACTIVE[-1] if _ACTIVE else None


def resolve(group: Any) -> DataParallel | None:
    """``group`` as a :class:`DataParallel`: given one, itself; a process group, wrapped; ``None``, the active
    one (or none: a single process)."""
    if group is None:
        return active()
    return group if isinstance(group, DataParallel) else DataParallel(group)


@contextlib.contextmanager
def data_parallel(group: Any = None, timeout: float | None = None) -> Iterator[DataParallel]:
    """Within the block, every loss made by ``make_loss`` (and so every measurement from a model) sums its
    data over the ranks of ``group`` (default: the default process group)."""
    dp = group if isinstance(group, DataParallel) else DataParallel(group, timeout)
    _ACTIVE.append(dp)
    try:
        yield dp
    finally:
        _ACTIVE.remove(dp)


def launched_world() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def join(backend: str = "auto", device: torch.device | None = None, timeout: float = 300.0) -> DataParallel:
    """Join the process group described by ``torchrun``'s environment (``env://``); ``backend`` ``auto`` is
    NCCL on CUDA, else gloo. With a CUDA ``device``, rank ``r`` uses ``cuda:LOCAL_RANK``."""
    cuda = device is not None and device.type == "cuda"
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout)))
        except (RuntimeError, ValueError, dist.DistBackendError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise DistributedSharpnessError(
                f"rank {os.environ.get('RANK', '?')}: could not join the process group of "
                f"{launched_world()} within {timeout:g} s: {first}"
            ) from None
    return DataParallel(None, timeout)


def leave() -> None:
    """Leave the process group (after a successful measurement)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def loopback_env(rank: int, world: int, port: int, threads: int | None = None) -> dict[str, str]:
    """The environment ``torchrun`` would give rank ``rank`` of ``world`` on this machine, store on
    ``127.0.0.1:port`` (rank 0 hosts it), gloo bound to the loopback interface."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
           "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": str(threads or max(1, (os.cpu_count() or 1) // world))}  # fmt: skip
    names = [n for _, n in socket.if_nameindex()]
    lo = next((n for n in ("lo", "lo0") if n in names), None)
    if lo is not None:
        env["GLOO_SOCKET_IFNAME"] = lo
    return env


def launch_loopback(
    argv: list[str], procs: int, *, timeout: float = 120.0, threads: int | None = None
) -> list[int]:
    """Run ``python argv...`` as ``procs`` ranks on 127.0.0.1 (what ``torchrun --nproc-per-node procs`` does,
    without its agent: a rank that fails does not end the others, so each can report what it saw) and
    return their exit codes; ranks still running after ``timeout`` seconds are killed (code -9). This
    process hosts the store (port picked by the OS), as torchrun's agent does, so the diagnosis of a failure
    survives the rank that noticed it first."""
    store = dist.TCPStore("127.0.0.1", 0, procs, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=max(timeout, 5.0)))  # fmt: skip
    hosted = {"TORCHELASTIC_USE_AGENT_STORE": "True"}
    children = []
    for r in range(procs):
        env = {**os.environ, **loopback_env(r, procs, store.port, threads), **hosted}
        children.append(subprocess.Popen([sys.executable, *argv], env=env))
    deadline = time.monotonic() + timeout
    try:
        for p in children:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
                p.wait()
        del store
    return [p.returncode for p in children]


# ------------------------------------------------------------------------------ the command under torchrun
def cli_ranks(args: Any, device: torch.device) -> tuple[DataParallel | None, torch.device]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the group, make it active for the rest of the command
    (:func:`cli_done` ends it), give each rank its own CUDA device, and leave printing, the JSON and the
    progress bars to rank 0. ``(None, device)`` in a single process."""
    if launched_world() <= 1:
        return None, device
    if getattr(args, "plot", None):
        raise DistributedSharpnessError("--plot is not supported under torchrun; run it in one process")
    dp = join(device=device, timeout=float(getattr(args, "timeout", 300.0)))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    _ACTIVE.append(dp)
    if dp.rank != 0:
        args.out, args.no_progress = None, True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the process ends with the command
    return dp, device


def cli_done(dp: DataParallel | None, ok: bool) -> None:
    """End what :func:`cli_ranks` started; the group is left cleanly only after a successful run (a dead peer
    would make the teardown hang)."""
    if dp is None:
        return
    if dp in _ACTIVE:
        _ACTIVE.remove(dp)
    if ok:
        leave()


def describe(dp: DataParallel | None, n_batches: int) -> dict[str, Any] | None:
    """What the JSON records of the split: ranks, backend, batches per rank."""
    if dp is None:
        return None
    counts = [n_batches // dp.world + (1 if r < n_batches % dp.world else 0) for r in range(dp.world)]
    return {"world": dp.world, "backend": dist.get_backend(dp.group), "batches_per_rank": counts}
