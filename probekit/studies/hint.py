"""The hint study: the successor lookup in sorting models (baseline vs hinted), by length."""

from __future__ import annotations

import torch

from probekit.results import Result
from probekit.studies.common import Study, _begin, _load, _metrics, _pct, _size, value_mask


def hint_study(models: tuple[str, ...] = ("sort-baseline", "sort-successor", "sort-predecessor"),
               lengths: tuple[int, ...] = (10, 20, 50, 100), size: str = "default", seed: int = 0) -> Study:
    """Which head performs the successor lookup, how sharp it stays with length, whether the successor is
    linearly readable before the last layer, and how much patching that head restores under
    ``successor-change`` corruptions; for each sorting model. Then why long lists fail: the kind of
    each sequence's first error (`probekit.evaluate.sort_error_kinds`: counting copies or the lookup),
    and greedy accuracy on lists of distinct values, where no copies need counting."""
    sz = _size(size)
    st, have, cmd = _begin("hint", "Hint mechanism: the successor lookup in sorting", models, size)
    if not have:
        return st
    rows = []
    for name in have:
        model, task, _ = _load(name)
        m = _hint_measure(st, name, model, task, lengths, sz, seed)
        acc = _metrics(name)
        em = {r["length"]: r["exact_match"] for r in acc["records"]} if acc else {}
        rows += _hint_rows(name, m, em)
        _hint_claims(st, name, m, cmd)
        _hint_distinct(st, name, model, task, sz, seed, em, cmd)
        if em:
            st.claim(f"{name}: greedy exact match " + ", ".join(f"{L}: {_pct(v)}" for L, v in em.items()) + ".",
                     f"probekit eval --model {name} --lengths {','.join(map(str, em))} --n 500 --seed 0")
    st.tables["hint_by_length"] = rows
    _hint_verdict(st, rows, cmd)
    return st


def _hint_measure(st: Study, name: str, model, task, lengths, sz: dict, seed: int) -> dict:
    """One sorting model's measurements (kept in ``st.results``): head roles by length, the next-output
    probe sweep, the lookup head's patching effect, and the kinds of first errors."""
    from probekit.attribution import head_attention_to
    from probekit.corruptions import corrupt
    from probekit.evaluate import sort_error_kinds
    from probekit.patching import sweep
    from probekit.probes import probe_sweep

    lengths_ok = [L for L in lengths if task.seq_len(L) <= model.cfg.n_ctx]
    batches = {L: task.sample(sz["n"], length=L, seed=seed + L) for L in lengths_ok}
    # head roles: attention to any copy of the target value, at each sort step
    roles_t = torch.stack([head_attention_to(model, b, value_mask(b)).values for b in batches.values()])  # length head stat
    heads = [f"L{L}H{h}" for L in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    st.results[f"{name}/head_roles"] = Result(
        kind="head_roles", values=roles_t, axes=("length", "head", "stat"),
        labels={"length": list(batches), "head": heads, "stat": ["mass", "top1", "chance"]},
        settings={"model": name, "target": "target value (any copy)", "n": sz["n"], "seed": seed})
    ref = list(batches).index(20) if 20 in batches else 0
    best = int(roles_t[ref, :, 1].argmax())
    # probe: is the next output linearly readable in the residual stream, and does it survive length?
    train_b = task.sample(sz["n_probe"], length=20, seed=seed + 1000)
    evals = {str(L): task.sample(max(64, sz["n_probe"] // 4), length=L, seed=seed + 2000 + L)
             for L in lengths_ok if L != 20}
    sweep_p = probe_sweep(model, train_b, "target", hooks="resid_mid,resid_post", evals=evals,
                          controls=["shuffle"], seed=seed)
    st.results[f"{name}/probe_target"] = sweep_p
    # patching the lookup: successor-change pairs, head outputs across positions
    patch_rows = {}
    for L in [L for L in (20, 50) if L in batches]:
        pair = corrupt(task, task.sample(sz["n_patch"], length=L, seed=seed + 3000 + L), "successor-change",
                       seed=seed)
        r = sweep(model, pair, "z", by_pos=False, metric="logit-diff")
        st.results[f"{name}/patch_z_len{L}"] = r
        patch_rows[L] = float(r.values.reshape(-1)[best])
    errors = {L: sort_error_kinds(model, b) for L, b in batches.items()}
    return {"batches": batches, "roles": roles_t, "heads": heads, "ref": ref, "best": best, "probe": sweep_p,
            "patch": patch_rows, "errors": errors}


def _hint_rows(name: str, m: dict, em: dict) -> list[dict]:
    """The ``hint_by_length`` table rows of one model: lookup head, patching, first-error kinds by length."""
    roles_t, best, errors = m["roles"], m["best"], m["errors"]
    rows = []
    for i, L in enumerate(m["batches"]):
        fe = errors[L]["first_error"]
        failed = errors[L]["n"] - fe["none"]
        rows.append({"model": name, "length": L, "exact_match": em.get(L),
                     "lookup_head": m["heads"][best], "lookup_top1": float(roles_t[i, best, 1]),
                     "lookup_mass": float(roles_t[i, best, 0]), "chance": float(roles_t[i, best, 2]),
                     "best_head_top1": float(roles_t[i, :, 1].max()),
                     "patch_restored": m["patch"].get(L),
                     "repeat_share": errors[L]["repeat_share"],
                     "teacher_forced_exact": fe["none"] / errors[L]["n"],
                     "first_error_counting": (fe["extra_copy"] + fe["dropped_copy"]) / failed if failed else None,
                     "first_error_lookup": fe["wrong_value"] / failed if failed else None})
    return rows


def _probe_cells(sweep_p: Result) -> list[str]:
    """``"resid_mid L1: 97.0 %/80.0 %"``: the probe's score by split at every (hook, layer) that was fitted."""
    p_all = sweep_p.labels["position"].index("all")
    cells = []
    for hi, hk in enumerate(sweep_p.labels["hook"]):
        for li, lk in enumerate(sweep_p.labels["layer"]):
            v = sweep_p.values[hi, li, p_all]
            if not torch.isnan(v).all():
                cells.append(f"{hk.replace('hook_', '')} L{lk}: " + "/".join(_pct(float(x)) for x in v))
    return cells


def _hint_claims(st: Study, name: str, m: dict, cmd: str) -> None:
    """One model's claims: the lookup head by length, the probes, the patching, the failure at the longest length."""
    roles_t, best, ref, heads, sweep_p, errors = m["roles"], m["best"], m["ref"], m["heads"], m["probe"], m["errors"]
    top1 = {L: float(roles_t[i, best, 1]) for i, L in enumerate(m["batches"])}
    st.claim(f"{name}: head {heads[best]} is the lookup head (highest top-1 attention on a copy of the next "
             f"output at length 20). Its top-1 rate by length: "
             + ", ".join(f"{L}: {_pct(v)}" for L, v in top1.items())
             + f" (uniform attention would give {_pct(float(roles_t[ref, best, 2]))} at length 20).", cmd)
    p_all = sweep_p.labels["position"].index("all")
    splits = ["20 (fit)" if s == "train" else s for s in sweep_p.labels["split"]]
    st.claim(f"{name}: linear probes for the next output (trained at length 20; scored at "
             + "/".join(splits) + "): " + "; ".join(_probe_cells(sweep_p))
             + f". Shuffled-label control: {_pct(float(sweep_p.extra['shuffled'][0, 0, p_all, 0]))}.", cmd)
    if m["patch"]:
        st.claim(f"{name}: patching {heads[best]}'s output from the clean into the successor-changed run restores "
                 + ", ".join(f"{_pct(v)} at length {L}" for L, v in m["patch"].items())
                 + " of the clean-vs-corrupted logit difference (1 = fully clean).", cmd)
    long = max(m["batches"])
    fe = errors[long]["first_error"]
    failed = errors[long]["n"] - fe["none"]
    if failed:
        st.claim(f"{name}, length {long}: {_pct(errors[long]['repeat_share'])} of the sort steps repeat the previous "
                 f"output (length 20: {_pct(errors[20]['repeat_share']) if 20 in errors else 'n/a'}). Of the "
                 f"{failed} of {errors[long]['n']} lists that fail under teacher forcing, the first error is an extra "
                 f"copy in {fe['extra_copy']}, a dropped copy in {fe['dropped_copy']}, a wrong new value in "
                 f"{fe['wrong_value']}. Step error rates: {_pct(errors[long]['error_rate']['repeat'])} on repeats, "
                 f"{_pct(errors[long]['error_rate']['new'])} on new values.", cmd)


def _hint_distinct(st: Study, name: str, model, task, sz: dict, seed: int, em: dict, cmd: str) -> None:
    """Greedy exact match on lists of 50 distinct values (no copies to count), against lists with repeats."""
    import dataclasses

    from probekit.evaluate import evaluate

    if not (task.repeats and task.n_values >= 50 and task.seq_len(50) <= model.cfg.n_ctx):
        return
    distinct = dataclasses.replace(task, repeats=False, value_subsets=0.0)
    d50 = evaluate(model, distinct, [50], n=sz["n"], seed=seed).exact_match(50)
    st.tables.setdefault("distinct_values", []).append(
        {"model": name, "length": 50, "exact_match_distinct": d50, "exact_match_repeats": em.get(50)})
    st.claim(f"{name}: on lists of 50 distinct values (no copies to count) greedy exact match is {_pct(d50)}"
             + (f", against {_pct(em[50])} on length-50 lists with repeats." if 50 in em else "."), cmd)


def _last_attn_probe(sweep_p: Result) -> dict[str, float]:
    """Probe accuracy by split at the last layer's resid_mid (after the last attention, before its MLP)."""
    hooks = sweep_p.labels["hook"]
    hi = next(i for i, h in enumerate(hooks) if "resid_mid" in h)
    p_all = sweep_p.labels["position"].index("all")
    col = sweep_p.values[hi, :, p_all]  # layer split
    li = max(i for i in range(col.shape[0]) if not torch.isnan(col[i]).all())
    return dict(zip(sweep_p.labels["split"], col[li].tolist(), strict=True))


def _hint_verdict(st: Study, rows: list[dict], cmd: str) -> None:
    """One claim per model comparing length 20 with the longest length, and one comparing the hinted
    models with the baseline: does the hint create, sharpen or keep sharp the lookup, and does that track accuracy."""
    by_model: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["length"]] = r
    summary = {}
    for name, rs in by_model.items():
        if 20 not in rs or len(rs) < 2:
            continue
        long = max(rs)
        probe = _last_attn_probe(st.results[f"{name}/probe_target"])
        t20, tl = rs[20]["lookup_top1"], rs[long]["lookup_top1"]
        p20, pl = probe.get("train", float("nan")), probe.get(str(long), float("nan"))
        summary[name] = (t20, tl, p20, pl, rs[20]["exact_match"], rs[long]["exact_match"], long)
        kept = "keeps" if tl >= 0.8 * t20 else "loses"
        st.claim(f"{name}, length 20 -> {long}: the lookup head's top-1 rate {_pct(t20)} -> {_pct(tl)} (it {kept} "
                 f"its sharpness), the next-output probe after the last attention layer {_pct(p20)} -> {_pct(pl)}, "
                 f"exact match {_pct(rs[20]['exact_match'] or 0)} -> {_pct(rs[long]['exact_match'] or 0)}.", cmd)
        counting = rs[long].get("first_error_counting")
        if counting is not None:
            cause = ("mostly counting copies of repeated values, not the lookup" if counting >= 0.5
                     else "mostly the lookup (a wrong new value), not counting copies")
            st.claim(f"{name} at length {long}: {_pct(counting)} of the failing lists first go wrong on the number of "
                     f"copies of a value (an extra or a dropped copy): the failure is {cause}.", cmd)
    base = summary.get("sort-baseline")
    for name, (t20, tl, _p20, pl, _e20, el, long) in summary.items():
        if name == "sort-baseline" or base is None:
            continue
        bt20, btl, bp20, bpl, be20, bel, _ = base
        what = []
        if t20 > bt20 + 0.05:
            what.append("sharpens the lookup at the training length")
        if tl / max(t20, 1e-9) > btl / max(bt20, 1e-9) + 0.1:
            what.append("keeps the lookup sharper as length grows")
        if not what:
            what.append("neither sharpens the lookup nor keeps it sharper with length")
        gap = (el or 0) - (bel or 0)
        st.claim(f"Compared with sort-baseline, {name}'s hint " + " and ".join(what)
                 + f" (top-1 {_pct(t20)} -> {_pct(tl)} vs {_pct(bt20)} -> {_pct(btl)}); the accuracy at length {long} "
                 + (f"differs by {100 * gap:+.1f} points" if gap else "is the same")
                 + f" ({_pct(el or 0)} vs {_pct(bel or 0)}), and the next-output probe at length {long} is "
                 f"{_pct(pl)} vs {_pct(bpl)}: "
                 + ("the lookup's sharpness does not account for the failure at long lengths."
                    if (el or 0) < 0.05 and tl / max(t20, 1e-9) > btl / max(bt20, 1e-9) + 0.1
                    else "the lookup's sharpness tracks the accuracy."), cmd)
