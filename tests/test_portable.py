"""Portable probes: a probe fitted by probekit on a Hugging Face GPT-2 (as a TransformerLens bridge), exported,
and applied without probekit from plain torch, from nnsight and from pyvene; evaluation of a batch without a task.

The GPT-2 is built locally from a `transformers.GPT2Config` (random weights, no download; the ``gpt2`` fixture
and the copy-task helpers are in conftest.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import COPY_K, GPT2_VOCAB, copy_batch, gpt2_bridge, tiny_gpt2

from probekit.activations import collect
from probekit.evaluate import evaluate_batch
from probekit.probes import Probe, ProbeModelWarning, fit_probe
from probekit.tasks import Batch, ProbekitError

HOOK = "blocks.1.hook_resid_post"  # <-> the output of transformer.h[1]
VOCAB, K = GPT2_VOCAB, COPY_K  # token ids 1..49 to copy, 0 the separator; K tokens copied


def load_export(folder):
    """The export format read with json + safetensors + torch only (no probekit)."""
    from safetensors.torch import load_file

    meta = json.loads((folder / "probe.json").read_text())
    t = load_file(str(folder / "probe.safetensors"))

    def apply(x):  # x [..., d] at meta["hook"] -> (logits [..., k], prediction [...])
        if meta["normalisation"]:
            x = (x - t[meta["normalisation"]["mean"]]) / t[meta["normalisation"]["std"]]
        z = x @ t["W"].T + t["b"]
        pred = z[..., 0] if meta["kind"] == "ridge" else torch.tensor(meta["classes"])[z.argmax(-1)]
        return z, pred

    return meta, apply


@pytest.fixture(scope="module")
def exported(gpt2, tmp_path_factory):
    bridge, _ = gpt2
    train = copy_batch(200, seed=0)
    out = {}
    for feature in ("token", "scaled"):
        probe = fit_probe(bridge, train, feature, HOOK)
        out[feature] = (probe, probe.save(tmp_path_factory.mktemp("export") / feature))
    return out


def _reference(bridge, probe, batch):
    """probekit's own logits and predictions at every position, reshaped to [batch, pos, ...]."""
    acts = collect(bridge, batch, probe.hook, positions="all")
    z = probe.logits(acts).reshape(batch.n, batch.seq_len, -1)
    return z, probe.predict(acts).reshape(batch.n, batch.seq_len)


def test_probe_on_a_gpt2_bridge_records_its_model(gpt2, exported):
    bridge, _ = gpt2
    probe, folder = exported["token"]
    meta = json.loads((folder / "probe.json").read_text())
    assert meta["meta"]["model"] == "gpt2-tiny-local" and meta["meta"]["config_hash"] is None
    assert meta["fingerprint"]["arch_fields"]["architecture"] == "GPT2LMHeadModel"
    assert meta["fingerprint"]["arch_fields"]["d_model"] == 64
    assert probe.kind == "logistic" and exported["scaled"][0].kind == "ridge"
    assert probe.score(bridge, copy_batch(50, seed=1)).value > 0.9  # the token is linearly readable


def test_export_round_trip_without_probekit(gpt2, exported):
    bridge, _ = gpt2
    batch = copy_batch(30, seed=2)
    for feature, (probe, folder) in exported.items():
        meta, apply = load_export(folder)
        assert meta["hook"] == HOOK and meta["feature"] == feature and meta["probekit_version"]
        acts = collect(bridge, batch, HOOK, feature=feature)
        z, pred = apply(acts.acts[HOOK])
        torch.testing.assert_close(z, probe.logits(acts), atol=1e-5, rtol=0)
        torch.testing.assert_close(pred, probe.predict(acts), atol=1e-5, rtol=0)
        back = Probe.load(folder, model=bridge)  # and back into probekit
        torch.testing.assert_close(back.logits(acts), probe.logits(acts))


def test_nnsight_applies_the_exported_probe(gpt2, exported):
    pytest.importorskip("nnsight")
    from nnsight import NNsight

    bridge, hf = gpt2
    batch = copy_batch(8, seed=3)
    traced = NNsight(copy.deepcopy(hf))
    for probe, folder in exported.values():
        _, apply = load_export(folder)
        with torch.no_grad(), traced.trace(batch.tokens):
            out = traced.transformer.h[1].output  # a tensor in transformers >= 5, (hidden, ...) before
            resid = (out[0] if isinstance(out, tuple) else out).save()
        z, pred = apply(resid)
        z_ref, pred_ref = _reference(bridge, probe, batch)
        torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(pred, pred_ref, atol=1e-5, rtol=0)


def test_pyvene_applies_the_exported_probe(gpt2, exported):
    pytest.importorskip("pyvene")
    import pyvene as pv

    bridge, hf = gpt2
    batch = copy_batch(8, seed=4)
    config = pv.IntervenableConfig([{"layer": 1, "component": "block_output",
                                     "intervention": pv.CollectIntervention(keep_last_dim=True)}])
    ipv = pv.IntervenableModel(config, model=copy.deepcopy(hf))
    everywhere = [[list(range(batch.seq_len))] * batch.n]
    with torch.no_grad():
        (_, collected), _ = ipv(base={"input_ids": batch.tokens}, unit_locations={"base": everywhere})
    resid = collected[0].reshape(batch.n, batch.seq_len, -1)
    for probe, folder in exported.values():
        _, apply = load_export(folder)
        z, pred = apply(resid)
        z_ref, pred_ref = _reference(bridge, probe, batch)
        torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(pred, pred_ref, atol=1e-5, rtol=0)


def test_gpt2_probe_warns_on_other_weights_and_refuses_other_architectures(gpt2, exported):
    from probekit.model import ModelConfig, build_model

    probe, folder = exported["token"]
    other = gpt2_bridge(tiny_gpt2(1), "gpt2-tiny-other")
    with pytest.warns(ProbeModelWarning, match="fitted on other weights"):
        Probe.load(folder, model=other)
    fp = probe.meta["fingerprint"]
    native = build_model(ModelConfig(n_layers=2, d_model=64, n_heads=4, d_vocab=VOCAB, n_ctx=32, positional="learned"))
    with pytest.raises(ProbekitError, match=f"another architecture: probe arch={fp['arch']} "
                                            r"\(architecture=GPT2LMHeadModel.*this model arch=.*TransformerLensNative"):
        Probe.load(folder, model=native)


def _hf_greedy(hf, batch):
    """Greedy decoding with the plain Hugging Face model: the oracle for `evaluate_batch`."""
    out = batch.tokens.clone()
    with torch.no_grad():
        for t in range(1, batch.seq_len):
            rows = batch.answer_mask[:, t]
            if rows.any():
                out[rows, t] = hf(out[rows, :t]).logits[:, -1].argmax(-1)
    return out


def test_evaluate_batch_without_a_task(gpt2):
    bridge, hf = gpt2
    batch = copy_batch(12, seed=5)
    rec = evaluate_batch(bridge, batch).records[0]
    pred = _hf_greedy(hf, batch)
    exact = (pred == batch.tokens).all(1)
    assert rec["exact_match"] == pytest.approx(float(exact.float().mean()))
    assert rec["token_acc"] == pytest.approx(float((pred == batch.tokens)[batch.answer_mask].float().mean()))
    assert rec["per_position"] == [round(float(v), 4) for v in (pred == batch.tokens)[:, K + 1:].float().mean(0)]
    # the model's own greedy output is, by construction, an exact match
    solved = Batch.from_tokens(pred, batch.answer_mask)
    assert evaluate_batch(bridge, solved).exact_match(solved.length) == 1.0
    # rows with different answer layouts (ragged prompts) are decoded layout by layout
    ragged_mask = batch.answer_mask.clone()
    ragged_mask[::2, K + 1] = False
    ragged = Batch.from_tokens(pred, ragged_mask)
    assert evaluate_batch(bridge, ragged).records[0]["exact_match"] == 1.0
    wrong = pred.clone()
    wrong[0, -1] = (wrong[0, -1] + 1) % VOCAB
    res = evaluate_batch(bridge, Batch.from_tokens(wrong, ragged_mask)).records[0]
    assert res["exact_match"] == pytest.approx(11 / 12) and "per_position" not in res
    with pytest.raises(ProbekitError, match="no answer position"):
        evaluate_batch(bridge, Batch.from_tokens(pred, torch.zeros_like(ragged_mask)))
    long_mask = torch.zeros(2, 40, dtype=torch.bool)
    long_mask[:, 30:] = True
    with pytest.raises(ProbekitError, match="n_ctx is 32"):
        evaluate_batch(bridge, Batch.from_tokens(torch.ones(2, 40, dtype=torch.long), long_mask))


ROOT = Path(__file__).resolve().parent.parent


def _python_blocks(path: str, section: str, n: int) -> str:
    """The first ``n`` ```python blocks after the line that starts with ``section`` in ``path``, joined."""
    text = (ROOT / path).read_text()
    at, blocks = text.index(f"\n{section}"), []
    for _ in range(n):
        at = text.index("```python\n", at) + len("```python\n")
        end = text.index("```", at)
        blocks.append(text[at:end])
        at = end + 3
    return "\n".join(blocks)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Any hub look-up (config, tokenizer, weights) fails the test; files land in ``tmp_path``."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"a hub download was attempted: from_pretrained{args[:1]}")

    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM,
                transformers.PreTrainedTokenizerBase, transformers.PreTrainedModel):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)


def _check_probe_and_sweep(ns: dict, res) -> None:
    model, batch, probe = ns["model"], ns["batch"], ns["probe"]
    assert type(model.original_model).__name__ == "GPT2LMHeadModel" and not model.training
    assert probe.kind == "logistic" and probe.score(model, batch).value > 0.9  # the token is linearly readable
    assert res.axes == ("layer", "pos") and tuple(res.values.shape) == (2, 12)
    # layer 0, before any mixing: only the changed positions carry the difference
    assert float(res.values[0, 0]) == pytest.approx(1.0, abs=1e-4)
    assert res.values[0, 1:6].abs().max() < 1e-4


def test_bring_your_own_lines(offline, tmp_path):
    """The README's block and the two blocks of docs/guide.md ("Your own model and your own data"), run as written:
    a GPT-2 from a config, a probe and a patching sweep on custom data, and nothing downloaded."""
    import probekit.grid  # the Ray grid module (as after probekit.run_sweep) leaves probekit.sweep the patching sweep

    assert callable(probekit.sweep)

    readme: dict = {}
    exec(compile(_python_blocks("README.md", "Your own model and data", 1), "README.md", "exec"), readme)
    _check_probe_and_sweep(readme, readme["effects"])
    guide: dict = {}
    exec(compile(_python_blocks("docs/guide.md", "## Your own model and your own data", 2), "docs/guide.md", "exec"),
         guide)
    _check_probe_and_sweep(guide, guide["res"])
    assert fit_probe(guide["model"], guide["batch"], "value", "blocks.1.hook_resid_post").kind == "ridge"
    assert (tmp_path / "my_probe" / "probe.json").is_file()
