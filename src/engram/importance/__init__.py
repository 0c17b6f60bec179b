"""Weight-importance measures: pure functions (model, data) -> {parameter name: tensor}."""

from engram.importance.fisher import FISHER_ESTIMATORS, fisher_diagonal
from engram.importance.measures import MEASURES, Trajectory, TrajectoryRecorder, profiled_parameters

__all__ = ["FISHER_ESTIMATORS", "fisher_diagonal"]
__all__ += ["MEASURES", "Trajectory", "TrajectoryRecorder", "profiled_parameters"]
