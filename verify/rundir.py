"""The run directory: ``config.json``, ``metrics.csv``, ``ckpt.pt``, ``avg.pt`` and ``result.json``.

- ``config.json``: ``{"config": RunConfig.to_dict(), "run": {resolved device, dtype, execution, m, d,
  versions: :func:`sharpness.results.environment`}}``.
- ``metrics.csv``: header written once; one row appended and flushed per log; a resumed run first drops the
  rows logged after its checkpoint, so the file ends as an uninterrupted run's would.
- ``ckpt.pt`` (atomic): all workers stacked (``W`` (m, d)), BatchNorm buffers, momentum, RNG states (uint8
  tensors), step: tensors and plain data only, read back with ``weights_only=True`` (:func:`read_ckpt`).
- ``avg.pt`` (atomic): the average model in the toolkit's self-describing format
  (:func:`sharpness.checkpoint.save_checkpoint`), so ``sharpness RUN/avg.pt`` needs no ``--arch``.
- ``result.json`` (atomic): ``diverged``, ``diverged_at``, the last metrics row, wall time.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import pickle
import time
from pathlib import Path
from typing import Any

import torch

from sharpness.checkpoint import save_checkpoint
from sharpness.results import atomic_torch_save, atomic_write_text, write_json

from .algorithms import State
from .config import RunConfig

CKPT_FORMAT = "dsgd-verify-ckpt/1"
FILES = ("config.json", "metrics.csv", "ckpt.pt", "avg.pt", "result.json")


class RunDirError(ValueError):
    """A run directory that cannot be written or resumed; the message is one line."""


def check_out(
    out: Path, resume: bool, overwrite: bool, config: dict[str, Any], may_change: tuple
) -> list[str]:
    """Check a run directory before a run, changing nothing: a resumed run must keep every setting but
    ``may_change`` (a setting its config.json predates counts as RunConfig's default); a new run refuses a
    folder that already holds run files unless ``overwrite``. Returns the run files a new run would remove."""
    if resume:
        saved = {**RunConfig().to_dict(), **read_config(out)["config"]}
        for k, v in config.items():
            if k not in may_change and saved.get(k) != v:
                raise RunDirError(f"cannot resume {out}: setting {k!r} was {saved.get(k)!r}, now {v!r}")
        return []
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} is a file, not a folder for the run")
    used = [f for f in FILES if (out / f).exists()]
    if used and not overwrite:
        raise RunDirError(
            f"{out} already holds a run ({used[0]}): continue it with --resume {out}, replace it with "
            "--overwrite, or choose another output folder"
        )
    return used


def prepare_out(out: Path, resume: bool, overwrite: bool, config: dict[str, Any], may_change: tuple) -> None:
    """:func:`check_out`, then (new run) remove the old run files and create the folder."""
    used = check_out(out, resume, overwrite, config, may_change)
    if resume:
        return
    for f in used:
        (out / f).unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_config(out: Path, config: dict[str, Any], run: dict[str, Any]) -> None:
    write_json(out / "config.json", {"config": config, "run": run})


def read_json(path: Path) -> Any:
    """A JSON file's content; one-line :class:`RunDirError` naming the file if it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def read_config(out: Path) -> dict[str, Any]:
    """``out/config.json`` as ``{"config": {...}, "run": {...}}`` (one line naming the file otherwise)."""
    path = out / "config.json"
    if not path.is_file():
        raise RunDirError(f"{out} holds no config.json: not a run directory")
    obj = read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("config"), dict):
        raise RunDirError(f'{path} is not a run\'s config.json (no "config" object)')
    return obj


class MetricsWriter:
    """Appends rows to ``metrics.csv`` (columns fixed at creation; missing values are empty cells)."""

    def __init__(self, path: Path, columns: list[str], keep_until: int | None = None) -> None:
        self.path, self.columns = path, list(columns)
        if keep_until is not None and path.is_file():
            header, complete = parse_metrics(path)
            self.columns = header or list(columns)
            rows = [r for r in complete if float(r["step"]) <= keep_until]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
            atomic_write_text(path, buf.getvalue())
        else:
            atomic_write_text(path, ",".join(self.columns) + "\n")

    def write(self, row: dict[str, Any]) -> None:
        cells = {k: ("" if row.get(k) is None else row[k]) for k in self.columns}
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, lineterminator="\n").writerow(cells)
            fh.flush()


def _parses(row: dict[Any, Any]) -> bool:
    """Every cell present, and a number or empty; ``step`` an integer."""
    if None in row or any(v is None for v in row.values()):
        return False
    try:
        cells = [float(v) for v in row.values() if v != ""]
        step = float(row.get("step", "x"))
    except ValueError:
        return False
    return bool(cells) and step == int(step)


def parse_metrics(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the complete rows of ``metrics.csv``: a last line without its newline (torn by a kill or
    a power loss mid-write) and any row that does not parse (:func:`_parses`) are dropped."""
    text = path.read_text()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    header = list(reader.fieldnames or [])
    return header, [r for r in reader if _parses(r)]


def read_metrics(out: Path) -> list[dict[str, float | None]]:
    """``metrics.csv`` as a list of dicts of floats (empty cells -> None); rows that do not parse are
    skipped (:func:`parse_metrics`)."""
    rows = parse_metrics(Path(out) / "metrics.csv")[1]
    return [{k: (float(v) if v != "" else None) for k, v in r.items()} for r in rows]


def rng_states() -> dict[str, Any]:
    """The global RNG states a checkpoint restores, as uint8 tensors: torch's CPU generator (and CUDA's)."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def save_ckpt(
    out: Path, state: State, execution: str, config: dict[str, Any], rng: dict[str, Any] | None = None
) -> None:
    """Write ``out/ckpt.pt`` atomically: ``state`` and the RNG states ``rng`` (default: the current ones)."""
    payload = {
        "format": CKPT_FORMAT, "step": state.step, "W": state.W.detach().cpu(),
        "buffers": {k: v.detach().cpu() for k, v in state.buffers.items()},
        "momentum": None if state.momentum is None else state.momentum.detach().cpu(),
        "execution": execution, "rng": rng_states() if rng is None else rng, "config": config,
    }  # fmt: skip
    atomic_torch_save(payload, out / "ckpt.pt")


class Checkpoints:
    """When ``ckpt.pt`` is written, and which state, in both run loops (simulated and distributed).

    Written: the starting state of a new run (so every run can be resumed from its first step on), the state
    at every ``ckpt_every``-th step, and the state at the first step after ``ckpt_seconds`` of wall time since
    the last write (the loop asks :meth:`step_due` / :meth:`clock_due`); the final state is written by the
    run's end. A due state is :meth:`hold`-ed with the RNG states of that moment and written by
    :meth:`confirm` only once the next update, whose local losses are computed at it, came out finite; a
    divergence :meth:`drop`-s it. So ``ckpt.pt`` always holds the last state whose losses were finite, and
    resuming from it never diverges at once. ``out`` None (no run directory, or a rank other than 0): nothing
    is written, the bookkeeping is the same. Cost: one ``torch.save`` of the (m, d) state per write.
    """

    def __init__(self, out: Path | None, execution: str, config: dict[str, Any]) -> None:
        self.out, self.execution, self.config = out, execution, config
        self.every = int(config.get("ckpt_every") or 0)
        self.seconds = float(config.get("ckpt_seconds") or 0.0)
        self.pending: tuple[State | None, dict[str, Any]] | None = None
        self.written: int | None = None
        self.t_last = time.monotonic()

    def step_due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def clock_due(self) -> bool:
        return bool(self.seconds) and time.monotonic() - self.t_last >= self.seconds

    def write(self, state: State | None, rng: dict[str, Any] | None = None) -> None:
        if self.out is not None and state is not None:
            save_ckpt(self.out, state, self.execution, self.config, rng)
            self.written = state.step
        self.t_last = time.monotonic()

    def hold(self, state: State | None) -> None:
        self.pending = (state, rng_states())

    def confirm(self) -> None:
        if self.pending is not None:
            self.write(*self.pending)
            self.pending = None

    def drop(self) -> None:
        self.pending = None

    def note(self) -> str:
        """Where a diverged run can be resumed from, for its message."""
        if self.out is None:
            return "no run directory"
        if self.written is None:
            return "no checkpoint was written"
        return f"{self.out / 'ckpt.pt'} holds step {self.written}, the last state whose losses were finite"


def read_ckpt(path: Path) -> dict[str, Any]:
    """``ckpt.pt`` as a dict, read with ``torch.load(weights_only=True)`` (tensors, dicts, lists, numbers and
    strings: nothing in the file is imported or called). A file that needs a full unpickler, a truncated or
    corrupt file, or one of another format raises a one-line :class:`RunDirError` naming it."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise RunDirError(
            f"{path} holds objects other than tensors and plain data; refused, because loading it would run "
            "code from the file (every checkpoint dsgd-verify writes loads safely)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ValueError... for bad files
        text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise RunDirError(f"{path} is not a readable checkpoint (truncated or corrupt: {text})") from None
    if not isinstance(obj, dict) or obj.get("format") != CKPT_FORMAT:
        raise RunDirError(f"{path} is not a verify run checkpoint ({CKPT_FORMAT})")
    rng, bufs, mom, W = obj.get("rng"), obj.get("buffers"), obj.get("momentum"), obj.get("W")
    ok = (
        isinstance(obj.get("step"), int) and obj["step"] >= 0 and isinstance(obj.get("execution"), str)
        and isinstance(W, torch.Tensor) and W.dim() == 2 and W.is_floating_point()
        and (mom is None or (isinstance(mom, torch.Tensor) and mom.shape == W.shape))
        and isinstance(bufs, dict) and all(isinstance(v, torch.Tensor) for v in bufs.values())
        and isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
        and rng["torch"].dtype == torch.uint8
    )  # fmt: skip
    if not ok:
        raise RunDirError(
            f"{path} is a damaged verify run checkpoint (a field is missing or of the wrong type)"
        )
    return obj


def load_ckpt(
    out: Path, device: torch.device, m: int, d: int, buffers: dict[str, torch.Tensor]
) -> tuple[State, str]:
    """The :class:`State` in ``out/ckpt.pt`` (checked against ``m`` workers of ``d`` parameters and the
    model's ``buffers``) and its execution; restores the torch RNG state saved with it."""
    path = out / "ckpt.pt"
    if not path.is_file():
        raise RunDirError(
            f"{out} holds no checkpoint (ckpt.pt) to resume from: start the run again with --overwrite"
        )
    obj = read_ckpt(path)
    W, bufs = obj["W"], obj["buffers"]
    want = {k: (m, *v.shape) for k, v in buffers.items()}
    if tuple(W.shape) != (m, d) or {k: tuple(v.shape) for k, v in bufs.items()} != want:
        raise RunDirError(
            f"{path} holds {W.shape[0]} workers of {W.shape[1]} parameters (buffers {sorted(bufs)}); the run "
            f"has {m} of {d} (buffers {sorted(want)})"
        )
    torch.set_rng_state(obj["rng"]["torch"])
    if "cuda" in obj["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(obj["rng"]["cuda"])
    mom = obj["momentum"]
    state = State(
        W.to(device), {k: v.to(device) for k, v in bufs.items()},
        None if mom is None else mom.to(device), int(obj["step"]),
    )  # fmt: skip
    return state, str(obj["execution"])


def save_average(
    out: Path, problem: Any, w_a: torch.Tensor, buffers: dict[str, torch.Tensor], extra: dict
) -> bool:
    """Write ``avg.pt`` for a neural problem with a known ``arch``; returns whether it was written."""
    arch = getattr(problem, "arch", None)
    model = getattr(problem, "model", None)
    if arch is None or model is None:
        return False
    clone = copy.deepcopy(model)
    state = {**clone.state_dict(), **buffers, **problem.unflatten(w_a.detach())}
    clone.load_state_dict({k: v.detach() for k, v in state.items()})
    save_checkpoint(out / "avg.pt", clone, arch=arch, arch_kwargs=problem.arch_kwargs, extra=extra)
    return True
