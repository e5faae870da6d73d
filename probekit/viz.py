"""Figures drawn from result objects only, and attention patterns as standalone offline HTML.

matplotlib and circuitsvis are imported inside the functions that need them. Every matplotlib figure uses
one style (`STYLE`); ``path`` picks the format by suffix (``.png`` or ``.svg``; no suffix writes both)
and files are written atomically (temporary file, then rename).

- `heatmap`: any 1-3-D `Result` (3-D: one panel per index of ``facet``).
- `layer_head_heatmap`: layer x head, from any result with ``layer`` and ``head`` axes (other axes averaged).
- `layer_pos_heatmap`: (layer | component | head) x position with the positions' token labels.
- `probe_accuracy`: accuracy by layer, one line per length, from a result with ``layer`` and ``length`` axes.
- `accuracy_vs_length`: exact match vs length with 95 % intervals, from `probekit.evaluate.EvalResult`\\ s.
- `attention_html`: circuitsvis attention heads with the task's tokens as labels, the JavaScript bundle
  inlined (circuitsvis's ``str()`` loads it from a CDN, which fails offline; we use ``.local_src``).
- `mechanism_vs_length`: a mechanism metric and accuracy against length, one line pair per model.

Reshaping for the figures (no new numbers): `flatten_heads` (layer, head -> ``L<l>H<h>``),
`probe_by_length` and `probe_by_site` (a probe sweep as the plots' axes), `probe_chance` (its
majority-class baseline). In a notebook, `show` displays a figure inline and `show_html` a standalone page.
"""

from __future__ import annotations

import html as _html
from pathlib import Path

import torch

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


# ---------------------------------------------------------------------------- heatmaps


def heatmap(result: Result, path: str | Path | None = None, rows: str | None = None, cols: str | None = None,
            facet: str | None = None, title: str | None = None, cmap: str = "RdBu_r", symmetric: bool = True):
    """Heatmap of a 1-, 2- or 3-D `Result` (3-D: one panel per index of ``facet``). Saves PNG/SVG by suffix.

    Returns the matplotlib figure.
    """
    _check_result(result, "heatmap")
    plt = _plt()
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
    n_f = v.shape[2]
    vmax = float(v.abs().nan_to_num(0).max()) or 1.0
    width = max(4.0, 0.35 * v.shape[1] + 2)
    with plt.rc_context(STYLE):
        fig, axs = plt.subplots(1, n_f, figsize=(min(24, width * n_f), max(2.5, 0.35 * v.shape[0] + 1.5)),
                                squeeze=False)
        for f in range(n_f):
            ax = axs[0, f]
            kw = dict(vmin=-vmax, vmax=vmax) if symmetric else {}
            im = ax.imshow(v[:, :, f].numpy(), aspect="auto", cmap=cmap, interpolation="nearest", **kw)
            ax.set_ylabel(rows)
            ax.set_yticks(range(v.shape[0]), [result.label(rows, i) for i in range(v.shape[0])])
            if cols:
                ax.set_xlabel(cols)
                ax.set_xticks(range(v.shape[1]), [result.label(cols, i) for i in range(v.shape[1])], rotation=90)
            else:
                ax.set_xticks([])
            if facet:
                ax.set_title(f"{facet} {result.label(facet, f)}")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.suptitle(title or result.kind)
        fig.tight_layout()
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
    return heatmap(r, path, rows="layer", cols="head", title=(title or result.kind) + note,
                   cmap="viridis" if absolute else "RdBu_r", symmetric=not absolute)


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
    return heatmap(r, path, rows=rows, cols="pos", title=title or result.kind)


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
    """A probe sweep on one ``split`` as a (site, position) Result: one row per (hook, layer) labelled like
    ``resid_mid L1``, one column per position slot that has a value (the pooled ``all`` column dropped)."""
    _check_probe_sweep(sweep, "probe_by_site")
    if split not in sweep.labels["split"]:
        raise ProbekitError(f"split {split!r} is not in the sweep; expected one of {sweep.labels['split']}")
    s = sweep.labels["split"].index(split)
    slots = [i for i, p in enumerate(sweep.labels["position"]) if p != "all"]
    v = sweep.values[:, :, slots, s]  # hook layer slot
    v = v.reshape(-1, v.shape[-1])
    keep = ~torch.isnan(v).all(0)
    sites = [f"{h.removeprefix('hook_')} L{L}" for h in sweep.labels["hook"] for L in sweep.labels["layer"]]
    return Result(kind=f"probe for {sweep.settings.get('feature')} ({split})", values=v[:, keep],
                  axes=("site", "position"),
                  labels={"site": sites, "position": [sweep.labels["position"][i] for i, k in zip(slots, keep.tolist(),
                                                                                                    strict=True) if k]},
                  settings=sweep.settings)


def probe_chance(sweep: Result) -> float:
    """The majority-class baseline of a probe sweep (the best constant predictor, pooled positions, last split)."""
    _check_probe_sweep(sweep, "probe_chance")
    p = sweep.labels["position"].index("all")
    return float(torch.nan_to_num(sweep.extra["majority"][:, :, p, -1], nan=0.0).max())


def probe_accuracy(result: Result, path: str | Path | None = None, title: str | None = None,
                   chance: float | None = None):
    """Probe accuracy by layer, one line per length; a third axis gives one panel per index.

    A `probekit.probes.ProbeSweep` is drawn as `probe_by_length` of it, with `probe_chance` as ``chance``.
    """
    _check_result(result, "probe_accuracy")
    if _is_probe_sweep(result):
        chance = probe_chance(result) if chance is None else chance
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
                ax.plot(range(nL), v[:, j, f].numpy(), marker="o", color=cmap(j / max(1, nLen - 1)),
                        label=f"length {result.label('length', j)}")
            if chance is not None:
                ax.axhline(float(chance), color="grey", ls=":", lw=1, label="chance")
            ax.set_xticks(range(nL), [result.label("layer", i) for i in range(nL)])
            ax.set_xlabel("layer")
            ax.set_ylim(0, 1.02)
            if facet:
                ax.set_title(f"{facet} {result.label(facet, f)}")
        axs[0, 0].set_ylabel("probe accuracy")
        axs[0, -1].legend(loc="best", frameon=False)
        fig.suptitle(title or result.kind)
        fig.tight_layout()
    return _finish(fig, path)


def accuracy_vs_length(results, path: str | Path | None = None, title: str | None = None,
                       train_lengths: tuple[int, int] | None = None):
    """Exact match vs length with 95 % Wilson intervals; ``results``: an EvalResult, a list, or {name: EvalResult}."""
    from probekit.evaluate import EvalResult

    if isinstance(results, EvalResult):
        results = {results.model: results}
    elif isinstance(results, list | tuple):
        names = [r.model if isinstance(r, EvalResult) else str(i) for i, r in enumerate(results)]
        if len(set(names)) < len(names):
            names = [f"{nm} ({i})" for i, nm in enumerate(names)]
        results = dict(zip(names, results, strict=True))
    if not isinstance(results, dict) or not results:
        raise ProbekitError(f"accuracy_vs_length needs EvalResult(s) from probekit.evaluate, got {type(results).__name__}")
    for name, r in results.items():
        if not isinstance(r, EvalResult):
            kind = f" of kind {r.kind!r}" if isinstance(r, Result) else ""
            raise ProbekitError(f"accuracy_vs_length needs EvalResult(s) from probekit.evaluate; {name!r} is a "
                                f"{type(r).__name__}{kind}")
        if not r.records:
            raise ProbekitError(f"EvalResult {name!r} has no records")
    plt = _plt()
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        for name, r in results.items():
            recs = sorted(r.records, key=lambda x: x["length"])
            xs = [x["length"] for x in recs]
            ys = [x["exact_match"] for x in recs]
            lo = [x["exact_match_ci95"][0] for x in recs]
            hi = [x["exact_match_ci95"][1] for x in recs]
            (line,) = ax.plot(xs, ys, marker="o", label=name)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        if train_lengths is not None:
            ax.axvspan(train_lengths[0], train_lengths[1], color="grey", alpha=0.12, lw=0, label="trained lengths")
        ax.set_xlabel("length")
        ax.set_ylabel("exact match (greedy)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="best", frameon=False)
        ax.set_title(title or "accuracy vs length")
        fig.tight_layout()
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
        ax.plot(xs, [r[metric] for r in rs], "-o", color=color, label=f"{m}: {metric}")
        acc = [r.get(accuracy) for r in rs]
        if any(a is not None for a in acc):
            ax.plot([x for x, a in zip(xs, acc, strict=True) if a is not None], [a for a in acc if a is not None],
                    "--s", color=color, alpha=0.6, label=f"{m}: {accuracy}")
    ax.set_xlabel("length")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    ax.set_title(title or f"{metric} vs length", fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


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
