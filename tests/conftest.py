"""Shared fixtures: tiny models trained in seconds by probekit's own training loop (no network)."""

from __future__ import annotations

import pytest
import torch

from probekit.model import ModelConfig
from probekit.tasks import MultiplicationTask, SortingTask
from probekit.train import TrainConfig, train

torch.set_num_threads(1)  # tiny models: one thread is faster, and robust when the machine is loaded


@pytest.fixture(scope="session")
def tiny_sort(tmp_path_factory):
    """(model, task): 2-layer NoPE model that sorts distinct values 0..15, lengths 2..8 (trained ~5 s)."""
    task = SortingTask(n_values=16, repeats=False)
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, d_vocab=task.d_vocab, n_ctx=64, seed=0)
    out = tmp_path_factory.mktemp("tiny_sort")
    model = train(cfg, task, TrainConfig(steps=300, batch_size=64, lengths=(2, 8), lr=3e-3, warmup_steps=30),
                  out=out, name="tiny-sort", overwrite=True, progress=False)
    model.probekit_name = "tiny-sort"
    return model, task


@pytest.fixture(scope="session")
def tiny_mult(tmp_path_factory):
    """(model, task): 2-layer model on 2x1-digit reversed multiplication (trained ~10 s)."""
    task = MultiplicationTask(digits=2, b_digits=1)
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, d_vocab=task.d_vocab, n_ctx=16, positional="learned", seed=0)
    out = tmp_path_factory.mktemp("tiny_mult")
    model = train(cfg, task, TrainConfig(steps=400, batch_size=64, lengths=(2, 2), lr=3e-3, warmup_steps=30),
                  out=out, name="tiny-mult", overwrite=True, progress=False)
    model.probekit_name = "tiny-mult"
    return model, task


@pytest.fixture(scope="session")
def tiny_sort_dir(tiny_sort, tmp_path_factory):
    from probekit.model import save_model

    model, task = tiny_sort
    return save_model(model, tmp_path_factory.mktemp("saved") / "tiny-sort", task, name="tiny-sort")


# ---------------------------------------------------------------------------- a Hugging Face GPT-2, built locally

GPT2_VOCAB, COPY_K = 50, 6  # token ids 1..49 to copy, 0 the separator; COPY_K tokens copied


def tiny_gpt2(seed: int):
    """A 2-layer GPT-2 from a `transformers.GPT2Config`, random weights (nothing downloaded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=GPT2_VOCAB, n_positions=32, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def gpt2_bridge(hf, name: str):
    """`TransformerBridge.boot_transformers` on a local model, with a local tokenizer (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(GPT2_VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", unk_token="t0")  # no BOS: nothing to fetch
    return TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tok, device="cpu").eval()


def copy_batch(n: int, seed: int):
    """The toy copy task: COPY_K tokens, the separator 0, the same tokens again (the answer).

    Features: ``token`` (the token at each position, an integer class) and ``scaled`` (token / 49, a float;
    NaN at the separator).
    """
    from probekit.tasks import Batch

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, GPT2_VOCAB, (n, COPY_K), generator=g)
    tokens = torch.cat([x, torch.zeros(n, 1, dtype=torch.long), x], 1)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, COPY_K + 1:] = True
    scaled = tokens.float() / (GPT2_VOCAB - 1)
    scaled[:, COPY_K] = float("nan")
    return Batch.from_tokens(tokens, mask, {"token": tokens, "scaled": scaled}, name="copy")


def train_copy(hf, steps: int, batch_size: int = 64, lr: float = 3e-3):
    """A plain PyTorch loop: next-token cross-entropy on the answer tokens of `copy_batch` data."""
    opt = torch.optim.AdamW(hf.parameters(), lr=lr)
    hf.train()
    for step in range(steps):
        b = copy_batch(batch_size, seed=10_000 + step)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        logits = hf(b.tokens).logits
        m = b.answer_mask[:, 1:]  # the logits at t predict token t + 1
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][m], b.tokens[:, 1:][m])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return hf.eval()


@pytest.fixture(scope="session")
def gpt2():
    """(bridge, hf): a random-weight GPT-2 bridge; ``hf`` is an untouched copy of the same weights."""
    import copy

    hf = tiny_gpt2(0)
    ref = copy.deepcopy(hf)
    return gpt2_bridge(hf, "gpt2-tiny-local"), ref


@pytest.fixture(scope="session")
def gpt2_copy():
    """(bridge, hf): the same GPT-2 trained on the copy task with a plain PyTorch loop (100 steps, a few seconds);
    ``hf`` an untouched copy of the trained weights."""
    import copy

    hf = train_copy(tiny_gpt2(0), steps=100)
    ref = copy.deepcopy(hf)
    return gpt2_bridge(hf, "gpt2-tiny-copy"), ref
