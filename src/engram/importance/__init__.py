"""Weight importance: measures (pure functions (model, batches, loss_fn) -> {parameter name:
tensor}), their aggregation into groups and the thresholding the profiler evaluates."""

from engram.importance.aggregate import (AGGREGATIONS, DIRECTIONS, REDUCERS, SCOPES, Groups,
                                         evaluate_stacked, group_scores, make_groups,
                                         replacement_order, replacement_values,
                                         thresholded_parameters)
from engram.importance.fisher import FISHER_ESTIMATORS, fisher_diagonal
from engram.importance.measures import MEASURES, Trajectory, profiled_parameters

__all__ = ["AGGREGATIONS", "DIRECTIONS", "FISHER_ESTIMATORS", "MEASURES", "REDUCERS", "SCOPES",
           "Groups", "Trajectory", "evaluate_stacked", "fisher_diagonal",
           "group_scores", "make_groups", "profiled_parameters", "replacement_order",
           "replacement_values", "thresholded_parameters"]
