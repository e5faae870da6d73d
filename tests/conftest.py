"""Shared fixtures: tiny models trained in seconds by probekit's own training loop (no network)."""

from __future__ import annotations

import pytest
import torch

from probekit.model import ModelConfig
from probekit.tasks import MultiplicationTask, SortingTask
from probekit.train import TrainConfig, train

torch.set_num_threads(1)  # tiny models: one thread is faster, and robust when the machine is loaded


@pytest.fixture(scope="session")
def tiny_sort(tmp_path_factory):
    """(model, task): 2-layer NoPE model that sorts distinct values 0..15, lengths 2..8 (trained ~5 s)."""
    task = SortingTask(n_values=16, repeats=False)
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, d_vocab=task.d_vocab, n_ctx=64, seed=0)
    out = tmp_path_factory.mktemp("tiny_sort")
    model = train(cfg, task, TrainConfig(steps=300, batch_size=64, lengths=(2, 8), lr=3e-3, warmup_steps=30),
                  out=out, name="tiny-sort", overwrite=True, progress=False)
    model.probekit_name = "tiny-sort"
    return model, task


@pytest.fixture(scope="session")
def tiny_mult(tmp_path_factory):
    """(model, task): 2-layer model on 2x1-digit reversed multiplication (trained ~10 s)."""
    task = MultiplicationTask(digits=2, b_digits=1)
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, d_vocab=task.d_vocab, n_ctx=16, positional="learned", seed=0)
    out = tmp_path_factory.mktemp("tiny_mult")
    model = train(cfg, task, TrainConfig(steps=400, batch_size=64, lengths=(2, 2), lr=3e-3, warmup_steps=30),
                  out=out, name="tiny-mult", overwrite=True, progress=False)
    model.probekit_name = "tiny-mult"
    return model, task


@pytest.fixture(scope="session")
def tiny_sort_dir(tiny_sort, tmp_path_factory):
    from probekit.model import save_model

    model, task = tiny_sort
    return save_model(model, tmp_path_factory.mktemp("saved") / "tiny-sort", task, name="tiny-sort")
