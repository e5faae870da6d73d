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
# # 04 · Bring your own model and data
#
# probekit's instruments take any TransformerLens 4 `TransformerBridge` and a `Batch`. Nothing here
# comes from probekit except the instruments: the model is a Hugging Face GPT-2 built from a
# `GPT2Config` (nothing is downloaded) and trained with a plain PyTorch loop on a task of our own, and
# the data are token ids turned into a `Batch` with `Batch.from_tokens`. Then:
#
# 1. **probe**: where is the first token of the list linearly decodable?
# 2. **patch**: where does the model causally read it when it writes its copy?
# 3. **attribute**: which heads write the copied token into the logits?
# 4. **interchange (DAS)**: is there a small subspace that carries the token, where patching says it is read?

# %%
# %matplotlib inline
import os
import warnings
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from IPython.display import display
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens.model_bridge import TransformerBridge
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from probekit import viz
from probekit.attribution import direct_logit_attribution
from probekit.corruptions import make_pair
from probekit.evaluate import evaluate_batch
from probekit.interventions import CounterfactualPairs, Location, fit_das
from probekit.patching import sweep
from probekit.probes import probe_sweep
from probekit.tasks import Batch

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: text progress bars
# Size knob: the test suite sets PROBEKIT_NB_SMALL=1 and runs this notebook at toy scale in well under a minute.
SMALL = os.environ.get("PROBEKIT_NB_SMALL") == "1"
OUT = Path(os.environ.get("PROBEKIT_NB_OUT", "../reports/notebooks")) / "04_bring_your_own_model"  # files this notebook writes
OUT.mkdir(parents=True, exist_ok=True)
VOCAB, K = 50, 6                   # token ids 1..49 are list items, 0 separates the list from its copy
STEPS = 120 if SMALL else 600      # training steps, batch of 64
N_PROBE = 600 if SMALL else 4000   # probe training examples
N_PAIRS = 64 if SMALL else 512     # clean/corrupted pairs for patching and attribution
N_DAS = 120 if SMALL else 1000     # counterfactual pairs for DAS
torch.manual_seed(0)
print("size:", "small" if SMALL else "research")

# %% [markdown]
# ## 1. A model of your own
#
# A 2-layer GPT-2 with learned positions. `boot_transformers` wraps a model object you already have
# (`hf_model=`) with a tokenizer you already have; the word-level tokenizer here is built in memory, so
# nothing is fetched from the hub.

# %%
hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=32,
                                bos_token_id=0, eos_token_id=0))
words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", unk_token="t0")
print(sum(p.numel() for p in hf.parameters()), "parameters")

# %% [markdown]
# ## 2. Data of your own: a copy task
#
# Each example is six tokens, the separator 0, then the same six tokens: `x0 .. x5 0 x0 .. x5`. The
# answer (what the model must predict) is the copy. `Batch.from_tokens` takes the token ids, a mask of the
# answer tokens, and the features to probe, one value per position: here `first`, the first token x0,
# defined from the separator on (-1 elsewhere, which the probes skip).

# %%
def copy_data(n: int, seed: int, first: torch.Tensor | None = None) -> Batch:
    """``n`` copy examples; ``first`` sets x0 (and its copy)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (n, K), generator=g)
    if first is not None:
        x[:, 0] = first
    tokens = torch.cat([x, torch.zeros(n, 1, dtype=torch.long), x], 1)
    answer = torch.zeros_like(tokens, dtype=torch.bool)
    answer[:, K + 1:] = True
    x0 = torch.full_like(tokens, -1)
    x0[:, K:] = x[:, :1]
    return Batch.from_tokens(tokens, answer, {"first": x0}, name="copy")


print(copy_data(2, seed=0).tokens)

# %% [markdown]
# ## 3. Train it (plain PyTorch)
#
# Next-token cross-entropy on the answer tokens only. Then the model is booted as a bridge, and
# `evaluate_batch` decodes each answer greedily and scores it against the batch's own tokens.

# %%
opt = torch.optim.AdamW(hf.parameters(), lr=3e-3)
hf.train()
for step in range(STEPS):
    b = copy_data(64, seed=10_000 + step)
    for group in opt.param_groups:
        group["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
    logits = hf(b.tokens).logits
    m = b.answer_mask[:, 1:]  # the logits at t predict token t + 1
    loss = F.cross_entropy(logits[:, :-1][m], b.tokens[:, 1:][m])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % max(1, STEPS // 5) == 0 or step == STEPS - 1:
        print(f"step {step:4d}  loss {loss.item():.4f}")
model = TransformerBridge.boot_transformers("my-gpt2", hf_model=hf.eval(), tokenizer=tokenizer, device="cpu").eval()
rec = evaluate_batch(model, copy_data(500, seed=1)).records[0]
print(f"held-out exact match {rec['exact_match']:.3f} (95 % interval {rec['exact_match_ci95'][0]:.3f}-"
      f"{rec['exact_match_ci95'][1]:.3f}); accuracy by answer position {rec['per_position']}")

# %% [markdown]
# ## 4. Probe: where is the first token decodable?
#
# One logistic probe per site (the residual stream entering layer 0, and after each layer) and per
# position from the separator on, fitted on one batch and scored on another. At the separator (position
# 6) the input token is always 0, so it says nothing about x0: anything a probe reads there was moved in
# by attention. At position 7 the input token *is* x0, so a high accuracy there is no evidence of
# computation. Chance is about 1/49.

# %%
probes = probe_sweep(model, copy_data(N_PROBE, seed=2), "first", "blocks.0.hook_resid_pre,resid_post",
                     evals={"held-out": copy_data(N_PROBE, seed=3)}, by_position=True, controls=["shuffle"])
by_site = viz.probe_by_site(probes, "held-out")
by_site.labels["position"] = [str(K + int(p)) for p in by_site.labels["position"]]  # slot k: token position 6 + k
display(pd.DataFrame(by_site.values.numpy(), index=by_site.labels["site"], columns=by_site.labels["position"]).round(2))
viz.show(viz.heatmap(by_site, cmap="viridis", symmetric=False, label="held-out probe accuracy",
                     title="Where the first token can be read: probe accuracy by site and position"))
_ = probes.probe("resid_post", 0, position=0).save(OUT / "probe_first", overwrite=True)  # json + safetensors

# %% [markdown]
# ## 5. Patch: where is the first token read?
#
# Pairs that differ only in x0 (and so in the first answer token). Each cell puts the clean run's
# residual stream at one (layer, position) into the corrupted run and reports how much of the
# clean-minus-corrupted logit difference comes back (1: all of it, 0: none). A probe says where x0 *can*
# be read; this says where the model's answer *depends* on it. Before layer 0 only position 0 can
# matter (nothing else differs); the row of layer 1 shows where layer 0 has put what the answer needs.

# %%
clean = copy_data(N_PAIRS, seed=4)
pair = make_pair(clean, copy_data(N_PAIRS, seed=4, first=clean.tokens[:, 0] % (VOCAB - 1) + 1))  # x0 -> x0 + 1
resid = sweep(model, pair, "resid_pre")
print("before layer 1, restored by position:", [round(float(v), 2) for v in resid.values[1]])
viz.show(viz.heatmap(resid, title="Patching the residual stream before each layer: share of the logit difference restored"))

# %% [markdown]
# The same pairs, patching one head's output at every position: which heads move x0 to the separator?
# Several heads with similar shares are doing the job together; their single-head shares need not add up
# to 1, because patching heads one at a time is not patching them all at once.

# %%
heads = sweep(model, pair, "z", by_pos=False)
print("restored by each layer's heads together:", [round(float(v), 2) for v in heads.values.sum(1)])
viz.show(viz.layer_head_heatmap(heads, title="Patching one head's output: share of the logit difference restored"))

# %% [markdown]
# ## 6. Attribute: which heads write the answer?
#
# Direct logit attribution splits the logit of the correct token at each answer position into what each
# head writes straight into the final residual stream (the final LayerNorm's scale frozen at the run's
# value). A head can matter in patching without writing the answer itself (it may feed a later layer);
# DLA sees only the direct path, and here it is measured on every answer position, not only the first.

# %%
dla = direct_logit_attribution(model, clean, unit="head")
print("direct logit attribution by layer (mean over answer positions, summed over heads):",
      [round(float(v), 2) for v in dla.values.mean(1).sum(-1)])
viz.show(viz.layer_pos_heatmap(dla, title="Direct logit attribution of the correct token, by head and position"))

# %% [markdown]
# ## 7. Interchange intervention (DAS): a subspace that carries the token
#
# Base and source examples differ in x0. At one site and position, distributed alignment search learns a
# 16-dimensional subspace (of 64) whose value, taken from the source run, makes the model write the
# *source's* x0 as its first answer. IIA is the share of held-out pairs where it does, with a 95 %
# bootstrap interval; `control` is the same for random 16-dimensional subspaces, `ceiling` for the whole
# vector (activation patching), `floor` for no intervention. We fit it at the separator after layer 0,
# where patching located the token, and at x0's own position after layer 0, for contrast.

# %%
base = copy_data(N_DAS, seed=6)
source = copy_data(N_DAS, seed=6, first=base.tokens[:, 0] % (VOCAB - 1) + 1)
pairs = CounterfactualPairs(base, source, at=K, target=source.tokens[:, 0], vary="first")
rows = []
for where, pos in (("separator", K), ("first token", 0)):
    fit = fit_das(model, pairs, Location("resid_post", 0, pos), k=16, steps=40 if SMALL else 300)
    c = fit.control
    rows.append({"site": f"resid_post L0, {where} (position {pos})", "IIA": fit.iia,
                 "95 % interval": f"{fit.interval[0]:.2f}-{fit.interval[1]:.2f}",
                 "random subspaces": f"{float(c.mean()):.2f} (max {float(c.max()):.2f})",
                 "ceiling": fit.ceiling, "floor": fit.floor, "test pairs": int(fit.correct.numel())})
display(pd.DataFrame(rows).set_index("site"))

# %% [markdown]
# Read the table against its baselines: a DAS IIA whose interval lies above the random subspaces' IIA means
# the learned subspace carries x0 where the model reads it; a ceiling of 0 means the model does not read
# that site at all, so no subspace of it can carry the answer, whatever a probe finds there.
#
# ## What you wrote
#
# The model, the data and the training loop are yours; each instrument was one call on `(model, batch)`
# or `(model, pair)`. The same calls work on any bridge TransformerLens can boot; on a GPT-2 bridge
# probekit's fast forward runs (the patching engine, edge attribution), elsewhere the hook-based path.
