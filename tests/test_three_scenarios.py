"""The three-scenario table reproduces the field's known pattern on split digits.

Runs a subset of configs/three_scenarios_digits.yaml (the README's table) with its own
settings and 5 seeds: the same run ids, so the same numbers as the README on this machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engram.results import read_rows
from engram.reports.tables import scenario_table
from engram.experiments.sweep import run_sweep

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "three_scenarios_digits.yaml"


def accuracies(out: Path) -> dict[tuple[str, str], float]:
    """(method, scenario) -> mean final average accuracy over seeds."""
    return {(entry["label"].split("(")[0], scenario): cell["average_accuracy"][0]
            for entry in scenario_table(read_rows(out / "results.csv"))
            for scenario, cell in entry["cells"].items()}


@pytest.mark.slow
def test_regularisers_help_in_task_il_not_in_class_il_replay_helps_in_both(tmp_path):
    methods = ("methods=[naive, joint, {name: ewc, strength: 100000}, {name: si, strength: 10}, "
               "{name: mas, strength: 100}, {name: replay, memory: 200}]")
    report = run_sweep(CONFIG, tmp_path, overrides=[methods, "stream.scenario=[task, class]"],
                       workers=2, show_progress=False)
    assert report.failures == [] and report.completed == 2 * 6 * 5
    acc = accuracies(tmp_path)
    for method in ("ewc", "si", "mas"):
        # task-incremental: the regularisers keep clearly more than fine-tuning ...
        assert acc[(method, "task")] > acc[("naive", "task")] + 0.03, method
        # ... class-incremental: they stay near fine-tuning's 1/5 (only the last task right)
        assert abs(acc[(method, "class")] - acc[("naive", "class")]) < 0.08, method
    assert acc[("naive", "class")] < 0.25
    assert acc[("replay", "class")] > acc[("naive", "class")] + 0.4
    for scenario in ("task", "class"):
        best = max(value for (_, s), value in acc.items() if s == scenario)
        assert acc[("joint", scenario)] == best, scenario
