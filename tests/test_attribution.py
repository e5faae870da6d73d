"""Attribution instruments against oracles: TransformerLens's own DLA (on a folded copy), ActivationCache
tools, TransformerLens attribution patching, weight surgery for ablations, and invariances."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from probekit import attribution as A
from probekit import metrics as M
from probekit.corruptions import corrupt
from probekit.evaluate import greedy_decode, score
from probekit.tasks import MultiplicationTask, ProbekitError


def _corrupted(task, batch, kind, seed=0):
    """The corrupted batch of the task's corruption ``kind`` (every row of these kinds is valid)."""
    pair = corrupt(task, batch, kind, seed=seed)
    assert pair.n_invalid == 0
    return pair.corrupted


@pytest.fixture(scope="module")
def sort_batch(tiny_sort):
    _, task = tiny_sort
    return task.sample(12, length=6, seed=3)


# ---------------------------------------------------------------------------- DLA


@pytest.mark.parametrize("metric", ["logit", "margin"])
def test_dla_components_sum_to_the_logit(tiny_sort, sort_batch, metric):
    model, _ = tiny_sort
    pos, tgt = M.answer_layout(sort_batch), M.answer_targets(sort_batch)
    with torch.no_grad():
        lg = model(sort_batch.tokens)[:, pos]
    want = lg.gather(-1, tgt[..., None])[..., 0]
    if metric == "margin":
        want = want - lg.scatter(-1, tgt[..., None], float("-inf")).max(-1).values
    for unit in ("layer", "component"):
        r = A.direct_logit_attribution(model, sort_batch, unit=unit, metric=metric, reduce="none")
        assert r.axes == ("batch", "pos", "component") and r.labels["component"][-1] == "const"
        torch.testing.assert_close(r.values.sum(-1), want, atol=1e-4, rtol=1e-4)
        assert r.settings["completeness_max_abs_error"] < 1e-4
    # the remainder is the constant the final LayerNorm bias and b_U add, nothing else
    r = A.direct_logit_attribution(model, sort_batch, unit="layer", metric=metric, reduce="none")
    u = model.W_U[:, tgt].permute(1, 2, 0)
    const = (u * model.ln_final.bias).sum(-1) + model.b_U[tgt]
    if metric == "logit":
        torch.testing.assert_close(r.values[..., -1], const.detach(), atol=1e-5, rtol=1e-5)


def test_dla_matches_transformerlens_on_a_folded_copy(tiny_sort, sort_batch):
    """TransformerLens's direct_logit_attribution refuses an unfolded bridge; on a copy in compatibility mode
    (final LN folded into W_U, value biases kept in the heads) its per-head and per-layer numbers are ours."""
    from transformer_lens.tools.analysis import direct_logit_attribution as tl_dla

    model, _ = tiny_sort
    with pytest.raises(ValueError, match="compatibility mode"):
        tl_dla(model, sort_batch.tokens, answer_tokens=0)
    pos, tgt = M.answer_layout(sort_batch), M.answer_targets(sort_batch)
    with torch.no_grad():
        lg = model(sort_batch.tokens)[:, pos]
    other = lg.scatter(-1, tgt[..., None], float("-inf")).argmax(-1)
    folded = copy.deepcopy(model)
    folded.enable_compatibility_mode(disable_warnings=True, fold_value_biases=False)
    ours = A.direct_logit_attribution(model, sort_batch, unit="component", metric="margin", reduce="none")
    theirs = tl_dla(folded, sort_batch.tokens, answer_tokens=tgt, incorrect_tokens=other, unit="head", pos=pos)
    assert theirs.labels[:-1] == [A.head_label(L, h) for L in range(2) for h in range(4)]
    for i, lab in enumerate(theirs.labels[:-1]):
        j = ours.labels["component"].index(lab)
        torch.testing.assert_close(ours.values[..., j], theirs.attribution[i].detach(), atol=1e-4, rtol=1e-4)
    layers = A.direct_logit_attribution(model, sort_batch, unit="layer", metric="margin", reduce="none")
    theirs = tl_dla(folded, sort_batch.tokens, answer_tokens=tgt, incorrect_tokens=other, unit="component", pos=pos)
    names = {"embed": "embed", "pos_embed": "pos_embed", "0_attn_out": "attn0", "0_mlp_out": "mlp0",
             "1_attn_out": "attn1", "1_mlp_out": "mlp1"}
    assert theirs.labels == list(names)
    for i, lab in enumerate(theirs.labels):
        j = layers.labels["component"].index(names[lab])
        torch.testing.assert_close(layers.values[..., j], theirs.attribution[i].detach(), atol=1e-4, rtol=1e-4)


def test_activation_cache_tools_work_on_the_bridge_and_agree(tiny_sort, sort_batch):
    """stack_head_results + apply_ln_to_stack (cached final-LN scale) on the unfolded bridge give our heads."""
    model, _ = tiny_sort
    pos, tgt = M.answer_layout(sort_batch), M.answer_targets(sort_batch)
    _, cache = model.run_with_cache(sort_batch.tokens)
    stack = cache.stack_head_results(layer=-1, pos_slice=pos)  # component batch k d_model
    scaled = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=pos)
    u = model.W_U[:, tgt].permute(1, 2, 0) * model.ln_final.weight
    tl = (scaled * u).sum(-1)  # component batch k
    ours = A.direct_logit_attribution(model, sort_batch, unit="head", reduce="none")  # batch layer k head
    torch.testing.assert_close(ours.values.permute(1, 3, 0, 2).flatten(0, 1), tl.detach(), atol=1e-4, rtol=1e-4)
    comps, labels = cache.decompose_resid(apply_ln=True, pos_slice=pos, return_labels=True)
    assert labels == ["embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    layers = A.direct_logit_attribution(model, sort_batch, unit="layer", reduce="none")  # batch k component
    torch.testing.assert_close(layers.values[..., :-1].permute(2, 0, 1), (comps * u).sum(-1).detach(),
                               atol=1e-4, rtol=1e-4)


def test_dla_by_source_sums_to_heads_and_labels(tiny_sort, sort_batch):
    model, task = tiny_sort
    heads = A.direct_logit_attribution(model, sort_batch, unit="head")
    src = A.direct_logit_attribution(model, sort_batch, unit="source", vocab=task.vocab)
    assert src.axes == ("layer", "pos", "head", "src") and src.labels["src"][:3] == ["0 sort", "1 x0", "2 x1"]
    assert src.labels["layer"] == [0, 1] and src.labels["head"] == [0, 1, 2, 3]
    torch.testing.assert_close(src.values.sum(-1), heads.values, atol=1e-5, rtol=1e-5)
    # causal: no query reads a later key
    pos = M.answer_layout(sort_batch)
    later = torch.arange(sort_batch.seq_len)[None, :] > pos[:, None]
    assert src.values.abs().amax((0, 2))[later].max() == 0
    assert Result_roundtrip(heads)


def Result_roundtrip(r) -> bool:
    from probekit.results import Result

    return Result.from_json(r.to_json()) == r and len(r.to_frame()) == r.values.numel()


def test_dla_bad_input(tiny_sort, sort_batch):
    model, task = tiny_sort
    with pytest.raises(ProbekitError, match="unknown DLA unit"):
        A.direct_logit_attribution(model, sort_batch, unit="neuron")
    with pytest.raises(ProbekitError, match="unknown DLA metric"):
        A.direct_logit_attribution(model, sort_batch, metric="logprob")


# ---------------------------------------------------------------------------- ablation


def _zeroed_copy(model, heads):
    """Oracle for zero ablation: the head's columns of W_O set to zero in a copy."""
    m = copy.deepcopy(model)
    d = m.cfg.d_head
    sd = m.state_dict()
    for L, h in heads:
        sd[f"blocks.{L}.attn.o.weight"][:, h * d:(h + 1) * d] = 0
    m.load_state_dict(sd)
    return m


def test_zero_ablation_equals_weight_surgery_also_through_greedy_decoding(tiny_sort):
    model, task = tiny_sort
    batch = task.sample(32, length=6, seed=5)
    heads = [(0, 1), (1, 2)]
    surgery = _zeroed_copy(model, heads)
    with torch.no_grad():
        before = model(batch.tokens)
        with A.ablation_hooks(model, batch, heads, "zero"):
            ablated = model(batch.tokens)
            decoded = greedy_decode(model, batch, max_batch=batch.n)
        after = model(batch.tokens)
        torch.testing.assert_close(ablated, surgery(batch.tokens), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(before, after)  # nothing stays hooked
    assert torch.equal(decoded, greedy_decode(surgery, batch))
    res = A.ablate_heads(model, batch, "L0H1,L1H2", method="zero", metric="logprob")
    em = dict(zip(res.labels["measure"], res.values.tolist(), strict=True))
    assert em["exact_match_ablated"] == pytest.approx(score(batch, greedy_decode(surgery, batch))["exact_match"])
    assert em["exact_match_clean"] == pytest.approx(score(batch, greedy_decode(model, batch))["exact_match"])
    assert em["exact_match_clean"] > 0.5  # the fixture sorts
    # every head at once: the model can no longer read its input
    everything = A.ablate_heads(model, batch, A.all_heads(model), method="zero")
    assert everything.values[4] < 0.1 and everything.values[2] < 0


def test_mean_and_resample_are_no_ops_on_identical_examples(tiny_sort):
    model, task = tiny_sort
    one = task.sample(1, length=6, seed=9)
    batch = one.select([0, 0, 0, 0])
    for method in ("mean", "resample"):
        r = A.ablate_heads(model, batch, [(0, 0), (1, 3)], method=method, exact_match=False)
        assert abs(float(r.values[2])) < 1e-5, method


def test_mean_ablation_uses_the_reference_mean(tiny_sort, sort_batch):
    model, task = tiny_sort
    ref = task.sample(20, length=6, seed=11)
    _, cache = model.run_with_cache(ref.tokens)
    mean_z = cache["blocks.1.attn.hook_z"][:, :, 2].mean(0)
    seen = {}
    with A.ablation_hooks(model, sort_batch, [(1, 2)], "mean", reference=ref):
        _, c2 = model.run_with_cache(sort_batch.tokens, names_filter="blocks.1.attn.hook_z")
        seen["z"] = c2["blocks.1.attn.hook_z"]
    torch.testing.assert_close(seen["z"][:, :, 2], mean_z.expand_as(seen["z"][:, :, 2]))


def test_sweep_and_topk_vs_random(tiny_sort, sort_batch):
    model, _ = tiny_sort
    sweep = A.head_ablation_sweep(model, sort_batch, method="resample", metric="logprob", seed=1)
    assert sweep.axes == ("layer", "head") and sweep.extra["exact_match"].shape == (2, 4)
    single = A.ablate_heads(model, sort_batch, [(1, 0)], method="resample", metric="logprob", seed=1)
    assert float(sweep.values[1, 0]) == pytest.approx(float(single.values[2]), abs=1e-6)
    res = A.topk_vs_random(model, sort_batch, sweep, k=2, n_random=3, method="zero", exact_match=False, seed=0)
    assert res.labels["set"] == ["clean", "top2", "random0", "random1", "random2"]
    order = torch.argsort(sweep.values.abs().flatten(), descending=True)[:2].tolist()
    assert res.settings["top_heads"] == [A.head_label(i // 4, i % 4) for i in order]
    again = A.topk_vs_random(model, sort_batch, sweep, k=2, n_random=3, method="zero", exact_match=False, seed=0)
    assert again == res  # seeded
    assert Result_roundtrip(res) and Result_roundtrip(sweep)


def test_ablation_bad_input(tiny_sort, sort_batch):
    model, task = tiny_sort
    with pytest.raises(ProbekitError, match="layer 2 is out of range"):
        A.ablate_heads(model, sort_batch, [(2, 0)])
    with pytest.raises(ProbekitError, match="head 4 is out of range"):
        A.ablate_heads(model, sort_batch, "L0H4")
    with pytest.raises(ProbekitError, match="unknown ablation method"):
        A.ablate_heads(model, sort_batch, [(0, 0)], method="noise")
    with pytest.raises(ProbekitError, match="length 5 .* expected .* length 6"):
        A.ablate_heads(model, sort_batch, [(0, 0)], method="mean", reference=task.sample(8, length=5))
    with pytest.raises(ProbekitError, match="objective 'successor'"):
        A.head_ablation_sweep(model, sort_batch, method="mean",
                              reference=task.with_objective("successor").sample(8, length=6))
    with pytest.raises(ProbekitError, match="expected 'layer' and 'head'"):
        A.topk_vs_random(model, sort_batch, A.direct_logit_attribution(model, sort_batch, unit="layer"))


# ---------------------------------------------------------------------------- attribution patching


def test_attribution_patching_matches_transformerlens_and_reports_agreement(tiny_sort):
    from transformer_lens.tools.analysis import attribution_patch

    model, task = tiny_sort
    clean = task.sample(6, length=5, seed=4)
    corrupt = _corrupted(task, clean, "replace", seed=4)
    res = A.attribution_patching(model, clean, corrupt, metric="logprob", exact=True, top_k=5)
    # TransformerLens: per example, denoising, averaged over examples
    tot: dict = {}
    for i in range(clean.n):
        ci, xi = clean.select([i]), corrupt.select([i])
        r = attribution_patch(model, ci.tokens, xi.tokens, lambda lg, ci=ci: M.metric_value(lg, ci, "logprob"))
        for node, s in r.node_scores.items():
            tot[node] = tot.get(node, 0.0) + s / clean.n
    n_checked = 0
    for node, s in tot.items():
        if node.kind == "attn_head_out":
            ours = res.heads.values[node.layer, node.position, node.head]
        elif node.kind == "mlp_out":
            ours = res.mlp.values[node.layer, node.position]
        else:
            continue
        assert float(ours) == pytest.approx(s, abs=1e-5)
        n_checked += 1
    assert n_checked == 2 * clean.seq_len * 4 + 2 * clean.seq_len
    # exact patching is TransformerLens's and agreement is reported for heads and MLPs
    assert res.exact_heads.values.shape == res.heads.values.shape == (2, clean.seq_len, 4)
    for name in ("heads", "mlp"):
        ag = res.agreement[name]
        assert -1 <= ag["spearman"] <= 1 and 0 <= ag["topk_overlap"] <= 1 and ag["k"] == 5
    # prefix positions before the corrupted input token cannot matter, exactly or to first order
    first = int((clean.tokens != corrupt.tokens).int().argmax(1).min())
    assert res.exact_heads.values[:, :first].abs().max() < 1e-6
    assert res.heads.values[:, :first].abs().max() < 1e-6
    back = A.AttributionPatchingResult.from_json(res.to_json())
    assert back.heads == res.heads and back.agreement == json.loads(json.dumps(res.agreement))


def test_attribution_patching_invariance_and_ig(tiny_sort):
    model, task = tiny_sort
    clean = task.sample(4, length=4, seed=8)
    same = A.attribution_patching(model, clean, clean, metric="logprob", exact=True)
    assert same.heads.values.abs().max() == 0 and same.exact_heads.values.abs().max() < 1e-6
    corrupt = _corrupted(task, clean, "replace", seed=8)
    ig = A.attribution_patching(model, clean, corrupt, metric="logit-diff", ig_steps=3, exact=False)
    plain = A.attribution_patching(model, clean, corrupt, metric="logit-diff", ig_steps=1, exact=False)
    assert torch.isfinite(ig.heads.values).all() and not torch.allclose(ig.heads.values, plain.heads.values)
    assert ig.settings["ig_steps"] == 3 and ig.exact_heads is None
    with pytest.raises(ProbekitError, match="unchanged"):
        A.attribution_patching(model, clean, _corrupted(task, clean, "swap"), metric="logit-diff")
    with pytest.raises(ProbekitError, match="identical shapes"):
        A.attribution_patching(model, clean, task.sample(4, length=5))


# ---------------------------------------------------------------------------- head roles


def test_head_role_against_direct_indexing(tiny_sort):
    model, task = tiny_sort
    batch = task.sample(10, length=5, seed=2)
    r = A.head_attention_to(model, batch, "target_src_pos", heads=[(1, 1)])
    _, cache = model.run_with_cache(batch.tokens)
    pat = cache["blocks.1.attn.hook_pattern"][:, 1]
    f = batch.feature("target_src_pos")
    masses, hits, chance = [], [], []
    for b in range(batch.n):
        for q in range(batch.seq_len):
            if f[b, q] >= 0:
                masses.append(float(pat[b, q, f[b, q]]))
                hits.append(float(pat[b, q].argmax() == f[b, q]))
                chance.append(1 / (q + 1))
    assert r.values[0].tolist() == pytest.approx([sum(masses) / len(masses), sum(hits) / len(hits),
                                                  sum(chance) / len(chance)], abs=1e-5)
    assert r.settings["n_queries"] == batch.n * 5
    roles = A.head_roles(model, [batch, task.sample(6, length=7, seed=3)], heads=[(1, 1), (0, 0)])
    assert roles.axes == ("length", "head", "stat") and roles.labels["length"] == [5, 7]
    torch.testing.assert_close(roles.values[0, 0], r.values[0])


def test_column_operand_mask():
    task = MultiplicationTask(digits=2, b_digits=1)
    batch = task.batch_from_operands([68], [3], length=2)  # 6 8 * 3 = d0 d1 d2
    m = A.target_mask(batch, "column_operands")
    got = {q: torch.nonzero(m[0, q]).flatten().tolist() for q in range(batch.seq_len) if m[0, q].any()}
    assert got == {4: [1, 3], 5: [0, 3]}  # digit 0: a_0 (pos 1), b_0 (pos 3); digit 1: a_1 (pos 0), b_0
    with pytest.raises(ProbekitError, match="not a position feature"):
        A.target_mask(batch, "carry_in")


# ---------------------------------------------------------------------------- CLI


def test_cli_attribute(tiny_sort_dir, tmp_path, capsys):
    from probekit.cli import main

    out = tmp_path / "dla"
    assert main(["attribute", "--model", str(tiny_sort_dir), "--method", "dla", "--n", "16", "--length", "5",
                 "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"attribute.json", "attribute.csv", "attribute.png", "attribute_layers.json", "attribute_layers.png"} <= names
    from probekit.results import Result

    assert Result.from_json((out / "attribute.json").read_text()).axes == ("layer", "pos", "head")
    out2 = tmp_path / "ab"
    assert main(["attribute", "--model", str(tiny_sort_dir), "--method", "ablate", "--n", "16", "--length", "5",
                 "--ablation", "mean", "--heads", "L1H0,L0H2", "--k", "2", "--n-random", "2", "--out", str(out2)]) == 0
    assert {"attribute.json", "attribute.png", "attribute_topk_vs_random.csv", "attribute_head_set.json"} <= \
        {p.name for p in out2.iterdir()}
    out3 = tmp_path / "ap"
    assert main(["attribute", "--model", str(tiny_sort_dir), "--method", "attrib-patch", "--n", "8", "--length", "4",
                 "--out", str(out3)]) == 0
    agree = json.loads((out3 / "attribute_agreement.json").read_text())
    assert "spearman" in agree["heads"]
    capsys.readouterr()
    bad = [
        (["--method", "saliency"], "unknown method"),
        (["--method", "ablate", "--heads", "L0H9"], "head 9 is out of range"),
        (["--method", "ablate", "--heads", "L5H0"], "layer 5 is out of range"),
        (["--method", "ablate", "--ablation", "mean", "--reference-length", "3"], "expected task"),
        (["--method", "ablate", "--plot", "layer-pos"], "expected .*'pos'"),
    ]
    for extra, msg in bad:
        code = main(["attribute", "--model", str(tiny_sort_dir), "--n", "8", "--length", "4",
                     "--out", str(tmp_path / "bad"), "--overwrite", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error:") and "\n" not in err, (extra, err)
        import re

        assert re.search(msg, err), (msg, err)
    assert main(["attribute", "--model", str(tiny_sort_dir), "--method", "dla", "--out", str(out)]) == 2
