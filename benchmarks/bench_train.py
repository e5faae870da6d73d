"""Training throughput: `probekit.train` vs a plain PyTorch loop over the same model and the same batches.

The plain loop samples the same batches (task.sample), runs the same native module forward, the same
answer-only cross-entropy, the same fused AdamW and gradient clipping (``clip_grad_norm_``), with no logging,
checkpoints or progress bar.
"""

from __future__ import annotations

import statistics
import time

import torch

from probekit.model import ModelConfig
from probekit.tasks import SortingTask
from probekit.train import TrainConfig, train


def _plain(cfg: ModelConfig, task, tc: TrainConfig) -> float:
    from scaling import plain_train  # the one plain loop (benchmarks/ is on sys.path under run.py)

    t0 = time.perf_counter()
    plain_train(cfg, task, tc)
    return time.perf_counter() - t0


def run(quick: bool = False) -> dict:
    task = SortingTask()
    cfg = ModelConfig(n_layers=2, d_model=128, n_heads=4, n_ctx=320, d_vocab=task.d_vocab)
    tc = TrainConfig(steps=40 if quick else 300, batch_size=128, lengths=(1, 20), log_every=10, checkpoint_every=10**9)
    plain, ours = [], []
    for _ in range(1 if quick else 3):  # interleaved repeats, median of each
        plain.append(_plain(cfg, task, tc))
        t0 = time.perf_counter()
        train(cfg, task, tc, progress=False)
        ours.append(time.perf_counter() - t0)
    p, o = statistics.median(plain), statistics.median(ours)
    return {"model": "2 layers, d_model 128, 4 heads (sort-baseline size)", "steps": tc.steps,
            "batch_size": tc.batch_size, "lengths": list(tc.lengths), "threads": torch.get_num_threads(),
            "repeats": len(plain), "plain_seconds": [round(t, 3) for t in plain],
            "probekit_seconds": [round(t, 3) for t in ours],
            "plain_steps_per_s": round(tc.steps / p, 2), "probekit_steps_per_s": round(tc.steps / o, 2),
            "probekit_over_plain": round(p / o, 3), "target": ">= 0.90"}
