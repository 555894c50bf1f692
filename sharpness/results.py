"""Result types and atomic writing.

Every measurement returns a dataclass derived from :class:`Result`; ``to_dict()`` is JSON-ready (tensors and
arrays become lists, dtypes and devices become strings) and always carries the settings, the seed, the device
and the torch version. Files are written atomically: a temporary file in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .functional import SharpnessInputError


def jsonable(obj: Any) -> Any:
    """Convert tensors, arrays, numpy scalars, dtypes, devices and dataclasses to plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    return obj


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def environment(device: torch.device | str | None = None) -> dict[str, str]:
    """Versions of everything that shapes the numbers (scipy, matplotlib, tqdm and this toolkit read from the
    installed distributions' metadata, so nothing is imported for it), the platform, torch's thread count
    and the device: recorded with every result (``sharpness --out``, a verify run's ``config.json``).
    Cost: a few metadata reads."""
    device = torch.device(device if device is not None else "cpu")
    env = {
        "sharpness": _version("dsgd-sam"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": _version("scipy"),
        "matplotlib": _version("matplotlib"),
        "tqdm": _version("tqdm"),
        "platform": platform.platform(),
        "device": str(device),
        "threads": str(torch.get_num_threads()),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = str(torch.version.cuda)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


@dataclasses.dataclass
class Result:
    """Base of all results: ``settings`` (every argument that shaped the number), ``seed``, ``device``."""

    settings: dict[str, Any] = dataclasses.field(default_factory=dict, kw_only=True)
    seed: int | None = dataclasses.field(default=None, kw_only=True)
    device: str = dataclasses.field(default="cpu", kw_only=True)
    torch_version: str = dataclasses.field(default=torch.__version__, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(self)


def _umask_mode() -> int:
    """The mode a plain ``open(..., "w")`` would give: 0o666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_destination(path: str | os.PathLike[str], what: str, *, directory: bool = False) -> Path:
    """Raise a one-line :class:`~sharpness.functional.SharpnessInputError` unless ``path`` can be written as a
    file (``directory=False``) or used as a folder of files: an existing path of the other kind, a parent that
    is a file, or a folder this process may not write into. Creates nothing. Cost: a few ``stat`` calls."""
    p = Path(path).expanduser()
    kind = "folder" if directory else "file"
    if p.exists() and p.is_dir() != directory:
        raise SharpnessInputError(f"{what} {path} is a {'file' if directory else 'folder'}, not a {kind}")
    ancestor = p if directory else p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SharpnessInputError(f"{what} {path}: {ancestor} is a file, so the {kind} cannot be written")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SharpnessInputError(f"{what} {path}: no permission to write in {ancestor}")
    return p


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` (made JSON-ready by :func:`jsonable`) as indented JSON."""
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=2) + "\n")


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary path in the target folder, then rename it onto ``path``.

    A crash or an exception never leaves a half-written ``path``; the file gets the usual permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` through a temporary file and a rename, so a crash never leaves half a checkpoint."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
