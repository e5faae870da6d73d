"""Configs and model folders: bad values refused in one line before anything is built or written;
weights refused when they are not the config's (config hash), not float or not finite; task lengths
refused outside the task's range."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from probekit.cli import main
from probekit.model import MAX_MODEL_BYTES, ModelConfig, build_model, load_model, model_bytes, save_model
from probekit.tasks import MultiplicationTask, ProbekitError, SortingTask
from probekit.train import TrainConfig

GOOD = {
    "name": "cfg-tiny",
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "n_ctx": 40, "positional": "none"},
    "task": {"name": "sorting", "n_values": 10},
    "train": {"steps": 4, "batch_size": 8, "lengths": [2, 6], "warmup_steps": 1},
}
MULT = {**GOOD, "model": {**GOOD["model"], "n_ctx": 80}, "task": {"name": "multiplication", "digits": 2}}

BAD = [  # (config, section, field, value, words the one-line message must hold)
    (GOOD, "train", "steps", "60", "TrainConfig.steps = '60'; expected an integer"),
    (GOOD, "train", "steps", True, "TrainConfig.steps = True; expected an integer"),
    (GOOD, "train", "steps", 0, "TrainConfig.steps = 0; expected an integer, >= 1"),
    (GOOD, "train", "batch_size", 2.5, "TrainConfig.batch_size = 2.5"),
    (GOOD, "train", "lr", "fast", "TrainConfig.lr = 'fast'; expected a finite number, > 0"),
    (GOOD, "train", "lr", 0, "TrainConfig.lr = 0"),
    (GOOD, "train", "lr", float("nan"), "TrainConfig.lr = nan"),
    (GOOD, "train", "lr", float("inf"), "TrainConfig.lr = inf"),
    (GOOD, "train", "weight_decay", -0.1, "TrainConfig.weight_decay = -0.1"),
    (GOOD, "train", "warmup_steps", -1, "TrainConfig.warmup_steps = -1"),
    (GOOD, "train", "min_lr_ratio", 1.5, "TrainConfig.min_lr_ratio = 1.5; expected a finite number, in 0..1"),
    (GOOD, "train", "lengths", [5], "TrainConfig.lengths = [5]; expected a list of 2 (an integer, an integer)"),
    (GOOD, "train", "lengths", "5", "TrainConfig.lengths = '5'"),
    (GOOD, "train", "lengths", [5, 2], "lo <= hi"),
    (GOOD, "train", "lengths", [0, 3], "TrainConfig.lengths = [0, 3]; expected a list of 2 (an integer, an integer), >= 1"),
    (GOOD, "train", "lengths", [2, 6.5], "TrainConfig.lengths = [2, 6.5]"),
    (GOOD, "train", "checkpoint_every", 0, "TrainConfig.checkpoint_every = 0"),
    (GOOD, "train", "log_every", 0, "TrainConfig.log_every = 0"),
    (GOOD, "train", "grad_clip", 0, "TrainConfig.grad_clip = 0; expected null or a finite number, > 0"),
    (GOOD, "train", "grad_clip", -1, "TrainConfig.grad_clip = -1"),
    (GOOD, "train", "seed", -1, "TrainConfig.seed = -1"),
    (GOOD, "train", "objectives", {"sort": -1}, "TrainConfig.objectives = {'sort': -1}"),
    (GOOD, "train", "objectives", {"sort": "1"}, "TrainConfig.objectives = {'sort': '1'}"),
    (GOOD, "train", "objectives", {"sort": 0}, "positive sum"),
    (GOOD, "train", "objectives", {"count": 1}, "unknown objective 'count'"),
    (GOOD, "train", "task_overrides", 3, "TrainConfig.task_overrides = 3"),
    (GOOD, "train", "task_overrides", {"n_values": "x"}, "SortingTask.n_values = 'x'"),
    (GOOD, "train", "lengths", [2, 30], "n_ctx is 40"),
    (MULT, "train", "lengths", [2, 13], "multiplication length (digits of a) = 13; expected an integer in 1..12"),
    (GOOD, "model", "n_layers", True, "ModelConfig.n_layers = True"),
    (GOOD, "model", "d_model", 0, "ModelConfig.d_model = 0"),
    (GOOD, "model", "d_head", -1, "ModelConfig.d_head = -1; expected null or an integer, >= 1"),
    (GOOD, "model", "d_mlp", 0, "ModelConfig.d_mlp = 0"),
    (GOOD, "model", "seed", -1, "ModelConfig.seed = -1"),
    (GOOD, "model", "act_fn", "tanh", "ModelConfig.act_fn = 'tanh'; expected a string, one of"),
    (GOOD, "model", "attn_only", "yes", "ModelConfig.attn_only = 'yes'; expected true or false"),
    (GOOD, "model", "normalization", "BN", "ModelConfig.normalization = 'BN'"),
    (GOOD, "model", "n_ctx", 200000, "GiB"),
    (GOOD, "model", "n_heads", 3, "not divisible by n_heads"),
    (GOOD, "task", "n_values", True, "SortingTask.n_values = True"),
    (GOOD, "task", "repeats", "no", "SortingTask.repeats = 'no'"),
    (MULT, "task", "digits", "3", "MultiplicationTask.digits = '3'"),
    (MULT, "task", "digits", 13, "digits must be in 1..12"),
    (MULT, "task", "pad_to", 13, "MultiplicationTask.pad_to = 13"),
    (MULT, "task", "pad_to", -1, "MultiplicationTask.pad_to = -1"),
]


@pytest.mark.parametrize("base, section, key, value, message", BAD,
                         ids=[f"{s}.{k}={v!r}" for _, s, k, v, _ in BAD])
def test_bad_config_is_one_line_before_any_file(tmp_path, capsys, monkeypatch, base, section, key, value, message):
    import probekit.model
    import probekit.train

    def never(*a, **k):
        raise AssertionError("build_model called before the config was checked")

    monkeypatch.setattr(probekit.model, "build_model", never)
    monkeypatch.setattr(probekit.train, "build_model", never)
    conf = copy.deepcopy(base)
    conf[section][key] = value
    (tmp_path / "cfg.json").write_text(json.dumps(conf))
    out = tmp_path / "out"
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not out.exists()


def test_good_configs_pass_the_same_checks(tmp_path):
    from probekit.train import load_run_config

    for conf in (GOOD, MULT):
        (tmp_path / "cfg.json").write_text(json.dumps(conf))
        load_run_config(tmp_path / "cfg.json")


def test_zoo_configs_validate():
    from pathlib import Path

    from probekit.grid import load_grid, parse_run
    from probekit.train import load_run_config

    zoo = Path(__file__).parent.parent / "analyses" / "zoo"
    bases, grids = sorted((zoo / "base").glob("*.json")), sorted(zoo.glob("*.json"))
    assert bases and grids
    for p in bases:
        load_run_config(p)
    for p in grids:  # every job of every grid parses into valid configs
        for job in load_grid(p).jobs("unused"):
            parse_run(job.run)


@pytest.mark.parametrize("kw", [
    dict(), dict(positional="learned"), dict(positional="rotary"), dict(n_layers=3, d_mlp=48, n_ctx=70),
    dict(d_head=8, n_heads=3), dict(attn_only=True, normalization="RMS"), dict(normalization=None),
    dict(normalization="LNPre", positional="rotary", length_temperature="log"),
])
def test_model_bytes_counts_parameters_and_masks(kw):
    cfg = ModelConfig(**{"n_layers": 2, "d_model": 32, "n_heads": 2, "n_ctx": 40, "d_vocab": 15, **kw})
    native = build_model(cfg).original_model
    held = sum(t.numel() * t.element_size() for t in [*native.parameters(), *native.buffers()])
    assert model_bytes(cfg) == held


def test_huge_context_refused_before_build(monkeypatch):
    import probekit.model

    monkeypatch.setattr(probekit.model, "build_model", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(ProbekitError, match=r"about 74.6 GiB .* n_ctx=200000\); expected at most 4 GiB"):
        ModelConfig(n_ctx=200000)
    with pytest.raises(ProbekitError, match="GiB"):
        ModelConfig(n_layers=64, d_model=4096, n_ctx=64)
    assert model_bytes(ModelConfig()) < MAX_MODEL_BYTES


# ---------------------------------------------------------------------------- model folders

TASK = SortingTask(n_values=10)


def test_config_hash_mismatch_refused_even_when_shapes_fit(tmp_path):
    three = ModelConfig(n_layers=1, d_model=48, n_heads=3, n_ctx=40, d_vocab=TASK.d_vocab)  # d_head 16
    two = ModelConfig(n_layers=1, d_model=48, n_heads=2, d_head=24, n_ctx=40, d_vocab=TASK.d_vocab)
    shapes = {k: v.shape for k, v in build_model(three).state_dict().items()}
    assert shapes == {k: v.shape for k, v in build_model(two).state_dict().items()}  # the weights would load
    folder = save_model(build_model(three), tmp_path / "m", TASK)
    conf = json.loads((folder / "config.json").read_text())
    conf["model"] = two.to_dict()
    (folder / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ProbekitError, match=f"hash '{three.hash()}' but config.json describes hash '{two.hash()}'"):
        load_model(folder)


def _rewrite(folder, edit, metadata=None):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata=metadata or meta)


@pytest.fixture
def saved(tmp_path):
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=40, d_vocab=TASK.d_vocab)
    return save_model(build_model(cfg), tmp_path / "m", TASK)


def test_tampered_hash_refused(saved):
    _rewrite(saved, lambda s: None, metadata={"config_hash": "0123456789abcdef"})
    with pytest.raises(ProbekitError, match="hash '0123456789abcdef'"):
        load_model(saved)
    _rewrite(saved, lambda s: None, metadata={"probekit_version": "0.1.0"})
    with pytest.raises(ProbekitError, match="hash None"):
        load_model(saved)


def test_nan_and_int_weights_refused(saved):
    key = "blocks.0.attn.q.weight"

    def nan(s):
        s[key][0, 0] = float("nan")

    _rewrite(saved, nan)
    with pytest.raises(ProbekitError, match=f"tensor {key} holds 1 NaN/inf value"):
        load_model(saved)

    def to_int(s):
        s[key] = torch.zeros_like(s[key], dtype=torch.int64)

    _rewrite(saved, to_int)
    with pytest.raises(ProbekitError, match=f"tensor {key} has dtype torch.int64; expected floating-point"):
        load_model(saved)


def test_inf_weights_refused(saved):
    def inf(s):
        s["unembed.weight" if "unembed.weight" in s else sorted(s)[-1]].view(-1)[3] = -math.inf

    _rewrite(saved, inf)
    with pytest.raises(ProbekitError, match="NaN/inf"):
        load_model(saved)


# ---------------------------------------------------------------------------- task lengths


def test_multiplication_lengths_bounded_and_exact():
    task = MultiplicationTask(digits=12)
    b = task.sample(64, length=12, seed=0)
    a_vals, b_vals = b.meta["a"].tolist(), b.meta["b"].tolist()
    ops = [[int("".join(map(str, row[:12].tolist()))), int("".join(map(str, row[13:25].tolist())))]
           for row in b.tokens]
    assert [list(p) for p in zip(a_vals, b_vals, strict=True)] == ops  # meta is exact at 12 digits
    ans = b.tokens[:, b.prompt_len:].tolist()
    assert all(int("".join(map(str, row[::-1]))) == x * y for row, (x, y) in zip(ans, ops, strict=True))
    for bad in (13, 19, 0, True, 2.0):
        with pytest.raises(ProbekitError, match=r"expected an integer in 1..12 \(operand values"):
            task.sample(2, length=bad)
    with pytest.raises(ProbekitError, match="at most 12 digits"):
        task.batch_from_digits([[1] * 19], [[1] * 19], length=19)


def test_evaluate_refuses_lengths_outside_the_task():
    from probekit.evaluate import evaluate

    mult = MultiplicationTask(digits=2)
    model = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=64, d_vocab=mult.d_vocab))
    with pytest.raises(ProbekitError, match="= 13; expected an integer in 1..12"):
        evaluate(model, mult, [2, 13], n=2)
    with pytest.raises(ProbekitError, match=r"evaluate lengths = \[2.5\]"):
        evaluate(model, mult, [2.5], n=2)
    distinct = SortingTask(n_values=10, repeats=False)
    with pytest.raises(ProbekitError, match="needs 11 distinct values"):
        evaluate(build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=64, d_vocab=distinct.d_vocab)),
                 distinct, [11], n=2)
    with pytest.raises(ProbekitError, match="sorting length = True"):
        distinct.sample(2, length=True)


def test_train_config_round_trip():
    tc = TrainConfig(steps=5, lengths=[2, 3], objectives={"sort": 1}, grad_clip=None)
    assert tc.lengths == (2, 3)
    assert TrainConfig.from_dict(json.loads(json.dumps(tc.to_dict()))) == tc
