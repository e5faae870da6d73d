"""Exact edge patching: every edge of a model, batched (`probekit.edges.exact_edges`) vs a naive loop.

The naive loop runs one hooked forward per edge (N rows, `probekit.forward.forward` from the embedding to
the logits at all positions, with an edit that recomputes the receiving head's q/k/v, the MLP, or the
final residual from its input plus the sender's delta). The batched engine runs K = max_batch // N edges as K row
groups per pass, each pass starting at the first layer its edges reach (from the recorded base run), and
computes the last layer and the logits at the metric's read positions only. Both give the same effects
(``max_abs_diff``). Model: the shipped ``sort-baseline`` (2 layers, 4 heads, MLPs, LayerNorm: 110 edges),
a successor-change pair of length-10 lists (22 tokens), metric logit-diff at the changed step. One thread.
"""

from __future__ import annotations

import statistics
import time


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


def run(quick: bool = False) -> dict:
    out = {"threads": 1, "what": "exact effect of all 110 edges of sort-baseline (successor-change, logit-diff)"}
    for n in ([16] if quick else [16, 64]):
        out[f"n{n}"] = timing(n, repeats=1 if quick else 3)
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
