"""Where the 'place' N x 1 model (models/mult-nx1-place) fails past its trained 5 digits, and why.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python analyses/place_failure.py [--model mult-nx1-place] \
        [--n 200] [--lengths 6,7,8,9,10] [--offsets 0,2,4,6,8,10]

Prints, per test length: greedy exact match with every digit's place row shifted by one fixed offset
(the training offsets are 0..place_offset_max, evaluation uses 0); exact match of a log-probability
ensemble over the offsets that keep every product row within the trained rows; the first wrong answer
digit; the carry into it; the error rate at digit k when a_(k-1) = a_(k+4) and a_k = a_(k+5) (digits 5
places apart, whose place rows never share a 5-digit training sequence) against the other rows; and
the attention of layer 0 head 1 (the head reading a_k for digit k) on a_k and on a_(k+5).
"""

import argparse

import numpy as np
import torch

import probekit.forward as F
from probekit.model import load_model, model_config_of
from probekit.train import train_logits


@torch.no_grad()
def greedy(nat, mcfg, batch, offsets: list[int]) -> torch.Tensor:
    """Greedy decoding with the log-probabilities averaged over place ``offsets`` (one offset: plain greedy)."""
    toks = batch.tokens.clone()
    for t in torch.nonzero(batch.answer_mask[0]).flatten().tolist():
        lp = sum(train_logits(nat, mcfg, toks[:, :t], torch.full((len(toks),), o))[:, -1].log_softmax(-1)
                 for o in offsets)
        toks[:, t] = lp.argmax(-1)
    return toks


def error_account(batch, ok: torch.Tensor, L: int) -> str:
    """First wrong digit, its carry, and the error rate at digit k with equal digits 5 places apart."""
    wrong = ~ok
    first = torch.where(wrong.any(1), wrong.float().argmax(1), torch.tensor(-1))
    pos = torch.nonzero(batch.answer_mask[0]).flatten()
    carry = batch.features["carry_in"][:, pos - 1]  # carry into digit k, at the position predicting it
    hit = first >= 0
    lines = [f"  first wrong digit: {np.bincount(first[hit].numpy(), minlength=L + 1).tolist()}",
             f"  carry into it: {np.bincount(carry[hit, first[hit]].numpy(), minlength=9).tolist()} "
             f"(all digits: {np.bincount(carry.flatten().numpy(), minlength=9).tolist()})"]
    a = batch.tokens[:, :L]  # units first
    for k in range(1, L - 4):
        same = (a[:, k - 1] == a[:, k + 4]) & ((a[:, k] == a[:, k + 5]) if k + 5 < L else True)
        lines.append(f"  d{k} first wrong: {(first[same] == k).float().mean():.3f} of {int(same.sum())} rows with "
                     f"a_(k-1)=a_(k+4), a_k=a_(k+5); {(first[~same] == k).float().mean():.3f} of {int((~same).sum())} others")
    return "\n".join(lines)


def alias_attention(model, batch, L: int) -> str:
    """Layer 0 head 1's mean attention on a_k and on a_(k+5) from the position predicting digit k (offset 0, as
    evaluation places digits)."""
    pat = F.record(model, batch.tokens, ["blocks.0.attn.hook_pattern"], logits=False)["blocks.0.attn.hook_pattern"]
    di = batch.features["digit_index"][0]
    cells = []
    for q in torch.nonzero((di >= 1) & (di < L - 5)).flatten().tolist():
        k = int(di[q])  # a_k is at position k (units first)
        cells.append(f"d{k} {pat[:, 1, q, k].mean():.2f}/{pat[:, 1, q, k + 5].mean():.2f}")
    return "  L0H1 attention a_k / a_(k+5): " + " ".join(cells)


ap = argparse.ArgumentParser()
ap.add_argument("--model", default="mult-nx1-place")
ap.add_argument("--n", type=int, default=200)
ap.add_argument("--lengths", default="6,7,8,9,10")
ap.add_argument("--offsets", default="0,2,4,6,8,10")
ap.add_argument("--seed", type=int, default=1)
args = ap.parse_args()
torch.set_num_threads(1)
model, task, _ = load_model(args.model)
mcfg, nat = model_config_of(model), model.original_model
trained_top = sum(task.widths(task.digits)) + mcfg.place_offset_max  # the highest product row in training
for L in (int(x) for x in args.lengths.split(",")):
    b = task.sample(args.n, length=L, seed=args.seed)
    pos = torch.nonzero(b.answer_mask[0]).flatten()
    em = {}
    for o in (int(x) for x in args.offsets.split(",")):
        if task.seq_len(L) + o < mcfg.n_ctx:
            em[o] = float((greedy(nat, mcfg, b, [o]) == b.tokens)[:, pos].all(1).float().mean())
    ens = list(range(0, trained_top - len(pos) + 1))  # product rows 1 + o .. len(pos) + o stay trained
    ok0 = (greedy(nat, mcfg, b, [0]) == b.tokens)[:, pos]
    em_ens = float((greedy(nat, mcfg, b, ens) == b.tokens)[:, pos].all(1).float().mean())
    print(f"L={L} exact by offset " + " ".join(f"{o}:{v:.3f}" for o, v in em.items())
          + f"; ensemble over offsets {ens[0]}..{ens[-1]}: {em_ens:.3f}", flush=True)
    print(error_account(b, ok0, L))
    if L > 6:
        print(alias_attention(model, b, L), flush=True)
