"""CUDA paths, run where torch sees a GPU (CI has none: these skip there): streamed data
through pinned memory and worker processes, augmentation on the device, mixed precision and
channels-last on the ResNet."""

from __future__ import annotations

import math
import tempfile

import pytest
import torch

import engram
from engram.data.augment import TrainingAugmentation
from engram.experiments.continual import run_experiment
from engram.results import read_rows
from tests.conftest import tiny_config
from tests.test_lazy_data import NET, measured_rows, stream

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_streamed_data_reaches_the_gpu_with_the_in_memory_rows():
    kept = engram.fit(NET, stream(in_memory=True, device="cuda"), "replay", epochs=2,
                      device="cuda", progress=False)
    streamed = engram.fit(NET, stream(in_memory=False, workers=2, device="cuda"), "replay",
                          epochs=2, device="cuda", progress=False)
    assert [r[:4] for r in measured_rows(streamed)] == [r[:4] for r in measured_rows(kept)]
    values = [r[4] for r in measured_rows(streamed)]
    assert values == pytest.approx([r[4] for r in measured_rows(kept)], abs=1e-5)


def test_augmentation_on_the_gpu_equals_the_cpu():
    x = torch.rand(64, 3, 32, 32)
    augment = TrainingAugmentation(4, True, (-1.0, -2.0, -3.0))
    on_gpu = augment(x.cuda(), torch.Generator().manual_seed(0))
    assert on_gpu.is_cuda
    assert torch.equal(on_gpu.cpu(), augment(x, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("fast", [{}, {"amp": True}, {"amp": True, "channels_last": True}])
def test_the_resnet_trains_on_the_gpu(fast):
    cfg = tiny_config(device="cuda", model={"kind": "resnet18_slim"},
                      train={"epochs": 2, "augment": {"crop_padding": 2, "flip": True}, **fast},
                      methods=["naive", {"name": "derpp", "memory": 50}, "ewc"])
    with tempfile.TemporaryDirectory() as out:
        report = run_experiment(cfg, out, show_progress=False, raise_failures=True)
        rows = read_rows(report.results)
    assert all(math.isfinite(float(r["value"])) for r in rows)
    accuracy = {r["method"]: float(r["value"]) for r in rows if r["metric"] == "accuracy"
                and r["task_trained"] == "3" and r["task_eval"] == "3"}
    print(fast, accuracy)
    assert len(accuracy) == 3
    # The last task was learnt, above chance (1/6 over the 6 classes of class-IL), by some
    # method at least: with 8 steps a task, the loss scaler's first skipped steps can leave
    # one run short of that (seen once for naive under amp: 0.16).
    assert max(accuracy.values()) > 0.25
