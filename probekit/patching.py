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

The engine (models built by probekit and any TL-native bridge) runs K patches as K groups of batch
rows in one pass and recomputes only what a patch can change: it starts at the first patched layer
from the cached unpatched run, tracks the positions whose residual differs from that run (keys and
values are recomputed only there; under causal attention only later queries can change), computes
the last layer only at the positions the metric reads, shares the unchanged keys and values of all
K row groups in one matmul, and splits work so no pass has more than ``max_batch`` rows (examples
are split too when n > max_batch). Other bridges use a hook-based fallback (``engine="hooks"``).
Both are tested against ``transformer_lens.patching`` to 1e-5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from probekit.corruptions import CorruptedPair
from probekit.metrics import METRICS, BoundMetric, Metric, answer_layout, digit_step, position_labels
from probekit.results import Result
from probekit.tasks import ProbekitError

SITES = ("resid_pre", "q", "k", "v", "pattern", "z", "attn_out", "resid_mid", "mlp_out", "resid_post")
HEAD_SITES = ("q", "k", "v", "pattern", "z")
BLOCK_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
SITE_ALIASES = {"head": "z", "head_out": "z", "hook_z": "z", "attn": "attn_out", "mlp": "mlp_out",
                "resid": "resid_pre", "attn_pattern": "pattern"}
# sub-stage of a layer at which a site is read; a patch run can start there from the cache
_STAGE = {"resid_pre": 0, "q": 1, "k": 1, "v": 1, "pattern": 2, "z": 3, "attn_out": 4, "resid_mid": 5,
          "mlp_out": 6, "resid_post": 7}
RECEIVERS = ("q", "k", "v", "logits")
Direction = Literal["denoise", "noise"]


def canonical_site(site: str) -> str:
    """The site name for ``site`` or one of its aliases (``head`` -> ``z``); refuses an unknown site."""
    s = SITE_ALIASES.get(str(site), str(site))
    if s not in SITES:
        raise ProbekitError(f"unknown site {site!r}; expected one of {list(SITES)} or an alias {sorted(SITE_ALIASES)}")
    return s


@dataclass(frozen=True)
class Component:
    """One activation to patch. ``head``/``pos`` None: all heads / all positions (pos = query pos for patterns)."""

    site: str
    layer: int
    head: int | None = None
    pos: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "site", canonical_site(self.site))
        if self.head is not None and self.site not in HEAD_SITES:
            raise ProbekitError(f"site {self.site!r} has no heads; got head={self.head} (expected None)")

    @property
    def label(self) -> str:
        s = f"{self.site}.L{self.layer}"
        if self.head is not None:
            s += f".H{self.head}"
        return s + (f"@{self.pos}" if self.pos is not None else "")


@dataclass(frozen=True)
class PathPatch:
    """Sender head -> one receiver: a later head's ``q``/``k``/``v`` input, or the ``logits`` (direct path)."""

    sender_layer: int
    sender_head: int
    receiver: str = "logits"
    receiver_layer: int | None = None
    receiver_head: int | None = None
    sender_pos: int | None = None

    def __post_init__(self):
        if self.receiver not in RECEIVERS:
            raise ProbekitError(f"unknown path receiver {self.receiver!r}; expected one of {list(RECEIVERS)}")
        if self.receiver != "logits":
            if self.receiver_layer is None or self.receiver_head is None:
                raise ProbekitError(f"path receiver {self.receiver!r} needs receiver_layer and receiver_head")
            if self.receiver_layer <= self.sender_layer:
                raise ProbekitError(f"receiver layer {self.receiver_layer} must be after the sender layer {self.sender_layer}")

    @property
    def label(self) -> str:
        s = f"L{self.sender_layer}.H{self.sender_head}" + (f"@{self.sender_pos}" if self.sender_pos is not None else "")
        if self.receiver == "logits":
            return s + "->logits"
        return s + f"->L{self.receiver_layer}.H{self.receiver_head}.{self.receiver}"


Patch = Component | PathPatch


# ---------------------------------------------------------------------------- the native engine


def _supports_native(model) -> bool:
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


def _fast_norm(ln):
    """The bridge's LayerNorm as one fused call (the bridge runs it op by op; same values to ~1e-7)."""
    comp = getattr(ln, "original_component", None)
    if type(comp) is torch.nn.LayerNorm:
        return lambda x: torch.nn.functional.layer_norm(x, comp.normalized_shape, comp.weight, comp.bias, comp.eps)
    return ln


def _length_temperature(model) -> str | None:
    cfg = getattr(model, "probekit_config", None)
    return getattr(cfg, "length_temperature", None)


class _Cache:
    """Activations of one unpatched run (rows = examples), every site laid out [batch, pos, (head), ...]."""

    def __init__(self):
        self.acts: dict[tuple[str, int], Tensor] = {}
        self.logits: Tensor | None = None  # [batch, answer, d_vocab] at the read positions

    def __getitem__(self, key):
        return self.acts[key]


class _Native:
    """A functional forward over a TL-native bridge's own modules, with patching and partial recomputation."""

    def __init__(self, model):
        self.model = model
        self.nm = model.original_model
        self.blocks = list(model.blocks)
        self.n_layers = len(self.blocks)
        self.attn = [b.attn.original_component for b in self.blocks]
        self.n_heads = self.attn[0].n_heads
        self.n_kv = self.attn[0].n_kv_heads
        self.d_head = self.attn[0].d_head
        self.attn_only = bool(model.cfg.attn_only)
        self.temperature = _length_temperature(model)

    # -- pieces
    def embed(self, tokens):
        x = self.nm.tok_embed(tokens)
        if self.nm.pos is not None:
            pos = torch.arange(tokens.shape[1], device=tokens.device)[None].expand(tokens.shape[0], -1)
            x = x + self.nm.pos(pos)
        return x

    def _heads(self, t, n):  # [rows, pos, n*d_head] -> [rows, pos, n, d_head]
        return t.view(t.shape[0], t.shape[1], n, self.d_head)

    def _rope(self, L, t, positions):  # t: [rows, head, pos, d_head]
        rot = self.attn[L].rotary
        if rot is None:
            return t
        return rot.apply_rope(t, t, position_ids=positions[None])[0]

    def scores_to_pattern(self, L, q, k, opos):
        """q [rows, head, To, dh] at positions opos, k [rows, head, T, dh] (rotated) -> pattern [rows, head, To, T]."""
        return self.softmax(L, torch.matmul(q, k.transpose(-2, -1)), opos)

    def softmax(self, L, qk, opos):
        """Raw q.k [rows, head, To, T] for queries at ``opos`` -> attention pattern (scale, temperature, causal mask)."""
        T = qk.shape[-1]
        scores = qk / self.attn[L].scale
        if self.temperature == "log":
            temp = torch.log(torch.arange(T, device=scores.device, dtype=scores.dtype) + 2.0)[opos]
            scores = scores * temp[:, None]
        mask = torch.arange(T, device=scores.device)[None, :] > opos[:, None]  # To T
        scores = scores.masked_fill(mask, float("-inf"))
        return torch.softmax(scores, dim=-1).masked_fill(mask, 0.0)

    def run(self, tokens, read_pos) -> _Cache:
        """Unpatched forward on ``tokens`` recording every site, and the logits at ``read_pos``."""
        N, T = tokens.shape
        cache = _Cache()
        x = self.embed(tokens)
        allpos = torch.arange(T, device=tokens.device)
        for L, b in enumerate(self.blocks):
            rec = cache.acts
            rec["resid_pre", L] = x
            h = _fast_norm(b.ln1)(x)
            q = self._heads(b.attn.q(h), self.n_heads)
            k = self._heads(b.attn.k(h), self.n_kv)
            v = self._heads(b.attn.v(h), self.n_kv)
            rec["q", L], rec["k", L], rec["v", L] = q, k, v
            qr = self._rope(L, q.transpose(1, 2), allpos)
            kr = self._kv_expand(self._rope(L, k.transpose(1, 2), allpos)).contiguous()
            vh = self._kv_expand(v.transpose(1, 2)).contiguous()
            rec["kr", L], rec["vh", L] = kr, vh  # batch head pos d_head: rotated keys, values (per query head)
            pattern = self.scores_to_pattern(L, qr, kr, allpos)
            rec["pattern", L] = pattern.transpose(1, 2)  # batch pos head key_pos
            z = torch.matmul(pattern, vh).transpose(1, 2)  # batch pos head d_head
            rec["z", L] = z
            attn_out = b.attn.o(z.contiguous().view(N, T, -1))
            rec["attn_out", L] = attn_out
            mid = x + attn_out
            rec["resid_mid", L] = mid
            if self.attn_only:
                x = mid
            else:
                mlp_out = b.mlp(_fast_norm(b.ln2)(mid))
                rec["mlp_out", L] = mlp_out
                x = mid + mlp_out
            rec["resid_post", L] = x
        cache.logits = self.model.unembed(_fast_norm(self.model.ln_final)(x[:, read_pos]))
        return cache

    def _kv_expand(self, t):  # [rows, kv_head, pos, dh] -> [rows, head, pos, dh]
        r = self.n_heads // self.n_kv
        return t if r == 1 else t.repeat_interleave(r, dim=1)

    # -- patched runs
    def run_patched(self, base: _Cache, src: _Cache, patches: list[list[Patch]], read_pos, W_O) -> Tensor:
        """Logits [K*N, answer, d_vocab] at ``read_pos`` for K patches (rows k*N..(k+1)*N-1 = patch k).

        Tracks the set of positions whose residual differs from the base run: a layer recomputes keys and
        values only there, and queries, MLP and the rest only at positions that can change (those after
        the first changed key, the patched positions, and at the last layer only those the metric reads).
        """
        K = len(patches)
        N, T = base["resid_pre", 0].shape[:2]
        dev = read_pos.device
        allT = torch.arange(T, device=dev)
        empty = allT[:0]
        comps: dict[tuple[str, int], list[tuple[int, Component]]] = {}
        paths: list[tuple[int, PathPatch, Tensor, Tensor]] = []  # (row group, path, delta, positions of delta)
        L0, pmin = self.n_layers, T
        for k, group in enumerate(patches):
            for c in group:
                if isinstance(c, PathPatch):
                    z_s, z_b = src["z", c.sender_layer][:, :, c.sender_head], base["z", c.sender_layer][:, :, c.sender_head]
                    delta = (z_s - z_b) @ W_O[c.sender_layer][c.sender_head]  # batch pos d_model
                    where = allT if c.sender_pos is None else allT[c.sender_pos:c.sender_pos + 1]
                    if c.sender_pos is not None:
                        delta = torch.zeros_like(delta).index_copy_(1, where, delta[:, where])
                    paths.append((k, c, delta, where))
                    L0 = min(L0, self.n_layers if c.receiver == "logits" else c.receiver_layer)
                    pmin = min(pmin, int(where[0]))
                else:
                    comps.setdefault((c.site, c.layer), []).append((k, c))
                    L0, pmin = min(L0, c.layer), min(pmin, 0 if c.pos is None else c.pos)
        out = base.logits.repeat(K, 1, 1)
        if not bool((read_pos >= pmin).any()):
            return out  # nothing the metric reads can change

        def rep(t):
            return t.repeat(K, *([1] * (t.ndim - 1)))

        def group(t):  # [K*N, head, A, B] -> [N, head, K*A, B]: K row groups side by side, against shared keys
            return t.reshape(K, N, *t.shape[1:]).permute(1, 2, 0, 3, 4).reshape(N, t.shape[1], K * t.shape[2], t.shape[3])

        def ungroup(t, A):  # [N, head, K*A, B] -> [K*N, head, A, B]
            return t.reshape(N, t.shape[1], K, A, t.shape[3]).permute(2, 0, 1, 3, 4).reshape(K * N, t.shape[1], A, t.shape[3])

        def union(*ts):
            ts = [t for t in ts if t is not None and len(t)]
            return torch.unique(torch.cat(ts)) if ts else empty

        def touched(sites, L):
            ps = [c.pos for s in sites for _, c in comps.get((s, L), [])]
            if any(p is None for p in ps):
                return allT
            return torch.tensor(sorted(set(ps)), dtype=torch.long, device=dev) if ps else empty

        def apply(act, site, L, positions=None):
            """Write source values into ``act`` ([rows, pos, (head), ...]; pos = ``positions`` or all)."""
            for k, c in comps.get((site, L), []):
                s = src[site, L]
                rows = slice(k * N, (k + 1) * N)
                if positions is None:
                    idx = slice(None) if c.pos is None else c.pos
                    sp = idx
                elif c.pos is None:
                    idx, sp = slice(None), positions
                else:
                    hit = (positions == c.pos).nonzero()
                    if len(hit) == 0:
                        continue
                    idx, sp = int(hit[0, 0]), c.pos
                if c.head is None:
                    act[rows, idx] = s[:, sp]
                else:
                    act[rows, idx, c.head] = s[:, sp, c.head]
            return act

        changed, cval = empty, None  # positions whose residual differs from the base run, and its values there
        last_base = base["resid_post", self.n_layers - 1]
        pos_map = torch.full((T,), -1, dtype=torch.long, device=dev)

        def read(base_x, P):
            """The current residual at positions P: the base run's, overwritten where it changed."""
            r = rep(base_x[:, P])
            if len(changed):
                pos_map.fill_(-1)
                pos_map[changed] = torch.arange(len(changed), device=dev)
                j = pos_map[P]
                hit = j >= 0
                if bool(hit.any()):
                    r[:, hit] = cval[:, j[hit]]
            return r

        for L in range(L0, self.n_layers):
            b = self.blocks[L]
            last = L == self.n_layers - 1
            ln1 = _fast_norm(b.ln1)
            x_base = base["resid_pre", L]
            c_in = union(changed, touched(["resid_pre"], L))
            xc = apply(read(x_base, c_in), "resid_pre", L, c_in) if len(c_in) else None
            changed, cval = c_in, xc
            rx = [p for p in paths if p[1].receiver != "logits" and p[1].receiver_layer == L]
            k_changed = union(c_in, touched(["k", "v"], L), *[p[3] for p in rx if p[1].receiver != "q"])
            q_changed = union(c_in, touched(["q"], L), *[p[3] for p in rx if p[1].receiver == "q"])
            p_changed = touched(["pattern"], L)
            later = allT[allT >= int(k_changed[0])] if len(k_changed) else empty
            opos = union(later, q_changed, p_changed, touched(["z", "attn_out", "resid_mid", "mlp_out", "resid_post"], L))
            if last:
                opos = opos[torch.isin(opos, read_pos)]
            if len(opos) == 0:
                changed, cval = empty, None
                continue
            xo = read(x_base, opos)
            if len(k_changed) or len(q_changed) or len(p_changed):
                # attention for the queries at opos; keys/values differ from the base run only at k_changed
                q = self._heads(b.attn.q(ln1(xo)), self.n_heads)  # rows pos head d_head
                kc, vc = rep(base["k", L][:, k_changed]), rep(base["v", L][:, k_changed])
                if len(c_in):
                    h = ln1(xc)
                    at = torch.searchsorted(k_changed, c_in)
                    kc[:, at] = self._heads(b.attn.k(h), self.n_kv)
                    vc[:, at] = self._heads(b.attn.v(h), self.n_kv)
                for k, c, delta, where in rx:
                    rows = slice(k * N, (k + 1) * N)
                    at = opos if c.receiver == "q" else where
                    hr = ln1(read(x_base, at)[rows] + delta[:, at])
                    hd = c.receiver_head
                    if c.receiver == "q":
                        q[rows, :, hd] = self._heads(b.attn.q(hr), self.n_heads)[:, :, hd]
                    elif c.receiver == "k":
                        kc[rows, torch.searchsorted(k_changed, at), hd] = self._heads(b.attn.k(hr), self.n_kv)[:, :, hd]
                    else:
                        vc[rows, torch.searchsorted(k_changed, at), hd] = self._heads(b.attn.v(hr), self.n_kv)[:, :, hd]
                q = apply(q, "q", L, opos)
                kc = apply(kc, "k", L, k_changed)
                vc = apply(vc, "v", L, k_changed)
                qr = self._rope(L, q.transpose(1, 2), opos)  # rows head pos d_head
                kcr = self._kv_expand(self._rope(L, kc.transpose(1, 2), k_changed))
                vch = self._kv_expand(vc.transpose(1, 2))
                if len(k_changed) == T:
                    pattern = self.softmax(L, torch.matmul(qr, kcr.transpose(-2, -1)), opos)
                    z = torch.matmul(apply(pattern.transpose(1, 2), "pattern", L, opos).transpose(1, 2), vch)
                else:  # unchanged keys are shared by all K row groups: one matmul against the base keys
                    qk = ungroup(torch.matmul(group(qr), base["kr", L].transpose(-2, -1)), len(opos))
                    if len(k_changed):
                        qk[..., k_changed] = torch.matmul(qr, kcr.transpose(-2, -1))
                    pattern = self.softmax(L, qk, opos)
                    pattern = apply(pattern.transpose(1, 2), "pattern", L, opos).transpose(1, 2)
                    z = ungroup(torch.matmul(group(pattern), base["vh", L]), len(opos))
                    if len(k_changed):
                        vdiff = vch - rep(base["vh", L][:, :, k_changed])
                        z = z + torch.matmul(pattern[..., k_changed], vdiff)
                z = z.transpose(1, 2)  # rows pos head d_head
            else:  # no query, key, value or pattern changed here: the heads' outputs are the base run's
                z = rep(base["z", L][:, opos])
            z = apply(z, "z", L, opos)  # rows pos head d_head
            attn_out = apply(b.attn.o(z.contiguous().view(z.shape[0], z.shape[1], -1)), "attn_out", L, opos)
            mid = apply(xo + attn_out, "resid_mid", L, opos)
            if self.attn_only:
                post = mid
            else:
                post = mid + apply(b.mlp(_fast_norm(b.ln2)(mid)), "mlp_out", L, opos)
            changed, cval = opos, apply(post, "resid_post", L, opos)
        final = union(changed, *[p[3] for p in paths if p[1].receiver == "logits"])
        final = final[torch.isin(final, read_pos)]
        if len(final) == 0:
            return out
        xf = read(last_base, final)
        for k, c, delta, _ in paths:
            if c.receiver == "logits":
                rows = slice(k * N, (k + 1) * N)
                xf[rows] = xf[rows] + delta[:, final]
        out[:, torch.searchsorted(read_pos, final)] = self.model.unembed(_fast_norm(self.model.ln_final)(xf))
        return out


# ---------------------------------------------------------------------------- hook-based fallback


def _hook_name(site: str, L: int) -> str:
    if site in HEAD_SITES:
        return f"blocks.{L}.attn.hook_{site}"
    return f"blocks.{L}.hook_{site}"


class _Hooks:
    """Fallback for any TransformerBridge: K patches as K row groups through ``run_with_hooks``."""

    def __init__(self, model):
        self.model = model
        self.n_layers = model.cfg.n_layers

    def run(self, tokens, read_pos) -> _Cache:
        names = {_hook_name(s, L) for L in range(self.n_layers) for s in SITES if s != "resid_mid"}
        logits, raw = self.model.run_with_cache(tokens, names_filter=lambda n: n in names)
        cache = _Cache()
        for L in range(self.n_layers):
            for s in SITES:
                if s == "resid_mid":
                    if _hook_name("attn_out", L) in raw.keys():
                        cache.acts[s, L] = raw[_hook_name("resid_pre", L)] + raw[_hook_name("attn_out", L)]
                elif _hook_name(s, L) in raw.keys():
                    t = raw[_hook_name(s, L)]
                    cache.acts[s, L] = t.transpose(1, 2) if s == "pattern" else t
        cache.logits = logits[:, read_pos]
        return cache

    def run_patched(self, base: _Cache, src: _Cache, patches, read_pos, W_O, tokens=None) -> Tensor:
        K = len(patches)
        N = tokens.shape[0]
        hooks: dict[str, list] = {}
        current_pre: dict[int, Tensor] = {}
        for k, group in enumerate(patches):
            for c in group:
                if isinstance(c, PathPatch):
                    raise ProbekitError("path patching needs the native engine (a TL-native bridge); this model has another architecture")
                site = "attn_out" if c.site == "resid_mid" else c.site
                hooks.setdefault(_hook_name(site, c.layer), []).append((k, c))

        def make(entries):
            def hook(act, hook):
                act = act.clone()
                view = act.transpose(1, 2) if "hook_pattern" in hook.name else act
                for k, c in entries:
                    rows = slice(k * N, (k + 1) * N)
                    s = src[c.site, c.layer]
                    p = slice(None) if c.pos is None else c.pos
                    if c.site == "resid_mid":  # attn_out := target resid_mid - the residual entering the block
                        view[rows, p] = s[:, p] - current_pre[c.layer][rows, p]
                    elif c.head is None:
                        view[rows, p] = s[:, p]
                    else:
                        view[rows, p, c.head] = s[:, p, c.head]
                return act
            return hook

        fwd = [(name, make(e)) for name, e in hooks.items()]
        for L in {c.layer for g in patches for c in g if c.site == "resid_mid"}:
            def grab(act, hook, L=L):
                current_pre[L] = act
                return act
            fwd.append((_hook_name("resid_pre", L), grab))  # after any resid_pre patch on the same hook
        logits = self.model.run_with_hooks(tokens.repeat(K, 1), fwd_hooks=fwd)
        return logits[:, read_pos]


# ---------------------------------------------------------------------------- driver


def _check_patch(model, p: Patch, T: int, attn_only: bool) -> None:
    nl, nh = model.cfg.n_layers, model.cfg.n_heads
    if isinstance(p, PathPatch):
        layers = [p.sender_layer] + ([p.receiver_layer] if p.receiver != "logits" else [])
        heads = [p.sender_head] + ([p.receiver_head] if p.receiver != "logits" else [])
        pos = p.sender_pos
    else:
        layers, heads, pos = [p.layer], [p.head] if p.head is not None else [], p.pos
        if attn_only and p.site in ("mlp_out",):
            raise ProbekitError(f"site {p.site!r} does not exist: the model is attention-only")
    for L in layers:
        if not isinstance(L, int) or not 0 <= L < nl:
            raise ProbekitError(f"unknown layer {L!r}; the model has layers 0..{nl - 1}")
    for h in heads:
        if not isinstance(h, int) or not 0 <= h < nh:
            raise ProbekitError(f"unknown head {h!r}; the model has heads 0..{nh - 1}")
    if pos is not None and (not isinstance(pos, int) or not 0 <= pos < T):
        raise ProbekitError(f"unknown position {pos!r}; sequences have positions 0..{T - 1}")


def _engine(model, engine: str):
    if engine not in ("auto", "native", "hooks"):
        raise ProbekitError(f"unknown engine {engine!r}; expected 'auto', 'native' or 'hooks'")
    if engine == "native" and not _supports_native(model):
        raise ProbekitError("engine 'native' needs a TL-native TransformerBridge (as built by probekit); use engine='hooks'")
    if engine == "hooks" or (engine == "auto" and not _supports_native(model)):
        return _Hooks(model)
    return _Native(model)


def _stage_key(group: Sequence[Patch], n_layers: int):
    st, p0 = (n_layers, 0), 10**9
    for c in group:
        if isinstance(c, PathPatch):
            s = (n_layers, 0) if c.receiver == "logits" else (c.receiver_layer, 0)
            p = c.sender_pos or 0
        else:
            s, p = (c.layer, _STAGE[c.site]), c.pos or 0
        st, p0 = min(st, s), min(p0, p)
    return (st, p0)


@dataclass
class PatchValues:
    """Raw metric per patch (batch means) and the two reference runs; ``normalized`` = (raw - corr) / (clean - corr)."""

    raw: Float[Tensor, "patch"]
    raw_per_step: Float[Tensor, "patch answer"]
    clean: float
    corrupted: float
    clean_per_step: Tensor = field(default_factory=lambda: torch.zeros(0))
    corrupted_per_step: Tensor = field(default_factory=lambda: torch.zeros(0))

    @property
    def normalized(self) -> Tensor:
        gap = self.clean - self.corrupted
        if abs(gap) < 1e-6:
            raise ProbekitError(
                f"cannot normalise: the metric is {self.clean:.4g} on the clean run and {self.corrupted:.4g} on the "
                "corrupted run (no gap); report raw values (--raw) or use a corruption that changes the answer")
        return (self.raw - self.corrupted) / gap


@torch.no_grad()
def patch_values(model, pair: CorruptedPair, patches: Sequence[Patch | Sequence[Patch]], metric: Metric | str = "logit-diff",
                 direction: Direction = "denoise", max_batch: int = 1024, engine: str = "auto",
                 progress: bool = False, device=None) -> PatchValues:
    """The metric for each patch (a component, a path, or a list patched together), batched and chunked.

    ``max_batch`` caps the rows of one forward pass; n larger than it is split over examples.
    """
    if direction not in ("denoise", "noise"):
        raise ProbekitError(f"unknown direction {direction!r}; expected 'denoise' or 'noise'")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ProbekitError(f"max_batch must be a positive integer, got {max_batch!r}")
    groups = [[p] if isinstance(p, Component | PathPatch) else list(p) for p in patches]
    if not groups:
        raise ProbekitError("no patches given; expected at least one component")
    pair.check()
    bm = BoundMetric.bind(metric, pair)
    T = pair.clean.seq_len
    if T > model.cfg.n_ctx:
        raise ProbekitError(f"sequences have {T} tokens but the model's n_ctx is {model.cfg.n_ctx}")
    if pair.clean.tokens.max() >= model.cfg.d_vocab:
        raise ProbekitError(f"tokens go up to {int(pair.clean.tokens.max())} but the model's d_vocab is {model.cfg.d_vocab}")
    attn_only = bool(model.cfg.attn_only)
    for g in groups:
        if not g:
            raise ProbekitError("an empty patch group; expected at least one component per patch")
        for c in g:
            if not isinstance(c, Component | PathPatch):
                raise ProbekitError(f"expected Component or PathPatch, got {type(c).__name__}")
            _check_patch(model, c, T, attn_only)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    if device is not None and torch.device(device).type != dev.type:
        raise ProbekitError(f"the model is on {dev} but device={device!r}; move the model first (probekit.model.to_device)")
    eng = _engine(model, engine)
    base_b, src_b = (pair.corrupted, pair.clean) if direction == "denoise" else (pair.clean, pair.corrupted)
    read = bm.read_pos.to(dev)
    W_O = [b.attn.W_O.detach() for b in model.blocks] if any(isinstance(c, PathPatch) for g in groups for c in g) else None
    order = sorted(range(len(groups)), key=lambda i: _stage_key(groups[i], model.cfg.n_layers))
    N = pair.clean.n
    S = len(read)
    sum_red = torch.zeros(len(groups), dtype=torch.float64)
    sum_step = torch.zeros(len(groups), S, dtype=torch.float64)
    ref = torch.zeros(2, S + 1, dtype=torch.float64)  # base, src: per step + reduced
    n_ex = min(N, max_batch)
    K = max(1, max_batch // n_ex)
    runs: list[list[int]] = []  # patches that start at the same (layer, stage, position) share a pass
    for i in order:
        if runs and len(runs[-1]) < K and _stage_key(groups[runs[-1][0]], model.cfg.n_layers) == \
                _stage_key(groups[i], model.cfg.n_layers):
            runs[-1].append(i)
        else:
            runs.append([i])
    chunks = [(e, r) for e in range(0, N, n_ex) for r in runs]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chunks), desc="patching", unit="pass")
    try:
        cur = None
        for e, idx in chunks:
            if cur != e:
                rows = torch.arange(e, min(e + n_ex, N), device=dev)
                tb, ts = base_b.tokens[rows.cpu()].to(dev), src_b.tokens[rows.cpu()].to(dev)
                base = eng.run(tb, read)
                src = eng.run(ts, read)
                for j, c in enumerate((base, src)):
                    ps = bm.per_step(c.logits, rows)
                    ref[j, :S] += ps.double().sum(0).cpu()
                    ref[j, S] += bm.reduce(ps).double().sum().cpu()
                cur = e
            chunk = [groups[i] for i in idx]
            if isinstance(eng, _Hooks):
                logits = eng.run_patched(base, src, chunk, read, W_O, tokens=tb)
            else:
                logits = eng.run_patched(base, src, chunk, read, W_O)
            n = len(rows)
            ps = bm.per_step(logits, rows.repeat(len(chunk)))  # [K*n, S]
            red = bm.reduce(ps).view(len(chunk), n).double().sum(1).cpu()
            ps = ps.view(len(chunk), n, S).double().sum(1).cpu()
            sum_red[idx] += red
            sum_step[idx] += ps
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    ref /= N
    clean_j, corr_j = (1, 0) if direction == "denoise" else (0, 1)
    return PatchValues(raw=(sum_red / N).float(), raw_per_step=(sum_step / N).float(),
                       clean=float(ref[clean_j, S]), corrupted=float(ref[corr_j, S]),
                       clean_per_step=ref[clean_j, :S].float(), corrupted_per_step=ref[corr_j, :S].float())


# ---------------------------------------------------------------------------- sweeps and results


def _parse_index(values, n: int, what: str) -> list[int]:
    if values is None:
        return list(range(n))
    vals = [int(v) for v in values]
    bad = [v for v in vals if not 0 <= v < n]
    if bad or not vals:
        raise ProbekitError(f"unknown {what} {bad or vals}; expected values in 0..{n - 1}")
    return vals


def _settings(model, pair: CorruptedPair, bm_metric: Metric, direction, normalize, pv: PatchValues, **kw) -> dict:
    return {"model": getattr(model, "probekit_name", None), "task": pair.clean.task, "objective": pair.clean.objective,
            "length": pair.clean.length, "n": pair.clean.n, "corruption": pair.settings(),
            "metric": bm_metric.kind, "answer_steps": list(bm_metric.steps) if bm_metric.steps is not None else None,
            "direction": direction, "normalized": normalize, "clean_metric": pv.clean,
            "corrupted_metric": pv.corrupted, **kw}


def _values(pv: PatchValues, normalize: bool) -> Tensor:
    return pv.normalized if normalize else pv.raw


def sweep(model, pair: CorruptedPair, site: str = "z", *, by_pos: bool = True, metric: Metric | str = "logit-diff",
          direction: Direction = "denoise", layers=None, heads=None, positions=None, normalize: bool = True,
          per_step: bool = False, max_batch: int = 1024, engine: str = "auto", progress: bool = False,
          device=None) -> Result:
    """Patch every (layer, [pos], [head]) of one site. Axes ``(layer, pos, head)`` for head sites by position,
    ``(layer, head)`` across positions; ``(layer, pos)`` / ``(layer,)`` for block sites; ``per_step`` adds a
    last axis ``answer`` (the metric at each evaluated answer step, normalised per step; NaN where a step
    has no clean/corrupted gap). Values: the normalised metric (0 = corrupted, 1 = clean) or raw;
    ``extra['raw']`` is always raw.
    """
    site = canonical_site(site)
    T = pair.clean.seq_len
    Ls = _parse_index(layers, model.cfg.n_layers, "layer")
    is_head = site in HEAD_SITES
    n_h = model.cfg.n_heads if site not in ("k", "v") else (getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
    Hs = _parse_index(heads, n_h, "head") if is_head else None
    if heads is not None and not is_head:
        raise ProbekitError(f"site {site!r} has no heads; drop the head selection or use a head site {list(HEAD_SITES)}")
    Ps = _parse_index(positions, T, "position") if by_pos else None
    if positions is not None and not by_pos:
        raise ProbekitError("positions were given but by_pos is False; expected by_pos=True to select positions")
    axes = ["layer"] + (["pos"] if by_pos else []) + (["head"] if is_head else [])
    grid = [[L] for L in Ls]
    if by_pos:
        grid = [g + [p] for g in grid for p in Ps]
    if is_head:
        grid = [g + [h] for g in grid for h in Hs]
    comps = [Component(site, g[0], head=g[-1] if is_head else None, pos=g[1] if by_pos else None) for g in grid]
    pv = patch_values(model, pair, comps, metric=metric, direction=direction, max_batch=max_batch, engine=engine,
                      progress=progress, device=device)
    shape = [len(Ls)] + ([len(Ps)] if by_pos else []) + ([len(Hs)] if is_head else [])
    labels = {"layer": [str(L) for L in Ls]}
    if by_pos:
        pl = position_labels(pair.clean)
        labels["pos"] = [pl[p] for p in Ps]
    if is_head:
        labels["head"] = [str(h) for h in Hs]
    bound = BoundMetric.bind(metric, pair)
    bm = bound.metric
    if per_step:
        if bm.kind == "exact-match":
            raise ProbekitError("per_step needs a per-step metric (logit-diff, prob or acc), got 'exact-match'")
        S = len(bound.read_pos)
        raw = pv.raw_per_step.view(shape + [S])
        gap = pv.clean_per_step - pv.corrupted_per_step
        vals = (raw - pv.corrupted_per_step) / torch.where(gap.abs() < 1e-6, torch.nan, gap) if normalize else raw
        pl = position_labels(pair.clean)
        labels["answer"] = [pl[int(t) + 1] for t in bound.read_pos]
        return Result(kind=f"patch_{site}" + ("_by_pos" if by_pos else "") + "_per_step", values=vals,
                      axes=tuple(axes) + ("answer",), labels=labels,
                      settings=_settings(model, pair, bm, direction, normalize, pv, site=site, by_pos=by_pos,
                                         layers=Ls, heads=Hs, positions=Ps,
                                         clean_per_step=pv.clean_per_step.tolist(),
                                         corrupted_per_step=pv.corrupted_per_step.tolist()),
                      extra={"raw": raw})
    return Result(kind=f"patch_{site}" + ("_by_pos" if by_pos else ""), values=_values(pv, normalize).view(shape),
                  axes=tuple(axes), labels=labels,
                  settings=_settings(model, pair, bm, direction, normalize, pv, site=site, by_pos=by_pos,
                                     layers=Ls, heads=Hs, positions=Ps),
                  extra={"raw": pv.raw.view(shape)})


def patch(model, pair: CorruptedPair, patches: Sequence[Patch | Sequence[Patch]], *, metric: Metric | str = "logit-diff",
          direction: Direction = "denoise", normalize: bool = True, max_batch: int = 1024, engine: str = "auto",
          progress: bool = False, device=None) -> Result:
    """Any list of patches (each a component, a path or a set patched together) -> Result with axis ``patch``."""
    pv = patch_values(model, pair, patches, metric=metric, direction=direction, max_batch=max_batch, engine=engine,
                      progress=progress, device=device)
    labels = ["+".join(c.label for c in ([p] if isinstance(p, Component | PathPatch) else p)) for p in patches]
    bm = BoundMetric.bind(metric, pair).metric
    return Result(kind="patch", values=_values(pv, normalize), axes=("patch",), labels={"patch": labels},
                  settings=_settings(model, pair, bm, direction, normalize, pv), extra={"raw": pv.raw})


def path_patch(model, pair: CorruptedPair, receiver: str = "logits", *, sender: tuple[int, int] | None = None,
               metric: Metric | str = "logit-diff", direction: Direction = "denoise", normalize: bool = True,
               max_batch: int = 1024, progress: bool = False, device=None) -> Result:
    """Path patching.

    ``receiver='logits'``: every sender head's direct path to the logits, axes ``(layer, head)`` of senders.
    ``receiver in q/k/v`` with ``sender=(L, h)``: that head into every later head's q/k/v input, axes
    ``(layer, head)`` of receivers (NaN where the receiver is not after the sender). With ``sender=None``:
    every sender x every later receiver, axes ``(sender_layer, sender_head, layer, head)``.
    """
    if receiver not in RECEIVERS:
        raise ProbekitError(f"unknown path receiver {receiver!r}; expected one of {list(RECEIVERS)}")
    nl, nh = model.cfg.n_layers, model.cfg.n_heads
    if sender is not None:
        if len(sender) != 2:
            raise ProbekitError(f"sender must be (layer, head), got {sender!r}")
        _check_patch(model, PathPatch(int(sender[0]), int(sender[1])), pair.clean.seq_len, False)
    if receiver == "logits":
        senders = [sender] if sender is not None else [(L, h) for L in range(nl) for h in range(nh)]
        pats = [PathPatch(L, h, "logits") for L, h in senders]
        pv = patch_values(model, pair, pats, metric=metric, direction=direction, max_batch=max_batch,
                          progress=progress, device=device, engine="native")
        vals = torch.full((nl, nh), float("nan"))
        raw = vals.clone()
        for (L, h), v, r in zip(senders, _values(pv, normalize), pv.raw, strict=True):
            vals[L, h], raw[L, h] = v, r
        axes, shape_vals, shape_raw = ("layer", "head"), vals, raw
        labels = {"layer": [str(i) for i in range(nl)], "head": [str(i) for i in range(nh)]}
    else:
        senders = [tuple(sender)] if sender is not None else [(L, h) for L in range(nl) for h in range(nh)]
        pats, where = [], []
        for sl, sh in senders:
            for rl in range(sl + 1, nl):
                for rh in range(nh):
                    pats.append(PathPatch(sl, sh, receiver, rl, rh))
                    where.append((sl, sh, rl, rh))
        if not pats:
            raise ProbekitError(f"sender layer {senders[0][0]} is the last layer; no later head can receive")
        pv = patch_values(model, pair, pats, metric=metric, direction=direction, max_batch=max_batch,
                          progress=progress, device=device, engine="native")
        full = torch.full((nl, nh, nl, nh), float("nan"))
        raw_full = full.clone()
        for (sl, sh, rl, rh), v, r in zip(where, _values(pv, normalize), pv.raw, strict=True):
            full[sl, sh, rl, rh], raw_full[sl, sh, rl, rh] = v, r
        if sender is not None:
            shape_vals, shape_raw = full[sender[0], sender[1]], raw_full[sender[0], sender[1]]
            axes = ("layer", "head")
            labels = {"layer": [str(i) for i in range(nl)], "head": [str(i) for i in range(nh)]}
        else:
            shape_vals, shape_raw = full, raw_full
            axes = ("sender_layer", "sender_head", "layer", "head")
            labels = {a: [str(i) for i in range(n)] for a, n in zip(axes, (nl, nh, nl, nh), strict=True)}
    bm = BoundMetric.bind(metric, pair).metric
    return Result(kind=f"path_patch_{receiver}", values=shape_vals, axes=axes, labels=labels,
                  settings=_settings(model, pair, bm, direction, normalize, pv, receiver=receiver,
                                     sender=list(sender) if sender is not None else None),
                  extra={"raw": shape_raw})


__all__ = ["BLOCK_SITES", "BoundMetric", "Component", "HEAD_SITES", "METRICS", "Metric", "PatchValues", "PathPatch",
           "SITES", "answer_layout", "canonical_site", "digit_step", "patch", "patch_values", "path_patch",
           "position_labels", "sweep"]
