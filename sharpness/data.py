"""Data sets named by a spec string, and how they are split among workers.

``load_dataset(spec, split=..., samples=..., seed=...)`` understands:

- ``digits``: the embedded 1797 handwritten digits (UCI "Optical Recognition of Handwritten Digits",
  Alpaydin & Kaynak 1998, CC BY 4.0; see ``sharpness/DATA_LICENSE``), ``x`` (N, 1, 8, 8) = grey level / 16.
  Train/test is a stratified 80/20 split drawn once with the fixed seed 0, so the test set never changes.
- ``synthetic:N[:d=20][:classes=10][:hidden=32][:seed=0]``: N points in all, ``x ~ N(0, I_d)`` and
  ``y = argmax_c (z_c - mu_c) / s_c`` with ``z = tanh(x W1 / sqrt(d) + b1) W2`` a random teacher drawn from
  ``seed`` and ``mu, s`` its output mean and std on 4096 reference points (so the classes are about balanced);
  the data is fixed by the spec alone, split 80/20 like ``digits``.
- ``FILE.pt`` / ``FILE.npz``: inputs and targets under keys x/y, inputs/targets or data/labels (or an
  ``(x, y)`` pair); the file is the data, so ``split`` does not apply.
- ``cifar10:DIR`` (python-pickle batches), ``fashion-mnist:DIR`` (idx files; ``mnist:DIR`` reads the same
  layout), see :mod:`sharpness.datafiles`. ``fashion-mnist`` alone reads Debian's ``dataset-fashion-mnist``
  package at :data:`FASHION_MNIST_DIR`; a missing folder names the command that installs it.
- ``tokens:FILE[:seq=T][:pad=ID]`` (``.npy``/``.pt`` of token ids; a bare ``FILE.npy`` too) and
  ``text:FILE[:seq=T]`` (bytes as ids): token data for ``--loss lm``, see :mod:`sharpness.tokens`.
- ``MODULE:CALLABLE``: called as ``fn(split=split)`` (or ``fn()`` when it takes no ``split``); returns a
  :class:`Dataset`, an ``(x, y)`` pair, or an iterable of ``(x, y)`` batches.

``samples=N`` keeps a seeded subset of N points (``seed``); it is the only use of ``seed``.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .datafiles import as_xy, parse_options, read_array_file, read_cifar10, read_idx_images
from .functional import SharpnessInputError, check_seed
from .importing import import_callable
from .tokens import is_token_spec, load_tokens

SPLITS = ("train", "test", "all")
SPLIT_SEED = 0
TEST_FRACTION = 0.2
SPECS_HELP = (
    "digits, synthetic:N, FILE.pt, FILE.npz, cifar10:DIR, fashion-mnist[:DIR], tokens:FILE, text:FILE or "
    "MODULE:CALLABLE"
)
#: where Debian's ``dataset-fashion-mnist`` package installs the idx files
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = (
    "install it with 'sudo apt-get install dataset-fashion-mnist' (as a normal user: 'apt-get download "
    "dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb DIR', then use "
    "fashion-mnist:DIR/usr/share/datasets/fashion-mnist)"
)


@dataclass
class Dataset:
    """Inputs ``x`` (float32, N x C x H x W or N x F) and targets ``y`` (int64 labels, or float targets with
    ``num_classes = None``), a name and free-form ``meta`` (JSON-ready: where it came from, split, subset)."""

    x: Tensor
    y: Tensor
    num_classes: int | None
    name: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise SharpnessInputError(
                f"data set {self.name}: {self.x.shape[0]} inputs but {self.y.shape[0]} targets"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. (1, 8, 8) or (20,)."""
        return tuple(self.x.shape[1:])

    def take(self, indices: Tensor) -> Dataset:
        """The points at ``indices`` (same meta)."""
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.x.device)
        return replace(self, x=self.x[idx], y=self.y[idx], meta=dict(self.meta))

    def subset(self, n: int, seed: int = 0) -> Dataset:
        """``min(n, len)`` points drawn without replacement (``torch.randperm`` seeded with ``seed``), kept
        in their original order."""
        if int(n) < 1:
            raise SharpnessInputError(f"samples must be >= 1, got {n}")
        k = min(int(n), len(self))
        g = torch.Generator().manual_seed(check_seed(seed))
        idx = torch.randperm(len(self), generator=g)[:k].sort().values
        out = self.take(idx)
        out.meta["subset"] = {"requested": int(n), "taken": k, "seed": int(seed)}
        return out

    def batches(self, batch_size: int | None = None) -> list[tuple[Tensor, Tensor]]:
        """Consecutive ``(x, y)`` batches of ``batch_size`` (the last may be smaller); ``None``: one batch."""
        if batch_size is None:
            return [(self.x, self.y)]
        if int(batch_size) < 1:
            raise SharpnessInputError(f"batch size must be >= 1, got {batch_size}")
        b = int(batch_size)
        return [(self.x[i : i + b], self.y[i : i + b]) for i in range(0, len(self), b)]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Dataset:
        """Move to ``device``; cast float ``x`` (and float targets) to ``dtype``. Integer labels and integer
        inputs (token ids) stay int64."""
        x = self.x.to(device=device, dtype=dtype if self.x.is_floating_point() else None)
        y = self.y.to(device=device, dtype=dtype if self.y.is_floating_point() else None)
        return replace(self, x=x, y=y, meta=dict(self.meta))


def num_features(dataset: Dataset) -> int:
    """Number of input features per point, ``prod(input_shape)``."""
    return int(math.prod(dataset.input_shape))


def stratified_split(y: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED):
    """Sorted ``(train_idx, test_idx)``: in each class, ``round(test_fraction * n_c)`` points drawn by
    ``numpy.random.default_rng(seed)`` go to test, the rest to train."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        test.append(rng.permutation(members)[: int(round(test_fraction * members.size))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(y.size), test_idx)
    return train_idx, test_idx


def _split_rows(x: Tensor, y: Tensor, split: str) -> tuple[Tensor, Tensor]:
    if split == "all":
        return x, y
    train_idx, test_idx = stratified_split(y.numpy())
    idx = torch.from_numpy(train_idx if split == "train" else test_idx)
    return x[idx], y[idx]


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    with resources.files("sharpness").joinpath("digits.npz").open("rb") as fh:
        with np.load(fh, allow_pickle=False) as npz:
            return npz["x"].copy(), npz["y"].copy()


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """The fixed ``(train_idx, test_idx)`` of the embedded digits (stratified 80/20, seed 0)."""
    return stratified_split(_digits_arrays()[1].astype(np.int64))


def _digits(split: str) -> Dataset:
    xs, ys = _digits_arrays()
    x = torch.from_numpy(xs.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(ys.astype(np.int64))
    x, y = _split_rows(x, y, split)
    meta = {"source": "UCI optdigits (Alpaydin & Kaynak 1998), CC BY 4.0", "split_seed": SPLIT_SEED}
    return Dataset(x, y, 10, "digits", meta)


def _synthetic(spec: str, split: str) -> Dataset:
    parts = spec.split(":")[1:]
    try:
        n = int(parts[0])
    except (IndexError, ValueError) as exc:
        raise SharpnessInputError(
            f"data spec {spec!r}: expected synthetic:N with N a number of points"
        ) from exc
    opts = {"d": 20, "classes": 10, "hidden": 32, "seed": 0}
    opts.update(parse_options(spec, parts[1:], {k: int for k in opts}))
    if n < 1 or opts["d"] < 1 or opts["classes"] < 2 or opts["hidden"] < 1:
        raise SharpnessInputError(f"data spec {spec!r}: need N >= 1, d >= 1, classes >= 2, hidden >= 1")
    g = torch.Generator().manual_seed(opts["seed"])
    d, h, c = opts["d"], opts["hidden"], opts["classes"]
    w1 = torch.randn(d, h, generator=g, dtype=torch.float64)
    b1 = torch.randn(h, generator=g, dtype=torch.float64)
    w2 = torch.randn(h, c, generator=g, dtype=torch.float64)
    teacher = lambda v: torch.tanh(v @ w1 / math.sqrt(d) + b1) @ w2
    ref = teacher(torch.randn(4096, d, generator=g, dtype=torch.float64))  # balances the classes
    mu, sd = ref.mean(0), ref.std(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = ((teacher(x) - mu) / sd).argmax(dim=1)
    x, y = _split_rows(x.to(torch.float32), y, split)
    return Dataset(x, y, c, spec, {"teacher": "tanh one-hidden-layer", **opts, "points": n})


def _from_callable(spec: str, split: str) -> Dataset:
    fn = import_callable(spec, what="data spec")
    try:
        params = inspect.signature(fn).parameters
        takes_split = "split" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        takes_split = True
    try:
        out = fn(split=split) if takes_split else fn()
    except SharpnessInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's loader failed: one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SharpnessInputError(f"data spec {spec!r} raised {type(exc).__name__}: {msg}") from exc
    if isinstance(out, Dataset):
        return out
    where = f"data spec {spec!r}"
    if isinstance(out, (tuple, list)) and len(out) == 2 and not isinstance(out[0], (tuple, list)):
        x, y = as_xy(out[0], out[1], where)
    else:
        try:
            batches = [tuple(b) for b in out]
        except TypeError as exc:
            raise SharpnessInputError(f"{where} returned a {type(out).__name__}, not data") from exc
        if not batches or any(len(b) != 2 for b in batches):
            raise SharpnessInputError(f"{where} must return a Dataset, an (x, y) pair or (x, y) batches")
        pairs = [as_xy(bx, by, f"{where} batch {i}") for i, (bx, by) in enumerate(batches)]
        for i, (bx, by) in enumerate(pairs):
            for kind, t, first in (("inputs", bx, pairs[0][0]), ("targets", by, pairs[0][1])):
                if t.shape[1:] != first.shape[1:] or t.dtype != first.dtype:
                    raise SharpnessInputError(
                        f"{where}: batch {i} has {kind} of shape {tuple(t.shape[1:])} ({t.dtype}) per "
                        f"sample, batch 0 has {tuple(first.shape[1:])} ({first.dtype})"
                    )
        x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    return _wrap(x, y, spec, {"callable": spec, "split": split})


def _wrap(x: Tensor, y: Tensor, name: str, meta: dict[str, Any]) -> Dataset:
    classes = None if y.is_floating_point() else int(y.max()) + 1
    return Dataset(x, y, classes, name, meta)


def load_dataset(spec: str, *, split: str = "test", samples: int | None = None, seed: int = 0) -> Dataset:
    """Load the data set named by ``spec`` (see the module docstring); ``split`` is train, test or all.

    Bad specs, missing files or folders and malformed files raise a one-line :class:`SharpnessInputError`.
    """
    if split not in SPLITS:
        raise SharpnessInputError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if not isinstance(spec, str) or not spec.strip():
        raise SharpnessInputError(f"empty data spec: expected {SPECS_HELP}")
    spec = spec.strip()
    head, _, rest = spec.partition(":")
    if spec == "digits":
        ds = _digits(split)
    elif is_token_spec(spec):
        x, y, vocab, meta = load_tokens(spec)
        ds = Dataset(x, y, vocab, Path(meta["file"]).name, meta)
    elif head == "synthetic":
        ds = _synthetic(spec, split)
    elif head == "cifar10" and rest:
        x, y, meta = read_cifar10(Path(rest).expanduser(), split)
        ds = Dataset(x, y, 10, "cifar10", meta)
    elif spec == "fashion-mnist" or (head in ("fashion-mnist", "mnist") and rest):
        root = Path(rest or FASHION_MNIST_DIR).expanduser()
        if not root.is_dir():
            hint = f"; {FASHION_MNIST_INSTALL}" if head == "fashion-mnist" else ""
            raise SharpnessInputError(f"{head} data folder not found: {root}{hint}")
        x, y, meta = read_idx_images(root, split, kind=head)
        ds = Dataset(x, y, 10, head, meta)
    elif spec.lower().endswith((".pt", ".pth", ".npz")):
        x, y, meta = read_array_file(Path(spec).expanduser())
        ds = _wrap(x, y, Path(spec).name, {**meta, "split": "file (split does not apply)"})
    elif Path(spec).exists():
        raise SharpnessInputError(
            f"data file {spec} has an unsupported type: use .pt, .npz or a spec ({SPECS_HELP})"
        )
    elif rest and head.replace(".", "").replace("_", "").isalnum():
        ds = _from_callable(spec, split)
    else:
        raise SharpnessInputError(f"unknown data spec {spec!r}: expected {SPECS_HELP}")
    ds.meta.setdefault("spec", spec)
    ds.meta.setdefault("split", split)
    if samples is not None:
        ds = ds.subset(samples, seed)
    return ds


def shards(dataset: Dataset, m: int, seed: int, alpha: float | None = None) -> list[Tensor]:
    """Disjoint index sets of equal size ``n = N // m`` for ``m`` workers (sorted int64 tensors).

    ``alpha=None``: i.i.d., consecutive slices of one ``randperm(N)`` seeded by ``seed`` (the remainder
    ``N mod m`` is dropped). ``alpha > 0``: label skew; worker ``j`` draws class proportions
    ``q_j ~ Dirichlet(alpha 1_C)`` and takes ``n`` points by multinomial draws from ``q_j`` restricted to the
    classes still available (workers in order, so the last ones take what remains).
    Small ``alpha`` means strong skew; ``alpha -> inf`` approaches the i.i.d. split.
    """
    n_total = len(dataset)
    if int(m) < 1 or n_total < int(m):
        raise SharpnessInputError(f"cannot split {n_total} points into {m} non-empty shards")
    m, n = int(m), n_total // int(m)
    if alpha is None:
        perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(int(seed)))
        return [perm[j * n : (j + 1) * n].sort().values for j in range(m)]
    if not alpha > 0:
        raise SharpnessInputError(f"Dirichlet alpha must be > 0, got {alpha}")
    if dataset.y.is_floating_point() or dataset.y.ndim != 1:
        raise SharpnessInputError("Dirichlet label skew needs integer class labels")
    y = dataset.y.cpu().numpy()
    rng = np.random.default_rng(int(seed))
    classes = np.unique(y)
    pools = [list(rng.permutation(np.flatnonzero(y == c))) for c in classes]
    left = np.array([len(p) for p in pools])
    out = []
    for _ in range(m):
        q = rng.dirichlet(np.full(classes.size, float(alpha)))
        counts = np.zeros(classes.size, dtype=np.int64)
        need = n
        while need > 0:
            avail = left - counts
            p = np.where(avail > 0, q, 0.0)
            p = p / p.sum() if p.sum() > 0 else (avail > 0) / (avail > 0).sum()
            draw = np.minimum(rng.multinomial(need, p), avail)
            counts += draw
            need -= int(draw.sum())
        idx = []
        for c, k in enumerate(counts):
            idx.extend(pools[c][:k])
            pools[c] = pools[c][k:]
        left -= counts
        out.append(torch.as_tensor(np.sort(np.asarray(idx, dtype=np.int64))))
    return out
