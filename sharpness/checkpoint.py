"""Checkpoints in, models out: every common way a PyTorch model is saved, detected from the file.

``load_model(path, arch=..., ...)`` reads, in this order of detection:

1. ``.safetensors`` (optional dependency ``safetensors``) + ``arch``;
2. a TorchScript archive (``torch.jit.load``), wrapped in :class:`ScriptedModel` so that the functional core
   (``torch.func.functional_call``) can substitute its parameters;
3. ``torch.load(weights_only=True)``: this toolkit's own format (``{"format": "dsgd-sam/1", "arch", ...}``,
   no ``arch`` needed when it names one of :data:`TOOLKIT_ARCHS`), or a plain ``state_dict`` (also nested
   under ``state_dict``/``model``/``model_state_dict``, with the ``module.`` prefix of DataParallel/DDP
   stripped) + ``arch``;
4. a whole pickled ``nn.Module`` only with ``trust_pickle=True`` (unpickling runs code from the file).

What may run code: a file never causes an import or a call by itself. The ``arch`` a toolkit checkpoint
records is imported and called only when it is one of the toolkit's own constructors (:data:`TOOLKIT_ARCHS`,
exact strings), when the caller passes ``arch=`` (``--arch``: the user named the code), or with
``trust_checkpoint_arch=True`` (``--trust-checkpoint-arch``); a pickle is unpickled only with
``trust_pickle=True``.

Every failure raises :class:`CheckpointError` with one line naming the problem.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .datafiles import NP_RECONSTRUCT, NP_SCALAR
from .formats import HF_CONFIG, choose_prefix, hf_model, is_lightning, pick_key
from .functional import SharpnessInputError, resolve_device
from .importing import import_callable
from .results import atomic_torch_save
from .scripted import ScriptedModel

FORMAT = "dsgd-sam/1"
#: The toolkit's own model constructors, by exact ``MODULE:NAME``: a toolkit checkpoint naming one of these is
#: rebuilt with no flag (``dsgd-verify``'s ``avg.pt``, ``sharpness --demo``). Any other callable named by a
#: file runs only with ``arch=``/``--arch`` or ``trust_checkpoint_arch``. Strings, not imports: ``sharpness``
#: does not import ``verify``.
TOOLKIT_ARCHS = frozenset(
    {
        "sharpness.demo:mlp",
        "verify.models:mlp",
        "verify.models:small_cnn",
        "verify.models:resnet18_micro",
    }
)
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(SharpnessInputError):
    """A checkpoint that cannot be turned into a model; the message is one line."""


def _line(exc: BaseException) -> str:
    """The exception's type and first sentence, on one line."""
    text = str(exc).strip()
    text = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def _check_plain(obj: Any, where: str) -> None:
    """``extra``/``arch_kwargs`` must reload under ``weights_only=True``: containers, numbers, tensors."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where}: key {k!r} is not a str or int")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not (obj is None or isinstance(obj, (str, int, float, bool, Tensor, torch.dtype, torch.device))):
        raise CheckpointError(
            f"{where} holds a {type(obj).__name__}: only dicts, lists, numbers, str and tensors"
        )


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    arch: str,
    arch_kwargs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``{"format", "arch", "arch_kwargs", "state_dict", "extra"}`` atomically.

    ``arch`` (MODULE:CALLABLE) must be importable and, called with ``arch_kwargs``, build the model again.
    The file reloads with ``torch.load(weights_only=True)``.
    """
    import_callable(arch, what="arch", error=CheckpointError)
    arch_kwargs = dict(arch_kwargs or {})
    extra = dict(extra or {})
    _check_plain(arch_kwargs, "arch_kwargs")
    _check_plain(extra, "extra")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "state_dict": state,
        "extra": extra,
    }
    return atomic_torch_save(payload, path)


def _safe_globals() -> list[Any]:
    """Harmless globals real checkpoints hold beside the weights: numpy scalars/arrays, Namespace."""
    dtypes = [type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFD"]
    return [NP_SCALAR, NP_RECONSTRUCT, np.ndarray, np.dtype, *dtypes, argparse.Namespace]


def _torch_load(path: Path, trust_pickle: bool) -> tuple[Any, bool]:
    """``torch.load(weights_only=True)``; a refused global falls back to full unpickling only if trusted."""
    ctx = getattr(torch.serialization, "safe_globals", None)
    try:
        if ctx is not None:
            with ctx(_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True), False
        return torch.load(path, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        garbage = "unsupported operand" in str(exc).lower()  # not a pickle stream at all
        if garbage or (not found and "weights only" not in str(exc).lower()):
            raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {_line(exc)}") from exc
        if not trust_pickle:
            name = found.group(1) if found else "an object that is not a tensor"
            raise CheckpointError(
                f"checkpoint {path} holds pickled Python objects, not only tensors (e.g. {name}; a "
                "whole pickled nn.Module looks like this); loading a pickle runs code from the file, so "
                "pass trust_pickle=True (--trust-pickle) only for a file you trust, or save "
                "model.state_dict() instead"
            ) from exc
    except Exception as exc:  # noqa: BLE001 - torch reports corruption with many exception types
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {_line(exc)}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False), True  # only with trust_pickle
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot unpickle checkpoint {path}: {_line(exc)}") from exc


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _strip_prefix(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], str | None]:
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}, prefix
    return state, None


def _list_keys(keys: list[str]) -> str:
    return ", ".join(keys[:10]) + (f", ... ({len(keys) - 10} more)" if len(keys) > 10 else "")


def build_from_state_dict(
    state: Mapping[str, Tensor], arch: str, arch_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """``arch(**arch_kwargs)`` with ``state`` loaded strictly; the model takes the checkpoint's float dtype.

    Key or shape mismatches, and a non-floating tensor (integer, bool, complex) for a floating one of the
    model, raise one :class:`CheckpointError` (up to 10 missing and 10 unexpected keys).
    """
    factory = import_callable(arch, what="--arch", error=CheckpointError)
    try:
        model = factory(**(arch_kwargs or {}))
    except Exception as exc:  # noqa: BLE001 - the user's constructor failed
        raise CheckpointError(f"--arch {arch} failed to build the model: {_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"--arch {arch} returned a {type(model).__name__}, not an nn.Module")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint keys do not match --arch {arch}: {len(missing)} missing [{_list_keys(missing)}], "
            f"{len(unexpected)} unexpected [{_list_keys(unexpected)}]"
        )
    for k, v in expected.items():
        if v.is_floating_point() and not state[k].is_floating_point():
            raise CheckpointError(
                f"checkpoint tensor {k!r} is {state[k].dtype}, not floating point, but the model's is "
                f"{v.dtype}: integer or boolean weights would be cast silently"
            )
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        more = f" (and {len(bad) - 1} more mismatched keys)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"shape mismatch for {k!r}: checkpoint {tuple(state[k].shape)}, "
            f"--arch {arch} model {tuple(expected[k].shape)}{more}"
        )
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(float_dtypes) == 1:
        model = model.to(float_dtypes.pop())
    model.load_state_dict(dict(state), strict=True)
    return model


def _recorded_arch(obj: Mapping[str, Any], path: Path, trusted: bool) -> str:
    """The ``arch`` a toolkit checkpoint records, if the toolkit may import and call it (see the module
    docstring); one line otherwise."""
    arch = obj.get("arch")
    if not isinstance(arch, str) or not arch:
        raise CheckpointError(
            f"checkpoint {path} (format {FORMAT}) records no architecture ('arch'): pass --arch "
            "MODULE:CALLABLE naming a function that builds the model"
        )
    if arch not in TOOLKIT_ARCHS and not trusted:
        raise CheckpointError(
            f"checkpoint {path} names its architecture {arch[:200]!r}, which is not one of the toolkit's own "
            "model constructors; building it would import and call code named by the file: pass --arch "
            "MODULE:CALLABLE yourself, or trust_checkpoint_arch=True (--trust-checkpoint-arch) only for a "
            "file you trust"
        )
    return arch


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_checkpoint_arch: bool = False,
    device: str | torch.device = "cpu",
    weights_key: str | None = None,
    prefix: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load the model in ``path`` (any format in the module docstring), in eval mode on ``device``.

    Returns ``(model, info)``; ``info`` has ``format`` (toolkit, state_dict, safetensors, torchscript,
    pickled_module), ``arch``, ``arch_kwargs``, ``extra``, ``stripped_prefix``, ``nested_key``,
    ``unpickled``, ``num_params``, ``dtype``, ``device`` and ``path``. An explicit ``arch``/``arch_kwargs``
    overrides the one a toolkit checkpoint records. The recorded ``arch`` is used only if it is in
    :data:`TOOLKIT_ARCHS` or ``trust_checkpoint_arch`` is True (importing and calling it runs code named by
    the file). Cost: reading the file, building the model once.
    A HuggingFace folder, ``weights_key`` and ``prefix``: see :mod:`sharpness.formats`.
    """
    path = Path(path).expanduser()
    dev = resolve_device(device)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file() and not (path.is_dir() and (path / HF_CONFIG).is_file()):
        raise CheckpointError(f"checkpoint {path} is not a file")
    info: dict[str, Any] = {"path": str(path), "arch": arch, "arch_kwargs": arch_kwargs or {}, "extra": {}}
    info.update(stripped_prefix=None, nested_key=None, unpickled=False)
    model: nn.Module | None = None
    state: Any = None
    lightning = False
    if path.is_dir():
        if arch:
            raise CheckpointError(
                f"{path} is a HuggingFace folder, built from its config.json: leave out --arch"
            )
        model, info["format"] = hf_model(path, trust_pickle), "huggingface"
    elif path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise CheckpointError(
                f"{path} is a .safetensors file but the optional package 'safetensors' is not installed "
                "(pip install safetensors)"
            ) from exc
        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {_line(exc)}") from exc
        info["format"] = "safetensors"
    elif _is_torchscript(path):
        try:
            model = ScriptedModel(torch.jit.load(str(path), map_location="cpu"))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"TorchScript archive {path} cannot be loaded: {_line(exc)}") from exc
        info["format"] = "torchscript"
    else:
        obj, unpickled = _torch_load(path, trust_pickle)
        lightning = is_lightning(obj)
        if weights_key is not None:
            obj = pick_key(obj, weights_key, f"checkpoint {path}")
        if isinstance(obj, Mapping) and str(obj.get("format", "")).startswith("dsgd-sam/"):
            if obj["format"] != FORMAT:
                raise CheckpointError(
                    f"checkpoint {path} has format {obj['format']}; this version reads {FORMAT}"
                )
            info.update(format="toolkit", extra=obj.get("extra", {}))
            info["arch"] = arch or _recorded_arch(obj, path, trust_checkpoint_arch)
            info["arch_kwargs"] = arch_kwargs if arch_kwargs is not None else obj.get("arch_kwargs", {})
            if not isinstance(info["arch_kwargs"], Mapping):
                kind = type(info["arch_kwargs"]).__name__
                raise CheckpointError(f"checkpoint {path}: arch_kwargs is a {kind}, not a dict")
            state = obj.get("state_dict")
            if not _is_state_dict(state):
                raise CheckpointError(f"checkpoint {path} (format {FORMAT}) holds no state_dict of tensors")
        elif isinstance(obj, nn.Module):
            model, info["format"] = obj, "pickled_module"
        elif _is_state_dict(obj):
            state, info["format"] = obj, "state_dict"
        elif isinstance(obj, Mapping):
            for key in NESTED_KEYS:
                if key in obj and (_is_state_dict(obj[key]) or isinstance(obj[key], nn.Module)):
                    info["nested_key"] = key
                    if isinstance(obj[key], nn.Module):
                        model, info["format"] = obj[key], "pickled_module"
                    else:
                        state, info["format"] = obj[key], "state_dict"
                    break
            else:
                keys = sorted(map(str, obj.keys()))[:10]
                raise CheckpointError(
                    f"checkpoint {path} holds a dict without weights: keys {keys}; expected tensors "
                    f"or one of {'/'.join(NESTED_KEYS[:3])}"
                )
        else:
            raise CheckpointError(
                f"checkpoint {path} holds a {type(obj).__name__}, not a model or a state_dict"
            )
        info["unpickled"] = unpickled
    if model is None:
        state, chosen = choose_prefix(state, prefix, lightning, f"checkpoint {path}")
        state, info["stripped_prefix"] = _strip_prefix(state)
        info["stripped_prefix"] = chosen or info["stripped_prefix"]
        if not info["arch"]:
            raise CheckpointError(
                f"checkpoint {path} holds only weights ({info['format']}): pass --arch MODULE:CALLABLE "
                "naming a function that builds the model"
            )
        model = build_from_state_dict(state, info["arch"], info["arch_kwargs"])
    model = model.to(dev).eval()
    info["num_params"] = sum(p.numel() for p in model.parameters())
    first = next(iter(model.parameters()), None)
    info["dtype"] = str(first.dtype) if first is not None else None
    info["device"] = str(dev)
    return model, info
