"""The one functional forward over a bridge's own modules: a TransformerLens-native bridge, or a Hugging Face GPT-2.

The forward is written once, from the modules of ``model.original_model`` (token embedding, the
positional table, attention with rotary, the optional length temperature and the causal mask, MLP,
norms, unembedding), and every variant is built from the same pieces:

- `record` / `record_sites`: a full forward that keeps activations (TransformerLens hook names, or
  ``(site, layer)`` keys) and the logits at chosen positions;
- `recompute_layer`: one layer recomputed only at the positions that can differ from a recorded run,
  for K row groups at once (the activation-patching engine);
- `decode_step`: new tokens against a key/value cache (greedy decoding);
- `attention_forward`: the attention module's own forward, installed on the native modules of
  models with a length temperature, so that the bridge's forward (and its hooks) uses it too;
- `place_model_forward`: the native model's own forward for ``positional="place"`` models (the
  positional table indexed by `place_ids`), installed by `probekit.model.build_model`.

An ``edit(site, layer, act, pos)`` is called with every activation as it is computed and returns
the activation to continue with: `keep` leaves it, a recorder stores it, a patch overwrites it.

``length_temperature="log"`` multiplies the attention scores of the query at position t by
ln(t + 2), before the causal mask.

``positional="place"`` (per-digit place indices): the positional table is indexed not by the token's
position but by `place_ids`, a causal function of the tokens: 0 for a token that is not a digit, and
``1 + i`` for the digit that is the i-th (from 0) of the current run of consecutive digit tokens. It
is the only function that computes them; every forward here, the bridge's forward and training use
it. A `KVCache` carries each row's digit run length so decoding continues the run incrementally, and
optionally each row's place offset (greedy decoding averaged over offsets, `probekit.evaluate.greedy_decode`).
Attention itself never sees place ids: the temperature and the causal mask use sequence positions.

A Hugging Face ``GPT2LMHeadModel`` booted with ``TransformerBridge.boot_transformers`` is resolved into the
same pieces (`native`): its token and learned position tables, the q/k/v linear maps the bridge splits
from the fused ``c_attn`` at boot, ``c_proj`` (a ``Conv1D``), the LayerNorms, HF's own MLP module and
``lm_head``. Dropout is not applied (put the model in eval mode); the tests check every site and the
logits against the bridge's hooks and the HF forward.

Axis names: ``rows`` (batch rows; in a patching pass K groups of the N examples), ``pos`` (query
positions), ``key_pos``, ``head``, ``d_head``, ``d_model``, ``d_vocab``. Layouts: residual and
per-position outputs ``[rows, pos, d_model]``; q, k, v, z ``[rows, pos, head, d_head]`` (``hook_q``,
``hook_z``); pattern ``[rows, head, pos, key_pos]`` (``hook_pattern``); inside attention
``[rows, head, pos, d_head]``. Two more sites serve partial recomputation: ``kr`` (keys after rotary)
and ``vh`` (values), ``[rows, head, key_pos, d_head]`` with key/value heads repeated per query head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

SITES = ("resid_pre", "q", "k", "v", "pattern", "z", "attn_out", "resid_mid", "mlp_out", "resid_post")
HEAD_SITES = ("q", "k", "v", "pattern", "z")
Edit = Callable[[str, int, Tensor, Tensor], Tensor]


def keep(site: str, layer: int, act: Tensor, pos: Tensor) -> Tensor:
    """The edit that changes nothing."""
    return act


def hook_name(site: str, layer: int) -> str:
    """The TransformerLens hook name of ``site`` at ``layer`` (``z`` -> ``blocks.0.attn.hook_z``)."""
    return f"blocks.{layer}.attn.hook_{site}" if site in HEAD_SITES else f"blocks.{layer}.hook_{site}"


# ---------------------------------------------------------------------------- the modules


def _raw(m):
    """The torch module a bridge component wraps (the module itself if it wraps nothing)."""
    return getattr(m, "original_component", m)


def _norm(ln) -> Callable[[Tensor], Tensor]:
    """A bridge norm as the bridge computes it: the wrapped module, or its op-by-op path, same ops, same values."""
    comp = _raw(ln)
    if ln is comp or getattr(ln, "use_native_layernorm_autograd", True) or isinstance(comp, torch.nn.Identity) \
            or getattr(ln, "uses_weight_offset", False):
        return comp
    rms, eps = bool(ln.uses_rms_norm), float(getattr(ln.config, "eps", 1e-5))
    weight = getattr(comp, "weight", None)  # the param-free variants (LNPre, RMSPre) have none
    bias = getattr(comp, "bias", None) if not rms else None

    def run(x: Tensor) -> Tensor:  # in place where the tensor is our own: the same values, fewer allocations
        dtype = x.dtype
        x = x if dtype in (torch.float32, torch.float64) else x.float()
        if not rms:
            x = x - x.mean(-1, keepdim=True)
        x = x / x.pow(2).mean(-1, keepdim=True).add_(eps).sqrt_()
        if weight is not None:
            x.mul_(weight)
        return (x.add_(bias) if bias is not None else x).to(dtype)

    return run


_INPLACE = {torch.nn.functional.relu: lambda x: torch.nn.functional.relu(x, inplace=True),
            torch.nn.functional.silu: lambda x: torch.nn.functional.silu(x, inplace=True)}


def _mlp(mlp) -> Callable[[Tensor], Tensor]:
    comp = _raw(mlp)
    if not all(hasattr(comp, a) for a in ("fc_in", "fc_out", "act")):
        return mlp  # another MLP (gated): the bridge's own
    fc_in, fc_out, act = _raw(comp.fc_in), _raw(comp.fc_out), comp.act
    ln = _raw(comp.ln) if getattr(comp, "ln", None) is not None else None
    act_ = _INPLACE.get(act)

    def run(h: Tensor) -> Tensor:
        pre = fc_in(h)  # our own tensor: without autograd, the activation can overwrite it (same values)
        mid = act_(pre) if act_ is not None and not torch.is_grad_enabled() else act(pre)
        return fc_out(ln(mid) if ln is not None else mid)

    return run


@dataclass(frozen=True)
class Attention:
    """One causal attention layer: its projections, head counts, scale, rotary table and temperature."""

    q: Callable
    k: Callable
    v: Callable
    o: Callable
    n_heads: int
    n_kv: int
    d_head: int
    scale: float
    rotary: object | None
    log_temperature: bool

    @classmethod
    def of(cls, attn, log_temperature: bool, hooked: bool = False) -> Attention:
        """From a ``NativeAttention``; ``hooked`` keeps the bridge's projections (their hooks fire)."""
        pick = (lambda m: m) if hooked else _raw
        return cls(pick(attn.q), pick(attn.k), pick(attn.v), pick(attn.o), attn.n_heads, attn.n_kv_heads,
                   attn.d_head, attn.scale, attn.rotary, log_temperature)


@dataclass(frozen=True)
class Layer:
    ln1: Callable
    attn: Attention
    ln2: Callable | None  # None: attention-only
    mlp: Callable | None


@dataclass(frozen=True)
class Native:
    """The modules of a bridge `supports_native` accepts, resolved once (no hooks run through them)."""

    tok_embed: Callable
    pos_embed: Callable | None
    layers: tuple[Layer, ...]
    ln_final: Callable
    unembed: Callable
    place_tokens: int | None = None  # positional="place": token ids 0..place_tokens-1 are digits


def hf_gpt2(model):
    """The Hugging Face ``GPT2LMHeadModel`` a bridge wraps (``TransformerBridge.boot_transformers``), or None."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:  # pragma: no cover
        return None
    hf = getattr(model, "original_model", None)
    return hf if isinstance(hf, GPT2LMHeadModel) else None


def _supports_gpt2(model) -> bool:
    """A GPT-2 bridge whose attention the bridge split into q, k, v linear maps (as it does at boot)."""
    if bool(getattr(hf_gpt2(model).config, "add_cross_attention", False)):
        return False
    return all(isinstance(_raw(getattr(b.attn, s, None)), torch.nn.Linear) for b in model.blocks for s in "qkv")


def supports_native(model) -> bool:
    """Whether this forward reproduces ``model``: a TL-native bridge (causal, no soft caps) or a Hugging Face
    GPT-2 bridge (learned positions, LayerNorm, GELU MLP, the bridge's split q/k/v; dropout is not applied)."""
    if hf_gpt2(model) is not None:
        return _supports_gpt2(model)
    try:
        from transformer_lens.model_bridge.sources.native.model import NativeAttention, NativeModel
    except ImportError:  # pragma: no cover
        return False
    nm = getattr(model, "original_model", None)
    if not isinstance(nm, NativeModel) or float(getattr(nm, "output_logits_soft_cap", -1.0)) > 0:
        return False
    for b in model.blocks:
        a = getattr(b.attn, "original_component", None)
        if not isinstance(a, NativeAttention) or a.attn_scores_soft_cap > 0 or not a.causal:
            return False
    return True


def log_temperature(model) -> bool:
    cfg = getattr(model, "probekit_config", None)
    return getattr(cfg, "length_temperature", None) == "log"


def place_tokens_of(model) -> int | None:
    """``ModelConfig.place_tokens`` of a ``positional="place"`` model; None for any other model."""
    cfg = getattr(model, "probekit_config", None)
    return cfg.place_tokens if getattr(cfg, "positional", None) == "place" else None


def _native_gpt2(model) -> Native:
    """The `Native` modules of a GPT-2 bridge: the bridge's q/k/v, HF's ``c_proj`` (a ``Conv1D``) and MLP."""
    hf, cfg = hf_gpt2(model), model.cfg
    inverse = bool(getattr(hf.config, "scale_attn_by_inverse_layer_idx", False))
    layers = []
    for L, b in enumerate(model.blocks):
        a = b.attn
        scale = math.sqrt(cfg.d_head) * (L + 1 if inverse else 1)
        attn = Attention(_raw(a.q), _raw(a.k), _raw(a.v), _raw(a.o), cfg.n_heads, cfg.n_heads, cfg.d_head, scale,
                         None, False)
        layers.append(Layer(_norm(b.ln1), attn, _norm(b.ln2), _raw(b.mlp)))
    return Native(_raw(model.embed), _raw(model.pos_embed), tuple(layers), _norm(model.ln_final), _raw(model.unembed))


def native(model) -> Native:
    """The `Native` modules of a bridge `supports_native` accepts (check it first)."""
    if hf_gpt2(model) is not None:
        return _native_gpt2(model)
    nm = model.original_model
    temp = log_temperature(model)
    attn_only = bool(model.cfg.attn_only)
    layers = tuple(Layer(_norm(b.ln1), Attention.of(b.attn.original_component, temp),
                         None if attn_only else _norm(b.ln2), None if attn_only else _mlp(b.mlp))
                   for b in model.blocks)
    pos = _raw(nm.pos) if nm.pos is not None else None
    return Native(_raw(nm.tok_embed), pos, layers, _norm(model.ln_final), _raw(nm.head), place_tokens_of(model))


# ---------------------------------------------------------------------------- place indices


def place_ids(tokens: Int[Tensor, "rows pos"], place_tokens: int, run_before: Int[Tensor, "rows"] | None = None,
              offset: Int[Tensor, "rows"] | None = None) -> tuple[Int[Tensor, "rows pos"], Int[Tensor, "rows"]]:
    """Place ids of ``tokens`` and each row's digit run length after its last token.

    A token with id in ``0..place_tokens-1`` is a digit; its place id is ``1 + offset + i`` where i is
    its index (from 0) in the run of consecutive digits it belongs to; any other token gets 0. Causal:
    the id at t depends on tokens up to t only. ``run_before``: the length of the run the first token
    continues (the tokens follow cached ones, see `KVCache.run`); ``offset``: a per-row shift of the
    digits' ids (training), 0 by default.
    """
    digit = (tokens >= 0) & (tokens < place_tokens)
    seen = digit.long().cumsum(1)  # digits up to t
    run = seen - torch.where(digit, 0, seen).cummax(1).values  # digits since the last non-digit, up to t
    if run_before is not None:
        run = run + torch.where((~digit).long().cumsum(1) == 0, run_before[:, None], 0)
    after = run[:, -1] if tokens.shape[1] else (run_before if run_before is not None else run.new_zeros(len(tokens)))
    ids = run if offset is None else torch.where(digit, run + offset[:, None], 0)
    return ids, after


def check_place_ids(ids: Tensor, n_rows: int) -> None:
    """Refuse place ids past the positional table (a digit run longer than the table allows)."""
    top = int(ids.max()) if ids.numel() else 0
    if top >= n_rows:
        from probekit.tasks import ProbekitError

        raise ProbekitError(f"place id {top} (a run of digits, plus any offset) is past the place table of {n_rows} "
                            f"rows (n_ctx); expected runs of at most {n_rows - 1} digits")


def place_model_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
    """``NativeModel.forward`` of a ``positional="place"`` model: ``position_ids`` default to `place_ids`.

    Installed on the native model by `probekit.model.build_model` (with ``self.place_tokens``), so
    ``model(tokens)`` and ``model.run_with_cache(tokens)`` embed places. ``position_ids`` given
    explicitly are taken as place ids (training passes them with its offsets). The native blocks
    receive them too; their attention (no rotary) ignores them, and the tempered `attention_forward`
    uses sequence positions for a model without rotary.
    """
    if position_ids is None and input_ids is not None:
        position_ids, _ = place_ids(input_ids, self.place_tokens)
    if position_ids is not None:
        check_place_ids(position_ids, self.cfg.n_ctx)
    return type(self).forward(self, input_ids, attention_mask, position_ids, inputs_embeds, **kwargs)


# ---------------------------------------------------------------------------- attention pieces


def heads(t: Tensor, n: int, d_head: int) -> Tensor:
    """``[rows, pos, n * d_head]`` -> ``[rows, pos, n, d_head]``."""
    return t.view(t.shape[0], t.shape[1], n, d_head)


def project(a: Attention, h: Float[Tensor, "rows pos d_model"]) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``[rows, pos, head, d_head]`` (before rotary) from the normalised residual."""
    return heads(a.q(h), a.n_heads, a.d_head), heads(a.k(h), a.n_kv, a.d_head), heads(a.v(h), a.n_kv, a.d_head)


def rope(a: Attention, t: Float[Tensor, "rows head pos d_head"], pos: Int[Tensor, "pos"]) -> Tensor:
    """Rotary embedding of queries or keys at positions ``pos`` (identity without rotary)."""
    if a.rotary is None:
        return t
    return a.rotary.apply_rope(t, t, position_ids=pos[None])[0]


def expand_kv(a: Attention, t: Float[Tensor, "rows kv_head pos d_head"]) -> Tensor:
    """Key/value heads repeated for the query heads that share them (grouped-query attention)."""
    r = a.n_heads // a.n_kv
    return t if r == 1 else t.repeat_interleave(r, dim=1)


def attention_pattern(a: Attention, qk: Float[Tensor, "rows head pos key_pos"], qpos: Int[Tensor, "pos"],
                      kpos: Int[Tensor, "key_pos"]) -> Float[Tensor, "rows head pos key_pos"]:
    """Raw q.k of queries at ``qpos`` against keys at ``kpos`` -> pattern: scale, temperature, causal mask."""
    scores = qk / a.scale
    if a.log_temperature:
        scores = scores * torch.log(qpos.to(scores.dtype) + 2.0)[:, None]
    mask = kpos[None, :] > qpos[:, None]
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1).masked_fill(mask, 0.0)


@dataclass
class KVCache:
    """Keys (after rotary) and values ``[rows, kv_head, key_pos, d_head]`` of the tokens fed so far, per layer."""

    keys: list[Tensor | None]
    values: list[Tensor | None]
    length: int = 0
    run: Tensor | None = None  # place models: each row's digit run length after the cached tokens
    offset: Tensor | None = None  # place models: each row's shift of its digits' place ids (None: 0)

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls([None] * n_layers, [None] * n_layers)

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def self_attention(a: Attention, L: int, h: Float[Tensor, "rows pos d_model"], pos: Int[Tensor, "pos"],
                   cache: KVCache | None = None, edit: Edit = keep) -> Float[Tensor, "rows pos head d_head"]:
    """Head outputs z of the tokens at ``pos`` (after the cache's tokens, if any); ``h`` is normalised."""
    q, k, v = project(a, h)
    q, k, v = edit("q", L, q, pos), edit("k", L, k, pos), edit("v", L, v, pos)
    qr, kr, vh = rope(a, q.transpose(1, 2), pos), rope(a, k.transpose(1, 2), pos), v.transpose(1, 2)
    kpos = pos
    if cache is not None:
        kr, vh = cache.extend(L, kr, vh)
        kpos = torch.arange(kr.shape[2], device=pos.device)
    kr, vh = edit("kr", L, expand_kv(a, kr), kpos), edit("vh", L, expand_kv(a, vh), kpos)
    pattern = edit("pattern", L, attention_pattern(a, torch.matmul(qr, kr.transpose(-2, -1)), pos, kpos), pos)
    return torch.matmul(pattern, vh).transpose(1, 2)


def attention_forward(self, hidden_states, attention_mask=None, position_ids=None, pattern_fn=None, **kwargs):
    """``NativeAttention.forward`` of a model with a length temperature (causal; no padding mask is applied).

    Installed on the native attention modules by `probekit.model.build_model`; it goes through the
    bridge's projections, so the bridge's hooks (and ``pattern_fn``, its ``hook_pattern``) apply.
    """
    seq = hidden_states.shape[1]
    given = position_ids is not None and self.rotary is not None  # without rotary they may be place ids
    pos = position_ids[0] if given else torch.arange(seq, device=hidden_states.device)
    seen = {}

    def edit(site, L, act, p):
        if site == "pattern":
            seen["pattern"] = act = pattern_fn(act) if pattern_fn is not None else act
        return act

    z = self_attention(Attention.of(self, log_temperature=True, hooked=True), 0, hidden_states, pos, edit=edit)
    return self.o(z.reshape(z.shape[0], seq, -1)), seen["pattern"]


# ---------------------------------------------------------------------------- the block and the forward


def after_attention(layer: Layer, L: int, x: Tensor, z: Tensor, pos: Tensor, edit: Edit = keep) -> Tensor:
    """The rest of block ``L`` from the heads' outputs z: attn_out, resid_mid, mlp_out -> resid_post."""
    attn_out = edit("attn_out", L, layer.attn.o(z.reshape(z.shape[0], z.shape[1], -1)), pos)
    mid = edit("resid_mid", L, x + attn_out, pos)
    if layer.mlp is None:
        return edit("resid_post", L, mid, pos)
    return edit("resid_post", L, mid + edit("mlp_out", L, layer.mlp(layer.ln2(mid)), pos), pos)


def block(layer: Layer, L: int, x: Tensor, pos: Tensor, cache: KVCache | None = None, edit: Edit = keep) -> Tensor:
    """One transformer block on the residual ``x`` at positions ``pos``."""
    x = edit("resid_pre", L, x, pos)
    z = edit("z", L, self_attention(layer.attn, L, layer.ln1(x), pos, cache, edit), pos)
    return after_attention(layer, L, x, z, pos, edit)


def embed(nat: Native, tokens: Int[Tensor, "rows pos"], pos: Int[Tensor, "pos"],
          cache: KVCache | None = None) -> Float[Tensor, "rows pos d_model"]:
    """Token plus positional embedding; a place model's table is indexed by `place_ids` (the cache's run continued,
    shifted by the cache's offsets)."""
    x = nat.tok_embed(tokens)
    if nat.pos_embed is None:
        return x
    if nat.place_tokens is None:
        return x + nat.pos_embed(pos)[None]
    ids, run = place_ids(tokens, nat.place_tokens, cache.run if cache is not None else None,
                         cache.offset if cache is not None else None)
    check_place_ids(ids, nat.pos_embed.weight.shape[0])
    if cache is not None:
        cache.run = run
    return x + nat.pos_embed(ids)


def forward(nat: Native, tokens: Int[Tensor, "rows pos"], edit: Edit = keep, logits_pos=None,
            cache: KVCache | None = None, n_layers: int | None = None) -> Tensor | None:
    """Logits at ``logits_pos`` (default all positions); with a ``cache``, the tokens follow the cached ones.

    ``n_layers``: run only that many blocks and return None (no logits).
    """
    start = cache.length if cache is not None else 0
    pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
    x = embed(nat, tokens, pos, cache)
    for L, layer in enumerate(nat.layers[:n_layers]):
        x = block(layer, L, x, pos, cache, edit)
    if cache is not None:
        cache.length += tokens.shape[1]
    if n_layers is not None:
        return None
    return nat.unembed(nat.ln_final(x if logits_pos is None else x[:, logits_pos]))


def decode_step(nat: Native, tokens: Int[Tensor, "rows new"], cache: KVCache) -> Float[Tensor, "rows d_vocab"]:
    """Feed ``tokens`` after the cached ones; the logits of the last of them. The cache grows by them."""
    return forward(nat, tokens, logits_pos=-1, cache=cache)


# ---------------------------------------------------------------------------- recording


def record_sites(nat: Native, tokens: Tensor, logits_pos=None, sites: Iterable[tuple[str, int]] | None = None,
                 pos=None) -> tuple[dict[tuple[str, int], Tensor], Tensor | None]:
    """``({(site, layer): activation}, logits at logits_pos)``; ``sites`` None: every site and kr/vh.

    ``pos``: keep per-position activations only there (patterns: query positions). The forward stops
    after the last layer asked for when ``logits_pos`` is False.
    """
    want = None if sites is None else set(sites)
    acts: dict[tuple[str, int], Tensor] = {}

    def rec(site, L, act, p):
        if want is None or (site, L) in want:
            if pos is None or site in ("kr", "vh"):
                acts[site, L] = act
            else:
                acts[site, L] = act[:, :, pos] if site == "pattern" else act[:, pos]
        return act

    n_layers = None
    if logits_pos is False:
        n_layers = 1 + max((L for _, L in want), default=-1) if want is not None else len(nat.layers)
        logits_pos = None
    logits = forward(nat, tokens, rec, logits_pos=logits_pos, n_layers=n_layers)
    return acts, logits


@dataclass
class Recording:
    """Logits ``[rows, pos, d_vocab]`` (None when not asked for) and activations by TransformerLens hook name."""

    logits: Tensor | None
    acts: dict[str, Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Tensor:
        return self.acts[name]


@torch.no_grad()
def record(model, tokens: Int[Tensor, "rows pos"], names: Iterable[str] | None = None, pos=None,
           logits: bool = True) -> Recording:
    """Activations at TransformerLens hook names (default: every site of every layer) and the logits.

    ``pos`` keeps per-position activations only at those positions; ``logits=False`` stops the forward
    after the last layer that ``names`` need. Runs on the native modules: hooks on the bridge do not fire.
    """
    n_layers = model.cfg.n_layers
    by_name = {hook_name(s, L): (s, L) for L in range(n_layers) for s in SITES}
    names = list(by_name) if names is None else list(names)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        from probekit.tasks import ProbekitError

        raise ProbekitError(f"unknown hook name(s) {unknown[:3]}; expected e.g. {list(by_name)[:3]}")
    if model.cfg.attn_only:
        names = [n for n in names if by_name[n][0] != "mlp_out"]
    acts, out = record_sites(native(model), tokens, None if logits else False, [by_name[n] for n in names], pos)
    return Recording(out, {n: acts[by_name[n]] for n in names})


# ---------------------------------------------------------------------------- partial recomputation


def _repeat(t: Tensor, groups: int) -> Tensor:
    return t.repeat(groups, *([1] * (t.ndim - 1)))


def _group(t: Tensor, groups: int) -> Tensor:
    """``[K*N, head, A, B]`` -> ``[N, head, K*A, B]``: the K row groups side by side, against shared keys."""
    N = t.shape[0] // groups
    return t.reshape(groups, N, *t.shape[1:]).permute(1, 2, 0, 3, 4).reshape(N, t.shape[1], groups * t.shape[2], t.shape[3])


def _ungroup(t: Tensor, groups: int) -> Tensor:
    """The inverse of `_group`."""
    N, H, KA, B = t.shape
    A = KA // groups
    return t.reshape(N, H, groups, A, B).permute(2, 0, 1, 3, 4).reshape(groups * N, H, A, B)


def _partial_attention(layer: Layer, L: int, base: Mapping, x: Tensor, pos: Tensor, x_new: Tensor | None,
                       new_pos: Tensor, key_pos: Tensor, groups: int, edit: Edit) -> Tensor:
    """z at ``pos``: queries from ``x``; keys/values from the base run except at ``key_pos``."""
    a = layer.attn
    T = base["kr", L].shape[2]
    kc, vc = _repeat(base["k", L][:, key_pos], groups), _repeat(base["v", L][:, key_pos], groups)
    # queries, keys and values are the base run's wherever the residual is: recomputed only at new_pos
    q = _repeat(base["q", L][:, pos], groups)
    if len(new_pos):
        h_new = layer.ln1(x_new)
        at = torch.searchsorted(key_pos, new_pos)
        kc[:, at], vc[:, at] = heads(a.k(h_new), a.n_kv, a.d_head), heads(a.v(h_new), a.n_kv, a.d_head)
        mine = torch.isin(pos, new_pos)
        if bool(mine.any()):
            q[:, mine] = heads(a.q(h_new[:, torch.searchsorted(new_pos, pos[mine])]), a.n_heads, a.d_head)
    q, kc, vc = edit("q", L, q, pos), edit("k", L, kc, key_pos), edit("v", L, vc, key_pos)
    qr = rope(a, q.transpose(1, 2), pos)
    kcr = expand_kv(a, rope(a, kc.transpose(1, 2), key_pos))
    vch = expand_kv(a, vc.transpose(1, 2))
    if len(key_pos) == T:
        pattern = edit("pattern", L, attention_pattern(a, torch.matmul(qr, kcr.transpose(-2, -1)), pos, key_pos), pos)
        return torch.matmul(pattern, vch).transpose(1, 2)
    # unchanged keys are shared by all row groups: one matmul against the base run's keys
    qk = _ungroup(torch.matmul(_group(qr, groups), base["kr", L].transpose(-2, -1)), groups)
    if len(key_pos):
        qk[..., key_pos] = torch.matmul(qr, kcr.transpose(-2, -1))
    pattern = edit("pattern", L, attention_pattern(a, qk, pos, torch.arange(T, device=pos.device)), pos)
    z = _ungroup(torch.matmul(_group(pattern, groups), base["vh", L]), groups)
    if len(key_pos):  # z is our own tensor: corrected in place
        dv = vch - _repeat(base["vh", L][:, :, key_pos], groups)
        z.add_(pattern[..., key_pos] * dv if len(key_pos) == 1 else torch.matmul(pattern[..., key_pos], dv))
    return z.transpose(1, 2)


def recompute_layer(nat: Native, L: int, base: Mapping[tuple[str, int], Tensor], x: Tensor, pos: Tensor,
                    x_new: Tensor | None, new_pos: Tensor, key_pos: Tensor, groups: int, edit: Edit = keep,
                    attention: bool = True, need: Tensor | None = None) -> Float[Tensor, "rows pos d_model"]:
    """Layer ``L``'s resid_post at positions ``pos``, for rows that are ``groups`` copies of the base run's examples.

    ``base`` holds a `record_sites` run (rows = examples). ``x`` is the residual entering the layer at
    ``pos`` (after any edit of resid_pre), ``x_new`` the same at ``new_pos``, the positions where it
    differs from the base run (their keys and values are recomputed). ``key_pos`` (sorted, containing
    ``new_pos``) are all positions whose keys or values may differ; elsewhere they are the base run's.
    ``attention=False``: nothing the heads read has changed, so their outputs z are the base run's.
    ``need`` (bool ``[rows, pos]``): the block's output is computed only there (elsewhere it is left as
    ``x``), and ``edit`` is not called after z; for a last layer whose outputs are read only in places.
    """
    layer = nat.layers[L]
    if attention:
        z = _partial_attention(layer, L, base, x, pos, x_new, new_pos, key_pos, groups, edit)
    else:
        z = _repeat(base["z", L][:, pos], groups)
    z = edit("z", L, z, pos)
    if need is None:
        return after_attention(layer, L, x, z, pos, edit)
    post = x.clone()
    if bool(need.any()):
        post[need] = after_attention(layer, L, x[need][:, None], z[need][:, None], pos[:1])[:, 0]
    return post


__all__ = ["Attention", "KVCache", "Layer", "Native", "Recording", "after_attention", "attention_forward",
           "attention_pattern", "block", "decode_step", "expand_kv", "forward", "hook_name", "keep", "native",
           "place_ids", "place_model_forward", "place_tokens_of", "project", "record", "record_sites",
           "recompute_layer", "rope", "self_attention", "supports_native"]
