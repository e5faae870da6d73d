"""Corruptions, checked against the tasks' own ground-truth features (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probekit.corruptions import CORRUPTIONS, corrupt, make_pair
from probekit.tasks import MultiplicationTask, ProbekitError, SortingTask


def _digits(batch):
    """Operand digits, units first, from the operand features."""
    f = batch.features
    op, d = f["operand"][0], f["operand_digit"]
    a = d[:, op == 0].flip(1)
    b = d[:, op == 1].flip(1)
    return a, b


def _at_digit(batch, name, k):
    """Feature ``name`` at the predicting position of product digit k, one value per row."""
    col = (batch.features["digit_index"][0] == k).nonzero().flatten()
    assert len(col) == 1
    return batch.features[name][:, col[0]]


def _column_products(a, b, k):
    wa, wb = a.shape[1], b.shape[1]
    return torch.stack([a[:, i] * b[:, k - i] if 0 <= k - i < wb else torch.zeros(a.shape[0], dtype=torch.long)
                        for i in range(wa)], 1)


def _check_carry_flip(task, pair, k):
    clean, corr = pair.clean, pair.corrupted
    assert clean.tokens.shape == corr.tokens.shape and torch.equal(clean.answer_mask, corr.answer_mask)
    a, b = _digits(clean)
    a2, b2 = _digits(corr)
    # the carry into digit k changes in every row; so does digit k itself
    assert (_at_digit(clean, "carry_in", k) != _at_digit(corr, "carry_in", k)).all()
    assert (_at_digit(clean, "target", k) != _at_digit(corr, "target", k)).all()
    # column k: every product and the column sum are kept
    assert torch.equal(_column_products(a, b, k), _column_products(a2, b2, k))
    assert torch.equal(_at_digit(clean, "column_sum", k), _at_digit(corr, "column_sum", k))
    # exactly one operand digit changed, at a place below k; places >= k kept
    changed = torch.cat([a != a2, b != b2], 1)
    assert (changed.sum(1) == 1).all()
    assert torch.equal(a[:, k:], a2[:, k:]) and torch.equal(b[:, k:], b2[:, k:])
    places = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])
    assert (places[changed.nonzero()[:, 1]] < k).all()
    # the record says what changed
    rec = pair.changed
    rows = torch.arange(clean.n)
    for r in rows.tolist():
        x, x2 = (a, a2) if rec["operand"][r] == 0 else (b, b2)
        assert x[r, rec["place"][r]] == rec["old"][r] and x2[r, rec["place"][r]] == rec["new"][r]
    # the metric's default step is the step that writes digit k
    step = pair.answer_steps[0]
    assert int(clean.features["digit_index"][0][clean.pred_mask[0]][step]) == k


@pytest.mark.parametrize("digits,b_digits,k", [(5, 1, 3), (3, 3, 2), (2, 1, 1), (4, 2, 5)])
def test_carry_flip_changes_carry_and_keeps_column(digits, b_digits, k):
    task = MultiplicationTask(digits=digits, b_digits=b_digits)
    pair = corrupt(task, task.sample(200, seed=1), "carry-flip", seed=0, digit=k)
    assert pair.n == 200
    _check_carry_flip(task, pair, k)


def test_carry_flip_only_lower_digits_of_a_in_5x1():
    """In 5 x 1 every digit of a below k stays out of column k: the brief's 'digit of a in lower columns'."""
    task = MultiplicationTask(digits=5, b_digits=1)
    pair = corrupt(task, task.sample(100, seed=2), "carry-flip", seed=3, digit=3, operand="a")
    assert (pair.changed["operand"] == 0).all()
    _check_carry_flip(task, pair, 3)


def test_invalid_rows_resampled_or_dropped_and_counted():
    task = MultiplicationTask(digits=2, b_digits=1)
    batch = task.sample(300, seed=0)
    res = corrupt(task, batch, "carry-flip", seed=0, digit=1)
    drop = corrupt(task, batch, "carry-flip", seed=0, digit=1, invalid="drop")
    # brute-force oracle in plain Python: rows with no single-digit edit below place 1 that moves the
    # carry into digit 1 (a0*b0 // 10) while keeping column 1's products (a1*b0, a0*b1 with b1 = 0)
    a, b = _digits(batch)

    def ok(a0, a1, b0, new_a0, new_b0):
        return (a0 * b0) // 10 != (new_a0 * new_b0) // 10 and (new_b0 == b0 or a1 == 0)

    impossible = sum(not any(ok(a0, a1, b0, v, b0) for v in range(10) if v != a0) and
                     not any(ok(a0, a1, b0, a0, v) for v in range(10) if v != b0)
                     for (a0, a1), (b0,) in zip(a.tolist(), b.tolist(), strict=True))
    assert res.n_invalid == drop.n_invalid == impossible > 0
    assert res.n == 300 and drop.n == 300 - drop.n_invalid
    assert "replaced" in res.description and "dropped" in drop.description
    _check_carry_flip(task, res, 1)
    _check_carry_flip(task, drop, 1)


@pytest.mark.parametrize("digits,b_digits,k,operand", [(5, 1, 3, "a"), (5, 1, 0, "a"), (3, 3, 2, None),
                                                        (3, 2, 3, "b")])
def test_column_digit_keeps_the_carry_and_changes_the_digit(digits, b_digits, k, operand):
    """Oracle from the integers: c_k = (sum of a_i b_j 10**(i+j) over i + j < k) div 10**k is kept, digit k
    of the product changes, and the one edited digit enters column k with a non-zero partner."""
    task = MultiplicationTask(digits=digits, b_digits=b_digits)
    pair = corrupt(task, task.sample(150, seed=5), "column-digit", seed=1, digit=k, operand=operand)
    a, b = _digits(pair.clean)
    a2, b2 = _digits(pair.corrupted)

    def carry_in(x, y):
        return sum(int(x[i]) * int(y[j]) * 10 ** (i + j) for i in range(len(x)) for j in range(len(y))
                   if i + j < k) // 10 ** k

    for r in range(pair.n):
        assert carry_in(a[r], b[r]) == carry_in(a2[r], b2[r])
        prod = int(pair.clean.meta["a"][r] * pair.clean.meta["b"][r])
        prod2 = int(pair.corrupted.meta["a"][r] * pair.corrupted.meta["b"][r])
        assert (prod // 10 ** k) % 10 != (prod2 // 10 ** k) % 10
        edits = [(x, y, i) for x, x2, y in ((a, a2, b), (b, b2, a)) for i in range(x.shape[1]) if x[r, i] != x2[r, i]]
        assert len(edits) == 1
        x, y, i = edits[0]
        assert 0 <= k - i < y.shape[1] and y[r, k - i] != 0  # it enters column k, with a non-zero partner
        if (digits, b_digits) == (5, 1):  # in 5 x 1 only a_k enters column k
            assert x is a and i == k
        if operand is not None:
            assert (x is a) == (operand == "a")
    assert int(pair.clean.features["digit_index"][0][pair.clean.pred_mask[0]][pair.answer_steps[0]]) == k


def test_column_digit_refuses_a_column_without_products():
    task = MultiplicationTask(digits=5, b_digits=1)
    with pytest.raises(ProbekitError, match="impossible for every row"):
        corrupt(task, task.sample(20, seed=0), "column-digit", digit=5, invalid="drop")
    with pytest.raises(ProbekitError, match="column-digit digit must be in 0..5"):
        corrupt(task, task.sample(4, seed=0), "column-digit", digit=6)


def test_operand_digit_changes_exactly_that_digit():
    task = MultiplicationTask(digits=3, b_digits=2)
    pair = corrupt(task, task.sample(100, seed=4), "operand-digit", seed=0, operand="b", place=1)
    a, b = _digits(pair.clean)
    a2, b2 = _digits(pair.corrupted)
    assert torch.equal(a, a2)
    assert (b[:, 1] != b2[:, 1]).all() and torch.equal(b[:, 0], b2[:, 0])
    assert (pair.clean.meta["a"] * pair.clean.meta["b"] != pair.corrupted.meta["a"] * pair.corrupted.meta["b"]).all()
    assert pair.answer_steps is None


def test_resample_keeps_shape_and_layout():
    for task in (MultiplicationTask(digits=3), SortingTask(n_values=16, repeats=True)):
        b = task.sample(50, length=4, seed=0)
        pair = corrupt(task, b, "resample", seed=1)
        assert pair.corrupted.tokens.shape == b.tokens.shape
        assert torch.equal(pair.corrupted.answer_mask, b.answer_mask)
        assert not torch.equal(pair.corrupted.tokens, b.tokens)


@pytest.mark.parametrize("repeats", [True, False])
def test_successor_change_keeps_prefix_changes_target(repeats):
    task = SortingTask(n_values=16, repeats=repeats)
    r = 3
    pair = corrupt(task, task.sample(200, length=7, seed=5), "successor-change", seed=0, step=r)
    c, k = pair.clean, pair.corrupted
    ans = c.answer_mask[0].nonzero().flatten()
    pred = c.pred_mask[0].nonzero().flatten()
    assert torch.equal(c.tokens[:, ans[:r]], k.tokens[:, ans[:r]])  # emitted prefix kept
    assert (c.features["target"][:, pred[r]] != k.features["target"][:, pred[r]]).all()  # successor changed
    assert torch.equal(c.features["prev_output"][:, pred[r]], k.features["prev_output"][:, pred[r]])
    assert pair.answer_steps == (r,)
    x, x2 = c.meta["inputs"], k.meta["inputs"]
    assert ((x != x2).sum(1) == 1).all()  # one input element edited
    if not repeats:
        assert all(len(set(row)) == len(row) for row in x2.tolist())


def test_successor_change_step_zero_changes_the_minimum():
    task = SortingTask(n_values=16, repeats=True)
    pair = corrupt(task, task.sample(50, length=5, seed=6), "successor-change", seed=1, step=0)
    pred = pair.clean.pred_mask[0].nonzero().flatten()
    assert (pair.clean.features["target"][:, pred[0]] != pair.corrupted.features["target"][:, pred[0]]).all()


def test_swap_keeps_sorted_answer():
    task = SortingTask(n_values=16, repeats=True)
    pair = corrupt(task, task.sample(200, length=6, seed=7), "swap", seed=0)
    c, k = pair.clean, pair.corrupted
    ans = c.answer_mask
    assert torch.equal(c.tokens[ans], k.tokens[ans])  # identical sorted answer
    x, x2 = c.meta["inputs"], k.meta["inputs"]
    diff = x != x2
    assert (diff.sum(1) == 2).all()  # exactly two positions differ, and they are exchanged
    i, j = pair.changed["i"], pair.changed["j"]
    rows = torch.arange(c.n)
    assert torch.equal(x[rows, i], x2[rows, j]) and torch.equal(x[rows, j], x2[rows, i])
    fixed = corrupt(task, task.sample(50, length=6, seed=8), "swap", seed=0, positions=(0, 5))
    assert (fixed.changed["i"] == 0).all() and (fixed.changed["j"] == 5).all()


def test_deterministic_given_seed():
    task = MultiplicationTask(digits=4, b_digits=2)
    b = task.sample(64, seed=0)
    p1, p2 = (corrupt(task, b, "carry-flip", seed=9, digit=3) for _ in range(2))
    assert torch.equal(p1.corrupted.tokens, p2.corrupted.tokens)
    p3 = corrupt(task, b, "carry-flip", seed=10, digit=3)
    assert not torch.equal(p1.corrupted.tokens, p3.corrupted.tokens)


def test_bad_input_raises():
    mult, sort = MultiplicationTask(digits=3), SortingTask(n_values=16)
    mb, sb = mult.sample(8, seed=0), sort.sample(8, length=4, seed=0)
    with pytest.raises(ProbekitError, match="not defined for task 'multiplication'"):
        corrupt(mult, mb, "successor-change")
    with pytest.raises(ProbekitError, match="not defined for task 'sorting'"):
        corrupt(sort, sb, "carry-flip")
    with pytest.raises(ProbekitError, match="carry into digit 0"):
        corrupt(mult, mb, "carry-flip", digit=0)
    with pytest.raises(ProbekitError, match="'sort' objective"):
        succ = sort.with_objective("successor")
        corrupt(succ, succ.sample(8, length=4), "swap")
    with pytest.raises(ProbekitError, match="swap positions"):
        corrupt(sort, sb, "swap", positions=(1, 1))
    with pytest.raises(ProbekitError, match="place 7 out of range"):
        corrupt(mult, mb, "operand-digit", place=7)
    with pytest.raises(ProbekitError, match="identical shapes"):
        make_pair(sb, sort.sample(8, length=5))
    assert set(CORRUPTIONS) == {"multiplication", "sorting"}


@settings(max_examples=15, deadline=None)
@given(digits=st.integers(2, 5), b_digits=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_carry_flip_property(digits, b_digits, seed):
    task = MultiplicationTask(digits=digits, b_digits=b_digits)
    P = digits + b_digits
    k = int(np.random.default_rng(seed).integers(1, P))
    try:
        pair = corrupt(task, task.sample(40, seed=seed), "carry-flip", seed=seed, digit=k)
    except ProbekitError as e:  # e.g. the carry into the top digit cannot move while its column is kept
        assert "valid corruption" in str(e) or "impossible" in str(e)
        return
    _check_carry_flip(task, pair, k)


def _sha(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


# Stored before the corruption rules moved into the task files: (task, task kwargs, length, kind, options,
# seed, invalid policy) -> sha256 prefixes of the clean and corrupted tokens, answer steps, invalid rows.
GOLDEN = [
    ("mult", {"digits": 4, "b_digits": 2}, 4, "carry-flip", {"digit": 3}, 9, "resample",
     "1c859618cb49600f", "d894c5b6d035b323", (3,), 0),
    ("mult", {"digits": 2, "b_digits": 1}, None, "carry-flip", {"digit": 1}, 0, "drop",
     "6ddf994c4182cae7", "19b6ef755f22d857", (1,), 12),
    ("mult", {"digits": 2, "b_digits": 1}, None, "carry-flip", {"digit": 1}, 0, "resample",
     "41074b4c1bf44159", "69ae2f5f1f2d176f", (1,), 12),
    ("mult", {"digits": 3, "b_digits": 2}, None, "operand-digit", {"operand": "b", "place": 1}, 0, "resample",
     "64c13ef2d12b3569", "a9d40cd227e388f6", None, 1),
    ("mult", {"digits": 3}, None, "resample", {}, 1, "resample", "295ac64f17f61d2a", "d19014c0f8dfe439", None, 0),
    ("sort", {"n_values": 16, "repeats": True}, 7, "successor-change", {"step": 3}, 0, "resample",
     "e32155a6b42ced2d", "93054f51195af95a", (3,), 4),
    ("sort", {"n_values": 16, "repeats": False}, 7, "successor-change", {"step": 3}, 2, "resample",
     "e11c5d5fb6688bfc", "97d8d0a05298291e", (3,), 0),
    ("sort", {"n_values": 16, "repeats": True}, 6, "swap", {}, 0, "resample",
     "5cf80dbe8c44d4dc", "b71fa6830b7c51e1", None, 0),
    ("sort", {"n_values": 16, "repeats": True}, 6, "swap", {"positions": (0, 5)}, 0, "resample",
     "234ee237a6fe0dd8", "9502b36697192aae", None, 4),
    ("sort", {"n_values": 16, "repeats": True}, 4, "resample", {}, 1, "resample",
     "ee6e757ae0a8a49c", "d5f79672f1b94d6d", None, 0),
]


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: f"{c[0]}-{c[3]}-{c[6]}")
def test_pairs_match_stored_values(case):
    name, kw, length, kind, opts, seed, invalid, clean_sha, corr_sha, steps, n_invalid = case
    task = (MultiplicationTask if name == "mult" else SortingTask)(**kw)
    pair = corrupt(task, task.sample(60, length=length, seed=5), kind, seed=seed, invalid=invalid, **opts)
    assert (_sha(pair.clean.tokens), _sha(pair.corrupted.tokens)) == (clean_sha, corr_sha)
    assert (pair.answer_steps, pair.n_invalid) == (steps, n_invalid)


# Stored from attribution's former corrupt_batch (sorting "replace", multiplication "digit") before these
# rules became the task kinds "replace" and "random-digit": sha256 prefixes of the corrupted tokens.
GOLDEN_FORMER_ATTRIBUTION = [
    ("sort", {"n_values": 16, "repeats": False}, 6, "replace", 4, "78df3e65e6bc9628"),
    ("sort", {"n_values": 16, "repeats": True}, 6, "replace", 1, "31887b7bf9f0fa99"),
    ("mult", {"digits": 3, "b_digits": 1}, None, "random-digit", 1, "7151ea1d737f98af"),
    ("mult", {"digits": 2, "b_digits": 2, "pad_to": 3}, None, "random-digit", 3, "6902e02d81da096f"),
]


@pytest.mark.parametrize("case", GOLDEN_FORMER_ATTRIBUTION, ids=lambda c: f"{c[0]}-{c[3]}-{c[4]}")
def test_former_attribution_corruptions_match_stored_values(case):
    name, kw, length, kind, seed, corr_sha = case
    task = (MultiplicationTask if name == "mult" else SortingTask)(**kw)
    batch = task.sample(60, length=length, seed=5)
    pair = corrupt(task, batch, kind, seed=seed)
    assert _sha(pair.corrupted.tokens) == corr_sha
    assert torch.equal(pair.clean.tokens, batch.tokens) and pair.n_invalid == 0


def test_replace_and_random_digit_change_one_input():
    task = SortingTask(n_values=16, repeats=False)
    b = task.sample(16, length=6, seed=1)
    pair = corrupt(task, b, "replace", seed=1)
    x, x2 = b.meta["inputs"], pair.corrupted.meta["inputs"]
    assert ((x != x2).sum(1) == 1).all()
    assert all(len(set(row)) == len(row) for row in x2.tolist())  # distinct values stay distinct
    rows = torch.arange(b.n)
    assert torch.equal(x2[rows, pair.changed["input_index"]], pair.changed["new"])
    assert (pair.clean.features["target"] != pair.corrupted.features["target"]).any(1).all()  # the answer moves
    hint = task.with_objective("successor")
    assert corrupt(hint, hint.sample(4, length=5), "replace").corrupted.objective == "successor"
    mtask = MultiplicationTask(digits=2, b_digits=1)
    mb = mtask.sample(16, length=2, seed=1)
    mc = corrupt(mtask, mb, "random-digit", seed=1).corrupted
    assert (mb.meta["b"] == mc.meta["b"]).all() and (mb.meta["a"] != mc.meta["a"]).all()
    assert ((mb.tokens[:, :2] != mc.tokens[:, :2]).sum(1) == 1).all()


def test_each_task_declares_its_kinds_and_options_are_checked():
    from probekit.corruptions import corruption_kinds
    from probekit.tasks import TASKS

    assert TASKS == {"multiplication": MultiplicationTask, "sorting": SortingTask}  # found in their files
    mult, sort = MultiplicationTask(digits=3), SortingTask(n_values=16)
    assert corruption_kinds(mult) == CORRUPTIONS["multiplication"] == ("carry-flip", "column-digit", "operand-digit",
                                                                       "random-digit",
                                                                       "resample")
    assert corruption_kinds(sort) == CORRUPTIONS["sorting"] == ("successor-change", "swap", "replace", "resample")
    with pytest.raises(ProbekitError, match=r"'resample' takes no options, got \['step'\]"):
        corrupt(sort, sort.sample(4, length=4), "resample", step=1)
    with pytest.raises(ProbekitError, match=r"takes options \['digit', 'operand'\], got \['place'\]"):
        corrupt(mult, mult.sample(4), "carry-flip", place=1)
