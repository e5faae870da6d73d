"""probekit.studies.sorting on the tiny sorter: runs, splits as stated, R^2 by hand, quantities vs the bridge."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from probekit.studies import sorting as ss
from probekit.tasks import ProbekitError


@pytest.fixture(scope="module")
def result(tiny_sort):
    model, task = tiny_sort
    return ss.sorting_failure(model, task, size="quick", lengths=(6, 10, 14), n=30)


def test_composition_inputs_have_the_stated_copies():
    x = ss.composition_inputs(64, "copies3", 5, 10, seed=1)
    for row in x:  # ceil(10 / 3) = 4 values: three with 3 copies, the last truncated to 1
        assert sorted(Counter(row.tolist()).values()) == [1, 3, 3, 3]
    d = ss.composition_inputs(64, "distinct", 5, 20, seed=1)
    assert all(len(set(r.tolist())) == 20 for r in d)
    u = ss.composition_inputs(64, "uniform", 3, 7, seed=2)
    assert (u == ss.composition_inputs(64, "uniform", 3, 7, seed=2)).all()
    with pytest.raises(ProbekitError):
        ss.composition_inputs(16, "distinct", 2, 20, seed=0)


def test_cells_split_and_r2_by_hand(result):
    cells = result.cells
    comps, lengths = result.settings["compositions"], result.settings["lengths"]
    assert len(cells) == len(comps) * len(lengths)
    for c in cells:
        i, j = comps.index(c["composition"]), lengths.index(c["length"])
        assert c["split"] == ("held-out" if (i + j) % 2 else "fit")
        assert 0 <= c["observed"] <= 1 and 0 <= c["predicted"] <= 1
    held = [c for c in cells if c["split"] == "held-out"]
    o = np.array([c["observed"] for c in held])
    p = np.array([c["predicted"] for c in held])
    r2 = 1 - ((o - p) ** 2).sum() / ((o - o.mean()) ** 2).sum()
    assert result.r2 == pytest.approx(r2)
    lo, hi = result.r2_ci95
    assert lo <= hi
    assert set(result.coefficients) == set(result.settings["features"])
    frame = result.to_frame()
    assert len(frame) == len(cells)
    assert '"r2"' in result.to_json()
    v = result.verdict("pytest", threshold=0.8)
    want = "supported" if lo >= 0.8 else "not supported" if hi < 0.8 else "inconclusive"
    assert v.verdict == want and v.n == len(held)


def test_heads_are_the_largest_patching_effects(result):
    effects = [h["effect"] for h in result.heads]
    assert effects == sorted(effects, reverse=True)
    assert [h["chosen"] for h in result.heads] == [True] * 4 + [False] * (len(effects) - 4)
    labels = [h["label"] for h in result.heads if h["chosen"]]
    assert result.settings["features"][:4] == [f"{k}_{labels[0]}" for k in ("mass", "margin", "cmass", "cmargin")]
    assert f"cmargin_{labels[0]}*repeat" in result.coefficients and "log_copies_left*repeat" in result.coefficients


def test_step_quantities_against_the_bridge(tiny_sort):
    model, task = tiny_sort
    batch = task.batch_from_inputs(ss.composition_inputs(task.n_values, "copies2", 8, 6, seed=3))
    heads = [(1, 0), (0, 2)]
    q = ss.step_quantities(model, batch, heads)
    names = {f"blocks.{L}.attn.hook_pattern" for L, _ in heads}
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n in names)
    pp = torch.nonzero(batch.pred_mask[0]).flatten()
    target = batch.feature("target")[:, pp]
    assert (q["error"] == (logits[:, pp].argmax(-1) != target).numpy().ravel()).all()
    inputs = batch.tokens[:, 1:1 + batch.length]
    correct = inputs[:, None, :] == target[:, :, None]
    for L, h in heads:
        A = cache[f"blocks.{L}.attn.hook_pattern"][:, h][:, pp][:, :, 1:1 + batch.length]
        mass = (A * correct).sum(-1).numpy().ravel()
        np.testing.assert_allclose(q[f"mass_L{L}H{h}"], mass, atol=1e-5)
        logA = torch.log(A.clamp_min(1e-30))  # score differences = log-ratio of attention weights
        margin = (logA.masked_fill(~correct, -1e9).amax(-1) - logA.masked_fill(correct, -1e9).amax(-1)).numpy().ravel()
        ok = np.abs(margin) < 20
        np.testing.assert_allclose(q[f"margin_L{L}H{h}"][ok], margin[ok], atol=1e-3)
        # confusor on repeat steps: the next larger input value; on new-value steps: the previous output
        prev = batch.feature("prev_output")[:, pp]
        for r in range(batch.n):
            for t in range(batch.length):
                xs, y, yp = inputs[r].tolist(), int(target[r, t]), int(prev[r, t])
                conf = min([v for v in xs if v > y], default=None) if yp == y else (yp if yp >= 0 else None)
                want = sum(float(A[r, t, i]) for i, v in enumerate(xs) if v == conf)
                assert q[f"cmass_L{L}H{h}"][r * batch.length + t] == pytest.approx(want, abs=1e-5)
    rep = (batch.feature("prev_output")[:, pp] == target).numpy().ravel()
    assert (q["repeat"] == rep).all()
    idx = q["target_index"].reshape(batch.n, batch.length)  # the target's copy in the stable order
    for r in range(batch.n):
        order = sorted(range(batch.length), key=lambda i: (int(inputs[r, i]), i))
        assert idx[r].tolist() == order


def test_bad_input_is_refused(tiny_sort):
    model, task = tiny_sort
    with pytest.raises(ProbekitError):
        ss.sorting_failure(model, task, size="huge")
    with pytest.raises(ProbekitError):
        ss.sorting_failure(model, task, size="quick", split="diagonal", heads=[(0, 0)])


def test_figure_is_written(result, tmp_path):
    ss.plot_sorting_failure(result, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_the_control_is_the_same_cells_without_head_quantities(tiny_sort):
    model, task = tiny_sort
    kw = {"size": "quick", "lengths": (6, 10, 14), "n": 30, "seed": 3}
    res = ss.sorting_failure(model, task, heads=[(1, 0)], control=True, **kw)
    ref = ss.sorting_failure(model, task, heads=[], **kw)  # the control as its own run: the same lists
    assert res.control["features"] == ref.settings["features"] == ["repeat", "log_copies_left",
                                                                    "log_copies_left*repeat"]
    assert res.control["r2"] == pytest.approx(ref.r2, nan_ok=True)
    assert res.control["r2_fit"] == pytest.approx(ref.r2_fit, nan_ok=True)
    assert res.control["r2_ci95"] == pytest.approx(ref.r2_ci95, nan_ok=True)
    assert [c["observed"] for c in res.cells] == [c["observed"] for c in ref.cells]
    assert [c["predicted"] for c in res.cells] != [c["predicted"] for c in ref.cells]  # the main fit is kept
    assert ss.sorting_failure(model, task, heads=[(1, 0)], **kw).control == {}


def test_failure_figures_share_their_axes(result):
    fig = ss.plot_failure_grid({"a": result, "b": result})
    axs = [ax for ax in fig.axes if ax.collections]
    assert len(axs) == 2 and axs[0].get_xlim() == axs[1].get_xlim() and axs[0].get_ylim() == axs[1].get_ylim()
    legend = [t.get_text() for t in axs[0].get_legend().get_texts()]  # only the compositions of the grid
    assert legend == ["y = x", *dict.fromkeys(c["composition"] for c in result.cells), "fit cell", "held-out cell"]
    fig = ss.plot_error_by_length({"a": result, "b": result})
    axs = [ax for ax in fig.axes if ax.get_lines()]
    assert axs[0].get_shared_y_axes().joined(axs[0], axs[1])
    observed = [ln for ln in axs[0].get_lines() if ln.get_label() == "distinct (observed)"][0]
    cells = sorted((c for c in result.cells if c["composition"] == "distinct"), key=lambda c: c["length"])
    assert list(observed.get_ydata()) == pytest.approx([c["observed"] for c in cells])


def test_dense_lists_are_runs_of_consecutive_values():
    x = ss.composition_inputs(64, "dense", 6, 10, seed=4)
    for row in x:
        assert sorted(row.tolist()) == list(range(min(row), min(row) + 10))
    assert len({min(r) for r in x}) > 1  # the run starts at random
    with pytest.raises(ProbekitError):
        ss.composition_inputs(16, "dense", 2, 20, seed=0)


def test_lookup_by_length_against_hand_computed_margins(tiny_sort):
    model, task = tiny_sort
    heads, lengths, n = [(1, 0), (0, 2)], (4, 8), 6
    lk = ss.lookup_by_length(model, task, heads, "quick", lengths=lengths, n=n, train_length=5, seed=2)
    names = {f"blocks.{L}.attn.hook_pattern" for L, _ in heads}
    for length in lengths:  # the same lists, rebuilt; margins from the attention pattern of the bridge
        batch = task.batch_from_inputs(ss.composition_inputs(task.n_values, "distinct", n, length, [2, 100, length]))
        with torch.no_grad():
            logits, cache = model.run_with_cache(batch.tokens, names_filter=lambda k: k in names)
        pp = torch.nonzero(batch.pred_mask[0]).flatten()
        target = batch.feature("target")[:, pp]
        inputs = batch.tokens[:, 1:1 + length]
        correct = inputs[:, None, :] == target[:, :, None]
        margin, mass = [], []
        for L, h in heads:
            A = cache[f"blocks.{L}.attn.hook_pattern"][:, h][:, pp][:, :, 1:1 + length].double()
            logA = torch.log(A)  # no temperature: score differences are log-ratios of attention weights
            margin.append(logA.masked_fill(~correct, -1e9).amax(-1) - logA.masked_fill(correct, -1e9).amax(-1))
            mass.append((A * correct).sum(-1))
        per = lk.per_list[length]
        np.testing.assert_allclose(per["margin"], torch.stack(margin).mean((0, 2)).numpy(), atol=1e-4)
        np.testing.assert_allclose(per["mass"], torch.stack(mass).mean((0, 2)).numpy(), atol=1e-5)
        err = (logits[:, pp].argmax(-1) != target).double()
        np.testing.assert_allclose(per["error"], err.mean(1).numpy())
    d, lo, hi = lk.change("margin", 4, 8, n_boot=50)
    assert d == pytest.approx(lk.per_list[8]["margin"].mean() - lk.per_list[4]["margin"].mean()) and lo <= d <= hi
    assert [r["margin"] for r in lk.rows] == pytest.approx([lk.per_list[L]["margin"].mean() for L in lengths])
    with pytest.raises(ProbekitError):
        ss.lookup_by_length(model, task, heads, "quick", lengths=(4, 40))  # one length fits 16 values


def test_kept_share_contrast_finds_a_planted_ratio():
    rng = np.random.default_rng(0)

    def lookup(short, long):
        per = {4: {"mass": rng.normal(short, 0.01, 80)}, 8: {"mass": rng.normal(long, 0.01, 80)}}
        return ss.LookupByLength("m", ["L0H0"], "distinct", 4, [], per)

    a, b = lookup(0.4, 0.3), lookup(0.4, 0.15)  # a keeps 0.75 of its mass, b 0.375: a keeps twice b's share
    r, lo, hi = ss.kept_share_contrast(a, b, 4, 8, n_boot=200)
    want = (a.per_list[8]["mass"].mean() / a.per_list[4]["mass"].mean()) / (
        b.per_list[8]["mass"].mean() / b.per_list[4]["mass"].mean())
    assert r == pytest.approx(want) and lo < 2.0 < hi and hi - lo < 0.1
    assert ss.kept_share_contrast(a, a, 4, 8, n_boot=50)[0] == pytest.approx(1.0)


def test_held_out_fold_error_and_auc_from_the_cells(tiny_sort):
    model, task = tiny_sort
    res = ss.sorting_failure(model, task, size="quick", heads=[(1, 0), (0, 2)], lengths=(6, 10, 14), n=30,
                             train_length=8, seed=1)
    beyond = [c for c in res.cells if c["split"] == "held-out" and c["length"] > 8]
    assert sorted(res.held_out["fold_cells"]) == sorted(c["length"] for c in beyond)
    o = sum(c["observed"] * c["n_steps"] for c in beyond)
    p = sum(c["predicted"] * c["n_steps"] for c in beyond)
    assert res.held_out["fold"] == (pytest.approx(max(o / p, p / o)) if o > 0 else float("inf"))
    assert 0 <= res.held_out["auc"] <= 1 or np.isnan(res.held_out["auc"])
    lo, hi = res.held_out["fold_ci95"]
    assert lo <= hi and lo >= 1


def test_log_error_plot_draws_cells_without_error_on_the_floor(result):
    fig = ss.plot_error_by_length({"a": result, "b": result}, log_y=True)
    axs = [ax for ax in fig.axes if ax.get_lines()]
    assert axs[0].get_yscale() == "log" and axs[0].get_shared_y_axes().joined(axs[0], axs[1])
    observed = [ln for ln in axs[0].get_lines() if ln.get_label() == "distinct (observed)"][0]
    cells = sorted((c for c in result.cells if c["composition"] == "distinct"), key=lambda c: c["length"])
    assert list(observed.get_ydata()) == pytest.approx([max(c["observed"], ss.FLOOR) for c in cells])


def test_errors_split_by_the_target_index_and_their_gap():
    # two lists of 4 steps; the target of step t sits at input index idx; errors planted
    q = {"row": np.repeat([0, 1], 4), "target_index": np.array([0, 3, 1, 2, 2, 0, 3, 1]),
         "error": np.array([0, 1, 0, 1, 1, 0, 0, 0], bool), "margin_L0H0": np.arange(8.0), "mass_L0H0": np.ones(8)}
    per = ss.per_list_means(q, [(0, 0)], 2, train_length=2)
    assert per["error_beyond"].tolist() == [1.0, 0.5]  # steps with index >= 2: list 0 steps 1, 3; list 1 steps 0, 2
    assert per["error_within"].tolist() == [0.0, 0.0]
    assert per["error"].tolist() == [0.5, 0.25] and per["margin"].tolist() == [1.5, 5.5]
    lk = ss.LookupByLength("m", ["L0H0"], "distinct", 2, [], {4: per})
    assert lk.position_gap(4, n_boot=50)[0] == pytest.approx(0.75)
    lk.per_list[4] = ss.per_list_means(q, [(0, 0)], 2, train_length=9)  # no step beyond: refused
    with pytest.raises(ProbekitError):
        lk.position_gap(4)
