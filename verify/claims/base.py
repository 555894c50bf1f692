"""The claims framework: a :class:`Check` per claim of the paper, a :class:`CheckResult` per run.

How to write a check (see ``t01_theorem_static.py`` for a complete one)::

    @register
    class MyCheck(Check):
        id = "T5"                       # "T" + number + optional lower-case suffix ("T1b")
        title = "Theorem 1 along trajectories"
        claim = "One sentence: what the paper says."
        source = "ICML main theorem [P]; paper.md s.3 P5, s.6 T5"
        status = "proven"               # proven | argued | derived | empirical
        prediction = "median r ~ eta^1"  # short: it goes in the final table
        criterion = "slope of median r vs eta in [0.7, 1.5]; r(eta_min) < 0.05"
        control = "isotropic Xi: r >= 0.3 and not decreasing"

        def run(self, ctx: Context) -> CheckResult:
            etas = ctx.pick(quick=[...], full=[...])          # quick/full protocol
            for eta in ctx.progress(etas, desc="eta"):         # one tqdm bar per check
                ...
            fit = loglog_fit(etas, r)                          # verify.claims.fitting
            return self.result(
                settings={"etas": etas, ...},                   # the protocol actually run
                measured={"slope": fit.slope, "slope_stderr": fit.stderr, ...},
                criterion_holds=0.7 <= fit.slope <= 1.5 and ...,
                control_measured={"r_iso": ...},
                control_came_out_other_way=...,                # the control FAILED the criterion
                series={"r_vs_eta": {"eta": etas, "r": r}},     # -> T5_r_vs_eta.csv
                summary=f"slope {fit.slope:.2f}",               # short measured text for the table
                control_summary=f"iso r {r_iso:.2f}",           # short control text for the table
            )

The verdict is never set by hand: :meth:`Check.result` applies :func:`decide_verdict`. An asserted check
passes only if its criterion holds AND its negative control came out the other way; a control that did not
fail makes the verdict FAIL ("control did not fail: the check cannot discriminate"). A check of an algebraic
identity declares ``has_control = False`` and a control text starting "identity: no control"; it does not
pretend to have one. Statistical statements are :class:`verify.claims.evidence.Effect` objects passed as
``effects=[...]``: each carries its interval, the null and the paper's claimed value, and the verdict follows
their outcomes (an undecided effect gives INCONCLUSIVE, never NOT SUPPORTED; a precondition that is not
established gives INCONCLUSIVE whatever else was measured). A check whose measurement contradicts the
paper's own reading passes ``paper_reading_supported=False`` (or a contradicted ``paper`` effect) and gets
"NOT SUPPORTED" (its asserted mechanism must still hold, else FAIL). Report-only checks (``asserted =
False``) get "REPORTED". The runner times ``run`` and turns an exception into a FAIL with the error as note.
Each check declares ``evidence``, the kind of evidence it gives (one of :data:`EVIDENCE`).
Heavy or not-yet-stable imports (engine, topology, models) go inside ``run`` so discovery never breaks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from .evidence import Effect

STATUSES = ("proven", "argued", "derived", "empirical")
VERDICTS = ("PASS", "FAIL", "NOT SUPPORTED", "INCONCLUSIVE", "REPORTED")
#: what kind of evidence a check gives (the README table's "evidence" column)
EVIDENCE = ("identity", "theorem at a frozen state", "derived law", "along trajectories", "empirical")
NO_CONTROL = "identity: no control"
ID_PATTERN = re.compile(r"^T(\d+)([a-z]*)$")
NO_DISCRIMINATION = "control did not fail: the check cannot discriminate"

ProgressFactory = Callable[..., Any]


class ClaimsError(ValueError):
    """Bad input to the claims suite (unknown id, malformed check or result); one-line message."""


def silent_progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """A disabled tqdm (the default progress factory: tests and library use print nothing)."""
    return tqdm(iterable, disable=True, **kwargs)


@dataclass
class Context:
    """What a check may read: protocol size, seed, device, and a progress-bar factory.

    ``progress(iterable=None, *, total=None, desc=None)`` returns a tqdm-like object (iterate over it, or call
    ``update``/``close``). The runner gives one bar per check on stderr. ``options``: settings a check may
    read beyond quick/full (``scale``, ``data``: the scale and data of T11; ``report``: the report folder,
    where a long check may write its partial results).
    """

    quick: bool = True
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: ProgressFactory = silent_progress
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"

    def pick(self, quick: Any, full: Any) -> Any:
        """The quick or the full value of a protocol setting."""
        return quick if self.quick else full

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU torch generator seeded from ``(seed, salt)``: one salt per independent random stream."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)

    def rng(self, salt: int = 0) -> np.random.Generator:
        """A numpy generator seeded from ``(seed, salt)``."""
        return np.random.default_rng([self.seed, salt])


@dataclass
class ControlResult:
    """The negative control: what it is, what it measured, and whether it failed the criterion as it must."""

    description: str
    measured: dict[str, Any]
    came_out_other_way: bool | None  # None: an identity, no control

    def to_dict(self) -> dict[str, Any]:
        other = self.came_out_other_way
        return {
            "description": self.description,
            "measured": dict(self.measured),
            "came_out_other_way": None if other is None else bool(other),
        }


@dataclass
class CheckResult:
    """One check's outcome; ``series``: name -> equal-length columns (written to ``<id>_<name>.csv``)."""

    id: str
    claim: str
    source: str
    status: str
    prediction: str
    measured: dict[str, Any]
    criterion: str
    control: ControlResult
    verdict: str
    seconds: float = 0.0
    series: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    title: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    asserted: bool = True
    criterion_holds: bool | None = None
    summary: str = ""
    control_summary: str = ""
    evidence: str = ""
    effects: list[Effect] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ClaimsError(f"{self.id}: verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if self.status not in STATUSES:
            raise ClaimsError(f"{self.id}: status must be one of {STATUSES}, got {self.status!r}")
        self.series = {name: _columns(self.id, name, cols) for name, cols in self.series.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in the report's key order (series are listed by name; their data go to CSV)."""
        return {
            "id": self.id,
            "title": self.title,
            "claim": self.claim,
            "source": self.source,
            "status": self.status,
            "prediction": self.prediction,
            "measured": dict(self.measured),
            "criterion": self.criterion,
            "control": self.control.to_dict(),
            "verdict": self.verdict,
            "seconds": self.seconds,
            "asserted": self.asserted,
            "criterion_holds": self.criterion_holds,
            "summary": self.summary,
            "control_summary": self.control_summary,
            "evidence": self.evidence,
            "effects": [e.to_dict() for e in self.effects],
            "settings": dict(self.settings),
            "notes": list(self.notes),
            "series": sorted(self.series),
        }


def _columns(cid: str, name: str, cols: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Validate a series: a non-empty mapping of column -> 1-D values, all the same length."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ClaimsError(f"{cid}: series name {name!r} must be letters, digits, '_' or '-'")
    if not cols:
        raise ClaimsError(f"{cid}: series {name!r} has no columns")
    out: dict[str, list[Any]] = {}
    for col, values in cols.items():
        arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        if arr.ndim != 1:
            raise ClaimsError(f"{cid}: series {name!r} column {col!r} is not 1-D (shape {arr.shape})")
        out[str(col)] = arr.tolist()
    lengths = {c: len(v) for c, v in out.items()}
    if len(set(lengths.values())) != 1:
        raise ClaimsError(f"{cid}: series {name!r} has columns of unequal length {lengths}")
    return out


def decide_verdict(
    *,
    asserted: bool,
    criterion_holds: bool,
    control_came_out_other_way: bool | None,
    paper_reading_supported: bool | None = None,
    effects: Iterable[Effect] = (),
) -> tuple[str, list[str]]:
    """The verdict rule (the only place a verdict is decided) and the notes that explain it.

    In order: a ``precondition`` effect that is not supported -> INCONCLUSIVE (the experiment cannot decide).
    Asserted: FAIL unless the criterion holds, every ``criterion`` effect is supported and the control came
    out the other way (``None``: an identity without control); a ``criterion`` effect that is undecided ->
    INCONCLUSIVE (no power), contradicted -> FAIL. Then the paper's reading: a contradicted ``paper`` effect
    or ``paper_reading_supported=False`` -> NOT SUPPORTED; an undecided one -> INCONCLUSIVE; else PASS.
    Report-only checks: NOT SUPPORTED / INCONCLUSIVE by the same effects, else REPORTED, never FAIL.
    """
    effects = list(effects)
    by_role = {
        role: [e for e in effects if e.role == role] for role in ("precondition", "criterion", "paper")
    }
    notes: list[str] = [f"{e.role}: {e.text()}" for e in effects]
    absent = [e for e in by_role["precondition"] if e.outcome != "supported"]
    if absent:
        notes.insert(0, "precondition absent: " + "; ".join(e.name for e in absent))
        return "INCONCLUSIVE", notes
    if control_came_out_other_way is False:
        notes.insert(0, NO_DISCRIMINATION)
    crit = [e.outcome for e in by_role["criterion"]]
    holds = criterion_holds and "contradicted" not in crit
    if asserted and not holds:
        notes.insert(0, "criterion not met")
    if paper_reading_supported is False:
        notes.append("the measurement does not support the paper's reading of this claim")
    if asserted and not (holds and control_came_out_other_way is not False):
        return "FAIL", notes
    if asserted and "undecided" in crit:
        notes.insert(0, "criterion undecided: the interval contains both no effect and the predicted one")
        return "INCONCLUSIVE", notes
    paper = [e.outcome for e in by_role["paper"]]
    if paper_reading_supported is False or "contradicted" in paper:
        return "NOT SUPPORTED", notes
    if "undecided" in paper:
        notes.insert(0, "no power: an interval contains both no effect and the paper's claimed effect")
        return "INCONCLUSIVE", notes
    return ("PASS" if asserted else "REPORTED"), notes


class Check:
    """Base class of a check; subclasses declare the class attributes and implement :meth:`run`."""

    id: ClassVar[str] = ""
    title: ClassVar[str] = ""
    claim: ClassVar[str] = ""
    source: ClassVar[str] = ""
    status: ClassVar[str] = ""
    prediction: ClassVar[str] = ""
    criterion: ClassVar[str] = ""
    control: ClassVar[str] = ""
    evidence: ClassVar[str] = ""
    asserted: ClassVar[bool] = True
    #: False for an algebraic identity: the control text starts with NO_CONTROL and no control is run
    has_control: ClassVar[bool] = True
    full_only: ClassVar[bool] = False
    #: run with one intra-op torch thread (small models: extra threads only add synchronisation; on a busy
    #: 2-core machine 2 threads made the network checks 10-15x slower). The runner applies it.
    single_threaded: ClassVar[bool] = False
    #: the verdict the quick form must produce (tests/test_claims.py); None -> PASS if asserted else REPORTED
    expected: ClassVar[str | None] = None

    @classmethod
    def expected_verdict(cls) -> str:
        return cls.expected or ("PASS" if cls.asserted else "REPORTED")

    @classmethod
    def validate_declaration(cls) -> None:
        """Raise :class:`ClaimsError` if a declared attribute is missing or malformed."""
        name = cls.__name__
        if not ID_PATTERN.match(cls.id or ""):
            raise ClaimsError(f"{name}: id {cls.id!r} must look like 'T1' or 'T1b'")
        for attr in ("title", "claim", "source", "prediction", "criterion", "control"):
            if not isinstance(getattr(cls, attr), str) or not getattr(cls, attr).strip():
                raise ClaimsError(f"{cls.id}: class attribute {attr!r} must be a non-empty string")
        if cls.status not in STATUSES:
            raise ClaimsError(f"{cls.id}: status must be one of {STATUSES}, got {cls.status!r}")
        if cls.evidence not in EVIDENCE:
            raise ClaimsError(f"{cls.id}: evidence must be one of {EVIDENCE}, got {cls.evidence!r}")
        if cls.has_control == cls.control.startswith(NO_CONTROL):
            raise ClaimsError(
                f"{cls.id}: a check without a control (has_control = False) says {NO_CONTROL!r} in its "
                "control text, and only such a check does"
            )
        if cls.expected_verdict() not in VERDICTS or cls.expected_verdict() == "FAIL":
            raise ClaimsError(f"{cls.id}: expected must be a verdict other than FAIL")

    def run(self, ctx: Context) -> CheckResult:
        """Run the protocol (quick or full per ``ctx``) and return :meth:`result`."""
        raise NotImplementedError(f"{self.id}: run() is not implemented")

    def result(
        self,
        *,
        measured: Mapping[str, Any],
        criterion_holds: bool,
        control_measured: Mapping[str, Any] | None = None,
        control_came_out_other_way: bool | None = None,
        settings: Mapping[str, Any] | None = None,
        series: Mapping[str, Mapping[str, Any]] | None = None,
        notes: Iterable[str] = (),
        summary: str = "",
        control_summary: str = "",
        paper_reading_supported: bool | None = None,
        effects: Iterable[Effect] = (),
    ) -> CheckResult:
        """Assemble the :class:`CheckResult`, deciding the verdict with :func:`decide_verdict`.

        A check with a control must pass ``control_came_out_other_way`` (a bool); an identity
        (``has_control = False``) must not.
        """
        if self.has_control == (control_came_out_other_way is None):
            raise ClaimsError(
                f"{self.id}: control_came_out_other_way is required exactly when the check has a control"
            )
        other = None if control_came_out_other_way is None else bool(control_came_out_other_way)
        effects = list(effects)
        verdict, why = decide_verdict(
            asserted=self.asserted,
            criterion_holds=bool(criterion_holds),
            control_came_out_other_way=other,
            paper_reading_supported=paper_reading_supported,
            effects=effects,
        )
        return CheckResult(
            id=self.id,
            title=self.title,
            claim=self.claim,
            source=self.source,
            status=self.status,
            prediction=self.prediction,
            measured=_plain(measured),
            criterion=self.criterion,
            control=ControlResult(self.control, _plain(control_measured or {}), other),
            verdict=verdict,
            series={k: dict(v) for k, v in (series or {}).items()},
            notes=why + list(notes),
            settings=_plain(settings or {}),
            asserted=self.asserted,
            criterion_holds=bool(criterion_holds),
            summary=summary,
            control_summary=control_summary,
            evidence=self.evidence,
            effects=effects,
        )


def _plain(d: Mapping[str, Any]) -> dict[str, Any]:
    """Numbers as plain Python values (tensors/numpy scalars -> float/int/bool; lists kept)."""
    from sharpness.results import jsonable

    return {str(k): jsonable(v) for k, v in d.items()}


def fmt(x: Any, digits: int = 3) -> str:
    """A number to ``digits`` significant figures: 2.00, 0.0123, 1.23e-09; bools and strings unchanged."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.floating, np.integer)):
        return str(x)
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if 1e-2 <= abs(x) < 1e4:
        return f"{x:#.{digits}g}".rstrip(".")
    return f"{x:.{digits - 1}e}"
