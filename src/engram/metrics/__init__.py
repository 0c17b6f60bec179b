"""Continual-learning metrics of the accuracy matrix and per-seed statistics, and the
loss-of-plasticity diagnostics of :mod:`engram.metrics.plasticity`.

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
)

# The plasticity diagnostics need torch; they are loaded on first use (PEP 562) so that
# importing engram.metrics stays torch-free (tests/test_metrics.py checks this).
_PLASTICITY = (
    "approximate_rank",
    "dead_fraction",
    "dormant_fraction",
    "effective_rank",
    "gradient_magnitude",
    "hidden_activations",
    "named_weight_layers",
    "numerical_rank",
    "numerical_stable_rank",
    "plasticity_diagnostics",
    "rank_measures",
    "redo_scores",
    "saturated_fraction",
    "singular_values",
    "stable_rank",
    "weight_magnitude",
)


def __getattr__(name: str):
    if name in _PLASTICITY:
        from engram.metrics import plasticity

        return getattr(plasticity, name)
    raise AttributeError(f"module 'engram.metrics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PLASTICITY))


__all__ = [
    "average_accuracy",
    "average_accuracy_curve",
    "average_forgetting",
    "backward_transfer",
    "forward_transfer",
    "learning_accuracy",
    "mean_and_standard_error",
    "summarize",
    *_PLASTICITY,  # plasticity diagnostics (engram.metrics.plasticity)
]
