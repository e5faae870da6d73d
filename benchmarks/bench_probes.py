"""Probes for every layer's resid_pre / resid_mid / resid_post: probekit's batched fit vs a loop of scikit-learn.

Model: a 2-layer, d_model 128 multiplication model (3x3 digits, reversed product) trained for a few
hundred steps here (so its activations are those of a trained model, not of a random one). Feature:
``carry_out`` at the predicting positions (up to 21 classes). Train on ~10k rows (positions), test
on ~5k rows of a fresh sample. Both sides fit the same activations, one thread each:

- probekit: `fit_logistic` on the stacked ``[6, rows, d_model]`` tensor (one L-BFGS run for all probes),
  and the whole `probe_sweep` (activation collection + fit + scoring, controls off) end to end;
- scikit-learn: ``LogisticRegression(C=1, max_iter=5000)`` (the same objective) fitted once per (hook, layer),
  in a loop. With the common ``max_iter=1000`` it stops unconverged on these activations, about 1.5 points
  below the optimum both sides share; its iteration counts are reported.

Time: the three calls (probekit fit, scikit-learn loop, probekit sweep end to end) in one fresh process, each
warmed up, then called alternately ``repeats`` times; medians and their ratios. Memory: each call in its own
fresh process after a warm-up, by `measure.measure_fresh` (peak resident set above the baseline taken right
before the call, and tracemalloc's Python-heap peak; None below the 1 MiB resolution).
Reported: seconds, speed-up (fit vs fit), test accuracy of each probe and the largest difference.
"""

from __future__ import annotations

import tempfile
import time

from measure import measure_fresh, run_fresh

HOOKS = "resid_pre,resid_mid,resid_post"
METHODS = ("probekit", "sklearn", "probekit_sweep")


def _task():
    from probekit.tasks import MultiplicationTask

    return MultiplicationTask(digits=3, b_digits=3)


def _train_model(folder: str, steps: int) -> None:
    import torch

    torch.set_num_threads(1)
    from probekit.model import ModelConfig
    from probekit.train import TrainConfig, train

    task = _task()
    cfg = ModelConfig(n_layers=2, d_model=128, n_heads=4, d_vocab=task.d_vocab, n_ctx=32, positional="learned", seed=0)
    train(cfg, task, TrainConfig(steps=steps, batch_size=64, lengths=(3, 3), lr=3e-3, warmup_steps=30),
          out=folder, name="bench-mult-3x3", overwrite=True, progress=False)


def _data(folder: str, n_train: int, n_test: int):
    from probekit.activations import collect
    from probekit.model import load_model

    model, task, _ = load_model(folder)
    train, test = task.sample(n_train, seed=0), task.sample(n_test, seed=1)
    tr = collect(model, train, HOOKS, feature="carry_out")
    te = collect(model, test, HOOKS, feature="carry_out")
    return model, train, test, tr, te


def prepare(method: str, folder: str, n_train: int, n_test: int):
    """The fit of one side (``probekit``, ``sklearn``, or ``probekit_sweep``: collection + fit + scoring) on
    this process's activations, as a zero-argument call returning what it measured; and the data's shape."""
    import torch

    torch.set_num_threads(1)
    model, train, test, tr, te = _data(folder, n_train, n_test)
    X, y, Xt, yt = tr.stacked(), tr.labels, te.stacked(), te.labels
    classes = torch.unique(y)
    info = {"rows_train": int(X.shape[1]), "rows_test": int(Xt.shape[1]), "probes": int(X.shape[0]),
            "d_model": int(X.shape[2]), "classes": len(classes)}
    if method == "probekit":
        from probekit.probes import fit_logistic

        yi = torch.searchsorted(classes, y)

        def go():
            W, b, evals = fit_logistic(X, yi[None, None].expand(X.shape[0], 1, -1), torch.ones(X.shape[:2]),
                                       len(classes))
            pred = classes[(torch.einsum("gnd,gdk->gnk", Xt, W[:, 0]) + b[:, 0, None]).argmax(-1)]
            return {"acc": (pred == yt).float().mean(1).tolist(), "function_evals": evals}
    elif method == "probekit_sweep":
        from probekit.probes import probe_sweep

        def go():
            sw = probe_sweep(model, train, "carry_out", HOOKS, evals={"test": test}, controls=False)
            return {"acc": sw.values[:, :, 0, 1].reshape(-1).tolist()}
    else:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        def go():
            accs, iters = [], []
            with threadpool_limits(1), warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                for g in range(X.shape[0]):
                    clf = LogisticRegression(C=1.0, max_iter=5000).fit(X[g].numpy(), y.numpy())
                    accs.append(float(clf.score(Xt[g].numpy(), yt.numpy())))
                    iters.append(int(clf.n_iter_[0]))
            return {"acc": accs, "iterations": iters}
    return go, info


def timing(folder: str, n_train: int, n_test: int, repeats: int) -> dict:
    """The three calls in this process: one warm-up each, then ``repeats`` alternating calls each."""
    import statistics

    calls = {m: prepare(m, folder, n_train, n_test) for m in METHODS}
    out = {m: {"result": fn(), "seconds": []} for m, (fn, _) in calls.items()}
    for _ in range(repeats):
        for m, (fn, _) in calls.items():
            t0 = time.perf_counter()
            fn()
            out[m]["seconds"].append(time.perf_counter() - t0)
    for v in out.values():
        v["median"] = statistics.median(v["seconds"])
    out["info"] = calls["probekit"][1]
    return out


def run(quick: bool = False) -> dict:
    # 3x3 multiplication: 6 predicting positions per example -> rows = 6 * examples
    n_train, n_test, steps = (334, 167, 60) if quick else (1667, 834, 400)
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        folder = f"{tmp}/model"
        run_fresh("bench_probes:_train_model", {"folder": folder, "steps": steps})
        t = run_fresh("bench_probes:timing", {"folder": folder, "n_train": n_train, "n_test": n_test,
                                              "repeats": repeats})
        mem = {m: measure_fresh("bench_probes:prepare", {"method": m, "folder": folder, "n_train": n_train,
                                                         "n_test": n_test}) for m in METHODS}
    pk, sk, sw = (t[m]["result"] for m in METHODS)
    diff = max(abs(a - b) for a, b in zip(pk["acc"], sk["acc"], strict=True))
    info = t["info"]
    res = {
        "case": f"mult-3x3 2-layer d_model 128 (trained {steps} steps), carry_out, {HOOKS} x every layer",
        "probes": info["probes"], "rows_train": info["rows_train"], "rows_test": info["rows_test"],
        "classes": info["classes"], "repeats": repeats,
        "probekit_fit_seconds": round(t["probekit"]["median"], 3),
        "probekit_sweep_seconds": round(t["probekit_sweep"]["median"], 3),
        "sklearn_loop_seconds": round(t["sklearn"]["median"], 3),
        "speedup_fit": round(t["sklearn"]["median"] / t["probekit"]["median"], 1),
        "speedup_end_to_end": round(t["sklearn"]["median"] / t["probekit_sweep"]["median"], 1),
        "acc_probekit": [round(a, 4) for a in pk["acc"]],
        "acc_sklearn": [round(a, 4) for a in sk["acc"]],
        "acc_probekit_sweep": [round(a, 4) for a in sw["acc"]],
        "max_acc_diff": round(diff, 4),
        "sklearn_iterations": sk["iterations"],
        "probekit_function_evals": pk["function_evals"],
        "memory_method": mem["probekit"]["method"],
        "threads": 1,
    }
    for m in METHODS:
        res[f"peak_rss_mib_{m}"] = mem[m]["peak_rss_mib"]
        res[f"python_heap_peak_mib_{m}"] = mem[m]["python_heap_peak_mib"]
        for k in ("peak_rss_note", "python_heap_note"):
            if k in mem[m]:
                res[f"{k}_{m}"] = mem[m][k]
    return res


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
