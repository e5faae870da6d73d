"""Figures from results (PNG/SVG, token labels, wrong-kind errors) and the offline attention HTML, opened
by a real headless Chromium with the network off."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid

import numpy as np
import pytest
import torch

from probekit import viz
from probekit.evaluate import EvalResult, wilson
from probekit.groundtruth import build_sort_lookup_model
from probekit.results import Result
from probekit.tasks import ProbekitError

POS = ["6 |", "7 ·", "8 ·"]


def _dla_heads() -> Result:
    g = torch.Generator().manual_seed(0)
    return Result("dla_head", torch.randn(2, 3, 4, generator=g), ("layer", "pos", "head"),
                  {"layer": [0, 1], "pos": POS, "head": [0, 1, 2, 3]})


def _sweep() -> Result:
    return Result("head_ablation_sweep", torch.arange(8.0).reshape(2, 4), ("layer", "head"))


def _ticks(ax, which: str) -> list[str]:
    return [t.get_text() for t in (ax.get_xticklabels() if which == "x" else ax.get_yticklabels())]


def test_heatmap_keeps_its_signature_and_writes_png_and_svg(tmp_path):
    fig = viz.heatmap(_sweep(), tmp_path / "a.png", rows="layer", cols="head", facet=None, title="t",
                      cmap="RdBu_r", symmetric=True)
    assert fig is not None and (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    viz.heatmap(_dla_heads(), tmp_path / "b.svg")  # 3-D: one panel per head
    assert "<svg" in (tmp_path / "b.svg").read_text()[:2000]
    viz.heatmap(_sweep(), tmp_path / "both")
    assert (tmp_path / "both.png").exists() and (tmp_path / "both.svg").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    with pytest.raises(ProbekitError, match="suffix '.pdf'"):
        viz.heatmap(_sweep(), tmp_path / "c.pdf")
    with pytest.raises(ProbekitError, match="1-, 2- or 3-D"):
        viz.heatmap(Result("x", torch.zeros(1, 1, 1, 1), ("a", "b", "c", "d")))


def test_layer_pos_and_layer_head_heatmaps(tmp_path):
    r = _dla_heads()
    fig = viz.layer_pos_heatmap(r, tmp_path / "lp.png")
    ax = fig.axes[0]
    assert _ticks(ax, "x") == POS
    assert _ticks(ax, "y") == [f"L{L}H{h}" for L in range(2) for h in range(4)]
    img = torch.tensor(ax.images[0].get_array().data)
    torch.testing.assert_close(img, r.values.permute(0, 2, 1).flatten(0, 1).float())
    fig = viz.layer_head_heatmap(r, tmp_path / "lh.svg")
    img = torch.tensor(fig.axes[0].images[0].get_array().data)
    torch.testing.assert_close(img, r.values.mean(1).float())
    comp = Result("dla_layer", torch.ones(3, 4), ("pos", "component"),
                  {"pos": POS, "component": ["embed", "attn0", "mlp0", "const"]})
    fig = viz.layer_pos_heatmap(comp)
    assert _ticks(fig.axes[0], "y") == ["embed", "attn0", "mlp0", "const"]
    fig = viz.plot(Result("attrib_patch_mlp", torch.ones(2, 3), ("layer", "pos"), {"pos": POS}), "layer-pos")
    assert _ticks(fig.axes[0], "x") == POS


def test_wrong_kind_of_result_is_refused():
    with pytest.raises(ProbekitError, match="'head_ablation_sweep' result .* expected a 'pos' axis"):
        viz.layer_pos_heatmap(_sweep())
    with pytest.raises(ProbekitError, match="expected 'layer' and 'head'"):
        viz.layer_head_heatmap(Result("dla_layer", torch.ones(3, 2), ("pos", "component")))
    with pytest.raises(ProbekitError, match="expected 'layer' and 'length'"):
        viz.probe_accuracy(_dla_heads())
    with pytest.raises(ProbekitError, match="is a Result of kind 'dla_head'"):
        viz.accuracy_vs_length([_dla_heads()])
    with pytest.raises(ProbekitError, match="unknown plot"):
        viz.plot(_sweep(), "sankey")
    with pytest.raises(ProbekitError, match="needs a probekit Result"):
        viz.layer_head_heatmap({"layer": 1})


def test_probe_accuracy_and_accuracy_vs_length(tmp_path):
    acc = Result("probe_accuracy", torch.tensor([[0.5, 0.4], [0.9, 0.7], [1.0, 0.8]]), ("layer", "length"),
                 {"length": ["10", "50"]}, {"chance": 0.25})
    fig = viz.probe_accuracy(acc, tmp_path / "probe")
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("length")]
    assert [ln.get_label() for ln in lines] == ["length 10", "length 50"]
    assert list(lines[1].get_ydata()) == pytest.approx([0.4, 0.7, 0.8])
    assert (tmp_path / "probe.png").exists() and (tmp_path / "probe.svg").exists()

    def rec(L, k, n=100):
        return {"length": L, "n": n, "exact_match": k / n, "exact_match_ci95": list(wilson(k, n))}

    a = EvalResult(model="sort-a", task={}, seed=0, records=[rec(20, 99), rec(10, 100), rec(50, 2)])
    b = EvalResult(model="sort-b", task={}, seed=0, records=[rec(10, 100), rec(20, 83)])
    fig = viz.accuracy_vs_length({"baseline": a, "hint": b}, tmp_path / "acc.svg", train_lengths=(1, 20))
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["baseline"].get_xdata()) == [10, 20, 50]
    assert list(lines["baseline"].get_ydata()) == pytest.approx([1.0, 0.99, 0.02])
    assert len(ax.collections) >= 2  # the confidence bands
    assert viz.accuracy_vs_length(a).axes[0].get_lines()[0].get_label() == "sort-a"


def test_interval_plot_draws_each_group_with_its_interval(tmp_path):
    rows = [{"length": L, "model": m, "step": st, "value": v, "lo": v - 0.1, "hi": v + 0.05}
            for m, base in (("a", 0.9), ("b", 0.5)) for st in ("new", "repeat") for L, v in ((50, base - 0.2), (20, base))]
    rows.append({"length": 100, "model": "a", "step": "new", "value": float("nan"), "lo": 0.0, "hi": 1.0})  # left out
    fig = viz.interval_plot(rows, "length", hue="model", facet="step", reference=1.0, reference_label="chance",
                            path=tmp_path / "iv.png", title="by length")
    assert (tmp_path / "iv.png").exists()
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["new", "repeat"]
    ax = panels[0]
    groups = {c.get_label(): c for c in ax.containers}
    line = groups["a"].lines[0]
    assert list(line.get_xdata()) == [20.0, 50.0] and list(line.get_ydata()) == pytest.approx([0.9, 0.7])
    bars = groups["a"].lines[2][0].get_segments()  # the error bars: (x, lo) -> (x, hi)
    assert [tuple(map(float, seg[:, 1])) for seg in bars] == [pytest.approx((0.8, 0.95)), pytest.approx((0.6, 0.75))]
    assert [ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_label() == "chance"] == [1.0]
    cat = viz.interval_plot([{"head": h, "model": m, "value": 0.2, "lo": 0.1, "hi": 0.3}
                             for h in ("L0H0", "L1H2") for m in ("a", "b")], "head", hue="model")
    assert [t.get_text() for t in cat.axes[0].get_xticklabels()] == ["L0H0", "L1H2"]
    with pytest.raises(ProbekitError, match="no rows"):
        viz.interval_plot([{"length": 1}], "length")


# ---------------------------------------------------------------------------- attention HTML


@pytest.fixture(scope="module")
def gt_model():
    return build_sort_lookup_model(head=(1, 2))


def test_attention_html_is_standalone(gt_model, tmp_path):
    model, task = gt_model
    batch = task.sample(2, length=5, seed=0)
    page = viz.attention_html(model, batch, task=task, example=1, path=tmp_path / "att.html")
    assert (tmp_path / "att.html").read_text(encoding="utf-8") == page
    # nothing is loaded from the network: no CDN import, no external script or stylesheet
    assert "unpkg.com" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:|from\s*["']https?:|import\(\s*["']https?:""", page)
    assert "CircuitsVis.render" in page and len(page) > 500_000  # the bundle is inlined
    tokens = task.decode(batch.tokens[1]).split()
    assert '"tokens": ' + str(tokens).replace("'", '"') in page
    assert '"L1H2"' in page
    with pytest.raises(ProbekitError, match="head 7 is out of range"):
        viz.attention_html(model, batch, heads=[(0, 7)])
    with pytest.raises(ProbekitError, match="example 5"):
        viz.attention_html(model, batch, example=5)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         # network off: every request goes to a dead proxy and every host name fails to resolve
         "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=5000", "--window-size=1000,900",
         "--enable-logging=stderr", "--v=0"]


def _own_netns() -> list[str]:
    """``unshare --net`` (an empty network namespace) where permitted; the flags above cut the network anyway."""
    if shutil.which("unshare") and subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0:
        return ["unshare", "--net"]
    return []


def _chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{uuid.uuid4().hex[:8]}"
    profile.mkdir()
    cmd = [*_own_netns(), CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _render(tmp_path, html_path):
    """(DOM after scripts ran, colourful-pixel fraction of a screenshot, console lines)."""
    dom = _chromium(tmp_path, "--dump-dom", html_path.as_uri())
    shot = tmp_path / f"{html_path.stem}.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", html_path.as_uri())
    assert shot.exists(), run.stderr[-2000:]
    from PIL import Image

    img = torch.from_numpy(np.asarray(Image.open(shot).convert("RGB")).astype(np.float32))  # h w rgb
    colourful = float(((img.amax(-1) - img.amin(-1)) > 60).float().mean())
    # console messages of our page (Chromium's own chrome:// pages log too; those are not ours)
    page = html_path.as_uri()
    console = [ln for ln in (dom.stderr + run.stderr).splitlines() if "CONSOLE" in ln and page in ln]
    return dom.stdout, colourful, console


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_attention_html_renders_offline_in_headless_chromium(gt_model, tmp_path):
    import circuitsvis.attention as cva

    model, task = gt_model
    batch = task.sample(1, length=6, seed=0)
    local = tmp_path / "attention.html"
    viz.attention_html(model, batch, task=task, path=local)
    dom, colourful, console = _render(tmp_path, local)
    assert "Head Selector" in dom and "L1H2" in dom  # the React view rendered its head selector
    assert colourful > 0.02, f"screenshot is blank ({colourful:.4f} of pixels coloured)"
    assert console == [], console
    # negative control: the CDN page circuitsvis's str() gives cannot load its script with the network off,
    # so it must not render -- this is what proves the network was off and the check can fail.
    view = cva.attention_heads(attention=torch.rand(2, 4, 4).tril(), tokens=list("abcd"),
                               attention_head_names=["L0H0", "L1H2"])
    cdn = tmp_path / "cdn.html"
    cdn.write_text(f"<!doctype html><html><body>{view}</body></html>", encoding="utf-8")
    dom, colourful, _ = _render(tmp_path, cdn)
    assert "Head Selector" not in dom and colourful < 0.001


# ---------------------------------------------------------------------------- figures a reader can trust


def _patch_result(n_layers: int = 1, n_pos: int = 14, n_heads: int = 3, normalized: bool = True) -> Result:
    v = torch.zeros(n_layers, n_pos, n_heads)
    v[-1, n_pos - 4, n_heads - 1] = 0.86
    v[-1, n_pos - 4, 0] = 0.04
    return Result("patch_z_by_pos", v, ("layer", "pos", "head"),
                  {"layer": [str(i) for i in range(n_layers)], "pos": [f"{i} t{i}" for i in range(n_pos)],
                   "head": [str(h) for h in range(n_heads)]},
                  {"site": "z", "metric": "logit-diff", "normalized": normalized,
                   "corruption": {"kind": "carry-flip"}})


def _colorbar_labels(fig) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes if not ax.images and ax.get_ylabel()]


def test_titles_and_colour_bars_say_what_is_shown_in_words():
    fig = viz.layer_pos_heatmap(_patch_result())
    title = fig._suptitle.get_text()
    assert title == "Head-output patching, carry-flip: share of logit difference restored"
    assert "patch_" not in title and "_by_pos" not in title
    assert _colorbar_labels(fig) == ["share of logit difference restored\n(0 = corrupted, 1 = clean)"]
    assert fig.axes[0].get_xlabel() == "position (token)"
    raw = viz.heatmap(_patch_result(normalized=False), rows="layer", cols="pos", facet="head")
    assert "logit difference (logits)" in _colorbar_labels(raw)[0]
    dla = viz.layer_pos_heatmap(_dla_heads().__class__("dla_head", _dla_heads().values, _dla_heads().axes,
                                                       _dla_heads().labels, {"metric": "logit"}))
    assert dla._suptitle.get_text().startswith("Direct logit attribution by head")
    assert "direct logit attribution (logits)" in _colorbar_labels(dla)[0]
    abl = viz.layer_head_heatmap(Result("head_ablation_sweep", torch.ones(2, 4), ("layer", "head"), {},
                                        {"method": "mean", "metric": "logprob"}))
    assert abl._suptitle.get_text() == "Head ablation (mean): change in correct-token log-probability"
    assert "(nats)" in _colorbar_labels(abl)[0]


def test_every_known_kind_gets_a_title_in_words():
    """No title carries a result's kind, a hook name or a corruption called "custom"."""
    settings = {"metric": "logit-diff", "site": "resid_pre", "receiver": "q", "corruption": {"kind": "custom"},
                "feature": "carry_out", "method": "zero"}
    kinds = ["patch_resid_pre_by_pos", "patch", "path_patch_q", "exact_patch_heads", "exact_patch_mlp",
             "attrib_patch_heads", "dla_head", "head_ablation_sweep", "probe for carry_out", "composition_k",
             *viz.KIND_WORDS]
    titles = {k: viz.describe(Result(k, torch.zeros(2, 2), ("layer", "head"), {}, settings))[0] for k in kinds}
    for kind, title in titles.items():
        assert "_" not in title and "custom" not in title and title[0].isupper(), (kind, title)
    assert titles["path_patch_q"] == "Path patching into the queries, clean vs corrupted pairs: share of logit " \
        "difference restored"
    assert titles["patch_resid_pre_by_pos"].startswith("Residual-stream (block input) patching")
    assert titles["composition_k"] == "K-composition between heads (from the weights)"
    assert viz.in_words("blocks.1.hook_resid_mid") == "residual stream after attention"
    assert viz.in_words("carry_out") == "carry out"
def test_result_intervals_draws_each_estimate_with_its_interval(tmp_path):
    vals = torch.tensor([[0.2, 0.8], [0.5, 0.1], [0.9, 0.4]])
    r = Result("restoration", vals, ("head", "corruption"), {"head": ["L0H0", "L0H1", "L0H2"],
                                                              "corruption": ["carry-flip", "column-digit"]},
               {"title": "restored", "ylabel": "share", "reference": {"threshold": 0.5}},
               {"lo": vals - 0.1, "hi": vals + 0.05})
    one = Result("iia", torch.tensor([0.3, 0.7]), ("site",), {"site": ["resid_pre", "resid_mid"]}, {},
                 {"lo": torch.tensor([0.2, 0.6]), "hi": torch.tensor([0.4, 0.8])})
    fig = viz.result_intervals([r, one], path=tmp_path / "f.png", title="two panels")
    assert (tmp_path / "f.png").stat().st_size > 0 and fig._suptitle.get_text() == "two panels"
    ax = fig.axes[0]
    assert ax.get_title() == "restored" and ax.get_ylabel() == "share" and _ticks(ax, "x") == ["L0H0", "L0H1", "L0H2"]
    ys = sorted(float(y) for c in ax.containers for y in c.lines[0].get_ydata())
    assert ys == pytest.approx(sorted(vals.flatten().tolist()))  # one marker per (head, corruption)
    bars = [seg for c in ax.containers for seg in c.lines[2][0].get_segments()]
    got = np.array(sorted((float(s[0][1]), float(s[1][1])) for s in bars))
    want = np.array(sorted(zip((vals - 0.1).flatten().tolist(), (vals + 0.05).flatten().tolist(), strict=True)))
    assert np.allclose(got, want, atol=1e-6)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["threshold", "carry-flip", "column-digit"]
    with pytest.raises(ProbekitError, match="extra 'lo'/'hi'"):
        viz.result_intervals(Result("x", torch.ones(2), ("a",)))


def test_result_intervals_wraps_wide_rows_and_shares_one_legend():
    def panel(title):
        v = torch.rand(4, 2, generator=torch.Generator().manual_seed(0))
        return Result("x", v, ("length", "model"), {"length": list("abcd"), "model": ["m1", "m2"]}, {"title": title},
                      {"lo": v - 0.1, "hi": v + 0.1})

    fig = viz.result_intervals([panel("p1"), panel("p2"), panel("p3")])
    shown = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in shown] == ["p1", "p2", "p3"] and fig.get_size_inches()[0] <= viz.ROW_W
    assert shown[0].get_position().y0 > shown[2].get_position().y1  # the third panel on a second row
    assert all(ax.get_legend() is None for ax in shown)
    legends = [ax.get_legend() for ax in fig.axes if not ax.axison]  # one legend, in the empty slot
    assert len(legends) == 1 and [t.get_text() for t in legends[0].get_texts()] == ["m1", "m2"]


def test_facets_share_one_colour_scale_and_wrap_into_a_grid():
    r = Result("dla_head", torch.randn(6, 3, 8, generator=torch.Generator().manual_seed(1)), ("pos", "layer", "head"),
               {}, {"metric": "logit"})
    fig = viz.heatmap(r, rows="layer", cols="pos", facet="head")
    ims = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(ims) == 8 and len({im.get_clim() for im in ims}) == 1  # one scale for every facet
    assert len(_colorbar_labels(fig)) == 1  # ... and one colour bar
    rows_of_panels = {round(ax.get_position().y0, 3) for ax in fig.axes if ax.images}
    assert len(rows_of_panels) > 1  # a grid, not one long strip
    w, h = fig.get_size_inches()
    assert w <= viz.MAX_W and h <= viz.MAX_H


def test_robust_limits_clip_outliers_and_mark_them():
    v = torch.linspace(-1, 1, 300)
    v[7] = 50.0
    lo, hi = viz.robust_limits(v)
    assert lo == -hi and 0.9 < hi < 50
    r = Result("dla_layer", v.reshape(20, 15), ("pos", "component"), {}, {"metric": "logit"})
    fig = viz.heatmap(r)
    ax = fig.axes[0]
    assert ax.images[0].get_clim() == (lo, hi)
    marks = [c for c in ax.collections if len(c.get_offsets())]
    assert [tuple(map(int, o)) for c in marks for o in c.get_offsets()] == [(7, 0)]  # (col, row) of the outlier
    assert _colorbar_labels(fig)[0].endswith(f"beyond \u00b1{hi:.3g})")
    # a normalised patch map keeps its sparse hot cells: nothing inside [-1, 1] is clipped
    p = _patch_result(n_layers=4, n_pos=30, n_heads=4)
    p.values[0, :10, 1] = 0.05
    assert viz.robust_limits(p.values, floor=viz.scale_floor(p)) == pytest.approx((-0.86, 0.86))
    assert viz.robust_limits(p.values)[1] < 0.1  # without the floor the one hot cell would be clipped
    assert viz.robust_limits(torch.full((5,), float("nan"))) == (-1.0, 1.0)


def test_integer_axes_get_integer_ticks(tmp_path):
    def rec(L, k, n=50):
        return {"length": L, "n": n, "exact_match": k / n, "exact_match_ci95": list(wilson(k, n))}

    ev = EvalResult(model="m", task={}, seed=0, records=[rec(5, 50), rec(10, 40), rec(50, 3)])
    ax = viz.accuracy_vs_length(ev).axes[0]
    assert list(ax.get_xticks()) == [5, 10, 50]
    assert len(ax.collections) == 1  # the Wilson band
    log = tmp_path / "run" / "train_log.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s, "token_acc": 1 - 1 / s}) + "\n"
                           for s in range(50, 1001, 50)))
    fig = viz.plot_training_log(log, tmp_path / "run" / "train_log.png")
    assert (tmp_path / "run" / "train_log.png").read_bytes()[:4] == b"\x89PNG"
    for a in fig.axes:
        ticks = [t for t in a.get_xticks() if a.get_xlim()[0] <= t <= a.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    assert fig.axes[0].get_ylabel().startswith("training loss") and "step" == fig.axes[1].get_xlabel()
    assert fig._suptitle.get_text().startswith("Training: loss and answer-token accuracy")
    with pytest.raises(ProbekitError, match="no training records"):
        (tmp_path / "empty.jsonl").write_text("\n")
        viz.plot_training_log(tmp_path / "empty.jsonl")


@pytest.mark.parametrize("draw", ["layer_pos", "facets", "layer_head"])
def test_a_one_layer_model_is_drawn_at_a_sensible_size(draw):
    r = _patch_result(n_layers=1, n_pos=14, n_heads=3)
    fig = {"layer_pos": lambda: viz.layer_pos_heatmap(r),
           "facets": lambda: viz.heatmap(r, rows="layer", cols="pos", facet="head"),
           "layer_head": lambda: viz.layer_head_heatmap(r)}[draw]()
    w, h = fig.get_size_inches()
    assert 4.0 <= w <= 12 and 2.4 <= h <= 8, (w, h)
    assert w / h <= 3.5, (w, h)  # not a 2484 x 300 strip
    for ax in fig.axes:
        if ax.images:
            n_rows, n_cols = ax.images[0].get_array().shape
            bbox = ax.get_position()
            cell_w, cell_h = bbox.width * w / n_cols, bbox.height * h / n_rows
            assert cell_w >= 0.15 and cell_h >= 0.15, (cell_w, cell_h)  # inches
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert all(t.lstrip("L").replace("H", "").isdigit() for t in ticks)  # integer (layer, head) labels


def test_probe_accuracy_title_and_labels():
    acc = Result("probe for carry_out", torch.tensor([[0.5, 0.4], [0.9, 0.7]]), ("layer", "length"),
                 {"length": ["5", "7"]}, {"feature": "carry_out"})
    fig = viz.probe_accuracy(acc)
    assert fig._suptitle.get_text() == "Linear probe for carry out: held-out accuracy by layer"
    assert fig.axes[0].get_ylabel() == "probe accuracy (fraction correct)"
    assert list(fig.axes[0].get_xticks()) == [0, 1]


def test_heatmap_grid_shares_one_scale_across_panels_of_different_shapes(tmp_path):
    a = Result("patch_z", torch.tensor([[0.1, 0.9, -0.2]]), ("layer", "head"), {}, {"metric": "logit-diff"})
    b = Result("patch_z", torch.tensor([[0.0, 2.5], [0.3, -0.4], [0.2, 0.1]]), ("layer", "head"), {},
               {"metric": "logit-diff"})
    fig = viz.heatmap_grid({"model A": a, "model B": b}, tmp_path / "grid.png")
    ims = [ax.images[0] for ax in fig.axes if ax.images]
    assert [im.get_array().shape for im in ims] == [(1, 3), (3, 2)]  # each panel keeps its own shape
    assert len({im.get_clim() for im in ims}) == 1  # ... on one colour scale
    lo, hi = ims[0].get_clim()
    assert -lo == hi and hi >= 1.0  # symmetric, and a normalised patch is never clipped inside [-1, 1]
    assert len(_colorbar_labels(fig)) == 1
    assert [ax.get_title() for ax in fig.axes if ax.images] == ["model A", "model B"]
    assert (tmp_path / "grid.png").exists()
    with pytest.raises(ProbekitError, match="expected a 1- or 2-D result"):
        viz.heatmap_grid({"x": Result("x", torch.zeros(2, 2, 2), ("a", "b", "c"))})
    with pytest.raises(ProbekitError, match="non-empty dict"):
        viz.heatmap_grid({})


def test_accuracy_grid_draws_one_panel_per_group_on_a_shared_axis():
    def rec(L, k, n=100):
        return {"length": L, "n": n, "exact_match": k / n, "exact_match_ci95": list(wilson(k, n))}

    a = EvalResult(model="a", task={}, seed=0, records=[rec(10, 100), rec(20, 50)])
    b = EvalResult(model="b", task={}, seed=0, records=[rec(3, 90)])
    fig = viz.accuracy_grid({"lists": [a], "digits": {"b": b}})
    axs = [ax for ax in fig.axes if ax.get_lines()]
    assert [ax.get_title() for ax in axs] == ["lists", "digits"]
    assert list(axs[0].get_lines()[0].get_ydata()) == pytest.approx([1.0, 0.5])
    assert axs[0].get_shared_y_axes().joined(axs[0], axs[1])
    fig.canvas.draw()
    for ax in axs:  # each legend below its panel, off the lines
        assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0
    with pytest.raises(ProbekitError, match="panel 'x'"):
        viz.accuracy_grid({"x": [Result("x", torch.zeros(1), ("a",))]})
