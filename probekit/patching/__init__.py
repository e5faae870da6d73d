"""Activation patching: which activations the model causally uses for its answer.

Axis names: ``batch`` (examples), ``pos`` (token positions; for attention patterns the *destination*
/ query position), ``layer``, ``head``, ``d_model``, ``d_head``, ``answer`` (answer steps read by a
metric), ``patch`` (one entry per patch in a list of patches).

A `CorruptedPair` (see `probekit.corruptions`) gives a clean and a corrupted batch of identical
shape. **Denoising** runs the corrupted input and writes clean activations into it; **noising**
runs the clean input and writes corrupted activations into it. Either way the metric is reported
raw and normalised, ``(m - m_corrupted) / (m_clean - m_corrupted)``: 0 = the corrupted run,
1 = the clean run (normalised from batch means).

Sites (TransformerLens names): ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``,
``mlp_out`` (per position), and per head ``z`` (head output, ``hook_z``; alias ``head``), ``q``,
``k``, ``v`` and ``pattern``. A `Component` is ``(site, layer, head, pos)`` with ``head``/``pos``
``None`` meaning all heads / all positions; any list of components is patched together.
``resid_mid`` is the residual stream between attention and MLP (HookedTransformer semantics: the
MLP *and* the residual carry the patched value). Note that TransformerLens 4's bridge
``hook_resid_mid`` only feeds the MLP's LayerNorm, so TL's ``get_act_patch_resid_mid`` differs.

Path patching (`PathPatch`, `path_patch`): the sender head's clean-minus-corrupted write
``(z_src - z_base) @ W_O`` is added only to one receiver's input: one later head's q, k or v
input (before its LayerNorm, per head, as in ``transformer_lens.patching.get_act_patch_direct_path``)
or the final residual read by the unembedding (``receiver="logits"``, the direct path).

Metrics are `probekit.metrics`'s (``logit-diff``, ``logit``, ``logprob``, ``prob``, ``margin``, ``acc``,
``exact-match``; teacher forced), read against the clean answer. ``steps`` picks the answer steps
evaluated (`probekit.metrics.digit_step`: answer digit k of a product); values are averaged over
steps, then over the batch.

The native engine (models built by probekit, any TL-native bridge and a Hugging Face GPT-2 bridge; built on the partial
recomputation of `probekit.forward`) runs K patches as K groups of batch rows in one pass and recomputes only what a patch can change: it starts at the first patched layer
from the cached unpatched run, tracks the positions whose residual differs from that run (keys and
values are recomputed only there; under causal attention only later queries can change), computes
the last layer only at the positions the metric reads, shares the unchanged keys and values of all
K row groups in one matmul, and splits work so no pass has more than ``max_batch`` rows (examples
are split too when n > max_batch). Other bridges use a hook-based fallback (``engine="hooks"``).
Both are tested against ``transformer_lens.patching`` to 1e-5.

Modules: `sites` (site names, `Component`, `PathPatch`), `native` (the native engine as a pipeline:
plan, per-layer recomputation on `probekit.forward`, read-out), `hooks` (the hook engine), `sweeps`
(`patch_values` (batch means and per example, for intervals), `sweep`, `patch`, `path_patch`), `_metric` (the metric pieces, from `probekit.metrics`).
"""

from probekit.patching._metric import METRICS, BoundMetric, Metric, answer_layout, digit_step, position_labels
from probekit.patching.hooks import HookEngine
from probekit.patching.native import NativeEngine
from probekit.patching.sites import (
    BLOCK_SITES,
    HEAD_SITES,
    RECEIVERS,
    SITE_ALIASES,
    SITES,
    Component,
    Direction,
    Patch,
    PathPatch,
    canonical_site,
)
from probekit.patching.sweeps import (
    PatchValues,
    patch,
    patch_values,
    path_patch,
    sweep,
)

__all__ = ["BLOCK_SITES", "BoundMetric", "Component", "Direction", "HEAD_SITES", "HookEngine", "METRICS", "Metric",
           "NativeEngine", "Patch", "PatchValues", "PathPatch", "RECEIVERS", "SITES", "SITE_ALIASES", "answer_layout",
           "canonical_site", "digit_step", "patch", "patch_values", "path_patch", "position_labels", "sweep"]
