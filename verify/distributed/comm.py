"""One process per worker: process group, gossip and collectives, with timeouts that name the failing rank.

Rendezvous: a ``torch.distributed.TCPStore`` at ``MASTER_ADDR:MASTER_PORT`` (set by ``torchrun``, or by
:mod:`verify.distributed.launch`, which hosts the store itself on 127.0.0.1 with a port the OS picks). The
same store carries a small watch channel (prefix ``dsgd/watch/``):

- before every communication op, rank r writes ``at/r = "<op number>|<what> at step <t>"`` (one asynchronous
  store write, about a microsecond); every rank performs the same sequence of ops, so after a failure the
  ranks whose op number is behind are the ones that never arrived (dead or hung);
- the first rank to detect a failure writes its diagnosis to ``failure`` (compare-and-set) and the rank at
  fault to ``culprit``; every rank that fails afterwards repeats that diagnosis, so all name the same rank.

Point-to-point waits use ``Work.wait(timeout)``; gloo collectives use the process group's timeout; both are
``timeout`` seconds. A timeout or a closed connection raises :class:`DistributedRunError` with one line
naming the rank. NCCL: a hang is ended by NCCL's own watchdog after the same timeout (the diagnosis above is
gloo's).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from ..topology import Neighbours

WATCH_PREFIX = "dsgd/watch"
PG_PREFIX = "dsgd/pg"
_PARENT: list[int] = []  # the launcher's pid, once watch_parent runs
#: Set by :mod:`verify.distributed.launch`: the launcher hosts the store (as torchrun's agent does).
HOSTED_STORE_ENV = "DSGD_VERIFY_HOSTED_STORE"


class DistributedRunError(RuntimeError):
    """A rank died, hung or disagreed; the message is one line naming it."""


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(seconds))


def _reason(exc: BaseException, timeout: float) -> str:
    text = str(exc)
    low = text.lower()
    if "timed out" in low or "timeout" in low:
        return f"did not respond within {timeout:g} s (hung, or slower than --timeout)"
    if any(w in low for w in ("connection reset", "connection closed", "broken pipe", "end of file", "eof")):
        return "closed its connection (its process exited or crashed)"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"failed: {first[:200]}"


@dataclass
class Comm:
    """This rank's view of the group: ``rank``, ``world``, ``backend``, ``device``, ``timeout`` (seconds),
    and the time spent waiting on communication (``comm_s``) since the last :meth:`reset_timer`."""

    rank: int
    world: int
    backend: str
    device: torch.device
    timeout: float
    store: dist.Store
    op: int = 0
    step: int = 0
    runs: int = 0
    comm_s: float = 0.0
    store_gone: bool = False
    _peers: dict[int, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ watch channel
    def _mark(self, what: str) -> None:
        self.op += 1
        if self.store_gone:
            return
        try:
            self.store.set(f"at/{self.rank}", f"{self.op}|{what} at step {self.step}")
        except RuntimeError:  # the store is gone (launcher killed): stop writing to it; watch_parent reports
            self.store_gone = True

    def _behind(self) -> tuple[list[int], dict[int, str]]:
        """The ranks furthest behind this one in the common sequence of communications (never reached it,
        or stopped earlier), and where each rank last was. Empty when every rank got at least as far."""
        ops: dict[int, int] = {}
        where: dict[int, str] = {}
        for k in range(self.world):
            if k == self.rank:
                continue
            try:
                if not self.store.check([f"at/{k}"]):
                    ops[k], where[k] = 0, "before its first communication"
                    continue
                n, _, where[k] = self.store.get(f"at/{k}").decode().partition("|")
            except RuntimeError:  # the store is gone: no diagnosis
                return [], {}
            ops[k] = int(n)
        low = min(ops.values(), default=self.op)
        return ([k for k, n in ops.items() if n == low] if low < self.op else []), where

    def fail(self, what: str, exc: BaseException, peer: int | None = None) -> DistributedRunError:
        """Turn a communication error into a one-line :class:`DistributedRunError` naming the rank at fault,
        record the diagnosis in the store if it is the first, and return it (the caller raises).

        A peer whose connection closed is at fault (its process ended). On a timeout, the rank at fault is
        the one furthest behind in the common sequence of communications (the peer that did not answer may
        itself be waiting for it); if nobody is behind, the silent peer."""
        where = f"{what} at step {self.step}"
        reason = _reason(exc, self.timeout)
        seen = f"seen by rank {self.rank}" + (f" waiting for rank {peer}" if peer is not None else "")
        closed = reason.startswith("closed")
        behind, last = ([], {}) if closed and peer is not None else self._behind()
        if behind:
            culprit = behind[0]
            names = " and ".join(f"rank {k}" for k in behind)
            waited = f" for rank {peer}" if peer is not None else ""
            event = f"timed out after {self.timeout:g} s" if reason.startswith("did not") else reason
            own = (f"{names} stopped after {last[culprit]} (hung or died; rank {self.rank}, waiting{waited} "
                   f"in {where}, {event})")  # fmt: skip
        elif peer is not None:
            culprit, own = peer, f"rank {peer} {reason} during {where} ({seen})"
        else:
            culprit, own = None, f"{where} failed on rank {self.rank}: {reason}"
        return DistributedRunError(self.record(own, culprit))

    def record(self, diagnosis: str, culprit: int | None = None) -> str:
        """Store ``diagnosis`` (and the rank at fault, ``culprit``) as the run's failure unless one is
        recorded; return the one-line message this rank prints."""
        try:
            first = self.store.compare_set("failure", "", diagnosis).decode()
            if first == diagnosis:
                self.store.set("culprit", str(self.rank if culprit is None else culprit))
        except RuntimeError:
            first = diagnosis
        if first == diagnosis:
            return f"rank {self.rank}: the run failed: {diagnosis}"
        return f"rank {self.rank}: the run failed: {first}; here: {diagnosis}"

    def failure(self) -> str | None:
        """The recorded failure diagnosis, if any (non-blocking)."""
        try:
            return self.store.get("failure").decode() if self.store.check(["failure"]) else None
        except RuntimeError:
            return None

    # ------------------------------------------------------------------ communication
    def _wait(self, works: Sequence[dist.Work], peers: Sequence[int | None], what: str) -> None:
        t0 = time.perf_counter()
        for work, peer in zip(works, peers, strict=True):
            try:
                work.wait(timeout=_td(self.timeout))
            except (RuntimeError, dist.DistBackendError) as exc:
                raise self.fail(what, exc, peer) from None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.comm_s += time.perf_counter() - t0

    def gossip(self, x: Tensor, nb: Neighbours, what: str = "the gossip exchange of parameters") -> Tensor:
        """``P_jj x_j + sum_{k in in(j)} P_jk x_k``: send ``x`` to every out-neighbour, receive x_k from every
        in-neighbour (one batched ``batch_isend_irecv``; never a send to oneself). Cost: one message of
        ``x.numel()`` elements per edge and direction."""
        self._mark(what)
        recv = {k: torch.empty_like(x) for k in nb.incoming}
        ops = [dist.P2POp(dist.irecv, recv[k], k) for k in nb.incoming]
        ops += [dist.P2POp(dist.isend, x, k) for k in nb.outgoing]
        peers: list[int | None] = list(nb.incoming) + list(nb.outgoing)
        if ops:
            t0 = time.perf_counter()
            try:
                works = dist.batch_isend_irecv(ops)
            except (RuntimeError, dist.DistBackendError) as exc:
                raise self.fail(what, exc) from None
            self.comm_s += time.perf_counter() - t0
            self._wait(works, peers if len(works) == len(ops) else [None] * len(works), what)
        out = x * nb.self_weight
        for k, wk in zip(nb.incoming, nb.in_weights, strict=True):
            out = out + wk * recv[k]
        return out

    def all_reduce(self, x: Tensor, what: str, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
        """``x`` reduced over the ranks (SUM by default), in place and returned."""
        self._mark(what)
        t0 = time.perf_counter()
        try:
            dist.all_reduce(x, op=op)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise self.fail(what, exc) from None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.comm_s += time.perf_counter() - t0
        return x

    def gather(self, x: Tensor, what: str) -> Tensor | None:
        """``stack([x_0, ..., x_{m-1}])`` on rank 0 (None elsewhere); each ``x_k`` has x's shape and dtype."""
        self._mark(what)
        parts = [torch.empty_like(x) for _ in range(self.world)] if self.rank == 0 else None
        try:
            dist.gather(x.contiguous(), parts, dst=0)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise self.fail(what, exc) from None
        return torch.stack(parts) if parts is not None else None

    def scatter(self, rows: Tensor | None, like: Tensor, what: str) -> Tensor:
        """Row k of ``rows`` (given on rank 0) to rank k; ``like`` gives the shape and dtype of one row."""
        self._mark(what)
        out = torch.empty_like(like)
        parts = list(rows.unbind(0)) if rows is not None else None
        try:
            dist.scatter(out, [p.contiguous() for p in parts] if parts else None, src=0)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise self.fail(what, exc) from None
        return out

    def broadcast(self, x: Tensor, what: str) -> Tensor:
        """Rank 0's ``x`` on every rank (in place)."""
        self._mark(what)
        try:
            dist.broadcast(x, src=0)
        except (RuntimeError, dist.DistBackendError) as exc:
            raise self.fail(what, exc) from None
        return x

    def wait_for_rank0(self, key: str, what: str, timeout: float) -> None:
        """Ranks != 0 wait until rank 0 sets ``key`` (rank 0 returns at once and later calls :meth:`release`),
        for up to ``timeout`` seconds; a failure recorded meanwhile ends the wait within half a second."""
        self._mark(what)
        if self.rank == 0:
            return
        t0 = time.perf_counter()
        while True:
            try:
                self.store.wait([key], _td(min(0.5, timeout)))
                break
            except RuntimeError as exc:
                if "timeout" not in str(exc).lower() and "timed out" not in str(exc).lower():
                    raise self.fail(what, exc, 0) from None
            failed = self.failure()
            if failed is not None:
                raise DistributedRunError(f"rank {self.rank}: the run failed: {failed}")
            if time.perf_counter() - t0 > timeout:
                diag = f"rank 0 did not finish {what} at step {self.step} within {timeout:g} s"
                raise DistributedRunError(self.record(diag + " (--measure-timeout)", 0))
        self.comm_s += time.perf_counter() - t0

    def release(self, key: str) -> None:
        """Rank 0: let the others past :meth:`wait_for_rank0` (``key``)."""
        self.store.set(key, "1")


def watch_parent(interval: float = 0.2) -> None:
    """End this rank, with one line and exit status 129 (128 + SIGHUP, as for a lost terminal), as soon as
    the process that started it (the local launcher or torchrun's agent, which hosts the rendezvous store)
    is gone: without it no failure could be diagnosed, and every store access would only print warnings.
    A daemon thread polls the parent's pid every ``interval`` seconds."""
    parent = os.getppid()
    _PARENT.append(parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        leave_without_launcher()

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def launcher_gone() -> bool:
    """Whether the process that started this rank (see :func:`watch_parent`) has gone away."""
    return bool(_PARENT) and os.getppid() != _PARENT[0]


def leave_without_launcher() -> None:
    """One line saying the launcher went away, then exit status 129 (no other rank is to blame)."""
    rank = os.environ.get("RANK", "?")
    print(f"dsgd-verify distributed: rank {rank}: the launcher (pid {_PARENT[0]}) went away; stopping",
          file=sys.stderr, flush=True)  # fmt: skip
    os._exit(129)


def loopback_ifname() -> str | None:
    """The name of the loopback interface (``lo`` on Linux, ``lo0`` on macOS), or None if not found."""
    names = [n for _, n in socket.if_nameindex()]
    for n in ("lo", "lo0"):
        if n in names:
            return n
    return None


def connect(timeout: float = 60.0, backend: str = "auto", device: str = "auto") -> Comm:
    """Join the process group described by the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``: what torchrun and the local launcher set).

    ``backend``: ``auto`` (NCCL when the device is CUDA, else gloo), ``gloo`` or ``nccl``; ``device``:
    ``auto`` (``cuda:LOCAL_RANK`` when CUDA is present and the backend is not gloo, else CPU), ``cpu`` or
    ``cuda``/``cuda:N`` (always ``cuda:LOCAL_RANK``: one GPU per process).
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedRunError(
            f"not started by a launcher ({', '.join(missing)} unset): use `torchrun --nproc-per-node N -m "
            "verify.distributed ...` or `dsgd-verify run --launcher torchrun --procs N ...`"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if backend not in ("auto", "gloo", "nccl"):
        raise DistributedRunError(f"backend must be auto, gloo or nccl; got {backend!r}")
    cuda = device.startswith("cuda") or (device == "auto" and backend != "gloo" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise DistributedRunError(f"device {device!r} asked but CUDA is not available")
    dev = torch.device("cuda", local % max(1, torch.cuda.device_count())) if cuda else torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise DistributedRunError("the nccl backend needs CUDA devices; use --backend gloo on CPU")
    if cuda:
        torch.cuda.set_device(dev)
    hosted = (
        os.environ.get(HOSTED_STORE_ENV) == "1" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    )
    try:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
            is_master=(rank == 0 and not hosted), timeout=_td(timeout),
        )  # fmt: skip
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(PG_PREFIX, store),
            rank=rank,
            world_size=world,
            timeout=_td(timeout),
        )
    except (RuntimeError, dist.DistBackendError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedRunError(
            f"rank {rank}: could not join the process group of {world} at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout:g} s: {first[:200]}"
        ) from None
    return Comm(rank, world, backend, dev, float(timeout), dist.PrefixStore(WATCH_PREFIX, store))


def close(comm: Comm) -> None:
    """Leave the process group cleanly (after a successful run)."""
    if dist.is_initialized():
        dist.destroy_process_group()
