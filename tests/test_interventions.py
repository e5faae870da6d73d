"""Interchange interventions and DAS against planted ground truth and TransformerLens-tested patching.

The planted model copies input token x1 to the answer through a known 2-dimensional residual subspace:
its one head (query: the SEP token; key: position 1) reads token t as (cos, sin) of angle 2 pi t / V and
writes it along two random orthonormal directions u1, u2; the unembedding reads logit t from the same
two directions. So the answer variable lives in span(u1, u2) of resid_post at the SEP position.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from probekit import interventions as I
from probekit.corruptions import CorruptedPair
from probekit.model import ModelConfig, build_model
from probekit.patching import Component, Metric, patch
from probekit.results import Result
from probekit.tasks import Batch, MultiplicationTask, ProbekitError, SortingTask

V, LENGTH, D_MODEL, D_HEAD = 6, 4, 32, 4
SEP = V


class CopyTask:
    """x0 x1 ... x_{L-1} SEP y with y = x1 (values 0..V-1). Features at the SEP position (which predicts y):
    ``target`` (= x1), ``first`` (= x0), ``copy`` (= x1 again, for an impossible matching)."""

    name = "copy"
    objective = "copy"

    def spec(self) -> dict:
        return {"name": self.name, "values": V, "length": LENGTH}

    def sample(self, n: int, length: int | None = None, seed: int = 0) -> Batch:
        L = LENGTH if length is None else length
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, V, (n, L), generator=g)
        tokens = torch.cat([x, torch.full((n, 1), SEP), x[:, 1:2]], 1)
        answer = torch.zeros_like(tokens, dtype=torch.bool)
        answer[:, -1] = True
        feats = {k: torch.full_like(tokens, -1) for k in ("target", "first", "copy", "slot")}
        feats["target"][:, L] = x[:, 1]
        feats["copy"][:, L] = x[:, 1]
        feats["first"][:, L] = x[:, 0]
        feats["slot"][:, :L] = torch.arange(L)
        feats["slot"][:, L] = L
        return Batch(tokens, answer, feats, self.name, self.objective, L, L + 1)


def build_copy_model(seed: int = 0, gain: float = 10.0, beta: float = 30.0):
    """The planted model of the module docstring; returns (model, U) with U [2, d_model] the answer subspace."""
    cfg = ModelConfig(n_layers=1, d_model=D_MODEL, n_heads=1, d_head=D_HEAD, n_ctx=LENGTH + 2, d_vocab=V + 1,
                      attn_only=True, normalization=None, positional="learned", seed=seed)
    model = build_model(cfg)
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    n_tok, n_pos = V + 1, LENGTH + 2
    sd["embed.weight"][:, :n_tok] = torch.eye(n_tok)
    sd["pos_embed.weight"][:, n_tok:n_tok + n_pos] = torch.eye(n_pos)
    sd["blocks.0.attn.q.weight"][0, SEP] = 1.0  # the SEP query ...
    sd["blocks.0.attn.k.weight"][0, n_tok + 1] = beta * math.sqrt(D_HEAD)  # ... attends to position 1
    theta = 2 * math.pi * torch.arange(V) / V
    sd["blocks.0.attn.v.weight"][0, :V] = torch.cos(theta)
    sd["blocks.0.attn.v.weight"][1, :V] = torch.sin(theta)
    free = D_MODEL - n_tok - n_pos
    q, _ = torch.linalg.qr(torch.randn(free, 2, generator=torch.Generator().manual_seed(seed)))
    U = torch.zeros(2, D_MODEL)
    U[:, n_tok + n_pos:] = q.T  # two random orthonormal directions outside the token and position dims
    sd["blocks.0.attn.o.weight"][:, :2] = U.T
    sd["unembed.weight"][:V] = gain * (torch.cos(theta)[:, None] * U[0] + torch.sin(theta)[:, None] * U[1])
    model.load_state_dict(sd, strict=True)
    model.probekit_name = "planted-copy"
    return model, U


@pytest.fixture(scope="module")
def planted():
    model, U = build_copy_model()
    task = CopyTask()
    at = I.Where(slot=LENGTH)
    pairs = I.counterfactual_pairs(task, 600, vary="target", hold=["first"], at=at,
                                   target=I.source_value("target", at), seed=0)
    return model, U, task, pairs


def _no_hooks(model) -> bool:
    return all(not hp._forward_hooks for hp in model.hook_dict.values())


def test_the_planted_model_copies_x1():
    model, _ = build_copy_model()
    batch = CopyTask().sample(64, seed=3)
    with torch.no_grad():
        pred = model(batch.tokens)[:, LENGTH].argmax(-1)
    assert torch.equal(pred, batch.tokens[:, -1])


def test_where_resolves_one_position_per_example():
    batch = MultiplicationTask(digits=3, b_digits=1).sample(16, seed=0)
    pos = I.Where(digit_index=2).resolve(batch)
    assert torch.equal(batch.features["digit_index"][torch.arange(16), pos], torch.full((16,), 2))
    assert (batch.pred_mask[torch.arange(16), pos]).all()
    assert torch.equal(I.Where(operand=0, place=0).resolve(batch), torch.full((16,), 2))  # units of a: "a2 a1 a0"
    with pytest.raises(ProbekitError, match="matches 0 positions"):
        I.Where(digit_index=9).resolve(batch)
    with pytest.raises(ProbekitError, match="matches 3 positions"):
        I.Where(operand=0).resolve(batch)
    with pytest.raises(ProbekitError, match="not defined"):
        I.Where(nope=1).resolve(batch)
    with pytest.raises(ProbekitError, match="out of range"):
        I.resolve_positions(99, batch)


def test_carry_pairs_hold_the_column_sum_and_vary_the_carry():
    task = MultiplicationTask(digits=3, b_digits=1)
    at = I.Where(digit_index=2)
    pairs = I.counterfactual_pairs(task, 300, vary="carry_in", hold=["column_sum"], at=at,
                                   target=I.carry_counterfactual(at), seed=1)
    sv = I.step_values
    assert (sv(pairs.base, at, "carry_in") != sv(pairs.source, at, "carry_in")).all()
    assert torch.equal(sv(pairs.base, at, "column_sum"), sv(pairs.source, at, "column_sum"))
    # oracle from the integers: S_2 = a_2 * b; carry into digit 2 = ((a mod 100) * b) div 100
    a_b, b_b = pairs.base.meta["a"].tolist(), pairs.base.meta["b"].tolist()
    a_s, b_s = pairs.source.meta["a"].tolist(), pairs.source.meta["b"].tolist()
    expected = [((ab // 100 % 10) * bb + (a % 100) * b // 100) % 10 for ab, bb, a, b in zip(a_b, b_b, a_s, b_s, strict=True)]
    assert pairs.target.tolist() == expected
    answer = pairs.base.tokens[torch.arange(pairs.n), pairs.answer_pos() + 1]
    assert (pairs.target != answer).all() and pairs.settings["target_differs_from_base"] == 1.0


def test_sorting_successor_pairs_hold_the_previous_output():
    task = SortingTask(n_values=64, objective="sort")
    at = I.Where(step=3)
    pairs = I.counterfactual_pairs(task, 100, 6, vary="target", hold=["prev_output"], at=at,
                                   target=I.source_value("target", at), seed=0)
    sv = I.step_values
    assert torch.equal(sv(pairs.base, at, "prev_output"), sv(pairs.source, at, "prev_output"))
    assert (sv(pairs.base, at, "target") != sv(pairs.source, at, "target")).all()
    assert torch.equal(pairs.target, pairs.source.tokens[torch.arange(100), pairs.answer_pos() + 1])


def test_pairs_refuse_impossible_and_contradictory_matchings():
    task, at = CopyTask(), I.Where(slot=LENGTH)
    tgt = I.source_value("target", at)
    with pytest.raises(ProbekitError, match="found 0 of 20 pairs"):
        I.counterfactual_pairs(task, 20, vary="target", hold=["copy"], at=at, target=tgt, max_rounds=2)
    with pytest.raises(ProbekitError, match="both varied and held"):
        I.counterfactual_pairs(task, 20, vary="target", hold=["target"], at=at, target=tgt)
    with pytest.raises(ProbekitError, match="not a predicting position"):
        I.counterfactual_pairs(task, 20, vary="target", at=I.Where(slot=0), target=tgt)


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "resid_post", "attn.hook_z"])
def test_full_interchange_matches_activation_patching(site):
    task = MultiplicationTask(digits=2, b_digits=1)
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=2, d_vocab=task.d_vocab, n_ctx=16,
                                    positional="learned", seed=1))
    base, source = task.sample(64, seed=0), task.sample(64, seed=1)
    pos, layer, step = 4, 1, 1  # position 4 is "=", predicting digit 0; step 1 reads position 5
    loc = I.Location(site, layer, pos)
    src = I.location_acts(model, source, loc)
    with torch.no_grad():
        logits = I.intervened_logits(model, base.tokens, loc, I.resolve_positions(pos, base), src, I.Interchange())
    read = torch.nonzero(base.pred_mask[0]).flatten()[step]
    ours = logits[:, read].softmax(-1).gather(-1, source.tokens[:, read + 1, None]).mean()
    component = Component("z" if site == "attn.hook_z" else site, layer, pos=pos)  # z: every head at pos
    ref = patch(model, CorruptedPair(clean=source, corrupted=base), [component],
                metric=Metric("prob", steps=(step,)), normalize=False)
    assert torch.allclose(ours, ref.extra["raw"][0].to(ours.dtype), atol=1e-5)
    assert _no_hooks(model)


def test_subspace_interchange_algebra():
    g = torch.Generator().manual_seed(0)
    base, src = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    sub = I.random_subspace(8, 3, seed=2)
    B = sub.basis
    assert torch.allclose(B @ B.T, torch.eye(3), atol=1e-5)
    new = sub(base, src)
    assert torch.allclose(new @ B.T, src @ B.T, atol=1e-5)  # inside the subspace: the source's
    P = torch.eye(8) - B.T @ B
    assert torch.allclose(new @ P, base @ P, atol=1e-5)  # outside: the base's
    assert torch.allclose(I.SubspaceInterchange(torch.eye(8))(base, src), I.Interchange()(base, src), atol=1e-5)
    rot = I.RotatedSubspaceInterchange(8, 3, seed=0)
    assert torch.allclose(rot(base, src), rot.frozen()(base, src), atol=1e-6)
    with pytest.raises(ProbekitError, match="k=9"):
        I.random_subspace(8, 9)


@pytest.fixture(scope="module")
def planted_fit(planted):
    model, U, _, pairs = planted
    loc = I.Location("resid_post", 0, I.Where(slot=LENGTH))
    return I.fit_das(model, pairs, loc, k=2, steps=300, lr=2e-2)


def test_das_finds_the_planted_subspace(planted, planted_fit):
    model, U, _, pairs = planted
    fit = planted_fit
    assert fit.iia > 0.95
    lo, hi = fit.interval
    assert lo <= fit.iia <= hi and hi - lo < 0.1
    assert fit.ceiling > 0.95  # the full vector carries the answer
    assert fit.control.numel() == 3 and float(fit.control.max()) < 0.2  # random 2-d subspaces do not
    assert fit.floor == 0.0  # the base run never gives the counterfactual answer (vary differs)
    # the learned subspace is span(u1, u2): its projector equals U's
    P_fit, P_true = fit.basis.T @ fit.basis, U.T @ U
    assert torch.allclose(P_fit, P_true, atol=0.1)
    assert fit.correct.numel() == fit.settings["n_test"] == 150


def test_das_at_a_site_without_the_variable_is_at_the_floor(planted):
    model, _, _, pairs = planted
    for loc in (I.Location("resid_pre", 0, I.Where(slot=LENGTH)),  # SEP token + position only
                I.Location("resid_post", 0, I.Where(slot=0))):  # x0's position: never read by the answer
        fit = I.fit_das(model, pairs, loc, k=2, steps=60, n_controls=2)
        assert fit.iia < 0.2 and fit.ceiling < 0.2, loc.label


def test_one_dimension_is_not_enough_for_a_two_dimensional_variable(planted, planted_fit):
    model, _, _, pairs = planted
    fit = I.fit_das(model, pairs, I.Location("resid_post", 0, I.Where(slot=LENGTH)), k=1, steps=200, lr=2e-2,
                    n_controls=1)
    assert fit.interval[1] < planted_fit.interval[0] and fit.iia < 0.6


def test_rotation_stays_orthogonal(planted_fit):
    R = planted_fit.rotation
    assert R.shape == (D_MODEL, D_MODEL)
    assert torch.allclose(R @ R.T, torch.eye(D_MODEL), atol=1e-4)


def test_fitting_leaves_the_model_as_it_was(planted):
    model, _, task, pairs = planted
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    params[0].requires_grad_(False)  # a mixed set of flags must come back as it was
    flags = [p.requires_grad for p in params]
    tokens = task.sample(16, seed=9).tokens
    with torch.no_grad():
        ref = model(tokens)
    I.fit_das(model, pairs, I.Location("resid_post", 0, I.Where(slot=LENGTH)), k=1, steps=20, n_controls=1)
    assert _no_hooks(model)
    assert [p.requires_grad for p in params] == flags and any(flags)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(tokens), ref)
    params[0].requires_grad_(True)


def test_hooks_are_removed_when_an_intervention_fails(planted):
    model, _, _, pairs = planted

    def broken(base, src):
        raise RuntimeError("boom")
    loc = I.Location("resid_post", 0, I.Where(slot=LENGTH))
    with pytest.raises(RuntimeError, match="boom"):
        I.interchange_correct(model, pairs, loc, broken)
    assert _no_hooks(model)


def test_gradients_reach_the_rotation_only(planted):
    model, _, _, pairs = planted
    loc = I.Location("resid_post", 0, I.Where(slot=LENGTH))
    src = I.location_acts(model, pairs.source, loc)
    rot = I.RotatedSubspaceInterchange(D_MODEL, 2, seed=0)
    idx = torch.arange(32)
    with I.frozen(model):
        loss = I._cf_loss(model, pairs, loc, rot, src, I.resolve_positions(loc.pos, pairs.base), pairs.answer_pos(), idx)
        loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rot.parameters())


def test_sweep_result_and_figure(planted, tmp_path):
    model, _, _, pairs = planted
    positions = [I.Where(slot=LENGTH), I.Where(slot=1), I.Where(slot=0)]
    res = I.sweep_pairs(model, pairs, k=2, positions=positions, steps=120, lr=2e-2, n_controls=2, n_boot=200)
    assert res.axes == ("layer", "pos") and res.values.shape == (2, 3)
    assert res.labels["layer"] == ["L0 resid_pre", "L0 resid_post"]  # attention-only: no resid_mid
    assert res.labels["pos"] == ["slot=4", "slot=1", "slot=0"]
    v = res.values
    assert v[1, 0] > 0.9  # resid_post at SEP: the planted subspace
    assert v[0, 1] > 0.9  # resid_pre at x1: the copied token's (cos, sin) read directions
    assert v[0, 0] < 0.2 and v[1, 2] < 0.2 and v[0, 2] < 0.2
    assert (res.extra["iia_lo"] <= v).all() and (v <= res.extra["iia_hi"]).all()
    assert res.extra["ceiling"][1, 0] > 0.95 and res.extra["control_mean"][1, 0] < 0.2
    assert Result.from_json(res.to_json()) == res
    frame = res.to_frame()
    assert {"layer_label", "pos_label", "value", "ceiling", "control_mean", "floor"} <= set(frame.columns)
    assert len(res.settings["fits"]) == 6
    fig = I.plot_iia(res, path=tmp_path / "iia.png")
    assert (tmp_path / "iia.png").stat().st_size > 0
    cbar = fig.axes[-1]
    assert cbar.get_ylim() == (0.0, 1.0) and "IIA" in cbar.get_ylabel()
    with pytest.raises(ProbekitError, match="das_sweep"):
        I.plot_iia(Result("patch", torch.zeros(2), ("patch",)))


def test_das_sweep_from_plain_values(planted):
    model = planted[0]
    res = I.das_sweep(model, CopyTask(), vary="target", hold=["first"], at="slot=4", target="source:target", k=2,
                      n=300, sites=["resid_post"], positions=["slot=4", "0"], steps=150, lr=2e-2, n_controls=2)
    assert res.labels == {"layer": ["L0 resid_post"], "pos": ["slot=4", "0"]}
    assert res.values[0, 0] > 0.9 and res.values[0, 1] < 0.2
    assert res.settings["pairs"]["vary"] == "target" and res.settings["pairs"]["n"] == 300


def test_locations_from_hook_names():
    at = I.Where(digit_index=1)
    assert I.Location.from_hook("blocks.1.hook_resid_mid", at) == I.Location("resid_mid", 1, at)
    loc = I.Location.from_hook("blocks.0.attn.hook_z", 3)
    assert loc.site == "attn.hook_z" and loc.hook == "blocks.0.attn.hook_z"
    with pytest.raises(ProbekitError, match="not a block hook"):
        I.Location.from_hook("hook_embed", 0)


def test_plain_value_parsers():
    assert I.parse_positions("operand=0, place=1") == I.Where(operand=0, place=1)
    assert I.parse_positions("7") == 7 and I.parse_positions(3) == 3
    with pytest.raises(ProbekitError, match="FEATURE=INT"):
        I.parse_positions("digit_index")
    at = I.Where(digit_index=1)
    batch = MultiplicationTask(digits=3, b_digits=1).sample(8, seed=0)
    assert torch.equal(I.counterfactual_rule("carry", at)(batch, batch), I.step_values(batch, at, "digit"))
    assert torch.equal(I.counterfactual_rule("source:target", at)(batch, batch), I.step_values(batch, at, "target"))
    with pytest.raises(ProbekitError, match="unknown counterfactual rule"):
        I.counterfactual_rule("nope", at)


def test_fit_serialises(planted_fit):
    d = json.loads(planted_fit.to_json())
    assert d["k"] == 2 and len(d["rotation"]) == D_MODEL and d["iia"] == planted_fit.iia
    assert len(d["control"]) == 3 and d["settings"]["fit"]["steps"] == 300
    frame = planted_fit.to_frame()
    assert frame.shape[0] == 1 and frame["iia"][0] == planted_fit.iia


def test_bad_locations_and_settings_are_refused(planted):
    model, _, _, pairs = planted
    with pytest.raises(ProbekitError, match="outside a 1-layer model"):
        I.fit_das(model, pairs, I.Location("resid_post", 3, 0), k=2)
    with pytest.raises(ProbekitError, match="attention-only"):
        I.fit_das(model, pairs, I.Location("resid_mid", 0, 0), k=2)
    with pytest.raises(ProbekitError, match="unknown site"):
        I.fit_das(model, pairs, I.Location("nope", 0, 0), k=2)
    with pytest.raises(ProbekitError, match="k=0"):
        I.fit_das(model, pairs, I.Location("resid_post", 0, 0), k=0)
    with pytest.raises(ProbekitError, match="steps"):
        I.fit_das(model, pairs, I.Location("resid_post", 0, 0), k=2, steps=0)
    loc = I.Location("resid_post", 0, 0)
    pos = I.resolve_positions(0, pairs.base)
    with pytest.raises(ProbekitError, match="same location"):
        I.intervened_logits(model, pairs.base.tokens, loc, pos, torch.zeros(pairs.n, D_MODEL + 1), I.Interchange())
    assert _no_hooks(model)
