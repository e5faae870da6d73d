"""Sweep overhead: `probekit.grid.run_sweep` on a two-job grid vs the same two jobs run by hand in one loop.

Both train the same tiny sorting models (same configs, same seeds) and evaluate them at the same
lengths. The sweep's jobs each ask for every core, so they run one at a time as the loop does.
``ray_start_s``: starting the local Ray instance; ``first``: the first sweep on it (worker processes
start and import torch); ``warm``: a second sweep on the same instance; ``all_skipped``: a rerun of a
finished sweep. A sweep started without Ray running pays ray_start_s + first.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

BASE = {
    "name": "bench",
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "n_ctx": 24, "positional": "none"},
    "task": {"name": "sorting", "n_values": 8, "default_length": 4},
    "train": {"warmup_steps": 4, "batch_size": 16, "lengths": [1, 4], "lr": 3e-3, "log_every": 10,
              "checkpoint_every": 50},
}


def _grid(folder: Path, steps: int) -> Path:
    base = {**BASE, "train": {**BASE["train"], "steps": steps}}
    grid = {"name": "bench", "base": base, "configs": [{"name": "tiny"}], "seeds": [0, 1],
            "eval": {"lengths": [2, 4], "n": 50, "seed": 0}}
    path = folder / "grid.json"
    path.write_text(json.dumps(grid))
    return path


def _by_hand(grid_path: Path, out: Path) -> float:
    from probekit.evaluate import evaluate
    from probekit.grid import load_grid, parse_run
    from probekit.train import train

    grid = load_grid(grid_path)
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    for job in grid.jobs(out):
        mcfg, task, tcfg = parse_run(job.run)
        model = train(mcfg, task, tcfg, out=job.dir, progress=False)
        res = evaluate(model, task, list(job.lengths), n=job.n, seed=job.eval_seed)
        (Path(job.dir) / "metrics.json").write_text(res.to_json())
    return time.perf_counter() - t0


def run(quick: bool = False) -> dict:
    from probekit.grid import ray_session, run_sweep

    steps = 30 if quick else 150
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        grid = _grid(d, steps)
        hand = _by_hand(grid, d / "hand")
        t0 = time.perf_counter()
        with ray_session():
            start = time.perf_counter() - t0
            t0 = time.perf_counter()
            run_sweep(grid, d / "first", progress=False)  # workers start and import torch
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            run_sweep(grid, d / "warm", progress=False)
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            run_sweep(grid, d / "warm", progress=False)  # every job finished: skipped
            skip = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return {"jobs": 2, "steps_per_job": steps, "by_hand_s": round(hand, 2), "ray_start_s": round(start, 2),
            "sweep_first_s": round(first, 2), "sweep_warm_s": round(warm, 2), "sweep_all_skipped_s": round(skip, 3),
            "warm_over_hand": round(warm / hand, 3), "cold_overhead_s": round(start + first - hand, 2),
            "target": "warm_over_hand <= 1.5 (Ray start is a fixed cost per call)"}
