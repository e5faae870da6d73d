"""The statistics every study uses: intervals, baselines, chance-normalised attention, verdicts.

- `bootstrap_ci`: a percentile bootstrap 95 % interval of any statistic of resampled examples
  (rows of the first axis), deterministic given ``seed``. Percentile only (no BCa): the studies'
  statistics are means and rates of a few hundred examples, where the percentile interval is the
  documented, easily checked choice; `bootstrap_ci` also accepts per-seed values (one row per seed),
  which is how a sweep's seeds enter an interval.
- `paired_bootstrap`: the difference of one statistic on two measurements of the *same* examples,
  resampling the examples jointly (the pairing removes the between-example variance).
- `two_sample_bootstrap`: the difference of one statistic on two *independent* samples (e.g. lists of
  two lengths), each resampled on its own (optionally by groups).
- `welch_interval`: the Welch t interval of a difference of two means, for a handful of values per group
  (seeds), where a bootstrap has too few distinct resamples.
- `ratio_of_means`: the share of a gap recovered, ``(mean x - mean lo) / (mean hi - mean lo)`` (patching
  restoration, circuit faithfulness), the statistic to bootstrap for those.
- `auc`: the area under the ROC curve of scores against binary labels, optionally weighted (the
  weights of a resample: how often each example was drawn), so that it can be bootstrapped cheaply.
- `wilson`: the Wilson score interval of a proportion (the one in `probekit.evaluate`, re-exported).
- `chance_normalised_attention`: attention mass on target keys divided by the uniform share
  (n_target / n_visible keys), per step type, with bootstrap intervals (over queries, or over groups of
  queries such as the lists they belong to).
- `majority_baseline`, `token_baseline`: the two baselines beside every probe (the majority class of
  the train split; a lookup table input token -> most frequent train label), scored on held-out data.
- `Hypothesis` (written before measuring) and `Verdict` (`judge`): "supported" when the whole
  interval satisfies the hypothesis, "not supported" when the whole interval violates it,
  "inconclusive" otherwise.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from probekit.evaluate import wilson
from probekit.tasks.base import ProbekitError

VERDICTS = ("supported", "not supported", "inconclusive")
OPS = (">", ">=", "<", "<=")


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x))


def _rows(data, what: str) -> np.ndarray:
    a = np.asarray(data, dtype=float)
    if a.ndim == 0 or a.shape[0] < 2:
        raise ProbekitError(f"{what} has shape {a.shape}; expected at least 2 examples along the first axis")
    return a


def _check_level(n_boot: int, level: float) -> None:
    if not isinstance(n_boot, int) or n_boot < 10:
        raise ProbekitError(f"n_boot = {n_boot!r}; expected an integer >= 10")
    if not 0.0 < level < 1.0:
        raise ProbekitError(f"level = {level!r}; expected a fraction in (0, 1), e.g. 0.95")


def bootstrap_ci(data, statistic: Callable[[np.ndarray], float] = _mean, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95, groups=None) -> tuple[float, float, float]:
    """``(estimate, lo, hi)``: the statistic on ``data`` and its percentile bootstrap interval.

    ``data``: examples (or per-seed values) along the first axis; ``statistic`` maps a resample
    (same shape) to a float. ``groups`` (one label per row, e.g. the list a sort step belongs to):
    resample whole groups, for rows that are not independent (a cluster bootstrap). Resamples that
    give NaN are dropped; all-NaN gives a NaN interval.
    """
    a = _rows(data, "bootstrap data")
    _check_level(n_boot, level)
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, a.shape[0], size=(n_boot, a.shape[0]))
    else:
        idx = _group_resamples(np.asarray(groups), a.shape[0], n_boot, rng)
    stats = np.array([statistic(a[i]) for i in idx], dtype=float)
    return (float(statistic(a)),) + _percentiles(stats, level)


def _group_resamples(groups: np.ndarray, n: int, n_boot: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of ``n_boot`` resamples that draw whole groups with replacement."""
    if groups.shape != (n,):
        raise ProbekitError(f"groups has shape {groups.shape}; expected one label per row ({n},)")
    _, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    if len(members) < 2:
        raise ProbekitError("groups has a single group; expected at least 2 groups to resample")
    picks = rng.integers(0, len(members), size=(n_boot, len(members)))
    return [np.concatenate([members[g] for g in row]) for row in picks]


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def paired_bootstrap(a, b, statistic: Callable[[np.ndarray], float] = _mean, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """``(difference, lo, hi)`` of ``statistic(a) - statistic(b)`` where row i of ``a`` and ``b`` is the same
    example; each resample draws the same rows from both."""
    a, b = _rows(a, "paired sample a"), _rows(b, "paired sample b")
    if a.shape[0] != b.shape[0]:
        raise ProbekitError(f"paired samples have {a.shape[0]} and {b.shape[0]} examples; expected the same examples")
    _check_level(n_boot, level)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.shape[0], size=(n_boot, a.shape[0]))
    diffs = np.array([statistic(a[i]) - statistic(b[i]) for i in idx], dtype=float)
    return (float(statistic(a) - statistic(b)),) + _percentiles(diffs, level)


def two_sample_bootstrap(a, b, statistic: Callable[[np.ndarray], float] = _mean, n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95, groups_a=None, groups_b=None) -> tuple[float, float, float]:
    """``(difference, lo, hi)`` of ``statistic(a) - statistic(b)`` for two independent samples: each resample
    draws the rows of ``a`` and of ``b`` separately (whole groups where ``groups_a`` / ``groups_b`` label rows)."""
    a, b = _rows(a, "sample a"), _rows(b, "sample b")
    _check_level(n_boot, level)
    rng = np.random.default_rng(seed)

    def draws(x, groups):
        if groups is None:
            return rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
        return _group_resamples(np.asarray(groups), x.shape[0], n_boot, rng)

    ia, ib = draws(a, groups_a), draws(b, groups_b)
    diffs = np.array([statistic(a[i]) - statistic(b[j]) for i, j in zip(ia, ib, strict=True)], dtype=float)
    return (float(statistic(a) - statistic(b)),) + _percentiles(diffs, level)


def welch_interval(a, b, level: float = 0.95) -> tuple[float, float, float, float]:
    """``(mean(a) - mean(b), lo, hi, df)``: the Welch t interval (unequal variances, Welch-Satterthwaite degrees
    of freedom). Both groups need >= 2 values; when both variances are 0 the interval is the point itself."""
    from scipy.stats import t

    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.size < 2 or b.size < 2:
        raise ProbekitError(f"welch_interval got {a.size} and {b.size} values; expected at least 2 per group")
    _check_level(10, level)
    d = float(a.mean() - b.mean())
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return d, d, d, float("nan")
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    h = float(t.ppf((1 + level) / 2, df)) * se
    return d, d - h, d + h, float(df)
def ratio_of_means(rows: np.ndarray) -> float:
    """``(mean(x) - mean(lo)) / (mean(hi) - mean(lo))`` for rows ``[x, hi, lo]``: the share of the gap from ``lo``
    to ``hi`` that ``x`` recovers (patching restoration, circuit faithfulness), from means so that it is stable
    when single rows have a small gap. NaN when the gap is 0."""
    m = np.asarray(rows, dtype=float).mean(0)
    gap = m[1] - m[2]
    return float((m[0] - m[2]) / gap) if abs(gap) > 1e-12 else float("nan")


def auc(scores, labels, weights=None):
    """The area under the ROC curve: the chance that a positive example scores above a negative one, ties
    counted half (the Mann-Whitney statistic; scikit-learn's ``roc_auc_score``). ``weights`` ``[example]``
    (>= 0): how many times each example counts, e.g. its multiplicity in a bootstrap resample; or
    ``[resample, example]``: one AUC per row, the scores sorted once. NaN where the (weighted) examples hold no
    positive or no negative."""
    s, y = np.asarray(scores, dtype=float).ravel(), np.asarray(labels).astype(bool).ravel()
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=float)
    if not s.size == y.size == w.shape[-1] or w.ndim > 2:
        raise ProbekitError(f"auc got {s.size} scores, {y.size} labels and weights of shape {w.shape}; expected one "
                            "label and one weight (per resample) for each example")
    W = np.atleast_2d(w)
    _, inv = np.unique(s, return_inverse=True)
    k, m = W.shape[0], int(inv.max()) + 1 if s.size else 0
    at = (inv[None, :] + m * np.arange(k)[:, None]).ravel()  # (resample, distinct score) bins, scores ascending
    pos = np.bincount(at, weights=(W * y).ravel(), minlength=k * m).reshape(k, m)
    neg = np.bincount(at, weights=(W * ~y).ravel(), minlength=k * m).reshape(k, m)
    below = np.cumsum(neg, 1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))
    out = np.where(np.isfinite(out), out, np.nan)
    return float(out[0]) if w.ndim < 2 else out


# ---------------------------------------------------------------------------- attention


def chance_normalised_attention(pattern, target, step_type, visible=None, n_boot: int = 1000,
                                seed: int = 0, groups=None) -> dict[str, dict]:
    """Attention to the target over its uniform share, per step type.

    ``pattern`` ``[query, key]``: one head's attention at each query (flatten batch and position first);
    ``target`` ``[query, key]`` bool: the keys that count as the target; ``step_type`` ``[query]``: a label
    per query (e.g. "repeat" / "new"); ``visible`` ``[query, key]`` bool (default: keys with attention > 0).
    Returns ``{type: {n, mass, chance, ratio, ratio_ci95}}``: mass and chance (n_target / n_visible)
    averaged over the queries, ratio = mass / chance per query, averaged, with a bootstrap interval.
    ``groups`` ``[query]``: a label per query (e.g. the example it belongs to); the interval then resamples
    whole groups, since the queries of one example are not independent.
    """
    A = np.asarray(pattern, dtype=float)
    tgt = np.asarray(target, dtype=bool)
    types = np.asarray(step_type)
    if A.ndim != 2 or tgt.shape != A.shape or types.shape != A.shape[:1]:
        raise ProbekitError(f"pattern {A.shape}, target {tgt.shape}, step_type {types.shape}; expected "
                            "[query, key], the same [query, key] and [query]")
    vis = A > 0 if visible is None else np.asarray(visible, dtype=bool)
    grp = None if groups is None else np.asarray(groups)
    if grp is not None and grp.shape != types.shape:
        raise ProbekitError(f"groups has shape {grp.shape}; expected one label per query {types.shape}")
    n_tgt, n_vis = (tgt & vis).sum(1), vis.sum(1)
    ok = n_tgt > 0
    mass = (A * tgt).sum(1)
    chance = np.where(ok, n_tgt / np.maximum(n_vis, 1), np.nan)
    ratio = mass / chance
    out = {}
    for t in sorted({str(x) for x in types[ok]}):
        sel = ok & (types.astype(str) == t)
        r = ratio[sel]
        g = None if grp is None else grp[sel]
        enough = r.size >= 2 and (g is None or np.unique(g).size >= 2)
        est, lo, hi = bootstrap_ci(r, n_boot=n_boot, seed=seed, groups=g) if enough else (float(r.mean()), np.nan, np.nan)
        out[t] = {"n": int(sel.sum()), "mass": float(mass[sel].mean()), "chance": float(chance[sel].mean()),
                  "ratio": est, "ratio_ci95": [lo, hi]}
    return out


# ---------------------------------------------------------------------------- probe baselines


def majority_baseline(y_train, y_test) -> dict:
    """Accuracy on ``y_test`` of always answering the most frequent label of ``y_train`` (Wilson interval)."""
    y_train, y_test = np.asarray(y_train).ravel(), np.asarray(y_test).ravel()
    if y_train.size == 0 or y_test.size == 0:
        raise ProbekitError(f"majority baseline got {y_train.size} train and {y_test.size} test labels; "
                            "expected both > 0")
    label = Counter(y_train.tolist()).most_common(1)[0][0]
    k = int((y_test == label).sum())
    return {"kind": "majority", "label": label, "accuracy": k / y_test.size, "ci95": list(wilson(k, y_test.size)),
            "n": int(y_test.size)}


def token_baseline(tokens_train, y_train, tokens_test, y_test) -> dict:
    """The best predictor from the input token alone: a table token -> most frequent train label (ties: the
    smallest label), fitted on the train split; tokens unseen in train get the train majority label."""
    tt, yt = np.asarray(tokens_train).ravel(), np.asarray(y_train).ravel()
    ts, ys = np.asarray(tokens_test).ravel(), np.asarray(y_test).ravel()
    if tt.shape != yt.shape or ts.shape != ys.shape or tt.size == 0 or ts.size == 0:
        raise ProbekitError(f"token baseline got train {tt.shape}/{yt.shape} and test {ts.shape}/{ys.shape}; "
                            "expected non-empty tokens and labels of equal size in each split")
    counts: dict = {}
    for tok, y in zip(tt.tolist(), yt.tolist(), strict=True):
        counts.setdefault(tok, Counter())[y] += 1
    table = {tok: min(c, key=lambda lab: (-c[lab], lab)) for tok, c in counts.items()}
    fallback = majority_baseline(yt, ys)["label"]
    pred = np.array([table.get(tok, fallback) for tok in ts.tolist()])
    k = int((pred == ys).sum())
    return {"kind": "token", "accuracy": k / ys.size, "ci95": list(wilson(k, ys.size)), "n": int(ys.size),
            "n_unseen": int(sum(tok not in table for tok in ts.tolist())), "table": table}


# ---------------------------------------------------------------------------- hypotheses and verdicts


@dataclass(frozen=True)
class Hypothesis:
    """A claim written before measuring: ``statistic op threshold`` (e.g. effect > 0, effect >= 0.3)."""

    statement: str
    statistic: str
    op: str
    threshold: float

    def __post_init__(self):
        if self.op not in OPS:
            raise ProbekitError(f"hypothesis op {self.op!r}; expected one of {list(OPS)}")
        if not self.statement or not self.statistic:
            raise ProbekitError("a hypothesis needs a statement and the name of its statistic")

    def holds(self, x: float) -> bool:
        t = self.threshold
        return {">": x > t, ">=": x >= t, "<": x < t, "<=": x <= t}[self.op]

    def text(self) -> str:
        return f"{self.statistic} {self.op} {self.threshold:g}"


@dataclass(frozen=True)
class Verdict:
    """What the interval says about a hypothesis, with what is needed to check and regenerate it."""

    hypothesis: Hypothesis
    effect: float
    interval: tuple[float, float]
    verdict: str
    command: str
    baseline: dict = field(default_factory=dict)
    n: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["interval"] = list(self.interval)
        d["claim"] = self.hypothesis.text()
        return d

    def to_json(self) -> str:
        from probekit.io import dumps_json

        return dumps_json(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> Verdict:
        d = json.loads(s)
        d.pop("claim", None)
        d.pop("nan_reason", None)  # probekit.io writes NaN as null and says so here
        iv = tuple(float("nan") if v is None else float(v) for v in d.pop("interval"))
        eff = d.pop("effect")
        return cls(hypothesis=Hypothesis(**d.pop("hypothesis")), interval=iv,
                   effect=float("nan") if eff is None else eff, **d)


def decide(h: Hypothesis, interval: Sequence[float]) -> str:
    """"supported" if every point of ``interval`` satisfies ``h``, "not supported" if none does, else
    "inconclusive" (also for an interval with NaN)."""
    lo, hi = (float(v) for v in interval)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        return "inconclusive"
    if h.holds(lo) and h.holds(hi):
        return "supported"
    if not h.holds(lo) and not h.holds(hi):  # a one-sided claim: both ends wrong = the whole interval wrong
        return "not supported"
    return "inconclusive"


def judge(h: Hypothesis, effect: float, interval: Sequence[float], command: str, baseline: dict | None = None,
          n: int | None = None) -> Verdict:
    """The `Verdict` of ``h`` from ``interval`` alone (`decide`); ``command`` regenerates the numbers."""
    if not command:
        raise ProbekitError("a verdict needs the command that regenerates it; got an empty command")
    lo, hi = (float(v) for v in interval)
    return Verdict(h, float(effect), (lo, hi), decide(h, (lo, hi)), command, dict(baseline or {}), n)


__all__ = ["Hypothesis", "VERDICTS", "Verdict", "auc", "bootstrap_ci", "chance_normalised_attention", "decide", "judge",
           "majority_baseline", "paired_bootstrap", "ratio_of_means", "token_baseline", "two_sample_bootstrap", "welch_interval",
           "wilson"]
