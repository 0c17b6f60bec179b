"""Continual-learning metrics of the accuracy matrix and per-seed statistics.

See :mod:`engram.metrics.continual` for the conventions (R[i, j] = accuracy on task j
after training task i, 0-based; forgetting > 0 and BWT < 0 mean worse).  Importing
this package has no side effects.
"""

from engram.metrics.continual import (
    average_accuracy,
    average_accuracy_curve,
    average_forgetting,
    backward_transfer,
    forward_transfer,
    learning_accuracy,
    mean_and_standard_error,
    summarize,
    t_interval,
)

__all__ = [
    "average_accuracy",
    "average_accuracy_curve",
    "average_forgetting",
    "backward_transfer",
    "forward_transfer",
    "learning_accuracy",
    "mean_and_standard_error",
    "summarize",
    "t_interval",
]
