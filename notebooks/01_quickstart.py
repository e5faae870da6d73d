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
# # 01 · Quickstart: load, evaluate, probe, patch, attribute
#
# This notebook takes one shipped model through probekit's three instruments, one figure each:
#
# 1. **load** a trained model and its task,
# 2. **evaluate** it by length with greedy decoding (does it extrapolate beyond its training lengths?),
# 3. **probe**: fit linear probes for a latent variable of the task and score them on longer inputs,
# 4. **patch**: run clean/corrupted pairs and patch activations to find what the answer causally depends on,
# 5. **attribute**: direct logit attribution and attention statistics per head.
#
# The model is `sort-baseline`: a 2-layer transformer without positional embeddings (NoPE), trained to
# sort lists of 1 to 20 values. Set `PROBEKIT_NB_SMALL=1` for a toy-scale run (that is what the tests do).

# %%
# %matplotlib inline
import os
import warnings
from pathlib import Path

import pandas as pd
from IPython.display import display

import probekit
from probekit import viz
from probekit.attribution import direct_logit_attribution, head_attention_to
from probekit.corruptions import corrupt
from probekit.evaluate import evaluate
from probekit.patching import sweep
from probekit.probes import probe_lengths
from probekit.studies import value_mask

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: text progress bars
# Size knob: the test suite sets PROBEKIT_NB_SMALL=1 and runs this notebook at toy scale in well under a minute.
SMALL = os.environ.get("PROBEKIT_NB_SMALL") == "1"
OUT = Path(os.environ.get("PROBEKIT_NB_OUT", "../reports/notebooks")) / "01_quickstart"  # files this notebook writes
OUT.mkdir(parents=True, exist_ok=True)
MODEL = "sort-baseline"
LENGTHS = [10, 20, 40] if SMALL else [10, 20, 30, 50, 100]  # evaluation lengths (trained: 1..20)
N_EVAL = 32 if SMALL else 500        # examples per length for greedy evaluation
N_PROBE = 256 if SMALL else 2000     # probe training examples
N_PATCH = 32 if SMALL else 256       # clean/corrupted pairs for patching
print("size:", "small" if SMALL else "research", "| shipped models:", probekit.shipped_models())

# %% [markdown]
# ## 1. Load a model
#
# `probekit.load_model` returns the model (a TransformerLens 4 `TransformerBridge`), its task and the
# saved configuration. The task samples `Batch`es that carry the ground truth of every position: here
# `target` is the token each answer step must write and `target_src_pos` the input position holding it.

# %%
model, task, conf = probekit.load_model(MODEL)
TRAIN_LENGTHS = tuple(conf["train"]["lengths"])
print(model.cfg.n_layers, "layers,", model.cfg.n_heads, "heads, d_model", model.cfg.d_model,
      "| positional:", conf["model"]["positional"], "| trained on lengths", TRAIN_LENGTHS)
batch = task.sample(2, length=8, seed=0)
for line in task.decode(batch.tokens):
    print(line)
pd.DataFrame({name: batch.features[name][0].tolist() for name in ("value", "step", "target", "target_src_pos")},
             index=task.decode(batch.tokens)[0].split()).T

# %% [markdown]
# ## 2. Evaluate by length
#
# Greedy decoding, no teacher forcing: exact match is the fraction of lists sorted entirely right,
# with 95 % Wilson intervals. The shaded band is the range of lengths seen in training.

# %%
ev = evaluate(model, task, LENGTHS, n=N_EVAL, seed=0)
display(ev.to_frame()[["length", "n", "exact_match", "ci_low", "ci_high", "token_acc"]])
viz.show(viz.accuracy_vs_length(ev, train_lengths=TRAIN_LENGTHS))

# %% [markdown]
# ## 3. Probe
#
# A linear probe for `target` (the next value to write) at every layer's residual stream, before
# (`resid_mid`: after attention) and after the MLP (`resid_post`). The probes are fitted at length 20
# and scored on fresh batches of every evaluation length. The shuffled-label control says what a probe
# that learned nothing would score; the dotted line is the majority-class baseline.

# %%
sw = probe_lengths(model, task, "target", "resid_mid,resid_post", train_length=20, test_lengths=LENGTHS,
                   n=N_PROBE, controls=["shuffle"])
print(sw.summary())
viz.show(viz.probe_accuracy(sw, title="probe for the next output, trained at length 20"))

# %% [markdown]
# A fitted probe is an object of its own: score it on any batch, save it, load it, or remove its
# direction from the model during a forward pass (`probe.intervene`).

# %%
best, value = sw.best(split="20")
probe = sw.probe(best["hook"], int(best["layer"]))
print(f"best site {best}: held-out accuracy {value:.3f} at length 20")
longest = task.sample(N_PATCH, length=LENGTHS[-1], seed=7)
print(f"on length {LENGTHS[-1]}: accuracy {probe.score(model, longest).value:.3f}")
probe.save(OUT / "probe_target", overwrite=True)
print("saved to", OUT / "probe_target")

# %% [markdown]
# ## 4. Patch
#
# `successor-change` pairs change one input value so that the already written prefix of the sorted
# answer is unchanged but the next output (the successor of the last written value) changes. Patching a
# head's clean output into the corrupted run and measuring how much of the clean-vs-corrupted logit
# difference comes back (1 = fully clean, 0 = no effect) shows which heads carry the successor.

# %%
pair = corrupt(task, task.sample(N_PATCH, length=20, seed=3), "successor-change", seed=0)
print(pair.description)
heads = sweep(model, pair, "z", by_pos=False, metric="logit-diff")
print("top heads:", heads.top(3))
viz.show(viz.layer_head_heatmap(heads, title="successor-change: head output patched clean -> corrupted"))

# %% [markdown]
# The same pair, patching the residual stream at each position and layer: where is the information
# that decides the next output, before each layer?

# %%
resid = sweep(model, pair, "resid_pre", by_pos=True, metric="logit-diff")
viz.show(viz.heatmap(resid, title="successor-change: resid_pre patched at (layer, position)"))

# %% [markdown]
# ## 5. Attribute
#
# Direct logit attribution splits the logit of the correct token at every answer step into the
# contributions of each head (the final LayerNorm scale frozen at the clean run). Attention statistics
# say where each head looks: `top1` is the fraction of answer steps at which a head's largest attention
# weight falls on a copy of the value it must write next (`value_mask`); `chance` is uniform attention.

# %%
batch = task.sample(N_PATCH, length=20, seed=4)
dla = direct_logit_attribution(model, batch, unit="head", metric="logit")
viz.show(viz.layer_pos_heatmap(dla, title="direct logit attribution of the correct token, by head"))
roles = head_attention_to(model, batch, value_mask(batch))
display(roles.to_frame().pivot(index="head_label", columns="stat_label", values="value"))
viz.show(viz.heatmap(roles, cmap="viridis", symmetric=False, title="attention to a copy of the next output"))

# %% [markdown]
# Attention patterns of one example, every head (circuitsvis; the page works offline and is also
# written to `OUT`).

# %%
page = viz.attention_html(model, task.sample(1, length=10, seed=0), task=task, path=OUT / "attention.html")
viz.show_html(page, height=560)

# %% [markdown]
# ## Next
#
# - `02_carry_mechanism`: the same instruments on multiplication (carries, column sums, operand routing).
# - `03_hint_mechanism`: what training with a successor hint changes in the sorting model, by length.
# - `04_bring_your_own_model`: probekit on a TransformerLens model that probekit did not build.
# - `05_sorting_failure`: why this model fails on longer lists, as a prediction from its own attention.
# - The same analyses from a shell: `probekit eval`, `probekit probe`, `probekit patch`, `probekit attribute`.
