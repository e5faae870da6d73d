"""Head x position patching sweep: probekit's batched engine vs ``transformer_lens.patching``.

Both compute ``get_act_patch_attn_head_out_by_pos`` (every layer x position x head, hook_z,
denoising) on the same randomly initialised model of the shipped size (2 layers, d_model 128,
4 heads), the same clean/corrupted tokens and the same metric (mean logit difference, clean vs
corrupted answer token): ``mult-5x5`` reads all 10 answer digits (the least favourable case: the
last layer must be recomputed at 10 positions per patch), ``mult-5x5-digit5`` is a carry-flip read
at answer digit 5, ``sort-20`` a successor-change read at answer step 10 (length-20 lists, 42
tokens). One thread; each method runs in a fresh process after the same warm-up (a 2-example
sweep), so its peak memory (``ru_maxrss`` growth over the set-up) is its own. Reported: seconds,
speed-up, max |difference| between the two result tensors, peak MiB.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time


def _setup(case: str, n: int):
    import torch

    torch.set_num_threads(1)
    from probekit.corruptions import corrupt
    from probekit.model import ModelConfig, build_model
    from probekit.tasks import MultiplicationTask, SortingTask

    if case == "mult-5x5":  # metric over all 10 answer digits
        task = MultiplicationTask(digits=5)
        pair = corrupt(task, task.sample(n, seed=0), "operand-digit", seed=0, place=2)
    elif case == "mult-5x5-digit5":  # carry-flip, metric at answer digit 5
        task = MultiplicationTask(digits=5)
        pair = corrupt(task, task.sample(n, seed=0), "carry-flip", seed=0, digit=5)
    else:  # successor-change, metric at answer step 10
        task = SortingTask(n_values=64, repeats=True)
        pair = corrupt(task, task.sample(n, length=20, seed=0), "successor-change", seed=0, step=10)
    model = build_model(ModelConfig(n_layers=2, d_model=128, n_heads=4, d_vocab=task.d_vocab, n_ctx=64,
                                    positional="learned", seed=0))
    return model, pair


def _worker(method: str, case: str, n: int, q):
    import torch

    model, pair = _setup(case, n)
    from probekit.corruptions import make_pair
    from probekit.metrics import BoundMetric
    from probekit.patching import sweep

    def go(p):
        if method == "tl":
            import transformer_lens.patching as tlp

            bm = BoundMetric.bind("logit-diff", p)
            with torch.no_grad():
                _, cache = model.run_with_cache(p.clean.tokens)
                return tlp.get_act_patch_attn_head_out_by_pos(model, p.corrupted.tokens, cache, bm.tl_metric())
        return sweep(model, p, "z", by_pos=True, metric="logit-diff", normalize=False).values

    two = torch.arange(2)
    go(make_pair(pair.clean.select(two), pair.corrupted.select(two), pair.kind))  # warm-up, same for both
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    vals = go(pair)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q.put({"seconds": secs, "values": vals.tolist(), "peak_mib": (peak - base) / 1024,
           "seq_len": pair.clean.seq_len, "patches": vals.numel()})


def _run_one(method: str, case: str, n: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(method, case, n, q))
    p.start()
    out = q.get()
    p.join()
    return out


def run(quick: bool = False) -> dict:
    import torch

    cases = [("mult-5x5", 16)] if quick else [("mult-5x5", 64), ("mult-5x5-digit5", 64), ("sort-20", 64)]
    out: dict = {"threads": 1, "what": "head x position hook_z sweep, mean logit-diff (clean vs corrupted answer), "
                 "denoising; mult-5x5: all answer digits; mult-5x5-digit5: carry-flip, digit 5; sort-20: step 10"}
    for case, n in cases:
        ours = _run_one("probekit", case, n)
        tl = _run_one("tl", case, n)
        diff = float((torch.tensor(ours["values"]) - torch.tensor(tl["values"])).abs().max())
        out[case] = {"n": n, "seq_len": ours["seq_len"], "patches": ours["patches"],
                     "probekit_s": round(ours["seconds"], 3), "transformer_lens_s": round(tl["seconds"], 3),
                     "speedup": round(tl["seconds"] / ours["seconds"], 2), "max_abs_diff": diff,
                     "probekit_peak_mib": round(ours["peak_mib"], 1), "transformer_lens_peak_mib": round(tl["peak_mib"], 1)}
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick=True), indent=2))
