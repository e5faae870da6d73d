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
# # 04 · Bring your own model
#
# probekit's instruments take any TransformerLens 4 `TransformerBridge` and a probekit task: they only
# use the bridge's hooks (`blocks.{L}.hook_resid_pre`, `blocks.{L}.attn.hook_z`, ...) and the task's
# ground truth. Here we build a bridge directly with TransformerLens (no `probekit.build_model`), train it
# with a plain PyTorch loop, and then evaluate, probe and patch it with probekit. Finally we run the same
# patching on probekit's hand-built model, whose circuit is known, as a check of the instrument.

# %%
# %matplotlib inline
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformer_lens.model_bridge.sources.native  # noqa: F401  (registers TransformerBridge.boot_native)
from IPython.display import display
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

import probekit
from probekit import viz
from probekit.attribution import direct_logit_attribution, head_attention_to
from probekit.corruptions import corrupt
from probekit.evaluate import evaluate
from probekit.groundtruth import build_sort_lookup_model
from probekit.patching import sweep
from probekit.probes import Probe, fit_probe, probe_lengths
from probekit.tasks import ProbekitError, SortingTask

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: text progress bars
# Size knob: the test suite sets PROBEKIT_NB_SMALL=1 and runs this notebook at toy scale in well under a minute.
SMALL = os.environ.get("PROBEKIT_NB_SMALL") == "1"
OUT = Path(os.environ.get("PROBEKIT_NB_OUT", "../reports/notebooks")) / "04_bring_your_own_model"  # files this notebook writes
OUT.mkdir(parents=True, exist_ok=True)
N_VALUES = 16 if SMALL else 64       # values 0..N_VALUES-1, distinct within a list
TRAIN_LENGTHS = (2, 8) if SMALL else (2, 16)
STEPS = 300 if SMALL else 3000       # training steps (batch of 64)
D_MODEL = 64 if SMALL else 128
N_EVAL = 64 if SMALL else 500
N_PROBE = 512 if SMALL else 2000
N_PATCH = 32 if SMALL else 256
torch.manual_seed(0)
print("size:", "small" if SMALL else "research", "| shipped models:", probekit.shipped_models())

# %% [markdown]
# ## 1. A TransformerBridge built with TransformerLens
#
# `TransformerBridge.boot_native` builds TransformerLens's own native transformer and wraps it in the
# bridge, which gives it the usual hook points. The vocabulary and context come from the task.

# %%
task = SortingTask(n_values=N_VALUES, repeats=False)
L_MAX = 2 * TRAIN_LENGTHS[1]
cfg = TransformerBridgeConfig(d_model=D_MODEL, d_head=D_MODEL // 4, n_layers=2, n_heads=4, d_mlp=4 * D_MODEL,
                              n_ctx=task.seq_len(L_MAX), d_vocab=task.d_vocab, act_fn="relu",
                              normalization_type="LN", positional_embedding_type="standard", seed=0)
model = TransformerBridge.boot_native(cfg)
print(type(model).__name__, "|", sum(p.numel() for p in model.parameters()), "parameters")
USUAL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_z", "hook_pattern", "hook_attn_out", "hook_mlp_out")
print("hooks of block 0:", [name for name in model.hook_dict if name.startswith("blocks.0.") and name.endswith(USUAL)])

# %% [markdown]
# ## 2. Train it with a plain PyTorch loop
#
# Next-token cross-entropy on the answer tokens only (`batch.answer_mask`), lists of random length in
# the training range. Nothing here is probekit except the task that samples the data.

# %%
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
rng = np.random.default_rng(0)
model.train()
for step in range(STEPS):
    batch = task.sample(64, length=int(rng.integers(TRAIN_LENGTHS[0], TRAIN_LENGTHS[1] + 1)), seed=step)
    for group in opt.param_groups:
        group["lr"] = 3e-3 * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * (1 - step / STEPS))
    logits = model(batch.tokens)  # batch pos d_vocab
    mask = batch.answer_mask[:, 1:]  # the logits at t predict token t + 1
    loss = F.cross_entropy(logits[:, :-1][mask], batch.tokens[:, 1:][mask])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % max(1, STEPS // 6) == 0 or step == STEPS - 1:
        print(f"step {step:5d}  loss {loss.item():.4f}")
_ = model.eval()  # inference mode; the cell shows the losses, not the model

# %% [markdown]
# ## 3. Evaluate by length
#
# `probekit.evaluate` decodes greedily through the bridge (for a model probekit did not build there is no
# key/value cache, so every step is a full forward).

# %%
lengths = sorted({TRAIN_LENGTHS[0], TRAIN_LENGTHS[1] // 2, TRAIN_LENGTHS[1], (3 * TRAIN_LENGTHS[1]) // 2, L_MAX})
ev = evaluate(model, task, lengths, n=N_EVAL, name="my-bridge")
viz.show(viz.accuracy_vs_length(ev, train_lengths=TRAIN_LENGTHS))

# %% [markdown]
# ## 4. Probes
#
# Probes for the next output (`target`) at every layer, fitted at the longest training length and
# scored on all lengths. The `random_model` control needs a probekit config and is reported as
# unavailable here; the shuffled-label and control-task controls work on any model.

# %%
L_FIT = TRAIN_LENGTHS[1]
sw = probe_lengths(model, task, "target", "resid_mid,resid_post", train_length=L_FIT, test_lengths=lengths,
                   n=N_PROBE, controls=["shuffle", "control_task"])
print(sw.summary())
viz.show(viz.probe_accuracy(sw, title=f"probe for the next output, trained at length {L_FIT}"))

# %% [markdown]
# One probe, saved and loaded again. `Probe.load(folder, model=...)` refuses a model whose width or hook
# layout differs from the one the probe was fitted on. With the loaded probe we replace the part of the
# residual stream that the probe reads by its training mean during greedy decoding (`project_out`). If
# accuracy drops, the model uses the information in that subspace; if it does not, the model can read
# the next output from other directions too: a probe finds *a* subspace that carries the information,
# not necessarily the one the model relies on.

# %%
probe = fit_probe(model, task.sample(N_PROBE, length=L_FIT, seed=1), "target", "blocks.1.hook_resid_mid")
probe.save(OUT / "probe_target", overwrite=True)
loaded = Probe.load(OUT / "probe_target", model=model)
print(f"loaded probe at {loaded.hook}: accuracy {loaded.score(model, task.sample(N_PATCH, length=L_FIT, seed=2)).value:.3f}")
with loaded.intervene(model, mode="project_out"):
    ablated = evaluate(model, task, [L_FIT], n=N_EVAL, name="probe direction removed")
print(f"exact match at length {L_FIT}: {ev.exact_match(L_FIT):.3f} -> {ablated.exact_match(L_FIT):.3f} with the direction removed")
other, _ = build_sort_lookup_model(d_model=96)  # a model of another width
try:
    Probe.load(OUT / "probe_target", model=other)
    raise AssertionError("Probe.load accepted a model of another width")
except ProbekitError as e:
    print("refused on another model:", e)

# %% [markdown]
# ## 5. Patching and attribution
#
# `successor-change` pairs (the next output changes, the written prefix does not), each head's clean
# output patched into the corrupted run. probekit's patching engine recomputes only what a patch can
# change; for any TransformerLens-native bridge it must agree with the plain hook-based engine, which we
# check here. Then the attention statistics and the direct logit attribution of each head.

# %%
pair = corrupt(task, task.sample(N_PATCH, length=L_FIT, seed=3), "successor-change", seed=0)
print(pair.description)
heads = sweep(model, pair, "z", by_pos=False, metric="logit-diff")
by_hooks = sweep(model, pair, "z", by_pos=False, metric="logit-diff", engine="hooks")
print("max |fast engine - hook engine|:", float((heads.values - by_hooks.values).abs().max()))
assert torch.allclose(heads.values, by_hooks.values, atol=1e-4)
viz.show(viz.layer_head_heatmap(heads, title="successor-change: head output patched clean -> corrupted"))
viz.show(viz.layer_pos_heatmap(sweep(model, pair, "resid_pre", by_pos=True), title="successor-change: resid_pre patched"))

# %%
batch = task.sample(N_PATCH, length=L_FIT, seed=4)
roles = head_attention_to(model, batch, "target_src_pos")
display(roles.to_frame().pivot(index="head_label", columns="stat_label", values="value"))
viz.show(viz.layer_pos_heatmap(direct_logit_attribution(model, batch, unit="head"),
                           title="direct logit attribution of the correct token, by head"))
print("patching's top head:", heads.top(1)[0][0], "| top-1 attention on the next output:",
      roles.labels["head"][int(roles.values[:, 1].argmax())])

# %% [markdown]
# ## 6. A check with a known answer
#
# `probekit.groundtruth.build_sort_lookup_model` sets the weights of a small model by hand so that one
# head (`L1H2`) performs the successor lookup and writes the answer. The same patching run must find
# that head, and its attention must land on the next output.

# %%
gmodel, gtask = build_sort_lookup_model()
gpair = corrupt(gtask, gtask.sample(N_PATCH, length=8, seed=0), "successor-change", seed=0)
gheads = sweep(gmodel, gpair, "z", by_pos=False, metric="logit-diff")
top = gheads.top(1)[0][0]
print("planted head:", gmodel.planted_head, "| patching's top head:", top)
assert (int(top["layer"]), int(top["head"])) == gmodel.planted_head
viz.show(viz.layer_head_heatmap(gheads, title="hand-built model: the planted head restores the answer"))
