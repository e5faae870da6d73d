"""Every instrument on a Hugging Face GPT-2 booted as a TransformerLens bridge, each against an independent oracle.

The model is conftest's ``gpt2_copy``: a 2-layer GPT-2 built from a `transformers.GPT2Config` (learned positions,
LayerNorm, fused ``c_attn`` that the bridge splits into q/k/v) and trained for a few seconds on a copy task
(``x0 .. x5 0 x0 .. x5``). The oracles are TransformerLens (`transformer_lens.patching`, hooks on the bridge)
or the untouched Hugging Face model itself (its weights, its modules, forward hooks on them), never probekit.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformer_lens.patching as tlp
from conftest import COPY_K, copy_batch

from probekit import edges as E
from probekit import forward as F
from probekit.attribution import (
    ablate_heads,
    attribution_patching,
    direct_logit_attribution,
    head_ablation_sweep,
)
from probekit.circuits import composition_scores, ov_circuit, qk_circuit
from probekit.corruptions import make_pair
from probekit.interventions import (
    CounterfactualPairs,
    Interchange,
    Location,
    fit_das,
    intervened_logits,
    location_acts,
)
from probekit.metrics import BoundMetric, answer_layout, answer_targets, metric_value
from probekit.patching import sweep
from probekit.tasks import Batch

K = COPY_K
TOL = dict(atol=1e-5, rtol=1e-5)


def _first_changed(batch: Batch, seed: int) -> Batch:
    """``batch`` with x0 (and its copy) replaced by another token: only the first answer changes."""
    g = torch.Generator().manual_seed(seed)
    t = batch.tokens.clone()
    t[:, 0] = t[:, K + 1] = (t[:, 0] - 1 + torch.randint(1, 48, (batch.n,), generator=g)) % 49 + 1
    return Batch.from_tokens(t, batch.answer_mask, name=batch.task)


@pytest.fixture(scope="module")
def pair():
    clean = copy_batch(16, seed=21)
    return make_pair(clean, _first_changed(clean, seed=22))


def _hf_params(hf, L: int) -> dict[str, torch.Tensor]:
    """Layer L's per-head weights read from the Hugging Face modules: W_Q/W_K/W_V ``[head, d_model, d_head]``,
    b_Q/b_K/b_V ``[head, d_head]``, W_O ``[head, d_head, d_model]`` (``Conv1D``: y = x @ W + b)."""
    a = hf.transformer.h[L].attn
    d, nh = hf.config.n_embd, hf.config.n_head
    dh = d // nh
    W, b = a.c_attn.weight.detach(), a.c_attn.bias.detach()
    out = {}
    for i, s in enumerate("QKV"):
        out[f"W_{s}"] = W[:, i * d:(i + 1) * d].reshape(d, nh, dh).permute(1, 0, 2)
        out[f"b_{s}"] = b[i * d:(i + 1) * d].reshape(nh, dh)
    out["W_O"] = a.c_proj.weight.detach().reshape(nh, dh, d)
    return out


@contextlib.contextmanager
def _head_input_edit(hf, L: int, fn):
    """Inside: ``fn(z [batch, pos, head, d_head]) -> z`` edits layer L's head outputs in the HF model (c_proj's input)."""
    nh = hf.config.n_head

    def pre(mod, args):
        x = args[0]
        z = fn(x.reshape(*x.shape[:2], nh, -1).clone())
        return (z.reshape(x.shape),)

    h = hf.transformer.h[L].attn.c_proj.register_forward_pre_hook(pre)
    try:
        yield
    finally:
        h.remove()


def _hf_z(hf, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's head outputs z ``[batch, pos, head, d_head]`` in the HF model (what enters c_proj)."""
    zs = []
    with contextlib.ExitStack() as stack:
        for L in range(hf.config.n_layer):
            stack.enter_context(_head_input_edit(hf, L, lambda z: zs.append(z.clone()) or z))
        with torch.no_grad():
            hf(tokens)
    return zs


# ---------------------------------------------------------------------------- the forward


def test_the_native_forward_is_the_hf_forward(gpt2_copy):
    model, hf = gpt2_copy
    assert F.supports_native(model)
    tokens = copy_batch(8, seed=1).tokens
    with torch.no_grad():
        hf_logits = hf(tokens).logits
        bridge_logits, cache = model.run_with_cache(tokens)
    rec = F.record(model, tokens)
    torch.testing.assert_close(rec.logits, hf_logits, **TOL)
    torch.testing.assert_close(bridge_logits, hf_logits, **TOL)
    for name, act in rec.acts.items():  # every site of every layer, as the bridge's hooks see it
        torch.testing.assert_close(act, cache[name], **TOL, msg=name)
    cache_kv = F.KVCache.empty(2)
    nat = F.native(model)
    steps = [F.decode_step(nat, tokens[:, :K], cache_kv)] + [F.decode_step(nat, tokens[:, t:t + 1], cache_kv)
                                                            for t in range(K, tokens.shape[1])]
    torch.testing.assert_close(torch.stack(steps, 1), hf_logits[:, K - 1:], **TOL)


# ---------------------------------------------------------------------------- patching


def _tl_inputs(model, pair):
    bm = BoundMetric.bind("logit-diff", pair)
    with torch.no_grad():
        _, cache = model.run_with_cache(pair.clean.tokens)
    return pair.corrupted.tokens, cache, bm.tl_metric()


@pytest.mark.parametrize("engine", ["native", "hooks"])
def test_patching_sweeps_equal_transformer_lens(gpt2_copy, pair, engine):
    model, _ = gpt2_copy
    tokens, cache, metric = _tl_inputs(model, pair)
    for site, fn in (("z", tlp.get_act_patch_attn_head_out_by_pos), ("resid_pre", tlp.get_act_patch_resid_pre),
                     ("mlp_out", tlp.get_act_patch_mlp_out)):
        tl = fn(model, tokens, cache, metric)
        assert tl.abs().max() > 1e-2, site  # the comparison is not between two zero tensors
        ours = sweep(model, pair, site, by_pos=True, normalize=False, engine=engine)
        torch.testing.assert_close(ours.values, tl, **TOL, msg=site)


def test_the_copy_is_carried_by_the_first_token_then_the_separator(gpt2_copy, pair):
    """resid_pre patching (1 = clean restored): layer 0 needs position 0 (the changed token); by layer 1 the
    first answer reads it from the separator's position K, where a layer-0 head has moved it."""
    model, _ = gpt2_copy
    res = sweep(model, pair, "resid_pre")
    assert float(res.values[0, 0]) == pytest.approx(1.0, abs=1e-4)
    assert float(res.values[1, K]) > 0.9 and abs(float(res.values[1, 0])) < 0.1


# ---------------------------------------------------------------------------- attribution


def test_dla_by_head_equals_a_computation_from_the_hf_weights(gpt2_copy):
    model, hf = gpt2_copy
    batch = copy_batch(16, seed=3)
    res = direct_logit_attribution(model, batch, unit="head")
    pos, tgt = answer_layout(batch), answer_targets(batch)  # [answer], [batch, answer]
    zs = _hf_z(hf, batch.tokens)
    ln_f, W_U = hf.transformer.ln_f, hf.lm_head.weight.detach()  # W_U [d_vocab, d_model]
    final = {}  # the final residual, as it enters ln_f
    handle = ln_f.register_forward_pre_hook(lambda m, a: final.setdefault("x", a[0].clone()))
    try:
        with torch.no_grad():
            out = hf(batch.tokens)
    finally:
        handle.remove()
    resid = final["x"][:, pos]  # batch answer d_model
    scale = ((resid - resid.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + ln_f.eps).sqrt()
    g = W_U[tgt] * ln_f.weight.detach()  # batch answer d_model
    D = (g - g.mean(-1, keepdim=True)) / scale
    for L in range(2):
        W_O = _hf_params(hf, L)["W_O"]
        want = torch.einsum("bkhe,hem,bkm->bkh", zs[L][:, pos], W_O, D).mean(0)
        torch.testing.assert_close(res.values[L], want, **TOL)
    assert res.values.abs().max() > 0.1
    # completeness: the components (every head, b_O, MLP, embeddings, the constant) sum to the HF logit
    comp = direct_logit_attribution(model, batch, unit="component", reduce="none")
    torch.testing.assert_close(comp.values.sum(-1), out.logits[:, pos].gather(-1, tgt[..., None])[..., 0], **TOL)


@pytest.mark.parametrize("method", ["mean", "zero"])
def test_head_ablation_equals_editing_the_hf_head(gpt2_copy, method):
    model, hf = gpt2_copy
    batch = copy_batch(16, seed=4)
    L, h = 0, 1
    res = ablate_heads(model, batch, [(L, h)], method=method, metric="logprob", exact_match=False)
    mean = _hf_z(hf, batch.tokens)[L][:, :, h].mean(0)

    def edit(z):
        z[:, :, h] = mean if method == "mean" else 0.0
        return z

    with torch.no_grad(), _head_input_edit(hf, L, edit):
        want = float(metric_value(hf(batch.tokens).logits, batch, "logprob"))
    assert float(res.values[1]) == pytest.approx(want, abs=1e-5)
    assert abs(float(res.values[2])) > 1e-3  # the head matters to the copy
    sw = head_ablation_sweep(model, batch, method=method, metric="logprob", exact_match=False)
    assert float(sw.values[L, h]) == pytest.approx(float(res.values[2]), abs=1e-5)


def test_attribution_patching_is_the_derivative_along_the_patch(gpt2_copy, pair):
    """Each head/position score is d metric / d eps of the corrupt run with z + eps (z_clean - z_corrupt) at that
    head and position, here by central finite differences on the HF model; the exact effects are the sweep's."""
    model, hf = gpt2_copy
    res = attribution_patching(model, pair.clean, pair.corrupted, exact=True)
    zc, zx = _hf_z(hf, pair.clean.tokens), _hf_z(hf, pair.corrupted.tokens)

    def metric_at(L, p, h, eps):
        def edit(z):
            z[:, p, h] = z[:, p, h] + eps * (zc[L][:, p, h] - zx[L][:, p, h])
            return z

        with torch.no_grad(), _head_input_edit(hf, L, edit):
            return float(metric_value(hf(pair.corrupted.tokens).logits, pair.clean, "logit-diff", corrupted=pair.corrupted))

    eps, checked = 1e-2, 0
    for L in range(2):
        for p in range(K + 1):  # the prompt, where the two runs differ (position 0) or read the difference
            for h in range(4):
                fd = (metric_at(L, p, h, eps) - metric_at(L, p, h, -eps)) / (2 * eps)
                assert float(res.heads.values[L, p, h]) == pytest.approx(fd, abs=2e-3, rel=2e-3), (L, p, h)
                checked += abs(fd) > 1e-2
    assert checked >= 2
    exact = sweep(model, pair, "z", by_pos=True, normalize=False).values - res.settings["metric_corrupt"]
    torch.testing.assert_close(res.exact_heads.values, exact, atol=1e-4, rtol=1e-4)
    assert res.agreement["heads"]["spearman"] is not None


# ---------------------------------------------------------------------------- circuits


def test_qk_and_ov_circuits_equal_einsums_on_the_hf_weights(gpt2_copy):
    model, hf = gpt2_copy
    toks = list(range(1, 12))
    E_ = hf.transformer.wte.weight.detach()[toks]
    W_U = hf.lm_head.weight.detach()[toks].T  # d_model token
    dh = hf.config.n_embd // hf.config.n_head
    for L in range(2):
        P = _hf_params(hf, L)
        ln = hf.transformer.h[L].ln_1
        with torch.no_grad():
            x = ln(E_)  # "embed" mode: each token's embedding normalised by the layer's own LayerNorm
        q = torch.einsum("tm,hmd->htd", x, P["W_Q"]) + P["b_Q"][:, None]
        k = torch.einsum("tm,hmd->htd", x, P["W_K"]) + P["b_K"][:, None]
        torch.testing.assert_close(qk_circuit(model, heads=[(L, h) for h in range(4)], tokens=toks).values,
                                   q @ k.transpose(-1, -2) / dh ** 0.5, **TOL)
        raw = torch.einsum("tm,hmd,hdn,nu->htu", E_, P["W_V"], P["W_O"], W_U)  # ln="none": the raw weights
        torch.testing.assert_close(ov_circuit(model, heads=[(L, h) for h in range(4)], tokens=toks, ln="none").values,
                                   raw, **TOL)


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_composition_scores_equal_frobenius_ratios_of_the_hf_weights(gpt2_copy, mode):
    model, hf = gpt2_copy
    res = composition_scores(model, mode, fold_ln=False, n_random=4)
    W0, W1 = _hf_params(hf, 0), _hf_params(hf, 1)
    for h1 in range(4):
        ov = W0["W_V"][h1] @ W0["W_O"][h1]  # writer, d_model x d_model
        for h2 in range(4):
            reader = {"Q": W1["W_Q"][h2] @ W1["W_K"][h2].T, "K": W1["W_K"][h2] @ W1["W_Q"][h2].T,
                      "V": W1["W_V"][h2] @ W1["W_O"][h2]}[mode]
            want = (ov @ reader).norm() / (ov.norm() * reader.norm())
            assert float(res.values[0, h1, 1, h2]) == pytest.approx(float(want), rel=1e-4)
    assert res.values[1].isnan().all() and res.values[0, :, 0].isnan().all()  # only earlier writers


# ---------------------------------------------------------------------------- interventions


def _copy_pairs(n: int) -> CounterfactualPairs:
    """Base: a copy example; source: the same with another first token. The counterfactual answer at the
    separator (position K, which predicts the copy of x0) is the source's x0."""
    base = copy_batch(n, seed=31)
    source = _first_changed(base, seed=32)
    return CounterfactualPairs(base, source, at=K, target=source.tokens[:, 0], vary="x0")


def test_full_vector_interchange_is_activation_patching(gpt2_copy, pair):
    model, _ = gpt2_copy
    res = sweep(model, pair, "resid_pre", normalize=False)  # denoising: clean values into the corrupted run
    for L, p in ((0, 0), (1, 0), (1, K), (1, 3)):
        loc = Location("resid_pre", L, p)
        src = location_acts(model, pair.clean, loc, torch.full((pair.clean.n,), p))
        with torch.no_grad():
            logits = intervened_logits(model, pair.corrupted.tokens, loc, torch.full((pair.clean.n,), p), src,
                                       Interchange())
        got = float(metric_value(logits, pair.clean, "logit-diff", corrupted=pair.corrupted))
        assert got == pytest.approx(float(res.values[L, p]), abs=1e-5), (L, p)


def test_das_finds_the_copied_token_at_the_separator(gpt2_copy):
    """After layer 0 the first token is read at the separator, not at its own position: the full interchange
    there moves the answer (ceiling 1) and a learned 16-dimensional subspace does too, random ones do not."""
    model, _ = gpt2_copy
    pairs = _copy_pairs(160)
    at_sep = fit_das(model, pairs, Location("resid_post", 0, K), k=16, steps=60, n_boot=200)
    assert at_sep.ceiling == 1.0 and at_sep.floor == 0.0
    assert at_sep.interval[0] > 0.8 and float(at_sep.control.max()) < 0.2
    at_own = fit_das(model, pairs, Location("resid_post", 0, 0), k=16, steps=20, n_boot=200)
    assert at_own.ceiling == 0.0 and at_own.iia == 0.0


# ---------------------------------------------------------------------------- edges


def _hf_metric(hf, pair, tokens, pre_hooks: dict):
    """logit-diff of the HF model on ``tokens`` with forward pre-hooks ``{module: fn(x) -> x}``."""
    hs = [m.register_forward_pre_hook(lambda mod, a, fn=fn: (fn(a[0]),) + a[1:]) for m, fn in pre_hooks.items()]
    try:
        with torch.no_grad():
            return float(metric_value(hf(tokens).logits, pair.clean, "logit-diff", corrupted=pair.corrupted))
    finally:
        for h in hs:
            h.remove()


def test_exact_edge_effects_equal_patching_that_edge_in_the_hf_model(gpt2_copy, pair):
    """Noising: the clean run, with one sender's corrupted-minus-clean output added to one receiver's input."""
    model, hf = gpt2_copy
    rep = E.edge_report(model, pair, ablation=None)
    ex = dict(zip(rep.labels, rep.exact.tolist(), strict=True))
    m0 = _hf_metric(hf, pair, pair.clean.tokens, {})
    assert rep.settings["m_base"] == pytest.approx(m0, abs=1e-5)
    zc, zx = _hf_z(hf, pair.clean.tokens), _hf_z(hf, pair.corrupted.tokens)
    tr = hf.transformer
    emb = tr.wte.weight.detach()
    d_embed = emb[pair.corrupted.tokens] - emb[pair.clean.tokens]
    want = {"embed->logits": _hf_metric(hf, pair, pair.clean.tokens, {tr.ln_f: lambda x: x + d_embed})}
    for h in range(4):
        d = (zx[0][:, :, h] - zc[0][:, :, h]) @ _hf_params(hf, 0)["W_O"][h]
        want[f"L0H{h}->logits"] = _hf_metric(hf, pair, pair.clean.tokens, {tr.ln_f: lambda x, d=d: x + d})
        want[f"L0H{h}->MLP1"] = _hf_metric(hf, pair, pair.clean.tokens, {tr.h[1].ln_2: lambda x, d=d: x + d})
        want[f"L0H{h}->MLP0"] = _hf_metric(hf, pair, pair.clean.tokens, {tr.h[0].ln_2: lambda x, d=d: x + d})
    for label, m in want.items():
        assert ex[label] == pytest.approx(m - m0, abs=1e-5), label
    assert max(abs(ex[k]) for k in want) > 1e-2


@pytest.mark.parametrize("site", ["q", "k", "v"])
def test_edges_into_q_k_v_equal_recomputing_that_input_in_the_hf_model(gpt2_copy, pair, site):
    """Edge L0Hh -> L1Hr.site: head r's ``site`` of layer 1 recomputed from ln_1(resid_pre + delta), the rest unchanged."""
    model, hf = gpt2_copy
    rep = E.edge_report(model, pair, ablation=None)
    ex = {lab: v for lab, v in zip(rep.labels, rep.exact.tolist(), strict=True)
          if lab.endswith(f".{site}") and "->L1" in lab and not lab.startswith("MLP")}  # from embed or a layer-0 head
    zc, zx = _hf_z(hf, pair.clean.tokens), _hf_z(hf, pair.corrupted.tokens)
    emb = hf.transformer.wte.weight.detach()
    blk, P1 = hf.transformer.h[1], _hf_params(hf, 1)
    d, dh = hf.config.n_embd, hf.config.n_embd // hf.config.n_head
    at = "QKV".index(site.upper()) * d  # c_attn's output is [q | k | v]
    seen = {}
    grab = blk.ln_1.register_forward_pre_hook(lambda m, a: seen.__setitem__("pre", a[0].clone()))
    try:
        m0 = _hf_metric(hf, pair, pair.clean.tokens, {})
        for label in sorted(ex, key=lambda k: -abs(ex[k]))[:3]:  # the three largest edges into this site
            sender, receiver = label.split("->")
            r = int(receiver[3])
            if sender == "embed":
                delta = emb[pair.corrupted.tokens] - emb[pair.clean.tokens]
            else:
                h = int(sender[3])
                delta = (zx[0][:, :, h] - zc[0][:, :, h]) @ _hf_params(hf, 0)["W_O"][h]

            def set_input(mod, args, out, delta=delta, r=r):
                W, b = P1[f"W_{site.upper()}"][r], P1[f"b_{site.upper()}"][r]
                out = out.clone()
                out[..., at + r * dh:at + (r + 1) * dh] = blk.ln_1(seen["pre"] + delta) @ W + b
                return out

            hook = blk.attn.c_attn.register_forward_hook(set_input)
            try:
                m = _hf_metric(hf, pair, pair.clean.tokens, {})
            finally:
                hook.remove()
            assert ex[label] == pytest.approx(m - m0, abs=2e-6), label
    finally:
        grab.remove()
    assert max(abs(v) for v in ex.values()) > 1e-4


def test_eap_scores_into_the_logits_are_gradients_of_the_hf_model(gpt2_copy, pair):
    """Textbook EAP (norm="linear"): (corrupted - clean output of the sender) . d metric / d (final residual)
    at the clean run; with norm="exact" (the default) edges into the logits score their exact effect."""
    model, hf = gpt2_copy
    rep = E.edge_report(model, pair, ablation=None, norm="linear")
    exact = E.edge_report(model, pair, ablation=None)
    for lab, s, x in zip(exact.labels, exact.scores.tolist(), exact.exact.tolist(), strict=True):
        if lab.endswith("->logits"):
            assert s == pytest.approx(x, abs=1e-5)
    sc = dict(zip(rep.labels, rep.scores.tolist(), strict=True))
    final = {}

    def keep(mod, args):
        x = args[0].detach().requires_grad_()
        final["x"] = x
        return (x,)

    hook = hf.transformer.ln_f.register_forward_pre_hook(keep)
    try:
        m = metric_value(hf(pair.clean.tokens).logits, pair.clean, "logit-diff", corrupted=pair.corrupted)
        (grad,) = torch.autograd.grad(m, final["x"])
    finally:
        hook.remove()
    zc, zx = _hf_z(hf, pair.clean.tokens), _hf_z(hf, pair.corrupted.tokens)
    for L in range(2):
        for h in range(4):
            d = (zx[L][:, :, h] - zc[L][:, :, h]) @ _hf_params(hf, L)["W_O"][h]
            assert sc[f"L{L}H{h}->logits"] == pytest.approx(float((d * grad).sum()), abs=1e-5)
    assert rep.spearman is not None


# ---------------------------------------------------------------------------- a bridge probekit's forward does not cover


def test_other_architectures_use_hooks_and_refuse_what_needs_probekits_forward(pair):
    """A Llama (rotary, RMSNorm, gated MLP) booted the same way: patching runs through TransformerLens hooks and
    equals `transformer_lens.patching`; path patching and edge attribution refuse it in one line."""
    from tokenizers import Tokenizer, models
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from probekit.patching import path_patch
    from probekit.tasks import ProbekitError

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=32, bos_token_id=0,
                                      eos_token_id=0, pad_token_id=0)).eval()
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({str(i): i for i in range(50)},
                                                                              unk_token="0")))
    model = TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tok).eval()
    assert not F.supports_native(model)
    tokens, cache, metric = _tl_inputs(model, pair)
    tl = tlp.get_act_patch_attn_head_out_all_pos(model, tokens, cache, metric)
    assert tl.abs().max() > 1e-2
    torch.testing.assert_close(sweep(model, pair, "z", by_pos=False, normalize=False).values, tl, **TOL)
    for run in (lambda: path_patch(model, pair), lambda: E.edge_report(model, pair)):
        with pytest.raises(ProbekitError, match=r"needs a TL-native or Hugging Face GPT-2 TransformerBridge.*; "
                                                r"got LlamaForCausalLM$"):
            run()
