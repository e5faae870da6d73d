"""The instruments: `patch_values` (the metric for any list of patches), `sweep`, `patch`, `path_patch`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from probekit.corruptions import CorruptedPair
from probekit.forward import supports_native
from probekit.patching._metric import BoundMetric, Metric, position_labels
from probekit.patching.hooks import HookEngine
from probekit.patching.native import NativeEngine
from probekit.patching.sites import (
    HEAD_SITES,
    RECEIVERS,
    STAGE,
    Component,
    Direction,
    Patch,
    PathPatch,
    canonical_site,
)
from probekit.results import Result
from probekit.tasks import ProbekitError

# ---------------------------------------------------------------------------- the driver


def check_patch(model, p: Patch, T: int, attn_only: bool) -> None:
    """Refuse a patch at a layer, head or position the model or the batch does not have."""
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


def make_engine(model, engine: str) -> NativeEngine | HookEngine:
    if engine not in ("auto", "native", "hooks"):
        raise ProbekitError(f"unknown engine {engine!r}; expected 'auto', 'native' or 'hooks'")
    if engine == "native" and not supports_native(model):
        raise ProbekitError("engine 'native' needs a TL-native TransformerBridge (as built by probekit); use engine='hooks'")
    if engine == "hooks" or (engine == "auto" and not supports_native(model)):
        return HookEngine(model)
    return NativeEngine(model)


def stage_key(group: Sequence[Patch], n_layers: int):
    """Where a group's recomputation starts: ((layer, stage), position); equal keys can share a pass."""
    st, p0 = (n_layers, 0), 10**9
    for c in group:
        if isinstance(c, PathPatch):
            s = (n_layers, 0) if c.receiver == "logits" else (c.receiver_layer, 0)
            p = c.sender_pos or 0
        else:
            s, p = (c.layer, STAGE[c.site]), c.pos or 0
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


def _checked_groups(model, pair: CorruptedPair, patches, metric, direction, max_batch) -> tuple[list[list[Patch]], BoundMetric]:
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
    for g in groups:
        if not g:
            raise ProbekitError("an empty patch group; expected at least one component per patch")
        for c in g:
            if not isinstance(c, Component | PathPatch):
                raise ProbekitError(f"expected Component or PathPatch, got {type(c).__name__}")
            check_patch(model, c, T, bool(model.cfg.attn_only))
    return groups, bm


def _passes(groups: list[list[Patch]], n_layers: int, N: int, max_batch: int) -> tuple[int, list[tuple[int, list[int]]]]:
    """``(examples per pass, [(first example, patch indices)])``: patches that start at the same
    (layer, stage, position) share a pass, at most ``max_batch`` rows (patches x examples) each."""
    n_ex = min(N, max_batch)
    K = max(1, max_batch // n_ex)
    keys = [stage_key(g, n_layers) for g in groups]
    runs: list[list[int]] = []
    for i in sorted(range(len(groups)), key=lambda i: keys[i]):
        if runs and len(runs[-1]) < K and keys[runs[-1][0]] == keys[i]:
            runs[-1].append(i)
        else:
            runs.append([i])
    return n_ex, [(e, r) for e in range(0, N, n_ex) for r in runs]


def read_steps(bm: BoundMetric) -> tuple[BoundMetric, Tensor | None]:
    """``bm`` at the answer steps whose value can depend on the logits, and those steps (None: all).

    A logit-diff step where every example's clean and corrupted answers agree is 0 exactly (a logit
    minus itself), so its logits need not be computed; the other metrics read every step.
    """
    if bm.metric.kind != "logit-diff":
        return bm, None
    live = torch.nonzero((bm.correct != bm.wrong).any(0)).flatten()
    if len(live) == len(bm.read_pos):
        return bm, None
    return BoundMetric(bm.metric, bm.read_pos[live], bm.correct[:, live], bm.wrong[:, live]), live


class _Sums:
    """Running sums over examples: per patch (reduced, per step) and the two reference runs.

    ``live``: the answer steps that are computed (`read_steps`); the others are 0 exactly.
    """

    def __init__(self, n_patches: int, bm: BoundMetric):
        S = len(bm.read_pos)
        self.bm, (self.live, self.at) = bm, read_steps(bm)
        self.red = torch.zeros(n_patches, dtype=torch.float64)
        self.step = torch.zeros(n_patches, S, dtype=torch.float64)
        self.ref = torch.zeros(2, S + 1, dtype=torch.float64)  # base, src: per step + reduced

    def _per_step(self, logits: Tensor, rows: Tensor) -> Tensor:
        ps = self.live.per_step(logits, rows)
        if self.at is None:
            return ps
        full = ps.new_zeros(ps.shape[0], len(self.bm.read_pos))
        full[:, self.at.to(ps.device)] = ps
        return full

    def need(self, rows: Tensor) -> Tensor | None:
        """bool [rows, computed steps]: the logits the metric reads (a logit-diff step whose answers agree is 0)."""
        if self.live.metric.kind != "logit-diff":
            return None
        return (self.live.correct != self.live.wrong).to(rows.device)[rows]

    def add_reference(self, j: int, bm: BoundMetric, logits: Tensor, rows: Tensor) -> None:
        ps = self._per_step(logits, rows)
        self.ref[j, :-1] += ps.double().sum(0).cpu()
        self.ref[j, -1] += bm.reduce(ps).double().sum().cpu()

    def add_patches(self, idx: list[int], bm: BoundMetric, logits: Tensor, rows: Tensor) -> None:
        n, K = len(rows), len(idx)
        ps = self._per_step(logits, rows.repeat(K))  # [K*n, S]
        self.red[idx] += bm.reduce(ps).view(K, n).double().sum(1).cpu()
        self.step[idx] += ps.view(K, n, -1).double().sum(1).cpu()

    def values(self, N: int, direction: str) -> PatchValues:
        ref = self.ref / N
        c, r = (1, 0) if direction == "denoise" else (0, 1)
        return PatchValues(raw=(self.red / N).float(), raw_per_step=(self.step / N).float(), clean=float(ref[c, -1]),
                           corrupted=float(ref[r, -1]), clean_per_step=ref[c, :-1].float(),
                           corrupted_per_step=ref[r, :-1].float())


@torch.no_grad()
def patch_values(model, pair: CorruptedPair, patches: Sequence[Patch | Sequence[Patch]], metric: Metric | str = "logit-diff",
                 direction: Direction = "denoise", max_batch: int = 1024, engine: str = "auto",
                 progress: bool = False, device=None) -> PatchValues:
    """The metric for each patch (a component, a path, or a list patched together), batched and chunked.

    ``max_batch`` caps the rows of one forward pass; n larger than it is split over examples.
    """
    groups, bm = _checked_groups(model, pair, patches, metric, direction, max_batch)
    dev = next(model.parameters()).device
    if device is not None and torch.device(device).type != dev.type:
        raise ProbekitError(f"the model is on {dev} but device={device!r}; move the model first (probekit.model.to_device)")
    eng = make_engine(model, engine)
    base_b, src_b = (pair.corrupted, pair.clean) if direction == "denoise" else (pair.clean, pair.corrupted)
    sums = _Sums(len(groups), bm)
    read = sums.live.read_pos.to(dev)
    W_O = [b.attn.W_O.detach() for b in model.blocks] if any(isinstance(c, PathPatch) for g in groups for c in g) else None
    N = pair.clean.n
    n_ex, chunks = _passes(groups, model.cfg.n_layers, N, max_batch)
    was_training = model.training
    if was_training:  # (setting the mode walks every module: only when it changes)
        model.eval()
    bar = _bar(progress, len(chunks))
    try:
        cur = None
        for e, idx in chunks:
            if cur != e:  # a new slice of examples: its two reference runs
                rows = torch.arange(e, min(e + n_ex, N), device=dev)
                tb, ts = base_b.tokens[rows.cpu()].to(dev), src_b.tokens[rows.cpu()].to(dev)
                base, src = eng.run(tb, read), eng.run(ts, read)
                sums.add_reference(0, bm, base.logits, rows)
                sums.add_reference(1, bm, src.logits, rows)
                cur = e
            kw = {"need": sums.need(rows)} if isinstance(eng, NativeEngine) else {}
            logits = eng.run_patched(base, src, [groups[i] for i in idx], read, W_O, tokens=tb, **kw)
            sums.add_patches(idx, bm, logits, rows)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()
    return sums.values(N, direction)


@dataclass
class PatchExamples:
    """The metric of each patch *per example* ``[patch, batch]`` and of the two reference runs ``[batch]``:
    what a bootstrap over examples resamples (`PatchValues` holds the batch means)."""

    raw: Float[Tensor, "patch batch"]
    clean: Float[Tensor, " batch"]
    corrupted: Float[Tensor, " batch"]

    def restoration(self, rows=None) -> Tensor:
        """``(mean(raw) - mean(corrupted)) / (mean(clean) - mean(corrupted))`` per patch over ``rows`` (all by
        default): the normalised effect of `patch_values`, from batch means."""
        rows = slice(None) if rows is None else rows
        c, x = self.clean[rows].mean(), self.corrupted[rows].mean()
        return (self.raw[:, rows].mean(1) - x) / (c - x)


@torch.no_grad()
def patch_examples(model, pair: CorruptedPair, patches: Sequence[Patch | Sequence[Patch]],
                   metric: Metric | str = "logit-diff", direction: Direction = "denoise", max_batch: int = 1024,
                   engine: str = "auto", device=None) -> PatchExamples:
    """`patch_values` per example: the metric of each patch on every example, for intervals over examples.

    The same engines and checks as `patch_values`; its batch means are the means of these values.
    """
    groups, bm = _checked_groups(model, pair, patches, metric, direction, max_batch)
    dev = next(model.parameters()).device
    if device is not None and torch.device(device).type != dev.type:
        raise ProbekitError(f"the model is on {dev} but device={device!r}; move the model first (probekit.model.to_device)")
    eng = make_engine(model, engine)
    base_b, src_b = (pair.corrupted, pair.clean) if direction == "denoise" else (pair.clean, pair.corrupted)
    read, N = bm.read_pos.to(dev), pair.clean.n
    W_O = [b.attn.W_O.detach() for b in model.blocks] if any(isinstance(c, PathPatch) for g in groups for c in g) else None
    raw, ref = torch.zeros(len(groups), N, dtype=torch.float64), torch.zeros(2, N, dtype=torch.float64)
    n_ex, chunks = _passes(groups, model.cfg.n_layers, N, max_batch)
    was_training = model.training
    model.eval()
    try:
        cur = None
        for e, idx in chunks:
            rows = torch.arange(e, min(e + n_ex, N), device=dev)
            if cur != e:
                tb, ts = base_b.tokens[rows.cpu()].to(dev), src_b.tokens[rows.cpu()].to(dev)
                base, src = eng.run(tb, read), eng.run(ts, read)
                for j, run in enumerate((base, src)):
                    ref[j, rows.cpu()] = bm.reduce(bm.per_step(run.logits.float(), rows)).double().cpu()
                cur = e
            logits = eng.run_patched(base, src, [groups[i] for i in idx], read, W_O, tokens=tb)
            vals = bm.reduce(bm.per_step(logits.float(), rows.repeat(len(idx)))).view(len(idx), -1)
            raw[torch.tensor(idx)[:, None], rows.cpu()[None]] = vals.double().cpu()
    finally:
        model.train(was_training)
    c, x = (1, 0) if direction == "denoise" else (0, 1)
    return PatchExamples(raw.float(), ref[c].float(), ref[x].float())


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="patching", unit="pass")


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


def _sweep_components(model, pair, site, by_pos, layers, heads, positions):
    """The grid of a sweep: (components, axes, shape, labels, chosen layers/heads/positions)."""
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
    shape = [len(Ls)] + ([len(Ps)] if by_pos else []) + ([len(Hs)] if is_head else [])
    labels = {"layer": list(Ls)}
    if by_pos:
        pl = position_labels(pair.clean)
        labels["pos"] = [pl[p] for p in Ps]
    if is_head:
        labels["head"] = list(Hs)
    return comps, axes, shape, labels, dict(layers=Ls, heads=Hs, positions=Ps)


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
    comps, axes, shape, labels, chosen = _sweep_components(model, pair, site, by_pos, layers, heads, positions)
    pv = patch_values(model, pair, comps, metric=metric, direction=direction, max_batch=max_batch, engine=engine,
                      progress=progress, device=device)
    bound = BoundMetric.bind(metric, pair)
    bm = bound.metric
    kind = f"patch_{site}" + ("_by_pos" if by_pos else "")
    if not per_step:
        return Result(kind=kind, values=_values(pv, normalize).view(shape), axes=tuple(axes), labels=labels,
                      settings=_settings(model, pair, bm, direction, normalize, pv, site=site, by_pos=by_pos, **chosen),
                      extra={"raw": pv.raw.view(shape)})
    if bm.kind == "exact-match":
        raise ProbekitError("per_step needs a per-step metric (logit-diff, prob or acc), got 'exact-match'")
    raw = pv.raw_per_step.view(shape + [len(bound.read_pos)])
    gap = pv.clean_per_step - pv.corrupted_per_step
    vals = (raw - pv.corrupted_per_step) / torch.where(gap.abs() < 1e-6, torch.nan, gap) if normalize else raw
    pl = position_labels(pair.clean)
    labels["answer"] = [pl[int(t) + 1] for t in bound.read_pos]
    return Result(kind=kind + "_per_step", values=vals, axes=tuple(axes) + ("answer",), labels=labels,
                  settings=_settings(model, pair, bm, direction, normalize, pv, site=site, by_pos=by_pos, **chosen,
                                     clean_per_step=pv.clean_per_step.tolist(),
                                     corrupted_per_step=pv.corrupted_per_step.tolist()),
                  extra={"raw": raw})


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


def _path_grid(nl: int, nh: int, receiver: str, sender) -> list[tuple[PathPatch, tuple[int, ...]]]:
    """The path patches of a `path_patch` call and where each lands in the full result grid."""
    senders = [tuple(sender)] if sender is not None else [(L, h) for L in range(nl) for h in range(nh)]
    if receiver == "logits":
        return [(PathPatch(L, h, "logits"), (L, h)) for L, h in senders]
    out = [(PathPatch(sl, sh, receiver, rl, rh), (sl, sh, rl, rh))
           for sl, sh in senders for rl in range(sl + 1, nl) for rh in range(nh)]
    if not out:
        raise ProbekitError(f"sender layer {senders[0][0]} is the last layer; no later head can receive")
    return out


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
        check_patch(model, PathPatch(int(sender[0]), int(sender[1])), pair.clean.seq_len, False)
    grid = _path_grid(nl, nh, receiver, sender)
    pv = patch_values(model, pair, [p for p, _ in grid], metric=metric, direction=direction, max_batch=max_batch,
                      progress=progress, device=device, engine="native")
    full = torch.full((nl, nh) if receiver == "logits" else (nl, nh, nl, nh), float("nan"))
    raw = full.clone()
    for (_, at), v, r in zip(grid, _values(pv, normalize), pv.raw, strict=True):
        full[at], raw[at] = v, r
    if receiver != "logits" and sender is not None:
        full, raw = full[sender[0], sender[1]], raw[sender[0], sender[1]]
    axes = ("layer", "head") if full.ndim == 2 else ("sender_layer", "sender_head", "layer", "head")
    labels = {a: list(range(n)) for a, n in zip(axes, full.shape, strict=True)}
    bm = BoundMetric.bind(metric, pair).metric
    return Result(kind=f"path_patch_{receiver}", values=full, axes=axes, labels=labels,
                  settings=_settings(model, pair, bm, direction, normalize, pv, receiver=receiver,
                                     sender=list(sender) if sender is not None else None),
                  extra={"raw": raw})
