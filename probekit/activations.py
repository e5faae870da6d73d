"""Collecting activations at hook names and chosen positions, batched, streamed to CPU.

    acts = collect(model, batch, ["resid_pre", "blocks.1.attn.hook_z"], feature="carry_out")
    acts.acts["blocks.0.hook_resid_pre"]   # [row, d] float32 on CPU
    acts.labels                            # [row] the feature's value at each selected position

Axis names: ``batch`` (examples), ``pos`` (token positions), ``row`` (one selected (example, position)
pair, ordered by example then position), ``d`` (the hook's trailing dimensions flattened: ``d_model``
for the residual stream, ``n_heads * d_head`` for ``attn.hook_z``), ``slot`` (the index of a row's
position among its example's selected positions: answer step k when the positions are the predicting
positions, input element k when they are the input positions).

Positions are chosen by a rule:

- ``"feature"``: where the feature is defined (not -1; not NaN for a float feature);
- ``"pred"``: ``batch.pred_mask`` (positions whose logits predict an answer token);
- ``"answer"``: ``batch.answer_mask``; ``"all"``: every position;
- or a boolean mask ``[batch, pos]``.

With a feature, positions where it is -1 are always dropped. Memory: the forward runs ``chunk_size``
examples at a time and keeps only the selected positions of the requested hooks (never a full cache),
stopping after the last block it needs: on a bridge `probekit.forward` reproduces, without hooks attached, on
`probekit.forward.record`; otherwise under `run_with_hooks`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probekit.tasks import Batch, ProbekitError

POSITION_RULES = ("feature", "pred", "answer", "all")
# hooks whose activation is not [batch, pos, ...] (attention patterns are [batch, head, q, k])
NOT_PER_POSITION = ("hook_pattern", "hook_attn_scores")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def hook_layer(name: str) -> int | None:
    """The block index of ``blocks.{L}.…`` hook names, else None."""
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else None


def hook_kind(name: str) -> str:
    """``blocks.3.hook_resid_pre`` -> ``hook_resid_pre``; other names unchanged."""
    m = _BLOCK.match(name)
    return m.group(2) if m else name


def _per_position(name: str) -> bool:
    return not name.endswith(NOT_PER_POSITION)


def valid_hook_names(model) -> list[str]:
    """Short names accepted by `resolve_hooks` (expanded to every layer), then the non-block hooks."""
    names = list(model.hook_dict)
    kinds = sorted({hook_kind(n) for n in names if hook_layer(n) == 0 and _per_position(n)})
    top = sorted(n for n in names if hook_layer(n) is None and _per_position(n))
    return kinds + top


def resolve_hooks(model, hooks: str | Sequence[str]) -> list[str]:
    """Full hook names for ``hooks``: each a full name (``blocks.1.hook_resid_mid``, ``hook_embed``) or a
    short one expanded to every layer (``resid_pre``, ``hook_resid_pre``, ``attn.hook_z``, ``z``, ``mlp_out``).

    Accepts a comma-separated string. Duplicates are dropped; order is kept (hook by hook, then layer).
    """
    if isinstance(hooks, str):
        hooks = [h.strip() for h in hooks.split(",") if h.strip()]
    hooks = list(hooks)
    if not hooks:
        raise ProbekitError("no hooks given; expected e.g. ['resid_pre', 'resid_post'] or 'blocks.0.hook_resid_pre'")
    hd = model.hook_dict
    n_layers = model.cfg.n_layers
    out: list[str] = []
    for h in hooks:
        if not isinstance(h, str):
            raise ProbekitError(f"hook names must be strings, got {h!r}")
        if h in hd:
            found = [h]
        else:
            found = []
            for cand in (h, f"hook_{h}", f"attn.{h}", f"attn.hook_{h}", f"mlp.{h}", f"mlp.hook_{h}"):
                if f"blocks.0.{cand}" in hd:
                    found = [f"blocks.{L}.{cand}" for L in range(n_layers)]
                    break
        if not found:
            raise ProbekitError(f"unknown hook {h!r}; expected a full hook name (e.g. blocks.0.hook_resid_pre) "
                                f"or one of {valid_hook_names(model)}")
        for name in found:
            if not _per_position(name):
                raise ProbekitError(f"hook {name!r} is an attention pattern [batch, head, q, k], not a per-position "
                                    f"activation; expected one of {valid_hook_names(model)}")
            if name not in out:
                out.append(name)
    return out


def position_mask(batch: Batch, positions: str | Tensor = "feature",
                  feature: str | None = None) -> Bool[Tensor, "batch pos"]:
    """The positions to read: a rule (see the module docstring) or a mask, restricted to where ``feature`` is defined."""
    if isinstance(positions, Tensor):
        mask = positions.to(torch.bool).cpu()
        if mask.shape != batch.tokens.shape:
            raise ProbekitError(f"position mask has shape {tuple(mask.shape)}, expected the batch's {tuple(batch.tokens.shape)}")
    elif positions == "feature":
        if feature is None:
            raise ProbekitError("positions='feature' needs a feature; pass feature=... or positions='pred'/'answer'/'all'")
        mask = torch.ones_like(batch.answer_mask)
    elif positions == "pred":
        mask = batch.pred_mask.clone()
    elif positions == "answer":
        mask = batch.answer_mask.clone()
    elif positions == "all":
        mask = torch.ones_like(batch.answer_mask)
    else:
        raise ProbekitError(f"unknown position rule {positions!r}; expected one of {list(POSITION_RULES)} or a bool mask")
    if feature is not None:
        mask = mask & batch.defined(feature)
    if not mask.any():
        rule = "mask" if isinstance(positions, Tensor) else repr(positions)
        what = f" where feature {feature!r} is defined" if feature is not None else ""
        raise ProbekitError(f"empty position mask: rule {rule} selects no position{what} "
                            f"(task {batch.task!r}, objective {batch.objective!r}, length {batch.length})")
    return mask


@dataclass
class Activations:
    """Activations at the selected positions of a batch (CPU). One ``[row, d]`` tensor per hook."""

    acts: dict[str, Float[Tensor, "row d"]]
    example: Int[Tensor, " row"]
    pos: Int[Tensor, " row"]
    slot: Int[Tensor, " row"]
    token: Int[Tensor, " row"]
    labels: Int[Tensor, " row"] | None
    feature: str | None
    position_rule: str
    shapes: dict[str, tuple[int, ...]]  # trailing shape of each hook's activation, e.g. (n_heads, d_head)
    settings: dict = field(default_factory=dict)

    @property
    def hooks(self) -> list[str]:
        return list(self.acts)

    @property
    def n_rows(self) -> int:
        return int(self.example.numel())

    def stacked(self, hooks: Sequence[str] | None = None) -> Float[Tensor, "hook row d"]:
        hooks = list(hooks) if hooks is not None else self.hooks
        dims = {self.acts[h].shape[1] for h in hooks}
        if len(dims) != 1:
            raise ProbekitError(f"hooks {hooks} have different widths {sorted(dims)}; stack hooks of one width")
        return torch.stack([self.acts[h] for h in hooks])


def _stop_layer(model, names: Sequence[str]) -> int | None:
    """The block to stop at (exclusive) so that every hook in ``names`` has fired, or None (full forward)."""
    last = -1
    for n in names:
        L = hook_layer(n)
        if L is None:
            if n in ("hook_embed", "hook_pos_embed") or n.startswith(("embed.", "pos_embed.")):
                continue
            return None  # ln_final / unembed: needs the whole forward
        last = max(last, L)
    stop = last + 1
    return stop if 0 < stop < model.cfg.n_layers else None


def _chunk_forward(model, names: Sequence[str], store):
    """A forward over a chunk of tokens that calls ``store(act, None, name)`` for each hook in ``names``.

    On a bridge `probekit.forward.supports_native` accepts, with no hooks attached, `probekit.forward.record` (the same forward without
    the hook machinery, stopping after the last block needed); otherwise ``run_with_hooks``.
    """
    from probekit import forward as F

    skip = ("pattern", "mlp_out") if model.cfg.attn_only else ("pattern",)
    sites = {F.hook_name(s, L) for L in range(model.cfg.n_layers) for s in F.SITES if s not in skip}
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    if not hooked and set(names) <= sites and F.supports_native(model):
        def run(tokens: Tensor) -> None:
            rec = F.record(model, tokens, names, logits=False)
            for n in names:
                store(rec[n], None, n)

        return run
    fwd_hooks = [(n, functools.partial(store, name=n)) for n in names]
    stop = _stop_layer(model, names)
    return lambda tokens: model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, return_type=None, stop_at_layer=stop)


def model_device(model) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def collect(model, batch: Batch, hooks: str | Sequence[str], feature: str | None = None,
            positions: str | Tensor = "feature", chunk_size: int = 256, device: str | torch.device | None = None,
            dtype: torch.dtype = torch.float32, progress: bool = False) -> Activations:
    """Activations of ``hooks`` at the positions chosen by ``positions`` (and ``feature``), on CPU.

    ``positions="feature"`` needs a feature; without one, pass ``"pred"``, ``"answer"``, ``"all"`` or a mask.
    ``device``: where the forward runs (default: the model's device); results always come back on CPU.
    """
    names = resolve_hooks(model, hooks)
    if isinstance(positions, str) and positions == "feature" and feature is None:
        positions = "pred"
    mask = position_mask(batch, positions, feature)
    _check_collect(model, batch, chunk_size)
    dev = torch.device(device) if device is not None else model_device(model)
    ex, ps = torch.nonzero(mask, as_tuple=True)  # rows ordered by example then position
    slot = (torch.cumsum(mask.long(), dim=1) - 1)[ex, ps]
    out, shapes = _record_rows(model, batch, mask, names, chunk_size, dev, dtype, progress)
    labels = batch.feature(feature)[ex, ps].clone() if feature is not None else None
    rule = "mask" if isinstance(positions, Tensor) else str(positions)
    return Activations(acts={n: out[n] for n in names}, example=ex, pos=ps, slot=slot,
                       token=batch.tokens[ex, ps].clone(), labels=labels, feature=feature, position_rule=rule,
                       shapes=shapes, settings={"task": batch.task, "objective": batch.objective,
                                                "length": batch.length, "n": batch.n, "seq_len": batch.seq_len})


def _check_collect(model, batch: Batch, chunk_size: int) -> None:
    """Refuse a batch the model cannot run (too long, unknown tokens) and a non-positive chunk size."""
    if batch.seq_len > model.cfg.n_ctx:
        raise ProbekitError(f"batch sequences have {batch.seq_len} tokens but the model's n_ctx is {model.cfg.n_ctx}")
    if int(batch.tokens.max()) >= model.cfg.d_vocab:
        raise ProbekitError(f"batch has token id {int(batch.tokens.max())} but the model's d_vocab is {model.cfg.d_vocab}")
    if chunk_size <= 0:
        raise ProbekitError(f"chunk_size must be positive, got {chunk_size}")


def _record_rows(model, batch: Batch, mask: Bool[Tensor, "batch pos"], names: list[str], chunk_size: int, dev,
                 dtype: torch.dtype, progress: bool) -> tuple[dict[str, Tensor], dict[str, tuple[int, ...]]]:
    """Run ``batch`` in chunks with hooks that keep the rows of ``mask`` (``[row, flattened activation]`` per
    hook, on CPU, rows ordered by example then position), and each hook's per-position shape."""
    n_rows = int(mask.sum())
    row_start = torch.zeros(batch.n + 1, dtype=torch.long)
    row_start[1:] = torch.cumsum(mask.sum(1), 0)
    out: dict[str, Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    state = {"lo": 0, "hi": 0, "mask": None}

    def store(x: Tensor, hook, name: str):
        m = state["mask"]
        if x.ndim < 3 or tuple(x.shape[:2]) != tuple(m.shape):
            raise ProbekitError(f"hook {name!r} gave shape {tuple(x.shape)}; expected [batch, pos, ...] = {tuple(m.shape)} + ...")
        sel = x[m]  # row ...
        if name not in out:
            shapes[name] = tuple(x.shape[2:])
            out[name] = torch.empty((n_rows, sel[0].numel()), dtype=dtype)
        out[name][state["lo"]:state["hi"]] = sel.reshape(sel.shape[0], -1).to("cpu", dtype)
        return None

    run = _chunk_forward(model, names, store)
    starts = range(0, batch.n, chunk_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="activations", unit="chunk")
    for s in starts:
        e = min(batch.n, s + chunk_size)
        state.update(lo=int(row_start[s]), hi=int(row_start[e]), mask=mask[s:e].to(dev))
        if state["lo"] != state["hi"]:
            run(batch.tokens[s:e].to(dev))
    missing = [n for n in names if n not in out]
    if missing:
        raise ProbekitError(f"hooks {missing} never fired during the forward pass; expected per-position activations")
    return out, shapes


def cache_reference(model, batch: Batch, hook: str, mask: Bool[Tensor, "batch pos"]) -> Float[Tensor, "row d"]:
    """The same rows from TransformerLens's own `run_with_cache` (a full cache: for tests on small batches)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens.to(model_device(model)), names_filter=[hook])
    x = cache[hook].cpu()
    return x[mask].reshape(int(mask.sum()), -1).float()
