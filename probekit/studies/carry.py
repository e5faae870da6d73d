"""The carry study: where carries are represented, used and routed in multiplication models, and what
breaks on longer operands than trained."""

from __future__ import annotations

import torch

from probekit.results import Result
from probekit.studies.common import Study, _begin, _load, _metrics, _pct, _size
from probekit.tasks import ProbekitError


def carry_study(models: tuple[str, ...] = ("mult-5x1", "mult-3x3", "mult-extrap"), size: str = "default",
                seed: int = 0) -> Study:
    """For each multiplication model: probes for carry_in / carry_out / column_sum by layer and answer digit,
    carry-flip patching per answer digit, attention of heads to the column's operand digits; on
    ``mult-extrap`` the same at the trained length and at longer operands."""
    sz = _size(size)
    st, have, cmd = _begin("carry", "Carry mechanism: multiplication", models, size)
    if not have:
        return st
    rows = []
    for name in have:
        model, task, conf = _load(name)
        lo, hi = (conf.get("train") or {}).get("lengths", [task.digits, task.digits])
        # trained length first, then (for a model trained on a range) the other trained and the longer lengths
        lengths = [hi] + [L for L in [*range(lo, hi), hi + 1, hi + 2] if lo != hi and task.seq_len(L) <= model.cfg.n_ctx]
        rep = _carry_probes(st, rows, name, model, task, lengths, sz, seed, cmd)
        roles, top = _carry_routing(st, name, model, task, lengths, sz, seed, cmd)
        _carry_patching(st, name, model, task, hi, sz, seed, cmd)
        acc = _metrics(name)
        if acc:
            st.claim(f"{name}: greedy exact match " + ", ".join(f"{r['length']} digits: {_pct(r['exact_match'])}"
                                                                for r in acc["records"]) + ".", acc.get("command", ""))
        if len(lengths) > 1 and acc:
            _carry_breaks_first(st, name, (lo, hi), lengths, rep, roles, top, acc, cmd)
    st.tables["carry_probes"] = rows
    return st


def _carry_probes(st: Study, rows: list[dict], name: str, model, task, lengths: list[int], sz: dict, seed: int,
                  cmd: str) -> dict[int, float]:
    """Probes for carry_out and column_sum (fit at ``lengths[0]``, scored at the others): one claim and one
    ``carry_probes`` row each. Returns the carry_out score by length at its best site."""
    from probekit.probes import probe_sweep

    hi = lengths[0]
    train_b = task.sample(sz["n_probe"], length=hi, seed=seed + 1)
    evals = {str(L): task.sample(max(64, sz["n_probe"] // 4), length=L, seed=seed + 10 + L) for L in lengths[1:]}
    rep = {}
    for feat in ("carry_out", "column_sum"):
        sw = probe_sweep(model, train_b, feat, hooks="resid_pre,resid_mid,resid_post", evals=evals,
                         controls=["shuffle", "control_task"], seed=seed)
        st.results[f"{name}/probe_{feat}"] = sw
        (bh, bv) = sw.best(split="train")
        hi_ = sw.labels["hook"].index(bh["hook"])
        li = sw.labels["layer"].index(bh["layer"])
        p_all = sw.labels["position"].index("all")
        by_len = {(f"{hi} (fit)" if s == "train" else s): float(sw.values[hi_, li, p_all, j])
                  for j, s in enumerate(sw.labels["split"])}
        sel = float(sw.extra["selectivity"][hi_, li, p_all, 0])
        metric = sw.settings.get("metric", "accuracy")
        st.claim(f"{name}: {feat} is best read at {bh['hook']} layer {bh['layer']} ({metric} "
                 + ", ".join(f"{s}: {v:.3f}" for s, v in by_len.items())
                 + f"; selectivity over the control task {sel:.3f}).", cmd)
        rows.append({"model": name, "what": f"probe {feat}", **{f"len {s}": v for s, v in by_len.items()}})
        if feat == "carry_out":
            rep = {int(str(k).split()[0]): v for k, v in by_len.items()}
    return rep


def _carry_routing(st: Study, name: str, model, task, lengths: list[int], sz: dict, seed: int,
                   cmd: str) -> tuple[Result, int]:
    """Head roles against the column's operand digits by length; the head that attends to them most."""
    from probekit.attribution import head_roles

    roles = head_roles(model, [task.sample(sz["n"], length=L, seed=seed + 20 + L) for L in lengths],
                       target="column_operands")
    st.results[f"{name}/head_roles"] = roles
    mass = roles.values[0, :, 0]
    top = int(mass.argmax())
    st.claim(f"{name}: head {roles.labels['head'][top]} puts the most attention on the operand digits of the "
             f"column being written ({_pct(float(mass[top]))} of its attention at length {lengths[0]}"
             + "".join(f"; {_pct(float(roles.values[i, top, 0]))} at length {L}" for i, L in enumerate(lengths) if i)
             + f"; uniform {_pct(float(roles.values[0, top, 2]))}).", cmd)
    return roles, top


def _carry_patching(st: Study, name: str, model, task, hi: int, sz: dict, seed: int, cmd: str) -> None:
    """Carry-flip patching per answer digit k: which head's clean output restores digit k the most?"""
    from probekit.corruptions import corrupt
    from probekit.patching import sweep

    P = len(task.sample(1, length=hi).features["digit_index"][0].ge(0).nonzero())
    per_digit = []
    for k in range(1, P):
        try:
            pair = corrupt(task, task.sample(sz["n_patch"], length=hi, seed=seed + 30 + k), "carry-flip",
                           seed=seed, digit=k)
        except ProbekitError as e:  # no carry change possible into this digit
            st.notes.append(f"{name}: carry-flip into digit {k} skipped ({e})")
            continue
        r = sweep(model, pair, "z", by_pos=False, metric="logit-diff")
        st.results[f"{name}/patch_z_digit{k}"] = r
        flat = r.values.reshape(-1)
        j = int(torch.nan_to_num(flat, nan=-1e9).argmax())
        per_digit.append((k, r.labels["layer"][j // model.cfg.n_heads], r.labels["head"][j % model.cfg.n_heads],
                          float(flat[j])))
    if per_digit:
        st.claim(f"{name}: under carry-flip corruptions, the head whose clean output restores most of digit k's "
                 "logit difference: " + "; ".join(f"k={k}: L{L}H{h} ({v:.2f})" for k, L, h, v in per_digit) + ".", cmd)


def _carry_breaks_first(st: Study, name: str, trained: tuple[int, int], lengths: list[int], rep: dict,
                        roles: Result, top: int, acc: dict, cmd: str) -> None:
    """From the trained length to the next longer one: does the carry representation or the routing drop more?"""
    lo, hi = trained
    route = {L: float(roles.values[i, top, 0]) for i, L in enumerate(lengths)}
    em = {r["length"]: r["exact_match"] for r in acc["records"]}
    longer = [L for L in lengths if L > hi]
    if not longer:
        return
    L1 = min(longer)
    drops = {what: (1 - d[L1] / d[hi] if d.get(hi) else float("nan")) for what, d in (
        ("the carry representation (carry_out probe)", rep),
        ("the routing (attention of the column head to the operand digits)", route))}
    first = max(drops, key=lambda k: drops[k])
    st.claim(f"{name}, {hi} -> {L1} digits (trained on {lo}..{hi}): carry_out probe accuracy "
             f"{rep[hi]:.3f} -> {rep[L1]:.3f}, {roles.labels['head'][top]}'s attention on the column's "
             f"operands {_pct(route[hi])} -> {_pct(route[L1])}, exact match {_pct(em.get(hi, 0))} -> "
             f"{_pct(em.get(L1, 0))}. Relative drops: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in drops.items())
             + f"; {first} breaks first.", cmd)
