"""Weight-based circuits: what each head attends to and what it moves, read from the weights alone.

The view of "A Mathematical Framework for Transformer Circuits" (Elhage et al. 2021): with the attention
pattern held fixed, a head is two bilinear maps of the residual stream,

- its **QK circuit** ``x_q W_Q W_K^T x_k^T``: how strongly a query token attends to a key token, and
- its **OV circuit** ``x W_V W_O W_U``: which output logits a source token raises when it is attended to;

read *through the embeddings* (``x = W_E[t]``, the direct path) they are token x token matrices. Both are
independent of the sequence length, so for a NoPE model they say what the head does at every length.
Heads in different layers *compose* when a later head's W_Q, W_K or W_V reads the subspace an earlier
head's W_O writes; the Q-, K- and V-composition scores ``||W_A W_B||_F / (||W_A||_F ||W_B||_F)`` measure it
and mean something only against the same score for random matrices of the same shapes (the baseline).

Axis names: ``layer``, ``head`` (``"L1H2"`` labels where heads are listed), ``query_token``, ``key_token``
(QK), ``source_token``, ``output_token`` (OV), ``writer_layer``, ``writer_head``, ``reader_layer``,
``reader_head`` (composition: the earlier head writes through OV, the later head reads through Q, K or V),
``score`` (the named circuit scores of `circuit_scores`).

**LayerNorm** (``ln=``). A pre-norm head reads ``LN(x) = w * (x - mean x) / sigma(x) + b``. Centring and the
weight ``w`` are linear and applied exactly; the scale ``sigma`` depends on the whole residual, which the
weights alone do not know. Modes:

- ``"embed"`` (default): the residual is taken to be the token's embedding alone (the direct path) and
  normalised exactly as the model would normalise it: each token divided by its own ``sigma(W_E[t])``.
  Exact for a layer-0 head of a NoPE model; above layer 0 the earlier layers' outputs are missing from
  the residual, so the scale (and only the scale) is approximate.
- ``"fixed"``: centring and ``w`` as above, every token divided by one scale, the mean of
  ``sigma(W_E[t])`` over the whole vocabulary. Keeps the circuit a single bilinear form.
- ``"none"``: the raw weights, no normalisation (what TransformerLens's ``model.QK``/``model.OV`` give on
  an unprocessed bridge). For a model without normalisation all three modes are the same.

RMS norms are handled the same way without centring. The final norm before ``W_U`` (OV circuit) is applied
as centring, its weight, and the fixed embedding scale in both ``"embed"`` and ``"fixed"`` (the final
residual's scale is not a property of the source token): a shared positive factor that changes units,
never a ranking. Learned positional embeddings are left out of the token x token circuits (NoPE models have
none). Biases: the QK circuit includes ``b_Q``, ``b_K`` and the LN bias by default (``biases=True``; a
query-only term shifts a whole row and does not change attention, a key-only term does); the OV circuit
leaves out every token-independent term (LN bias through W_V, ``b_V``, ``b_O``, the final LN's bias): they add
the same vector whatever the head attends to, so they are not what the head moves. With ``scaled=True``
(default) QK entries are divided by the attention scale (``sqrt(d_head)``), so they are pre-softmax
attention scores; a ``length_temperature="log"`` model further multiplies the scores of query position t by
``ln(t + 2)`` (recorded in ``settings``, not applied).

Composition scores use the weights as TransformerLens's ``fold_ln`` + ``center_writing_weights`` would leave
them (``fold_ln=True``): the reading matrices W_Q, W_K, W_V take the centring and the weight of their
layer's LN, W_O is centred. The LN scale is one positive number per token, which the Frobenius-norm ratio
does not see, so there is no approximation here. ``fold_ln=False`` scores the raw weights.

Scores (`copying_score`, `successor_score`) are defined on a square token x token matrix ``M`` whose rows
and columns list the same tokens, in order (`numeral_tokens` orders numerals by value, so "the next token"
is the next larger value):

- ``copy_top``: fraction of rows whose largest entry is strictly the diagonal one; ``copy_auc``: mean over
  rows of the fraction of the row's other entries that ``M[i, i]`` exceeds (ties 1/2; 0.5 is chance, 1 a
  diagonal that beats its whole row); ``copy_margin``: mean of ``M[i, i]`` minus the mean of the row's
  other entries (in the circuit's units); ``copy_eigen``: the framework's eigenvalue copying score
  ``Re(sum lambda) / sum |lambda|`` in [-1, 1] (1: every eigenvalue positive real).
- ``succ_top``, ``succ_auc``, ``succ_margin``: the same with target ``M[i, i+1]``, over rows i < n-1
  (``succ_top``: the successor is the row's strict argmax). For a sorting QK circuit ("attend to the next
  larger value"): ``succ_above``, over rows i < n-1, the probability that a key above the query (j > i)
  outscores a key at or below it (k <= i), ties counting 1/2 (an AUC: 1 perfect, 0.5 chance); and
  ``succ_nearest``, over rows i < n-2, the probability that of two keys above the query the smaller one
  scores higher (1: among the larger values, the smallest wins).

`circuit_report` computes them all for every head (or the heads asked for) with the composition scores;
`plot_circuit` and `plot_composition` draw the results. `random_circuits` gives a head's baseline: the same
circuit with random weights of the same shapes and norms; `row_scores` gives the scores row by row, so
that an interval can resample the tokens.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from probekit.attribution import all_heads, head_label, parse_heads
from probekit.results import Result
from probekit.tasks import ProbekitError

LN_MODES = ("embed", "fixed", "none")
COMPOSITION_MODES = ("Q", "K", "V")
QK_SCORES = ("succ_top", "succ_auc", "succ_margin", "succ_above", "succ_nearest", "copy_top", "copy_auc", "copy_margin")
OV_SCORES = ("copy_top", "copy_auc", "copy_margin", "copy_eigen", "succ_top", "succ_auc", "succ_margin")
SCORE_NAMES = tuple(f"qk_{s}" for s in QK_SCORES) + tuple(f"ov_{s}" for s in OV_SCORES)


# ---------------------------------------------------------------------------- tokens and norms


def numeral_tokens(task) -> list[int]:
    """Token ids of ``task.vocab`` entries that are integer numerals, ordered by value (e.g. 0..n_values-1)."""
    found = [(int(s), i) for i, s in enumerate(task.vocab) if re.fullmatch(r"-?\d+", str(s))]
    if not found:
        raise ProbekitError(f"task {task.name!r} has no numeral tokens in its vocabulary; pass tokens= explicitly")
    return [i for _, i in sorted(found)]


def _check_tokens(model, tokens, task) -> list[int]:
    V = model.cfg.d_vocab
    if tokens is None:
        return numeral_tokens(task) if task is not None else list(range(V))
    try:
        tokens = [int(t) for t in tokens]
    except (TypeError, ValueError):
        raise ProbekitError(f"tokens must be a sequence of token ids, got {tokens!r}") from None
    if not tokens or len(set(tokens)) != len(tokens):
        raise ProbekitError(f"tokens must be a non-empty list of distinct token ids, got {tokens}")
    bad = [t for t in tokens if not 0 <= t < V]
    if bad:
        raise ProbekitError(f"token ids {bad} are outside the model's vocabulary 0..{V - 1}")
    return tokens


def _token_labels(tokens: list[int], task) -> list[str]:
    vocab = getattr(task, "vocab", None)
    return [str(vocab[t]) if vocab is not None and t < len(vocab) else str(t) for t in tokens]


@dataclass(frozen=True)
class _Norm:
    center: bool
    weight: Tensor | None
    bias: Tensor | None
    eps: float


def _norm(model, layer: int | None) -> _Norm | None:
    """The norm in front of layer ``layer``'s attention (``None``: the final norm); ``None`` if there is none."""
    kind = model.cfg.normalization_type
    kind = None if kind is None else str(kind).upper()
    if layer is None and kind is not None and getattr(model.cfg, "final_rms", False):
        kind = "RMSPRE" if kind.endswith("PRE") else "RMS"
    if kind is None:
        return None
    if kind not in ("LN", "LNPRE", "RMS", "RMSPRE"):
        raise ProbekitError(f"normalization {kind!r} is not supported; expected LN, LNPre, RMS, RMSPre or none")
    mod = model.ln_final if layer is None else model.blocks[layer].ln1
    w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
    return _Norm(center=kind.startswith("LN"), weight=w.detach().float() if isinstance(w, Tensor) else None,
                 bias=b.detach().float() if isinstance(b, Tensor) else None, eps=float(getattr(model.cfg, "eps", 1e-5)))


def _sigma(x: Tensor, norm: _Norm) -> Tensor:
    """Per-row scale the norm divides by (after centring, if it centres)."""
    xc = x - x.mean(-1, keepdim=True) if norm.center else x
    return (xc.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()


def embedding_scale(model) -> float:
    """Mean over the vocabulary of the per-token scale the first norm would divide the embedding by (1 without norm)."""
    norm = _norm(model, 0)
    if norm is None:
        return 1.0
    return float(_sigma(model.W_E.detach().float(), norm).mean())


def _read(model, x: Tensor, layer: int | None, ln: str, bias: bool) -> Tensor:
    """``x`` (rows of residual vectors) as the norm in front of ``layer`` hands it on, per the ``ln`` mode."""
    norm = _norm(model, layer)
    if norm is None or ln == "none":
        return x
    xc = x - x.mean(-1, keepdim=True) if norm.center else x
    scale = _sigma(x, norm) if ln == "embed" and layer is not None else embedding_scale(model)
    y = xc / scale
    if norm.weight is not None:
        y = y * norm.weight
    if bias and norm.bias is not None:
        y = y + norm.bias
    return y


def attention_scale(model, layer: int) -> float:
    """The number the layer's attention scores are divided by (``sqrt(d_head)`` unless the model says otherwise)."""
    from probekit.forward import native, supports_native

    scale = native(model).layers[layer].attn.scale if supports_native(model) else None
    if isinstance(scale, int | float) and scale > 0:
        return float(scale)
    cfg = model.cfg
    if getattr(cfg, "use_attn_scale", True) and getattr(cfg, "attn_scale", -1) > 0:
        return float(cfg.attn_scale)
    return math.sqrt(cfg.d_head)


def _check_choice(value, choices, what: str) -> None:
    if value not in choices:
        raise ProbekitError(f"unknown {what} {value!r}; expected one of {list(choices)}")


# ---------------------------------------------------------------------------- QK and OV circuits


def _heads(model, head, heads) -> tuple[list[tuple[int, int]], bool]:
    if head is not None and heads is not None:
        raise ProbekitError("pass head= (one head) or heads= (several), not both")
    if head is not None:
        return parse_heads(head if isinstance(head, str) else [head], model)[:1], True
    return (all_heads(model) if heads is None else parse_heads(heads, model)), False


def _qk_one(model, L: int, h: int, E: Tensor, ln: str, biases: bool, scaled: bool) -> Tensor:
    x = _read(model, E, L, ln, biases)
    q = x @ model.W_Q[L, h].detach().float()
    k = x @ model.W_K[L, h].detach().float()
    if biases:
        q = q + model.b_Q[L, h].detach().float()
        k = k + model.b_K[L, h].detach().float()
    M = q @ k.T
    return M / attention_scale(model, L) if scaled else M


def _ov_one(model, L: int, h: int, E: Tensor, tokens: list[int], ln: str) -> Tensor:
    x = _read(model, E, L, ln, bias=False)
    out = x @ model.W_V[L, h].detach().float() @ model.W_O[L, h].detach().float()  # token d_model
    out = _read(model, out, None, ln, bias=False)
    return out @ model.W_U.detach().float()[:, tokens]


def _circuit(model, kind: str, head, heads, tokens, task, settings: dict, one) -> Result:
    hs, single = _heads(model, head, heads)
    toks = _check_tokens(model, tokens, task)
    E = model.W_E.detach().float()[toks]
    mats = torch.stack([one(L, h, E, toks) for L, h in hs])
    rows, cols = ("query_token", "key_token") if kind == "qk_circuit" else ("source_token", "output_token")
    labels = {rows: _token_labels(toks, task), cols: _token_labels(toks, task)}
    settings = {"model": getattr(model, "probekit_name", None), "tokens": toks,
                "heads": [head_label(L, h) for L, h in hs],
                "length_temperature": getattr(getattr(model, "probekit_config", None), "length_temperature", None),
                **settings}
    if single:
        return Result(kind, mats[0], (rows, cols), labels, settings)
    labels["head"] = settings["heads"]
    return Result(kind, mats, ("head", rows, cols), labels, settings)


@torch.no_grad()
def qk_circuit(model, head=None, heads=None, tokens: Sequence[int] | None = None, task=None, ln: str = "embed",
               biases: bool = True, scaled: bool = True) -> Result:
    """QK circuit through the embeddings, ``[query_token, key_token]`` for one ``head`` (``(1, 2)`` or ``"L1H2"``),
    else ``[head, query_token, key_token]`` for ``heads`` (default: all, labelled ``"L1H2"``).

    ``tokens``: token ids for both axes (default: `numeral_tokens` of ``task``, or the whole vocabulary).
    ``ln``, ``biases``, ``scaled``: see the module docstring. Entries are pre-softmax attention scores.
    """
    _check_choice(ln, LN_MODES, "ln mode")
    units = "attention score (pre-softmax)" if scaled else "q . k (unscaled)"
    return _circuit(model, "qk_circuit", head, heads, tokens, task,
                    {"ln": ln, "biases": biases, "scaled": scaled, "units": units},
                    lambda L, h, E, toks: _qk_one(model, L, h, E, ln, biases, scaled))


@torch.no_grad()
def ov_circuit(model, head=None, heads=None, tokens: Sequence[int] | None = None, task=None,
               ln: str = "embed") -> Result:
    """OV circuit through the embeddings and unembedding, ``[source_token, output_token]`` (or with a leading
    ``head`` axis): the logit the head adds to each output token per unit of attention to each source token."""
    _check_choice(ln, LN_MODES, "ln mode")
    return _circuit(model, "ov_circuit", head, heads, tokens, task, {"ln": ln, "units": "direct logit contribution"},
                    lambda L, h, E, toks: _ov_one(model, L, h, E, toks, ln))


def _like(W: Tensor, g: torch.Generator) -> Tensor:
    """An i.i.d. Gaussian matrix of ``W``'s shape scaled to ``W``'s Frobenius norm."""
    R = torch.randn(W.shape, generator=g)
    return R * (W.detach().float().norm() / R.norm())


@torch.no_grad()
def random_circuits(model, head, kind: str = "qk", n: int = 20, seed: int = 0, tokens: Sequence[int] | None = None,
                    task=None, ln: str = "embed") -> Result:
    """``[draw, rows, cols]``: ``head``'s QK (``kind="qk"``) or OV (``"ov"``) circuit with its two weight
    matrices (W_Q, W_K or W_V, W_O) replaced by i.i.d. Gaussian matrices of the same shapes and Frobenius
    norms, read through the model's own embeddings, norms and unembedding (no biases): the baseline a head's
    circuit scores are compared with (what a head of this size reads or writes by chance, given the embeddings)."""
    _check_choice(kind, ("qk", "ov"), "circuit kind")
    _check_choice(ln, LN_MODES, "ln mode")
    if not isinstance(n, int) or n < 2:
        raise ProbekitError(f"the random baseline needs n >= 2 draws, got {n!r}")
    (L, h), = _heads(model, head, None)[0]
    toks = _check_tokens(model, tokens, task)
    E = model.W_E.detach().float()[toks]
    x = _read(model, E, L, ln, bias=False)
    g = torch.Generator().manual_seed(seed)
    mats = []
    for _ in range(n):
        if kind == "qk":
            M = (x @ _like(model.W_Q[L, h], g)) @ (x @ _like(model.W_K[L, h], g)).T / attention_scale(model, L)
        else:
            out = _read(model, x @ _like(model.W_V[L, h], g) @ _like(model.W_O[L, h], g), None, ln, bias=False)
            M = out @ model.W_U.detach().float()[:, toks]
        mats.append(M)
    rows, cols = ("query_token", "key_token") if kind == "qk" else ("source_token", "output_token")
    labels = {"draw": list(range(n)), rows: _token_labels(toks, task), cols: _token_labels(toks, task)}
    return Result(f"random_{kind}_circuit", torch.stack(mats), ("draw", rows, cols), labels,
                  {"model": getattr(model, "probekit_name", None), "head": head_label(L, h), "n": n, "seed": seed,
                   "ln": ln, "tokens": toks, "weights": "Gaussian, each matrix scaled to the head's Frobenius norm"})


# ---------------------------------------------------------------------------- scores of a circuit


def _square(M: Tensor) -> Tensor:
    M = torch.as_tensor(M).detach().float()
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] < 2:
        raise ProbekitError(f"circuit scores need a square token x token matrix of size >= 2, got shape {tuple(M.shape)}")
    return M


def _target_scores(M: Tensor, offset: int) -> tuple[float, float, float]:
    """(top, margin, auc) for target column ``i + offset`` of each row i that has one."""
    n = M.shape[0]
    rows = torch.arange(n - offset)
    tgt = M[rows, rows + offset]
    others = M[rows].clone()
    others[rows, rows + offset] = float("-inf")
    top = (tgt > others.max(-1).values).float().mean()
    rest = M[rows].sum(-1) - tgt
    margin = (tgt - rest / (n - 1)).mean()
    d = tgt[:, None] - M[rows]  # row j
    wins = (d > 0).float() + 0.5 * (d == 0).float()
    auc = (wins.sum(-1) - 0.5) / (n - 1)  # the target's own column is a tie with itself
    return float(top), float(margin), float(auc.mean())


def _eigen_copying(M: Tensor) -> float:
    lam = torch.linalg.eigvals(M.double())
    total = lam.abs().sum()
    return float(lam.real.sum() / total) if total > 0 else float("nan")


def copying_score(M: Float[Tensor, "token token"]) -> dict[str, float]:
    """``copy_top``, ``copy_auc``, ``copy_margin``, ``copy_eigen`` of a square token x token circuit (module docstring)."""
    M = _square(M)
    top, margin, auc = _target_scores(M, 0)
    return {"copy_top": top, "copy_auc": auc, "copy_margin": margin, "copy_eigen": _eigen_copying(M)}


def _pair_order(row: Tensor, better: Tensor, worse: Tensor) -> float:
    """P(row[j] > row[k]) for j in ``better``, k in ``worse`` (ties 1/2)."""
    d = row[better][:, None] - row[worse][None, :]
    return float(((d > 0).float() + 0.5 * (d == 0).float()).mean())


def row_scores(M: Float[Tensor, "token token"]) -> dict[str, Tensor]:
    """The scores of a square circuit row by row (one value per query or source token), so that an interval can
    resample the tokens: ``succ_above`` (rows 0..n-2), ``succ_nearest`` (rows 0..n-3), ``copy_auc`` and
    ``copy_top`` (every row; 1 where the diagonal entry is the row's strict maximum, else 0); their means are
    the scores of `successor_score` and `copying_score`."""
    M = _square(M)
    n = M.shape[0]
    idx = torch.arange(n)
    above = [_pair_order(M[i], idx[i + 1:], idx[:i + 1]) for i in range(n - 1)]
    nearest = []
    for i in range(n - 2):
        j, k = torch.triu_indices(n - i - 1, n - i - 1, offset=1) + i + 1  # pairs i < j < k
        d = M[i, j] - M[i, k]
        nearest.append(float(((d > 0).float() + 0.5 * (d == 0).float()).mean()))
    d = M.diagonal()[:, None] - M
    copy = ((d > 0).float() + 0.5 * (d == 0).float()).sum(-1).sub(0.5).div(n - 1)  # the diagonal ties with itself
    top = ((d > 0).sum(-1) == n - 1).float()  # the diagonal beats every other entry of its row
    return {"succ_above": torch.tensor(above), "succ_nearest": torch.tensor(nearest), "copy_auc": copy,
            "copy_top": top}


def successor_score(M: Float[Tensor, "token token"]) -> dict[str, float]:
    """``succ_top``, ``succ_auc``, ``succ_margin``, ``succ_above``, ``succ_nearest`` of a square circuit (module docstring)."""
    M = _square(M)
    top, margin, auc = _target_scores(M, 1)
    rows = row_scores(M)
    above, nearest = rows["succ_above"], rows["succ_nearest"]
    return {"succ_top": top, "succ_auc": auc, "succ_margin": margin, "succ_above": float(above.sum()) / len(above),
            "succ_nearest": float(nearest.sum()) / len(nearest) if len(nearest) else float("nan")}


def circuit_scores(qk: Result, ov: Result) -> Result:
    """``[head, score]``: the `SCORE_NAMES` of each head's QK and OV circuits (results with a ``head`` axis)."""
    for r, kind in ((qk, "qk_circuit"), (ov, "ov_circuit")):
        if not isinstance(r, Result) or r.kind != kind or r.axes[0] != "head":
            raise ProbekitError(f"circuit_scores needs a {kind} result with a leading head axis, got "
                                f"{getattr(r, 'kind', type(r).__name__)} {getattr(r, 'axes', '')}")
    if qk.labels["head"] != ov.labels["head"]:
        raise ProbekitError(f"QK and OV results cover different heads: {qk.labels['head']} vs {ov.labels['head']}")
    rows = []
    for i in range(qk.values.shape[0]):
        s_qk = {**successor_score(qk.values[i]), **copying_score(qk.values[i])}
        s_ov = {**copying_score(ov.values[i]), **successor_score(ov.values[i])}
        rows.append([s_qk[s] for s in QK_SCORES] + [s_ov[s] for s in OV_SCORES])
    settings = {"qk": qk.settings, "ov": ov.settings}
    return Result("circuit_scores", torch.tensor(rows), ("head", "score"),
                  {"head": list(qk.labels["head"]), "score": list(SCORE_NAMES)}, settings)


# ---------------------------------------------------------------------------- composition


def _folded_weights(model, fold_ln: bool) -> dict[str, Tensor]:
    """W_Q, W_K, W_V, W_O ``[layer head ...]``; with ``fold_ln`` as TransformerLens's fold_ln + centring leave them."""
    W = {n: getattr(model, n).detach().float() for n in ("W_Q", "W_K", "W_V", "W_O")}
    norms = [_norm(model, L) for L in range(model.cfg.n_layers)]
    if not fold_ln or norms[0] is None:
        return W
    for n in ("W_Q", "W_K", "W_V"):
        rows = []
        for L, norm in enumerate(norms):
            w = W[n][L]  # head d_model d_head
            if norm.weight is not None:
                w = w * norm.weight[:, None]
            rows.append(w - w.mean(-2, keepdim=True) if norm.center else w)
        W[n] = torch.stack(rows)
    if norms[0].center:
        W["W_O"] = W["W_O"] - W["W_O"].mean(-1, keepdim=True)
    return W


def _reader(W: dict[str, Tensor], mode: str):
    from transformer_lens import FactoredMatrix

    if mode == "Q":
        return FactoredMatrix(W["W_Q"], W["W_K"].transpose(-2, -1))
    if mode == "K":
        return FactoredMatrix(W["W_K"], W["W_Q"].transpose(-2, -1))
    return FactoredMatrix(W["W_V"], W["W_O"])


def composition_baseline(d_model: int, d_head: int, mode: str = "Q", n: int = 20, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the ``mode``-composition score of ``n`` pairs of heads with i.i.d. Gaussian weights."""
    from transformer_lens.utilities import composition_scores

    _check_choice(mode, COMPOSITION_MODES, "composition mode")
    if n < 2:
        raise ProbekitError(f"the random baseline needs n >= 2 draws, got {n}")
    g = torch.Generator().manual_seed(seed)
    W = {k: torch.randn(2, n, d_model, d_head, generator=g) for k in ("W_Q", "W_K", "W_V")}
    W["W_O"] = torch.randn(2, n, d_head, d_model, generator=g)
    W = {k: v[:, :, None] for k, v in W.items()}  # layer draw head(=1) ...
    writer = _reader({k: v[0] for k, v in W.items()}, "V")
    reader = _reader({k: v[1] for k, v in W.items()}, mode)
    s = composition_scores(writer, reader, broadcast_dims=False).reshape(-1)
    return float(s.mean()), float(s.std())


@torch.no_grad()
def composition_scores(model, mode: str = "Q", fold_ln: bool = True, n_random: int = 20, seed: int = 0) -> Result:
    """``mode``-composition scores ``[writer_layer, writer_head, reader_layer, reader_head]`` (NaN unless the
    writer's layer is earlier), with the random baseline in ``settings`` and ``extra["z"]`` = (score - mean) / std."""
    from transformer_lens.utilities import composition_scores as tl_composition_scores

    _check_choice(mode, COMPOSITION_MODES, "composition mode")
    W = _folded_weights(model, fold_ln)
    s = tl_composition_scores(_reader(W, "V"), _reader(W, mode), broadcast_dims=True)
    nL, nH = model.cfg.n_layers, model.cfg.n_heads
    later = torch.arange(nL)[:, None, None, None] < torch.arange(nL)[None, None, :, None]
    s = torch.where(later.expand_as(s), s, torch.full_like(s, float("nan")))
    mean, std = composition_baseline(model.cfg.d_model, model.cfg.d_head, mode, n=n_random, seed=seed)
    layers, heads = [str(L) for L in range(nL)], [str(h) for h in range(nH)]
    labels = {"writer_layer": layers, "writer_head": heads, "reader_layer": layers, "reader_head": heads}
    settings = {"model": getattr(model, "probekit_name", None), "mode": mode, "fold_ln": fold_ln,
                "baseline_mean": mean, "baseline_std": std, "n_random": n_random, "seed": seed,
                "units": "||W_A W_B||_F / (||W_A||_F ||W_B||_F)"}
    return Result(f"composition_{mode.lower()}", s, ("writer_layer", "writer_head", "reader_layer", "reader_head"),
                  labels, settings, extra={"z": (s - mean) / std})


# ---------------------------------------------------------------------------- report


@dataclass
class CircuitReport:
    """QK and OV circuits of the chosen heads, their scores, and Q/K/V composition scores of all head pairs."""

    qk: Result
    ov: Result
    scores: Result
    composition: dict[str, Result] = field(default_factory=dict)

    def results(self) -> dict[str, Result]:
        """Every result by a file-friendly name (``qk_circuit``, ``ov_circuit``, ``circuit_scores``, ``composition_q``...)."""
        out = {"qk_circuit": self.qk, "ov_circuit": self.ov, "circuit_scores": self.scores}
        out.update({r.kind: r for r in self.composition.values()})
        return out

    def top(self, score: str = "qk_succ_top", k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` heads with the highest ``score`` (one of `SCORE_NAMES`)."""
        _check_choice(score, SCORE_NAMES, "score")
        col = self.scores.values[:, SCORE_NAMES.index(score)]
        order = torch.argsort(torch.nan_to_num(col, nan=float("-inf")), descending=True)[:k]
        return [(self.scores.labels["head"][i], float(col[i])) for i in order.tolist()]

    def to_frame(self):
        """The scores as a wide table: one row per head, one column per score."""
        return self.scores.to_frame().pivot(index="head_label", columns="score_label", values="value") \
            .reindex(index=self.scores.labels["head"], columns=list(SCORE_NAMES))

    def to_json(self) -> str:
        import json

        return json.dumps({name: r.to_dict() for name, r in self.results().items()})


def circuit_report(model, task=None, heads=None, tokens: Sequence[int] | None = None, ln: str = "embed",
                   biases: bool = True, fold_ln: bool = True, n_random: int = 20, seed: int = 0) -> CircuitReport:
    """QK/OV circuits over ``tokens`` (default: the task's numerals) for ``heads`` (default: all), their
    `circuit_scores`, and Q-, K-, V-composition scores with their random baselines. Weights only: no data."""
    qk = qk_circuit(model, heads=heads, tokens=tokens, task=task, ln=ln, biases=biases)
    ov = ov_circuit(model, heads=heads, tokens=tokens, task=task, ln=ln)
    comp = {m: composition_scores(model, m, fold_ln=fold_ln, n_random=n_random, seed=seed) for m in COMPOSITION_MODES}
    return CircuitReport(qk=qk, ov=ov, scores=circuit_scores(qk, ov), composition=comp)


# ---------------------------------------------------------------------------- figures


def robust_limit(values: Tensor, q: float = 0.99) -> float:
    """The ``q`` quantile of ``|values|`` (NaNs ignored): a colour limit that outliers do not set."""
    v = torch.as_tensor(values).detach().float().abs().reshape(-1)
    v = v[~torch.isnan(v)]
    lim = float(torch.quantile(v, q)) if v.numel() else 0.0
    return lim if lim > 0 else (float(v.max()) if v.numel() and float(v.max()) > 0 else 1.0)


def _panel(ax, M: Tensor, res: Result, rows: str | None, cols: str | None, lim: float, title: str):
    """One heatmap panel; ``rows``/``cols`` None: no axis label on that side (inner panels of a grid)."""
    ax.set_facecolor("0.85")  # NaN (undefined) cells
    im = ax.imshow(M.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest", aspect="auto")
    n, m = M.shape
    r_ax, c_ax = res.axes[-2], res.axes[-1]
    step_r, step_c = max(1, math.ceil(n / 16)), max(1, math.ceil(m / 16))
    ax.set_yticks(range(0, n, step_r), [res.label(r_ax, i) for i in range(0, n, step_r)])
    ax.set_xticks(range(0, m, step_c), [res.label(c_ax, i) for i in range(0, m, step_c)], rotation=90)
    if rows:
        ax.set_ylabel(rows.replace("_", " "))
    if cols:
        ax.set_xlabel(cols.replace("_", " "))
    ax.set_title(title)
    return im


def plot_circuit(result: Result, path=None, title: str | None = None, q: float = 0.99):
    """Heatmap of a `qk_circuit`/`ov_circuit` result: one panel, or one per head on a shared colour scale
    (diverging, centred at 0, limits at the ``q`` quantile of ``|values|``). Saves PNG/SVG by suffix."""
    import matplotlib.pyplot as plt

    from probekit.viz import STYLE, save_figure

    if not isinstance(result, Result) or result.kind not in ("qk_circuit", "ov_circuit"):
        raise ProbekitError(f"plot_circuit needs a qk_circuit or ov_circuit result, got {getattr(result, 'kind', result)!r}")
    v = result.values if result.axes[0] == "head" else result.values[None]
    heads = result.labels.get("head", result.settings.get("heads", ["?"]))
    rows, cols = result.axes[-2:]
    lim, n = robust_limit(v, q), v.shape[0]
    ncol = min(n, 4)
    nrow = math.ceil(n / ncol)
    what = "QK circuit: which key token each query token attends to" if result.kind == "qk_circuit" \
        else "OV circuit: which logits each attended token raises"
    with plt.rc_context(STYLE):
        fig, axs = plt.subplots(nrow, ncol, figsize=(3.2 * ncol + 1.2, 3.0 * nrow + 0.8), squeeze=False,
                                layout="constrained")
        for i, ax in enumerate(axs.flat):
            if i >= n:
                ax.axis("off")
                continue
            r, c = divmod(i, ncol)
            im = _panel(ax, v[i], result, rows if c == 0 else None, cols if i + ncol >= n else None, lim, heads[i])
        cb = fig.colorbar(im, ax=axs, fraction=0.03, pad=0.02)
        cb.set_label(f"{result.settings.get('units', 'value')}\n(colour limit: {q:.0%} quantile of |value|)")
        fig.suptitle(title or f"{what} ({result.settings.get('model') or 'model'}, LN: {result.settings.get('ln')})")
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_composition(result: Result, path=None, title: str | None = None, q: float = 0.99):
    """Writer head x reader head heatmap of a `composition_scores` result, as score minus the random baseline."""
    import matplotlib.pyplot as plt

    from probekit.viz import STYLE, save_figure

    if not isinstance(result, Result) or not result.kind.startswith("composition_"):
        raise ProbekitError(f"plot_composition needs a composition result, got {getattr(result, 'kind', result)!r}")
    nL, nH = result.values.shape[:2]
    M = (result.values - result.settings["baseline_mean"]).reshape(nL * nH, nL * nH)
    names = [head_label(L, h) for L in range(nL) for h in range(nH)]
    flat = Result("composition", M, ("writer_head", "reader_head"), {"writer_head": names, "reader_head": names})
    lim = robust_limit(M, q)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(0.3 * nL * nH + 2.5, 0.3 * nL * nH + 2), layout="constrained")
        im = _panel(ax, M, flat, "writer_head", "reader_head", lim, "")
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cb.set_label(f"score minus random baseline ({result.settings['baseline_mean']:.3f}"
                     f" +/- {result.settings['baseline_std']:.3f})")
        mode = result.settings.get("mode", "?")
        ax.set_title(title or f"{mode}-composition: how much each later head's {mode} reads what an earlier head writes")
    if path is not None:
        save_figure(fig, path)
    return fig
