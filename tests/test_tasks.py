"""Tasks: features agree with pure-Python oracles (property tests), edge inputs, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probekit.tasks import Mixture, MultiplicationTask, ProbekitError, SortingTask, task_from_spec

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- sorting


def _stable_order(xs):
    return sorted(range(len(xs)), key=lambda i: (xs[i], i))


@FAST
@given(st.lists(st.integers(0, 9), min_size=1, max_size=12), st.sampled_from(["sort", "successor", "predecessor"]),
       st.sampled_from(["pairs", "successors"]))
def test_sorting_features_match_oracle(xs, objective, hint_format):
    task = SortingTask(n_values=10, objective=objective, hint_format=hint_format)
    b = task.batch_from_inputs([xs])
    f = {k: v[0].tolist() for k, v in b.features.items()}
    toks = b.tokens[0].tolist()
    L = len(xs)
    order = _stable_order(xs)
    # input positions 1..L
    assert [f["value"][1 + i] for i in range(L)] == xs
    assert [f["rank"][1 + i] for i in range(L)] == [order.index(i) for i in range(L)]
    for i in range(L):
        r = order.index(i)
        if r + 1 < L:
            assert f["successor_pos"][1 + i] == 1 + order[r + 1]
            assert f["successor_value"][1 + i] == xs[order[r + 1]]
        else:
            assert f["successor_pos"][1 + i] == -1 and f["successor_value"][1 + i] == -1
    # answers are the oracle's, at the positions the mask says, predicted from pred_mask positions
    pred_pos = torch.nonzero(b.pred_mask[0]).flatten().tolist()
    ans_pos = torch.nonzero(b.answer_mask[0]).flatten().tolist()
    assert [p + 1 for p in pred_pos] == ans_pos
    answers = [toks[p] for p in ans_pos]
    oracle = task.solve(xs)
    assert answers == [task.NONE if v is None else v for v in oracle]
    assert [f["target"][p] for p in pred_pos] == answers
    for p in pred_pos:
        src = f["target_src_pos"][p]
        if src >= 0:  # the source position holds the target value
            assert toks[src] == f["target"][p]
    if objective == "sort":
        assert oracle == sorted(xs)
        assert [f["target_src_pos"][p] for p in pred_pos] == [1 + i for i in order]
        for step, p in enumerate(pred_pos):
            y = oracle[step]
            assert f["copies_left"][p] == oracle[step:].count(y)
            assert f["prev_output"][p] == (oracle[step - 1] if step else -1)
    elif hint_format == "pairs":
        queries = [toks[p] for p in pred_pos]
        assert queries == xs and [f["prev_output"][p] for p in pred_pos] == xs
    else:  # successors alone, in input order: the query is implied by the answer's index
        assert toks == [task.objective_token(), *xs, task.SEP, *answers]
        assert [f["prev_output"][p] for p in pred_pos] == xs and b.pos_labels[-L:] == tuple(f"s{i}" for i in range(L))


def test_sorting_edges_all_equal_and_length_one():
    task = SortingTask(n_values=8)
    b = task.batch_from_inputs([[3, 3, 3, 3]])
    assert task.decode(b.tokens[0]) == "SORT 3 3 3 3 | 3 3 3 3"
    pp = torch.nonzero(b.pred_mask[0]).flatten()
    assert b.features["copies_left"][0, pp].tolist() == [4, 3, 2, 1]
    assert b.features["target_src_pos"][0, pp].tolist() == [1, 2, 3, 4]  # stable order
    succ = task.with_objective("successor").batch_from_inputs([[3, 3, 3, 3]])
    assert task.decode(succ.tokens[0]).startswith("SUCC 3 3 3 3 | 3 3 3 3 3 3 3 _")
    one = task.batch_from_inputs([[5]])
    assert task.decode(one.tokens[0]) == "SORT 5 | 5"
    assert one.features["successor_pos"][0, 1].item() == -1


def test_sorting_sample_deterministic_and_distinct():
    task = SortingTask(n_values=30, repeats=False)
    a = task.sample(64, length=20, seed=3)
    b = task.sample(64, length=20, seed=3)
    c = task.sample(64, length=20, seed=4)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    inputs = a.meta["inputs"]
    assert all(len(set(row.tolist())) == 20 for row in inputs)
    assert a.tokens.shape == (64, task.seq_len(20))


def test_sorting_value_subsets_give_repeat_rich_lists():
    uniform = SortingTask(n_values=64)
    b0 = uniform.sample(400, length=20, seed=5)
    # value_subsets=0 is the plain uniform stream, draw for draw
    assert torch.equal(b0.meta["inputs"], torch.from_numpy(np.random.default_rng(5).integers(0, 64, size=(400, 20))))
    rich = SortingTask(n_values=64, value_subsets=1.0).sample(400, length=20, seed=5)
    max_copies = lambda x: torch.stack([torch.bincount(r, minlength=64).max() for r in x])  # noqa: E731
    assert max_copies(rich.meta["inputs"]).float().mean() > 2 * max_copies(b0.meta["inputs"]).float().mean()
    # a length-100 uniform list repeats a value about as often as the repeat-rich length-20 lists do
    long = uniform.sample(400, length=100, seed=5)
    assert max_copies(long.meta["inputs"]).float().mean() < max_copies(rich.meta["inputs"]).float().mean()
    for row, toks in zip(rich.meta["inputs"][:50], rich.tokens[:50], strict=True):
        assert toks[22:].tolist() == sorted(row.tolist())
    half = SortingTask(n_values=64, value_subsets=0.5).sample(400, length=20, seed=5)
    assert max_copies(b0.meta["inputs"]).float().mean() < max_copies(half.meta["inputs"]).float().mean() \
        < max_copies(rich.meta["inputs"]).float().mean()
    assert task_from_spec(SortingTask(value_subsets=0.5).spec()) == SortingTask(value_subsets=0.5)
    assert "value_subsets" not in uniform.spec()  # specs of models saved before the field stay as they were
    with pytest.raises(ProbekitError, match=r"value_subsets must be a fraction in \[0, 1\], got 1.5"):
        SortingTask(value_subsets=1.5)
    with pytest.raises(ProbekitError, match="value_subsets needs repeats=True"):
        SortingTask(repeats=False, value_subsets=0.5)


def test_sorting_bad_input():
    with pytest.raises(ProbekitError, match="unknown objective 'reverse'"):
        SortingTask(objective="reverse")
    with pytest.raises(ProbekitError, match="hint_format = 'query'; expected one of"):
        SortingTask(hint_format="query")
    with pytest.raises(ProbekitError, match="needs 20 distinct values"):
        SortingTask(n_values=10, repeats=False).sample(4, length=20)
    with pytest.raises(ProbekitError, match="n must be a positive integer"):
        SortingTask().sample(0)
    with pytest.raises(ProbekitError, match="input values must be in 0..9"):
        SortingTask(n_values=10).batch_from_inputs([[1, 12]])


# ----------------------------------------------------------------------------- multiplication


@FAST
@given(st.integers(0, 99999), st.integers(0, 99999), st.booleans())
def test_multiplication_features_rebuild_product(a, b, reverse):
    task = MultiplicationTask(digits=5, reverse=reverse)
    batch = task.batch_from_operands([a], [b])
    f = {k: v[0] for k, v in batch.features.items()}
    pp = batch.pred_mask[0]
    k = f["digit_index"][pp].tolist()
    S = f["column_sum"][pp].tolist()
    cin = f["carry_in"][pp].tolist()
    cout = f["carry_out"][pp].tolist()
    d = f["digit"][pp].tolist()
    by_k = {ki: (s, ci, co, di) for ki, s, ci, co, di in zip(k, S, cin, cout, d, strict=True)}
    assert sorted(by_k) == list(range(10))
    c = 0
    for ki in range(10):
        s, ci, co, di = by_k[ki]
        assert s == sum(((a // 10**i) % 10) * ((b // 10**(ki - i)) % 10) for i in range(5) if 0 <= ki - i < 5)
        assert ci == c and di == (s + c) % 10 and co == (s + c) // 10
        c = co
    product = sum(by_k[ki][3] * 10**ki for ki in range(10))
    assert product == task.solve((a, b)) == a * b
    # answer tokens are the digits in the written order
    ans = batch.tokens[0][batch.answer_mask[0]].tolist()
    digits = [int(ch) for ch in str(a * b).zfill(10)]
    assert ans == (digits[::-1] if reverse else digits)
    assert batch.meta["a"][0].item() == a and batch.meta["b"][0].item() == b
    assert batch.meta["n_carries"][0].item() == sum(1 for ki in range(10) if by_k[ki][2] > 0)


def _written_oracle(a: int, b: int, wa: int, wb: int, reverse: bool, reverse_operands: bool):
    """Tokens, operand features and position labels of ``a x b``, by hand from the digits' strings."""
    sa, sb, sp = str(a).zfill(wa), str(b).zfill(wb), str(a * b).zfill(wa + wb)
    wa_, wb_ = (sa[::-1], sb[::-1]) if reverse_operands else (sa, sb)
    pa = list(range(wa)) if reverse_operands else list(range(wa))[::-1]
    pb = list(range(wb)) if reverse_operands else list(range(wb))[::-1]
    prod = sp[::-1] if reverse else sp
    tokens = [int(c) for c in wa_] + [10] + [int(c) for c in wb_] + [11] + [int(c) for c in prod]
    ks = list(range(wa + wb)) if reverse else list(range(wa + wb))[::-1]
    labels = [f"a{i}" for i in pa] + ["*"] + [f"b{j}" for j in pb] + ["="] + [f"d{k}" for k in ks]
    return tokens, pa, pb, labels


@FAST
@given(st.integers(0, 10**6), st.integers(1, 6), st.integers(1, 3), st.booleans(), st.booleans())
def test_multiplication_written_order_matches_oracle(seed, da, db, reverse, reverse_operands):
    """Tokens, place/operand_digit features and position labels, in both operand orders, against strings."""
    task = MultiplicationTask(digits=da, b_digits=db, reverse=reverse, reverse_operands=reverse_operands)
    batch = task.sample(3, seed=seed)
    for r in range(3):
        a, b = int(batch.meta["a"][r]), int(batch.meta["b"][r])
        tokens, pa, pb, labels = _written_oracle(a, b, da, db, reverse, reverse_operands)
        f = {k: v[r].tolist() for k, v in batch.features.items()}
        assert batch.tokens[r].tolist() == tokens and list(batch.pos_labels) == labels
        assert f["place"][:da] == pa and f["place"][da + 1:da + 1 + db] == pb
        assert f["operand_digit"][:da + 1 + db] == tokens[:da] + [-1] + tokens[da + 1:da + 1 + db]
        # product digit k, read where its logits are, is the k-th digit of a*b from the units
        pp = batch.pred_mask[r]
        digits = [int(c) for c in str(a * b).zfill(da + db)[::-1]]
        assert [digits[k] for k in batch.features["digit_index"][r][pp].tolist()] == batch.features["digit"][r][pp].tolist()
    assert task_from_spec(task.spec()) == task
    assert ("reverse_operands" in task.spec()) == reverse_operands  # older specs read as they did


def test_reverse_operands_corruptions_edit_the_same_digits():
    """The task's corruption rules pick the same digit edits whichever order the operands are written in."""
    fwd, rev = MultiplicationTask(digits=5, b_digits=1), MultiplicationTask(digits=5, b_digits=1, reverse_operands=True)
    for kind, opts in [("carry-flip", {"digit": 3}), ("operand-digit", {"place": 2}), ("random-digit", {})]:
        edits = [t.corruptions()[kind](t.sample(64, seed=4), np.random.default_rng(0), **opts) for t in (fwd, rev)]
        assert np.array_equal(edits[0].valid, edits[1].valid) and edits[0].valid.any()
        for k in ("a", "b"):
            assert torch.equal(edits[0].corrupted.meta[k], edits[1].corrupted.meta[k])
        assert {k: v.tolist() for k, v in edits[0].record.items()} == {k: v.tolist() for k, v in edits[1].record.items()}


def test_multiplication_edges_zeros_and_nines():
    task = MultiplicationTask(digits=3)
    z = task.batch_from_operands([0], [0])
    assert task.decode(z.tokens[0]) == "0 0 0 * 0 0 0 = 0 0 0 0 0 0"
    assert z.meta["n_carries"][0].item() == 0
    n = task.batch_from_operands([999], [999])  # 998001, carries exceed 1
    assert task.decode(n.tokens[0]) == "9 9 9 * 9 9 9 = 1 0 0 8 9 9"
    assert n.features["carry_out"][0].max().item() > 1
    assert n.features["place"][0, :3].tolist() == [2, 1, 0]


def test_multiplication_simple_samples_and_lengths():
    task = MultiplicationTask(digits=4, simple_fraction=1.0)
    b = task.sample(200, seed=0)
    for v in b.meta["b"].tolist():
        assert sum(ch != "0" for ch in str(v)) <= 1
    t = MultiplicationTask(digits=3, pad_to=3)
    assert t.sample(5, length=1).tokens.shape[1] == t.seq_len(3) == 3 + 1 + 3 + 1 + 6
    assert t.sample(5, length=4).tokens.shape[1] == t.seq_len(4)
    five_by_one = MultiplicationTask(digits=5, b_digits=1)
    assert five_by_one.seq_len() == 5 + 1 + 1 + 1 + 6


def test_task_spec_roundtrip_and_bad_spec():
    for t in (SortingTask(n_values=10, objective="successor"), MultiplicationTask(digits=2, reverse=False)):
        assert task_from_spec(t.spec()) == t
    with pytest.raises(ProbekitError, match="unknown task 'addition'"):
        task_from_spec({"name": "addition"})
    with pytest.raises(ProbekitError, match=r"unknown field\(s\) \['colour'\]"):
        task_from_spec({"name": "sorting", "colour": 3})
    with pytest.raises(ProbekitError, match="SortingTask.value_subsets = 'x'; expected a finite number"):
        task_from_spec({"name": "sorting", "value_subsets": "x"})
    with pytest.raises(ProbekitError, match="SortingTask.repeats = 1; expected true or false"):
        task_from_spec({"name": "sorting", "repeats": 1})
    with pytest.raises(ProbekitError, match="MultiplicationTask.digits = True; expected an integer"):
        task_from_spec({"name": "multiplication", "digits": True})
    assert task_from_spec({"name": "multiplication", "b_digits": None, "simple_fraction": 0}).b_digits is None


def test_mixture_samples_every_objective_deterministically():
    m = Mixture(SortingTask(n_values=10), {"sort": 1.0, "successor": 1.0})
    seen = {m.sample(4, length=5, seed=s).objective for s in range(20)}
    assert seen == {"sort", "successor"}
    assert torch.equal(m.sample(4, length=5, seed=7).tokens, m.sample(4, length=5, seed=7).tokens)
    with pytest.raises(ProbekitError, match="unknown objective 'count'"):
        Mixture(SortingTask(), {"count": 1.0})
