"""Matched-loss flatness (verify.claims.flatness) and T14's flatness criterion with its control."""

import math

import numpy as np
import pytest

from verify.claims.flatness import Curve, FlatnessError, matched_levels, matched_log_ratio, value_at_loss
from verify.claims.t14_flatness import flatness_effects, flatter


def curve(loss, lam):
    return Curve(
        np.arange(len(loss), dtype=float), np.asarray(loss, float), {"lambda_max": np.asarray(lam, float)}
    )


def test_value_at_loss_is_first_passage_log_interpolation():
    c = curve([2.0, 1.0, 0.5, 0.7, 0.4], [1.0, 4.0, 16.0, 1.0, 2.0])
    assert value_at_loss(c, "lambda_max", 1.0) == 4.0
    assert value_at_loss(c, "lambda_max", 0.75) == pytest.approx(8.0)  # halfway in loss, geometric in value
    # the later rise of the loss to 0.7 does not count: first passage below 0.6 is at index 2
    assert value_at_loss(c, "lambda_max", 0.6) == pytest.approx(4.0 * 4.0 ** (0.4 / 0.5))
    assert math.isnan(value_at_loss(c, "lambda_max", 0.1))


def test_matched_levels_start_at_the_lowest_common_loss_and_refuse_disjoint_curves():
    a, b = curve([2.0, 1.0, 0.3], [1, 1, 1]), curve([2.0, 0.8, 0.5], [1, 1, 1])
    lv = matched_levels([a, b], n=3, span=1.5)
    assert lv[0] == 0.5 and lv[-1] == pytest.approx(0.75)
    with pytest.raises(FlatnessError, match="do not overlap"):
        matched_levels([curve([2.0, 1.9], [1, 1]), curve([1.0, 0.5], [1, 1])])


def test_matched_ratio_sees_flatness_not_progress():
    # b trains twice as fast with the same sharpness-vs-loss law: at matched loss there is no gap, at the same
    # step there is one
    loss = np.geomspace(2.0, 0.1, 20)
    a = curve(loss, 1.0 / loss)
    b = curve(loss[::2], 1.0 / loss[::2])
    lv = matched_levels([a, b])
    assert np.abs(matched_log_ratio(a, b, "lambda_max", lv)).max() < 0.03
    assert abs(np.log(a.values["lambda_max"][9] / b.values["lambda_max"][9])) > 1.0


def test_flatness_criterion_accepts_a_growing_gap_and_rejects_the_seed_to_seed_control():
    rng = np.random.default_rng(0)
    keys = ("lambda_max", "trace_h")
    small = {k: -0.02 + 0.02 * rng.standard_normal(4) for k in keys}
    large = {k: -0.5 + 0.05 * rng.standard_normal(4) for k in keys}
    assert flatter(flatness_effects(small, large, "D/C"))
    # the control's output: C-SGD vs C-SGD of another seed, no systematic gap at either batch
    noise = {k: 0.1 * rng.standard_normal(4) for k in keys}
    noise2 = {k: 0.1 * rng.standard_normal(4) for k in keys}
    effects = flatness_effects(noise, noise2, "C/C'")
    assert not flatter(effects)
    assert {e.outcome for e in effects} <= {"undecided", "contradicted"}
    # a gap that does not grow with the batch is rejected too
    assert not flatter(flatness_effects(large, large, "D/C"))
