"""The hook-based patching engine: any TransformerBridge, K patches as K row groups through ``run_with_hooks``."""

from __future__ import annotations

from torch import Tensor

from probekit.forward import hook_name
from probekit.patching.native import Cache
from probekit.patching.sites import SITES, Component, PathPatch
from probekit.tasks import ProbekitError


def _setter(entries: list[tuple[int, Component]], src: Cache, n: int, current_pre: dict[int, Tensor]):
    """A hook writing the source values of ``entries`` (row group k, component) into its activation."""

    def hook(act, hook):
        act = act.clone()
        pattern = "hook_pattern" in hook.name
        view = act.transpose(1, 2) if pattern else act  # patterns: [rows, pos, head, key] while writing
        for k, c in entries:
            rows = slice(k * n, (k + 1) * n)
            s = src[c.site, c.layer].transpose(1, 2) if pattern else src[c.site, c.layer]
            p = slice(None) if c.pos is None else c.pos
            if c.site == "resid_mid":  # attn_out := target resid_mid - the residual entering the block
                view[rows, p] = s[:, p] - current_pre[c.layer][rows, p]
            elif c.head is None:
                view[rows, p] = s[:, p]
            else:
                view[rows, p, c.head] = s[:, p, c.head]
        return act

    return hook


def _grabber(L: int, current_pre: dict[int, Tensor]):
    def grab(act, hook):
        current_pre[L] = act
        return act

    return grab


class HookEngine:
    """Fallback for any TransformerBridge: K patches as K row groups through ``run_with_hooks``."""

    def __init__(self, model):
        self.model = model
        self.n_layers = model.cfg.n_layers

    def run(self, tokens: Tensor, read_pos: Tensor) -> Cache:
        names = {hook_name(s, L) for L in range(self.n_layers) for s in SITES if s != "resid_mid"}
        logits, raw = self.model.run_with_cache(tokens, names_filter=lambda n: n in names)
        cache = Cache()
        for L in range(self.n_layers):
            for s in SITES:
                if s == "resid_mid":
                    if hook_name("attn_out", L) in raw.keys():
                        cache.acts[s, L] = raw[hook_name("resid_pre", L)] + raw[hook_name("attn_out", L)]
                elif hook_name(s, L) in raw.keys():
                    cache.acts[s, L] = raw[hook_name(s, L)]
        cache.logits = logits[:, read_pos]
        return cache

    def run_patched(self, base: Cache, src: Cache, patches, read_pos: Tensor, W_O, tokens: Tensor | None = None) -> Tensor:
        K, N = len(patches), tokens.shape[0]
        by_hook: dict[str, list] = {}
        for k, group in enumerate(patches):
            for c in group:
                if isinstance(c, PathPatch):
                    raise ProbekitError("path patching needs the native engine (a TL-native or GPT-2 bridge); "
                                        "this model has another architecture")
                site = "attn_out" if c.site == "resid_mid" else c.site
                by_hook.setdefault(hook_name(site, c.layer), []).append((k, c))
        current_pre: dict[int, Tensor] = {}
        fwd = [(name, _setter(e, src, N, current_pre)) for name, e in by_hook.items()]
        for L in {c.layer for g in patches for c in g if c.site == "resid_mid"}:
            fwd.append((hook_name("resid_pre", L), _grabber(L, current_pre)))  # after any resid_pre patch there
        logits = self.model.run_with_hooks(tokens.repeat(K, 1), fwd_hooks=fwd)
        return logits[:, read_pos]
