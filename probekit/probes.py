"""Linear probes: fit, score on other lengths, controls, interventions, save/load.

    probe = fit_probe(model, train, "carry_out", "blocks.1.hook_resid_post")
    probe.score(model, task.sample(500, length=7, seed=1)).value         # accuracy on longer inputs
    sweep = probe_sweep(model, train, "carry_out", "resid_pre,resid_mid,resid_post",
                        evals={"6": task.sample(500, length=6, seed=1)}, by_position=True)
    sweep.to_frame()                                                       # one row per cell, controls as columns
    with probe.intervene(model, mode="project_out"):
        logits = model(tokens)                                             # the probe's direction removed

Axis names: ``row`` (one (example, position) pair), ``d`` (the hook's activation, trailing dims
flattened), ``k`` (a class of a categorical probe; 1 for a ridge probe), ``hook`` (a hook kind such as
``hook_resid_pre``), ``layer`` (block index; ``-`` for hooks outside the blocks), ``position`` (``all``
= every selected position pooled, else the slot k: the k-th selected position of an example, e.g.
answer step k), ``split`` (``train``, then each evaluation batch).

Probes: multinomial logistic regression (categorical features: digits, carries, ranks; metric
accuracy) or ridge regression (numeric features such as ``column_sum``; metric R^2). Logistic probes
minimise scikit-learn's ``LogisticRegression(C)`` objective (L2 penalty on the weights, not the bias),
by full-batch L-BFGS in whitened coordinates on a stacked ``[probe, variant, d + 1, k]`` weight tensor:
one optimisation fits every (hook, layer, position) at once. Ridge probes use scikit-learn's objective in closed form.

Controls reported with every sweep (same shape as the values, columns of ``to_frame()``):

- ``shuffled``: a probe fitted on train labels shuffled across rows; on ``train`` it is scored against
  the same shuffled labels (how much the probe can memorise), on the other splits against their labels
  shuffled too (chance: what a probe that learned nothing transferable scores);
- ``control``: Hewitt & Liang's control task: each (token, position) type gets a random label drawn
  from the train label distribution; ``selectivity = value - control``;
- ``random_model``: the same probe on a randomly initialised model of the same config;
- ``majority``: the constant predictor (most frequent train class; for ridge the train mean);
- ``token``: the best predictor from the input token alone (the token at the probed position -> its most
  frequent train label, as `probekit.stats.token_baseline`; for ridge its mean train label).

A probe is scored on data it was not fitted on only in the evaluation splits: ``train`` is the fit itself
(what a probe can memorise). For a held-out score at the training length pass a fresh batch of that length
in ``evals``.

Fingerprints: every fitted probe records `model_fingerprint` of its model in ``meta["fingerprint"]``:
``arch`` (hash of the shape-defining ``model.cfg`` fields), ``config_hash`` (probekit's `ModelConfig.hash`,
None for other bridges) and ``weights`` (hash of the parameters upstream of the probe's hook). Applying
the probe to a model (`Probe.load(folder, model=...)`, ``score``, ``collect``, ``intervene``) refuses
another architecture in one line naming both fingerprints and warns (`ProbeModelWarning`) on other weights.

Export format (format_version 2; `Probe.save`), a folder readable with ``json`` + ``safetensors`` alone:

- ``probe.json``: ``format`` ("probekit-probe"), ``format_version``, ``probekit_version``, ``hook`` (a
  TransformerLens hook name), ``feature``, ``kind`` (``logistic`` | ``ridge``), ``classes`` (the class value
  of each output, logistic; null for ridge), ``d``, ``n_out`` (k), ``act_shape`` (the hook's per-position
  shape, flattened to d), ``normalisation`` (null, or the names of the mean/std tensors), ``fingerprint``,
  ``position_rule``, ``slot``, ``temperature``, ``meta`` (training data, scores), ``weights_sha256``;
- ``probe.safetensors``: ``W [k, d]``, ``b [k]``, ``mean [d]`` (mean training activation), ``class_means
  [k, d]`` (logistic), and ``norm_mean [d]`` / ``norm_std [d]`` when ``normalisation`` names them.

``logits = ((x - norm_mean) / norm_std) @ W.T + b`` (without normalisation: ``x @ W.T + b``) for x the hook's
activation flattened to d; the prediction is ``classes[argmax(logits)]`` or, for ridge, ``logits[..., 0]``.
Folders of format 1 (``weight [d, k]``, ``bias``) still load. See docs/guide.md (Portable probes).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from probekit.activations import Activations, collect, hook_kind, hook_layer, model_device, resolve_hooks
from probekit.results import Result
from probekit.tasks import Batch, ProbekitError

NUMERIC_FEATURES = ("column_sum",)
CONTROLS = ("shuffle", "control_task", "random_model")
FORMAT = "probekit-probe"
FORMAT_VERSION = 2
WEIGHTS_FILE = "probe.safetensors"
META_FILE = "probe.json"


def probe_kind(feature: str, kind: str = "auto", values: Tensor | None = None) -> str:
    """``logistic`` or ``ridge``: ``auto`` picks ridge for numeric features (``column_sum``, or any float
    feature when ``values`` is given, e.g. one built by `Batch.from_tokens`); float values refuse ``logistic``."""
    is_float = values is not None and torch.as_tensor(values).is_floating_point()
    if kind == "auto":
        return "ridge" if feature in NUMERIC_FEATURES or is_float else "logistic"
    if kind not in ("logistic", "ridge"):
        raise ProbekitError(f"unknown probe kind {kind!r}; expected 'auto', 'logistic' or 'ridge'")
    if kind == "logistic" and is_float:
        raise ProbekitError(f"feature {feature!r} holds float values; a logistic probe needs integer classes "
                            f"(use kind='ridge' or 'auto')")
    return kind


# ---------------------------------------------------------------------------- batched solvers


def _preconditioner(X: Float[Tensor, "g n d"], w: Float[Tensor, "g n"], lam: Float[Tensor, " g"]):
    """Weighted mean [g, d], P [g, d, d] = U (S + lam)^(-1/2) where U S U^T is the weighted covariance, and
    the diagonal of P^T P = (S + lam)^(-1) [g, d] (so that ||P Wz||^2 = sum_e Wz_e^2 (P^T P)_ee).

    With W = P @ Wz the data term of the loss has curvature about 1 in every direction of Wz, so L-BFGS
    converges in tens of steps on residual-stream activations (which are far from isotropic).
    """
    ws = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    mean = torch.einsum("gn,gnd->gd", ws, X)
    Xc = (X - mean[:, None]) * ws[..., None].sqrt()
    cov = (Xc.transpose(1, 2) @ Xc).double()
    ev, U = torch.linalg.eigh(cov)
    inv = 1.0 / (ev.clamp_min(0) + lam.double()[:, None])
    P = U * inv.sqrt()[:, None, :]
    return mean, P.to(X.dtype), inv.to(X.dtype)


def _logistic_loss(Z: Tensor, Zt: Tensor, Wz: Tensor, yc: Tensor, wn: Tensor, pen: Tensor) -> tuple[Tensor, Tensor]:
    """Loss and its gradient in Wz [g, v, k, e]: weighted cross-entropy of Z Wz^T plus 0.5 sum pen * Wz^2.

    Z [g, n, e] and its transpose Zt [g, e, n] (both contiguous: class-major logits [g, v, k, n] make the
    two skinny matmuls fastest); yc [g, v, 1, n] class indices, wn [g, v, 1, n] row weights. The gradient
    is written out (softmax minus one-hot, through one matmul), not taken by autograd.
    """
    G, V, K, e = Wz.shape
    logp = torch.bmm(Wz.view(G, V * K, e), Zt).view(G, V, K, -1).log_softmax(2)
    loss = -(logp.gather(2, yc) * wn).sum() + 0.5 * (pen * Wz * Wz).sum()
    dlogits = logp.exp_().scatter_add_(2, yc, torch.full(yc.shape, -1.0, dtype=logp.dtype, device=logp.device))
    dlogits.mul_(wn)
    grad = torch.bmm(dlogits.view(G, V * K, -1), Z).view(G, V, K, e).add_(pen * Wz)
    return loss, grad


def fit_logistic(X: Float[Tensor, "g n d"], y: Int[Tensor, "g v n"], w: Float[Tensor, "g n"], n_classes: int,
                 C: float = 1.0, max_iter: int = 100, tol: float = 1e-6):
    """Multinomial logistic regressions, all at once: group g (its own rows), label variant v.

    ``y`` holds class indices, -1 = ignore; ``w`` row weights (0 = padding). Minimises, per (g, v),
    scikit-learn's objective divided by the number of rows: ``mean_w(cross-entropy) + ||W||^2 / (2 C n)``
    (no penalty on the bias), by L-BFGS in preconditioned coordinates (see `_preconditioner`). Stops after
    ``max_iter`` steps or when the summed loss changes by less than ``tol`` per problem.
    Returns ``W [g, v, d, k]``, ``b [g, v, k]`` and the number of function evaluations.
    """
    if C <= 0:
        raise ProbekitError(f"C must be positive, got {C}")
    G, N, d = X.shape
    V = y.shape[1]
    X = X.float()
    valid = (y >= 0).float() * w[:, None, :]  # g v n
    n_eff = valid.sum(2).clamp_min(1.0)  # g v
    lam = 1.0 / (C * n_eff)  # g v
    mean, P, diag = _preconditioner(X, w, lam.mean(1))
    Z = torch.cat([(X - mean[:, None]) @ P, torch.ones(G, N, 1, dtype=X.dtype, device=X.device)], 2)  # g n d+1
    wn = (valid / n_eff[..., None])[:, :, None]  # g v 1 n
    yc = y.clamp_min(0)[:, :, None]  # g v 1 n
    # ||W||^2 in the original space = ||P Wz||^2 = sum_e diag_e Wz_e^2 (P's columns are orthogonal); no bias term
    pen = lam[:, :, None, None] * torch.cat([diag, diag.new_zeros(G, 1)], 1)[:, None, None, :]  # g v 1 e
    Wz = torch.zeros(G, V, n_classes, d + 1, dtype=X.dtype, device=X.device)
    Zt = Z.transpose(1, 2).contiguous()
    opt = torch.optim.LBFGS([Wz], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=tol * G * V)
    evals = [0]

    def closure():
        loss, Wz.grad = _logistic_loss(Z, Zt, Wz, yc, wn, pen)
        evals[0] += 1
        return loss

    with torch.no_grad():
        opt.step(closure)
    Wz = Wz.transpose(2, 3)  # g v e k
    W = torch.einsum("gde,gvek->gvdk", P, Wz[:, :, :d])
    b = Wz[:, :, d] - torch.einsum("gd,gvdk->gvk", mean, W)
    return W, b, evals[0]


def fit_ridge(X: Float[Tensor, "g n d"], y: Float[Tensor, "g v n"], w: Float[Tensor, "g n"], alpha: float = 1.0):
    """Ridge regressions in closed form (scikit-learn's ``Ridge(alpha)`` objective, weighted rows, intercept).

    Returns ``W [g, v, d, 1]``, ``b [g, v, 1]``.
    """
    if alpha < 0:
        raise ProbekitError(f"alpha must be >= 0, got {alpha}")
    X = X.double()
    y = y.double()
    w = w.double()
    ws = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    xm = torch.einsum("gn,gnd->gd", ws, X)
    ym = torch.einsum("gn,gvn->gv", ws, y)
    Xc = (X - xm[:, None]) * w[..., None].sqrt()
    yc = (y - ym[..., None]) * w[:, None].sqrt()
    A = Xc.transpose(1, 2) @ Xc + alpha * torch.eye(X.shape[2], dtype=X.dtype)  # g d d
    B = torch.einsum("gnd,gvn->gdv", Xc, yc)
    beta = torch.linalg.solve(A, B).transpose(1, 2)  # g v d
    b = ym - torch.einsum("gd,gvd->gv", xm, beta)
    return beta[..., None].float(), b[..., None].float()


# ---------------------------------------------------------------------------- scores


@dataclass
class ProbeScore:
    """One probe scored on one batch. ``value`` is accuracy (logistic) or R^2 (ridge)."""

    metric: str
    value: float
    n: int
    majority: float  # accuracy of always predicting the most frequent train class (ridge: R^2 of the train mean)
    classes: list[int] | None = None
    confusion: list[list[int]] | None = None  # [true class, predicted class] counts, rows with seen labels
    n_unseen: int = 0  # rows whose label is not among the probe's classes (always wrong)
    nll: float | None = None  # mean negative log-likelihood (seen labels), with the probe's temperature
    ece: float | None = None  # expected calibration error of the max probability, 15 bins
    mse: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def expected_calibration_error(probs: Float[Tensor, "row k"], correct: Tensor, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width bins of the max probability, weighted by bin size."""
    conf = probs.max(-1).values
    idx = torch.clamp((conf * bins).long(), max=bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += float(sel.float().mean()) * abs(float(correct[sel].float().mean()) - float(conf[sel].mean()))
    return total


# ---------------------------------------------------------------------------- model fingerprints

# model.cfg fields that fix the shapes (and the meaning) of the activations a probe reads
ARCH_FIELDS = ("architecture", "d_model", "n_layers", "n_heads", "d_head", "d_mlp", "n_key_value_heads",
               "d_vocab", "n_ctx", "act_fn", "normalization_type", "positional_embedding_type", "attn_only")
_BLOCK_PARAM = re.compile(r"(?:^|\.)(?:blocks|layers|layer|h)\.(\d+)\.")
_SAMPLE = 1 << 16  # values hashed per parameter tensor (all of them when it has fewer)


def _short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def arch_fields(model) -> dict:
    """The ``model.cfg`` fields of `ARCH_FIELDS` (None where the config has no such field)."""
    out = {}
    for f in ARCH_FIELDS:
        v = getattr(model.cfg, f, None)
        out[f] = v if isinstance(v, bool | int | float | str) or v is None else str(v)
    return out


def _scoped_params(model, hook: str | None) -> tuple[list[Tensor], str]:
    """The parameters upstream of ``hook`` (all of them for None or a hook after the blocks), and their scope.

    Parameters outside any block that come before the first block (embeddings) are always upstream;
    ``blocks.{L}.hook_resid_pre`` reads blocks ``< L``, any other hook of block L blocks ``<= L``.
    """
    named = list(model.named_parameters())
    layers = [(_BLOCK_PARAM.search(n), p) for n, p in named]
    first = next((i for i, (m, _) in enumerate(layers) if m), len(layers))
    L = hook_layer(hook) if hook else None
    if hook and L is None and (hook in ("hook_embed", "hook_pos_embed") or hook.startswith(("embed.", "pos_embed."))):
        return [p for _, p in named[:first]], "embeddings"
    if L is None:
        return [p for _, p in named], "all parameters"
    last = L - 1 if hook_kind(hook) == "hook_resid_pre" else L
    keep = [p for i, (m, p) in enumerate(layers) if i < first or (m and int(m.group(1)) <= last)]
    return keep, f"embeddings + blocks 0..{last}" if last >= 0 else "embeddings"


def _weights_hash(params: Sequence[Tensor]) -> str:
    """sha256 of each tensor's shape, dtype and (for large tensors) an evenly strided sample of its values."""
    h = hashlib.sha256()
    with torch.no_grad():
        for p in params:
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLE)
            h.update(f"{tuple(p.shape)}{p.dtype}".encode())
            h.update(flat[::step].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model, hook: str | None = None) -> dict:
    """What a probe remembers of the model it was fitted on.

    ``arch``: hash of the shape-defining ``model.cfg`` fields (`ARCH_FIELDS`, listed in ``arch_fields``);
    ``config_hash``: probekit's `ModelConfig.hash` (None for other bridges); ``weights``: hash of the
    parameters upstream of ``hook`` (``weights_scope``), from a strided sample of each tensor (cheap on large
    models; any retraining changes it, a change confined to unsampled entries may not).
    """
    fields = arch_fields(model)
    cfg = getattr(model, "probekit_config", None)
    params, scope = _scoped_params(model, hook)
    return {"arch": _short_hash(fields), "arch_fields": fields,
            "config_hash": cfg.hash() if cfg is not None and hasattr(cfg, "hash") else None,
            "weights": _weights_hash(params), "weights_scope": scope}


def _fp_line(fp: dict) -> str:
    f = fp.get("arch_fields", {})
    shape = ", ".join(f"{k}={f[k]}" for k in ("architecture", "d_model", "n_layers", "n_heads", "d_mlp") if k in f)
    return f"arch={fp.get('arch')} ({shape}), weights={fp.get('weights')}"


class ProbeModelWarning(UserWarning):
    """A probe applied to a model of the same architecture whose weights (or probekit config) differ."""


# ---------------------------------------------------------------------------- the probe


@dataclass(eq=False)
class Probe:
    """A fitted linear probe on one hook. Apply it to activations, a batch, or edit a forward pass with it.

    ``weight [d, k]`` and ``bias [k]`` act on the hook's activation flattened to ``d``; logits = x @ W + b,
    where x is first standardised as ``(x - norm_mean) / norm_std`` when those are set (probes imported
    from elsewhere; probekit's own fits fold any scaling into ``weight``).
    """

    hook: str
    feature: str
    kind: str
    weight: Float[Tensor, "d k"]
    bias: Float[Tensor, " k"]
    mean: Float[Tensor, " d"]  # mean training activation (the point `project_out` moves to)
    classes: list[int] | None = None
    class_means: Float[Tensor, "k d"] | None = None  # mean training activation per class (steering targets)
    act_shape: tuple[int, ...] = ()
    position_rule: str = "feature"
    slot: int | None = None  # None: every selected position; k: only the k-th selected position of each example
    temperature: float = 1.0
    meta: dict = field(default_factory=dict)
    norm_mean: Float[Tensor, " d"] | None = None
    norm_std: Float[Tensor, " d"] | None = None

    def __post_init__(self):
        self.act_shape = tuple(int(s) for s in self.act_shape) or (int(self.weight.shape[0]),)
        if math.prod(self.act_shape) != self.weight.shape[0]:
            raise ProbekitError(f"probe act_shape {self.act_shape} does not match weight of shape {tuple(self.weight.shape)}")
        if (self.norm_mean is None) != (self.norm_std is None):
            raise ProbekitError("probe normalisation needs both norm_mean and norm_std, or neither")

    def folded(self) -> tuple[Float[Tensor, "d k"], Float[Tensor, " k"]]:
        """``(W, b)`` acting on raw activations: the normalisation (if any) folded into the weights."""
        if self.norm_mean is None:
            return self.weight, self.bias
        W = self.weight / self.norm_std.to(self.weight)[:, None]
        return W, self.bias - self.norm_mean.to(W) @ W

    def as_module(self) -> torch.nn.Module:
        """A plain ``torch.nn.Linear`` (behind an ``nn.Flatten`` for multi-dim hooks such as ``hook_z``) that
        maps activations at this probe's hook ``[..., *act_shape]`` to `logits` ``[..., k]`` (ridge: k = 1).

        The normalisation, if any, is folded into the Linear; the temperature is not applied (as in `logits`).
        """
        W, b = self.folded()
        lin = torch.nn.Linear(self.d, int(W.shape[1]))
        with torch.no_grad():
            lin.weight.copy_(W.T.float())
            lin.bias.copy_(b.float())
        lin.requires_grad_(False)
        if len(self.act_shape) == 1:
            return lin.eval()
        return torch.nn.Sequential(torch.nn.Flatten(-len(self.act_shape)), lin).eval()

    @property
    def d(self) -> int:
        return int(self.weight.shape[0])

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "logistic" else "r2"

    # ------------------------------------------------------------ applying
    def _flat(self, acts) -> Tensor:
        if isinstance(acts, Activations):
            if self.hook not in acts.acts:
                raise ProbekitError(f"activations hold {acts.hooks}, not this probe's hook {self.hook!r}")
            acts = acts.acts[self.hook]
        acts = torch.as_tensor(acts).float()
        if acts.shape[-len(self.act_shape):] == self.act_shape and acts.ndim > len(self.act_shape):
            acts = acts.reshape(*acts.shape[:acts.ndim - len(self.act_shape)], self.d)
        if acts.shape[-1] != self.d:
            raise ProbekitError(f"activations have shape {tuple(acts.shape)}; this probe expects [..., {self.d}] "
                                f"(hook {self.hook}, shape {self.act_shape})")
        return acts

    def logits(self, acts) -> Float[Tensor, "row k"]:
        """Raw scores (before temperature) for activations ``[..., d]`` or ``[..., *act_shape]``."""
        x = self._flat(acts)
        W, b = self.folded()
        return x @ W.to(x.device) + b.to(x.device)

    def predict(self, acts) -> Tensor:
        """Predicted class values (logistic) or predicted feature values (ridge)."""
        z = self.logits(acts)
        if self.kind == "ridge":
            return z[..., 0]
        return torch.tensor(self.classes)[z.argmax(-1).cpu()]

    def predict_proba(self, acts) -> Float[Tensor, "row k"]:
        """Class probabilities ``softmax(logits / temperature)`` (see `calibrate`)."""
        if self.kind != "logistic":
            raise ProbekitError("predict_proba needs a logistic probe; this one is a ridge regression")
        return (self.logits(acts) / self.temperature).softmax(-1)

    def _class_index(self, labels: Tensor) -> Tensor:
        cls = torch.tensor(self.classes)
        pos = torch.searchsorted(cls, labels.clamp(min=int(cls[0])))
        pos = pos.clamp(max=len(cls) - 1)
        return torch.where(cls[pos] == labels, pos, torch.full_like(pos, -1))

    def score_acts(self, acts, labels: Tensor) -> ProbeScore:
        """Score on given activations and true feature values."""
        labels = torch.as_tensor(labels).cpu()
        z = self.logits(acts).cpu()
        if labels.numel() == 0:
            raise ProbekitError("no rows to score; expected at least one labelled position")
        if self.kind == "ridge":
            y = labels.double()
            pred = z[:, 0].double()
            tr_mean = float(self.meta.get("train_label_mean", float(y.mean())))
            ss_tot = float(((y - y.mean()) ** 2).sum())
            mse = float(((y - pred) ** 2).mean())
            r2 = 1 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
            r2_mean = 1 - float(((y - tr_mean) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
            return ProbeScore(metric="r2", value=r2, n=len(y), majority=r2_mean, mse=mse)
        idx = self._class_index(labels)
        pred = z.argmax(-1)
        correct = pred == idx
        seen = idx >= 0
        K = len(self.classes)
        conf = torch.zeros(K, K, dtype=torch.long)
        conf.index_put_((idx[seen], pred[seen]), torch.ones(int(seen.sum()), dtype=torch.long), accumulate=True)
        probs = (z / self.temperature).softmax(-1)
        nll = float(-probs[seen].clamp_min(1e-12).log().gather(1, idx[seen][:, None]).mean()) if seen.any() else None
        maj = self.meta.get("majority_class", self.classes[int(conf.sum(1).argmax())])
        return ProbeScore(metric="accuracy", value=float(correct.float().mean()), n=len(labels),
                          majority=float((labels == maj).float().mean()), classes=list(self.classes),
                          confusion=conf.tolist(), n_unseen=int((~seen).sum()), nll=nll,
                          ece=expected_calibration_error(probs, correct))

    def collect(self, model, batch: Batch, chunk_size: int = 256, device=None) -> Activations:
        """This probe's hook at this probe's positions (its rule, and its slot if any) on ``batch``."""
        self.check_model(model)
        acts = collect(model, batch, [self.hook], feature=self.feature, positions=self.position_rule,
                       chunk_size=chunk_size, device=device)
        self._check_shape(acts.shapes[self.hook])
        if self.slot is not None:
            keep = acts.slot == self.slot
            if not keep.any():
                raise ProbekitError(f"batch has no slot {self.slot} under rule {self.position_rule!r} "
                                    f"(max slot {int(acts.slot.max())}); expected a batch with that position")
            acts = _subset(acts, keep)
        return acts

    def score(self, model, batch: Batch, chunk_size: int = 256, device=None) -> ProbeScore:
        """Accuracy / R^2, confusion and calibration on a batch (any length the model accepts)."""
        acts = self.collect(model, batch, chunk_size=chunk_size, device=device)
        return self.score_acts(acts, acts.labels)

    def calibrate(self, model, batch: Batch, chunk_size: int = 256) -> Probe:
        """A copy whose temperature minimises the log-loss on ``batch`` (use held-out data)."""
        if self.kind != "logistic":
            raise ProbekitError("calibrate needs a logistic probe; this one is a ridge regression")
        acts = self.collect(model, batch, chunk_size=chunk_size)
        z = self.logits(acts).detach()
        idx = self._class_index(acts.labels)
        keep = idx >= 0
        if not keep.any():
            raise ProbekitError("no calibration rows with a class seen in training")
        z, idx = z[keep], idx[keep]
        log_t = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(z / log_t.exp(), idx)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return replace(self, temperature=float(log_t.detach().exp()), meta=dict(self.meta))

    # ------------------------------------------------------------ causal use
    def basis(self) -> Float[Tensor, "d r"]:
        """Orthonormal basis of the directions the probe reads (class weights minus their mean; ridge: w)."""
        W = self.folded()[0].double()
        if self.kind == "logistic":
            W = W - W.mean(1, keepdim=True)
        U, S, _ = torch.linalg.svd(W, full_matrices=False)
        r = int((S > 1e-6 * S.max().clamp_min(1e-30)).sum())
        return U[:, :r].float()

    def intervene(self, model, mode: str = "project_out", value=None, positions=None, scale: float = 1.0):
        """Context manager: edit this probe's hook during forward passes of ``model``.

        ``project_out``: the activation's component in the probe's subspace (`basis`) is replaced by the
        mean training activation's, so the probe (and any reader of that subspace) sees no information.
        ``steer``: that component is set to class ``value``'s mean training activation (logistic; ``scale``
        multiplies its offset from the mean), or so that the ridge readout equals ``value``.
        ``positions``: None (all), a list of positions, a bool ``[pos]`` or ``[batch, pos]`` mask.
        """
        if mode not in ("project_out", "steer"):
            raise ProbekitError(f"unknown intervention mode {mode!r}; expected 'project_out' or 'steer'")
        self.check_model(model)
        dev = model_device(model)
        Q = self.basis().to(dev)
        mu = self.mean.float().to(dev)
        target = torch.zeros(self.d, device=dev)  # offset from mu inside the subspace
        if mode == "steer":
            if value is None:
                raise ProbekitError("steer needs value= (a class for a logistic probe, a number for ridge)")
            if self.kind == "logistic":
                if int(value) not in self.classes or self.class_means is None:
                    raise ProbekitError(f"steer value {value!r} is not one of the probe's classes {self.classes}")
                cm = self.class_means[self.classes.index(int(value))].float().to(dev)
                target = scale * ((cm - mu) @ Q) @ Q.T
            else:
                Wf, bf = self.folded()
                w = Wf[:, 0].float().to(dev)
                r_mu = float(mu @ w + bf[0].to(dev))
                target = (float(value) - r_mu) * w / (w @ w).clamp_min(1e-12)
        return _intervention(model, self.hook, Q, mu, target, positions, self.act_shape)

    # ------------------------------------------------------------ compatibility, save / load
    def check_model(self, model, shape: tuple[int, ...] | None = None, read_shape: bool = False) -> None:
        """Refuse a model this probe cannot read; warn when it reads one with other weights.

        Refused (`ProbekitError`, one line): another ``d_model``, a missing hook, another hook layout
        (``shape``: the hook's per-position shape, or ``read_shape`` to get it from a one-token forward),
        another architecture (the ``arch`` of `model_fingerprint`, naming both fingerprints). Warned
        (`ProbeModelWarning`): same architecture, other weights upstream of the hook or another probekit
        config. Probes saved before fingerprints existed are checked on d_model and layout only.
        """
        d_model = self.meta.get("d_model")
        if d_model is not None and int(model.cfg.d_model) != int(d_model):
            raise ProbekitError(f"probe was fitted on a model with d_model={d_model}; this model has "
                                f"d_model={model.cfg.d_model}")
        if self.hook not in model.hook_dict:
            from probekit.activations import valid_hook_names

            raise ProbekitError(f"probe hook {self.hook!r} does not exist in this model "
                                f"({model.cfg.n_layers} layers); hooks: {valid_hook_names(model)[:12]}...")
        if read_shape:
            shape = hook_shape(model, self.hook)
        if shape is not None:
            self._check_shape(shape)
        self._check_fingerprint(model)

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if tuple(shape) != self.act_shape:
            raise ProbekitError(f"hook layout differs: probe expects {self.hook} of shape {list(self.act_shape)} "
                                f"per position, this model gives {list(shape)}")

    def _check_fingerprint(self, model) -> None:
        fp = self.meta.get("fingerprint")
        if not fp:
            return
        now = model_fingerprint(model, self.hook)
        if fp.get("arch") != now["arch"]:
            raise ProbekitError(f"probe was fitted on another architecture: probe {_fp_line(fp)}; "
                                f"this model {_fp_line(now)}")
        old_cfg, new_cfg = fp.get("config_hash"), now["config_hash"]
        if old_cfg is not None and new_cfg is not None and old_cfg != new_cfg:
            warnings.warn(f"probe {self.hook} was fitted on probekit config {old_cfg}; this model has config "
                          f"{new_cfg} (same architecture {now['arch']})", ProbeModelWarning, stacklevel=3)
        elif fp.get("weights") != now["weights"]:
            warnings.warn(f"probe {self.hook} was fitted on other weights ({fp.get('weights_scope')}: "
                          f"{fp.get('weights')}; this model {now['weights']}), same architecture {now['arch']}",
                          ProbeModelWarning, stacklevel=3)

    def to_meta(self) -> dict:
        """The ``probe.json`` record (see the module docstring); ``weights_sha256`` is added by `save`."""
        from probekit import __version__

        norm = {"mean": "norm_mean", "std": "norm_std"} if self.norm_mean is not None else None
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "probekit_version": __version__,
                "hook": self.hook, "feature": self.feature, "kind": self.kind, "classes": self.classes,
                "d": self.d, "n_out": int(self.weight.shape[1]), "act_shape": list(self.act_shape),
                "normalisation": norm, "fingerprint": self.meta.get("fingerprint"),
                "position_rule": self.position_rule, "slot": self.slot, "temperature": self.temperature,
                "meta": self.meta}

    def tensors(self) -> dict[str, Tensor]:
        """The ``probe.safetensors`` tensors: ``W [k, d]``, ``b [k]``, ``mean [d]``, ``class_means [k, d]``,
        ``norm_mean [d]`` and ``norm_std [d]`` (the last three only when set), float32, contiguous."""
        t = {"W": self.weight.T, "b": self.bias, "mean": self.mean, "class_means": self.class_means,
             "norm_mean": self.norm_mean, "norm_std": self.norm_std}
        return {k: v.detach().float().cpu().contiguous() for k, v in t.items() if v is not None}

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """``probe.safetensors`` + ``probe.json`` (metadata, fingerprint, scores, sha256): the export format."""
        from safetensors.torch import save

        from probekit.io import dumps_json, ensure_empty_dir

        folder = Path(folder)
        ensure_empty_dir(folder, overwrite=overwrite)
        raw = save(self.tensors(), metadata={"format": FORMAT, "hook": self.hook})
        meta = self.to_meta() | {"weights_sha256": hashlib.sha256(raw).hexdigest()}
        _write_files(folder, {WEIGHTS_FILE: raw, META_FILE: dumps_json(meta).encode()})
        return folder

    @classmethod
    def load(cls, folder: str | Path, model=None) -> Probe:
        """Load a saved probe (this format or format 1); with ``model``, `check_model` it (refuse or warn)."""
        folder = Path(folder)
        meta, t = _read_probe_files(folder)
        v1 = int(meta.get("format_version", 1)) < 2
        d, k = int(meta["d"]), int(meta["n_out"])
        expect = {"weight": (d, k), "bias": (k,), "mean": (d,)} if v1 else {"W": (k, d), "b": (k,)}
        if meta["classes"] is not None:
            expect["class_means"] = (k, d)
        if not v1 and meta.get("normalisation"):
            expect |= {"norm_mean": (d,), "norm_std": (d,)}
        for name, shape in expect.items():
            if name not in t or tuple(t[name].shape) != shape:
                got = tuple(t[name].shape) if name in t else "missing"
                raise ProbekitError(f"{folder / WEIGHTS_FILE}: tensor {name!r} is {got}, {META_FILE} implies {shape}")
        weight, bias = (t["weight"], t["bias"]) if v1 else (t["W"].T.contiguous(), t["b"])
        mean = t.get("mean", t.get("norm_mean", torch.zeros(d)))
        probe = cls(hook=meta["hook"], feature=meta["feature"], kind=meta["kind"], weight=weight, bias=bias,
                    mean=mean, classes=meta["classes"], class_means=t.get("class_means"),
                    act_shape=tuple(meta["act_shape"]), position_rule=meta.get("position_rule", "feature"),
                    slot=meta.get("slot"), temperature=float(meta.get("temperature", 1.0)),
                    meta=dict(meta.get("meta") or {}), norm_mean=t.get("norm_mean"), norm_std=t.get("norm_std"))
        if meta.get("fingerprint") and not probe.meta.get("fingerprint"):
            probe.meta["fingerprint"] = meta["fingerprint"]
        if model is not None:
            probe.check_model(model, read_shape=True)
        return probe


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Every file a probe folder holds, each written atomically (the one place probes write)."""
    from probekit.io import write_bytes

    for name, data in files.items():
        write_bytes(folder / name, data)


def _read_probe_files(folder: Path) -> tuple[dict, dict[str, Tensor]]:
    """``probe.json`` and the tensors of ``probe.safetensors``, checked (format, version, sha256, readable)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    mpath, wpath = folder / META_FILE, folder / WEIGHTS_FILE
    for p in (mpath, wpath):
        if not p.is_file():
            raise ProbekitError(f"{p} not found; expected a probe folder with {META_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProbekitError(f"{mpath} is not valid JSON ({type(e).__name__}); the probe file is corrupted") from None
    need = {"format", "hook", "feature", "kind", "classes", "act_shape", "d", "n_out"}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or need - set(meta):
        missing = sorted(need - set(meta)) if isinstance(meta, dict) else sorted(need)
        raise ProbekitError(f"{mpath} is not a probekit probe (missing {missing}); expected format {FORMAT!r}")
    version = int(meta.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise ProbekitError(f"{mpath} has format_version {version}; this probekit reads <= {FORMAT_VERSION}")
    raw = wpath.read_bytes()
    sha = meta.get("weights_sha256")
    if (sha is None and version < 2) or (sha is not None and hashlib.sha256(raw).hexdigest() != sha):
        raise ProbekitError(f"{wpath} does not match the sha256 recorded in {META_FILE}; the probe file is corrupted or replaced")
    try:
        t = load(raw)
    except (SafetensorError, OSError, ValueError) as e:
        raise ProbekitError(f"{wpath} is truncated or corrupted ({str(e).splitlines()[0]})") from None
    return meta, t


def hook_shape(model, hook: str) -> tuple[int, ...]:
    """The trailing (per-position) shape of ``hook``'s activation, from a one-token forward.

    Hooks already attached to the model run during that forward too.
    """
    got = {}

    def grab(x, hook):
        got["shape"] = tuple(x.shape[2:])

    with torch.no_grad():
        model.run_with_hooks(torch.zeros(1, 1, dtype=torch.long, device=model_device(model)),
                             fwd_hooks=[(hook, grab)], return_type=None)
    if "shape" not in got:
        raise ProbekitError(f"hook {hook!r} did not fire in a forward pass; expected a per-position activation")
    return got["shape"]


@contextlib.contextmanager
def _intervention(model, hook: str, Q: Tensor, mu: Tensor, target: Tensor, positions, act_shape):
    def edit(x, hook):
        shp = x.shape
        if tuple(shp[2:]) != tuple(act_shape):
            raise ProbekitError(f"hook layout differs: probe expects {hook.name} of shape {list(act_shape)} "
                                f"per position, this model gives {list(shp[2:])}")
        flat = x.reshape(shp[0], shp[1], -1)
        new = flat - ((flat - mu) @ Q) @ Q.T + target
        if positions is not None:
            m = _pos_mask(positions, shp[0], shp[1], x.device)
            new = torch.where(m[..., None], new, flat)
        return new.reshape(shp)

    with model.hooks(fwd_hooks=[(hook, edit)]):
        yield model


def _pos_mask(positions, n: int, T: int, device) -> Tensor:
    p = torch.as_tensor(positions, device=device)
    if p.dtype == torch.bool:
        if p.shape == (T,):
            return p[None].expand(n, T)
        if p.shape == (n, T):
            return p
        raise ProbekitError(f"position mask has shape {tuple(p.shape)}; expected [{T}] or [{n}, {T}]")
    m = torch.zeros(T, dtype=torch.bool, device=device)
    p = p.long().flatten()
    if p.numel() and (p.min() < -T or p.max() >= T):
        raise ProbekitError(f"positions {p.tolist()} out of range for sequences of {T} tokens")
    m[p] = True
    return m[None].expand(n, T)


def _subset(acts: Activations, keep: Tensor) -> Activations:
    return replace(acts, acts={k: v[keep] for k, v in acts.acts.items()}, example=acts.example[keep],
                   pos=acts.pos[keep], slot=acts.slot[keep], token=acts.token[keep],
                   labels=acts.labels[keep] if acts.labels is not None else None)


# ---------------------------------------------------------------------------- fitting


def _model_meta(model) -> dict:
    cfg = getattr(model, "probekit_config", None)
    name = getattr(model, "probekit_name", None) or getattr(model.cfg, "model_name", None) or type(model).__name__
    return {"model": str(name),
            "config_hash": cfg.hash() if cfg is not None and hasattr(cfg, "hash") else None,
            "d_model": int(model.cfg.d_model), "n_layers": int(model.cfg.n_layers)}


def _train_desc(batch: Batch, acts: Activations) -> dict:
    return {"task": batch.task, "objective": batch.objective, "length": batch.length, "n": batch.n,
            "rows": acts.n_rows, "seed": batch.meta.get("seed") if isinstance(batch.meta.get("seed"), int) else None}


@dataclass
class _Targets:
    """What a set of probes is fitted to: classes (logistic) and the label of each variant on train rows."""

    kind: str
    classes: Tensor | None  # sorted class values (logistic)
    train_mean: float
    majority_class: int | None

    def index(self, labels: Tensor) -> Tensor:
        if self.kind == "ridge":
            return labels.float()
        cls = self.classes
        pos = torch.searchsorted(cls, labels.clamp(min=int(cls[0]))).clamp(max=len(cls) - 1)
        return torch.where(cls[pos] == labels, pos, torch.full_like(pos, -1))


def _targets(labels: Tensor, kind: str, feature: str) -> _Targets:
    if labels.numel() == 0:
        raise ProbekitError(f"no training rows for feature {feature!r}; expected a non-empty position mask")
    vals, counts = torch.unique(labels, return_counts=True)
    if kind == "logistic" and len(vals) < 2:
        raise ProbekitError(f"feature {feature!r} has a single class ({int(vals[0])}) on the training rows; "
                            f"a classifier needs >= 2 classes (choose other positions, lengths or a larger n)")
    if kind == "ridge" and len(vals) < 2:
        raise ProbekitError(f"feature {feature!r} is constant ({vals[0].item()}) on the training rows; "
                            f"a regression needs >= 2 distinct values")
    return _Targets(kind=kind, classes=vals if kind == "logistic" else None, train_mean=float(labels.double().mean()),
                    majority_class=int(vals[counts.argmax()]) if kind == "logistic" else None)


def _fit(X: Tensor, Y: Tensor, w: Tensor, tg: _Targets, C: float, alpha: float, max_iter: int):
    """X [g, n, d], Y [g, v, n] (class index / value), w [g, n] -> W [g, v, d, k], b [g, v, k]."""
    if tg.kind == "logistic":
        W, b, _ = fit_logistic(X, Y, w, len(tg.classes), C=C, max_iter=max_iter)
    else:
        W, b = fit_ridge(X, Y, w, alpha=alpha)
    return W, b


def _probe_from(hook: str, feature: str, tg: _Targets, W: Tensor, b: Tensor, X: Tensor, y_idx: Tensor,
                w: Tensor, act_shape, rule: str, slot: int | None, meta: dict) -> Probe:
    """A `Probe` from fitted weights, with the mean (and class means) of its training rows X [n, d].

    ``y_idx``: class indices of the rows (logistic; -1 = unseen); ignored for ridge.
    """
    keep = w > 0
    Xk = X[keep]
    class_means = None
    if tg.kind == "logistic":
        yk = y_idx[keep]
        K = len(tg.classes)
        sums = torch.zeros(K, X.shape[1]).index_add_(0, yk.clamp_min(0), Xk * (yk >= 0)[:, None].float())
        counts = torch.bincount(yk.clamp_min(0), weights=(yk >= 0).float(), minlength=K)[:, None]
        class_means = torch.where(counts > 0, sums / counts.clamp_min(1), Xk.mean(0))
    meta = dict(meta, majority_class=tg.majority_class, train_label_mean=tg.train_mean)
    return Probe(hook=hook, feature=feature, kind=tg.kind, weight=W.contiguous(), bias=b.contiguous(),
                 mean=Xk.mean(0), classes=tg.classes.tolist() if tg.classes is not None else None,
                 class_means=class_means, act_shape=act_shape, position_rule=rule, slot=slot, meta=meta)


def fit_probe(model, batch: Batch, feature: str, hook: str, positions: str | Tensor = "feature",
              slot: int | None = None, kind: str = "auto", C: float = 1.0, alpha: float = 1.0,
              max_iter: int = 100, chunk_size: int = 256, device=None) -> Probe:
    """Fit one probe for ``feature`` at one hook (full name or a short name that names one hook).

    ``slot``: fit only on the k-th selected position of each example (e.g. answer step k).
    """
    names = resolve_hooks(model, [hook])
    if len(names) != 1:
        raise ProbekitError(f"hook {hook!r} names {len(names)} hooks ({names[0]}, ...); give one, e.g. {names[0]!r}")
    kind = probe_kind(feature, kind, batch.feature(feature))
    acts = collect(model, batch, names, feature=feature, positions=positions, chunk_size=chunk_size, device=device)
    if slot is not None:
        keep = acts.slot == slot
        if not keep.any():
            raise ProbekitError(f"empty position mask: no example has slot {slot} (max slot {int(acts.slot.max())})")
        acts = _subset(acts, keep)
    tg = _targets(acts.labels, kind, feature)
    X = acts.acts[names[0]]
    y = tg.index(acts.labels)
    w = torch.ones(1, X.shape[0])
    W, b = _fit(X[None], y[None, None], w, tg, C, alpha, max_iter)
    meta = _model_meta(model) | {"train": _train_desc(batch, acts), "C": C if kind == "logistic" else None,
                                 "alpha": alpha if kind == "ridge" else None,
                                 "fingerprint": model_fingerprint(model, names[0])}
    probe = _probe_from(names[0], feature, tg, W[0, 0], b[0, 0], X, y, w[0], acts.shapes[names[0]],
                        acts.position_rule, slot, meta)
    probe.meta["scores"] = {"train": probe.score_acts(X, acts.labels).value}
    return probe


# ---------------------------------------------------------------------------- sweeps


@dataclass(eq=False)
class ProbeSweep(Result):
    """Probe metric (accuracy or R^2) with axes ``(hook, layer, position, split)``; controls in ``extra``.

    ``extra``: ``shuffled``, ``control``, ``selectivity``, ``random_model``, ``majority``, ``token`` (the input-token
    baseline), ``n`` (rows scored),
    each shaped like ``values`` (NaN where a cell does not exist). ``probes`` holds the fitted `Probe`
    objects (not serialised; use ``sweep.probe(...).save(dir)``).
    """

    probes: dict = field(default_factory=dict, repr=False)

    def probe(self, hook: str, layer: int | None = None, position: str | int = "all") -> Probe:
        """The fitted probe at a full hook name, or at (hook kind such as ``resid_pre``, layer); position ``all`` or a slot."""
        cands = [k for k in self.probes if k[1] == str(position) and (
            k[0] == hook if layer is None else
            hook_layer(k[0]) == layer and hook_kind(k[0]) in (hook, f"hook_{hook}", f"attn.{hook}", f"attn.hook_{hook}",
                                                             f"mlp.{hook}", f"mlp.hook_{hook}"))]
        if not cands:
            have = sorted({k[0] for k in self.probes})
            raise ProbekitError(f"no probe for hook {hook!r} (layer {layer}) at position {position!r}; fitted hooks: {have}")
        return self.probes[cands[0]]

    def best(self, split: str | None = None, position: str = "all") -> tuple[dict, float]:
        """The (hook, layer) with the highest value on ``split`` (default: the last split)."""
        s = self.labels["split"].index(split) if split is not None else len(self.labels["split"]) - 1
        p = self.labels["position"].index(position)
        v = self.values[:, :, p, s]
        flat = torch.nan_to_num(v, nan=-float("inf")).reshape(-1)
        i = int(flat.argmax())
        h, L = divmod(i, v.shape[1])
        return {"hook": self.labels["hook"][h], "layer": self.labels["layer"][L]}, float(flat[i])

    def summary(self, position: str = "all") -> str:
        """A small text table: one row per (hook, layer), metric per split, controls on the last split."""
        p = self.labels["position"].index(position)
        s_last = len(self.labels["split"]) - 1
        last = self.labels["split"][s_last]
        head = ["hook", "layer"] + [f"{self.settings.get('metric', 'value')}@{s}" for s in self.labels["split"]] + \
            [f"{c}@{last}" for c in ("shuffled", "control", "selectivity", "random_model", "majority", "token")]
        lines = ["  ".join(f"{h:>14}" for h in head)]
        for h, hk in enumerate(self.labels["hook"]):
            for L, lk in enumerate(self.labels["layer"]):
                vals = self.values[h, L, p]
                if torch.isnan(vals).all():
                    continue
                row = [hk, lk] + [f"{float(v):.3f}" for v in vals]
                row += [f"{float(self.extra[k][h, L, p, s_last]):.3f}" for k in
                        ("shuffled", "control", "selectivity", "random_model", "majority", "token")]
                lines.append("  ".join(f"{c:>14}" for c in row))
        return "\n".join(lines)


def _split_labels(evals) -> dict[str, Batch]:
    if evals is None:
        return {}
    if isinstance(evals, Batch):
        evals = [evals]
    if isinstance(evals, Mapping):
        out = {str(k): v for k, v in evals.items()}
    else:
        out = {}
        for b in evals:
            lab = str(b.length)
            while lab in out or lab == "train":
                lab += "'"
            out[lab] = b
    if "train" in out:
        raise ProbekitError("'train' is reserved for the training batch; name evaluation splits otherwise")
    for k, b in out.items():
        if not isinstance(b, Batch):
            raise ProbekitError(f"evaluation split {k!r} is a {type(b).__name__}; expected a Batch")
    return out


def _control_map(tr: Activations, seed: int, n_types: int) -> Tensor:
    """Hewitt-Liang control labels: one random label per (token, position) type, drawn from the train labels."""
    g = torch.Generator().manual_seed(seed + 7919)
    pick = torch.randint(0, tr.n_rows, (n_types,), generator=g)
    return tr.labels[pick]


def _control_labels(acts: Activations, cmap: Tensor, T: int) -> Tensor:
    return cmap[acts.token * T + acts.pos]


def _gather_rows(slot: Tensor, n_slots: int):
    """Row indices per slot, padded: idx [n_slots, m], valid [n_slots, m]."""
    counts = torch.bincount(slot, minlength=n_slots)[:n_slots]
    m = int(counts.max()) if counts.numel() else 0
    idx = torch.zeros(n_slots, max(m, 1), dtype=torch.long)
    valid = torch.zeros(n_slots, max(m, 1), dtype=torch.bool)
    for j in range(n_slots):
        r = torch.nonzero(slot == j).flatten()
        idx[j, :len(r)] = r
        valid[j, :len(r)] = True
    return idx, valid


def _row_stats(kind: str, out: Tensor, y: Tensor):
    """Per-row sufficient statistics. out: [..., m, k] logits; y [..., m] index/value. -> [..., m, 4]."""
    if kind == "logistic":
        c = (out.argmax(-1) == y).float()
        return torch.stack([c, torch.zeros_like(c), torch.zeros_like(c), torch.ones_like(c)], -1)
    p = out[..., 0].double()
    yy = y.double().expand_as(p)
    return torch.stack([(yy - p) ** 2, yy, yy ** 2, torch.ones_like(p)], -1)


def _metric(kind: str, s: Tensor) -> Tensor:
    """From summed row statistics [..., 4] -> accuracy or R^2 (NaN where no rows)."""
    n = s[..., 3]
    if kind == "logistic":
        return torch.where(n > 0, s[..., 0] / n.clamp_min(1), torch.full_like(n, float("nan")))
    ss_tot = s[..., 2] - s[..., 1] ** 2 / n.clamp_min(1)
    r2 = 1 - s[..., 0] / ss_tot
    return torch.where((n > 1) & (ss_tot > 1e-12), r2, torch.full_like(n, float("nan")))


def _by_slot(stats: Tensor, slot: Tensor, n_pos: int) -> Tensor:
    """stats [..., m, 4], slot [m] -> [..., 1 + n_pos, 4]: all rows, then each slot."""
    total = stats.sum(-2, keepdim=True)
    per = torch.zeros(*stats.shape[:-2], n_pos, 4, dtype=stats.dtype)
    keep = slot < n_pos
    per.index_add_(-2, slot[keep], stats[..., keep, :])
    return torch.cat([total, per], -2)


def _fit_and_score(tr: Activations, evs: dict[str, Activations], names: list[str], tg: _Targets,
                   y_tr: Tensor, y_ev: dict[str, Tensor], by_position: bool, n_pos: int, C: float, alpha: float, max_iter: int):
    """Fit every hook's probes (variants v) pooled (and per slot) and score them on every split.

    y_tr [v, n]: train targets per variant (class index / value). y_ev[split] [v, m]: what each variant
    is scored against. Returns metric [hook, v, 1 + n_pos, split] and the fitted pooled/slot weights.
    """
    splits = list(evs)
    V = y_tr.shape[0]
    stats = torch.full((len(names), V, 1 + n_pos, len(splits), 4), 0.0, dtype=torch.float64)
    have_slot_probe = torch.zeros(1 + n_pos, dtype=torch.bool)
    have_slot_probe[0] = True
    fits = {}
    widths: dict[int, list[int]] = {}
    for i, h in enumerate(names):
        widths.setdefault(tr.acts[h].shape[1], []).append(i)
    n_tr_slots = int(tr.slot.max()) + 1
    for _, idxs in widths.items():
        group = [names[i] for i in idxs]
        X = torch.stack([tr.acts[h] for h in group])  # s n d
        S = len(group)
        W, b = _fit(X, y_tr[None].expand(S, -1, -1), torch.ones(S, X.shape[1]), tg, C, alpha, max_iter)
        fits.update({(h, "all"): (W[j, 0], b[j, 0]) for j, h in enumerate(group)})
        if by_position:
            sidx, sval = _gather_rows(tr.slot, n_tr_slots)  # j m
            Xs = X[:, sidx].reshape(S * n_tr_slots, sidx.shape[1], -1)  # (s j) m d
            Ys = y_tr[:, sidx].permute(1, 0, 2)[None].expand(S, -1, -1, -1).reshape(S * n_tr_slots, V, -1)
            ws = sval.float()[None].expand(S, -1, -1).reshape(S * n_tr_slots, -1)
            Wsl, bsl = _fit(Xs, Ys, ws, tg, C, alpha, max_iter)
            Wsl = Wsl.reshape(S, n_tr_slots, V, *Wsl.shape[2:])
            bsl = bsl.reshape(S, n_tr_slots, V, -1)
            for j, h in enumerate(group):
                for k in range(min(n_tr_slots, n_pos)):
                    fits[(h, str(k))] = (Wsl[j, k, 0], bsl[j, k, 0])
            have_slot_probe[1:1 + min(n_tr_slots, n_pos)] = True
        for e, sp in enumerate(splits):
            ea = evs[sp]
            Xe = torch.stack([ea.acts[h] for h in group])  # s m d
            out = torch.einsum("smd,svdk->svmk", Xe, W) + b[:, :, None]
            st = _row_stats(tg.kind, out, y_ev[sp][None])  # s v m 4
            agg = _by_slot(st, ea.slot, n_pos)  # s v (1+p) 4
            if by_position:
                agg[:, :, 1:] = 0.0
                for k in range(min(n_tr_slots, n_pos)):
                    rows = torch.nonzero(ea.slot == k).flatten()
                    if rows.numel() == 0:
                        continue
                    outs = torch.einsum("smd,svdk->svmk", Xe[:, rows], Wsl[:, k]) + bsl[:, k, :, None]
                    agg[:, :, 1 + k] = _row_stats(tg.kind, outs, y_ev[sp][:, rows][None]).sum(-2)
            for j, i in enumerate(idxs):
                stats[i, :, :, e] = agg[j]
    metric = _metric(tg.kind, stats)
    if by_position:
        metric[:, :, ~have_slot_probe] = float("nan")
    return metric, stats[..., 3], fits


def _collect_splits(m, train: Batch, ev_batches: dict[str, Batch], names: list[str], feature: str, positions,
                    chunk_size: int, device, progress: bool) -> tuple[Activations, dict[str, Activations]]:
    """Stage 1 (collect): the activations of ``train`` and of each split (``train`` first) under model ``m``."""
    kw = dict(feature=feature, positions=positions, chunk_size=chunk_size, device=device)
    if isinstance(positions, Tensor) and ev_batches:
        raise ProbekitError("a position mask only fits the training batch; use a rule ('feature', 'pred', ...) with evals")
    tr = collect(m, train, names, progress=progress, **kw)
    return tr, {"train": tr} | {k: collect(m, b, names, **kw) for k, b in ev_batches.items()}


def _label_variants(tr: Activations, evs: dict[str, Activations], tg: _Targets, controls: list[str], seed: int,
                    n_types: int, T: int) -> tuple[list[str], Tensor, dict[str, Tensor]]:
    """Stage 2 (targets): label variants ``true``; ``shuffled`` (fitted on train labels permuted across rows,
    scored against each split's labels permuted the same way on train and independently elsewhere);
    ``control`` (control-task labels). Returns the variants, train targets [v, n], split targets [v, m]."""
    variants = ["true"]
    y_tr = [tg.index(tr.labels)]
    y_ev = {s: [tg.index(a.labels)] for s, a in evs.items()}
    if "shuffle" in controls:
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(tr.n_rows, generator=g)
        variants.append("shuffled")
        y_tr.append(tg.index(tr.labels[perm]))
        for s, a in evs.items():
            p_s = perm if s == "train" else torch.randperm(a.n_rows, generator=g)
            y_ev[s].append(tg.index(a.labels[p_s]))
    if "control_task" in controls:
        cmap = _control_map(tr, seed, n_types)
        variants.append("control")
        y_tr.append(tg.index(_control_labels(tr, cmap, T)))
        for s, a in evs.items():
            y_ev[s].append(tg.index(_control_labels(a, cmap, T)))
    return variants, torch.stack(y_tr), {s: torch.stack(v) for s, v in y_ev.items()}


def _majority(evs: dict[str, Activations], tg: _Targets, n_pos: int) -> Tensor:
    """Stage 4 (controls): the constant predictor (majority class / train mean) per slot and split."""
    maj = torch.full((1 + n_pos, len(evs)), float("nan"))
    for e, a in enumerate(evs.values()):
        yv = tg.index(a.labels)
        if tg.kind == "logistic":
            const = torch.zeros(len(yv), len(tg.classes))
            const[:, int((tg.classes == tg.majority_class).nonzero())] = 1.0
        else:
            const = torch.full((len(yv), 1), tg.train_mean)
        maj[:, e] = _metric(tg.kind, _by_slot(_row_stats(tg.kind, const, yv), a.slot, n_pos)).float()
    return maj


def _token_baseline(tr: Activations, evs: dict[str, Activations], tg: _Targets, n_pos: int) -> Tensor:
    """Stage 4 (controls): the best predictor from the input token alone, per slot and split: a table token ->
    most frequent train label (ties: the smallest; `probekit.stats.token_baseline`) or, for ridge, the mean
    train label of the token; tokens unseen in train get the majority class / the train mean."""
    tokens = torch.unique(tr.token)
    if tg.kind == "logistic":
        y = tg.index(tr.labels)
        counts = torch.zeros(len(tokens), len(tg.classes))
        counts.index_put_((torch.searchsorted(tokens, tr.token), y), torch.ones(len(y)), accumulate=True)
        table = counts.argmax(1)  # the first maximum: the smallest label among ties
        fallback = int((tg.classes == tg.majority_class).nonzero())
    else:
        sums = torch.zeros(len(tokens), dtype=torch.float64).index_add_(0, torch.searchsorted(tokens, tr.token),
                                                                          tr.labels.double())
        table = sums / torch.bincount(torch.searchsorted(tokens, tr.token), minlength=len(tokens)).double()
        fallback = tg.train_mean
    out = torch.full((1 + n_pos, len(evs)), float("nan"))
    for e, a in enumerate(evs.values()):
        at = torch.searchsorted(tokens, a.token).clamp(max=len(tokens) - 1)
        seen = tokens[at] == a.token
        yv = tg.index(a.labels)
        if tg.kind == "logistic":
            pred = torch.where(seen, table[at], torch.full_like(at, fallback))
            const = torch.nn.functional.one_hot(pred, len(tg.classes)).float()
        else:
            const = torch.where(seen, table[at], torch.full(at.shape, fallback, dtype=torch.float64))[:, None]
        out[:, e] = _metric(tg.kind, _by_slot(_row_stats(tg.kind, const, yv), a.slot, n_pos)).float()
    return out


def _random_model_metric(model, seed: int, collect_splits, names, tg: _Targets, by_position: bool, n_pos: int,
                         C: float, alpha: float, max_iter: int) -> tuple[Tensor | None, str | None]:
    """Stage 4 (controls): the true-label metric [hook, 1 + n_pos, split] of probes on a re-initialised model."""
    rmodel, note = _random_model(model, seed)
    if rmodel is None:
        return None, note
    rtr, revs = collect_splits(rmodel)
    rmetric, _, _ = _fit_and_score(rtr, revs, names, tg, tg.index(rtr.labels)[None],
                                   {s: tg.index(a.labels)[None] for s, a in revs.items()},
                                   by_position, n_pos, C, alpha, max_iter)
    return rmetric[:, 0], note


def _cell(names: list[str], kinds_: list[str], n_cells: int):
    """(hook index, (hook kind row, layer column)) of each hook in the [hook kind, layer] grid."""
    for i, nm in enumerate(names):
        L = hook_layer(nm)
        yield i, (kinds_.index(hook_kind(nm)), L if L is not None else n_cells - 1)


def _assemble(model, names: list[str], variants: list[str], metric: Tensor, counts: Tensor, maj: Tensor,
              tok: Tensor, rnd: Tensor | None, n_pos: int, n_splits: int):
    """Stage 5 (read out): values and extras [hook kind, layer, position, split], hook kinds, layer labels."""
    kinds_ = list(dict.fromkeys(hook_kind(n) for n in names))
    layer_labels = [str(L) for L in range(int(model.cfg.n_layers))]
    if any(hook_layer(n) is None for n in names):
        layer_labels.append("-")
    shape = (len(kinds_), len(layer_labels), 1 + n_pos, n_splits)
    values, shuffled, control, random_model, n_rows, majority, token = (torch.full(shape, float("nan")) for _ in range(7))
    for i, at in _cell(names, kinds_, len(layer_labels)):
        values[at] = metric[i, 0].float()
        n_rows[at] = counts[i, 0].float()
        majority[at], token[at] = maj, tok
        if "shuffled" in variants:
            shuffled[at] = metric[i, variants.index("shuffled")].float()
        if "control" in variants:
            control[at] = metric[i, variants.index("control")].float()
        if rnd is not None:
            random_model[at] = rnd[i].float()
    extra = {"shuffled": shuffled, "control": control, "selectivity": values - control,
             "random_model": random_model, "majority": majority, "token": token, "n": n_rows}
    return values, extra, kinds_, layer_labels


def _sweep_settings(model, train: Batch, batches: dict[str, Batch], evs: dict[str, Activations], feature: str,
                    tg: _Targets, names: list[str], by_position: bool, C: float, alpha: float, controls: list[str],
                    rnd_note: str | None, seed: int) -> dict:
    rule = evs["train"].position_rule
    return _model_meta(model) | {
        "feature": feature, "kind": tg.kind, "metric": "accuracy" if tg.kind == "logistic" else "r2",
        "hooks": names, "position_rule": rule, "by_position": by_position,
        "position_probes": "per_position" if by_position else "pooled",
        "slot_meaning": f"slot k = k-th position selected by rule {rule!r} in an example; "
                        f"token positions per split in slot_pos",
        "slot_pos": {s: a.pos[a.example == a.example[0]].tolist() for s, a in evs.items()},
        "C": C if tg.kind == "logistic" else None, "alpha": alpha if tg.kind == "ridge" else None,
        "controls": controls, "control_task": "label drawn at random per (token, position) type",
        "random_model": rnd_note, "seed": seed, "classes": tg.classes.tolist() if tg.classes is not None else None,
        "splits": {s: {"length": batches[s].length, "n": batches[s].n, "rows": evs[s].n_rows,
                       "objective": batches[s].objective} for s in evs},
    }


def _attach_probes(sweep: ProbeSweep, model, train: Batch, tr: Activations, fits: dict, tg: _Targets,
                   feature: str, names: list[str]) -> None:
    """Stage 6: the fitted probes (true labels), with their training rows' means for interventions."""
    kinds_, layer_labels, splits = sweep.labels["hook"], sweep.labels["layer"], sweep.labels["split"]
    y_true = tg.index(tr.labels)
    base_meta = _model_meta(model) | {"train": _train_desc(train, tr), "C": sweep.settings["C"],
                                      "alpha": sweep.settings["alpha"]}
    fingerprints = {nm: model_fingerprint(model, nm) for nm in names}
    for (nm, pos), (W, b) in fits.items():
        keep = torch.ones(tr.n_rows) if pos == "all" else (tr.slot == int(pos)).float()
        L = hook_layer(nm)
        h, li = kinds_.index(hook_kind(nm)), L if L is not None else len(layer_labels) - 1
        p = 0 if pos == "all" else 1 + int(pos)
        scores = {s: float(sweep.values[h, li, p, e]) for e, s in enumerate(splits)}
        sweep.probes[(nm, pos)] = _probe_from(nm, feature, tg, W, b, tr.acts[nm], y_true, keep, tr.shapes[nm],
                                              tr.position_rule, None if pos == "all" else int(pos),
                                              base_meta | {"train": dict(base_meta["train"]), "scores": scores,
                                                           "fingerprint": fingerprints[nm]})


def probe_sweep(model, train: Batch, feature: str, hooks: str | Sequence[str] = "resid_pre,resid_mid,resid_post",
                evals: Mapping[str, Batch] | Sequence[Batch] | Batch | None = None,
                positions: str | Tensor = "feature", by_position: bool = False, kind: str = "auto",
                C: float = 1.0, alpha: float = 1.0, controls: Sequence[str] | bool = True, seed: int = 0,
                max_iter: int = 100, chunk_size: int = 256, device=None, progress: bool = False) -> ProbeSweep:
    """Probes for ``feature`` at every requested hook (every layer), fitted on ``train`` in one batched
    optimisation and scored on ``train`` and each of ``evals`` (e.g. longer lengths), with controls.

    ``by_position``: also fit one probe per slot (k-th selected position). Without it, the slot cells
    hold the pooled probe's metric restricted to that slot (where on longer inputs it breaks).
    ``controls``: True (all of ``shuffle``, ``control_task``, ``random_model``), False, or a subset.
    """
    controls = list(CONTROLS) if controls is True else [] if controls is False else list(controls)
    bad = sorted(set(controls) - set(CONTROLS))
    if bad:
        raise ProbekitError(f"unknown control(s) {bad}; expected a subset of {list(CONTROLS)}")
    kind = probe_kind(feature, kind, train.feature(feature))
    names = resolve_hooks(model, hooks)
    ev_batches = _split_labels(evals)
    for b in ev_batches.values():
        b.feature(feature)
    collect_splits = functools.partial(_collect_splits, train=train, ev_batches=ev_batches, names=names,
                                       feature=feature, positions=positions, chunk_size=chunk_size, device=device,
                                       progress=progress)
    tr, evs = collect_splits(model)
    tg = _targets(tr.labels, kind, feature)
    n_pos = max(int(a.slot.max()) + 1 for a in evs.values())
    T = max(b.seq_len for b in [train, *ev_batches.values()])
    variants, y_tr, y_ev = _label_variants(tr, evs, tg, controls, seed, int(model.cfg.d_vocab) * T, T)
    metric, counts, fits = _fit_and_score(tr, evs, names, tg, y_tr, y_ev, by_position, n_pos, C, alpha, max_iter)
    maj, tok = _majority(evs, tg, n_pos), _token_baseline(tr, evs, tg, n_pos)
    rnd, rnd_note = None, None
    if "random_model" in controls:
        rnd, rnd_note = _random_model_metric(model, seed, collect_splits, names, tg, by_position, n_pos, C, alpha,
                                             max_iter)
    values, extra, kinds_, layer_labels = _assemble(model, names, variants, metric, counts, maj, tok, rnd, n_pos,
                                                    len(evs))
    settings = _sweep_settings(model, train, {"train": train} | ev_batches, evs, feature, tg, names, by_position,
                               C, alpha, controls, rnd_note, seed)
    sweep = ProbeSweep(kind="probe_sweep", values=values, axes=("hook", "layer", "position", "split"),
                       labels={"hook": kinds_, "layer": layer_labels,
                               "position": ["all"] + [str(k) for k in range(n_pos)], "split": list(evs)},
                       settings=settings, extra=extra)
    _attach_probes(sweep, model, train, tr, fits, tg, feature, names)
    return sweep


def _random_model(model, seed: int):
    """A freshly initialised model of the same probekit config (another seed), or (None, reason)."""
    cfg = getattr(model, "probekit_config", None)
    if cfg is None:
        return None, "unavailable: not a probekit model (no probekit_config)"
    from probekit.model import build_model

    new_seed = int(cfg.seed) + 1 + 1000 * (int(seed) + 1)
    m = build_model(replace(cfg, seed=new_seed), device=model_device(model))
    m.probekit_name = f"random-init(seed={new_seed})"
    return m, f"build_model(same config, seed={new_seed})"


# ---------------------------------------------------------------------------- figures


def plot_sweep(sweep: ProbeSweep, folder: str | Path, prefix: str = "") -> list[Path]:
    """PNG heatmaps (layer x position, one panel per split) per hook kind, and metric vs split per (hook, layer).

    Files are written to a temporary name and renamed, so no partial figure looks complete.
    """
    from probekit.viz import _plt, in_words, save_figure

    plt = _plt()
    folder = Path(folder)
    paths = []
    metric = sweep.settings.get("metric", "value")
    splits = sweep.labels["split"]
    vals = sweep.values
    vmin = 0.0  # R^2 below 0 (worse than the mean) saturates at the bottom of the scale
    for h, hk in enumerate(sweep.labels["hook"]):
        v = vals[h]  # layer position split
        rows = [i for i in range(v.shape[0]) if not torch.isnan(v[i]).all()]
        fig, axs = plt.subplots(1, len(splits), figsize=(min(24, (0.35 * v.shape[1] + 2) * len(splits)),
                                                          max(2.5, 0.4 * len(rows) + 1.6)), squeeze=False)
        for e, sp in enumerate(splits):
            ax = axs[0, e]
            im = ax.imshow(v[rows][:, :, e].numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=1.0)
            ax.set_yticks(range(len(rows)), [sweep.labels["layer"][i] for i in rows], fontsize=7)
            ax.set_xticks(range(v.shape[1]), sweep.labels["position"], fontsize=7, rotation=90)
            ax.set_xlabel("position (slot)")
            ax.set_ylabel("layer")
            ax.set_title(f"{sp} (len {sweep.settings['splits'][sp]['length']})", fontsize=9)
        fig.colorbar(im, ax=axs[0, -1], fraction=0.046, pad=0.04, label=metric)
        per = "one probe per position" if sweep.settings.get("position_probes") == "per_position" else \
            "one probe for all positions"
        fig.suptitle(f"Probe {metric} for {in_words(sweep.settings.get('feature'))} in the {in_words(hk)}, by layer "
                     f"and position ({per})", fontsize=10)
        fig.tight_layout()
        path = folder / f"{prefix}heatmap_{hk.replace('.', '_')}.png"
        save_figure(fig, path)
        paths.append(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for h, hk in enumerate(sweep.labels["hook"]):
        for L, lk in enumerate(sweep.labels["layer"]):
            v = sweep.values[h, L, 0]
            if not torch.isnan(v).all():
                ax.plot(range(len(splits)), v.numpy(), marker="o", label=f"{in_words(hk)}, layer {lk}")
    rm = sweep.extra.get("random_model")
    if rm is not None and not torch.isnan(rm[:, :, 0]).all():
        ax.plot(range(len(splits)), np.nanmax(rm[:, :, 0].reshape(-1, len(splits)).numpy(), axis=0), "k:",
                label="random model (best)")
    maj = sweep.extra["majority"][:, :, 0].reshape(-1, len(splits))
    ax.plot(range(len(splits)), np.nanmax(maj.numpy(), axis=0), "k--", label="majority")
    ax.set_xticks(range(len(splits)), [f"{s}\n(len {sweep.settings['splits'][s]['length']})" for s in splits])
    ax.set_xlabel("split")
    ax.set_ylabel(metric)
    ax.set_title(f"Probe {metric} for {in_words(sweep.settings.get('feature'))} by length", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = folder / f"{prefix}{metric}_vs_length.png"
    save_figure(fig, path)
    paths.append(path)
    return paths


# ---------------------------------------------------------------------------- length studies (the CLI's job)


def probe_lengths(model, task, feature: str, hooks: str | Sequence[str], train_length: int,
                  test_lengths: Sequence[int], n: int = 2000, n_test: int | None = None, seed: int = 0,
                  **kwargs) -> ProbeSweep:
    """Fit on ``n`` examples of ``train_length``; score on a fresh sample of each of ``test_lengths``.

    Seeds: the training batch uses ``1000 * seed + train_length``, the test batch of length L uses
    ``1000 * seed + 500 + L`` (so a test length equal to the training length is held-out data).
    ``kwargs`` go to `probe_sweep` (``by_position``, ``positions``, ``controls``, ``kind``, ``C``, ...).
    """
    from probekit.evaluate import check_fits

    if not isinstance(n, int) or n <= 0:
        raise ProbekitError(f"n must be a positive integer, got {n!r}")
    n_test = n_test if n_test is not None else max(1, n // 2)
    if n_test <= 0:
        raise ProbekitError(f"n_test must be positive, got {n_test}")
    test_lengths = list(test_lengths)
    if not test_lengths:
        raise ProbekitError("test_lengths is empty; expected at least one length, e.g. [5, 6, 7]")
    for L in [train_length, *test_lengths]:
        check_fits(model, task, L)
    train = task.sample(n, length=train_length, seed=1000 * seed + train_length)
    evals = {str(L): task.sample(n_test, length=L, seed=1000 * seed + 500 + L) for L in dict.fromkeys(test_lengths)}
    sweep = probe_sweep(model, train, feature, hooks, evals=evals, seed=seed, **kwargs)
    for probe in sweep.probes.values():
        probe.meta["train"]["seed"] = 1000 * seed + train_length
    sweep.settings |= {"task": task.spec(), "train_length": train_length, "test_lengths": list(evals),
                       "n": n, "n_test": n_test, "train_seed": 1000 * seed + train_length,
                       "test_seeds": {L: 1000 * seed + 500 + int(L) for L in evals}}
    return sweep


def write_sweep(sweep: ProbeSweep, folder: str | Path, save_probes: bool = False, stem: str = "sweep",
                prefix: str = "") -> list[Path]:
    """``<stem>.json`` + ``<stem>.csv`` + heatmap PNGs named ``<prefix>...`` (+ ``probes/<hook>/`` for the
    pooled probes) into ``folder``.

    Every file is written under a temporary name and renamed, so no partial file looks complete.
    """
    from probekit.io import write_csv, write_text

    folder = Path(folder)
    paths = [write_text(folder / f"{stem}.json", sweep.to_json()), write_csv(folder / f"{stem}.csv", sweep.to_frame())]
    paths += plot_sweep(sweep, folder, prefix=prefix)
    if save_probes:
        for (hook, pos), probe in sweep.probes.items():
            if pos == "all":
                paths.append(probe.save(folder / "probes" / hook, overwrite=True))
    return paths
