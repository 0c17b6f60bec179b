"""engram.stats, the one statistics module, checked on numbers worked out by hand; the tables
that use it (mean ± SE, the 95% t-interval, which one is shown); and that every summary counts
distinct seeds and refuses two runs of one label on one seed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engram.errors import DataError
from engram.stats import auc, holm, mean_se, paired_test, t_interval, t_quantile
from tests.test_table import R0, R1, run_rows, two_seeds

T_975_3 = 3.182446305284263  # t_{0.975, 3} (4 values), scipy.stats.t.ppf(0.975, 3)
T_975_1 = 12.706204736174705  # t_{0.975, 1} (2 values)


# --------------------------------------------------------------------------- the module


def test_mean_and_standard_error_by_hand():
    # 1, 2, 4: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9; s^2 = 42/9 / 2 = 7/3
    # (ddof=1); SE = sqrt(7/3) / sqrt(3) = sqrt(7) / 3
    mean, se = mean_se([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and se == pytest.approx(math.sqrt(7) / 3)
    assert type(mean) is float and type(se) is float


def test_one_value_has_no_spread_and_none_has_no_mean():
    mean, se = mean_se([0.42])
    assert mean == 0.42 and math.isnan(se)
    assert all(math.isnan(v) for v in mean_se([]))
    mean, half = t_interval([0.42])
    assert mean == 0.42 and math.isnan(half)
    assert all(math.isnan(v) for v in t_interval([]))
    assert math.isnan(t_quantile(1)) and math.isnan(t_quantile(0))


def test_a_missing_seed_makes_the_mean_unknown_not_a_mean_over_fewer_seeds():
    assert all(math.isnan(v) for v in mean_se([0.5, math.nan, 0.7]))


def test_mean_and_se_over_the_first_axis_of_a_seeds_by_tasks_array():
    values = np.array([[1.0, 10.0], [3.0, 10.0]])  # 2 seeds x 2 tasks
    mean, se = mean_se(values)
    # task 1: mean 2, s = sqrt(2), SE = 1; task 2: no spread
    np.testing.assert_allclose(mean, [2.0, 10.0])
    np.testing.assert_allclose(se, [1.0, 0.0])
    mean, se = mean_se(values[:1])
    np.testing.assert_allclose(mean, [1.0, 10.0])
    assert np.isnan(se).all()


def test_t_interval_of_1_2_3_4_by_hand():
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; s = sqrt(5/3);
    # SE = s / sqrt(4); half = t_{0.975,3} * SE = 3.1824 * 0.6455 = 2.0543
    mean, half = t_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert half == pytest.approx(T_975_3 * math.sqrt(5 / 3) / 2, rel=1e-12)
    assert half == pytest.approx(2.0543, abs=1e-4)
    assert t_quantile(4) == pytest.approx(T_975_3, rel=1e-12)
    assert t_quantile(2) == pytest.approx(T_975_1, rel=1e-12)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, float("nan"), "0.95", True])
def test_a_confidence_outside_0_1_is_refused(confidence):
    with pytest.raises(ValueError, match=r"confidence must be a number in \(0, 1\)"):
        t_interval([1.0, 2.0], confidence)


def test_paired_t_test_by_hand():
    # d = a - b = 1, 2, 2: mean 5/3; s_d^2 = (4/9 + 1/9 + 1/9) / 2 = 1/3;
    # t = (5/3) / (sqrt(1/3) / sqrt(3)) = 5 with 2 degrees of freedom
    from scipy import stats

    out = paired_test([1.0, 2.0, 3.0], [0.0, 0.0, 1.0])
    assert out["n"] == 3 and out["diff_mean"] == pytest.approx(5 / 3)
    assert out["t"] == pytest.approx(5.0)
    assert out["p"] == pytest.approx(2 * stats.t.sf(5.0, 2))  # 0.0377
    assert out["d_z"] == pytest.approx((5 / 3) / math.sqrt(1 / 3))
    assert out["diff_ci"] == pytest.approx(stats.t.ppf(0.975, 2) * math.sqrt(1 / 3) / math.sqrt(3))
    assert (out["n_below"], out["n_above"]) == (0, 3)
    one = paired_test([1.0], [0.0])
    assert all(math.isnan(one[k]) for k in ("t", "p", "d_z", "diff_ci"))


def test_holm_by_hand():
    # m = 3 finite p: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04 -> running max 0.06
    adjusted = holm([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])


def test_auc_by_the_trapezoid_rule_by_hand():
    # pieces (0, 0.5) and (0.5, 1): 0.5 * (1 + 2) / 2 + 0.5 * (2 + 4) / 2 = 0.75 + 1.5 = 2.25
    assert auc([0.0, 0.5, 1.0], [1.0, 2.0, 4.0]) == pytest.approx(2.25)
    assert auc([0, 1], [0, 2]) == pytest.approx(1.0)  # a straight line: a triangle
    # a repeated x is a zero-width piece, so the curve steps: 0.5 * 1 + 0 + 0.5 * 3 = 2
    assert auc([0, 0.5, 0.5, 1], [1, 1, 3, 3]) == pytest.approx(2.0)
    assert auc([0.3], [5.0]) == 0.0 and auc([], []) == 0.0  # no width
    with pytest.raises(ValueError, match="one length"):
        auc([0, 1], [1, 2, 3])


def test_the_profile_report_and_the_metrics_use_the_same_functions():
    from engram import metrics
    from engram.reports import profile

    assert profile.t_interval is t_interval and profile.paired_test is paired_test
    assert profile.holm is holm and profile.auc is auc
    assert not hasattr(metrics, "t_interval")  # one t-interval: engram.stats.t_interval
    values = [0.3, 0.1, 0.7, 0.4]
    assert metrics.mean_and_standard_error(values) == mean_se(values)


def test_the_module_imports_no_engram_module():
    import ast
    from pathlib import Path

    import engram.stats

    tree = ast.parse(Path(engram.stats.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "numbers", "warnings", "collections.abc",
                         "typing", "numpy", "scipy"}


# --------------------------------------------------------------------------- the call sites


def test_every_call_site_gives_the_textbook_mean_and_se():
    """Two seeds with R0 and R1: final average accuracy 0.55 and 0.60, so mean 0.575,
    SE = |0.60 - 0.55| / 2 = 0.025, as before the shared module."""
    from engram.reports.figures import task_curves
    from engram.reports.tables import scenario_table, summary_table

    rows = run_rows(R0, 0) + run_rows(R1, 1)
    (entry,) = summary_table(rows)
    assert entry["average_accuracy"] == pytest.approx((0.575, 0.025))
    assert entry["n_seeds"] == 2
    cell = scenario_table(rows)[0]["cells"]["class"]
    assert cell["average_accuracy"] == pytest.approx((0.575, 0.025))
    assert cell["wall_seconds"] == pytest.approx((3.0, 0.0))
    # task 1's accuracy after task 2: 0.3 and 0.5 -> mean 0.4, SE 0.1
    curve = task_curves(rows, "naive").tasks[1]
    assert (curve.mean[-1], curve.se[-1]) == pytest.approx((0.4, 0.1))


def plasticity_rows(runs, metric="online_loss", n_tasks=5, label="m"):
    """Rows of plasticity runs: `runs` = [(run_id, seed, value of task t = f(t))]."""
    return [{"run_id": run_id, "seed": str(seed), "label": label, "metric": metric,
             "task": str(t), "value": str(f(t))} for run_id, seed, f in runs
            for t in range(1, n_tasks + 1)]


def test_plasticity_summary_mean_se_and_interval_by_hand():
    from engram.reports.plasticity import format_plasticity_summary, metric_curves, plasticity_summary

    rows = plasticity_rows([("a", 0, lambda t: t), ("b", 1, lambda t: t + 2)])
    (entry,) = plasticity_summary(rows)  # 5 tasks: early = task 2, late = task 5
    assert entry["early"] == pytest.approx((3.0, 1.0))
    assert entry["late"] == pytest.approx((6.0, 1.0))
    half = T_975_1 * 1.0
    text = format_plasticity_summary([entry])
    assert text.splitlines()[0] == ("online_loss (mean ± SE over seeds [95% t-interval]): "
                                    "tasks 2-2 -> tasks 5-5")
    assert text.splitlines()[1] == (f"  m  3.000 ± 1.000 [{3 - half:.3f}, {3 + half:.3f}]  ->  "
                                    f"6.000 ± 1.000 [{6 - half:.3f}, {6 + half:.3f}]  (2 seeds)")
    tasks, mean, se, n = metric_curves(rows, "online_loss")["m"]
    assert n == 2 and list(mean) == [2, 3, 4, 5, 6] and list(se) == pytest.approx([1.0] * 5)


# --------------------------------------------------------------------------- the tables


def test_format_table_says_mean_and_se_and_with_ci_prints_the_interval_by_hand():
    from engram.reports.tables import format_table, summary_table

    rows = run_rows(R0, 0) + run_rows(R1, 1)
    table = summary_table(rows)
    plain = format_table(table).splitlines()
    assert plain[2].split()[:6] == ["naive", "class", "2", "0.575", "±", "0.025"]
    assert plain[3] == ("mean ± SE over 2 seeds (SE = sample sd / √n); "
                        "`engram summary RUN_DIR --ci` adds the 95% t-interval")
    half = T_975_1 * 0.025  # 0.318: with two seeds the interval is wide
    ci = format_table(table, ci=True).splitlines()
    assert f"0.575 ± 0.025 [{0.575 - half:.3f}, {0.575 + half:.3f}]" in ci[2]
    assert ci[3] == ("mean ± SE over 2 seeds (SE = sample sd / √n); "
                     "95% t-interval in brackets (mean ± t_{0.975,n-1}·SE)")


def test_one_seed_tables_say_there_is_no_spread():
    from engram.reports.tables import format_table, summary_table

    lines = format_table(summary_table(run_rows(R0, 0)), ci=True).splitlines()
    assert lines[2].split()[3] == "0.550" and "±" not in lines[2] and "[" not in lines[2]
    assert lines[3].startswith("one seed: means alone")


def test_scenario_table_with_ci_by_hand():
    from engram.reports.tables import format_scenario_table, scenario_table

    table = scenario_table(two_seeds())
    text = format_scenario_table(table, ci=True)
    assert text.splitlines()[0] == "average accuracy (mean ± SE [95% t-interval] over 2 seeds)"
    half = T_975_1 * 0.025
    assert f"naive   0.575 ± 0.025 [{0.575 - half:.3f}, {0.575 + half:.3f}]" in text
    assert "[ ] = 95% t-interval (mean ± t_{0.975,n-1}·SE)" in text.splitlines()[-1]
    # seconds and bytes too: 3.5 ± 0.5 s and 400 ± 100 B over 2 seeds
    assert f"3.5 ± 0.5 s [{3.5 - T_975_1 * 0.5:.1f}, {3.5 + T_975_1 * 0.5:.1f}]" in text
    assert f"400 ± 100 B [{400 - T_975_1 * 100:.0f}, {400 + T_975_1 * 100:.0f}]" in text


def test_scenario_png_draws_the_interval_with_ci():
    from matplotlib.figure import Figure

    from engram.reports.figures import plot_scenario_table
    from engram.reports.tables import scenario_table

    table = scenario_table(run_rows(R0, 0) + run_rows(R1, 1))
    for ci, half in ((False, 0.025), (True, T_975_1 * 0.025)):
        ax = plot_scenario_table(table, Figure().add_subplot(), ci=ci)
        (bars,) = ax.containers[1:]  # the error bars after the bar container
        segment = bars.lines[2][0].get_segments()[0]
        assert segment[1][1] - segment[0][1] == pytest.approx(2 * half)
        assert ax.get_ylabel().endswith("95% t-interval" if ci else "mean ± 1 SE")


# --------------------------------------------------------------------------- distinct seeds


def two_configs_one_label():
    """Seeds 0 and 1 run twice under one name and label, by two configs (say two learning
    rates): run ids differ, nothing else in the rows does."""
    return (run_rows(R0, 0) + run_rows(R1, 1)
            + [dict(r, run_id=r["run_id"] + "-lr2") for r in run_rows(R1, 0) + run_rows(R0, 1)])


def test_summary_tables_refuse_two_runs_on_one_seed_naming_them():
    from engram.reports.figures import task_curves
    from engram.reports.tables import scenario_table, summary_table

    rows = two_configs_one_label()
    message = (r"method 'naive' of experiment 'exp', class-incremental: seed 0 has 2 runs "
               r"\(exp-naive-class-0, exp-naive-class-0-lr2\)")
    for summarise in (summary_table, scenario_table):
        with pytest.raises(DataError, match=message):
            summarise(rows)
    with pytest.raises(DataError, match=r"method 'naive': seed 0 has 2 runs"):
        task_curves(rows, "naive")


def test_write_plots_refuses_two_runs_on_one_seed(tmp_path):
    from engram.reports.figures import write_plots
    from engram.results import COLUMNS, ResultWriter

    with ResultWriter(tmp_path / "results.csv", COLUMNS) as writer:
        writer.write(two_configs_one_label())
    with pytest.raises(DataError, match="seed 0 has 2 runs"):
        write_plots(tmp_path)


def test_a_sweeps_grid_points_are_rows_of_their_own_not_pooled_seeds():
    from engram.reports.figures import task_curves
    from engram.reports.tables import format_table, summary_table

    rows = (run_rows(R0, 0, name="sweep[lr=0.1]") + run_rows(R1, 1, name="sweep[lr=0.1]")
            + run_rows(R1, 0, name="sweep[lr=0.01]") + run_rows(R1, 1, name="sweep[lr=0.01]"))
    table = summary_table(rows)
    assert [(e["name"], e["n_seeds"]) for e in table] == [("sweep[lr=0.1]", 2),
                                                         ("sweep[lr=0.01]", 2)]
    assert table[1]["average_accuracy"] == pytest.approx((0.6, 0.0))
    names = [line.split("  ")[0] for line in format_table(table).splitlines()[2:4]]
    assert names == ["naive", "sweep[lr=0.01] / naive"]
    assert task_curves(rows, "naive", name="sweep[lr=0.01]").n_seeds == 2


def test_plasticity_summaries_refuse_two_runs_on_one_seed():
    from engram.reports.plasticity import metric_curves, plasticity_summary

    rows = plasticity_rows([("a", 0, lambda t: t), ("b", 1, lambda t: t),
                            ("c", 0, lambda t: 2 * t)])
    with pytest.raises(DataError, match=r"method 'm': seed 0 has 2 runs \(a, c\)"):
        plasticity_summary(rows)
    with pytest.raises(DataError, match="seed 0 has 2 runs"):
        metric_curves(rows, "online_loss")


def window_record(seed: int, relearn: list[int]):
    from engram.experiments.window import WindowRecord

    return WindowRecord(steps=np.zeros(1, np.int64), point_loss=np.zeros((1, 4), np.float32),
                        window_start=np.zeros(1, np.int64), weight_norm=np.ones(1),
                        shift_steps=list(range(len(relearn))), relearn_steps=relearn,
                        window=2, seed=seed, seconds=1.0)


def test_window_summary_by_hand_and_its_format():
    from engram.experiments.window import parse_window_experiment
    from engram.reports.window import format_window_summary, window_summary

    experiment = parse_window_experiment({"seeds": [0, 1], "run": {"n_points": 4, "shift": 2,
                                                                   "window": 2}})
    # 2 shifts per pass, the first shift left out: seed 0 passes 2, 4; seed 1 passes 4, 6
    records = {"plain": [window_record(0, [9, 1, 3, 3, 5]), window_record(1, [9, 3, 5, 5, 7])]}
    (row,) = window_summary(experiment, records)
    assert row["seeds"] == 2 and (row["pass_1"], row["pass_1_se"]) == pytest.approx((3.0, 1.0))
    lines = format_window_summary([row]).splitlines()
    half = T_975_1
    assert f"3.00 ± 1.00 [{3 - half:.2f}, {3 + half:.2f}]" in lines[3]
    assert lines[-1] == ("mean ± SE over 2 seeds (SE = sample sd / √n); "
                         "95% t-interval in brackets (mean ± t_{0.975,n-1}·SE)")
    records["plain"][1].seed = 0  # two records on one seed
    with pytest.raises(DataError, match="variant 'plain': seed 0 has 2 runs"):
        window_summary(experiment, records)
