"""Greedy autoregressive evaluation by length (no teacher forcing).

`greedy_decode` writes each predicted answer token from the model's own argmax, left to right;
answer tokens that the task gives rather than asks for (the queries of the hint tasks) are kept.
A forward pass goes through the bridge, so hooks active around the call (ablations) apply.

`evaluate` reports, per length: exact match (every predicted token right), token accuracy,
accuracy per answer position, and for multiplication exact match by number of carries and by
longest carry cascade. Intervals are 95 % Wilson intervals.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch

from probekit.tasks import Batch, ProbekitError, Task


def check_fits(model, task: Task, length: int | None) -> None:
    """Refuse a length outside the task's range or whose sequences exceed the model's n_ctx, or a task of
    another vocabulary."""
    n_ctx = model.cfg.n_ctx
    T = task.seq_len(length)  # the task refuses a length outside its range
    if T > n_ctx:
        raise ProbekitError(f"length {length} makes sequences of {T} tokens but the model's n_ctx is {n_ctx}")
    if task.d_vocab != model.cfg.d_vocab:
        raise ProbekitError(f"task {task.name!r} has {task.d_vocab} tokens but the model's d_vocab is {model.cfg.d_vocab}")


def _hooks_active(model) -> bool:
    return any(hp._forward_hooks or hp._forward_pre_hooks for hp in getattr(model, "hook_dict", {}).values())


@torch.no_grad()
def greedy_decode(model, batch: Batch, max_batch: int = 512, use_cache: bool | None = None) -> torch.Tensor:
    """Tokens ``[batch, pos]`` with every predicted answer token replaced by the model's greedy choice.

    ``use_cache`` (default: when the model was built by probekit and no hook is active) decodes with
    a key/value cache on the native module: the same argmax tokens, about T/2 times less work.
    With hooks active (an ablation around the call) every step is a full forward through the bridge.
    """
    mask = batch.answer_mask
    if not (mask == mask[:1]).all():
        raise ProbekitError("greedy_decode needs one answer layout per batch (same objective and length in every row)")
    device = next(model.parameters()).device
    steps = torch.nonzero(mask[0]).flatten().tolist()
    if use_cache is None:
        use_cache = getattr(model, "probekit_config", None) is not None and not _hooks_active(model)
    out = batch.tokens.clone()
    for start in range(0, batch.n, max_batch):
        toks = out[start:start + max_batch].to(device)
        if use_cache:
            _cached_decode(model, toks, mask[0].to(device))
        else:
            for t in steps:
                logits = model(toks[:, :t])  # batch pos d_vocab
                toks[:, t] = logits[:, -1].argmax(-1)
        out[start:start + max_batch] = toks.cpu()
    return out


def _cached_decode(model, toks: torch.Tensor, answer_mask: torch.Tensor) -> None:
    """In-place greedy decoding of ``toks`` with a key/value cache (`probekit.forward.decode_step`)."""
    from probekit.forward import KVCache, decode_step, native

    nat = native(model)
    cache = KVCache.empty(len(nat.layers))
    first = int(torch.nonzero(answer_mask).flatten()[0])
    T = toks.shape[1]
    logits = decode_step(nat, toks[:, :first], cache)
    for t in range(first, T):
        if answer_mask[t]:
            toks[:, t] = logits.argmax(-1)
        if t + 1 < T:
            logits = decode_step(nat, toks[:, t:t + 1], cache)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` (95 % by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def score(batch: Batch, predicted: torch.Tensor) -> dict:
    """Accuracy record for one batch, given decoded tokens."""
    mask = batch.answer_mask
    correct = (predicted == batch.tokens) | ~mask
    exact = correct.all(dim=1)
    pos = torch.nonzero(mask[0]).flatten()
    per_pos = (predicted[:, pos] == batch.tokens[:, pos]).float().mean(0)
    k = int(exact.sum())
    rec = {
        "length": batch.length,
        "objective": batch.objective,
        "n": batch.n,
        "exact_match": k / batch.n,
        "exact_match_ci95": list(wilson(k, batch.n)),
        "token_acc": float((predicted[mask] == batch.tokens[mask]).float().mean()),
        "per_position": [round(float(v), 4) for v in per_pos],
    }
    if "n_carries" in batch.meta:
        for key, name in (("n_carries", "by_carries"), ("max_cascade", "by_cascade")):
            groups = {}
            vals = batch.meta[key]
            for v in sorted(set(vals.tolist())):
                sel = vals == v
                groups[str(v)] = {"n": int(sel.sum()), "exact_match": float(exact[sel].float().mean())}
            rec[name] = groups
        di = batch.features["digit_index"]
        pm = batch.pred_mask
        k_of_step = di[0][pm[0]].tolist()
        rec["per_digit"] = {str(k): rec["per_position"][i] for i, k in enumerate(k_of_step)}
    return rec


@dataclass
class EvalResult:
    """Greedy-decoding accuracy by length. ``records``: one dict per length (see `score`)."""

    model: str
    task: dict
    seed: int
    records: list[dict] = field(default_factory=list)

    def to_frame(self):
        import pandas as pd

        rows = [{k: v for k, v in r.items() if not isinstance(v, dict | list)} | {
            "ci_low": r["exact_match_ci95"][0], "ci_high": r["exact_match_ci95"][1]} for r in self.records]
        return pd.DataFrame(rows)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, s: str) -> EvalResult:
        return cls(**json.loads(s))

    def exact_match(self, length: int) -> float:
        for r in self.records:
            if r["length"] == length:
                return r["exact_match"]
        raise ProbekitError(f"no record for length {length}; have {[r['length'] for r in self.records]}")


def evaluate(model, task: Task, lengths: list[int] | tuple[int, ...], n: int = 500, seed: int = 0,
             max_batch: int = 512, progress: bool = False, name: str | None = None) -> EvalResult:
    """Exact match and per-position accuracy of greedy decoding, for each length."""
    from probekit.checks import check_value

    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ProbekitError(f"n must be positive, got {n!r}; expected an integer >= 1")
    check_value("evaluate seed", seed, int, lo=0)
    check_value("evaluate max_batch", max_batch, int, lo=1)
    if not lengths:
        raise ProbekitError("lengths is empty; expected at least one length, e.g. [10, 20, 50]")
    check_value("evaluate lengths", list(lengths), list[int], lo=1)
    for L in lengths:
        check_fits(model, task, L)
        task.sample(1, length=L, seed=0)  # the task refuses a length outside its range
    res = EvalResult(model=name or getattr(model, "probekit_name", "model"), task=task.spec(), seed=seed)
    it = lengths
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(lengths, desc="eval", unit="length")
    was_training = model.training
    model.eval()
    try:
        for L in it:
            batch = task.sample(n, length=L, seed=seed * 1000 + L)
            res.records.append(score(batch, greedy_decode(model, batch, max_batch=max_batch)))
    finally:
        model.train(was_training)
    return res


def evaluate_batch(model, batch: Batch, max_batch: int = 512, name: str | None = None) -> EvalResult:
    """Greedy decoding of the answer positions of a batch, without a task: one record, scored on the mask.

    For the user's own data (`Batch.from_tokens`): each True position of ``batch.answer_mask`` is decoded
    from the model's argmax given everything before it (the prompt and the answers it already wrote), and
    compared with ``batch.tokens``. Rows may have different answer layouts (decoded one layout at a time);
    then ``per_position`` is omitted and ``exact_match`` counts the rows that have an answer.
    """
    mask = batch.answer_mask
    has = mask.any(1)
    if not has.any():
        raise ProbekitError("batch has no answer position (answer_mask is all False); expected tokens to decode")
    if batch.seq_len > model.cfg.n_ctx:
        raise ProbekitError(f"batch sequences have {batch.seq_len} tokens but the model's n_ctx is {model.cfg.n_ctx}")
    if int(batch.tokens.max()) >= model.cfg.d_vocab:
        raise ProbekitError(f"batch has token id {int(batch.tokens.max())} but the model's d_vocab is {model.cfg.d_vocab}")
    layouts, group = torch.unique(mask, dim=0, return_inverse=True)
    pred = batch.tokens.clone()
    was_training = model.training
    model.eval()
    try:
        for g in range(len(layouts)):
            idx = torch.nonzero(group == g).flatten()
            if layouts[g].any():
                pred[idx] = greedy_decode(model, batch.select(idx), max_batch=max_batch)
    finally:
        model.train(was_training)
    if len(layouts) == 1:
        rec = score(batch, pred)
    else:
        exact = ((pred == batch.tokens) | ~mask).all(1)[has]
        k = int(exact.sum())
        rec = {"length": batch.length, "objective": batch.objective, "n": int(has.sum()),
               "exact_match": k / len(exact), "exact_match_ci95": list(wilson(k, len(exact))),
               "token_acc": float((pred[mask] == batch.tokens[mask]).float().mean())}
    task = {"name": batch.task, "objective": batch.objective, "source": "batch"}
    return EvalResult(model=name or getattr(model, "probekit_name", None) or str(getattr(model.cfg, "model_name", "model")),
                      task=task, seed=batch.meta.get("seed") if isinstance(batch.meta.get("seed"), int) else None,
                      records=[rec])


SORT_ERROR_KINDS = ("extra_copy", "dropped_copy", "wrong_value")


@torch.no_grad()
def sort_error_kinds(model, batch: Batch, max_batch: int = 256) -> dict:
    """Where a sorting model goes wrong, under teacher forcing, split by the kind of step.

    A sort step either *repeats* the previous output (another copy of a value that occurs more than
    once) or writes a *new* value (the next larger value in the list). Each wrong prediction is one of

    - ``extra_copy``: the target is a new value, the model writes the previous output again;
    - ``dropped_copy``: the target repeats the previous output, the model writes another value;
    - ``wrong_value``: the target is a new value, the model writes some other wrong value.

    The kinds describe the step that goes wrong and what was written there, not which mechanism
    failed (a list of distinct values has no repeat step and can still fail). Up to its first error,
    greedy decoding sees exactly the teacher-forced prefix, so ``first_error`` (per sequence: the
    kind of its first wrong step, or ``none``) is the reason greedy decoding fails on that sequence.

    Returns ``{"n", "length", "repeat_share", "error_rate": {"repeat", "new"}, "first_error": {kind: count}}``.
    """
    if batch.objective != "sort":
        raise ProbekitError(f"sort_error_kinds needs a batch of the 'sort' objective, got {batch.objective!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        pred = torch.cat([model(batch.tokens[i:i + max_batch, :-1].to(device)).argmax(-1).cpu()
                          for i in range(0, batch.n, max_batch)])
    finally:
        model.train(was_training)
    target, mask = batch.tokens[:, 1:], batch.answer_mask[:, 1:]
    prev = batch.features["prev_output"][:, :-1]
    repeat = mask & (prev == target)
    new = mask & ~repeat
    wrong = mask & (pred != target)
    kinds = torch.zeros_like(target)  # 0: right or not an answer step
    kinds[wrong & new & (pred == prev)] = 1
    kinds[wrong & repeat] = 2
    kinds[wrong & new & (pred != prev)] = 3
    first = torch.where(wrong.any(1), kinds.gather(1, wrong.float().argmax(1, keepdim=True)).squeeze(1), 0)
    names = ("none",) + SORT_ERROR_KINDS
    return {
        "n": batch.n,
        "length": batch.length,
        "repeat_share": float(repeat.sum() / mask.sum()),
        "error_rate": {"repeat": float((wrong & repeat).sum() / repeat.sum().clamp(min=1)),
                       "new": float((wrong & new).sum() / new.sum().clamp(min=1))},
        "first_error": {k: int((first == i).sum()) for i, k in enumerate(names)},
    }
