"""Exact edge patching: every edge of a model, batched (`probekit.edges.exact_edges`) vs a naive loop.

The naive loop runs one hooked forward per edge (N rows, `probekit.forward.forward` from the embedding to
the logits at all positions, with an edit that recomputes the receiving head's q/k/v, the MLP, or the
final residual from its input plus the sender's delta). The batched engine runs K = max_batch // N edges as K row
groups per pass, each pass starting at the first layer its edges reach (from the recorded base run), and
computes the last layer and the logits at the metric's read positions only. Both give the same effects
(``max_abs_diff``). Model: the shipped ``sort-baseline`` (2 layers, 4 heads, MLPs, LayerNorm: 110 edges),
a successor-change pair of length-10 lists (22 tokens), metric logit-diff at the changed step. One thread.

Agreement (`agreement`): EAP and EAP-IG (10 steps) scores against the exact effects of every edge, with the
receiver's own norm taken exactly (``norm="exact"``, the default) or linearised with the rest
(``norm="linear"``, the gradient before the norm, as Syed et al. and Hanna et al.). Shipped models, 64 pairs,
seeds 0..4 (seed 0 only with ``--quick``), logit-diff at the pair's default answer steps: sort-baseline with
successor-change and replace (length-10 lists; step 5 and all steps), mult-5x1 with operand-digit (a's units
digit; every answer step, a step whose answer does not change contributes 0) and carry-flip (product digit 3,
its step only). Reported per case: ``spearman`` over *all* edges, signed (the target's definition,
`probekit.edges.spearman`), ``spearman_abs`` (of ``|score|`` vs ``|exact|``), ``pearson``, and
``spearman_top10`` (over the 10 edges of largest ``|exact|`` only: whether the edges that matter are ordered
right, apart from the many near-zero edges whose ranks are noise), plus the forward and backward passes of
the scores (the exact effects are not counted); ``ig_steps``: EAP-IG by number of steps on mult-5x1.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager


def _setup(n: int):
    import torch

    torch.set_num_threads(1)
    from probekit import edges as E
    from probekit.corruptions import corrupt
    from probekit.model import load

    model, task = load("sort-baseline")
    pair = corrupt(task, task.sample(n, length=10, seed=0), "successor-change", seed=0)
    st = E.setup(model, pair, "logit-diff", "noise")
    with torch.no_grad():
        base = E.run_graph(st.nat, st.ws, st.base, st.read)
        src = E.run_graph(st.nat, st.ws, st.src, st.read)
    return st, base, src


def _edge_edit(st, layer_of, site, head, d):
    """A `probekit.forward` edit adding ``d`` to one receiver's input: head q/k/v, MLP, or logits."""
    from probekit import edges as E

    nat, seen = st.nat, {}
    L = layer_of

    def edit(s, layer, act, pos):
        if layer != L:
            return act
        if s in ("resid_pre", "resid_mid"):
            seen[s] = act
        elif site in ("q", "k", "v") and s == site:
            act = act.clone()
            act[:, :, head] = E.head_input(nat.layers[L], st.ws[L], site, seen["resid_pre"] + d, head)
        elif site == "mlp" and s == "mlp_out":
            act = nat.layers[L].mlp(nat.layers[L].ln2(seen["resid_mid"] + d))
        elif site == "logits" and s == "resid_post":
            act = act + d
        return act

    return edit


def naive(st, base, src):
    """One hooked forward per edge (`probekit.forward.forward` with an edit at the receiver), all positions."""
    import torch

    from probekit import forward as F

    delta = torch.stack(src.outs) - torch.stack(base.outs)
    m0 = st.value(base.logits)[0]
    out, nl = [], st.graph.n_layers
    with torch.no_grad():
        for s, j in st.graph.edges:
            r = st.graph.receivers[j]
            L, site = (nl - 1, "logits") if r.kind == "logits" else (r.layer, r.site or "mlp")
            logits = F.forward(st.nat, st.base, _edge_edit(st, L, site, r.head, delta[s]), logits_pos=st.read)
            out.append(float(st.value(logits)[0] - m0))
    return torch.tensor(out)


def timing(n: int = 32, repeats: int = 1, max_batch: int = 512) -> dict:
    from probekit import edges as E

    st, base, src = _setup(n)
    calls = {"batched": lambda: E.exact_edges(st, base, src, max_batch=max_batch), "naive": lambda: naive(st, base, src)}
    vals = {k: f() for k, f in calls.items()}  # warm-up
    secs = {k: [] for k in calls}
    for _ in range(repeats):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            secs[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in secs.items()}
    return {"n": n, "edges": len(st.graph.edges), "max_batch": max_batch, "batched_s": round(med["batched"], 3),
            "naive_s": round(med["naive"], 3), "speedup": round(med["naive"] / med["batched"], 2),
            "max_abs_diff": float((vals["batched"] - vals["naive"]).abs().max()), "seconds_all": secs}


AGREEMENT_CASES = (("sort-baseline", "successor-change", 10), ("sort-baseline", "replace", 10),
                   ("mult-5x1", "operand-digit", None), ("mult-5x1", "carry-flip", None))


@contextmanager
def _counting():
    """Counts of `probekit.edges.run_graph` calls (forwards) and of gradient passes (backwards) inside the block."""
    from probekit import edges as E

    counts = {"forwards": 0, "backwards": 0}
    run_graph, gradients = E.run_graph, E._gradients

    def counted_run(*a, **k):
        counts["forwards"] += 1
        return run_graph(*a, **k)

    def counted_grad(*a, **k):
        counts["backwards"] += 1
        return gradients(*a, **k)

    E.run_graph, E._gradients = counted_run, counted_grad
    try:
        yield counts
    finally:
        E.run_graph, E._gradients = run_graph, gradients


def _stats(scores, exact, k: int = 10) -> dict:
    from scipy.stats import pearsonr, spearmanr

    from probekit import edges as E

    top = exact.abs().argsort(descending=True)[:k]
    return {"spearman": round(E.spearman(scores, exact), 4), "spearman_abs": round(E.spearman(scores.abs(), exact.abs()), 4),
            "pearson": round(float(pearsonr(scores.double(), exact.double()).statistic), 4),
            f"spearman_top{k}": round(float(spearmanr(scores[top], exact[top]).statistic), 4)}


def _pair_setup(name: str, corruption: str, length, seed: int, n: int = 64):
    import torch

    from probekit import edges as E
    from probekit.corruptions import corrupt
    from probekit.model import load

    model, task = load(name)
    model.eval()
    pair = corrupt(task, task.sample(n, length=length, seed=seed), corruption, seed=seed)
    st = E.setup(model, pair, "logit-diff", "noise")
    with torch.no_grad():
        base, src = (E.run_graph(st.nat, st.ws, t, st.read) for t in (st.base, st.src))
    return st, E.exact_edges(st, base, src)


def _agreement_case(name: str, corruption: str, length, seed: int, n: int = 64, steps: int = 10) -> dict:
    from probekit import edges as E

    st, exact = _pair_setup(name, corruption, length, seed, n)
    out = {"edges": len(st.graph.edges), "answer_steps": list(st.bm.metric.steps or []) or "all"}
    for method in E.METHODS:
        for norm in E.NORMS:
            with _counting() as counts:
                scores, _, _ = E.eap(st, method, steps, norm)
            out[f"{method} {norm}"] = {**_stats(scores, exact), **counts}
    return out


def _summary(per_seed: list[dict]) -> dict:
    """Per method and norm: each statistic per seed (``values``) with its mean, min and max; per method, the
    paired difference of ``spearman`` between the norms (exact - linear), seed by seed."""
    out = {}
    for key in [k for k, v in per_seed[0].items() if isinstance(v, dict)]:
        out[key] = {}
        for stat in per_seed[0][key]:
            vals = [d[key][stat] for d in per_seed]
            out[key][stat] = {"values": vals, "mean": round(statistics.mean(vals), 4), "min": min(vals),
                              "max": max(vals)}
    for method in ("eap", "eap-ig"):
        diff = [round(a - b, 4) for a, b in zip(out[f"{method} exact"]["spearman"]["values"],
                                                out[f"{method} linear"]["spearman"]["values"], strict=True)]
        out[f"{method} spearman, exact - linear"] = {"values": diff, "mean": round(statistics.mean(diff), 4),
                                                      "min": min(diff), "max": max(diff)}
    return out


def ig_steps(name: str = "mult-5x1", corruption: str = "operand-digit", seed: int = 0,
             steps: tuple[int, ...] = (1, 5, 10, 50)) -> dict:
    """EAP-IG's Spearman (all edges) against the exact effects by number of steps and norm, one pair."""
    from probekit import edges as E

    st, exact = _pair_setup(name, corruption, None, seed)
    return {"case": f"{name} {corruption}", "seed": seed,
            **{f"steps {k}": {norm: round(E.spearman(E.eap(st, "eap-ig", k, norm)[0], exact), 4) for norm in E.NORMS}
               for k in steps}}


def agreement(quick: bool = False) -> dict:
    """EAP / EAP-IG vs exact edge patching on the shipped models (see the module docstring)."""
    seeds = [0] if quick else list(range(5))
    out = {"n": 64, "steps": 10, "seeds": seeds, "metric": "logit-diff", "direction": "noise",
           "correlation_over": "all edges (spearman, spearman_abs, pearson); the 10 of largest |exact| (spearman_top10)"}
    for name, corruption, length in AGREEMENT_CASES:
        per_seed = [_agreement_case(name, corruption, length, s) for s in seeds]
        out[f"{name} {corruption}"] = {"edges": per_seed[0]["edges"], "answer_steps": per_seed[0]["answer_steps"],
                                       **_summary(per_seed)}
    out["ig_steps"] = ig_steps()
    return out


def run(quick: bool = False) -> dict:
    import torch

    torch.set_num_threads(1)
    out = {"threads": 1, "what": "exact effect of all 110 edges of sort-baseline (successor-change, logit-diff)"}
    for n in ([16] if quick else [16, 64]):
        out[f"n{n}"] = timing(n, repeats=1 if quick else 3)
    out["agreement"] = agreement(quick)
    return out


if __name__ == "__main__":
    import json
    import sys

    quick = "--quick" in sys.argv
    print(json.dumps(agreement(quick) if "--agreement" in sys.argv else run(quick), indent=2))
