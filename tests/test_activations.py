"""Activation collection: same rows as TransformerLens's own cache, chunked, stops early, leaves no hooks."""

from __future__ import annotations

import pytest
import torch

from probekit.activations import cache_reference, collect, position_mask, resolve_hooks, valid_hook_names
from probekit.model import ModelConfig, build_model
from probekit.tasks import MultiplicationTask, ProbekitError, SortingTask


@pytest.fixture(scope="module")
def mult():
    task = MultiplicationTask(digits=3, b_digits=2)
    model = build_model(ModelConfig(n_layers=3, d_model=32, n_heads=4, d_vocab=task.d_vocab, n_ctx=32,
                                    positional="learned", seed=1))
    return model, task


def _no_hooks_left(model) -> bool:
    return all(not hp._forward_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("hooks", [["blocks.0.hook_resid_pre", "blocks.2.hook_resid_post"], ["z"], ["mlp_out", "resid_mid"]])
def test_collect_matches_run_with_cache(mult, hooks):
    model, task = mult
    batch = task.sample(23, seed=0)
    acts = collect(model, batch, hooks, feature="carry_out", chunk_size=5)  # 5 chunks, the last one partial
    mask = position_mask(batch, "feature", "carry_out")
    assert acts.n_rows == int(mask.sum()) == 23 * 5
    for name in acts.hooks:
        torch.testing.assert_close(acts.acts[name], cache_reference(model, batch, name, mask), rtol=0, atol=1e-6)
    ex, ps = torch.nonzero(mask, as_tuple=True)
    assert torch.equal(acts.labels, batch.features["carry_out"][ex, ps])
    assert torch.equal(acts.token, batch.tokens[ex, ps])
    # slot k = k-th predicting position of an example = answer step k
    assert torch.equal(acts.slot, batch.features["step"][ex, ps])
    assert _no_hooks_left(model)


def test_hook_z_keeps_head_layout(mult):
    model, task = mult
    acts = collect(model, task.sample(4, seed=0), "blocks.1.attn.hook_z", positions="all")
    assert acts.shapes["blocks.1.attn.hook_z"] == (model.cfg.n_heads, model.cfg.d_head)
    assert acts.acts["blocks.1.attn.hook_z"].shape == (4 * task.seq_len(3), model.cfg.n_heads * model.cfg.d_head)


def test_forward_is_chunked_and_stops_after_last_needed_block(mult):
    model, task = mult
    batch = task.sample(10, seed=0)
    seen = {"rows": [], "late": 0}

    def rows(x, hook):
        seen["rows"].append(x.shape[0])

    def late(x, hook):
        seen["late"] += 1

    with model.hooks(fwd_hooks=[("hook_embed", rows), ("blocks.2.hook_resid_pre", late)]):
        collect(model, batch, ["blocks.0.hook_resid_post"], feature="carry_out", chunk_size=4)
    assert seen["rows"] == [4, 4, 2]
    assert seen["late"] == 0  # block 1 was the last one run
    with model.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", late)]):
        collect(model, batch, ["ln_final.hook_normalized"], positions="pred", chunk_size=20)
    assert seen["late"] == 1


def test_position_rules(mult):
    model, task = mult
    batch = task.sample(6, seed=0)
    assert torch.equal(position_mask(batch, "pred"), batch.pred_mask)
    assert torch.equal(position_mask(batch, "answer"), batch.answer_mask)
    assert position_mask(batch, "all").all()
    operand = position_mask(batch, "feature", "operand_digit")
    assert torch.equal(operand, batch.features["operand_digit"] != -1)
    acts = collect(model, batch, "resid_pre", positions="answer")
    assert acts.labels is None and acts.n_rows == int(batch.answer_mask.sum())


def test_resolve_hooks_short_and_full_names(mult):
    model, _ = mult
    assert resolve_hooks(model, "resid_pre") == [f"blocks.{L}.hook_resid_pre" for L in range(3)]
    assert resolve_hooks(model, "hook_resid_post,blocks.0.hook_resid_pre") == \
        [f"blocks.{L}.hook_resid_post" for L in range(3)] + ["blocks.0.hook_resid_pre"]
    assert resolve_hooks(model, ["z"]) == [f"blocks.{L}.attn.hook_z" for L in range(3)]
    assert resolve_hooks(model, ["hook_embed", "ln_final.hook_normalized"]) == ["hook_embed", "ln_final.hook_normalized"]
    assert "hook_resid_pre" in valid_hook_names(model)


def test_bad_input_one_line_errors(mult):
    model, task = mult
    batch = task.sample(4, seed=0)
    with pytest.raises(ProbekitError, match="unknown hook 'resid_typo'.*hook_resid_pre") as e:
        collect(model, batch, "resid_typo", feature="carry_out")
    assert "\n" not in str(e.value)
    with pytest.raises(ProbekitError, match="attention pattern"):
        collect(model, batch, "blocks.0.attn.hook_pattern", feature="carry_out")
    with pytest.raises(ProbekitError, match="feature 'rank' is not defined.*carry_out"):
        collect(model, batch, "resid_pre", feature="rank")
    with pytest.raises(ProbekitError, match="empty position mask"):
        collect(model, batch, "resid_pre", feature="operand_digit", positions="pred")
    with pytest.raises(ProbekitError, match="unknown position rule"):
        collect(model, batch, "resid_pre", feature="carry_out", positions="middle")
    long = MultiplicationTask(digits=9).sample(2, seed=0)
    with pytest.raises(ProbekitError, match="n_ctx"):
        collect(model, long, "resid_pre", feature="carry_out")
    sort = SortingTask(n_values=60).sample(2, length=4, seed=0)
    with pytest.raises(ProbekitError, match="d_vocab"):
        collect(model, sort, "resid_pre", feature="rank")
    assert _no_hooks_left(model)


def test_collect_sees_hooks_attached_to_the_model(mult):
    """Without hooks attached, collection runs on probekit's forward (equal to the bridge's, above); with a
    hook attached by the caller, it runs through the bridge, so the hook's edit is what is collected."""
    model, task = mult
    batch = task.sample(7, seed=3)
    name = "blocks.1.hook_resid_pre"
    plain = collect(model, batch, [name], positions="all").acts[name]
    with model.hooks(fwd_hooks=[(name, lambda x, hook: x * 2)]):
        doubled = collect(model, batch, [name], positions="all").acts[name]
    assert plain.abs().max() > 0
    torch.testing.assert_close(doubled, plain * 2, rtol=0, atol=1e-6)
    assert _no_hooks_left(model)
