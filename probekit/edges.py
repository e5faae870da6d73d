"""Circuit discovery on edges: edge attribution patching (EAP, EAP-IG), exact edge patching, faithfulness.

The graph (`Graph.of(model)`). Senders write into the residual stream: ``embed`` (token + position
embedding), every attention head ``L{l}H{h}`` (its output ``z @ W_O``, without the layer's ``b_O``) and
every MLP ``MLP{l}`` (its output). Receivers read the residual stream: every head's ``q``, ``k`` and ``v``
input *separately* (``L{l}H{h}.q``, before ``ln1``), every MLP's input (``MLP{l}``, resid_mid before
``ln2``) and the final residual read by the unembedding (``logits``). An edge is ``(sender, receiver)``
with the sender earlier: a head of layer l feeds the MLP of layer l and everything from layer l + 1 on.
The biases (``b_O``) are the same in every run, so each receiver input is ``sum of its senders' outputs +
biases``.

Edge effect (as in path patching, `probekit.patching.path_patch`): the sender's source-minus-base output
is added only to that receiver's input; everything downstream of the receiver is recomputed. The
``direction`` is patching's: ``"noise"`` (the default here, the convention of EAP and of circuit
ablation) runs the clean input and patches corrupted values in; ``"denoise"`` runs the corrupted input
and patches clean values in. The effect of an edge is ``m(patched) - m(base run)`` (raw metric, batch mean).

- `eap`: with ``d_s = a_src[s] - a_base[s]``, ``x_r`` the receiver's input at the base run and ``n_r`` the
  receiver's own norm (``ln1`` of a head's q/k/v, ``ln2`` of an MLP, ``ln_final`` of the logits),
  ``score(s -> r) = (n_r(x_r + d_s) - n_r(x_r)) . dM/d(n_r(x_r))`` (``norm="exact"``, the default): the
  receiver's norm is evaluated exactly on the sender's delta and only what follows it is linearised.
  ``norm="linear"`` is the textbook score ``d_s . dM/dx_r`` (Syed et al. 2023), the first-order term of both.
  A single-edge patch moves the receiver's input off the clean-to-corrupted path, and its norm's scale moves
  with it (a sender's delta alone can raise the final residual's norm and shrink every logit); the gradient
  before the norm cannot see that, the exact norm does (and makes every edge into ``logits`` exact when the
  metric is linear in the logits, as ``logit-diff`` is); this refinement is ours, not the papers'. Every
  edge from three passes (base forward + backward, source forward) either way; each receiver input is its
  own tensor in the forward (`run_graph`), so the gradients are exact per head and per q/k/v.
- EAP-IG (``method="eap-ig"``, Hanna et al. 2024, input interpolation): the same gradient is averaged over
  ``steps`` runs whose embedding is ``base + alpha (src - base)``, ``alpha = k / steps``, k = 0..steps-1
  (a left Riemann sum: ``steps=1`` is plain EAP); the norm's change is taken at the base run;
  ``steps + 1`` forwards, ``steps`` backwards.
- `exact_edges`: the exact effect of every edge; K edges run as K row groups of one batch, each pass
  starting at the layer its edges reach, from the recorded base run; row groups share what their edges do
  not change, and the last layer and the logits are computed at the metric's read positions only.
- `faithfulness`: circuits of the top-n edges by ``|score|``: every other edge is ablated, i.e. its
  receiver reads the sender's ablated output in place of its current one (input = current - (out - ablated);
  ``mean``: the clean batch's per-position mean; ``resample``: the corrupted run's output). Faithfulness is
  ``(m_circuit - m_all_ablated) / (m_clean - m_all_ablated)`` on the clean run; `circuit_examples` gives the
  three metrics per example, for a bootstrap interval over examples.

Axis names: ``rows`` (K row groups of the N examples), ``pos``, ``head``, ``d_head``, ``d_model``,
``sender`` / ``receiver`` (graph nodes in the order above), ``edge``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from probekit import forward as F
from probekit.corruptions import CorruptedPair
from probekit.metrics import GRADIENT_METRICS, BoundMetric, Metric, check_metric
from probekit.tasks import ProbekitError

QKV = ("q", "k", "v")
METHODS = ("eap", "eap-ig")
ABLATIONS = ("mean", "resample")
NORMS = ("exact", "linear")  # how a receiver's own norm enters the scores (see `eap`)

# ---------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class Node:
    """A sender (``embed``, ``head``, ``mlp``) or a receiver (``head`` with ``site`` q/k/v, ``mlp``, ``logits``)."""

    kind: str
    layer: int = -1
    head: int | None = None
    site: str | None = None

    @property
    def label(self) -> str:
        """``embed``, ``logits``, ``MLP{l}``, ``L{l}H{h}`` (a sender) or ``L{l}H{h}.q|k|v`` (a receiver)."""
        if self.kind in ("embed", "logits"):
            return self.kind
        if self.kind == "mlp":
            return f"MLP{self.layer}"
        return f"L{self.layer}H{self.head}" + (f".{self.site}" if self.site else "")


@dataclass(frozen=True)
class Graph:
    """Senders, receivers and edges ``(sender index, receiver index)`` of a model (see the module docstring)."""

    n_layers: int
    n_heads: int
    n_kv: int
    has_mlp: bool
    senders: tuple[Node, ...]
    receivers: tuple[Node, ...]
    edges: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, model) -> Graph:
        """The graph of ``model`` from its config (grouped-query models: one k and v receiver per kv head)."""
        cfg = model.cfg
        nl, nh = cfg.n_layers, cfg.n_heads
        nkv = getattr(cfg, "n_key_value_heads", None) or nh
        mlp = not cfg.attn_only
        senders, receivers = [Node("embed")], []
        for L in range(nl):
            senders += [Node("head", L, h) for h in range(nh)] + ([Node("mlp", L)] if mlp else [])
            receivers += [Node("head", L, h, s) for s in QKV for h in range(nh if s == "q" else nkv)]
            receivers += [Node("mlp", L)] if mlp else []
        receivers.append(Node("logits", nl))
        edges = tuple((i, j) for j, r in enumerate(receivers) for i, s in enumerate(senders) if _feeds(s, r))
        return cls(nl, nh, nkv, mlp, tuple(senders), tuple(receivers), edges)

    def layer_receivers(self, L: int, kind: str) -> list[int]:
        """Receiver indices of layer ``L`` of ``kind`` (``head``: q heads, k heads, v heads in that order)."""
        return [j for j, r in enumerate(self.receivers) if r.layer == L and r.kind == kind]

    def label(self, e: tuple[int, int]) -> str:
        """``"sender->receiver"`` of an edge, e.g. ``"embed->L1H2.q"``."""
        return f"{self.senders[e[0]].label}->{self.receivers[e[1]].label}"


def _feeds(s: Node, r: Node) -> bool:
    if s.kind == "embed" or r.kind == "logits":
        return True
    return r.layer > s.layer or (r.layer == s.layer and s.kind == "head" and r.kind == "mlp")


def _stage(r: Node, n_layers: int) -> int:
    """The layer at which a receiver reads (logits: ``n_layers``)."""
    return n_layers if r.kind == "logits" else r.layer


# ---------------------------------------------------------------------------- the forward


@dataclass(frozen=True)
class HeadWeights:
    """Per-head projections of one layer: ``W [head, d_head, d_model]``, ``b [head, d_head]`` (None: no bias)."""

    W: dict[str, Tensor]
    b: dict[str, Tensor | None]
    W_O: Tensor  # [head, d_head, d_model]


def _linear(mod) -> tuple[Tensor, Tensor | None]:
    """``(weight [out, in], bias)`` of a ``torch.nn.Linear`` or a Hugging Face ``Conv1D`` (``x @ W + b``), detached."""
    if isinstance(mod, torch.nn.Linear):
        return mod.weight.detach(), (mod.bias.detach() if mod.bias is not None else None)
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    if isinstance(mod, Conv1D):
        return mod.weight.detach().T, (mod.bias.detach() if mod.bias is not None else None)
    raise ProbekitError(f"edge attribution needs linear q/k/v/o projections; found {type(mod).__name__}")


def head_weights(nat: F.Native) -> list[HeadWeights]:
    """The per-head q/k/v/o weights of every layer of a native model, detached (see `HeadWeights`)."""
    out = []
    for layer in nat.layers:
        a = layer.attn
        W, b = {}, {}
        for s, mod, n in (("q", a.q, a.n_heads), ("k", a.k, a.n_kv), ("v", a.v, a.n_kv)):
            w, bias = _linear(mod)
            W[s] = w.reshape(n, a.d_head, -1)
            b[s] = bias.reshape(n, a.d_head) if bias is not None else None
        W_O = _linear(a.o)[0].T.reshape(a.n_heads, a.d_head, -1)
        out.append(HeadWeights(W, b, W_O))
    return out


class Receive:
    """What each receiver reads; this one changes nothing. ``outs``: the sender outputs computed so far."""

    def attn(self, L: int, x: Tensor, outs: list[Tensor]) -> dict[str, Tensor]:
        """Per-head inputs ``{site: [rows, pos, head, d_model]}`` for the sites that differ from ``x``."""
        return {}

    needs_outs = True  # whether `mlp` / `logits` read ``outs``

    def edits(self, L: int, site: str) -> bool:
        """Whether `project` may change ``site`` of layer ``L`` (if not, rows that share an input share it)."""
        return True

    def project(self, L: int, site: str, t: Tensor, x: Tensor, at, layer: F.Layer, w: HeadWeights) -> Tensor:
        """The projected q/k/v ``t [rows, at, head, d_head]``, a tensor of its own (it may be edited in place);
        ``x``: the residual read, at all positions (one row group's rows when the groups share it)."""
        return t

    def mlp(self, L: int, mid: Tensor, outs: list[Tensor], at: Tensor) -> Tensor:
        """The MLP's input; ``mid``, ``outs`` are at positions ``at`` (the read positions in the last layer)."""
        return mid

    def logits(self, final: Tensor, outs: list[Tensor], at: Tensor) -> Tensor:
        """The final residual read by the unembedding, at the read positions ``at``."""
        return final

    def normed(self, L: int, site: str, h: Tensor, at) -> Tensor:
        """A receiver input after its normalization (``ln1`` of the per-head inputs of `attn` (``site`` q/k/v,
        ``h [rows, at, head, d_model]``), ``ln2`` of `mlp`'s, ``ln_final`` of `logits`' (L = n_layers))."""
        return h


@dataclass
class Run:
    """Logits at the read positions, the sender outputs (``[rows, pos, d_model]`` each, graph order; the last
    layer's are zero outside the read positions) and the residual entering each layer (the last entry: the
    final residual, at the read positions only)."""

    logits: Tensor
    outs: list[Tensor]
    resid: list[Tensor]


def head_input(layer: F.Layer, w: HeadWeights, site: str, r: Tensor, head: int | slice = slice(None)) -> Tensor:
    """q, k or v of ``head`` (all heads: ``r [..., head, d_model]``) from its receiver input ``r`` (before ln1)."""
    return _project(w, site, layer.ln1(r), head)


def _project(w: HeadWeights, site: str, h: Tensor, head: int | slice = slice(None)) -> Tensor:
    """q, k or v of ``head`` from the normalized input ``h [..., (head,) d_model]``."""
    t = torch.einsum("...m,...dm->...d", h, w.W[site][head])
    return t + w.b[site][head] if w.b[site] is not None else t


def _qkv(layer: F.Layer, w: HeadWeights, x: Tensor, R: dict[str, Tensor], qp: Tensor, recv: Receive,
         L: int, groups: int) -> list[Tensor]:
    """q (at positions ``qp``), k, v ``[rows, pos, head, d_head]``: from ``x``, or per head from ``R[site]``.

    ``groups`` > 1: ``x`` is shared by that many row groups; a site ``recv`` does not edit stays shared
    (``[rows / groups, ...]``), the others are repeated and edited."""
    a = layer.attn
    h = layer.ln1(x) if len(R) < 3 else None
    out = []
    for s, mod, n in (("q", a.q, a.n_heads), ("k", a.k, a.n_kv), ("v", a.v, a.n_kv)):
        at = qp if s == "q" else slice(None)
        t = F.heads(mod(h[:, at]), n, a.d_head) if s not in R else \
            _project(w, s, recv.normed(L, s, layer.ln1(R[s][:, at]), at))
        if groups > 1:
            t = t.repeat(groups, 1, 1, 1) if recv.edits(L, s) else t
        out.append(recv.project(L, s, t, x, at, layer, w) if t.shape[0] == groups * x.shape[0] else t)
    return out


def _attend(layer: F.Layer, w: HeadWeights, x: Tensor, R: dict[str, Tensor], pos: Tensor, qp: Tensor,
            recv: Receive, L: int, groups: int = 1) -> Tensor:
    """Head outputs z ``[rows, qp, head, d_head]`` of the queries at ``qp`` (rows: ``groups`` copies of x's)."""
    a = layer.attn
    n = x.shape[0]
    q, k, v = _qkv(layer, w, x, R, qp, recv, L, groups)

    def grouped(t: Tensor) -> Tensor:  # [groups or 1 (shared), n, ...]
        return t.view(-1, n, *t.shape[1:])

    qr = grouped(F.rope(a, q.transpose(1, 2), qp))
    kr = grouped(F.expand_kv(a, F.rope(a, k.transpose(1, 2), pos)))
    pattern = F.attention_pattern(a, torch.matmul(qr, kr.transpose(-2, -1)), qp, pos)
    z = torch.matmul(pattern, grouped(F.expand_kv(a, v.transpose(1, 2))))
    return z.expand(groups, *z.shape[1:]).reshape(groups * n, *z.shape[2:]).transpose(1, 2)


def run_graph(nat: F.Native, ws: list[HeadWeights], tokens: Int[Tensor, "rows pos"], read_pos: Tensor,
              recv: Receive | None = None, start: tuple[int, Tensor] | None = None,
              embed: Tensor | None = None, record: bool = True) -> Run:
    """The model's forward with every receiver input a separate tensor, given by ``recv``.

    The last layer's queries and MLP, and the logits, are computed at ``read_pos`` only; from there on
    the sender outputs (``Run.outs``) and the final residual are kept at ``read_pos`` only.
    ``start=(L, x, groups)``: begin at layer L with residual x (at ``read_pos`` when L is ``n_layers``)
    shared by ``groups`` row groups (for receivers that edit only through `Receive.project`, ``mlp`` and
    ``logits``; no sender outputs before L are kept); ``embed``: this embedding in place of the tokens';
    ``record=False``: no sender outputs in the returned run.
    """
    recv, nl = recv or Receive(), len(nat.layers)
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    groups = 1
    if start is None:
        L0, x = 0, F.embed(nat, tokens, pos) if embed is None else embed
    else:
        L0, x, groups = start
        if L0 == nl:
            x, groups = x.repeat(groups, 1, 1), 1
    outs, resid = ([x] if start is None else []), []
    kept, cur = list(outs), (read_pos if L0 == nl else pos)
    for L in range(L0, nl):
        layer, w = nat.layers[L], ws[L]
        resid.append(x)
        qp = read_pos if L == nl - 1 else pos
        z = _attend(layer, w, x, recv.attn(L, x, outs) if groups == 1 else {}, pos, qp, recv, L, groups)
        if L == nl - 1:  # from here on only the read positions
            outs, x, cur = [o[:, read_pos] for o in outs], x[:, read_pos], read_pos
        x, groups = (x.repeat(groups, 1, 1) if groups > 1 else x), 1
        keep_outs = record or recv.needs_outs  # else outs stays as it is: nothing reads it
        new = list(torch.einsum("bphd,hdm->bphm", z, w.W_O).unbind(2)) if keep_outs else []
        x = x + layer.attn.o(z.reshape(z.shape[0], z.shape[1], -1))  # as `probekit.forward` computes it
        if layer.mlp is not None:
            mo = layer.mlp(recv.normed(L, "mlp", layer.ln2(recv.mlp(L, x, outs + new, cur)), cur))
            new += [mo] if keep_outs else []
            x = x + mo
        outs += new
        if record:
            kept += [o if cur is pos else _at(o, read_pos, len(pos)) for o in new]
    resid.append(x)
    return Run(nat.unembed(recv.normed(nl, "logits", nat.ln_final(recv.logits(x, outs, cur)), cur)), kept, resid)


def _at(o: Tensor, where: Tensor, T: int) -> Tensor:
    """``o [rows, len(where), d]`` placed at positions ``where`` of zeros ``[rows, T, d]``."""
    full = o.new_zeros(o.shape[0], T, o.shape[2])
    full[:, where] = o
    return full


# ---------------------------------------------------------------------------- receivers that edit


def _node(t: Tensor) -> Tensor:
    """A copy of ``t`` that autograd differentiates with respect to."""
    c = t.clone()
    return c if c.requires_grad else c.requires_grad_()


class _Grad(Receive):
    """Every receiver input its own tensor, kept for autograd: ``inputs[j]`` (before the receiver's norm) and,
    with ``norm="exact"``, ``normed_inputs[j]`` (after it), each ``(tensor, head or None, positions or None)``;
    ``groups[(stage, kind)]``: the input before the norm that a group of receivers shares, and its positions."""

    def __init__(self, g: Graph, norm: str = "linear"):
        self.g, self.norm = g, norm
        self.inputs, self.normed_inputs = [None] * len(g.receivers), [None] * len(g.receivers)
        self.groups: dict[tuple[int, str], tuple[Tensor, Tensor | None]] = {}

    def attn(self, L, x, outs):
        R, js = {}, self.g.layer_receivers(L, "head")
        for s in QKV:
            n = self.g.n_heads if s == "q" else self.g.n_kv
            R[s] = _node(x[:, :, None].expand(-1, -1, n, -1))
            for j in js:
                if self.g.receivers[j].site == s:
                    self.inputs[j] = (R[s], self.g.receivers[j].head, None)
        self.groups[(L, "head")] = (x.detach(), None)
        return R

    def mlp(self, L, mid, outs, at):
        r = _node(mid)
        self.inputs[self.g.layer_receivers(L, "mlp")[0]] = (r, None, at)
        self.groups[(L, "mlp")] = (mid.detach(), at)
        return r

    def logits(self, final, outs, at):
        r = _node(final)
        self.inputs[-1] = (r, None, at)
        self.groups[(self.g.n_layers, "logits")] = (final.detach(), at)
        return r

    def normed(self, L, site, h, at):
        if self.norm != "exact":
            return h
        t = _node(h)
        for j, r in enumerate(self.g.receivers):
            if r.kind == "head" and (r.layer, r.site) == (L, site):
                self.normed_inputs[j] = (t, r.head, at)
            elif r.kind == site and _stage(r, self.g.n_layers) == L:
                self.normed_inputs[j] = (t, None, at)
        return t

    def tensors(self, which: list) -> list[Tensor]:
        seen = {}
        for t, _, _ in which:
            seen[id(t)] = t
        return list(seen.values())


class _EdgePatch(Receive):
    """K edges as K row groups: group k adds sender s's ``delta[s]`` to receiver j's input only."""

    def __init__(self, g: Graph, edges: list[tuple[int, int]], delta: Tensor, n: int):
        self.g, self.edges, self.delta, self.n = g, edges, delta, n

    def _add(self, R: Tensor, k: int, s: int, head: int | None, at=slice(None)) -> None:
        rows = slice(k * self.n, (k + 1) * self.n)
        if head is None:
            R[rows] += self.delta[s][:, at]
        else:
            R[rows, :, head] += self.delta[s][:, at]

    needs_outs = False

    def edits(self, L, site):
        return any(self.g.receivers[j].kind == "head" and (self.g.receivers[j].layer, self.g.receivers[j].site) == (L, site)
                   for _, j in self.edges)

    def project(self, L, site, t, x, at, layer, w):
        """Recompute only the receiving head of each edge's row group, from its input plus the delta."""
        hits = [(k, s, self.g.receivers[j].head) for k, (s, j) in enumerate(self.edges)
                if self.g.receivers[j] == Node("head", L, self.g.receivers[j].head, site)]
        if not hits:
            return t
        for k, s, head in hits:
            rows = slice(k * self.n, (k + 1) * self.n)
            xk = x if x.shape[0] == self.n else x[rows]
            t[rows, :, head] = head_input(layer, w, site, xk[:, at] + self.delta[s][:, at], head)
        return t

    def mlp(self, L, mid, outs, at):
        hits = [(k, s) for k, (s, j) in enumerate(self.edges) if self.g.receivers[j] == Node("mlp", L)]
        if not hits:
            return mid
        mid = mid.clone()
        for k, s in hits:
            self._add(mid, k, s, None, at)
        return mid

    def logits(self, final, outs, at):
        hits = [(k, s) for k, (s, j) in enumerate(self.edges) if self.g.receivers[j].kind == "logits"]
        if not hits:
            return final
        final = final.clone()
        for k, s in hits:
            self._add(final, k, s, None, at)
        return final


class _Ablate(Receive):
    """K circuits as K row groups: ``ablated[k, s, j]`` True replaces sender s's output in receiver j's
    input (group k) by ``abl[s]``: the input becomes ``x - (out_s - abl_s)``."""

    def __init__(self, g: Graph, ablated: Tensor, abl: Tensor, n: int):
        self.g, self.ablated, self.abl, self.n = g, ablated.to(abl.dtype), abl, n
        self.K = ablated.shape[0]

    def _minus(self, x: Tensor, outs: list[Tensor], js: list[int], at=None) -> Tensor:
        """``x[:, :, None] - sum_s ablated[k, s, j] (out_s - abl_s)`` for receivers ``js``: [rows, pos, len(js), d];
        ``x`` and ``outs`` at positions ``at`` (None: all)."""
        S = len(outs)
        D = torch.stack(outs)  # [S, K*N, pos, d]
        abl = self.abl[:S]
        if at is not None and len(at) != abl.shape[2]:
            abl = abl[:, :, at]
        D = D.view(S, self.K, self.n, *D.shape[2:]) - abl[:, None]
        E = torch.einsum("sknpd,ksj->knpjd", D, self.ablated[:, :S][:, :, js])
        return x[:, :, None] - E.reshape(self.K * self.n, *E.shape[2:])

    def attn(self, L, x, outs):
        js = self.g.layer_receivers(L, "head")
        R = self._minus(x, outs, js)
        nh, nkv = self.g.n_heads, self.g.n_kv
        return {"q": R[:, :, :nh], "k": R[:, :, nh:nh + nkv], "v": R[:, :, nh + nkv:]}

    def mlp(self, L, mid, outs, at):
        return self._minus(mid, outs, self.g.layer_receivers(L, "mlp"), at)[:, :, 0]

    def logits(self, final, outs, at):
        return self._minus(final, outs, [len(self.g.receivers) - 1], at)[:, :, 0]


# ---------------------------------------------------------------------------- binding a model and a pair


@dataclass
class Setup:
    """A model and a pair bound together: native modules, the graph, the metric, the base and source batches."""

    nat: F.Native
    ws: list[HeadWeights]
    graph: Graph
    bm: BoundMetric
    base: Tensor
    src: Tensor
    read: Tensor
    direction: str

    def value(self, logits: Tensor, groups: int = 1) -> Tensor:
        """Per-row-group batch mean of the metric ``[groups]`` (logits ``[groups * N, answer, d_vocab]``)."""
        return self.values(logits, groups).mean(1)

    def values(self, logits: Tensor, groups: int = 1) -> Tensor:
        """The metric per row group and example ``[groups, N]``."""
        N = self.base.shape[0]
        rows = torch.arange(N, device=logits.device).repeat(groups)
        lg = logits if logits.dtype == torch.float64 else logits.float()
        return self.bm.reduce(self.bm.per_step(lg, rows)).view(groups, N)


def setup(model, pair: CorruptedPair, metric: Metric | str = "logit-diff", direction: str = "noise",
          gradient: bool = True) -> Setup:
    """Validate and bind; ``gradient``: the metric must be differentiable (`probekit.metrics.GRADIENT_METRICS`)."""
    if not F.supports_native(model):
        raise ProbekitError("edge attribution needs a TL-native or Hugging Face GPT-2 TransformerBridge; "
                            f"got {type(getattr(model, 'original_model', model)).__name__}")
    if direction not in ("denoise", "noise"):
        raise ProbekitError(f"unknown direction {direction!r}; expected 'denoise' or 'noise'")
    if not isinstance(pair, CorruptedPair):
        raise ProbekitError(f"expected a CorruptedPair, got {type(pair).__name__}")
    pair.check()
    kind = metric if isinstance(metric, str) else metric.kind
    if gradient:
        check_metric(kind, GRADIENT_METRICS, "gradient metric")
    T = pair.clean.seq_len
    if T > model.cfg.n_ctx:
        raise ProbekitError(f"sequences have {T} tokens but the model's n_ctx is {model.cfg.n_ctx}")
    if int(pair.clean.tokens.max()) >= model.cfg.d_vocab or int(pair.corrupted.tokens.max()) >= model.cfg.d_vocab:
        raise ProbekitError(f"tokens go beyond the model's d_vocab {model.cfg.d_vocab}")
    bm = BoundMetric.bind(metric, pair)
    dev = next(model.parameters()).device
    nat = F.native(model)
    base, src = (pair.clean, pair.corrupted) if direction == "noise" else (pair.corrupted, pair.clean)
    return Setup(nat, head_weights(nat), Graph.of(model), bm, base.tokens.to(dev), src.tokens.to(dev),
                 bm.read_pos.to(dev), direction)


def _scores(g: Graph, delta: Tensor, grads: Tensor) -> Tensor:
    """``delta [sender, N, pos, d]`` . ``grads [receiver, N, pos, d]`` for every edge -> ``[edge]``."""
    full = torch.einsum("snpd,jnpd->sj", delta.double(), grads.double())
    s, j = torch.tensor(g.edges).T
    return full[s, j].to(delta.dtype)


def _gradients(st: Setup, embed: Tensor | None = None, norm: str = "linear") -> tuple[Run, Tensor, dict]:
    """One forward (base tokens, or ``embed``) and one backward: the run, ``dM/d(input) [receiver, N, pos, d]``
    (``norm="exact"``: the input after the receiver's norm) and the receivers' shared inputs (`_Grad.groups`)."""
    rec = _Grad(st.graph, norm)
    with torch.enable_grad():
        run = run_graph(st.nat, st.ws, st.base, st.read, rec, embed=embed)
        m = st.value(run.logits)[0]
        which = rec.normed_inputs if norm == "exact" else rec.inputs
        ts = rec.tensors(which)
        gs = dict(zip([id(t) for t in ts], torch.autograd.grad(m, ts), strict=True))
    N, T = st.base.shape
    out = run.resid[0].new_zeros(len(st.graph.receivers), N, T, run.resid[0].shape[-1])
    for j, (t, head, at) in enumerate(which):
        gj = gs[id(t)] if head is None else gs[id(t)][:, :, head]
        out[j][:, slice(None) if at is None else at] = gj
    run = Run(run.logits.detach(), [o.detach() for o in run.outs], [r.detach() for r in run.resid])
    return run, out, rec.groups


def _normed_scores(st: Setup, delta: Tensor, groups: dict, grads: Tensor) -> Tensor:
    """``(norm(x + delta[s]) - norm(x)) . grads[r]`` for every edge -> ``[edge]``: ``x`` the base run's input of
    receiver r (before its norm: ``ln1``, ``ln2`` or ``ln_final``), ``grads`` taken after the norm."""
    g = st.graph
    out = torch.zeros(len(g.edges), dtype=torch.float64)
    for (L, kind), (x, at) in groups.items():
        norm = st.nat.ln_final if kind == "logits" else st.nat.layers[L].ln1 if kind == "head" else st.nat.layers[L].ln2
        js = [j for j, r in enumerate(g.receivers) if r.kind == kind and _stage(r, g.n_layers) == L]
        idx = [i for i, (_, j) in enumerate(g.edges) if j in js]
        ss = sorted({g.edges[i][0] for i in idx})
        at = slice(None) if at is None or len(at) == delta.shape[2] else at
        d = delta[ss][:, :, at]
        dh = norm(x[None] + d) - norm(x)[None]  # [sender, N, pos, d]
        full = torch.einsum("snpd,jnpd->sj", dh.double(), grads[js][:, :, at].double())
        out[idx] = full[[ss.index(g.edges[i][0]) for i in idx], [js.index(g.edges[i][1]) for i in idx]]
    return out.to(delta.dtype)


def eap(st: Setup, method: str = "eap", steps: int = 10, norm: str = "exact", src: Run | None = None
        ) -> tuple[Tensor, Run, Run]:
    """EAP (or EAP-IG with ``steps``) scores ``[edge]``, the base run and the source run.

    ``norm="exact"``: each receiver's own norm is applied to the sender's delta exactly and the gradient is
    taken after it; ``"linear"``: the gradient at the receiver's input, before its norm (Syed et al.; Hanna et al.).
    ``src``: the sender outputs whose deltas are scored (default: the run of the source tokens).
    """
    if method not in METHODS:
        raise ProbekitError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    if method == "eap-ig" and (not isinstance(steps, int) or steps < 1):
        raise ProbekitError(f"steps must be a positive integer, got {steps!r}")
    if norm not in NORMS:
        raise ProbekitError(f"unknown norm {norm!r}; expected one of {list(NORMS)}")
    base, grads, groups = _gradients(st, norm=norm)
    if src is None:
        with torch.no_grad():
            src = run_graph(st.nat, st.ws, st.src, st.read)
    if method == "eap-ig":
        e0, e1 = base.outs[0], src.outs[0]
        for k in range(1, steps):
            grads = grads + _gradients(st, embed=e0 + (k / steps) * (e1 - e0), norm=norm)[1]
        grads = grads / steps
    delta = torch.stack(src.outs) - torch.stack(base.outs)
    with torch.no_grad():
        scores = _normed_scores(st, delta, groups, grads) if norm == "exact" else _scores(st.graph, delta, grads)
    return scores, base, src


# ---------------------------------------------------------------------------- exact edge patching


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def exact_edges(st: Setup, base: Run, src: Run, edges: Sequence[int] | None = None, max_batch: int = 1024) -> Tensor:
    """The exact effect ``m(patched) - m(base)`` of each edge (indices into ``st.graph.edges``; default all).

    K = max_batch // N edges per pass, all reaching the same layer; each pass starts there from the base run.
    Row groups share every projection, key and value their edges do not change.
    """
    g, N = st.graph, st.base.shape[0]
    idx = list(range(len(g.edges))) if edges is None else [int(e) for e in edges]
    delta = torch.stack(src.outs) - torch.stack(base.outs)
    m_base = st.value(base.logits)[0]
    stage = {i: _stage(g.receivers[g.edges[i][1]], g.n_layers) for i in idx}
    out = torch.full((len(g.edges),), float("nan"), dtype=delta.dtype)
    by_stage: dict[tuple[int, bool], list[int]] = {}  # MLP receivers apart: their passes share the attention
    for i in sorted(idx, key=lambda i: g.edges[i][1]):
        by_stage.setdefault((stage[i], g.receivers[g.edges[i][1]].kind == "mlp"), []).append(i)
    for chunk in [c for L in sorted(by_stage) for c in _chunks(by_stage[L], max(1, max_batch // N))]:
        K, L0 = len(chunk), stage[chunk[0]]
        recv = _EdgePatch(g, [g.edges[i] for i in chunk], delta, N)
        run = run_graph(st.nat, st.ws, st.base, st.read, recv, start=(L0, base.resid[L0], K), record=False)
        out[chunk] = (st.value(run.logits, K) - m_base).cpu()
    return out if edges is None else out[idx]


# ---------------------------------------------------------------------------- faithfulness


@dataclass
class Faithfulness:
    """Faithfulness of the top-n circuits: ``values[i]`` for ``n_edges[i]``; ``smallest``: the fewest edges
    keeping ``threshold`` (None if no evaluated circuit does), ``circuit`` its edges."""

    n_edges: list[int]
    values: list[float]
    m_clean: float
    m_ablated: float
    ablation: str
    threshold: float
    smallest: int | None
    circuit: list[str]


def _ablation_values(clean: Run, corrupted: Run, ablation: str) -> Tensor:
    """What an ablated sender's output is replaced by, ``[sender, N, pos, d_model]``."""
    if ablation not in ABLATIONS:
        raise ProbekitError(f"unknown ablation {ablation!r}; expected one of {list(ABLATIONS)}")
    if ablation == "resample":
        return torch.stack(corrupted.outs)
    c = torch.stack(clean.outs)
    return c.mean(1, keepdim=True).expand_as(c)


@torch.no_grad()
def circuit_values(st: Setup, clean_tokens: Tensor, keeps: list[Tensor], abl: Tensor, max_batch: int = 512,
                   per_example: bool = False) -> Tensor:
    """The metric ``[len(keeps)]`` of circuits on the clean run: ``keeps[i]`` a bool ``[edge]`` of kept edges
    (``per_example``: ``[len(keeps), N]``, each example's metric)."""
    g, N = st.graph, clean_tokens.shape[0]
    s_idx, j_idx = torch.tensor(g.edges, device=abl.device).T
    out = []
    for chunk in _chunks(keeps, max(1, max_batch // N)):
        ablated = torch.zeros(len(chunk), len(g.senders), len(g.receivers), dtype=torch.bool, device=abl.device)
        for k, keep in enumerate(chunk):
            ablated[k, s_idx, j_idx] = ~keep.to(abl.device)
        run = run_graph(st.nat, st.ws, clean_tokens.repeat(len(chunk), 1), st.read, _Ablate(g, ablated, abl, N),
                        record=False)
        out.append((st.values if per_example else st.value)(run.logits, len(chunk)).cpu())
    if not out:
        return torch.zeros((0, N) if per_example else (0,), dtype=torch.float64)
    return torch.cat(out).double()


def _grid(E: int, points: int = 24) -> list[int]:
    return sorted({0, E} | {min(E, round(math.exp(x))) for x in torch.linspace(0, math.log(max(E, 1)), points).tolist()})


def faithfulness(st: Setup, clean: Run, corrupted: Run, scores: Tensor, ablation: str = "mean",
                 threshold: float = 0.9, max_batch: int = 512, refine: int = 256) -> Faithfulness:
    """Faithfulness of the top-n edges by ``|scores|`` on a log grid of n, refined to every n below the first
    grid point that keeps ``threshold`` (at most ``refine`` more circuits)."""
    g = st.graph
    E = len(g.edges)
    order = torch.argsort(scores.abs().nan_to_num(-1.0), descending=True, stable=True)
    abl = _ablation_values(clean, corrupted, ablation)
    tokens = st.base if st.direction == "noise" else st.src

    def keep(n: int) -> Tensor:
        k = torch.zeros(E, dtype=torch.bool)
        k[order[:n]] = True
        return k

    vals: dict[int, float] = {}

    def evaluate(ns: list[int]) -> None:
        ns = [n for n in ns if n not in vals]
        for n, v in zip(ns, circuit_values(st, tokens, [keep(n) for n in ns], abl, max_batch).tolist(), strict=True):
            vals[n] = v

    evaluate(_grid(E))
    m_clean, m_abl = vals[E], vals[0]
    gap = m_clean - m_abl
    share = {n: (v - m_abl) / gap if abs(gap) > 1e-9 else float("nan") for n, v in vals.items()}
    hit = [n for n in sorted(share) if share[n] >= threshold]
    if hit:
        lower = max([n for n in share if n < hit[0]], default=0)
        evaluate(list(range(lower + 1, hit[0]))[:refine])
        share = {n: (v - m_abl) / gap for n, v in vals.items()}
        hit = [n for n in sorted(share) if share[n] >= threshold]
    smallest = hit[0] if hit else None
    ns = sorted(share)
    circuit = [g.label(g.edges[int(i)]) for i in order[:smallest]] if smallest is not None else []
    return Faithfulness(ns, [share[n] for n in ns], m_clean, m_abl, ablation, threshold, smallest, circuit)


# ---------------------------------------------------------------------------- the report


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two score vectors (NaN entries of either dropped)."""
    from scipy.stats import spearmanr

    ok = ~(torch.isnan(a) | torch.isnan(b))
    if int(ok.sum()) < 3:
        return float("nan")
    return float(spearmanr(a[ok].double().numpy(), b[ok].double().numpy()).statistic)


@dataclass
class EdgeReport:
    """Edge scores of one model and pair: ``scores [edge]`` (EAP or EAP-IG), ``exact [edge]`` (None if not
    computed), their Spearman correlations (signed and of ``|score|``), the faithfulness curve, the settings."""

    senders: list[str]
    receivers: list[str]
    edges: list[tuple[int, int]]
    scores: Tensor
    exact: Tensor | None = None
    spearman: float | None = None
    spearman_abs: float | None = None
    faithfulness: Faithfulness | None = None
    settings: dict = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """``"sender->receiver"`` of every edge, in the order of ``edges``."""
        return [f"{self.senders[s]}->{self.receivers[j]}" for s, j in self.edges]

    def matrix(self, which: str = "scores") -> Tensor:
        """``[sender, receiver]`` of the scores (or ``exact``), NaN where there is no edge."""
        v = self.scores if which == "scores" else self.exact
        m = torch.full((len(self.senders), len(self.receivers)), float("nan"))
        s, j = torch.tensor(self.edges).T
        m[s, j] = v.float()
        return m

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` edges of largest ``|score|`` as ``(label, score)``, largest first."""
        order = torch.argsort(self.scores.abs(), descending=True, stable=True)[:k]
        return [(self.labels[i], float(self.scores[i])) for i in order.tolist()]

    def to_result(self):
        """The scores as a `probekit.results.Result` with axis ``edge`` (``extra['exact']`` when computed)."""
        from probekit.results import Result

        extra = {"exact": self.exact} if self.exact is not None else {}
        return Result("edge_scores", self.scores, ("edge",), {"edge": self.labels}, self.settings, extra)

    def to_frame(self):
        """One row per edge: ``edge``, ``sender``, ``receiver``, ``score``, ``exact`` (when computed), ``rank``
        (1 = largest ``|score|``)."""
        import pandas as pd

        data = {"edge": self.labels, "sender": [self.senders[s] for s, _ in self.edges],
                "receiver": [self.receivers[j] for _, j in self.edges], "score": self.scores.tolist()}
        if self.exact is not None:
            data["exact"] = self.exact.tolist()
        rank = torch.empty(len(self.edges), dtype=torch.long)
        rank[torch.argsort(self.scores.abs(), descending=True, stable=True)] = torch.arange(len(self.edges))
        data["rank"] = (rank + 1).tolist()
        return pd.DataFrame(data)

    def to_dict(self) -> dict:
        """Plain lists and numbers (the faithfulness curve as a dict), as written by `to_json`."""
        return {"kind": "edge_report", "senders": self.senders, "receivers": self.receivers,
                "edges": [list(e) for e in self.edges], "scores": self.scores.tolist(),
                "exact": self.exact.tolist() if self.exact is not None else None, "spearman": self.spearman,
                "spearman_abs": self.spearman_abs,
                "faithfulness": vars(self.faithfulness) if self.faithfulness is not None else None,
                "settings": self.settings}

    def to_json(self, path: str | Path | None = None) -> str:
        """Strict JSON (NaN as null, see `probekit.io`); with ``path``, also written there atomically."""
        from probekit.io import json_text

        return json_text(self.to_dict(), path)

    @classmethod
    def from_json(cls, s: str | Path) -> EdgeReport:
        """A report from `to_json`'s text or a path to it; anything else is a `ProbekitError`."""
        from probekit.results import _tensor

        try:
            d = json.loads(Path(s).read_text() if isinstance(s, Path) else s)
            if d.get("kind") != "edge_report":
                raise KeyError("kind")
            f = d.get("faithfulness")
            return cls(d["senders"], d["receivers"], [tuple(e) for e in d["edges"]], _tensor(d["scores"], torch.float32),
                       _tensor(d["exact"], torch.float32) if d.get("exact") is not None else None,
                       d.get("spearman"), d.get("spearman_abs"), Faithfulness(**f) if f else None, d.get("settings", {}))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise ProbekitError(f"not a probekit edge report JSON ({type(e).__name__}: {e})") from None


def edge_report(model, pair: CorruptedPair, metric: Metric | str = "logit-diff", method: str = "eap", steps: int = 10,
                exact: bool = True, ablation: str | None = "mean", direction: str = "noise", threshold: float = 0.9,
                max_batch: int = 512, norm: str = "exact") -> EdgeReport:
    """EAP or EAP-IG scores for every edge (``norm``: see `eap`), their exact effects (``exact``), and the
    faithfulness curve of the top-n circuits (``ablation`` "mean" or "resample"; None: no curve). See the
    module docstring."""
    if ablation is not None and ablation not in ABLATIONS:
        raise ProbekitError(f"unknown ablation {ablation!r}; expected one of {list(ABLATIONS)} or None")
    if not 0 < float(threshold) <= 1:
        raise ProbekitError(f"threshold must be in (0, 1], got {threshold!r}")
    st = setup(model, pair, metric, direction)
    was = model.training
    model.eval()
    try:
        scores, base, src = eap(st, method, steps, norm)
        ex = exact_edges(st, base, src, max_batch=max_batch) if exact else None
        clean, corr = (base, src) if direction == "noise" else (src, base)
        faith = faithfulness(st, clean, corr, scores, ablation, threshold, max_batch) if ablation else None
    finally:
        model.train(was)
    g = st.graph
    settings = {"model": getattr(model, "probekit_name", None), "task": pair.clean.task, "n": pair.clean.n,
                "length": pair.clean.length, "corruption": pair.settings(), "metric": st.bm.metric.kind,
                "answer_steps": list(st.bm.metric.steps) if st.bm.metric.steps is not None else None,
                "method": method, "steps": steps if method == "eap-ig" else None, "norm": norm, "direction": direction,
                "ablation": ablation, "m_base": float(st.value(base.logits)[0]), "m_src": float(st.value(src.logits)[0])}
    return EdgeReport([n.label for n in g.senders], [n.label for n in g.receivers], list(g.edges), scores, ex,
                      spearman(scores, ex) if ex is not None else None,
                      spearman(scores.abs(), ex.abs()) if ex is not None else None, faith, settings)


def circuit_examples(model, pair: CorruptedPair, edges: Sequence[str], metric: Metric | str = "logit-diff",
                     ablation: str = "mean", complement: bool = False) -> Tensor:
    """Per example ``[3, N]``: the metric of the circuit (edges given by label, ``"embed->L1H2.q"``; ``complement``:
    every other edge), of the whole model and of every edge ablated, on the clean run. Their
    `probekit.stats.ratio_of_means` is the circuit's faithfulness; bootstrap it over examples for an interval."""
    st = setup(model, pair, metric, "noise", gradient=False)
    labels = [st.graph.label(e) for e in st.graph.edges]
    bad = [e for e in edges if e not in labels]
    if bad:
        raise ProbekitError(f"unknown edge(s) {bad[:3]}; expected labels like {labels[:2]}")
    keep = torch.tensor([lab in set(edges) for lab in labels]) ^ bool(complement)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            clean = run_graph(st.nat, st.ws, st.base, st.read)
            corr = run_graph(st.nat, st.ws, st.src, st.read)
        abl = _ablation_values(clean, corr, ablation)
        E = len(labels)
        return circuit_values(st, st.base, [keep, torch.ones(E, dtype=torch.bool), torch.zeros(E, dtype=torch.bool)],
                              abl, per_example=True)
    finally:
        model.train(was)


def circuit_faithfulness(model, pair: CorruptedPair, edges: Sequence[str], metric: Metric | str = "logit-diff",
                         ablation: str = "mean", complement: bool = False) -> float:
    """Faithfulness of one circuit given by edge labels (``"embed->L1H2.q"``); ``complement``: of every other edge."""
    from probekit.stats import ratio_of_means

    return ratio_of_means(circuit_examples(model, pair, edges, metric, ablation, complement).T.numpy())


# ---------------------------------------------------------------------------- figure


def plot_edges(report: EdgeReport, path: str | Path | None = None, title: str | None = None):
    """Faithfulness vs number of edges kept (log x, the threshold line) and the sender x receiver score map."""
    from probekit.viz import STYLE, _plt, save_figure

    if not isinstance(report, EdgeReport):
        raise ProbekitError(f"plot_edges needs an EdgeReport, got {type(report).__name__}")
    plt = _plt()
    with plt.rc_context(STYLE):
        fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 2.2]})
        f = report.faithfulness
        if f is not None:
            ns = [max(n, 0.8) for n in f.n_edges]  # n = 0 drawn just left of 1 on the log axis
            a0.plot(ns, f.values, marker=".", lw=1)
            a0.axhline(f.threshold, color="grey", ls="--", lw=0.8, label=f"{f.threshold:.0%} of the clean metric")
            if f.smallest is not None:
                a0.axvline(max(f.smallest, 0.8), color="C3", ls=":", lw=0.8, label=f"smallest: {f.smallest} edges")
            a0.set_xscale("log")
            a0.legend(loc="lower right")
        a0.set(xlabel="edges kept (top-n by |score|)", ylabel="faithfulness (share of clean - ablated metric)",
               title=f"faithfulness, {f.ablation} ablation" if f is not None else "no faithfulness curve")
        m = report.matrix()
        lim = float(m.nan_to_num(0).abs().max()) or 1.0
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.75")  # grey: no such edge
        im = a1.imshow(m.numpy(), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
        a1.set_yticks(range(len(report.senders)), report.senders)
        a1.set_xticks(range(len(report.receivers)), report.receivers, rotation=90)
        method = {"eap": "EAP", "eap-ig": "EAP-IG"}.get(report.settings.get("method"), "edge attribution")
        a1.set(xlabel="receiver", ylabel="sender", title=f"{method} score of each edge (grey: no edge)")
        fig.colorbar(im, ax=a1, label=f"score (change of {report.settings.get('metric', 'metric')})")
        fig.suptitle(title or f"Edges of {report.settings.get('model') or 'the model'}: faithfulness and edge scores")
    if path is not None:
        save_figure(fig, path)
    return fig


__all__ = ["ABLATIONS", "EdgeReport", "Faithfulness", "Graph", "METHODS", "NORMS", "Node", "Receive", "Run", "Setup",
           "circuit_examples", "circuit_faithfulness", "circuit_values", "eap", "edge_report", "exact_edges", "faithfulness",
           "head_weights", "plot_edges", "run_graph", "setup", "spearman"]
