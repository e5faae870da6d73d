"""Activation patching: equal to transformer_lens.patching, hook oracles, invariances, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import transformer_lens.patching as tlp

from probekit import patching as P
from probekit.corruptions import corrupt, make_pair
from probekit.model import ModelConfig, build_model, save_model
from probekit.results import Result
from probekit.tasks import MultiplicationTask, ProbekitError, SortingTask

TOL = dict(atol=1e-5, rtol=1e-5)



@pytest.fixture(scope="module")
def mult_pair(tiny_mult):
    model, task = tiny_mult
    return model, corrupt(task, task.sample(24, seed=11), "resample", seed=1)


@pytest.fixture(scope="module")
def sort_pair(tiny_sort):
    model, task = tiny_sort
    return model, corrupt(task, task.sample(24, length=6, seed=12), "successor-change", seed=2, step=2)


@pytest.fixture(params=["mult", "sort"])
def trained(request, mult_pair, sort_pair):
    return mult_pair if request.param == "mult" else sort_pair


def _tl_inputs(model, pair, metric="logit-diff", noise=False):
    bm = P.BoundMetric.bind(metric, pair)
    base, src = (pair.clean, pair.corrupted) if noise else (pair.corrupted, pair.clean)
    with torch.no_grad():
        _, cache = model.run_with_cache(src.tokens)
    return base.tokens, cache, bm.tl_metric()


# ---------------------------------------------------------------------------- oracle: transformer_lens.patching


@pytest.mark.parametrize("engine", ["native", "hooks"])
def test_head_out_by_pos_equals_transformer_lens(trained, engine):
    model, pair = trained
    tokens, cache, metric = _tl_inputs(model, pair)
    tl = tlp.get_act_patch_attn_head_out_by_pos(model, tokens, cache, metric)
    ours = P.sweep(model, pair, "head", by_pos=True, normalize=False, engine=engine)
    assert ours.axes == ("layer", "pos", "head") and ours.values.shape == tl.shape
    assert tl.abs().max() > 1e-3  # the comparison is not between two zero tensors
    torch.testing.assert_close(ours.values, tl, **TOL)


@pytest.mark.parametrize("engine", ["native", "hooks"])
def test_resid_pre_equals_transformer_lens(trained, engine):
    model, pair = trained
    tokens, cache, metric = _tl_inputs(model, pair)
    tl = tlp.get_act_patch_resid_pre(model, tokens, cache, metric)
    torch.testing.assert_close(P.sweep(model, pair, "resid_pre", normalize=False, engine=engine).values, tl, **TOL)


def test_attention_pattern_sweeps_equal_transformer_lens(trained):
    model, pair = trained
    tokens, cache, metric = _tl_inputs(model, pair)
    tl = tlp.get_act_patch_attn_head_pattern_by_pos(model, tokens, cache, metric)  # layer head dest_pos
    ours = P.sweep(model, pair, "pattern", by_pos=True, normalize=False)  # layer pos head
    torch.testing.assert_close(ours.values, tl.permute(0, 2, 1), **TOL)
    tl_all = tlp.get_act_patch_attn_head_pattern_all_pos(model, tokens, cache, metric)
    torch.testing.assert_close(P.sweep(model, pair, "pattern", by_pos=False, normalize=False).values, tl_all, **TOL)


@pytest.mark.parametrize("site,fn,by_pos", [
    ("attn_out", tlp.get_act_patch_attn_out, True), ("mlp_out", tlp.get_act_patch_mlp_out, True),
    ("q", tlp.get_act_patch_attn_head_q_by_pos, True), ("k", tlp.get_act_patch_attn_head_k_by_pos, True),
    ("v", tlp.get_act_patch_attn_head_v_by_pos, True), ("z", tlp.get_act_patch_attn_head_out_all_pos, False),
    ("q", tlp.get_act_patch_attn_head_q_all_pos, False), ("k", tlp.get_act_patch_attn_head_k_all_pos, False),
])
def test_other_sites_equal_transformer_lens(mult_pair, site, fn, by_pos):
    model, pair = mult_pair
    tokens, cache, metric = _tl_inputs(model, pair)
    torch.testing.assert_close(P.sweep(model, pair, site, by_pos=by_pos, normalize=False).values,
                               fn(model, tokens, cache, metric), **TOL)


@pytest.mark.parametrize("metric", ["prob", "acc"])
def test_noising_and_other_metrics_equal_transformer_lens(sort_pair, metric):
    model, pair = sort_pair
    tokens, cache, fn = _tl_inputs(model, pair, metric=metric, noise=True)
    tl = tlp.get_act_patch_attn_head_out_by_pos(model, tokens, cache, fn)
    ours = P.sweep(model, pair, "z", direction="noise", metric=metric, normalize=False)
    torch.testing.assert_close(ours.values, tl, **TOL)


# ---------------------------------------------------------------------------- oracles built from hooks


def _metric_with_hooks(model, pair, hooks):
    bm = P.BoundMetric.bind("logit-diff", pair)
    with torch.no_grad():
        return float(bm.tl_metric()(model.run_with_hooks(pair.corrupted.tokens, fwd_hooks=hooks)))


def test_resid_mid_patches_the_residual_stream(mult_pair):
    """resid_mid = resid_pre + attn_out is replaced in the residual (not only the MLP input, as TL 4's hook)."""
    model, pair = mult_pair
    with torch.no_grad():
        _, clean = model.run_with_cache(pair.clean.tokens)
    ours = P.sweep(model, pair, "resid_mid", normalize=False)
    for L, pos in [(0, 2), (1, 4), (1, 6)]:
        src = clean[f"blocks.{L}.hook_resid_pre"] + clean[f"blocks.{L}.hook_attn_out"]
        seen = {}

        def grab(x, hook, seen=seen):
            seen["pre"] = x
            return x

        def set_attn(x, hook, pos=pos, src=src, seen=seen):
            x = x.clone()
            x[:, pos] = src[:, pos] - seen["pre"][:, pos]
            return x

        want = _metric_with_hooks(model, pair, [(f"blocks.{L}.hook_resid_pre", grab), (f"blocks.{L}.hook_attn_out", set_attn)])
        assert abs(float(ours.values[L, pos]) - want) < 1e-5


@pytest.mark.parametrize("receiver", ["q", "k", "v"])
def test_path_patch_sender_to_receiver_input(mult_pair, receiver):
    """Oracle: the receiver head's q/k/v recomputed by hand from LN(resid_pre + sender's clean-corrupted write)."""
    model, pair = mult_pair
    with torch.no_grad():
        _, clean = model.run_with_cache(pair.clean.tokens)
        _, corr = model.run_with_cache(pair.corrupted.tokens)
    sl, sh = 0, 1
    ours = P.path_patch(model, pair, receiver, sender=(sl, sh), normalize=False)
    assert ours.values[0].isnan().all()  # receivers must come after the sender
    W_O = model.blocks[sl].attn.W_O[sh]
    delta = (clean[f"blocks.{sl}.attn.hook_z"][:, :, sh] - corr[f"blocks.{sl}.attn.hook_z"][:, :, sh]) @ W_O
    for rh in range(model.cfg.n_heads):
        seen = {}
        blk = model.blocks[1]

        def grab(x, hook, seen=seen):
            seen["pre"] = x
            return x

        def set_head(x, hook, rh=rh, blk=blk, seen=seen):
            h = blk.ln1(seen["pre"] + delta)
            W, b = getattr(blk.attn, "W_" + receiver.upper())[rh], getattr(blk.attn, "b_" + receiver.upper())[rh]
            x = x.clone()
            x[:, :, rh] = h @ W + b
            return x

        want = _metric_with_hooks(model, pair, [("blocks.1.hook_resid_pre", grab), (f"blocks.1.attn.hook_{receiver}", set_head)])
        assert abs(float(ours.values[1, rh]) - want) < 1e-5


def test_path_patch_sender_to_logits(sort_pair):
    """Oracle: the sender's clean-corrupted write added to the final residual only."""
    model, pair = sort_pair
    with torch.no_grad():
        _, clean = model.run_with_cache(pair.clean.tokens)
        _, corr = model.run_with_cache(pair.corrupted.tokens)
    ours = P.path_patch(model, pair, "logits", normalize=False)
    last = model.cfg.n_layers - 1
    for L in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            delta = (clean[f"blocks.{L}.attn.hook_z"][:, :, h] - corr[f"blocks.{L}.attn.hook_z"][:, :, h]) @ \
                model.blocks[L].attn.W_O[h]
            want = _metric_with_hooks(model, pair, [(f"blocks.{last}.hook_resid_post", lambda x, hook, d=delta: x + d)])
            assert abs(float(ours.values[L, h]) - want) < 1e-5


# ---------------------------------------------------------------------------- invariances


def test_clean_into_clean_changes_nothing(mult_pair):
    model, pair = mult_pair
    same = make_pair(pair.clean, pair.clean)
    for site in P.SITES:
        for metric in ("prob", "acc"):
            r = P.sweep(model, same, site, metric=metric, normalize=False)
            assert torch.allclose(r.values, torch.full_like(r.values, r.settings["clean_metric"]), atol=1e-5), site


def test_patching_everything_restores_clean(trained):
    model, pair = trained
    nl, nh, T = model.cfg.n_layers, model.cfg.n_heads, pair.clean.seq_len
    every = [P.Component("resid_pre", 0)] + [P.Component("z", L, h) for L in range(nl) for h in range(nh)] + \
        [P.Component("mlp_out", L) for L in range(nl)]
    per_pos = [P.Component("resid_pre", 1, pos=p) for p in range(T)]
    groups = [every, per_pos, [P.Component("resid_post", nl - 1)], [P.Component("resid_mid", 0)]]
    den = P.patch(model, pair, groups, metric="logit-diff")
    torch.testing.assert_close(den.values, torch.ones(len(groups)), atol=1e-4, rtol=0)
    noi = P.patch(model, pair, groups, metric="logit-diff", direction="noise")
    torch.testing.assert_close(noi.values, torch.zeros(len(groups)), atol=1e-4, rtol=0)
    # a position the metric never reads, patched in the last layer, changes nothing
    first_read = int(P.answer_layout(pair.clean)[0])
    r = P.patch(model, pair, [[P.Component("resid_post", nl - 1, pos=first_read - 1)]], normalize=False)
    assert abs(float(r.values[0]) - r.settings["corrupted_metric"]) < 1e-6


def test_results_do_not_depend_on_max_batch(trained):
    model, pair = trained
    ref = P.sweep(model, pair, "z", normalize=False, max_batch=4096)
    for mb in (1, 7, 30):  # 1: one example per pass; 7: examples split into passes; 30: several patches per pass
        torch.testing.assert_close(P.sweep(model, pair, "z", normalize=False, max_batch=mb).values, ref.values, **TOL)
    mix = [[P.Component("k", 1, 2, 3), P.Component("resid_pre", 0, pos=1)], P.PathPatch(0, 3, "v", 1, 0),
           P.Component("pattern", 1, 0, 5)]
    torch.testing.assert_close(P.patch(model, pair, mix, max_batch=3).values, P.patch(model, pair, mix).values, **TOL)


@pytest.mark.parametrize("engine", ["native", "hooks"])
def test_patch_examples_are_per_example_patch_values(trained, engine):
    """Per-example values average to `patch_values` (and to TransformerLens via it), each example's value
    equals the same patch run on that example alone, and `restoration` is `sweep`'s normalised value."""
    model, pair = trained
    comps = [P.Component("z", L, head=h) for L in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    comps.append([P.Component("resid_pre", 0, pos=2), P.Component("z", 0, head=0)])
    ex = P.patch_examples(model, pair, comps, engine=engine, max_batch=40)
    pv = P.patch_values(model, pair, comps, engine=engine)
    assert ex.raw.shape == (len(comps), pair.n) and ex.raw.std(1).max() > 1e-3
    torch.testing.assert_close(ex.raw.mean(1), pv.raw, **TOL)
    assert float(ex.clean.mean()) == pytest.approx(pv.clean, abs=1e-5)
    assert float(ex.corrupted.mean()) == pytest.approx(pv.corrupted, abs=1e-5)
    one = P.patch_examples(model, make_pair(pair.clean.select([5]), pair.corrupted.select([5])), comps,
                           metric=P.Metric("logit-diff", pair.answer_steps), engine=engine)
    torch.testing.assert_close(one.raw[:, 0], ex.raw[:, 5], **TOL)
    sw = P.sweep(model, pair, "z", by_pos=False, engine=engine)
    torch.testing.assert_close(ex.restoration()[:-1].view(sw.values.shape), sw.values, **TOL)


@pytest.mark.parametrize("cfg", [
    dict(positional="rotary"), dict(positional="none", length_temperature="log"),
    dict(positional="rotary", length_temperature="log"), dict(attn_only=True, normalization="RMS"),
])
def test_native_engine_matches_the_bridge_on_every_variant(cfg):
    """Random models of each variant: our forward == the bridge's, and native sweeps == hook-based sweeps."""
    task = SortingTask(n_values=16, repeats=True)
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, d_vocab=task.d_vocab, n_ctx=32, **cfg))
    pair = corrupt(task, task.sample(6, length=5, seed=0), "resample", seed=0)
    read = P.answer_layout(pair.clean)
    with torch.no_grad():
        want = model(pair.clean.tokens)[:, read]
    torch.testing.assert_close(P.NativeEngine(model).run(pair.clean.tokens, read).logits, want, **TOL)
    sites = ["z", "resid_pre", "v", "pattern"]
    for site in sites:  # the tempered forward runs the bridge's hook_pattern too
        a = P.sweep(model, pair, site, metric="prob", normalize=False, engine="native").values
        b = P.sweep(model, pair, site, metric="prob", normalize=False, engine="hooks").values
        torch.testing.assert_close(a, b, **TOL)


# ---------------------------------------------------------------------------- metrics


def test_operand_digit_pair_with_agreeing_steps_equals_transformer_lens():
    """An operand-digit corruption: positions before the corrupted token (patches there write the base
    run's values and are skipped), answer steps whose answers agree in every row (logit-diff 0, not
    computed) and steps that agree in some rows (their last-layer outputs are not computed)."""
    from probekit.patching.sweeps import read_steps

    task = MultiplicationTask(digits=3)
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, d_vocab=task.d_vocab, n_ctx=16,
                                    positional="learned", seed=0))
    pair = corrupt(task, task.sample(16, seed=0), "operand-digit", seed=0, place=1)
    bm = P.BoundMetric.bind("logit-diff", pair)
    agree = bm.correct == bm.wrong
    _, live = read_steps(bm)
    assert live is not None and len(live) < agree.shape[1]  # some steps agree in every row ...
    assert bool((agree[:, live].any(0)).any())  # ... and some live steps agree in some rows
    first = int((pair.clean.tokens != pair.corrupted.tokens).any(0).nonzero()[0])
    assert first > 0  # some positions precede every difference
    tokens, cache, metric = _tl_inputs(model, pair)
    tl = tlp.get_act_patch_attn_head_out_by_pos(model, tokens, cache, metric)
    ours = P.sweep(model, pair, "z", by_pos=True, normalize=False, engine="native")
    torch.testing.assert_close(ours.values, tl, **TOL)
    hooks = P.sweep(model, pair, "resid_pre", by_pos=True, normalize=False, engine="hooks", per_step=True)
    native = P.sweep(model, pair, "resid_pre", by_pos=True, normalize=False, engine="native", per_step=True)
    torch.testing.assert_close(native.values, hooks.values, **TOL)
    dead = torch.tensor([int(s) for s in range(agree.shape[1]) if s not in live.tolist()])
    assert bool((native.values[..., dead] == 0).all())  # an agreeing step is 0 exactly, as in the full logits
    assert bool((ours.values[:, :first] == ours.settings["corrupted_metric"]).all())


def test_metrics_against_hand_computation(mult_pair):
    model, pair = mult_pair
    read = P.answer_layout(pair.clean)
    with torch.no_grad():
        lc = model(pair.clean.tokens)[:, read]
    correct = pair.clean.tokens[:, read + 1]
    wrong = pair.corrupted.tokens[:, read + 1]
    ld = (lc.gather(-1, correct[..., None]) - lc.gather(-1, wrong[..., None]))[..., 0]
    prob = lc.softmax(-1).gather(-1, correct[..., None])[..., 0]
    hit = (lc.argmax(-1) == correct).float()
    want = {"logit-diff": ld.mean(), "prob": prob.mean(), "acc": hit.mean(), "exact-match": hit.min(1).values.mean()}
    comp = [P.Component("resid_pre", 0, pos=0)]
    for kind, v in want.items():
        assert abs(P.patch_values(model, pair, [comp], metric=kind).clean - float(v)) < 1e-5
    # answer digit k of the product: digit_step maps it to the step that writes it
    k_of_step = pair.clean.features["digit_index"][0, read].tolist()
    for k in range(len(read)):
        s = P.digit_step(pair.clean, k)
        assert k_of_step[s] == k
        pv = P.patch_values(model, pair, [comp], metric=P.Metric("logit-diff", (s,)))
        assert abs(pv.clean - float(ld[:, s].mean())) < 1e-5
    pv = P.patch_values(model, pair, [comp], metric="logit-diff")
    torch.testing.assert_close(pv.clean_per_step, ld.mean(0), **TOL)


def test_per_answer_step_results(mult_pair):
    """per_step gives the metric at each answer step; it equals a sweep read at that step alone."""
    model, pair = mult_pair
    full = P.sweep(model, pair, "z", metric="logit-diff", per_step=True, normalize=False)
    assert full.axes == ("layer", "pos", "head", "answer") and full.labels["answer"] == ["5 d0", "6 d1", "7 d2"]
    for s in range(3):
        one = P.sweep(model, pair, "z", metric=P.Metric("logit-diff", (s,)), normalize=False)
        torch.testing.assert_close(full.values[..., s], one.values, **TOL)
    torch.testing.assert_close(full.values.mean(-1), P.sweep(model, pair, "z", normalize=False).values, **TOL)


def test_normalised_is_zero_for_corrupted_one_for_clean(sort_pair):
    model, pair = sort_pair
    r = P.patch(model, pair, [P.Component("resid_pre", 0), P.Component("resid_pre", 0, pos=0)])
    raw = r.extra["raw"]
    s = r.settings
    torch.testing.assert_close(r.values, (raw - s["corrupted_metric"]) / (s["clean_metric"] - s["corrupted_metric"]))
    assert abs(float(r.values[0]) - 1) < 1e-4 and abs(float(r.values[1])) < 1e-4  # pos 0: the task token, unchanged


# ---------------------------------------------------------------------------- bad input


def test_bad_input_is_a_one_line_error(mult_pair, tiny_sort):
    model, pair = mult_pair
    task = MultiplicationTask(digits=2, b_digits=1)
    with pytest.raises(ProbekitError, match="unknown site"):
        P.sweep(model, pair, "resid_foo")
    with pytest.raises(ProbekitError, match="unknown layer"):
        P.sweep(model, pair, "z", layers=[7])
    with pytest.raises(ProbekitError, match="unknown head"):
        P.patch(model, pair, [P.Component("z", 0, 9, 1)])
    with pytest.raises(ProbekitError, match="unknown position"):
        P.patch(model, pair, [P.Component("resid_pre", 0, pos=99)])
    with pytest.raises(ProbekitError, match="has no heads"):
        P.Component("mlp_out", 0, head=1)
    with pytest.raises(ProbekitError, match="after the sender"):
        P.PathPatch(1, 0, "q", 1, 2)
    with pytest.raises(ProbekitError, match="identical shapes"):
        make_pair(pair.clean, task.sample(24, length=3, seed=0))
    sm, st = tiny_sort
    swap = corrupt(st, st.sample(8, length=5, seed=0), "swap", seed=0)
    with pytest.raises(ProbekitError, match="leaves the evaluated answer tokens unchanged"):
        P.sweep(sm, swap, "z", metric="logit-diff")
    with pytest.raises(ProbekitError, match="unknown metric"):
        P.Metric("loss")
    with pytest.raises(ProbekitError, match="out of range"):
        P.sweep(model, pair, "z", metric=P.Metric("prob", (9,)))


# ---------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def mult_dir(tiny_mult, tmp_path_factory):
    model, task = tiny_mult
    return save_model(model, tmp_path_factory.mktemp("m") / "tiny-mult", task, name="tiny-mult")


def _cli(*args):
    from probekit.cli import main

    return main(["patch", *map(str, args)])


def test_cli_writes_result_csv_heatmap_deterministically(mult_dir, tmp_path, capsys):
    args = ["--model", mult_dir, "--corruption", "carry-flip", "--site", "head", "--by-pos", "--metric", "logit-diff",
            "--n", 40, "--seed", 0]
    assert _cli(*args, "--out", tmp_path / "a") == 0
    printed = capsys.readouterr().out
    assert "layer" in printed and "head" in printed  # the table of top components
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["patch.csv", "patch.json", "patch.png"]
    res = Result.from_json((tmp_path / "a" / "patch.json").read_text())
    assert res.axes == ("layer", "pos", "head") and res.settings["corruption"]["kind"] == "carry-flip"
    assert res.labels["pos"][:3] == ["0 a1", "1 a0", "2 *"]
    # --digit picks the answer digit; a small --max-batch chunks n; same seed, same numbers
    assert _cli(*args, "--max-batch", 16, "--out", tmp_path / "b") == 0
    again = Result.from_json((tmp_path / "b" / "patch.json").read_text())
    torch.testing.assert_close(again.values, res.values, **TOL)
    capsys.readouterr()
    assert _cli(*args, "--json") == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "patch_z_by_pos"


@pytest.mark.parametrize("extra,why", [
    (["--site", "resid_foo"], "unknown site"),
    (["--layers", "5"], "unknown layer"),
    (["--heads", "4"], "unknown head"),
    (["--positions", "40"], "unknown position"),
    (["--corruption", "swap"], "not defined for task"),
    (["--metric", "loss"], "unknown metric"),
    (["--digit", "9"], "digit"),
    (["--place", "1"], "does not apply"),
])
def test_cli_bad_input_exit_2_and_no_result_files(mult_dir, tmp_path, capsys, extra, why):
    base = {"--model": mult_dir, "--corruption": "carry-flip", "--n": 8}
    args = []
    for k, v in base.items():
        if k not in extra:
            args += [k, v]
    out = tmp_path / "out"
    assert _cli(*args, *extra, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and why in err and "\n" not in err
    assert not out.exists() or not any(out.iterdir())


def test_cli_sorting_metric_not_applicable_and_nonempty_out(tiny_sort_dir, tmp_path, capsys):
    assert _cli("--model", tiny_sort_dir, "--corruption", "swap", "--length", 6, "--n", 8, "--json") == 2
    assert "unchanged" in capsys.readouterr().err
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert _cli("--model", tiny_sort_dir, "--corruption", "successor-change", "--length", 6, "--n", 8, "--out", out) == 2
    assert "not empty" in capsys.readouterr().err
    assert _cli("--model", tiny_sort_dir, "--corruption", "successor-change", "--digit", 1, "--site", "mlp",
                "--all-pos", "--length", 6, "--n", 8, "--out", out, "--overwrite") == 0
    assert Result.from_json((out / "patch.json").read_text()).axes == ("layer",)
