"""Greedy evaluation: really autoregressive, scored against the task oracle, grouped by carries."""

from __future__ import annotations

import pytest
import torch

from probekit.evaluate import EvalResult, evaluate, greedy_decode, score, wilson
from probekit.tasks import MultiplicationTask, ProbekitError


def test_greedy_decode_matches_a_step_by_step_loop(tiny_sort):
    model, task = tiny_sort
    batch = task.sample(16, length=12, seed=5)  # longer than trained: some mistakes to propagate
    got = greedy_decode(model, batch, max_batch=5)
    ref = batch.tokens.clone()
    with torch.no_grad():
        for t in torch.nonzero(batch.answer_mask[0]).flatten().tolist():
            ref[:, t] = model(ref[:, :t])[:, -1].argmax(-1)
    assert torch.equal(got, ref)
    # decoded answers are judged by the oracle: sorted(inputs)
    exact = [got[i, batch.answer_mask[i]].tolist() == task.solve(batch.meta["inputs"][i].tolist()) for i in range(16)]
    assert score(batch, got)["exact_match"] == sum(exact) / 16


def test_hint_queries_are_given_not_decoded(tiny_sort):
    model, task = tiny_sort
    b = task.with_objective("successor").sample(4, length=5, seed=0)
    got = greedy_decode(model, b)
    given = b.pred_mask  # query positions hold the given x_i
    assert torch.equal(got[given], b.tokens[given])


def test_mult_records_by_carries(tiny_mult):
    model, task = tiny_mult
    res = evaluate(model, task, [2], n=300, seed=1)
    rec = res.records[0]
    assert rec["exact_match"] > 0.9
    assert sum(g["n"] for g in rec["by_carries"].values()) == 300
    assert sum(g["n"] for g in rec["by_cascade"].values()) == 300
    assert sorted(rec["per_digit"]) == ["0", "1", "2"]
    again = EvalResult.from_json(res.to_json())
    assert again == res
    assert list(res.to_frame()["length"]) == [2]


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.19, abs=0.01)
    assert wilson(0, 10)[0] == 0.0


def test_evaluate_bad_input(tiny_mult):
    model, task = tiny_mult
    with pytest.raises(ProbekitError, match="n_ctx is 16"):
        evaluate(model, task, [8], n=10)
    with pytest.raises(ProbekitError, match="n must be positive"):
        evaluate(model, task, [2], n=0)
    with pytest.raises(ProbekitError, match="d_vocab"):
        evaluate(model, _OtherVocab(digits=1, b_digits=1), [1], n=2)


class _OtherVocab(MultiplicationTask):
    @property
    def d_vocab(self) -> int:
        return 99

    def seq_len(self, length=None) -> int:
        return 4


@pytest.mark.parametrize("positional, temperature", [("none", None), ("learned", "log"), ("rotary", None)])
def test_cached_decoding_equals_full_forward(positional, temperature):
    from probekit.model import ModelConfig
    from probekit.tasks import SortingTask
    from probekit.train import TrainConfig, train

    task = SortingTask(n_values=12)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64, d_vocab=task.d_vocab, positional=positional,
                      length_temperature=temperature, seed=1)
    model = train(cfg, task, TrainConfig(steps=60, batch_size=32, lengths=(2, 6), lr=3e-3, warmup_steps=10,
                                         objectives={"sort": 1, "successor": 1}), progress=False)
    for objective in ("sort", "successor"):
        b = task.with_objective(objective).sample(24, length=9, seed=2)
        fast = greedy_decode(model, b, use_cache=True)
        slow = greedy_decode(model, b, use_cache=False)
        assert torch.equal(fast, slow)
        assert not torch.equal(fast[b.answer_mask], b.tokens[b.answer_mask])  # a 60-step model makes mistakes


@pytest.mark.parametrize("arch", [dict(normalization="RMS", positional="rotary"), dict(attn_only=True),
                                  dict(d_head=12, n_heads=3, act_fn="gelu", positional="learned"),
                                  dict(n_layers=3, normalization="LNPre", length_temperature="log")])
@pytest.mark.parametrize("task_name", ["sort", "mult"])
def test_cached_decoding_equals_full_forward_on_random_architectures(arch, task_name):
    """Random weights (decisive logits), so every answer token is decoded from earlier decoded ones."""
    from probekit.model import ModelConfig, build_model
    from probekit.tasks import SortingTask

    task = SortingTask(n_values=12) if task_name == "sort" else MultiplicationTask(digits=2)
    model = build_model(ModelConfig(**(dict(n_layers=2, d_model=32, n_heads=4, n_ctx=40, d_vocab=task.d_vocab,
                                            seed=2) | arch)))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.1))
    b = task.sample(12, length=8, seed=4) if task_name == "sort" else task.sample(12, seed=4)
    fast = greedy_decode(model, b, use_cache=True, max_batch=5)
    slow = greedy_decode(model, b, use_cache=False)
    assert torch.equal(fast, slow)
    assert not torch.equal(fast[b.answer_mask], b.tokens[b.answer_mask])  # random weights: decoded, not copied


class _RepeatPrevious(torch.nn.Module):
    """Sorts by writing the previous output again at every step after the first: only repeats are right."""

    def __init__(self, task, length):
        super().__init__()
        self.task, self.length, self.dummy = task, length, torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens):
        logits = torch.nn.functional.one_hot(tokens, self.task.d_vocab).float()  # predict the current token
        sep = 1 + self.length
        first = torch.sort(tokens[:, 1:sep], dim=1).values[:, 0]
        logits[:, sep] = torch.nn.functional.one_hot(first, self.task.d_vocab).float()  # step 0 is right
        return logits


def _first_repeat_step(xs):
    ys = sorted(xs)
    return next((r for r in range(1, len(ys)) if ys[r] == ys[r - 1]), None)


def test_sort_error_kinds_against_known_failures():
    import dataclasses

    from probekit.evaluate import sort_error_kinds
    from probekit.groundtruth import build_sort_lookup_model
    from probekit.tasks import SortingTask

    # the hand-built lookup attends to the smallest value above the previous output: it sorts distinct
    # lists exactly and, on a repeated value, skips the copy (a dropped copy) at the first repeat
    model, task = build_sort_lookup_model(n_values=16)
    out = sort_error_kinds(model, task.sample(64, length=8, seed=1))
    assert out["first_error"] == {"none": 64, "extra_copy": 0, "dropped_copy": 0, "wrong_value": 0}
    assert out["repeat_share"] == 0.0
    rep = dataclasses.replace(task, repeats=True)
    xs = [[3, 7, 7, 1, 9, 12, 5, 2], [4, 4, 2, 8, 11, 6, 1, 0], [1, 2, 3, 5, 6, 8, 10, 13], [9, 2, 2, 5, 5, 3, 14, 1]]
    b = rep.batch_from_inputs(xs)
    out = sort_error_kinds(model, b)
    n_rep = sum(_first_repeat_step(x) is not None for x in xs)
    assert out["first_error"] == {"none": 4 - n_rep, "extra_copy": 0, "dropped_copy": n_rep, "wrong_value": 0}
    assert out["error_rate"]["new"] == 0.0 and out["error_rate"]["repeat"] == 1.0
    assert out["repeat_share"] == pytest.approx(4 / 32)
    # a model that repeats its previous output: right on every repeat, an extra copy at each new value
    sort = SortingTask(n_values=10)
    b = sort.sample(50, length=6, seed=3)
    out = sort_error_kinds(_RepeatPrevious(sort, 6), b)
    all_equal = sum(len(set(x)) == 1 for x in b.meta["inputs"].tolist())
    assert out["first_error"] == {"none": all_equal, "extra_copy": 50 - all_equal, "dropped_copy": 0, "wrong_value": 0}
    assert out["error_rate"]["repeat"] == 0.0
    with pytest.raises(ProbekitError, match="needs a batch of the 'sort' objective, got 'successor'"):
        sort_error_kinds(model, rep.with_objective("successor").sample(2, length=4))


# ---------------------------------------------------------------------------- place offset ensembles


def _oracle_place_ids(row: list[int], offset: int) -> list[int]:
    """0 for a non-digit (ids 10, 11); 1 + offset + the digit's index in its run of consecutive digits."""
    out, run = [], 0
    for t in row:
        run = run + 1 if 0 <= t < 10 else 0
        out.append(offset + run if run else 0)
    return out


def _random_place_model(offset_max: int = 12):
    """4 x 1 reversed multiplication, n_ctx 16 (room for offsets up to 10 at 4 digits), random weights
    (queries and keys larger, so attention reads the operands and the answers depend on them and on the offset)."""
    from probekit.model import ModelConfig, build_model

    task = MultiplicationTask(digits=4, b_digits=1, reverse_operands=True)
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, d_vocab=task.d_vocab, n_ctx=16,
                                    positional="place", place_tokens=10, place_offset_max=offset_max, seed=1))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if p.ndim == 1 else 1.0 if "embed" in name or "pos." in name else \
                2.0 if ".q." in name or ".k." in name else 0.3
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval(), task


@torch.no_grad()
def _reference_decode(model, batch, offsets: list[int]) -> torch.Tensor:
    """Each step: a full forward per offset (place ids from the pure-Python oracle), mean probability, argmax."""
    toks = batch.tokens.clone()
    for t in torch.nonzero(batch.answer_mask[0]).flatten().tolist():
        prob = 0
        for o in offsets:
            ids = torch.tensor([_oracle_place_ids(r, o) for r in toks[:, :t].tolist()])
            prob = prob + model.original_model(toks[:, :t], position_ids=ids)[:, -1].softmax(-1)
        toks[:, t] = prob.argmax(-1)
    return toks


def test_one_place_offset_is_plain_greedy_decoding_at_that_offset():
    model, task = _random_place_model()
    b = task.sample(24, length=4, seed=5)
    decoded = {}
    for o in (0, 3, 10):
        want = _reference_decode(model, b, [o])
        for cache in (True, False):
            assert torch.equal(greedy_decode(model, b, use_cache=cache, place_offsets=[o], max_batch=7), want)
        decoded[o] = want
    assert torch.equal(decoded[0], greedy_decode(model, b))  # offset 0 is what plain decoding uses
    assert not torch.equal(decoded[0], decoded[3]) and not torch.equal(decoded[3], decoded[10])
    assert len({tuple(r) for r in decoded[0][:, b.answer_mask[0]].tolist()}) > 1  # answers depend on the operands


def test_place_offset_ensemble_equals_a_full_forward_reference():
    model, task = _random_place_model()
    b = task.sample(24, length=4, seed=6)
    ens = _reference_decode(model, b, [0, 2, 5])
    for cache in (True, False):
        for max_batch in (4, 512):  # 4: one row of the batch per forward, times the 3 offsets
            got = greedy_decode(model, b, use_cache=cache, place_offsets=(0, 2, 5), max_batch=max_batch)
            assert torch.equal(got, ens)
    assert all(not torch.equal(ens, _reference_decode(model, b, [o])) for o in (0, 2, 5))  # not one stream's
    # "train": 0..place_offset_max (12) but at 4 digits (5 product digits) rows pass n_ctx 16 past offset 10
    assert torch.equal(greedy_decode(model, b, place_offsets="train"), _reference_decode(model, b, list(range(11))))


def test_evaluate_records_the_place_offsets_of_each_length():
    model, task = _random_place_model()
    res = evaluate(model, task, [2, 4], n=16, seed=1, place_offsets="train")
    assert res.place_offsets == "train"
    assert [r["place_offsets"] for r in res.records] == [list(range(13)), list(range(11))]
    b = task.sample(16, length=4, seed=1004)  # evaluate's test set at length 4
    assert res.records[1]["exact_match"] == score(b, _reference_decode(model, b, list(range(11))))["exact_match"]
    assert EvalResult.from_json(res.to_json()) == res
    plain = evaluate(model, task, [4], n=16, seed=1)
    assert "place_offsets" not in plain.to_json() and "place_offsets" not in plain.records[0]


def test_place_offsets_bad_input(tiny_mult):
    model, task = _random_place_model()
    b = task.sample(4, length=4, seed=0)
    for offsets, message in [([11], r"place offset 11 puts digit rows up to 16, past the place table of 16 rows "
                                     r"\(n_ctx\); expected offsets <= 10 at length 4"),
                             ("all", "place_offsets = 'all'; expected 'train', a list of integers >= 0, or None"),
                             (3, "place_offsets = 3; expected 'train'"),
                             ([], "expected distinct integers >= 0, at least one"),
                             ([1, 1], "expected distinct integers >= 0"),
                             ([-1], r"place_offsets = \[-1\]; expected"),
                             ([True], r"place_offsets = \[True\]; expected")]:
        with pytest.raises(ProbekitError, match=message):
            greedy_decode(model, b, place_offsets=offsets)
    with pytest.raises(ProbekitError, match="place offset 11 puts"):
        evaluate(model, task, [2, 4], n=4, place_offsets=[0, 11])  # refused before anything is decoded
    learned, mult = tiny_mult
    with pytest.raises(ProbekitError, match="place_offsets needs a positional='place' model, got positional='learned'"):
        evaluate(learned, mult, [2], n=4, place_offsets="train")
