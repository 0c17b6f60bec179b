"""Statistics over seeds: the one place engram computes a mean, a spread or a test.

Every table and figure summarises *one number per seed* (a run's final accuracy, its mean
online loss over some tasks, ...) with these functions, so they all agree:

* :func:`mean_se`: mean and standard error, SE = s / sqrt(n), s the sample standard
  deviation (ddof=1). What the tables print after "±".
* :func:`t_quantile` and :func:`t_interval`: the 95% Student t interval of the mean,
  mean ± t_{0.975, n-1} · s / sqrt(n). With the 3 to 10 seeds engram's experiments use,
  ±1 SE covers the true mean only ~58% (n=3) to ~66% (n=10) of the time; the t interval
  keeps its 95% (reference sheet plasticity-importance-metrics.md, section 6).
* :func:`paired_test`: the two-sided paired t-test of two methods measured on the same
  seeds, and :func:`holm`: Holm's correction when several are tested at once.
* :func:`auc`: the trapezoid area under a curve, which reduces one seed's curve (the
  importance profile's loss against the fraction of weights replaced) to one number.

With one value (one seed) there is no spread to estimate: SE, the interval's half-width and
the test are ``nan``, which the tables print as a mean alone (no "±") or "n/a". With no
value the mean is ``nan`` too. A ``nan`` among the values (a seed that lacks the number)
makes the mean and SE ``nan`` rather than a mean over fewer seeds that no one asked for.

This module imports only numpy, math and (inside the functions, since it is slow to import)
scipy, so any part of engram can use it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

CONFIDENCE = 0.95  # the interval the tables print


def _values(values: Any) -> np.ndarray:
    """`values` as a float array with the seeds along the first axis (a 0-D input is one seed)."""
    v = np.asarray(values, dtype=float)
    return v.reshape(1) if v.ndim == 0 else v


def _scalar_or_array(x: np.ndarray) -> Any:
    return float(x) if x.ndim == 0 else x


def mean_se(values: Any) -> tuple[Any, Any]:
    """(mean, standard error) over the first axis of `values`, the seeds.

    mean = (1/n) · Σ_i x_i;  SE = s / sqrt(n), s^2 = (1/(n-1)) · Σ_i (x_i - mean)^2 (ddof=1,
    the unbiased variance). `values` of shape (n,) give two floats; shape (n, ...) gives two
    arrays of shape (...), e.g. (seeds, tasks) -> a mean and an SE per task. SE is nan for
    n = 1 (no spread to estimate), and both are nan for n = 0 or where a value is nan.
    """
    v = _values(values)  # (n, ...)
    n = v.shape[0]
    if n == 0:
        return _scalar_or_array(np.full(v.shape[1:], math.nan)), \
            _scalar_or_array(np.full(v.shape[1:], math.nan))
    with np.errstate(invalid="ignore"):  # an inf value: its SE is nan, without a warning
        mean = v.mean(axis=0)
        se = v.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.full(v.shape[1:], math.nan)
    return _scalar_or_array(np.asarray(mean)), _scalar_or_array(np.asarray(se))


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """The multiplier of a two-sided t interval over n values: t_{(1+confidence)/2, n-1}.

    From ``scipy.stats.t.ppf``: 12.706 (n=2), 4.303 (n=3), 2.776 (n=5), 2.262 (n=10) at 95%.
    nan for n < 2 (no degrees of freedom). ValueError when confidence is not in (0, 1).
    """
    if (isinstance(confidence, bool) or not isinstance(confidence, numbers.Real)
            or not 0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    if n < 2:
        return math.nan
    from scipy import stats

    return float(stats.t.ppf((1 + float(confidence)) / 2, n - 1))


def t_interval(values: Sequence[float] | np.ndarray,
               confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(mean, half-width) of the two-sided Student t confidence interval of the mean.

    half = t_{(1+confidence)/2, n-1} · s / sqrt(n) = :func:`t_quantile` · SE, s the sample
    standard deviation (ddof=1); the interval is [mean - half, mean + half]. By hand for
    [1, 2, 3, 4]: mean 2.5, s = sqrt(5/3), SE = s/2 = 0.6455, t_{0.975,3} = 3.182, half =
    2.0543. The half-width is nan with fewer than 2 values, the mean nan with none.
    """
    v = _values(values)  # (n,)
    mean, se = mean_se(v)
    return mean, t_quantile(len(v), confidence) * se if len(v) > 1 else math.nan


def auc(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Area under y(x) by the trapezoid rule:

        AUC = Σ_{k=0}^{K-2} (x_{k+1} - x_k) · (y_k + y_{k+1}) / 2

    x sorted ascending (a repeated x adds a zero-width piece, so a step is drawn as two
    points at one x). By hand: x = [0, 0.5, 1], y = [1, 2, 4] gives 0.5·1.5 + 0.5·3 = 2.25.
    0 with fewer than 2 points (no width); nan where a y in a used piece is nan.
    """
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)  # (K,) each
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"auc needs x and y of one length, got shapes {xs.shape} and {ys.shape}")
    if len(xs) < 2:
        return 0.0
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2))


def paired_test(a: Sequence[float], b: Sequence[float],
                confidence: float = CONFIDENCE) -> dict[str, float]:
    """Paired comparison of a and b, element k of each from the same seed.

    d_k = a_k - b_k. Returns n (pairs), diff_mean = mean(d), diff_ci = t-interval
    half-width of mean(d) (see :func:`t_interval`), t and p of the two-sided paired t-test
    (scipy.stats.ttest_rel(a, b): t = mean(d) / (sd(d) / sqrt(n))), d_z = mean(d) / sd(d)
    (effect size), n_below / n_above = pairs with d < 0 / d > 0 (the sign count). t, p,
    d_z and diff_ci are nan with fewer than 2 pairs, and t, p, d_z when every d is 0.
    Pairing removes what the seeds share (same data, initialisation and order), so it finds
    a difference that two independent intervals would hide.
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)  # (n,) each
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.shape} and {b.shape}")
    d = a - b  # (n,)
    mean, half = t_interval(d, confidence)
    out = {"n": len(d), "diff_mean": mean, "diff_ci": half, "t": math.nan, "p": math.nan,
           "d_z": math.nan, "n_below": int((d < 0).sum()), "n_above": int((d > 0).sum())}
    if len(d) >= 2 and np.any(d != 0):
        with warnings.catch_warnings():  # nearly equal samples: scipy warns of precision loss
            warnings.simplefilter("ignore", RuntimeWarning)
            result = stats.ttest_rel(a, b)
        sd = float(d.std(ddof=1))
        out.update(t=float(result.statistic), p=float(result.pvalue),
                   d_z=mean / sd if sd > 0 else math.copysign(math.inf, mean))
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (Holm 1979), in the input's order.

    With the m finite p-values sorted ascending, p_(1) <= ... <= p_(m):
    adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) * p_(j)). Rejecting where adjusted
    p <= alpha controls the family-wise error rate at alpha. nan entries (no test) stay nan
    and do not count in m.
    """
    p = np.asarray(pvalues, dtype=float)  # (k,)
    out = np.full(p.shape, math.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]  # indices of the finite p, ascending
    m = len(order)
    running = 0.0
    for j, i in enumerate(order):  # j = 0..m-1, so the multiplier m - j is (m - (j+1) + 1)
        running = max(running, min(1.0, (m - j) * p[i]))
        out[i] = running
    return [float(x) for x in out]
