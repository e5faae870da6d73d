"""Two models on one task, side by side and as differences (B - A).

    cmp = compare_models(model_a, task_a, model_b, task_b, lengths=[10, 20, 50], n=200)
    cmp.parts["accuracy"]      # axes (model, length): exact match, extra ci_low / ci_high
    cmp.parts["probe"]         # axes (model, layer, length): held-out probe accuracy of one feature
    cmp.parts["patch"]         # axes (model, layer, pos, head) (head sites): `probekit.patching.sweep`
    cmp.parts["attribution"]   # DLA (model, pos, layer, head) or head ablation (model, layer, head)

Every part is a `probekit.results.Result` whose leading ``model`` axis holds (A, B, B - A): entry 2 is
exactly entry 1 minus entry 0, the single-model results computed here. Both models see the same
inputs: one sample per length, one probe batch, one corrupted pair, one attribution batch, drawn from
the shared task with the same seeds. The per-position maps need the same task (spec and vocabulary)
and the same shape (layers, heads); anything else is refused before a forward pass runs.

Intervals: accuracy has 95 % Wilson intervals per model and Newcombe's hybrid-score interval for the
difference of the two proportions (independent samples of the same distribution).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from probekit.results import Result
from probekit.tasks import ProbekitError

ATTRIBUTIONS = ("dla", "ablate")
PARTS = ("accuracy", "probe", "patch", "attribution")


@dataclass
class Comparison:
    """``parts``: {name: Result with a leading (A, B, B - A) ``model`` axis}; ``settings``: how they were made."""

    names: tuple[str, str]
    parts: dict[str, Result] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


def check_comparable(model_a, task_a, model_b, task_b) -> None:
    """Refuse two models that do not share a task (spec and vocabulary) or a shape (layers, heads)."""
    if task_a.spec() != task_b.spec() or list(task_a.vocab) != list(task_b.vocab):
        raise ProbekitError(f"the two models must share a task (same spec and vocabulary) for per-position maps; "
                            f"A has {task_a.spec()}, B has {task_b.spec()}")
    sa, sb = ((m.cfg.n_layers, m.cfg.n_heads) for m in (model_a, model_b))
    if sa != sb:
        raise ProbekitError(f"the two models must have the same layers x heads for per-component differences; "
                            f"A has {sa[0]} x {sa[1]}, B has {sb[0]} x {sb[1]}")


def model_names(model_a, model_b) -> tuple[str, str]:
    """Display names of the two models: their probekit names, marked (A) and (B) when they are equal."""
    a, b = (getattr(m, "probekit_name", None) or "model" for m in (model_a, model_b))
    return (f"{a} (A)", f"{b} (B)") if a == b else (a, b)


def stack_difference(a: Result, b: Result, names: tuple[str, str], kind: str | None = None,
                     extra: dict | None = None) -> Result:
    """One Result with a leading ``model`` axis: (a, b, b - a). ``a`` and ``b`` must have the same axes and shape."""
    if a.axes != b.axes or a.values.shape != b.values.shape:
        raise ProbekitError(f"cannot take B - A of results with axes {a.axes} {tuple(a.values.shape)} and "
                            f"{b.axes} {tuple(b.values.shape)}; expected the same")
    va, vb = a.values.float(), b.values.float()
    settings = {"A": a.settings, "B": b.settings, **{k: v for k, v in a.settings.items() if b.settings.get(k) == v}}
    return Result(kind or a.kind, torch.stack([va, vb, vb - va]), ("model", *a.axes),
                  {"model": [names[0], names[1], "B - A"], **a.labels}, settings, extra or {})


def entry(result: Result, i: int) -> Result:
    """Entry ``i`` (0: A, 1: B, 2: B - A) of a comparison result, without its ``model`` axis."""
    if not result.axes or result.axes[0] != "model":
        raise ProbekitError(f"not a comparison result: axes {result.axes}; expected a leading 'model' axis")
    labels = {k: v for k, v in result.labels.items() if k != "model"}
    return Result(result.kind, result.values[i], result.axes[1:], labels, result.settings)


def newcombe(pa: float, la: float, ua: float, pb: float, lb: float, ub: float) -> tuple[float, float]:
    """95 % interval of pb - pa from the two Wilson intervals (Newcombe 1998, method 10)."""
    d = pb - pa
    return d - math.sqrt((pb - lb) ** 2 + (ua - pa) ** 2), d + math.sqrt((ub - pb) ** 2 + (pa - la) ** 2)


def accuracy_result(ev) -> Result:
    """An `probekit.evaluate.EvalResult` as a (length,) Result of exact match with ci_low / ci_high."""
    recs = sorted(ev.records, key=lambda r: r["length"])
    ci = torch.tensor([r["exact_match_ci95"] for r in recs], dtype=torch.float32).reshape(-1, 2)
    return Result("exact_match_by_length", torch.tensor([r["exact_match"] for r in recs]), ("length",),
                  {"length": [str(r["length"]) for r in recs]},
                  {"model": ev.model, "task": ev.task, "seed": ev.seed, "n": [r["n"] for r in recs],
                   "decoding": "greedy", "interval": "95 % Wilson"},
                  {"ci_low": ci[:, 0], "ci_high": ci[:, 1]})


def compare_accuracy(ev_a, ev_b, names: tuple[str, str]) -> Result:
    """Exact match by length of A, B and B - A, with Wilson intervals and Newcombe's for the difference."""
    a, b = accuracy_result(ev_a), accuracy_result(ev_b)
    lo, hi = [a.extra["ci_low"], b.extra["ci_low"]], [a.extra["ci_high"], b.extra["ci_high"]]
    d = [newcombe(float(a.values[i]), float(lo[0][i]), float(hi[0][i]), float(b.values[i]), float(lo[1][i]),
                  float(hi[1][i])) for i in range(a.values.numel())]
    lo.append(torch.tensor([x[0] for x in d]).reshape(-1))
    hi.append(torch.tensor([x[1] for x in d]).reshape(-1))
    res = stack_difference(a, b, names, extra={"ci_low": torch.stack(lo), "ci_high": torch.stack(hi)})
    res.settings["difference_interval"] = "95 % Newcombe (hybrid score, from the two Wilson intervals)"
    return res


def _probe(model, task, feature, hook, train_length, lengths, n, seed) -> Result:
    from probekit.probes import probe_lengths
    from probekit.viz import probe_by_length

    sweep = probe_lengths(model, task, feature, hook, train_length, lengths, n=n, seed=seed, controls=False)
    r = probe_by_length(sweep)
    return Result(r.kind, r.values[0], ("layer", "length"), {"layer": r.labels["layer"], "length": r.labels["length"]},
                  {"feature": feature, "hook": r.labels["hook"][0], "train_length": train_length, "n": n,
                   "seed": seed, "metric": sweep.settings.get("metric")})


def _attribution(model, task, batch, attribution: str) -> Result:
    from probekit import attribution as A

    if attribution == "dla":
        return A.direct_logit_attribution(model, batch, unit="head", metric="logit", vocab=task.vocab)
    return A.head_ablation_sweep(model, batch, method="zero", metric="logprob")


def _check(models, task, lengths, n, feature, attribution, site, metric, corruption) -> tuple[str, str, str]:
    from probekit import patching as P
    from probekit.corruptions import corruption_kinds
    from probekit.evaluate import check_fits
    from probekit.metrics import check_metric

    if attribution not in ATTRIBUTIONS:
        raise ProbekitError(f"unknown attribution {attribution!r}; expected one of {list(ATTRIBUTIONS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ProbekitError(f"n must be a positive integer, got {n!r}")
    if not lengths:
        raise ProbekitError("lengths is empty; expected at least one length, e.g. [10, 20]")
    for m in models:
        for L in lengths:
            check_fits(m, task, L)
    corruption = corruption or corruption_kinds(task)[0]
    if corruption not in corruption_kinds(task):
        raise ProbekitError(f"corruption {corruption!r} is not defined for task {task.name!r}; "
                            f"expected one of {list(corruption_kinds(task))}")
    feature = feature or getattr(task, "probe_feature", None)
    if feature is None:
        raise ProbekitError(f"task {task.name!r} names no default probe feature; pass --feature")
    task.sample(1, length=lengths[0], seed=0).feature(feature)
    check_metric(metric)
    return feature, corruption, P.canonical_site(site)


def compare_models(model_a, task_a, model_b, task_b, lengths: Sequence[int], n: int = 200, seed: int = 0,
                   feature: str | None = None, hook: str = "resid_post", train_length: int | None = None,
                   corruption: str | None = None, site: str = "z", metric: str = "logit-diff",
                   attribution: str = "dla", length: int | None = None, max_batch: int = 512,
                   parts: Sequence[str] = PARTS) -> Comparison:
    """Accuracy by length, probe accuracy by layer, a patching map and attribution of two models on one
    task, each as (A, B, B - A); see the module docstring. ``length``: input length of the probe fit,
    the patching pair and the attribution batch (default: the task's default)."""
    from probekit import patching as P
    from probekit.corruptions import corrupt
    from probekit.evaluate import evaluate

    check_comparable(model_a, task_a, model_b, task_b)
    lengths = [int(L) for L in lengths]
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise ProbekitError(f"unknown part(s) {bad}; expected a subset of {list(PARTS)}")
    task = task_a
    feature, corruption, site = _check((model_a, model_b), task, lengths, n, feature, attribution, site, metric,
                                       corruption)
    length = length or task.sample(1, seed=0).length
    train_length = train_length or length
    names = model_names(model_a, model_b)
    models = (model_a, model_b)
    out = Comparison(names, settings={"models": list(names), "task": task.spec(), "lengths": lengths, "n": n,
                                      "seed": seed, "feature": feature, "hook": hook, "train_length": train_length,
                                      "corruption": corruption, "site": site, "metric": metric,
                                      "attribution": attribution, "length": length})
    if "accuracy" in parts:
        evs = [evaluate(m, task, lengths, n=n, seed=seed, max_batch=max_batch, name=nm)
               for m, nm in zip(models, names, strict=True)]
        out.parts["accuracy"] = compare_accuracy(*evs, names)
    if "probe" in parts:
        pr = [_probe(m, task, feature, hook, train_length, lengths, n, seed) for m in models]
        out.parts["probe"] = stack_difference(*pr, names)
    if "patch" in parts:
        pair = corrupt(task, task.sample(n, length=length, seed=seed), corruption, seed=seed)
        pa = [P.sweep(m, pair, site, by_pos=True, metric=metric, max_batch=max_batch) for m in models]
        out.parts["patch"] = stack_difference(*pa, names)
    if "attribution" in parts:
        batch = task.sample(n, length=length, seed=seed + 1)
        out.parts["attribution"] = stack_difference(*[_attribution(m, task, batch, attribution) for m in models], names)
    return out
