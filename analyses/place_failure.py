"""Where the 'place' N x 1 model (models/mult-nx1-place) fails past its trained 5 digits, and why.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python analyses/place_failure.py [--model mult-nx1-place] \
        [--n 200] [--lengths 6,7,8,9,10] [--offsets 0,2,4,6,8,10] [--ensemble-n 500]

Prints, per test length: greedy exact match with every digit's place row shifted by one fixed offset
(the training offsets are 0..place_offset_max, evaluation uses 0); exact match of an ensemble over the
offsets that keep every product row within the trained rows; the first wrong answer digit; the carry
into it; the error rate at digit k when a_(k-1) = a_(k+4) and a_k = a_(k+5) (digits 5 places apart,
whose place rows never share a 5-digit training sequence) against the other rows; and the attention
of layer 0 head 1 (the head reading a_k for digit k) on a_k and on a_(k+5). Ensembles are greedy
decoding with the next-token probabilities averaged over the offsets (`probekit.evaluate.greedy_decode`,
``place_offsets``).

Then, on the test sets of ``probekit eval --seed 0`` (``--ensemble-n`` rows per length): exact match
at offset 0 (plain evaluation, the model card's numbers) against the ensemble over the training
offsets (``place_offsets="train"``, every offset 0..place_offset_max whose rows fit n_ctx), each with
its 95 % Wilson interval, and their paired difference (the same rows; 95 % paired bootstrap interval),
with the verdict on "the ensemble raises exact match" (difference > 0) at each length.

Measured (seed-0 model, n = 500 per length, offsets 0..10 at every length; the exact matches also come
from ``probekit eval --model mult-nx1-place --lengths 6,7,8,9,10 --n 500 --seed 0``, without and with
``--place-offsets train``; Wilson 95 % intervals; the difference with its paired bootstrap 95 % interval):

| digits | offset 0 | 95 % interval | ensemble, offsets 0..10 | 95 % interval | difference (points) | 95 % interval |
|---|---|---|---|---|---|---|
| 6 | 100.0 % | 99.2 - 100.0 % | 100.0 % | 99.2 - 100.0 % | +0.0 | 0.0 - 0.0 |
| 7 | 82.6 % | 79.0 - 85.7 % | 96.8 % | 94.9 - 98.0 % | +14.2 | 10.8 - 17.6 |
| 8 | 71.2 % | 67.1 - 75.0 % | 94.0 % | 91.6 - 95.8 % | +22.8 | 18.8 - 26.8 |
| 9 | 43.0 % | 38.7 - 47.4 % | 87.0 % | 83.8 - 89.7 % | +44.0 | 39.2 - 48.6 |
| 10 | 39.0 % | 34.8 - 43.3 % | 82.0 % | 78.4 - 85.1 % | +43.0 | 38.2 - 47.8 |

Verdicts (difference > 0): supported at 7..10 digits; not supported at 6 (both at 100 %).
"""

import argparse

import numpy as np
import torch

import probekit.forward as F
from probekit.evaluate import greedy_decode, place_offsets_of, wilson
from probekit.model import load_model, model_config_of
from probekit.stats import Hypothesis, paired_bootstrap
from probekit.studies.common import Study


def exact(model, batch, offsets) -> np.ndarray:
    """Per row: whether greedy decoding averaged over place ``offsets`` gets every answer token right."""
    got = greedy_decode(model, batch, place_offsets=offsets)
    return (got == batch.tokens)[:, batch.answer_mask[0]].all(1).numpy()


def ensemble_against_offset_0(model, task, lengths: list[int], n: int) -> Study:
    """Offset 0 against the training offsets' ensemble on ``probekit eval --seed 0``'s test sets, paired."""
    st = Study("place-offsets", "Averaging over the training offsets against offset 0")
    cmd = (f"PYTHONPATH=. .venv/bin/python analyses/place_failure.py --lengths {','.join(map(str, lengths))} "
           f"--ensemble-n {n}")
    for L in lengths:
        b = task.sample(n, length=L, seed=L)  # evaluate's test set at eval seed 0: seed * 1000 + L
        offsets = place_offsets_of(model.probekit_config, b, "train")
        plain, ens = exact(model, b, None), exact(model, b, offsets)
        d, lo, hi = paired_bootstrap(ens.astype(float), plain.astype(float), seed=L)
        v = st.test(Hypothesis(f"{L} digits: greedy decoding averaged over the training place offsets gets more "
                               "products exactly right than offset 0", "exact match, ensemble - offset 0", ">", 0.0),
                    d, (lo, hi), cmd, baseline={"offset 0": float(plain.mean())}, n=n)
        (a0, a1), (e0, e1) = wilson(int(plain.sum()), n), wilson(int(ens.sum()), n)
        print(f"L={L} n={n} offset 0: {plain.mean():.3f} [{a0:.3f}, {a1:.3f}]; ensemble over offsets "
              f"{offsets[0]}..{offsets[-1]}: {ens.mean():.3f} [{e0:.3f}, {e1:.3f}]; difference {d:+.3f} "
              f"[{lo:+.3f}, {hi:+.3f}]: {v.verdict}", flush=True)
    return st


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
ap.add_argument("--ensemble-n", type=int, default=500)
args = ap.parse_args()
torch.set_num_threads(1)
model, task, _ = load_model(args.model)
mcfg = model_config_of(model)
lengths = [int(x) for x in args.lengths.split(",")]
trained_top = sum(task.widths(task.digits)) + mcfg.place_offset_max  # the highest product row in training
for L in lengths:
    b = task.sample(args.n, length=L, seed=args.seed)
    pos = torch.nonzero(b.answer_mask[0]).flatten()
    em = {}
    for o in (int(x) for x in args.offsets.split(",")):
        if task.seq_len(L) + o < mcfg.n_ctx:
            em[o] = float(exact(model, b, [o]).mean())
    ens = list(range(0, trained_top - len(pos) + 1))  # product rows 1 + o .. len(pos) + o stay trained
    ok0 = (greedy_decode(model, b) == b.tokens)[:, pos]
    em_ens = float(exact(model, b, ens).mean())
    print(f"L={L} exact by offset " + " ".join(f"{o}:{v:.3f}" for o, v in em.items())
          + f"; ensemble over offsets {ens[0]}..{ens[-1]}: {em_ens:.3f}", flush=True)
    print(error_account(b, ok0, L))
    if L > 6:
        print(alias_attention(model, b, L), flush=True)
print(ensemble_against_offset_0(model, task, lengths, args.ensemble_n).summary())
