"""Task-aware corruptions: a clean batch -> a corrupted batch of the same shape, saying what changes.

Axis names: ``batch`` (examples), ``pos`` (token positions), ``answer`` (answer steps).

``corrupt(task, batch, kind, seed=..., **opts)`` returns a `CorruptedPair`: the clean and the
corrupted `Batch` (identical shape and answer layout; the corrupted batch carries its own answer
and features, so it is teacher forced on its own answer), a description, a per-row record of the
edit (``changed``), what is guaranteed to be kept, and the answer steps whose target changes by
construction (the default steps of a patching metric).

Multiplication (digits units first: ``a_i``, ``b_j``; product digit k; carry ``c_k`` into digit k):

- ``carry-flip`` (opts ``digit=k`` >= 1, ``operand`` None/'a'/'b'): one digit at a place < k of a
  (or of b) gets a new value such that (1) the carry into digit k, ``c_k``, changes, and (2) every
  product in column k, ``a_i * b_{k-i}``, is unchanged: the edited digit either does not enter
  column k at all (``a_i`` with ``k - i >= width(b)``, e.g. any lower digit of a in ``5 x 1``) or its
  partner there is zero (``b_{k-i} = 0``). So the column sum ``S_k`` is kept and product digit k
  changes only through its carry. Digits at places >= k are kept. Answer digits below k change too
  (their columns moved); digits above k may change. Among all valid (place, value) edits one is
  drawn uniformly per row. Rows with no valid edit are *invalid*.
- ``operand-digit`` (opts ``operand='a'``, ``place=0``, ``value=None``): that one digit gets a new
  value (``value`` or a random one) that changes the product; invalid if none does (e.g. b = 0).
- ``resample``: an independent problem of the same size.

Sorting (``sort`` objective; ``ys`` the sorted list, answer step r writes ``ys[r]``):

- ``successor-change`` (opt ``step=r``, default length // 2): the input element that holds ``ys[r]``
  (in the stable order) gets a new value such that the emitted prefix ``ys[:r]`` is unchanged and the
  target ``ys[r]`` -- the successor of the last emitted value -- changes (respecting distinct values
  when the task has no repeats). One valid value is drawn uniformly per row; invalid if none exists.
- ``swap`` (opt ``positions=(i, j)``, default a random pair with different values): swap two input
  positions; the sorted answer is identical. Invalid if all values are equal.
- ``resample``: an independent list of the same length (any objective).

Invalid rows: with ``invalid='resample'`` (the default) each invalid clean row is replaced by a
fresh clean example (seeded) that has a valid corruption, so the pair keeps ``n`` rows; with
``invalid='drop'`` invalid rows are removed. Either way ``n_invalid`` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from probekit.tasks import Batch, ProbekitError, Task

CORRUPTIONS = {
    "multiplication": ("carry-flip", "operand-digit", "resample"),
    "sorting": ("successor-change", "swap", "resample"),
}


@dataclass(frozen=True)
class CorruptedPair:
    clean: Batch
    corrupted: Batch
    kind: str = "custom"
    description: str = ""
    changed: dict[str, Tensor] = field(default_factory=dict)  # per-row record of the edit
    kept: tuple[str, ...] = ()
    answer_steps: tuple[int, ...] | None = None  # steps whose target changes by construction
    n_invalid: int = 0
    invalid_policy: str = "resample"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        c, k = self.clean, self.corrupted
        if c.tokens.shape != k.tokens.shape:
            raise ProbekitError(f"clean tokens have shape {tuple(c.tokens.shape)} but corrupted {tuple(k.tokens.shape)}; "
                                "expected identical shapes (same n and length)")
        if not torch.equal(c.answer_mask, k.answer_mask):
            raise ProbekitError("clean and corrupted batches have different answer layouts; expected the same objective and length")
        if c.task != k.task or c.objective != k.objective:
            raise ProbekitError(f"clean is {c.task}/{c.objective} but corrupted is {k.task}/{k.objective}; expected the same task")

    @property
    def n(self) -> int:
        return self.clean.n

    def settings(self) -> dict:
        return {"kind": self.kind, "description": self.description, "kept": list(self.kept),
                "answer_steps": list(self.answer_steps) if self.answer_steps is not None else None,
                "n_invalid": self.n_invalid, "invalid_policy": self.invalid_policy,
                "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()}}


def make_pair(clean: Batch, corrupted: Batch, kind: str = "custom", description: str = "") -> CorruptedPair:
    """Pair two batches you built yourself (checked: same shape, answer layout and task)."""
    return CorruptedPair(clean, corrupted, kind=kind, description=description)


# ---------------------------------------------------------------------------- multiplication


def _mult_digits(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """Operand digits units first, at their padded widths."""
    f = batch.features
    op = f["operand"][0].numpy()
    a = np.flatnonzero(op == 0)
    b = np.flatnonzero(op == 1)
    tok = batch.tokens.numpy()
    return tok[:, a][:, ::-1].copy(), tok[:, b][:, ::-1].copy()


def _carries(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column sums S [.., P] and carries c [.., P + 1] for digit arrays [..., wa], [..., wb]."""
    wa, wb = a.shape[-1], b.shape[-1]
    S = np.zeros(a.shape[:-1] + (wa + wb,), dtype=np.int64)
    for i in range(wa):
        S[..., i:i + wb] += a[..., i:i + 1] * b
    c = np.zeros(a.shape[:-1] + (wa + wb + 1,), dtype=np.int64)
    for k in range(wa + wb):
        c[..., k + 1] = (S[..., k] + c[..., k]) // 10
    return S, c


def _mult_carry_flip(task, batch, rng, digit=None, operand=None):
    a, b = _mult_digits(batch)
    n, wa = a.shape
    wb = b.shape[1]
    P = wa + wb
    da = batch.length
    db = task.b_digits if task.b_digits is not None else da
    k = P // 2 if digit is None else int(digit)
    if not 1 <= k < P:
        raise ProbekitError(f"carry-flip digit must be in 1..{P - 1} (the carry into digit 0 is always 0), got {k}")
    if operand not in (None, "a", "b"):
        raise ProbekitError(f"carry-flip operand must be 'a', 'b' or None, got {operand!r}")
    S0, c0 = _carries(a, b)
    d0 = (S0[:, k] + c0[:, k]) % 10
    cands = []  # (operand, place, value) -> valid mask [n]
    for op, x, d_self, y, w_other in (("a", a, da, b, wb), ("b", b, db, a, wa)):
        if operand not in (None, op):
            continue
        for i in range(min(k, d_self)):
            partner = y[:, k - i] if k - i < w_other else np.zeros(n, dtype=np.int64)
            for v in range(10):
                x2 = x.copy()
                x2[:, i] = v
                a2, b2 = (x2, b) if op == "a" else (a, x2)
                S2, c2 = _carries(a2, b2)
                ok = (x[:, i] != v) & (partner == 0) & (c2[:, k] != c0[:, k]) & ((S2[:, k] + c2[:, k]) % 10 != d0)
                cands.append((op, i, v, ok))
    valid_any = np.zeros(n, dtype=bool)
    choice = np.full(n, -1)
    if cands:
        ok = np.stack([c[3] for c in cands], axis=1)  # n x cand
        valid_any = ok.any(1)
        r = rng.random(ok.shape) * ok
        choice = np.where(valid_any, r.argmax(1), -1)
    a2, b2 = a.copy(), b.copy()
    rec = {"operand": np.full(n, -1), "place": np.full(n, -1), "old": np.full(n, -1), "new": np.full(n, -1)}
    for row in np.flatnonzero(valid_any):
        op, i, v, _ = cands[choice[row]]
        x2 = a2 if op == "a" else b2
        rec["operand"][row] = 0 if op == "a" else 1
        rec["place"][row], rec["old"][row], rec["new"][row] = i, x2[row, i], v
        x2[row, i] = v
    desc = (f"carry-flip at product digit {k}: one digit of {'a or b' if operand is None else operand} at a place < {k} "
            f"changed so the carry into digit {k} changes while every product in column {k} is unchanged "
            f"(the edited digit does not enter column {k} or its partner there is 0); places >= {k} kept")
    kept = (f"operand digits at places >= {k}", f"column {k} products a_i*b_(k-i)", f"column sum S_{k}")
    return a2, b2, valid_any, rec, desc, kept, {"digit": k, "operand": operand}, k


def _mult_operand_digit(task, batch, rng, operand="a", place=0, value=None):
    a, b = _mult_digits(batch)
    n = a.shape[0]
    da = batch.length
    db = task.b_digits if task.b_digits is not None else da
    if operand not in ("a", "b"):
        raise ProbekitError(f"operand-digit operand must be 'a' or 'b', got {operand!r}")
    width = da if operand == "a" else db
    if not 0 <= int(place) < width:
        raise ProbekitError(f"operand-digit place {place} out of range; operand {operand} has places 0..{width - 1}")
    place = int(place)
    if value is not None and not 0 <= int(value) <= 9:
        raise ProbekitError(f"operand-digit value must be a digit 0..9, got {value}")
    x = a if operand == "a" else b
    other = b if operand == "a" else a
    prod_changes = (other != 0).any(1)  # changing this digit changes the product iff the other operand != 0
    vals = np.arange(10) if value is None else np.array([int(value)])
    ok = (vals[None, :] != x[:, place:place + 1]) & prod_changes[:, None]
    valid = ok.any(1)
    pick = (rng.random(ok.shape) * ok).argmax(1)
    x2 = x.copy()
    rec = {"operand": np.full(n, 0 if operand == "a" else 1), "place": np.full(n, place), "old": x[:, place].copy(),
           "new": np.where(valid, vals[pick], -1)}
    x2[valid, place] = vals[pick][valid]
    a2, b2 = (x2, b) if operand == "a" else (a, x2)
    desc = f"operand-digit: digit {place} of {operand} changed to " + ("a random other value" if value is None else str(value)) + \
        " that changes the product"
    kept = (f"every operand digit except {operand}_{place}",)
    return a2, b2, valid, rec, desc, kept, {"operand": operand, "place": place, "value": value}, None


# ---------------------------------------------------------------------------- sorting


def _sort_check(batch: Batch, kind: str):
    if batch.objective != "sort":
        raise ProbekitError(f"corruption {kind!r} is defined for the 'sort' objective, got {batch.objective!r}; use 'resample'")


def _sort_successor_change(task, batch, rng, step=None):
    _sort_check(batch, "successor-change")
    x = batch.meta["inputs"].numpy()
    n, L = x.shape
    r = L // 2 if step is None else int(step)
    if not 0 <= r < L:
        raise ProbekitError(f"successor-change step must be in 0..{L - 1} (answer steps of length {L}), got {r}")
    order = np.argsort(x, axis=1, kind="stable")
    ys = np.take_along_axis(x, order, 1)
    src = order[:, r]  # input index holding ys[r]
    V = task.n_values
    cand = np.repeat(x[:, None, :], V, axis=1)  # n V L
    cand[np.arange(n), :, src] = np.arange(V)[None, :]
    ys2 = np.sort(cand, axis=2)
    ok = (ys2[:, :, :r] == ys[:, None, :r]).all(2) & (ys2[:, :, r] != ys[:, None, r])
    if not task.repeats:
        others = np.ones((n, V), dtype=bool)
        mask = np.ones((n, L), dtype=bool)
        mask[np.arange(n), src] = False
        for j in range(L):
            hit = mask[:, j]
            others[hit, x[hit, j]] = False
        ok &= others
    valid = ok.any(1)
    pick = (rng.random(ok.shape) * ok).argmax(1)
    x2 = x.copy()
    x2[valid, src[valid]] = pick[valid]
    rec = {"input_index": np.where(valid, src, -1), "old": np.where(valid, x[np.arange(n), src], -1),
           "new": np.where(valid, pick, -1)}
    desc = (f"successor-change at answer step {r}: the input element holding sorted value {r} gets a new value so the "
            f"emitted prefix (steps 0..{r - 1}) is unchanged and the target at step {r} changes")
    return x2, valid, rec, desc, (f"sorted prefix ys[:{r}]", "list length"), {"step": r}, r


def _sort_swap(task, batch, rng, positions=None):
    _sort_check(batch, "swap")
    x = batch.meta["inputs"].numpy()
    n, L = x.shape
    if positions is not None:
        i, j = (int(p) for p in positions)
        if not (0 <= i < L and 0 <= j < L and i != j):
            raise ProbekitError(f"swap positions must be two different input indices in 0..{L - 1}, got {positions!r}")
        ii, jj = np.full(n, i), np.full(n, j)
        valid = x[:, i] != x[:, j]
    else:
        diff = x[:, :, None] != x[:, None, :]  # n L L
        valid = diff.any((1, 2))
        pick = (rng.random(diff.shape) * diff).reshape(n, -1).argmax(1)
        ii, jj = pick // L, pick % L
    x2 = x.copy()
    rows = np.flatnonzero(valid)
    x2[rows, ii[rows]], x2[rows, jj[rows]] = x[rows, jj[rows]], x[rows, ii[rows]]
    rec = {"i": np.where(valid, ii, -1), "j": np.where(valid, jj, -1)}
    desc = "swap: two input positions with different values exchanged; the sorted answer is identical"
    return x2, valid, rec, desc, ("sorted answer", "multiset of values"), {"positions": positions}, None


# ---------------------------------------------------------------------------- entry point


def _resample_inputs(task, batch, rng):
    seed = int(rng.integers(2**31))
    other = task.with_objective(batch.objective).sample(batch.n, length=batch.length, seed=seed)
    return other


def _apply(task, batch: Batch, kind: str, rng, opts):
    """(corrupted Batch restricted to valid rows, valid mask, record, description, kept, options, step-ish)."""
    if batch.task == "multiplication":
        fn = {"carry-flip": _mult_carry_flip, "operand-digit": _mult_operand_digit}.get(kind)
        if fn is not None:
            a2, b2, valid, rec, desc, kept, o, digit = fn(task, batch, rng, **opts)
            return task.batch_from_digits(a2, b2, length=batch.length), valid, rec, desc, kept, o, ("digit", digit)
    else:
        fn = {"successor-change": _sort_successor_change, "swap": _sort_swap}.get(kind)
        if fn is not None:
            x2, valid, rec, desc, kept, o, step = fn(task, batch, rng, **opts)
            t = task.with_objective(batch.objective)
            return t.batch_from_inputs(x2), valid, rec, desc, kept, o, ("step", step)
    if kind == "resample":
        if opts:
            raise ProbekitError(f"corruption 'resample' takes no options, got {sorted(opts)}")
        other = _resample_inputs(task, batch, rng)
        return other, np.ones(batch.n, dtype=bool), {}, "resample: an independent problem of the same size", (), {}, (None, None)
    raise ProbekitError(f"corruption {kind!r} is not defined for task {batch.task!r}; expected one of {list(CORRUPTIONS[batch.task])}")


def _concat(batches: list[Batch]) -> Batch:
    from dataclasses import replace

    first = batches[0]
    return replace(first, tokens=torch.cat([b.tokens for b in batches]),
                   answer_mask=torch.cat([b.answer_mask for b in batches]),
                   features={k: torch.cat([b.features[k] for b in batches]) for k in first.features},
                   meta={k: (torch.cat([b.meta[k] for b in batches]) if isinstance(v, Tensor) else v)
                         for k, v in first.meta.items()})


def corrupt(task: Task, batch: Batch, kind: str, *, seed: int = 0, invalid: str = "resample", **opts) -> CorruptedPair:
    """Corrupt ``batch`` (sampled from ``task``) with ``kind``; see the module docstring for each rule."""
    if batch.task != task.name:
        raise ProbekitError(f"batch is from task {batch.task!r} but the task is {task.name!r}")
    if batch.task not in CORRUPTIONS:
        raise ProbekitError(f"no corruptions defined for task {batch.task!r}; expected one of {sorted(CORRUPTIONS)}")
    if kind not in CORRUPTIONS[batch.task]:
        raise ProbekitError(f"corruption {kind!r} is not defined for task {batch.task!r}; expected one of {list(CORRUPTIONS[batch.task])}")
    if invalid not in ("resample", "drop"):
        raise ProbekitError(f"invalid must be 'resample' or 'drop', got {invalid!r}")
    rng = np.random.default_rng(seed)
    corr, valid, rec, desc, kept, o, (unit, where) = _apply(task, batch, kind, rng, dict(opts))
    n_invalid = int((~valid).sum())
    keep = torch.from_numpy(np.flatnonzero(valid))
    cleans, corrs, recs = [batch.select(keep)], [corr.select(keep)], [{k: v[valid] for k, v in rec.items()}]
    have = len(keep)
    if invalid == "resample" and n_invalid:
        t = task.with_objective(batch.objective)
        for _ in range(50):
            need = batch.n - have
            if need <= 0:
                break
            fresh = t.sample(max(2 * need, 16), length=batch.length, seed=int(rng.integers(2**31)))
            c2, v2, r2, *_ = _apply(task, fresh, kind, rng, dict(opts))
            idx = torch.from_numpy(np.flatnonzero(v2)[:need])
            if len(idx):
                cleans.append(fresh.select(idx))
                corrs.append(c2.select(idx))
                recs.append({k: v[idx.numpy()] for k, v in r2.items()})
                have += len(idx)
        if have < batch.n:
            raise ProbekitError(f"corruption {kind!r} found a valid corruption for only {have} of {batch.n} rows "
                                f"after resampling; expected a setting where it exists (options {o})")
    if have == 0:
        raise ProbekitError(f"corruption {kind!r} is impossible for every row of this batch (options {o})")
    clean_b, corr_b = _concat(cleans), _concat(corrs)
    record = {k: torch.from_numpy(np.concatenate([r[k] for r in recs])) for k in recs[0]}
    steps = None
    if unit == "digit" and where is not None:
        di = clean_b.features["digit_index"][0][clean_b.pred_mask[0]].tolist()
        steps = (di.index(where),)
    elif unit == "step" and where is not None:
        steps = (int(where),)
    desc += f"; {n_invalid} of {batch.n} rows had no valid corruption and were {'replaced by fresh examples' if invalid == 'resample' else 'dropped'}"
    return CorruptedPair(clean_b, corr_b, kind=kind, description=desc, changed=record, kept=tuple(kept),
                         answer_steps=steps, n_invalid=n_invalid, invalid_policy=invalid,
                         options=dict(o) | {"seed": seed})


__all__ = ["CORRUPTIONS", "CorruptedPair", "corrupt", "make_pair"]
