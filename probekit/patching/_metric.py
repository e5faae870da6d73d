"""The metric pieces of patching: `Metric`, `BoundMetric`, `METRICS`, `answer_layout`, `digit_step`,
`position_labels` (kept together in this one file so they can be replaced in one place)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from probekit.corruptions import CorruptedPair
from probekit.tasks import Batch, ProbekitError

METRICS = ("logit-diff", "prob", "acc", "exact-match")


@dataclass(frozen=True)
class Metric:
    """What to measure: ``kind`` in METRICS, at answer ``steps`` (None: the pair's default, else all)."""

    kind: str = "logit-diff"
    steps: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.kind not in METRICS:
            raise ProbekitError(f"unknown metric {self.kind!r}; expected one of {list(METRICS)}")
        if self.steps is not None:
            object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))


def answer_layout(batch: Batch) -> Int[Tensor, "answer"]:
    """Predicting positions (logits that give answer tokens), in answer order; one layout per batch."""
    pm = batch.pred_mask
    if not (pm == pm[:1]).all():
        raise ProbekitError("patching needs one answer layout per batch (same objective and length in every row)")
    return torch.nonzero(pm[0]).flatten()


def digit_step(batch: Batch, digit: int) -> int:
    """The answer step that writes product digit ``digit`` (multiplication), or ``digit`` itself (other tasks)."""
    read = answer_layout(batch)
    if "digit_index" in batch.features:
        ks = batch.features["digit_index"][0, read].tolist()
        if digit not in ks:
            raise ProbekitError(f"digit {digit} is not an answer digit of this batch; expected 0..{len(ks) - 1}")
        return ks.index(digit)
    if not 0 <= digit < len(read):
        raise ProbekitError(f"answer step {digit} out of range; this batch has answer steps 0..{len(read) - 1}")
    return int(digit)


@dataclass
class BoundMetric:
    """A metric bound to a pair: the positions it reads and the tokens it compares."""

    metric: Metric
    read_pos: Int[Tensor, "answer"]  # token positions whose logits are read
    correct: Int[Tensor, "batch answer"]  # clean answer tokens
    wrong: Int[Tensor, "batch answer"]  # corrupted answer tokens

    @classmethod
    def bind(cls, metric: Metric | str, pair: CorruptedPair) -> BoundMetric:
        metric = Metric(metric) if isinstance(metric, str) else metric
        clean, corr = pair.clean, pair.corrupted
        read = answer_layout(clean)
        if not torch.equal(answer_layout(corr), read):
            raise ProbekitError("clean and corrupted batches have different answer layouts; expected identical")
        steps = metric.steps if metric.steps is not None else pair.answer_steps
        if steps is not None:
            bad = [s for s in steps if not 0 <= s < len(read)]
            if bad or not steps:
                raise ProbekitError(f"answer step(s) {bad or list(steps)} out of range; expected steps in 0..{len(read) - 1}")
            read = read[list(steps)]
        correct = clean.tokens[:, read + 1]
        wrong = corr.tokens[:, read + 1]
        if metric.kind == "logit-diff" and bool((correct == wrong).all()):
            raise ProbekitError(
                f"metric 'logit-diff' compares the clean answer with the corrupted answer, but corruption "
                f"{pair.kind!r} leaves the evaluated answer tokens unchanged; use --metric prob or acc")
        return cls(Metric(metric.kind, tuple(steps) if steps is not None else None), read, correct, wrong)

    def per_step(self, logits: Float[Tensor, "batch answer d_vocab"], rows: Int[Tensor, "batch"]) -> Float[Tensor, "batch answer"]:
        """Per-example, per-step values; ``rows`` are the example indices of the logits' rows."""
        c = self.correct.to(logits.device)[rows]
        kind = self.metric.kind
        if kind == "logit-diff":
            w = self.wrong.to(logits.device)[rows]
            return logits.gather(-1, c[..., None])[..., 0] - logits.gather(-1, w[..., None])[..., 0]
        if kind == "prob":
            return logits.softmax(-1).gather(-1, c[..., None])[..., 0]
        return (logits.argmax(-1) == c).to(logits.dtype)

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


def position_labels(batch: Batch) -> list[str]:
    """Structural labels for token positions (same for every row): ``a2 * b0 = d0 d1 ...`` or ``sort x0 x1 | y0 ...``."""
    T = batch.seq_len
    f = batch.features
    labels = [str(t) for t in range(T)]
    am = batch.answer_mask[0]
    if batch.task == "multiplication":
        op, place, di = f["operand"][0], f["place"][0], f["digit_index"][0]
        for t in range(T):
            if op[t] >= 0:
                labels[t] = ("a" if op[t] == 0 else "b") + str(int(place[t]))
            elif am[t]:
                labels[t] = f"d{int(di[t - 1])}"
        labels[batch.prompt_len - 1] = "="
        for t in range(batch.prompt_len - 1):
            if op[t] < 0:
                labels[t] = "*"
    elif batch.task == "sorting":
        L = batch.length
        labels[0] = batch.objective
        for i in range(L):
            labels[1 + i] = f"x{i}"
        labels[1 + L] = "|"
        step = f["step"][0]
        for t in range(2 + L, T):
            if am[t]:
                labels[t] = ("y" if batch.objective == "sort" else "s") + str(int(step[t - 1]))
            elif step[t] >= 0:
                labels[t] = f"q{int(step[t])}"
    return labels
