"""The one metric vocabulary: what patching, attribution and every other instrument measure at the answer.

Axis names: ``batch`` (examples), ``pos`` (token positions), ``answer`` (answer steps), ``d_vocab``.

Answer layout. The logits at a *predicting position* ``t`` give the answer token ``tokens[t + 1]``
(``batch.pred_mask``). `answer_layout` lists the predicting positions in answer order (one layout per
batch: one objective and length), `answer_targets` the answer tokens they predict, and `digit_step`
the answer step that writes product digit k (multiplication writes digit k at the step whose
``digit_index`` feature is k; other tasks: step k).

Metrics (one spelling each, teacher forced: the logits at each answer step see the run's own earlier
answer tokens), computed per example and per evaluated answer step, then averaged over the steps
(``exact-match``: the minimum) and over the batch:

- ``logit-diff``  clean answer token's logit minus the corrupted batch's answer token's logit (needs a
                  corrupted batch; a step where the two answers agree contributes 0);
- ``logit``       logit of the answer token;
- ``logprob``     log-probability of the answer token;
- ``prob``        probability of the answer token;
- ``margin``      answer token's logit minus the largest other logit;
- ``acc``         1 where the argmax is the answer token;
- ``exact-match`` 1 where every evaluated step is right (argmax).

`token_metric` gives the per-token metrics (``logit`` .. ``acc``) of any given tokens, e.g. a
counterfactual answer: `probekit.interventions` scores IIA as its ``acc`` and fits DAS on its ``logprob``.

The evaluated steps are the metric's ``steps``, else a pair's default (`CorruptedPair.answer_steps`:
the steps whose target the corruption changes by construction), else every step. Old spellings
(``logit_diff``, ``token_acc``, ...) are refused with the right one named.

Position labels (`position_labels`): ``"<pos> <label>"`` per token position, ``<pos>`` the integer token
position and ``<label>`` the task's structural label of that position (``Batch.pos_labels``: ``x3``,
``|``, ``y0`` for sorting; ``a1``, ``*``, ``d0`` for multiplication), else the token (decoded with
``vocab`` when given) where it is the same in every row, else ``·``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from probekit.tasks.base import Batch, ProbekitError

METRICS = ("logit-diff", "logit", "logprob", "prob", "margin", "acc", "exact-match")
PAIR_METRICS = ("logit-diff",)  # need a corrupted batch
GRADIENT_METRICS = ("logit-diff", "logit", "logprob", "prob", "margin")  # differentiable in the logits
SPELLINGS = {"logit_diff": "logit-diff", "logitdiff": "logit-diff", "token_acc": "acc", "token-acc": "acc",
             "accuracy": "acc", "exact_match": "exact-match", "log_prob": "logprob", "log-prob": "logprob",
             "probability": "prob"}


def check_metric(name: str, allowed: Sequence[str] = METRICS, what: str = "metric") -> str:
    """``name`` if it is one of ``allowed``; a one-line error naming the right spelling otherwise."""
    if name in SPELLINGS:
        raise ProbekitError(f"{what} {name!r} is spelled {SPELLINGS[name]!r}; expected one of {list(allowed)}")
    if name not in allowed:
        raise ProbekitError(f"unknown {what} {name!r}; expected one of {list(allowed)}")
    return name


@dataclass(frozen=True)
class Metric:
    """What to measure: ``kind`` in METRICS, at answer ``steps`` (None: the pair's default, else all)."""

    kind: str = "logit-diff"
    steps: tuple[int, ...] | None = None

    def __post_init__(self):
        check_metric(self.kind)
        if self.steps is not None:
            object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))


# ---------------------------------------------------------------------------- answer layout and pairs


def answer_layout(batch: Batch) -> Int[Tensor, "answer"]:
    """Predicting positions (logits that give answer tokens), in answer order; one layout per batch."""
    pm = batch.pred_mask
    if not (pm == pm[:1]).all():
        raise ProbekitError("the batch mixes answer layouts; expected one objective and length in every row")
    pos = torch.nonzero(pm[0]).flatten()
    if pos.numel() == 0:
        raise ProbekitError("the batch has no answer positions; expected an answer_mask with at least one True")
    return pos


def answer_targets(batch: Batch) -> Int[Tensor, "batch answer"]:
    """The answer token predicted at each predicting position (`answer_layout`)."""
    return batch.tokens[:, answer_layout(batch) + 1]


def digit_step(batch: Batch, digit: int) -> int:
    """The answer step that writes product digit ``digit`` (a ``digit_index`` feature), or step ``digit`` itself."""
    read = answer_layout(batch)
    if "digit_index" in batch.features:
        ks = batch.features["digit_index"][0, read].tolist()
        if digit not in ks:
            raise ProbekitError(f"digit {digit} is not an answer digit of this batch; expected 0..{len(ks) - 1}")
        return ks.index(digit)
    if not 0 <= digit < len(read):
        raise ProbekitError(f"answer step {digit} out of range; this batch has answer steps 0..{len(read) - 1}")
    return int(digit)


def check_pair(clean: Batch, corrupted: Batch) -> None:
    """Refuse two batches that are not a clean/corrupted pair: same shape, answer layout, task and objective."""
    if clean.tokens.shape != corrupted.tokens.shape:
        raise ProbekitError(f"clean tokens have shape {tuple(clean.tokens.shape)} but corrupted "
                            f"{tuple(corrupted.tokens.shape)}; expected identical shapes (same n and length)")
    if not torch.equal(clean.answer_mask, corrupted.answer_mask):
        raise ProbekitError("clean and corrupted batches have different answer layouts; expected the same objective and length")
    if clean.task != corrupted.task or clean.objective != corrupted.objective:
        raise ProbekitError(f"clean is {clean.task}/{clean.objective} but corrupted is {corrupted.task}/"
                            f"{corrupted.objective}; expected the same task and objective")


def position_labels(batch: Batch, positions: Sequence[int] | Tensor | None = None,
                    vocab: Sequence[str] | None = None) -> list[str]:
    """``"<pos> <label>"`` for each position (all by default); see the module docstring."""
    positions = range(batch.seq_len) if positions is None else [int(p) for p in positions]
    own = batch.pos_labels
    out = []
    for p in positions:
        if own is not None:
            lab = own[p]
        else:
            col = batch.tokens[:, p]
            t = int(col[0])
            same = bool((col == t).all())
            lab = "·" if not same else (vocab[t] if vocab is not None and 0 <= t < len(vocab) else str(t))
        out.append(f"{p} {lab}")
    return out


# ---------------------------------------------------------------------------- computing a metric


TOKEN_METRICS = ("logit", "logprob", "prob", "margin", "acc")  # of one answer token (`token_metric`)


def token_metric(logits: Float[Tensor, "... d_vocab"], tokens: Int[Tensor, "..."], kind: str) -> Float[Tensor, "..."]:
    """Metric ``kind`` of the answer ``tokens`` in ``logits``, one value per token: any of `TOKEN_METRICS`
    (`BoundMetric` builds ``logit-diff`` and ``exact-match`` from them)."""
    c = tokens[..., None]
    if kind == "logit":
        return logits.gather(-1, c)[..., 0]
    if kind == "logprob":
        return logits.log_softmax(-1).gather(-1, c)[..., 0]
    if kind == "prob":
        return logits.softmax(-1).gather(-1, c)[..., 0]
    if kind == "margin":
        return logits.gather(-1, c)[..., 0] - logits.scatter(-1, c, float("-inf")).max(-1).values
    if kind == "acc":
        return (logits.argmax(-1) == tokens).to(logits.dtype)
    raise ProbekitError(f"unknown token metric {kind!r}; expected one of {list(TOKEN_METRICS)}")


@dataclass
class BoundMetric:
    """A metric bound to a batch (and its corrupted partner): the positions it reads and the tokens it compares."""

    metric: Metric
    read_pos: Int[Tensor, "answer"]  # token positions whose logits are read
    correct: Int[Tensor, "batch answer"]  # clean answer tokens
    wrong: Int[Tensor, "batch answer"] | None = None  # corrupted answer tokens (None without a corrupted batch)

    @classmethod
    def bind(cls, metric: Metric | str, pair) -> BoundMetric:
        """Bind to a `CorruptedPair`: its default answer steps apply unless the metric names steps."""
        return cls.for_batch(metric, pair.clean, pair.corrupted, default_steps=pair.answer_steps, what=pair.kind)

    @classmethod
    def for_batch(cls, metric: Metric | str, batch: Batch, corrupted: Batch | None = None,
                  default_steps: Sequence[int] | None = None, what: str | None = None) -> BoundMetric:
        metric = Metric(metric) if isinstance(metric, str) else metric
        read = answer_layout(batch)
        if corrupted is not None:
            check_pair(batch, corrupted)
        elif metric.kind in PAIR_METRICS:
            raise ProbekitError(f"metric {metric.kind!r} needs a corrupted batch; use 'logprob' or 'margin' without one")
        steps = metric.steps if metric.steps is not None else default_steps
        if steps is not None:
            bad = [s for s in steps if not 0 <= s < len(read)]
            if bad or not steps:
                raise ProbekitError(f"answer step(s) {bad or list(steps)} out of range; expected steps in 0..{len(read) - 1}")
            read = read[list(steps)]
        correct = batch.tokens[:, read + 1]
        wrong = corrupted.tokens[:, read + 1] if corrupted is not None else None
        if metric.kind in PAIR_METRICS and bool((correct == wrong).all()):
            raise ProbekitError(
                f"metric {metric.kind!r} compares the clean answer with the corrupted answer, but "
                f"{'corruption ' + repr(what) if what else 'the corrupted batch'} leaves the evaluated answer tokens "
                "unchanged; use metric prob or acc, or other answer steps")
        return cls(Metric(metric.kind, tuple(steps) if steps is not None else None), read, correct, wrong)

    def per_step(self, logits: Float[Tensor, "batch answer d_vocab"], rows: Int[Tensor, "batch"]) -> Float[Tensor, "batch answer"]:
        """Per-example, per-step values; ``rows`` are the example indices of the logits' rows."""
        c = self.correct.to(logits.device)[rows]
        kind = self.metric.kind
        if kind == "logit-diff":
            w = self.wrong.to(logits.device)[rows]
            return token_metric(logits, c, "logit") - token_metric(logits, w, "logit")
        return token_metric(logits, c, "acc" if kind == "exact-match" else kind)

    def reduce(self, per_step: Float[Tensor, "batch answer"]) -> Float[Tensor, "batch"]:
        if self.metric.kind == "exact-match":
            return per_step.min(dim=-1).values
        return per_step.mean(dim=-1)

    def tl_metric(self):
        """The same metric as a TransformerLens ``patching_metric`` (full logits -> scalar batch mean)."""
        rows = torch.arange(self.correct.shape[0])

        def fn(logits):
            return self.reduce(self.per_step(logits[:, self.read_pos.to(logits.device)], rows.to(logits.device))).mean()

        return fn


def metric_value(logits: Float[Tensor, "batch pos d_vocab"], batch: Batch, metric: Metric | str = "logprob",
                 corrupted: Batch | None = None, *, steps: Sequence[int] | None = None, per_example: bool = False,
                 per_step: bool = False) -> Tensor:
    """``metric`` of the answer in full-sequence ``logits`` of ``batch``: the batch mean (a scalar), ``[batch]``
    with ``per_example``, ``[answer]`` with ``per_step``, ``[batch, answer]`` with both.

    ``corrupted`` (same layout) gives the other answer of ``logit-diff``; ``steps`` the evaluated answer steps
    (default: every step, or the metric's own ``steps``).
    """
    bm = BoundMetric.for_batch(metric, batch, corrupted, default_steps=steps)
    if logits.shape[:2] != batch.tokens.shape:
        raise ProbekitError(f"logits have shape {tuple(logits.shape)}; expected [batch, pos, d_vocab] with "
                            f"[batch, pos] = {tuple(batch.tokens.shape)}")
    lg = logits[:, bm.read_pos.to(logits.device)].float()
    vals = bm.per_step(lg, torch.arange(batch.n, device=logits.device))
    if per_step:
        if bm.metric.kind == "exact-match":
            raise ProbekitError("metric 'exact-match' has no per-step values; use 'acc' per step")
        return vals if per_example else vals.mean(0)
    red = bm.reduce(vals)
    return red if per_example else red.mean()


__all__ = ["BoundMetric", "GRADIENT_METRICS", "METRICS", "Metric", "PAIR_METRICS", "TOKEN_METRICS", "answer_layout",
           "answer_targets", "check_metric", "check_pair", "digit_step", "metric_value", "position_labels", "token_metric"]
