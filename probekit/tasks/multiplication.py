"""Multiplication a x b, operands zero-padded, product reversed (least significant digit first).

Worked example, 3 x 2 digits, 123 x 45 = 5535 (product padded to 3 + 2 = 5 digits)::

    reversed                          1 2 3 * 4 5 = 5 3 5 5 0
    forward                           1 2 3 * 4 5 = 0 5 5 3 5
    reversed, reverse_operands=True   3 2 1 * 5 4 = 5 3 5 5 0

Operands are written most significant digit first (``reverse_operands=True``: units first, so that
the i-th digit of a number is its place i, as the i-th digit of the reversed product is product digit
i; what a per-digit place embedding, ``ModelConfig(positional="place")``, needs) and zero-padded to
their width; every product digit is predicted. With digits a_i, b_j (i, j = 0 at the units), answer digit k has

    column sum  S_k = sum_{i + j = k} a_i * b_j
    carry       c_0 = 0,  c_{k+1} = (S_k + c_k) div 10      (carries can exceed 1)
    digit       d_k = (S_k + c_k) mod 10

Features (LongTensor [batch, pos], -1 where undefined):

- at operand positions: ``operand`` (0 for a, 1 for b), ``place`` (0 = units), ``operand_digit``;
- at predicting positions (whose logits give product digit k): ``digit_index`` (k), ``step``
  (answer index), ``column_sum`` (S_k), ``carry_in`` (c_k), ``carry_out`` (c_{k+1}), ``digit``
  (d_k) and ``target`` (the token to predict, = d_k).

``length`` in `sample` is the digit count of a (and of b unless ``b_digits`` is fixed); operands are
uniform below 10**digits, so some have leading zeros. A fraction ``simple_fraction`` of examples has a
multiplier with a single non-zero digit (Qiu et al.'s "simple samples"). They are a training device:
set them in ``TrainConfig.task_overrides`` so that evaluation samples uniform operands.

Position labels: ``a2 a1 a0 * b0 = d0 d1 ...`` (operand digit by place, product digit k); with
``reverse_operands``: ``a0 a1 a2 * b0 = d0 d1 ...``. ``spec()`` leaves ``reverse_operands`` out when
False, so specs saved before the option read as they did.

Corruptions (`corruptions`; digits units first ``a_i``, ``b_j``; product digit k; carry ``c_k`` into digit k):

- ``carry-flip`` (opts ``digit=k`` >= 1, ``operand`` None/'a'/'b'): one digit at a place < k of a
  (or of b) gets a new value such that (1) the carry into digit k, ``c_k``, changes, and (2) every
  product in column k, ``a_i * b_{k-i}``, is unchanged: the edited digit either does not enter
  column k at all (``a_i`` with ``k - i >= width(b)``, e.g. any lower digit of a in ``5 x 1``) or its
  partner there is zero (``b_{k-i} = 0``). So the column sum ``S_k`` is kept and product digit k
  changes only through its carry. Digits at places >= k are kept. Answer digits below k change too
  (their columns moved); digits above k may change. Among all valid (place, value) edits one is
  drawn uniformly per row. Rows with no valid edit are *invalid*.
- ``column-digit`` (opts ``digit=k``, ``operand`` None/'a'/'b'): the control of ``carry-flip``. One digit
  that enters column k (``a_i`` with partner ``b_{k-i} != 0``, or the same for b) gets a new value such
  that product digit k changes while the carry into it, ``c_k``, is kept: digit k changes only through its
  own column. In ``5 x 1`` that digit is ``a_k`` (b's single digit changes every column). Answer digits
  above k may change. One valid (place, value) edit drawn uniformly per row; rows with none are *invalid*
  (every row at the top digit of ``5 x 1``, whose column holds no product).
- ``operand-digit`` (opts ``operand='a'``, ``place=0``, ``value=None``): that one digit gets a new
  value (``value`` or a random one) that changes the product; invalid if none does (e.g. b = 0).
- ``random-digit``: one digit of a, at a random place below its digit count, shifted by 1..9 (mod 10).
- ``resample``: an independent problem of the same size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from probekit.checks import check_fields
from probekit.tasks.base import Batch, CorruptionRule, Edit, ProbekitError, check_n, resample_rule, rng_for

MAX_DIGITS = 12  # widest operand; values stay exact in int64 (and in the meta "a", "b") up to 18 digits
VOCAB = tuple(str(d) for d in range(10)) + ("*", "=")
TIMES, EQUALS = 10, 11


def check_length(length) -> int:
    """A multiplication length (digits of a): an integer in 1..MAX_DIGITS."""
    if isinstance(length, bool) or not isinstance(length, int | np.integer) or not 1 <= length <= MAX_DIGITS:
        raise ProbekitError(f"multiplication length (digits of a) = {length!r}; expected an integer in 1..{MAX_DIGITS} "
                            "(operand values stay exact in int64 up to 18 digits)")
    return int(length)


@dataclass(frozen=True)
class MultiplicationTask:
    digits: int = 5
    b_digits: int | None = None  # None: b has as many digits as a
    pad_to: int | None = None  # minimum operand width; None: the digit count
    reverse: bool = True
    reverse_operands: bool = False  # operands written units first
    simple_fraction: float = 0.0
    objective: str = "product"
    name: str = "multiplication"
    probe_feature: ClassVar[str] = "carry_out"  # the feature probed when none is named

    def __post_init__(self):
        check_fields(self, "MultiplicationTask")
        if self.objective != "product":
            raise ProbekitError(f"unknown objective {self.objective!r} for task 'multiplication'; expected one of ['product']")
        if not (1 <= self.digits <= 12):
            raise ProbekitError(f"digits must be in 1..12, got {self.digits}")
        if self.b_digits is not None and not (1 <= self.b_digits <= 12):
            raise ProbekitError(f"b_digits must be in 1..12, got {self.b_digits}")
        if not (0.0 <= self.simple_fraction <= 1.0):
            raise ProbekitError(f"simple_fraction must be in [0, 1], got {self.simple_fraction}")
        if self.pad_to is not None and not (1 <= self.pad_to <= MAX_DIGITS):
            raise ProbekitError(f"MultiplicationTask.pad_to = {self.pad_to}; expected null or an integer in 1..{MAX_DIGITS}")

    objectives: tuple[str, ...] = ("product",)
    vocab: tuple[str, ...] = VOCAB

    @property
    def d_vocab(self) -> int:
        return len(VOCAB)

    def with_objective(self, objective: str) -> MultiplicationTask:
        return replace(self, objective=objective)

    def spec(self) -> dict:
        spec = {"name": self.name, "digits": self.digits, "b_digits": self.b_digits, "pad_to": self.pad_to,
                "reverse": self.reverse, "simple_fraction": self.simple_fraction}
        return {**spec, "reverse_operands": True} if self.reverse_operands else spec

    def corruptions(self) -> dict[str, CorruptionRule]:
        """The corruption rules of this task (module docstring), ``{kind: rule(batch, rng, **options)}``."""
        return {"carry-flip": self.carry_flip, "column-digit": self.column_digit, "operand-digit": self.operand_digit,
                "random-digit": self.random_digit, "resample": resample_rule(self)}

    def widths(self, length: int | None = None) -> tuple[int, int]:
        da = self.digits if length is None else check_length(length)
        db = self.b_digits if self.b_digits is not None else da
        pad = self.pad_to or 0
        return max(da, pad), max(db, pad if self.b_digits is None else 0)

    def seq_len(self, length: int | None = None) -> int:
        wa, wb = self.widths(length)
        return wa + 1 + wb + 1 + wa + wb

    # ------------------------------------------------------------------ oracle
    def solve(self, inputs: tuple[int, int]) -> int:
        a, b = inputs
        return int(a) * int(b)

    def decode(self, tokens) -> str | list[str]:
        t = torch.as_tensor(tokens)
        if t.ndim == 2:
            return [self.decode(row) for row in t]
        return " ".join(VOCAB[i] if 0 <= i < len(VOCAB) else f"<{i}>" for i in t.tolist())

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, length: int | None = None, seed: int = 0) -> Batch:
        check_n(n)
        wa, wb = self.widths(length)
        da = self.digits if length is None else int(length)
        db = self.b_digits if self.b_digits is not None else da
        rng = rng_for(seed)
        a = rng.integers(0, 10, size=(n, da))  # digits, units first
        b = rng.integers(0, 10, size=(n, db))
        if self.simple_fraction > 0:
            simple = rng.random(n) < self.simple_fraction
            place = rng.integers(0, db, size=n)
            digit = rng.integers(1, 10, size=n)
            bs = np.zeros((n, db), dtype=np.int64)
            bs[np.arange(n), place] = digit
            b = np.where(simple[:, None], bs, b)
        a_digits = np.zeros((n, wa), dtype=np.int64)
        b_digits = np.zeros((n, wb), dtype=np.int64)
        a_digits[:, :da] = a
        b_digits[:, :db] = b
        return self.batch_from_digits(a_digits, b_digits, length=da)

    def batch_from_operands(self, a, b, length: int | None = None) -> Batch:
        """Build a Batch from integer operands (sequences of Python ints)."""
        wa, wb = self.widths(length)
        a = [int(v) for v in a]
        b = [int(v) for v in b]
        for v, w, nm in [(max(a), wa, "a"), (max(b), wb, "b")]:
            if v >= 10**w or min(a + b) < 0:
                raise ProbekitError(f"operand {nm}={v} does not fit in {w} digits")
        ad = np.array([[(v // 10**i) % 10 for i in range(wa)] for v in a], dtype=np.int64)
        bd = np.array([[(v // 10**j) % 10 for j in range(wb)] for v in b], dtype=np.int64)
        return self.batch_from_digits(ad, bd, length=self.digits if length is None else length)

    def batch_from_digits(self, a_digits, b_digits, length: int) -> Batch:
        """Digits are units first: ``a_digits[:, 0]`` is the units digit of a."""
        a_d = np.asarray(a_digits, dtype=np.int64)
        b_d = np.asarray(b_digits, dtype=np.int64)
        n, wa = a_d.shape
        wb = b_d.shape[1]
        if max(wa, wb) > MAX_DIGITS:
            raise ProbekitError(f"operands of {wa} and {wb} digits; expected at most {MAX_DIGITS} digits each "
                                "(operand values must stay exact in int64)")
        P = wa + wb
        S, carry, digit = _column_arithmetic(a_d, b_d)

        T = wa + 1 + wb + 1 + P
        a_w, b_w = (a_d, b_d) if self.reverse_operands else (a_d[:, ::-1], b_d[:, ::-1])  # as written
        a_place, b_place = (np.arange(wa), np.arange(wb)) if self.reverse_operands else \
            (np.arange(wa)[::-1], np.arange(wb)[::-1])  # the place of each written operand digit
        tokens = np.zeros((n, T), dtype=np.int64)
        tokens[:, :wa] = a_w
        tokens[:, wa] = TIMES
        tokens[:, wa + 1:wa + 1 + wb] = b_w
        eq = wa + 1 + wb
        tokens[:, eq] = EQUALS
        ans = eq + 1 + np.arange(P)  # token positions of the answer
        k_at = np.arange(P) if self.reverse else np.arange(P)[::-1]  # digit index written at answer step
        tokens[:, ans] = digit[:, k_at]
        answer_mask = np.zeros((n, T), dtype=bool)
        answer_mask[:, ans] = True
        f = _features(a_w, b_w, a_place, b_place, S, carry, digit, ans, k_at, T)
        has_carry = carry[:, 1:] > 0
        return Batch(
            tokens=torch.from_numpy(tokens),
            answer_mask=torch.from_numpy(answer_mask),
            features={k: torch.from_numpy(v) for k, v in f.items()},
            task=self.name,
            objective=self.objective,
            length=int(length),
            prompt_len=eq + 1,
            meta={
                "a": torch.from_numpy(a_d @ (10 ** np.arange(wa, dtype=np.int64))),
                "b": torch.from_numpy(b_d @ (10 ** np.arange(wb, dtype=np.int64))),
                "n_carries": torch.from_numpy(has_carry.sum(axis=1)),
                "max_cascade": torch.from_numpy(_longest_run(has_carry)),
            },
            pos_labels=_pos_labels(a_place, b_place, T, ans, k_at),
        )

    # ------------------------------------------------------------------ corruptions
    def _corrupted(self, batch: Batch, a2, b2) -> Batch:
        return self.batch_from_digits(a2, b2, length=batch.length)

    def carry_flip(self, batch: Batch, rng: np.random.Generator, digit=None, operand=None) -> Edit:
        """One lower digit changed so the carry into product digit ``digit`` changes, column ``digit`` kept."""
        k, a2, b2, valid, rec = self._edit_digit(batch, rng, digit, operand, "carry-flip")
        desc = (f"carry-flip at product digit {k}: one digit of {'a or b' if operand is None else operand} at a place "
                f"< {k} changed so the carry into digit {k} changes while every product in column {k} is unchanged "
                f"(the edited digit does not enter column {k} or its partner there is 0); places >= {k} kept")
        kept = (f"operand digits at places >= {k}", f"column {k} products a_i*b_(k-i)", f"column sum S_{k}")
        step = batch.features["digit_index"][0][batch.pred_mask[0]].tolist().index(k)
        return Edit(self._corrupted(batch, a2, b2), valid, rec, desc, kept, {"digit": k, "operand": operand}, step)

    def _edit_digit(self, batch: Batch, rng: np.random.Generator, digit, operand, rule: str):
        """The shared steps of ``carry-flip`` and ``column-digit``: check the options, list the candidate
        edits, draw one valid edit per row. Returns (digit k, corrupted a, b, valid rows, record)."""
        a, b = _digits(batch)
        n, wa = a.shape
        P = wa + b.shape[1]
        da = batch.length
        db = self.b_digits if self.b_digits is not None else da
        k = P // 2 if digit is None else int(digit)
        lo = 1 if rule == "carry-flip" else 0
        if not lo <= k < P:
            why = " (the carry into digit 0 is always 0)" if rule == "carry-flip" else ""
            raise ProbekitError(f"{rule} digit must be in {lo}..{P - 1}{why}, got {k}")
        if operand not in (None, "a", "b"):
            raise ProbekitError(f"{rule} operand must be 'a', 'b' or None, got {operand!r}")
        find = _carry_flip_candidates if rule == "carry-flip" else _column_digit_candidates
        cands = find(a, b, k, da, db, operand)
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
        return k, a2, b2, valid_any, rec

    def column_digit(self, batch: Batch, rng: np.random.Generator, digit=None, operand=None) -> Edit:
        """One digit of column ``digit`` changed so that product digit ``digit`` changes and its carry is kept."""
        k, a2, b2, valid, rec = self._edit_digit(batch, rng, digit, operand, "column-digit")
        desc = (f"column-digit at product digit {k}: one digit of {'a or b' if operand is None else operand} that "
                f"enters column {k} (its partner there is not 0) changed so that digit {k} changes while the carry "
                f"into digit {k} is kept")
        kept = (f"carry into digit {k}, c_{k}",)
        step = batch.features["digit_index"][0][batch.pred_mask[0]].tolist().index(k)
        return Edit(self._corrupted(batch, a2, b2), valid, rec, desc, kept, {"digit": k, "operand": operand}, step)

    def operand_digit(self, batch: Batch, rng: np.random.Generator, operand="a", place=0, value=None) -> Edit:
        """Digit ``place`` of ``operand`` gets a new value (``value`` or a random one) that changes the product."""
        a, b = _digits(batch)
        n = a.shape[0]
        da = batch.length
        db = self.b_digits if self.b_digits is not None else da
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
        desc = (f"operand-digit: digit {place} of {operand} changed to "
                + ("a random other value" if value is None else str(value)) + " that changes the product")
        kept = (f"every operand digit except {operand}_{place}",)
        return Edit(self._corrupted(batch, a2, b2), valid, rec, desc, kept,
                    {"operand": operand, "place": place, "value": value})

    def random_digit(self, batch: Batch, rng: np.random.Generator) -> Edit:
        """One digit of a, at a random place below its digit count, shifted by 1..9 (mod 10)."""
        wa, wb = self.widths(batch.length)
        a = np.array([[(int(v) // 10**i) % 10 for i in range(wa)] for v in batch.meta["a"].tolist()], dtype=np.int64)
        b = np.array([[(int(v) // 10**j) % 10 for j in range(wb)] for v in batch.meta["b"].tolist()], dtype=np.int64)
        n = a.shape[0]
        rows = np.arange(n)
        i = rng.integers(0, min(wa, batch.length), n)
        old = a[rows, i].copy()
        a[rows, i] = (a[rows, i] + rng.integers(1, 10, n)) % 10
        rec = {"operand": np.zeros(n, dtype=np.int64), "place": i, "old": old, "new": a[rows, i].copy()}
        desc = "random-digit: one digit of a, at a random place, shifted by 1..9 (mod 10)"
        return Edit(self._corrupted(batch, a, b), np.ones(n, dtype=bool), rec, desc, ("b",))


def _digits(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """Operand digits units first, at their padded widths (in either written order)."""
    op, place = batch.features["operand"][0].numpy(), batch.features["place"][0].numpy()
    tok = batch.tokens.numpy()
    at = [np.flatnonzero(op == o) for o in (0, 1)]
    return tuple(tok[:, p[np.argsort(place[p])]].copy() for p in at)


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


def _carry_flip_candidates(a, b, k: int, da: int, db: int, operand) -> list:
    """Every single-digit edit (operand, place, value, valid rows) below place k that flips the carry into k."""
    n, wa = a.shape
    wb = b.shape[1]
    S0, c0 = _carries(a, b)
    d0 = (S0[:, k] + c0[:, k]) % 10
    cands = []
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
    return cands


def _column_digit_candidates(a, b, k: int, da: int, db: int, operand) -> list:
    """Every single-digit edit (operand, place, value, valid rows) in column k that keeps the carry into k and
    changes digit k."""
    n, wa = a.shape
    wb = b.shape[1]
    S0, c0 = _carries(a, b)
    d0 = (S0[:, k] + c0[:, k]) % 10
    cands = []
    for op, x, d_self, y, w_other in (("a", a, da, b, wb), ("b", b, db, a, wa)):
        if operand not in (None, op):
            continue
        for i in range(max(0, k - w_other + 1), min(k + 1, d_self)):
            partner = y[:, k - i]
            for v in range(10):
                x2 = x.copy()
                x2[:, i] = v
                a2, b2 = (x2, b) if op == "a" else (a, x2)
                S2, c2 = _carries(a2, b2)
                ok = (x[:, i] != v) & (partner != 0) & (c2[:, k] == c0[:, k]) & ((S2[:, k] + c2[:, k]) % 10 != d0)
                cands.append((op, i, v, ok))
    return cands


def _column_arithmetic(a_d: np.ndarray, b_d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Long multiplication of units-first digits: column sums ``S_k = sum_{i+j=k} a_i b_j`` ``[n, P]``, the
    carries into each column ``[n, P + 1]`` (carried left to right) and the product's digits ``[n, P]``."""
    n, wa = a_d.shape
    wb = b_d.shape[1]
    P = wa + wb
    S = np.zeros((n, P), dtype=np.int64)
    for i in range(wa):
        S[:, i:i + wb] += a_d[:, i:i + 1] * b_d
    carry = np.zeros((n, P + 1), dtype=np.int64)
    digit = np.zeros((n, P), dtype=np.int64)
    for k in range(P):
        tot = S[:, k] + carry[:, k]
        digit[:, k] = tot % 10
        carry[:, k + 1] = tot // 10
    assert (carry[:, P] == 0).all()
    return S, carry, digit


def _features(a_w, b_w, a_place, b_place, S, carry, digit, ans, k_at, T: int) -> dict[str, np.ndarray]:
    """The ground-truth features ``[n, T]`` (-1 where undefined): the operand digits at the input positions
    (``a_w``, ``b_w`` as written, with the place of each written digit), and the column arithmetic of the
    digit each predicting position (``ans - 1``) writes."""
    n, wa = a_w.shape
    wb = b_w.shape[1]
    eq = wa + 1 + wb
    P = wa + wb
    names = ("operand", "place", "operand_digit", "digit_index", "step", "column_sum", "carry_in",
             "carry_out", "digit", "target")
    f = {k: np.full((n, T), -1, dtype=np.int64) for k in names}
    f["operand"][:, :wa] = 0
    f["operand"][:, wa + 1:eq] = 1
    f["place"][:, :wa] = a_place
    f["place"][:, wa + 1:eq] = b_place
    f["operand_digit"][:, :wa] = a_w
    f["operand_digit"][:, wa + 1:eq] = b_w
    pp = ans - 1
    f["digit_index"][:, pp] = k_at
    f["step"][:, pp] = np.arange(P)
    f["column_sum"][:, pp] = S[:, k_at]
    f["carry_in"][:, pp] = carry[:, k_at]
    f["carry_out"][:, pp] = carry[:, k_at + 1]
    f["digit"][:, pp] = digit[:, k_at]
    f["target"][:, pp] = digit[:, k_at]
    return f


def _pos_labels(a_place, b_place, T: int, ans, k_at) -> tuple[str, ...]:
    """Structural position labels: ``a<place>``, ``*``, ``b<place>``, ``=``, then ``d<k>`` for the answer."""
    wa, wb = len(a_place), len(b_place)
    labels = ["*"] * T
    for t in range(wa):
        labels[t] = f"a{a_place[t]}"
    for j in range(wb):
        labels[wa + 1 + j] = f"b{b_place[j]}"
    labels[wa + 1 + wb] = "="
    for t, k in zip(ans, k_at, strict=True):
        labels[t] = f"d{k}"
    return tuple(labels)


def _longest_run(has_carry: np.ndarray) -> np.ndarray:
    """The longest run of consecutive columns with a carry out, per example (``max_cascade``)."""
    n, P = has_carry.shape
    run = np.zeros(n, dtype=np.int64)
    longest = np.zeros(n, dtype=np.int64)
    for k in range(P):
        run = np.where(has_carry[:, k], run + 1, 0)
        longest = np.maximum(longest, run)
    return longest
