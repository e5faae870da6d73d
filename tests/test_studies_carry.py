"""probekit.studies.carry: the quick study on the shipped models (verdicts from intervals, the staircase's known
heads, attention over chance by hand), and the transfer stage on a tiny place-index model trained here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probekit.model import ModelConfig, shipped_models
from probekit.stats import decide, ratio_of_means
from probekit.studies import carry as C
from probekit.studies import carry_study
from probekit.studies.common import SIZES, Study
from probekit.tasks import MultiplicationTask
from probekit.train import TrainConfig, train

SHIPPED = {"mult-5x1", "mult-3x3"} <= set(shipped_models())
NX1 = {"mult-nx1-place", "mult-nx1-learned-pos-rev"} <= set(shipped_models())  # the transfer stage runs


@pytest.fixture(scope="module")
def quick():
    if not SHIPPED:
        pytest.skip("mult-5x1 and mult-3x3 are not shipped")
    return carry_study(size="quick")


def test_every_verdict_follows_from_its_interval_and_is_stated(quick):
    # 3 staircase, 2 DAS, 1 probe, 2 ablation, 2 circuit; 2 for each N x 1 model when they are shipped
    assert len(quick.verdicts) == 10 + 4 * NX1
    for v in quick.verdicts:
        assert v.verdict == decide(v.hypothesis, v.interval)
        assert v.interval[0] <= v.effect <= v.interval[1] or np.isnan(v.effect)
        assert v.command == "probekit report --study carry --size quick"
    texts = [c["text"] for c in quick.claims]
    for v in quick.verdicts:  # each verdict is a claim with its effect, interval and verdict word
        assert any(v.hypothesis.statement in t and f"Verdict: {v.verdict}." in t for t in texts)
    assert all(c["command"] for c in quick.claims)
    assert any("mult-nx1-place is not shipped" in n for n in quick.notes) != NX1


def test_headline_is_written_from_the_verdicts(quick):
    assert 2 <= len(quick.headline) <= 4
    words = {"supported": "holds", "not supported": "does not hold", "inconclusive": "is inconclusive"}
    text = " ".join(quick.headline)
    for v in quick.verdicts:
        if "probe" not in v.hypothesis.statistic:  # the probe is not in the headline
            assert f"{C._num(v.effect)} [{C._num(v.interval[0])}, {C._num(v.interval[1])}]" in text
            assert words[v.verdict] in text


def test_the_staircase_of_mult_5x1(quick):
    """The documented staircase: L0H2 moves the carry (attends to a_(k-1)), L0H0 the column's own digit (a_k)."""
    v_carry, v_own, v_col = quick.verdicts[:3]
    assert "(L0H2," in v_carry.hypothesis.statement and "(L0H0," in v_col.hypothesis.statement
    att = quick.results["mult-5x1/attention"]
    top = {h: att.labels["target"][int(att.values[i].argmax())] for i, h in enumerate(att.labels["head"])}
    assert top == {"L0H0": "a_k", "L0H1": "b_0", "L0H2": "a_(k-1)"}
    rest = quick.results["mult-5x1/restoration"]
    assert rest.axes == ("head", "corruption") and rest.labels["corruption"] == ["carry-flip", "column-digit"]
    i = rest.labels["head"].index("L0H2")
    assert float(rest.values[i, 0]) == pytest.approx(v_carry.effect)
    assert (rest.extra["lo"] <= rest.values + 1e-9).all() and (rest.values <= rest.extra["hi"] + 1e-9).all()


def test_figures_have_captions_and_draw(quick):
    import matplotlib.pyplot as plt

    assert [f.key for f in quick.figures] == ["staircase", "carry_computed", "circuit"] + ["transfer"] * NX1
    for f in quick.figures:
        assert len(f.caption) > 100 and f.alt
        fig = f.make()
        assert fig.axes and fig.get_suptitle()
        plt.close(fig)


def test_attention_over_chance_by_hand():
    """Ratio = attention on the target key over 1 / (number of visible keys), averaged over the queries."""
    if not SHIPPED:
        pytest.skip("mult-5x1 is not shipped")
    model, task, _ = C._load("mult-5x1")
    batch = task.sample(12, length=5, seed=3)
    res = C._attention(model, batch, [3], seed=0)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens)
    A = cache["blocks.0.attn.hook_pattern"]  # batch head query key
    q = int((batch.features["digit_index"][0] == 3).nonzero()[0])  # the step writing digit 3
    labels = list(batch.pos_labels)
    for j, key in enumerate(("a3", "b0", "a2")):  # a_k, b_0, a_(k-1) for k = 3
        want = A[:, :, q, labels.index(key)].mean(0) * (q + 1)  # per head
        assert torch.allclose(res.values[:, j], want.float(), atol=1e-4)
    one = C._attention(model, batch, [3], seed=0, heads=[(0, 2)])  # one head: that head's row, intervals included
    assert one.labels["head"] == ["L0H2"]
    assert torch.equal(one.values[0], res.values[2])
    assert torch.equal(one.extra["lo"][0], res.extra["lo"][2]) and torch.equal(one.extra["hi"][0], res.extra["hi"][2])


def test_no_shipped_model_gives_notes_and_no_claims():
    st = carry_study(size="quick", staircase="no-a", circuit="no-b", extrapolating="no-c", failing="no-d")
    assert isinstance(st, Study) and not st.verdicts and not st.claims and not st.headline
    assert sum("is not shipped" in n for n in st.notes) == 4


# ---------------------------------------------------------------------------- transfer, on a tiny model


@pytest.fixture(scope="module")
def tiny_nx1(tmp_path_factory):
    """A 1-layer N x 1 model with per-digit place indices, a with 1..3 digits (a few hundred steps)."""
    task = MultiplicationTask(digits=3, b_digits=1, reverse_operands=True)
    cfg = ModelConfig(n_layers=1, d_model=48, n_heads=3, d_vocab=task.d_vocab, n_ctx=24, positional="place",
                      place_tokens=10, place_offset_max=2, seed=0)
    model = train(cfg, task, TrainConfig(steps=200, batch_size=64, lengths=(1, 3), lr=3e-3, warmup_steps=20),
                  out=tmp_path_factory.mktemp("nx1"), name="tiny-nx1", overwrite=True, progress=False)
    model.probekit_name = "tiny-nx1"
    return model, task


def test_transfer_measures_the_trained_head_at_unseen_lengths(tiny_nx1):
    model, task = tiny_nx1
    st = Study("carry", "t")
    out = C._transfer_model(st, "extrapolating", "tiny-nx1", model, task, (1, 3), C.PLANS["quick"], SIZES["quick"],
                            0, "cmd")
    assert out["trained"] == 3 and out["far"] == 4 and sorted(out["per"]) == [3, 4]
    rows = st.tables["transfer"]
    assert [(r["length"], r["unseen"]) for r in rows] == [(3, False), (4, True)]
    # the head is the best restorer on the selection half at the trained length
    r0 = out["rows"]
    sel = r0["half"] == 0
    best = int(np.nanargmax([ratio_of_means(np.stack([x, r0["clean"], r0["corrupted"]], 1)[sel]) for x in r0["raw"]]))
    assert out["head"] == r0["heads"][best]
    # at the trained length: the test half of the same rows, and the DAS fit's own held-out IIA
    per3 = out["per"][3]
    assert per3["rows_restoration"].shape[0] == int((r0["half"] == 1).sum())
    assert per3["iia"][0] == pytest.approx(out["fit"]["fit"].iia)
    for part in ("restoration", "iia"):
        v = out["verdicts"][part]
        assert v.verdict == decide(v.hypothesis, v.interval)
        stat = ratio_of_means if part == "restoration" else np.mean
        want = stat(out["per"][3]["rows_" + part]) - stat(out["per"][4]["rows_" + part])
        assert v.effect == pytest.approx(want)
    assert len(st.verdicts) == 2


def test_transfer_is_skipped_for_a_model_trained_on_one_length(tiny_nx1):
    model, task = tiny_nx1
    st = Study("carry", "t")
    assert C._transfer_model(st, "failing", "tiny", model, task, (3, 3), C.PLANS["quick"], SIZES["quick"], 0,
                             "cmd") is None
    assert "transfer skipped" in st.notes[0] and not st.verdicts
