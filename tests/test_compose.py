"""Compose: nested config, chained batches, summed penalties, end-to-end run."""

from __future__ import annotations

import pytest
import torch

from engram.config import load_config_dict
from engram.errors import ConfigError
from engram.methods.base import penalty_value
from engram.methods.compose import Compose
from engram.results import read_rows
from engram.experiments.continual import run_experiment
from tests.conftest import tiny_config
from tests.test_methods import _context


def _compose(entries):
    cfg = load_config_dict({"methods": [{"name": "compose", "methods": entries}]})
    return cfg.methods[0]


def test_nested_methods_are_validated_and_labelled():
    spec = _compose(["replay", {"name": "ewc", "strength": 10}])
    assert spec.label() == "replay+ewc(strength=10.0)"
    with pytest.raises(ConfigError, match=r"methods\[0\]\(compose\)\.methods\[1\]\(ewc\)\.strenght"):
        _compose(["replay", {"name": "ewc", "strenght": 10}])
    with pytest.raises(ConfigError, match=r"unknown key methods\[0\]\(compose\)\.lambda"):
        load_config_dict({"methods": [{"name": "compose", "lambda": 1}]})


def test_penalties_add_up_and_batches_chain():
    ctx = _context(tiny_config())
    spec = _compose(["replay", {"name": "l2", "strength": 1.0}, {"name": "l2", "strength": 2.0}])
    method = Compose(spec.params)
    ctx.task = ctx.stream.tasks[0]
    data = ctx.task.train
    batch = type(data)(*(part[:8] for part in data))
    method.after_step(batch, ctx)   # replay stores the batch
    method.after_task(ctx)          # both L2 parts anchor here
    assert len(method.make_batch(batch, ctx)) == 8 + ctx.train_cfg.batch_size
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.add_(0.1)
    parts = [penalty_value(part, ctx) for part in method.parts[1:]]
    torch.testing.assert_close(penalty_value(method, ctx), parts[0] + parts[1])
    torch.testing.assert_close(parts[1], 2 * parts[0])


def test_compose_runs_end_to_end(tmp_path):
    cfg = tiny_config(methods=[{"name": "compose", "methods": ["replay", "ewc"]}])
    run_experiment(cfg, tmp_path, show_progress=False)
    rows = read_rows(tmp_path / "results.csv")
    assert {r["label"] for r in rows} == {"replay+ewc"}
    assert any(r["metric"] == "run_complete" for r in rows)


@pytest.mark.parametrize("other", ["sam", "agem", "ogd"])
def test_packnet_with_a_gradient_rewriting_method_is_refused(other):
    from engram.config import parse_method
    from engram.errors import ConfigError
    from engram.methods import METHODS

    for order in (["packnet", other], [other, "packnet"]):
        spec = parse_method("compose", {"methods": order}, "test")
        with pytest.raises(ConfigError, match="packnet freezes weights"):
            METHODS.get("compose")(spec.params)
