"""Models: config validation, NoPE, length temperature, save/load round trip and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from probekit.model import ModelConfig, build_model, load_model, save_model
from probekit.tasks import ProbekitError, SortingTask
from probekit.train import TrainConfig, train

TASK = SortingTask(n_values=10)


def small(**kw) -> ModelConfig:
    return ModelConfig(**{"n_layers": 1, "d_model": 32, "n_heads": 2, "n_ctx": 40, "d_vocab": TASK.d_vocab, **kw})


def test_config_validation():
    with pytest.raises(ProbekitError, match=r"ModelConfig.positional = 'alibi'; expected a string, one of \["):
        small(positional="alibi")
    with pytest.raises(ProbekitError, match="not divisible by n_heads"):
        small(d_model=30, n_heads=4)
    with pytest.raises(ProbekitError, match="length_temperature"):
        small(length_temperature="sqrt")
    with pytest.raises(ProbekitError, match=r"unknown field\(s\) \['layers'\]"):
        ModelConfig.from_dict({"layers": 2})


def test_seeded_build_is_deterministic_and_hooked():
    a, b, c = build_model(small(seed=1)), build_model(small(seed=1)), build_model(small(seed=2))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if k != "pos_embed.weight")
    _, cache = a.run_with_cache(TASK.sample(2, length=5).tokens)
    assert cache["blocks.0.attn.hook_z"].shape[-2:] == (2, 16)
    assert not a.training


def test_nope_positions_are_zero_and_stay_zero_through_training():
    cfg = small(positional="none")
    model = train(cfg, TASK, TrainConfig(steps=30, batch_size=16, lengths=(2, 6), warmup_steps=5), progress=False)
    assert torch.count_nonzero(model.W_pos) == 0
    assert not model.original_model.pos.weight.requires_grad
    learned = train(small(positional="learned"), TASK, TrainConfig(steps=5, batch_size=8, lengths=(2, 4), warmup_steps=1), progress=False)
    assert torch.count_nonzero(learned.W_pos) > 0
    # NoPE: permuting the prompt list leaves the logits of the separator position unchanged
    x = TASK.batch_from_inputs([[1, 5, 3, 7]]).tokens
    y = TASK.batch_from_inputs([[7, 3, 5, 1]]).tokens
    assert torch.allclose(model(x)[0, 5], model(y)[0, 5], atol=1e-5)


def test_length_temperature_scales_scores_by_log_position():
    plain = build_model(small(seed=3))
    temp = build_model(small(seed=3, length_temperature="log"))
    x = TASK.sample(2, length=8, seed=0).tokens
    _, c1 = plain.run_with_cache(x)
    _, c2 = temp.run_with_cache(x)
    p1, p2 = c1["blocks.0.attn.hook_pattern"], c2["blocks.0.attn.hook_pattern"]
    assert torch.allclose(p2.sum(-1), torch.ones_like(p2.sum(-1)), atol=1e-5)
    # recompute: pattern_temp = softmax(log(t + 2) * log(pattern_plain)) row by row (same scores up to a constant)
    t = torch.arange(x.shape[1], dtype=torch.float32)
    logp = torch.log(p1.clamp_min(1e-30))
    expected = torch.softmax((logp * torch.log(t + 2)[:, None]).masked_fill(p1 == 0, float("-inf")), dim=-1)
    assert torch.allclose(p2, expected, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    model = build_model(small(positional="learned", seed=4))
    folder = save_model(model, tmp_path / "m", TASK, train_config={"steps": 1})
    loaded, task, conf = load_model(folder)
    x = TASK.sample(3, length=6).tokens
    assert torch.equal(model(x), loaded(x))
    assert task == TASK and conf["model"]["seed"] == 4
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(ProbekitError, match="is not empty"):
        save_model(model, folder, TASK)


@pytest.fixture
def saved(tmp_path):
    return save_model(build_model(small()), tmp_path / "m", TASK)


def test_load_refuses_truncated_weights(saved):
    w = saved / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    with pytest.raises(ProbekitError, match="truncated or corrupted"):
        load_model(saved)


def test_load_refuses_garbage_weights(saved):
    (saved / "model.safetensors").write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(ProbekitError, match="truncated or corrupted"):
        load_model(saved)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("model"), r"missing field\(s\) \['model'\]"),
    (lambda c: c.update(colour=1), r"unknown field\(s\) \['colour'\]"),
    (lambda c: c["model"].update(d_vocab=99), "vocabularies must match"),
    (lambda c: c["model"].update(d_model=64), "saved for the model config with hash"),
    (lambda c: c.update(probekit_version="9.0.0"), "major versions differ"),
    (lambda c: c["task"].update(name="addition"), "unknown task 'addition'"),
])
def test_load_refuses_bad_config(saved, edit, message):
    conf = json.loads((saved / "config.json").read_text())
    edit(conf)
    (saved / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ProbekitError, match=message):
        load_model(saved)


def test_load_unknown_name():
    with pytest.raises(ProbekitError, match="no model folder or shipped model named 'no-such-model'"):
        load_model("no-such-model")


# ---------------------------------------------------------------------------- place positions


def test_place_config_checks_and_unchanged_hashes():
    with pytest.raises(ProbekitError, match="place_tokens = None with positional='place'; expected the number"):
        small(positional="place")
    with pytest.raises(ProbekitError, match="place_tokens = 99 with positional='place'"):
        small(positional="place", place_tokens=99)
    with pytest.raises(ProbekitError, match=r"place_offset_max = 39 with n_ctx = 40; expected at most n_ctx - 2 = 38"):
        small(positional="place", place_tokens=10, place_offset_max=39)
    with pytest.raises(ProbekitError, match="expected them unset .* unless positional='place'"):
        small(positional="learned", place_tokens=10)
    with pytest.raises(ProbekitError, match="expected them unset"):
        small(place_offset_max=3)
    with pytest.raises(ProbekitError, match="ModelConfig.place_offset_max = -1; expected"):
        small(positional="place", place_tokens=10, place_offset_max=-1)
    # configs without place fields are written, and hashed, as before the fields existed
    assert "place_tokens" not in small().to_dict() and "place_offset_max" not in small().to_dict()
    assert ModelConfig().hash() == "ff268201ab2c7de5"
    place = small(positional="place", place_tokens=10, place_offset_max=8)
    assert ModelConfig.from_dict(place.to_dict()) == place
    assert place.hash() != small(positional="place", place_tokens=10).hash()


def test_place_model_save_load_round_trip(tmp_path):
    model = build_model(small(positional="place", place_tokens=10, place_offset_max=4, seed=4))
    with torch.no_grad():
        model.original_model.pos.weight.normal_()
    loaded, _, conf = load_model(save_model(model, tmp_path / "m", TASK))
    x = TASK.sample(3, length=6).tokens
    assert torch.equal(model(x), loaded(x))
    assert conf["model"]["place_tokens"] == 10 and loaded.probekit_config == model.probekit_config
