"""One activation-patching sweep, four libraries: probekit, ``transformer_lens.patching``, nnsight, pyvene.

The sweep: denoising (clean activation into the corrupted run), one patch per layer x position (x head),
metric the mean logit difference between the clean and the corrupted answer token over the answer steps;
sites ``z`` (each head's ``hook_z``, layer x pos x head) and ``attn_out`` (the attention output, layer x pos).

nnsight and pyvene wrap Hugging Face models, not probekit's TransformerBridge models, so the comparison runs
on a model all four can load: a Hugging Face GPT-2 built locally from `transformers.GPT2Config` (2 layers,
d_model 64, 4 heads, vocabulary 50, 32 positions; random weights, nothing downloaded), booted for probekit
and TransformerLens with ``TransformerBridge.boot_transformers(..., hf_model=hf, tokenizer=tok)``;
probekit runs its hook engine (``engine="hooks"``: its native engine needs a native bridge). The task is a
copy task: ``x_1..x_K 0 x_1..x_K``; the corrupted run copies other tokens, so every answer step's answer
differs. Each peer is written the way its own documentation patches: TransformerLens's
``get_act_patch_attn_head_out_by_pos`` / ``get_act_patch_attn_out``; nnsight one ``trace`` per patch
(the clean activations saved in one trace first); pyvene one ``IntervenableModel`` per layer with a
``VanillaIntervention`` on ``head_attention_value_output`` (unit ``h.pos``) or ``attention_output`` (``pos``).

All four must agree to 1e-5 (max absolute difference of the raw metric). Time: every implementation in this
process, warmed up once, then ``repeats`` rounds in which each is called once, in turn (interleaved, so a
change of load hits all alike); medians and probekit's ratio to each peer (peer seconds / probekit
seconds: above 1, probekit is faster). The same is reported for probekit's native engine vs
TransformerLens on a shipped model (``mult-5x1``, carry-flip), as in ``bench_patching``. One thread.
"""

from __future__ import annotations

import copy
import statistics
import time

PEERS = ("transformer_lens", "nnsight", "pyvene")
METHODS = ("probekit",) + PEERS
SITES = ("z", "attn_out")
VOCAB, K = 50, 6  # token ids 1..49 copied, 0 the separator


def tiny_gpt2(seed: int = 0):
    """A Hugging Face GPT-2 with random weights (eval mode), built locally. The weights are drawn 10x wider than
    GPT-2's default (std 0.2, not 0.02) so that patches move the metric by tenths of a logit, not by thousandths."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0,
                     initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


def boot_bridge(hf, name: str = "gpt2-tiny-local"):
    """`TransformerBridge.boot_transformers` on ``hf`` with a local word-level tokenizer (nothing fetched)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", unk_token="t0")
    return TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tok, device="cpu").eval()


def copy_pair(n: int, seed: int = 0):
    """Clean ``x 0 x`` and corrupted ``x' 0 x'`` (x' != x at every place): a `CorruptedPair` from plain tokens."""
    import torch

    from probekit.corruptions import make_pair
    from probekit.tasks import Batch

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (n, K), generator=g)
    x2 = (x - 1 + torch.randint(1, VOCAB - 1, (n, K), generator=g)) % (VOCAB - 1) + 1

    def batch(v):
        tokens = torch.cat([v, torch.zeros(n, 1, dtype=torch.long), v], 1)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        mask[:, K + 1:] = True
        return Batch.from_tokens(tokens, mask, name="copy")

    return make_pair(batch(x), batch(x2), kind="copy-other-tokens")


def logit_diff(pair):
    """logits [batch, pos, vocab] -> the mean logit difference, clean vs corrupted answer, over the answer steps
    (the same number as probekit's ``logit-diff``; every peer uses this one function)."""
    read = list(range(K, 2 * K))
    right, wrong = pair.clean.tokens[:, K + 1:], pair.corrupted.tokens[:, K + 1:]

    def metric(logits):
        lg = logits[:, read]
        return (lg.gather(-1, right[..., None]) - lg.gather(-1, wrong[..., None])).mean()

    return metric


# ---------------------------------------------------------------------------- the four implementations


def _probekit(bridge, hf, pair, site, engine="hooks"):
    from probekit.patching import sweep

    return lambda: sweep(bridge, pair, site, by_pos=True, metric="logit-diff", normalize=False, engine=engine).values


def _transformer_lens(bridge, hf, pair, site):
    import torch
    import transformer_lens.patching as tlp

    patch = tlp.get_act_patch_attn_head_out_by_pos if site == "z" else tlp.get_act_patch_attn_out
    metric = logit_diff(pair)

    def go():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(pair.clean.tokens)
            return patch(bridge, pair.corrupted.tokens, cache, metric)
    return go


def _nnsight(bridge, hf, pair, site):
    import torch
    from nnsight import NNsight

    model, metric = NNsight(hf), logit_diff(pair)
    nL, nH, T = hf.config.n_layer, hf.config.n_head, pair.clean.seq_len
    dh = hf.config.n_embd // nH

    def go():  # z: the input of c_proj (the heads concatenated); attn_out: the attention block's output
        clean, value = {}, {}  # filled inside the traces (nnsight runs a trace's body in its own scope)
        with torch.no_grad():
            with model.trace(pair.clean.tokens):
                for L in range(nL):
                    attn = model.transformer.h[L].attn
                    clean[L] = (attn.c_proj.input if site == "z" else attn.output[0]).save()
            out = torch.zeros((nL, T, nH) if site == "z" else (nL, T))
            for L in range(nL):
                for p in range(T):
                    for h in range(nH) if site == "z" else [None]:
                        with model.trace(pair.corrupted.tokens):
                            attn = model.transformer.h[L].attn
                            if site == "z":
                                sl = slice(h * dh, (h + 1) * dh)
                                attn.c_proj.input[:, p, sl] = clean[L][:, p, sl]
                            else:
                                attn.output[0][:, p] = clean[L][:, p]
                            value["m"] = metric(model.output.logits).save()
                        out[(L, p, h) if site == "z" else (L, p)] = float(value["m"])
            return out
    return go


def _pyvene(bridge, hf, pair, site):
    import pyvene as pv
    import torch

    metric = logit_diff(pair)
    nL, nH, T, n = hf.config.n_layer, hf.config.n_head, pair.clean.seq_len, pair.clean.n
    component, unit = ("head_attention_value_output", "h.pos") if site == "z" else ("attention_output", "pos")
    models = [pv.IntervenableModel(pv.IntervenableConfig([{"layer": L, "component": component, "unit": unit,
                                                           "intervention_type": pv.VanillaIntervention}]), model=hf)
              for L in range(nL)]
    base, source = {"input_ids": pair.corrupted.tokens}, [{"input_ids": pair.clean.tokens}]

    def go():
        out = torch.zeros((nL, T, nH) if site == "z" else (nL, T))
        with torch.no_grad():
            for L, ipv in enumerate(models):
                for p in range(T):
                    for h in range(nH) if site == "z" else [None]:
                        loc = [([[h]] * n, [[p]] * n)] if site == "z" else [[[p]] * n]
                        _, cf = ipv(base, source, {"sources->base": (loc, loc)})
                        out[(L, p, h) if site == "z" else (L, p)] = float(metric(cf.logits))
        return out
    return go


BUILD = {"probekit": _probekit, "transformer_lens": _transformer_lens, "nnsight": _nnsight, "pyvene": _pyvene}


def timing(site: str, n: int, repeats: int) -> dict:
    """The four on one GPT-2 and one pair: a warm-up call each (the values compared), then ``repeats``
    interleaved rounds."""
    import torch

    torch.set_num_threads(1)
    hf, pair = tiny_gpt2(0), copy_pair(n, seed=0)
    bridge = boot_bridge(copy.deepcopy(hf))  # the bridge edits the model it wraps; the peers get their own copies
    calls = {m: BUILD[m](bridge, copy.deepcopy(hf), pair, site) for m in METHODS}
    vals = {m: torch.as_tensor(fn()).float() for m, fn in calls.items()}
    return {"values": vals, **_interleaved(calls, repeats), "seq_len": pair.clean.seq_len}


def _interleaved(calls: dict, repeats: int) -> dict:
    secs = {m: [] for m in calls}
    for _ in range(repeats):
        for m, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            secs[m].append(time.perf_counter() - t0)
    return {"seconds": secs, "median_s": {m: statistics.median(v) for m, v in secs.items()}}


def native_vs_tl(n: int, repeats: int) -> dict:
    """probekit's native engine vs TransformerLens on the shipped ``mult-5x1`` (hook_z by position, carry-flip)."""
    import torch

    from probekit.corruptions import corrupt
    from probekit.model import load_model

    torch.set_num_threads(1)
    model, task, _ = load_model("mult-5x1")
    pair = corrupt(task, task.sample(n, seed=0), "carry-flip", seed=0)
    metric = _tl_metric(pair)

    def tl():
        import transformer_lens.patching as tlp

        with torch.no_grad():
            _, cache = model.run_with_cache(pair.clean.tokens)
            return tlp.get_act_patch_attn_head_out_by_pos(model, pair.corrupted.tokens, cache, metric)

    calls = {"probekit": _probekit(model, None, pair, "z", engine="auto"), "transformer_lens": tl}
    vals = {m: fn() for m, fn in calls.items()}
    t = _interleaved(calls, repeats)
    med = t["median_s"]
    return {"model": "mult-5x1", "n": n, "patches": vals["probekit"].numel(),
            "max_abs_diff": float((vals["probekit"] - vals["transformer_lens"]).abs().max()),
            "probekit_s": round(med["probekit"], 4), "transformer_lens_s": round(med["transformer_lens"], 4),
            "ratio": round(med["transformer_lens"] / med["probekit"], 2), "seconds_all": t["seconds"]}


def _tl_metric(pair):
    """The logit-diff of a task pair (clean vs corrupted answer at the pair's answer steps), logits -> scalar."""
    from probekit.metrics import answer_layout

    pred = answer_layout(pair.clean)
    read = pred if pair.answer_steps is None else pred[list(pair.answer_steps)]
    right, wrong = pair.clean.tokens[:, read + 1], pair.corrupted.tokens[:, read + 1]

    def metric(logits):
        lg = logits[:, read]
        return (lg.gather(-1, right[..., None]) - lg.gather(-1, wrong[..., None])).mean()

    return metric


def run(quick: bool = False) -> dict:
    n, repeats = (8, 1) if quick else (64, 5)
    out: dict = {"threads": 1, "repeats": repeats, "n": n, "tolerance": 1e-5,
                 "what": "denoising patching sweep, raw mean logit-diff over the answer steps; z: layer x pos x head "
                         "(hook_z), attn_out: layer x pos; tiny HF GPT-2 (2 layers, d 64, 4 heads), copy task; "
                         "ratio = peer seconds / probekit seconds (probekit: hook engine)"}
    for site in SITES:
        t = timing(site, n, repeats)
        ref, med = t["values"]["probekit"], t["median_s"]
        row = {"seq_len": t["seq_len"], "patches": ref.numel(), "metric_min": float(ref.min()),
               "metric_max": float(ref.max()), "probekit_s": round(med["probekit"], 4)}
        for m in PEERS:
            row[f"{m}_s"] = round(med[m], 4)
            row[f"ratio_vs_{m}"] = round(med[m] / med["probekit"], 2)
            row[f"max_abs_diff_{m}"] = float((t["values"][m] - ref).abs().max())
        row["agree"] = all(row[f"max_abs_diff_{m}"] <= out["tolerance"] for m in PEERS)
        row["seconds_all"] = t["seconds"]
        out[site] = row
    out["native_vs_transformer_lens"] = native_vs_tl(16 if quick else 64, repeats)
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
