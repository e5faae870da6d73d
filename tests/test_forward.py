"""The one functional forward: equal to the bridge's own forward and cache on every shipped model and
on random architectures; decoding steps equal to full forwards; the length temperature as specified."""

from __future__ import annotations

import math

import pytest
import torch

from probekit import forward as F
from probekit.model import ModelConfig, build_model, load, shipped_models
from probekit.tasks import ProbekitError, SortingTask

ATOL = dict(atol=1e-6, rtol=0)
ACT_TOL = dict(atol=1e-5, rtol=1e-5)

ARCHS = {
    "rotary": dict(positional="rotary"),
    "rms": dict(normalization="RMS"),
    "rms-pre": dict(normalization="RMSPre", positional="learned"),
    "ln-pre": dict(normalization="LNPre"),
    "no-norm": dict(normalization=None, positional="learned"),
    "attn-only": dict(attn_only=True),
    "gelu": dict(act_fn="gelu", positional="learned"),
    "d-head": dict(d_head=12, n_heads=3),
    "three-layers": dict(n_layers=3, positional="learned"),
    "log-temperature": dict(length_temperature="log"),
    "rotary-log-temperature": dict(positional="rotary", length_temperature="log", n_layers=3),
}


def _random(arch: str):
    task = SortingTask(n_values=16, repeats=True)
    kw = dict(n_layers=2, d_model=32, n_heads=4, d_vocab=task.d_vocab, n_ctx=40, seed=3) | ARCHS[arch]
    model = build_model(ModelConfig(**kw))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights, and a non-zero positional table for "learned"
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.1))
    return model, task.sample(5, length=7, seed=1).tokens


def _shipped(name: str):
    model, task = load(name)
    b = task.sample(4, seed=0) if task.name == "multiplication" else task.sample(4, length=10, seed=0)
    return model, b.tokens


def _check_against_bridge(model, tokens):
    with torch.no_grad():
        want, cache = model.run_with_cache(tokens)
        got = F.record(model, tokens)
    assert want.abs().max() > 1e-2  # not two zero tensors
    torch.testing.assert_close(got.logits, want, **ATOL)
    torch.testing.assert_close(F.forward(F.native(model), tokens), want, **ATOL)
    assert len(got.acts) >= 8 * model.cfg.n_layers
    for name, act in got.acts.items():
        if name.endswith("hook_resid_mid") and name not in cache.keys():  # attention-only bridges have none
            want = cache[name.replace("resid_mid", "resid_pre")] + cache[name.replace("resid_mid", "attn_out")]
        else:
            want = cache[name]
        torch.testing.assert_close(act, want, **ACT_TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_forward_equals_the_bridge_on_random_architectures(arch):
    assert F.supports_native(_random(arch)[0])
    _check_against_bridge(*_random(arch))


@pytest.mark.parametrize("name", shipped_models())
def test_forward_equals_the_bridge_on_shipped_models(name):
    _check_against_bridge(*_shipped(name))


def test_every_shipped_model_is_tested():
    assert len(shipped_models()) >= 5


def test_log_temperature_multiplies_the_scores_of_query_t_by_log_t_plus_2():
    """The tempered pattern, recomputed by hand from q and k."""
    model, tokens = _random("log-temperature")
    rec = F.record(model, tokens, ["blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_pattern"],
                   logits=False)
    assert rec.logits is None
    q, k = rec["blocks.1.attn.hook_q"], rec["blocks.1.attn.hook_k"]  # batch pos head d_head
    T = q.shape[1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores * torch.tensor([math.log(t + 2) for t in range(T)])[:, None]
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(rec["blocks.1.attn.hook_pattern"], scores.softmax(-1), **ACT_TOL)
    plain = build_model(ModelConfig(**(model.probekit_config.to_dict() | {"length_temperature": None})))
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(F.record(plain, tokens, ["blocks.1.attn.hook_pattern"])["blocks.1.attn.hook_pattern"],
                              rec["blocks.1.attn.hook_pattern"], atol=1e-3)


def test_record_restricted_to_positions_and_layers():
    model, tokens = _random("three-layers")
    full = F.record(model, tokens)
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern"]
    part = F.record(model, tokens, names, pos=[2, 5], logits=False)
    assert part.logits is None and sorted(part.acts) == sorted(names)
    torch.testing.assert_close(part["blocks.1.attn.hook_z"], full["blocks.1.attn.hook_z"][:, [2, 5]])
    torch.testing.assert_close(part["blocks.1.attn.hook_pattern"], full["blocks.1.attn.hook_pattern"][:, :, [2, 5]])
    with pytest.raises(ProbekitError, match="unknown hook name"):
        F.record(model, tokens, ["blocks.9.hook_resid_pre"])


@pytest.mark.parametrize("arch", ["rotary-log-temperature", "attn-only", "d-head", "rms"])
def test_decode_steps_equal_full_forwards(arch):
    """Feeding a prefix, then one token at a time against the cache, gives the full forward's logits."""
    model, tokens = _random(arch)
    nat = F.native(model)
    with torch.no_grad():
        full = model(tokens)
        cache = F.KVCache.empty(len(nat.layers))
        steps = [F.decode_step(nat, tokens[:, :3], cache)]
        for t in range(3, tokens.shape[1]):
            steps.append(F.decode_step(nat, tokens[:, t:t + 1], cache))
    assert cache.length == tokens.shape[1]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 2:], **ATOL)


def test_recompute_layer_without_changes_is_the_recorded_run():
    """Recomputing layer 1 at some positions for two row groups, nothing changed, gives the base run's values."""
    model, tokens = _random("rotary-log-temperature")
    nat = F.native(model)
    with torch.no_grad():
        base, _ = F.record_sites(nat, tokens)
        pos = torch.tensor([3, 6])
        x = base["resid_pre", 1][:, pos].repeat(2, 1, 1)
        empty = pos[:0]
        for new_pos, key_pos in [(empty, empty), (pos, pos), (torch.arange(7), torch.arange(7))]:
            got = F.recompute_layer(nat, 1, base, x, pos, base["resid_pre", 1][:, new_pos].repeat(2, 1, 1), new_pos,
                                    key_pos, groups=2)
            torch.testing.assert_close(got, base["resid_post", 1][:, pos].repeat(2, 1, 1), **ACT_TOL)


def test_recompute_layer_outputs_only_where_needed():
    """With ``need``, the block's outputs are computed only at those (row, pos): equal there to the full ones."""
    model, tokens = _random("rotary-log-temperature")
    nat = F.native(model)
    with torch.no_grad():
        base, _ = F.record_sites(nat, tokens)
        pos, new_pos = torch.arange(1, tokens.shape[1]), torch.tensor([1])
        x = base["resid_pre", 1][:, pos].repeat(2, 1, 1)
        x[:, 0] += 0.1  # the residual differs from the base run at position 1 only
        full = F.recompute_layer(nat, 1, base, x, pos, x[:, :1], new_pos, new_pos, 2)
        need = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(0)) < 0.5
        part = F.recompute_layer(nat, 1, base, x, pos, x[:, :1], new_pos, new_pos, 2, need=need)
    assert bool(need.any()) and not bool(need.all())
    assert not torch.allclose(full[need], x[need])  # the block changed what it computed
    torch.testing.assert_close(part[need], full[need], **ACT_TOL)
    assert torch.equal(part[~need], x[~need])
