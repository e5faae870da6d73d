"""Planted ground truth: a hand-built model whose one head does the successor lookup. Every instrument
(DLA, zero/mean/resample ablation, exact patching, attribution patching, head roles) must rank it first."""

from __future__ import annotations

import pytest
import torch

from probekit import attribution as A
from probekit.corruptions import corrupt as corrupt_pair
from probekit.evaluate import evaluate
from probekit.groundtruth import build_sort_lookup_model
from probekit.metrics import answer_layout


@pytest.fixture(scope="module", params=[(1, 2), (0, 1)], ids=["L1H2", "L0H1"])
def planted(request):
    model, task = build_sort_lookup_model(head=request.param)
    return model, task, request.param


def _first(table: torch.Tensor, n_heads: int) -> tuple[int, int]:
    i = int(torch.argmax(table.flatten()))
    return (i // n_heads, i % n_heads)


def test_the_hand_built_model_sorts_with_its_planted_head(planted):
    model, task, head = planted
    assert model.planted_head == head
    res = evaluate(model, task, [3, 8, 16], n=32, seed=0)
    assert [r["exact_match"] for r in res.records] == [1.0, 1.0, 1.0]
    batch = task.sample(32, length=8, seed=1)
    role = A.head_attention_to(model, batch, "target_src_pos")
    i = role.labels["head"].index(A.head_label(*head))
    assert role.values[i, 1] == 1.0 and role.values[i, 0] > 0.99  # top-1 and mass on the next element
    others = torch.cat([role.values[:i, 1], role.values[i + 1:, 1]])
    assert others.max() < 0.5
    knocked = A.ablate_heads(model, batch, [head], method="zero")
    assert float(knocked.values[3]) == 1.0 and float(knocked.values[4]) < 0.05


def test_every_instrument_ranks_the_planted_head_first(planted):
    model, task, head = planted
    nH = model.cfg.n_heads
    batch = task.sample(16, length=6, seed=1)
    ranked: dict[str, tuple[int, int]] = {}
    dla = A.direct_logit_attribution(model, batch, unit="head", metric="logit")
    ranked["dla"] = _first(A.head_scores(dla), nH)
    for method in ("zero", "mean", "resample"):
        sweep = A.head_ablation_sweep(model, batch, method=method, metric="logprob", exact_match=False, seed=0)
        ranked[f"ablation-{method}"] = _first(A.head_scores(sweep), nH)
    corrupt = corrupt_pair(task, batch, "replace", seed=2).corrupted
    ap = A.attribution_patching(model, batch, corrupt, metric="logit-diff", exact=True)
    ranked["attribution-patching"] = _first(ap.head_totals(), nH)
    ranked["exact-patching"] = _first(ap.head_totals(exact=True), nH)
    wrong = {name: h for name, h in ranked.items() if h != head}
    assert not wrong, f"instruments that did not rank the planted head {head} first: {wrong}"
    assert ap.agreement["heads"]["top1_match"]


def test_dla_by_source_points_at_the_next_element(planted):
    model, task, head = planted
    batch = task.sample(16, length=6, seed=3)
    src = A.direct_logit_attribution(model, batch, unit="source", reduce="none")  # batch layer pos head src
    pos = answer_layout(batch)
    want = batch.feature("target_src_pos")[:, pos]
    assert torch.equal(src.values[:, head[0], :, head[1]].argmax(-1), want)


def test_topk_beats_random_heads(planted):
    model, task, head = planted
    batch = task.sample(24, length=6, seed=4)
    sweep = A.head_ablation_sweep(model, batch, method="zero", exact_match=False)
    res = A.topk_vs_random(model, batch, sweep, k=1, n_random=6, method="zero", seed=3)
    assert res.settings["top_heads"] == [A.head_label(*head)]
    clean, top = res.values[0, 1], res.values[1, 1]
    assert clean == 1.0 and top < 0.05
    for i, heads in enumerate(res.settings["random_heads"]):  # random heads hurt only when they hit the planted one
        em = float(res.values[2 + i, 1])
        assert (em < 0.05) if A.head_label(*head) in heads else (em == 1.0), (heads, em)
