"""Methods that cannot act on a problem are refused before any training, with the reason;
methods that compute their own task loss use the problem's loss (ctx.loss_fn)."""

from __future__ import annotations

import math

import pytest
import torch

from engram.config import MethodSpec, parse_method
from engram.errors import ConfigError
from engram.methods import METHODS
from engram.methods.base import ProblemInfo, refuse_unusable
from engram.methods.lwf import distillation

BIT_FLIPPING = ProblemInfo("bit_flipping", 1, classification=False)
WINDOW = ProblemInfo("window", 20, classification=False)
CLASSES = ProblemInfo("digits (split stream)", 10, classification=True)

ONE_OUTPUT = "and this problem has 1 output (its loss and gradient would be exactly 0)"
REGRESSION = ("and this problem is a regression (squared error on real-valued targets), whose "
              "outputs are not class scores")
FISHER = "it estimates its Fisher information from a softmax over the outputs, "

# method entry -> what refuse_unusable says after "method LABEL cannot act on problem
# bit_flipping: ", and whether the window (20 regression outputs) is refused too
REFUSED = {
    "lwf": "it distils a softmax over the outputs, " + ONE_OUTPUT,
    "pseudo_rehearsal": "it distils a softmax over the outputs, " + ONE_OUTPUT,
    "generative_replay": ("it labels its generated inputs by the previous model's argmax (or "
                          "softmax) over the outputs, " + ONE_OUTPUT),
    "er_ace": "it masks the incoming batch's cross-entropy to its classes, " + ONE_OUTPUT,
    "ewc": FISHER + ONE_OUTPUT,
    "online_ewc": FISHER + ONE_OUTPUT,
    "latent_replay": ("it stores each example's target as an int16 class label, and this "
                      "problem is a regression (squared error on real-valued targets)"),
    "icarl": ("it classifies by the nearest class mean of its exemplars, and this problem is a "
              "regression (squared error on real-valued targets), which has no classes"),
    "gdumb": ("it keeps a class-balanced memory, and this problem is a regression (squared "
              "error on real-valued targets), which has no classes"),
}
POLICIES = {policy: (f"it keeps its memory per class (policy: {policy}), and this problem is a "
                     "regression (squared error on real-valued targets), which has no classes; "
                     "use policy: reservoir")
            for policy in ("class_balanced", "herding")}


def _spec(name: str, **params) -> MethodSpec:
    return parse_method(name, params, "test")


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_methods_that_need_class_scores_are_refused_on_one_regression_output(name):
    spec = _spec(name)
    message = f"method {name} cannot act on problem bit_flipping: {REFUSED[name]}"
    with pytest.raises(ConfigError) as error:
        refuse_unusable(spec, BIT_FLIPPING)
    assert str(error.value) == message
    refuse_unusable(spec, CLASSES)  # classification with 10 outputs: fine


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_they_are_refused_on_regression_outputs_of_any_width(name):
    with pytest.raises(ConfigError, match="cannot act on problem window: it .*regression"):
        refuse_unusable(_spec(name), WINDOW)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_replay_policies_by_class_are_refused_on_a_regression(policy):
    spec = _spec("replay", policy=policy)
    with pytest.raises(ConfigError) as error:
        refuse_unusable(spec, BIT_FLIPPING)
    assert str(error.value) == (f"method replay(policy={policy}) cannot act on problem "
                                f"bit_flipping: {POLICIES[policy]}")
    refuse_unusable(_spec("replay"), BIT_FLIPPING)  # reservoir: any targets
    refuse_unusable(spec, CLASSES)


def test_fisher_importances_are_refused_but_mas_and_l2_are_not():
    with pytest.raises(ConfigError, match=f"method mas\\(importance=fisher_sample\\) .*{FISHER}"):
        refuse_unusable(_spec("mas", importance="fisher_sample"), BIT_FLIPPING)
    for name in ("mas", "l2"):
        refuse_unusable(_spec(name), BIT_FLIPPING)


def test_compose_names_the_part_that_cannot_act():
    spec = _spec("compose", methods=["replay", "lwf"])
    with pytest.raises(ConfigError) as error:
        refuse_unusable(spec, BIT_FLIPPING)
    assert str(error.value) == ("method replay+lwf cannot act on problem bit_flipping: it "
                                "combines lwf, which distils a softmax over the outputs, "
                                + ONE_OUTPUT)


def test_every_other_method_can_act_on_a_single_regression_output():
    """The rest either use the problem's loss (sam, agem, ogd, mcsgd, replay, ...) or none."""
    for name in METHODS.names():
        if name not in REFUSED and name != "compose":
            refuse_unusable(_spec(name), BIT_FLIPPING)
            refuse_unusable(_spec(name), CLASSES)


def test_the_refusal_is_true_a_softmax_over_one_output_gives_exactly_zero():
    new = torch.randn(16, 1, requires_grad=True)
    loss = distillation(torch.randn(16, 1), new, temperature=2.0)
    (grad,) = torch.autograd.grad(loss, new)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


# ----------------------------------------------------------------------------- entry points


def _bit_flipping(methods: list) -> object:
    from engram.config import parse_methods
    from engram.schema import parse_dataclass
    from engram.experiments.plasticity import PlasticityConfig

    cfg = parse_dataclass(PlasticityConfig, {
        "seeds": [0], "problem": {"n_tasks": 3, "flip_every": 100, "probe_size": 20},
        "model": {"hidden": [5]}})
    cfg.methods = parse_methods(methods)
    return cfg


def test_plasticity_refuses_before_any_run(tmp_path):
    from engram.experiments.plasticity import run_plasticity

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="method lwf cannot act on problem bit_flipping"):
        run_plasticity(_bit_flipping(["naive", "lwf"]), out, show_progress=False)
    assert not out.exists()  # nothing was trained or written, not even naive's run


def test_window_experiment_refuses_before_any_run(tmp_path):
    from engram.experiments.window import parse_window_experiment, run_window, run_window_experiment

    experiment = parse_window_experiment({
        "run": {"max_steps": 10, "y_dim": 1},
        "variants": [{"name": "plain"}, {"name": "lwf", "method": "lwf"}]})
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="method lwf cannot act on problem window: .* 1 output"):
        run_window_experiment(experiment, out, show_progress=False)
    assert not out.exists()
    with pytest.raises(ConfigError, match="method lwf cannot act on problem window"):
        run_window(experiment.variants[1].config, experiment.variants[1].method)


def test_the_runner_refuses_before_the_first_task(tmp_path):
    """One class per task, task-incremental: every head has a single output."""
    from engram.results import read_rows
    from engram.experiments.continual import run_experiment
    from tests.conftest import tiny_config

    cfg = tiny_config(stream={"scenario": "task", "classes_per_task": 1, "n_tasks": 3},
                      methods=["lwf"])
    with pytest.raises(ConfigError, match=r"method lwf cannot act on problem digits \(split "
                                          r"stream\): it distils .* 1 output"):
        run_experiment(cfg, tmp_path, show_progress=False)
    assert read_rows(tmp_path / "results.csv") == []  # not even the untrained baseline


@pytest.mark.parametrize("name", ["sam", "agem", "ogd", "mcsgd"])
def test_methods_with_their_own_loss_run_on_bit_flipping(tmp_path, name):
    """These took cross-entropy (or a true logit) whatever the problem: on bit flipping's
    single real-valued output they crashed. Now they use its squared error."""
    from engram.experiments.plasticity import PLASTICITY_COLUMNS, PLASTICITY_KEY, run_plasticity
    from engram.results import read_rows

    params = {"memory": 50} if name == "agem" else {"samples_per_task": 10} if name == "ogd" \
        else {"lmc_steps": 5} if name == "mcsgd" else {}
    run_plasticity(_bit_flipping([{"name": name, **params}]), tmp_path, show_progress=False)
    rows = read_rows(tmp_path / "results.csv", PLASTICITY_COLUMNS, PLASTICITY_KEY)
    losses = [float(r["value"]) for r in rows if r["metric"] == "online_loss"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
