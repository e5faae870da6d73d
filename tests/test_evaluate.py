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
