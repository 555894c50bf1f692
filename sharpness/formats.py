"""Checkpoint files beyond a bare ``state_dict``: HuggingFace folders, PyTorch Lightning, EMA weights.

Called by :func:`sharpness.checkpoint.load_model` (which reads the files):

- a HuggingFace ``save_pretrained`` folder (``config.json`` + ``model.safetensors``, or ``pytorch_model.bin``
  only with ``trust_pickle``), loaded by ``transformers`` from the local files (:func:`hf_model`; never
  ``trust_remote_code``, so an architecture that needs code from the Hub is refused);
- ``weights_key`` (``--weights-key``): the weights stored under that key (dotted for nesting, e.g.
  ``ema_state_dict`` or ``callbacks.EMA.ema_weights``) instead of the usual ``state_dict``/``model``;
- ``prefix`` (``--prefix``): keep only the keys under that module prefix and strip it (a PyTorch Lightning
  ``.ckpt`` stores ``model.`` + the wrapped network's keys beside e.g. ``loss_fn.``). Without it, a Lightning
  checkpoint (recognised by its ``pytorch-lightning_version`` entry) whose keys all share one first component
  gets it stripped; with several, the error lists them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from .functional import SharpnessInputError

HF_CONFIG = "config.json"
HF_SAFE = "model.safetensors"
HF_PICKLE = "pytorch_model.bin"
LIGHTNING_KEY = "pytorch-lightning_version"


class FormatError(SharpnessInputError):
    """A checkpoint layout that cannot be read as asked; the message is one line."""


def hf_weights_file(folder: Path, trust_pickle: bool) -> Path:
    """The weights file of a ``save_pretrained`` folder: ``model.safetensors``, else ``pytorch_model.bin``
    (a pickle: only with ``trust_pickle``). Sharded checkpoints are refused."""
    if not (folder / HF_CONFIG).is_file():
        raise FormatError(
            f"{folder} is a folder without {HF_CONFIG}: not a HuggingFace save_pretrained folder"
        )
    if (folder / HF_SAFE).is_file():
        return folder / HF_SAFE
    if any(folder.glob("*.safetensors.index.json")) or any(folder.glob("pytorch_model.bin.index.json")):
        raise FormatError(f"{folder} holds a sharded checkpoint; only single-file weights are read")
    if (folder / HF_PICKLE).is_file():
        if not trust_pickle:
            raise FormatError(
                f"{folder} holds {HF_PICKLE}, a pickle; loading it runs code from the file, so pass "
                "--trust-pickle only for a folder you trust (or save it with safe_serialization=True)"
            )
        return folder / HF_PICKLE
    raise FormatError(f"{folder} has {HF_CONFIG} but neither {HF_SAFE} nor {HF_PICKLE}")


def hf_model(folder: Path, trust_pickle: bool) -> Any:
    """The model of a ``save_pretrained`` folder, loaded by ``transformers`` from local files only (no
    network, never ``trust_remote_code``), in the dtype it was saved in; tied weights and the config as the
    library defines them. A causal LM when the config names one (``...ForCausalLM``/``...LMHeadModel``),
    else the base model. Cost: reading the weights once."""
    weights = hf_weights_file(folder, trust_pickle)
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    except ImportError as exc:
        raise FormatError(
            f"{folder} is a HuggingFace folder; reading it needs the 'transformers' package "
            "(pip install transformers)"
        ) from exc
    kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    try:
        config = AutoConfig.from_pretrained(str(folder), **kw)
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
        factory = AutoModelForCausalLM if causal else AutoModel
        kw["use_safetensors"] = weights.name == HF_SAFE
        try:
            return factory.from_pretrained(str(folder), dtype="auto", **kw)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            return factory.from_pretrained(str(folder), torch_dtype="auto", **kw)
    except FormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - the library's own failure, as one line
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise FormatError(
            f"HuggingFace folder {folder} cannot be loaded: {type(exc).__name__}: {first}"
        ) from exc


def pick_key(obj: Any, key: str, where: str) -> Any:
    """``obj[k1][k2]...`` for ``key = "k1.k2..."`` (a whole key containing dots is tried first)."""
    if isinstance(obj, Mapping) and key in obj:
        return obj[key]
    cur = obj
    for part in key.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            keys = sorted(map(str, cur.keys()))[:10] if isinstance(cur, Mapping) else type(cur).__name__
            raise FormatError(f"{where}: --weights-key {key!r} not found (at {part!r}; keys there: {keys})")
        cur = cur[part]
    return cur


def is_lightning(obj: Any) -> bool:
    """A PyTorch Lightning checkpoint dict."""
    return isinstance(obj, Mapping) and LIGHTNING_KEY in obj


def choose_prefix(
    state: Mapping[str, Tensor], prefix: str | None, lightning: bool, where: str
) -> tuple[dict[str, Tensor], str | None]:
    """The keys under ``prefix`` with it stripped (see the module docstring); ``(state, None)`` when there is
    nothing to do."""
    state = dict(state)
    if prefix is not None:
        p = prefix if prefix.endswith(".") or not prefix else prefix + "."
        kept = {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
        if not kept:
            tops = sorted({k.split(".")[0] + "." for k in state})[:10]
            raise FormatError(f"{where}: no key starts with --prefix {p!r}; the keys start with {tops}")
        return kept, p
    if not lightning:
        return state, None
    tops = sorted({k.split(".")[0] for k in state if "." in k})
    if len(tops) == 1 and all(k.startswith(tops[0] + ".") for k in state):
        p = tops[0] + "."
        return {k[len(p) :]: v for k, v in state.items()}, p
    raise FormatError(
        f"{where}: a Lightning checkpoint whose keys start with {[t + '.' for t in tops][:10]}: choose the "
        "network with --prefix (e.g. --prefix model.)"
    )
