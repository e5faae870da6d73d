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
# # 03 · The hint mechanism in sorting
#
# `sort-successor` was trained on sorting **and** on a successor hint (given an element, write the
# element that follows it in sorted order); `sort-baseline` on sorting only. Both are 2-layer NoPE
# models trained on lists of 1 to 20 values from 0..63, with repeats. A sort step writes either another
# copy of the value just written (a *repeat step*) or the next larger value (a *new-value step*); both
# need the list, and both are asked of every step.
#
# What does the hint change in the mechanism, and does the hinted model's own lookup extrapolate? The
# notebook walks through the evidence the packaged study (`probekit.studies.hint_study`) uses:
#
# 1. **accuracy** by length, on sorting and on the hint task itself;
# 2. **components by causal effect**: each head's output patched under `successor-change` pairs, with
#    bootstrap intervals over pairs; heads chosen on one sample and tested on another; the *same* head
#    compared across models;
# 3. **weights**: the chosen heads' QK circuits against heads with random weights;
# 4. **interchange interventions** on the next value: a head's output, and a DAS subspace, swapped in from a
#    list with the same previous output and another next value;
# 5. **attention**, as description only: normalised to chance and split by step type;
# 6. **probes** held out at every length, beside the majority-class and token-only baselines.
#
# Every number that enters a claim carries a 95 % interval; the verdicts come from the intervals.

# %%
# %matplotlib inline
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import probekit
from probekit import viz
from probekit.activations import collect
from probekit.attribution import all_heads, head_label
from probekit.circuits import qk_circuit, random_circuits, row_scores
from probekit.corruptions import corrupt
from probekit.evaluate import evaluate
from probekit.interventions import (
    Location,
    SubspaceInterchange,
    Where,
    counterfactual_pairs,
    fit_das,
    interchange_correct,
    random_subspace,
    source_value,
)
from probekit.io import write_text
from probekit.patching import Component, patch
from probekit.probes import probe_sweep
from probekit.stats import bootstrap_ci, chance_normalised_attention, majority_baseline, token_baseline
from probekit.studies import hint_study, value_mask

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: text progress bars
# Size knob: the test suite sets PROBEKIT_NB_SMALL=1 and runs this notebook at toy scale.
SMALL = os.environ.get("PROBEKIT_NB_SMALL") == "1"
OUT = Path(os.environ.get("PROBEKIT_NB_OUT", "../reports/notebooks")) / "03_hint_mechanism"  # files this notebook writes
OUT.mkdir(parents=True, exist_ok=True)
MODELS = ["sort-baseline", "sort-successor"] + ([] if SMALL else
                                                [m for m in ["sort-predecessor"] if m in probekit.shipped_models()])
TRAIN = 20                                    # trained on lengths 1..20
LENGTHS = [10, 20, 40] if SMALL else [10, 20, 50, 100]
N_EVAL = 32 if SMALL else 500                 # lists per length, greedy evaluation
N_PATCH = 24 if SMALL else 128                # successor-change pairs per sample
N_ROLE = 32 if SMALL else 200                 # lists per length, attention statistics
N_PROBE = 256 if SMALL else 1000              # probe training lists (length 20)
N_DAS = 64 if SMALL else 1000                 # counterfactual pairs for the interchange interventions
BOOT = 200 if SMALL else 1000                 # bootstrap resamples
print("size:", "small" if SMALL else "research", "| shipped models:", probekit.shipped_models())

# %% [markdown]
# ## 1. Accuracy by length, on sorting and on the hint task
#
# The hinted model also answers its own hint objective (queries given, answers decoded): its accuracy
# there says how well the lookup itself was learned, separately from sorting.

# %%
models, evals = {}, {}
for name in MODELS:
    model, task, conf = probekit.load_model(name)
    models[name] = (model, task)
    evals[name] = evaluate(model, task, LENGTHS, n=N_EVAL, seed=0, name=name)
    print(name, "trained on", conf["train"]["lengths"], "objectives", conf["train"].get("objectives"))
model, task = models["sort-successor"]
evals["sort-successor (its successor hint)"] = evaluate(model, task.with_objective("successor"), LENGTHS, n=N_EVAL,
                                                        seed=0, name="sort-successor (successor hint)")
viz.show(viz.accuracy_vs_length(evals, train_lengths=(1, TRAIN), title="Exact match vs length (greedy decoding)"))
evals["sort-successor (its successor hint)"].to_frame()[["length", "exact_match", "ci_low", "ci_high", "token_acc"]]

# %% [markdown]
# ## 2. Components by causal effect
#
# A `successor-change` pair changes one input value so that the sorted prefix is kept but the next output
# changes. Each head's clean output is patched into the corrupted run (across positions); the share of
# the clean-vs-corrupted logit difference it restores is a ratio of means over pairs, and its interval
# resamples pairs. The heads of each model are *chosen* on one sample (interval above 0.10) and
# *measured* on another, so the choice does not inflate the numbers.

# %%
def share(a, j):
    """Share of the logit difference group j restores; columns: groups..., clean, corrupted."""
    return (a[:, j].mean() - a[:, -1].mean()) / (a[:, -2].mean() - a[:, -1].mean())


def per_example(model, pair, heads):
    r = patch(model, pair, [Component("z", L, h) for L, h in heads], normalize=False, per_example=True)
    return np.column_stack([r.extra["per_example"].T.numpy(), r.extra["clean_per_example"].numpy(),
                            r.extra["corrupted_per_example"].numpy()])


task = models[MODELS[0]][1]
heads = all_heads(models[MODELS[0]][0])
select = corrupt(task, task.sample(N_PATCH, length=TRAIN, seed=1), "successor-change", seed=1)
test = corrupt(task, task.sample(N_PATCH, length=TRAIN, seed=2), "successor-change", seed=2)
chosen, patched, rows = {}, {}, []
for name, (model, _) in models.items():
    sel = per_example(model, select, heads)
    picks = [(bootstrap_ci(sel, lambda a, j=j: share(a, j), n_boot=BOOT), h) for j, h in enumerate(heads)]
    chosen[name] = [h for (est, lo, hi), h in sorted(picks, key=lambda p: -p[0][0]) if lo > 0.10]
    patched[name] = per_example(model, test, heads)  # the same held-out pairs for every model
    for j, h in enumerate(heads):
        est, lo, hi = bootstrap_ci(patched[name], lambda a, j=j: share(a, j), n_boot=BOOT)
        rows.append({"model": name, "head": head_label(*h), "restored": est, "lo": lo, "hi": hi,
                     "chosen": h in chosen[name]})
    print(f"{name}: chosen heads {[head_label(*h) for h in chosen[name]]}")
viz.show(viz.interval_plot(rows, "head", y="restored", hue="model", reference=0.10, reference_label="choice threshold",
                           ylabel="share of logit difference restored", title="Each head's output patched (held-out pairs)"))

# %% [markdown]
# How to read it: if several heads restore comparable shares with overlapping intervals, no single head
# is "the" lookup head; if the single-head shares add up to more than 1, their effects overlap (each
# alone restores part of what the others do). The comparison that matters for the hint is the *same*
# head in both models, on the *same* pairs (a paired bootstrap: one resample draws the same pairs for
# both models).

# %%
for name in models:
    total = sum(share(patched[name], heads.index(h)) for h in chosen[name])
    print(f"{name}: single-head shares of the chosen heads sum to {total:.2f}")
top = chosen["sort-successor"][0]
j = heads.index(top)
both = np.hstack([patched["sort-successor"], patched["sort-baseline"]])
W = patched["sort-successor"].shape[1]
d = bootstrap_ci(both, lambda a: share(a[:, :W], j) - share(a[:, W:], j), n_boot=BOOT)
print(f"{head_label(*top)}: restored share, sort-successor - sort-baseline = {d[0]:.3f} [{d[1]:.3f}, {d[2]:.3f}]")

# %% [markdown]
# ## 3. Weights: the QK circuit of the chosen heads
#
# A successor lookup attends, from the previous output, to keys whose value lies above it. `succ_above`
# (one value per query value) is the probability that a key above the query outscores a key at or below it
# (0.5 = no order). Heads with random weights of the same norms, read through the same embeddings, give the
# baseline.

# %%
crow = []
for name, (model, task) in models.items():
    hs = sorted({chosen[n][0] for n in models})
    qk = qk_circuit(model, heads=hs, task=task)
    for i, h in enumerate(hs):
        est = bootstrap_ci(row_scores(qk.values[i])["succ_above"].numpy(), n_boot=BOOT)
        rand = [float(row_scores(M)["succ_above"].mean()) for M in random_circuits(model, h, "qk", n=5, task=task).values]
        crow.append({"model": name, "head": head_label(*h), "succ_above": est[0], "lo": est[1], "hi": est[2],
                     "random heads (max of 5)": max(rand)})
pd.DataFrame(crow)

# %% [markdown]
# ## 4. Interchange interventions on the next value
#
# Pairs of lists with the same previous output at step 10 and a different next value. Swapping in a head's
# output (its `d_head` coordinates of `attn.hook_z`) from the source list should move the answer to the
# source's next value if that head carries it; a random subspace of the same size is the control. DAS learns
# an 8-dimensional subspace after the first layer's attention; the full vector is the ceiling.

# %%
task = models[MODELS[0]][1]
at = Where(step=TRAIN // 2)
pairs = counterfactual_pairs(task, N_DAS, TRAIN, vary="target", hold=["prev_output"], at=at,
                             target=source_value("target", at), seed=0)
irow = []
for name, (model, _) in models.items():
    h = chosen[name][0]
    nH, dh = model.cfg.n_heads, model.cfg.d_head
    loc = Location("attn.hook_z", h[0], at)
    mine = interchange_correct(model, pairs, loc, SubspaceInterchange(torch.eye(nH * dh)[h[1] * dh:(h[1] + 1) * dh]))
    ctrl = interchange_correct(model, pairs, loc, random_subspace(nH * dh, dh, seed=0))
    fit = fit_das(model, pairs, Location("resid_mid", 0, at), k=8, steps=5 if SMALL else 150, n_controls=1, n_boot=BOOT)
    irow.append({"model": name, "head": head_label(*h), "head IIA": float(mine.float().mean()),
                 "random subspace": float(ctrl.float().mean()), "DAS IIA (resid_mid L0)": fit.iia,
                 "DAS 95 %": fit.interval, "DAS control": float(fit.control.mean()), "full vector": fit.ceiling})
pd.DataFrame(irow)

# %% [markdown]
# ## 5. Attention, normalised to chance and split by step type
#
# The attention a head puts on the copies of the next value, over what uniform attention over the list
# would put there (1 = chance), for repeat steps and new-value steps separately, with intervals that
# resample lists. Pooling the two step types hides that long lists hold more repeat steps.

# %%
arow = []
for name, (model, task) in models.items():
    h = chosen["sort-successor"][0]  # the same head in every model
    for L in LENGTHS:
        b = task.sample(N_ROLE, length=L, seed=L)
        q = b.features["step"] >= 0
        types = np.where((b.features["target"] == b.features["prev_output"])[q].numpy(), "repeat", "new")
        ex = torch.arange(b.n)[:, None].expand_as(q)[q].numpy()
        vis = (b.features["value"] >= 0)[:, None, :].expand(-1, b.seq_len, -1)[q].numpy()
        _, cache = model.run_with_cache(b.tokens, names_filter=f"blocks.{h[0]}.attn.hook_pattern")
        A = cache[f"blocks.{h[0]}.attn.hook_pattern"][:, h[1]][q].float().numpy()
        for t, r in chance_normalised_attention(A, value_mask(b)[q].numpy(), types, visible=vis, groups=ex,
                                                n_boot=BOOT).items():
            arow.append({"model": name, "length": L, "step": f"{t}-value steps", "ratio": r["ratio"],
                         "lo": r["ratio_ci95"][0], "hi": r["ratio_ci95"][1], "share of steps": r["n"] / len(types)})
viz.show(viz.interval_plot(arow, "length", y="ratio", hue="model", facet="step", reference=1.0,
                           reference_label="uniform over the list", log_x=True, xlabel="list length",
                           ylabel="attention on the next value / uniform share",
                           title=f"{head_label(*h)}: attention on the next value, by step type"))

# %% [markdown]
# ## 6. Probes, held out at every length, beside two baselines
#
# A probe for the next value after the last attention layer, fitted at length 20 and scored on fresh
# lists of every length (20 included). The token-only baseline is the best guess from the current input
# token alone; a probe at that line holds nothing more about the next value than the token does.

# %%
prow = []
for name, (model, task) in models.items():
    train = task.sample(N_PROBE, length=TRAIN, seed=1000)
    ev = {str(L): task.sample(max(64, N_PROBE // 4), length=L, seed=2000 + L) for L in LENGTHS}
    sw = probe_sweep(model, train, "target", hooks="resid_mid", evals=ev, controls=[], seed=0)
    hook = "blocks.1.hook_resid_mid"
    q = train.features["target"] >= 0
    for L, b in ev.items():
        acts = collect(model, b, [hook], feature="target")
        y = acts.labels.numpy()
        ok = (sw.probe(hook, position="all").predict(acts.acts[hook]).numpy() == y).astype(float)
        est = bootstrap_ci(ok, n_boot=BOOT, groups=acts.example.numpy())
        prow.append({"model": name, "length": int(L), "probe": est[0], "lo": est[1], "hi": est[2],
                     "token-only": token_baseline(train.tokens[q], train.features["target"][q], acts.token, y)["accuracy"],
                     "majority": majority_baseline(train.features["target"][q], y)["accuracy"]})
pd.DataFrame(prow)

# %% [markdown]
# ## 7. The packaged study
#
# `probekit.studies.hint_study` runs these measurements (plus patching at the longest length, OV copying,
# DAS after every layer, teacher-forced accuracy by step type and, given a sweep folder, the hint gap over
# seeds) for `probekit report`, and states each claim as a hypothesis with its interval and verdict.
#
# The sweep folder here is the kept archive of `sort-hint-controls` (three seeds each of the hinted recipe,
# sort only at the same steps, and sort only at the same number of sort batches): is the hint's effect on
# exact match more than a different amount of sorting practice? The table is the gap over seeds, length by
# length, against each control, with its Welch t interval.

# %%
study = hint_study(models=tuple(MODELS), lengths=tuple(LENGTHS), size="quick" if SMALL else "default",
                   sweep="../analyses/zoo/results/sort-hint-controls")
print("\n".join(study.headline))
print(study.summary())
write_text(OUT / "hint_study.json", study.to_json())
for f in study.figures[:1]:
    viz.show(f.make())

# %%
pd.DataFrame(study.tables["hint_gap"])[["hinted", "control", "length", "seeds", "hinted_mean", "control_mean",
                                        "gap", "lo", "hi"]]
