"""Readers for data files: ``.pt``/``.npz`` arrays, CIFAR-10 python pickles, and idx files (Fashion-MNIST).

Each reader returns ``(x, y, meta)`` with ``x`` a float32 tensor and ``y`` an int64 (labels) or float32
(regression) tensor; :mod:`sharpness.data` wraps them into a :class:`~sharpness.data.Dataset`.
Nothing here runs code from a file: ``.pt`` files load with ``weights_only=True``, ``.npz`` with
``allow_pickle=False``, and CIFAR pickles through an unpickler that admits only numpy's array globals.
"""

from __future__ import annotations

import _codecs
import gzip
import io
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .functional import SharpnessInputError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as NP_RECONSTRUCT
    from numpy._core.multiarray import scalar as NP_SCALAR  # noqa: F401 (for sharpness.checkpoint)
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as NP_RECONSTRUCT  # type: ignore[no-redef]

XY = tuple[Tensor, Tensor, dict[str, Any]]
KEY_PAIRS = (("x", "y"), ("inputs", "targets"), ("data", "labels"))
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def as_xy(x: Any, y: Any, where: str) -> tuple[Tensor, Tensor]:
    """Inputs as float32 (a 1-D input becomes one feature), targets as int64 labels or float32 values; integer
    labels of shape (N, 1) become (N,)."""
    try:
        xt = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
        yt = y if isinstance(y, Tensor) else torch.as_tensor(np.asarray(y))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SharpnessInputError(f"{where}: inputs/targets are not numeric arrays ({exc})") from exc
    if xt.dtype.is_complex or yt.dtype.is_complex or xt.ndim == 0 or yt.ndim == 0:
        raise SharpnessInputError(f"{where}: inputs and targets must be real arrays with a sample axis")
    if xt.shape[0] != yt.shape[0]:
        raise SharpnessInputError(f"{where}: {xt.shape[0]} inputs but {yt.shape[0]} targets")
    if xt.shape[0] == 0:
        raise SharpnessInputError(f"{where}: holds no samples")
    xt = xt.detach().to(torch.float32)
    if xt.ndim == 1:
        xt = xt[:, None]
    if yt.dtype.is_floating_point:
        yt = yt.detach().to(torch.float32)
    else:
        yt = yt.detach().to(torch.int64)
        if yt.ndim == 2 and yt.shape[1] == 1:  # a column of class labels: one label per sample either way
            yt = yt[:, 0]
        if int(yt.min()) < 0:
            raise SharpnessInputError(f"{where}: labels must be >= 0, found {int(yt.min())}")
    return xt.contiguous(), yt.contiguous()


def pick_xy(obj: Any, where: str) -> tuple[Any, Any]:
    """Inputs and targets from a mapping with keys x/y, inputs/targets or data/labels, or an (x, y) pair."""
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return obj[0], obj[1]
    if hasattr(obj, "keys"):
        keys = list(obj.keys())
        for kx, ky in KEY_PAIRS:
            if kx in keys and ky in keys:
                return obj[kx], obj[ky]
        raise SharpnessInputError(
            f"{where}: has keys {sorted(map(str, keys))[:10]}, expected x/y, inputs/targets or data/labels"
        )
    raise SharpnessInputError(
        f"{where}: holds a {type(obj).__name__}, expected a dict with x/y or an (x, y) pair"
    )


def read_array_file(path: Path) -> XY:
    """A ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.npz`` (``allow_pickle=False``) file."""
    where = f"data file {path}"
    if not path.is_file():
        raise SharpnessInputError(f"{where} not found")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                obj: Any = {k: npz[k] for k in npz.files}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a malformed file
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SharpnessInputError(f"{where} is unreadable or malformed: {msg[:200]}") from exc
    x, y = as_xy(*pick_xy(obj, where), where)
    return x, y, {"file": str(path)}


# --------------------------------------------------------------------------------------------- CIFAR-10


def _allowed_globals() -> dict[tuple[str, str], Any]:
    rec = NP_RECONSTRUCT
    return {
        ("numpy.core.multiarray", "_reconstruct"): rec,
        ("numpy._core.multiarray", "_reconstruct"): rec,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,  # how Python 3 writes bytes at pickle protocol 2
    }


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, bytes, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: only plain arrays are allowed"
        )


def safe_unpickle(path: Path) -> Any:
    """Unpickle ``path`` with :class:`ArrayUnpickler` (``encoding='bytes'`` for Python 2 pickles)."""
    try:
        with open(path, "rb") as fh:
            return ArrayUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - refusal or corruption: one line either way
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SharpnessInputError(f"cannot unpickle {path}: {msg}") from exc


def _find_files(root: Path, names: list[str], kind: str) -> dict[str, Path]:
    if not root.is_dir():
        raise SharpnessInputError(f"{kind} data folder not found: {root}")
    found: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name in names and p.name not in found:
            found[p.name] = p
    return found


def read_cifar10(root: Path, split: str) -> XY:
    """CIFAR-10 python batches under ``root`` (searched recursively): ``data_batch_1..5`` (train) and
    ``test_batch`` (test). ``x = (pixels/255 - mean)/std`` per channel, shape (N, 3, 32, 32)."""
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    needed = names["train"] + names["test"] if split == "all" else names[split]
    found = _find_files(root, needed, "cifar10")
    missing = [n for n in needed if n not in found]
    if missing:
        raise SharpnessInputError(
            f"cifar10:{root}: missing batch file(s) {', '.join(missing)} "
            "(expected the contents of cifar-10-batches-py)"
        )
    xs, ys = [], []
    for n in needed:
        d = safe_unpickle(found[n])
        if not isinstance(d, dict):
            raise SharpnessInputError(f"{found[n]}: not a CIFAR batch (holds a {type(d).__name__})")
        data = d.get(b"data", d.get("data"))
        labels = d.get(b"labels", d.get("labels"))
        if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 or labels is None:
            raise SharpnessInputError(f"{found[n]}: not a CIFAR batch (needs 'data' N x 3072 and 'labels')")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (data.shape[0],):
            raise SharpnessInputError(f"{found[n]}: {data.shape[0]} images but {labels.size} labels")
        xs.append(data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32))
        ys.append(labels)
    x = torch.from_numpy(np.concatenate(xs)).to(torch.float32) / 255.0
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    y = torch.from_numpy(np.concatenate(ys))
    return x, y, {"folder": str(root), "files": needed, "mean": CIFAR_MEAN, "std": CIFAR_STD}


# --------------------------------------------------------------------------------------------- idx files

IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_NAME = re.compile(r"^(train|t10k)-(images|labels)[-.]idx[13]-ubyte(\.gz)?$")


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (gzipped or not): magic ``00 00 TYPE NDIM``, NDIM big-endian int32 sizes, data."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise SharpnessInputError(f"{path}: unreadable idx file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise SharpnessInputError(f"{path}: not an idx file (bad magic number)")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise SharpnessInputError(f"{path}: truncated idx header")
    dims = tuple(int(v) for v in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise SharpnessInputError(
            f"{path}: idx data has {len(raw) - offset} bytes, header {dims} needs {expected} (truncated?)"
        )
    return np.frombuffer(raw, dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx_images(root: Path, split: str, kind: str = "fashion-mnist") -> XY:
    """Image/label idx pairs under ``root`` (searched recursively, ``.gz`` or not): ``train-*``, ``t10k-*``.

    ``x = pixels/255``, shape (N, 1, H, W).
    """
    if not root.is_dir():
        raise SharpnessInputError(f"{kind} data folder not found: {root}")
    files: dict[tuple[str, str], Path] = {}
    for p in sorted(root.rglob("*")):
        m = IDX_NAME.match(p.name)
        if m and p.is_file():
            files.setdefault((m.group(1), m.group(2)), p)
    parts = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}[split]
    missing = [f"{s}-{k}" for s in parts for k in ("images", "labels") if (s, k) not in files]
    if missing:
        raise SharpnessInputError(
            f"{kind}:{root}: missing idx file(s) {', '.join(m + '-idx?-ubyte[.gz]' for m in missing)}"
        )
    xs, ys = [], []
    for s in parts:
        img, lab = read_idx(files[(s, "images")]), read_idx(files[(s, "labels")])
        if img.ndim != 3 or lab.ndim != 1 or img.shape[0] != lab.shape[0]:
            raise SharpnessInputError(
                f"{kind}:{root}: {s} images have shape {img.shape} but labels {lab.shape}"
            )
        xs.append(img.reshape(img.shape[0], 1, img.shape[1], img.shape[2]))
        ys.append(lab.astype(np.int64))
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32)) / 255.0
    y = torch.from_numpy(np.concatenate(ys))
    used = [str(files[(s, k)]) for s in parts for k in ("images", "labels")]
    return x, y, {"folder": str(root), "files": used}


def parse_options(spec: str, parts: list[str], allowed: dict[str, type]) -> dict[str, Any]:
    """``["key=value", ...]`` of a data spec as ``{key: allowed[key](value)}``; unknown keys and bad values
    raise one line."""
    out: dict[str, Any] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or key not in allowed:
            raise SharpnessInputError(
                f"data spec {spec!r}: unknown option {part!r} (allowed: {', '.join(allowed)})"
            )
        try:
            out[key] = allowed[key](value)
        except ValueError as exc:
            raise SharpnessInputError(
                f"data spec {spec!r}: option {key} needs a number, got {value!r}"
            ) from exc
    return out
