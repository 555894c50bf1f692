"""The verification suite through pytest: every registered check, one test each.

Quick form (default run): every check that is not ``full_only`` must give its declared verdict (PASS for
asserted checks, NOT SUPPORTED or REPORTED where the check declares so) with its negative control having come
out the other way (an identity, ``has_control = False``, has none). Full form: the same for every check,
marked ``slow`` (``pytest -m slow``). Seed stability: the quick form at seeds 0-4, marked ``slow``.
"""

import pytest

from verify.claims import Context, all_checks
from verify.claims.runner import execute

CHECKS = all_checks()


SEEDS = range(5)


def assert_expected(cls, quick: bool, seed: int = 0) -> None:
    result = execute(cls, Context(quick=quick, seed=seed))
    expected = cls.expected_verdict()
    detail = (
        f"{result.id} (seed {seed}): {result.verdict} (expected {expected}); notes {result.notes}; "
        f"{result.measured}"
    )
    assert result.verdict == expected, detail
    if cls.has_control:
        assert result.control.came_out_other_way, f"{result.id}: the negative control did not fail; {detail}"
    else:
        assert result.control.came_out_other_way is None, detail


@pytest.mark.parametrize("cls", [c for c in CHECKS if not c.full_only], ids=lambda c: c.id)
def test_check_quick(cls):
    assert_expected(cls, quick=True)


@pytest.mark.slow
@pytest.mark.parametrize("cls", CHECKS, ids=lambda c: c.id)
def test_check_full(cls):
    assert_expected(cls, quick=False)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cls", [c for c in CHECKS if not c.full_only], ids=lambda c: c.id)
def test_check_quick_seed_stable(cls, seed):
    """Every quick check gives its expected verdict at seeds 0-4 (``dsgd-verify check --quick --seed S``)."""
    assert_expected(cls, quick=True, seed=seed)
