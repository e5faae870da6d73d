"""How the cost of each instrument grows: time and peak memory over examples, length, layers, width, patches.

    python benchmarks/scaling.py                 # full sizes -> docs/performance.md, docs/figures/performance/
    python benchmarks/scaling.py --quick --out DIR   # tiny sizes, a smoke test (< 1 minute)

Each curve varies one axis of a base setting (8 examples, sorting lists of length 10 = 22 tokens, 2 layers,
d_model 128, 4 heads, 4 patched positions spread over the sequence; randomly initialised: the cost does not
depend on the weights). Each instrument's curves run in one fresh process (`measure.run_fresh`). Every
implementation is warmed up once at the first size of a curve, then called ``repeats`` times per size,
interleaved (A B A B ...); the time is the median. The first timed call of each implementation is also its
memory call: the kernel's high-water mark is reset right before it (`measure.peak_rss`), so its peak is its
own even though other calls ran before it in the same process.
Growth exponent: the least-squares slope of log(median time) (or log(peak memory)) on log(size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from measure import mib_or_none, peak_rss, run_fresh  # noqa: E402

BASE = {"n": 8, "length": 10, "n_layers": 2, "d_model": 128, "n_heads": 4, "positions": 4}
MODEL_SIZES = [(1, 64), (2, 128), (4, 256), (6, 512)]  # (n_layers, d_model) of the "model" axis
FULL = {"examples": [4, 8, 16, 32], "length": [5, 10, 20, 40], "layers": [1, 2, 4, 6],
        "width": [64, 128, 256, 512], "model": [0, 1, 2, 3], "patches": [2, 4, 8, 22]}
QUICK = {"examples": [2, 4], "length": [3, 5], "layers": [1, 2], "width": [16, 32], "model": [0, 1],
         "patches": [2, 4]}
QUICK_BASE = {"n": 4, "length": 4, "n_layers": 1, "d_model": 32, "n_heads": 4, "positions": None}
QUICK_MODEL_SIZES = [(1, 16), (2, 32)]
QUICK_AXES = ("examples", "model", "patches")  # quick mode: fewer curves, every instrument

# instrument -> (implementations (probekit first), axes, what is timed)
INSTRUMENTS = {
    "patching": (("probekit", "transformer_lens"), ("examples", "length", "layers", "width", "model", "patches"),
                 "head x position hook_z patching sweep (denoising, mean logit-diff at the pair's answer step): "
                 "probekit.patching.sweep vs transformer_lens.patching.generic_activation_patch"),
    "path_patching": (("probekit",), ("examples", "length", "layers", "width", "model"),
                      "probekit.patching.path_patch, every head's direct path to the logits"),
    "probes": (("probekit", "sklearn"), ("examples", "length", "layers", "width", "model"),
               "probes for 'value' at every layer's resid_post, fitted and scored on a held-out batch: "
               "probekit.probes.probe_sweep (controls off) vs run_with_cache + a loop of scikit-learn "
               "LogisticRegression(C=1, lbfgs) fits"),
    "attribution": (("probekit",), ("examples", "length", "layers", "width", "model"),
                    "probekit.attribution.attribution_patching (first order, exact=False, logprob metric)"),
    "decode": (("probekit", "no_cache"), ("examples", "length", "layers", "width", "model"),
               "probekit.evaluate.greedy_decode with its key/value cache vs the same decode by one full "
               "bridge forward per answer token (use_cache=False)"),
    "train_step": (("probekit", "plain_torch"), ("examples", "length", "layers", "width", "model"),
                   "one training step (fused AdamW, answer-only cross-entropy, clipping to norm 1): probekit.train.train "
                   "(the clip factor applied inside the optimizer's kernel) vs a plain PyTorch loop (the same "
                   "optimizer after clip_grad_norm_); per-step time from runs of 1 and 1+k steps"),
}
LABELS = {"probekit": "probekit", "transformer_lens": "TransformerLens patching", "sklearn": "scikit-learn loop",
          "no_cache": "full forward per token", "plain_torch": "plain PyTorch loop"}
X_NAMES = {"examples": "examples", "length": "sequence length (tokens)", "layers": "layers",
           "width": "d_model", "model": "non-embedding parameters", "patches": "patches"}


# ---------------------------------------------------------------------------- settings of one point


def point_settings(axis: str, size, base: dict, model_sizes) -> dict:
    s = dict(base)
    if axis == "examples":
        s["n"] = size
    elif axis == "length":
        s["length"] = size
    elif axis == "layers":
        s["n_layers"] = size
    elif axis == "width":
        s["d_model"] = size
    elif axis == "model":
        s["n_layers"], s["d_model"] = model_sizes[size]
    elif axis == "patches":
        s["positions"] = size
    return s


def _task():
    from probekit.tasks import SortingTask

    return SortingTask(n_values=16)


def _model(s: dict, task):
    from probekit.model import ModelConfig, build_model

    cfg = ModelConfig(n_layers=s["n_layers"], d_model=s["d_model"], n_heads=s["n_heads"], d_vocab=task.d_vocab,
                      n_ctx=2 * s["length"] + 8, positional="learned", seed=0)
    return build_model(cfg), cfg


def nonembedding_params(cfg) -> int:
    d, hd = cfg.d_model, cfg.n_heads * cfg.head_dim
    mlp = 0 if cfg.attn_only else 2 * d * cfg.mlp_dim
    return cfg.n_layers * (4 * d * hd + mlp) + d * cfg.d_vocab


# ---------------------------------------------------------------------------- required work (multiply-adds)


def _layer_costs(cfg) -> dict:
    d, hd = cfg.d_model, cfg.n_heads * cfg.head_dim
    return {"q": d * hd, "kv": 2 * d * hd, "o": hd * d, "mlp": 0 if cfg.attn_only else 2 * d * cfg.mlp_dim,
            "attn_per_key": 2 * hd, "unembed": d * cfg.d_vocab, "o_head": cfg.head_dim * d}


def forward_macs(cfg, T: int, read: list[int]) -> int:
    """Multiply-adds of one forward of one sequence, logits only at the positions ``read``."""
    c = _layer_costs(cfg)
    per_layer = T * (c["q"] + c["kv"] + c["o"] + c["mlp"]) + c["attn_per_key"] * T * (T + 1) // 2
    return cfg.n_layers * per_layer + len(read) * c["unembed"]


def z_patch_macs(cfg, T: int, read: list[int], layer: int, pos: int) -> int:
    """Multiply-adds that patching one head's z at (layer, pos) requires for one sequence, read at ``read``.

    Only what changes and is needed is counted: the head's W_O term and the MLP at ``pos``; in each later
    layer the keys/values of the changed positions ``pos..max(read)`` and the queries, attention, W_O and MLP
    at the positions still needed (all of ``pos..max(read)``, in the last layer only the read positions);
    the unembedding of the read positions at or after ``pos``. Layer norms are left out.
    """
    c, last, rmax = _layer_costs(cfg), cfg.n_layers - 1, max(read)
    if pos > rmax or (layer == last and pos not in read):
        return 0
    macs = c["o_head"] + c["mlp"]
    for _ in range(layer + 1, cfg.n_layers):
        macs += (rmax - pos + 1) * c["kv"]
    for lyr in range(layer + 1, cfg.n_layers):
        queries = [q for q in read if q >= pos] if lyr == last else range(pos, rmax + 1)
        macs += sum(c["q"] + c["attn_per_key"] * (q + 1) + c["o"] + c["mlp"] for q in queries)
    return macs + sum(c["unembed"] for q in read if q >= pos)


def sweep_flops(cfg, n: int, T: int, read: list[int], positions: list[int]) -> float:
    """Floating-point operations (2 per multiply-add) a z sweep over ``positions`` x layers x heads requires."""
    per_seq = 2 * forward_macs(cfg, T, read)  # the clean and the corrupted run
    per_seq += cfg.n_heads * sum(z_patch_macs(cfg, T, read, L, p) for L in range(cfg.n_layers) for p in positions)
    return 2.0 * n * per_seq


def train_step_flops(cfg, n: int, T: int, n_answer: int) -> float:
    """~6 x parameters x tokens for the matrix products, plus attention (3 x forward), logits at answers only."""
    c = _layer_costs(cfg)
    body = cfg.n_layers * (c["q"] + c["kv"] + c["o"] + c["mlp"])
    attn = cfg.n_layers * c["attn_per_key"] * T * (T + 1) // 2
    return 6.0 * n * (T * body + attn + n_answer * c["unembed"])


def matmul_gflops(size: int = 2048, repeats: int = 5) -> dict:
    """The machine's own float32 matmul throughput (torch.matmul of two size x size matrices), GFLOP/s."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        ts.append(time.perf_counter() - t0)
    return {"size": size, "threads": torch.get_num_threads(), "seconds_median": statistics.median(ts),
            "gflops": round(2 * size**3 / statistics.median(ts) / 1e9, 2)}


# ---------------------------------------------------------------------------- the calls of each instrument


def _sort_pair(s: dict, task, seed: int = 0):
    from probekit.corruptions import corrupt

    return corrupt(task, task.sample(s["n"], length=s["length"], seed=seed), "successor-change", seed=seed)


def _read_positions(pair) -> list[int]:
    pred = torch_nonzero(pair.clean.pred_mask[0])
    steps = pair.answer_steps if pair.answer_steps is not None else range(len(pred))
    return [pred[k] for k in steps]


def torch_nonzero(mask) -> list[int]:
    return [int(i) for i in mask.nonzero().flatten()]


def _positions(s: dict, T: int) -> list[int]:
    """The patched positions: all, or ``positions`` of them spread evenly over the sequence."""
    k = T if s["positions"] is None else min(int(s["positions"]), T)
    if k >= T:
        return list(range(T))
    return sorted({round(i * (T - 1) / (k - 1)) for i in range(k)}) if k > 1 else [T - 1]


def tl_logit_diff(pair):
    """The mean logit difference (clean vs corrupted answer token at the pair's read positions), as a
    ``transformer_lens.patching`` metric: full logits -> scalar."""
    read = _read_positions(pair)
    nxt = [r + 1 for r in read]
    correct, wrong = pair.clean.tokens[:, nxt], pair.corrupted.tokens[:, nxt]

    def metric(logits):
        lg = logits[:, read]
        return (lg.gather(-1, correct[..., None]) - lg.gather(-1, wrong[..., None])).mean()

    return metric


def calls_patching(s: dict) -> tuple[dict, dict]:
    import pandas as pd
    import torch
    import transformer_lens.patching as tlp

    from probekit.patching import sweep

    task = _task()
    model, cfg = _model(s, task)
    pair = _sort_pair(s, task)
    T, read = pair.clean.seq_len, _read_positions(pair)
    Ps = _positions(s, T)
    rows = [(L, p, h) for L in range(cfg.n_layers) for p in Ps for h in range(cfg.n_heads)]
    df = pd.DataFrame(rows, columns=["layer", "pos", "head_index"])
    metric = tl_logit_diff(pair)

    def ours():
        return sweep(model, pair, "z", by_pos=True, positions=Ps, metric="logit-diff", normalize=False).values.flatten()

    def tl():
        with torch.no_grad():
            _, cache = model.run_with_cache(pair.clean.tokens)
            return tlp.generic_activation_patch(model, pair.corrupted.tokens, cache, metric,
                                                tlp.layer_pos_head_vector_patch_setter, "z", index_df=df)

    info = {"seq_len": T, "patches": len(rows), "read_positions": read, "params": nonembedding_params(cfg),
            "flops_required": sweep_flops(cfg, s["n"], T, read, Ps)}
    return {"probekit": ours, "transformer_lens": tl}, info


def calls_path_patching(s: dict) -> tuple[dict, dict]:
    from probekit.patching import path_patch

    task = _task()
    model, cfg = _model(s, task)
    pair = _sort_pair(s, task)
    return ({"probekit": lambda: path_patch(model, pair, "logits", normalize=False).values},
            {"seq_len": pair.clean.seq_len, "patches": cfg.n_layers * cfg.n_heads, "params": nonembedding_params(cfg)})


def calls_probes(s: dict) -> tuple[dict, dict]:
    import warnings

    import numpy as np
    import torch

    from probekit.probes import probe_sweep

    task = _task()
    model, cfg = _model(s, task)
    # probes fit on 8 x n examples (rows: one per input element) and are scored on 4 x n fresh ones
    train, test = task.sample(8 * s["n"], length=s["length"], seed=0), task.sample(4 * s["n"], length=s["length"], seed=1)
    names = [f"blocks.{L}.hook_resid_post" for L in range(cfg.n_layers)]

    def ours():
        sw = probe_sweep(model, train, "value", "resid_post", evals={"test": test}, controls=False)
        return sw.values[0, :, 0, 1]

    def rows(batch):
        with torch.no_grad():
            _, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n in names)
        keep = batch.features["value"] >= 0
        return [cache[nm][keep].numpy() for nm in names], batch.features["value"][keep].numpy()

    def sk():
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        (Xs, y), (Xts, yt) = rows(train), rows(test)
        accs = []
        with threadpool_limits(1), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for X, Xt in zip(Xs, Xts, strict=True):
                accs.append(float(LogisticRegression(C=1.0, max_iter=1000).fit(X, y).score(Xt, yt)))
        return np.array(accs)

    n_rows = int((train.features["value"] >= 0).sum())
    return {"probekit": ours, "sklearn": sk}, {"seq_len": train.seq_len, "rows_train": n_rows,
                                               "probes": cfg.n_layers, "params": nonembedding_params(cfg)}


def calls_attribution(s: dict) -> tuple[dict, dict]:
    from probekit.attribution import attribution_patching

    task = _task()
    model, cfg = _model(s, task)
    pair = _sort_pair(s, task)
    return ({"probekit": lambda: attribution_patching(model, pair.clean, pair.corrupted, metric="logprob",
                                                      exact=False).heads},
            {"seq_len": pair.clean.seq_len, "params": nonembedding_params(cfg)})


def calls_decode(s: dict) -> tuple[dict, dict]:
    from probekit.evaluate import greedy_decode

    task = _task()
    model, cfg = _model(s, task)
    batch = task.sample(s["n"], length=s["length"], seed=0)
    return ({"probekit": lambda: greedy_decode(model, batch, use_cache=True),
             "no_cache": lambda: greedy_decode(model, batch, use_cache=False)},
            {"seq_len": batch.seq_len, "params": nonembedding_params(cfg)})


def plain_train(cfg, task, tc):
    """The plain PyTorch peer of `probekit.train`: same batches, forward, answer-only loss, fused AdamW and
    ``clip_grad_norm_``."""
    import torch
    import torch.nn.functional as F

    from probekit.model import build_model
    from probekit.train import batch_seed, step_length

    model = build_model(cfg).original_model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr, betas=(0.9, 0.98),
                            fused=True)  # the optimizer probekit.train uses
    for step in range(tc.steps):
        b = task.sample(tc.batch_size, length=step_length(tc, step), seed=batch_seed(tc.seed, step))
        logits = model(b.tokens)
        mask = b.answer_mask[:, 1:]
        loss = F.cross_entropy(logits[:, :-1][mask], b.tokens[:, 1:][mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def calls_train_step(s: dict, extra_steps: int = 8) -> tuple[dict, dict]:
    from probekit.model import ModelConfig
    from probekit.train import TrainConfig, train

    task = _task()
    cfg = ModelConfig(n_layers=s["n_layers"], d_model=s["d_model"], n_heads=s["n_heads"], d_vocab=task.d_vocab,
                      n_ctx=2 * s["length"] + 8, positional="learned", seed=0)

    def tc(steps):
        return TrainConfig(steps=steps, batch_size=s["n"], lengths=(s["length"], s["length"]), warmup_steps=1,
                           log_every=10**6, checkpoint_every=10**9)

    calls = {}
    for k in (1, 1 + extra_steps):
        calls[f"probekit@{k}"] = lambda k=k: train(cfg, task, tc(k), progress=False)
        calls[f"plain_torch@{k}"] = lambda k=k: plain_train(cfg, task, tc(k))
    T = 2 * s["length"] + 2
    info = {"seq_len": T, "extra_steps": extra_steps, "params": nonembedding_params(cfg),
            "flops_required": train_step_flops(cfg, s["n"], T, s["length"])}
    return calls, info


CALLS = {"patching": calls_patching, "path_patching": calls_path_patching, "probes": calls_probes,
         "attribution": calls_attribution, "decode": calls_decode, "train_step": calls_train_step}


# ---------------------------------------------------------------------------- one curve (runs in a fresh process)


def _max_abs_diff(a, b) -> float | None:
    import numpy as np

    try:
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    except (TypeError, ValueError):
        return None
    return float(np.nanmax(np.abs(a - b))) if a.shape == b.shape and a.size else None


def _measure_point(calls: dict, repeats: int, warmup: bool) -> tuple[dict, float | None]:
    if warmup:
        for fn in calls.values():
            fn()
    out = {name: {"seconds": []} for name in calls}
    first = []
    for r in range(repeats):
        for name, fn in calls.items():
            if r == 0:
                res, secs, rss, method = peak_rss(fn)
                first.append(res)
                out[name]["peak_rss_mib"], note = mib_or_none(rss)
                out[name]["memory_method"] = method
                if note:
                    out[name]["peak_rss_note"] = note
            else:
                t0 = time.perf_counter()
                fn()
                secs = time.perf_counter() - t0
            out[name]["seconds"].append(secs)
    for v in out.values():
        v["seconds_median"] = statistics.median(v["seconds"])
    return out, (_max_abs_diff(first[0], first[1]) if len(first) == 2 else None)


def _per_step(arms: dict, extra: int) -> dict:
    """Training: per-step time = (median time of 1+k steps - median time of 1 step) / k."""
    res = {}
    for impl in ("probekit", "plain_torch"):
        one, many = arms[f"{impl}@1"], arms[f"{impl}@{1 + extra}"]
        diff = many["seconds_median"] - one["seconds_median"]
        res[impl] = {"seconds_median": diff / extra if diff > 0.1 * many["seconds_median"] else None,
                     "seconds_runs": {"1_step": one["seconds"], f"{1 + extra}_steps": many["seconds"]},
                     "peak_rss_mib": many.get("peak_rss_mib"), "memory_method": many.get("memory_method")}
        if res[impl]["seconds_median"] is None:
            res[impl]["seconds_note"] = f"{extra} more steps did not take 10 % longer than 1: set-up noise dominates"
        if "peak_rss_note" in many:
            res[impl]["peak_rss_note"] = many["peak_rss_note"]
    return res


def run_curve(instrument: str, axis: str, sizes: list, base: dict, model_sizes: list, repeats: int,
              threads: int, extra_steps: int = 4) -> dict:
    import torch

    torch.set_num_threads(threads)
    points = []
    for i, size in enumerate(sizes):
        s = point_settings(axis, size, base, model_sizes)
        kw = {"extra_steps": extra_steps} if instrument == "train_step" else {}
        calls, info = CALLS[instrument](s, **kw)
        arms, diff = _measure_point(calls, repeats, warmup=(i == 0))
        if instrument == "train_step":
            arms = _per_step(arms, extra_steps)
        else:
            info["max_abs_diff_probekit_vs_peer"] = diff
        x = {"examples": s["n"], "length": info["seq_len"], "layers": s["n_layers"], "width": s["d_model"],
             "model": info["params"], "patches": info.get("patches")}[axis]
        points.append({"size": size, "x": x, "settings": s, "info": info, "arms": arms})
    return {"instrument": instrument, "axis": axis, "points": points}


# ---------------------------------------------------------------------------- fits, fractions, report


def slope(xs: list[float], ys: list[float | None]) -> float | None:
    """Least-squares slope of log(y) on log(x); None unless every y is a positive number (and >= 2 points)."""
    if len(xs) < 2 or any(y is None or y <= 0 for y in ys) or len(set(xs)) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return round(sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx), 3)


def summarize(curve: dict, peak_gflops: float) -> dict:
    impls = INSTRUMENTS[curve["instrument"]][0]
    pts, xs = curve["points"], [p["x"] for p in curve["points"]]
    fits = {}
    for impl in impls:
        t = [p["arms"][impl]["seconds_median"] for p in pts]
        m = [p["arms"][impl].get("peak_rss_mib") for p in pts]
        fits[impl] = {"time_exponent": slope(xs, t), "memory_exponent": slope(xs, m),
                      "memory_exponent_note": None if slope(xs, m) is not None else
                      "not fitted: some peaks were below the resolution"}
        for p in pts:
            flops = p["info"].get("flops_required")
            if flops and p["arms"][impl]["seconds_median"]:
                g = flops / p["arms"][impl]["seconds_median"] / 1e9
                p["arms"][impl]["gflops_achieved"] = float(f"{g:.4g}")
                p["arms"][impl]["fraction_of_matmul"] = float(f"{g / peak_gflops:.4g}")
    if len(impls) > 1:
        for p in pts:
            peer, ours = p["arms"][impls[1]]["seconds_median"], p["arms"]["probekit"]["seconds_median"]
            p["ratio_peer_over_probekit"] = round(peer / ours, 3) if peer and ours else None
    curve["fit"] = {"x": X_NAMES[curve["axis"]], "x_range": [min(xs), max(xs)], "points": len(xs), **fits}
    return curve


def machine_info(threads: int) -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    cfg = torch.__config__.show()
    blas = [ln.strip(" -") for ln in cfg.splitlines() if ln.strip().startswith(("- Intel", "- OpenMP", "- LAPACK",
                                                                                "- CPU capability", "- oneDNN"))]
    blas += [kv.strip() for kv in cfg.split(",") if kv.strip().startswith(("BLAS_INFO=", "LAPACK_INFO="))]
    try:
        from threadpoolctl import threadpool_info

        pools = [{k: p.get(k) for k in ("internal_api", "num_threads", "version", "architecture")}
                 for p in threadpool_info()]
    except ImportError:
        pools = None
    return {"cpu_model": cpu, "cores_os": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()], "torch_threads": threads,
            "python": platform.python_version(), "torch": torch.__version__, "torch_blas": blas, "torch_config": cfg,
            "threadpools": pools, "platform": platform.platform()}


def run_all(quick: bool, repeats: int | None = None, threads: int = 1, only: list[str] | None = None,
            log=print) -> dict:
    import torch

    torch.set_num_threads(threads)
    sizes, base, ms = (QUICK, QUICK_BASE, QUICK_MODEL_SIZES) if quick else (FULL, BASE, MODEL_SIZES)
    repeats = repeats or (1 if quick else 3)
    t_start = time.time()
    res = {"mode": "quick" if quick else "full", "machine": machine_info(threads),
           "matmul": matmul_gflops(256 if quick else 2048), "repeats": repeats, "base": base,
           "model_sizes": ms, "instruments": {k: v[2] for k, v in INSTRUMENTS.items()}, "curves": []}
    jobs = [(ins, ax) for ins, (_, axes, _) in INSTRUMENTS.items() if not only or ins in only for ax in axes
            if not quick or ax in QUICK_AXES]
    kw = {"base": base, "model_sizes": ms, "repeats": repeats, "threads": threads, "extra_steps": 20 if quick else 8}
    groups = [jobs] if quick else [[j for j in jobs if j[0] == ins] for ins in dict.fromkeys(j[0] for j in jobs)]
    curves = []
    for group in groups:  # one fresh process per instrument (quick: one for all, start-up would dominate)
        t0 = time.time()
        curves += run_fresh("scaling:_run_curves", {"jobs": [[i, a, sizes[a]] for i, a in group], **kw})
        log(f"{', '.join(dict.fromkeys(i for i, _ in group))}: {time.time() - t0:.1f} s")
    res["curves"] = [summarize(c, res["matmul"]["gflops"]) for c in curves]
    res["total_seconds"] = round(time.time() - t_start, 1)
    return res


def _run_curves(jobs: list, **kw) -> list:
    return [run_curve(ins, ax, sz, **kw) for ins, ax, sz in jobs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, < 1 minute)")
    ap.add_argument("--out", default=None, help="folder for scaling.json, performance.md and figures/ "
                    "(default: bench/ for the JSON, docs/ for the page and figures; quick: bench/scaling-quick)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated instruments")
    args = ap.parse_args(argv)
    res = run_all(args.quick, args.repeats, args.threads, args.only.split(",") if args.only else None)
    from scaling_report import write_report

    if args.out is None and not args.quick:
        json_path, md_path, fig_dir = ROOT / "bench/scaling.json", ROOT / "docs/performance.md", \
            ROOT / "docs/figures/performance"
    else:
        out = Path(args.out or ROOT / "bench/scaling-quick")
        json_path, md_path, fig_dir = out / "scaling.json", out / "performance.md", out / "figures"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=1))
    write_report(res, md_path, fig_dir)
    print(f"wrote {json_path}, {md_path}, {fig_dir}/ in {res['total_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
