"""Figures drawn from result objects only, and attention patterns as standalone offline HTML.

matplotlib and circuitsvis are imported inside the functions that need them. Every matplotlib figure uses
one style (`STYLE`); ``path`` picks the format by suffix (``.png`` or ``.svg``; no suffix writes both)
and files are written atomically (temporary file, then rename).

- `heatmap`: any 1-3-D `Result` (3-D: one panel per index of ``facet``).
- `heatmap_grid`: several 1- or 2-D results (e.g. one per model; shapes may differ) as panels of one
  figure with one shared colour scale.
- `layer_head_heatmap`: layer x head, from any result with ``layer`` and ``head`` axes (other axes averaged).
- `layer_pos_heatmap`: (layer | component | head) x position with the positions' token labels.
- `probe_accuracy`: accuracy by layer, one line per length, from a result with ``layer`` and ``length`` axes.
- `accuracy_vs_length`: exact match vs length with 95 % intervals, from `probekit.evaluate.EvalResult`\\ s.
- `accuracy_grid`: the same, one panel per group of models, one shared accuracy axis.
- `attention_html`: circuitsvis attention heads with the task's tokens as labels, the JavaScript bundle
  inlined (circuitsvis's ``str()`` loads it from a CDN, which fails offline; we use ``.local_src``).
- `mechanism_vs_length`: a mechanism metric and accuracy against length, one line pair per model.
- `interval_plot`: estimates with their 95 % intervals from table rows (a study's tables): lines against a
  numeric x (e.g. length) or dodged points against a categorical x (e.g. heads), one colour per group, one
  panel per facet on a shared y scale, an optional reference line (chance, a threshold).
- `result_intervals`: estimates with 95 % intervals from `Result`s (extra ``lo`` / ``hi``), one panel per
  result with its own axis words and reference lines (measurements of different kinds side by side).
- `compare_heatmap`, `compare_accuracy`, `compare_probe`: model A, model B (one shared scale) and B - A
  (a diverging map; an interval band for accuracy), from a `probekit.compare` result.
- `plot_training_log`: loss and token accuracy against step from a run's ``train_log.jsonl``.

What every figure does: a title in words (`describe`: "Head-output patching, carry-flip: share of logit
difference restored", never a result's kind; `in_words` for hook and feature names), a colour bar labelled with the metric and its units, one
colour scale shared by every facet, limits that one outlier cannot set (`robust_limits`: the 99th
percentile of |values|; cells beyond it marked with triangles; a normalised patch is never clipped
inside [-1, 1]), integer ticks on integer axes, facets wrapped into a grid, and cells of a sensible size
(`MIN_CELL`..`MAX_CELL` inches, the figure within `MAX_W` x `MAX_H`), so a one-layer model is not a strip.

Reshaping for the figures (no new numbers): `flatten_heads` (layer, head -> ``L<l>H<h>``),
`probe_by_length` and `probe_by_site` (a probe sweep as the plots' axes), `probe_chance` (its
majority-class baseline). In a notebook, `show` displays a figure inline and `show_html` a standalone page.
"""

from __future__ import annotations

import html as _html
import math
import textwrap
from pathlib import Path

import torch
from torch import Tensor

from probekit.io import save_figure as _save_atomic
from probekit.io import write_text
from probekit.results import Result
from probekit.tasks import Batch, ProbekitError

STYLE = {
    "figure.dpi": 100, "savefig.dpi": 120, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 8, "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": False, "svg.fonttype": "none", "image.cmap": "RdBu_r",
}
FORMATS = (".png", ".svg")


def _plt():
    """pyplot; with no display and no backend chosen (scripts, CI) matplotlib falls back to Agg by itself,
    and a notebook keeps its inline backend."""
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> list[Path]:
    """Save ``fig`` as PNG or SVG by suffix (no suffix: both); closes it. Returns the paths written."""
    plt = _plt()
    path = Path(path)
    if path.suffix == "":
        paths = [path.with_suffix(s) for s in FORMATS]
    elif path.suffix.lower() in FORMATS:
        paths = [path]
    else:
        raise ProbekitError(f"figure path {str(path)!r} has suffix {path.suffix!r}; expected .png, .svg or none (both)")
    with plt.rc_context(STYLE):
        for p in paths:
            _save_atomic(fig, p, bbox_inches="tight")
    plt.close(fig)
    return paths


def _finish(fig, path):
    if path is not None:
        save_figure(fig, path)
    return fig


def _check_result(result, what: str) -> None:
    if not isinstance(result, Result):
        raise ProbekitError(f"{what} needs a probekit Result, got {type(result).__name__}")


# ---------------------------------------------------------------------------- words, scales, layout

SITE_WORDS = {"z": "Head-output", "q": "Query", "k": "Key", "v": "Value", "pattern": "Attention-pattern",
              "resid_pre": "Residual-stream (block input)", "resid_mid": "Residual-stream (after attention)",
              "resid_post": "Residual-stream (block output)", "attn_out": "Attention-output", "mlp_out": "MLP-output"}
METRIC_WORDS = {"logit-diff": ("logit difference", "logits"), "logit": ("correct-token logit", "logits"),
                "logprob": ("correct-token log-probability", "nats"), "prob": ("correct-token probability", "0-1"),
                "margin": ("logit margin", "logits"), "acc": ("accuracy", "fraction correct"),
                "exact-match": ("exact match", "fraction correct")}
AXIS_WORDS = {"pos": "position (token)", "component": "component"}
HOOK_WORDS = {"resid_pre": "residual stream, block input", "resid_mid": "residual stream after attention",
              "resid_post": "residual stream, block output", "attn_out": "attention output", "mlp_out": "MLP output",
              "z": "head outputs", "q": "queries", "k": "keys", "v": "values", "embed": "token embedding",
              "pos_embed": "position embedding"}
KIND_WORDS = {  # (title, colour-bar label) of results whose title needs no setting
    "head_role": ("Where each head attends: attention on its target positions", "attention statistic"),
    "head_roles": ("Where each head attends, by length: attention on its target positions", "attention statistic"),
    "topk_vs_random": ("Ablating the top heads vs random sets of as many heads", "metric"),
    "head_ablation": ("Ablating a set of heads together", "metric"),
    "circuit_scores": ("Circuit scores of each head, read from the weights", "score"),
    "qk_circuit": ("QK circuit: how much each query token attends to each key token", "attention score (pre-softmax)"),
    "ov_circuit": ("OV circuit: the logit each attended token adds to each output token", "direct logit contribution"),
    "edge_scores": ("Edge attribution scores (sender to receiver)", "score"),
    "iia": ("Interchange-intervention accuracy by site and position", "IIA (fraction of pairs)"),
    "exact_match_by_length": ("Exact match by length (greedy decoding)", "exact match (fraction correct)"),
}


def in_words(name: str) -> str:
    """Plain words for a hook or site name (``blocks.0.hook_resid_pre``, ``hook_resid_pre`` or ``resid_pre`` ->
    ``residual stream, block input``) or, for anything else such as a feature name, its underscores as spaces."""
    short = str(name).rsplit(".", 1)[-1].removeprefix("hook_")
    return HOOK_WORDS.get(short, short.replace("_", " "))
MIN_CELL, MAX_CELL, MAX_W, MAX_H = 0.16, 0.55, 14.0, 11.0  # inches
ROW_W = 10.5  # inches: `result_intervals` wraps its panels, two a row, when one row would be wider


def _metric_words(metric) -> tuple[str, str]:
    return METRIC_WORDS.get(str(metric), (str(metric), "units of the metric"))


def _patch_words(s: dict, kind: str, words: str, units: str) -> tuple[str, str]:
    """`describe` of a patching result: what was patched, under which corruption, in which units."""
    corr = (s.get("corruption") or {}).get("kind") or "corrupted run"
    corr = "clean vs corrupted pairs" if corr == "custom" else corr
    if kind.startswith("exact_patch_"):
        what = "MLP-output" if kind.endswith("mlp") else "Head-output"
        return f"{what} patching (exact): change in {words}", f"change in {words} ({units})"
    if kind.startswith("path_patch_"):
        what = f"Path patching into the {in_words(s.get('receiver') or kind[11:])}"
    elif s.get("site") is None:
        what = "Patching"
    else:
        what = f"{SITE_WORDS.get(s['site'], in_words(s['site']))} patching"
    if s.get("normalized", True):
        return f"{what}, {corr}: share of {words} restored", f"share of {words} restored (0 = corrupted, 1 = clean)"
    return f"{what}, {corr}: {words}", f"{words} ({units})"


def describe(result: Result) -> tuple[str, str]:
    """(title, colour-bar label) in plain words for a result of a known kind; the kind itself otherwise."""
    s, kind = result.settings, result.kind
    words, units = _metric_words(s.get("metric"))
    if kind.startswith(("patch", "path_patch_", "exact_patch_")):
        return _patch_words(s, kind, words, units)
    if kind.startswith("dla_"):
        unit = {"head": "head", "layer": "component", "component": "component"}.get(kind[4:], kind[4:])
        return f"Direct logit attribution by {unit} ({words})", f"direct logit attribution ({units})"
    if kind == "head_ablation_sweep":
        return (f"Head ablation ({s.get('method', 'zero')}): change in {words}",
                f"change in {words} when ablated ({units})")
    if kind.startswith("attrib_patch"):
        return f"Attribution patching: estimated {words} restored", f"estimated change in {words} ({units})"
    if kind.startswith("probe"):
        return f"Linear probe for {in_words(s.get('feature', 'the feature'))}", "probe accuracy (fraction correct)"
    if kind.startswith("composition_"):
        return f"{kind[-1].upper()}-composition between heads (from the weights)", "composition score"
    return KIND_WORDS.get(kind, (kind.replace("_", " ").capitalize(), "value"))


def robust_limits(values, symmetric: bool = True, percentile: float = 99.0,
                  floor: float | None = None) -> tuple[float, float]:
    """Colour limits that one outlier cannot set: the ``percentile`` of |values| (symmetric) or of the values.

    numpy's ``higher`` method: with fewer than 100 finite values the limits are the extremes (nothing clipped).
    ``floor`` (symmetric only): never clip a value whose |value| is at most ``floor`` (for a normalised patch,
    1: a share restored is never clipped inside [-1, 1]).
    """
    import numpy as np

    v = np.asarray(torch.as_tensor(values).float().reshape(-1))
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (-1.0, 1.0) if symmetric else (0.0, 1.0)
    if symmetric:
        m = float(np.percentile(np.abs(v), percentile, method="higher"))
        if floor is not None:
            m = max(m, min(floor, float(np.abs(v).max())))
        m = m or float(np.abs(v).max()) or 1.0
        return -m, m
    lo = float(np.percentile(v, 100 - percentile, method="lower"))
    hi = float(np.percentile(v, percentile, method="higher"))
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


def scale_floor(result: Result) -> float | None:
    """1 for a normalised patching result (its natural scale, see `robust_limits`), else None."""
    return 1.0 if result.kind.startswith("patch_") and result.settings.get("normalized", True) else None


def _grid(n_f: int, n_rows: int, n_cols: int) -> tuple[int, int]:
    """(rows, cols) of panels for ``n_f`` facets of ``n_rows`` x ``n_cols`` cells: the grid closest to 3:2."""
    best = None
    for nc in range(1, min(n_f, 6) + 1):
        nr = -(-n_f // nc)
        aspect = (nc * (n_cols + 3)) / max(1, nr * (n_rows + 4))
        score = abs(math.log(aspect / 1.5)) + 0.3 * (nr * nc - n_f)
        best = min(best or (score, nr, nc), (score, nr, nc))
    return best[1], best[2]


def _figsize(nr: int, nc: int, n_rows: int, n_cols: int, extra_w: float = 1.4) -> tuple[tuple[float, float], float]:
    """Figure size (inches) and cell size for a grid of panels; cells square, within [MIN_CELL, MAX_CELL]."""
    cell = min(MAX_CELL, (MAX_W - extra_w - 1.0 * nc) / max(1, nc * n_cols), (MAX_H - 1.0 * nr) / max(1, nr * n_rows))
    cell = max(MIN_CELL, cell)
    w = nc * (n_cols * cell + 1.0) + extra_w
    h = nr * (max(n_rows * cell, 0.55) + 1.1) + 0.4
    return (min(MAX_W, max(4.0, w)), min(MAX_H, max(2.4, h))), cell


def _integer_axis(ax, which: str = "x", values=None) -> None:
    """Integer ticks: at each value when there are few, else matplotlib's integer locator."""
    from matplotlib.ticker import MaxNLocator

    axis = ax.xaxis if which == "x" else ax.yaxis
    if values is not None and len(values) <= 12:
        (ax.set_xticks if which == "x" else ax.set_yticks)(sorted({int(v) for v in values}))
    else:
        axis.set_major_locator(MaxNLocator(integer=True))


def _mark_clipped(ax, img, vmin: float, vmax: float) -> tuple[bool, bool]:
    """Triangles on cells beyond the colour limits (up: above, down: below). (any above, any below)."""
    import numpy as np

    a = np.asarray(img, dtype=float)
    hi, lo = np.argwhere(a > vmax + 1e-12), np.argwhere(a < vmin - 1e-12)
    for idx, marker in ((hi, "^"), (lo, "v")):
        if len(idx):
            ax.scatter(idx[:, 1], idx[:, 0], marker=marker, s=14, c="white", edgecolors="black", linewidths=0.5)
    return bool(len(hi)), bool(len(lo))


def _colorbar(fig, im, axs, label: str, clipped: tuple[bool, bool], limit: float | None = None):
    extend = {(True, True): "both", (True, False): "max", (False, True): "min"}.get(clipped, "neither")
    text = "\n".join(textwrap.wrap(label, 34))
    if extend != "neither":
        text += f"\n(\u25b2 \u25bc: beyond \u00b1{limit:.3g})" if limit is not None else "\n(\u25b2 \u25bc: beyond the scale)"
    cb = fig.colorbar(im, ax=axs, extend=extend, aspect=25)
    cb.set_label(text)
    return cb


def _draw_panel(ax, img, result: Result, rows: str, cols: str | None, vmin, vmax, cmap):
    im = ax.imshow(img, aspect="auto", cmap=cmap, interpolation="nearest", vmin=vmin, vmax=vmax)
    ax.set_ylabel(AXIS_WORDS.get(rows, rows))
    ax.set_yticks(range(img.shape[0]), [result.label(rows, i) for i in range(img.shape[0])])
    if cols:
        ax.set_xlabel(AXIS_WORDS.get(cols, cols))
        labels = [result.label(cols, i) for i in range(img.shape[1])]
        ax.set_xticks(range(img.shape[1]), labels, rotation=90 if max(map(len, labels), default=0) > 2 else 0)
    else:
        ax.set_xticks([])
    return im, _mark_clipped(ax, img, vmin, vmax)


# ---------------------------------------------------------------------------- heatmaps


def _heatmap_order(result: Result, rows, cols, facet) -> tuple[Tensor, str, str | None, str | None]:
    axes = list(result.axes)
    if result.values.ndim not in (1, 2, 3):
        raise ProbekitError(f"heatmap needs a 1-, 2- or 3-D result, got axes {result.axes}")
    if result.values.ndim == 3 and facet is None:
        free = [a for a in axes if a not in (rows, cols)]
        facet = free[-1] if free else axes[-1]
    rest = [a for a in axes if a != facet]
    rows = rows or rest[0]
    cols = cols or (rest[1] if len(rest) > 1 else None)
    for a in (rows, cols, facet):
        if a is not None and a not in axes:
            raise ProbekitError(f"axis {a!r} is not in the result's axes {result.axes}")
    order = [rows] + ([cols] if cols else []) + ([facet] if facet else [])
    if len(set(order)) != len(order) or len(order) != len(axes):
        raise ProbekitError(f"rows/cols/facet {order} must name each of the result's axes {result.axes} once")
    v = result.values.permute(*[axes.index(a) for a in order]).float()
    if cols is None:
        v = v[:, None]
    if facet is None:
        v = v[..., None]
    return v, rows, cols, facet


def heatmap(result: Result, path: str | Path | None = None, rows: str | None = None, cols: str | None = None,
            facet: str | None = None, title: str | None = None, cmap: str = "RdBu_r", symmetric: bool = True,
            label: str | None = None, limits: tuple[float, float] | None = None, percentile: float = 99.0):
    """Heatmap of a 1-, 2- or 3-D `Result` (3-D: a grid of panels, one per index of ``facet``, one shared
    colour scale). Saves PNG/SVG by suffix. Returns the matplotlib figure.

    Colour limits: ``limits``, else `robust_limits` (the ``percentile`` of |values|); cells beyond them are
    marked with triangles. ``title`` and the colour bar ``label`` default to `describe` of the result.
    """
    _check_result(result, "heatmap")
    plt = _plt()
    v, rows, cols, facet = _heatmap_order(result, rows, cols, facet)
    n_rows, n_cols, n_f = v.shape
    vmin, vmax = limits if limits is not None else robust_limits(v, symmetric, percentile, scale_floor(result))
    nr, nc = _grid(n_f, n_rows, n_cols)
    size, _ = _figsize(nr, nc, n_rows, n_cols)
    words = describe(result)
    with plt.rc_context(STYLE):
        fig, axs = plt.subplots(nr, nc, figsize=size, squeeze=False, layout="constrained")
        above = below = False
        for f in range(nr * nc):
            ax = axs.flat[f]
            if f >= n_f:
                ax.set_visible(False)
                continue
            im, (a, b) = _draw_panel(ax, v[:, :, f].numpy(), result, rows, cols, vmin, vmax, cmap)
            above, below = above or a, below or b
            if facet:
                lab = result.label(facet, f)
                ax.set_title(in_words(lab) if facet in ("hook", "site") else f"{facet} {lab}")
        _colorbar(fig, im, axs[:, :].ravel().tolist(), label or words[1], (above, below),
                  vmax if symmetric else None)
        fig.suptitle(title or words[0])
    return _finish(fig, path)


def heatmap_grid(results: dict[str, Result], path: str | Path | None = None, title: str | None = None,
                 cmap: str = "RdBu_r", symmetric: bool = True, label: str | None = None,
                 limits: tuple[float, float] | None = None, percentile: float = 99.0):
    """One panel per 1- or 2-D `Result` of ``results`` (``{panel title: result}``; rows: the first axis,
    columns: the second), one colour scale and one colour bar shared by every panel. Unlike `heatmap`'s
    facets the panels may differ in shape (models with different numbers of layers or heads).

    Colour limits: ``limits``, else `robust_limits` over every panel's values; ``title`` and ``label``
    default to `describe` of the first result. Returns the matplotlib figure.
    """
    if not isinstance(results, dict) or not results:
        raise ProbekitError(f"heatmap_grid needs a non-empty dict of Results, got {type(results).__name__}")
    for key, r in results.items():
        _check_result(r, f"heatmap_grid panel {key!r}")
        if r.values.ndim not in (1, 2):
            raise ProbekitError(f"heatmap_grid panel {key!r} has axes {r.axes}; expected a 1- or 2-D result")
    plt = _plt()
    imgs = {k: _heatmap_order(r, None, None, None)[0][:, :, 0] for k, r in results.items()}
    first = next(iter(results.values()))
    flat = torch.cat([v.reshape(-1) for v in imgs.values()])
    vmin, vmax = limits if limits is not None else robust_limits(flat, symmetric, percentile, scale_floor(first))
    n_rows, n_cols = max(v.shape[0] for v in imgs.values()), max(v.shape[1] for v in imgs.values())
    nr, nc = _grid(len(imgs), n_rows, n_cols)
    words = describe(first)
    with plt.rc_context(STYLE):
        fig, axs = plt.subplots(nr, nc, figsize=_figsize(nr, nc, n_rows, n_cols)[0], squeeze=False,
                                layout="constrained")
        above = below = False
        for ax in axs.flat[len(imgs):]:
            ax.set_visible(False)
        for ax, (key, img) in zip(axs.flat, imgs.items(), strict=False):
            r = results[key]
            im, (a, b) = _draw_panel(ax, img.numpy(), r, r.axes[0], r.axes[1] if r.values.ndim == 2 else None,
                                     vmin, vmax, cmap)
            above, below = above or a, below or b
            ax.set_title(str(key))
        _colorbar(fig, im, axs.ravel().tolist(), label or words[1], (above, below), vmax if symmetric else None)
        fig.suptitle(title or words[0])
    return _finish(fig, path)


def flatten_heads(result: Result) -> Result:
    """Merge ``layer`` and ``head`` axes into one ``head`` axis labelled ``L<l>H<h>``."""
    ax = list(result.axes)
    li, hi = ax.index("layer"), ax.index("head")
    rest = [i for i in range(len(ax)) if i not in (li, hi)]
    v = result.values.permute(li, hi, *rest)
    nL, nH = v.shape[:2]
    v = v.reshape(nL * nH, *v.shape[2:])
    labels = {a: result.labels[a] for a in ax if a not in ("layer", "head") and a in result.labels}
    labels["head"] = [f"L{result.label('layer', L)}H{result.label('head', h)}" for L in range(nL) for h in range(nH)]
    return Result(result.kind, v, ("head", *[ax[i] for i in rest]), labels, result.settings)


def _mean_over(result: Result, keep: set[str]) -> Result:
    drop = [i for i, a in enumerate(result.axes) if a not in keep]
    if not drop:
        return result
    v = result.values.float().mean(dim=drop)
    axes = tuple(a for a in result.axes if a in keep)
    return Result(result.kind, v, axes, {a: lab for a, lab in result.labels.items() if a in axes}, result.settings)


def check_plot(plot: str, kind: str, axes: tuple[str, ...]) -> None:
    """Raise if a ``plot`` (a name in `PLOTS`) cannot be drawn from a result of this kind and axes."""
    if plot not in PLOTS:
        raise ProbekitError(f"unknown plot {plot!r}; expected one of {sorted(PLOTS)}")
    axes = tuple(axes)
    if plot == "layer-head" and not ("layer" in axes and "head" in axes):
        raise ProbekitError(f"layer-head plot got a {kind!r} result with axes {axes}; expected 'layer' and 'head' axes")
    if plot == "layer-pos" and not ("pos" in axes and any(a in axes for a in ("component", "layer", "head"))):
        raise ProbekitError(f"layer-pos plot got a {kind!r} result with axes {axes}; "
                            f"expected a 'pos' axis and a 'layer', 'head' or 'component' axis")


def plot(result: Result, name: str, path: str | Path | None = None, title: str | None = None):
    """Draw the plot called ``name`` (``layer-head`` or ``layer-pos``) from ``result``."""
    _check_result(result, f"plot {name!r}")
    check_plot(name, result.kind, result.axes)
    return PLOTS[name](result, path, title=title)


def layer_head_heatmap(result: Result, path: str | Path | None = None, title: str | None = None,
                       absolute: bool = False):
    """Layer x head heatmap; other axes (pos, batch, ...) are averaged (of |value| if ``absolute``)."""
    _check_result(result, "layer_head_heatmap")
    check_plot("layer-head", result.kind, result.axes)
    r = result
    if absolute:
        r = Result(r.kind, r.values.abs(), r.axes, r.labels, r.settings)
    r = _mean_over(r, {"layer", "head"})
    others = [a for a in result.axes if a not in ("layer", "head")]
    note = f" (mean{' |.|' if absolute else ''} over {', '.join(others)})" if others else ""
    words = describe(result)
    return heatmap(r, path, rows="layer", cols="head", title=(title or words[0]) + note,
                   label=("|.| of " if absolute else "") + words[1], cmap="viridis" if absolute else "RdBu_r",
                   symmetric=not absolute)


def layer_pos_heatmap(result: Result, path: str | Path | None = None, title: str | None = None):
    """(layer | component | head) x position heatmap with the positions' token labels.

    Accepts DLA by layer (pos, component), DLA by head and patching by head (layer, pos, head), patching
    by MLP (layer, pos); other axes (``batch``, ``src``) are averaged.
    """
    _check_result(result, "layer_pos_heatmap")
    check_plot("layer-pos", result.kind, result.axes)
    rows = next(a for a in ("component", "layer", "head") if a in result.axes)
    r = result
    if "layer" in r.axes and "head" in r.axes:
        r = flatten_heads(r)
        rows = "head"
    r = _mean_over(r, {"pos", rows})
    if r.values.ndim != 2:
        raise ProbekitError(f"layer_pos_heatmap cannot reduce axes {result.axes} to ({rows}, pos)")
    return heatmap(r, path, rows=rows, cols="pos", title=title)


PLOTS = {"layer-head": layer_head_heatmap, "layer-pos": layer_pos_heatmap}


# ---------------------------------------------------------------------------- line plots


_PROBE_SWEEP_AXES = ("hook", "layer", "position", "split")


def _is_probe_sweep(result: Result) -> bool:
    return result.axes == _PROBE_SWEEP_AXES and "splits" in result.settings


def _check_probe_sweep(sweep, what: str) -> None:
    if not isinstance(sweep, Result) or not _is_probe_sweep(sweep):
        got = f"axes {sweep.axes}" if isinstance(sweep, Result) else type(sweep).__name__
        raise ProbekitError(f"{what} needs a probe sweep (probe_sweep / probe_lengths) with axes {_PROBE_SWEEP_AXES}, "
                            f"got {got}")


def probe_by_length(sweep: Result, position: str | int = "all") -> Result:
    """A probe sweep's metric on its held-out splits at one ``position``, as a (hook, layer, length) Result."""
    _check_probe_sweep(sweep, "probe_by_length")
    if str(position) not in sweep.labels["position"]:
        raise ProbekitError(f"position {position!r} is not in the sweep; expected one of {sweep.labels['position']}")
    p = sweep.labels["position"].index(str(position))
    splits = [s for s in sweep.labels["split"] if s != "train"]
    cols = [sweep.labels["split"].index(s) for s in splits]
    return Result(kind=f"probe for {sweep.settings.get('feature')}", values=sweep.values[:, :, p, cols],
                  axes=("hook", "layer", "length"),
                  labels={"hook": sweep.labels["hook"], "layer": sweep.labels["layer"],
                          "length": [str(sweep.settings["splits"][s]["length"]) for s in splits]},
                  settings=sweep.settings)


def probe_by_site(sweep: Result, split: str) -> Result:
    """A probe sweep on one ``split`` as a (site, position) Result: one row per fitted (hook, layer), labelled like
    ``resid_mid L1``, one column per position slot that has a value (the pooled ``all`` column dropped)."""
    _check_probe_sweep(sweep, "probe_by_site")
    if split not in sweep.labels["split"]:
        raise ProbekitError(f"split {split!r} is not in the sweep; expected one of {sweep.labels['split']}")
    s = sweep.labels["split"].index(split)
    slots = [i for i, p in enumerate(sweep.labels["position"]) if p != "all"]
    v = sweep.values[:, :, slots, s]  # hook layer slot
    v = v.reshape(-1, v.shape[-1])
    keep, fitted = ~torch.isnan(v).all(0), ~torch.isnan(v).all(1)  # (hooks x layers is a grid; not every cell is fitted)
    sites = [f"{h.removeprefix('hook_')} L{L}" for h in sweep.labels["hook"] for L in sweep.labels["layer"]]
    return Result(kind=f"probe for {sweep.settings.get('feature')} ({split})", values=v[fitted][:, keep],
                  axes=("site", "position"),
                  labels={"site": [site for site, f in zip(sites, fitted.tolist(), strict=True) if f],
                          "position": [sweep.labels["position"][i] for i, k in zip(slots, keep.tolist(), strict=True)
                                       if k]},
                  settings=sweep.settings)


def probe_chance(sweep: Result) -> float:
    """The majority-class baseline of a probe sweep (the best constant predictor, pooled positions, last split)."""
    _check_probe_sweep(sweep, "probe_chance")
    p = sweep.labels["position"].index("all")
    return float(torch.nan_to_num(sweep.extra["majority"][:, :, p, -1], nan=0.0).max())


def _probe_wilson(sweep: Result) -> Tensor | None:
    """Distances from each held-out probe accuracy to its 95 % Wilson bounds, (2, hook, layer, length), from the
    rows scored (``extra['n']``); None for R^2 probes or without row counts."""
    from probekit.evaluate import wilson

    if sweep.settings.get("metric") != "accuracy" or "n" not in sweep.extra:
        return None
    p = sweep.labels["position"].index("all")
    cols = [i for i, s in enumerate(sweep.labels["split"]) if s != "train"]
    acc, n = sweep.values[:, :, p, cols].float(), sweep.extra["n"][:, :, p, cols].float()
    out = torch.full((2, *acc.shape), float("nan"))
    for idx in torch.nonzero(torch.isfinite(acc) & (n > 0)).tolist():
        k, m = round(float(acc[tuple(idx)] * n[tuple(idx)])), int(n[tuple(idx)])
        lo, hi = wilson(k, m)
        out[(0, *idx)], out[(1, *idx)] = float(acc[tuple(idx)]) - lo, hi - float(acc[tuple(idx)])
    return out


def probe_accuracy(result: Result, path: str | Path | None = None, title: str | None = None,
                   chance: float | None = None):
    """Probe accuracy by layer, one line per length; a third axis gives one panel per index.

    A `probekit.probes.ProbeSweep` is drawn as `probe_by_length` of it, with `probe_chance` as ``chance``.
    """
    _check_result(result, "probe_accuracy")
    band = None
    if _is_probe_sweep(result):
        chance = probe_chance(result) if chance is None else chance
        band = _probe_wilson(result)
        result = probe_by_length(result)
    if "layer" not in result.axes or "length" not in result.axes or result.values.ndim not in (2, 3):
        raise ProbekitError(f"probe_accuracy got a {result.kind!r} result with axes {result.axes}; "
                            f"expected 'layer' and 'length' axes (and at most one more)")
    plt = _plt()
    ax_names = list(result.axes)
    facet = next((a for a in ax_names if a not in ("layer", "length")), None)
    order = ["layer", "length"] + ([facet] if facet else [])
    v = result.values.permute(*[ax_names.index(a) for a in order]).float()
    if facet is None:
        v = v[..., None]
    nL, nLen, nF = v.shape
    chance = chance if chance is not None else result.settings.get("chance")
    with plt.rc_context(STYLE):
        fig, axs = plt.subplots(1, nF, figsize=(min(20, 4.2 * nF), 3.2), squeeze=False, sharey=True)
        cmap = plt.get_cmap("viridis")
        for f in range(nF):
            ax = axs[0, f]
            for j in range(nLen):
                color = cmap(j / max(1, nLen - 1))
                ax.plot(range(nL), v[:, j, f].numpy(), marker="o", color=color,
                        label=f"length {result.label('length', j)}")
                if band is not None and facet == "hook":
                    ax.errorbar(range(nL), v[:, j, f].numpy(), yerr=band[:, f, :, j].abs().numpy(), fmt="none",
                                ecolor=color, elinewidth=0.8, capsize=2)
            if chance is not None:
                ax.axhline(float(chance), color="grey", ls=":", lw=1, label="chance")
            ax.set_xticks(range(nL), [result.label("layer", i) for i in range(nL)])
            ax.set_xlabel("layer")
            ax.set_xlim(-0.3, nL - 0.7)
            ax.set_ylim(0, 1.02)
            if facet:
                label = result.label(facet, f)
                ax.set_title(in_words(label) if facet == "hook" else f"{facet} {label}")
        axs[0, 0].set_ylabel("probe accuracy (fraction correct)")
        axs[0, -1].legend(loc="best", frameon=False, title="test length" if nLen > 1 else None)
        fig.suptitle(title or f"Linear probe for {in_words(result.settings.get('feature', 'the feature'))}: held-out "
                     "accuracy by layer" + (" (bars: 95 % Wilson intervals)" if band is not None else ""))
        fig.tight_layout()
    return _finish(fig, path)


def _eval_results(results, what: str) -> dict:
    """``results`` (an EvalResult, a list, or {name: EvalResult}) as {name: EvalResult}, checked."""
    from probekit.evaluate import EvalResult

    if isinstance(results, EvalResult):
        results = {results.model: results}
    elif isinstance(results, list | tuple):
        names = [r.model if isinstance(r, EvalResult) else str(i) for i, r in enumerate(results)]
        if len(set(names)) < len(names):
            names = [f"{nm} ({i})" for i, nm in enumerate(names)]
        results = dict(zip(names, results, strict=True))
    if not isinstance(results, dict) or not results:
        raise ProbekitError(f"{what} needs EvalResult(s) from probekit.evaluate, got {type(results).__name__}")
    for name, r in results.items():
        if not isinstance(r, EvalResult):
            kind = f" of kind {r.kind!r}" if isinstance(r, Result) else ""
            raise ProbekitError(f"{what} needs EvalResult(s) from probekit.evaluate; {name!r} is a "
                                f"{type(r).__name__}{kind}")
        if not r.records:
            raise ProbekitError(f"EvalResult {name!r} has no records")
    return results


def _accuracy_lines(ax, results: dict, train_lengths=None) -> None:
    """Exact match vs length of each model on ``ax``, with its 95 % Wilson band."""
    for name, r in results.items():
        recs = sorted(r.records, key=lambda x: x["length"])
        xs = [x["length"] for x in recs]
        (line,) = ax.plot(xs, [x["exact_match"] for x in recs], marker="o", label=name)
        ax.fill_between(xs, [x["exact_match_ci95"][0] for x in recs], [x["exact_match_ci95"][1] for x in recs],
                        color=line.get_color(), alpha=0.2, lw=0)
    if train_lengths is not None:
        ax.axvspan(train_lengths[0], train_lengths[1], color="grey", alpha=0.12, lw=0, label="trained lengths")
    ax.set_xlabel("input length")
    _integer_axis(ax, "x", [x["length"] for r in results.values() for x in r.records])
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="best", frameon=False)


def accuracy_vs_length(results, path: str | Path | None = None, title: str | None = None,
                       train_lengths: tuple[int, int] | None = None):
    """Exact match vs length with 95 % Wilson intervals; ``results``: an EvalResult, a list, or {name: EvalResult}."""
    results = _eval_results(results, "accuracy_vs_length")
    plt = _plt()
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        _accuracy_lines(ax, results, train_lengths)
        ax.set_ylabel("exact match (fraction of examples)")
        ax.set_title(title or "Exact match vs length (greedy decoding; bands: 95 % Wilson intervals)")
        fig.tight_layout()
    return _finish(fig, path)


def accuracy_grid(groups: dict, path: str | Path | None = None, title: str | None = None):
    """Exact match vs length, one panel per group (``{panel title: results}``, each as `accuracy_vs_length`
    takes them), side by side with one shared accuracy axis; 95 % Wilson bands; each panel's legend below it,
    off the lines."""
    if not isinstance(groups, dict) or not groups:
        raise ProbekitError(f"accuracy_grid needs a non-empty dict of groups, got {type(groups).__name__}")
    groups = {k: _eval_results(v, f"accuracy_grid panel {k!r}") for k, v in groups.items()}
    plt = _plt()
    with plt.rc_context(STYLE):
        rows = max(math.ceil(len(r) / 2) for r in groups.values())  # legend rows below each panel
        fig, axs = plt.subplots(1, len(groups), figsize=(min(MAX_W, 4.6 * len(groups)), 3.4 + 0.22 * rows),
                                sharey=True, squeeze=False, layout="constrained")
        for ax, (key, results) in zip(axs[0], groups.items(), strict=True):
            _accuracy_lines(ax, results)
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False, fontsize=7)
            ax.set_title(str(key))
        axs[0, 0].set_ylabel("exact match (fraction of examples)")
        fig.suptitle(title or "Exact match vs length (greedy decoding; bands: 95 % Wilson intervals)")
    return _finish(fig, path)


# ---------------------------------------------------------------------------- attention HTML


def attention_html(model, batch: Batch | torch.Tensor, task=None, example: int = 0,
                   heads: list[tuple[int, int]] | None = None, path: str | Path | None = None,
                   title: str | None = None, device=None) -> str:
    """A standalone HTML page (JavaScript inlined, works offline) with the attention patterns of one
    example: every head (or ``heads``) in one circuitsvis view, the task's tokens as labels.

    Returns the HTML; writes it to ``path`` if given.
    """
    import circuitsvis.attention as cva

    tokens = batch.tokens if isinstance(batch, Batch) else torch.as_tensor(batch)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or not 0 <= example < tokens.shape[0]:
        raise ProbekitError(f"example {example} is not in a batch of shape {tuple(tokens.shape)}")
    from probekit.attribution import all_heads, head_label, parse_heads

    heads = parse_heads(heads, model) if heads is not None else all_heads(model)
    row = tokens[example:example + 1]
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    names = {f"blocks.{L}.attn.hook_pattern" for L, _ in heads}
    with torch.no_grad():
        _, cache = model.run_with_cache(row.to(dev), names_filter=lambda n: n in names)
    att = torch.stack([cache[f"blocks.{L}.attn.hook_pattern"][0, h] for L, h in heads]).float().cpu()
    ids = row[0].tolist()
    vocab = getattr(task, "vocab", None)
    labels = [vocab[i] if vocab is not None and 0 <= i < len(vocab) else str(i) for i in ids]
    view = cva.attention_heads(attention=att, tokens=labels, attention_head_names=[head_label(L, h) for L, h in heads],
                               mask_upper_tri=True)
    name = getattr(model, "probekit_name", "model")
    title = title or f"{name}: attention patterns, example {example}"
    page = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_html.escape(title)}</title></head>\n<body style=\"font-family: sans-serif\">\n"
            f"<h2>{_html.escape(title)}</h2>\n<p>{_html.escape(' '.join(labels))}</p>\n"
            f"{view.local_src}\n</body></html>\n")
    if path is not None:
        write_text(path, page)
    return page


def mechanism_vs_length(rows: list[dict], metric: str, accuracy: str = "exact_match", path: str | Path | None = None,
                        title: str | None = None):
    """One line per model: a mechanism metric (solid) and accuracy (dashed) against length, on one axis.

    ``rows``: dicts with ``model``, ``length``, ``metric`` and ``accuracy`` keys (as in a study's table).
    """
    if not rows or any(k not in rows[0] for k in ("model", "length", metric)):
        raise ProbekitError(f"mechanism_vs_length needs rows with 'model', 'length' and {metric!r}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for i, m in enumerate(models):
        rs = [r for r in rows if r["model"] == m]
        xs = [r["length"] for r in rs]
        color = f"C{i}"
        ax.plot(xs, [r[metric] for r in rs], "-o", color=color, label=f"{m}: {in_words(metric)}")
        acc = [r.get(accuracy) for r in rs]
        if any(a is not None for a in acc):
            ax.plot([x for x, a in zip(xs, acc, strict=True) if a is not None], [a for a in acc if a is not None],
                    "--s", color=color, alpha=0.6, label=f"{m}: {in_words(accuracy)}")
    ax.set_xlabel("length")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xscale("log")
    lengths = sorted({int(r["length"]) for r in rows})
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    ax.set_title(title or f"{in_words(metric).capitalize()} (solid) and {in_words(accuracy)} (dashed) vs length",
                 fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


def _interval_panel(ax, rows: list[dict], x: str, y: str, lo: str, hi: str, hue: str | None, numeric: bool,
                    cats: list, groups: list) -> None:
    width = 0.7 / max(1, len(groups))
    for i, g in enumerate(groups):
        rs = [r for r in rows if hue is None or r[hue] == g]
        if not rs:
            continue
        if numeric:
            rs = sorted(rs, key=lambda r: r[x])
            xs = [float(r[x]) for r in rs]
        else:
            xs = [cats.index(r[x]) + (i - (len(groups) - 1) / 2) * width for r in rs]
        ys = [r[y] for r in rs]
        err = [[max(0.0, r[y] - r[lo]) for r in rs], [max(0.0, r[hi] - r[y]) for r in rs]]
        ax.errorbar(xs, ys, yerr=err, fmt="-o" if numeric else "o", ms=4, capsize=2.5, lw=1.2, color=f"C{i % 10}",
                    label=None if g is None else str(g))


def _interval_axes(ax, rows: list[dict], x: str, numeric: bool, cats: list, log_x: bool, xlabel: str | None) -> None:
    if numeric:
        if log_x:
            ax.set_xscale("log")
            ax.minorticks_off()
        xs = sorted({float(r[x]) for r in rows})
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
    else:
        ax.set_xticks(range(len(cats)), [str(c) for c in cats], rotation=45 if len(cats) > 6 else 0)
    ax.set_xlabel(xlabel or x)


def interval_plot(rows: list[dict], x: str, y: str = "value", lo: str = "lo", hi: str = "hi", hue: str | None = None,
                  facet: str | None = None, path: str | Path | None = None, title: str | None = None,
                  xlabel: str | None = None, ylabel: str | None = None, reference: float | None = None,
                  reference_label: str | None = None, log_x: bool = False):
    """Estimates with 95 % intervals from table rows (dicts): one colour per ``hue`` value (the same in every
    panel), one panel per ``facet`` value (shared y scale), one legend beside the panels. A numeric ``x``
    (e.g. length) draws lines, a categorical one dodged points. ``reference``: a dashed horizontal line
    (chance, a threshold) labelled ``reference_label``. Rows whose ``y``, ``lo`` or ``hi`` is missing or NaN
    are left out."""
    need = [k for k in (x, y, lo, hi, hue, facet) if k]
    rows = [r for r in rows if all(k in r and r[k] is not None for k in need)
            and all(not (isinstance(r[k], float) and math.isnan(r[k])) for k in (y, lo, hi))]
    if not rows:
        raise ProbekitError(f"interval_plot got no rows with all of {need} set; expected table rows holding them")
    numeric = all(isinstance(r[x], int | float) for r in rows)
    cats = list(dict.fromkeys(r[x] for r in rows))
    groups = list(dict.fromkeys(r[hue] for r in rows)) if hue else [None]
    facets = list(dict.fromkeys(r[facet] for r in rows)) if facet else [None]
    plt = _plt()
    with plt.rc_context(STYLE):
        nr, nc = _grid(len(facets), 4, 6)
        fig, axs = plt.subplots(nr, nc, figsize=(min(MAX_W, 4.4 * nc + 2.4), min(MAX_H, 3.0 * nr + 0.6)),
                                squeeze=False, sharey=True)
        for ax, f in zip(axs.flat, facets, strict=False):
            _interval_panel(ax, [r for r in rows if facet is None or r[facet] == f], x, y, lo, hi, hue, numeric, cats,
                            groups)
            if reference is not None:
                ax.axhline(reference, color="grey", ls="--", lw=0.9, label=reference_label)
            _interval_axes(ax, rows, x, numeric, cats, log_x, xlabel)
            if f is not None:
                ax.set_title(str(f))
        for ax in axs.flat[len(facets):]:
            ax.set_visible(False)
        for ax in axs[:, 0]:
            ax.set_ylabel(ylabel or y)
        handles = {}
        for ax in axs.flat[:len(facets)]:
            for hd, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(lab, hd)
        if handles:
            fig.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.0, 0.95),
                       frameon=False, fontsize=7)
        fig.suptitle(title or f"{y} by {x} (bars: 95 % intervals)")
        fig.tight_layout()
    return _finish(fig, path)


def _result_interval_panel(ax, r: Result, legend: bool = True) -> None:
    """One panel of `result_intervals`: estimates with their 95 % intervals, one marker per group; ``legend``:
    its own legend on its right."""
    v = r.values.float()[:, None] if r.values.ndim == 1 else r.values.float()
    lo = r.extra["lo"].float().reshape(v.shape)
    hi = r.extra["hi"].float().reshape(v.shape)
    items = [r.label(r.axes[0], i) for i in range(v.shape[0])]
    groups = [r.label(r.axes[1], j) for j in range(v.shape[1])] if r.values.ndim == 2 else [None]
    width = 0.7 / len(groups)
    for j, g in enumerate(groups):
        x = torch.arange(len(items)) + (j - (len(groups) - 1) / 2) * width
        err = torch.stack([(v[:, j] - lo[:, j]).clamp_min(0), (hi[:, j] - v[:, j]).clamp_min(0)]).nan_to_num(0)
        ax.errorbar(x.numpy(), v[:, j].numpy(), yerr=err.numpy(), fmt="o", ms=5, capsize=3, color=f"C{j}",
                    label=g)
    for k, (label, y) in enumerate((r.settings.get("reference") or {}).items()):
        ax.axhline(float(y), color="0.4", ls=("--", ":", "-.")[k % 3], lw=0.8, label=label)
    ax.set_xticks(range(len(items)), items, rotation=20 if max(map(len, items)) > 8 else 0, ha="right"
                  if max(map(len, items)) > 8 else "center")
    ax.set_xlim(-0.6, len(items) - 0.4)
    ax.set_xlabel(r.settings.get("xlabel", r.axes[0]))
    ax.set_ylabel(r.settings.get("ylabel", r.kind))
    ax.set_title(textwrap.fill(r.settings.get("title", r.kind), 48))
    if legend and (len(groups) > 1 or r.settings.get("reference")):
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


def _legend_key(r: Result) -> tuple:
    """What a `result_intervals` panel's legend lists: its groups and reference lines."""
    groups = [r.label(r.axes[1], j) for j in range(r.values.shape[1])] if r.values.ndim == 2 else []
    return (*groups, *(r.settings.get("reference") or {}))


def result_intervals(results: Result | list[Result], path: str | Path | None = None, title: str | None = None):
    """Estimates with 95 % intervals, one panel per result, side by side (two a row when one row would be wider
    than `ROW_W`); panels whose groups and reference lines agree share one legend.

    Each result has axes ``(item,)`` or ``(item, group)`` (one marker per group at each item) and ``extra``
    ``lo`` / ``hi`` of the same shape (the interval). Words come from its settings: ``title``, ``xlabel``,
    ``ylabel``, and ``reference`` (``{label: y}``: horizontal lines such as a threshold or chance).
    """
    results = [results] if isinstance(results, Result) else list(results)
    if not results:
        raise ProbekitError("result_intervals needs at least one Result")
    for r in results:
        _check_result(r, "result_intervals")
        if r.values.ndim not in (1, 2) or not {"lo", "hi"} <= set(r.extra) or r.extra["lo"].shape != r.values.shape:
            raise ProbekitError(f"result_intervals needs results with axes (item,) or (item, group) and extra 'lo'/'hi' "
                                f"of the same shape; got axes {r.axes}, extra {sorted(r.extra)}")
    shared = len(results) > 1 and len({_legend_key(r) for r in results}) == 1  # one legend for all panels
    plt = _plt()
    with plt.rc_context(STYLE):
        widths = [max(3.0, 0.9 * r.values.shape[0] + 1.6) + (0 if shared else 1.4) for r in results]
        nc = len(results) if sum(widths) <= ROW_W else min(len(results), 2)  # wrapped: two panels a row
        nr = -(-len(results) // nc)
        cols = [max(widths[i] for i in range(c, len(results), nc)) for c in range(nc)]
        fig, axs = plt.subplots(nr, nc, figsize=(sum(cols) + (1.6 if shared and nr * nc == len(results) else 0),
                                                 3.6 * nr), squeeze=False, gridspec_kw={"width_ratios": cols})
        for ax, r in zip(axs.flat, results, strict=False):
            _result_interval_panel(ax, r, legend=not shared)
        for ax in axs.flat[len(results):]:
            ax.set_axis_off()
        if shared and _legend_key(results[0]):
            handles, labels = axs.flat[0].get_legend_handles_labels()
            if nr * nc > len(results):  # the empty slot holds the legend
                axs.flat[len(results)].legend(handles, labels, loc="center", frameon=False)
            else:
                fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.92), frameon=False)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return _finish(fig, path)


# ---------------------------------------------------------------------------- comparisons of two models


def _check_comparison(result: Result, what: str) -> tuple[str, str]:
    _check_result(result, what)
    if not result.axes or result.axes[0] != "model" or result.values.shape[0] != 3:
        raise ProbekitError(f"{what} needs a comparison result (probekit.compare) with a leading 'model' axis of "
                            f"(A, B, B - A), got axes {result.axes} and shape {tuple(result.values.shape)}")
    a, b, _ = result.labels["model"]
    return a, b


def _as_rows_cols(result: Result) -> tuple[Result, str, str | None]:
    """A 1-, 2- or 3-D map as (rows, cols): heads flattened to ``L<l>H<h>`` when there are positions too."""
    if "layer" in result.axes and "head" in result.axes and result.values.ndim == 3:
        result = flatten_heads(result)
    if result.values.ndim > 2:
        raise ProbekitError(f"cannot draw axes {result.axes} as one map; expected at most (layer, pos, head)")
    axes = result.axes
    rows = next((a for a in ("component", "layer", "head") if a in axes), axes[0])
    if rows == "layer" and "head" in axes:
        return result, "layer", "head"
    return result, rows, next((a for a in axes if a != rows), None)


def compare_heatmap(result: Result, path: str | Path | None = None, title: str | None = None):
    """Model A, model B (one shared colour scale) and B - A (a diverging map, its own symmetric scale)."""
    name_a, name_b = _check_comparison(result, "compare_heatmap")
    plt = _plt()
    from probekit.compare import entry

    parts = [_as_rows_cols(entry(result, i)) for i in range(3)]
    r0, rows, cols = parts[0]
    img = [p[0].values.float() if cols else p[0].values.float()[:, None] for p in parts]
    n_rows, n_cols = img[0].shape
    floor = scale_floor(r0)
    shared = robust_limits(torch.cat([img[0].reshape(-1), img[1].reshape(-1)]), floor=floor)
    diff = robust_limits(img[2], floor=floor)
    nr, nc = (3, 1) if n_cols > 2.2 * n_rows and n_cols > 12 else (1, 3)
    size, _ = _figsize(nr, nc, n_rows, n_cols, extra_w=2.4)
    words = describe(r0)
    with plt.rc_context(STYLE):
        fig, axs = plt.subplots(nr, nc, figsize=size, squeeze=False, layout="constrained")
        axs = axs.ravel()
        clipped = [False, False]
        for i, (name, lim, cmap) in enumerate(((name_a, shared, "RdBu_r"), (name_b, shared, "RdBu_r"),
                                               (f"{name_b} - {name_a}", diff, "PuOr_r"))):
            im, c = _draw_panel(axs[i], img[i].numpy(), r0, rows, cols, lim[0], lim[1], cmap)
            axs[i].set_title(name if i < 2 else f"difference: {name}")
            if i < 2:
                clipped = [clipped[0] or c[0], clipped[1] or c[1]]
                if i == 1:
                    _colorbar(fig, im, [axs[0], axs[1]], words[1], tuple(clipped), shared[1])
            else:
                _colorbar(fig, im, [axs[2]], f"B - A: {words[1]}", c, diff[1])
        fig.suptitle(title or f"{words[0]}\n{name_a} vs {name_b}")
    return _finish(fig, path)


def _line_panels(plt, n: int = 3, width: float = 12.0):
    fig, axs = plt.subplots(1, n, figsize=(width, 3.4), squeeze=False, layout="constrained")
    return fig, axs[0]


def compare_accuracy(result: Result, path: str | Path | None = None, title: str | None = None):
    """Exact match by length of model A and B (95 % Wilson bands, shared axis) and B - A (Newcombe's interval)."""
    name_a, name_b = _check_comparison(result, "compare_accuracy")
    if result.axes != ("model", "length") or not {"ci_low", "ci_high"} <= set(result.extra):
        raise ProbekitError(f"compare_accuracy needs axes ('model', 'length') with ci_low / ci_high, got {result.axes}")
    plt = _plt()
    xs = [int(x) for x in result.labels["length"]]
    v, lo, hi = result.values.float(), result.extra["ci_low"].float(), result.extra["ci_high"].float()
    with plt.rc_context(STYLE):
        fig, axs = _line_panels(plt)
        for i, (ax, name) in enumerate(zip(axs, (name_a, name_b, f"{name_b} - {name_a}"), strict=True)):
            color = ("C0", "C1", "C2")[i]
            ax.plot(xs, v[i].numpy(), marker="o", color=color, label=name)
            ax.fill_between(xs, lo[i].numpy(), hi[i].numpy(), color=color, alpha=0.2, lw=0, label="95 % interval")
            ax.set_xlabel("input length")
            _integer_axis(ax, "x", xs)
            if i < 2:
                ax.set_ylim(-0.02, 1.02)
                ax.set_title(name)
            else:
                ax.axhline(0, color="grey", lw=0.8)
                m = max(0.05, float(torch.nan_to_num(torch.stack([lo[2], hi[2]]).abs()).max()) * 1.05)
                ax.set_ylim(-m, m)
                ax.set_title(f"difference: {name}")
            ax.legend(loc="best", frameon=False)
        axs[0].set_ylabel("exact match (fraction of examples)")
        axs[2].set_ylabel("B - A (exact match)")
        axs[1].sharey(axs[0])
        fig.suptitle(title or f"Exact match vs length, greedy decoding: {name_a} vs {name_b}")
    return _finish(fig, path)


def compare_probe(result: Result, path: str | Path | None = None, title: str | None = None):
    """Probe accuracy by layer of model A and B (one line per test length, shared axis) and B - A."""
    name_a, name_b = _check_comparison(result, "compare_probe")
    if result.axes != ("model", "layer", "length"):
        raise ProbekitError(f"compare_probe needs axes ('model', 'layer', 'length'), got {result.axes}")
    plt = _plt()
    v = result.values.float()
    nL, nLen = v.shape[1:]
    cmap = plt.get_cmap("viridis")
    with plt.rc_context(STYLE):
        fig, axs = _line_panels(plt)
        for i, ax in enumerate(axs):
            for j in range(nLen):
                ax.plot(range(nL), v[i, :, j].numpy(), marker="o", color=cmap(j / max(1, nLen - 1)),
                        label=f"length {result.label('length', j)}")
            ax.set_xticks(range(nL), [result.label("layer", k) for k in range(nL)])
            ax.set_xlim(-0.3, nL - 0.7)
            ax.set_xlabel("layer")
            if i < 2:
                ax.set_ylim(0, 1.02)
                ax.set_title((name_a, name_b)[i])
            else:
                ax.axhline(0, color="grey", lw=0.8)
                m = max(0.05, float(torch.nan_to_num(v[2]).abs().max()) * 1.1)
                ax.set_ylim(-m, m)
                ax.set_title(f"difference: {name_b} - {name_a}")
        axs[0].set_ylabel("probe accuracy (fraction correct)")
        axs[2].set_ylabel("B - A (probe accuracy)")
        axs[1].legend(loc="best", frameon=False, title="test length")
        feat = result.settings.get("feature", "the feature")
        fig.suptitle(title or f"Linear probe for {feat}: held-out accuracy by layer, {name_a} vs {name_b}")
    return _finish(fig, path)


# ---------------------------------------------------------------------------- training


def _running_mean(y: list[float], w: int) -> list[float]:
    import numpy as np

    a = np.asarray(y, dtype=float)
    return [float(np.nanmean(a[max(0, i - w + 1):i + 1])) for i in range(len(a))]


def plot_training_log(log_path: str | Path, out_png: str | Path | None = None):
    """Loss and token accuracy against step from a ``train_log.jsonl``; written to ``out_png`` (atomically)."""
    import json

    plt = _plt()
    rows = [json.loads(ln) for ln in Path(log_path).read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "step" in r and "loss" in r]
    if not rows:
        raise ProbekitError(f"{log_path} has no training records; expected JSON lines with 'step' and 'loss'")
    steps = [r["step"] for r in rows]
    with plt.rc_context(STYLE):
        fig, (a0, a1) = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
        for ax, key, color in ((a0, "loss", "C0"), (a1, "token_acc", "C1")):
            y = [float("nan") if r.get(key) is None else r[key] for r in rows]
            w = max(1, len(y) // 20)
            ax.plot(steps, y, color=color, alpha=0.35 if w > 1 else 1.0, lw=1, label="logged")
            if w > 1:
                ax.plot(steps, _running_mean(y, w), color=color, lw=1.6, label=f"running mean of {w}")
                ax.legend(frameon=False, loc="best")
        a0.set_yscale("log")
        a0.set_ylabel("training loss (cross-entropy, nats)")
        a1.set_ylim(-0.02, 1.02)
        a1.set_ylabel("token accuracy on answer positions")
        for ax in (a0, a1):
            ax.set_xlabel("step")
            _integer_axis(ax, "x")
        fig.suptitle(f"Training: loss and answer-token accuracy ({Path(log_path).parent.name or 'run'})")
    if out_png is not None:
        _save_atomic(fig, out_png, dpi=110)
        plt.close(fig)
    return fig


# ---------------------------------------------------------------------------- notebooks


def show(fig) -> None:
    """Display a matplotlib figure inline (in a notebook) and close it, so it is neither kept nor shown twice."""
    from IPython.display import display

    display(fig)
    _plt().close(fig)


def show_html(page: str, height: int = 560) -> None:
    """Display a standalone HTML page (e.g. `attention_html`'s) inline, in an ``<iframe srcdoc>`` of ``height``
    pixels, so that its scripts run isolated from the notebook's."""
    from IPython.display import HTML, display

    display(HTML(f'<div><iframe srcdoc="{_html.escape(page, quote=True)}" '
                 f'style="width:100%;height:{int(height)}px;border:0"></iframe></div>'))
