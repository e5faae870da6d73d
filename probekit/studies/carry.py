"""The carry study: a causal account of how multiplication models carry, and which part of it survives longer
operands than trained.

Each part is a stage below; every mechanism number has a bootstrap 95 % interval over examples, and every
hypothesis is written before its measurement and judged from that interval (`Study.test`).

1. **The staircase** (``staircase``, default ``mult-5x1``). For each attention head: how much attention it puts on
   the column's digit of a (``a_k``), on b's digit (``b_0``) and on the digit of a below the column
   (``a_{k-1}``, where the carry comes from), over what uniform attention would put there (description); and
   what it does (cause): the share of digit k's logit difference its clean output restores when patched into
   a run whose carry into digit k was flipped (``carry-flip``) or whose own column digit changed with the carry
   kept (``column-digit``). Heads are chosen by patching on half of the examples and measured on the other half.
2. **Where the carry is computed**: distributed alignment search for the carry into digit k (column sum held)
   at each residual site of the answer step, against a random subspace of the same size and the full-vector
   interchange (`probekit.interventions`).
3. **What is readable**: a ``carry_in`` probe, its site chosen on a validation split among sites that beat the
   control task, scored on a held-out test split at the training length next to the majority-class and
   input-token baselines.
4. **What the carry head is needed for**: the head mean-ablated, teacher-forced accuracy on the digits that need
   a carry against the digits that do not.
5. **The circuit** (``circuit``, default ``mult-3x3``): edges ranked by their effect under carry-flip, the
   faithfulness curve and the smallest circuit keeping 90 % (`probekit.edges`), re-measured on held-out pairs
   with its complement.
6. **Transfer** (``extrapolating``, ``failing``: models trained on a range of lengths): the carry head chosen at
   the longest trained length, its attention on the lower digit, its restoration and the DAS carry subspace,
   at that length and at unseen ones.

Models that are not shipped are skipped with a note.
"""

from __future__ import annotations

import numpy as np
import torch

from probekit.results import Result
from probekit.stats import Hypothesis, Verdict, bootstrap_ci, ratio_of_means, two_sample_bootstrap
from probekit.studies.common import Study, _begin, _load, _metrics, _num, _pct, _size

PLANS = {  # per study size: digits measured (None: every digit with a lower digit of a), DAS, probes, edges, lengths
    "quick": {"digits": (2, 3), "das_digits": (2,), "das_sites": ("resid_pre", "resid_mid"), "das_pairs": 48,
              "das_steps": 5, "das_batch": 32, "probe_share": 0.5, "edges_n": 8, "exact": False, "refine": 8,
              "unseen": (1,)},
    "default": {"digits": None, "das_digits": None, "das_sites": ("resid_pre", "resid_mid", "resid_post"),
                "das_pairs": 1000, "das_steps": 200, "das_batch": 128, "probe_share": 1.0, "edges_n": 128,
                "exact": True, "refine": 256, "unseen": (1, 3, 5)},
    "full": {"digits": None, "das_digits": None, "das_sites": ("resid_pre", "resid_mid", "resid_post"),
             "das_pairs": 2000, "das_steps": 300, "das_batch": 128, "probe_share": 1.0, "edges_n": 256, "exact": True,
             "refine": 256, "unseen": (1, 3, 5)},
}
DAS_K = 4  # dimensions of the DAS subspace
TARGETS = ("a_k", "b_0", "a_(k-1)")  # operand digits relative to the column k being written
N_BOOT = 1000


def carry_study(size: str = "default", seed: int = 0, staircase: str = "mult-5x1", circuit: str = "mult-3x3",
                extrapolating: str = "mult-nx1-place", failing: str = "mult-nx1-learned-pos-rev") -> Study:
    """The carry, causally (module docstring): the staircase of ``staircase``, where its carry is computed,
    what is readable, what its carry head is needed for; the circuit of ``circuit``; and what transfers to
    unseen lengths in ``extrapolating`` and ``failing``. Missing models are skipped with a note."""
    sz, plan = _size(size), PLANS[size]
    st, have, cmd = _begin("carry", "Carry mechanism: multiplication", (staircase, circuit, extrapolating, failing),
                           size)
    for name in (staircase, circuit, extrapolating, failing):
        if name not in have:
            st.notes.append(f"{name} is not shipped: its part of the carry study is skipped")
    facts: dict = {}
    if staircase in have:
        facts["staircase"] = _staircase_model(st, staircase, plan, sz, seed, cmd)
    if circuit in have:
        facts["circuit"] = _circuit(st, circuit, plan, seed, cmd)
    transfer = {}
    for role, name in (("extrapolating", extrapolating), ("failing", failing)):
        if name in have:
            model, task, conf = _load(name)
            transfer[name] = _transfer_model(st, role, name, model, task, _trained(conf, task), plan, sz, seed, cmd)
    if any(transfer.values()):
        _transfer_figure(st, {k: v for k, v in transfer.items() if v})
    facts["transfer"] = transfer
    st.headline = _headline(facts)
    return st


def _trained(conf: dict, task) -> tuple[int, int]:
    lo, hi = (conf.get("train") or {}).get("lengths") or [task.digits, task.digits]
    return int(lo), int(hi)


def _digits(task, length: int, wanted) -> list[int]:
    """Product digits k with both a_k and a_(k-1) in a (1 .. width of a - 1), restricted to ``wanted``."""
    ks = list(range(1, task.widths(length)[0]))
    return ks if wanted is None else [k for k in ks if k in wanted]


def _heads(model) -> list[tuple[int, int]]:
    return [(L, h) for L in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


def _label(head: tuple[int, int]) -> str:
    return f"L{head[0]}H{head[1]}"


def _ci(rows, statistic, seed: int, groups=None) -> tuple[float, float, float]:
    return bootstrap_ci(np.asarray(rows, dtype=float), statistic, n_boot=N_BOOT, seed=seed, groups=groups)


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x))


def _split(t: tuple[float, float, float]) -> tuple[float, tuple[float, float]]:
    """``(estimate, lo, hi)`` -> ``(estimate, (lo, hi))``, the effect and interval of `Study.test`."""
    return t[0], (t[1], t[2])


def _interval_result(kind: str, cells, axes: tuple[str, str], labels: dict, settings: dict) -> Result:
    """A 2-D Result of estimates with their 95 % intervals (``extra`` lo / hi): ``cells[i][j] = (estimate, lo, hi)``."""
    t = torch.tensor([[[float(x) for x in c] for c in row] for row in cells])
    return Result(kind=kind, values=t[..., 0], axes=axes, labels=labels, settings=settings,
                  extra={"lo": t[..., 1], "hi": t[..., 2]})


# ---------------------------------------------------------------------------- 1. the staircase


def _staircase_model(st: Study, name: str, plan: dict, sz: dict, seed: int, cmd: str) -> dict:
    """Parts 1-4 on the staircase model (trained on one length): heads, DAS, probe, ablation."""
    model, task, conf = _load(name)
    L = _trained(conf, task)[1]
    digits = _digits(task, L, plan["digits"])
    att = _attention(model, task.sample(sz["n"], length=L, seed=seed + 11), digits, seed)
    st.results[f"{name}/attention"] = att
    rest = {kind: _restoration_rows(model, task, L, kind, digits, _heads(model), sz["n_patch"], seed)
            for kind in ("carry-flip", "column-digit")}
    heads = _staircase_claims(st, name, att, rest, seed, cmd)
    das = _where_computed(st, name, model, task, L, heads["carry"], plan, seed, cmd)
    _readable(st, name, model, task, L, plan, sz, seed, cmd)
    abl = _ablation(st, name, model, task, L, heads["carry"], sz, seed, cmd)
    _staircase_figures(st, name, heads, das, abl)
    return {"name": name, **heads, "das": das, "ablation": abl}


def _attention(model, batch, digits: list[int], seed: int, heads=None) -> Result:
    """Each head's (or each of ``heads``') attention on a_k, b_0 and a_(k-1) at the steps writing ``digits``, over
    the uniform share of the visible keys (`probekit.stats.chance_normalised_attention`), split by whether the
    digit needs a carry."""
    from probekit.stats import chance_normalised_attention

    heads = _heads(model) if heads is None else list(heads)
    q, masks, carry = _queries(batch, digits)
    names = {f"blocks.{L}.attn.hook_pattern" for L in sorted({L for L, _ in heads})}
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n in names)
    T = batch.seq_len
    b_idx, q_pos = q
    visible = (torch.arange(T)[None, :] <= q_pos[:, None]).numpy()
    types = np.where(carry, "needs a carry", "no carry")
    cells, rows = [], []
    for L, h in heads:
        A = cache[f"blocks.{L}.attn.hook_pattern"][b_idx, h, q_pos].float().numpy()  # query key
        cells.append([])
        for t in TARGETS:
            pooled = chance_normalised_attention(A, masks[t], np.full(len(q_pos), "all"), visible, N_BOOT, seed)["all"]
            cells[-1].append((pooled["ratio"], *pooled["ratio_ci95"]))
            split = chance_normalised_attention(A, masks[t], types, visible, N_BOOT, seed)
            rows += [{"head": _label((L, h)), "target": t, "steps": s, "n": v["n"], "mass": v["mass"],
                      "chance": v["chance"], "ratio": v["ratio"], "ratio 95 % CI": f"[{_num(v['ratio_ci95'][0])}, "
                      f"{_num(v['ratio_ci95'][1])}]"} for s, v in {"all": pooled, **split}.items()]
    return _interval_result("attention_over_chance", cells, ("head", "target"),
                            {"head": [_label(x) for x in heads], "target": list(TARGETS)},
                            {"digits": digits, "n": batch.n, "length": batch.length, "rows": rows,
                             "title": "attention on each operand digit, over chance", "xlabel": "head",
                             "ylabel": "attention / uniform share", "reference": {"uniform attention": 1.0}})


def _queries(batch, digits: list[int]):
    """The (example, position) of every step writing one of ``digits``; per target the key mask [query, key]; and
    whether that digit needs a carry (c_k > 0)."""
    k, op, place = batch.feature("digit_index"), batch.feature("operand")[0], batch.feature("place")[0]
    sel = torch.isin(k, torch.tensor(digits)) & batch.pred_mask
    b_idx, q_pos = sel.nonzero(as_tuple=True)
    kq = k[b_idx, q_pos][:, None]
    masks = {"a_k": (op[None] == 0) & (place[None] == kq), "b_0": (op[None] == 1) & (place[None] == 0),
             "a_(k-1)": (op[None] == 0) & (place[None] == kq - 1)}
    carry = (batch.feature("carry_in")[b_idx, q_pos] > 0).numpy()
    return (b_idx, q_pos), {t: m.expand(len(q_pos), -1).numpy() for t, m in masks.items()}, carry


def _restoration_rows(model, task, length: int, kind: str, digits: list[int], heads, n: int, seed: int) -> dict:
    """Per (example, digit) row: the logit difference of digit k with each head's clean output patched into the
    ``kind``-corrupted run (denoising, all positions), and the clean and corrupted runs' own values."""
    from probekit.corruptions import corrupt
    from probekit.patching import Component, patch_values

    raw, clean, corr, digit, half = [], [], [], [], []
    for k in digits:
        pair = corrupt(task, task.sample(n, length=length, seed=seed + 100 * k + 7), kind, seed=seed, digit=k)
        pv = patch_values(model, pair, [Component("z", L, head=h) for L, h in heads])
        raw.append(pv.per_example)
        clean.append(pv.clean_per_example)
        corr.append(pv.corrupted_per_example)
        digit += [k] * pair.n
        half += [i % 2 for i in range(pair.n)]  # 0: selection half, 1: test half
    return {"kind": kind, "heads": list(heads), "raw": torch.cat(raw, 1).numpy(), "clean": torch.cat(clean).numpy(),
            "corrupted": torch.cat(corr).numpy(), "digit": np.array(digit), "half": np.array(half)}


def _restoration(rows: dict, i: int, which: np.ndarray | None = None, seed: int = 0) -> tuple[float, float, float]:
    """Head ``i``'s restoration (ratio of means) over the rows ``which`` (all by default), with its interval."""
    which = np.ones(len(rows["clean"]), dtype=bool) if which is None else which
    data = np.stack([rows["raw"][i], rows["clean"], rows["corrupted"]], 1)[which]
    return _ci(data, ratio_of_means, seed)


def _chosen(rows: dict) -> int:
    """The head that restores most on the selection half."""
    sel = rows["half"] == 0
    return int(np.nanargmax([ratio_of_means(np.stack([r, rows["clean"], rows["corrupted"]], 1)[sel])
                             for r in rows["raw"]]))


def _staircase_claims(st: Study, name: str, att: Result, rest: dict, seed: int, cmd: str) -> dict:
    """Choose the carry head and the column head on the selection half; test them on the other half."""
    heads = rest["carry-flip"]["heads"]
    test = {kind: r["half"] == 1 for kind, r in rest.items()}
    table = {kind: [_restoration(r, i, test[kind], seed) for i in range(len(heads))] for kind, r in rest.items()}
    c, o = _chosen(rest["carry-flip"]), _chosen(rest["column-digit"])
    st.results[f"{name}/restoration"] = _interval_result(
        "restoration", [[table[k][i] for k in rest] for i in range(len(heads))], ("head", "corruption"),
        {"head": [_label(h) for h in heads], "corruption": list(rest)},
        {"n_test_rows": {k: int(v.sum()) for k, v in test.items()}, "digits": sorted(set(rest["carry-flip"]["digit"])),
         "title": "share of digit k's logit difference restored", "xlabel": "head (clean output patched)",
         "ylabel": "restoration (1 = clean)", "reference": {"threshold 0.5": 0.5, "threshold 0.1": 0.1}})
    st.tables[f"{name} heads"] = _head_rows(heads, att, table)
    st.tables[f"{name} attention"] = att.settings["rows"]
    others = {f"{_label(h)} restores": round(table["carry-flip"][i][0], 3) for i, h in enumerate(heads) if i != c}
    n_test = {k: int(v.sum()) for k, v in test.items()}
    v1 = st.test(Hypothesis(f"{name}: the carry head ({_label(heads[c])}, the head whose clean output restores most "
                            "under carry-flip on the selection half) restores more than half of digit k's logit "
                            "difference under carry-flip on the test half", "restoration under carry-flip", ">", 0.5),
                 *_split(table["carry-flip"][c]), cmd, others, n_test["carry-flip"])
    v2 = st.test(Hypothesis(f"{name}: the carry head ({_label(heads[c])}) restores less than a tenth of digit k's logit "
                            "difference when the column's own digit changes and the carry is kept (column-digit)",
                            "restoration under column-digit", "<", 0.1),
                 *_split(table["column-digit"][c]), cmd, {}, n_test["column-digit"])
    v3 = st.test(Hypothesis(f"{name}: the column head ({_label(heads[o])}, chosen the same way under column-digit) "
                            "restores more than half of digit k's logit difference under column-digit",
                            "restoration under column-digit", ">", 0.5),
                 *_split(table["column-digit"][o]), cmd, {"carry head": round(table["column-digit"][c][0], 3)},
                 n_test["column-digit"])
    _attention_claim(st, name, att, heads[c], cmd)
    return {"carry": heads[c], "column": heads[o], "verdicts": (v1, v2, v3), "table": table, "rows": rest}


def _head_rows(heads, att: Result, table: dict) -> list[dict]:
    rows = []
    for i, h in enumerate(heads):
        r = {"head": _label(h)}
        for j, t in enumerate(TARGETS):
            r[f"attention on {t} / chance"] = float(att.values[i, j])
        for kind, vals in table.items():
            r[f"restoration {kind}"], r[f"{kind} 95 % CI"] = vals[i][0], f"[{_num(vals[i][1])}, {_num(vals[i][2])}]"
        rows.append(r)
    return rows


def _attention_claim(st: Study, name: str, att: Result, head, cmd: str) -> None:
    i = att.labels["head"].index(_label(head))
    parts = [f"{t} {_num(float(att.values[i, j]))}x [{_num(float(att.extra['lo'][i, j]))}, "
             f"{_num(float(att.extra['hi'][i, j]))}]" for j, t in enumerate(TARGETS)]
    top = TARGETS[int(torch.nan_to_num(att.values[i], nan=-1).argmax())]
    st.claim(f"{name}: the carry head {_label(head)} attends most to {top} (description, not cause): its attention "
             f"on each operand digit over the uniform share of visible keys, at the steps writing digits "
             f"{att.settings['digits']} (n = {att.settings['n']}): " + ", ".join(parts) + ".", cmd)


# ---------------------------------------------------------------------------- 2. where the carry is computed


def _das_fit(model, task, length: int, k: int, loc_site: tuple[str, int], plan: dict, seed: int) -> dict:
    """One DAS fit for the carry into digit ``k``: per test pair, correct under the learned subspace, a random
    subspace of the same size (the control) and the full vector (the ceiling)."""
    from probekit.interventions import (
        FitSettings,
        Interchange,
        Location,
        Where,
        carry_counterfactual,
        counterfactual_pairs,
        fit_das,
        interchange_correct,
        random_subspace,
        split_pairs,
    )

    at = Where(digit_index=k)
    pairs = counterfactual_pairs(task, plan["das_pairs"], length, vary="carry_in", hold=["column_sum"], at=at,
                                 target=carry_counterfactual(at), seed=seed + k)
    loc = Location(loc_site[0], loc_site[1], at)
    fit = fit_das(model, pairs, loc, DAS_K, steps=plan["das_steps"], batch_size=plan["das_batch"], n_controls=0,
                  seed=seed)  # the control is scored below, per pair
    test = pairs.select(split_pairs(pairs.n, FitSettings(**fit.settings["fit"]))[2])
    d = fit.rotation.shape[0]
    rand = interchange_correct(model, test, loc, random_subspace(d, DAS_K, seed=seed + 1))
    full = interchange_correct(model, test, loc, Interchange())
    return {"fit": fit, "das": fit.correct.float().numpy(), "random": rand.float().numpy(),
            "full": full.float().numpy(), "k": k}


def _where_computed(st: Study, name: str, model, task, length: int, head, plan: dict, seed: int, cmd: str) -> dict:
    """DAS for the carry at each residual site of the carry head's layer, pooled over digits; two hypotheses."""
    digits = _digits(task, length, plan["das_digits"])
    sites = [(s, head[0]) for s in plan["das_sites"]]  # the carry head's layer: before it, after its attention, after it
    fits = {site: [_das_fit(model, task, length, k, site, plan, seed) for k in digits] for site in sites}
    pooled = {site: {w: np.concatenate([f[w] for f in fs]) for w in ("das", "random", "full")} for site, fs in fits.items()}
    ci = {site: {w: _ci(v, _mean, seed) for w, v in p.items()} for site, p in pooled.items()}
    labels = [f"L{L} {s}" for s, L in fits]
    st.results[f"{name}/iia"] = _interval_result(
        "iia", [[ci[s][w] for w in ("das", "random", "full")] for s in fits], ("site", "intervention"),
        {"site": labels, "intervention": ["DAS subspace", "random subspace", "full vector"]},
        {"k": DAS_K, "digits": digits, "pairs": plan["das_pairs"], "n_test": len(pooled[sites[0]]["das"]),
         "title": f"carry into digit k: interchange accuracy ({DAS_K}-dim subspaces)", "xlabel": "site (answer step)",
         "ylabel": "IIA (held-out pairs)"})
    st.tables[f"{name} DAS"] = [{"site": f"L{L} {s}", "digit": f["k"], "iia": float(f["das"].mean()),
                                 "random subspace": float(f["random"].mean()), "full vector": float(f["full"].mean()),
                                 "n_test": len(f["das"]), "steps": f["fit"].steps}
                                for (s, L), fs in fits.items() for f in fs]
    mid, pre = ("resid_mid", head[0]), ("resid_pre", head[0])
    diff = _ci(pooled[mid]["das"] - pooled[mid]["random"], _mean, seed)
    n = len(pooled[mid]["das"])
    v1 = st.test(Hypothesis(f"{name}: after the carry head's attention (L{head[0]} resid_mid at the step writing digit "
                            f"k, digits {digits}), a {DAS_K}-dim subspace carries the carry into digit k: DAS IIA above "
                            "a random subspace of the same size by more than 0.3", "IIA - random-subspace IIA", ">", 0.3),
                 *_split(diff), cmd, {"DAS IIA": round(ci[mid]["das"][0], 3), "random": round(ci[mid]["random"][0], 3),
                                      "full vector": round(ci[mid]["full"][0], 3)}, n)
    v2 = st.test(Hypothesis(f"{name}: before the carry head's layer (L{head[0]} resid_pre at the same step) the carry "
                            "is not yet there: DAS IIA below 0.1", "IIA at resid_pre", "<", 0.1),
                 *_split(ci[pre]["das"]), cmd, {"full vector": round(ci[pre]["full"][0], 3)}, n)
    return {"fits": fits, "ci": ci, "verdicts": (v1, v2), "labels": labels}


# ---------------------------------------------------------------------------- 3. what is readable


def _readable(st: Study, name: str, model, task, length: int, plan: dict, sz: dict, seed: int,
              cmd: str) -> Verdict | None:
    """carry_in probes: site chosen on a validation split among selective sites, scored on a test split."""
    from probekit.probes import probe_sweep
    from probekit.stats import majority_baseline, token_baseline

    n = int(sz["n_probe"] * plan["probe_share"])
    train, val, test = (task.sample(m, length=length, seed=seed + s) for m, s in ((n, 21), (n // 2, 22), (n // 2, 23)))
    sw = probe_sweep(model, train, "carry_in", "resid_pre,resid_mid,resid_post", evals={"val": val, "test": test},
                     controls=["control_task"], seed=seed)
    st.results[f"{name}/probe_carry_in"] = sw
    p_all, j_val = sw.labels["position"].index("all"), sw.labels["split"].index("val")
    ok = torch.nan_to_num(sw.extra["selectivity"][:, :, p_all, j_val], nan=-1) > 0
    if not ok.any():
        st.claim(f"{name}: no site reads carry_in better than the control task on the validation split "
                 "(selectivity <= 0 everywhere); no probe claim is made.", cmd)
        return None
    score = torch.where(ok, sw.values[:, :, p_all, j_val], torch.tensor(-1.0))
    h, L = divmod(int(score.argmax()), score.shape[1])
    probe = sw.probe(sw.labels["hook"][h], int(sw.labels["layer"][L]))
    tr, te = probe.collect(model, train), probe.collect(model, test)
    tok = token_baseline(tr.token, tr.labels, te.token, te.labels)
    maj = majority_baseline(tr.labels, te.labels)
    tok_pred = torch.tensor([tok["table"].get(t, maj["label"]) for t in te.token.tolist()])
    gain = (probe.predict(te) == te.labels).float() - (tok_pred == te.labels).float()
    site = f"{sw.labels['hook'][h]} L{sw.labels['layer'][L]}"
    acc = float((probe.predict(te) == te.labels).float().mean())
    st.tables[f"{name} carry_in probe"] = [{"site": f"{hk} L{lk}", "val": float(sw.values[i, j, p_all, j_val]),
                                            "test": float(sw.values[i, j, p_all, -1]),
                                            "selectivity (val)": float(sw.extra["selectivity"][i, j, p_all, j_val]),
                                            "majority (test)": float(sw.extra["majority"][i, j, p_all, -1]),
                                            "token (test)": float(sw.extra["token"][i, j, p_all, -1])}
                                           for i, hk in enumerate(sw.labels["hook"]) for j, lk in enumerate(sw.labels["layer"])
                                           if not torch.isnan(sw.values[i, j, p_all, -1])]
    return st.test(Hypothesis(f"{name}: carry_in is linearly readable at {site} (chosen on the validation split among "
                              "sites that beat the control task) beyond what the input token at that position gives: "
                              "held-out accuracy minus token-baseline accuracy above 0.1",
                              "probe accuracy - token-baseline accuracy", ">", 0.1),
                   *_split(_ci(gain.numpy(), _mean, seed, groups=te.example.numpy())), cmd,
                   {"probe accuracy": round(acc, 3), "token baseline": round(tok["accuracy"], 3),
                    "majority class": round(maj["accuracy"], 3)}, te.n_rows)


# ---------------------------------------------------------------------------- 4. what the carry head is needed for


def _ablation(st: Study, name: str, model, task, length: int, head, sz: dict, seed: int, cmd: str) -> dict:
    """Mean-ablate the carry head: teacher-forced accuracy on digits that need a carry (c_k > 0) and on the others."""
    from probekit.attribution import ablation_hooks

    batch, ref = task.sample(sz["n"], length=length, seed=seed + 31), task.sample(sz["n"], length=length, seed=seed + 32)
    pm = batch.pred_mask
    k, cin, tgt = (batch.feature(f)[pm].view(batch.n, -1) for f in ("digit_index", "carry_in", "target"))
    with torch.no_grad():
        clean = model(batch.tokens)[pm].view(batch.n, -1, model.cfg.d_vocab).argmax(-1) == tgt
        with ablation_hooks(model, batch, [head], "mean", reference=ref):
            abl = model(batch.tokens)[pm].view(batch.n, -1, model.cfg.d_vocab).argmax(-1) == tgt
    keep = (k >= 1).flatten()
    ex = torch.arange(batch.n)[:, None].expand_as(k).flatten()[keep].numpy()
    need = (cin.flatten()[keep] > 0).numpy()
    c0, c1 = clean.flatten()[keep].float().numpy(), abl.flatten()[keep].float().numpy()
    rows = np.stack([c0 - c1, need], 1)
    diff = _ci(rows, lambda r: float(r[r[:, 1] == 1, 0].mean() - r[r[:, 1] == 0, 0].mean()), seed, groups=ex)
    acc = {(w, m): _ci(np.stack([v, need], 1), lambda r, s=s: float(r[r[:, 1] == s, 0].mean()), seed, groups=ex)
           for w, v in (("clean", c0), ("ablated", c1)) for m, s in (("needs a carry", 1), ("no carry", 0))}
    st.results[f"{name}/ablation"] = _interval_result(
        "ablation_accuracy", [[acc[w, m] for w in ("clean", "ablated")] for m in ("needs a carry", "no carry")],
        ("digits", "run"), {"digits": ["need a carry", "no carry"], "run": ["clean", f"{_label(head)} mean-ablated"]},
        {"n": batch.n, "rows": int(keep.sum()), "title": f"accuracy with the carry head {_label(head)} mean-ablated",
         "xlabel": "product digits k >= 1", "ylabel": "teacher-forced accuracy"})
    base = {f"{w}, {m}": round(acc[w, m][0], 3) for w, m in acc}
    v1 = st.test(Hypothesis(f"{name}: mean-ablating the carry head {_label(head)} breaks the digits that need a carry "
                            "more than the others: accuracy drop on digits with c_k > 0 minus the drop on digits with "
                            "c_k = 0 (k >= 1) above 0.2", "drop(carry) - drop(no carry)", ">", 0.2),
                 *_split(diff), cmd, base, int(keep.sum()))
    v2 = st.test(Hypothesis(f"{name}: the same ablation leaves the digits that need no carry: their accuracy stays "
                            "above 0.9", "accuracy on no-carry digits, ablated", ">", 0.9),
                 *_split(acc["ablated", "no carry"]), cmd, {"clean": round(acc["clean", "no carry"][0], 3)},
                 int((~need.astype(bool)).sum()))
    return {"verdicts": (v1, v2), "acc": acc, "head": head}


def _staircase_figures(st: Study, name: str, heads: dict, das: dict, abl: dict) -> None:
    from probekit.viz import result_intervals

    att, rest = st.results[f"{name}/attention"], st.results[f"{name}/restoration"]
    c = _label(heads["carry"])
    st.figure("staircase", lambda: result_intervals([att, rest], title=f"{name}: the staircase, described and caused"),
              f"Left: each head's attention on the column's digit of a (a_k), on b's digit (b_0) and on the digit of a "
              f"below the column (a_(k-1)), as a multiple of what uniform attention over the visible keys would give "
              f"(1 = chance). Right: the share of digit k's logit difference that each head's clean output restores "
              f"in a corrupted run (1 = clean, 0 = corrupted), under carry-flip (the carry into k changes, its column "
              f"does not) and column-digit (the column's digit changes, the carry does not); measured on the half of "
              f"the examples not used to choose the heads. Bars: bootstrap 95 % intervals over examples. The carry "
              f"head is {c}.",
              f"Two panels of points with interval bars for each head of {name}: attention over chance on a_k, b_0 "
              f"and a_(k-1), and restoration under carry-flip and column-digit; {c} restores most under carry-flip.")
    iia, ab = st.results[f"{name}/iia"], st.results[f"{name}/ablation"]
    st.figure("carry_computed", lambda: result_intervals([iia, ab], title=f"{name}: where the carry is and what needs it"),
              f"Left: interchange-intervention accuracy for the carry into digit k at the residual sites of the carry "
              f"head's layer at the step writing digit k: a learned {DAS_K}-dimensional subspace (DAS), a random "
              f"subspace of the same size (control) and the full vector (ceiling), on held-out pairs whose column sum "
              f"is held. Right: teacher-forced accuracy on digits that need a carry and digits that do not, clean "
              f"and with {c} mean-ablated. Bars: bootstrap 95 % intervals.",
              f"Two panels: IIA by site for DAS, random and full-vector interchanges; accuracy on carry and no-carry "
              f"digits, clean and with {c} ablated.")


# ---------------------------------------------------------------------------- 5. the circuit


def _circuit(st: Study, name: str, plan: dict, seed: int, cmd: str) -> dict | None:
    """Edges under carry-flip: rank (exact effect, or EAP at quick size), the faithfulness curve with the corrupted
    run as the ablation, the smallest circuit keeping 90 %; then on held-out pairs its faithfulness and its
    complement's."""
    from probekit import edges as E
    from probekit.corruptions import corrupt

    model, task, conf = _load(name)
    L = _trained(conf, task)[1]
    P = sum(task.widths(L))
    k = P // 2
    n = plan["edges_n"]
    sel, held = (corrupt(task, task.sample(n, length=L, seed=seed + s), "carry-flip", seed=seed, digit=k)
                 for s in (41, 42))
    es = E.setup(model, sel, "logit-diff", "noise")
    model.eval()
    scores, base, src = E.eap(es)
    exact = E.exact_edges(es, base, src) if plan["exact"] else None
    f = E.faithfulness(es, base, src, exact if exact is not None else scores, "resample", 0.9, refine=plan["refine"])
    g = es.graph
    rep = E.EdgeReport([x.label for x in g.senders], [x.label for x in g.receivers], list(g.edges),
                       exact if exact is not None else scores, None, None, None, f,
                       {"model": name, "digit": k, "n": n, "ranked_by": "exact" if exact is not None else "eap",
                        "ablation": "resample", "metric": "logit-diff", "method": "exact" if exact is not None else "eap"})
    st.results[f"{name}/edges"] = rep.to_result()
    return _circuit_claims(st, name, model, rep, held, k, seed, cmd)


def _circuit_claims(st: Study, name: str, model, rep, held, k: int, seed: int, cmd: str) -> dict | None:
    from probekit.edges import circuit_examples, plot_edges

    f, E_n = rep.faithfulness, len(rep.edges)
    how = "their exact effect" if rep.settings["ranked_by"] == "exact" else "EAP scores"
    st.figure("circuit", lambda: plot_edges(rep, title=f"{name}: edges of the carry into digit {k}"),
              f"Left: faithfulness of the top-n edges (ranked by {how} under carry-flip into digit {k}) when every other "
              f"edge reads the corrupted run's value: 0 = all edges corrupted, 1 = the clean model; the dotted line "
              f"marks the smallest circuit keeping {f.threshold:.0%} on the selection pairs. Right: each edge's score "
              f"(sender x receiver, grey: no such edge).",
              f"Faithfulness against number of edges kept for {name}, and a sender-by-receiver map of edge scores.")
    if f.smallest is None:
        st.claim(f"{name}: no circuit of the top-n edges keeps {f.threshold:.0%} of the logit difference for the carry "
                 f"into digit {k}; no circuit is tested.", cmd)
        return None
    st.claim(f"{name}: on {rep.settings['n']} selection pairs (carry-flip into digit {k}), the smallest circuit keeping "
             f"{f.threshold:.0%} of the logit difference has {f.smallest} of {E_n} edges ({_pct(f.smallest / E_n)}), "
             f"edges ranked by {how}; its first edges: {', '.join(f.circuit[:6])}.", cmd)
    rows = {c: circuit_examples(model, held, f.circuit, ablation="resample", complement=c).T.numpy() for c in (False, True)}
    keep, comp = (_ci(rows[c], ratio_of_means, seed) for c in (False, True))
    v1 = st.test(Hypothesis(f"{name}: that circuit ({f.smallest} edges, chosen on the selection pairs) keeps more than "
                            "0.8 of the logit difference on held-out pairs", "faithfulness, held out", ">", 0.8),
                 *_split(keep), cmd, {"edges": f.smallest, "of": E_n}, held.n)
    v2 = st.test(Hypothesis(f"{name}: the {E_n - f.smallest} edges outside it keep less than 0.2 of it on the held-out "
                            "pairs", "faithfulness of the complement, held out", "<", 0.2),
                 *_split(comp), cmd, {}, held.n)
    return {"name": name, "smallest": f.smallest, "edges": E_n, "verdicts": (v1, v2), "digit": k}


# ---------------------------------------------------------------------------- 6. transfer to unseen lengths


def _transfer_model(st: Study, role: str, name: str, model, task, trained: tuple[int, int], plan: dict, sz: dict,
                    seed: int, cmd: str) -> dict | None:
    """At the longest trained length and unseen ones: the carry head (chosen at the trained length), its attention on
    a_(k-1), its restoration under carry-flip, and the DAS carry subspace fitted at the trained length."""
    lo, hi = trained
    lengths = [hi] + [hi + d for d in plan["unseen"] if task.seq_len(hi + d) <= model.cfg.n_ctx and hi + d <= 12]
    if lo == hi or hi < 2 or len(lengths) < 2:
        st.notes.append(f"{name}: trained on {lo}..{hi} digits, no unseen length fits its context; transfer skipped")
        return None
    rows0 = _restoration_rows(model, task, hi, "carry-flip", _digits(task, hi, None), _heads(model), sz["n_patch"], seed)
    head = rows0["heads"][_chosen(rows0)]
    fit = _das_fit(model, task, hi, hi - 1, ("resid_mid", head[0]), plan, seed)
    per = {L: _transfer_length(model, task, L, head, fit, rows0, sz, seed) for L in lengths}
    table = [{"model": name, "role": role, "length": L, "unseen": L > hi, "exact_match": _exact(name, L),
              **{f"{w}": p[w][0] for w in ("attention", "restoration", "iia", "full")},
              **{f"{w} 95 % CI": f"[{_num(p[w][1])}, {_num(p[w][2])}]" for w in ("attention", "restoration", "iia")}}
             for L, p in per.items()]
    st.tables.setdefault("transfer", []).extend(table)
    far = lengths[-1]
    out = {"role": role, "head": head, "trained": hi, "far": far, "per": per, "rows": rows0, "fit": fit, "verdicts": {}}
    for part, what in (("restoration", f"the carry head {_label(head)}'s restoration under carry-flip"),
                       ("iia", f"the DAS carry subspace (fitted at {hi} digits, L{head[0]} resid_mid)'s IIA")):
        d = two_sample_bootstrap(per[hi]["rows_" + part], per[far]["rows_" + part], _stat(part), N_BOOT, seed)
        out["verdicts"][part] = st.test(
            Hypothesis(f"{name} ({role}, trained on {lo}..{hi} digits): {what} transfers to {far} digits: it drops by "
                       f"less than 0.2 from {hi} digits", f"{part} at {hi} - {part} at {far}", "<", 0.2),
            *_split(d), cmd, {f"at {hi}": round(per[hi][part][0], 3), f"at {far}": round(per[far][part][0], 3),
                              f"exact match at {far}": _exact(name, far)}, len(per[far]["rows_" + part]))
    return out


def _stat(part: str):
    return ratio_of_means if part == "restoration" else _mean


def _transfer_length(model, task, L: int, head, fit: dict, rows0: dict, sz: dict, seed: int) -> dict:
    """One length of `_transfer_model`: attention ratio on a_(k-1), restoration (test half at the trained length),
    IIA of the trained-length subspace and of the full vector, each with its rows and interval."""
    from probekit.interventions import (
        Interchange,
        Location,
        Where,
        carry_counterfactual,
        counterfactual_pairs,
        interchange_correct,
    )

    digits = _digits(task, L, None)
    att = _attention(model, task.sample(sz["n"], length=L, seed=seed + 50 + L), digits, seed, heads=[head])
    i_att = att.labels["head"].index(_label(head))
    j = TARGETS.index("a_(k-1)")
    if L == fit["fit"].settings["pairs"]["length"]:
        i = rows0["heads"].index(head)
        test = rows0["half"] == 1
        rows = np.stack([rows0["raw"][i], rows0["clean"], rows0["corrupted"]], 1)[test]
        iia_rows, full = fit["das"], fit["full"]
    else:
        r = _restoration_rows(model, task, L, "carry-flip", digits, [head], sz["n_patch"], seed)
        rows = np.stack([r["raw"][0], r["clean"], r["corrupted"]], 1)
        at = Where(digit_index=L - 1)
        pairs = counterfactual_pairs(task, max(16, fit["das"].size), L, vary="carry_in", hold=["column_sum"], at=at,
                                     target=carry_counterfactual(at), seed=seed + 60 + L)
        loc = Location("resid_mid", head[0], at)
        iia_rows = interchange_correct(model, pairs, loc, fit["fit"].intervention).float().numpy()
        full = interchange_correct(model, pairs, loc, Interchange()).float().numpy()
    return {"attention": (float(att.values[i_att, j]), float(att.extra["lo"][i_att, j]), float(att.extra["hi"][i_att, j])),
            "restoration": _ci(rows, ratio_of_means, seed), "rows_restoration": rows,
            "iia": _ci(iia_rows, _mean, seed), "rows_iia": np.asarray(iia_rows, dtype=float),
            "full": (float(np.mean(full)), np.nan, np.nan)}


def _exact(name: str, L: int) -> float | None:
    m = _metrics(name)
    return next((r["exact_match"] for r in (m or {}).get("records", []) if r["length"] == L), None)


def _transfer_figure(st: Study, transfer: dict) -> None:
    from probekit.viz import result_intervals

    offsets = sorted({L - t["trained"] for t in transfer.values() for L in t["per"]})
    items = ["trained" if d == 0 else f"+{d}" for d in offsets]
    panels = []
    for part, ylabel in (("attention", "attention on a_(k-1) / chance"), ("restoration", "restoration under carry-flip"),
                         ("iia", "DAS IIA (trained-length subspace)")):
        nan = (float("nan"),) * 3
        cells = [[next((p[part] for L, p in t["per"].items() if L - t["trained"] == d), nan) for t in transfer.values()]
                 for d in offsets]
        panels.append(_interval_result(part, cells, ("length", "model"),
                                       {"length": items, "model": [f"{n} ({t['role']})" for n, t in transfer.items()]},
                                       {"title": ylabel, "xlabel": "digits of a (relative to the longest trained)",
                                        "ylabel": ylabel}))
    st.figure("transfer", lambda: result_intervals(panels, title="what of the carry mechanism transfers to unseen lengths"),
              "For each model trained on a range of lengths, at its longest trained length and at longer ones: the "
              "carry head's attention on the digit of a below the column (over chance), the share of digit k's logit "
              "difference its clean output restores under carry-flip, and the interchange accuracy of the carry "
              "subspace fitted at the trained length. Bars: bootstrap 95 % intervals over examples.",
              "Three panels of points with interval bars against length, one colour per model.")


# ---------------------------------------------------------------------------- headline


def _word(v: Verdict) -> str:
    return {"supported": "holds", "not supported": "does not hold", "inconclusive": "is inconclusive"}[v.verdict]


def _iv(v: Verdict) -> str:
    return f"{_num(v.effect)} [{_num(v.interval[0])}, {_num(v.interval[1])}]"


def _headline(facts: dict) -> list[str]:
    """Two to four sentences written from the verdicts (a claim that did not hold is said so)."""
    out = []
    s = facts.get("staircase")
    if s:
        v1, v2, v3 = s["verdicts"]
        out.append(f"In {s['name']} the carry is moved by one head: {_label(s['carry'])} restores {_iv(v1)} of digit k's "
                   f"logit difference when the carry flips ({_word(v1)}: > 0.5) and {_iv(v2)} when the column's own "
                   f"digit changes ({_word(v2)}: < 0.1), while {_label(s['column'])} restores {_iv(v3)} of the "
                   f"latter ({_word(v3)}).")
        w1, w2 = s["das"]["verdicts"]
        a1, a2 = s["ablation"]["verdicts"]
        out.append(f"The carry is first present after that attention: DAS IIA minus a random subspace {_iv(w1)} at "
                   f"resid_mid ({_word(w1)}), and {_iv(w2)} before it ({_word(w2)}); mean-ablating the head hurts "
                   f"digits that need a carry more, by {_iv(a1)} ({_word(a1)}), but the claim that it leaves the "
                   f"others {_word(a2)} (their accuracy {_iv(a2)}).")
    c = facts.get("circuit")
    if c:
        k1, k2 = c["verdicts"]
        out.append(f"{c['name']}'s carry into digit {c['digit']} runs through {c['smallest']} of {c['edges']} edges: on "
                   f"held-out pairs they keep {_iv(k1)} of the logit difference ({_word(k1)}: > 0.8) and the rest "
                   f"keeps {_iv(k2)} ({_word(k2)}: < 0.2).")
    t = [f"{n} ({x['role']}): restoration drop {_iv(x['verdicts']['restoration'])} "
         f"({_word(x['verdicts']['restoration'])}), IIA drop {_iv(x['verdicts']['iia'])} ({_word(x['verdicts']['iia'])})"
         for n, x in facts.get("transfer", {}).items() if x]
    if t:
        out.append("At unseen lengths, from the longest trained length to the longest tested (transfer = a drop below "
                   "0.2): " + "; ".join(t) + ".")
    return out[:4]
