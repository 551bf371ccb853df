"""The statistics of the verdicts (analysis/inference.py), each against numbers derived by hand or by scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis import inference


def test_exact_mcnemar_is_the_binomial_on_the_changed_items():
    assert inference.sign_test(4, 0) == pytest.approx(0.125, abs=1e-15)  # 2 * 0.5**4, by hand
    assert inference.sign_test(0, 4) == pytest.approx(0.125, abs=1e-15)
    assert inference.sign_test(3, 3) == 1.0 and inference.sign_test(0, 0) == 1.0
    assert inference.sign_test(1, 5) == pytest.approx(2 * (1 + 6) / 64, abs=1e-15)  # 2 * P(X <= 1), n=6
    for up, down in ((25, 13), (43, 24), (28, 16), (6, 0)):
        assert inference.sign_test(up, down) == pytest.approx(stats.binomtest(up, up + down, 0.5).pvalue, rel=1e-12)


def test_exact_interval_is_clopper_pearson_on_the_changed_items():
    low, high = inference.discordant_interval(4, 0, 292)
    theta_low = 0.025 ** (1 / 4)  # Clopper-Pearson lower bound for 4 of 4, by hand: (alpha/2)**(1/n)
    assert (low, high) == pytest.approx(((2 * theta_low - 1) * 4 / 292, 4 / 292), rel=1e-12)
    assert low < 0  # 4 up, 0 down does not exclude "no change"
    for up, down, items in ((25, 13, 292), (43, 24, 292), (2, 9, 50)):
        ci = stats.binomtest(up, up + down, 0.5).proportion_ci(0.95, method="exact")
        scale = (up + down) / items
        assert inference.discordant_interval(up, down, items) == pytest.approx(
            ((2 * ci.low - 1) * scale, (2 * ci.high - 1) * scale), rel=1e-9)


def test_holm_by_hand():
    adjusted = inference.holm([0.01, 0.04, 0.03, np.nan])
    # sorted 0.01, 0.03, 0.04 over m = 3: 3 * 0.01 = 0.03; 2 * 0.03 = 0.06; max(0.06, 1 * 0.04) = 0.06
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06], abs=1e-15) and np.isnan(adjusted[3])
    assert inference.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_t_interval_and_test_match_scipy():
    values = np.array([-11.136525959347317, -5.418, 0.9800742011210442])  # three seeds' means
    mean, low, high = inference.t_interval(values)
    expected = stats.t.interval(0.95, 2, loc=values.mean(), scale=stats.sem(values))
    assert (mean, low, high) == pytest.approx((values.mean(), *expected), rel=1e-12)
    assert inference.t_test(values) == pytest.approx(stats.ttest_1samp(values, 0).pvalue, rel=1e-12)
    assert math.isnan(inference.t_interval([1.0])[1]) and math.isnan(inference.t_test([1.0]))


@pytest.mark.parametrize("sd, n", [(1.0, 5), (0.3, 3), (2.0, 40)])
def test_minimum_detectable_effect_has_power_08(sd, n):
    mde = inference.min_detectable_effect(sd, n)
    df, crit = n - 1, stats.t.ppf(0.975, n - 1)
    nc = mde * math.sqrt(n) / sd  # power of the two-sided t-test, written out with scipy's non-central t
    assert stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc) == pytest.approx(0.8, abs=1e-9)


def test_minimum_detectable_effect_tends_to_the_normal_formula():
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)  # 2.8016 standard errors for large n
    assert inference.min_detectable_effect(1.0, 40000) == pytest.approx(z / 200, rel=1e-3)


@pytest.mark.parametrize("low, high, p, expected", [
    (-0.5, -0.1, 0.01, "lowered"),
    (0.1, 0.5, 0.01, "raised"),
    (-0.5, -0.1, 0.2, "no change shown, non-inferiority at -0.1 not shown"),  # Holm took the rejection away
    (-0.05, 0.3, 0.3, "no change shown, not lower than -0.1 (non-inferior at that margin)"),
    (-0.2, 0.3, 0.3, "no change shown, non-inferiority at -0.1 not shown"),
])
def test_describe_never_reads_no_difference_off_non_significance(low, high, p, expected):
    words = inference.describe(low, high, p, 0.1, 0.25)
    assert words.startswith(expected), words
    assert ("0.250" in words) == words.startswith("no change")  # the MDE beside every "no change"


def test_minimum_detectable_effect_with_two_runs():
    # two runs (df=1), where scipy's non-central t has NaN far tails: the MDE still has power 0.8
    mde = inference.min_detectable_effect(0.01, 2)
    nc, crit = mde * math.sqrt(2) / 0.01, stats.t.ppf(0.975, 1)
    assert stats.nct.sf(crit, 1, nc) == pytest.approx(0.8, abs=1e-6)  # the lower tail is < 1e-15 here


def test_cli_refuses_a_guard_below_one_token(capsys):
    from analysis.__main__ import main
    with pytest.raises(SystemExit) as exit_info:
        main(["somewhere", "--after-diff-min-tokens", "0"])
    assert exit_info.value.code == 2
    assert "--after-diff-min-tokens must be >= 1" in capsys.readouterr().err
