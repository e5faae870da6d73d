"""The native patching engine: K patches as K groups of batch rows in one pass over `probekit.forward`.

A pipeline of three stages:

1. `plan`: which (site, layer) each row group patches, the path-patch deltas, the first layer that
   can change;
2. `patch_layer`, for each layer from that one: the positions whose keys/values, queries and outputs
   can differ from the base run (`layer_positions`), then `probekit.forward.recompute_layer` there,
   with a `Patcher` as its edit (it writes the source run's values at the patched sites);
3. `read_out`: the final residual at the positions the metric reads -> logits.

Work that cannot change what is read is skipped: a patch that writes the base run's own values
(`writes_base`) is not run, and with a ``need`` mask (the (example, answer step) logits the metric
reads) the last layer computes its outputs only there (`last_need`).

`Residual` carries, between layers, the positions whose residual differs from the base run and its
values there; everything else is read from the base run's cache. Under causal attention only later
queries can change, so a patch at position p leaves every earlier position as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from probekit import forward as F
from probekit.patching.sites import Component, Patch, PathPatch


@dataclass
class Cache:
    """Activations of one unpatched run (rows = examples), ``(site, layer)`` -> TransformerLens layout."""

    acts: dict[tuple[str, int], Tensor] = field(default_factory=dict)
    logits: Tensor | None = None  # [batch, answer, d_vocab] at the read positions

    def __getitem__(self, key):
        return self.acts[key]


@dataclass
class PathDelta:
    """One path patch of row group ``group``: the sender's write ``delta`` [batch, pos, d_model], non-zero at ``where``."""

    group: int
    path: PathPatch
    delta: Tensor
    where: Tensor


@dataclass
class Plan:
    groups: int  # K
    n: int  # N examples per group
    allT: Tensor
    read_pos: Tensor
    comps: dict[tuple[str, int], list[tuple[int, Component]]]
    paths: list[PathDelta]
    first_layer: int
    first_pos: int
    need: Tensor | None = None  # bool [N, answer]: the read logits that matter (None: all)

    def rows(self, k: int) -> slice:
        return slice(k * self.n, (k + 1) * self.n)

    def touched(self, sites, L: int) -> Tensor:
        """Positions patched at ``sites`` of layer ``L`` (all positions if any patch there has pos None)."""
        ps = [c.pos for s in sites for _, c in self.comps.get((s, L), [])]
        if any(p is None for p in ps):
            return self.allT
        return torch.tensor(sorted(set(ps)), dtype=torch.long, device=self.allT.device) if ps else self.allT[:0]

    def receivers(self, L: int) -> list[PathDelta]:
        return [p for p in self.paths if p.path.receiver != "logits" and p.path.receiver_layer == L]


def union(empty: Tensor, *ts) -> Tensor:
    """Sorted positions in any of ``ts`` (``empty`` when there are none)."""
    ts = [t for t in ts if t is not None and len(t)]
    return torch.unique(torch.cat(ts)) if ts else empty


def plan(patches: list[list[Patch]], base: Cache, src: Cache, W_O, read_pos: Tensor, n_layers: int) -> Plan:
    """Stage 1: the patches of each row group, by (site, layer); path deltas; where recomputation starts."""
    N, T = base["resid_pre", 0].shape[:2]
    allT = torch.arange(T, device=read_pos.device)
    comps: dict[tuple[str, int], list[tuple[int, Component]]] = {}
    paths: list[PathDelta] = []
    L0, pmin = n_layers, T
    for k, group in enumerate(patches):
        for c in group:
            if isinstance(c, PathPatch):
                z_s, z_b = src["z", c.sender_layer][:, :, c.sender_head], base["z", c.sender_layer][:, :, c.sender_head]
                delta = (z_s - z_b) @ W_O[c.sender_layer][c.sender_head]  # batch pos d_model
                where = allT if c.sender_pos is None else allT[c.sender_pos:c.sender_pos + 1]
                if c.sender_pos is not None:
                    delta = torch.zeros_like(delta).index_copy_(1, where, delta[:, where])
                paths.append(PathDelta(k, c, delta, where))
                L0 = min(L0, n_layers if c.receiver == "logits" else c.receiver_layer)
                pmin = min(pmin, int(where[0]))
            else:
                comps.setdefault((c.site, c.layer), []).append((k, c))
                L0, pmin = min(L0, c.layer), min(pmin, 0 if c.pos is None else c.pos)
    return Plan(len(patches), N, allT, read_pos, comps, paths, L0, pmin)


class Residual:
    """The residual of the patched rows where it differs from the base run (positions ``pos``, values ``val``)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.pos, self.val = plan.allT[:0], None
        self._map = torch.full((len(plan.allT),), -1, dtype=torch.long, device=plan.allT.device)

    def set(self, pos: Tensor, val: Tensor | None) -> None:
        self.pos, self.val = pos, val

    def read(self, base_x: Tensor, P: Tensor) -> Tensor:
        """The current residual at positions P: the base run's, overwritten where it changed."""
        r = base_x[:, P].repeat(self.plan.groups, 1, 1)
        if len(self.pos):
            self._map.fill_(-1)
            self._map[self.pos] = torch.arange(len(self.pos), device=P.device)
            j = self._map[P]
            hit = j >= 0
            if bool(hit.any()):
                r[:, hit] = self.val[:, j[hit]]
        return r


class Patcher:
    """The edit of a patched pass: source values at the patched sites, path deltas at the receivers' inputs."""

    def __init__(self, plan: Plan, nat: F.Native, base: Cache, src: Cache, resid: Residual):
        self.plan, self.nat, self.base, self.src, self.resid = plan, nat, base, src, resid

    def __call__(self, site: str, L: int, act: Tensor, pos: Tensor) -> Tensor:
        if site in ("q", "k", "v"):
            for p in self.plan.receivers(L):
                if p.path.receiver == site:
                    self._receive(p, L, act, pos)
        return self.apply(act, site, L, pos)

    def _receive(self, p: PathDelta, L: int, act: Tensor, pos: Tensor) -> None:
        """Recompute receiver head's q/k/v from its input plus the sender's delta (only for its row group)."""
        layer, site, hd = self.nat.layers[L], p.path.receiver, p.path.receiver_head
        at = pos if site == "q" else p.where
        rows = self.plan.rows(p.group)
        h = layer.ln1(self.resid.read(self.base["resid_pre", L], at)[rows] + p.delta[:, at])
        a = layer.attn
        proj, n = {"q": (a.q, a.n_heads), "k": (a.k, a.n_kv), "v": (a.v, a.n_kv)}[site]
        idx = slice(None) if site == "q" else torch.searchsorted(pos, at)
        act[rows, idx, hd] = F.heads(proj(h), n, a.d_head)[:, :, hd]

    def apply(self, act: Tensor, site: str, L: int, positions: Tensor) -> Tensor:
        """Write source values into ``act`` ([rows, positions, (head), ...]; patterns [rows, head, positions, key])."""
        entries = self.plan.comps.get((site, L))
        if not entries:
            return act
        s_all = self.src[site, L]
        view = act
        if site == "pattern":
            view, s_all = act.transpose(1, 2), s_all.transpose(1, 2)
        for k, c in entries:
            rows = self.plan.rows(k)
            if c.pos is None:
                idx, sp = slice(None), positions
            else:
                hit = (positions == c.pos).nonzero()
                if len(hit) == 0:
                    continue
                idx, sp = int(hit[0, 0]), c.pos
            if c.head is None:
                view[rows, idx] = s_all[:, sp]
            else:
                view[rows, idx, c.head] = s_all[:, sp, c.head]
        return act


def writes_base(c: Patch, base: Cache, src: Cache) -> bool:
    """Whether patch ``c`` would write exactly the base run's values (so it changes nothing)."""
    if isinstance(c, PathPatch):
        site, L, head, pos = "z", c.sender_layer, c.sender_head, c.sender_pos
    else:
        site, L, head, pos = c.site, c.layer, c.head, c.pos
    b, s = base[site, L], src[site, L]
    if site == "pattern":  # [rows, head, pos, key]: read as [rows, pos, head, key]
        b, s = b.transpose(1, 2), s.transpose(1, 2)
    at = (slice(None), slice(None) if pos is None else pos) + (() if head is None else (head,))
    return torch.equal(b[at], s[at])


def layer_positions(pl: Plan, L: int, changed: Tensor, last: bool) -> tuple[Tensor, Tensor, bool]:
    """``(key_pos, out_pos, attention)``: positions whose keys/values may differ, those whose outputs may,
    and whether any query, key, value or pattern of the layer changed. ``changed``: residual entering L."""
    rx, none = pl.receivers(L), pl.allT[:0]
    key_pos = union(none, changed, pl.touched(["k", "v"], L), *[p.where for p in rx if p.path.receiver != "q"])
    q_pos = union(none, changed, pl.touched(["q"], L), *[p.where for p in rx if p.path.receiver == "q"])
    p_pos = pl.touched(["pattern"], L)
    later = pl.allT[pl.allT >= int(key_pos[0])] if len(key_pos) else pl.allT[:0]
    out = union(none, later, q_pos, p_pos, pl.touched(["z", "attn_out", "resid_mid", "mlp_out", "resid_post"], L))
    if last:
        out = out[torch.isin(out, pl.read_pos)]
    return key_pos, out, bool(len(key_pos) or len(q_pos) or len(p_pos))


def last_need(pl: Plan, L: int, out_pos: Tensor) -> Tensor | None:
    """Where the last layer's outputs at ``out_pos`` are read (``pl.need``), when nothing is patched after its heads."""
    if pl.need is None or any((s, L) in pl.comps for s in ("attn_out", "resid_mid", "mlp_out", "resid_post")):
        return None
    need = pl.need.repeat(pl.groups, 1)[:, torch.searchsorted(pl.read_pos, out_pos)]
    return None if bool(need.all()) else need


def patch_layer(nat: F.Native, pl: Plan, base: Cache, resid: Residual, patcher: Patcher, L: int) -> None:
    """Stage 2: recompute layer ``L`` where it can differ from the base run; update ``resid``."""
    x_base = base["resid_pre", L]
    new_pos = union(pl.allT[:0], resid.pos, pl.touched(["resid_pre"], L))
    x_new = patcher.apply(resid.read(x_base, new_pos), "resid_pre", L, new_pos) if len(new_pos) else None
    resid.set(new_pos, x_new)
    key_pos, out_pos, attention = layer_positions(pl, L, new_pos, last=L == len(nat.layers) - 1)
    if len(out_pos) == 0:
        resid.set(pl.allT[:0], None)
        return
    x = resid.read(x_base, out_pos)
    need = last_need(pl, L, out_pos) if L == len(nat.layers) - 1 else None
    post = F.recompute_layer(nat, L, base.acts, x, out_pos, x_new, new_pos, key_pos, pl.groups, patcher, attention,
                             need)
    resid.set(out_pos, post)


def read_out(nat: F.Native, pl: Plan, base: Cache, resid: Residual) -> Tensor:
    """Stage 3: logits [K*N, answer, d_vocab] at the read positions (the base run's where nothing changed)."""
    out = base.logits.repeat(pl.groups, 1, 1)
    final = union(pl.allT[:0], resid.pos, *[p.where for p in pl.paths if p.path.receiver == "logits"])
    final = final[torch.isin(final, pl.read_pos)]
    if len(final) == 0:
        return out
    xf = resid.read(base["resid_post", len(nat.layers) - 1], final)
    for p in pl.paths:
        if p.path.receiver == "logits":
            rows = pl.rows(p.group)
            xf[rows] = xf[rows] + p.delta[:, final]
    out[:, torch.searchsorted(pl.read_pos, final)] = nat.unembed(nat.ln_final(xf))
    return out


class NativeEngine:
    """Patching on `probekit.forward`: a recorded run per input, then patched passes recomputing what can change."""

    def __init__(self, model):
        self.nat = F.native(model)

    def run(self, tokens: Tensor, read_pos: Tensor) -> Cache:
        """Unpatched forward on ``tokens`` recording every site, and the logits at ``read_pos``."""
        acts, logits = F.record_sites(self.nat, tokens, read_pos)
        for key in [k for k in acts if k[0] in ("kr", "vh")]:
            acts[key] = acts[key].contiguous()
        return Cache(acts, logits)

    def run_patched(self, base: Cache, src: Cache, patches: list[list[Patch]], read_pos: Tensor, W_O,
                    tokens: Tensor | None = None, need: Tensor | None = None) -> Tensor:
        """Logits [K*N, answer, d_vocab] at ``read_pos`` for K patches (rows k*N..(k+1)*N-1 = patch k).

        ``need`` (bool [N, answer]): the logits the caller reads; elsewhere they may be any finite values.
        A patch that writes the base run's own values (e.g. at a position before the first token where
        the two runs differ) changes nothing: its rows are the base run's logits, and it is not run.
        """
        live = [k for k, g in enumerate(patches) if not all(writes_base(c, base, src) for c in g)]
        if len(live) == len(patches):
            return self._run_patched(base, src, patches, read_pos, W_O, need)
        out = base.logits.repeat(len(patches), 1, 1)
        if live:
            N = base.logits.shape[0]
            rows = torch.cat([torch.arange(k * N, (k + 1) * N, device=out.device) for k in live])
            out[rows] = self._run_patched(base, src, [patches[k] for k in live], read_pos, W_O, need)
        return out

    def _run_patched(self, base: Cache, src: Cache, patches: list[list[Patch]], read_pos: Tensor, W_O,
                     need: Tensor | None) -> Tensor:
        pl = plan(patches, base, src, W_O, read_pos, len(self.nat.layers))
        pl.need = need
        if not bool((read_pos >= pl.first_pos).any()):
            return base.logits.repeat(pl.groups, 1, 1)  # nothing the metric reads can change
        resid = Residual(pl)
        patcher = Patcher(pl, self.nat, base, src, resid)
        for L in range(pl.first_layer, len(self.nat.layers)):
            patch_layer(self.nat, pl, base, resid, patcher, L)
        return read_out(self.nat, pl, base, resid)
