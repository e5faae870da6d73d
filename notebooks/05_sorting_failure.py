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
# # 05 · Why the unhinted sorter fails with length, as a prediction
#
# `sort-baseline` (2 layers, no positional embedding, lists of 1 to 20 values from 0..63 with repeats)
# sorts short lists and fails on long ones. This notebook asks what, quantitatively, makes it fail, and
# answers with a prediction that can be wrong: quantities read from the model's own activations at each
# sort step are fitted to the per-step error on part of a grid of list *compositions* x *lengths*, and
# predict the error of the cells left out. It walks through the evidence of the packaged study
# (`probekit.studies.failure_study`, module `probekit.studies.sorting`) with the same functions, at a
# size that runs in a minute or two:
#
# 1. **the failure**: greedy exact match by length for `sort-baseline`, for `sort-baseline-temp` (the same
#    recipe with a length-dependent softmax temperature) and for `sort-extrap` (the temperature, 256
#    values without repeats, half of its training lists from narrow value windows);
# 2. **not a counting failure**: a sort step either repeats the previous output or advances to the next
#    value, and "it fails because it loses count of the copies" is the obvious story. Lists of distinct
#    values have nothing to count;
# 3. **the predictive account**: the heads that select the next value, chosen by patching; per step, their
#    attention mass and score margin on the target; a logistic regression fitted on half of the grid and
#    scored on the other half (held-out R^2 with a bootstrap interval), against a control that knows only
#    the step type and the copies left;
# 4. **the lookup by length** in the three sorters: which of the two quantities holds up in the one
#    that extrapolates.
#
# Every hypothesis is written down before its number is read, and its verdict comes from the interval
# (`Study.test`: supported if the whole interval satisfies it, not supported if none of it does).

# %%
# %matplotlib inline
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import display

import probekit
from probekit import viz
from probekit.evaluate import evaluate, sort_error_kinds
from probekit.io import write_text
from probekit.stats import Hypothesis
from probekit.studies import Study
from probekit.studies.sorting import (
    MARGIN_DROP,
    choose_heads,
    composition_inputs,
    kept_share_contrast,
    lookup_by_length,
    plot_error_by_length,
    plot_failure_grid,
    plot_lookup_by_length,
    sorting_failure,
)

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: text progress bars
# Size knob: the test suite sets PROBEKIT_NB_SMALL=1 and runs this notebook at toy scale.
SMALL = os.environ.get("PROBEKIT_NB_SMALL") == "1"
OUT = Path(os.environ.get("PROBEKIT_NB_OUT", "../reports/notebooks")) / "05_sorting_failure"  # files it writes
OUT.mkdir(parents=True, exist_ok=True)
BASE, TEMP, EXTRAP = "sort-baseline", "sort-baseline-temp", "sort-extrap"
TRAIN = 20                                         # every sorter here was trained on lengths 1..20
EVAL_LENGTHS = [10, 20, 40, 60, 100]
N_EVAL = 32 if SMALL else 500                      # lists per length, greedy evaluation
GRID = "quick" if SMALL else "default"             # the account's sizes: patching pairs, bootstrap resamples
GRID_LENGTHS = (10, 20, 40, 60) if SMALL else (10, 20, 30, 40, 60)
N_CELL = 32 if SMALL else 150                      # lists per cell of the grid
LOOKUP_LENGTHS = (20, 40, 60, 100)                 # distinct lists; the 64-value sorters stop at 60
N_LOOKUP = 100 if SMALL else 150                   # lists per length for the lookup
SEED = 1  # seed 0 drew the lists on which the study's feature set was chosen; seed 1 is a fresh draw
CMD = "notebooks/05_sorting_failure.py" + ("" if SMALL else " (research size)")
study = Study("failure-notebook", "Why the unhinted sorter fails with length (notebook 05)")
print("size:", "small" if SMALL else "research", "| shipped models:", probekit.shipped_models())

# %% [markdown]
# ## 1. The failure
#
# Greedy decoding, no teacher forcing; exact match is the share of lists sorted entirely right, with 95 %
# Wilson intervals. Each model is evaluated on lists drawn as in its own training (with repeats from 64
# values for the first two, distinct values from 256 for `sort-extrap`).

# %%
models = {name: probekit.load_model(name) for name in (BASE, TEMP, EXTRAP)}
for name, (model, _, _) in models.items():
    model.probekit_name = name
evals = {name: evaluate(model, task, EVAL_LENGTHS, n=N_EVAL, seed=SEED, name=name)
         for name, (model, task, _) in models.items()}
viz.show(viz.accuracy_vs_length(evals, train_lengths=(1, TRAIN), title="Exact match vs length (greedy decoding)"))
pd.DataFrame({name: [f"{r['exact_match']:.2f} [{r['exact_match_ci95'][0]:.2f}, {r['exact_match_ci95'][1]:.2f}]"
                     for r in sorted(ev.records, key=lambda r: r["length"])] for name, ev in evals.items()},
             index=pd.Index(EVAL_LENGTHS, name="length"))

# %% [markdown]
# Both 64-value sorters are near perfect up to the training length and lose more lists the longer they get:
# part of them at 40, most at 60, all at 100. `sort-extrap` keeps most lists right to 100 (at this size its
# interval there is wide). The rest of the notebook asks what differs.
#
# ## 2. Not a counting failure
#
# The grid: four compositions, `distinct` (no value twice), `copies2` and `copies3` (each value exactly
# two or three times) and `uniform` (independent draws, as in training), at each length. `sorting_failure`
# reads, for every sort step under teacher forcing (the correct prefix given), whether the model's argmax
# is wrong; greedy exact match is kept beside it. The same call fits the account of section 3.

# %%
base_model, base_task, _ = models[BASE]
res = {BASE: sorting_failure(base_model, base_task, GRID, lengths=GRID_LENGTHS, n=N_CELL, control=True,
                             train_length=TRAIN, seed=SEED)}
cells = res[BASE].to_frame()
cells["exact match [95 %]"] = [f"{c['exact_match']:.2f} [{c['exact_match_ci95'][0]:.2f}, {c['exact_match_ci95'][1]:.2f}]"
                               for c in res[BASE].cells]
display(cells.pivot(index="composition", columns="length", values="exact match [95 %]").loc[list(
    res[BASE].settings["compositions"])])
cells[["composition", "length", "observed_new", "observed_repeat", "repeat_share"]].rename(
    columns={"observed_new": "error, new-value steps", "observed_repeat": "error, repeat steps",
             "repeat_share": "share of repeat steps"}).round(4)

# %% [markdown]
# Lists of distinct values fail too as they get longer, later and more rarely than lists with repeats
# (here only the longest distinct cell loses lists): there is no copy to count on them, and every step is a
# new-value step. On lists with repeats the new-value steps (advance to the next larger value) err too, in
# some compositions and lengths more often than the repeat steps (`copies3` most clearly).
#
# The hypothesis, stated before the numbers: on distinct lists, `sort-baseline`'s teacher-forced per-step
# error rate is higher at length 60 than at the training length 20. Fresh distinct lists, per-list error
# rates, a two-sample bootstrap over lists (`LookupByLength.change`):

# %%
heads = {BASE: [(h["layer"], h["head"]) for h in res[BASE].heads if h["chosen"]]}
lookups = {BASE: lookup_by_length(base_model, base_task, heads[BASE], GRID, lengths=LOOKUP_LENGTHS, n=N_LOOKUP,
                                  train_length=TRAIN, seed=SEED)}
d, lo, hi = lookups[BASE].change("error", TRAIN, 60, n_boot=lookups[BASE].n_boot)
v = study.test(Hypothesis(f"{BASE}: on distinct lists, the teacher-forced per-step error is higher at length 60 "
                          f"than at {TRAIN}", "per-step error rate (60 minus 20), mean over lists", ">", 0.0),
               d, (lo, hi), CMD, baseline={f"error at {TRAIN}": lookups[BASE].rows[0]["error"],
                                           "error at 60": lookups[BASE].rows[2]["error"]}, n=2 * N_LOOKUP)
print(study.claims[-1]["text"])

# %% [markdown]
# What the errors on distinct lists are, by their first wrong step under teacher forcing
# (`sort_error_kinds`): `extra_copy` writes the previous value again, `dropped_copy` advances where a copy
# was due, `wrong_value` writes some other value. The taxonomy names what was written, not which mechanism
# failed.

# %%
x = composition_inputs(base_task.n_values, "distinct", N_LOOKUP, 60, seed=[SEED, 60])
kinds = sort_error_kinds(base_model, base_task.with_objective("sort").batch_from_inputs(x))
print(f"{BASE}, {N_LOOKUP} distinct lists of length 60: first wrong step per list {kinds['first_error']}")

# %% [markdown]
# Every list that fails here fails first by an extra copy: the model writes the value it has just written
# again, what a counting story would call losing count, on lists where every value occurs once. The
# behaviour is a repeat; the cause cannot be a count. The account below asks whether what the heads that
# select the next value attend to predicts these errors, on every composition.
#
# ## 3. The predictive account
#
# **Heads by causal effect.** Each head's output is patched from clean into corrupted runs under
# `successor-change` at length 20 (the target of the middle step changes, the emitted prefix does not);
# the share of the logit difference it restores ranks the heads, and the top 4 are kept.

# %%
pd.DataFrame(res[BASE].heads).set_index("label")[["effect", "chosen"]].round(3).T

# %% [markdown]
# No head restores most of the difference on its own: the selection is spread over several heads of both
# layers, which is why the account reads four of them rather than "the" lookup head.
#
# **Per-step quantities**, per chosen head: the attention mass on the input keys holding the target value,
# and the score margin (pre-softmax, temperature included) of the best such key over the best key holding
# another value; the same two against the *confusor* (the key whose selection makes the step's typical
# error: the next larger value on a repeat step, the previous output on a new-value step); the step type
# and the log of the copies left, and every quantity times the step type. A logistic regression of the
# step's error is fitted on the *fit* cells (a checkerboard over composition x length, so both halves hold
# every length and composition), and predicts the error rate of each held-out cell. The **control** is the
# same regression without any head quantity: step type and copies left only, everything a counting
# account knows.
#
# Hypothesis (the study's): held-out R^2 >= 0.8. The interval resamples the lists inside each held-out
# cell with the fitted model fixed. The lists and patching pairs are drawn with seed 1 (`SEED`): the study's
# feature set (4 heads, the confusor quantities, the step-type interactions) was chosen by comparing designs
# on the seed-0 grid, so seed-0 lists would not be a clean test. The same account for `sort-baseline-temp`:

# %%
temp_model, temp_task, _ = models[TEMP]
res[TEMP] = sorting_failure(temp_model, temp_task, GRID, lengths=GRID_LENGTHS, n=N_CELL, control=True,
                            train_length=TRAIN, seed=SEED)
rows = []
for name, r in res.items():
    v = r.verdict(CMD)
    v = study.test(Hypothesis(f"{name}: {v.hypothesis.statement}", v.hypothesis.statistic, v.hypothesis.op,
                              v.hypothesis.threshold), v.effect, v.interval, CMD,
                   baseline={"R^2 of the control (no head)": r.control["r2"], "R^2 on the fit cells": r.r2_fit},
                   n=v.n)
    rows.append({"model": name, "heads": ", ".join(h["label"] for h in r.heads if h["chosen"]),
                 "held-out R^2": f"{r.r2:.2f} [{r.r2_ci95[0]:.2f}, {r.r2_ci95[1]:.2f}]",
                 "control R^2": f"{r.control['r2']:.2f} [{r.control['r2_ci95'][0]:.2f}, {r.control['r2_ci95'][1]:.2f}]",
                 "fit-cell R^2": round(r.r2_fit, 2), "verdict (>= 0.8)": v.verdict})
pd.DataFrame(rows)

# %%
viz.show(plot_failure_grid(res))
viz.show(plot_error_by_length(res))

# %% [markdown]
# How to read it. In the scatter each point is a cell: open squares were fitted, filled circles are held
# out, the dashed line is a perfect prediction. In both models the account's held-out R^2 interval lies
# wholly above the control's, and the control's sits at or below 0: the step type and the copies left,
# everything a counting account knows, predict the held-out cells no better than their mean, while the
# heads' quantities predict a good part of how the error varies across them. At this small size neither
# model's interval lies wholly above the 0.8 the hypothesis asks for (the verdicts in the table): with 32
# lists a cell the observed rates of the held-out cells carry much sampling noise and the fit half holds
# few errors. The study's default grid (150 lists a cell, five lengths) is where its verdict is read;
# `docs/sorting_failure.md` reports it for two seeds.
#
# In the line plot the predictions rise with length for every composition, as the observations do, but less
# steeply: the account over-predicts the cells with few errors (distinct lists, the short cells) and
# under-predicts the steepest ones (the lists with repeats at 60).
#
# The two models differ in which steps fail. The per-step error at the longest length, by step type:

# %%
pd.DataFrame([{"model": name, "composition": c["composition"], "new-value steps": c["observed_new"],
               "repeat steps": c["observed_repeat"]} for name, r in res.items() for c in r.cells
              if c["length"] == max(GRID_LENGTHS)]).pivot(index="composition", columns="model").round(4)

# %% [markdown]
# Without the temperature both kinds of step fail. With it, distinct lists make almost no error and the
# new-value steps of the other compositions err much less often than their repeat steps: what is left for
# `sort-baseline-temp` is mostly the repeat-or-advance decision, the one in which the copies left matter.
#
# The standardised coefficients are large and of mixed sign because the quantities are correlated (mass and
# margin of one head; one key seen by several heads): they are a predictor, not head-by-head effects.

# %%
pd.Series(res[BASE].coefficients).sort_values(key=np.abs, ascending=False).head(8).round(2)

# %% [markdown]
# ## 4. The lookup by length, in the sorter that extrapolates
#
# On fresh distinct lists, averaged over each model's 4 selecting heads (chosen by patching in that model)
# and over the steps of a list: the **score margin** of the target key over the best key holding another
# value, and the **attention mass** on the target. The 64-value sorters cannot be given distinct lists
# longer than 64, so they stop at 60 here. Two hypotheses of the study, stated before measuring: a margin *holds up* if it falls by
# less than 1 from length 20 to the longest length (the target's attention odds against its best rival
# fall by less than a factor e), and `sort-extrap` keeps a larger share of its attention mass on the target
# from 20 to 60 than each 64-value sorter (kept-share ratio > 1).

# %%
heads[TEMP] = [(h["layer"], h["head"]) for h in res[TEMP].heads if h["chosen"]]
ex_model, ex_task, _ = models[EXTRAP]
heads[EXTRAP] = [(h["layer"], h["head"]) for h in choose_heads(ex_model, ex_task, 4, TRAIN,
                                                                 {"quick": 60, "default": 200}[GRID], SEED) if h["chosen"]]
for name in (TEMP, EXTRAP):
    m, t, _ = models[name]
    lookups[name] = lookup_by_length(m, t, heads[name], GRID, lengths=LOOKUP_LENGTHS, n=N_LOOKUP, train_length=TRAIN,
                                     seed=SEED)
viz.show(plot_lookup_by_length(lookups))
for name, lk in lookups.items():
    end = max(lk.per_list)
    d, lo, hi = lk.change("margin", TRAIN, end, n_boot=lk.n_boot)
    study.test(Hypothesis(f"{name}: the selecting heads' score margin on the target holds up from length {TRAIN} to "
                          f"{end} (distinct lists; {', '.join(lk.heads)})", f"change in mean margin, {end} minus "
                          f"{TRAIN}", ">=", -MARGIN_DROP), d, (lo, hi), CMD, n=2 * N_LOOKUP)
    print(study.claims[-1]["text"])
for other in (BASE, TEMP):
    r, lo, hi = kept_share_contrast(lookups[EXTRAP], lookups[other], TRAIN, 60, n_boot=lookups[EXTRAP].n_boot)
    study.test(Hypothesis(f"{EXTRAP} keeps a larger share of its selecting heads' attention on the target from length "
                          f"{TRAIN} to 60 than {other} (distinct lists)", "kept-share ratio", ">", 1.0), r, (lo, hi),
               CMD, n=4 * N_LOOKUP)
    print(study.claims[-1]["text"])

# %% [markdown]
# The expectation "the sorter that extrapolates keeps its selecting heads sharp" fails on the margin: the
# margin is negative in every model at every length (the target is not the top key of an average selecting
# head; these heads spread their attention over the values near the target), and it falls most in
# `sort-extrap`, least in `sort-baseline`, the model that fails on distinct lists at 60. Two mechanical parts of that fall are not
# separated here: the temperature multiplies every score difference, more at longer lengths, and a longer
# list offers more rival keys to take the maximum over. What holds up is the attention mass on the target:
# `sort-extrap` keeps more of it from 20 to 60 than `sort-baseline` by a clear factor, and more than
# `sort-baseline-temp` by a small one; most of what the temperature buys, the 64-value temperature model
# has too. What sets `sort-extrap` apart beyond 60 cannot be measured on distinct lists of 64 values.
#
# `sort-extrap`'s own errors are rare: the count on these lists, by length, is what an account for it
# would have to predict. The study fits one on a grid of 300 lists a cell and judges it by the per-step AUC
# and the error count at unseen lengths, because between-cell R^2 is noise when a cell holds a handful of
# errors.

# %%
lk = lookups[EXTRAP]
pd.DataFrame([{"length": L, "lists": len(p["error"]), "steps": len(p["error"]) * L,
               "teacher-forced errors": int(round(float(np.nansum(p["error"]) * L)))} for L, p in lk.per_list.items()])

# %% [markdown]
# ## 5. The verdicts
#
# Every hypothesis tested above, with its effect, interval, baseline and verdict, as the `Study` records them
# (also written to `OUT` as JSON). The study itself, at its default size with the learned-position twin
# `sort-extrap-learned-pos` and the account of the extrapolating sorters, is
# `probekit report --study failure --size default` (about 5 minutes on one core).

# %%
print(study.summary())
print({k: sum(v.verdict == k for v in study.verdicts) for k in ("supported", "not supported", "inconclusive")})
write_text(OUT / "failure_notebook.json", study.to_json())
