"""Any torch.optim optimizer and LR scheduler by name (engram.optimizers): the numbers they
give, the schedule actually followed, the fresh and carry policies (also across a resume),
one-line errors for every bad setting, and run ids that earlier configs keep."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from engram.cli import main
from engram.config import config_to_dict, load_config_dict
from engram.errors import ConfigError
from engram.experiments.continual import continual_run_id, run_experiment, run_plan_of
from engram.results import read_rows
from engram.training import make_optimizer
from tests.conftest import tiny_config
from tests.test_runner import _comparable, _stop_in_task

ADAM = {"optimizer": "adam", "lr": 0.01}


def _rows(cfg, folder):
    run_experiment(cfg, folder, show_progress=False)
    return _comparable(read_rows(folder / "results.csv"))


def _values(rows, **match):
    """The measured values of the rows matching `match` (e.g. task_trained="1")."""
    return [(r["task_trained"], r["epoch"], r["task_eval"], r["metric"], r["value"])
            for r in rows if all(r[k] == v for k, v in match.items())]


# ----------------------------------------------------------------------------- construction

@pytest.mark.parametrize("train,expected", [
    ({"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)),
    ({"optimizer": "adam", "lr": 0.01, "weight_decay": 0.001},
     lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.001)),
    ({"optimizer": "AdamW", "lr": 0.01, "optimizer_args": {"betas": [0.8, 0.9], "amsgrad": True}},
     lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.9), amsgrad=True, weight_decay=0.0)),
    ({"optimizer": "RMSprop", "lr": 0.01, "momentum": 0.5, "optimizer_args": {"centered": True}},
     lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True)),
], ids=["sgd", "adam", "adamw", "rmsprop"])
def test_the_optimizer_is_torchs_class_with_the_configured_arguments(train, expected):
    """sgd and adam build exactly as before; any other class by name, in any case, with its
    arguments (YAML lists become the tuples torch expects); AdamW's weight decay is
    train.weight_decay (0), not torch's default 0.01."""
    model = torch.nn.Linear(3, 2)
    made = make_optimizer(model, tiny_config(train=train).train)
    wanted = expected(model.parameters())
    assert type(made) is type(wanted)
    assert made.defaults == wanted.defaults


def test_names_are_one_spelling_so_the_run_id_does_not_depend_on_case():
    upper, lower = (tiny_config(train={"optimizer": name, "scheduler": sched,
                                       "scheduler_args": {"T_max": 2}})
                    for name, sched in (("AdamW", "CosineAnnealingLR"),
                                        ("adamw", "cosineannealinglr")))
    assert upper.train.optimizer == "adamw" and upper.train.scheduler == "cosineannealinglr"
    spec = upper.methods[0]
    assert continual_run_id(upper, spec, 0) == continual_run_id(lower, spec, 0)


# ----------------------------------------------------------------------------- numbers

def test_adamw_with_a_cosine_schedule_changes_the_results_and_is_deterministic(tmp_path):
    adamw = tiny_config(train={"optimizer": "AdamW", "lr": 0.01, "weight_decay": 0.05,
                               "scheduler": "CosineAnnealingLR", "scheduler_args": {"T_max": 2}})
    first, second = _rows(adamw, tmp_path / "a"), _rows(adamw, tmp_path / "b")
    adam = _rows(tiny_config(train=ADAM), tmp_path / "adam")
    assert first == second
    accuracy = dict(metric="accuracy", task_trained="3")
    assert _values(first, **accuracy) != _values(adam, **accuracy)


def _record_learning_rates(monkeypatch) -> list[tuple[int, int, int, float]]:
    """Make the runner's train_task record (task, epoch, steps into the task, lr) after every
    epoch, read from the optimizer's param group."""
    import engram.experiments.continual as runner

    real_train_task, seen = runner.train_task, []

    def recording(ctx, method, on_epoch):
        first_step = ctx.step

        def spy(epoch, loss):
            seen.append((ctx.task.index, epoch, ctx.step - first_step,
                         ctx.optimizer.param_groups[0]["lr"]))
            on_epoch(epoch, loss)

        real_train_task(ctx, method, spy)

    monkeypatch.setattr(runner, "train_task", recording)
    return seen


def _cosine(lr: float, t: int, period: int, low: float = 0.0) -> float:
    """The closed-form cosine annealing (Loshchilov & Hutter 2017) at step t of `period`."""
    return low + (lr - low) * (1 + math.cos(math.pi * t / period)) / 2


@pytest.mark.parametrize("policy", ["fresh", "carry"])
def test_an_epoch_schedule_is_followed_and_restarts_per_task_only_when_fresh(
        tmp_path, monkeypatch, policy):
    lr, epochs, tasks = 0.05, 3, 3
    period = epochs if policy == "fresh" else epochs * tasks
    cfg = tiny_config(train={"epochs": epochs, "lr": lr, "scheduler": "cosineannealinglr",
                             "scheduler_args": {"T_max": period, "eta_min": 0.001},
                             "optimizer_policy": policy})
    seen = _record_learning_rates(monkeypatch)
    run_experiment(cfg, tmp_path, show_progress=False)
    assert [(task, epoch) for task, epoch, _, _ in seen] == \
        [(t, e) for t in range(tasks) for e in range(1, epochs + 1)]
    for task, epoch, _, got in seen:
        steps = epoch if policy == "fresh" else task * epochs + epoch
        assert got == pytest.approx(_cosine(lr, steps, period, 0.001), rel=1e-9, abs=1e-12)


def test_a_step_schedule_is_stepped_after_every_optimizer_step(tmp_path, monkeypatch):
    lr, gamma, every = 0.05, 0.5, 2
    cfg = tiny_config(train={"lr": lr, "scheduler": "StepLR", "scheduler_step": "step",
                             "scheduler_args": {"step_size": every, "gamma": gamma}})
    seen = _record_learning_rates(monkeypatch)
    run_experiment(cfg, tmp_path, show_progress=False)
    assert max(steps for _, _, steps, _ in seen) >= 2 * every  # the schedule had steps to take
    for _, _, steps, got in seen:  # fresh: every task starts at train.lr again
        assert got == pytest.approx(lr * gamma ** (steps // every), rel=1e-12)


def test_reduce_on_plateau_watches_the_epoch_loss(tmp_path, monkeypatch):
    """mode max on a loss that falls: no epoch is an improvement after the first, so with
    patience 0 every later epoch halves the lr."""
    cfg = tiny_config(train={"epochs": 4, "lr": 0.05, "scheduler": "ReduceLROnPlateau",
                             "scheduler_args": {"mode": "max", "patience": 0, "factor": 0.5}},
                      stream={"n_tasks": 1, "classes_per_task": 2})
    seen = _record_learning_rates(monkeypatch)
    run_experiment(cfg, tmp_path, show_progress=False)
    assert [lr for *_, lr in seen] == pytest.approx([0.05, 0.025, 0.0125, 0.00625])


# ----------------------------------------------------------------------------- fresh and carry

def test_carry_keeps_adams_moments_across_tasks_and_fresh_does_not(tmp_path):
    fresh = _rows(tiny_config(train=ADAM), tmp_path / "fresh")
    carry = _rows(tiny_config(train={**ADAM, "optimizer_policy": "carry"}), tmp_path / "carry")
    # the first task trains from the same start; from the second on the moments differ
    assert _values(fresh, task_trained="1") == _values(carry, task_trained="1")
    assert _values(fresh, task_trained="2", metric="accuracy") != \
        _values(carry, task_trained="2", metric="accuracy")


def test_carry_of_stateless_sgd_gives_the_numbers_of_fresh(tmp_path):
    """Plain SGD keeps no state, so carrying it changes nothing: what carry changes is state."""
    assert _values(_rows(tiny_config(), tmp_path / "fresh")) == \
        _values(_rows(tiny_config(train={"optimizer_policy": "carry"}), tmp_path / "carry"))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device,drop_optimizer", [
    ("cpu", False), ("cpu", True), pytest.param("cuda", False, marks=CUDA)],
    ids=["checkpoint", "no-optimizer", "cuda"])
def test_carry_resumes_exactly_after_a_kill(tmp_path, monkeypatch, device, drop_optimizer):
    """The checkpoint carries the optimizer's and the scheduler's state, so the resumed tasks
    train on with the same moments and learning rate; a checkpoint without them (an engram
    that did not save them) is not resumed: the run starts over, with the same numbers."""
    # LinearLR scales the lr when it is made: a restore that made it after loading the
    # optimizer's state would scale the saved lr once more
    cfg = tiny_config(train={**ADAM, "optimizer_policy": "carry", "scheduler": "LinearLR",
                             "scheduler_step": "step",
                             "scheduler_args": {"start_factor": 0.25, "total_iters": 40}},
                      stream={"n_tasks": 4}, checkpoint_seconds=0.0, device=device)
    full = _rows(cfg, tmp_path / "full")
    _stop_in_task(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", show_progress=False)
    monkeypatch.undo()
    (checkpoint,) = (tmp_path / "cut" / "checkpoints").glob("*.pt")  # after task 2
    state = torch.load(checkpoint, weights_only=True)
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] > 0
    if drop_optimizer:
        del state["optimizer"], state["scheduler"]
        torch.save(state, checkpoint)
    assert _rows(cfg, tmp_path / "cut") == full


def test_packnet_refuses_carry():
    from engram.methods.base import Context
    from engram.registry import METHODS

    cfg = tiny_config(train={"optimizer_policy": "carry"}, methods=["packnet"])
    method = METHODS.get("packnet")(cfg.methods[0].params)
    ctx = Context(model=torch.nn.Linear(2, 2), stream=[None] * 3, train_cfg=cfg.train,
                  generator=torch.Generator(), device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="optimizer_policy=carry"):
        method.prepare_model(ctx.model, ctx)


# ----------------------------------------------------------------------------- identities

def test_new_settings_at_their_defaults_leave_run_ids_and_folder_identity_alone():
    """Configs written before these settings keep their run ids and result folders; setting
    one makes another run."""
    plain = tiny_config()
    spelled_out = tiny_config(train={"optimizer_args": {}, "scheduler": None,
                                     "scheduler_args": {}, "scheduler_step": "epoch",
                                     "optimizer_policy": "fresh"})
    spec = plain.methods[0]
    assert continual_run_id(spelled_out, spec, 0) == continual_run_id(plain, spec, 0)
    assert set(run_plan_of(plain).identity["train"]) == \
        {"epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "eval_every",
         "eval_splits"}
    for changed in ({"optimizer_policy": "carry"}, {"optimizer_args": {"nesterov": False}},
                    {"scheduler": "steplr", "scheduler_args": {"step_size": 5}}):
        assert continual_run_id(tiny_config(train=changed), spec, 0) != \
            continual_run_id(plain, spec, 0)


def test_a_sweep_may_vary_the_optimizer_arguments():
    from engram.experiments.sweep import sweep_identity

    raw = config_to_dict(tiny_config(train=ADAM))
    raw["train"]["optimizer_args"] = [{"amsgrad": True}, {"amsgrad": False}]
    identity, axes = sweep_identity(raw)
    assert identity["train.optimizer_args"] == [{"amsgrad": True}, {"amsgrad": False}]
    assert "train.optimizer_args" in axes and "train.optimizer_policy" not in identity


# ----------------------------------------------------------------------------- bad settings

BAD = [
    ({"optimizer": "adamx"}, ["train.optimizer", "unknown optimizer 'adamx'", "adamw", "sgd"]),
    ({"optimizer": "LBFGS"}, ["train.optimizer", "LBFGS cannot be used", "closure"]),
    ({"optimizer": "adam", "momentum": 0.9}, ["train.momentum", "Adam takes no momentum"]),
    ({"optimizer": "rprop", "weight_decay": 0.1}, ["train.weight_decay", "Rprop"]),
    ({"optimizer": "adam", "optimizer_args": {"betaz": [0.9, 0.9]}},
     ["train.optimizer_args.betaz", "Adam takes no argument 'betaz'", "amsgrad"]),
    ({"optimizer_args": {"lr": 0.1}}, ["train.optimizer_args.lr", "set train.lr instead"]),
    ({"optimizer": "adam", "optimizer_args": {"betas": [2, 0.9]}},
     ["train.optimizer_args", "Adam refuses", "beta"]),
    ({"optimizer_args": 5}, ["train.optimizer_args", "expected a mapping"]),
    ({"scheduler": "cosine"}, ["train.scheduler", "unknown scheduler 'cosine'",
                               "cosineannealinglr"]),
    ({"scheduler": "LambdaLR"}, ["train.scheduler", "LambdaLR cannot be used"]),
    ({"scheduler": "steplr"}, ["train.scheduler_args", "StepLR needs step_size"]),
    ({"scheduler": "cosineannealinglr", "scheduler_args": {"T_maxx": 3}},
     ["train.scheduler_args.T_maxx", "CosineAnnealingLR takes no argument 'T_maxx'"]),
    ({"scheduler_args": {"T_max": 3}}, ["train.scheduler_args", "without train.scheduler"]),
    ({"scheduler": "reducelronplateau", "scheduler_step": "step"},
     ["train.scheduler_step", "ReduceLROnPlateau", "epoch"]),
    ({"scheduler": "onecyclelr", "scheduler_args": {"max_lr": 0.1}},
     ["train.scheduler_args", "OneCycleLR refuses", "total_steps"]),
    ({"scheduler_step": "batch"}, ["train.scheduler_step", "'epoch', 'step'"]),
    ({"optimizer_policy": "keep"}, ["train.optimizer_policy", "'fresh', 'carry'"]),
]


@pytest.mark.parametrize("train,needles", BAD, ids=[str(i) for i in range(len(BAD))])
def test_every_bad_optimizer_setting_is_one_line_before_anything_runs(tmp_path, capsys, train,
                                                                      needles):
    config = tmp_path / "c.yaml"
    raw = config_to_dict(tiny_config())
    raw["train"].update(train)
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("engram: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    assert not (out / "results.csv").exists()


def test_overrides_reach_the_checks_too(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(tiny_config())))
    assert main(["run", str(config), "train.optimizer=nadam", "train.momentum=0.5",
                 "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "NAdam takes no momentum" in capsys.readouterr().err


def test_help_config_lists_the_new_keys(capsys):
    main(["run", "--help-config"])
    out = capsys.readouterr().out
    for key in ("train.optimizer ", "train.optimizer_args", "train.scheduler ",
                "train.scheduler_args", "train.scheduler_step", "train.optimizer_policy"):
        assert key in out, key


def test_a_valid_config_of_other_classes_loads():
    """The checks run at load time, on a probe tensor: a valid config loads."""
    cfg = load_config_dict({"train": {"optimizer": "adagrad", "optimizer_args": {"lr_decay": 0.01},
                                      "scheduler": "MultiStepLR",
                                      "scheduler_args": {"milestones": [1, 2]}}})
    assert cfg.train.optimizer == "adagrad" and cfg.train.scheduler == "multisteplr"
