"""engram.fit: any network, any stream, any method, through `engram run`'s one loop."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engram
from engram.config import parse_method
from engram.data import build_stream, load_source
from engram.errors import ConfigError
from engram.experiments.continual import run_experiment
from engram.methods import METHODS
from engram.models import adapt, build_model
from engram.models.protocol import NEEDS, structure_gap
from engram.results import read_rows
from engram.training import evaluate
from tests.conftest import tiny_config
from tests.test_adapt import ResidualMLP

README = Path(__file__).resolve().parents[1] / "README.md"
TIMING_METRICS = {"train_seconds"}  # wall time: the one value two identical runs differ in


def tiny_stream(scenario: str = "task"):
    """Two tasks of the digits 0-3, ~60 training examples each."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(digits.target)
    keep = y < 4
    x, y = x[keep], y[keep]
    return engram.stream_from((x[:240], y[:240]), (x[240:400], y[240:400]),
                              tasks=[[0, 1], [2, 3]], scenario=scenario)


def small_sequential(outputs: int = 2) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, outputs))


def values(rows) -> list[tuple]:
    """The rows' measurements, without run ids and wall times: what two runs must share."""
    columns = ("task_trained", "epoch", "step", "task_eval", "split", "metric", "value", "label",
               "params", "seed", "scenario")
    return sorted(tuple(str(r[column]) for column in columns)
                  for r in rows if r["metric"] not in TIMING_METRICS)


def fit(model, stream, method="naive", **kwargs):
    kwargs = {"epochs": 1, "batch_size": 32, "progress": False, **kwargs}
    return engram.fit(model, stream, method, **kwargs)


# ----------------------------------------------------------------------------- (1) the README example

def test_the_documented_example_runs(capsys):
    section = README.read_text().split("\n## Use engram from Python\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) < 25
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    result = namespace["result"]
    assert result.accuracy_matrix.shape == (5, 5)
    assert np.isfinite(result.accuracy_matrix).all()
    assert np.diag(result.accuracy_matrix).mean() > 0.7  # it learns each task
    assert f"forgetting {result.forgetting:.3f}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- (2) every method

def black_box(stream) -> nn.Module:
    return ResidualMLP(64, 16, stream.n_heads * stream.head_dim)


@pytest.mark.parametrize("name", METHODS.names())
@pytest.mark.parametrize("network", ["sequential", "black_box"])
def test_every_method_trains_a_user_module_or_names_what_it_lacks(name, network, tmp_path):
    stream = tiny_stream()
    module = small_sequential(stream.head_dim) if network == "sequential" else black_box(stream)
    adapted = adapt(module, n_heads=stream.n_heads, head_dim=stream.head_dim)
    method = METHODS.get(name)(parse_method(name, {}, "test").params)
    lacking = {need for need in method.model_needs if structure_gap(adapted, need)}
    if lacking:
        with pytest.raises(ConfigError) as refused:
            fit(module, stream, name, out=tmp_path)
        assert str(refused.value).startswith(f"method {name} cannot act on this network: it needs")
        assert any(NEEDS[need] in str(refused.value) for need in lacking)
        assert not tmp_path.joinpath("results.csv").exists()  # refused before any folder work
        return
    result = fit(module, stream, name, out=tmp_path)
    assert result.accuracy_matrix.shape == (2, 2)
    assert np.isfinite(result.accuracy_matrix).all()
    assert "run_complete" in set(result.rows["metric"])
    assert set(result.rows["dataset"]) == {"user"} and set(result.rows["name"]) == {"fit"}


# ----------------------------------------------------------------------------- (3) optimizer and loss

def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2)


def cosine(optimizer):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2)


def smoothed(logits, targets):
    return F.cross_entropy(logits, targets, label_smoothing=0.2)


def test_user_optimizer_scheduler_and_loss_change_the_numbers_deterministically():
    stream = tiny_stream()
    torch.manual_seed(0)
    module = small_sequential()
    runs = {
        "default": lambda: fit(module, stream, epochs=2),
        "adamw": lambda: fit(module, stream, epochs=2, optimizer=adamw, scheduler=cosine),
        "loss": lambda: fit(module, stream, epochs=2, loss=smoothed)}
    results = {what: run() for what, run in runs.items()}
    for what, run in runs.items():  # same arguments, a new folder: the same numbers
        assert values(run().rows.to_dict("records")) == values(
            results[what].rows.to_dict("records"))
    matrices = {what: result.accuracy_matrix for what, result in results.items()}
    assert not np.array_equal(matrices["adamw"], matrices["default"])
    losses = {what: result.rows[result.rows.metric == "train_loss"]["value"].tolist()
              for what, result in results.items()}
    assert losses["adamw"] != losses["default"] and losses["loss"] != losses["default"]
    # the evaluation loss rows use the user's loss: the trained model's smoothed loss
    trained = results["loss"]
    rows = trained.rows
    last = rows[(rows.metric == "loss") & (rows.task_trained == 2) & (rows.task_eval == 1)]
    first_task = stream.tasks[0].test
    assert float(last.value.iloc[0]) == pytest.approx(
        evaluate(trained.model, first_task, smoothed)[1], rel=1e-6)
    assert float(last.value.iloc[0]) != pytest.approx(evaluate(trained.model, first_task)[1])
    assert trained.run_id != results["default"].run_id


# ----------------------------------------------------------------------------- (4) one loop

def test_fit_on_a_cli_network_writes_the_rows_engram_run_writes(tmp_path):
    cfg = tiny_config(methods=["ewc"], train={"epochs": 2, "batch_size": 32})
    run_experiment(cfg, tmp_path / "run", show_progress=False)
    stream = build_stream(load_source("digits", None), cfg.data, cfg.stream, 0)
    torch.manual_seed(0)  # as run_one builds its network
    model = build_model(cfg.model, stream.input_shape, stream.n_heads, stream.head_dim)
    result = fit(model, stream, "ewc", epochs=2, batch_size=32, out=tmp_path / "fit")
    cli_rows = read_rows(tmp_path / "run" / "results.csv")
    fit_rows = read_rows(tmp_path / "fit" / "results.csv")
    assert len(fit_rows) == len(cli_rows) > 0
    assert values(fit_rows) == values(cli_rows)
    assert {r["dataset"] for r in fit_rows} == {"user"} and result.run_id != cli_rows[0]["run_id"]


# ----------------------------------------------------------------------------- (5) metrics

def top_class_share(logits, targets):
    """The fraction of examples predicted as class 0 (a metric any function can be)."""
    return float((logits.argmax(1) == 0).float().mean())


def test_metrics_add_rows_named_after_the_function():
    stream = tiny_stream()
    result = fit(small_sequential(), stream, metrics=[top_class_share])
    rows = result.rows[result.rows.metric == "top_class_share"]
    assert len(rows) == (len(stream) + 1) * len(stream)  # baseline + each task, every task
    assert rows.value.between(0, 1).all()
    accuracy_rows = result.rows[result.rows.metric == "accuracy"]
    assert len(accuracy_rows) == len(rows)
    with pytest.raises(ConfigError, match="needs a name"):
        fit(small_sequential(), stream, metrics=[lambda logits, targets: 0.0])
    with pytest.raises(ConfigError, match="'accuracy' is one every run writes"):
        def accuracy(logits, targets):
            return 0.0
        fit(small_sequential(), stream, metrics=[accuracy])


# ----------------------------------------------------------------------------- (6) resume

def test_a_second_call_with_the_same_arguments_and_folder_trains_nothing(tmp_path):
    stream = tiny_stream()
    module = small_sequential()
    before = [p.detach().clone() for p in module.parameters()]
    first = fit(module, stream, "ewc", method_params={"strength": 10}, out=tmp_path)
    assert all(torch.equal(b, p) for b, p in zip(before, module.parameters()))  # a copy trained
    rows_after_first = len(read_rows(tmp_path / "results.csv"))
    second = fit(module, stream, "ewc", method_params={"strength": 10}, out=tmp_path)
    assert (second.report.skipped, second.report.rows_written, second.model) == (1, 0, None)
    assert second.run_id == first.run_id
    np.testing.assert_array_equal(second.accuracy_matrix, first.accuracy_matrix)
    assert len(read_rows(tmp_path / "results.csv")) == rows_after_first
    # another seed or name is another run in the same folder
    third = fit(module, stream, "ewc", method_params={"strength": 10}, out=tmp_path, seed=1)
    assert third.report.skipped == 0 and third.run_id != first.run_id
    assert fit(module, stream, "ewc", method_params={"strength": 10}, out=tmp_path,
               name="again").run_id not in (first.run_id, third.run_id)


# ----------------------------------------------------------------------------- arguments

def test_the_default_folder_is_a_new_temporary_one_and_results_carry_the_metrics():
    stream = tiny_stream()
    result = fit(small_sequential(), stream)
    assert (result.folder / "results.csv").is_file()
    R = result.accuracy_matrix
    assert result.average_accuracy == pytest.approx(R[-1].mean())
    assert math.isfinite(result.forgetting) and math.isfinite(result.backward_transfer)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"method": "ewc", "method_params": {"strenght": 1}}, r"unknown key fit\(method\)\(ewc\)"),
    ({"epochs": 0}, "fit.epochs"),
    ({"eval_splits": ("train",)}, "fit.eval_splits"),
    ({"optimizer": "adamw"}, "optimizer= must be a callable"),
    ({"optimizer": lambda params: None}, "must return a torch.optim.Optimizer"),
])
def test_bad_arguments_are_one_line_config_errors(kwargs, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as raised:
        fit(small_sequential(), tiny_stream(), out=tmp_path / "out", **kwargs)
    assert "\n" not in str(raised.value)


def test_a_stream_or_model_of_the_wrong_kind_is_refused():
    with pytest.raises(ConfigError, match="engram Stream"):
        fit(small_sequential(), [1, 2])
    with pytest.raises(ConfigError, match="nn.Module"):
        fit(lambda x: x, tiny_stream())
    stream = tiny_stream("task")
    with pytest.raises(ConfigError, match="needs 2 of 2"):
        fit(build_model(tiny_config().model, (1, 8, 8), 1, 2), stream)


def test_a_dataset_backed_stream_writes_the_rows_of_the_tensor_path(tmp_path):
    """tiny_stream's data as torch Datasets instead of tensor pairs: fit writes the same rows."""
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset

    digits = load_digits()
    x = torch.tensor(digits.images / 16, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(digits.target)
    keep = y < 4
    x, y = x[keep], y[keep]
    datasets = engram.stream_from(TensorDataset(x[:240], y[:240]),
                                  TensorDataset(x[240:400], y[240:400]),
                                  tasks=[[0, 1], [2, 3]], scenario="task")
    torch.manual_seed(0)
    from_tensors = fit(small_sequential(), tiny_stream(), "ewc", out=tmp_path / "tensors")
    torch.manual_seed(0)
    from_datasets = fit(small_sequential(), datasets, "ewc", out=tmp_path / "datasets")
    assert len(from_tensors.rows) > 0
    assert values(from_datasets.rows.to_dict("records")) == \
        values(from_tensors.rows.to_dict("records"))
    assert np.array_equal(from_datasets.accuracy_matrix, from_tensors.accuracy_matrix)


def flip_half(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images left-right (an augmentation drawing from the run)."""
    mirror = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(mirror.view(-1, 1, 1, 1), x.flip(-1), x)


def test_a_transform_changes_training_deterministically_and_the_identity_changes_nothing(
        tmp_path):
    stream = tiny_stream()
    runs = {}
    for label, transform in (("none", None), ("identity", lambda x, generator: x),
                             ("flip", flip_half), ("flip again", flip_half)):
        torch.manual_seed(0)
        result = fit(small_sequential(), stream, "ewc", epochs=2, transform=transform,
                     out=tmp_path / label.replace(" ", "_"))
        runs[label] = values(result.rows.to_dict("records"))
    assert runs["identity"] == runs["none"]
    assert runs["flip"] == runs["flip again"]
    assert runs["flip"] != runs["none"]


def test_a_transform_sees_replayed_examples_but_the_buffer_keeps_raw_ones():
    stream = tiny_stream("class")
    sizes: list[int] = []
    all_raw: list[bool] = []

    def negate(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        sizes.append(len(x))
        all_raw.append(bool((x >= 0).all()))  # digits' pixels are >= 0: negated ones are not
        return -x

    torch.manual_seed(0)
    result = fit(small_sequential(4), stream, "replay",
                 method_params={"memory": 40, "replay_batch_size": 16}, transform=negate)
    assert max(sizes) == 32 + 16  # task 2's batches hold replayed examples too
    assert all(all_raw)  # the buffer handed back raw examples, not the negated ones it trained on
    assert np.isfinite(result.accuracy_matrix).all()


def test_optimizer_policy_carry_keeps_the_users_optimizer_across_tasks(tmp_path):
    stream = tiny_stream()
    adam = functools.partial(torch.optim.Adam, lr=1e-2)
    rows = {}
    for policy in ("fresh", "carry"):
        torch.manual_seed(0)
        result = fit(small_sequential(), stream, optimizer=adam, optimizer_policy=policy,
                     out=tmp_path / policy)
        rows[policy] = result.rows
    first = {policy: values(frame[frame.task_trained <= 1].to_dict("records"))
             for policy, frame in rows.items()}
    later = {policy: values(frame[frame.task_trained == 2].to_dict("records"))
             for policy, frame in rows.items()}
    assert first["fresh"] == first["carry"]  # the same optimizer until the first boundary
    assert later["fresh"] != later["carry"]  # Adam's moments carried into task 2
    with pytest.raises(ConfigError, match="optimizer_policy"):
        fit(small_sequential(), stream, optimizer_policy="sometimes")


def small_cnn(outputs: int = 2) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, outputs))


def test_amp_and_channels_last_are_train_settings_of_fit(tmp_path, monkeypatch):
    """amp= and channels_last= reach the training loop as train.amp / train.channels_last
    do in a config: the loop autocasts (bfloat16 on the CPU) and keeps the convolution's
    weights in NHWC order; each is part of the run id only when set; a bad value is one
    line."""
    import engram.training as training

    stream = tiny_stream()
    seen = []
    real_mixed_precision = training.mixed_precision

    def spy(amp, device, scaler=None):
        seen.append(amp)
        return real_mixed_precision(amp, device, scaler)

    monkeypatch.setattr(training, "mixed_precision", spy)
    plain = fit(small_cnn(), stream, out=tmp_path / "plain")
    mixed = fit(small_cnn(), stream, amp=True, out=tmp_path / "amp")
    nhwc = fit(small_cnn(), stream, channels_last=True, out=tmp_path / "nhwc")
    assert seen == [False] * 2 + [True] * 2 + [False] * 2  # two tasks each
    # (the second convolution's: a 1-channel weight is contiguous in both orders)
    assert nhwc.model.body[2].weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.model.body[2].weight.is_contiguous(memory_format=torch.channels_last)
    assert len({plain.run_id, mixed.run_id, nhwc.run_id}) == 3
    assert values(mixed.rows.to_dict("records")) != values(plain.rows.to_dict("records"))
    with pytest.raises(ConfigError, match="amp"):
        fit(small_cnn(), stream, amp="yes")
