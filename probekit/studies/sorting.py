"""A predictive account of the sorting failure: per-step error from the model's own lookup quantities.

The question (what makes an unhinted sorter fail as lists get longer; can the failure be predicted)
is answered as a prediction across a grid of list *compositions* x *lengths*:

1. The heads that select the next value are chosen by causal effect: activation patching of each
   head's output (``z``, all positions, denoising) on a ``successor-change`` corruption at
   ``patch_length`` (the target at the middle step changes, the emitted prefix does not); the
   ``n_heads`` heads with the largest normalised logit-difference restoration are kept (default 4:
   the effect is spread over the heads, no single head restores more than about a third).
2. For every sort step of every list of every cell (teacher forcing: the correct prefix is given),
   from the model's own activations, per chosen head: ``mass`` (attention on the input positions
   holding the target value) and ``margin`` (pre-softmax score of the best such key minus the best
   input key holding another value; temperature included; +``MARGIN_CAP`` when every input holds
   the target value); with ``confusor``, ``cmass`` and ``cmargin``, the same against the *confusor*
   keys, whose selection makes the step's typical error: on a repeat step the next larger value
   (advancing drops a copy), on a new-value step the previous output (repeating writes an extra
   copy). With the step type: ``repeat`` (the target equals the previous output) and
   ``log_copies_left`` (log of the copies of the target value still to write, the target included);
   with ``by_step_type`` every quantity (the copies left included) also enters multiplied by ``repeat``.
3. A logistic regression (scikit-learn, standardised features) of the per-step error (teacher-forced
   argmax != target) is fitted on the steps of the *fit* cells; the predicted error rate of a cell is
   the mean predicted probability over its steps. R^2 of predicted vs observed rate is computed over
   the *held-out* cells (``1 - SS_res / SS_tot``, SS_tot about the held-out mean), with a percentile
   bootstrap interval that resamples the lists inside each held-out cell (the fitted model fixed:
   the interval is the sampling uncertainty of the held-out cells, not of the fit). With the same
   resamples: the per-step AUC of the held-out steps (does the predicted probability rank the error
   steps above the correct ones; the statistic for errors too rare for a rate to vary between cells)
   and the *fold error* ``max(o / p, p / o)`` of the observed and predicted error counts summed over
   the held-out cells longer than ``train_length`` (lengths the model never trained on).

The lookup by length (`lookup_by_length`) reads the same per-step quantities on fresh lists of one
composition at several lengths, averaged over the chosen heads and each list's steps: the score
margin and the attention mass on the target, and the teacher-forced error, also split by whether the
target sits at an input index the training lists reached (below ``train_length``) or not. It is what
`failure_study` compares between the sorters that fail and the one that extrapolates.

Compositions: ``distinct`` (no value twice), ``dense`` (distinct values forming a run of L consecutive
values, every gap between sorted neighbours 1), ``copies2`` / ``copies3`` (ceil(L/k) distinct values,
k copies each, the last value truncated when k does not divide L), ``uniform`` (independent uniform
draws from the task's values, as in training). Splits: ``checkerboard`` (cell (i, j) of composition
i and length j is held out when i + j is odd: every length and composition on both sides) or
``long`` (the two longest lengths held out: extrapolation in length).

Greedy exact match (no teacher forcing) is reported per cell beside the teacher-forced rates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from probekit.tasks.base import Batch, ProbekitError

COMPOSITIONS = ("distinct", "copies2", "copies3", "uniform")
DISTINCT_COMPOSITIONS = ("distinct", "dense")  # the compositions of a sorter trained without repeats
SPLITS = ("checkerboard", "long")
SIZES = {"quick": {"n": 40, "lengths": (6, 10, 14), "patch_n": 60, "n_boot": 200},
         "default": {"n": 150, "lengths": (10, 20, 30, 40, 60), "patch_n": 200, "n_boot": 1000}}
MARGIN_CAP = 30.0


# ---------------------------------------------------------------------------- the grid


def composition_inputs(n_values: int, composition: str, n: int, length: int, seed) -> np.ndarray:
    """``[n, length]`` input lists of one composition (module docstring), deterministic given ``seed``."""
    rng = np.random.default_rng(seed)
    if composition == "uniform":
        return rng.integers(0, n_values, size=(n, length))
    if composition == "dense":
        if length > n_values:
            raise ProbekitError(f"composition 'dense' at length {length} needs {length} values but the task has "
                                f"{n_values}; use shorter lengths")
        run = rng.integers(0, n_values - length + 1, size=(n, 1)) + np.arange(length)
        return np.take_along_axis(run, np.argsort(rng.random((n, length)), axis=1), axis=1)
    if composition == "distinct":
        k = 1
    elif composition in ("copies2", "copies3"):
        k = int(composition[-1])
    else:
        raise ProbekitError(f"unknown composition {composition!r}; expected one of {list(COMPOSITIONS)}")
    m = math.ceil(length / k)
    if m > n_values:
        raise ProbekitError(f"composition {composition!r} at length {length} needs {m} distinct values but the task "
                            f"has {n_values}; use shorter lengths")
    vals = np.argsort(rng.random((n, n_values)), axis=1)[:, :m]  # m distinct values per row
    multiset = np.repeat(vals, k, axis=1)[:, :length]
    return np.take_along_axis(multiset, np.argsort(rng.random((n, length)), axis=1), axis=1)


def split_of(i_comp: int, i_len: int, n_lengths: int, split: str) -> str:
    """"fit" or "held-out" for the cell of composition ``i_comp`` and length ``i_len`` (module docstring)."""
    if split == "checkerboard":
        return "held-out" if (i_comp + i_len) % 2 else "fit"
    if split == "long":
        return "held-out" if i_len >= n_lengths - 2 else "fit"
    raise ProbekitError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


# ---------------------------------------------------------------------------- heads by causal effect


def choose_heads(model, task, n_heads: int = 2, length: int = 20, n: int = 200, seed: int = 0) -> list[dict]:
    """The ``n_heads`` heads whose output restores most of the logit difference under ``successor-change``
    (denoising, normalised: 0 = corrupted, 1 = clean), with every head's effect for the record."""
    from probekit.corruptions import corrupt
    from probekit.patching import sweep

    pair = corrupt(task, task.sample(n, length=length, seed=seed), "successor-change", seed=seed)
    res = sweep(model, pair, site="z", by_pos=False, metric="logit-diff", direction="denoise")
    eff = res.values  # layer head
    order = torch.argsort(eff.flatten(), descending=True).tolist()
    nh = eff.shape[1]
    ranked = [{"layer": i // nh, "head": i % nh, "label": f"L{i // nh}H{i % nh}", "effect": float(eff.flatten()[i])}
              for i in order]
    for i, r in enumerate(ranked):
        r["chosen"] = i < n_heads
    return ranked


# ---------------------------------------------------------------------------- per-step quantities


def _scores(model, tokens: torch.Tensor, layers: list[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Pre-softmax scores ``{layer: [rows, head, pos, key_pos]}`` (scale and temperature applied, no mask) and
    the logits, from one recording forward."""
    from probekit.forward import native, record_sites, rope

    nat = native(model)
    sites = [(s, L) for L in layers for s in ("q", "kr")]
    acts, logits = record_sites(nat, tokens, None, sites)
    pos = torch.arange(tokens.shape[1])
    out = {}
    for L in layers:
        a = nat.layers[L].attn
        q = rope(a, acts["q", L].transpose(1, 2), pos)  # rows head pos d_head
        s = torch.matmul(q, acts["kr", L].transpose(-2, -1)) / a.scale
        if a.log_temperature:
            s = s * torch.log(pos.to(s.dtype) + 2.0)[:, None]
        out[L] = s
    return out, logits


def _confusor(inputs: torch.Tensor, target: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """``[rows, step, L]`` the input keys whose selection makes the step's typical error: on a repeat step
    the next larger value (advancing drops a copy), on a new-value step the previous output (an extra copy)."""
    above = torch.where(inputs[:, None, :] > target[:, :, None], inputs[:, None, :], torch.iinfo(inputs.dtype).max)
    nxt = above.amin(-1)  # rows step; max int where target is the largest value
    conf = torch.where(prev == target, nxt, prev)  # prev = -1 at step 0: no confusor
    return inputs[:, None, :] == conf[:, :, None]


def _head_quantities(s: torch.Tensor, A: torch.Tensor, keys: torch.Tensor, correct: torch.Tensor) -> tuple:
    """Attention mass on ``keys`` and the score margin of the best correct key over the best of ``keys``."""
    best_ok = s.masked_fill(~correct, float("-inf")).amax(-1)
    best_bad = s.masked_fill(~keys, float("-inf")).amax(-1)
    margin = torch.where(torch.isinf(best_bad), MARGIN_CAP, (best_ok - best_bad).clamp(-MARGIN_CAP, MARGIN_CAP))
    return (A * keys).sum(-1).numpy(), margin.numpy()


@torch.no_grad()
def step_quantities(model, batch: Batch, heads: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Per sort step (rows x steps, flattened): ``error`` (teacher-forced), ``row``, ``repeat``,
    ``log_copies_left``, ``target_index`` (the input index of the target's copy in the stable order) and, per
    head ``LxHy``: ``mass_LxHy`` / ``margin_LxHy`` (target value against every other value), ``cmass_LxHy`` /
    ``cmargin_LxHy`` (against the confusor, `_confusor`), ``chance_LxHy``."""
    L_in, p0 = batch.length, 1  # input element i sits at token position 1 + i
    pp = torch.nonzero(batch.pred_mask[0]).flatten()  # predicting positions, one per step
    scores, logits = _scores(model, batch.tokens, sorted({L for L, _ in heads}))
    target = batch.feature("target")[:, pp]  # rows step
    prev = batch.feature("prev_output")[:, pp]
    inputs = batch.tokens[:, p0:p0 + L_in]  # rows L
    correct = inputs[:, None, :] == target[:, :, None]  # rows step L
    confusor = _confusor(inputs, target, prev)
    out = {"error": (logits[:, pp].argmax(-1) != target).numpy(),
           "row": np.broadcast_to(np.arange(batch.n)[:, None], target.shape),
           "repeat": (prev == target).numpy().astype(float),
           "log_copies_left": np.log(batch.feature("copies_left")[:, pp].float().numpy()),
           "target_index": (batch.feature("target_src_pos")[:, pp] - p0).numpy()}
    causal = torch.arange(batch.seq_len)[None, :] > pp[:, None]
    for L, h in heads:
        full = scores[L][:, h][:, pp]  # rows step key_pos
        A = torch.softmax(full.masked_fill(causal, float("-inf")), -1)[:, :, p0:p0 + L_in]
        s = full[:, :, p0:p0 + L_in]  # input keys are visible to every step
        lab = f"L{L}H{h}"
        out[f"mass_{lab}"] = (A * correct).sum(-1).numpy()
        out[f"margin_{lab}"] = _head_quantities(s, A, ~correct, correct)[1]
        out[f"cmass_{lab}"], out[f"cmargin_{lab}"] = _head_quantities(s, A, confusor, correct)
        out[f"chance_{lab}"] = (correct.sum(-1).float() / (pp[None, :] + 1).float()).numpy()
    return {k: np.ascontiguousarray(v).reshape(-1) for k, v in out.items()}


def feature_names(heads: list[tuple[int, int]], confusor: bool = True) -> list[str]:
    """The per-step quantities used as regressors (before the step-type interactions, `design`)."""
    kinds = ("mass", "margin", "cmass", "cmargin") if confusor else ("mass", "margin")
    return [f"{q}_L{L}H{h}" for L, h in heads for q in kinds] + ["repeat", "log_copies_left"]


def design(q: dict[str, np.ndarray], names: list[str], by_step_type: bool) -> tuple[np.ndarray, list[str]]:
    """The regression matrix: the quantities, plus each of them (but ``repeat``) times ``repeat`` when
    ``by_step_type`` (a repeat step and a new-value step use the lookup, and the copies left, differently)."""
    cols, labels = [q[k] for k in names], list(names)
    if by_step_type:
        inter = [k for k in names if k != "repeat"]
        cols += [q[k] * q["repeat"] for k in inter]
        labels += [f"{k}*repeat" for k in inter]
    return np.column_stack(cols), labels


# ---------------------------------------------------------------------------- fit and score


def r_squared(observed, predicted) -> float:
    """``1 - SS_res / SS_tot`` (SS_tot about the mean of ``observed``); NaN when ``observed`` is constant."""
    o, p = np.asarray(observed, dtype=float), np.asarray(predicted, dtype=float)
    ss_tot = float(((o - o.mean()) ** 2).sum())
    return float("nan") if ss_tot == 0 else 1.0 - float(((o - p) ** 2).sum()) / ss_tot


def fit_error_model(X: np.ndarray, y: np.ndarray):
    """Logistic regression of per-step error on standardised quantities (scikit-learn pipeline)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y)) < 2:
        raise ProbekitError(f"the fit cells have only {'errors' if y.all() else 'correct steps'} ({y.size} steps); "
                            "expected both, to fit an error model: use longer lengths or more lists")
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(X, y)


def _bootstrap_held(held: list[dict], beyond: list[int], n_boot: int, seed: int) -> dict:
    """Percentile intervals of the held-out R^2, per-step AUC and fold error (`_fold`, over the held-out cells
    numbered ``beyond``), resampling the lists inside each held-out cell (the same resamples for all three)."""
    from probekit.stats import auc

    rng = np.random.default_rng(seed)
    r2, fold, counts = [], [], []
    for _ in range(n_boot):
        obs, pred, cnt = [], [], []
        for c in held:
            pick = rng.integers(0, c["n_lists"], size=c["n_lists"])
            obs.append(c["_err_by_row"][pick].sum() / c["_steps_by_row"][pick].sum())
            pred.append(c["_pred_by_row"][pick].sum() / c["_steps_by_row"][pick].sum())
            cnt.append(np.bincount(pick, minlength=c["n_lists"]))
        r2.append(r_squared(obs, pred))
        fold.append(_fold([held[i] for i in beyond], [cnt[i] for i in beyond]))
        counts.append(cnt)
    p, y = np.concatenate([c["_p"] for c in held]), np.concatenate([c["_q"]["error"] for c in held])
    aucs = []
    for b0 in range(0, n_boot, 100):  # one weight row per resample: each step weighs as often as its list was drawn
        W = np.concatenate([np.stack([cn[i] for cn in counts[b0:b0 + 100]])[:, c["_q"]["row"]]
                            for i, c in enumerate(held)], axis=1)
        aucs.append(auc(p, y, W.astype(np.float32)))
    return {"r2_ci95": _quantiles(r2), "auc_ci95": _quantiles(np.concatenate(aucs)), "fold_ci95": _quantiles(fold)}


def _fold(cells: list[dict], counts: list | None = None) -> float:
    """How far the predicted error count of ``cells`` is from the observed one, as a factor (>= 1; 1 = equal):
    ``max(o / p, p / o)`` with ``o`` / ``p`` the observed / predicted errors summed over the cells' lists
    (each list weighted by its ``counts``, default 1); inf when no error is observed; NaN without cells."""
    if not cells:
        return float("nan")
    counts = counts or [np.ones(c["n_lists"]) for c in cells]
    o = sum(float(w @ c["_err_by_row"]) for c, w in zip(cells, counts, strict=True))
    p = sum(float(w @ c["_pred_by_row"]) for c, w in zip(cells, counts, strict=True))
    return float("inf") if o == 0 else max(o / p, p / o)


def _quantiles(vals) -> tuple[float, float]:
    """The 95 % percentile interval of the values that are not NaN; with an infinite value (a fold error without
    an observed error) the quantiles are sample values, not interpolated."""
    v = np.asarray(vals, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    method = "linear" if np.isfinite(v).all() else "inverted_cdf"
    return tuple(float(x) for x in np.quantile(v, [0.025, 0.975], method=method))


# ---------------------------------------------------------------------------- the study


def _measure_cell(model, task, heads, composition: str, length: int, n: int, seed) -> dict:
    """Per-step quantities and greedy exact match of one grid cell."""
    from probekit.evaluate import greedy_decode, wilson

    x = composition_inputs(task.n_values, composition, n, length, seed)
    batch = task.with_objective("sort").batch_from_inputs(x)
    q = step_quantities(model, batch, heads)
    pred = greedy_decode(model, batch)
    k = int(((pred == batch.tokens) | ~batch.answer_mask).all(1).sum())
    return {"composition": composition, "length": length, "n_lists": n, "n_steps": int(q["error"].size),
            "exact_match": k / n, "exact_match_ci95": list(wilson(k, n)), "_q": q}


def _attention_rows(cell: dict, heads) -> list[dict]:
    """Chance-normalised attention on the target value per step type (repeat / new) for each chosen head;
    intervals resample whole lists (the steps of one list are not independent)."""
    from probekit.stats import bootstrap_ci

    q = cell["_q"]
    out = []
    types = np.where(q["repeat"] > 0, "repeat", "new")
    for L, h in heads:
        lab = f"L{L}H{h}"
        for t in ("new", "repeat"):
            sel = types == t
            if sel.sum() < 2:
                continue
            ratio = q[f"mass_{lab}"][sel] / q[f"chance_{lab}"][sel]
            est, lo, hi = bootstrap_ci(ratio, n_boot=200, seed=0, groups=q["row"][sel])  # resample lists
            out.append({"composition": cell["composition"], "length": cell["length"], "head": lab, "step_type": t,
                        "n_steps": int(sel.sum()), "mass": float(q[f"mass_{lab}"][sel].mean()),
                        "chance": float(q[f"chance_{lab}"][sel].mean()), "ratio": est, "ratio_ci95": [lo, hi]})
    return out


def _score_cells(cells: list[dict], names: list[str], by_step_type: bool, clf) -> None:
    """Observed and predicted per-cell error rates (and per-row sums for the bootstrap), in place."""
    for c in cells:
        q = c["_q"]
        p = clf.predict_proba(design(q, names, by_step_type)[0])[:, 1]
        rows = q["row"]
        c["_err_by_row"] = np.bincount(rows, weights=q["error"].astype(float), minlength=c["n_lists"])
        c["_pred_by_row"] = np.bincount(rows, weights=p, minlength=c["n_lists"])
        c["_steps_by_row"] = np.bincount(rows, minlength=c["n_lists"]).astype(float)
        c["_p"] = p
        c["observed"] = float(q["error"].mean())
        c["predicted"] = float(p.mean())
        rep = q["repeat"] > 0
        c["observed_repeat"] = float(q["error"][rep].mean()) if rep.any() else float("nan")
        c["observed_new"] = float(q["error"][~rep].mean()) if (~rep).any() else float("nan")
        c["repeat_share"] = float(rep.mean())


def sorting_failure(model, task, size: str = "default", *, split: str = "checkerboard", n_heads: int = 4,
                    heads=None, lengths=None, n: int | None = None, compositions=COMPOSITIONS,
                    patch_length: int | None = None, confusor: bool = True, by_step_type: bool = True,
                    control: bool = False, train_length: int | None = None, seed: int = 0) -> SortingFailureResult:
    """The predictive account (module docstring). ``heads`` (list of (layer, head)) skips the patching choice.
    ``control``: also fit the error model without any head quantity (the step type and the copies left only) on
    the same cells, and keep its R^2 (and ``held_out`` numbers) in ``result.control``. ``train_length``: the
    longest list the model was trained on (default the task's default length); ``result.held_out["fold"]`` is
    taken over the held-out cells longer than it."""
    if size not in SIZES:
        raise ProbekitError(f"size {size!r}; expected one of {list(SIZES)}")
    from probekit.corruptions import corruption_kinds

    needs = ("n_values", "batch_from_inputs", "with_objective")
    if not all(hasattr(task, a) for a in needs) or "successor-change" not in corruption_kinds(task):
        raise ProbekitError(f"sorting_failure needs a sorting task (lists of n_values values, the 'sort' objective and "
                            f"the 'successor-change' corruption), got {getattr(task, 'name', task)!r}")
    cfg = SIZES[size]
    lengths = tuple(lengths or cfg["lengths"])
    n = int(n or cfg["n"])
    if len(lengths) < 2 or len(compositions) < 1:
        raise ProbekitError(f"lengths {lengths} and compositions {compositions}; "
                            "expected >= 2 lengths and >= 1 composition")
    split_of(0, 0, len(lengths), split)  # refuses an unknown split before any work
    plen = patch_length or min(task.default_length, max(lengths))
    ranked = choose_heads(model, task, n_heads, plen, cfg["patch_n"], seed) if heads is None else \
        [{"layer": L, "head": h, "label": f"L{L}H{h}", "effect": None, "chosen": True} for L, h in heads]
    chosen = [(r["layer"], r["head"]) for r in ranked if r["chosen"]]
    cells = []
    for i, comp in enumerate(compositions):
        for j, L in enumerate(lengths):
            c = _measure_cell(model, task, chosen, comp, L, n, [seed, i, L])
            c["split"] = split_of(i, j, len(lengths), split)
            cells.append(c)
    tl = int(train_length or task.default_length)
    main = _fit_and_score(cells, feature_names(chosen, confusor), by_step_type, cfg["n_boot"], seed, tl)
    ctrl = {}
    if control:  # the same cells, no head quantity: the step type and the copies left only
        fc = _fit_and_score([dict(c) for c in cells], feature_names([], confusor), by_step_type, cfg["n_boot"], seed,
                            tl)
        ctrl = {k: fc[k] for k in ("features", "r2", "r2_ci95", "r2_fit")} | _held_numbers(fc)
    settings = {"model": getattr(model, "probekit_name", None), "size": size, "split": split, "lengths": list(lengths),
                "compositions": list(compositions), "n_per_cell": n, "patch_length": plen, "seed": seed,
                "features": main["features"], "confusor": confusor, "by_step_type": by_step_type,
                "margin_cap": MARGIN_CAP, "n_boot": cfg["n_boot"], "train_length": tl}
    return _result(cells, main, ranked, chosen, settings, ctrl)


def _held_numbers(fs: dict) -> dict:
    return {k: fs[k] for k in ("auc", "auc_ci95", "fold", "fold_ci95", "fold_cells")}


def _result(cells, main: dict, ranked, chosen, settings: dict, ctrl: dict) -> SortingFailureResult:
    lr = main["clf"][-1]
    return SortingFailureResult(
        cells=[{k: v for k, v in c.items() if not k.startswith("_")} for c in cells],
        r2=main["r2"], r2_ci95=main["r2_ci95"], r2_fit=main["r2_fit"],
        coefficients=dict(zip(main["features"], (float(v) for v in lr.coef_[0]), strict=True)),
        intercept=float(lr.intercept_[0]), heads=ranked, attention=[row for c in cells for row in _attention_rows(c, chosen)],
        settings=settings, control=ctrl, held_out=_held_numbers(main))


def _fit_and_score(cells: list[dict], names: list[str], by_step_type: bool, n_boot: int, seed: int,
                   train_length: int) -> dict:
    """Fit the error model on the fit cells, score every cell in place (`_score_cells`); held-out R^2, per-step
    AUC and the fold error of the held-out cells longer than ``train_length``, with their bootstrap intervals
    (`_bootstrap_held`), and fit-cell R^2."""
    from probekit.stats import auc

    fit = [c for c in cells if c["split"] == "fit"]
    held = [c for c in cells if c["split"] == "held-out"]
    X = np.concatenate([design(c["_q"], names, by_step_type)[0] for c in fit])
    clf = fit_error_model(X, np.concatenate([c["_q"]["error"] for c in fit]).astype(int))
    _score_cells(cells, names, by_step_type, clf)
    beyond = [i for i, c in enumerate(held) if c["length"] > train_length]
    return {"clf": clf, "features": design(cells[0]["_q"], names, by_step_type)[1],
            "r2": r_squared([c["observed"] for c in held], [c["predicted"] for c in held]),
            "auc": auc(np.concatenate([c["_p"] for c in held]), np.concatenate([c["_q"]["error"] for c in held])),
            "fold": _fold([held[i] for i in beyond]), "fold_cells": [held[i]["length"] for i in beyond],
            **_bootstrap_held(held, beyond, n_boot, seed),
            "r2_fit": r_squared([c["observed"] for c in fit], [c["predicted"] for c in fit])}


# ---------------------------------------------------------------------------- the result


@dataclass
class SortingFailureResult:
    """Per-cell table, held-out R^2 with its interval, fitted coefficients, the heads and their effects;
    ``held_out``: the per-step ``auc`` of the held-out steps and the ``fold`` error of the held-out cells longer than
    the training length (``fold_cells``: their lengths), each with its interval; with ``control``
    (`sorting_failure`), the control's ``features``, ``r2``, ``r2_ci95``, ``r2_fit`` and the same numbers."""

    cells: list[dict]
    r2: float
    r2_ci95: tuple[float, float]
    r2_fit: float
    coefficients: dict[str, float]
    intercept: float
    heads: list[dict]
    attention: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    control: dict = field(default_factory=dict)
    held_out: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["r2_ci95"] = list(self.r2_ci95)
        return d

    def verdict(self, command: str, threshold: float = 0.8):
        """The `probekit.stats.Verdict` of "held-out R^2 >= threshold" (stated before measuring) from the interval."""
        from probekit.stats import Hypothesis, judge

        h = Hypothesis("the per-step lookup quantities predict the per-cell error rate of held-out cells",
                       "held-out R^2", ">=", threshold)
        n_held = sum(c["split"] == "held-out" for c in self.cells)
        return judge(h, self.r2, self.r2_ci95, command, baseline={"r2_fit_cells": self.r2_fit}, n=n_held)

    def to_json(self, path=None) -> str:
        from probekit.io import dumps_json, write_text

        s = dumps_json(self.to_dict())
        if path is not None:
            write_text(path, s)
        return s

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.cells)


# ---------------------------------------------------------------------------- the lookup by length


LOOKUP = {"quick": {"n": 40, "lengths": (20, 40), "n_boot": 200},
          "default": {"n": 150, "lengths": (20, 40, 60, 80, 100), "n_boot": 1000}}
LOOKUP_QUANTITIES = ("margin", "mass", "error", "error_within", "error_beyond")


@dataclass
class LookupByLength:
    """The selecting heads' lookup on lists of one composition, by length (`lookup_by_length`). ``rows``: one per
    length, ``margin`` / ``mass`` / ``error`` with ``*_lo`` / ``*_hi`` (95 % bootstrap over lists); ``per_list``:
    ``{length: {quantity: array}}``, each list's mean over its steps of `LOOKUP_QUANTITIES`: ``margin`` and
    ``mass`` also averaged over the heads, ``error`` the teacher-forced error rate, ``error_within`` /
    ``error_beyond`` its rate on the steps whose target sits at an input index below / at or above
    ``train_length`` (NaN for a list without such steps)."""

    model: str | None
    heads: list[str]
    composition: str
    train_length: int
    rows: list[dict]
    per_list: dict
    n_boot: int = 1000

    def change(self, quantity: str, short: int, long: int, n_boot: int = 1000, seed: int = 0) -> tuple:
        """``(mean at long - mean at short, lo, hi)`` over lists, a two-sample bootstrap (the lists differ)."""
        from probekit.stats import two_sample_bootstrap

        return two_sample_bootstrap(self.per_list[long][quantity], self.per_list[short][quantity], n_boot=n_boot,
                                    seed=seed)

    def position_gap(self, length: int, n_boot: int = 1000, seed: int = 0) -> tuple:
        """``(error_beyond - error_within, lo, hi)`` at ``length``, a paired bootstrap over lists.

        The mean over the lists that have steps of both kinds; refused when fewer than 2 have."""
        from probekit.stats import paired_bootstrap

        a, b = self.per_list[length]["error_beyond"], self.per_list[length]["error_within"]
        ok = ~(np.isnan(a) | np.isnan(b))
        if ok.sum() < 2:
            raise ProbekitError(f"length {length}: {int(ok.sum())} lists hold steps on both sides of input index "
                                f"{self.train_length}; expected lists longer than the training length")
        return paired_bootstrap(a[ok], b[ok], n_boot=n_boot, seed=seed)


def kept_share_contrast(a: LookupByLength, b: LookupByLength, short: int, long: int, quantity: str = "mass",
                        n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """``(ratio, lo, hi)``: how much more of ``quantity`` model ``a`` keeps from ``short`` to ``long`` than model
    ``b``: ``(a_long / a_short) / (b_long / b_short)`` of the means over lists (1 = the same share kept), with a
    two-sample bootstrap that resamples each model's lists (both lengths pooled)."""
    from probekit.stats import two_sample_bootstrap

    def rows(lk):
        v = [lk.per_list[L][quantity] for L in (short, long)]
        return np.column_stack([np.concatenate(v), np.repeat([0.0, 1.0], [len(v[0]), len(v[1])])])

    def log_kept(r):
        at = r[:, 1] > 0
        return float(np.log(r[at, 0].mean()) - np.log(r[~at, 0].mean())) if at.any() and (~at).any() else np.nan

    d, lo, hi = two_sample_bootstrap(rows(a), rows(b), log_kept, n_boot=n_boot, seed=seed)
    return float(np.exp(d)), float(np.exp(lo)), float(np.exp(hi))


def per_list_means(q: dict[str, np.ndarray], heads, n: int, train_length: int) -> dict[str, np.ndarray]:
    """Each of the ``n`` lists' mean over its steps of `LOOKUP_QUANTITIES` (see `LookupByLength`), from the
    per-step quantities ``q`` of `step_quantities` for ``heads``."""
    rows = q["row"]

    def mean(v, sel=None):
        sel = np.ones(v.size, bool) if sel is None else sel
        k = np.bincount(rows[sel], minlength=n).astype(float)
        with np.errstate(invalid="ignore"):
            return np.bincount(rows[sel], weights=v[sel], minlength=n) / k

    labs = [f"L{L}H{h}" for L, h in heads]
    err = q["error"].astype(float)
    within = q["target_index"] < train_length
    return {"margin": mean(np.mean([q[f"margin_{x}"] for x in labs], 0)),
            "mass": mean(np.mean([q[f"mass_{x}"] for x in labs], 0)),
            "error": mean(err), "error_within": mean(err, within), "error_beyond": mean(err, ~within)}


@torch.no_grad()
def lookup_by_length(model, task, heads: list[tuple[int, int]], size: str = "default", *, lengths=None,
                     n: int | None = None, composition: str = "distinct", train_length: int | None = None,
                     seed: int = 0) -> LookupByLength:
    """Score margin and attention mass of the ``heads`` on the target value (`step_quantities`, teacher forcing)
    and the per-step error, on fresh lists of ``composition`` at each length (default: `LOOKUP` of ``size``, those
    the task's values allow); ``train_length``: the longest training list (default the task's default length)."""
    from probekit.stats import bootstrap_ci

    if size not in LOOKUP or not heads:
        raise ProbekitError(f"size {size!r} and heads {heads}; expected one of {list(LOOKUP)} and >= 1 (layer, head)")
    cfg = LOOKUP[size]
    lengths = [L for L in (lengths or cfg["lengths"]) if L <= task.n_values]
    if len(lengths) < 2:
        raise ProbekitError(f"{len(lengths)} lengths fit {task.n_values} values; expected >= 2 lengths")
    n, tl = int(n or cfg["n"]), int(train_length or task.default_length)
    per_list, rows = {}, []
    for L in lengths:
        x = composition_inputs(task.n_values, composition, n, L, [seed, 100, L])  # not the grid's lists
        per_list[L] = per_list_means(step_quantities(model, task.with_objective("sort").batch_from_inputs(x), heads),
                                heads, n, tl)
        row = {"model": getattr(model, "probekit_name", None), "length": L, "n_lists": n}
        for k in ("margin", "mass", "error"):
            row[k], row[f"{k}_lo"], row[f"{k}_hi"] = bootstrap_ci(per_list[L][k], n_boot=cfg["n_boot"], seed=seed)
        rows.append(row)
    return LookupByLength(getattr(model, "probekit_name", None), [f"L{L}H{h}" for L, h in heads], composition, tl,
                          rows, per_list, cfg["n_boot"])


# ---------------------------------------------------------------------------- the study of the report


EXTRAPOLATING = ("sort-extrap", "sort-extrap-learned-pos")
EXTRAP_GRID = {"lengths": (20, 40, 60, 80, 100), "n": 300}


def failure_study(models: tuple[str, ...] = ("sort-baseline", "sort-baseline-temp"), size: str = "default",
                  seed: int = 0, extrapolating: tuple[str, ...] = EXTRAPOLATING):
    """The predictive account as a `probekit.studies.Study`: for each of ``models``, `sorting_failure` (4 heads
    chosen by patching, checkerboard split) with its control on the same cells (no head quantity: the step type
    and the copies left only); the hypothesis "held-out R^2 >= 0.8" judged from its interval, the control's R^2 as
    the baseline. Then the same instruments on the ``extrapolating`` sorters (trained without repeats: the grid of
    `DISTINCT_COMPOSITIONS` x `EXTRAP_GRID`) and what differs, as hypotheses: the selecting heads' score margin
    and attention mass by length (`lookup_by_length`, distinct lists, every model), the account's held-out AUC
    and its fold error at lengths never trained on, and, for learned positions, where the errors sit.
    ``size`` "quick" runs this module's quick grid on the first model and the lookup of the first extrapolating
    one only; "default" and "full" the default grids."""
    from probekit.model import shipped_models
    from probekit.studies.common import _begin, _load, _size

    _size(size)
    st, have, cmd = _begin("failure", "Why the unhinted sorter fails with length: a predictive account", models, size)
    extra = [m for m in extrapolating if m in shipped_models()]
    if size == "quick" and (len(have) > 1 or len(extra) > 1):
        st.notes.append(f"quick size: only {have[:1]} and the lookup of {extra[:1]} (the rest at --size default)")
        have, extra = have[:1], extra[:1]
    grid = "quick" if size == "quick" else "default"
    results, lookups = {}, {}
    for name in have:
        model, task, conf = _load(name)
        tl = _train_length(conf, task)
        results[name] = sorting_failure(model, task, size=grid, control=True, train_length=tl, seed=seed)
        _failure_record(st, name, results[name], cmd)
        lookups[name] = lookup_by_length(model, task, _chosen(results[name].heads), grid, train_length=tl, seed=seed)
    if results:
        _failure_figures(st, results)
    extrap, learned = _extrapolation_stage(st, extra, grid, seed, cmd, lookups)
    _contrast_record(st, lookups, extrap, results, learned, cmd)
    if results and seed == 0 and size != "quick":  # the caveat goes with the first claim it qualifies
        st.headline[0] += (" With seed 0 these are the lists on which the error model's features were chosen, so this "
                           "held-out R^2 is not a clean test; seed 1 draws fresh lists and pairs (--seed 1; "
                           "docs/sorting_failure.md reports both).")
    return st


def _train_length(conf: dict, task) -> int:
    """The longest list a model was trained on (its config's ``train.lengths``), else the task's default length."""
    lengths = (conf.get("train") or {}).get("lengths")
    return int(lengths[-1]) if lengths else int(task.default_length)


def _chosen(ranked: list[dict]) -> list[tuple[int, int]]:
    return [(r["layer"], r["head"]) for r in ranked if r["chosen"]]


def _extrapolation_stage(st, names: list[str], grid: str, seed: int, cmd: str, lookups: dict) -> tuple[dict, list]:
    """The account (`sorting_failure` on `DISTINCT_COMPOSITIONS` x `EXTRAP_GRID`; not at quick size, where these
    sorters make no error to fit) and `lookup_by_length` of each extrapolating sorter; returns the accounts and
    the names of the models with learned positions."""
    from probekit.studies.common import _load

    out, learned, vocab = {}, [], set()
    for name in names:
        model, task, conf = _load(name)
        tl, _ = _train_length(conf, task), vocab.add(task.n_values)
        if conf["model"].get("positional") == "learned":
            learned.append(name)
        heads = None
        if grid != "quick":
            try:
                out[name] = sorting_failure(model, task, "default", compositions=DISTINCT_COMPOSITIONS, control=True,
                                            lengths=EXTRAP_GRID["lengths"], n=EXTRAP_GRID["n"], train_length=tl,
                                            seed=seed)
                _failure_record(st, name, out[name], cmd)
                heads = _chosen(out[name].heads)
            except ProbekitError as e:  # an error model needs errors in the fit cells
                st.notes.append(f"{name}: no account fitted ({e})")
        if heads is None:
            heads = _chosen(choose_heads(model, task, 4, tl, SIZES[grid]["patch_n"], seed))
        lookups[name] = lookup_by_length(model, task, heads, grid, train_length=tl, seed=seed)
    if names:
        st.notes.append(
            f"{', '.join(names)}: trained on lists without repeats, from {'/'.join(map(str, sorted(vocab)))} values; "
            "the compositions with "
            "repeats (copies2, copies3, uniform draws) ask for the repeat-or-advance decision these sorters never "
            "learned, so their grid holds the two compositions of distinct values: distinct (no value twice) and "
            "dense (a run of consecutive values, every gap 1, as in the training windows). The lookup comparison "
            "uses distinct lists in every model, at the lengths its values allow (a 64-value sorter's longest "
            "distinct list in the default grid is 60).")
    return out, learned


MARGIN_DROP = 1.0  # a fall of 1 in score: the target's attention odds against its best rival fall by a factor e
FOLD_MAX = 2.0  # the account's predicted error count within a factor 2 of the observed one


def _contrast_record(st, lookups: dict, extrap: dict, base: dict, learned: list[str], cmd: str) -> None:
    """What differs between the extrapolating sorters and the others: the hypotheses, the lookup table and the two
    figures of the extrapolation stage."""
    if not lookups:
        return
    _margin_verdicts(st, lookups, cmd)
    nope = [m for m in lookups if m not in base and m not in learned]
    for b in base:
        if nope:
            _kept_verdict(st, lookups[nope[0]], lookups[b], cmd)
    for name, res in extrap.items():
        _account_verdicts(st, name, res, next(iter(base.values()), None), cmd)
    for name in learned:
        _position_verdict(st, lookups[name], lookups.get(nope[0]) if nope else None, cmd)
    st.tables["lookup by length (distinct lists)"] = [
        {k: r[k] for k in ("model", "length", "n_lists", "margin", "margin_lo", "margin_hi", "mass", "mass_lo",
                           "mass_hi", "error")} for lk in lookups.values() for r in lk.rows]
    _extrapolation_figures(st, lookups, extrap)


def _ends(lk: LookupByLength, other: LookupByLength | None = None) -> tuple[int, int]:
    """The training length (or the shortest measured) and the longest length measured (in both lookups)."""
    ls = set(lk.per_list) & (set(other.per_list) if other else set(lk.per_list))
    return (lk.train_length if lk.train_length in ls else min(ls)), max(ls)


def _margin_verdicts(st, lookups: dict, cmd: str) -> None:
    from probekit.stats import Hypothesis

    parts = []
    for name, lk in lookups.items():
        s, L = _ends(lk)
        d, lo, hi = lk.change("margin", s, L, n_boot=lk.n_boot)
        m = {r["length"]: r["margin"] for r in lk.rows}
        v = st.test(Hypothesis(f"{name}: the selecting heads' score margin on the target holds up from length {s} to "
                               f"{L} (distinct lists; {', '.join(lk.heads)})",
                               f"change in mean margin, length {L} minus {s}", ">=", -MARGIN_DROP),
                    d, (lo, hi), cmd, baseline={f"margin at {s}": m[s], f"margin at {L}": m[L]},
                    n=2 * len(lk.per_list[L]["margin"]))
        parts.append(f"{name} {d:+.2f} [{lo:+.2f}, {hi:+.2f}] ({s} to {L}: {v.verdict})")
    st.headline.append("Score margin of the selecting heads (best target key minus best other key, temperature "
                       f"included) on distinct lists, and whether it holds up (falls by less than {MARGIN_DROP:g}): "
                       + "; ".join(parts) + ".")


def _kept_verdict(st, a: LookupByLength, b: LookupByLength, cmd: str) -> None:
    from probekit.stats import Hypothesis

    s, L = _ends(a, b)
    r, lo, hi = kept_share_contrast(a, b, s, L, n_boot=a.n_boot)
    kept = {f"{x.model} kept share": float(x.per_list[L]["mass"].mean() / x.per_list[s]["mass"].mean()) for x in (a, b)}
    v = st.test(Hypothesis(f"{a.model} keeps a larger share of its selecting heads' attention on the target from "
                           f"length {s} to {L} than {b.model} (distinct lists)",
                           f"kept-share ratio (mass at {L} / mass at {s}, {a.model} over {b.model})", ">", 1.0),
                r, (lo, hi), cmd, baseline=kept, n=sum(len(x.per_list[k]["mass"]) for x in (a, b) for k in (s, L)))
    st.headline.append(f"Attention mass on the target kept from length {s} to {L}: {a.model} keeps {r:.2f} "
                       f"[{lo:.2f}, {hi:.2f}] times the share {b.model} keeps ({v.verdict}).")


def _account_verdicts(st, name: str, res: SortingFailureResult, ref: SortingFailureResult | None, cmd: str) -> None:
    """Whether the account's features rank the held-out error steps (AUC) and, at the lengths the model never
    trained on, predict how many errors there are (fold error)."""
    from probekit.stats import Hypothesis

    ho, ctrl = res.held_out, res.control
    held = [c for c in res.cells if c["split"] == "held-out"]
    k = int(round(sum(c["observed"] * c["n_steps"] for c in held)))
    base = {"AUC of the control (no head)": ctrl.get("auc"), "held-out steps": sum(c["n_steps"] for c in held)}
    if ref is not None:
        base[f"AUC of {ref.settings.get('model')}'s account"] = ref.held_out.get("auc")
    a = st.test(Hypothesis(f"{name}: the account's per-step error probability ranks the held-out error steps above "
                           "the correct ones", "held-out per-step AUC", ">", 0.5), ho["auc"], ho["auc_ci95"], cmd,
                baseline=base, n=k)
    longs = sorted(set(ho["fold_cells"]))
    beyond = [c for c in held if c["length"] in longs]
    obs, pred = (sum(c[q] * c["n_steps"] for c in beyond) for q in ("observed", "predicted"))
    f = st.test(Hypothesis(f"{name}: on the held-out cells of lengths it never trained on ({', '.join(map(str, longs))}"
                           f"), the account's predicted error count is within a factor {FOLD_MAX:g} of the observed one",
                           "fold error max(observed / predicted, predicted / observed)", "<=", FOLD_MAX),
                ho["fold"], ho["fold_ci95"], cmd, baseline={"observed errors": obs, "predicted errors": pred,
                                                           "fold error of the control": ctrl.get("fold")}, n=len(beyond))
    st.headline.append(f"{name}: {k} errors in {base['held-out steps']} held-out steps; the same feature set ranks "
                       f"them with AUC {a.effect:.2f} [{a.interval[0]:.2f}, {a.interval[1]:.2f}] ({a.verdict} that it "
                       f"beats chance) and, on the held-out cells of lengths it never trained on, predicts {pred:.1f} "
                       f"errors where {obs:.0f} occur (fold {f.effect:.2f} [{f.interval[0]:.2f}, {f.interval[1]:.2f}]: "
                       f"{f.verdict} that it is within {FOLD_MAX:g}).")


def _position_verdict(st, lk: LookupByLength, ref: LookupByLength | None, cmd: str) -> None:
    """Learned positions: do the errors sit where the target's input index was never reached in training?"""
    from probekit.stats import Hypothesis

    L, t = max(lk.per_list), lk.train_length
    d, lo, hi = lk.position_gap(L, n_boot=lk.n_boot)
    pl = lk.per_list[L]
    base = {f"error rate, target index < {t}": float(np.nanmean(pl["error_within"])),
            f"error rate, target index >= {t}": float(np.nanmean(pl["error_beyond"]))}
    if ref is not None and L in ref.per_list:
        base[f"{ref.model}'s difference"] = ref.position_gap(L, n_boot=ref.n_boot)[0]
    v = st.test(Hypothesis(f"{lk.model}: at length {L}, a step errs more often when its target sits at an input index "
                           f"no training list reached (>= {t}) than below it", "difference in per-step error rate "
                           "(index >= train length minus below), mean over lists", ">", 0.0),
                d, (lo, hi), cmd, baseline=base, n=len(pl["error"]))
    st.headline.append(f"{lk.model}: at length {L} its steps err at rate "
                       f"{base[f'error rate, target index >= {t}']:.3f} when the target sits at an input index >= {t} "
                       f"and {base[f'error rate, target index < {t}']:.3f} below it (difference {d:.3f} "
                       f"[{lo:.3f}, {hi:.3f}]: {v.verdict} that it is > 0)" + (
                           f"; its queries sit at token positions {L + 1}-{2 * L}, beyond the {2 * t + 2} tokens of the "
                           f"longest training sequence, and the steps whose target sits below index {t} err too."
                           if L > 2 * t else "."))


def _extrapolation_figures(st, lookups: dict, extrap: dict) -> None:
    names = ", ".join(lookups)
    st.figure("lookup-by-length", lambda: plot_lookup_by_length(lookups),
              "The selecting heads (chosen by patching in each model) on distinct lists, by length: left, the score "
              "margin of the target key over the best key holding another value (pre-softmax, the length temperature "
              "included), averaged over the heads and steps; right, the attention mass they put on the target. Bars: "
              "95 % intervals resampling lists; the dotted line is the longest training list. A margin below 0 means "
              "the target is not the top key of an average selecting head.",
              f"Two line plots against list length for {names}: score margin and attention mass on the target, one "
              "line per model.")
    if extrap:
        st.figure("extrapolation-error", lambda: plot_error_by_length(extrap, log_y=True),
                  "The account on the sorters trained without repeats: observed per-step error rate (teacher forcing, "
                  "solid) and the error model's prediction (dashed) by list length, on a log scale, for distinct and "
                  "dense lists (a run of consecutive values); filled markers are held-out cells, triangles cells with "
                  "no error at all (drawn at the floor). One error in a cell of length L is 1 / (lists x L), "
                  f"1 / ({EXTRAP_GRID['n']} L) here. Colours as in the error-by-length figure.",
                  f"Line plots on a log scale for {', '.join(extrap)}: per-step error rate by length, observed and "
                  "predicted, one line per composition.")


MODEL_COLOURS = {"sort-baseline": "tab:blue", "sort-baseline-temp": "tab:orange", "sort-extrap": "tab:green",
                 "sort-extrap-learned-pos": "tab:red"}  # one colour per model in every figure of the stage


def plot_lookup_by_length(lookups: dict[str, LookupByLength]):
    """`lookup_by_length` of several models: margin (left) and attention mass on the target (right) by length, one
    colour per model, 95 % intervals; a dotted line at the longest training list."""
    import matplotlib.pyplot as plt

    if not lookups:
        raise ProbekitError("plot_lookup_by_length needs at least one lookup")
    fig, axs = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    others = iter(("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan") * 4)
    for name, lk in lookups.items():
        col, xs = MODEL_COLOURS.get(name) or next(others), [r["length"] for r in lk.rows]
        for ax, q in zip(axs, ("margin", "mass"), strict=True):
            ys = np.array([r[q] for r in lk.rows])
            err = np.abs(np.array([[r[f"{q}_lo"], r[f"{q}_hi"]] for r in lk.rows]).T - ys)
            ax.errorbar(xs, ys, yerr=err, color=col, marker="o", ms=4, capsize=2, label=name)
    for ax, lab in zip(axs, ("score margin of the target key", "attention mass on the target"), strict=True):
        for t in {lk.train_length for lk in lookups.values()}:
            ax.axvline(t, color="grey", ls=":", lw=0.9)
        ax.set_xlabel("list length (distinct values)")
        ax.set_xticks(sorted({L for lk in lookups.values() for L in lk.per_list}))
        ax.set_ylabel(lab)
    axs[0].axhline(0, color="k", lw=0.6)
    axs[1].set_ylim(bottom=0)
    axs[1].legend(fontsize=7, loc="upper right")
    fig.suptitle("The selecting heads' lookup by list length (mean over heads and steps; dotted: training length)",
                 fontsize=10)
    return fig


def _failure_record(st, name: str, res: SortingFailureResult, cmd: str) -> None:
    """One model's verdict, headline sentence, claims and tables."""
    from probekit.stats import Hypothesis

    v = res.verdict(cmd)
    h, ctrl = v.hypothesis, res.control
    base = {"R^2 of the control (step type and copies left, no head)": ctrl["r2"], "R^2 on the fit cells": res.r2_fit}
    v = st.test(Hypothesis(f"{name}: {h.statement}", h.statistic, h.op, h.threshold), v.effect, v.interval, cmd,
                baseline=base, n=v.n)
    heads = [h["label"] for h in res.heads if h["chosen"]]
    lo, hi = v.interval
    st.headline.append(f"{name}: predicting the per-step error rate of held-out cells from the attention mass and "
                       f"score margins of {len(heads)} heads chosen by patching ({', '.join(heads)}) gives R^2 "
                       f"{v.effect:.2f} [{lo:.2f}, {hi:.2f}], against {ctrl['r2']:.2f} from the step type alone; "
                       f"'{v.hypothesis.text()}' is {v.verdict}.")
    longest = max(c["length"] for c in res.cells)
    st.claim(f"{name}: greedy exact match at length {longest}, by composition: " + "; ".join(
        f"{c['composition']} {100 * c['exact_match']:.1f} % [{100 * c['exact_match_ci95'][0]:.1f}, "
        f"{100 * c['exact_match_ci95'][1]:.1f}]" for c in res.cells if c["length"] == longest) + ".", cmd)
    st.tables[f"{name}: cells"] = [
        {"composition": c["composition"], "length": c["length"], "split": c["split"], "observed": c["observed"],
         "predicted": c["predicted"], "new-value steps": c["observed_new"], "repeat steps": c["observed_repeat"],
         "exact match": c["exact_match"]} for c in res.cells]
    st.tables[f"{name}: heads by patching effect"] = [
        {"head": h["label"], "effect": h["effect"], "chosen": h["chosen"]} for h in res.heads]


def _failure_figures(st, results: dict[str, SortingFailureResult]) -> None:
    names = ", ".join(results)
    st.figure("predicted-vs-observed", lambda: plot_failure_grid(results),
              "Each point is one cell of the composition x length grid (colour: composition; label: length). "
              "Open squares were used to fit the error model, filled circles are held out; the dashed line is "
              "y = x. Points near the line mean the lookup quantities predict the cell's error rate.",
              f"Scatter plots for {names} of predicted against observed per-step error rate per cell, "
              "with the held-out R^2 and its 95 % interval in each panel title.")
    st.figure("error-by-length", lambda: plot_error_by_length(results),
              "Observed per-step error rate (teacher forcing, solid) and the error model's prediction (dashed) "
              "against list length, one line per list composition; filled markers are held-out cells.",
              f"Line plots for {names}: per-step error rate rising with list length for each composition, "
              "observed and predicted.")


COLOURS = dict(zip(COMPOSITIONS + ("dense",), ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"),
                   strict=True))
FLOOR = 1e-5  # where a log-scale error plot draws a cell without any error


def _scatter_panel(ax, result: SortingFailureResult, hi: float) -> None:
    """Predicted vs observed per-cell error rate: fit cells open squares, held-out cells filled; y = x."""
    for c in result.cells:
        held = c["split"] == "held-out"
        col = COLOURS.get(c["composition"], "k")
        ax.scatter(c["observed"], c["predicted"], s=20 + c["length"], facecolors=col if held else "none",
                   edgecolors=col, marker="o" if held else "s")
        if max(c["observed"], c["predicted"]) > 0.03 * hi:  # the cells piled up at the origin stay unlabelled
            ax.annotate(str(c["length"]), (c["observed"], c["predicted"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.plot([0, hi], [0, hi], "k--", lw=0.8, label="y = x")
    for comp in dict.fromkeys(c["composition"] for c in result.cells):  # the compositions this grid holds
        ax.scatter([], [], color=COLOURS.get(comp, "k"), label=comp)
    ax.scatter([], [], facecolors="none", edgecolors="k", marker="s", label="fit cell")
    ax.scatter([], [], color="k", label="held-out cell")
    ax.set_xlim(-0.02 * hi, hi)
    ax.set_ylim(-0.02 * hi, hi)
    ax.set_xlabel("observed per-step error rate (teacher forcing)")
    ax.set_ylabel("predicted per-step error rate")
    ax.legend(fontsize=7, loc="upper left")


def _extent(results) -> float:
    return max([1e-3] + [max(c["observed"], c["predicted"]) for r in results for c in r.cells]) * 1.05


def plot_sorting_failure(result: SortingFailureResult, path=None):
    """Predicted vs observed teacher-forced error rate per cell; fit (open) vs held-out (filled); y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    _scatter_panel(ax, result, _extent([result]))
    lo, up = result.r2_ci95
    ax.set_title(f"{result.settings.get('model', 'model')}: per-cell error predicted from lookup quantities\n"
                 f"held-out R² = {result.r2:.2f} [{lo:.2f}, {up:.2f}] ({result.settings.get('split')} split)",
                 fontsize=9)
    fig.tight_layout()
    if path is not None:
        from probekit.io import save_figure

        save_figure(fig, path, dpi=120)
    return fig


def plot_failure_grid(results: dict[str, SortingFailureResult]):
    """`plot_sorting_failure` for several models side by side, on one shared pair of axes (same limits)."""
    import matplotlib.pyplot as plt

    if not results:
        raise ProbekitError("plot_failure_grid needs at least one result")
    hi = _extent(results.values())
    fig, axs = plt.subplots(1, len(results), figsize=(4.6 * len(results), 4.6), squeeze=False, layout="constrained")
    for ax, (name, r) in zip(axs[0], results.items(), strict=True):
        _scatter_panel(ax, r, hi)
        lo, up = r.r2_ci95
        ax.set_title(f"{name}: held-out R² = {r.r2:.2f} [{lo:.2f}, {up:.2f}]", fontsize=9)
    fig.suptitle("Per-cell error rate predicted from the lookup quantities vs observed", fontsize=10)
    return fig


def plot_error_by_length(results: dict[str, SortingFailureResult], log_y: bool = False):
    """Observed (solid) and predicted (dashed) per-step error rate vs length, one line per composition, one
    panel per model, one shared y axis; held-out cells drawn as filled markers. ``log_y``: a log scale, a cell
    without any error drawn as a triangle on the axis floor (``FLOOR``)."""
    import matplotlib.pyplot as plt

    if not results:
        raise ProbekitError("plot_error_by_length needs at least one result")
    fig, axs = plt.subplots(1, len(results), figsize=(4.6 * len(results), 3.6), squeeze=False, sharey=True,
                            layout="constrained")
    for ax, (name, r) in zip(axs[0], results.items(), strict=True):
        for comp in dict.fromkeys(c["composition"] for c in r.cells):
            cs = sorted((c for c in r.cells if c["composition"] == comp), key=lambda c: c["length"])
            xs, col = [c["length"] for c in cs], COLOURS.get(comp, "k")
            obs = [max(c["observed"], FLOOR) if log_y else c["observed"] for c in cs]
            ax.plot(xs, obs, "-", color=col, label=f"{comp} (observed)")
            ax.plot(xs, [c["predicted"] for c in cs], "--", color=col, alpha=0.7)
            for c, y in zip(cs, obs, strict=True):
                held = c["split"] == "held-out"
                ax.scatter(c["length"], y, color=col, facecolors=col if held else "none", zorder=3,
                           marker="v" if log_y and c["observed"] == 0 else "o")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("list length")
        ax.set_xticks(sorted({c["length"] for c in r.cells}))
    if log_y:
        axs[0, 0].set_yscale("log")
        axs[0, 0].set_ylim(FLOOR / 2, 1)
        axs[0, 0].scatter([], [], marker="v", facecolors="none", edgecolors="k", label="no error in the cell")
    axs[0, 0].set_ylabel("per-step error rate (teacher forcing)" + (", log scale" if log_y else ""))
    axs[0, 0].plot([], [], "k--", label="predicted")
    axs[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Per-step error rate by list length and composition (filled: held-out cells)", fontsize=10)
    return fig
