"""`probekit.compare` and ``probekit compare``: two hand-built models that differ only in the planted lookup
head (L1H2 vs L1H0), so B - A is known: +1 share restored at L1H0, -1 at L1H2, nothing elsewhere."""

from __future__ import annotations

import json

import pytest
import torch

from probekit import patching as P
from probekit import viz
from probekit.attribution import head_ablation_sweep
from probekit.cli import main
from probekit.compare import compare_models, entry, newcombe, stack_difference
from probekit.corruptions import corrupt
from probekit.evaluate import evaluate, wilson
from probekit.groundtruth import build_sort_lookup_model
from probekit.model import save_model
from probekit.results import Result
from probekit.tasks import ProbekitError

LENGTHS, N, L = [4, 6], 32, 6


@pytest.fixture(scope="module")
def pair_of_models():
    ma, task = build_sort_lookup_model(head=(1, 2))
    mb, task_b = build_sort_lookup_model(head=(1, 0))
    ma.probekit_name, mb.probekit_name = "planted-L1H2", "planted-L1H0"
    return ma, task, mb, task_b


@pytest.fixture(scope="module")
def cmp(pair_of_models):
    ma, ta, mb, tb = pair_of_models
    return compare_models(ma, ta, mb, tb, LENGTHS, n=N, length=L, attribution="ablate")


def test_every_part_is_a_b_and_b_minus_a_of_the_single_model_results(pair_of_models, cmp):
    ma, task, mb, _ = pair_of_models
    for name, r in cmp.parts.items():
        assert r.labels["model"] == ["planted-L1H2", "planted-L1H0", "B - A"], name
        torch.testing.assert_close(r.values[2], r.values[1] - r.values[0], rtol=0, atol=0)
    # each side equals the instrument run on its own, on the same inputs
    for i, m in enumerate((ma, mb)):
        ev = evaluate(m, task, LENGTHS, n=N, seed=0)
        assert cmp.parts["accuracy"].values[i].tolist() == pytest.approx([r["exact_match"] for r in ev.records])
        pair = corrupt(task, task.sample(N, length=L, seed=0), "successor-change", seed=0)
        torch.testing.assert_close(cmp.parts["patch"].values[i], P.sweep(m, pair, "z", by_pos=True).values)
        abl = head_ablation_sweep(m, task.sample(N, length=L, seed=1), method="zero", metric="logprob")
        torch.testing.assert_close(cmp.parts["attribution"].values[i], abl.values)


def test_the_planted_difference_shows_where_it_was_planted(cmp):
    diff = entry(cmp.parts["patch"], 2).values.sum(1)  # layer head, summed over positions
    assert float(diff[1, 0]) == pytest.approx(1.0, abs=0.02) and float(diff[1, 2]) == pytest.approx(-1.0, abs=0.02)
    rest = diff.clone()
    rest[1, 0] = rest[1, 2] = 0
    assert float(rest.abs().max()) < 0.02


def test_newcombe_interval_matches_the_published_example():
    # Newcombe (1998), Stat Med 17:873, Table II example (a): 56/70 vs 48/80, method 10: 0.0524 to 0.3339
    pa, pb = 48 / 80, 56 / 70
    lo, hi = newcombe(pa, *wilson(48, 80), pb, *wilson(56, 70))
    assert (lo, hi) == pytest.approx((0.0524, 0.3339), abs=5e-4)
    assert lo < pb - pa < hi


def test_accuracy_difference_carries_newcombe_intervals(cmp):
    acc = cmp.parts["accuracy"]
    lo, hi = acc.extra["ci_low"], acc.extra["ci_high"]
    assert lo.shape == hi.shape == acc.values.shape
    assert bool((lo <= acc.values + 1e-6).all() and (acc.values <= hi + 1e-6).all())
    assert acc.settings["difference_interval"].startswith("95 % Newcombe")


def test_models_of_different_tasks_or_shapes_are_refused(pair_of_models):
    ma, ta, _, _ = pair_of_models
    other, other_task = build_sort_lookup_model(n_values=12, head=(1, 2))
    with pytest.raises(ProbekitError, match="must share a task") as e:
        compare_models(ma, ta, other, other_task, LENGTHS, n=4)
    assert "\n" not in str(e.value)
    wide, wide_task = build_sort_lookup_model(head=(1, 1), n_heads=2)
    with pytest.raises(ProbekitError, match="same layers x heads"):
        compare_models(ma, ta, wide, wide_task, LENGTHS, n=4)
    with pytest.raises(ProbekitError, match="cannot take B - A"):
        stack_difference(Result("x", torch.ones(2), ("a",)), Result("x", torch.ones(3), ("a",)), ("p", "q"))


def test_comparison_figures_share_a_scale_and_draw_the_difference_diverging(cmp, tmp_path):
    fig = viz.compare_heatmap(cmp.parts["patch"], tmp_path / "patch.png")
    ims = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(ims) == 3
    assert ims[0].get_clim() == ims[1].get_clim()  # A and B: one colour scale
    lo, hi = ims[2].get_clim()
    assert lo == -hi and ims[2].get_cmap().name != ims[0].get_cmap().name  # the difference: its own diverging map
    labels = [ax.get_ylabel() for ax in fig.axes if not ax.images and ax.get_ylabel()]
    assert any("share of logit difference restored" in s for s in labels)
    assert any(s.startswith("B - A") for s in labels)
    assert "Head-output patching, successor-change" in fig._suptitle.get_text()
    fig = viz.compare_accuracy(cmp.parts["accuracy"])
    assert fig.axes[0].get_ylim() == fig.axes[1].get_ylim()
    assert [int(t) for t in fig.axes[2].get_xticks()] == LENGTHS
    fig = viz.compare_probe(cmp.parts["probe"])
    assert fig.axes[0].get_ylim() == fig.axes[1].get_ylim()
    with pytest.raises(ProbekitError, match="leading 'model' axis"):
        viz.compare_heatmap(entry(cmp.parts["patch"], 0))


def test_compare_command_writes_json_csv_png(pair_of_models, tmp_path, capsys):
    ma, task, mb, _ = pair_of_models
    a = save_model(ma, tmp_path / "a", task, name="a")
    b = save_model(mb, tmp_path / "b", task, name="b")
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(a), "--model", str(b), "--lengths", "4,6", "--n", "16", "--length", "6",
            "--attribution", "dla", "--out", str(out)]
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert {"compare.json"} | {f"compare_{p}.{s}" for p in ("accuracy", "probe", "patch", "attribution")
                               for s in ("json", "csv", "png")} <= names
    d = json.loads((out / "compare_patch.json").read_text())
    v = torch.tensor(d["values"])
    torch.testing.assert_close(v[2], v[1] - v[0])
    assert d["labels"]["model"] == ["a", "b", "B - A"]
    printed = capsys.readouterr().out
    assert "B - A" in printed and "wrote compare.json" in printed
    settings = json.loads((out / "compare.json").read_text())
    assert settings["models"] == ["a", "b"] and settings["lengths"] == [4, 6] and settings["attribution"] == "dla"
