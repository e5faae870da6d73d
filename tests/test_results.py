"""The one result convention: TransformerLens's axis order (layer, pos, head) in every instrument's Result,
integer labels for model indices (kept as ints through JSON), "<pos> <label>" strings for positions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from probekit import attribution as A
from probekit import circuits as C
from probekit import patching as P
from probekit.corruptions import corrupt
from probekit.results import Result, stack_results
from probekit.tasks import ProbekitError

TL_ORDER = ("layer", "pos", "head")
POS_LIKE = {"pos": "pos", "position": "pos"}  # probe sweeps call their answer-step axis "position"
PREFIXES = ("", "sender_", "writer_", "reader_")


def tl_order_violations(axes: tuple[str, ...]) -> list[str]:
    """The groups of axes (``layer``/``pos``/``head``, or one prefix's ``sender_layer``/``sender_head``...)
    that are not in TransformerLens's order."""
    bad = []
    for prefix in PREFIXES:
        names = [a[len(prefix):] for a in axes if a.startswith(prefix)] if prefix else list(axes)
        base = [POS_LIKE.get(a, a) for a in names]
        ranks = [TL_ORDER.index(a) for a in base if a in TL_ORDER]
        if ranks != sorted(ranks):
            bad.append(f"{prefix or ''}{[a for a in base if a in TL_ORDER]}")
    return bad


def test_the_order_check_can_fail():
    assert tl_order_violations(("pos", "layer", "head")) and tl_order_violations(("layer", "head", "pos"))
    assert tl_order_violations(("sender_head", "sender_layer", "layer", "head"))
    assert not tl_order_violations(("batch", "layer", "pos", "head", "src"))
    assert not tl_order_violations(("hook", "layer", "position", "split"))


# ---------------------------------------------------------------------------- every instrument, one table


@pytest.fixture(scope="module")
def sort_pair(tiny_sort):
    _, task = tiny_sort
    return corrupt(task, task.sample(12, length=5, seed=3), "successor-change", seed=2, step=2)


def _dla(unit, reduce="mean"):
    def run(model, task, pair):
        return A.direct_logit_attribution(model, pair.clean, unit=unit, reduce=reduce, vocab=task.vocab)
    return run


def _attrib(part):
    def run(model, task, pair):
        ap = A.attribution_patching(model, pair.clean, pair.corrupted, exact=True, steps=pair.answer_steps)
        return getattr(ap, part)
    return run


def _probe(model, task, pair):
    from probekit.probes import probe_sweep

    return probe_sweep(model, task.sample(80, length=5, seed=0), "target", hooks="resid_post",
                       evals={"6": task.sample(40, length=6, seed=1)}, by_position=True, controls=())


def _das(model, task, pair):
    from probekit.interventions import das_sweep

    return das_sweep(model, task, vary="target", hold=["prev_output"], at="step=2", target="source:target", k=1,
                     n=64, length=5, sites=["resid_post"], positions=["step=2", "step=1"], steps=3, n_controls=1,
                     n_boot=10)


# (name, run, expected axes, axes whose labels are the model's integer indices)
INSTRUMENTS = [
    ("patch z by pos", lambda m, t, p: P.sweep(m, p, "z", by_pos=True), ("layer", "pos", "head"), ("layer", "head")),
    ("patch z", lambda m, t, p: P.sweep(m, p, "z", by_pos=False), ("layer", "head"), ("layer", "head")),
    ("patch resid_pre by pos", lambda m, t, p: P.sweep(m, p, "resid_pre"), ("layer", "pos"), ("layer",)),
    ("patch z per step", lambda m, t, p: P.sweep(m, p, "z", per_step=True), ("layer", "pos", "head", "answer"),
     ("layer", "head")),
    ("path patch logits", lambda m, t, p: P.path_patch(m, p, "logits"), ("layer", "head"), ("layer", "head")),
    ("path patch q", lambda m, t, p: P.path_patch(m, p, "q"), ("sender_layer", "sender_head", "layer", "head"),
     ("sender_layer", "sender_head", "layer", "head")),
    ("dla head", _dla("head"), ("layer", "pos", "head"), ("layer", "head")),
    ("dla head, per example", _dla("head", "none"), ("batch", "layer", "pos", "head"), ("layer", "head")),
    ("dla source", _dla("source"), ("layer", "pos", "head", "src"), ("layer", "head")),
    ("dla layer", _dla("layer"), ("pos", "component"), ()),
    ("dla component", _dla("component", "none"), ("batch", "pos", "component"), ()),
    ("head ablation sweep", lambda m, t, p: A.head_ablation_sweep(m, p.clean, exact_match=False), ("layer", "head"),
     ("layer", "head")),
    ("attribution patching heads", _attrib("heads"), ("layer", "pos", "head"), ("layer", "head")),
    ("attribution patching mlp", _attrib("mlp"), ("layer", "pos"), ("layer",)),
    ("exact patching heads", _attrib("exact_heads"), ("layer", "pos", "head"), ("layer", "head")),
    ("head roles", lambda m, t, p: A.head_roles(m, [p.clean, p.corrupted], heads=[(1, 0), (0, 2)]),
     ("length", "head", "stat"), ("length",)),
    ("composition scores", lambda m, t, p: C.composition_scores(m, "Q"),
     ("writer_layer", "writer_head", "reader_layer", "reader_head"), ()),
    ("probe sweep", _probe, ("hook", "layer", "position", "split"), ()),
    ("das sweep", _das, ("layer", "pos"), ()),
]


@pytest.mark.parametrize("name, run, axes, int_axes", INSTRUMENTS, ids=[row[0] for row in INSTRUMENTS])
def test_every_instrument_uses_transformerlens_axis_order(tiny_sort, sort_pair, name, run, axes, int_axes):
    model, task = tiny_sort
    res = run(model, task, sort_pair)
    assert isinstance(res, Result)
    assert res.axes == axes, f"{name}: axes {res.axes}, expected {axes}"
    assert not tl_order_violations(res.axes), f"{name}: axes {res.axes} are not in (layer, pos, head) order"
    for ax in int_axes:
        n = res.values.shape[res.axes.index(ax)]
        want = [b.length for b in (sort_pair.clean, sort_pair.corrupted)] if ax == "length" else list(range(n))
        assert res.labels[ax] == want and all(type(x) is int for x in res.labels[ax]), (name, ax, res.labels[ax])
    for ax in ("pos", "src"):
        if ax in res.labels and res.kind == "iia":  # DAS positions are rules that pick a token per example
            assert res.labels[ax] == ["step=2", "step=1"]
        elif ax in res.labels:  # the one position-label scheme: "<pos> <label>" with the integer token position
            assert all(lab.split(" ", 1)[0].isdigit() and " " in lab for lab in res.labels[ax]), res.labels[ax]
    back = Result.from_json(res.to_json())
    assert back.axes == res.axes and back.labels == res.labels  # int labels stay ints through JSON


# ---------------------------------------------------------------------------- labels


def test_int_labels_round_trip_as_ints():
    r = Result("patch", torch.arange(12.0).reshape(2, 3, 2), ("layer", "pos", "head"),
               {"layer": [0, 3], "pos": ["0 SORT", "1 x0", "2 |"], "head": [np.int64(1), 2]}, {"seed": 0})
    assert r.labels["head"] == [1, 2] and type(r.labels["head"][0]) is int  # numpy integers become ints
    back = Result.from_json(r.to_json())
    assert back == r
    assert back.labels == {"layer": [0, 3], "pos": ["0 SORT", "1 x0", "2 |"], "head": [1, 2]}
    assert [type(x) for x in back.labels["layer"]] == [int, int]
    assert json.loads(r.to_json())["labels"]["layer"] == [0, 3]
    assert r.label("layer", 1) == "3" and r.label("pos", 2) == "2 |"  # label() is always a string
    frame = r.to_frame()
    assert frame["layer_label"].tolist()[-1] == "3" and frame["layer"].tolist()[-1] == 1
    assert r.top(1) == [({"layer": "3", "pos": "2 |", "head": "2"}, 11.0)]
    # an int label and its string spelling are different labels
    assert Result("x", torch.zeros(2), ("layer",), {"layer": ["0", "3"]}) != Result("x", torch.zeros(2), ("layer",),
                                                                                  {"layer": [0, 3]})


@pytest.mark.parametrize("bad", [1.5, True, None, (0, 1)])
def test_labels_other_than_strings_and_ints_are_refused(bad):
    with pytest.raises(ProbekitError, match="expected a string or an integer"):
        Result("x", torch.zeros(2), ("layer",), {"layer": [0, bad]})


def test_stack_results_keeps_integer_labels():
    a = Result("patch", torch.zeros(2), ("layer",), {"layer": [0, 1]})
    s = stack_results([a, a], "length", [10, np.int64(20)])
    assert s.labels == {"length": [10, 20], "layer": [0, 1]} and Result.from_json(s.to_json()) == s
    assert stack_results({"m1": a, "m2": a}, "model").labels["model"] == ["m1", "m2"]
