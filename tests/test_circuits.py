"""Weight-based circuits against planted ground truth (the hand-built sorting model) and oracles: the model's
own forward, TransformerLens's FactoredMatrix and composition scores (raw and on a folded copy), plain torch."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from probekit import circuits as C
from probekit.groundtruth import build_sort_lookup_model, successor_scores
from probekit.model import ModelConfig, build_model
from probekit.results import Result
from probekit.tasks import MultiplicationTask, ProbekitError, SortingTask


@pytest.fixture(scope="module")
def planted():
    return build_sort_lookup_model(n_values=16, head=(1, 2))


def _random_model(normalization, n_layers=3, seed=0):
    """A small NoPE model with every weight, bias and LN parameter perturbed (nothing left at its init value)."""
    model = build_model(ModelConfig(n_layers=n_layers, d_model=32, n_heads=4, d_vocab=13, n_ctx=16,
                                    normalization=normalization, seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.dtype.is_floating_point and "pos" not in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module", params=["LN", None])
def random_model(request):
    return _random_model(request.param)


# ---------------------------------------------------------------------------- planted ground truth


def test_planted_qk_circuit_is_the_planted_score_table(planted):
    """The planted head's W_Q W_K^T over the one-hot embedding, divided by sqrt(d_head), is `successor_scores`."""
    model, task = planted
    qk = C.qk_circuit(model, head="L1H2", tokens=range(task.d_vocab), task=task)
    expected = successor_scores(task)
    assert qk.axes == ("query_token", "key_token") and qk.labels["query_token"] == list(task.vocab)
    torch.testing.assert_close(qk.values, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)
    unscaled = C.qk_circuit(model, head=(1, 2), tokens=range(task.d_vocab), scaled=False)
    torch.testing.assert_close(unscaled.values, expected * math.sqrt(model.cfg.d_head), rtol=1e-5, atol=1e-2)
    for ln in ("fixed", "none"):  # no LN in this model: every mode is the same
        torch.testing.assert_close(C.qk_circuit(model, head=(1, 2), task=task, ln=ln).values,
                                   qk.values[:task.n_values, :task.n_values])


def test_planted_head_has_successor_qk_and_copying_ov_distractors_do_not(planted):
    model, task = planted
    rep = C.circuit_report(model, task)
    assert rep.scores.labels["head"][6] == "L1H2" and rep.qk.settings["tokens"] == list(range(task.n_values))
    s = dict(zip(C.SCORE_NAMES, rep.scores.values[6].tolist(), strict=True))
    assert s["qk_succ_top"] == 1.0 and s["qk_succ_above"] == 1.0 and s["qk_succ_nearest"] == 1.0
    assert s["ov_copy_top"] == s["ov_copy_auc"] == 1.0 and s["ov_copy_eigen"] == pytest.approx(1.0, abs=1e-5)
    assert s["ov_copy_margin"] == pytest.approx(10.0, rel=1e-4)  # the unembedding gain
    assert rep.top("qk_succ_top", 1)[0][0] == "L1H2" and rep.top("ov_copy_top", 1)[0][0] == "L1H2"
    others = torch.cat([rep.scores.values[:6], rep.scores.values[7:]])
    col = {n: others[:, i] for i, n in enumerate(C.SCORE_NAMES)}
    assert col["qk_succ_top"].max() <= 0.2 and col["ov_copy_top"].max() <= 0.3
    assert col["qk_succ_above"].max() < 0.9 and col["ov_copy_eigen"].abs().max() < 0.9
    assert col["qk_succ_auc"].max() < 0.8 and col["ov_copy_auc"].max() < 0.8


def test_planted_head_reads_nothing_the_distractors_write(planted):
    """The distractors write outside the token subspace, which is all the planted head's Q and K read."""
    model, _ = planted
    for mode in ("Q", "K", "V"):
        comp = C.composition_scores(model, mode)
        assert comp.values[0, :, 1, 2].abs().max() < 1e-6
        assert (comp.extra["z"][0, :, 1, 2] < -5).all()


# ---------------------------------------------------------------------------- oracles


def test_raw_circuits_match_factored_matrix(random_model):
    """ln='none' without biases is TransformerLens's ``W_E QK W_E^T`` and ``W_E OV W_U``, for every head."""
    from transformer_lens import FactoredMatrix

    model = random_model
    toks = [0, 3, 4, 7, 9, 12]
    E, U = model.W_E[toks].detach(), model.W_U[:, toks].detach()
    qk = C.qk_circuit(model, tokens=toks, ln="none", biases=False, scaled=False)
    ov = C.ov_circuit(model, tokens=toks, ln="none")
    assert qk.axes == ("head", "query_token", "key_token") and len(qk.labels["head"]) == 12
    for i, (L, h) in enumerate((L, h) for L in range(3) for h in range(4)):
        assert isinstance(model.QK, FactoredMatrix)
        torch.testing.assert_close(qk.values[i], (E @ model.QK[L, h] @ E.T).AB.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ov.values[i], (E @ model.OV[L, h] @ U).AB.detach(), atol=1e-5, rtol=1e-5)


def test_layer0_qk_in_embed_mode_is_the_models_own_attention():
    """For a layer-0 head of a NoPE model ``ln='embed'`` is exact: on the two-token input [v, u] the query u
    puts log(p(v) / p(u)) = QK[u, v] - QK[u, u] on its keys (hook_pattern of the model's own forward)."""
    for norm in ("LN", "RMS", None):
        model = _random_model(norm, n_layers=2)
        toks = list(range(10))
        qk = C.qk_circuit(model, heads=[(0, h) for h in range(4)], tokens=toks).values  # head u v
        pairs = torch.cartesian_prod(torch.tensor(toks), torch.tensor(toks))  # (u, v)
        _, cache = model.run_with_cache(pairs.flip(1), names_filter=["blocks.0.attn.hook_pattern"])
        p = cache["blocks.0.attn.hook_pattern"][:, :, 1].detach()  # batch head key
        u, v = pairs[:, 0], pairs[:, 1]
        mine = (qk[:, u, v] - qk[:, u, u]).T
        torch.testing.assert_close(p[..., 0].log() - p[..., 1].log(), mine, atol=2e-5, rtol=1e-5)


def test_random_circuits_are_the_heads_circuit_with_random_weights_of_its_norm():
    """Oracle: a copy of the model whose head holds the random matrices gives the same circuit via qk_circuit /
    ov_circuit (biases left out); the draws have the head's Frobenius norms and are seeded."""
    model = _random_model("LN", n_layers=2)
    toks = list(range(10))
    for kind, (A, B) in (("qk", ("W_Q", "W_K")), ("ov", ("W_V", "W_O"))):
        r = C.random_circuits(model, (1, 2), kind=kind, n=3, seed=5, tokens=toks)
        assert r.values.shape == (3, 10, 10) and r.settings["head"] == "L1H2"
        g = torch.Generator().manual_seed(5)
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for name in (A, B):
                W = getattr(model, name)[1, 2]
                R = torch.randn(W.shape, generator=g)
                getattr(twin.blocks[1].attn, name).data[2] = R * (W.norm() / R.norm())
                assert float(getattr(twin, name)[1, 2].norm()) == pytest.approx(float(W.norm()), rel=1e-5)
        if kind == "qk":
            want = C.qk_circuit(twin, head=(1, 2), tokens=toks, biases=False).values
        else:
            want = C.ov_circuit(twin, head=(1, 2), tokens=toks).values
        torch.testing.assert_close(r.values[0], want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(C.random_circuits(model, (1, 2), kind=kind, n=3, seed=5, tokens=toks).values, r.values)
    with pytest.raises(ProbekitError, match="circuit kind"):
        C.random_circuits(model, (0, 0), kind="xy")


def test_fixed_mode_matches_a_folded_copy():
    """ln='fixed' = the circuits of a copy with LN folded into the weights (TransformerLens compatibility mode),
    every token divided by the one embedding scale; OV up to the per-row constant of TL's centred unembedding."""
    model = _random_model("LN")
    folded = copy.deepcopy(model)
    folded.enable_compatibility_mode(disable_warnings=True)
    toks, s = list(range(10)), C.embedding_scale(model)
    E = folded.W_E[toks].detach() / s
    for L, h in [(0, 1), (1, 0), (2, 3)]:
        q = E @ folded.W_Q[L, h] + folded.b_Q[L, h]
        k = E @ folded.W_K[L, h] + folded.b_K[L, h]
        mine = C.qk_circuit(model, head=(L, h), tokens=toks, ln="fixed").values
        torch.testing.assert_close(mine, (q @ k.T).detach() / math.sqrt(model.cfg.d_head), atol=1e-5, rtol=1e-5)
        theirs = (E @ folded.OV[L, h] @ (folded.W_U[:, toks] / s)).AB.detach()
        mine = C.ov_circuit(model, head=(L, h), tokens=toks, ln="fixed").values
        torch.testing.assert_close(mine - mine.mean(-1, keepdim=True), theirs - theirs.mean(-1, keepdim=True),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_composition_matches_transformerlens(random_model, mode):
    """Raw weights: the bridge's own all_composition_scores; fold_ln: those of a folded copy; one pair by hand."""
    model = random_model
    raw = C.composition_scores(model, mode, fold_ln=False)
    ok = ~raw.values.isnan()
    assert ok.sum() == 3 * 16 and raw.axes == ("writer_layer", "writer_head", "reader_layer", "reader_head")
    torch.testing.assert_close(raw.values[ok], model.all_composition_scores(mode).scores.detach()[ok], atol=1e-5, rtol=0)
    folded = copy.deepcopy(model)
    folded.enable_compatibility_mode(disable_warnings=True)
    fold = C.composition_scores(model, mode, fold_ln=True)
    torch.testing.assert_close(fold.values[ok], folded.all_composition_scores(mode).scores.detach()[ok], atol=1e-5, rtol=0)
    W = {n: getattr(model, n).detach() for n in ("W_Q", "W_K", "W_V", "W_O")}
    A = W["W_V"][0, 1] @ W["W_O"][0, 1]
    B = {"Q": W["W_Q"][2, 3] @ W["W_K"][2, 3].T, "K": W["W_K"][2, 3] @ W["W_Q"][2, 3].T,
         "V": W["W_V"][2, 3] @ W["W_O"][2, 3]}[mode]
    assert float(raw.values[0, 1, 2, 3]) == pytest.approx(float((A @ B).norm() / A.norm() / B.norm()), abs=1e-5)


# ---------------------------------------------------------------------------- hand-made composition


def _composing_model(d_model=64, n_heads=4):
    """L0H0 writes only into residual dims 0..d_head-1; L1H0's W_Q reads exactly those, L1H1's W_Q reads none."""
    model = build_model(ModelConfig(n_layers=2, d_model=d_model, n_heads=n_heads, d_vocab=13, n_ctx=16,
                                    normalization=None, attn_only=True, seed=0))
    d_head = model.cfg.d_head
    g = torch.Generator().manual_seed(3)
    sd = {k: torch.randn(v.shape, generator=g) / math.sqrt(d_model) if "attn" in k else v
          for k, v in model.state_dict().items()}
    h0 = slice(0, d_head)
    sd["blocks.0.attn.o.weight"][:, h0] = 0.0
    sd["blocks.0.attn.o.weight"][:d_head, h0] = torch.eye(d_head)  # A writes into S = dims 0..d_head-1
    sd["blocks.1.attn.q.weight"][h0] = 0.0
    sd["blocks.1.attn.q.weight"][h0, :d_head] = torch.eye(d_head)  # B's query reads S
    h1 = slice(d_head, 2 * d_head)
    sd["blocks.1.attn.q.weight"][h1, :d_head] = 0.0  # the orthogonal head reads everything but S
    model.load_state_dict(sd)
    return model


def test_composing_pair_scores_far_above_random_and_orthogonal_pair_below():
    model = _composing_model()
    comp = C.composition_scores(model, "Q", n_random=30)
    mean, std = comp.settings["baseline_mean"], comp.settings["baseline_std"]
    assert 0 < std < mean < 0.5
    assert float(comp.values[0, 0, 1, 0]) > mean + 10 * std and float(comp.extra["z"][0, 0, 1, 0]) > 10
    assert float(comp.values[0, 0, 1, 1]) < 1e-6 < mean - 3 * std
    others = comp.values[1:, :, 1, 2:]  # random heads are near the baseline
    assert (comp.values[0, 1:, 1, 2:] - mean).abs().max() < 6 * std and others.isnan().all()


def test_random_baseline_matches_theory_and_is_seeded():
    """Gaussian W_A, W_B of rank d_head in d_model dims: score ~ 1/sqrt(d_model) when d_head << d_model."""
    m1, s1 = C.composition_baseline(256, 8, "Q", n=20, seed=0)
    assert m1 == pytest.approx(1 / math.sqrt(256), rel=0.1) and s1 > 0
    assert C.composition_baseline(256, 8, "Q", n=20, seed=0) == (m1, s1)
    assert C.composition_baseline(256, 8, "Q", n=20, seed=1) != (m1, s1)
    with pytest.raises(ProbekitError, match="n >= 2"):
        C.composition_baseline(16, 4, "Q", n=1)


# ---------------------------------------------------------------------------- scores on known matrices


def test_scores_on_known_matrices():
    n = 8
    eye, shift = torch.eye(n), torch.diag(torch.ones(n - 1), 1)
    assert C.copying_score(eye) == pytest.approx({"copy_top": 1.0, "copy_auc": 1.0, "copy_margin": 1.0, "copy_eigen": 1.0})
    assert C.copying_score(torch.zeros(n, n))["copy_auc"] == 0.5
    assert C.copying_score(-eye)["copy_top"] == 0.0 and C.copying_score(-eye)["copy_eigen"] == pytest.approx(-1.0)
    s = C.successor_score(shift)
    assert s["succ_top"] == s["succ_auc"] == 1.0 and s["succ_margin"] == pytest.approx(1.0)  # target 1, others 0
    assert C.copying_score(shift)["copy_top"] == 0.0
    # the sorting lookup: keys above the query score higher, smaller ones highest; its reverse fails "nearest"
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    lookup = torch.where(j > i, (n - j).float(), torch.tensor(-10.0))
    s = C.successor_score(lookup)
    margins = [float(lookup[r, r + 1] - (lookup[r].sum() - lookup[r, r + 1]) / (n - 1)) for r in range(n - 1)]
    assert s["succ_top"] == s["succ_above"] == s["succ_nearest"] == 1.0
    assert s["succ_margin"] == pytest.approx(sum(margins) / len(margins))
    largest = torch.where(j > i, j.float(), torch.tensor(-10.0))
    s = C.successor_score(largest)
    assert s["succ_above"] == 1.0 and s["succ_nearest"] == 0.0 and s["succ_top"] == pytest.approx(1 / (n - 1))
    assert C.successor_score(torch.zeros(n, n))["succ_above"] == 0.5  # ties count 1/2
    with pytest.raises(ProbekitError, match="square"):
        C.copying_score(torch.zeros(3, 4))


def test_row_scores_average_to_the_scores():
    """Row by row (for intervals over tokens): the means are successor_score's and copying_score's values."""
    M = torch.randn(9, 9, generator=torch.Generator().manual_seed(0))
    M[2, 5] = M[2, 6]  # a tie
    rows = C.row_scores(M)
    assert [len(rows[k]) for k in ("succ_above", "succ_nearest", "copy_auc")] == [8, 7, 9]
    s, c = C.successor_score(M), C.copying_score(M)
    assert float(rows["succ_above"].mean()) == pytest.approx(s["succ_above"])
    assert float(rows["succ_nearest"].mean()) == pytest.approx(s["succ_nearest"])
    assert float(rows["copy_auc"].mean()) == pytest.approx(c["copy_auc"])
    # by hand, row 0 of a matrix whose row 0 is 0 1 2 ... : every key above beats the query's own column
    ramp = torch.arange(9.0).expand(9, 9)
    assert float(C.row_scores(ramp)["succ_above"][0]) == 1.0 and float(C.row_scores(ramp)["succ_nearest"][0]) == 0.0


def _copying_heads():
    """A one-layer model, one-hot embedding: head 0's OV is the identity (it writes the attended token's one-hot
    into dimensions V..2V-1, which W_U reads), head 1's is the permutation swapping tokens 0<->1 and 2<->3."""
    V = 10
    model = build_model(ModelConfig(n_layers=1, d_model=24, n_heads=2, d_head=V, d_vocab=V, n_ctx=8, attn_only=True,
                                    normalization=None, positional="none"))
    perm = torch.arange(V)
    perm[[0, 1, 2, 3]] = torch.tensor([1, 0, 3, 2])
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    sd["embed.weight"][:, :V] = torch.eye(V)
    sd["blocks.0.attn.v.weight"][:V, :V] = torch.eye(V)
    sd["blocks.0.attn.v.weight"][V:, :V] = torch.eye(V)[perm]
    sd["blocks.0.attn.o.weight"][V:2 * V, :V] = torch.eye(V)
    sd["blocks.0.attn.o.weight"][V:2 * V, V:] = torch.eye(V)
    sd["unembed.weight"][:, V:2 * V] = torch.eye(V)
    model.load_state_dict(sd)
    return model, perm


def test_ov_copying_of_a_hand_built_identity_head():
    """Head 0 copies (its OV circuit is the identity, copy_top 1 on every row, and the model's own forward with
    head 1 zeroed outputs the attended token); head 1 copies exactly the tokens its permutation fixes."""
    from probekit.attribution import ablation_hooks
    from probekit.tasks import Batch

    model, perm = _copying_heads()
    ov = C.ov_circuit(model, heads=[(0, 0), (0, 1)])
    torch.testing.assert_close(ov.values[0], torch.eye(10))
    torch.testing.assert_close(ov.values[1], torch.eye(10)[perm])
    assert C.row_scores(ov.values[0])["copy_top"].tolist() == [1.0] * 10
    assert C.row_scores(ov.values[1])["copy_top"].tolist() == [0.0] * 4 + [1.0] * 6
    assert float(C.row_scores(ov.values[1])["copy_top"].mean()) == C.copying_score(ov.values[1])["copy_top"]
    tokens = torch.arange(10)[:, None].repeat(1, 2)  # [t, t]: whatever the head attends to is t
    batch = Batch.from_tokens(tokens, torch.tensor([[False, True]] * 10))
    with torch.no_grad(), ablation_hooks(model, batch, [(0, 1)], "zero"):
        assert model(tokens)[:, 1].argmax(-1).tolist() == list(range(10))
    with torch.no_grad(), ablation_hooks(model, batch, [(0, 0)], "zero"):
        assert model(tokens)[:, 1].argmax(-1).tolist() == perm.tolist()
    rand = C.random_circuits(model, (0, 0), "ov", n=20, seed=0).values
    assert max(float(C.row_scores(M)["copy_top"].mean()) for M in rand) < 0.6  # random heads of the same norms


# ---------------------------------------------------------------------------- tokens, inputs, results, figures


def test_numeral_tokens_come_from_the_vocabulary():
    assert C.numeral_tokens(SortingTask(n_values=12)) == list(range(12))
    mult = MultiplicationTask(digits=2, b_digits=1)
    assert [mult.vocab[t] for t in C.numeral_tokens(mult)] == [str(d) for d in range(10)]

    class Words:
        name, vocab = "words", ("a", "b")

    with pytest.raises(ProbekitError, match="no numeral tokens"):
        C.numeral_tokens(Words())


def test_bad_input_is_refused(planted):
    model, task = planted
    for kw, msg in [({"tokens": [0, 99]}, "outside the model's vocabulary"), ({"tokens": [1, 1]}, "distinct"),
                    ({"tokens": []}, "non-empty"), ({"ln": "folded"}, "unknown ln mode"),
                    ({"head": (5, 0)}, "layer 5 is out of range"), ({"head": "X1"}, "L<layer>H<head>"),
                    ({"head": (0, 0), "heads": [(0, 1)]}, "not both")]:
        with pytest.raises(ProbekitError, match=msg):
            C.qk_circuit(model, task=task, **kw)
    with pytest.raises(ProbekitError, match="unknown composition mode"):
        C.composition_scores(model, "O")
    rep = C.circuit_report(model, task, heads="L1H2,L0H0")
    assert rep.scores.labels["head"] == ["L1H2", "L0H0"]
    with pytest.raises(ProbekitError, match="unknown score"):
        rep.top("qk_nope")
    with pytest.raises(ProbekitError, match="qk_circuit result"):
        C.circuit_scores(rep.ov, rep.ov)


def test_results_round_trip_and_tables(planted):
    model, task = planted
    rep = C.circuit_report(model, task, heads=[(1, 2), (0, 1)])
    for name, res in rep.results().items():
        back = Result.from_json(res.to_json())
        assert back == res, name
    assert rep.qk.settings["ln"] == "embed" and rep.qk.settings["model"] == "groundtruth-sort-L1H2"
    wide = rep.to_frame()
    assert list(wide.index) == ["L1H2", "L0H1"] and list(wide.columns) == list(C.SCORE_NAMES)
    assert wide.loc["L1H2", "qk_succ_top"] == 1.0
    long = rep.qk.to_frame()
    assert len(long) == 2 * 16 * 16 and {"head_label", "query_token_label", "key_token_label"} <= set(long.columns)


def test_figures_share_one_robust_colour_scale(planted, tmp_path):
    model, task = planted
    qk = C.qk_circuit(model, heads=[(1, 2), (1, 0), (0, 3)], task=task)
    fig = C.plot_circuit(qk, tmp_path / "qk.png")
    images = [ax.images[0] for ax in fig.axes if ax.images]
    lim = C.robust_limit(qk.values)
    assert len(images) == 3 and all(im.get_clim() == (-lim, lim) for im in images)
    assert (tmp_path / "qk.png").stat().st_size > 1000
    assert "QK circuit" in fig._suptitle.get_text() and "attention score" in fig.axes[-1].get_ylabel()
    comp = C.plot_composition(C.composition_scores(model, "K"), tmp_path / "k.png")
    assert "baseline" in comp.axes[-1].get_ylabel() and (tmp_path / "k.png").exists()
    x = torch.ones(1000)
    x[0] = 1e6
    assert C.robust_limit(x) == 1.0  # one outlier does not set the colour limit
    with pytest.raises(ProbekitError, match="plot_circuit needs"):
        C.plot_circuit(C.composition_scores(model, "Q"))
