# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · The carry, causally
#
# Multiplication `a x b` with the product written least significant digit first. Answer digit k is
# `d_k = (S_k + c_k) mod 10`, where `S_k = sum_{i+j=k} a_i b_j` is the column sum and `c_k` the carry into
# column k (`c_{k+1} = (S_k + c_k) div 10`). The task records `column_sum`, `carry_in` (`c_k`) and
# `carry_out` (`c_{k+1}`) at the position that predicts digit k.
#
# In `mult-5x1` (5-digit times 1-digit numbers, one layer, three heads) we build a causal account:
#
# 1. **Description**: which operand digit each head attends to, relative to the column being written,
#    as a multiple of what uniform attention would give.
# 2. **Cause**: which head's output the answer needs when the *carry* changes (`carry-flip`) and when the
#    column's *own digit* changes with the carry kept (`column-digit`): patching, with bootstrap intervals.
# 3. **Where the carry is computed**: interchange interventions on learned subspaces (DAS) at the answer step,
#    against a random subspace and the full vector.
# 4. **What is readable**: a probe scored on held-out data next to the majority-class and input-token baselines.
# 5. **What the carry head is needed for**: mean-ablate it; accuracy on digits that need a carry vs the others.
# 6. **A bigger circuit**: `mult-3x3`'s edges and their faithfulness curve (skipped when not shipped).
#
# Every hypothesis below is written before its number, and its verdict comes from the interval alone
# (`probekit.stats.judge`).

# %%
# %matplotlib inline
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from IPython.display import display

import probekit
from probekit import viz
from probekit.attribution import ablation_hooks
from probekit.corruptions import corrupt
from probekit.evaluate import evaluate
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
from probekit.patching import Component, patch_values
from probekit.probes import probe_sweep
from probekit.results import Result
from probekit.stats import Hypothesis, bootstrap_ci, chance_normalised_attention, judge, ratio_of_means
from probekit.studies import carry_study

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: text progress bars
# Size knob: the test suite sets PROBEKIT_NB_SMALL=1 and runs this notebook at toy scale.
SMALL = os.environ.get("PROBEKIT_NB_SMALL") == "1"
OUT = Path(os.environ.get("PROBEKIT_NB_OUT", "../reports/notebooks")) / "02_carry_mechanism"  # files this notebook writes
OUT.mkdir(parents=True, exist_ok=True)
MODEL, CIRCUIT = "mult-5x1", "mult-3x3"
N_EVAL = 64 if SMALL else 1000        # examples for greedy evaluation
N_PATCH = 32 if SMALL else 256        # clean/corrupted pairs per answer digit
N_PAIRS = 64 if SMALL else 1000       # counterfactual pairs for DAS
DAS_STEPS = 5 if SMALL else 200       # DAS optimisation steps (early stopping on a validation split)
N_PROBE = 128 if SMALL else 2000      # probe training examples
DIGITS = [2, 3] if SMALL else [1, 2, 3, 4]  # product digits k studied (each has a_k and a_(k-1))
print("size:", "small" if SMALL else "research", "| shipped models:", probekit.shipped_models())

# %% [markdown]
# ## 1. The model and the task's ground truth
#
# Each row below is one predicting position of the first example: the digit it must write and the
# latent variables a correct algorithm computes there.

# %%
model, task, conf = probekit.load_model(MODEL)
L = conf["train"]["lengths"][1]
print(model.cfg.n_layers, "layer(s),", model.cfg.n_heads, "heads | positional:", conf["model"]["positional"],
      "| trained on", L, "x", task.b_digits, "digits")
batch = task.sample(3, length=L, seed=0)
print("\n".join(task.decode(batch.tokens)))
pm = batch.pred_mask[0]
pd.DataFrame({f: batch.features[f][0][pm].tolist() for f in ("digit_index", "column_sum", "carry_in", "carry_out", "digit")})

# %%
ev = evaluate(model, task, [L], n=N_EVAL, seed=0)
rec = ev.records[0]
print(f"greedy exact match {rec['exact_match']:.3f} (95 % CI {rec['exact_match_ci95'][0]:.3f}-{rec['exact_match_ci95'][1]:.3f})")

# %% [markdown]
# ## 2. Description: attention over chance
#
# At the step writing digit k, three keys matter: `a_k` (the column's digit of a), `b_0` (b's digit) and
# `a_(k-1)` (the digit of a below the column, where the carry comes from). For each head we divide its
# attention on the key by the uniform share `1 / (visible keys)`: 1 means chance, 8 means eight times chance.
# This says where a head looks, not what the answer uses.

# %%
b = task.sample(N_PATCH, length=L, seed=11)
with torch.no_grad():
    _, cache = model.run_with_cache(b.tokens)
A = cache["blocks.0.attn.hook_pattern"]  # batch head query key
op, place, k_at = b.features["operand"][0], b.features["place"][0], b.features["digit_index"]
targets = {"a_k": lambda k: (op == 0) & (place == k), "b_0": lambda k: (op == 1) & (place == 0),
           "a_(k-1)": lambda k: (op == 0) & (place == k - 1)}
ratio, lo, hi = (torch.zeros(model.cfg.n_heads, len(targets)) for _ in range(3))
for h in range(model.cfg.n_heads):
    for j, key in enumerate(targets.values()):
        rows, masks = [], []
        for k in DIGITS:
            q = int((k_at[0] == k).nonzero()[0])
            rows.append(A[:, h, q].numpy())
            masks.append(np.broadcast_to(key(k).numpy(), (b.n, b.seq_len)))
        vis = np.concatenate([np.broadcast_to(np.arange(b.seq_len) <= int((k_at[0] == k).nonzero()[0]),
                                              (b.n, b.seq_len)) for k in DIGITS])
        s = chance_normalised_attention(np.concatenate(rows), np.concatenate(masks), np.full(b.n * len(DIGITS), "all"),
                                        vis)["all"]
        ratio[h, j], (lo[h, j], hi[h, j]) = s["ratio"], s["ratio_ci95"]
attention = Result("attention_over_chance", ratio, ("head", "target"),
                   {"head": [f"L0H{h}" for h in range(model.cfg.n_heads)], "target": list(targets)},
                   {"title": "attention on each operand digit, over chance", "ylabel": "attention / uniform share",
                    "xlabel": "head", "reference": {"uniform": 1.0}}, {"lo": lo, "hi": hi})
viz.show(viz.result_intervals(attention))

# %% [markdown]
# ## 3. Cause: patching under two corruptions
#
# `carry-flip` changes a digit of a *below* place k so that the carry into digit k changes while column k
# does not; `column-digit` changes the column's own digit `a_k` so that digit k changes while its carry is
# kept. We patch each head's clean output into the corrupted run and read how much of digit k's
# clean-vs-corrupted logit difference comes back (1 = clean, 0 = corrupted), per example, so the share has a
# bootstrap interval. Heads are chosen on even examples and measured on odd ones.

# %%
heads = [Component("z", 0, head=h) for h in range(model.cfg.n_heads)]
per = {}
for kind in ("carry-flip", "column-digit"):
    raw, clean, corr = [], [], []
    for k in DIGITS:
        pair = corrupt(task, task.sample(N_PATCH, length=L, seed=100 * k + 7), kind, digit=k, seed=0)
        pv = patch_values(model, pair, heads)
        raw.append(pv.per_example)
        clean.append(pv.clean_per_example)
        corr.append(pv.corrupted_per_example)
    per[kind] = torch.cat(raw, 1).numpy(), torch.cat(clean).numpy(), torch.cat(corr).numpy()


def restoration(kind, h, half):
    raw, clean, corr = per[kind]
    rows = np.stack([raw[h], clean, corr], 1)[half::2]
    return bootstrap_ci(rows, ratio_of_means, n_boot=1000)


carry_head = int(np.argmax([restoration("carry-flip", h, 0)[0] for h in range(model.cfg.n_heads)]))
column_head = int(np.argmax([restoration("column-digit", h, 0)[0] for h in range(model.cfg.n_heads)]))
table = pd.DataFrame({kind: [restoration(kind, h, 1) for h in range(model.cfg.n_heads)] for kind in per},
                     index=[f"L0H{h}" for h in range(model.cfg.n_heads)])
print(f"carry head L0H{carry_head}, column head L0H{column_head} (chosen on the even examples)")
display(table.map(lambda t: f"{t[0]:.2f} [{t[1]:.2f}, {t[2]:.2f}]"))
vals = torch.tensor([[table.loc[i, k][0] for k in per] for i in table.index])
restored = Result("restoration", vals, ("head", "corruption"), {"head": list(table.index), "corruption": list(per)},
                  {"title": "share of digit k's logit difference restored (odd examples)", "ylabel": "restoration",
                   "xlabel": "head (clean output patched)", "reference": {"0.5": 0.5, "0.1": 0.1}},
                  {"lo": torch.tensor([[table.loc[i, k][1] for k in per] for i in table.index]),
                   "hi": torch.tensor([[table.loc[i, k][2] for k in per] for i in table.index])})
viz.show(viz.result_intervals(restored))
cmd = "notebooks/02_carry_mechanism.py"
for h_, kind, op_, t in ((carry_head, "carry-flip", ">", 0.5), (carry_head, "column-digit", "<", 0.1)):
    est, lo_, hi_ = restoration(kind, h_, 1)
    v = judge(Hypothesis(f"L0H{h_} restores {op_} {t} under {kind}", f"restoration under {kind}", op_, t),
              est, (lo_, hi_), cmd)
    print(f"{v.hypothesis.statement}: {est:.2f} [{lo_:.2f}, {hi_:.2f}] -> {v.verdict}")

# %% [markdown]
# ## 4. Where the carry is computed: interchange interventions
#
# Pairs of problems whose carry into digit k differs and whose column sum agrees. At one site of the answer
# step we swap a learned 4-dimensional subspace (DAS) from the source run into the base run: if the model then
# writes `(S_k(base) + c_k(source)) mod 10`, the subspace carries the carry. IIA is the share of held-out pairs
# where it does, next to a random 4-dimensional subspace (control) and the whole vector (ceiling). Before the
# layer (`resid_pre`) nothing about the operands has been read yet; after attention (`resid_mid`) it has.

# %%
at = Where(digit_index=DIGITS[0])
pairs = counterfactual_pairs(task, N_PAIRS, L, vary="carry_in", hold=["column_sum"], at=at,
                             target=carry_counterfactual(at), seed=0)
das_rows = []
for site in ("resid_pre", "resid_mid"):
    loc = Location(site, 0, at)
    fit = fit_das(model, pairs, loc, k=4, steps=DAS_STEPS, batch_size=32, n_controls=0)
    test = pairs.select(split_pairs(pairs.n, FitSettings(**fit.settings["fit"]))[2])  # the fit's held-out pairs
    ctrl = interchange_correct(model, test, loc, random_subspace(fit.rotation.shape[0], 4, seed=1)).float()
    full = interchange_correct(model, test, loc, Interchange()).float()
    das_rows.append({"site": site, "IIA": fit.iia, "95 % CI": fit.interval, "random subspace": float(ctrl.mean()),
                     "full vector": float(full.mean()), "held-out pairs": len(fit.correct)})
pd.DataFrame(das_rows)

# %% [markdown]
# ## 5. What is readable: a probe with its baselines
#
# A linear probe for `carry_in`, fitted on one sample and scored on a *held-out* sample of the same length.
# Beside it: the majority class and the best predictor from the input token at that position alone (the
# previous answer digit), and selectivity over Hewitt & Liang's control task.

# %%
train_b, test_b = task.sample(N_PROBE, length=L, seed=21), task.sample(N_PROBE // 2, length=L, seed=23)
sw = probe_sweep(model, train_b, "carry_in", "resid_pre,resid_mid,resid_post", evals={"held-out": test_b},
                 controls=["control_task"])
p_all = sw.labels["position"].index("all")
pd.DataFrame([{"site": f"{hk} L{lk}", "held-out accuracy": float(sw.values[i, j, p_all, 1]),
               "majority": float(sw.extra["majority"][i, j, p_all, 1]), "token": float(sw.extra["token"][i, j, p_all, 1]),
               "selectivity": float(sw.extra["selectivity"][i, j, p_all, 1])}
              for i, hk in enumerate(sw.labels["hook"]) for j, lk in enumerate(sw.labels["layer"])])

# %% [markdown]
# ## 6. What the carry head is needed for
#
# Mean-ablate the carry head (its output replaced by its mean over other examples, position by position) and
# read teacher-forced accuracy separately on digits k >= 1 that need a carry (`c_k > 0`) and those that do not.
# If the head carried only "a carry is coming", the digits without one would be left intact.

# %%
ab, ref = task.sample(N_PATCH * 2, length=L, seed=31), task.sample(N_PATCH * 2, length=L, seed=32)
pmask = ab.pred_mask
k_, cin, tgt = (ab.features[f][pmask].view(ab.n, -1) for f in ("digit_index", "carry_in", "target"))
with torch.no_grad():
    ok_clean = model(ab.tokens)[pmask].view(ab.n, -1, model.cfg.d_vocab).argmax(-1) == tgt
    with ablation_hooks(model, ab, [(0, carry_head)], "mean", reference=ref):
        ok_abl = model(ab.tokens)[pmask].view(ab.n, -1, model.cfg.d_vocab).argmax(-1) == tgt
need = (cin > 0) & (k_ >= 1)
none_ = (cin == 0) & (k_ >= 1)
pd.DataFrame({"clean": [ok_clean[need].float().mean().item(), ok_clean[none_].float().mean().item()],
              f"L0H{carry_head} mean-ablated": [ok_abl[need].float().mean().item(), ok_abl[none_].float().mean().item()]},
             index=["digits that need a carry", "digits without a carry"])

# %% [markdown]
# ## 7. A bigger circuit: `mult-3x3`
#
# Edge attribution for the carry into digit 3 of a 3 x 3 product: every edge between components is scored, and
# circuits of the top-n edges are run with every other edge reading the corrupted run's value. The curve shows
# how many edges keep how much of the logit difference. (Skipped when `mult-3x3` is not shipped.)

# %%
if CIRCUIT in probekit.shipped_models():
    from probekit.edges import edge_report, plot_edges

    cmodel, ctask, _ = probekit.load_model(CIRCUIT)
    cpair = corrupt(ctask, ctask.sample(8 if SMALL else 128, length=3, seed=41), "carry-flip", digit=3, seed=0)
    rep = edge_report(cmodel, cpair, exact=not SMALL, ablation="resample")
    print(f"smallest circuit keeping 90 %: {rep.faithfulness.smallest} of {len(rep.edges)} edges")
    viz.show(plot_edges(rep, title=f"{CIRCUIT}: edges of the carry into digit 3"))
else:
    print(f"{CIRCUIT} is not shipped; skipping section 7")

# %% [markdown]
# ## 8. The packaged study
#
# `probekit.studies.carry_study` runs all of the above (and, when the N x 1 models trained on a range of
# lengths are shipped, what of it transfers to unseen lengths), states each hypothesis with its effect,
# interval, baseline and verdict, and writes a headline from the verdicts. `probekit report` shows it.

# %%
study = carry_study(size="quick" if SMALL else "default")
print("\n".join(study.headline))
print()
print(study.summary())
for f in study.figures:
    viz.show(f.make())
