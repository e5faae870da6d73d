"""The helpers the notebooks share, now in the library: reshaping probe sweeps and stacking results for the
figures (`probekit.viz`, `probekit.results.stack_results`), inline display, and a study's claims as text."""

from __future__ import annotations

import dataclasses
import html

import matplotlib.pyplot as plt
import pytest
import torch

from probekit import viz
from probekit.groundtruth import build_sort_lookup_model
from probekit.probes import probe_sweep
from probekit.results import Result, stack_results
from probekit.studies import Study
from probekit.tasks import ProbekitError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gt_sweep():
    """A real probe sweep on the hand-built sorting model: pooled and per-slot probes, two held-out lengths."""
    model, task = build_sort_lookup_model(head=(1, 2))
    evals = {"5": task.sample(96, length=5, seed=1), "8": task.sample(96, length=8, seed=2)}
    sw = probe_sweep(model, task.sample(192, length=8, seed=0), "target", "resid_pre,resid_post", evals=evals,
                     by_position=True, controls=("shuffle",))
    return model, evals, sw


def test_probe_by_length_matches_each_probe_scored_on_its_split(gt_sweep):
    model, evals, sw = gt_sweep
    r = viz.probe_by_length(sw)
    assert r.axes == ("hook", "layer", "length") and r.labels["length"] == ["5", "8"]
    assert r.labels["hook"] == sw.labels["hook"] and r.labels["layer"] == sw.labels["layer"]
    for h, hook in enumerate(sw.labels["hook"]):
        for L, layer in enumerate(sw.labels["layer"]):
            for j, split in enumerate(["5", "8"]):
                score = sw.probe(hook.removeprefix("hook_"), int(layer)).score(model, evals[split]).value
                assert float(r.values[h, L, j]) == pytest.approx(score, abs=1e-5), (hook, layer, split)
    slot = viz.probe_by_length(sw, position=2)  # a per-slot view: the slot's own probes
    assert torch.equal(slot.values, sw.values[:, :, sw.labels["position"].index("2"), 1:])
    with pytest.raises(ProbekitError, match="position 99"):
        viz.probe_by_length(sw, position=99)


def test_probe_chance_is_the_majority_baseline_of_the_last_split(gt_sweep):
    model, evals, sw = gt_sweep
    majority = [sw.probe(h.removeprefix("hook_"), int(L)).score(model, evals["8"]).majority
                for h in sw.labels["hook"] for L in sw.labels["layer"]]
    assert viz.probe_chance(sw) == pytest.approx(max(majority), abs=1e-6)
    assert 0 < viz.probe_chance(sw) < 0.5  # 16 distinct values: no constant answer is right often


def test_probe_by_site_has_one_row_per_site_and_one_column_per_filled_slot(gt_sweep):
    _, _, sw = gt_sweep
    r = viz.probe_by_site(sw, "5")
    assert r.axes == ("site", "position")
    assert r.labels["site"] == [f"{h.removeprefix('hook_')} L{L}" for h in sw.labels["hook"] for L in sw.labels["layer"]]
    s = sw.labels["split"].index("5")
    filled = [p for p in sw.labels["position"][1:]
              if not torch.isnan(sw.values[:, :, sw.labels["position"].index(p), s]).all()]
    assert r.labels["position"] == filled and len(filled) < len(sw.labels["position"]) - 1  # length 5: slots 5.. empty
    for i, site in enumerate(r.labels["site"]):
        h, L = divmod(i, len(sw.labels["layer"]))
        for j, p in enumerate(filled):
            want = sw.values[h, L, sw.labels["position"].index(p), s]
            assert torch.equal(r.values[i, j], want) or (torch.isnan(want) and torch.isnan(r.values[i, j])), site
    unfitted = sw.values.clone()
    unfitted[0, 1] = float("nan")  # a (hook, layer) cell of the grid that was not fitted (e.g. one layer's resid_pre)
    assert viz.probe_by_site(dataclasses.replace(sw, values=unfitted), "5").labels["site"] == \
        [site for i, site in enumerate(r.labels["site"]) if i != 1]
    with pytest.raises(ProbekitError, match="split 'nope'"):
        viz.probe_by_site(sw, "nope")
    with pytest.raises(ProbekitError, match="needs a probe sweep"):
        viz.probe_by_site(Result("x", torch.zeros(2, 2), ("layer", "head")), "5")


def test_probe_accuracy_draws_a_sweep_by_length_with_its_chance(gt_sweep):
    _, _, sw = gt_sweep
    fig = viz.probe_accuracy(sw, title="t")
    lines = {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines()}
    assert {"length 5", "length 8", "chance"} <= set(lines)
    assert float(lines["chance"].get_ydata()[0]) == pytest.approx(viz.probe_chance(sw))
    h, p = sw.labels["hook"].index("hook_resid_post"), sw.labels["position"].index("all")
    panel = [ax for ax in fig.axes if ax.get_title() == "residual stream, block output"][0]  # hook_resid_post
    y = [ln for ln in panel.get_lines() if ln.get_label() == "length 8"][0].get_ydata()
    assert torch.allclose(torch.tensor(y, dtype=torch.float32), sw.values[h, :, p, sw.labels["split"].index("8")])
    plt.close(fig)


def test_stack_results_adds_a_leading_axis():
    a = Result("patch", torch.arange(6.0).reshape(2, 3), ("layer", "head"), {"head": ["0", "1", "2"]}, {"seed": 0})
    b = Result("patch", -torch.arange(6.0).reshape(2, 3), ("layer", "head"), {"head": ["0", "1", "2"]}, {"seed": 1})
    s = stack_results([a, b], "length", [10, 20], kind="by length")
    assert s.axes == ("length", "layer", "head") and s.kind == "by length"
    assert torch.equal(s.values[0], a.values) and torch.equal(s.values[1], b.values)
    assert s.labels == {"length": [10, 20], "head": ["0", "1", "2"]} and s.settings == {"seed": 0}
    d = stack_results({"m1": a, "m2": b}, "model")
    assert d.labels["model"] == ["m1", "m2"] and d.kind == "patch" and torch.equal(d.values, s.values)
    with pytest.raises(ProbekitError, match="cannot stack"):
        stack_results([a, Result("patch", torch.zeros(3, 2), ("layer", "head"))], "length")
    with pytest.raises(ProbekitError, match="already one of"):
        stack_results([a, b], "head")
    with pytest.raises(ProbekitError, match="2 entries but 3 labels"):
        stack_results([a, b], "length", [1, 2, 3])
    with pytest.raises(ProbekitError, match="non-empty list"):
        stack_results([], "length")


def test_flatten_heads_is_layer_major():
    r = Result("z", torch.arange(24.0).reshape(2, 3, 4), ("digit", "layer", "head"),
               {"layer": ["0", "1", "2"], "head": ["0", "1", "2", "3"]})
    f = viz.flatten_heads(r)
    assert f.axes == ("head", "digit") and f.labels["head"][:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]
    for L in range(3):
        for h in range(4):
            assert torch.equal(f.values[4 * L + h], r.values[:, L, h])


def test_show_displays_then_closes_and_show_html_embeds_the_page(monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    fig = viz.heatmap(Result("x", torch.eye(2), ("a", "b")))
    assert plt.fignum_exists(fig.number)
    viz.show(fig)
    assert shown == [fig] and not plt.fignum_exists(fig.number)
    page = '<!doctype html><p title="a&b">x < y</p><script>let s = "q";</script>'
    viz.show_html(page, height=300)
    frame = shown[-1].data
    assert "height:300px" in frame
    srcdoc = frame.split('srcdoc="', 1)[1].split('"', 1)[0]  # escaped, so the page holds no raw quote
    assert html.unescape(srcdoc) == page


def test_study_summary_lists_claims_with_their_commands_then_notes():
    st = Study("carry", "The carry mechanism")
    st.claim("carry_in is readable at layer 1 (0.97)", "probekit probe --model mult-5x1")
    st.claim("head L0H2 routes the operands", "probekit attribute --model mult-5x1")
    st.notes.append("mult-extrap is not shipped")
    assert st.summary().splitlines() == [
        "- carry_in is readable at layer 1 (0.97)", "    [probekit probe --model mult-5x1]",
        "- head L0H2 routes the operands", "    [probekit attribute --model mult-5x1]",
        "note: mult-extrap is not shipped"]
    assert Study("x", "empty").summary() == ""
