"""A hand-built sorting model whose circuit is known: one head performs the successor lookup.

The model is an ordinary probekit model (`probekit.model.build_model`: a TransformerBridge, NoPE,
attention only, no normalization) whose weights are then set by hand. It sorts lists of *distinct*
values exactly, and only one head -- the planted head, ``L1H2`` by default -- does the work:

- token embedding: one-hot, ``W_E[t] = e_t`` in the first ``d_vocab`` residual dimensions (the "token
  subspace"); no positional embedding.
- planted head, query at a position holding token u and key at a position holding token v:
  ``score(u, v) = beta * (n_values - v)`` if v is a value greater than u (``|`` counts as u = -1),
  else ``-gamma``. At the position that predicts sorted element r (holding the previous output, or
  ``|`` for r = 0) the head therefore attends to the smallest input value above the previous output --
  the next element in sorted order, i.e. the ``target_src_pos`` feature. Earlier outputs are <= u and
  are ignored. ``score`` is a d_vocab x d_vocab matrix; ``W_Q``/``W_K`` are its SVD factors
  (``d_head >= d_vocab``), reading only the token subspace.
- planted head OV circuit: ``W_V`` copies the one-hot token into the head's value, ``W_O`` writes it to the
  "answer subspace" (dimensions ``d_vocab .. 2 d_vocab - 1``), and ``W_U`` reads logit t from dimension
  ``d_vocab + t`` with gain ``gain``. So the planted head's output is the answer.
- every other head is a distractor with small random weights whose ``W_O`` writes only outside the token
  subspace (so it cannot disturb the planted head's queries and keys) but into the answer subspace, so it
  has small, non-zero direct effects on the logits. All biases are zero.

Instruments are checked against this: DLA, head ablation (zero, mean, resample), exact activation
patching and attribution patching must all rank the planted head first (``tests/test_groundtruth.py``).
"""

from __future__ import annotations

import math

import torch

from probekit.model import ModelConfig, build_model
from probekit.tasks import ProbekitError, SortingTask


def successor_scores(task: SortingTask, beta: float = 10.0, gamma: float = 100.0) -> torch.Tensor:
    """The planted head's attention score table ``[query token, key token]`` (before softmax)."""
    V, nv = task.d_vocab, task.n_values
    M = torch.full((V, V), -gamma)
    thresholds = list(range(nv)) + [-1]  # values, then "|" (SEP) as -1
    for u, thr in zip(list(range(nv)) + [task.SEP], thresholds, strict=True):
        for v in range(nv):
            if v > thr:
                M[u, v] = beta * (nv - v)
    M[nv + 1:] = 0.0  # NONE and objective tokens never predict a sort step: uniform attention
    return M


def build_sort_lookup_model(n_values: int = 16, head: tuple[int, int] = (1, 2), n_layers: int = 2, n_heads: int = 4,
                            d_model: int = 64, n_ctx: int = 40, gain: float = 10.0, noise: float = 0.1,
                            seed: int = 0, device: str | torch.device = "cpu"):
    """``(model, task)``: the hand-built model described in the module docstring.

    ``task`` is ``SortingTask(n_values, repeats=False)`` (the lookup needs distinct values).
    ``model.planted_head`` holds ``head``.
    """
    task = SortingTask(n_values=n_values, repeats=False, default_length=min(8, n_values))
    V = task.d_vocab
    L0, H0 = head
    if not (0 <= L0 < n_layers and 0 <= H0 < n_heads):
        raise ProbekitError(f"planted head {head} is outside a {n_layers}-layer, {n_heads}-head model")
    if d_model < 2 * V + 1:
        raise ProbekitError(f"d_model={d_model} is too small; the construction needs d_model > 2 * d_vocab = {2 * V}")
    d_head = V + 3
    cfg = ModelConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, n_ctx=n_ctx, d_vocab=V,
                      attn_only=True, normalization=None, positional="none", seed=seed)
    model = build_model(cfg, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}

    sd["embed.weight"][:, :V] = torch.eye(V)  # one-hot tokens in the token subspace
    sd["unembed.weight"][:, V:2 * V] = gain * torch.eye(V)  # logit t reads answer dimension V + t

    # planted head: scores = q.k / sqrt(d_head) = M, with q = A^T e_u, k = B^T e_v, M sqrt(d_head) = A B^T
    M = successor_scores(task).double() * math.sqrt(d_head)
    U, S, Vh = torch.linalg.svd(M)
    A = (U * S.sqrt()).float()  # V r
    B = (Vh.T * S.sqrt()).float()
    rows = slice(H0 * d_head, H0 * d_head + V)
    sd[f"blocks.{L0}.attn.q.weight"][rows, :V] = A.T
    sd[f"blocks.{L0}.attn.k.weight"][rows, :V] = B.T
    sd[f"blocks.{L0}.attn.v.weight"][rows, :V] = torch.eye(V)  # value = the key's one-hot token
    sd[f"blocks.{L0}.attn.o.weight"][V:2 * V, rows] = torch.eye(V)  # ... written to the answer subspace

    # distractor heads: small random weights; W_O writes outside the token subspace only
    for L in range(n_layers):
        for h in range(n_heads):
            if (L, h) == (L0, H0):
                continue
            r = slice(h * d_head, (h + 1) * d_head)
            for w in ("q", "k", "v"):
                sd[f"blocks.{L}.attn.{w}.weight"][r] = torch.randn(d_head, d_model, generator=gen) / math.sqrt(d_model)
            sd[f"blocks.{L}.attn.o.weight"][V:, r] = noise * torch.randn(d_model - V, d_head, generator=gen) / math.sqrt(d_head)
    model.load_state_dict(sd, strict=True)
    model.probekit_name = f"groundtruth-sort-L{L0}H{H0}"
    model.planted_head = (L0, H0)
    from probekit.model import to_device

    to_device(model, device)
    model.eval()
    return model, task
