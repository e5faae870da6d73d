"""The task contract: a `Task` samples `Batch`es that carry their own ground truth.

Axis names used across probekit: ``batch`` (examples), ``pos`` (token positions).

A `Batch` holds one token sequence per example (prompt + answer) and, per position, the latent
variables a correct algorithm computes. Two masks say where the answer is:

- ``answer_mask[b, t]`` is True where ``tokens[b, t]`` is an answer token the model predicts
  (from the logits at ``t - 1``);
- ``pred_mask[b, t] = answer_mask[b, t + 1]`` is True at the positions whose logits predict an
  answer token. Features that describe an answer step (the target, the carry into digit k, ...)
  live at these predicting positions, because that is where the model must compute them.

Every feature is a LongTensor ``[batch, pos]`` holding -1 where it is undefined; a numeric feature made
for a regression probe (`Batch.from_tokens`) may instead be a float tensor holding NaN where it is
undefined. ``pos_labels`` (optional)
names each token position structurally, the same for every row (``x3``, ``|``, ``y0``; see
`probekit.metrics.position_labels`).

Adding a task means writing one file in ``probekit/tasks/``: a frozen dataclass that follows the `Task`
protocol below (sampling, ``solve()``, features, its corruption rules and its position labels). The
package finds it there and registers it in ``TASKS`` under its ``name`` field, so saved models of the
task load (`probekit.tasks.task_from_spec`). A task class defined elsewhere works with every
instrument too; it is only not rebuilt from a spec.

Nothing outside ``probekit/tasks/`` knows a task by its name: instruments read features, masks and
labels from the batch and ask the task for its corruptions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor


class ProbekitError(ValueError):
    """Bad input: the message says what was found and what was expected (the CLI exits 2)."""


@dataclass(frozen=True)
class Batch:
    tokens: Int[Tensor, "batch pos"]
    answer_mask: Bool[Tensor, "batch pos"]
    features: dict[str, Int[Tensor, "batch pos"]]
    task: str
    objective: str
    length: int
    prompt_len: int
    meta: dict[str, Any] = field(default_factory=dict)
    pos_labels: tuple[str, ...] | None = None  # the task's label of each position (same for every row)

    def __post_init__(self):
        if self.tokens.shape != self.answer_mask.shape:
            raise ProbekitError(f"answer_mask shape {tuple(self.answer_mask.shape)} != tokens shape {tuple(self.tokens.shape)}")
        for name, f in self.features.items():
            if f.shape != self.tokens.shape:
                raise ProbekitError(f"feature {name!r} has shape {tuple(f.shape)}, expected {tuple(self.tokens.shape)}")
        if self.pos_labels is not None and len(self.pos_labels) != self.tokens.shape[1]:
            raise ProbekitError(f"pos_labels has {len(self.pos_labels)} labels; expected one per position "
                                f"({self.tokens.shape[1]})")

    @classmethod
    def from_tokens(cls, tokens, answer_mask, features: dict | None = None, *, name: str = "custom",
                    objective: str = "custom", length: int | None = None) -> Batch:
        """A batch of the user's own data: tokens ``[batch, pos]``, a bool answer mask, optional features.

        ``tokens``: 2-D integer ids (>= 0). ``answer_mask``: bool, same shape, True where the token is an
        answer the model predicts from the logits at ``t - 1`` (so never at position 0); it may be all False
        when only probes are wanted. ``features``: ``{name: [batch, pos]}``, each either integer (a class per
        position, -1 = undefined; bool is read as 0/1) or float (a value for a regression probe, NaN =
        undefined). Defaults: ``task = name``, ``objective``, ``length`` = the sequence length,
        ``prompt_len`` = the first answer position of any row (the sequence length if there is none).
        Bad input raises a one-line `ProbekitError`.
        """
        tokens = _as_tensor(tokens, "tokens")
        if tokens.ndim != 2 or tokens.numel() == 0:
            raise ProbekitError(f"tokens have shape {tuple(tokens.shape)}; expected a non-empty 2-D [batch, pos] tensor")
        if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
            raise ProbekitError(f"tokens have dtype {tokens.dtype}; expected integer token ids (torch.long)")
        if int(tokens.min()) < 0:
            raise ProbekitError(f"tokens hold a negative id ({int(tokens.min())}); expected ids >= 0")
        mask = _as_tensor(answer_mask, "answer_mask")
        if mask.dtype != torch.bool:
            raise ProbekitError(f"answer_mask has dtype {mask.dtype}; expected torch.bool (True at answer tokens)")
        if mask.shape != tokens.shape:
            raise ProbekitError(f"answer_mask has shape {tuple(mask.shape)}; expected the tokens' {tuple(tokens.shape)}")
        if mask[:, 0].any():
            raise ProbekitError("answer_mask is True at position 0; expected answers after a prompt (logits at t-1 predict t)")
        if not isinstance(name, str) or not name:
            raise ProbekitError(f"name is {name!r}; expected a non-empty string")
        if features is not None and not isinstance(features, dict):
            raise ProbekitError(f"features is a {type(features).__name__}; expected a dict {{name: [batch, pos] tensor}}")
        feats = {k: _as_feature(k, v, tokens.shape) for k, v in (features or {}).items()}
        first = torch.nonzero(mask.any(0)).flatten()
        T = tokens.shape[1]
        if length is not None and (not isinstance(length, int) or length <= 0):
            raise ProbekitError(f"length is {length!r}; expected a positive integer")
        return cls(tokens=tokens.long(), answer_mask=mask, features=feats, task=name, objective=objective,
                   length=length if length is not None else T, prompt_len=int(first[0]) if first.numel() else T,
                   meta={"source": "from_tokens"})

    def defined(self, name: str) -> Bool[Tensor, "batch pos"]:
        """Where feature ``name`` is defined: not -1 (integer features), not NaN (float features)."""
        f = self.feature(name)
        return ~torch.isnan(f) if f.is_floating_point() else f != -1

    @property
    def n(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def pred_mask(self) -> Bool[Tensor, "batch pos"]:
        """True at positions whose logits predict an answer token."""
        m = torch.zeros_like(self.answer_mask)
        m[:, :-1] = self.answer_mask[:, 1:]
        return m

    @property
    def answer_slice(self) -> slice:
        return slice(self.prompt_len, self.seq_len)

    def feature(self, name: str) -> Int[Tensor, "batch pos"]:
        if name not in self.features:
            raise ProbekitError(
                f"feature {name!r} is not defined for task {self.task!r} (objective {self.objective!r}); "
                f"expected one of {sorted(self.features)}"
            )
        return self.features[name]

    def select(self, idx) -> Batch:
        """A sub-batch (rows ``idx``), same length and objective."""
        return replace(
            self,
            tokens=self.tokens[idx],
            answer_mask=self.answer_mask[idx],
            features={k: v[idx] for k, v in self.features.items()},
            meta={k: (v[idx] if isinstance(v, Tensor) else v) for k, v in self.meta.items()},
        )

    def to(self, device) -> Batch:
        return replace(
            self,
            tokens=self.tokens.to(device),
            answer_mask=self.answer_mask.to(device),
            features={k: v.to(device) for k, v in self.features.items()},
        )


@dataclass(frozen=True)
class Edit:
    """What a corruption rule returns for a batch of ``n`` rows (see `Task.corruptions`).

    ``corrupted`` has the clean batch's shape and answer layout (rows where ``valid`` is False may hold
    anything); ``record`` holds per-row arrays ``[n]`` saying what was edited (-1 where invalid);
    ``answer_step`` is the answer step whose target changes by construction (the default step of a
    metric), or None.
    """

    corrupted: Batch
    valid: np.ndarray
    record: dict[str, np.ndarray]
    description: str
    kept: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)
    answer_step: int | None = None


CorruptionRule = Callable[..., Edit]  # rule(batch, rng, **options) -> Edit


def resample_rule(task: Task) -> CorruptionRule:
    """The corruption every task has: an independent problem of the same size (same objective)."""

    def resample(batch: Batch, rng: np.random.Generator) -> Edit:
        other = task.with_objective(batch.objective).sample(batch.n, length=batch.length, seed=int(rng.integers(2**31)))
        return Edit(other, np.ones(batch.n, dtype=bool), {}, "resample: an independent problem of the same size")

    return resample

def _as_tensor(x, what: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError):
        raise ProbekitError(f"{what} is a {type(x).__name__}; expected a tensor or array") from None


def _as_feature(name, f, shape) -> Tensor:
    """A feature as long (-1 = undefined) or float32 (NaN = undefined), checked against the tokens' shape."""
    if not isinstance(name, str) or not name:
        raise ProbekitError(f"feature name {name!r}; expected a non-empty string")
    f = _as_tensor(f, f"feature {name!r}")
    if f.shape != shape:
        raise ProbekitError(f"feature {name!r} has shape {tuple(f.shape)}; expected the tokens' {tuple(shape)}")
    if f.dtype == torch.bool:
        return f.long()
    if f.is_floating_point():
        if torch.isinf(f).any():
            raise ProbekitError(f"feature {name!r} holds inf; expected finite values (NaN = undefined)")
        return f.float()
    if f.is_complex():
        raise ProbekitError(f"feature {name!r} has dtype {f.dtype}; expected integer (-1 = undefined) or float (NaN = undefined)")
    if f.numel() and int(f.min()) < -1:
        raise ProbekitError(f"integer feature {name!r} holds {int(f.min())}; expected values >= 0, or -1 where undefined")
    return f.long()


@runtime_checkable
class Task(Protocol):
    """What probekit needs from a task. See `probekit.tasks.sorting` for a worked example.

    ``corruptions()`` is the task's registry of corruption rules, ``{kind: rule}``, first kind the
    default; ``rule(batch, rng, **options) -> Edit`` draws from the numpy generator ``rng`` only, so a
    pair is fixed by its seed. `probekit.corruptions.corrupt` dispatches to it, checks the pair and
    handles rows without a valid corruption. ``resample_rule(self)`` gives the shared ``resample`` kind.
    Batches carry the task's position labels (``Batch.pos_labels``). Optional: ``display_length``, the
    length of the example shown in attention views (default: the task's default length), and
    ``probe_feature``, the feature an instrument probes when none is named (`probekit.compare`).
    """

    name: str
    objective: str
    objectives: tuple[str, ...]
    vocab: tuple[str, ...]

    @property
    def d_vocab(self) -> int: ...

    def sample(self, n: int, length: int | None = None, seed: int = 0) -> Batch: ...

    def seq_len(self, length: int | None = None) -> int: ...

    def decode(self, tokens) -> str | list[str]: ...

    def solve(self, inputs) -> list: ...

    def with_objective(self, objective: str) -> Task: ...

    def spec(self) -> dict: ...

    def corruptions(self) -> dict[str, CorruptionRule]: ...


def check_n(n: int) -> None:
    """Refuse a sample size that is not a positive integer."""
    if not isinstance(n, int | np.integer) or n <= 0:
        raise ProbekitError(f"n must be a positive integer, got {n!r}")


def rng_for(seed: int) -> np.random.Generator:
    """The numpy generator every task samples from (deterministic given ``seed``)."""
    return np.random.default_rng(seed)


class Mixture:
    """A weighted mixture of objectives of one task; each call samples a whole batch from one objective.

    Used for multi-task (hint) training: ``Mixture(task, {"sort": 1, "successor": 1})``.
    Deterministic given ``seed``: the objective and the batch are both drawn from it.
    """

    def __init__(self, task: Task, weights: dict[str, float]):
        if not weights:
            raise ProbekitError("objective weights are empty; expected e.g. {'sort': 1.0}")
        for name, w in weights.items():
            if name not in task.objectives:
                raise ProbekitError(f"unknown objective {name!r} for task {task.name!r}; expected one of {list(task.objectives)}")
            if not (w >= 0):
                raise ProbekitError(f"objective weight for {name!r} must be >= 0, got {w!r}")
        total = float(sum(weights.values()))
        if total <= 0:
            raise ProbekitError(f"objective weights sum to {total}; expected a positive sum")
        self.task = task
        self.names = list(weights)
        self.probs = np.array([weights[k] / total for k in self.names])
        self.components = {k: task.with_objective(k) for k in self.names}
        self.name = task.name

    def sample(self, n: int, length: int | None = None, seed: int = 0) -> Batch:
        rng = rng_for(seed)
        name = self.names[int(rng.choice(len(self.names), p=self.probs))]
        return self.components[name].sample(n, length=length, seed=int(rng.integers(2**31)))

    def seq_len(self, length: int | None = None) -> int:
        return max(t.seq_len(length) for t in self.components.values())
