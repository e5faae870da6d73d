"""Greedy autoregressive evaluation by length (no teacher forcing).

`greedy_decode` writes each predicted answer token from the model's own argmax, left to right;
answer tokens that the task gives rather than asks for (the queries of the hint tasks) are kept.
A forward pass goes through the bridge, so hooks active around the call (ablations) apply.

`evaluate` reports, per length: exact match (every predicted token right), token accuracy,
accuracy per answer position, and for multiplication exact match by number of carries and by
longest carry cascade. Intervals are 95 % Wilson intervals.

``place_offsets`` (``positional="place"`` models): decode with the next-token probabilities averaged
over several place offsets, e.g. ``"train"``, the offsets the model was trained with (training shifts
every digit's place row by a random offset; plain evaluation uses offset 0). See `greedy_decode`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
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


def place_offsets_of(cfg, batch: Batch, offsets: Sequence[int] | str | None) -> list[int] | None:
    """The place offsets greedy decoding averages over for ``batch``: ``offsets`` checked, or "train" resolved.

    ``None``: plain decoding (None). ``"train"``: every offset in ``[0, place_offset_max]`` (those the
    model was trained with) whose rows fit the place table; offsets that would pass it are left out.
    A list: distinct integers >= 0, each of which must fit. An offset fits when the longest digit run
    the batch's rows can hold (every answer position counted as a digit, whatever is decoded there)
    plus the offset stays below ``n_ctx`` rows. ``cfg``: the model's `probekit.model.ModelConfig`
    (``model.probekit_config``); only ``positional="place"`` models take offsets.
    """
    if offsets is None:
        return None
    from probekit.checks import check_value
    from probekit.forward import place_ids

    if getattr(cfg, "positional", None) != "place":
        raise ProbekitError(f"place_offsets needs a positional='place' model, got positional="
                            f"{getattr(cfg, 'positional', None)!r}; expected place_offsets=None")
    probe = batch.tokens.clone()
    probe[batch.answer_mask] = 0  # a digit: the longest run decoding can make
    top = int(place_ids(probe, cfg.place_tokens)[0].max())  # the highest row at offset 0
    room = cfg.n_ctx - 1 - top  # the largest offset that fits
    if isinstance(offsets, str) and offsets == "train":
        if room < 0:
            raise ProbekitError(f"no place offset fits: digit rows reach {top} at length {batch.length}, the place "
                                f"table has {cfg.n_ctx} rows; expected digit runs of at most {cfg.n_ctx - 1}")
        return list(range(min(cfg.place_offset_max, room) + 1))
    if not isinstance(offsets, list | tuple):
        raise ProbekitError(f"place_offsets = {offsets!r}; expected 'train', a list of integers >= 0, or None")
    check_value("place_offsets", list(offsets), list[int], lo=0)
    if not offsets or len(set(offsets)) != len(offsets):
        raise ProbekitError(f"place_offsets = {list(offsets)}; expected distinct integers >= 0, at least one")
    if max(offsets) > room:
        raise ProbekitError(f"place offset {max(offsets)} puts digit rows up to {top + max(offsets)}, past the place "
                            f"table of {cfg.n_ctx} rows (n_ctx); expected offsets <= {room} at length {batch.length}")
    return list(offsets)


def _choose(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """The greedy token per row; with ``k`` offset streams (rows offset-major), argmax of the log mean probability."""
    if k is None:
        return logits.argmax(-1)
    lp = logits.float().log_softmax(-1).view(k, -1, logits.shape[-1])
    return lp.logsumexp(0).argmax(-1).repeat(k)  # log sum = log mean + log k: the same argmax


@torch.no_grad()
def greedy_decode(model, batch: Batch, max_batch: int = 512, use_cache: bool | None = None,
                  place_offsets: Sequence[int] | str | None = None) -> torch.Tensor:
    """Tokens ``[batch, pos]`` with every predicted answer token replaced by the model's greedy choice.

    ``use_cache`` (default: when the model was built by probekit and no hook is active) decodes with
    a key/value cache on the native module: the same argmax tokens, about T/2 times less work.
    With hooks active (an ablation around the call) every step is a full forward through the bridge.

    ``place_offsets`` (``positional="place"`` models; see `place_offsets_of`): a list of offsets, or
    ``"train"`` for the training offsets ``0..place_offset_max``. Each offset is a stream with every
    digit's place row shifted by it, as in training; at each step the next token is the argmax of the
    log of the mean probability over the streams, and is fed to every stream. The mean of probabilities
    is the marginal over offsets drawn uniformly, as training draws them (a mean of log-probabilities
    would be a product of the streams, letting one confidently wrong offset veto a token). ``[o]``
    alone is plain greedy decoding at offset o. A forward then holds ``max_batch // len(offsets)`` rows
    of the batch (at least one) times the offsets.
    """
    mask = batch.answer_mask
    if not (mask == mask[:1]).all():
        raise ProbekitError("greedy_decode needs one answer layout per batch (same objective and length in every row)")
    offsets = place_offsets_of(getattr(model, "probekit_config", None), batch, place_offsets)
    k = None if offsets is None else len(offsets)
    device = next(model.parameters()).device
    if use_cache is None:
        use_cache = getattr(model, "probekit_config", None) is not None and not _hooks_active(model)
    out = batch.tokens.clone()
    rows = max_batch if k is None else max(1, max_batch // k)
    for start in range(0, batch.n, rows):
        toks = out[start:start + rows].to(device)
        shift = None if k is None else torch.tensor(offsets, device=device).repeat_interleave(len(toks))
        streams = toks if k is None else toks.repeat(k, 1)  # offset-major: stream j holds rows j*B .. j*B + B - 1
        (_cached_decode if use_cache else _full_decode)(model, streams, mask[0].to(device), k, shift)
        out[start:start + rows] = streams[:len(toks)].cpu()
    return out


def _full_decode(model, toks: torch.Tensor, answer_mask: torch.Tensor, k: int | None, shift) -> None:
    """In-place greedy decoding of ``toks``, one full forward through the bridge per answer token."""
    from probekit.forward import place_ids

    for t in torch.nonzero(answer_mask).flatten().tolist():
        if shift is None:
            logits = model(toks[:, :t])  # batch pos d_vocab
        else:
            ids = place_ids(toks[:, :t], model.probekit_config.place_tokens, offset=shift)[0]
            logits = model(toks[:, :t], position_ids=ids)
        toks[:, t] = _choose(logits[:, -1], k)


def _cached_decode(model, toks: torch.Tensor, answer_mask: torch.Tensor, k: int | None = None, shift=None) -> None:
    """In-place greedy decoding of ``toks`` with a key/value cache (`probekit.forward.decode_step`)."""
    from probekit.forward import KVCache, decode_step, native

    nat = native(model)
    cache = KVCache.empty(len(nat.layers))
    cache.offset = shift
    first = int(torch.nonzero(answer_mask).flatten()[0])
    T = toks.shape[1]
    logits = decode_step(nat, toks[:, :first], cache)
    for t in range(first, T):
        if answer_mask[t]:
            toks[:, t] = _choose(logits, k)
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
    """Greedy-decoding accuracy by length. ``records``: one dict per length (see `score`).

    ``place_offsets``: the `greedy_decode` setting (None: plain decoding); with one, every record holds
    ``place_offsets``, the offsets averaged at its length."""

    model: str
    task: dict
    seed: int
    records: list[dict] = field(default_factory=list)
    place_offsets: list[int] | str | None = None  # the setting; each record holds the offsets it used

    def to_frame(self):
        import pandas as pd

        rows = [{k: v for k, v in r.items() if not isinstance(v, dict | list)} | {
            "ci_low": r["exact_match_ci95"][0], "ci_high": r["exact_match_ci95"][1]} for r in self.records]
        return pd.DataFrame(rows)

    def to_json(self) -> str:
        d = asdict(self)
        if d["place_offsets"] is None:  # plain decoding: the JSON it always had
            del d["place_offsets"]
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, s: str) -> EvalResult:
        return cls(**json.loads(s))

    def exact_match(self, length: int) -> float:
        for r in self.records:
            if r["length"] == length:
                return r["exact_match"]
        raise ProbekitError(f"no record for length {length}; have {[r['length'] for r in self.records]}")


def evaluate(model, task: Task, lengths: list[int] | tuple[int, ...], n: int = 500, seed: int = 0,
             max_batch: int = 512, progress: bool = False, name: str | None = None,
             place_offsets: Sequence[int] | str | None = None) -> EvalResult:
    """Exact match and per-position accuracy of greedy decoding, for each length.

    ``place_offsets``: decode averaging over place offsets (``"train"`` or a list; see `greedy_decode`)."""
    from probekit.checks import check_value

    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ProbekitError(f"n must be positive, got {n!r}; expected an integer >= 1")
    check_value("evaluate seed", seed, int, lo=0)
    check_value("evaluate max_batch", max_batch, int, lo=1)
    cfg = getattr(model, "probekit_config", None)
    if not lengths:
        raise ProbekitError("lengths is empty; expected at least one length, e.g. [10, 20, 50]")
    check_value("evaluate lengths", list(lengths), list[int], lo=1)
    for L in lengths:
        check_fits(model, task, L)
        place_offsets_of(cfg, task.sample(1, length=L, seed=0), place_offsets)  # refuses a length outside the range
    setting = list(place_offsets) if isinstance(place_offsets, list | tuple) else place_offsets
    res = EvalResult(model=name or getattr(model, "probekit_name", "model"), task=task.spec(), seed=seed,
                     place_offsets=setting)
    it = lengths
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(lengths, desc="eval", unit="length")
    was_training = model.training
    model.eval()
    try:
        for L in it:
            batch = task.sample(n, length=L, seed=seed * 1000 + L)
            rec = score(batch, greedy_decode(model, batch, max_batch=max_batch, place_offsets=place_offsets))
            used = place_offsets_of(cfg, batch, place_offsets)
            res.records.append(rec if used is None else rec | {"place_offsets": used})
    finally:
        model.train(was_training)
    return res


def evaluate_batch(model, batch: Batch, max_batch: int = 512, name: str | None = None,
                   place_offsets: Sequence[int] | str | None = None) -> EvalResult:
    """Greedy decoding of the answer positions of a batch, without a task: one record, scored on the mask.

    For the user's own data (`Batch.from_tokens`): each True position of ``batch.answer_mask`` is decoded
    from the model's argmax given everything before it (the prompt and the answers it already wrote), and
    compared with ``batch.tokens``. Rows may have different answer layouts (decoded one layout at a time);
    then ``per_position`` is omitted and ``exact_match`` counts the rows that have an answer.
    ``place_offsets``: decode averaging over place offsets, as `greedy_decode` does.
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
                pred[idx] = greedy_decode(model, batch.select(idx), max_batch=max_batch, place_offsets=place_offsets)
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
                      records=[rec], place_offsets=list(place_offsets) if isinstance(place_offsets, list | tuple)
                      else place_offsets)


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
