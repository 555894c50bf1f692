"""Effects with intervals and the verdict rule that reads them (INCONCLUSIVE vs NOT SUPPORTED)."""

import numpy as np
import pytest
from scipy import stats

from verify.claims.base import NO_CONTROL, Check, ClaimsError, Context, decide_verdict
from verify.claims.evidence import MDE_FACTOR, Effect, paired_bootstrap, t_interval, z_interval


def effect(low, high, claimed=2.0, null=0.0, role="paper"):
    iv = z_interval((low + high) / 2, (high - low) / (2 * 1.959963984540054))
    return Effect("gap", iv, claimed=claimed, source="paper.md s.4", null=null, role=role)


def test_t_interval_matches_scipy():
    x = [1.0, 2.0, 4.0, 3.5]
    iv = t_interval(x)
    lo, hi = stats.t.interval(0.95, df=3, loc=np.mean(x), scale=stats.sem(x))
    assert iv.low == pytest.approx(lo) and iv.high == pytest.approx(hi)
    assert iv.se == pytest.approx(stats.sem(x))


def test_bootstrap_interval_covers_the_mean_and_is_seeded():
    x = np.random.default_rng(1).normal(1.0, 1.0, 40)
    a, b = paired_bootstrap(x, seed=3), paired_bootstrap(x, seed=3)
    assert a == b and a.low < x.mean() < a.high
    # the percentile interval of 40 normal points is close to the normal-theory one
    assert a.se == pytest.approx(x.std(ddof=1) / np.sqrt(40), rel=0.15)


@pytest.mark.parametrize(
    "low, high, outcome",
    [
        (0.5, 3.0, "supported"),  # excludes no effect
        (-1.0, 1.0, "contradicted"),  # contains no effect, excludes the claimed 2
        (-3.0, -1.0, "contradicted"),  # the opposite effect
        (-1.0, 3.0, "undecided"),  # contains both: no power
    ],
)
def test_outcome(low, high, outcome):
    assert effect(low, high).outcome == outcome
    # the same in the negative direction (a claimed decrease)
    assert effect(-high, -low, claimed=-2.0).outcome == outcome


def test_outcome_with_a_non_zero_null():
    # ratio claimed 0.8 below a null of 1: interval [0.6, 0.9] is supported, [0.85, 1.1] undecided
    assert effect(0.6, 0.9, claimed=0.8, null=1.0).outcome == "supported"
    assert effect(0.7, 1.1, claimed=0.8, null=1.0).outcome == "undecided"
    assert effect(0.9, 1.1, claimed=0.8, null=1.0).outcome == "contradicted"


def test_mde_is_2_8_standard_errors():
    e = effect(-1.0, 1.0)
    assert MDE_FACTOR == pytest.approx(2.8016, abs=1e-4)
    assert e.mde == pytest.approx(MDE_FACTOR * 1.0 / 1.959963984540054)


def test_bad_effects_are_refused():
    with pytest.raises(ValueError, match="role"):
        effect(0, 1, role="vibes")
    with pytest.raises(ValueError, match="null"):
        effect(0, 1, claimed=0.0)
    with pytest.raises(ValueError, match=">= 2"):
        t_interval([1.0])


def rule(*effects, holds=True, other=True, asserted=True, supported=None):
    return decide_verdict(
        asserted=asserted,
        criterion_holds=holds,
        control_came_out_other_way=other,
        paper_reading_supported=supported,
        effects=effects,
    )[0]


def test_verdicts_from_effects():
    assert rule(effect(0.5, 3.0)) == "PASS"
    assert rule(effect(-1.0, 3.0)) == "INCONCLUSIVE"  # no power: never NOT SUPPORTED
    assert rule(effect(-1.0, 1.0)) == "NOT SUPPORTED"
    assert rule(effect(-1.0, 1.0), asserted=False) == "NOT SUPPORTED"
    assert rule(effect(-1.0, 3.0), asserted=False) == "INCONCLUSIVE"
    # the asserted mechanism must hold and the control must fail before the paper's reading is judged
    assert rule(effect(0.5, 3.0), holds=False) == "FAIL"
    assert rule(effect(0.5, 3.0), other=False) == "FAIL"
    # criterion effects: undecided -> INCONCLUSIVE, contradicted -> FAIL
    assert rule(effect(-1.0, 3.0, role="criterion")) == "INCONCLUSIVE"
    assert rule(effect(-1.0, 1.0, role="criterion")) == "FAIL"
    # a precondition that is not established makes the experiment unable to decide, whatever else happened
    assert rule(effect(-1.0, 3.0, role="precondition"), effect(0.5, 3.0)) == "INCONCLUSIVE"
    assert rule(effect(-1.0, 1.0, role="precondition"), effect(-1.0, 1.0), holds=False) == "INCONCLUSIVE"
    assert rule(effect(0.5, 3.0, role="precondition"), effect(0.5, 3.0)) == "PASS"


def test_verdict_notes_carry_the_interval_and_the_reason():
    verdict, notes = decide_verdict(
        asserted=True,
        criterion_holds=True,
        control_came_out_other_way=True,
        effects=[effect(-1.0, 3.0, role="precondition")],
    )
    assert verdict == "INCONCLUSIVE"
    assert notes[0].startswith("precondition absent: gap")
    assert "[-1, 3]" in notes[1] and "MDE" in notes[1] and "paper.md s.4" in notes[1]


class Identity(Check):
    id = "T97"
    title = "an identity"
    claim = "a = a"
    source = "algebra"
    status = "proven"
    evidence = "identity"
    prediction = "error 0"
    criterion = "error < 1e-12"
    control = f"{NO_CONTROL}: an algebraic identity"
    has_control = False

    def run(self, ctx):
        return self.result(measured={"err": 0.0}, criterion_holds=True)


def test_an_identity_has_no_control_and_says_so():
    Identity.validate_declaration()
    r = Identity().run(Context())
    assert r.verdict == "PASS" and r.control.came_out_other_way is None
    assert r.to_dict()["control"]["came_out_other_way"] is None

    class Pretends(Identity):
        control = "a control that is not run"

    with pytest.raises(ClaimsError, match="identity: no control"):
        Pretends.validate_declaration()

    class Forgets(Identity):
        has_control = True

        def run(self, ctx):
            return self.result(measured={}, criterion_holds=True)

    with pytest.raises(ClaimsError, match="identity"):
        Forgets.validate_declaration()
    with pytest.raises(ClaimsError, match="control_came_out_other_way"):
        Forgets().run(Context())


def test_evidence_kind_is_required():
    class NoKind(Identity):
        evidence = ""

    with pytest.raises(ClaimsError, match="evidence"):
        NoKind.validate_declaration()
