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
# # 02 · The carry mechanism in multiplication
#
# Multiplication `a x b` with the product written least significant digit first. Answer digit k is
# `d_k = (S_k + c_k) mod 10`, where `S_k = sum_{i+j=k} a_i b_j` is the column sum and `c_k` the carry into
# column k (`c_{k+1} = (S_k + c_k) div 10`). The task records `column_sum`, `carry_in` (`c_k`) and
# `carry_out` (`c_{k+1}`) at the position that predicts digit k. We ask:
#
# 1. **Representation**: at which layer are the carries and column sums linearly readable? (probes)
# 2. **Use**: which heads and positions causally carry the carry into digit k? (`carry-flip` patching:
#    one operand digit below place k changes so that the carry into digit k changes but column k's
#    products do not)
# 3. **Routing**: which heads attend to the operand digits of the column being written? (head roles)
# 4. **Extrapolation** (`mult-extrap`, trained on 1-2 digit operands): which of the three breaks first
#    on 3- and 4-digit operands?
#
# The main model is `mult-5x1` (5-digit times 1-digit numbers, one layer).

# %%
# %matplotlib inline
import os
import warnings
from pathlib import Path

import pandas as pd
import torch
from IPython.display import display

import probekit
from probekit import viz
from probekit.attribution import head_roles
from probekit.corruptions import corrupt
from probekit.evaluate import evaluate
from probekit.patching import sweep
from probekit.probes import probe_lengths, probe_sweep
from probekit.results import stack_results
from probekit.studies import carry_study

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: text progress bars
# Size knob: the test suite sets PROBEKIT_NB_SMALL=1 and runs this notebook at toy scale in well under a minute.
SMALL = os.environ.get("PROBEKIT_NB_SMALL") == "1"
OUT = Path(os.environ.get("PROBEKIT_NB_OUT", "../reports/notebooks")) / "02_carry_mechanism"  # files this notebook writes
OUT.mkdir(parents=True, exist_ok=True)
MODEL, EXTRAP = "mult-5x1", "mult-extrap"
N_EVAL = 64 if SMALL else 1000       # examples for greedy evaluation
N_PROBE = 256 if SMALL else 4000     # probe training examples
N_PATCH = 32 if SMALL else 256       # clean/corrupted pairs per answer digit
FEATURES = ("carry_in", "carry_out", "column_sum")
print("size:", "small" if SMALL else "research", "| shipped models:", probekit.shipped_models())

# %% [markdown]
# ## 1. The model and the task's ground truth
#
# Each row below is one predicting position of the first example: the digit it must write and the
# latent variables a correct algorithm computes there.

# %%
model, task, conf = probekit.load_model(MODEL)
L_TRAIN = conf["train"]["lengths"][1]
print(model.cfg.n_layers, "layer(s),", model.cfg.n_heads, "heads | positional:", conf["model"]["positional"],
      "| trained on", L_TRAIN, "x", task.b_digits or L_TRAIN, "digits")
batch = task.sample(3, length=L_TRAIN, seed=0)
print("\n".join(task.decode(batch.tokens)))
pm = batch.pred_mask[0]
pd.DataFrame({f: batch.features[f][0][pm].tolist() for f in ("digit_index", "column_sum", "carry_in", "carry_out", "digit")})

# %% [markdown]
# ## 2. Accuracy, by number of carries
#
# Greedy exact match at the trained size, split by how many carries the product needs and by digit.

# %%
ev = evaluate(model, task, [L_TRAIN], n=N_EVAL, seed=0)
rec = ev.records[0]
print(f"exact match {rec['exact_match']:.3f} (95 % CI {rec['exact_match_ci95'][0]:.3f}-{rec['exact_match_ci95'][1]:.3f})")
display(pd.DataFrame(rec["by_carries"]).T.rename_axis("carries"))
pd.Series(rec["per_digit"], name="accuracy").rename_axis("digit").to_frame().T

# %% [markdown]
# ## 3. Representation: probes by layer and answer digit
#
# For each feature, probes at every layer's residual stream (`resid_pre`: the block's input, `resid_mid`:
# after attention, `resid_post`: after the MLP), pooled over answer digits, scored on held-out data. The
# heatmaps split the held-out score by answer digit (position k = the step predicting digit k).
# `carry_*` probes are classifiers (accuracy); `column_sum` is a ridge regression (R^2). The summary lists
# the controls: shuffled labels, Hewitt & Liang's control task and its selectivity, and the majority class.

# %%
train = task.sample(N_PROBE, length=L_TRAIN, seed=1)
heldout = {str(L_TRAIN): task.sample(max(64, N_PROBE // 4), length=L_TRAIN, seed=2)}
sweeps = {}
for feat in FEATURES:
    sweeps[feat] = probe_sweep(model, train, feat, "resid_pre,resid_mid,resid_post", evals=heldout,
                               controls=["shuffle", "control_task"])
    print(f"--- {feat} ({sweeps[feat].settings.get('metric')})")
    print(sweeps[feat].summary())

# %%
for feat, sw in sweeps.items():
    viz.show(viz.heatmap(viz.probe_by_site(sw, str(L_TRAIN)), cmap="viridis", symmetric=False,
                         title=f"{feat}: held-out {sw.settings.get('metric')} by site and answer digit"))

# %% [markdown]
# ## 4. Use: carry-flip patching, per answer digit
#
# For each answer digit k >= 1, `carry-flip` pairs change one operand digit below place k so that the
# carry into digit k changes while the products in column k stay the same: digit k then differs only
# through its carry. We patch each head's clean output (all positions) into the corrupted run and read
# how much of digit k's clean-vs-corrupted logit difference returns (1 = clean). The second figure
# patches the residual stream before layer 0 at each position: which input tokens does the carry
# into digit k depend on?

# %%
digits = range(1, int(batch.pred_mask[0].sum()))
by_head, by_pos = [], []
for k in digits:
    pair = corrupt(task, task.sample(N_PATCH, length=L_TRAIN, seed=100 + k), "carry-flip", digit=k, seed=0)
    by_head.append(sweep(model, pair, "z", by_pos=False, metric="logit-diff"))  # layer head
    by_pos.append(sweep(model, pair, "resid_pre", by_pos=True, layers=[0], metric="logit-diff"))  # layer pos
    print(f"digit {k}: {pair.n_invalid} of {N_PATCH} rows had no carry flip; top head {by_head[-1].top(1)[0]}")
patch_heads = viz.flatten_heads(stack_results(by_head, "digit", digits, kind="carry-flip: head output patched"))
patch_pos = stack_results(by_pos, "digit", digits, kind="carry-flip: resid_pre patched")
viz.show(viz.heatmap(patch_heads, rows="digit", cols="head",
                     title="carry-flip into digit k: restored by each head's clean output"))
viz.show(viz.heatmap(patch_pos, rows="digit", cols="pos", facet="layer",
                     title="carry-flip into digit k: restored by each clean input position"))

# %% [markdown]
# ## 5. Routing: which heads read the column's operand digits?
#
# At the position predicting digit k, the operand digits `a_i` and `b_j` with `i + j = k` are the inputs of
# column k. `mass` is the attention a head puts on them, `top1` how often its largest weight falls on
# one of them, `chance` what uniform attention would give.

# %%
roles = head_roles(model, [task.sample(N_PATCH, length=L_TRAIN, seed=20)], target="column_operands")
viz.show(viz.heatmap(roles, rows="head", cols="stat", facet="length", cmap="viridis", symmetric=False,
                     title="attention on the operand digits of the column being written"))

# %% [markdown]
# ## 6. Extrapolation: `mult-extrap` on longer operands
#
# `mult-extrap` (4 layers, no positional embedding) was trained on a x b with 1 to 2 digits each. We
# evaluate it up to 4 digits and track, by operand length, the three quantities above:
#
# - the probe for `carry_out`, fitted at 2 digits and scored on 3 and 4 (representation),
# - the head that best attends to the column's operand digits (routing),
# - carry-flip patching of digit 2 (use),
#
# next to exact match. The first to fall with exact match is the likeliest cause. (This section is
# skipped when `mult-extrap` is not shipped.)

# %%
HAVE_EXTRAP = EXTRAP in probekit.shipped_models()
if HAVE_EXTRAP:
    xmodel, xtask, xconf = probekit.load_model(EXTRAP)
    lo, hi = xconf["train"]["lengths"]
    X_LENGTHS = [L for L in range(lo, hi + 3) if xtask.seq_len(L) <= xmodel.cfg.n_ctx]
    xev = evaluate(xmodel, xtask, X_LENGTHS, n=N_EVAL, seed=0)
    viz.show(viz.accuracy_vs_length(xev, train_lengths=(lo, hi)))
else:
    print(f"{EXTRAP} is not shipped yet; skipping section 6")

# %%
if HAVE_EXTRAP:
    LONG = [L for L in X_LENGTHS if L >= hi]
    xsw = probe_lengths(xmodel, xtask, "carry_out", "resid_mid,resid_post", train_length=hi, test_lengths=LONG,
                        n=N_PROBE, controls=["shuffle"])
    viz.show(viz.probe_accuracy(xsw, title=f"{EXTRAP}: carry_out probe, trained at {hi} digits"))
    xroles = head_roles(xmodel, [xtask.sample(N_PATCH, length=L, seed=20 + L) for L in LONG], target="column_operands")
    router = int(xroles.values[0, :, 0].argmax())  # the head with the most column-operand attention at the trained length
    rows = []
    for i, L in enumerate(LONG):
        pair = corrupt(xtask, xtask.sample(N_PATCH, length=L, seed=30 + L), "carry-flip", digit=2, seed=0)
        xp = sweep(xmodel, pair, "z", by_pos=False, metric="logit-diff")
        split = str(L)
        best, acc = xsw.best(split=split)
        rows.append({"length": L, "exact_match": xev.exact_match(L), "carry_out probe (best site)": acc,
                     "best site at this length": f"{best['hook']} L{best['layer']}",
                     f"{xroles.labels['head'][router]} column-operand mass": float(xroles.values[i, router, 0]),
                     "max head restore (digit 2)": float(torch.nan_to_num(xp.values, nan=-1).max()),
                     "top head (digit 2)": "L{layer}H{head}".format(**xp.top(1)[0][0])})
    display(pd.DataFrame(rows).set_index("length"))

# %% [markdown]
# ## 7. The packaged study
#
# `probekit.studies.carry_study` runs the same instruments on every shipped multiplication model and
# states its findings as claims with numbers, each with the command that regenerates it (this is what
# `probekit report` prints). At toy scale the numbers are noisy; run without `PROBEKIT_NB_SMALL` for
# the research-size version.

# %%
study = carry_study(models=tuple(m for m in (MODEL, EXTRAP) if m in probekit.shipped_models()),
                    size="quick" if SMALL else "default")
print(study.summary())
