"""Sorting, and the hint tasks that share its vocabulary.

Worked example (values 0..63, length 4, repeats allowed), one sequence per objective::

    sort        SORT 5 3 9 3 | 3 3 5 9
    successor   SUCC 5 3 9 3 | 5 9 3 3 9 _ 3 5
    predecessor PRED 5 3 9 3 | 5 3 3 _ 9 5 3 3

With ``hint_format="successors"`` the hints answer with ``s_i`` alone, in input order (the query is
implied by the answer's index)::

    successor   SUCC 5 3 9 3 | 9 3 _ 5

A task token selects the objective. ``|`` separates prompt and answer. ``sort`` answers with the
list in ascending order. The hints answer with pairs ``x_i s_i`` in input order: the query ``x_i``
is given (not predicted) and the model predicts ``s_i``, the element that follows (``successor``)
or precedes (``predecessor``) the i-th input element in the *stable* sorted order (equal values
keep their input order). ``_`` marks "none" (the last element has no successor, the first no
predecessor). The successor hint trains exactly the lookup a sort step needs: given the previous
output, find the next element in sorted order.

Features (LongTensor [batch, pos], -1 where undefined; ``*_pos`` are token positions):

- at input positions: ``value``, ``rank`` (index in the stable sorted order), ``successor_value``,
  ``successor_pos``, ``predecessor_pos``;
- at predicting positions (whose logits give an answer token): ``step`` (answer index),
  ``prev_output`` (the previous output for sort, the query for hints), ``target`` (the token to
  predict), ``target_src_pos`` (the input position that holds the target in the stable order),
  ``copies_left`` (sort: copies of the target value still to be written, the target included).

Values are uniform over ``0..n_values-1``. With ``value_subsets=f`` a fraction ``f`` of the lists
draws instead from ``k`` random values, ``k`` uniform in ``1..min(n_values, length)``, so that lists of length 20
hold as many copies of a value as lists of length 100 do. It is meant for training data only
(``TrainConfig.task_overrides``): long uniform lists are full of repeats, short ones are not.
With ``value_windows=f`` a fraction ``f`` of the lists draws its values from a random window of ``w``
consecutive values, ``w`` uniform in ``L..n_values`` (``1..n_values`` with repeats), so that short
training lists show the small gaps between consecutive sorted values that long lists have (with 256
values, about 12 apart at length 20 but 2.5 apart at length 100). Also a training-data device.

Position labels: ``sort x0 x1 ... | y0 y1 ...`` (hints: ``... | q0 s0 q1 s1 ...``, query and answer).

Corruptions (`corruptions`; ``ys`` the sorted list, sort answer step r writes ``ys[r]``):

- ``successor-change`` (opt ``step=r``, default length // 2): the input element that holds ``ys[r]``
  (in the stable order) gets a new value such that the emitted prefix ``ys[:r]`` is unchanged and the
  target ``ys[r]`` -- the successor of the last emitted value -- changes (respecting distinct values
  when the task has no repeats). One valid value is drawn uniformly per row; invalid if none exists.
- ``swap`` (opt ``positions=(i, j)``, default a random pair with different values): swap two input
  positions; the sorted answer is identical. Invalid if all values are equal.
- ``replace``: one random input element gets another value (an unused one without repeats), which
  changes the sorted answer from that value's place on (any objective).
- ``resample``: an independent list of the same length (any objective).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from probekit.checks import check_fields
from probekit.tasks.base import Batch, CorruptionRule, Edit, ProbekitError, check_n, resample_rule, rng_for

OBJECTIVES = ("sort", "successor", "predecessor")
HINT_FORMATS = ("pairs", "successors")
_OBJ_TOKEN = {"sort": "SORT", "successor": "SUCC", "predecessor": "PRED"}


@dataclass(frozen=True)
class SortingTask:
    """Sort a list of values ``0..n_values-1``; or answer a hint about it (see module docstring)."""

    n_values: int = 64
    repeats: bool = True
    objective: str = "sort"
    default_length: int = 20
    value_subsets: float = 0.0
    value_windows: float = 0.0
    hint_format: str = "pairs"
    name: str = "sorting"
    display_length: ClassVar[int] = 10  # the length of the example shown in figures and attention views
    probe_feature: ClassVar[str] = "target"  # the feature probed when none is named

    def __post_init__(self):
        check_fields(self, "SortingTask")
        if self.default_length < 1:
            raise ProbekitError(f"SortingTask.default_length = {self.default_length}; expected an integer >= 1")
        if self.objective not in OBJECTIVES:
            raise ProbekitError(f"unknown objective {self.objective!r} for task 'sorting'; expected one of {list(OBJECTIVES)}")
        if self.hint_format not in HINT_FORMATS:
            raise ProbekitError(f"SortingTask.hint_format = {self.hint_format!r}; expected one of {list(HINT_FORMATS)}")
        if not (2 <= self.n_values <= 1000):
            raise ProbekitError(f"n_values must be in 2..1000, got {self.n_values}")
        if not (0.0 <= self.value_subsets <= 1.0):
            raise ProbekitError(f"value_subsets must be a fraction in [0, 1], got {self.value_subsets}")
        if not (0.0 <= self.value_windows <= 1.0):
            raise ProbekitError(f"value_windows must be a fraction in [0, 1], got {self.value_windows}")
        if self.value_subsets > 0 and not self.repeats:
            raise ProbekitError("value_subsets needs repeats=True (a list drawn from a few values repeats them)")

    # vocabulary: values, then separator, none, objective tokens
    @property
    def objectives(self) -> tuple[str, ...]:
        return OBJECTIVES

    @property
    def vocab(self) -> tuple[str, ...]:
        return tuple(str(v) for v in range(self.n_values)) + ("|", "_") + tuple(_OBJ_TOKEN[o] for o in OBJECTIVES)

    @property
    def d_vocab(self) -> int:
        return len(self.vocab)

    @property
    def SEP(self) -> int:
        return self.n_values

    @property
    def NONE(self) -> int:
        return self.n_values + 1

    def objective_token(self, objective: str | None = None) -> int:
        return self.n_values + 2 + OBJECTIVES.index(objective or self.objective)

    def with_objective(self, objective: str) -> SortingTask:
        return replace(self, objective=objective)

    def spec(self) -> dict:
        spec = {"name": self.name, "n_values": self.n_values, "repeats": self.repeats,
                "objective": self.objective, "default_length": self.default_length}
        if self.value_subsets:
            spec["value_subsets"] = self.value_subsets
        if self.value_windows:
            spec["value_windows"] = self.value_windows
        if self.hint_format != "pairs":
            spec["hint_format"] = self.hint_format
        return spec

    def check_length(self, length: int | None) -> int:
        """The list length to use: ``default_length`` for None, else an integer >= 1 (<= n_values without repeats)."""
        if length is None:
            return self.default_length
        if isinstance(length, bool) or not isinstance(length, int | np.integer) or length < 1:
            raise ProbekitError(f"sorting length = {length!r}; expected an integer >= 1")
        if not self.repeats and length > self.n_values:
            raise ProbekitError(f"length {length} needs {length} distinct values but the range has {self.n_values}; "
                                "allow repeats or shorten")
        return int(length)

    def corruptions(self) -> dict[str, CorruptionRule]:
        """The corruption rules of this task (module docstring), ``{kind: rule(batch, rng, **options)}``."""
        return {"successor-change": self.successor_change, "swap": self.swap, "replace": self.replace_value,
                "resample": resample_rule(self)}

    def seq_len(self, length: int | None = None) -> int:
        L = self.check_length(length)
        return 2 + L + (L if self._one_token_answers else 2 * L)

    @property
    def _one_token_answers(self) -> bool:
        """One answer token per step (sort, or hints answered as successors alone), not query-answer pairs."""
        return self.objective == "sort" or self.hint_format == "successors"

    # ------------------------------------------------------------------ oracle
    def solve(self, inputs: list[int]) -> list[int | None]:
        """Pure-Python answer for one list: sorted values, or per-element successor/predecessor (None: none)."""
        xs = list(inputs)
        if self.objective == "sort":
            return sorted(xs)
        order = sorted(range(len(xs)), key=lambda i: (xs[i], i))  # stable sorted order
        rank = {i: r for r, i in enumerate(order)}
        step = 1 if self.objective == "successor" else -1
        out: list[int | None] = []
        for i in range(len(xs)):
            r = rank[i] + step
            out.append(xs[order[r]] if 0 <= r < len(xs) else None)
        return out

    def decode(self, tokens) -> str | list[str]:
        t = torch.as_tensor(tokens)
        if t.ndim == 2:
            return [self.decode(row) for row in t]
        return " ".join(self.vocab[i] if 0 <= i < self.d_vocab else f"<{i}>" for i in t.tolist())

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, length: int | None = None, seed: int = 0) -> Batch:
        check_n(n)
        L = self.check_length(length)
        rng = rng_for(seed)
        if self.repeats:
            x = rng.integers(0, self.n_values, size=(n, L))
            if self.value_subsets > 0:
                # these rows draw from k random values, k uniform in 1..min(n_values, L): many copies per value
                sub = rng.random(n) < self.value_subsets
                k = rng.integers(1, min(self.n_values, L) + 1, size=n)
                perm = np.argsort(rng.random((n, self.n_values)), axis=1)
                pick = (rng.random((n, L)) * k[:, None]).astype(np.int64)
                xs = np.take_along_axis(perm, pick, axis=1)
                x = np.where(sub[:, None], xs, x)
        else:
            x = np.argsort(rng.random((n, self.n_values)), axis=1)[:, :L]
        if self.value_windows > 0:
            x = self._windowed(rng, x, L)
        return self.batch_from_inputs(x)

    def _windowed(self, rng: np.random.Generator, x: np.ndarray, L: int) -> np.ndarray:
        """Replace a ``value_windows`` fraction of the rows of ``x`` by lists drawn from a window of values."""
        n = x.shape[0]
        lo = 1 if self.repeats else L
        w = rng.integers(lo, self.n_values + 1, size=n)  # window widths
        start = (rng.random(n) * (self.n_values - w + 1)).astype(np.int64)
        if self.repeats:
            offs = (rng.random((n, L)) * w[:, None]).astype(np.int64)
        else:  # L distinct offsets below w: the first L of a random order of 0..w-1 (keys >= w sort last)
            keys = rng.random((n, self.n_values)) + (np.arange(self.n_values)[None, :] >= w[:, None])
            offs = np.argsort(keys, axis=1)[:, :L]
        win = rng.random(n) < self.value_windows
        return np.where(win[:, None], start[:, None] + offs, x)

    def batch_from_inputs(self, x) -> Batch:
        """Build a Batch (tokens + features) from an integer array of lists ``[batch, length]``."""
        x = self._check_inputs(x)
        n, L = x.shape
        rows = np.arange(n)[:, None]
        order = np.argsort(x, axis=1, kind="stable")  # [n, L]: input index of the r-th sorted element
        inp0 = 1  # token position of input element 0
        sep = 1 + L
        T = self.seq_len(L)
        tokens = np.full((n, T), -1, dtype=np.int64)
        tokens[:, 0] = self.objective_token()
        tokens[:, inp0:inp0 + L] = x
        tokens[:, sep] = self.SEP
        answer_mask = np.zeros((n, T), dtype=bool)
        feats = {k: np.full((n, T), -1, dtype=np.int64) for k in
                 ("value", "rank", "successor_value", "successor_pos", "predecessor_pos",
                  "step", "prev_output", "target", "target_src_pos", "copies_left")}
        succ_idx, pred_idx = _input_features(feats, x, order, inp0)
        if self.objective == "sort":
            _sort_answers(tokens, answer_mask, feats, x[rows, order], order, sep, inp0)
        else:
            other = succ_idx if self.objective == "successor" else pred_idx
            self._query_answers(tokens, answer_mask, feats, x, other, sep, inp0)
        assert (tokens >= 0).all()
        return Batch(
            tokens=torch.from_numpy(tokens),
            answer_mask=torch.from_numpy(answer_mask),
            features={k: torch.from_numpy(v) for k, v in feats.items()},
            task=self.name,
            objective=self.objective,
            length=L,
            prompt_len=sep + 1,
            meta={"inputs": torch.from_numpy(x)},
            pos_labels=self._pos_labels(L, T),
        )

    def _check_inputs(self, x) -> np.ndarray:
        """``x`` as an int64 array ``[batch, length>=1]`` of values in ``0..n_values-1``, else refused."""
        x = np.asarray(x, dtype=np.int64)
        if x.ndim != 2 or x.shape[1] < 1:
            raise ProbekitError(f"expected inputs of shape [batch, length>=1], got {x.shape}")
        if x.min() < 0 or x.max() >= self.n_values:
            raise ProbekitError(f"input values must be in 0..{self.n_values - 1}, got range {x.min()}..{x.max()}")
        return x

    def _query_answers(self, tokens, answer_mask, feats, x, other, sep: int, inp0: int) -> None:
        """successor / predecessor objectives: ``q_r s_r`` pairs (or ``s_r`` alone), the answer of input
        ``r``'s neighbour in sorted order (``other``: its input index, -1 for none) or `NONE`. The
        predicting position ``q_pos`` is the query's (pairs) or the token before ``s_r``."""
        steps = np.arange(x.shape[1])
        rows = np.arange(x.shape[0])[:, None]
        has = other >= 0
        s = np.where(has, x[rows, np.maximum(other, 0)], self.NONE)
        if self.hint_format == "pairs":
            q_pos = sep + 1 + 2 * steps
            tokens[:, q_pos] = x
        else:
            q_pos = sep + steps
        tokens[:, q_pos + 1] = s
        answer_mask[:, q_pos + 1] = True
        feats["step"][:, q_pos] = steps
        feats["prev_output"][:, q_pos] = x
        feats["target"][:, q_pos] = s
        feats["target_src_pos"][:, q_pos] = np.where(has, other + inp0, -1)

    def _pos_labels(self, L: int, T: int) -> tuple[str, ...]:
        """Structural position labels: objective, ``x0..``, ``|``, then ``y0..`` (sort) or ``q0 s0 ..``."""
        sep = 1 + L
        labels = [self.objective] + [f"x{i}" for i in range(L)] + ["|"] + [""] * (T - sep - 1)
        if self._one_token_answers:
            for r in range(L):
                labels[sep + 1 + r] = f"y{r}" if self.objective == "sort" else f"s{r}"
        else:
            for r in range(L):
                labels[sep + 1 + 2 * r], labels[sep + 2 + 2 * r] = f"q{r}", f"s{r}"
        return tuple(labels)

    # ------------------------------------------------------------------ corruptions
    def _corrupted(self, batch: Batch, x2) -> Batch:
        return self.with_objective(batch.objective).batch_from_inputs(x2)

    def successor_change(self, batch: Batch, rng: np.random.Generator, step=None) -> Edit:
        """The input holding sorted value ``step`` gets a new value: prefix kept, the target at ``step`` changes."""
        _check_sort(batch, "successor-change")
        x = batch.meta["inputs"].numpy()
        n, L = x.shape
        r = L // 2 if step is None else int(step)
        if not 0 <= r < L:
            raise ProbekitError(f"successor-change step must be in 0..{L - 1} (answer steps of length {L}), got {r}")
        order = np.argsort(x, axis=1, kind="stable")
        ys = np.take_along_axis(x, order, 1)
        src = order[:, r]  # input index holding ys[r]
        V = self.n_values
        cand = np.repeat(x[:, None, :], V, axis=1)  # n V L
        cand[np.arange(n), :, src] = np.arange(V)[None, :]
        ys2 = np.sort(cand, axis=2)
        ok = (ys2[:, :, :r] == ys[:, None, :r]).all(2) & (ys2[:, :, r] != ys[:, None, r])
        if not self.repeats:
            others = np.ones((n, V), dtype=bool)
            mask = np.ones((n, L), dtype=bool)
            mask[np.arange(n), src] = False
            for j in range(L):
                hit = mask[:, j]
                others[hit, x[hit, j]] = False
            ok &= others
        valid = ok.any(1)
        pick = (rng.random(ok.shape) * ok).argmax(1)
        x2 = x.copy()
        x2[valid, src[valid]] = pick[valid]
        rec = {"input_index": np.where(valid, src, -1), "old": np.where(valid, x[np.arange(n), src], -1),
               "new": np.where(valid, pick, -1)}
        desc = (f"successor-change at answer step {r}: the input element holding sorted value {r} gets a new value so "
                f"the emitted prefix (steps 0..{r - 1}) is unchanged and the target at step {r} changes")
        return Edit(self._corrupted(batch, x2), valid, rec, desc, (f"sorted prefix ys[:{r}]", "list length"),
                    {"step": r}, r)

    def swap(self, batch: Batch, rng: np.random.Generator, positions=None) -> Edit:
        """Two input positions with different values exchanged (``positions`` or a random pair)."""
        _check_sort(batch, "swap")
        x = batch.meta["inputs"].numpy()
        n, L = x.shape
        if positions is not None:
            i, j = (int(p) for p in positions)
            if not (0 <= i < L and 0 <= j < L and i != j):
                raise ProbekitError(f"swap positions must be two different input indices in 0..{L - 1}, got {positions!r}")
            ii, jj = np.full(n, i), np.full(n, j)
            valid = x[:, i] != x[:, j]
        else:
            diff = x[:, :, None] != x[:, None, :]  # n L L
            valid = diff.any((1, 2))
            pick = (rng.random(diff.shape) * diff).reshape(n, -1).argmax(1)
            ii, jj = pick // L, pick % L
        x2 = x.copy()
        rows = np.flatnonzero(valid)
        x2[rows, ii[rows]], x2[rows, jj[rows]] = x[rows, jj[rows]], x[rows, ii[rows]]
        rec = {"i": np.where(valid, ii, -1), "j": np.where(valid, jj, -1)}
        desc = "swap: two input positions with different values exchanged; the sorted answer is identical"
        return Edit(self._corrupted(batch, x2), valid, rec, desc, ("sorted answer", "multiset of values"),
                    {"positions": positions})

    def replace_value(self, batch: Batch, rng: np.random.Generator) -> Edit:
        """One random input element gets another value (unused, without repeats)."""
        x = batch.meta["inputs"].numpy().copy()
        n, L = x.shape
        i = rng.integers(0, L, n)
        old = x[np.arange(n), i].copy()
        for r in range(n):
            unused = sorted(set(range(self.n_values)) - set(x[r].tolist())) if not self.repeats else []
            pool = unused or [v for v in range(self.n_values) if v != x[r, i[r]]]
            x[r, i[r]] = pool[int(rng.integers(len(pool)))]
        rec = {"input_index": i, "old": old, "new": x[np.arange(n), i].copy()}
        desc = "replace: one random input element set to another value"
        return Edit(self._corrupted(batch, x), np.ones(n, dtype=bool), rec, desc, ("list length",))


def _input_features(feats: dict, x: np.ndarray, order: np.ndarray, inp0: int) -> tuple[np.ndarray, np.ndarray]:
    """Fill the input-position features (value, rank, successor / predecessor); return the input index of
    each element's successor and predecessor in sorted order (-1 for none)."""
    n, L = x.shape
    rows = np.arange(n)[:, None]
    rank = np.empty_like(order)
    rank[rows, order] = np.arange(L)[None, :]
    succ_idx = np.full((n, L), -1)
    succ_idx[rows, order[:, :-1]] = order[:, 1:]
    pred_idx = np.full((n, L), -1)
    pred_idx[rows, order[:, 1:]] = order[:, :-1]
    feats["value"][:, inp0:inp0 + L] = x
    feats["rank"][:, inp0:inp0 + L] = rank
    has_succ = succ_idx >= 0
    feats["successor_pos"][:, inp0:inp0 + L] = np.where(has_succ, succ_idx + inp0, -1)
    feats["successor_value"][:, inp0:inp0 + L] = np.where(has_succ, x[rows, np.maximum(succ_idx, 0)], -1)
    feats["predecessor_pos"][:, inp0:inp0 + L] = np.where(pred_idx >= 0, pred_idx + inp0, -1)
    return succ_idx, pred_idx


def _sort_answers(tokens, answer_mask, feats: dict, ys: np.ndarray, order: np.ndarray, sep: int, inp0: int) -> None:
    """The sort objective's answer (``ys``, the sorted values) and the features at its predicting positions."""
    n, L = ys.shape
    steps = np.arange(L)
    ans = sep + 1 + steps  # token positions of the answer
    tokens[:, ans] = ys
    answer_mask[:, ans] = True
    pp = ans - 1  # predicting positions
    feats["step"][:, pp] = steps
    feats["target"][:, pp] = ys
    feats["target_src_pos"][:, pp] = order + inp0
    feats["prev_output"][:, pp[1:]] = ys[:, :-1]
    # copies of ys[r] among ys[r:], i.e. still to write (the target included)
    left = np.zeros((n, L), dtype=np.int64)
    for r in range(L):
        left[:, r] = (ys[:, r:] == ys[:, r:r + 1]).sum(axis=1)
    feats["copies_left"][:, pp] = left


def _check_sort(batch: Batch, kind: str) -> None:
    if batch.objective != "sort":
        raise ProbekitError(f"corruption {kind!r} is defined for the 'sort' objective, got {batch.objective!r}; "
                            "use 'replace' or 'resample'")
