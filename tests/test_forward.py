"""The one functional forward: equal to the bridge's own forward and cache on every shipped model and
on random architectures; decoding steps equal to full forwards; the length temperature as specified;
place ids (``positional="place"``) against a pure-Python oracle, in every forward."""

from __future__ import annotations

import math

import pytest
import torch

from probekit import forward as F
from probekit.model import ModelConfig, build_model, load, shipped_models
from probekit.tasks import MultiplicationTask, ProbekitError, SortingTask

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
    # sorting values 0..15: ids 0..9 count as digits, so the lists hold runs of several lengths
    "place": dict(positional="place", place_tokens=10, place_offset_max=4),
    "place-log-temperature": dict(positional="place", place_tokens=10, length_temperature="log"),
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


@pytest.mark.parametrize("arch", ["rotary-log-temperature", "attn-only", "d-head", "rms", "place",
                                  "place-log-temperature"])
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


# ---------------------------------------------------------------------------- place ids


def _place_oracle(row: list[int], place_tokens: int, offset: int = 0) -> list[int]:
    """0 for a non-digit; 1 + offset + (index of the digit in its run of consecutive digits)."""
    out, run = [], 0
    for t in row:
        run = run + 1 if 0 <= t < place_tokens else 0
        out.append(offset + run if run else 0)
    return out


def test_place_ids_match_the_oracle_whole_and_in_chunks():
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        rows, T, P = 4, int(torch.randint(1, 30, (1,), generator=gen)), int(torch.randint(1, 12, (1,), generator=gen))
        tokens = torch.randint(0, 14, (rows, T), generator=gen)
        if trial % 4 == 0:
            tokens[0] = torch.randint(0, P, (T,), generator=gen)  # a row of digits only
        offset = torch.randint(0, 9, (rows,), generator=gen)
        ids, run = F.place_ids(tokens, P, offset=offset)
        assert ids.tolist() == [_place_oracle(r, P, int(o)) for r, o in zip(tokens.tolist(), offset.tolist(), strict=True)]
        plain = [_place_oracle(r, P) for r in tokens.tolist()]
        assert F.place_ids(tokens, P)[0].tolist() == plain
        assert run.tolist() == [p[-1] for p in plain]  # the run length after the last token
        cut = int(torch.randint(0, T + 1, (1,), generator=gen))  # a prefix (maybe empty), then the rest
        head, carry = F.place_ids(tokens[:, :cut], P, run_before=torch.zeros(rows, dtype=torch.long))
        tail, _ = F.place_ids(tokens[:, cut:], P, run_before=carry)
        assert torch.cat([head, tail], 1).tolist() == plain


def _place_mult(**kw):
    task = MultiplicationTask(digits=4, b_digits=1, reverse_operands=True)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, d_vocab=task.d_vocab, n_ctx=16, positional="place",
                      place_tokens=10, seed=1, **kw)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.1))
    return model, task.sample(6, length=4, seed=3).tokens


def test_place_model_embeds_places_in_every_forward():
    """The bridge's forward, run_with_cache and probekit.forward all add W_pos[place ids], not W_pos[position]."""
    model, tokens = _place_mult(length_temperature="log")
    _check_against_bridge(model, tokens)
    W_pos = model.original_model.pos.weight
    want = W_pos[torch.tensor([_place_oracle(r, 10) for r in tokens.tolist()])]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="hook_pos_embed")
    torch.testing.assert_close(cache["hook_pos_embed"], want, **ATOL)
    # a learned-position model with the same weights embeds positions, so its logits differ
    learned = build_model(ModelConfig(**(model.probekit_config.to_dict() | {"positional": "learned", "place_tokens": None})))
    learned.load_state_dict(model.state_dict())
    assert not torch.allclose(learned(tokens), model(tokens), atol=1e-3)


def test_place_ids_past_the_table_are_refused():
    model, _ = _place_mult()
    digits = torch.zeros(1, 16, dtype=torch.long)  # 16 digits in a row: place id 16, the table has 16 rows
    with pytest.raises(ProbekitError, match="past the place table of 16 rows"):
        F.forward(F.native(model), digits)
    with pytest.raises(ProbekitError, match="past the place table of 16 rows"):
        model(digits)
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
