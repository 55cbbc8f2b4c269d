"""minitpo/stats.py: each statistic against a hand-worked value (the examples in its docstrings) and an
independent computation: a plain-loop bootstrap, the Bradley-Terry objective's gradient and its maximum,
strengths recovered from sampled battles."""

import math

import numpy as np
import pytest

from minitpo.stats import (bootstrap_interval, bradley_terry, length_controlled_rate, logistic_at_zero,
                           percentile_interval, same_winner, two_order_p)


def plain_bootstrap(verdicts, resamples=2000, seed=0):
    """An independent percentile bootstrap of the mean (a plain loop over numpy's generator), with the
    documented defaults: 2000 resamples, seed 0, a 95% interval."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(verdicts), size=(resamples, len(verdicts)))
    means = sorted(sum(verdicts[j] for j in row) / len(row) for row in idx)
    return np.percentile(means, 2.5), np.percentile(means, 97.5)


# ---------------------------------------------------------------------------------------------- intervals

def test_bootstrap_interval_matches_an_independent_resampling_and_contains_the_estimate():
    verdicts = [1.0] * 30 + [0.5] * 10 + [0.0] * 20
    low, high = bootstrap_interval(verdicts, resamples=2000, seed=0)
    estimate = np.mean(verdicts)
    assert low < estimate < high
    # Independent check: a plain-loop percentile bootstrap with the same generator gives the same ends.
    assert (low, high) == pytest.approx(plain_bootstrap(verdicts, 2000, 0))
    # The normal approximation of a mean's 95% interval is close to it at n = 60.
    half = 1.96 * np.std(verdicts) / np.sqrt(len(verdicts))
    assert low == pytest.approx(estimate - half, abs=0.03) and high == pytest.approx(estimate + half, abs=0.03)
    # The defaults are the documented ones (2000 resamples, seed 0), so a result can be reproduced; another
    # seed moves the ends. A single verdict gives a point.
    assert bootstrap_interval(verdicts) == pytest.approx(plain_bootstrap(verdicts))
    assert bootstrap_interval(verdicts, seed=1) != pytest.approx(plain_bootstrap(verdicts))
    assert bootstrap_interval([0.5]) == (0.5, 0.5)


def test_percentile_interval_by_hand_and_clamped_to_the_estimate():
    draws = [x / 10 for x in range(1, 11)]  # 0.1 .. 1.0; linear percentiles 10 and 90: 0.19 and 0.91
    assert percentile_interval(0.5, draws, level=0.8) == pytest.approx((0.19, 0.91))
    assert percentile_interval(0.95, draws, level=0.8) == pytest.approx((0.19, 0.95))
    assert percentile_interval(0.1, draws, level=0.8) == pytest.approx((0.1, 0.91))


# ---------------------------------------------------------------------------------------------- length control

def test_length_control_at_equal_lengths_is_the_raw_rate():
    rate, _, _ = length_controlled_rate([0, 0, 0, 0], [1, 1, 0, 0.5], ["a", "b", "c", "d"])
    assert rate == pytest.approx(2.5 / 4, abs=1e-9)
    # one fit per weight row: the weighted mean of v, the second row counting the first item twice
    assert logistic_at_zero(np.zeros(3), np.array([1.0, 1.0, 0.0]), np.array([[1, 1, 1], [2, 0, 1]])) == \
        pytest.approx([2 / 3, 2 / 3], abs=1e-9)


def test_length_control_when_the_longer_always_wins_is_one_half():
    rate, _, _ = length_controlled_rate([10, -10], [1.0, 0.0], ["a", "b"])
    assert rate == pytest.approx(0.5, abs=1e-12)


# ---------------------------------------------------------------------------------------------- pairwise judge

def test_two_orders_combine_by_hand():
    # A first: 0.9 for A; B first: 0.3 for B, i.e. 0.7 for A. Mean 0.8, and both orders pick A.
    assert two_order_p(0.9, 0.3) == pytest.approx(0.8)
    assert same_winner(0.9, 0.3)
    # A pure position bias (the first shown always wins at 0.9) cancels to 0.5 and is inconsistent.
    assert two_order_p(0.9, 0.9) == pytest.approx(0.5)
    assert not same_winner(0.9, 0.9)
    assert same_winner(0.5, 0.5)  # a tie both ways is the same outcome


# ---------------------------------------------------------------------------------------------- Bradley-Terry

def test_bradley_terry_two_by_two_by_hand():
    # B = wins + 0.5 each way = [[0, 3.5], [1.5, 0]]; optimum sigmoid(e0 - e1) = 3.5 / 5
    e = bradley_terry([[0, 3], [1, 0]])
    assert e == pytest.approx([0.5 * math.log(7 / 3), -0.5 * math.log(7 / 3)], abs=1e-8)


def test_bradley_terry_is_the_maximum_of_the_objective():
    rng = np.random.default_rng(0)
    wins = rng.integers(0, 5, size=(4, 4)) * (1 - np.eye(4))
    e = np.array(bradley_terry(wins))
    b = wins + 0.5 * (1 - np.eye(4))

    def objective(x):
        return sum(b[m, n] * -np.logaddexp(0, -(x[m] - x[n])) for m in range(4) for n in range(4))

    assert abs(e.mean()) < 1e-9
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    # d/de_m: wins of m pull it up by sigma(e_n - e_m), losses pull it down by sigma(e_m - e_n)
    grad = [sum(b[m, n] * sig(e[n] - e[m]) - b[n, m] * sig(e[m] - e[n]) for n in range(4)) for m in range(4)]
    assert np.allclose(grad, 0, atol=1e-7)
    for _ in range(20):  # no nearby point is better
        assert objective(e) >= objective(e + rng.normal(0, 0.05, 4))


def test_bradley_terry_recovers_order_from_sampled_battles():
    rng = np.random.default_rng(1)
    strengths = np.array([-1.5, -0.5, 0.3, 1.0, 2.0])
    k = len(strengths)
    wins = np.zeros((k, k))
    for m in range(k):
        for n in range(m + 1, k):
            p = 1 / (1 + np.exp(-(strengths[m] - strengths[n])))
            wins[m, n] = rng.binomial(400, p)
            wins[n, m] = 400 - wins[m, n]
    e = bradley_terry(wins)
    assert list(np.argsort(e)) == list(range(k))
    assert np.allclose(e, strengths - strengths.mean(), atol=0.2)


def test_bradley_terry_ties_and_undefeated():
    assert bradley_terry([[0, 2, 2], [2, 0, 2], [2, 2, 0]]) == pytest.approx([0, 0, 0], abs=1e-9)
    e = bradley_terry([[0, 2, 2], [0, 0, 2], [0, 0, 0]])  # a strict order, one undefeated
    assert all(math.isfinite(x) for x in e) and e[0] > e[1] > e[2]
    assert sum(e) == pytest.approx(0, abs=1e-9)
    assert bradley_terry([[0]]) == [0.0] and bradley_terry(np.zeros((0, 0))) == []
