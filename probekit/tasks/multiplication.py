"""Multiplication a x b, operands zero-padded, product reversed (least significant digit first).

Worked example, 3 x 2 digits, 123 x 45 = 5535 (product padded to 3 + 2 = 5 digits)::

    reversed   1 2 3 * 4 5 = 5 3 5 5 0
    forward    1 2 3 * 4 5 = 0 5 5 3 5

Operands are written most significant digit first and zero-padded to their width; every product
digit is predicted. With digits a_i, b_j (i, j = 0 at the units), answer digit k has

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
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from probekit.checks import check_fields
from probekit.tasks.base import Batch, ProbekitError, check_n, rng_for

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
    simple_fraction: float = 0.0
    objective: str = "product"
    name: str = "multiplication"

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
        return {"name": self.name, "digits": self.digits, "b_digits": self.b_digits, "pad_to": self.pad_to,
                "reverse": self.reverse, "simple_fraction": self.simple_fraction}

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
        # column sums S_k = sum_{i+j=k} a_i b_j, then carries left to right
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

        T = wa + 1 + wb + 1 + P
        tokens = np.zeros((n, T), dtype=np.int64)
        tokens[:, :wa] = a_d[:, ::-1]
        tokens[:, wa] = TIMES
        tokens[:, wa + 1:wa + 1 + wb] = b_d[:, ::-1]
        eq = wa + 1 + wb
        tokens[:, eq] = EQUALS
        ans = eq + 1 + np.arange(P)  # token positions of the answer
        k_at = np.arange(P) if self.reverse else np.arange(P)[::-1]  # digit index written at answer step
        tokens[:, ans] = digit[:, k_at]
        answer_mask = np.zeros((n, T), dtype=bool)
        answer_mask[:, ans] = True

        names = ("operand", "place", "operand_digit", "digit_index", "step", "column_sum", "carry_in",
                 "carry_out", "digit", "target")
        f = {k: np.full((n, T), -1, dtype=np.int64) for k in names}
        f["operand"][:, :wa] = 0
        f["operand"][:, wa + 1:eq] = 1
        f["place"][:, :wa] = np.arange(wa)[::-1]
        f["place"][:, wa + 1:eq] = np.arange(wb)[::-1]
        f["operand_digit"][:, :wa] = a_d[:, ::-1]
        f["operand_digit"][:, wa + 1:eq] = b_d[:, ::-1]
        pp = ans - 1
        f["digit_index"][:, pp] = k_at
        f["step"][:, pp] = np.arange(P)
        f["column_sum"][:, pp] = S[:, k_at]
        f["carry_in"][:, pp] = carry[:, k_at]
        f["carry_out"][:, pp] = carry[:, k_at + 1]
        f["digit"][:, pp] = digit[:, k_at]
        f["target"][:, pp] = digit[:, k_at]

        has_carry = carry[:, 1:] > 0
        run = np.zeros(n, dtype=np.int64)
        longest = np.zeros(n, dtype=np.int64)
        for k in range(P):
            run = np.where(has_carry[:, k], run + 1, 0)
            longest = np.maximum(longest, run)
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
                "max_cascade": torch.from_numpy(longest),
            },
        )
