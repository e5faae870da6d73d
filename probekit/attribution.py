"""Which heads (and MLPs) carry the answer: direct logit attribution, head ablation, attribution patching,
head-role summaries.

Axis names (results and jaxtyping annotations):

- ``batch``      examples;
- ``pos``        token positions; in results, the *predicting* positions of the batch (``batch.pred_mask``),
                 whose logits give an answer token (labels: `probekit.metrics.position_labels`);
- ``src``        key (source) positions that a head attends to;
- ``layer``, ``head``  attention heads (``"L1H2"`` is layer 1, head 2);
- ``component``  an additive term of the final residual stream (``embed``, ``pos_embed``, ``attn1``, ``mlp0``,
                 ``L1H2``, ``attn1.b_O``, ``const``);
- ``d_model``, ``d_head``  model and head widths.

Results keep TransformerLens's axis order (`probekit.results`): DLA by head is ``(layer, pos, head)``, by
source ``(layer, pos, head, src)``; ``layer`` and ``head`` labels are the model's integer indices.

Metrics are `probekit.metrics`'s (`probekit.metrics.metric_value`), read at the predicting positions
against the batch's own answer tokens: ``logit``, ``logprob``, ``prob``, ``margin``, ``acc``, ``exact-match``
(teacher forced), and, for a clean/corrupt pair, ``logit-diff``.

Direct logit attribution (DLA). The final residual stream is a sum of component outputs (embeddings, each
head's ``z @ W_O`` -- value bias included --, each layer's ``b_O``, each MLP). The final LayerNorm is made
linear by *freezing its scale* at the clean run's value: with ``u`` the unembedding direction of the metric
(``W_U[:, target]``, minus ``W_U[:, runner_up]`` for ``margin``), component ``x`` contributes
``x . D`` with ``D = center(gamma * u) / scale`` (no centering for RMS norms, ``gamma = 1`` without a learned
weight, ``scale = 1`` without a norm). The documented remainder ``const = beta . u + b_U[target]`` is a
per-token constant that no component writes; it is reported as its own component, so the components sum
to the logit exactly (float error is recorded in ``settings["completeness_max_abs_error"]``). ``margin``
fixes the runner-up token of the clean run, so the decomposition stays linear.
TransformerLens's own `direct_logit_attribution` needs a bridge in compatibility mode with the final norm
folded into ``W_U`` (it refuses an unfolded bridge); folding mutates the model, so we compute from the
weights of the unfolded model and test against TransformerLens on a folded copy.

Head ablation replaces a head's ``hook_z`` (``[batch, pos, head, d_head]``): ``zero``; ``mean`` over a
reference batch at each position (same task, objective and length, else refused); ``resample`` from
another example of the reference batch (the batch itself by default, shifted by a random offset so no
example gets its own activation). Hooks live only inside `ablation_hooks` (a context manager), so the
greedy decoding of `probekit.evaluate.greedy_decode` run inside it is ablated too.

Attribution patching (denoising, as `transformer_lens.patching`): patching activation ``a`` of the corrupt
run to its clean value changes the metric by about ``(a_clean - a_corrupt) . dmetric/da`` at the corrupt
run -- one clean forward, one corrupt forward and one backward for every head, position and MLP. With
``ig_steps > 1`` the gradient is averaged over the path that interpolates the token embeddings from
corrupt to clean (midpoints), i.e. integrated gradients. Exact patching uses
`transformer_lens.patching.get_act_patch_attn_head_out_by_pos` / ``get_act_patch_mlp_out`` and the
agreement (Spearman, top-k overlap) is reported with every run that has both.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from probekit.metrics import (
    GRADIENT_METRICS,
    METRICS,
    PAIR_METRICS,
    answer_layout,
    answer_targets,
    check_metric,
    check_pair,
    metric_value,
    position_labels,
)
from probekit.results import Result
from probekit.tasks import Batch, ProbekitError

DLA_METRICS = ("logit", "margin")
ABLATION_METRICS = tuple(m for m in METRICS if m not in PAIR_METRICS)
DLA_UNITS = ("layer", "head", "source", "component")
ABLATIONS = ("zero", "mean", "resample")
Head = tuple[int, int]


# ---------------------------------------------------------------------------- small helpers


def _device(model, device) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def head_label(layer: int, head: int) -> str:
    """``"L1H2"`` for layer 1, head 2."""
    return f"L{layer}H{head}"


def all_heads(model) -> list[Head]:
    """Every (layer, head) of the model, layer-major."""
    return [(L, h) for L in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


def parse_heads(spec: str | Sequence, model) -> list[Head]:
    """Heads from ``"L1H2,L0H3"`` or ``[(1, 2), (0, 3)]``, checked against the model's shape."""
    if isinstance(spec, str):
        heads = []
        for part in [p.strip() for p in spec.split(",") if p.strip()]:
            m = re.fullmatch(r"[Ll](\d+)[Hh](\d+)", part)
            if not m:
                raise ProbekitError(f"head {part!r} is not of the form L<layer>H<head>, e.g. L1H2")
            heads.append((int(m.group(1)), int(m.group(2))))
        if not heads:
            raise ProbekitError(f"no heads in {spec!r}; expected e.g. L1H2,L0H3")
    else:
        try:
            heads = [(int(L), int(h)) for L, h in spec]
        except (TypeError, ValueError):
            raise ProbekitError(f"heads must be (layer, head) pairs, got {spec!r}") from None
    check_heads(model, heads)
    return heads


def check_heads(model, heads: Sequence[Head]) -> None:
    """Refuse a head or layer out of the model's range."""
    nL, nH = model.cfg.n_layers, model.cfg.n_heads
    for L, h in heads:
        if not 0 <= L < nL:
            raise ProbekitError(f"layer {L} is out of range; the model has layers 0..{nL - 1}")
        if not 0 <= h < nH:
            raise ProbekitError(f"head {h} is out of range; the model has heads 0..{nH - 1} per layer")


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise ProbekitError(f"unknown {what} {value!r}; expected one of {list(choices)}")


def _batch_settings(batch: Batch) -> dict:
    return {"task": batch.task, "objective": batch.objective, "length": batch.length, "n": batch.n}


def _model_name(model) -> str:
    return str(getattr(model, "probekit_name", type(model).__name__))


# ---------------------------------------------------------------------------- direct logit attribution


def _final_norm_params(model):
    """(kind, gamma, beta, eps) of the final norm: kind in {'LN', 'RMS', None}."""
    norm = model.cfg.normalization_type
    norm = None if norm is None else str(norm).upper()
    if norm is not None and getattr(model.cfg, "final_rms", False):
        norm = "RMSPRE" if norm.endswith("PRE") else "RMS"
    kind = {"LN": "LN", "LNPRE": "LN", "RMS": "RMS", "RMSPRE": "RMS", None: None}.get(norm, "?")
    if kind == "?":
        raise ProbekitError(f"final normalization {norm!r} is not supported by DLA; expected LN, LNPre, RMS, RMSPre or none")
    ln = getattr(model, "ln_final", None)
    gamma = getattr(ln, "weight", None) if kind is not None else None
    beta = getattr(ln, "bias", None) if kind is not None else None
    gamma = gamma if isinstance(gamma, Tensor) else None
    beta = beta if isinstance(beta, Tensor) else None
    return kind, gamma, beta, float(getattr(model.cfg, "eps", 1e-5))


def _dla_hooks(model) -> list[str]:
    nL = model.cfg.n_layers
    names = ["hook_embed", "hook_pos_embed", f"blocks.{nL - 1}.hook_resid_post"]
    for L in range(nL):
        names += [f"blocks.{L}.attn.hook_z", f"blocks.{L}.attn.hook_v", f"blocks.{L}.attn.hook_pattern",
                  f"blocks.{L}.hook_attn_out", f"blocks.{L}.hook_mlp_out"]
    return names


def _dla_readout(model, lg: Tensor, resid: Tensor, tgt: Tensor, metric: str) -> dict:
    """The frozen-scale readout direction ``D`` (batch k d_model), the constant remainder and the metric itself."""
    W_U = model.W_U.float()  # d_model d_vocab
    b_U = model.b_U.float() if isinstance(getattr(model, "b_U", None), Tensor) else torch.zeros(W_U.shape[1],
                                                                                              device=lg.device)
    u = W_U[:, tgt].permute(1, 2, 0)  # batch k d_model
    actual = lg.gather(-1, tgt[..., None])[..., 0]
    const_bias = b_U[tgt]
    other = None
    if metric == "margin":
        other = lg.scatter(-1, tgt[..., None], float("-inf")).argmax(-1)  # runner-up of the clean run
        u = u - W_U[:, other].permute(1, 2, 0)
        actual = actual - lg.gather(-1, other[..., None])[..., 0]
        const_bias = const_bias - b_U[other]
    kind, gamma, beta, eps = _final_norm_params(model)
    g = u * gamma.float() if gamma is not None else u
    if kind == "LN":
        g = g - g.mean(-1, keepdim=True)
        scale = ((resid - resid.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + eps).sqrt()
    elif kind == "RMS":
        scale = (resid.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    else:
        scale = torch.ones_like(resid[..., :1])
    const = const_bias + ((u * beta.float()).sum(-1) if beta is not None else 0.0)
    return {"D": g / scale, "const": const, "actual": actual, "other": other}


def _read(x: Tensor, D: Tensor) -> Tensor:
    """``x . D`` over d_model: x is batch k ... d_model, the result batch k ..."""
    d = D.reshape(D.shape[:2] + (1,) * (x.ndim - 3) + D.shape[-1:])
    return (x.float() * d).sum(-1)


def _dla_layer_terms(model, cache, L: int, pos: Tensor, D: Tensor, zeros: Tensor) -> dict:
    """Layer ``L``'s terms: each head (batch k head), its ``b_O``, the whole attention output, the MLP and
    each head split by key position (batch k head src; None under grouped-query attention)."""
    W_O = model.blocks[L].attn.W_O.float()  # head d_head d_model
    z = cache[f"blocks.{L}.attn.hook_z"][:, pos].float()  # batch k head d_head
    b_O = model.blocks[L].attn.b_O
    key = f"blocks.{L}.hook_mlp_out"
    out = {"heads": torch.einsum("bkhe,hem,bkm->bkh", z, W_O, D),
           "bias_O": _read(b_O.float().expand(D.shape), D) if isinstance(b_O, Tensor) else zeros,
           "attn": _read(cache[f"blocks.{L}.hook_attn_out"][:, pos], D),
           "mlp": _read(cache[key][:, pos], D) if key in cache.keys() else None, "source": None}
    v = cache[f"blocks.{L}.attn.hook_v"].float()  # batch src head d_head
    if v.shape[2] == model.cfg.n_heads:
        A = cache[f"blocks.{L}.attn.hook_pattern"][:, :, pos].float()  # batch head k src
        wd = torch.einsum("hem,bkm->bkhe", W_O, D)
        out["source"] = A.permute(0, 2, 1, 3) * torch.einsum("bshe,bkhe->bkhs", v, wd)  # batch k head src
    return out


@torch.no_grad()
def _dla_terms(model, batch: Batch, metric: str, device) -> dict:
    """Per-example DLA terms at the predicting positions (see the module docstring)."""
    check_metric(metric, DLA_METRICS, "DLA metric")
    dev = _device(model, device)
    pos = answer_layout(batch).to(dev)
    tgt = answer_targets(batch).to(dev)  # batch k
    want = set(_dla_hooks(model))
    logits, cache = model.run_with_cache(batch.tokens.to(dev), names_filter=lambda n: n in want)
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, pos].float()  # batch k d_model
    r = _dla_readout(model, logits[:, pos].float(), resid, tgt, metric)
    labels, cols = [], []
    for name, lab in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
        if name in cache.keys():
            labels.append(lab)
            cols.append(_read(cache[name][:, pos], r["D"]))
    layers = [_dla_layer_terms(model, cache, L, pos, r["D"], torch.zeros_like(r["actual"]))
              for L in range(model.cfg.n_layers)]
    return {"pos": pos.cpu(), "embeds": (labels, cols), **{k: [t[k] for t in layers] for k in layers[0]},
            "const": r["const"], "actual": r["actual"], "other": r["other"]}


def _dla_by_component(t: dict, unit: str, nL: int, nH: int) -> tuple[Tensor, list[str]]:
    """batch k component values and their labels, for ``unit`` ``layer`` or ``component``."""
    emb_labels, emb_cols = t["embeds"]
    labels, cols = list(emb_labels), list(emb_cols)
    for L in range(nL):
        if unit == "layer":
            labels.append(f"attn{L}")
            cols.append(t["attn"][L])
        else:
            for h in range(nH):
                labels.append(head_label(L, h))
                cols.append(t["heads"][L][..., h])
            labels.append(f"attn{L}.b_O")
            cols.append(t["bias_O"][L])
        if t["mlp"][L] is not None:
            labels.append(f"mlp{L}")
            cols.append(t["mlp"][L])
    return torch.stack(cols + [t["const"]], -1), labels + ["const"]


def _dla_values(t: dict, unit: str, nL: int, nH: int, batch: Batch, vocab) -> tuple[Tensor, tuple, dict]:
    """(values with a leading batch axis, axes without it, labels) of one DLA ``unit``."""
    pos_lab = position_labels(batch, t["pos"], vocab)
    if unit in ("layer", "component"):
        vals, labels = _dla_by_component(t, unit, nL, nH)
        return vals, ("pos", "component"), {"pos": pos_lab, "component": labels}
    lab = {"layer": list(range(nL)), "pos": pos_lab, "head": list(range(nH))}
    if unit == "head":
        return torch.stack(t["heads"], 1), ("layer", "pos", "head"), lab  # batch layer k head
    if any(s is None for s in t["source"]):
        raise ProbekitError("DLA by source position needs one value vector per query head (no grouped-query attention)")
    lab["src"] = position_labels(batch, None, vocab)
    return torch.stack(t["source"], 1), ("layer", "pos", "head", "src"), lab  # batch layer k head src


def direct_logit_attribution(model, batch: Batch, unit: str = "layer", metric: str = "logit",
                             reduce: str = "mean", vocab: Sequence[str] | None = None, device=None) -> Result:
    """DLA of the answer at every predicting position.

    ``unit``: ``layer`` -> axes (pos, component) with embed, pos_embed, attn<L> (b_O included), mlp<L>, const;
    ``head`` -> (layer, pos, head); ``source`` -> (layer, pos, head, src): each head's term split over the key
    positions it reads (sums over ``src`` to the ``head`` values); ``component`` -> (pos, component) with
    every head, every ``b_O`` and every MLP as its own term. ``layer`` and ``component`` sum over
    ``component`` (the last axis) to the metric exactly (``const`` is the final-norm bias + ``b_U`` remainder).
    ``reduce="none"`` keeps a leading ``batch`` axis.
    """
    _check_choice(unit, DLA_UNITS, "DLA unit")
    _check_choice(reduce, ("mean", "none"), "reduce")
    t = _dla_terms(model, batch, metric, device)
    vals, axes, lab = _dla_values(t, unit, model.cfg.n_layers, model.cfg.n_heads, batch, vocab)
    by_component = unit in ("layer", "component")
    recon = (vals.sum(-1) - t["actual"]).abs().max().item() if by_component else None
    settings = {"instrument": "dla", "unit": unit, "metric": metric, "model": _model_name(model),
                **_batch_settings(batch), "final_norm": "frozen clean-run scale",
                "completeness_max_abs_error": recon}
    extra = {}
    if reduce == "mean":
        vals = vals.mean(0)
        settings["metric_mean_by_pos"] = t["actual"].mean(0).tolist()
    else:
        axes = ("batch",) + axes
        if by_component:
            extra["actual"] = t["actual"]
    return Result(kind=f"dla_{unit}", values=vals, axes=axes, labels=lab, settings=settings, extra=extra)


# ---------------------------------------------------------------------------- ablation


def _check_reference(batch: Batch, reference: Batch) -> None:
    got = (reference.task, reference.objective, reference.length, reference.seq_len)
    want = (batch.task, batch.objective, batch.length, batch.seq_len)
    if got != want:
        raise ProbekitError(
            f"ablation reference batch is task {got[0]!r}, objective {got[1]!r}, length {got[2]} "
            f"({got[3]} tokens); expected task {want[0]!r}, objective {want[1]!r}, length {want[2]} ({want[3]} tokens)")


@torch.no_grad()
def _head_replacements(model, batch: Batch, heads: Sequence[Head], method: str, reference: Batch | None,
                       seed: int, dev) -> dict[int, tuple[list[int], Tensor]]:
    by_layer: dict[int, list[int]] = {}
    for L, h in heads:
        if h not in by_layer.setdefault(L, []):
            by_layer[L].append(h)
    T, d_head = batch.seq_len, model.cfg.d_head
    out = {}
    if method == "zero":
        for L, hs in by_layer.items():
            out[L] = (hs, torch.zeros(1, T, len(hs), d_head, device=dev))
        return out
    ref = batch if reference is None else reference
    _check_reference(batch, ref)
    names = {f"blocks.{L}.attn.hook_z" for L in by_layer}
    _, cache = model.run_with_cache(ref.tokens.to(dev), names_filter=lambda n: n in names)
    if method == "mean":
        for L, hs in by_layer.items():
            out[L] = (hs, cache[f"blocks.{L}.attn.hook_z"][:, :, hs].mean(0, keepdim=True))
        return out
    gen = torch.Generator().manual_seed(seed)
    if reference is None or reference is batch:
        if batch.n < 2:
            raise ProbekitError("resample ablation needs at least 2 examples (or a reference batch)")
        shift = int(torch.randint(1, batch.n, (1,), generator=gen))
        idx = (torch.arange(batch.n) + shift) % batch.n  # a derangement: nobody keeps its own activation
    else:
        idx = torch.randint(0, ref.n, (batch.n,), generator=gen)
    for L, hs in by_layer.items():
        out[L] = (hs, cache[f"blocks.{L}.attn.hook_z"][idx.to(dev)][:, :, hs])
    return out


@contextlib.contextmanager
def ablation_hooks(model, batch: Batch, heads: Sequence[Head], method: str = "zero", reference: Batch | None = None,
                   seed: int = 0, device=None) -> Iterator[None]:
    """Inside this block every forward of ``model`` runs with ``heads`` ablated (``hook_z`` replaced).

    Forwards on prefixes of ``batch`` (greedy decoding) use the replacement's first positions; for
    ``resample`` the rows must be ``batch``'s rows in order.
    """
    _check_choice(method, ABLATIONS, "ablation method")
    heads = parse_heads(heads, model)
    dev = _device(model, device)
    reps = _head_replacements(model, batch, heads, method, reference, seed, dev)

    def make_hook(hs: list[int], rep: Tensor):
        def hook(z, hook):
            seq = z.shape[1]
            if seq > rep.shape[1] or rep.shape[0] not in (1, z.shape[0]):
                raise ProbekitError(f"ablation hook got activations of shape {tuple(z.shape)} but was prepared for "
                                    f"{rep.shape[0]} examples x {rep.shape[1]} positions")
            z = z.clone()
            z[:, :, hs] = rep[:, :seq].to(z.dtype)
            return z
        return hook

    fwd = [(f"blocks.{L}.attn.hook_z", make_hook(hs, rep)) for L, (hs, rep) in reps.items()]
    with model.hooks(fwd_hooks=fwd):
        yield


def _exact_match(model, batch: Batch) -> float:
    from probekit.evaluate import greedy_decode, score

    return float(score(batch, greedy_decode(model, batch, max_batch=batch.n))["exact_match"])


@torch.no_grad()
def _measure(model, batch: Batch, metric: str, exact_match: bool, dev) -> tuple[float, float]:
    m = float(metric_value(model(batch.tokens.to(dev)), batch, metric))
    return m, (_exact_match(model, batch) if exact_match else float("nan"))


def ablate_heads(model, batch: Batch, heads: Sequence[Head] | str, method: str = "zero",
                 reference: Batch | None = None, metric: str = "logprob", exact_match: bool = True, seed: int = 0,
                 device=None) -> Result:
    """Ablate a set of heads together. Axes (measure,): metric and exact match, clean and ablated."""
    check_metric(metric, ABLATION_METRICS, "ablation metric")
    heads = parse_heads(heads, model)
    dev = _device(model, device)
    clean = _measure(model, batch, metric, exact_match, dev)
    with ablation_hooks(model, batch, heads, method, reference, seed, dev):
        abl = _measure(model, batch, metric, exact_match, dev)
    labels = ["metric_clean", "metric_ablated", "effect", "exact_match_clean", "exact_match_ablated"]
    vals = torch.tensor([clean[0], abl[0], abl[0] - clean[0], clean[1], abl[1]])
    return Result(kind="head_ablation", values=vals, axes=("measure",), labels={"measure": labels},
                  settings=_ablation_settings(model, batch, method, reference, metric, seed)
                  | {"heads": [head_label(L, h) for L, h in heads]})


def _ablation_settings(model, batch, method, reference, metric, seed) -> dict:
    ref = None if reference is None else _batch_settings(reference)
    return {"instrument": "ablation", "method": method, "metric": metric, "seed": seed, "model": _model_name(model),
            **_batch_settings(batch), "reference": ref if method != "zero" else None}


def head_ablation_sweep(model, batch: Batch, method: str = "zero", reference: Batch | None = None,
                        metric: str = "logprob", exact_match: bool = True, seed: int = 0, device=None) -> Result:
    """Ablate each head alone. Axes (layer, head): change in the metric; ``extra``: ablated metric and exact match."""
    _check_choice(method, ABLATIONS, "ablation method")
    check_metric(metric, ABLATION_METRICS, "ablation metric")
    if reference is not None:
        _check_reference(batch, reference)
    dev = _device(model, device)
    nL, nH = model.cfg.n_layers, model.cfg.n_heads
    clean = _measure(model, batch, metric, exact_match, dev)
    eff = torch.zeros(nL, nH)
    met = torch.zeros(nL, nH)
    em = torch.full((nL, nH), float("nan"))
    for L, h in all_heads(model):
        with ablation_hooks(model, batch, [(L, h)], method, reference, seed, dev):
            m, e = _measure(model, batch, metric, exact_match, dev)
        met[L, h], em[L, h], eff[L, h] = m, e, m - clean[0]
    return Result(kind="head_ablation_sweep", values=eff, axes=("layer", "head"),
                  labels={"layer": list(range(nL)), "head": list(range(nH))},
                  settings=_ablation_settings(model, batch, method, reference, metric, seed)
                  | {"metric_clean": clean[0], "exact_match_clean": _json_num(clean[1])},
                  extra={"metric": met, "exact_match": em})


def head_scores(result: Result) -> Float[Tensor, "layer head"]:
    """A (layer, head) importance table from a result: ablation sweep, DLA by head, patching by head."""
    ax = result.axes
    if "layer" not in ax or "head" not in ax:
        raise ProbekitError(f"result of kind {result.kind!r} has axes {ax}; expected 'layer' and 'head' axes")
    v = result.values.float().abs()
    other = [i for i, a in enumerate(ax) if a not in ("layer", "head")]
    if other:
        v = v.sum(dim=other)
    rest = [a for a in ax if a in ("layer", "head")]
    return v if rest == ["layer", "head"] else v.T


def topk_vs_random(model, batch: Batch, scores: Result, k: int = 3, n_random: int = 10, method: str = "zero",
                   reference: Batch | None = None, metric: str = "logprob", exact_match: bool = True, seed: int = 0,
                   device=None) -> Result:
    """Ablate the ``k`` most important heads of ``scores`` (by |value|) together, and ``n_random`` sets of
    ``k`` heads drawn uniformly at random (seeded). Axes (set, measure): metric and exact match."""
    nL, nH = model.cfg.n_layers, model.cfg.n_heads
    table = head_scores(scores)
    if tuple(table.shape) != (nL, nH):
        raise ProbekitError(f"scores have {tuple(table.shape)} layers x heads; the model has ({nL}, {nH})")
    if not 1 <= k <= nL * nH:
        raise ProbekitError(f"k must be in 1..{nL * nH}, got {k}")
    if n_random < 1:
        raise ProbekitError(f"n_random must be >= 1, got {n_random}")
    order = torch.argsort(table.flatten(), descending=True, stable=True)[:k].tolist()
    top = [(i // nH, i % nH) for i in order]
    rng = np.random.default_rng(seed)
    randoms = [[(int(i) // nH, int(i) % nH) for i in rng.choice(nL * nH, size=k, replace=False)] for _ in range(n_random)]
    dev = _device(model, device)
    rows = [_measure(model, batch, metric, exact_match, dev)]
    for hs in [top] + randoms:
        with ablation_hooks(model, batch, hs, method, reference, seed, dev):
            rows.append(_measure(model, batch, metric, exact_match, dev))
    sets = ["clean", f"top{k}"] + [f"random{i}" for i in range(n_random)]
    vals = torch.tensor(rows)
    rnd = vals[2:]
    return Result(kind="topk_vs_random", values=vals, axes=("set", "measure"),
                  labels={"set": sets, "measure": ["metric", "exact_match"]},
                  settings=_ablation_settings(model, batch, method, reference, metric, seed)
                  | {"k": k, "n_random": n_random, "scored_by": scores.kind,
                     "top_heads": [head_label(*h) for h in top],
                     "random_heads": [[head_label(*h) for h in hs] for hs in randoms],
                     "random_mean": _json_list(rnd.mean(0)), "random_min": _json_list(rnd.min(0).values),
                     "random_max": _json_list(rnd.max(0).values)})


def _json_num(x: float) -> float | None:
    """NaN (not measured) as None, so settings stay valid JSON and compare equal."""
    x = float(x)
    return None if x != x else x


def _json_list(t: Tensor) -> list[float | None]:
    return [_json_num(v) for v in t.tolist()]


# ---------------------------------------------------------------------------- attribution patching


@dataclass
class AttributionPatchingResult:
    """Attribution-patching scores (and exact patching effects where computed) with their agreement.

    ``heads``/``exact_heads``: axes (layer, pos, head); ``mlp``/``exact_mlp``: (layer, pos) or None.
    Effects are changes of the metric when the corrupt run gets the clean activation (denoising).
    ``agreement[name]`` = {spearman, pearson, topk_overlap, k, top1_match} for ``heads`` and ``mlp``.
    """

    heads: Result
    mlp: Result | None = None
    exact_heads: Result | None = None
    exact_mlp: Result | None = None
    agreement: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_json(self) -> str:
        import json

        return json.dumps({k: (getattr(self, k).to_dict() if isinstance(getattr(self, k), Result) else getattr(self, k))
                           for k in ("heads", "mlp", "exact_heads", "exact_mlp", "agreement", "settings")})

    @classmethod
    def from_json(cls, s: str) -> AttributionPatchingResult:
        import json

        try:
            d = json.loads(s)
            res = {k: (Result.from_json(json.dumps(d[k])) if d.get(k) is not None else None)
                   for k in ("heads", "mlp", "exact_heads", "exact_mlp")}
            return cls(**res, agreement=d.get("agreement", {}), settings=d.get("settings", {}))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ProbekitError(f"not an attribution-patching result JSON ({type(e).__name__}: {e})") from None

    def head_totals(self, exact: bool = False) -> Float[Tensor, "layer head"]:
        """Sum over positions of |score| per head."""
        r = self.exact_heads if exact else self.heads
        if r is None:
            raise ProbekitError("no exact patching in this result; rerun with exact=True")
        return r.values.abs().sum(1)


def _mlp_names(model) -> list[str]:
    return [] if model.cfg.attn_only else [f"blocks.{L}.hook_mlp_out" for L in range(model.cfg.n_layers)]


def _grads(model, tokens: Tensor, metric_fn: Callable[[Tensor], Tensor], names: list[str],
           embed_path: tuple[Tensor, Tensor, float] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """Activations and d(metric)/d(activation) at ``names`` for one forward + backward."""
    acts: dict[str, Tensor] = {}

    def saver(name: str):
        def save(t, hook):
            acts[name] = t
            return t
        return save

    fwd = [(n, saver(n)) for n in names]
    if embed_path is not None:
        e_from, e_to, alpha = embed_path

        def interp(t, hook):
            return e_from + alpha * (e_to - e_from)

        fwd.insert(0, ("hook_embed", interp))
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd):
        logits = model(tokens)
        m = metric_fn(logits)
        g = torch.autograd.grad(m, [acts[n] for n in names], allow_unused=True)
    grads = {n: (gi if gi is not None else torch.zeros_like(acts[n])).detach() for n, gi in zip(names, g, strict=True)}
    return {n: a.detach() for n, a in acts.items()}, grads, float(m.detach())


def _agreement(approx: Tensor, exact: Tensor, k: int) -> dict:
    from scipy.stats import pearsonr, spearmanr

    a, e = approx.flatten().double().numpy(), exact.flatten().double().numpy()
    k = max(1, min(k, a.size))
    ta = set(np.argsort(-np.abs(a), kind="stable")[:k].tolist())
    te = set(np.argsort(-np.abs(e), kind="stable")[:k].tolist())
    const = np.ptp(a) == 0 or np.ptp(e) == 0
    return {"spearman": None if const else float(spearmanr(a, e).statistic),
            "pearson": None if const else float(pearsonr(a, e).statistic),
            "topk_overlap": len(ta & te) / k, "k": k,
            "top1_match": bool(np.argmax(np.abs(a)) == np.argmax(np.abs(e)))}


def _ap_scores(model, ct: Tensor, xt: Tensor, metric_fn, ig_steps: int) -> tuple[Tensor, Tensor | None, dict, float]:
    """Attribution scores (heads: layer pos head; MLPs: layer pos, or None), the clean cache and the corrupt
    metric; the gradient is taken at the corrupt run, or averaged along the embedding path (``ig_steps > 1``)."""
    z_names = [f"blocks.{L}.attn.hook_z" for L in range(model.cfg.n_layers)]
    names = z_names + _mlp_names(model)
    with torch.no_grad():
        _, cache_c = model.run_with_cache(ct, names_filter=lambda n: n in set(names) | {"hook_embed"})
        _, cache_x = model.run_with_cache(xt, names_filter=lambda n: n in {"hook_embed"})
    if ig_steps == 1:
        acts_x, grads, base = _grads(model, xt, metric_fn, names)
    else:
        e_c, e_x = cache_c["hook_embed"], cache_x["hook_embed"]
        grads = {n: 0.0 for n in names}
        for i in range(ig_steps):
            _, g, _ = _grads(model, xt, metric_fn, names, embed_path=(e_x, e_c, (i + 0.5) / ig_steps))
            grads = {n: grads[n] + g[n] / ig_steps for n in names}
        acts_x, _, base = _grads(model, xt, metric_fn, names)
    # score[layer, pos, head] = sum over batch, d_head of (clean - corrupt) * grad (metric is a batch mean)
    heads = torch.stack([((cache_c[n] - acts_x[n]) * grads[n]).sum((0, 3)) for n in z_names])  # layer pos head
    mlp = None
    if _mlp_names(model):
        mlp = torch.stack([((cache_c[n] - acts_x[n]) * grads[n]).sum((0, 2)) for n in _mlp_names(model)])  # layer pos
    return heads, mlp, cache_c, base


def _ap_exact(model, res: AttributionPatchingResult, xt: Tensor, cache_c, metric_fn, base: float, top_k: int) -> None:
    """Exact patching with `transformer_lens.patching` into ``res``, and its agreement with the scores."""
    from transformer_lens import patching

    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # TransformerLens prints a progress bar
        ex_h = patching.get_act_patch_attn_head_out_by_pos(model, xt, cache_c, metric_fn) - base
        ex_m = patching.get_act_patch_mlp_out(model, xt, cache_c, metric_fn) - base if res.mlp is not None else None
    h = res.heads
    res.exact_heads = Result("exact_patch_heads", ex_h.detach().cpu(), h.axes, h.labels, h.settings)
    res.agreement["heads"] = _agreement(h.values, ex_h.cpu(), top_k)
    if ex_m is not None:
        m = res.mlp
        res.exact_mlp = Result("exact_patch_mlp", ex_m.detach().cpu(), m.axes, m.labels, m.settings)
        res.agreement["mlp"] = _agreement(m.values, ex_m.cpu(), top_k)


def attribution_patching(model, clean: Batch, corrupt: Batch, metric: str = "logit-diff", exact: bool = True,
                         ig_steps: int = 1, top_k: int = 10, vocab: Sequence[str] | None = None,
                         steps: Sequence[int] | None = None, device=None) -> AttributionPatchingResult:
    """First-order (or integrated-gradient) patching scores for every head by position and every MLP by
    position, denoising convention; with ``exact``, also exact patching and the agreement of the two.

    ``steps``: the answer steps the metric reads (default all; a pair's ``answer_steps`` for its own steps).
    """
    check_metric(metric, GRADIENT_METRICS, "attribution-patching metric (differentiable)")
    check_pair(clean, corrupt)
    if ig_steps < 1:
        raise ProbekitError(f"ig_steps must be >= 1, got {ig_steps}")
    dev = _device(model, device)
    ct, xt = clean.tokens.to(dev), corrupt.tokens.to(dev)

    def metric_fn(logits):
        return metric_value(logits, clean, metric, corrupted=corrupt, steps=steps)

    heads, mlp, cache_c, base = _ap_scores(model, ct, xt, metric_fn, ig_steps)
    with torch.no_grad():
        metric_clean = float(metric_fn(model(ct)))
    settings = {"instrument": "attribution_patching", "direction": "denoising (clean into corrupt)",
                "metric": metric, "steps": list(steps) if steps is not None else None, "ig_steps": ig_steps,
                "model": _model_name(model), **_batch_settings(clean),
                "metric_corrupt": base, "metric_clean": metric_clean}
    lab_m = {"layer": list(range(model.cfg.n_layers)), "pos": position_labels(clean, None, vocab)}
    lab_h = {**lab_m, "head": list(range(model.cfg.n_heads))}
    res = AttributionPatchingResult(
        heads=Result("attrib_patch_heads", heads, ("layer", "pos", "head"), lab_h, settings),
        mlp=None if mlp is None else Result("attrib_patch_mlp", mlp, ("layer", "pos"), lab_m, settings),
        settings=settings)
    if exact:
        _ap_exact(model, res, xt, cache_c, metric_fn, base, top_k)
    return res


# ---------------------------------------------------------------------------- head roles


def target_mask(batch: Batch, target: str | Tensor) -> Bool[Tensor, "batch pos src"]:
    """Which key positions count as the head's target, for each query position.

    ``target``: a ``*_pos`` feature name (query: where the feature is defined; key: its value);
    ``"column_operands"`` (multiplication): at the position predicting digit k, the operand digits
    a_i and b_j with i + j = k; or a bool tensor ``[batch, pos, src]``.
    """
    n, T = batch.tokens.shape
    if isinstance(target, Tensor):
        if tuple(target.shape) != (n, T, T) or target.dtype != torch.bool:
            raise ProbekitError(f"target mask must be a bool tensor of shape {(n, T, T)}, got "
                                f"{target.dtype} {tuple(target.shape)}")
        return target
    if target == "column_operands":
        if "digit_index" not in batch.features or "operand" not in batch.features:
            raise ProbekitError(f"target 'column_operands' needs a batch with 'digit_index' and 'operand' features "
                                f"(multiplication), got task {batch.task!r}")
        k = batch.feature("digit_index")  # batch pos
        place, operand = batch.feature("place"), batch.feature("operand")
        wa = int((operand[0] == 0).sum())
        wb = int((operand[0] == 1).sum())
        kq = k[:, :, None]
        pl = place[:, None, :]
        op = operand[:, None, :]
        partner_ok = torch.where(op == 0, (kq - pl >= 0) & (kq - pl < wb), (kq - pl >= 0) & (kq - pl < wa))
        return (kq >= 0) & (pl >= 0) & partner_ok
    if not isinstance(target, str) or not target.endswith("_pos"):
        raise ProbekitError(f"target {target!r} is not a position feature; expected a '*_pos' feature such as "
                            f"'target_src_pos', 'column_operands', or a [batch, pos, src] bool mask")
    f = batch.feature(target)
    return (f[:, :, None] == torch.arange(T)[None, None, :]) & (f[:, :, None] >= 0)


@torch.no_grad()
def head_attention_to(model, batch: Batch, target: str | Tensor = "target_src_pos", heads: Sequence[Head] | None = None,
                      device=None) -> Result:
    """For each head: attention mass on the target keys, top-1 rate, and the uniform-attention baseline.

    Axes (head, stat) with stat = mass, top1, chance; the statistics average over every query position
    that has a target (``settings["n_queries"]``).
    """
    heads = parse_heads(heads, model) if heads is not None else all_heads(model)
    mask = target_mask(batch, target)
    q_has = mask.any(-1)  # batch pos
    nq = int(q_has.sum())
    if nq == 0:
        raise ProbekitError(f"target {target if isinstance(target, str) else 'mask'!r} selects no query position in this batch")
    dev = _device(model, device)
    layers = sorted({L for L, _ in heads})
    names = {f"blocks.{L}.attn.hook_pattern" for L in layers}
    _, cache = model.run_with_cache(batch.tokens.to(dev), names_filter=lambda n: n in names)
    T = batch.seq_len
    visible = (torch.arange(T)[None, :] <= torch.arange(T)[:, None]).float()  # pos src (causal)
    chance = ((mask.float() * visible).sum(-1) / visible.sum(-1))[q_has].mean()
    rows = []
    for L, h in heads:
        A = cache[f"blocks.{L}.attn.hook_pattern"][:, h].float().cpu()  # batch pos src
        mass = (A * mask).sum(-1)[q_has].mean()
        top1 = mask.gather(-1, A.argmax(-1, keepdim=True))[..., 0][q_has].float().mean()
        rows.append([float(mass), float(top1), float(chance)])
    return Result(kind="head_role", values=torch.tensor(rows), axes=("head", "stat"),
                  labels={"head": [head_label(L, h) for L, h in heads], "stat": ["mass", "top1", "chance"]},
                  settings={"instrument": "head_role", "target": target if isinstance(target, str) else "mask",
                            "n_queries": nq, "model": _model_name(model), **_batch_settings(batch)})


def head_roles(model, batches: Batch | Sequence[Batch], target: str = "target_src_pos",
               heads: Sequence[Head] | None = None, device=None) -> Result:
    """`head_attention_to` for each batch (one per length). Axes (length, head, stat)."""
    batches = [batches] if isinstance(batches, Batch) else list(batches)
    if not batches:
        raise ProbekitError("no batches given; expected one batch per length")
    parts = [head_attention_to(model, b, target, heads, device) for b in batches]
    return Result(kind="head_roles", values=torch.stack([p.values for p in parts]), axes=("length", "head", "stat"),
                  labels={"length": [b.length for b in batches], **parts[0].labels},
                  settings={**{k: v for k, v in parts[0].settings.items() if k not in ("length", "n", "n_queries")},
                            "n": [b.n for b in batches], "n_queries": [p.settings["n_queries"] for p in parts]})
