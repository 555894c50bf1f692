"""The registry of checks: ``@register`` on a :class:`~verify.claims.base.Check` subclass adds it.

Check modules are the ``verify/claims/tNN_*.py`` files; :func:`discover` imports them all (once), so a new
check needs no edit anywhere else. Order is by number then suffix: T0, T1, T1b, T1c, T2, ..., T10, T11, T12.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

from .base import ID_PATTERN, Check, ClaimsError

_CHECKS: dict[str, type[Check]] = {}
_DISCOVERED = False
_MODULE_PATTERN = re.compile(r"^t\d+")


def register(cls: type[Check]) -> type[Check]:
    """Class decorator: validate the declaration and add the check under its id (ids are unique)."""
    if not (isinstance(cls, type) and issubclass(cls, Check)):
        raise ClaimsError(f"register expects a Check subclass, got {cls!r}")
    cls.validate_declaration()
    other = _CHECKS.get(cls.id)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ClaimsError(f"duplicate check id {cls.id}: {other.__qualname__} and {cls.__qualname__}")
    _CHECKS[cls.id] = cls
    return cls


def sort_key(check_id: str) -> tuple[int, str]:
    """``"T1b" -> (1, "b")``."""
    m = ID_PATTERN.match(check_id)
    if not m:
        raise ClaimsError(f"check id {check_id!r} must look like 'T1' or 'T1b'")
    return int(m.group(1)), m.group(2)


def discover() -> None:
    """Import every ``tNN_*`` module of this package once, so their ``@register`` decorators run."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    package = importlib.import_module(__package__ or "verify.claims")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if _MODULE_PATTERN.match(info.name):
            importlib.import_module(f"{package.__name__}.{info.name}")
    _DISCOVERED = True


def all_checks() -> list[type[Check]]:
    """Every registered check class, sorted by id."""
    discover()
    return [_CHECKS[k] for k in sorted(_CHECKS, key=sort_key)]


def get(check_id: str) -> type[Check]:
    """The check class with this id (case-insensitive: ``t1b`` finds ``T1b``)."""
    discover()
    want = check_id.strip()
    for key, cls in _CHECKS.items():
        if key.lower() == want.lower():
            return cls
    known = ", ".join(sorted(_CHECKS, key=sort_key)) or "none"
    raise ClaimsError(f"unknown check id {check_id!r}; known: {known}")
