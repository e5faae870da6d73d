"""Head x position patching sweep: probekit's batched engine vs ``transformer_lens.patching``.

Both compute ``get_act_patch_attn_head_out_by_pos`` (every layer x position x head, hook_z,
denoising) on the same randomly initialised model of the shipped size (2 layers, d_model 128,
4 heads), the same clean/corrupted tokens and the same metric (mean logit difference, clean vs
corrupted answer token): ``mult-5x5`` reads all 10 answer digits (the least favourable case: the
last layer must be recomputed at 10 positions per patch), ``mult-5x5-digit5`` is a carry-flip read
at answer digit 5, ``sort-20`` a successor-change read at answer step 10 (length-20 lists, 42
tokens). One thread.

Time: both implementations in one fresh process, warmed up, then called alternately (``repeats`` each);
the medians and their ratio. Memory: each implementation in its own fresh process, one call after a
warm-up, measured by `measure.measure_fresh` (peak resident set above the baseline taken right before the
call, and the Python heap's peak from tracemalloc; None below the 1 MiB resolution).
"""

from __future__ import annotations

import statistics
import time

from measure import measure_fresh, run_fresh

METHODS = ("probekit", "transformer_lens")


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


def prepare(method: str, case: str, n: int):
    """The measured call of one implementation (built in the calling process), and facts about the case."""
    import torch
    from scaling import tl_logit_diff

    from probekit.patching import sweep

    model, pair = _setup(case, n)
    if method == "transformer_lens":
        import transformer_lens.patching as tlp

        def go():
            with torch.no_grad():
                _, cache = model.run_with_cache(pair.clean.tokens)
                return tlp.get_act_patch_attn_head_out_by_pos(model, pair.corrupted.tokens, cache, tl_logit_diff(pair))
    else:
        def go():
            return sweep(model, pair, "z", by_pos=True, metric="logit-diff", normalize=False).values
    return go, {"seq_len": pair.clean.seq_len}


def timing(case: str, n: int, repeats: int) -> dict:
    """Both implementations in this process: one warm-up each, then ``repeats`` alternating calls each."""
    calls = {m: prepare(m, case, n)[0] for m in METHODS}
    vals = {m: fn() for m, fn in calls.items()}
    secs = {m: [] for m in METHODS}
    for _ in range(repeats):
        for m, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            secs[m].append(time.perf_counter() - t0)
    diff = float((vals["probekit"] - vals["transformer_lens"]).abs().max())
    return {"seconds": secs, "max_abs_diff": diff, "patches": vals["probekit"].numel()}


def run(quick: bool = False) -> dict:
    cases = [("mult-5x5", 16)] if quick else [("mult-5x5", 64), ("mult-5x5-digit5", 64), ("sort-20", 64)]
    repeats = 1 if quick else 3
    out: dict = {"threads": 1, "repeats": repeats,
                 "what": "head x position hook_z sweep, mean logit-diff (clean vs corrupted answer), "
                 "denoising; mult-5x5: all answer digits; mult-5x5-digit5: carry-flip, digit 5; sort-20: step 10"}
    for case, n in cases:
        t = run_fresh("bench_patching:timing", {"case": case, "n": n, "repeats": repeats})
        med = {m: statistics.median(t["seconds"][m]) for m in METHODS}
        row = {"n": n, "patches": t["patches"], "probekit_s": round(med["probekit"], 3),
               "transformer_lens_s": round(med["transformer_lens"], 3),
               "speedup": round(med["transformer_lens"] / med["probekit"], 2), "max_abs_diff": t["max_abs_diff"],
               "seconds_all": t["seconds"]}
        for m in METHODS:
            mem = measure_fresh("bench_patching:prepare", {"method": m, "case": case, "n": n})
            row["seq_len"] = mem["seq_len"]
            row[f"{m}_peak_rss_mib"] = mem["peak_rss_mib"]
            row[f"{m}_python_heap_peak_mib"] = mem["python_heap_peak_mib"]
            row["memory_method"] = mem["method"]
            for k in ("peak_rss_note", "python_heap_note"):
                if k in mem:
                    row[f"{m}_{k}"] = mem[k]
        out[case] = row
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
