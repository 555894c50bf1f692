"""``python -m verify run ...``: the same as ``dsgd-verify``."""

from .cli import main

raise SystemExit(main())
