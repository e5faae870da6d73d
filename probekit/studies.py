"""The mechanism studies: each combines the three instruments on shipped models and states claims with numbers.

- `hint_study`: the successor lookup in sorting models (baseline vs hinted), by length.
- `carry_study`: where carries are represented, used and routed in multiplication models, and what breaks
  on longer operands than trained.
- `overview`: accuracy vs length for every shipped model, next to the mechanism metrics.

Each returns a `Study`: claims (text with the numbers in it, and the command that regenerates them),
and the `Result` objects behind them. ``size`` scales the sample sizes ("quick" for tests, "default"
for `probekit report`, "full" for `analyses/run_study.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from probekit.results import Result
from probekit.tasks import Batch, ProbekitError

SIZES = {"quick": {"n": 48, "n_probe": 256, "n_patch": 32}, "default": {"n": 200, "n_probe": 1000, "n_patch": 128},
         "full": {"n": 500, "n_probe": 4000, "n_patch": 256}}


@dataclass
class Study:
    """Claims (each ``{"text", "command"}``) and the results they were computed from."""

    name: str
    title: str
    claims: list[dict] = field(default_factory=list)
    results: dict[str, Result] = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def claim(self, text: str, command: str) -> None:
        self.claims.append({"text": text, "command": command})

    def summary(self) -> str:
        """The claims as text, one ``- claim`` line each with its command below it, then the notes."""
        return "\n".join([f"- {c['text']}\n    [{c['command']}]" for c in self.claims]
                         + [f"note: {n}" for n in self.notes])

    def to_json(self) -> str:
        from probekit.io import dumps_json

        return dumps_json({"name": self.name, "title": self.title, "claims": self.claims, "tables": self.tables,
                           "notes": self.notes, "results": {k: r.to_dict() for k, r in self.results.items()}}, indent=None)


def _size(size: str) -> dict:
    if size not in SIZES:
        raise ProbekitError(f"unknown size {size!r}; expected one of {list(SIZES)}")
    return SIZES[size]


def _metrics(name: str) -> dict | None:
    from probekit.model import MODELS_DIR

    p = MODELS_DIR / name / "metrics.json"
    return json.loads(p.read_text()) if p.exists() else None


def _load(name: str):
    from probekit.model import load_model

    model, task, conf = load_model(name)
    model.probekit_name = name
    return model, task, conf


def value_mask(batch: Batch) -> torch.Tensor:
    """[batch, pos, src]: at a predicting position, the input positions that hold the target *value*
    (any copy): the keys a successor lookup may attend to."""
    tgt = batch.features["target"]  # batch pos
    inp = batch.features["value"] >= 0  # batch src: input positions
    return (batch.tokens[:, None, :] == tgt[:, :, None]) & (tgt[:, :, None] >= 0) & inp[:, None, :]


def _begin(name: str, title: str, models: tuple[str, ...], size: str) -> tuple[Study, list[str], str]:
    """A new study, the requested models that are shipped, and the command that reruns the study."""
    from probekit.model import shipped_models

    st = Study(name, title)
    have = [m for m in models if m in shipped_models()]
    if not have:
        st.notes.append(f"none of {list(models)} is shipped")
    return st, have, f"probekit report --study {name} --size {size}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


# ---------------------------------------------------------------------------------------------- hint study


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


# ---------------------------------------------------------------------------------------------- carry study


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


# ---------------------------------------------------------------------------------------------- overview


def overview() -> Study:
    """Accuracy vs length of every shipped model (from its metrics.json, written by `probekit eval`)."""
    from probekit.evaluate import EvalResult
    from probekit.model import shipped_models

    st = Study("overview", "Extrapolation overview")
    rows = []
    for name in shipped_models():
        m = _metrics(name)
        if m is None:
            continue
        res = EvalResult(**{k: m[k] for k in ("model", "task", "seed", "records")})
        for r in res.records:
            rows.append({"model": name, "length": r["length"], "exact_match": r["exact_match"],
                         "ci_low": r["exact_match_ci95"][0], "ci_high": r["exact_match_ci95"][1]})
        st.claim(f"{name}: " + ", ".join(f"{r['length']}: {_pct(r['exact_match'])}" for r in res.records) + ".",
                 m.get("command", f"probekit eval --model {name}"))
    st.tables["accuracy"] = rows
    return st
