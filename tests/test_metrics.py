"""Tests for engram.metrics: every expected value is computed by hand in a comment.

Convention: R[i, j] = accuracy on task j after training task i (0-based).
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from engram.metrics import (
    average_accuracy,
    average_accuracy_curve,
    average_forgetting,
    backward_transfer,
    forward_transfer,
    learning_accuracy,
    mean_and_standard_error,
    summarize,
)
from engram.stats import t_interval  # the one t-interval, checked here on the metrics' cases

# A perfect learner that forgets everything: each task is learned to 1.0 and drops to
# 0.0 as soon as the next task is trained; untrained tasks are at 0.0.
FORGET_ALL = np.array(
    [
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
    ]
)

# A learner whose old tasks keep improving (no row before the last is as good as the
# last row on tasks 0 and 1).
IMPROVING = np.array(
    [
        [0.5, 0.1, 0.0],
        [0.6, 0.5, 0.1],
        [0.8, 0.7, 0.9],
    ]
)

# T = 4; on task 0 the best accuracy before the end is reached in row 1, after the
# diagonal (0.9 > R[0, 0] = 0.6), so Chaudhry's max differs from the diagonal.
MAX_OFF_DIAGONAL = np.array(
    [
        [0.6, 0.1, 0.1, 0.1],
        [0.9, 0.7, 0.2, 0.1],
        [0.8, 0.5, 0.8, 0.2],
        [0.5, 0.4, 0.6, 0.7],
    ]
)


# --------------------------------------------------------------------------- forget-all


def test_forget_all_average_accuracy() -> None:
    # last row [0, 0, 1] -> (0 + 0 + 1) / 3 = 1/3
    assert average_accuracy(FORGET_ALL) == pytest.approx(1 / 3)


def test_forget_all_average_accuracy_curve() -> None:
    # A_1 = R[0,0] = 1; A_2 = (R[1,0] + R[1,1]) / 2 = (0 + 1)/2 = 0.5; A_3 = 1/3
    np.testing.assert_allclose(average_accuracy_curve(FORGET_ALL), [1.0, 0.5, 1 / 3])


def test_forget_all_learning_accuracy() -> None:
    # diagonal [1, 1, 1] -> 1
    assert learning_accuracy(FORGET_ALL) == pytest.approx(1.0)


def test_forget_all_forgetting_is_one() -> None:
    # j=0: max(R[0,0], R[1,0]) - R[2,0] = max(1, 0) - 0 = 1
    # j=1: max(R[0,1], R[1,1]) - R[2,1] = max(0, 1) - 0 = 1
    # F = (1 + 1) / 2 = 1
    assert average_forgetting(FORGET_ALL) == pytest.approx(1.0)


def test_forget_all_backward_transfer_is_minus_one() -> None:
    # ((R[2,0] - R[0,0]) + (R[2,1] - R[1,1])) / (T-1) = ((0-1) + (0-1)) / 2 = -1
    assert backward_transfer(FORGET_ALL) == pytest.approx(-1.0)


def test_backward_transfer_uses_paper_denominator_t_minus_one_not_gem_code_t() -> None:
    # GEM's code would report (T-1)/T * (-1) = -2/3; the paper's value is -1.
    assert backward_transfer(FORGET_ALL) != pytest.approx(-2 / 3)
    assert backward_transfer(FORGET_ALL) == pytest.approx(-1.0)


def test_forget_all_forward_transfer_with_zero_baseline() -> None:
    # above-diagonal R[0,1] = 0, R[1,2] = 0; baseline 0 -> ((0-0) + (0-0)) / 2 = 0
    assert forward_transfer(FORGET_ALL, [0.0, 0.0, 0.0]) == pytest.approx(0.0)


# --------------------------------------------------------------------------- improving


def test_improving_learner_metrics() -> None:
    # ACC = (0.8 + 0.7 + 0.9) / 3 = 0.8
    assert average_accuracy(IMPROVING) == pytest.approx(0.8)
    # LA = (0.5 + 0.5 + 0.9) / 3 = 1.9 / 3
    assert learning_accuracy(IMPROVING) == pytest.approx(1.9 / 3)
    # curve: A_1 = 0.5; A_2 = (0.6 + 0.5)/2 = 0.55; A_3 = 0.8
    np.testing.assert_allclose(average_accuracy_curve(IMPROVING), [0.5, 0.55, 0.8])


def test_forgetting_is_negative_when_old_tasks_improve() -> None:
    # j=0: max(0.5, 0.6) - 0.8 = -0.2;  j=1: max(0.1, 0.5) - 0.7 = -0.2;  F = -0.2
    # (negative because the max excludes the final row, as in Chaudhry's compute_fgt)
    assert average_forgetting(IMPROVING) == pytest.approx(-0.2)


def test_backward_transfer_is_positive_when_old_tasks_improve() -> None:
    # ((0.8 - 0.5) + (0.7 - 0.5)) / 2 = (0.3 + 0.2) / 2 = 0.25
    assert backward_transfer(IMPROVING) == pytest.approx(0.25)


# --------------------------------------------------------------------------- sign conventions


def test_forgetting_is_positive_when_old_tasks_get_worse() -> None:
    # T=2: task 0 goes 0.9 -> 0.8.  F = max(R[0,0]) - R[1,0] = 0.9 - 0.8 = 0.1 > 0
    R = np.array([[0.9, 0.6], [0.8, 0.9]])
    assert average_forgetting(R) == pytest.approx(0.1)
    assert average_forgetting(R) > 0


def test_backward_transfer_is_negative_when_old_tasks_get_worse() -> None:
    # BWT = (R[1,0] - R[0,0]) / 1 = 0.8 - 0.9 = -0.1 < 0
    R = np.array([[0.9, 0.6], [0.8, 0.9]])
    assert backward_transfer(R) == pytest.approx(-0.1)
    assert backward_transfer(R) < 0


def test_forward_transfer_is_positive_when_earlier_tasks_help_unseen_task() -> None:
    # FWT = (R[0,1] - b[1]) / 1 = 0.6 - 0.1 = 0.5 > 0
    R = np.array([[0.9, 0.6], [0.8, 0.9]])
    assert forward_transfer(R, [0.1, 0.1]) == pytest.approx(0.5)
    assert forward_transfer(R, [0.1, 0.1]) > 0


def test_forward_transfer_is_negative_when_unseen_task_is_below_baseline() -> None:
    # FWT = (R[0,1] - b[1]) = 0.05 - 0.1 = -0.05
    R = np.array([[0.9, 0.05], [0.8, 0.9]])
    assert forward_transfer(R, [0.5, 0.1]) == pytest.approx(-0.05)


# --------------------------------------------------------------------------- max off diagonal


def test_forgetting_max_is_over_earlier_rows_not_the_diagonal() -> None:
    # rows 0..2 are the "earlier rows"; final row is [0.5, 0.4, 0.6, 0.7]
    # j=0: max(0.6, 0.9, 0.8) = 0.9 (row 1, not the diagonal 0.6) - 0.5 = 0.4
    # j=1: max(0.1, 0.7, 0.5) = 0.7 - 0.4 = 0.3
    # j=2: max(0.1, 0.2, 0.8) = 0.8 - 0.6 = 0.2
    # F = (0.4 + 0.3 + 0.2) / 3 = 0.3
    # (Avalanche's diagonal form would give (0.1 + 0.3 + 0.2) / 3 = 0.2.)
    assert average_forgetting(MAX_OFF_DIAGONAL) == pytest.approx(0.3)


def test_forgetting_max_includes_rows_before_the_task_was_trained() -> None:
    # Chaudhry's compute_fgt takes the max of the whole column over rows 0..T-2,
    # including rows before task j was trained.
    # R[0,1] = 0.9 (before training task 1) > R[1,1] = 0.5.
    # j=0: max(0.7, 0.7) - 0.7 = 0;  j=1: max(0.9, 0.5) - 0.5 = 0.4;  F = 0.2
    R = np.array(
        [
            [0.7, 0.9, 0.0],
            [0.7, 0.5, 0.0],
            [0.7, 0.5, 0.8],
        ]
    )
    assert average_forgetting(R) == pytest.approx(0.2)


def test_forgetting_max_excludes_the_final_row() -> None:
    # j=0: max(R[0,0]) - R[1,0] = 0.4 - 0.9 = -0.5 (a max including the final row,
    # as in Mammoth, would give 0)
    R = np.array([[0.4, 0.0], [0.9, 0.8]])
    assert average_forgetting(R) == pytest.approx(-0.5)


def test_max_off_diagonal_other_metrics() -> None:
    # ACC = (0.5 + 0.4 + 0.6 + 0.7) / 4 = 2.2 / 4 = 0.55
    assert average_accuracy(MAX_OFF_DIAGONAL) == pytest.approx(0.55)
    # LA = (0.6 + 0.7 + 0.8 + 0.7) / 4 = 2.8 / 4 = 0.7
    assert learning_accuracy(MAX_OFF_DIAGONAL) == pytest.approx(0.7)
    # BWT = ((0.5-0.6) + (0.4-0.7) + (0.6-0.8)) / 3 = (-0.1 - 0.3 - 0.2) / 3 = -0.2
    assert backward_transfer(MAX_OFF_DIAGONAL) == pytest.approx(-0.2)
    # curve: A_1 = 0.6; A_2 = (0.9+0.7)/2 = 0.8; A_3 = (0.8+0.5+0.8)/3 = 0.7; A_4 = 0.55
    np.testing.assert_allclose(
        average_accuracy_curve(MAX_OFF_DIAGONAL), [0.6, 0.8, 0.7, 0.55]
    )


def test_forward_transfer_with_baseline() -> None:
    # above diagonal: R[0,1] = 0.1, R[1,2] = 0.2, R[2,3] = 0.2
    # baseline[1:] = [0.05, 0.1, 0.3]
    # FWT = ((0.1-0.05) + (0.2-0.1) + (0.2-0.3)) / 3 = (0.05 + 0.1 - 0.1) / 3 = 0.05/3
    baseline = [0.25, 0.05, 0.1, 0.3]
    assert forward_transfer(MAX_OFF_DIAGONAL, baseline) == pytest.approx(0.05 / 3)


def test_forward_transfer_ignores_baseline_of_first_task() -> None:
    a = forward_transfer(MAX_OFF_DIAGONAL, [0.25, 0.05, 0.1, 0.3])
    b = forward_transfer(MAX_OFF_DIAGONAL, [0.99, 0.05, 0.1, 0.3])
    assert a == pytest.approx(b)


def test_backward_transfer_identity_with_means() -> None:
    # BWT = mean_{j<T} R[T-1, j] - mean_{j<T} R[j, j]
    R = MAX_OFF_DIAGONAL
    expected = R[-1, :-1].mean() - np.diag(R)[:-1].mean()
    assert backward_transfer(R) == pytest.approx(expected)


def test_accuracy_curve_last_entry_is_average_accuracy() -> None:
    assert average_accuracy_curve(MAX_OFF_DIAGONAL)[-1] == pytest.approx(
        average_accuracy(MAX_OFF_DIAGONAL)
    )


def test_metrics_keep_the_unit_of_r_percent() -> None:
    # metrics are linear in R: percentages give 100x the fractional values
    R = MAX_OFF_DIAGONAL * 100
    assert average_accuracy(R) == pytest.approx(55.0)
    assert average_forgetting(R) == pytest.approx(30.0)
    assert backward_transfer(R) == pytest.approx(-20.0)


# --------------------------------------------------------------------------- types, input handling


def test_metrics_return_python_floats_and_accept_lists() -> None:
    R = FORGET_ALL.tolist()
    for fn in (average_accuracy, learning_accuracy, average_forgetting, backward_transfer):
        value = fn(R)
        assert type(value) is float
    assert type(forward_transfer(R, [0, 0, 0])) is float
    curve = average_accuracy_curve(R)
    assert isinstance(curve, np.ndarray) and curve.shape == (3,)


def test_metrics_do_not_modify_input() -> None:
    R = MAX_OFF_DIAGONAL.copy()
    b = np.array([0.25, 0.05, 0.1, 0.3])
    summarize(R, b)
    average_accuracy_curve(R)
    np.testing.assert_array_equal(R, MAX_OFF_DIAGONAL)
    np.testing.assert_array_equal(b, [0.25, 0.05, 0.1, 0.3])


# --------------------------------------------------------------------------- T == 1


def test_single_task_defined_metrics() -> None:
    R = np.array([[0.7]])
    assert average_accuracy(R) == pytest.approx(0.7)
    assert learning_accuracy(R) == pytest.approx(0.7)
    np.testing.assert_allclose(average_accuracy_curve(R), [0.7])


def test_single_task_forgetting_bwt_fwt_are_nan() -> None:
    R = np.array([[0.7]])
    assert math.isnan(average_forgetting(R))
    assert math.isnan(backward_transfer(R))
    assert math.isnan(forward_transfer(R, [0.1]))


def test_single_task_summarize_has_nan_entries() -> None:
    out = summarize(np.array([[0.7]]), baseline=[0.1])
    assert out["average_accuracy"] == pytest.approx(0.7)
    assert out["learning_accuracy"] == pytest.approx(0.7)
    assert math.isnan(out["average_forgetting"])
    assert math.isnan(out["backward_transfer"])
    assert math.isnan(out["forward_transfer"])


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "fn",
    [average_accuracy, average_accuracy_curve, learning_accuracy, average_forgetting,
     backward_transfer, summarize],
)
def test_non_square_matrix_raises(fn) -> None:
    with pytest.raises(ValueError, match=r"accuracy matrix must be square, got shape \(2, 3\)"):
        fn(np.zeros((2, 3)))


def test_non_square_matrix_raises_in_forward_transfer() -> None:
    with pytest.raises(ValueError, match=r"must be square, got shape \(3, 2\)"):
        forward_transfer(np.zeros((3, 2)), [0.0, 0.0, 0.0])


def test_one_dimensional_matrix_raises() -> None:
    with pytest.raises(ValueError, match=r"must be 2-D \(T, T\), got 1-D"):
        average_accuracy(np.array([0.5, 0.6]))


def test_three_dimensional_matrix_raises() -> None:
    with pytest.raises(ValueError, match=r"must be 2-D \(T, T\), got 3-D"):
        backward_transfer(np.zeros((2, 2, 2)))


def test_empty_matrix_raises() -> None:
    with pytest.raises(ValueError, match="at least one task"):
        average_forgetting(np.zeros((0, 0)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_matrix_raises(bad: float) -> None:
    R = FORGET_ALL.copy()
    R[1, 2] = bad
    expected = r"must be finite, found NaN/inf at \(row, column\) \[\(1, 2\)\]"
    with pytest.raises(ValueError, match=expected):
        average_accuracy(R)


def test_non_numeric_matrix_raises() -> None:
    with pytest.raises(ValueError, match="could not convert"):
        average_accuracy([["a", "b"], ["c", "d"]])


def test_ragged_matrix_raises_value_error() -> None:
    with pytest.raises(ValueError, match="accuracy matrix"):
        average_accuracy([[1.0, 0.0], [0.5]])


def test_baseline_wrong_length_raises() -> None:
    with pytest.raises(ValueError, match=r"baseline must have length T=3 .*got length 2"):
        forward_transfer(FORGET_ALL, [0.0, 0.0])


def test_baseline_wrong_length_raises_even_for_single_task() -> None:
    with pytest.raises(ValueError, match=r"baseline must have length T=1"):
        forward_transfer(np.array([[0.5]]), [0.1, 0.2])


def test_baseline_two_dimensional_raises() -> None:
    with pytest.raises(ValueError, match=r"baseline must be 1-D of length T=3"):
        forward_transfer(FORGET_ALL, np.zeros((3, 1)))


def test_baseline_non_finite_raises() -> None:
    with pytest.raises(ValueError, match=r"baseline must be finite, found NaN/inf at index \[2\]"):
        forward_transfer(FORGET_ALL, [0.0, 0.0, np.nan])


def test_summarize_validates_baseline() -> None:
    with pytest.raises(ValueError, match="baseline must have length T=3"):
        summarize(FORGET_ALL, baseline=[0.0])


# --------------------------------------------------------------------------- summarize


def test_summarize_without_baseline() -> None:
    out = summarize(FORGET_ALL)
    assert set(out) == {
        "average_accuracy",
        "average_forgetting",
        "backward_transfer",
        "learning_accuracy",
    }
    # values from the forget-all hand computations above
    assert out["average_accuracy"] == pytest.approx(1 / 3)
    assert out["average_forgetting"] == pytest.approx(1.0)
    assert out["backward_transfer"] == pytest.approx(-1.0)
    assert out["learning_accuracy"] == pytest.approx(1.0)
    assert all(type(v) is float for v in out.values())


def test_summarize_with_baseline_adds_forward_transfer() -> None:
    out = summarize(MAX_OFF_DIAGONAL, baseline=[0.25, 0.05, 0.1, 0.3])
    assert set(out) == {
        "average_accuracy",
        "average_forgetting",
        "backward_transfer",
        "forward_transfer",
        "learning_accuracy",
    }
    assert out["average_accuracy"] == pytest.approx(0.55)
    assert out["average_forgetting"] == pytest.approx(0.3)
    assert out["backward_transfer"] == pytest.approx(-0.2)
    assert out["forward_transfer"] == pytest.approx(0.05 / 3)
    assert out["learning_accuracy"] == pytest.approx(0.7)


# --------------------------------------------------------------------------- statistics


def test_mean_and_standard_error_by_hand() -> None:
    # values 1, 2, 4: mean = 7/3; deviations -4/3, -1/3, 5/3;
    # sum of squares = (16 + 1 + 25)/9 = 42/9 = 14/3; s^2 = (14/3)/2 = 7/3;
    # SE = sqrt(7/3) / sqrt(3) = sqrt(7)/3 ~= 0.8819
    mean, se = mean_and_standard_error([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert se == pytest.approx(math.sqrt(7) / 3)
    assert type(mean) is float and type(se) is float


def test_standard_error_uses_ddof_one() -> None:
    # values 0, 2: mean 1; s^2 = (1 + 1)/1 = 2; SE = sqrt(2)/sqrt(2) = 1
    # (ddof=0 would give sqrt(1)/sqrt(2) ~= 0.707)
    assert mean_and_standard_error(np.array([0.0, 2.0])) == pytest.approx((1.0, 1.0))


def test_standard_error_single_value_is_nan() -> None:
    mean, se = mean_and_standard_error([0.42])
    assert mean == pytest.approx(0.42)
    assert math.isnan(se)


def test_t_interval_n3_matches_4_303() -> None:
    # n=3, df=2: t_{0.975,2} = 4.303; half-width = 4.303 * s / sqrt(3), s = sqrt(7/3)
    mean, half = t_interval([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert half == pytest.approx(4.303 * math.sqrt(7 / 3) / math.sqrt(3), rel=1e-3)


def test_t_interval_single_value_half_width_is_nan() -> None:
    mean, half = t_interval([0.3])
    assert mean == pytest.approx(0.3)
    assert math.isnan(half)


def test_t_interval_wider_at_higher_confidence() -> None:
    v = [0.1, 0.4, 0.3, 0.6]
    assert t_interval(v, 0.99)[1] > t_interval(v, 0.95)[1] > t_interval(v, 0.90)[1]


@pytest.mark.parametrize("confidence", [0.0, 1.0, -0.5, 1.5, float("nan"), "0.95", True])
def test_t_interval_bad_confidence_raises(confidence) -> None:
    with pytest.raises(ValueError, match="confidence must be a number in \\(0, 1\\)"):
        t_interval([1.0, 2.0, 3.0], confidence)


def test_statistics_bad_values_raise() -> None:
    with pytest.raises(ValueError, match="at least one number"):
        mean_and_standard_error([])
    with pytest.raises(ValueError, match=r"values must be 1-D"):
        mean_and_standard_error(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"values must be finite, found NaN/inf at index \[1\]"):
        mean_and_standard_error([1.0, np.nan, 3.0])


@pytest.mark.parametrize(
    ("n", "t_value"),
    # the reference sheet's values (section 6)
    [(3, 4.303), (4, 3.182), (5, 2.776), (6, 2.571), (7, 2.447), (8, 2.365), (10, 2.262)],
)
def test_t_interval_matches_reference_sheet(n: int, t_value: float) -> None:
    values = np.arange(n, dtype=float)
    _, se = mean_and_standard_error(values)
    _, half = t_interval(values)
    assert half == pytest.approx(t_value * se, rel=2e-4)


# --------------------------------------------------------------------------- package


def test_import_is_side_effect_free() -> None:
    code = (
        "import sys, engram.metrics; "
        "assert 'scipy' not in sys.modules, 'scipy imported'; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
