"""The hint study: which components select the next value in the sorting models, what the successor hint
changes in them, and whether the hinted model's own lookup extrapolates.

Pipeline (each stage one function; every mechanism number carries a bootstrap 95 % interval):

1. **components by causal effect** (`_choose_heads`): each head's output patched from the clean into the
   ``successor-change`` run; the share of the logit difference it restores, resampling examples. Heads are
   chosen on one sample of pairs (interval's lower end above `LOOKUP_SHARE`) and tested on another; the
   same heads are compared across models on the same pairs;
2. **necessity** (`_necessity_stage`): each chosen head, and the chosen set, mean-ablated on held-out lists
   (its output replaced at every position by its mean over other lists): the drop in teacher-forced sort-step
   accuracy against random sets of as many unchosen heads (all such sets when there are few; heads of any
   kind when fewer unchosen heads exist than the set has); and, hinted against baseline on the same lists, the
   share of the set's drop that its strongest head alone causes (how concentrated the lookup is);
3. **weights** (`_circuit_stage`): the chosen heads' QK circuits through the embeddings (do keys above
   the query outscore those at or below it?) and their OV copying (``copy_top``: for how many values v does
   ``W_E[v] W_V W_O W_U`` rank v first?), each against heads with random weights of the same norms,
   resampling the values;
4. **interchange interventions** on the successor (pairs with the same previous output and a different
   next value, `_das_stage`): each chosen head's output swapped in, against a random subspace of the same
   size; DAS after each layer's attention, against random subspaces and the full-vector ceiling;
5. **attention** as description (`_attention_stage`): mass on the next value over the uniform share of the
   list, split into repeat steps (the next value equals the previous output) and new-value steps, by
   length, with the teacher-forced accuracy of each step type from the same forward pass;
6. **probes** for the next value (`_probe_stage`), fitted at the training length and scored on held-out
   lists of every length (the training length included), beside the majority-class and the
   token-only baselines;
7. **the hint task itself** (`_hint_task_stage`): the hinted model on its own objective, by length;
8. **seeds** (`_seed_stage`, when a sweep folder is given): the hint gap in exact match by length against every
   control (each named by the budget it shares with the hinted configuration: equal steps, or equal batches of
   the main objective), and the mechanism measures of every finished seed model (`SEED_MEASURES`: the heads
   patching chooses, their restoration, their necessity, the strongest head's QK and OV circuits), hinted
   against each control. Intervals over seeds are Welch t intervals with the seed as the unit (each seed's
   value is its mean over the same examples); a group needs two finished seeds.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from probekit.stats import Hypothesis, bootstrap_ci, paired_bootstrap, ratio_of_means, two_sample_bootstrap
from probekit.studies.common import Study, _begin, _load, _num, _pct, _size, value_mask

LOOKUP_SHARE = 0.10  # a head is chosen when its restoration interval's lower end is above this share
JOINT_SHARE = 0.5  # the chosen heads together "carry" the successor when they restore at least this
HINT_DROP = -0.10  # the hint task "extrapolates" when its per-query accuracy falls by less than 10 points
GAP = 0.30  # the hint gap the sweep must show (exact match, hinted - control)
EXTRA = {  # study-specific sizes: models kept, bootstrap resamples, DAS pairs and fit, random heads, probe fit
    "quick": {"models": 2, "boot": 200, "n_das": 64, "das_steps": 5, "das_batch": 64, "das_controls": 1, "das_layers": 1,
              "interchange_all": False, "circuits_all": False, "ablate_all": False, "max_length": 50, "n_random": 5, "k": 8, "probe_controls": [],
              "probe_iter": 30, "probe_hooks": "resid_mid"},
    "default": {"models": None, "boot": 1000, "n_das": 600, "das_steps": 100, "das_batch": 128, "das_controls": 3, "das_layers": None,
                "interchange_all": True, "circuits_all": True, "ablate_all": True, "max_length": None, "n_random": 20, "k": 8, "probe_controls": ["shuffle"],
                "probe_iter": 100, "probe_hooks": "resid_pre,resid_mid"},
    "full": {"models": None, "boot": 2000, "n_das": 2000, "das_steps": 300, "das_batch": 128, "das_controls": 5, "das_layers": None,
             "interchange_all": True, "circuits_all": True, "ablate_all": True, "max_length": None, "n_random": 50, "k": 8, "probe_controls": ["shuffle"],
             "probe_iter": 100, "probe_hooks": "resid_pre,resid_mid"}}


@dataclass
class _Model:
    """One sorting model and what the stages found about it."""

    name: str
    model: object
    task: object
    train_len: int
    lengths: list[int]
    hints: list[str]  # the hint objectives it was trained on
    chosen: list[tuple[int, int]] = field(default_factory=list)  # heads by causal effect, strongest first
    patch: dict = field(default_factory=dict)  # length -> [example, head + joint + clean + corrupted]
    necessity: dict = field(default_factory=dict)  # length -> ablation records (`_necessity`)

    @property
    def heads(self) -> list[tuple[int, int]]:
        return [(L, h) for L in range(self.model.cfg.n_layers) for h in range(self.model.cfg.n_heads)]


def hint_study(models: tuple[str, ...] = ("sort-baseline", "sort-successor", "sort-predecessor"),
               lengths: tuple[int, ...] = (10, 20, 50, 100), size: str = "default", seed: int = 0,
               sweep: str | Path | None = None) -> Study:
    """What the successor hint changes in the lookup of each sorting model, with intervals and verdicts.

    ``models``: the shipped sorting models (the first without a hint objective is the baseline the hinted
    ones are compared with; ``size="quick"`` keeps it and the first hinted model); ``lengths``: list lengths
    (those the models' context holds; ``size="quick"`` keeps those <= 50); ``sweep``: an optional
    `probekit.sweep` output folder whose finished jobs give the hint gap over seeds and the mechanism measures
    of every finished seed model (configurations trained with a hint objective against each of those without;
    Welch t intervals over seeds, two seeds per group at least).
    """
    sz = _size(size) | EXTRA.get(size, EXTRA["default"])
    st, have, cmd = _begin("hint", "Hint mechanism: what the successor hint changes in the lookup", models, size)
    samples = _Samples(seed, sz)
    gap = _seed_stage(st, sweep, sz, samples, size, seed) if sweep is not None else None
    if not have:
        _headline(st, [], gap)
        return st
    ms = _keep(st, [_prepare(name, lengths, sz) for name in have], sz["models"], size)
    for m in ms:
        _choose_heads(st, m, samples, sz, seed, cmd)
    _compare_heads(st, ms, sz, seed, cmd)
    _necessity_stage(st, ms, samples, sz, seed, cmd)
    _circuit_stage(st, ms, sz, seed, cmd)
    _das_stage(st, ms, samples, sz, seed, cmd)
    _attention_stage(st, ms, samples, sz, seed, cmd)
    _probe_stage(st, ms, samples, sz, seed, cmd)
    _hint_task_stage(st, ms, sz, seed, cmd)
    _figures(st, ms)
    _headline(st, ms, gap)
    return st


def _prepare(source: str, lengths, sz: dict, name: str | None = None) -> _Model:
    """A shipped model (by name) or a model folder (``name`` labels it) as the study's record of it."""
    model, task, conf = _load(source)
    if name is not None:
        model.probekit_name = name
    train = conf.get("train") or {}
    train_len = int(max(train.get("lengths") or [task.default_length]))
    ok = [L for L in dict.fromkeys([*lengths, train_len]) if task.seq_len(L) <= model.cfg.n_ctx
          and (sz["max_length"] is None or L <= sz["max_length"])]
    hints = [o for o in (train.get("objectives") or {}) if o != task.objective]
    return _Model(name or source, model, task, train_len, sorted(ok), hints)


def _keep(st: Study, ms: list[_Model], most: int | None, size: str) -> list[_Model]:
    """At most ``most`` of ``ms`` (None: all), in their order: the baseline first, then the first hinted ones."""
    if most is None or len(ms) <= most:
        return ms
    base = _baseline(ms)
    picked = ([base] if base is not None else []) + [m for m in ms if m is not base]
    keep = [m for m in ms if any(m is k for k in picked[:most])]
    st.notes.append(f"{size} size: only {', '.join(m.name for m in keep)} (the other models at --size default)")
    return keep


class _Samples:
    """The inputs of every stage, sampled once per task so that models with the same task see the same
    examples (their differences are then paired)."""

    def __init__(self, seed: int, sz: dict):
        self.seed, self.sz, self.cache = seed, sz, {}

    def get(self, task, what: str, L: int):
        key = (json.dumps(task.spec(), sort_keys=True), what, L)
        if key not in self.cache:
            self.cache[key] = self._make(task, what, L)
        return self.cache[key]

    def _make(self, task, what: str, L: int):
        from probekit.corruptions import corrupt
        from probekit.interventions import Where, counterfactual_pairs, source_value

        s, sz = self.seed, self.sz
        if what in ("select", "test"):  # successor-change pairs: one sample chooses heads, the other tests them
            off = 3000 if what == "select" else 4000
            return corrupt(task, task.sample(sz["n_patch"], length=L, seed=s + off + L), "successor-change",
                           seed=s + off)
        if what == "batch":
            return task.sample(sz["n"], length=L, seed=s + L)
        if what == "reference":  # the lists whose mean head outputs replace the ablated ones
            return task.sample(sz["n"], length=L, seed=s + 6000 + L)
        if what == "probe_train":
            return task.sample(sz["n_probe"], length=L, seed=s + 1000)
        if what == "probe_eval":
            return task.sample(max(32, sz["n_probe"] // 4), length=L, seed=s + 2000 + L)
        at = Where(step=L // 2)  # "das": same previous output, another next value
        return counterfactual_pairs(task, sz["n_das"], L, vary="target", hold=["prev_output"], at=at,
                                    target=source_value("target", at), seed=s + 5000)


def _label(head: tuple[int, int]) -> str:
    return f"L{head[0]}H{head[1]}"


def _after_attention(model) -> str:
    """The residual site right after a layer's attention: ``resid_mid``, or ``resid_post`` without MLPs."""
    return "resid_post" if model.cfg.attn_only else "resid_mid"


def _ci(x: tuple) -> str:
    return f"{_num(x[0])} [{_num(x[1])}, {_num(x[2])}]"


# ---------------------------------------------------------------------------- 1. components by causal effect


def _patched(model, pair, groups: list[list[tuple[int, int]]]) -> np.ndarray:
    """``[example, group + 2]``: each example's raw logit difference with each group of heads' outputs patched
    from the clean run, then the clean and the corrupted run's (the columns `_share` reads)."""
    from probekit.patching import Component, patch

    comps = [[Component("z", L, h) for L, h in g] for g in groups]
    r = patch(model, pair, comps, metric="logit-diff", normalize=False, per_example=True)
    return np.column_stack([r.extra["per_example"].T.numpy(), r.extra["clean_per_example"].numpy(),
                            r.extra["corrupted_per_example"].numpy()])


def _share(a: np.ndarray, j: int) -> float:
    """The share of the clean-vs-corrupted logit difference that group ``j`` restores (ratio of means)."""
    corr = a[:, -1].mean()
    return float((a[:, j].mean() - corr) / (a[:, -2].mean() - corr))


def _restoration(a: np.ndarray, j: int, sz: dict, seed: int, minus: int | None = None) -> tuple:
    """``(estimate, lo, hi)`` of group ``j``'s share (minus group ``minus``'s), resampling examples."""
    def stat(x):
        return _share(x, j) - (_share(x, minus) if minus is not None else 0.0)

    return bootstrap_ci(a, stat, n_boot=sz["boot"], seed=seed)


def _select(m: _Model, samples: _Samples, sz: dict, seed: int) -> tuple[list[tuple], list[int]]:
    """Set ``m.chosen`` from the selection pairs: the heads whose restoration interval's lower end is above
    `LOOKUP_SHARE`, strongest first (else the strongest alone). Returns each head's estimate and the ranking."""
    sel = _patched(m.model, samples.get(m.task, "select", m.train_len), [[h] for h in m.heads])
    est = [_restoration(sel, j, sz, seed) for j in range(len(m.heads))]
    order = sorted(range(len(m.heads)), key=lambda j: -est[j][0])
    m.chosen = [m.heads[j] for j in order if est[j][1] > LOOKUP_SHARE] or [m.heads[order[0]]]
    return est, order


def _choose_heads(st: Study, m: _Model, samples: _Samples, sz: dict, seed: int, cmd: str) -> None:
    """Choose the lookup heads on the selection pairs; test the ranking and the joint effect on the test pairs."""
    est, order = _select(m, samples, sz, seed)
    groups = [[h] for h in m.heads] + [m.chosen]
    long = [L for L in m.lengths if L > m.train_len and L == max(m.lengths)]
    for L in [m.train_len] + (long if sz["max_length"] is None else []):
        m.patch[L] = _patched(m.model, samples.get(m.task, "test", L), groups)
    test = m.patch[m.train_len]
    for L, a in m.patch.items():
        for j, h in enumerate(m.heads):
            r = _restoration(a, j, sz, seed)
            st.tables.setdefault("lookup_patching", []).append(
                {"model": m.name, "head": _label(h), "length": L, "chosen": h in m.chosen, "restored": r[0],
                 "lo": r[1], "hi": r[2], "selection_estimate": est[j][0] if L == m.train_len else None,
                 "selection_lo": est[j][1] if L == m.train_len else None})
        st.results[f"{m.name}/patch_z_len{L}"] = _patch_result(m, a, samples.get(m.task, "test", L))
    if len(order) > 1:
        _single_head(st, m, test, order, sz, seed, cmd)
    j = _restoration(test, len(m.heads), sz, seed)
    st.test(Hypothesis(f"{m.name}: the chosen heads ({', '.join(map(_label, m.chosen))}) together carry the "
                       "successor (patched jointly they restore at least half of the logit difference)",
                       "restoration(chosen heads together)", ">=", JOINT_SHARE), j[0], j[1:], cmd,
            {"sum of their single-head restorations": sum(_share(test, m.heads.index(h)) for h in m.chosen)},
            n=len(test))
    if len(m.patch) > 1:
        L = max(m.patch)
        st.claim(f"{m.name}: the share each chosen head restores at length {m.train_len} and at length {L} "
                 "(held-out successor-change pairs, 95 % bootstrap intervals): "
                 + "; ".join(f"{_label(h)} {_ci(_restoration(test, m.heads.index(h), sz, seed))} -> "
                             f"{_ci(_restoration(m.patch[L], m.heads.index(h), sz, seed))}" for h in m.chosen)
                 + f"; all chosen heads together {_ci(j)} -> {_ci(_restoration(m.patch[L], len(m.heads), sz, seed))}.",
                 cmd)


def _single_head(st: Study, m: _Model, test: np.ndarray, order: list[int], sz: dict, seed: int, cmd: str) -> None:
    """Does the head ranked first on the selection pairs restore more than the runner-up on the test pairs?"""
    top, second = m.heads[order[0]], m.heads[order[1]]
    d = _restoration(test, order[0], sz, seed, minus=order[1])
    st.test(Hypothesis(f"{m.name}: one head carries the successor lookup (the head that restores most on the "
                       f"selection pairs, {_label(top)}, restores more than the runner-up {_label(second)} on "
                       "held-out pairs)", "restoration(top) - restoration(runner-up)", ">", 0.0),
            d[0], d[1:], cmd, {"top": _share(test, order[0]), "runner-up": _share(test, order[1])}, n=len(test))


def _patch_result(m: _Model, a: np.ndarray, pair):
    """The shares of one model's heads as a ``(layer, head)`` `Result`, as `probekit.patching.sweep` gives them."""
    from probekit.results import Result

    nL, nH = m.model.cfg.n_layers, m.model.cfg.n_heads
    vals = torch.tensor([_share(a, j) for j in range(nL * nH)]).view(nL, nH)
    return Result(kind="patch_z", values=vals, axes=("layer", "head"),
                  labels={"layer": list(range(nL)), "head": list(range(nH))},
                  settings={"model": m.name, "length": pair.clean.length, "n": len(a), "corruption": pair.settings(),
                            "metric": "logit-diff", "site": "z", "normalized": True, "direction": "denoise"})


def _baseline(ms: list[_Model]) -> _Model | None:
    return next((m for m in ms if not m.hints), None)


def _same_pairs(a: _Model, b: _Model) -> bool:
    return a.task.spec() == b.task.spec() and a.heads == b.heads


def _compare_heads(st: Study, ms: list[_Model], sz: dict, seed: int, cmd: str) -> None:
    """The hinted model's top head against the same head of the baseline, on the same held-out pairs."""
    base = _baseline(ms)
    for m in ms:
        if base is None or m is base or not _same_pairs(m, base):
            continue
        h = m.chosen[0]
        j = m.heads.index(h)
        a, b = m.patch[m.train_len], base.patch[base.train_len]
        W = a.shape[1]
        both = np.hstack([a, b])
        d = bootstrap_ci(both, lambda x, W=W, j=j: _share(x[:, :W], j) - _share(x[:, W:], j), n_boot=sz["boot"],
                         seed=seed)
        st.test(Hypothesis(f"the hint makes {_label(h)} ({m.name}'s strongest head) more causal for the successor "
                           f"than the same head of {base.name} (same held-out successor-change pairs)",
                           f"restoration difference ({m.name} - {base.name})", ">", 0.0), d[0], d[1:], cmd,
                {f"{base.name}'s own strongest head {_label(base.chosen[0])}":
                 _share(b, base.heads.index(base.chosen[0]))}, n=len(a))


# ---------------------------------------------------------------------------- 2. necessity by ablation


@torch.no_grad()
def _ablated(model, batch, ref, sets: list[list[tuple[int, int]]]) -> np.ndarray:
    """``[list, set + 1, measure]``: each list's teacher-forced sort-step accuracy and mean logit margin (the
    answer's logit minus the largest other) with each set of heads mean-ablated (each head's output replaced, at
    every position, by its mean over the ``ref`` lists), then the clean run's (last)."""
    from probekit.attribution import ablation_hooks
    from probekit.metrics import metric_value

    def run() -> list[np.ndarray]:
        lg = model(batch.tokens)
        return [metric_value(lg, batch, k, per_example=True).float().cpu().numpy() for k in ("acc", "margin")]

    cols = []
    for s in sets:
        with ablation_hooks(model, batch, s, "mean", reference=ref):
            cols.append(run())
    cols.append(run())
    return np.array(cols).transpose(2, 0, 1)


def _random_sets(heads: list, target: list, exclude: list, n: int, seed: int) -> tuple[list[list], str]:
    """The control of ablating ``target``: up to ``n`` distinct sets of as many heads, drawn from the heads not in
    ``exclude`` (all such sets when there are at most ``n``) or, when those are fewer than ``target``, from every
    head with ``target`` itself left out. Returns the sets and which heads they were drawn from."""
    k = len(target)
    others = [h for h in heads if h not in exclude]
    pool, what = (others, "unchosen heads") if len(others) >= k else (heads, "heads drawn from all heads")
    total = math.comb(len(pool), k) - (pool is heads)
    if total <= n:
        return [list(c) for c in itertools.combinations(pool, k) if set(c) != set(target)], what
    rng, seen = np.random.default_rng(seed), {tuple(sorted(target))}
    while len(seen) <= n:
        seen.add(tuple(sorted(pool[i] for i in rng.choice(len(pool), size=k, replace=False))))
    return [list(c) for c in sorted(seen - {tuple(sorted(target))})], what


def _necessity(m: _Model, samples: _Samples, sz: dict, seed: int, L: int, targets: list[list]) -> list[dict]:
    """Per target set of heads, on the test lists of length ``L``: each list's drop (clean - ablated) in accuracy
    and margin when the set is mean-ablated, and the mean drop over its random control sets (`_random_sets`)."""
    batch, ref = samples.get(m.task, "batch", L), samples.get(m.task, "reference", L)
    out = []
    for i, t in enumerate(targets):
        ctrl, pool = _random_sets(m.heads, t, m.chosen, sz["n_random"], seed + i)
        a = _ablated(m.model, batch, ref, [t] + ctrl)
        drop = a[:, -1:] - a[:, :-1]  # list set measure
        out.append({"heads": t, "clean": a[:, -1], "drop": drop[:, 0], "sets": ctrl, "n_control": len(ctrl),
                    "pool": pool, "control": drop[:, 1:].mean(1) if ctrl else None})
    return out


def _drops(top: dict, group: dict) -> np.ndarray:
    """Rows ``[drop(strongest head), drop(chosen set), 0]`` per list, as `ratio_of_means` reads them: the share of
    the set's mean accuracy drop that ablating its strongest head alone causes (NaN when the set costs nothing)."""
    return np.column_stack([top["drop"][:, 0], group["drop"][:, 0], np.zeros(len(top["drop"]))])


def _concentration(top: dict, group: dict, sz: dict, seed: int) -> tuple:
    """`_drops`'s share with its bootstrap interval over lists."""
    return bootstrap_ci(_drops(top, group), ratio_of_means, n_boot=sz["boot"], seed=seed)


def _necessity_targets(m: _Model, every: bool) -> list[list]:
    """The strongest chosen head (every chosen head with ``every``), then the chosen set when it has several heads."""
    singles = [[h] for h in (m.chosen if every else m.chosen[:1])]
    return singles + ([list(m.chosen)] if len(m.chosen) > 1 else [])


def _necessity_stage(st: Study, ms: list[_Model], samples: _Samples, sz: dict, seed: int, cmd: str) -> None:
    """Mean-ablate the chosen heads (each, and as a set) against random heads of the same count, then compare the
    hinted models' concentration with the baseline's."""
    for m in ms:
        for L in m.patch:  # the training length, and the longest length where patching was measured there
            m.necessity[L] = _necessity(m, samples, sz, seed, L, _necessity_targets(m, sz["ablate_all"]))
            for r in m.necessity[L]:
                for j, what in enumerate(("accuracy", "margin")):
                    e = bootstrap_ci(r["drop"][:, j], n_boot=sz["boot"], seed=seed)
                    st.tables.setdefault("ablation", []).append(
                        {"model": m.name, "heads": ", ".join(map(_label, r["heads"])), "length": L, "measure": what,
                         "clean": float(r["clean"][:, j].mean()), "drop": e[0], "lo": e[1], "hi": e[2],
                         "random_drop": None if r["control"] is None else float(r["control"][:, j].mean()),
                         "random_sets": r["n_control"], "random_from": r["pool"], "n_lists": len(r["drop"])})
        for r in m.necessity[m.train_len]:
            _necessity_test(st, m, r, sz, seed, cmd)
    _compare_concentration(st, ms, sz, seed, cmd)


def _necessity_test(st: Study, m: _Model, r: dict, sz: dict, seed: int, cmd: str) -> None:
    """Does mean-ablating this set of chosen heads cost more sort-step accuracy than its random control sets?"""
    heads = ", ".join(map(_label, r["heads"]))
    if r["control"] is None:
        st.notes.append(f"{m.name}: no other heads to ablate in place of {heads}; its necessity is not tested")
        return
    d = bootstrap_ci(r["drop"][:, 0] - r["control"][:, 0], n_boot=sz["boot"], seed=seed)
    st.test(Hypothesis(f"{m.name}: mean-ablating {'the chosen heads ' if len(r['heads']) > 1 else ''}{heads} lowers "
                       f"sort-step accuracy more than mean-ablating as many random {r['pool']} does "
                       f"({len(r['heads'])} heads, {r['n_control']} random sets, never this set; teacher forced, "
                       f"held-out length-{m.train_len} lists)",
                       "accuracy drop(chosen) - mean accuracy drop(random sets)", ">", 0.0), d[0], d[1:], cmd,
            {"clean accuracy": float(r["clean"][:, 0].mean()), "drop": float(r["drop"][:, 0].mean()),
             "random sets' drop": float(r["control"][:, 0].mean())}, n=len(r["drop"]))


def _compare_concentration(st: Study, ms: list[_Model], sz: dict, seed: int, cmd: str) -> None:
    """Is a hinted model's lookup more concentrated in its strongest head than the baseline's (same lists)?"""
    base = _baseline(ms)
    for m in ms:
        if base is None or m is base or not _same_pairs(m, base):
            continue
        a, b = m.necessity[m.train_len], base.necessity[base.train_len]
        rows = np.hstack([_drops(a[0], a[-1]), _drops(b[0], b[-1])])
        d = bootstrap_ci(rows, lambda x: ratio_of_means(x[:, :3]) - ratio_of_means(x[:, 3:]), n_boot=sz["boot"],
                         seed=seed)
        st.test(Hypothesis(f"the hint concentrates the lookup ({m.name}'s strongest head {_label(m.chosen[0])} causes "
                           f"a larger share of the accuracy drop of its chosen heads under mean-ablation than "
                           f"{base.name}'s strongest head {_label(base.chosen[0])} does of {base.name}'s; same lists)",
                           f"share of the chosen heads' drop from the strongest alone ({m.name} - {base.name})",
                           ">", 0.0), d[0], d[1:], cmd,
                {f"{m.name} share": _concentration(a[0], a[-1], sz, seed)[0],
                 f"{base.name} share": _concentration(b[0], b[-1], sz, seed)[0],
                 f"{m.name} chosen heads' drop": float(a[-1]["drop"][:, 0].mean()),
                 f"{base.name} chosen heads' drop": float(b[-1]["drop"][:, 0].mean())}, n=len(rows))


# ---------------------------------------------------------------------------- 3. weights


def _circuit_rows(m: _Model, heads: list[tuple[int, int]], sz: dict, seed: int) -> dict:
    """Per head: the QK circuit's row scores (succ_above over query values) and the OV circuit's copying
    (copy_auc and copy_top over source values: does ``W_E[v] W_V W_O W_U`` rank v first?), with the same
    statistics (means over values) for heads of random weights of the same norms."""
    from probekit.circuits import ov_circuit, qk_circuit, random_circuits, row_scores

    qk = qk_circuit(m.model, heads=heads, task=m.task)
    ov = ov_circuit(m.model, heads=heads, task=m.task)
    out = {}
    for i, h in enumerate(heads):
        rand = {kind: random_circuits(m.model, h, kind, n=sz["n_random"], seed=seed, task=m.task).values
                for kind in ("qk", "ov")}
        scores = {"qk": row_scores(qk.values[i]), "ov": row_scores(ov.values[i])}
        rows = {kind: [row_scores(M) for M in rand[kind]] for kind in rand}
        out[h] = {}
        for kind, score in (("qk", "succ_above"), ("ov", "copy_auc"), ("ov", "copy_top")):
            out[h][score] = scores[kind][score].numpy()
            out[h][f"random_{score}"] = np.array([float(r[score].mean()) for r in rows[kind]])
    return out


def _circuit_stage(st: Study, ms: list[_Model], sz: dict, seed: int, cmd: str) -> None:
    """QK successor ordering and OV copying of the chosen heads (every model's chosen heads in every model)."""
    heads = sorted({h for m in ms for h in (m.chosen if sz["circuits_all"] else m.chosen[:1])})
    rows = {m.name: _circuit_rows(m, [h for h in heads if h in m.heads], sz, seed) for m in ms}
    for m in ms:
        for h, r in rows[m.name].items():
            for score in ("succ_above", "copy_auc", "copy_top"):
                est = bootstrap_ci(r[score], n_boot=sz["boot"], seed=seed)
                rnd = r[f"random_{score}"]
                st.tables.setdefault("circuits", []).append(
                    {"model": m.name, "head": _label(h), "chosen": h in m.chosen, "circuit": score, "value": est[0],
                     "lo": est[1], "hi": est[2], "random_mean": float(rnd.mean()),
                     "random_q975": float(np.quantile(rnd, 0.975))})
        for h in m.chosen if sz["circuits_all"] else m.chosen[:1]:
            _circuit_tests(st, m, h, rows[m.name][h], sz, seed, cmd)
    base = _baseline(ms)
    for m in ms:
        if base is None or m is base or m.chosen[0] not in rows[base.name]:
            continue
        h = m.chosen[0]
        d = paired_bootstrap(rows[m.name][h]["succ_above"], rows[base.name][h]["succ_above"], n_boot=sz["boot"],
                             seed=seed)
        st.test(Hypothesis(f"the hint strengthens the successor ordering of {_label(h)}'s QK circuit ({m.name} against "
                           f"the same head of {base.name}; the same query values)",
                           f"succ_above difference ({m.name} - {base.name})", ">", 0.0), d[0], d[1:], cmd,
                n=len(rows[m.name][h]["succ_above"]))


def _circuit_tests(st: Study, m: _Model, h: tuple[int, int], r: dict, sz: dict, seed: int, cmd: str) -> None:
    """One chosen head's QK successor ordering and OV copying against 97.5 % of random heads of the same norms."""
    who = f"{_label(h)} ({'its strongest head' if h == m.chosen[0] else 'a chosen head'})"
    for score, text, stat in (
            ("succ_above", f"the QK circuit of {who} orders keys like a successor lookup (keys above the query "
                           "outscore keys at or below it)", "succ_above (mean over query values)"),
            ("copy_top", f"the OV circuit of {who} copies the attended value (W_E[v] W_V W_O W_U ranks v first, "
                         "for a fraction of the values v)", "copy_top (fraction of source values)")):
        est = bootstrap_ci(r[score], n_boot=sz["boot"], seed=seed)
        q = float(np.quantile(r[f"random_{score}"], 0.975))
        st.test(Hypothesis(f"{m.name}: {text} more than 97.5 % of heads with random weights of the same norms do",
                           stat, ">", q), est[0], est[1:], cmd,
                {"random heads' mean": float(r[f"random_{score}"].mean())}, n=len(r[score]))


# ---------------------------------------------------------------------------- 4. interchange interventions


def _head_interchange(m: _Model, pairs, h: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: does swapping in head ``h``'s output from the source (at the answer step) give the source's
    next value? The same for a random subspace of the same size of that layer's head outputs (control)."""
    from probekit.interventions import Location, SubspaceInterchange, interchange_correct, random_subspace

    nH, dh = m.model.cfg.n_heads, m.model.cfg.d_head
    loc = Location("attn.hook_z", h[0], pairs.at)
    basis = torch.eye(nH * dh)[h[1] * dh:(h[1] + 1) * dh]
    mine = interchange_correct(m.model, pairs, loc, SubspaceInterchange(basis))
    ctrl = interchange_correct(m.model, pairs, loc, random_subspace(nH * dh, dh, seed=seed))
    return mine.float().numpy(), ctrl.float().numpy()


def _das_stage(st: Study, ms: list[_Model], samples: _Samples, sz: dict, seed: int, cmd: str) -> None:
    """Head interchanges of the chosen heads, then DAS after each layer's attention, per model."""
    from probekit.interventions import Location, fit_das

    fits = {}
    for m in ms:
        pairs = samples.get(m.task, "das", m.train_len)
        for h in m.chosen if sz["interchange_all"] else m.chosen[:1]:
            mine, ctrl = _head_interchange(m, pairs, h, seed)
            d = paired_bootstrap(mine, ctrl, n_boot=sz["boot"], seed=seed)
            iia = bootstrap_ci(mine, n_boot=sz["boot"], seed=seed)
            st.tables.setdefault("interchange", []).append(
                {"model": m.name, "where": f"{_label(h)} output", "k": m.model.cfg.d_head, "iia": iia[0],
                 "lo": iia[1], "hi": iia[2], "control": float(ctrl.mean()), "ceiling": None, "floor": None})
            if h == m.chosen[0]:
                st.test(Hypothesis(f"{m.name}: {_label(h)}'s output carries the next value (swapped in from a list with "
                                   "the same previous output and another next value, it moves the answer to that "
                                   "value more often than a random subspace of the same size)",
                                   "IIA(head output) - IIA(random subspace)", ">", 0.0), d[0], d[1:], cmd,
                        {"IIA": iia[0], "random subspace": float(ctrl.mean())}, n=pairs.n)
        layers = range(m.model.cfg.n_layers)
        for L in (list(layers) if sz["das_layers"] is None else sorted({m.chosen[0][0]}))[: sz["das_layers"]]:
            fit = fit_das(m.model, pairs, Location(_after_attention(m.model), L, pairs.at), k=sz["k"],
                          steps=sz["das_steps"],
                          batch_size=sz["das_batch"], n_controls=sz["das_controls"], n_boot=sz["boot"], seed=seed)
            fits[m.name, L] = fit
            s = fit.summary()
            st.tables.setdefault("interchange", []).append(
                {"model": m.name, "where": f"DAS {fit.location}", "k": sz["k"], "iia": s["iia"], "lo": s["iia_lo"],
                 "hi": s["iia_hi"], "control": s["control_mean"], "ceiling": s["ceiling"], "floor": s["floor"]})
    _das_claims(st, ms, fits, sz, seed, cmd)


def _das_claims(st: Study, ms: list[_Model], fits: dict, sz: dict, seed: int, cmd: str) -> None:
    """DAS above its random-subspace control (per model, after its strongest head's layer) and hinted vs baseline."""
    base = _baseline(ms)
    for m in ms:
        L = m.chosen[0][0]
        fit = fits.get((m.name, L)) or next((f for (n, _), f in fits.items() if n == m.name), None)
        if fit is None:
            continue
        c = float(fit.control.mean())
        st.test(Hypothesis(f"{m.name}: a {sz['k']}-dimensional subspace at {fit.location} carries the next value "
                           "(DAS, held-out pairs) beyond random subspaces of the same size",
                           "IIA(DAS) - IIA(random subspaces)", ">", 0.0), fit.iia - c,
                (fit.interval[0] - c, fit.interval[1] - c), cmd,
                {"IIA": fit.iia, "random subspaces": c, "full vector": fit.ceiling, "base run": fit.floor},
                n=int(fit.correct.numel()))
        if base is None or m is base or (base.name, L) not in fits or not _same_pairs(m, base):
            continue
        a, b = fits[m.name, L].correct.float().numpy(), fits[base.name, L].correct.float().numpy()
        d = paired_bootstrap(a, b, n_boot=sz["boot"], seed=seed)
        st.test(Hypothesis(f"the hint makes the next value more linearly swappable at {fits[m.name, L].location} ({m.name} against "
                           f"{base.name}, DAS with k = {sz['k']} on the same held-out pairs)",
                           f"IIA difference ({m.name} - {base.name})", ">", 0.0), d[0], d[1:], cmd, n=len(a))


# ---------------------------------------------------------------------------- 5. attention and step types


def _step_queries(batch) -> dict:
    """The sort steps of a batch as queries: mask [batch, pos], step type, example, the target value's keys."""
    q = batch.features["step"] >= 0
    tgt = batch.features["target"][q]
    prev = batch.features["prev_output"][q]
    types = np.where((tgt == prev).numpy(), "repeat", "new")
    ex = torch.arange(batch.n)[:, None].expand_as(q)[q].numpy()
    inputs = (batch.features["value"] >= 0)[:, None, :].expand(-1, batch.seq_len, -1)[q]
    return {"mask": q, "types": types, "example": ex, "target": value_mask(batch)[q].numpy(),
            "visible": inputs.numpy(), "answer": tgt.numpy()}


@torch.no_grad()
def _attention_one(m: _Model, batch, heads: list[tuple[int, int]], sz: dict, seed: int) -> tuple[list, list]:
    """One model on one batch: chance-normalised attention rows per head and step type, and teacher-forced
    accuracy rows per step type."""
    from probekit.stats import chance_normalised_attention

    qs = _step_queries(batch)
    names = {f"blocks.{L}.attn.hook_pattern" for L, _ in heads}
    logits, cache = m.model.run_with_cache(batch.tokens, names_filter=lambda n: n in names)
    att = []
    for h in heads:
        A = cache[f"blocks.{h[0]}.attn.hook_pattern"][:, h[1]][qs["mask"]].float().numpy()
        res = chance_normalised_attention(A, qs["target"], qs["types"], visible=qs["visible"], n_boot=sz["boot"],
                                          seed=seed, groups=qs["example"])
        att += [{"model": m.name, "head": _label(h), "chosen": h in m.chosen, "length": batch.length, "step": t,
                 "ratio": r["ratio"], "lo": r["ratio_ci95"][0], "hi": r["ratio_ci95"][1], "mass": r["mass"],
                 "chance": r["chance"], "n": r["n"]} for t, r in res.items()]
    correct = (logits[qs["mask"]].argmax(-1).cpu().numpy() == qs["answer"]).astype(float)
    acc = []
    for t in ("new", "repeat"):
        sel = qs["types"] == t
        if sel.sum() >= 2 and np.unique(qs["example"][sel]).size >= 2:
            e = bootstrap_ci(correct[sel], n_boot=sz["boot"], seed=seed, groups=qs["example"][sel])
            acc.append({"model": m.name, "length": batch.length, "what": f"sort, {t}-value steps", "step": t,
                        "accuracy": e[0], "lo": e[1], "hi": e[2], "n": int(sel.sum()),
                        "correct": correct[sel], "example": qs["example"][sel]})
    return att, acc


def _attention_stage(st: Study, ms: list[_Model], samples: _Samples, sz: dict, seed: int, cmd: str) -> None:
    """Attention of every chosen head (in every model) by length and step type; accuracy by step type."""
    heads = sorted({h for m in ms for h in m.chosen})
    for m in ms:
        acc = []
        for L in m.lengths:
            batch = samples.get(m.task, "batch", L)
            att, a = _attention_one(m, batch, [h for h in heads if h in m.heads], sz, seed)
            st.tables.setdefault("attention", []).extend(att)
            acc += a
            if m is ms[0]:
                share = bootstrap_ci(np.array([np.mean(t == "repeat") for t in np.split(
                    _step_queries(batch)["types"], batch.n)]), n_boot=sz["boot"], seed=seed)
                st.tables.setdefault("repeat_share", []).append(
                    {"length": L, "repeat_share": share[0], "lo": share[1], "hi": share[2], "n_lists": batch.n})
        st.tables.setdefault("accuracy_by_step", []).extend(
            {k: v for k, v in r.items() if k not in ("correct", "example")} for r in acc)
        _attention_claims(st, m, acc, sz, seed, cmd)


def _attention_claims(st: Study, m: _Model, acc: list[dict], sz: dict, seed: int, cmd: str) -> None:
    """New-value attention of the strongest head above chance at the longest length; both step types' accuracy
    against the training length (the repeat-or-advance decision, not only the lookup)."""
    long = max(m.lengths)
    row = next((r for r in st.tables["attention"] if r["model"] == m.name and r["head"] == _label(m.chosen[0])
                and r["length"] == long and r["step"] == "new"), None)
    if row is not None:
        st.test(Hypothesis(f"{m.name}: on new-value steps of length-{long} lists, {_label(m.chosen[0])} puts more "
                           "attention on the next value than uniform attention over the list would",
                           "attention mass / uniform share", ">", 1.0), row["ratio"], (row["lo"], row["hi"]), cmd,
                {"mass": row["mass"], "uniform share": row["chance"]}, n=row["n"])
    if long == m.train_len:
        return
    for t in ("repeat", "new"):
        a = next((r for r in acc if r["length"] == long and r["step"] == t), None)
        b = next((r for r in acc if r["length"] == m.train_len and r["step"] == t), None)
        if a is None or b is None:
            continue
        d = two_sample_bootstrap(a["correct"], b["correct"], n_boot=sz["boot"], seed=seed, groups_a=a["example"],
                                 groups_b=b["example"])
        st.test(Hypothesis(f"{m.name}: {t}-value steps fail more often at length {long} than at the training length "
                           f"{m.train_len} (teacher forced)", f"accuracy on {t}-value steps ({long} - {m.train_len})",
                           "<", 0.0), d[0], d[1:], cmd, {f"length {m.train_len}": b["accuracy"],
                                                         f"length {long}": a["accuracy"]}, n=a["n"])


# ---------------------------------------------------------------------------- 6. probes


def _probe_rows(m: _Model, sweep_p, train, evals: dict, sz: dict, seed: int) -> list[dict]:
    """Per site and held-out length: probe accuracy, the token-only and majority baselines, each with a
    cluster-bootstrap interval over lists; ``correct`` / ``token`` / ``example`` kept for paired tests."""
    from probekit.activations import collect
    from probekit.stats import majority_baseline, token_baseline

    hooks = sorted({k[0] for k in sweep_p.probes if k[1] == "all"})
    q = train.features["target"] >= 0  # the probe's rows: the positions that predict a next value
    tr_token, tr_label = train.tokens[q], train.features["target"][q]
    rows = []
    for L, b in evals.items():
        ev = collect(m.model, b, hooks, feature="target")
        y, ex = ev.labels.numpy(), ev.example.numpy()
        tok = token_baseline(tr_token, tr_label, ev.token, y)
        fallback = majority_baseline(tr_label, y)
        tok_ok = (np.array([tok["table"].get(t, fallback["label"]) for t in ev.token.tolist()]) == y).astype(float)
        for hook in hooks:
            ok = (sweep_p.probes[hook, "all"].predict(ev.acts[hook]).numpy() == y).astype(float)
            e = bootstrap_ci(ok, n_boot=sz["boot"], seed=seed, groups=ex)
            t = bootstrap_ci(tok_ok, n_boot=sz["boot"], seed=seed, groups=ex)
            site = hook.removeprefix("blocks.").replace(".hook_", " ")
            rows.append({"model": m.name, "site": f"L{site}", "hook": hook, "length": int(L), "accuracy": e[0],
                         "lo": e[1], "hi": e[2], "token_only": t[0], "token_lo": t[1], "token_hi": t[2],
                         "majority": fallback["accuracy"], "n_rows": len(y), "correct": ok, "token_ok": tok_ok,
                         "example": ex})
    return rows


def _probe_stage(st: Study, ms: list[_Model], samples: _Samples, sz: dict, seed: int, cmd: str) -> None:
    """Next-value probes at every layer's input and after its attention, held out at every length."""
    from probekit.probes import probe_sweep

    for m in ms:
        train = samples.get(m.task, "probe_train", m.train_len)
        evals = {str(L): samples.get(m.task, "probe_eval", L) for L in m.lengths}
        sw = probe_sweep(m.model, train, "target", hooks=sz["probe_hooks"].replace("resid_mid", _after_attention(m.model)),
                         evals=evals,
                         controls=sz["probe_controls"], max_iter=sz["probe_iter"], seed=seed)
        st.results[f"{m.name}/probe_target"] = sw
        rows = _probe_rows(m, sw, train, evals, sz, seed)
        last = f"blocks.{m.model.cfg.n_layers - 1}.hook_{_after_attention(m.model)}"
        st.tables.setdefault("probes", []).extend(
            {k: v for k, v in r.items() if k not in ("correct", "token_ok", "example", "hook")}
            | {"after_last_attention": r["hook"] == last} for r in rows)
        for L in dict.fromkeys([m.train_len, max(m.lengths)]):
            r = next(r for r in rows if r["hook"] == last and r["length"] == L)
            d = bootstrap_ci(np.column_stack([r["correct"], r["token_ok"]]), lambda a: a[:, 0].mean() - a[:, 1].mean(),
                             n_boot=sz["boot"], seed=seed, groups=r["example"])
            st.test(Hypothesis(f"{m.name}: after the last attention layer ({r['site']}) the next value is linearly "
                               f"readable beyond what the input token alone predicts, on held-out length-{L} lists "
                               f"(probe fitted at length {m.train_len})",
                               "probe accuracy - token-only baseline", ">", 0.0), d[0], d[1:], cmd,
                    {"probe": r["accuracy"], "token-only": r["token_only"], "majority class": r["majority"]},
                    n=r["n_rows"])


# ---------------------------------------------------------------------------- 7. the hint task itself


@torch.no_grad()
def _hint_accuracy(m: _Model, objective: str, L: int, sz: dict, seed: int) -> dict:
    """Greedy decoding of the hint task at length L: exact match (Wilson) and per-query accuracy (bootstrap
    over lists), with each list's per-query accuracy kept for tests."""
    from probekit.evaluate import greedy_decode, wilson

    batch = m.task.with_objective(objective).sample(sz["n"], length=L, seed=seed + 7000 + L)
    pred = greedy_decode(m.model, batch)
    mask = batch.answer_mask
    per_list = ((pred == batch.tokens) & mask).sum(1).float() / mask.sum(1).float()
    exact = ((pred == batch.tokens) | ~mask).all(1)
    k = int(exact.sum())
    e = bootstrap_ci(per_list.numpy(), n_boot=sz["boot"], seed=seed)
    return {"model": m.name, "length": L, "what": "own hint task, per query", "objective": objective,
            "accuracy": e[0], "lo": e[1],
            "hi": e[2], "exact_match": k / batch.n, "exact_lo": wilson(k, batch.n)[0],
            "exact_hi": wilson(k, batch.n)[1], "n": batch.n, "per_list": per_list.numpy()}


def _hint_task_stage(st: Study, ms: list[_Model], sz: dict, seed: int, cmd: str) -> None:
    """Each hinted model on its own hint objective at every length: does its lookup extrapolate there?"""
    for m in ms:
        for obj in m.hints:
            rows = [_hint_accuracy(m, obj, L, sz, seed) for L in m.lengths]
            st.tables.setdefault("accuracy_by_step", []).extend(
                {k: v for k, v in r.items() if k != "per_list"} | {"step": "query"} for r in rows)
            st.claim(f"{m.name} on its own {obj} hint (greedy; queries given, answers decoded): per-query accuracy "
                     + ", ".join(f"length {r['length']}: {_ci((r['accuracy'], r['lo'], r['hi']))}" for r in rows)
                     + "; exact match " + ", ".join(f"{r['length']}: {_pct(r['exact_match'])} "
                                                     f"[{_pct(r['exact_lo'])}, {_pct(r['exact_hi'])}]" for r in rows)
                     + " (Wilson).", cmd)
            a, b = rows[-1], next(r for r in rows if r["length"] == m.train_len)
            if a is b:
                continue
            d = two_sample_bootstrap(a["per_list"], b["per_list"], n_boot=sz["boot"], seed=seed)
            st.test(Hypothesis(f"{m.name}'s own lookup extrapolates on its {obj} hint task: per-query accuracy at "
                               f"length {a['length']} is within {-100 * HINT_DROP:.0f} points of length {m.train_len}",
                               f"per-query accuracy ({a['length']} - {m.train_len})", ">", HINT_DROP), d[0], d[1:], cmd,
                    {f"length {m.train_len}": b["accuracy"], f"length {a['length']}": a["accuracy"]}, n=a["n"])


# ---------------------------------------------------------------------------- 8. seeds from a sweep


@dataclass
class _Sweep:
    """The finished jobs of a sweep folder by configuration, with what each configuration was trained on."""

    out: Path
    jobs: dict  # config -> [finished Job] (records: a sweep folder, or its archive without weights)
    hints: dict  # config -> hint objectives
    budget: dict  # config -> (steps, expected batches of the main objective)
    main: str  # the main objective
    trained: dict = field(default_factory=dict)  # config -> longest training length


def _read_sweep(out) -> _Sweep:
    from probekit.grid import finished_record, grid_from_dict, parse_run
    from probekit.tasks import ProbekitError

    record = Path(out) / "sweep.json"
    if not record.exists():
        raise ProbekitError(f"{out} holds no sweep.json; expected the --out folder of a sweep (probekit sweep)")
    grid = grid_from_dict(json.loads(record.read_text())["grid"], str(record))
    sw = _Sweep(Path(out), {}, {}, {}, "")
    for config in grid.configs:
        _, task, tcfg = parse_run(grid.run_config(config, grid.seeds[0]))
        w = tcfg.objectives or {task.objective: 1.0}
        sw.main = task.objective
        sw.hints[config] = [o for o in w if o != task.objective]
        sw.budget[config] = (tcfg.steps, tcfg.steps * w.get(task.objective, 0.0) / sum(w.values()))
        sw.jobs[config] = [j for j in grid.jobs(out, select=[config]) if finished_record(j)]
        sw.trained[config] = max(tcfg.lengths or [task.default_length])
    return sw


def _seed_values(sw: _Sweep) -> dict:
    """``{config: {length: [exact match per finished seed]}}``."""
    from probekit.grid import read_metrics

    values = {}
    for config, jobs in sw.jobs.items():
        for job in jobs:
            for r in read_metrics(job)["records"]:
                values.setdefault(config, {}).setdefault(r["length"], []).append(r["exact_match"])
    return values


def _budget_match(sw: _Sweep, hinted: str, control: str) -> str:
    """What the control shares with the hinted configuration's training budget, in words."""
    (sh, bh), (sc, bc) = sw.budget[hinted], sw.budget[control]
    same = [w for w, ok in (("steps", sh == sc), (f"{sw.main} batches", round(bh) == round(bc))) if ok]
    if same:
        return f"equal {' and '.join(same)}"
    return f"{sc} steps and {bc:g} {sw.main} batches against {sh} and {bh:g}"


def _pairs(sw: _Sweep) -> list[tuple[str, str]]:
    return [(h, c) for h in sw.jobs if sw.hints[h] for c in sw.jobs if not sw.hints[c]]


def _seed_stage(st: Study, out, sz: dict, samples: _Samples, size: str, seed: int) -> dict:
    """The hint gap in exact match over seeds, then the mechanism measures of every finished seed model."""
    sw = _read_sweep(out)
    cmd = (f"python -c \"from probekit.studies import hint_study; "
           f"print(hint_study(size='{size}', sweep='{out}').summary())\"")
    gap = _seed_gap(st, sw, cmd)
    _gap_figure(st)
    rows = _seed_mechanisms(st, sw, sz, samples, seed)
    gap["mechanism"] = _mechanism_gaps(st, sw, rows, cmd)
    return gap


def _seed_gap(st: Study, sw: _Sweep, cmd: str) -> dict:
    """The hint gap over seeds at each length: hinted configurations against each control (Welch t interval);
    the success criterion: >= `GAP` at some length beyond training, against every control, with the two
    groups' own t intervals apart. Returns ``{"tested": bool, "met": bool, "lengths": [...]}``."""
    from probekit.grid import seed_interval
    from probekit.stats import welch_interval

    values = _seed_values(sw)
    met = {}
    for h, c in _pairs(sw):
        match = _budget_match(sw, h, c)
        for L in sorted(set(values.get(h, {})) & set(values.get(c, {}))):
            a, b = values[h][L], values[c][L]
            if min(len(a), len(b)) < 2:
                st.notes.append(f"sweep {sw.out}: {h} vs {c} at length {L}: fewer than 2 finished seeds in a group")
                continue
            d, lo, hi, df = welch_interval(a, b)
            ia, ib = seed_interval(a), seed_interval(b)
            apart = ia[1] > ib[2]
            st.tables.setdefault("hint_gap", []).append(
                {"hinted": h, "control": c, "control_budget": match, "length": L, "seeds": f"{len(a)}/{len(b)}",
                 "hinted_mean": ia[0], "hinted_lo": ia[1], "hinted_hi": ia[2], "control_mean": ib[0],
                 "control_lo": ib[1], "control_hi": ib[2], "gap": d, "lo": lo, "hi": hi, "df": df,
                 "intervals_apart": apart})
            v = st.test(Hypothesis(f"the {'+'.join(sw.hints[h])} hint ({h}) beats {c} by at least {100 * GAP:.0f} "
                                   f"points of exact match at length {L}, over seeds ({c}: {match})",
                                   "exact-match gap (hinted - control), Welch t interval", ">=", GAP),
                        d, (lo, hi), cmd, {h: ia[0], c: ib[0]}, n=len(a) + len(b))
            met.setdefault(L, []).append(v.verdict == "supported" and apart)
    return {"tested": bool(met), "met": any(all(v) for v in met.values()), "lengths": sorted(met),
            "trained": max(sw.trained.values(), default=0)}


def _gap_figure(st: Study) -> None:
    """The hint gap over seeds by length, one line per hinted configuration and control (`_seed_gap`'s rows)."""
    from probekit import viz

    rows = [r | {"pair": f"{r['hinted']} - {r['control']} ({r['control_budget']})"}
            for r in st.tables.get("hint_gap", [])]
    if not rows:
        return
    st.figure("hint_gap", lambda: viz.interval_plot(
        rows, "length", y="gap", hue="pair", reference=GAP, reference_label=f"success threshold (+{100 * GAP:.0f} points)",
        log_x=True, xlabel="list length (trained on 1-20)", ylabel="exact-match gap (hinted - control)",
        title="The hint gap over seeds, against each control"),
        "Greedy exact match of the hinted recipe minus that of each control, by list length, over the sweep's "
        "seeds (Welch t 95 % intervals over seeds); a control trained for the same number of steps, and one with as "
        "many sort batches as the hinted model sees. The hint would count as working where a line's interval lies "
        "above the dashed threshold against every control; the table gives each group's mean and interval.",
        "Line plot of the exact-match gap (hinted minus control) against list length, one line per control, with "
        "interval bars and a dashed threshold line.")


SEED_MEASURES = (  # key, what it measures, the direction the hypothesis "the hint concentrates the lookup" predicts
    ("n_chosen", "number of heads patching chooses", "<"),
    ("joint", "share of the logit difference the chosen heads restore together", ">"),
    ("top_share", "share of the logit difference the strongest head restores alone", ">"),
    ("excess_drop", "accuracy drop from mean-ablating the chosen heads beyond random heads of the same count", ">"),
    ("concentration", "share of the chosen heads' accuracy drop that the strongest head alone causes", ">"),
    ("qk_succ_above", "successor ordering (succ_above) of the strongest head's QK circuit", ">"),
    ("ov_copy_top", "OV copying (copy_top) of the strongest head", ">"))


def _mechanism(m: _Model, samples: _Samples, sz: dict, seed: int) -> dict:
    """One model's mechanism measures at its training length: the heads patching chooses, their restoration on
    the test pairs, the necessity of the strongest head and of the set, and the strongest head's circuits."""
    _select(m, samples, sz, seed)
    top = m.chosen[0]
    a = _patched(m.model, samples.get(m.task, "test", m.train_len), [[top], m.chosen])
    nec = _necessity(m, samples, sz, seed, m.train_len, _necessity_targets(m, False))
    circ = _circuit_rows(m, [top], sz, seed)[top]
    group = nec[-1]
    return {"model": m.name, "chosen": ", ".join(map(_label, m.chosen)), "n_chosen": float(len(m.chosen)),
            "top_share": _share(a, 0), "joint": _share(a, 1),
            "excess_drop": None if group["control"] is None else float((group["drop"] - group["control"])[:, 0].mean()),
            "random_from": group["pool"], "concentration": _concentration(nec[0], group, sz, seed)[0],
            "qk_succ_above": float(circ["succ_above"].mean()), "ov_copy_top": float(circ["copy_top"].mean()),
            "ov_copy_top_random": float(circ["random_copy_top"].mean())}


def _seed_mechanisms(st: Study, sw: _Sweep, sz: dict, samples: _Samples, seed: int) -> dict:
    """``{config: [measures per finished seed]}`` (`_mechanism`), also in the ``seed_mechanism`` table."""
    from probekit.grid import job_state

    rows = {}
    for config, jobs in sw.jobs.items():
        for job in (j for j in jobs if job_state(j) == "done"):  # an archived record has no weights to measure
            m = _prepare(job.dir, (), sz, name=job.id)
            r = _mechanism(m, samples, sz, seed) | {"config": config, "seed": job.seed}
            rows.setdefault(config, []).append(r)
            st.tables.setdefault("seed_mechanism", []).append(r)
    return rows


def _mechanism_gaps(st: Study, sw: _Sweep, rows: dict, cmd: str) -> bool:
    """Each mechanism measure, hinted against each control, over seeds (Welch t interval over the seeds' values);
    True when some pair had >= 2 seeds in both groups."""
    from probekit.stats import welch_interval

    tested = False
    for h, c in _pairs(sw):
        a, b = rows.get(h, []), rows.get(c, [])
        if min(len(a), len(b)) < 2:
            st.notes.append(f"sweep {sw.out}: {h} vs {c}: fewer than 2 finished seeds in a group; the mechanism "
                            "measures are not compared over seeds")
            continue
        for key, what, op in SEED_MEASURES:
            x, y = [r[key] for r in a if r[key] is not None], [r[key] for r in b if r[key] is not None]
            if min(len(x), len(y)) < 2 or not np.isfinite(x + y).all():
                st.notes.append(f"sweep {sw.out}: {h} vs {c}: {key} is undefined for some seeds; not compared")
                continue
            d, lo, hi, _ = welch_interval(x, y)
            tested = True
            st.test(Hypothesis(f"over seeds, the {'+'.join(sw.hints[h])} hint ({h}) {'raises' if op == '>' else 'lowers'} "
                               f"the {what} against {c} ({_budget_match(sw, h, c)})",
                               f"{key} difference (hinted - control), Welch t interval over seeds", op, 0.0),
                    d, (lo, hi), cmd, {h: float(np.mean(x)), c: float(np.mean(y))}, n=len(x) + len(y))
    return tested


# ---------------------------------------------------------------------------- figures and headline


def _figures(st: Study, ms: list[_Model]) -> None:
    """Four figures, each drawn from the study's tables (the attention, a description, last: the findings page
    shows a study's first four, and the hint gap over seeds, when a sweep is given, comes first)."""
    from probekit import viz

    t = st.tables
    st.figure("lookup_patching", lambda: viz.interval_plot(
        [r for r in t["lookup_patching"] if r["selection_estimate"] is not None], "head", y="restored", hue="model",
        reference=LOOKUP_SHARE, reference_label="choice threshold", ylabel="share of logit difference restored",
        xlabel="head (layer, head)",
        title="Successor-change: each head's output patched from the clean run (held-out pairs)"),
        "Each point is one head of one model at the training length: the share of the clean-vs-corrupted logit "
        "difference its clean output restores (0 = corrupted, 1 = clean), with a 95 % bootstrap interval over pairs. "
        "Heads were chosen on a separate sample when their interval lay above the dashed line; several heads of "
        "similar size mean no single lookup head.",
        "Dot-and-whisker plot of restoration by head (x) for each model (colour).")
    st.figure("probes", lambda: viz.interval_plot(_probe_lines(t["probes"]), "length", y="value", hue="what",
                                                  facet="model", log_x=True, xlabel="list length",
                                                  ylabel="accuracy on held-out lists",
                                                  title="Next-value probe after the last attention layer"),
              "Accuracy of a linear probe for the next value after the last attention layer (fitted at the training "
              "length, scored on held-out lists of each length, the training length included), beside the token-only "
              "baseline (the best guess from the current input token) and the majority class; 95 % intervals "
              "resampling lists. Where the probe meets the token-only line, the residual stream holds no more about "
              "the next value than the input token does.",
              "Line plots of accuracy by length, one panel per model.")
    st.figure("accuracy_by_step", lambda: viz.interval_plot(t["accuracy_by_step"], "length", y="accuracy", hue="what",
                                                            facet="model", log_x=True, xlabel="list length",
                                                            ylabel="accuracy per step",
                                                            title="Accuracy by step type and on the hint task"),
              "Teacher-forced accuracy of the sort steps split into repeat steps and new-value steps, and (hinted "
              "models) greedy per-query accuracy on the model's own hint task, by length; 95 % intervals resampling "
              "lists. Both sort step types falling means the repeat-or-advance decision degrades, not only the lookup.",
              "Line plots of per-step accuracy by length, one panel per model, one line per step type or task.")
    tops = {_label(m.chosen[0]) for m in ms}
    st.figure("attention", lambda: viz.interval_plot(
        [r | {"panel": f"{r['head']}, {r['step']}-value steps"} for r in t["attention"] if r["head"] in tops],
        "length", y="ratio", hue="model", facet="panel", reference=1.0, reference_label="uniform over the list",
        log_x=True, xlabel="list length", ylabel="attention on the next value / uniform share",
        title="Each model's strongest head, in every model: attention on the next value"),
        "Attention a head puts on the copies of the next value, divided by what uniform attention over the list "
        "would put there (1 = chance), by list length, for repeat steps (the next value equals the previous output) "
        "and new-value steps separately; the same head in every model (colour), so a head is compared with itself; "
        "bars: 95 % intervals resampling lists. The uniform share falls as lists grow, so a rising ratio can hide "
        "falling mass (the table has both). Description, not cause.",
        "Line plots by length, one panel per head and step type, one line per model.")


def _probe_lines(rows: list[dict]) -> list[dict]:
    """The probe after the last attention layer and its two baselines, as `viz.interval_plot` rows."""
    out = []
    for r in rows:
        if not r["after_last_attention"]:
            continue
        base = {"model": r["model"], "length": r["length"]}
        out += [base | {"what": "probe", "value": r["accuracy"], "lo": r["lo"], "hi": r["hi"]},
                base | {"what": "token-only baseline", "value": r["token_only"], "lo": r["token_lo"],
                        "hi": r["token_hi"]},
                base | {"what": "majority class", "value": r["majority"], "lo": r["majority"], "hi": r["majority"]}]
    return out


HINT_TESTS = {"more causal": "patching", "concentrates": "ablation", "successor ordering": "QK ordering",
              "linearly swappable": "DAS"}


def _said(vs: list) -> str:
    """"held for a, b; did not hold for c; was inconclusive for d" over ``(label, verdict)`` pairs."""
    parts = []
    for word, key in (("held for", "supported"), ("did not hold for", "not supported"),
                      ("was inconclusive for", "inconclusive")):
        names = [lab for lab, v in vs if v == key]
        if names:
            parts.append(f"{word} {', '.join(names)}")
    return "; ".join(parts) if parts else "was not tested"


def _headline(st: Study, ms: list[_Model], gap: dict | None) -> None:
    """Two to four sentences, each written from the verdicts of one question."""
    said = {}
    for v in st.verdicts:
        s = v.hypothesis.statement
        model = s.split(":")[0]
        if ": one head carries" in s:
            said.setdefault("single", []).append((model, v.verdict))
        elif ": mean-ablating " in s:  # the strongest head and the chosen set of each model
            heads = s.split(": mean-ablating ")[1].split(" lowers")[0]
            heads = "the chosen set" if heads.startswith("the chosen heads ") else heads
            if heads == "the chosen set" or any(m.name == model and _label(m.chosen[0]) == heads for m in ms):
                said.setdefault("necessary", []).append((f"{heads} ({model})", v.verdict))
        elif s.startswith("over seeds, "):
            key, control = v.hypothesis.statistic.split(" difference")[0], s.split(" against ")[-1].split(" (")[0]
            said.setdefault("seeds", []).append((f"{key} ({s.split('(')[1].split(')')[0]} vs {control})", v.verdict))
        elif s.startswith("the hint "):
            what = next(w for k, w in HINT_TESTS.items() if k in s)
            who = s.split("(")[1].split(" ")[0].removesuffix("'s")
            said.setdefault("hint", []).append((f"{what} ({who})", v.verdict))
        elif "own lookup extrapolates" in s:
            said.setdefault("own", []).append((s.split("'s own")[0], v.verdict))
        elif "-value steps fail more often" in s:
            said.setdefault("steps", []).append((f"{model} {s.split(': ')[1].split('-value')[0]}", v.verdict))
    if ms:
        st.headline.append("Patching under successor-change picks "
                           + "; ".join(f"{', '.join(map(_label, m.chosen))} in {m.name}" for m in ms)
                           + f" as the heads that restore the next value; the claim that one head carries the "
                           f"lookup {_said(said.get('single', []))}; the claim that mean-ablating the strongest "
                           "head, or the chosen set, costs more sort-step accuracy than ablating as many random heads "
                           f"{_said(said.get('necessary', []))}.")
        st.headline.append("Against the baseline's same heads on the same inputs, the claim that the hint changes the "
                           f"mechanism {_said(said.get('hint', []))}.")
        st.headline.append(f"The claim that the hinted model's own lookup extrapolates on its hint task "
                           f"{_said(said.get('own', []))}, and the claim that sort steps fail more at the longest length "
                           f"than at the training length {_said(said.get('steps', []))} (repeat and new-value steps "
                           "tested separately).")
    if gap is None:
        st.headline.append("No sweep folder was given, so the hint gap over seeds is not tested here.")
    elif not gap["tested"]:
        st.headline.append("The sweep folder has no finished hinted and control jobs with two or more seeds each, so "
                           "the hint gap over seeds is not tested yet.")
    else:
        st.headline.insert(0, _gap_sentence(st.tables["hint_gap"], gap)
                           + (f"; the claims that the hint changes the mechanism measures {_said(said['seeds'])}."
                              if gap.get("mechanism") and said.get("seeds") else "."))


def _gap_sentence(rows: list[dict], gap: dict) -> str:
    """The hint gap over seeds against each control at the lengths beyond training, and the success criterion."""
    longer = [r for r in rows if r["length"] > gap["trained"]] or rows
    pairs = {}
    for r in longer:
        pairs.setdefault((r["hinted"], r["control"], r["control_budget"], r["seeds"]), []).append(
            f"{r['length']}: {100 * r['gap']:+.1f} [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}]")
    said = "; ".join(f"{h} minus {c} ({b}, seeds {n}) {', '.join(v)}" for (h, c, b, n), v in pairs.items())
    return (f"Over seeds, the exact-match gap in points (Welch t 95 % intervals) at the lengths beyond training, by "
            f"length: {said}; the success criterion (a gap of at least {100 * GAP:.0f} points at some length against "
            f"every control, with the two groups' intervals apart) is {'met' if gap['met'] else 'not met'}")
