"""Continual-learning metrics: pure functions of the accuracy matrix.

Conventions
-----------
``R`` is a ``(T, T)`` numpy array (anything ``np.asarray`` turns into one is accepted)::

    R[i, j] = accuracy on task j (0-based) after training task i (0-based)

so row ``i`` is the evaluation made after the (i+1)-th task has been trained, the
diagonal ``R[j, j]`` is the accuracy on a task right after learning it, the last row
``R[T-1, :]`` is the final evaluation, and ``R[j-1, j]`` (just above the diagonal) is the
accuracy on task j *before* it has been trained.

``baseline`` (``b``) is a length-T vector: ``b[j]`` is the accuracy on task j of the
same-seed model before any training (the evaluation GEM and Mammoth make at
initialisation).  It is only needed for forward transfer.

Accuracies may be fractions or percentages; the functions do not rescale, so the
outputs are in the same unit as ``R``.

Sign conventions (state them next to any number you report)
------------------------------------------------------------
* Forgetting > 0 means the network got worse on old tasks.
* Backward transfer < 0 means the network got worse on old tasks (forgetting).
* Forward transfer > 0 means earlier tasks helped a task before it was trained.
* Forgetting takes the maximum over *earlier rows only* (rows 0..T-2, excluding the
  final row), as in Chaudhry et al.'s A-GEM code, so it can be negative.  Mammoth's
  forgetting includes the final row in the maximum (so it is >= 0) and Avalanche's uses
  the diagonal instead of the maximum; neither is what is computed here.
* Backward and forward transfer use the GEM paper's 1/(T-1) denominator.  GEM's own
  code (and MER, which copies it) averages over T with a zero entry, reporting
  (T-1)/T times these values.

With a single task (T == 1) forgetting, backward transfer and forward transfer are
undefined and are returned as ``float("nan")``.

Invalid input (not 2-D, not square, empty, non-finite, wrong baseline length) raises
``ValueError`` with a message naming the problem.

The statistics helper :func:`mean_and_standard_error` summarises one number per seed; it
checks its input strictly and leaves the arithmetic to :mod:`engram.stats`, which every
table uses (the t interval is :func:`engram.stats.t_interval`, the one there is). See the reference sheet's advice to use the
t interval, not +/-1 SE, with 3..10 seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import engram.stats as stats

__all__ = [
    "average_accuracy",
    "average_accuracy_curve",
    "learning_accuracy",
    "average_forgetting",
    "backward_transfer",
    "forward_transfer",
    "mean_and_standard_error",
    "summarize",
]

# --------------------------------------------------------------------------- validation


def _as_accuracy_matrix(R: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Return R as a finite, square, 2-D float array with T >= 1, or raise ValueError."""
    try:
        arr = np.asarray(R, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"accuracy matrix must be a 2-D array of numbers, could not convert it: {exc}"
        ) from None
    if arr.ndim != 2:
        raise ValueError(
            f"accuracy matrix must be 2-D (T, T), got {arr.ndim}-D array of shape {arr.shape}"
        )
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"accuracy matrix must be square, got shape {arr.shape}")
    if arr.shape[0] < 1:
        raise ValueError(f"accuracy matrix must have at least one task, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = [tuple(int(k) for k in idx) for idx in np.argwhere(~np.isfinite(arr))[:5]]
        raise ValueError(
            f"accuracy matrix must be finite, found NaN/inf at (row, column) {bad}"
        )
    return arr


def _as_vector(values: np.ndarray | Sequence[float], name: str,
               length: int | None = None) -> np.ndarray:
    """Return `values` as a finite 1-D float array (of `length`, or non-empty), or raise.

    `name` is what the error messages call it: the per-task "baseline" (length T) or the
    per-seed "values" (any non-zero length).
    """
    try:
        v = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{name} must be a 1-D array of numbers, could not convert it: {exc}"
        ) from None
    expected = f"of length T={length}" if length is not None else "(one number per seed)"
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D {expected}, got shape {v.shape}")
    if length is not None and v.shape[0] != length:
        raise ValueError(
            f"{name} must have length T={length} (one entry per task), got length {v.shape[0]}"
        )
    if v.shape[0] < 1:
        raise ValueError(f"{name} must contain at least one number, got an empty array")
    if not np.all(np.isfinite(v)):
        bad = [int(k) for k in np.flatnonzero(~np.isfinite(v))[:5]]
        raise ValueError(f"{name} must be finite, found NaN/inf at index {bad}")
    return v


# --------------------------------------------------------------------------- metrics


def average_accuracy(R: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Average accuracy over all tasks after training the last task.

    Formula: ACC = (1/T) * sum_{j=0..T-1} R[T-1, j]

    Source: Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning",
    NeurIPS 2017 (ACC); equals A_T of Chaudhry et al., "Riemannian Walk for
    Incremental Learning", ECCV 2018.
    """
    arr = _as_accuracy_matrix(R)
    return float(np.mean(arr[-1, :]))


def average_accuracy_curve(R: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Average accuracy on the tasks seen so far, after each task.

    Formula: A_k = (1/k) * sum_{j=0..k-1} R[k-1, j],  for k = 1..T
    (element k-1 of the returned length-T array; the last element equals
    :func:`average_accuracy`).

    Source: Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018.
    """
    arr = _as_accuracy_matrix(R)
    T = arr.shape[0]
    return np.array([arr[k - 1, :k].mean() for k in range(1, T + 1)], dtype=float)


def learning_accuracy(R: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Mean accuracy on each task right after learning it (mean of the diagonal).

    Formula: LA = (1/T) * sum_{j=0..T-1} R[j, j]

    Source: Riemer et al., "Learning to Learn without Forgetting by Maximizing
    Transfer and Minimizing Interference" (MER), ICLR 2019.  For plasticity studies
    also look at R[j, j] against j: loss of plasticity shows as a falling diagonal.
    """
    arr = _as_accuracy_matrix(R)
    return float(np.mean(np.diag(arr)))


def average_forgetting(R: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Average forgetting at the end of training (Chaudhry's max-over-earlier-rows form).

    Formula:
        f_j = max_{l in 0..T-2} R[l, j] - R[T-1, j],   for j = 0..T-2
        F   = (1/(T-1)) * sum_{j=0..T-2} f_j

    The maximum runs over all earlier rows l = 0..T-2 (including rows before task j
    was trained) and excludes the final row, exactly as ``utils.compute_fgt`` in
    Chaudhry et al.'s A-GEM code.  Hence forgetting can be *negative* when the final
    accuracy on an old task exceeds every earlier accuracy on it.

    Sign: F > 0 means the network got worse on old tasks.
    Returns ``nan`` for T == 1 (no old task to forget).

    Source: Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018
    (F_k with k = T); code: Chaudhry et al., A-GEM (ICLR 2019), utils.compute_fgt.
    """
    arr = _as_accuracy_matrix(R)
    T = arr.shape[0]
    if T == 1:
        return float("nan")
    best_before_end = arr[: T - 1, : T - 1].max(axis=0)
    final = arr[T - 1, : T - 1]
    return float(np.mean(best_before_end - final))


def backward_transfer(R: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Backward transfer: how training later tasks changed accuracy on earlier ones.

    Formula: BWT = (1/(T-1)) * sum_{j=0..T-2} (R[T-1, j] - R[j, j])

    Sign: BWT < 0 means forgetting (old tasks got worse); BWT > 0 means later
    training improved old tasks.
    Returns ``nan`` for T == 1.

    This is the GEM paper's definition with the T-1 denominator (as Mammoth
    implements it).  GEM's released code (metrics.py, copied by MER) averages a
    length-T vector whose last entry is 0, so it reports (T-1)/T times this value.

    Source: Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning",
    NeurIPS 2017.
    """
    arr = _as_accuracy_matrix(R)
    T = arr.shape[0]
    if T == 1:
        return float("nan")
    return float(np.mean(arr[T - 1, : T - 1] - np.diag(arr)[: T - 1]))


def forward_transfer(
    R: np.ndarray | Sequence[Sequence[float]],
    baseline: np.ndarray | Sequence[float],
) -> float:
    """Forward transfer: accuracy on a task before training it, relative to the baseline.

    Formula: FWT = (1/(T-1)) * sum_{j=1..T-1} (R[j-1, j] - baseline[j])

    ``baseline[j]`` is the accuracy on task j of the same-seed model before any
    training; ``baseline[0]`` is required for the shape check but not used.
    Sign: FWT > 0 means earlier tasks helped task j before it was trained.
    Returns ``nan`` for T == 1.

    As with :func:`backward_transfer`, this uses the paper's T-1 denominator; GEM's
    code reports (T-1)/T times this value.

    Source: Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning",
    NeurIPS 2017.
    """
    arr = _as_accuracy_matrix(R)
    T = arr.shape[0]
    b = _as_vector(baseline, "baseline", T)
    if T == 1:
        return float("nan")
    above_diagonal = np.diag(arr, k=1)  # R[j-1, j] for j = 1..T-1
    return float(np.mean(above_diagonal - b[1:]))


def summarize(
    R: np.ndarray | Sequence[Sequence[float]],
    baseline: np.ndarray | Sequence[float] | None = None,
) -> dict[str, float]:
    """All scalar metrics of one accuracy matrix in a dict.

    Keys: "average_accuracy", "average_forgetting", "backward_transfer",
    "forward_transfer" (only when ``baseline`` is given) and "learning_accuracy".
    Conventions as in the module docstring (forgetting > 0 and BWT < 0 mean worse;
    T-1 denominators; nan for the transfer/forgetting metrics when T == 1).
    """
    arr = _as_accuracy_matrix(R)
    out: dict[str, float] = {
        "average_accuracy": average_accuracy(arr),
        "average_forgetting": average_forgetting(arr),
        "backward_transfer": backward_transfer(arr),
    }
    if baseline is not None:
        out["forward_transfer"] = forward_transfer(arr, baseline)
    out["learning_accuracy"] = learning_accuracy(arr)
    return out


# --------------------------------------------------------------------------- statistics


def mean_and_standard_error(values: np.ndarray | Sequence[float]) -> tuple[float, float]:
    """Sample mean and standard error of the mean over seeds, strictly checked.

    Formula: mean = (1/n) * sum_i x_i;  SE = s / sqrt(n), with s the sample standard
    deviation (ddof=1): s^2 = (1/(n-1)) * sum_i (x_i - mean)^2.

    Returns (mean, SE); SE is ``nan`` when n == 1.  Raises ValueError for an empty, non-1-D
    or non-finite input (:func:`engram.stats.mean_se`, which computes it, returns nan
    there instead).  With few seeds a +/-1 SE band covers the true mean only ~58% (n=3) to
    ~66% (n=10) of the time; prefer :func:`engram.stats.t_interval`.

    Source: standard; reference sheet section 6 (Dohare et al. 2024 shade +/-1 SE).
    """
    return stats.mean_se(_as_vector(values, "values"))
