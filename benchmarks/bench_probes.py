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

Each side runs in a fresh process so its peak memory (``ru_maxrss`` growth over its set-up) is its own.
Reported: seconds, speed-up (fit vs fit), test accuracy of each probe and the largest difference.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import tempfile
import time

HOOKS = "resid_pre,resid_mid,resid_post"


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


def _worker(method: str, folder: str, n_train: int, n_test: int, q):
    import torch

    torch.set_num_threads(1)
    model, train, test, tr, te = _data(folder, n_train, n_test)
    X, y, Xt, yt = tr.stacked(), tr.labels, te.stacked(), te.labels
    classes = torch.unique(y)
    out = {"rows_train": int(X.shape[1]), "rows_test": int(Xt.shape[1]), "probes": int(X.shape[0]),
           "d_model": int(X.shape[2]), "classes": len(classes)}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method == "probekit":
        from probekit.probes import fit_logistic, probe_sweep

        yi = torch.searchsorted(classes, y)
        t0 = time.perf_counter()
        W, b, evals = fit_logistic(X, yi[None, None].expand(X.shape[0], 1, -1), torch.ones(X.shape[:2]), len(classes))
        out["fit_seconds"] = time.perf_counter() - t0
        pred = classes[(torch.einsum("gnd,gdk->gnk", Xt, W[:, 0]) + b[:, 0, None]).argmax(-1)]
        out["acc"] = (pred == yt).float().mean(1).tolist()
        out["function_evals"] = evals
        t0 = time.perf_counter()
        sw = probe_sweep(model, train, "carry_out", HOOKS, evals={"test": test}, controls=False)
        out["sweep_seconds"] = time.perf_counter() - t0
        out["sweep_acc"] = sw.values[:, :, 0, 1].reshape(-1).tolist()
    else:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        accs, iters = [], []
        t0 = time.perf_counter()
        with threadpool_limits(1), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for g in range(X.shape[0]):
                clf = LogisticRegression(C=1.0, max_iter=5000).fit(X[g].numpy(), y.numpy())
                accs.append(float(clf.score(Xt[g].numpy(), yt.numpy())))
                iters.append(int(clf.n_iter_[0]))
        out["fit_seconds"] = time.perf_counter() - t0
        out["acc"] = accs
        out["iterations"] = iters
    out["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    q.put(out)


def _spawn(target, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def _train_proc(folder: str, steps: int, q):
    _train_model(folder, steps)
    q.put(True)


def run(quick: bool = False) -> dict:
    # 3x3 multiplication: 6 predicting positions per example -> rows = 6 * examples
    n_train, n_test, steps = (334, 167, 60) if quick else (1667, 834, 400)
    with tempfile.TemporaryDirectory() as tmp:
        folder = f"{tmp}/model"
        _spawn(_train_proc, folder, steps)
        pk = _spawn(_worker, "probekit", folder, n_train, n_test)
        sk = _spawn(_worker, "sklearn", folder, n_train, n_test)
    diff = max(abs(a - b) for a, b in zip(pk["acc"], sk["acc"], strict=True))
    return {
        "case": f"mult-3x3 2-layer d_model 128 (trained {steps} steps), carry_out, {HOOKS} x every layer",
        "probes": pk["probes"], "rows_train": pk["rows_train"], "rows_test": pk["rows_test"], "classes": pk["classes"],
        "probekit_fit_seconds": round(pk["fit_seconds"], 3),
        "probekit_sweep_seconds": round(pk["sweep_seconds"], 3),
        "sklearn_loop_seconds": round(sk["fit_seconds"], 3),
        "speedup_fit": round(sk["fit_seconds"] / pk["fit_seconds"], 1),
        "speedup_end_to_end": round(sk["fit_seconds"] / pk["sweep_seconds"], 1),
        "acc_probekit": [round(a, 4) for a in pk["acc"]],
        "acc_sklearn": [round(a, 4) for a in sk["acc"]],
        "max_acc_diff": round(diff, 4),
        "sklearn_iterations": sk["iterations"],
        "probekit_function_evals": pk["function_evals"],
        "peak_mib_probekit": round(pk["peak_mib"], 1),
        "peak_mib_sklearn": round(sk["peak_mib"], 1),
        "threads": 1,
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
