"""Shared fixtures: small, fast configs on the bundled digits."""

from __future__ import annotations

import pytest
import torch

from engram.config import load_config_dict

torch.set_num_threads(1)  # small models: one thread is fastest on the 2-core CI machine


def tiny_config(**sections):
    """A seconds-fast split-digits config; keyword arguments replace whole sections or keys."""
    raw = {
        "seeds": [0],
        "plots": False,
        "data": {"source": "digits", "limit": 400},
        "stream": {"kind": "split", "scenario": "class", "n_tasks": 3, "classes_per_task": 2},
        "model": {"kind": "mlp", "hidden": [32]},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
        "methods": ["naive"],
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return load_config_dict(raw)


@pytest.fixture
def tiny():
    return tiny_config
