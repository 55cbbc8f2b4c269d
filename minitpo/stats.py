"""The statistics minitpo reports, as pure numpy functions of plain numbers: no file, no model, no config.

Consumes verdicts (p = P(the first is better), or 1 / 0.5 / 0) and battle counts; produces the win
rate's bootstrap interval, the length-controlled win rate, the two-order average and position
consistency of a pairwise judge, and Bradley-Terry strengths. evaluate.py, judges/check.py and
judges/pairwise.py call these; each docstring works one example by hand, and tests/test_stats.py checks
it against an independent computation.
"""

import numpy as np

BOOTSTRAP_RESAMPLES = 2000  # the interval's ends move by ~0.01 between seeds at this count
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95
LC_RIDGE = 1e-2  # on the slope only: keeps the fit finite when length alone separates wins from losses


# ---------------------------------------------------------------------------------------------- verdicts

def verdict(p: float) -> float:
    """1 for a win (p > 0.5), 0.5 for an exact tie, 0 for a loss, where p = P(the first is better):
    win rates count ties as half a win, and battle matrices count a win per order.
    Example: verdict(0.51) = 1.0, verdict(0.5) = 0.5, verdict(0.2) = 0.0."""
    return 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0


def two_order_p(p_ab: float, p_ba: float) -> float:
    """P(A better than B) from P(A better | A shown first) and P(B better | B shown first):
    (p_ab + (1 - p_ba)) / 2, which cancels the judge's position bias to first order.
    Example: A first 0.9 for A; B first 0.3 for B, i.e. 0.7 for A: (0.9 + 0.7) / 2 = 0.8. A judge that
    always gives the first shown 0.9 gives (0.9 + 0.1) / 2 = 0.5."""
    return (p_ab + 1.0 - p_ba) / 2


def same_winner(p_ab: float, p_ba: float) -> bool:
    """The two orders pick the same winner (or both tie): position consistency's unit.
    Example: (0.9, 0.3) picks A both times: True; (0.9, 0.9) picks whichever is first: False;
    (0.5, 0.5) ties both times: True."""
    return verdict(p_ab) == 1.0 - verdict(p_ba)


# ---------------------------------------------------------------------------------------------- intervals

def percentile_interval(estimate: float, draws, level: float = CI_LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap `draws` at `level`, its ends clamped to include the estimate
    itself, which the percentile method does not promise for tiny or lopsided samples.
    Example: draws 0.1, 0.2, ..., 1.0 (ten), level 0.8: numpy's linear percentiles 10 and 90 are 0.19
    and 0.91, so (0.19, 0.91); with the estimate 0.95 the high end becomes 0.95."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.asarray(draws, dtype=np.float64), [tail, 100 - tail])
    return float(min(low, estimate)), float(max(high, estimate))


def bootstrap_interval(verdicts, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `verdicts`: resample the items with replacement
    `resamples` times, take the mean of each resample, and read `percentile_interval` of those means.
    Example: all wins, [1, 1, 1]: every resample's mean is 1, so (1.0, 1.0); a single verdict 0.5
    gives (0.5, 0.5)."""
    v = np.asarray(verdicts, dtype=np.float64)
    assert v.size > 0, "bootstrap_interval needs at least one verdict"
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)  # (resamples,)
    return percentile_interval(v.mean(), means, level)


# ---------------------------------------------------------------------------------------------- length control

def length_controlled_rate(diff, verdicts, groups, resamples: int = BOOTSTRAP_RESAMPLES,
                           seed: int = BOOTSTRAP_SEED, level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(rate, ci_low, ci_high): the win rate with the length difference regressed out, in the spirit of
    AlpacaEval 2's length-controlled win rate (Dubois et al. 2024). Fit P(win) = sigmoid(a + b * tanh(d /
    sd(d))), d = `diff` (the model's response length minus the other's), to `verdicts` (ties as 0.5) by
    maximum likelihood, and read it at d = 0: sigmoid(a). A judge that only rewards the longer response
    gives 0.5 whatever the raw rate; verdicts that ignore length leave the raw rate. The interval
    resamples the `groups` (an item's instruction: its samples are not independent evidence) and refits.
    Examples: at equal lengths (every d = 0) there is nothing to regress and the rate is the raw one:
    verdicts 1, 1, 0, 0.5 give 2.5 / 4 = 0.625. Verdicts 1 at d = +10 and 0 at d = -10, where the longer
    always wins, give 0.5: the fit is symmetric in d, so a = 0 (up to rounding).
    """
    diff = np.asarray(diff, dtype=np.float64)
    d = np.tanh(diff / (diff.std() or 1.0))  # (n,)
    v = np.asarray(verdicts, dtype=np.float64)  # (n,)
    ids = {g: i for i, g in enumerate(sorted(set(groups)))}  # group -> its number
    group = np.array([ids[g] for g in groups])  # (n,)
    # the bootstrap draws whole groups: a row's weight is how often its group is drawn
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ids), size=(resamples, len(ids)))
    counts = np.stack([np.bincount(row, minlength=len(ids)) for row in draws])  # (resamples, groups)
    weights = np.concatenate([np.ones((1, len(v))), counts[:, group]])  # (1 + resamples, n)
    rates = logistic_at_zero(d, v, weights)  # (1 + resamples,): the estimate, then the bootstrap fits
    return (float(rates[0]), *percentile_interval(rates[0], rates[1:], level))


def logistic_at_zero(d: np.ndarray, v: np.ndarray, weights: np.ndarray, iterations: int = 100) -> np.ndarray:
    """sigmoid(a) of the logistic fit v ~ sigmoid(a + b d) over the n rows of d and v, once per row of
    weights (R, n) (a row's weight: how often it counts), all at once: Newton's method on the weighted
    cross-entropy (fractional targets allowed) plus LC_RIDGE * b^2 / 2.
    Example: d = [0, 0, 0], v = [1, 1, 0], weights [[1, 1, 1], [2, 0, 1]]: with d all 0 the slope stays 0
    and sigmoid(a) is the weighted mean of v: [2/3, 2/3] (the second row counts the first item twice)."""
    a, b = np.zeros(len(weights)), np.zeros(len(weights))
    for _ in range(iterations):
        q = 1 / (1 + np.exp(-(a[:, None] + b[:, None] * d)))  # (R, n)
        w = weights * q * (1 - q)
        r = weights * (q - v)
        g_a, g_b = r.sum(1), (r * d).sum(1) + LC_RIDGE * b
        h_aa, h_ab, h_bb = w.sum(1) + 1e-12, (w * d).sum(1), (w * d * d).sum(1) + LC_RIDGE
        det = h_aa * h_bb - h_ab ** 2
        step_a, step_b = (h_bb * g_a - h_ab * g_b) / det, (h_aa * g_b - h_ab * g_a) / det
        a, b = np.clip(a - step_a, -30, 30), b - step_b  # |a| = 30: all wins or all losses
        if max(np.abs(step_a).max(), np.abs(step_b).max()) < 1e-10:
            break
    return 1 / (1 + np.exp(-a))


# ---------------------------------------------------------------------------------------------- Bradley-Terry

def bradley_terry(wins, prior: float = 0.5, max_iter: int = 10_000, tol: float = 1e-10) -> list[float]:
    """Bradley-Terry strengths e from a K x K battle matrix, wins[m][n] = times m beat n (docs/method.md step 4).

    Maximises sum_{m,n} B[m][n] * log sigmoid(e_m - e_n) (Bradley & Terry 1952), where
    B = wins + `prior` pseudo-wins each way between every pair: the prior keeps the maximum finite
    when a candidate is undefeated or never wins, and leaves ties exactly tied. Fit with Hunter's MM
    algorithm (Hunter 2004, "MM algorithms for generalized Bradley-Terry models"), which increases the
    likelihood every step: with p = exp(e), p_m <- W_m / sum_{n != m} N_mn / (p_m + p_n), W_m = sum_n
    B[m][n] the wins of m and N_mn = B[m][n] + B[n][m] the games between m and n. Returns e, mean 0.

    Example: wins [[0, 3], [1, 0]] gives B = [[0, 3.5], [1.5, 0]]; at the optimum
    sigmoid(e_0 - e_1) = 3.5 / 5, so e_0 - e_1 = log(7/3) and e = [0.4236, -0.4236]."""

    b = np.asarray(wins, dtype=np.float64)
    k = len(b)
    assert b.shape == (k, k), f"wins must be a square matrix, got shape {b.shape}"
    assert (b >= 0).all() and np.isfinite(b).all(), "wins must be finite and non-negative"
    assert prior > 0, f"prior must be positive to keep scores finite, got {prior}"
    if k < 2:
        return [0.0] * k
    off = ~np.eye(k, dtype=bool)
    b = np.where(off, b + prior, 0.0)  # self-battles never count
    w = b.sum(axis=1)  # (K,) wins of each candidate
    n = b + b.T  # (K, K) games between each pair, 0 on the diagonal
    log_p = np.zeros(k)
    for _ in range(max_iter):
        p = np.exp(log_p)
        new = np.log(w) - np.log((n / (p[:, None] + p[None, :])).sum(axis=1))
        new -= new.mean()  # strengths are defined up to a shift; keep the geometric mean of p at 1
        done = np.abs(new - log_p).max() < tol
        log_p = new
        if done:
            break
    return [float(x) for x in log_p]
