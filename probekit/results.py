"""`Result`: what every instrument returns. A tensor, the name and labels of each axis, and the settings.

    res.values            # Tensor, one dimension per entry of res.axes
    res.axes              # e.g. ("layer", "pos", "head")
    res.labels["pos"]     # e.g. ["0 SORT", "1 x0", "2 x1", "3 |", ...] (one per index)
    res.labels["layer"]   # e.g. [0, 1]: the model's layer numbers (a sweep over some layers keeps their numbers)
    res.settings          # everything needed to rerun it (model, task, corruption, metric, seed, ...)
    res.to_frame()        # long form: one column per axis (index and label) + "value"
    res.to_xarray()       # labelled array (needs the optional xarray)
    Result.from_json(res.to_json()) == res

Axis order. Every instrument follows TransformerLens's order: ``layer`` before ``pos`` before ``head``
wherever those axes occur together (``(layer, pos, head)`` for patching and DLA by head, ``(layer, pos)``
for MLPs and interventions, ``(layer, head)`` across positions). Other axes sit where they read best:
``batch`` (examples, when kept) and the axis a study stacks along (``length``, ``model``) come first;
axes that a value is split or summarised over come last: ``component`` (the terms of the final residual
stream, last so that ``values.sum(-1)`` is the metric), ``src`` (key positions), ``answer`` (answer
steps), ``stat``, ``split``, ``measure``. A list of heads that is not a layer x head grid (a chosen set,
as in `probekit.attribution.head_attention_to`) is one ``head`` axis labelled ``"L1H2"``.

Labels. Each axis's labels are strings or integers, one per index, and keep their type through
`Result.to_json` / `Result.from_json`. Integers are indices of the model: ``layer`` and ``head`` numbers,
and lengths. Token positions (``pos``, ``src``, ``answer``) use the one position-label scheme of
`probekit.metrics.position_labels`: ``"<pos> <label>"``, the integer token position, a space, then the
task's structural label of that position (``x3``, ``|``, ``y0`` for sorting; ``a1``, ``*``, ``d0`` for
multiplication), else the token where it is the same in every row, else ``·``; e.g. ``"5 |"``. Where a
position is a *rule* that picks a different token in each example (the interchange interventions'
`probekit.interventions.Where`, e.g. ``"digit_index=2"``), the rule is the label.
`Result.label` always gives a label as a string.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from probekit.tasks import ProbekitError


def _tensor(values, dtype=None) -> Tensor:
    """A tensor from nested lists in which ``None`` (how `probekit.io` writes NaN) reads as NaN."""

    def fix(x):
        if x is None:
            return float("nan")
        return [fix(v) for v in x] if isinstance(x, list) else x

    return torch.tensor(fix(values), dtype=dtype)


def _label(axis: str, x) -> str | int:
    """A label as a string or a plain int (numpy integers become ints); anything else is refused."""
    if isinstance(x, str):
        return x
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        return int(x)
    raise ProbekitError(f"axis {axis!r} has a label {x!r} of type {type(x).__name__}; expected a string or an integer")


@dataclass
class Result:
    kind: str
    values: Tensor
    axes: tuple[str, ...]
    labels: dict[str, list[str | int]] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # other named tensors of the same result (e.g. stderr)

    def __post_init__(self):
        self.values = torch.as_tensor(self.values).detach().cpu()
        self.axes = tuple(self.axes)
        if self.values.ndim != len(self.axes):
            raise ProbekitError(f"result has {self.values.ndim} dimensions but {len(self.axes)} axis names {self.axes}")
        for ax, lab in self.labels.items():
            if ax not in self.axes:
                raise ProbekitError(f"labels for unknown axis {ax!r}; axes are {self.axes}")
            n = self.values.shape[self.axes.index(ax)]
            if len(lab) != n:
                raise ProbekitError(f"axis {ax!r} has {n} entries but {len(lab)} labels")
        self.labels = {ax: [_label(ax, x) for x in lab] for ax, lab in self.labels.items()}
        self.extra = {k: torch.as_tensor(v).detach().cpu() for k, v in self.extra.items()}

    def label(self, axis: str, i: int) -> str:
        lab = self.labels.get(axis)
        return str(lab[i]) if lab else str(i)

    def to_frame(self):
        import pandas as pd

        idx = torch.cartesian_prod(*[torch.arange(s) for s in self.values.shape]) if self.values.ndim > 1 \
            else torch.arange(self.values.numel())[:, None]
        flat = self.values.reshape(-1)
        data = {}
        for j, ax in enumerate(self.axes):
            data[ax] = idx[:, j].numpy()
            if ax in self.labels:
                data[f"{ax}_label"] = [str(self.labels[ax][i]) for i in idx[:, j].tolist()]
        data["value"] = flat.numpy()
        for k, v in self.extra.items():
            if v.shape == self.values.shape:
                data[k] = v.reshape(-1).numpy()
        return pd.DataFrame(data)

    def to_xarray(self):
        """An ``xarray.DataArray``: one dimension per axis, the labels as coordinates (``<axis>_label``
        beside the integer index), ``extra`` tensors of the same shape as a ``Dataset``'s other variables
        when there are any (then a ``Dataset`` with ``value`` and each of them). Needs xarray."""
        try:
            import xarray as xr
        except ImportError:
            raise ProbekitError("Result.to_xarray needs xarray; install it with: pip install xarray") from None
        coords = {ax: range(n) for ax, n in zip(self.axes, self.values.shape, strict=True)}
        coords |= {f"{ax}_label": (ax, list(lab)) for ax, lab in self.labels.items()}
        attrs = {"kind": self.kind, "settings": self.settings}
        da = xr.DataArray(self.values.numpy(), dims=self.axes, coords=coords, name="value", attrs=attrs)
        same = {k: v for k, v in self.extra.items() if v.shape == self.values.shape}
        if not same:
            return da
        return xr.Dataset({"value": da, **{k: (self.axes, v.numpy()) for k, v in same.items()}}, attrs=attrs)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "axes": list(self.axes), "shape": list(self.values.shape),
                "values": self.values.tolist(), "labels": self.labels, "settings": self.settings,
                "extra": {k: v.tolist() for k, v in self.extra.items()}}

    def to_json(self, path: str | Path | None = None) -> str:
        """Strict JSON (NaN/Infinity as null, see `probekit.io`); with ``path``, also written there atomically."""
        from probekit.io import json_text

        return json_text(self.to_dict(), path)

    @classmethod
    def from_json(cls, s: str | Path) -> Result:
        if isinstance(s, Path):
            s = s.read_text()
        try:
            d = json.loads(s)
            return cls(kind=d["kind"], values=_tensor(d["values"], torch.float32).reshape(d["shape"]),
                       axes=tuple(d["axes"]), labels=d.get("labels", {}), settings=d.get("settings", {}),
                       extra={k: _tensor(v) for k, v in d.get("extra", {}).items()})
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise ProbekitError(f"not a probekit result JSON ({type(e).__name__}: {e})") from None

    def top(self, k: int = 10, by_abs: bool = True) -> list[tuple[dict, float]]:
        """The ``k`` largest entries (by absolute value): ``[({axis: label}, value), ...]``."""
        flat = self.values.reshape(-1)
        key = flat.abs() if by_abs else flat
        key = torch.nan_to_num(key, nan=float("-inf"))
        order = torch.argsort(key, descending=True)[:k]
        out = []
        for i in order.tolist():
            coords = []
            rem = i
            for s in reversed(self.values.shape):
                coords.append(rem % s)
                rem //= s
            coords = coords[::-1]
            out.append(({ax: self.label(ax, c) for ax, c in zip(self.axes, coords, strict=True)}, float(flat[i])))
        return out

    def __eq__(self, other) -> bool:
        return (isinstance(other, Result) and self.kind == other.kind and self.axes == other.axes
                and self.values.shape == other.values.shape and torch.allclose(self.values.float(), other.values.float(), equal_nan=True)
                and self.labels == other.labels and self.settings == other.settings)


def stack_results(results, axis: str, labels=None, kind: str | None = None) -> Result:
    """Results of one shape and axes stacked along a new leading ``axis`` (e.g. one per length or per model).

    ``results``: a list, or a dict whose keys become the labels of ``axis``; ``labels`` (strings or integers,
    one per result) name its entries otherwise. The labels and settings of the first result are kept.
    """
    if isinstance(results, dict):
        labels, results = (list(results) if labels is None else labels), list(results.values())
    results = list(results)
    if not results or not all(isinstance(r, Result) for r in results):
        raise ProbekitError(f"stack_results needs a non-empty list of Results, got {[type(r).__name__ for r in results]}")
    first = results[0]
    for r in results[1:]:
        if r.axes != first.axes or r.values.shape != first.values.shape:
            raise ProbekitError(f"cannot stack a result with axes {r.axes} and shape {tuple(r.values.shape)} onto "
                                f"axes {first.axes} and shape {tuple(first.values.shape)}; expected the same for all")
    if axis in first.axes:
        raise ProbekitError(f"new axis {axis!r} is already one of the results' axes {first.axes}")
    named = {axis: [x if isinstance(x, numbers.Integral) and not isinstance(x, bool) else str(x) for x in labels]} \
        if labels is not None else {}
    return Result(kind or first.kind, torch.stack([r.values for r in results]), (axis, *first.axes),
                  {**named, **first.labels}, first.settings)
