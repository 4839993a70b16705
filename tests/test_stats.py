"""The statistics that compare training runs, against independent computations."""

import itertools
import math

import numpy as np
import pytest

from internal_policy.stats import bootstrap_mean, seed_level_test


def test_seed_level_test_against_the_reviewers_numbers_and_a_plain_enumeration():
    # per-seed BuPO - GRPO of the 10-step comparison at S = 2 (issue 21): p = 0.125, t interval [-0.246, -0.004]
    d = [-0.143, -0.223, -0.062, +0.009, -0.205]
    result = seed_level_test(d)
    assert result["sign_flip_p"] == pytest.approx(0.125)
    assert result["t_low"] == pytest.approx(-0.2462, abs=1e-4) and result["t_high"] == pytest.approx(-0.0034, abs=1e-4)
    # the exact sign-flip p-value, enumerated: the share of the 2^n sign patterns whose |mean| reaches the observed one
    for values in ([0.3, 0.1, 0.2], [0.05, -0.02, 0.04, 0.01, 0.03, -0.01], d):
        observed = abs(np.mean(values))
        patterns = list(itertools.product((1, -1), repeat=len(values)))
        extreme = sum(abs(np.mean(np.multiply(signs, values))) >= observed - 1e-12 for signs in patterns)
        assert seed_level_test(values)["sign_flip_p"] == pytest.approx(extreme / len(patterns))
    # the t interval, by its textbook formula with the tabulated t quantile (4 degrees of freedom: 2.776)
    sd = np.std(d, ddof=1)
    assert result["t_high"] - result["mean"] == pytest.approx(2.776445 * sd / math.sqrt(5), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seed_level_test([0.1])


def test_bootstrap_resamples_both_axes():
    rng = np.random.default_rng(1)
    one_axis = rng.normal(size=40)
    mean, low, high = bootstrap_mean(one_axis)
    se = one_axis.std(ddof=1) / math.sqrt(40)
    assert mean == pytest.approx(one_axis.mean()) and low < mean < high
    assert (high - low) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.15)  # the normal-theory width
    # seeds that differ a lot widen the interval of a [seeds, problems] table, whatever the problems say
    table = np.tile(np.linspace(0, 1, 50), (5, 1))
    narrow = bootstrap_mean(table)
    shifted = table + np.array([[-0.3], [-0.1], [0.0], [0.1], [0.3]])
    wide = bootstrap_mean(shifted)
    assert wide[2] - wide[1] > 1.5 * (narrow[2] - narrow[1])
