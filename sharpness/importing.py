"""Import a user's callable from a ``MODULE:CALLABLE`` string (``pkg.mod:fn``, ``pkg.mod:Class.attr``,
or ``path/to/file.py:fn``), with one-line errors.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from .functional import SharpnessInputError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _import_file(path: Path) -> ModuleType:
    name = f"_sharpness_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # console scripts do not put the working directory on sys.path; `python -m` does. Try it last.
        cwd = os.getcwd()
        top = name.split(".")[0]
        if exc.name != top or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(name)


def import_callable(
    target: str, *, what: str = "callable", error: type[Exception] = SharpnessInputError
) -> Callable[..., Any]:
    """Return the object named by ``target`` = ``MODULE:ATTR[.ATTR...]`` (or ``FILE.py:ATTR``).

    ``what`` names the option in error messages (e.g. ``"--arch"``); every failure raises ``error`` with one
    line: a malformed target, a module that cannot be imported (with the reason), a missing attribute, or an
    object that is not callable.
    """
    if not isinstance(target, str) or ":" not in target:
        raise error(f"{what} {target!r} must look like MODULE:CALLABLE (e.g. mypkg.models:make_net)")
    mod_name, _, attr_path = target.rpartition(":")
    if not mod_name or not attr_path:
        raise error(f"{what} {target!r} must look like MODULE:CALLABLE (e.g. mypkg.models:make_net)")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise error(f"{what} {target!r}: file {mod_name} not found")
            module = _import_file(path)
        else:
            module = _import_module(mod_name)
    except error:
        raise
    except BaseException as exc:  # noqa: BLE001 - any import failure becomes one line
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise error(
            f"{what} {target!r}: cannot import {mod_name}: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise error(f"{what} {target!r}: {mod_name} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{what} {target!r} is a {type(obj).__name__}, not a callable")
    return obj
