"""Token data for language models: integer id files and raw text through a byte-level tokenizer.

Specs (``--data``), each giving inputs ``x`` = token ids (N, T) int64 and targets ``y`` = the same ids with
padding positions set to :data:`~sharpness.sequence.IGNORE_INDEX` (``--loss lm`` shifts them by one):

- ``tokens:FILE[:seq=T][:pad=ID]`` with FILE a ``.npy`` (``allow_pickle=False``) or ``.pt``
  (``weights_only=True``) file of integer ids: a 2-D (N, T) array is used as is; a 1-D stream is cut into
  rows of ``seq`` ids (default 64; the last, shorter row is padded). ``pad=ID`` marks the id used for
  padding in the file (left out of the loss). A bare ``FILE.npy`` holding an integer array reads the same.
- ``text:FILE[:seq=T]``: the file's bytes are the ids (vocabulary 256, no merges: a byte-level tokenizer),
  cut into rows of ``seq`` (default 64); the last row is padded with id 0, its padding left out of the loss.

The vocabulary size recorded (``num_classes``) is ``max id + 1`` (256 for text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .datafiles import parse_options
from .functional import SharpnessInputError
from .sequence import IGNORE_INDEX

DEFAULT_SEQ = 64


def _options(spec: str, parts: list[str], allowed: tuple[str, ...]) -> dict[str, int]:
    out = parse_options(spec, parts, {k: int for k in allowed})
    if out.get("seq", DEFAULT_SEQ) < 2:
        raise SharpnessInputError(f"data spec {spec!r}: seq must be >= 2 (a next-token loss needs two ids)")
    return out


def _split_spec(spec: str) -> tuple[str, list[str]]:
    """``head:FILE:opt=..`` -> (FILE, options); a FILE may itself contain ':' only before the options."""
    body = spec.partition(":")[2]
    parts = body.split(":")
    opts = [p for p in parts if "=" in p]
    path = ":".join(p for p in parts if "=" not in p)
    return path, opts


def rows(stream: Tensor, seq: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """A 1-D id stream cut into rows of ``seq`` (the last padded with ``pad_id``), and the padding mask."""
    n = stream.numel()
    count = -(-n // seq)
    x = torch.full((count * seq,), pad_id, dtype=torch.int64)
    x[:n] = stream
    mask = torch.zeros(count * seq, dtype=torch.bool)
    mask[n:] = True
    return x.reshape(count, seq), mask.reshape(count, seq)


def _as_ids(obj: Any, where: str) -> Tensor:
    t = obj if isinstance(obj, Tensor) else torch.as_tensor(np.asarray(obj))
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() not in (1, 2):
        raise SharpnessInputError(f"{where}: expected a 1-D or 2-D array of integer token ids, got {t.dtype} "
                                  f"of shape {tuple(t.shape)}")  # fmt: skip
    if t.numel() == 0:
        raise SharpnessInputError(f"{where}: holds no tokens")
    if int(t.min()) < 0:
        raise SharpnessInputError(f"{where}: token ids must be >= 0, found {int(t.min())}")
    return t.to(torch.int64)


def read_token_file(path: Path, where: str) -> Tensor:
    """Integer ids from a ``.npy`` (no pickles) or ``.pt`` (``weights_only``) file; a dict must hold them
    under ``tokens``, ``input_ids`` or ``x``."""
    if not path.is_file():
        raise SharpnessInputError(f"{where}: file {path} not found")
    try:
        if path.suffix.lower() == ".npy":
            obj: Any = np.load(path, allow_pickle=False)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a malformed file
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SharpnessInputError(f"{where}: {path} is unreadable or malformed: {msg}") from exc
    if isinstance(obj, dict):
        key = next((k for k in ("tokens", "input_ids", "x") if k in obj), None)
        if key is None:
            raise SharpnessInputError(f"{where}: a dict needs the ids under tokens, input_ids or x")
        obj = obj[key]
    return _as_ids(obj, where)


def load_tokens(spec: str) -> tuple[Tensor, Tensor, int, dict[str, Any]]:
    """``(x, y, vocabulary, meta)`` for a ``tokens:``/``text:``/``FILE.npy`` spec (module docstring)."""
    head = spec.partition(":")[0]
    if head in ("tokens", "text"):
        path_text, parts = _split_spec(spec)
    else:
        path_text, parts = spec, []
    path = Path(path_text).expanduser()
    where = f"data spec {spec!r}"
    if head == "text":
        opts = _options(spec, parts, ("seq",))
        if not path.is_file():
            raise SharpnessInputError(f"{where}: file {path} not found")
        data = path.read_bytes()
        if not data:
            raise SharpnessInputError(f"{where}: {path} is empty")
        stream = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
        x, mask = rows(stream, opts.get("seq", DEFAULT_SEQ), 0)
        vocab, pad = 256, None
        meta = {"tokenizer": "bytes (vocabulary 256)", "bytes": len(data)}
    else:
        opts = _options(spec, parts, ("seq", "pad"))
        ids = read_token_file(path, where)
        pad = opts.get("pad")
        if ids.dim() == 1:
            x, mask = rows(ids, opts.get("seq", DEFAULT_SEQ), pad if pad is not None else 0)
        else:
            x, mask = ids, torch.zeros_like(ids, dtype=torch.bool)
        if pad is not None:
            mask = mask | (x == pad)
        vocab = int(x.max()) + 1
        meta = {"tokenizer": "none (ids from the file)"}
    y = x.masked_fill(mask, IGNORE_INDEX)
    meta.update({"file": str(path), "seq": int(x.shape[1]), "rows": int(x.shape[0]), "vocabulary": vocab,
                 "padding_positions": int(mask.sum()), "pad_id": pad})  # fmt: skip
    meta["split"] = "file (split does not apply)"
    return x, y, vocab, meta


def is_token_spec(spec: str) -> bool:
    """``tokens:...``, ``text:...``, or a ``.npy`` file."""
    head = spec.partition(":")[0]
    return head in ("tokens", "text") or spec.lower().endswith(".npy")
