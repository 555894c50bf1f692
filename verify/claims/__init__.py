"""The verification suite: one check per claim of Zhu et al. (ICML 2023), each with a prediction, a measured
value, a criterion, a negative control that must fail, and a verdict.

Framework: :mod:`.base` (``Check``, ``CheckResult``, ``Context``, ``decide_verdict``), :mod:`.registry`
(``register``, ``all_checks``, ``get``), :mod:`.fitting` (log-log slopes), :mod:`.report` (report.json,
report.md, CSV series), :mod:`.runner` (the ``check`` command). Checks live in ``tNN_<name>.py`` modules
and are discovered on first use of the registry. Run ``dsgd-verify check --quick`` or
``python -m verify.claims``.
"""

from .base import Check, CheckResult, ClaimsError, Context, ControlResult, decide_verdict
from .registry import all_checks, get, register

__all__ = [
    "Check",
    "CheckResult",
    "ClaimsError",
    "Context",
    "ControlResult",
    "all_checks",
    "decide_verdict",
    "get",
    "register",
]
