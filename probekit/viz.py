"""Figures drawn from result objects only (matplotlib imported inside the functions that need it)."""

from __future__ import annotations

from pathlib import Path

from probekit.results import Result
from probekit.tasks import ProbekitError


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def heatmap(result: Result, path: str | Path | None = None, rows: str | None = None, cols: str | None = None,
            facet: str | None = None, title: str | None = None, cmap: str = "RdBu_r", symmetric: bool = True):
    """Heatmap of a 2-D or 3-D `Result` (3-D: one panel per index of ``facet``). Saves PNG/SVG by suffix.

    Returns the matplotlib figure.
    """
    plt = _plt()
    axes = list(result.axes)
    if result.values.ndim not in (1, 2, 3):
        raise ProbekitError(f"heatmap needs a 1-, 2- or 3-D result, got axes {result.axes}")
    if result.values.ndim == 3:
        facet = facet or axes[-1]
    rest = [a for a in axes if a != facet]
    rows = rows or rest[0]
    cols = cols or (rest[1] if len(rest) > 1 else None)
    for a in (rows, cols, facet):
        if a is not None and a not in axes:
            raise ProbekitError(f"axis {a!r} is not in the result's axes {result.axes}")
    order = [rows] + ([cols] if cols else []) + ([facet] if facet else [])
    v = result.values.permute(*[axes.index(a) for a in order]).float()
    if cols is None:
        v = v[:, None]
    if facet is None:
        v = v[..., None]
    n_f = v.shape[2]
    vmax = float(v.abs().nan_to_num(0).max()) or 1.0
    width = max(4.0, 0.35 * v.shape[1] + 2)
    fig, axs = plt.subplots(1, n_f, figsize=(min(24, width * n_f), max(2.5, 0.35 * v.shape[0] + 1.5)), squeeze=False)
    for f in range(n_f):
        ax = axs[0, f]
        kw = dict(vmin=-vmax, vmax=vmax) if symmetric else {}
        im = ax.imshow(v[:, :, f].numpy(), aspect="auto", cmap=cmap, **kw)
        ax.set_ylabel(rows)
        ax.set_yticks(range(v.shape[0]), [result.label(rows, i) for i in range(v.shape[0])], fontsize=7)
        if cols:
            ax.set_xlabel(cols)
            ax.set_xticks(range(v.shape[1]), [result.label(cols, i) for i in range(v.shape[1])], fontsize=7, rotation=90)
        if facet:
            ax.set_title(f"{facet} {result.label(facet, f)}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title or result.kind, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
