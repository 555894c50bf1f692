"""The verification suite through pytest: every registered check, one test each.

Quick form (default run): every check that is not ``full_only`` must give its declared verdict (PASS for
asserted checks, NOT SUPPORTED or REPORTED where the check declares so) with its negative control having come
out the other way. Full form: the same for every check, marked ``slow`` (``pytest -m slow``).
"""

import pytest

from verify.claims import Context, all_checks
from verify.claims.runner import execute

CHECKS = all_checks()


def assert_expected(cls, quick: bool) -> None:
    result = execute(cls, Context(quick=quick, seed=0))
    expected = cls.expected_verdict()
    detail = f"{result.id}: {result.verdict} (expected {expected}); notes {result.notes}; {result.measured}"
    assert result.verdict == expected, detail
    assert result.control.came_out_other_way, f"{result.id}: the negative control did not fail; {detail}"


@pytest.mark.parametrize("cls", [c for c in CHECKS if not c.full_only], ids=lambda c: c.id)
def test_check_quick(cls):
    assert_expected(cls, quick=True)


@pytest.mark.slow
@pytest.mark.parametrize("cls", CHECKS, ids=lambda c: c.id)
def test_check_full(cls):
    assert_expected(cls, quick=False)
