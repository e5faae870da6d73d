"""Edge attribution (EAP, EAP-IG), exact edge patching and faithfulness (`probekit.edges`).

Oracles: the functional forward (`probekit.forward`), finite differences in float64, path patching
(`probekit.patching.path_patch`, itself tested against TransformerLens), the metric's linearity in the
direct edges when there is no final norm, and the hand-built sorting model with a planted head.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from probekit import edges as E
from probekit import forward as F
from probekit.corruptions import corrupt
from probekit.groundtruth import build_sort_lookup_model
from probekit.model import ModelConfig, build_model
from probekit.patching import path_patch
from probekit.tasks import ProbekitError, SortingTask

PLANTED = ["embed->L1H2.q", "embed->L1H2.k", "embed->L1H2.v", "L1H2->logits"]


def _random(normalization="LN", positional="learned", seed=0, n=12):
    task = SortingTask(n_values=12, repeats=False)
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, d_vocab=task.d_vocab, n_ctx=24,
                                    normalization=normalization, positional=positional, seed=seed))
    model.eval()
    pair = corrupt(task, task.sample(n, length=5, seed=seed), "successor-change", seed=seed)
    return model, pair


@pytest.fixture(scope="module")
def planted():
    model, task = build_sort_lookup_model()
    return model, corrupt(task, task.sample(24, length=6, seed=0), "replace", seed=0)


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_graph_forward_is_the_models_forward(positional):
    model, pair = _random(positional=positional)
    st = E.setup(model, pair)
    with torch.no_grad():
        run = E.run_graph(st.nat, st.ws, st.base, st.read)
        ref = F.forward(F.native(model), st.base, logits_pos=st.read)
        bridge = model(st.base)[:, st.read]
    assert torch.allclose(run.logits, ref, atol=1e-6)
    assert torch.allclose(run.logits, bridge, atol=1e-4)


def test_graph_counts_edges_of_each_kind():
    model, _ = _random()
    g = E.Graph.of(model)
    # senders: embed + 2 layers x (2 heads + MLP); receivers: 2 x (6 q/k/v + MLP) + logits
    assert (len(g.senders), len(g.receivers)) == (7, 15)
    labels = {g.label(e) for e in g.edges}
    assert "L0H1->MLP0" in labels and "L0H1->L1H0.k" in labels and "MLP1->logits" in labels
    assert "L1H0->L1H1.q" not in labels and "MLP0->L0H0.q" not in labels and "MLP1->MLP1" not in labels
    # embed feeds all 15 receivers; each L0 head: MLP0 + 7 in layer 1 + logits; MLP0: 7 + logits; L1 heads: 2; MLP1: 1
    assert len(g.edges) == 15 + 2 * 9 + 8 + 2 * 2 + 1


@pytest.mark.parametrize("norm", E.NORMS)
def test_eap_gradients_are_exact_per_head_and_site(norm):
    """EAP score = first-order term of the exact edge effect: a delta scaled by eps, in float64 (both ways of
    taking the receiver's norm agree to first order)."""
    model, pair = _random(seed=1)
    model.double()
    st = E.setup(model, pair)
    _, base, src = E.eap(st, norm=norm)
    eps = 1e-5
    small = E.Run(src.logits, [b + eps * (s - b) for b, s in zip(base.outs, src.outs, strict=True)], src.resid)
    scores = E.eap(st, norm=norm, src=small)[0].double() / eps
    fd = E.exact_edges(st, base, small).double() / eps
    scale = float(scores.abs().max())
    assert scale > 0
    assert torch.allclose(fd, scores, atol=1e-4 * scale)


@pytest.mark.parametrize(("normalization", "direction"), [("LN", "noise"), ("RMS", "denoise")])
def test_exact_norm_makes_direct_edges_exact_through_the_final_norm(normalization, direction):
    """logit-diff is linear in the logits, so with the final norm applied exactly the score of every edge into
    the logits is its exact effect; the gradient before the norm misses the norm's change."""
    model, pair = _random(normalization=normalization, seed=6)
    st = E.setup(model, pair, direction=direction)
    exact_norm, base, src = E.eap(st, norm="exact")
    linear, _, _ = E.eap(st, norm="linear")
    ex = E.exact_edges(st, base, src)
    direct = [i for i, (_, j) in enumerate(st.graph.edges) if st.graph.receivers[j].kind == "logits"]
    assert torch.allclose(exact_norm[direct], ex[direct], atol=1e-5)
    assert float((linear[direct] - ex[direct]).abs().max()) > 1e-3


def test_norm_modes_agree_without_normalization():
    model, pair = _random(normalization=None, seed=7)
    st = E.setup(model, pair)
    for method in E.METHODS:
        exact_norm, _, _ = E.eap(st, method, steps=3, norm="exact")
        linear, _, _ = E.eap(st, method, steps=3, norm="linear")
        assert torch.allclose(exact_norm, linear, atol=1e-5)
    with pytest.raises(ProbekitError, match="unknown norm"):
        E.eap(st, norm="frozen")


def test_eap_equals_exact_on_direct_edges_without_final_norm():
    model, pair = _random(normalization=None, seed=2)
    rep = E.edge_report(model, pair, metric="logit-diff", ablation=None)
    direct = [i for i, (_, j) in enumerate(rep.edges) if rep.receivers[j] == "logits"]
    assert len(direct) == 7
    assert torch.allclose(rep.scores[direct], rep.exact[direct], atol=1e-4)
    other = [i for i in range(len(rep.edges)) if i not in direct]
    assert not torch.allclose(rep.scores[other], rep.exact[other], atol=1e-4)  # not linear there


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_exact_edges_equal_path_patching(direction):
    model, pair = _random(seed=3)
    rep = E.edge_report(model, pair, direction=direction, ablation=None)
    ex = dict(zip(rep.labels, rep.exact.tolist(), strict=True))
    m0 = rep.settings["m_base"]
    pp = path_patch(model, pair, "logits", direction=direction, normalize=False).values
    for L in range(2):
        for h in range(2):
            assert ex[f"L{L}H{h}->logits"] == pytest.approx(float(pp[L, h]) - m0, abs=1e-5)
    for site in ("q", "k", "v"):
        for h in range(2):
            pp = path_patch(model, pair, site, sender=(0, h), direction=direction, normalize=False).values
            for r in range(2):
                assert ex[f"L0H{h}->L1H{r}.{site}"] == pytest.approx(float(pp[1, r]) - m0, abs=1e-5)


def test_batched_exact_equals_one_edge_per_pass():
    model, pair = _random(seed=4, n=8)
    st = E.setup(model, pair)
    _, base, src = E.eap(st)
    batched = E.exact_edges(st, base, src, max_batch=1024)
    single = E.exact_edges(st, base, src, max_batch=1)
    assert torch.allclose(batched, single, atol=1e-5)
    assert E.exact_edges(st, base, src, edges=[3, 0]).tolist() == pytest.approx(batched[[3, 0]].tolist(), abs=1e-6)


def test_ig_with_one_step_is_eap_and_more_steps_differ():
    model, pair = _random(seed=5)
    st = E.setup(model, pair, metric="logprob")
    eap, _, _ = E.eap(st, "eap")
    ig1, _, _ = E.eap(st, "eap-ig", steps=1)
    ig5, _, _ = E.eap(st, "eap-ig", steps=5)
    assert torch.equal(eap, ig1)
    assert not torch.allclose(eap, ig5, atol=1e-4)


def test_planted_edges_rank_first_and_make_a_faithful_circuit(planted):
    model, pair = planted
    rep = E.edge_report(model, pair, method="eap-ig", steps=10, ablation="resample")
    assert sorted(label for label, _ in rep.top(4)) == sorted(PLANTED)
    top_exact = [rep.labels[i] for i in torch.argsort(rep.exact.abs(), descending=True)[:4]]
    assert sorted(top_exact) == sorted(PLANTED)
    assert rep.faithfulness.smallest == 4 and sorted(rep.faithfulness.circuit) == sorted(PLANTED)
    assert rep.spearman > 0.9
    for ablation in ("mean", "resample"):
        assert E.circuit_faithfulness(model, pair, PLANTED, ablation=ablation) == pytest.approx(1.0, abs=0.02)
        assert E.circuit_faithfulness(model, pair, PLANTED, ablation=ablation, complement=True) == pytest.approx(0.0, abs=0.02)


def test_circuit_examples_are_per_example_and_average_to_the_faithfulness(planted):
    """Rows: circuit, whole model (the clean run's own metric), all ablated; with resample ablation each example
    only sees its own corrupted run, so a subset of the pairs gives the same rows; the ratio of the means is
    `circuit_faithfulness`."""
    from probekit.corruptions import make_pair
    from probekit.metrics import metric_value
    from probekit.stats import ratio_of_means

    model, pair = planted
    circuit = PLANTED[:3]  # an unfaithful part of the planted circuit, so the three rows differ
    v = E.circuit_examples(model, pair, circuit, ablation="resample")
    assert v.shape == (3, pair.n)
    assert float(v[1].mean() - v[2].mean()) > 1.0 and abs(float(v[0].mean() - v[1].mean())) > 0.5
    with torch.no_grad():
        own = metric_value(model(pair.clean.tokens), pair.clean, "logit-diff", pair.corrupted, per_example=True,
                           steps=pair.answer_steps)
    assert torch.allclose(v[1].float(), own.float(), atol=1e-4)
    idx = torch.tensor([3, 0, 7])
    sub = replace(make_pair(pair.clean.select(idx), pair.corrupted.select(idx)), answer_steps=pair.answer_steps)
    assert torch.allclose(E.circuit_examples(model, sub, circuit, ablation="resample"), v[:, idx], atol=1e-5)
    assert ratio_of_means(v.T.numpy()) == pytest.approx(E.circuit_faithfulness(model, pair, circuit, ablation="resample"))
    assert ratio_of_means(E.circuit_examples(model, pair, PLANTED, ablation="resample").T.numpy()) == \
        pytest.approx(1.0, abs=0.02)


def test_faithfulness_curve_ends_at_zero_and_one(planted):
    model, pair = planted
    rep = E.edge_report(model, pair, exact=False, ablation="mean")
    f = rep.faithfulness
    assert f.n_edges[0] == 0 and f.n_edges[-1] == len(rep.edges)
    assert f.values[0] == pytest.approx(0.0) and f.values[-1] == pytest.approx(1.0)
    clean_gap = rep.settings["m_base"]  # noising: the base run is the clean run
    assert f.m_clean == pytest.approx(clean_gap, abs=1e-4)
    assert f.values[f.n_edges.index(f.smallest)] >= 0.9
    assert all(v < 0.9 for n, v in zip(f.n_edges, f.values, strict=True) if n < f.smallest)


def test_report_round_trips_and_draws(planted, tmp_path):
    model, pair = planted
    rep = E.edge_report(model, pair, exact=True, ablation="mean")
    back = E.EdgeReport.from_json(rep.to_json())
    assert back.labels == rep.labels and torch.allclose(back.scores, rep.scores)
    assert torch.allclose(back.exact, rep.exact) and back.faithfulness == rep.faithfulness
    df = rep.to_frame()
    assert list(df.columns[:4]) == ["edge", "sender", "receiver", "score"] and len(df) == len(rep.edges)
    assert df.loc[df["rank"] == 1, "edge"].item() == rep.top(1)[0][0]
    res = rep.to_result()
    assert res.axes == ("edge",) and torch.equal(res.extra["exact"], rep.exact)
    m = rep.matrix()
    assert int((~m.isnan()).sum()) == len(rep.edges)
    E.plot_edges(rep, tmp_path / "edges.png")
    assert (tmp_path / "edges.png").stat().st_size > 0
    with pytest.raises(ProbekitError, match="not a probekit edge report"):
        E.EdgeReport.from_json('{"kind": "patch"}')


def test_bad_input_is_refused(planted):
    model, pair = planted
    with pytest.raises(ProbekitError, match="unknown method"):
        E.edge_report(model, pair, method="acdc")
    with pytest.raises(ProbekitError, match="gradient metric"):
        E.edge_report(model, pair, metric="acc")
    with pytest.raises(ProbekitError, match="spelled"):
        E.edge_report(model, pair, metric="logit_diff")
    with pytest.raises(ProbekitError, match="unknown ablation"):
        E.edge_report(model, pair, ablation="zero")
    with pytest.raises(ProbekitError, match="steps"):
        E.edge_report(model, pair, method="eap-ig", steps=0)
    with pytest.raises(ProbekitError, match="direction"):
        E.edge_report(model, pair, direction="both")
    with pytest.raises(ProbekitError, match="unknown edge"):
        E.circuit_faithfulness(model, pair, ["L9H9->logits"])


def test_shipped_sort_baseline_eap_ig_agrees_with_exact():
    """On the shipped sort-baseline (110 edges), EAP-IG's ranking agrees with exact edge patching
    (docs/guide.md, edges section: Spearman 0.94 at n=64, 0.94-0.97 over five seeds)."""
    from probekit.model import load

    model, task = load("sort-baseline")
    pair = corrupt(task, task.sample(32, length=10, seed=0), "successor-change", seed=0)
    rep = E.edge_report(model, pair, method="eap-ig", steps=10, ablation=None)
    assert len(rep.edges) == 110
    assert rep.spearman >= 0.9


def test_shipped_mult_5x1_eap_ig_agrees_with_exact_with_the_receivers_norm_exact():
    """mult-5x1 (18 edges, 1 layer, LayerNorm), operand-digit: with each receiver's norm taken exactly EAP-IG
    ranks the edges as exact patching does (docs/guide.md: 0.97 at n=64, 0.96-0.99 over five seeds); the
    gradient before the norm misses the final norm's shrinking of the logits by the heads' direct edges."""
    from probekit.model import load

    model, task = load("mult-5x1")
    pair = corrupt(task, task.sample(32, seed=0), "operand-digit", seed=0)
    exact_norm = E.edge_report(model, pair, method="eap-ig", steps=10, ablation=None)
    linear = E.edge_report(model, pair, method="eap-ig", steps=10, ablation=None, norm="linear")
    assert len(exact_norm.edges) == 18 and exact_norm.settings["norm"] == "exact"
    assert exact_norm.spearman >= 0.9 > linear.spearman
    direct = [i for i, lab in enumerate(exact_norm.labels) if lab.endswith("->logits")]
    assert torch.allclose(exact_norm.scores[direct], exact_norm.exact[direct], atol=1e-4)


def test_denoising_scores_and_the_same_clean_circuit_metric(planted):
    model, pair = planted
    noise = E.edge_report(model, pair, exact=False, ablation="resample")
    den = E.edge_report(model, pair, direction="denoise", exact=True, ablation="resample")
    assert den.settings["m_base"] == pytest.approx(noise.settings["m_src"], abs=1e-5)  # base = the corrupted run
    # faithfulness is always measured on the clean run: same endpoints whatever the scores' direction
    assert den.faithfulness.m_clean == pytest.approx(noise.faithfulness.m_clean, abs=1e-5)
    assert den.faithfulness.m_ablated == pytest.approx(noise.faithfulness.m_ablated, abs=1e-5)
    top_exact = [den.labels[i] for i in torch.argsort(den.exact.abs(), descending=True)[:4]]
    assert sorted(top_exact) == sorted(PLANTED)
