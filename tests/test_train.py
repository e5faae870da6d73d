"""Training: answer-only loss, schedule, determinism, resume after a kill, and that it learns."""

from __future__ import annotations

import json

import pytest
import torch

from probekit import forward as F
from probekit.evaluate import evaluate
from probekit.model import ModelConfig
from probekit.tasks import MultiplicationTask, ProbekitError, SortingTask
from probekit.train import (
    TrainConfig,
    answer_loss,
    checkpoint_meta,
    lr_at,
    place_offsets,
    train,
    train_logits,
)

TASK = SortingTask(n_values=10)
CFG = ModelConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=40, d_vocab=TASK.d_vocab, seed=0)


def test_loss_reads_answer_tokens_only():
    b = TASK.sample(4, length=5, seed=0)
    logits = torch.randn(4, b.seq_len, TASK.d_vocab)
    loss, _ = answer_loss(logits, b.tokens, b.answer_mask)
    noisy = logits.clone()
    noisy[~b.pred_mask] += 100 * torch.randn_like(noisy[~b.pred_mask])  # positions that predict no answer
    assert torch.allclose(loss, answer_loss(noisy, b.tokens, b.answer_mask)[0])
    moved = logits.clone()
    moved[b.pred_mask] += torch.randn_like(moved[b.pred_mask])
    assert not torch.allclose(loss, answer_loss(moved, b.tokens, b.answer_mask)[0])


def test_warmup_then_cosine():
    c = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_same_seed_same_weights_and_resume_equals_unbroken(tmp_path):
    tc = TrainConfig(steps=24, batch_size=16, lengths=(2, 6), warmup_steps=4, checkpoint_every=8, log_every=4,
                     objectives={"sort": 1.0, "successor": 1.0})
    a = train(CFG, TASK, tc, out=tmp_path / "a", progress=False)
    b = train(CFG, TASK, tc, out=tmp_path / "b", progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # killed after 10 steps (checkpoint written), resumed to the end
    train(CFG, TASK, tc, out=tmp_path / "c", progress=False, stop_after=10)
    assert checkpoint_meta(tmp_path / "c" / "checkpoint.safetensors")["step"] == 10
    assert not (tmp_path / "c" / "model.safetensors").exists()
    c = train(CFG, TASK, tc, out=tmp_path / "c", progress=False)
    sc = c.state_dict()
    assert all(torch.allclose(sa[k], sc[k], atol=1e-6) for k in sa)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["config.json", "model.safetensors", "train_log.jsonl",
                                                                   "train_log.png"]
    log = [json.loads(line) for line in (tmp_path / "c" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 8, 12, 16, 20, 24]
    conf = json.loads((tmp_path / "c" / "config.json").read_text())
    assert conf["train"]["objectives"] == {"sort": 1.0, "successor": 1.0}
    assert conf["train"]["extra"]["train_seconds"] > 0


def test_refuses_non_empty_out_and_too_long_lengths(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ProbekitError, match="is not empty"):
        train(CFG, TASK, TrainConfig(steps=2, lengths=(1, 5)), out=tmp_path, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    with pytest.raises(ProbekitError, match="n_ctx is 40"):
        train(CFG, TASK, TrainConfig(steps=2, lengths=(1, 30)), progress=False)
    with pytest.raises(ProbekitError, match="unknown objective 'count'"):
        train(CFG, TASK, TrainConfig(steps=2, lengths=(1, 5), objectives={"count": 1.0}), progress=False)


def test_task_overrides_change_training_data_only(tmp_path):
    from probekit.model import load_model
    from probekit.tasks import Mixture
    from probekit.train import batch_seed, training_task

    tc = TrainConfig(steps=4, batch_size=8, lengths=(6, 6), warmup_steps=1, log_every=2,
                     task_overrides={"value_subsets": 1.0})
    assert training_task(TASK, tc) == SortingTask(n_values=10, value_subsets=1.0)
    assert training_task(TASK, TrainConfig(steps=4)) is TASK
    plain = Mixture(TASK, {"sort": 1.0}).sample(8, length=6, seed=batch_seed(0, 0))
    rich = Mixture(training_task(TASK, tc), {"sort": 1.0}).sample(8, length=6, seed=batch_seed(0, 0))
    assert not torch.equal(plain.tokens, rich.tokens)
    train(CFG, TASK, tc, out=tmp_path / "m", progress=False)
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert conf["task"] == TASK.spec() and conf["train"]["task_overrides"] == {"value_subsets": 1.0}
    _, loaded_task, _ = load_model(tmp_path / "m")
    assert loaded_task == TASK  # evaluation samples the saved, unmodified task
    # training with the override is training on the overridden task: moving a field into
    # task_overrides leaves the weights as they were
    moved = train(CFG, TASK, tc, progress=False).state_dict()
    direct = train(CFG, SortingTask(n_values=10, value_subsets=1.0),
                   TrainConfig(steps=4, batch_size=8, lengths=(6, 6), warmup_steps=1, log_every=2), progress=False)
    assert all(torch.equal(moved[k], v) for k, v in direct.state_dict().items())
    with pytest.raises(ProbekitError, match=r"unknown field\(s\) \['colour'\]"):
        train(CFG, TASK, TrainConfig(steps=2, lengths=(1, 5), task_overrides={"colour": 1}), progress=False)
    with pytest.raises(ProbekitError, match="cannot change the task's name"):
        train(CFG, TASK, TrainConfig(steps=2, lengths=(1, 5), task_overrides={"name": "multiplication"}), progress=False)


def test_tiny_sorting_model_learns(tiny_sort):
    model, task = tiny_sort
    res = evaluate(model, task, [6, 8], n=200, seed=11)
    assert res.exact_match(8) > 0.9


# ---------------------------------------------------------------------------- safe resume

RESUME = TrainConfig(steps=24, batch_size=16, lengths=(2, 6), warmup_steps=4, checkpoint_every=8, log_every=4)


@pytest.fixture(scope="module")
def unbroken():
    return train(CFG, TASK, RESUME, progress=False).state_dict()


def _kill_at(monkeypatch, step: int):
    """Make training die (as a kill would: no final checkpoint) when it reaches ``step``."""
    import probekit.train as pt

    real = pt.step_length

    def dying(cfg, s):
        if s == step:
            raise KeyboardInterrupt
        return real(cfg, s)

    monkeypatch.setattr(pt, "step_length", dying)


def _log_steps(out):
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def _same(a, b):
    return all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_with_other_configs_is_refused(tmp_path):
    import dataclasses

    out = tmp_path / "run"
    train(CFG, TASK, RESUME, out=out, progress=False, stop_after=10)
    before = (out / "checkpoint.safetensors").read_bytes()
    with pytest.raises(ProbekitError, match=r"train\.lr \(0\.001 -> 0\.002\); expected the same configs"):
        train(CFG, TASK, dataclasses.replace(RESUME, lr=2e-3), out=out, progress=False)
    with pytest.raises(ProbekitError, match=r"model\.seed \(0 -> 1\)"):
        train(dataclasses.replace(CFG, seed=1), TASK, RESUME, out=out, progress=False)
    with pytest.raises(ProbekitError, match=r"task\.default_length \(20 -> 6\)"):
        train(CFG, SortingTask(n_values=10, default_length=6), RESUME, out=out, progress=False)
    with pytest.raises(ProbekitError, match=r"train\.steps \(24 -> 30\), train\.warmup_steps \(4 -> 5\)"):
        train(CFG, TASK, dataclasses.replace(RESUME, steps=30, warmup_steps=5), out=out, progress=False)
    assert (out / "checkpoint.safetensors").read_bytes() == before  # nothing touched
    # notes may differ; the run resumes
    train(CFG, TASK, dataclasses.replace(RESUME, extra={"note": "resumed"}), out=out, progress=False)
    assert (out / "model.safetensors").exists()


def test_killed_before_first_checkpoint_restarts(tmp_path, monkeypatch, unbroken):
    out = tmp_path / "run"
    _kill_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(CFG, TASK, RESUME, out=out, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "train_log.jsonl"]
    (out / ".checkpoint.safetensors.x1y2.safetensors").write_bytes(b"half a file")  # a torn write
    import dataclasses

    with pytest.raises(ProbekitError, match=r"train\.lr"):  # another run's early files are not cleared
        train(CFG, TASK, dataclasses.replace(RESUME, lr=2e-3), out=out, progress=False)
    model = train(CFG, TASK, RESUME, out=out, progress=False)  # the same command again
    assert _same(unbroken, model.state_dict())
    assert _log_steps(out) == [4, 8, 12, 16, 20, 24]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "train_log.jsonl",
                                                     "train_log.png"]


def test_killed_after_a_checkpoint_resumes_with_each_step_logged_once(tmp_path, monkeypatch, unbroken):
    out = tmp_path / "run"
    _kill_at(monkeypatch, 13)  # checkpoint at 8, log records 4, 8, 12 written
    with pytest.raises(KeyboardInterrupt):
        train(CFG, TASK, RESUME, out=out, progress=False)
    monkeypatch.undo()
    assert checkpoint_meta(out / "checkpoint.safetensors")["step"] == 8
    assert _log_steps(out) == [4, 8, 12]
    with (out / "train_log.jsonl").open("a") as f:
        f.write('{"step": 16, "lo')  # a record torn by the kill
    (out / ".checkpoint.safetensors.k9z.safetensors").write_bytes(b"half a checkpoint")  # a torn write
    model = train(CFG, TASK, RESUME, out=out, progress=False)
    assert _log_steps(out) == [4, 8, 12, 16, 20, 24]
    assert _same(unbroken, model.state_dict())
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "train_log.jsonl",
                                                     "train_log.png"]


def test_old_checkpoint_format_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(b"")
    (out / "checkpoint.json").write_text('{"step": 8}')
    with pytest.raises(ProbekitError, match="old format"):
        train(CFG, TASK, RESUME, out=out, progress=False)
    (out / "checkpoint.json").unlink()
    from safetensors.torch import save_file

    save_file({"model.x": torch.zeros(1)}, str(out / "checkpoint.safetensors"))
    with pytest.raises(ProbekitError, match="has format None; expected a training checkpoint"):
        train(CFG, TASK, RESUME, out=out, progress=False)


def test_warmup_longer_than_run_warns():
    with pytest.warns(UserWarning, match="warmup_steps = 10 >= steps = 3"):
        train(CFG, TASK, TrainConfig(steps=3, batch_size=4, lengths=(2, 3), warmup_steps=10), progress=False)


# ---------------------------------------------------------------------------- place positions

MULT = MultiplicationTask(digits=3, b_digits=1, reverse_operands=True)
PLACE = ModelConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=20, d_vocab=MULT.d_vocab, positional="place",
                    place_tokens=10, place_offset_max=6, seed=0)


def test_place_offsets_are_seeded_in_range_and_reach_the_logits():
    tc = TrainConfig(seed=3)
    offs = torch.stack([place_offsets(PLACE, tc, s, 64) for s in range(20)])
    assert offs.min() == 0 and offs.max() == 6 and len(set(offs.flatten().tolist())) == 7
    assert torch.equal(place_offsets(PLACE, tc, 5, 64), offs[5])
    assert not torch.equal(place_offsets(PLACE, TrainConfig(seed=4), 5, 64), offs[5])
    assert place_offsets(CFG, tc, 5, 64) is None
    from probekit.model import build_model

    model = build_model(PLACE)
    with torch.no_grad():
        model.original_model.pos.weight.normal_()
    tokens = MULT.sample(64, seed=0).tokens
    native = model.original_model
    zero = torch.zeros(64, dtype=torch.long)
    assert torch.equal(train_logits(native, PLACE, tokens, zero), model(tokens))  # offset 0: the model's own forward
    shifted = train_logits(native, PLACE, tokens, offs[5])
    want = model.original_model(tokens, position_ids=F.place_ids(tokens, 10, offset=offs[5])[0])
    assert torch.equal(shifted, want) and not torch.allclose(shifted, model(tokens), atol=1e-3)


def test_place_model_resume_equals_unbroken_and_refuses_runs_past_the_table(tmp_path):
    tc = TrainConfig(steps=16, batch_size=16, lengths=(1, 3), warmup_steps=2, checkpoint_every=8, log_every=4)
    a = train(PLACE, MULT, tc, out=tmp_path / "a", progress=False).state_dict()
    train(PLACE, MULT, tc, out=tmp_path / "b", progress=False, stop_after=9)
    b = train(PLACE, MULT, tc, out=tmp_path / "b", progress=False).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    unshifted = train(ModelConfig(**(PLACE.to_dict() | {"place_offset_max": 0})), MULT, tc, progress=False).state_dict()
    assert not torch.allclose(a["pos_embed.weight"], unshifted["pos_embed.weight"])
    # 3 x 1 digits: a product run of 4 digits, place ids up to 4; + 16 passes row 19
    with pytest.raises(ProbekitError, match="place ids up to 4; with place_offset_max = 16 they pass the place table"):
        train(ModelConfig(**(PLACE.to_dict() | {"place_offset_max": 16})), MULT, tc, progress=False)



def test_fused_adamw_and_clipping_match_torch_reference(monkeypatch):
    """The fused AdamW with the clipping folded into it gives the weights of torch's loop AdamW after
    ``clip_grad_norm_`` (the implementation it replaces), with the clip active on most steps.

    The key biases are left out: their exact gradient is 0 (a bias on the keys adds the same q.b to every
    score of a query, which softmax ignores), so theirs is rounding noise that Adam scales up to ~lr a step.
    """
    import dataclasses

    import probekit.train as pt

    tc = TrainConfig(steps=12, batch_size=16, lengths=(2, 6), warmup_steps=3, lr=3e-3, grad_clip=0.5, log_every=1)
    norms, real_clip, real_opt = [], pt.clip_gradients, pt._optimizer
    monkeypatch.setattr(pt, "clip_gradients", lambda opt, ps, m: norms.append(real_clip(opt, ps, m)) or norms[-1])
    fused = train(CFG, TASK, tc, progress=False).state_dict()
    assert sum(bool(n > tc.grad_clip) for n in norms) >= 6

    def reference(native, cfg):
        opt, params = real_opt(native, cfg)
        assert all(g["fused"] for g in opt.param_groups)  # the optimizer under test is the fused one
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), foreach=False, fused=False), params

    monkeypatch.setattr(pt, "_optimizer", reference)
    monkeypatch.setattr(pt, "clip_gradients", lambda opt, ps, m: torch.nn.utils.clip_grad_norm_(ps, m))
    ref = train(CFG, TASK, tc, progress=False).state_dict()
    one_less = train(CFG, TASK, dataclasses.replace(tc, steps=11), progress=False).state_dict()
    keys = [k for k in ref if not k.endswith("attn.k.bias")]
    assert all(torch.allclose(fused[k], ref[k], rtol=1e-5, atol=1e-6) for k in keys)
    assert not all(torch.allclose(one_less[k], ref[k], rtol=1e-5, atol=1e-6) for k in keys)
