"""Attribution instruments: wall time on a sort-baseline-sized model (2 layers, d_model 128, 4 heads, NoPE,
untrained weights: the cost does not depend on them), and attribution patching vs exact patching.

    .venv/bin/python benchmarks/run.py --only attribution [--quick]
"""

from __future__ import annotations

import time

import torch


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 3)


def run(quick: bool = False) -> dict:
    from probekit import attribution as A
    from probekit.model import ModelConfig, build_model
    from probekit.tasks import SortingTask

    torch.manual_seed(0)
    n, length = (32, 10) if quick else (256, 20)
    task = SortingTask(n_values=64)
    model = build_model(ModelConfig(n_layers=2, d_model=128, n_heads=4, d_vocab=task.d_vocab, n_ctx=128, seed=0))
    batch = task.sample(n, length=length, seed=0)
    from probekit.corruptions import corrupt as corrupt_pair

    corrupt = corrupt_pair(task, batch, "replace", seed=0).corrupted
    res = {"n": n, "length": length, "seq_len": batch.seq_len, "threads": torch.get_num_threads()}
    _, res["dla_head_s"] = _timed(lambda: A.direct_logit_attribution(model, batch, unit="head"))
    _, res["dla_source_s"] = _timed(lambda: A.direct_logit_attribution(model, batch, unit="source"))
    _, res["ablation_sweep_zero_metric_only_s"] = _timed(
        lambda: A.head_ablation_sweep(model, batch, method="zero", exact_match=False))
    _, res["ablation_sweep_mean_with_greedy_exact_match_s"] = _timed(
        lambda: A.head_ablation_sweep(model, batch, method="mean", exact_match=True))
    _, res["attribution_patching_s"] = _timed(
        lambda: A.attribution_patching(model, batch, corrupt, metric="logprob", exact=False))
    ap, res["attribution_plus_exact_patching_s"] = _timed(
        lambda: A.attribution_patching(model, batch, corrupt, metric="logprob", exact=True))
    res["exact_patching_s"] = round(res["attribution_plus_exact_patching_s"] - res["attribution_patching_s"], 3)
    res["exact_over_attribution_time"] = round(res["exact_patching_s"] / max(res["attribution_patching_s"], 1e-9), 1)
    res["agreement_heads_untrained"] = {k: (round(v, 3) if isinstance(v, float) else v)
                                        for k, v in ap.agreement["heads"].items()}
    return res


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
