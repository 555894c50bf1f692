"""A user's module written by a test: importable by name while a block runs, then gone again."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def importable(root: Path, name: str, source: str) -> Iterator[Path]:
    """Write ``root/name.py`` with ``source`` and put ``root`` on ``sys.path`` for the block; afterwards the
    path entry and the imported module are removed, so the next test module starts clean."""
    (root / f"{name}.py").write_text(source)
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(name, None)
