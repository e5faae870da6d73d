"""Interchange interventions and distributed alignment search (DAS): where a causal variable lives.

A probe says what is decodable; an interchange intervention says what the model *uses*. Run the model
on a base input, and at one location replace (part of) its activation by the activation the same
location has on a source input; if the model then answers as if the variable took the source's value,
the variable is represented there (Geiger et al. 2023, "Finding Alignments Between Interpretable
Causal Variables and Distributed Neural Representations"; pyvene implements the same idea).

    at = Where(digit_index=2)                       # the answer step: the position predicting digit 2
    pairs = counterfactual_pairs(task, 2000, 5, vary="carry_in", hold=["column_sum"], at=at,
                                 target=carry_counterfactual(at))
    fit = fit_das(model, pairs, Location("resid_mid", 0, at), k=4)
    fit.iia, fit.interval, fit.control, fit.ceiling, fit.floor
    res = sweep_pairs(model, pairs, positions=[at, Where(operand=0, place=1)], k=4)   # Result (layer, pos)
    plot_iia(res)

*Where* and *what* are separate values. A `Location` is a site (``resid_pre``, ``resid_mid``,
``resid_post``, ``attn_out``, ``mlp_out``, or any per-position hook of a block such as ``attn.hook_z``,
trailing dimensions flattened), a layer and a position rule: an int, one int per example, or a `Where`
(the one position per example where named features take given values, resolved on each batch). An
intervention maps ``(base, source)`` activations ``[row, d]`` to the new base activation:

- `Interchange`: the full vector, ``x_src`` (the ceiling);
- `SubspaceInterchange`: ``x_base + B^T (B x_src - B x_base)`` for a fixed orthonormal basis ``B``
  ``[k, d]`` (`random_subspace` draws the control);
- `RotatedSubspaceInterchange`: the same with ``B`` the first ``k`` rows of a learned orthogonal
  ``d x d`` rotation ``R`` (``torch.nn.utils.parametrizations.orthogonal``), which DAS fits.

Interventions run under ``model.hooks(...)``: nothing stays hooked after a call and the model is never
mutated (its parameters are frozen while a rotation is fitted and restored after). ``resid_mid`` has
HookedTransformer semantics (the MLP *and* the residual carry the new value; it is written through
``hook_attn_out``, as in `probekit.patching`).

A `CounterfactualPairs` holds base and source batches matched so that, at the answer step ``at``, the
``vary`` feature differs and the ``hold`` features are equal, plus the counterfactual answer token: the
answer the task's algorithm gives when the variable takes the source's value (a callable
``target(base, source) -> [batch]`` from the caller, or a helper: `carry_counterfactual`,
`source_value`). IIA (interchange-intervention accuracy) is the fraction of held-out pairs whose
intervened argmax at the answer step is that token.

Axis names: ``batch``/``pair`` (examples), ``pos`` (token positions), ``d`` (the location's
activation size, ``d_model`` for the residual stream), ``k`` (subspace dimensions), ``layer`` (in a
sweep: one row per (site, layer), in forward order), ``control`` (random subspaces).
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probekit.metrics import token_metric
from probekit.results import Result
from probekit.tasks import Batch, ProbekitError

BLOCK_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
SWEEP_SITES = ("resid_pre", "resid_mid", "resid_post")


# ---------------------------------------------------------------------------- where


@dataclass(frozen=True, init=False)
class Where:
    """Per example, the one position where every named feature has the given value: ``Where(digit_index=2)``."""

    values: tuple[tuple[str, int], ...]

    def __init__(self, **values: int):
        if not values:
            raise ProbekitError("Where() needs at least one feature=value, e.g. Where(digit_index=2)")
        object.__setattr__(self, "values", tuple((str(k), int(v)) for k, v in values.items()))

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.values)

    def resolve(self, batch: Batch) -> Int[Tensor, " batch"]:
        """The matching position of each example (refuses an example with no match or several)."""
        mask = torch.ones_like(batch.answer_mask)
        for name, v in self.values:
            mask &= batch.feature(name) == v
        count = mask.sum(1)
        if not (count == 1).all():
            bad = int(torch.nonzero(count != 1)[0])
            raise ProbekitError(f"position rule {self.label} matches {int(count[bad])} positions in example {bad}; "
                                "expected exactly one per example")
        return mask.to(torch.int64).argmax(1)


Positions = int | Sequence[int] | Tensor | Where


def resolve_positions(pos: Positions, batch: Batch) -> Int[Tensor, " batch"]:
    """One position per example: an int for all, one int per example, or a `Where` rule."""
    if isinstance(pos, Where):
        return pos.resolve(batch)
    p = torch.as_tensor(pos, dtype=torch.int64).flatten()
    if p.numel() == 1:
        p = p.expand(batch.n)
    if p.numel() != batch.n:
        raise ProbekitError(f"got {p.numel()} positions for {batch.n} examples; expected one int or one per example")
    if (p < 0).any() or (p >= batch.seq_len).any():
        raise ProbekitError(f"positions {sorted(set(p.tolist()))[:5]} out of range for {batch.seq_len}-token sequences")
    return p.clone()


def parse_positions(spec: Positions | str) -> Positions:
    """``"digit_index=2"`` / ``"operand=0,place=1"`` -> `Where`; ``"7"`` -> 7; other values unchanged."""
    if not isinstance(spec, str):
        return spec
    text = spec.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    values = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        if not eq or not name.strip() or not value.strip().lstrip("-").isdigit():
            raise ProbekitError(f"position {spec!r} is not FEATURE=INT[,FEATURE=INT] or an int; "
                                "expected e.g. 'digit_index=2' or 'operand=0,place=1'")
        values[name.strip()] = int(value)
    return Where(**values)


def positions_label(pos: Positions) -> str:
    """A short label for a position rule: ``digit_index=2``, ``7`` or ``per-example[n]``."""
    if isinstance(pos, Where):
        return pos.label
    p = torch.as_tensor(pos).flatten()
    return str(int(p[0])) if p.numel() == 1 else f"per-example[{p.numel()}]"


@dataclass(frozen=True)
class Location:
    """Where an intervention acts: ``site`` of block ``layer`` at ``pos`` (``source_pos``: on the source; None = ``pos``)."""

    site: str
    layer: int
    pos: Positions
    source_pos: Positions | None = None

    @classmethod
    def from_hook(cls, hook: str, pos: Positions, source_pos: Positions | None = None) -> Location:
        """``Location.from_hook("blocks.0.hook_resid_mid", at)``: a location from a TransformerLens hook name."""
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", str(hook))
        if not m:
            raise ProbekitError(f"hook {hook!r} is not a block hook; expected e.g. 'blocks.0.hook_resid_pre'")
        site = m.group(2)
        site = site[5:] if site.startswith("hook_") and site[5:] in BLOCK_SITES else site
        return cls(site, int(m.group(1)), pos, source_pos)

    @property
    def hook(self) -> str:
        """The TransformerLens hook name (``resid_mid`` is written through ``hook_attn_out``)."""
        s = self.site
        return f"blocks.{self.layer}.hook_{s}" if s in BLOCK_SITES else f"blocks.{self.layer}.{s}"

    @property
    def label(self) -> str:
        return f"{self.site}.L{self.layer}@{positions_label(self.pos)}"

    def check(self, model) -> None:
        """Refuse a layer or site that ``model`` does not have."""
        n = model.cfg.n_layers
        if not (isinstance(self.layer, int) and 0 <= self.layer < n):
            raise ProbekitError(f"layer {self.layer!r} is outside a {n}-layer model; expected 0..{n - 1}")
        if self.site == "resid_mid" and model.cfg.attn_only:
            raise ProbekitError("site 'resid_mid' needs an MLP; this model is attention-only (use resid_pre/resid_post)")
        if self.site == "resid_mid":
            return
        if self.hook not in model.hook_dict or self.hook.endswith(("hook_pattern", "hook_attn_scores")):
            raise ProbekitError(f"unknown site {self.site!r} (hook {self.hook!r} not in the model); expected one of "
                                f"{list(BLOCK_SITES)} or a per-position block hook such as 'attn.hook_z'")


# ---------------------------------------------------------------------------- what


class Interchange:
    """The full-vector interchange: the base activation becomes the source's."""

    k = None
    label = "full"

    def __call__(self, base: Float[Tensor, "row d"], src: Float[Tensor, "row d"]) -> Float[Tensor, "row d"]:
        return src


@dataclass(frozen=True)
class SubspaceInterchange:
    """``x_base + B^T (B x_src - B x_base)`` for a fixed orthonormal basis ``B`` ``[k, d]``."""

    basis: Float[Tensor, "k d"]
    label: str = "subspace"

    @property
    def k(self) -> int:
        return int(self.basis.shape[0])

    def __call__(self, base: Float[Tensor, "row d"], src: Float[Tensor, "row d"]) -> Float[Tensor, "row d"]:
        B = self.basis.to(base.device, base.dtype)
        return base + ((src - base) @ B.T) @ B


class RotatedSubspaceInterchange(torch.nn.Module):
    """DAS's intervention: `SubspaceInterchange` with ``B = R[:k]``, ``R`` a learned orthogonal ``d x d`` matrix."""

    label = "das"

    def __init__(self, d: int, k: int, seed: int = 0):
        super().__init__()
        if not (isinstance(k, int) and 1 <= k <= d):
            raise ProbekitError(f"subspace size k={k!r} must be an integer in 1..{d} (the location's size)")
        from torch.nn.utils.parametrizations import orthogonal

        lin = torch.nn.Linear(d, d, bias=False)
        with torch.no_grad():
            lin.weight.copy_(_random_orthogonal(d, d, seed))
        self.rotate = orthogonal(lin)
        self.k = k

    @property
    def R(self) -> Float[Tensor, "d d"]:
        return self.rotate.weight

    def forward(self, base: Float[Tensor, "row d"], src: Float[Tensor, "row d"]) -> Float[Tensor, "row d"]:
        B = self.R[: self.k]
        return base + ((src - base) @ B.T) @ B

    def frozen(self) -> SubspaceInterchange:
        """The current subspace as a fixed `SubspaceInterchange` (no gradients)."""
        return SubspaceInterchange(self.R[: self.k].detach().clone(), label="das")


def _random_orthogonal(d: int, k: int, seed: int) -> Float[Tensor, "k d"]:
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None]  # a uniformly distributed basis (Haar)
    return q.T.float().contiguous()


def random_subspace(d: int, k: int, seed: int = 0) -> SubspaceInterchange:
    """The control: a subspace interchange on a uniformly random ``k``-dimensional subspace of ``R^d``."""
    if not (isinstance(k, int) and 1 <= k <= d):
        raise ProbekitError(f"subspace size k={k!r} must be an integer in 1..{d} (the location's size)")
    return SubspaceInterchange(_random_orthogonal(d, k, seed), label=f"random{seed}")


Intervention = Interchange | SubspaceInterchange | RotatedSubspaceInterchange


# ---------------------------------------------------------------------------- running


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _gather(act: Tensor, pos: Tensor) -> Tensor:
    return act[torch.arange(act.shape[0], device=act.device), pos.to(act.device)].reshape(act.shape[0], -1)


def _scatter(act: Tensor, pos: Tensor, new: Tensor) -> Tensor:
    rows, pos = torch.arange(act.shape[0], device=act.device), pos.to(act.device)
    return act.index_put((rows, pos), new.reshape(act[rows, pos].shape).to(act.dtype))


def _apply(intervention, base: Tensor, src: Tensor) -> Tensor:
    if src.shape != base.shape:
        raise ProbekitError(f"source activations have shape {tuple(src.shape)} but the base's are {tuple(base.shape)}; "
                            "expected both from the same location")
    return intervention(base, src.to(base.device, base.dtype))


@torch.no_grad()
def location_acts(model, batch: Batch, loc: Location, pos: Tensor | None = None,
                  chunk_size: int = 512) -> Float[Tensor, "batch d"]:
    """The activation at ``loc`` (``resid_mid`` = ``resid_pre + attn_out``), one row per example, flattened."""
    loc.check(model)
    pos = resolve_positions(loc.pos, batch) if pos is None else pos
    dev = _device(model)
    out = []
    for s in range(0, batch.n, chunk_size):
        got: dict[str, Tensor] = {}
        p = pos[s:s + chunk_size]
        names = ([f"blocks.{loc.layer}.hook_resid_pre", f"blocks.{loc.layer}.hook_attn_out"]
                 if loc.site == "resid_mid" else [loc.hook])

        def grab(x, hook, name, p=p, got=got):  # hook.name may be the alias's target, so bind the name
            got[name] = _gather(x, p)
        with model.hooks(fwd_hooks=[(n, functools.partial(grab, name=n)) for n in names]):
            model(batch.tokens[s:s + chunk_size].to(dev))
        out.append(sum(got[n] for n in names).float().cpu())
    return torch.cat(out)


def _hooks(loc: Location, pos: Tensor, src: Tensor, intervention) -> list:
    """Forward hooks that apply ``intervention`` at ``loc`` (rows: the run's examples, in order)."""
    if loc.site != "resid_mid":
        def edit(x, hook):
            return _scatter(x, pos, _apply(intervention, _gather(x, pos), src))
        return [(loc.hook, edit)]
    pre: dict[str, Tensor] = {}

    def grab(x, hook):
        pre["x"] = _gather(x, pos)
    def edit_mid(x, hook):  # attn_out := new resid_mid - resid_pre at the intervened positions
        mid = pre["x"] + _gather(x, pos)
        return _scatter(x, pos, _apply(intervention, mid, src) - pre["x"])
    return [(f"blocks.{loc.layer}.hook_resid_pre", grab), (f"blocks.{loc.layer}.hook_attn_out", edit_mid)]


def intervened_logits(model, tokens: Int[Tensor, "batch pos"], loc: Location, pos: Int[Tensor, " batch"],
                      src: Float[Tensor, "batch d"], intervention) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of the base run ``tokens`` with ``intervention(base, src)`` at ``loc`` (hooks removed after)."""
    if src.shape[0] != tokens.shape[0] or pos.shape[0] != tokens.shape[0]:
        raise ProbekitError(f"{tokens.shape[0]} base rows but {src.shape[0]} source rows and {pos.shape[0]} positions")
    with model.hooks(fwd_hooks=_hooks(loc, pos, src, intervention)):
        return model(tokens.to(_device(model)))


@contextlib.contextmanager
def frozen(model):
    """Parameters of ``model`` with ``requires_grad=False`` inside the block, restored after."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield model
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


# ---------------------------------------------------------------------------- counterfactual pairs


def step_values(batch: Batch, at: Positions, feature: str) -> Int[Tensor, " batch"]:
    """``feature`` at the answer step ``at``, one value per example (the one place that reads answer steps)."""
    pos = resolve_positions(at, batch)
    if not batch.pred_mask[torch.arange(batch.n), pos].all():
        raise ProbekitError(f"answer step {positions_label(at)} is not a predicting position (batch.pred_mask) in every "
                            "example; expected a position whose logits give an answer token")
    return batch.feature(feature)[torch.arange(batch.n), pos]


def source_value(feature: str, at: Positions) -> Callable[[Batch, Batch], Tensor]:
    """Counterfactual answer = the source's ``feature`` at the step (sorting: ``source_value("target", at)``
    when the successor varies; the answer token is the target value)."""
    def target(base: Batch, source: Batch) -> Tensor:
        return step_values(source, at, feature)
    return target


def carry_counterfactual(at: Positions) -> Callable[[Batch, Batch], Tensor]:
    """Multiplication, the carry into digit k: answer ``(S_k(base) + c_k(source)) mod 10`` at the step
    (``column_sum`` and ``carry_in`` features; digit tokens are their values)."""
    def target(base: Batch, source: Batch) -> Tensor:
        return (step_values(base, at, "column_sum") + step_values(source, at, "carry_in")) % 10
    return target


COUNTERFACTUAL_RULES = {"carry": carry_counterfactual}


def counterfactual_rule(rule: str | Callable[[Batch, Batch], Tensor], at: Positions) -> Callable[[Batch, Batch], Tensor]:
    """A counterfactual answer by name: ``"carry"`` (`carry_counterfactual`), ``"source:FEATURE"``
    (`source_value`); a callable ``target(base, source)`` is returned unchanged."""
    if callable(rule):
        return rule
    if isinstance(rule, str) and rule.startswith("source:") and len(rule) > 7:
        return source_value(rule[7:], at)
    if rule in COUNTERFACTUAL_RULES:
        return COUNTERFACTUAL_RULES[rule](at)
    raise ProbekitError(f"unknown counterfactual rule {rule!r}; expected one of {sorted(COUNTERFACTUAL_RULES)}, "
                        "'source:FEATURE' or a callable target(base, source)")


@dataclass(frozen=True)
class CounterfactualPairs:
    """Matched base and source batches, the answer step ``at`` and the counterfactual answer token per pair."""

    base: Batch
    source: Batch
    at: Positions
    target: Int[Tensor, " pair"]
    vary: str
    hold: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.base.n != self.source.n or self.target.shape != (self.base.n,):
            raise ProbekitError(f"{self.base.n} base, {self.source.n} source examples and targets of shape "
                                f"{tuple(self.target.shape)}; expected one target per pair")

    @property
    def n(self) -> int:
        return self.base.n

    def answer_pos(self) -> Int[Tensor, " pair"]:
        """The base run's predicting position of the answer step, per pair."""
        return resolve_positions(self.at, self.base)

    def select(self, idx) -> CounterfactualPairs:
        """The pairs ``idx`` (same settings)."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        return replace(self, base=self.base.select(idx), source=self.source.select(idx), target=self.target[idx])


def _match(vb: Tensor, vs: Tensor, hb: Tensor, hs: Tensor, rng) -> tuple[list[int], list[int]]:
    """Pairs (i, j): hold values equal, vary values different; each source used once."""
    groups: dict[tuple, list[int]] = {}
    for j, key in enumerate(map(tuple, hs.tolist())):
        groups.setdefault(key, []).append(j)
    for g in groups.values():
        rng.shuffle(g)
    bi, si = [], []
    vb, vs = vb.tolist(), vs.tolist()
    for i, key in enumerate(map(tuple, hb.tolist())):
        g = groups.get(key, [])
        for c, j in enumerate(g):
            if vs[j] != vb[i]:
                bi.append(i)
                si.append(g.pop(c))
                break
    return bi, si


def counterfactual_pairs(task, n: int, length: int | None = None, *, vary: str, hold: Sequence[str] = (),
                         at: Positions, target: Callable[[Batch, Batch], Tensor], seed: int = 0,
                         pool: int = 4, max_rounds: int = 6) -> CounterfactualPairs:
    """``n`` pairs from ``task.sample``: at step ``at`` the ``vary`` feature differs and the ``hold`` features agree.

    Base and source pools of ``pool * n`` examples are matched; the pools double until ``n`` pairs are found.
    ``target(base, source)`` gives the counterfactual answer token per pair (see `carry_counterfactual`).
    """
    import numpy as np

    if not isinstance(n, int) or n < 2:
        raise ProbekitError(f"n must be an integer >= 2 (pairs), got {n!r}")
    hold = tuple(hold)
    if vary in hold:
        raise ProbekitError(f"feature {vary!r} is both varied and held; expected it in one of vary/hold")
    rng = np.random.default_rng(seed)
    for r in range(max_rounds):
        m = pool * n * 2 ** r
        base, source = (task.sample(m, length, seed=int(rng.integers(2**31))) for _ in range(2))
        vb, vs = step_values(base, at, vary), step_values(source, at, vary)
        hb = torch.stack([step_values(base, at, h) for h in hold], 1) if hold else torch.zeros(m, 0)
        hs = torch.stack([step_values(source, at, h) for h in hold], 1) if hold else torch.zeros(m, 0)
        bi, si = _match(vb, vs, hb, hs, rng)
        if len(bi) >= n:
            break
    else:
        raise ProbekitError(f"found {len(bi)} of {n} pairs with {vary!r} different and {list(hold)} equal at "
                            f"{positions_label(at)} in {m} samples; expected a variable that can vary with the rest held")
    base, source = base.select(torch.tensor(bi[:n])), source.select(torch.tensor(si[:n]))
    t = torch.as_tensor(target(base, source), dtype=torch.int64).flatten()
    answer = base.tokens[torch.arange(n), resolve_positions(at, base) + 1]
    settings = {"task": task.spec() if hasattr(task, "spec") else str(task), "n": n, "length": base.length,
                "vary": vary, "hold": list(hold), "at": positions_label(at), "seed": seed,
                "target_differs_from_base": float((t != answer).float().mean())}
    return CounterfactualPairs(base, source, at, t, vary, hold, settings)


# ---------------------------------------------------------------------------- scoring


def bootstrap_interval(correct: Bool[Tensor, " pair"], n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy (pairs resampled with replacement)."""
    c = torch.as_tensor(correct, dtype=torch.float32).flatten()
    if c.numel() == 0:
        return (float("nan"), float("nan"))
    g = torch.Generator().manual_seed(int(seed))
    means = c[torch.randint(c.numel(), (n_boot, c.numel()), generator=g)].mean(1)
    a = (1 - level) / 2
    return (float(torch.quantile(means, a)), float(torch.quantile(means, 1 - a)))


@torch.no_grad()
def interchange_correct(model, pairs: CounterfactualPairs, loc: Location, intervention,
                        src: Float[Tensor, "pair d"] | None = None, chunk_size: int = 512) -> Bool[Tensor, " pair"]:
    """Per pair: is the intervened argmax at the answer step the counterfactual answer? (None: no intervention)."""
    apos, bpos = pairs.answer_pos(), resolve_positions(loc.pos, pairs.base)
    if intervention is not None and src is None:
        src = location_acts(model, pairs.source, loc, _source_pos(loc, pairs))
    out = []
    for s in range(0, pairs.n, chunk_size):
        sl = slice(s, s + chunk_size)
        toks = pairs.base.tokens[sl]
        if intervention is None:
            logits = model(toks.to(_device(model)))
        else:
            logits = intervened_logits(model, toks, loc, bpos[sl], src[sl], intervention)
        step = _gather(logits, apos[sl])
        out.append(token_metric(step, pairs.target[sl].to(step.device), "acc").bool().cpu())
    return torch.cat(out)


def iia(model, pairs: CounterfactualPairs, loc: Location, intervention, **kw) -> float:
    """Interchange-intervention accuracy of ``intervention`` at ``loc`` on ``pairs``."""
    return float(interchange_correct(model, pairs, loc, intervention, **kw).float().mean())


def _source_pos(loc: Location, pairs: CounterfactualPairs) -> Tensor:
    return resolve_positions(loc.pos if loc.source_pos is None else loc.source_pos, pairs.source)


def _cf_loss(model, pairs: CounterfactualPairs, loc: Location, intervention, src: Tensor, bpos: Tensor,
             apos: Tensor, idx: Tensor) -> Tensor:
    """Mean ``-logprob`` of the counterfactual answer at the answer step under the intervention, on rows ``idx``."""
    logits = intervened_logits(model, pairs.base.tokens[idx], loc, bpos[idx], src[idx], intervention)
    step = _gather(logits, apos[idx])
    return -token_metric(step.float(), pairs.target[idx].to(step.device), "logprob").mean()


# ---------------------------------------------------------------------------- DAS


@dataclass(frozen=True)
class FitSettings:
    """How `fit_das` fits and scores a rotation (saved with the result)."""

    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-2
    eval_every: int = 20
    patience: int = 4
    test_fraction: float = 0.25
    val_fraction: float = 0.15
    n_controls: int = 3
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self):
        for f in ("steps", "batch_size", "eval_every", "patience", "n_boot"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ProbekitError(f"FitSettings.{f} must be a positive integer, got {v!r}")
        if not (0 < self.test_fraction < 1 and 0 < self.val_fraction < 1 and self.test_fraction + self.val_fraction < 1):
            raise ProbekitError(f"test_fraction={self.test_fraction} and val_fraction={self.val_fraction} must be in "
                                "(0, 1) and leave pairs to fit on")
        if not isinstance(self.n_controls, int) or self.n_controls < 0:
            raise ProbekitError(f"FitSettings.n_controls must be an integer >= 0, got {self.n_controls!r}")


def split_pairs(n: int, settings: FitSettings) -> tuple[Tensor, Tensor, Tensor]:
    """Disjoint (fit, validation, test) pair indices, random given ``settings.seed``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed))
    n_test, n_val = max(1, round(n * settings.test_fraction)), max(1, round(n * settings.val_fraction))
    if n - n_test - n_val < 1:
        raise ProbekitError(f"{n} pairs leave none to fit on after the test and validation splits; expected more pairs")
    return perm[n_test + n_val:], perm[n_test:n_test + n_val], perm[:n_test]


@dataclass
class DASFit:
    """One DAS fit at one location. Scores are on the held-out test pairs."""

    location: str
    k: int
    rotation: Float[Tensor, "d d"]  # R; the subspace is R[:k]
    correct: Bool[Tensor, " pair"]  # per test pair, under the learned subspace interchange
    iia: float
    interval: tuple[float, float]
    control: Float[Tensor, " control"]  # IIA of random subspaces of the same k
    ceiling: float  # IIA of the full-vector interchange
    floor: float  # accuracy of the base run (no intervention) on the counterfactual answer
    history: list[dict] = field(default_factory=list)  # validation loss/IIA at each evaluation
    steps: int = 0
    seconds: float = 0.0  # wall-clock time of the fit (source activations + training), scoring excluded
    cpu_seconds: float = 0.0  # the same in CPU time of this process (robust to a loaded machine)
    settings: dict = field(default_factory=dict)

    @property
    def basis(self) -> Float[Tensor, "k d"]:
        return self.rotation[: self.k]

    @property
    def intervention(self) -> SubspaceInterchange:
        return SubspaceInterchange(self.basis, label="das")

    def summary(self) -> dict:
        """The scores as one flat record (the row of `to_frame`)."""
        c = self.control
        return {"location": self.location, "k": self.k, "iia": self.iia, "iia_lo": self.interval[0],
                "iia_hi": self.interval[1], "control_mean": float(c.mean()) if c.numel() else float("nan"),
                "control_std": float(c.std()) if c.numel() > 1 else float("nan"), "ceiling": self.ceiling,
                "floor": self.floor, "n_test": int(self.correct.numel()), "steps": self.steps, "seconds": self.seconds,
                "cpu_seconds": self.cpu_seconds}

    def to_dict(self) -> dict:
        return {**self.summary(), "control": self.control.tolist(), "history": self.history,
                "rotation": self.rotation.tolist(), "correct": self.correct.int().tolist(), "settings": self.settings}

    def to_json(self, path: str | Path | None = None) -> str:
        """Strict JSON (NaN as null, see `probekit.io`); with ``path``, also written there atomically."""
        from probekit.io import json_text

        return json_text(self.to_dict(), path)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([self.summary()])


def _train_rotation(model, pairs, loc, src, fit_idx, val_idx, k, fs: FitSettings):
    """Adam on R for ``-log p(counterfactual answer)``; the best validation state is kept (early stopping)."""
    bpos, apos = resolve_positions(loc.pos, pairs.base), pairs.answer_pos()
    rot = RotatedSubspaceInterchange(src.shape[1], k, seed=fs.seed).to(_device(model))
    opt = torch.optim.Adam(rot.parameters(), lr=fs.lr)
    gen = torch.Generator().manual_seed(fs.seed)
    best, best_R, bad, history, step = math.inf, rot.R.detach().clone(), 0, [], 0
    with frozen(model), torch.enable_grad():
        for step in range(1, fs.steps + 1):
            idx = fit_idx[torch.randint(len(fit_idx), (min(fs.batch_size, len(fit_idx)),), generator=gen)]
            loss = _cf_loss(model, pairs, loc, rot, src, bpos, apos, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % fs.eval_every and step != fs.steps:
                continue
            with torch.no_grad():
                vl = float(_cf_loss(model, pairs, loc, rot, src, bpos, apos, val_idx))
            history.append({"step": step, "train_loss": float(loss.detach()), "val_loss": vl})
            if vl < best - 1e-4:
                best, best_R, bad = vl, rot.R.detach().clone(), 0
            else:
                bad += 1
                if bad >= fs.patience:
                    break
    return best_R, history, step


def fit_das(model, pairs: CounterfactualPairs, loc: Location, k: int, settings: FitSettings | None = None,
            **overrides) -> DASFit:
    """Learn a ``k``-dimensional subspace at ``loc`` whose interchange gives the counterfactual answer.

    Pipeline: split pairs (fit / validation / test) -> source activations -> fit R (early stopping on
    validation) -> score on test pairs: DAS IIA with a bootstrap interval, random subspaces of the same
    ``k`` (control), the full-vector interchange (ceiling) and the base run (floor).
    ``overrides`` replace fields of ``settings`` (e.g. ``steps=100``).
    """
    fs = replace(settings or FitSettings(), **overrides)
    loc.check(model)
    t0, c0 = time.perf_counter(), time.process_time()
    fit_idx, val_idx, test_idx = split_pairs(pairs.n, fs)
    src = location_acts(model, pairs.source, loc, _source_pos(loc, pairs)).to(_device(model))
    d = src.shape[1]
    if not (isinstance(k, int) and 1 <= k <= d):
        raise ProbekitError(f"subspace size k={k!r} must be an integer in 1..{d} (the size of {loc.hook})")
    R, history, steps = _train_rotation(model, pairs, loc, src, fit_idx, val_idx, k, fs)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    test, src_t = pairs.select(test_idx), src[test_idx.to(src.device)]
    correct = interchange_correct(model, test, loc, SubspaceInterchange(R[:k]), src=src_t)
    control = torch.tensor([iia(model, test, loc, random_subspace(d, k, seed=fs.seed + 1 + i), src=src_t)
                            for i in range(fs.n_controls)])
    ceiling = iia(model, test, loc, Interchange(), src=src_t)
    floor = float(interchange_correct(model, test, loc, None).float().mean())
    total = time.perf_counter() - t0
    settings_d = {"model": getattr(model, "probekit_name", None), "location": loc.label, "hook": loc.hook, "k": k,
                  "pairs": pairs.settings, "fit": asdict(fs), "n_fit": len(fit_idx), "n_val": len(val_idx),
                  "n_test": len(test_idx), "seconds_total": round(total, 3)}
    return DASFit(loc.label, k, R.cpu(), correct, float(correct.float().mean()),
                  bootstrap_interval(correct, fs.n_boot, fs.seed), control, ceiling, floor, history, steps,
                  round(seconds, 3), round(cpu_seconds, 3), settings_d)


# ---------------------------------------------------------------------------- sweep


def sweep_locations(model, sites: Sequence[str] | None = None, layers: Sequence[int] | None = None) -> list[tuple[str, int]]:
    """(site, layer) rows in forward order; by default resid_pre/resid_mid/resid_post of every layer."""
    sites = [s for s in SWEEP_SITES if not (s == "resid_mid" and model.cfg.attn_only)] if sites is None else list(sites)
    layers = range(model.cfg.n_layers) if layers is None else layers
    return [(s, int(L)) for L in layers for s in sites]


def das_sweep(model, task, *, vary: str, at: Positions | str, target: str | Callable[[Batch, Batch], Tensor],
              k: int, hold: Sequence[str] = (), n: int = 2000, length: int | None = None, seed: int = 0,
              sites: Sequence[str] | None = None, layers: Sequence[int] | None = None,
              positions: Sequence[Positions | str] | None = None, settings: FitSettings | None = None,
              progress: bool = False, **overrides) -> Result:
    """Counterfactual pairs from ``task`` (see `counterfactual_pairs`), then `sweep_pairs`: IIA by (layer, pos).

    Plain values throughout, so a command line can call it: ``at="digit_index=2"``, ``target="carry"`` or
    ``"source:target"`` (`counterfactual_rule`), ``positions=["digit_index=2", "operand=0,place=1"]``.
    """
    at = parse_positions(at)
    pairs = counterfactual_pairs(task, n, length, vary=vary, hold=hold, at=at, target=counterfactual_rule(target, at),
                                 seed=seed)
    positions = None if positions is None else [parse_positions(p) for p in positions]
    return sweep_pairs(model, pairs, k=k, sites=sites, layers=layers, positions=positions, settings=settings,
                       progress=progress, seed=seed, **overrides)


def sweep_pairs(model, pairs: CounterfactualPairs, *, k: int, sites: Sequence[str] | None = None,
                layers: Sequence[int] | None = None, positions: Sequence[Positions] | None = None,
                settings: FitSettings | None = None, progress: bool = False, **overrides) -> Result:
    """DAS at every (site, layer) x position: a `Result` of IIA with axes ``(layer, pos)``.

    ``layer`` has one row per (site, layer) in forward order (labels ``L0 resid_pre``); ``pos`` one column
    per position rule (default: the answer step ``pairs.at``). Extras of the same shape: ``iia_lo``/``iia_hi``
    (bootstrap 95 %), ``control_mean``/``control_std`` (random subspaces), ``ceiling`` (full vector),
    ``floor`` (base run), ``seconds``. The per-location fits are in ``settings["fits"]`` (summaries).
    """
    rows = sweep_locations(model, sites, layers)
    positions = [pairs.at] if positions is None else list(positions)
    if not positions:
        raise ProbekitError("no positions given; expected e.g. [Where(digit_index=2)]")
    keys = ("iia_lo", "iia_hi", "control_mean", "control_std", "ceiling", "floor", "seconds")
    vals = torch.full((len(rows), len(positions)), float("nan"))
    extra = {key: vals.clone() for key in keys}
    fits = []
    total = len(rows) * len(positions)
    for i, (site, L) in enumerate(rows):
        for j, pos in enumerate(positions):
            fit = fit_das(model, pairs, Location(site, L, pos), k, settings, **overrides)
            s = fit.summary()
            vals[i, j] = fit.iia
            for key in keys:
                extra[key][i, j] = s[key]
            fits.append(s)
            if progress:
                print(f"[{len(fits)}/{total}] {fit.location}: IIA {fit.iia:.3f} ({fit.seconds:.1f} s)", flush=True)
    fs = replace(settings or FitSettings(), **overrides)
    return Result(kind="iia", values=vals, axes=("layer", "pos"),
                  labels={"layer": [f"L{L} {s}" for s, L in rows], "pos": [positions_label(p) for p in positions]},
                  settings={"model": getattr(model, "probekit_name", None), "k": k, "pairs": pairs.settings,
                            "fit": asdict(fs), "rows": [{"site": s, "layer": L} for s, L in rows], "fits": fits},
                  extra=extra)


# ---------------------------------------------------------------------------- figure


def plot_iia(result: Result, path: str | Path | None = None, title: str | None = None):
    """Heatmap of IIA by layer x position (colour bar 0..1); each cell also shows the random-subspace
    control and the full-vector ceiling. Saves PNG/SVG by suffix. Returns the figure."""
    import matplotlib.pyplot as plt

    if not isinstance(result, Result) or result.kind != "iia" or result.axes != ("layer", "pos"):
        raise ProbekitError("plot_iia needs the Result of das_sweep/sweep_pairs (kind 'iia', axes ('layer', 'pos'))")
    v = result.values.float()
    ctl, ceil = result.extra.get("control_mean"), result.extra.get("ceiling")
    lo, hi = result.extra.get("iia_lo"), result.extra.get("iia_hi")
    n_r, n_c = v.shape
    fig, ax = plt.subplots(figsize=(max(4.5, 1.9 * n_c + 2.5), max(2.5, 0.75 * n_r + 1.5)))
    im = ax.imshow(v.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
    for i in range(n_r):
        for j in range(n_c):
            txt = f"{float(v[i, j]):.2f}"
            if lo is not None:
                txt += f" [{float(lo[i, j]):.2f}, {float(hi[i, j]):.2f}]"
            if ctl is not None:
                txt += f"\nrandom {float(ctl[i, j]):.2f} · full {float(ceil[i, j]):.2f}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                    color="black" if float(v[i, j]) > 0.6 else "white")
    ax.set_xticks(range(n_c), [result.label("pos", j) for j in range(n_c)], rotation=30, ha="right")
    ax.set_yticks(range(n_r), [result.label("layer", i) for i in range(n_r)])
    ax.set_xlabel("intervened position")
    ax.set_ylabel("layer and site")
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label("IIA (held-out accuracy of the counterfactual answer)")
    k = result.settings.get("k")
    vary = result.settings.get("pairs", {}).get("vary")
    vary = str(vary).replace("_", " ")
    ax.set_title(title or f"DAS: where {vary} lives (k = {k}); cells: IIA [95 % CI], random-subspace control, "
                          "full-vector ceiling", fontsize=9)
    fig.tight_layout()
    if path is not None:
        from probekit.viz import save_figure

        save_figure(fig, path)
    return fig
