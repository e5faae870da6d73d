"""Task-aware corruptions: a clean batch -> a corrupted batch of the same shape, saying what changes.

Axis names: ``batch`` (examples), ``pos`` (token positions), ``answer`` (answer steps).

``corrupt(task, batch, kind, seed=..., **opts)`` returns a `CorruptedPair`: the clean and the
corrupted `Batch` (identical shape and answer layout; the corrupted batch carries its own answer
and features, so it is teacher forced on its own answer), a description, a per-row record of the
edit (``changed``), what is guaranteed to be kept, and the answer steps whose target changes by
construction (the default steps of a metric, `probekit.metrics`).

The rules belong to the tasks: ``task.corruptions()`` is each task's registry ``{kind: rule}``
(`probekit.tasks.base.Task`); the rules of each task are documented in its module
(`probekit.tasks.multiplication`: ``carry-flip``, ``column-digit``, ``operand-digit``, ``random-digit``, ``resample``;
`probekit.tasks.sorting`: ``successor-change``, ``swap``, ``replace``, ``resample``).
`corruption_kinds(task)` lists them. `corrupt` seeds one numpy generator, calls the rule, checks the
pair (`probekit.metrics.check_pair`) and handles the rows that have no valid corruption.

Invalid rows: with ``invalid='resample'`` (the default) each invalid clean row is replaced by a
fresh clean example (seeded) that has a valid corruption, so the pair keeps ``n`` rows; with
``invalid='drop'`` invalid rows are removed. Either way ``n_invalid`` counts them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from probekit.metrics import check_pair
from probekit.tasks import TASKS, Batch, ProbekitError, Task
from probekit.tasks.base import Edit


def corruption_kinds(task: Task) -> tuple[str, ...]:
    """The corruption kinds ``task`` defines, its default first."""
    rules = getattr(task, "corruptions", None)
    return tuple(rules()) if callable(rules) else ()


CORRUPTIONS = {name: corruption_kinds(cls()) for name, cls in TASKS.items()}  # kinds of the built-in tasks


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
        check_pair(self.clean, self.corrupted)

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


# ---------------------------------------------------------------------------- entry point


def _rule(task: Task, batch: Batch, kind: str, opts: dict):
    kinds = corruption_kinds(task)
    if not kinds:
        raise ProbekitError(f"task {batch.task!r} defines no corruptions; expected a task with a corruptions() registry")
    if kind not in kinds:
        raise ProbekitError(f"corruption {kind!r} is not defined for task {batch.task!r}; expected one of {list(kinds)}")
    rule = task.corruptions()[kind]
    params = list(inspect.signature(rule).parameters)[2:]  # after (batch, rng)
    unknown = sorted(set(opts) - set(params))
    if unknown:
        raise ProbekitError(f"corruption {kind!r} takes " + (f"options {params}" if params else "no options")
                            + f", got {unknown}")
    return rule


def _apply(rule, batch: Batch, rng, opts) -> Edit:
    edit = rule(batch, rng, **opts)
    if not isinstance(edit, Edit):
        raise ProbekitError(f"a corruption rule returned {type(edit).__name__}; expected an Edit")
    check_pair(batch, edit.corrupted)
    return edit


def _concat(batches: list[Batch]) -> Batch:
    first = batches[0]
    return replace(first, tokens=torch.cat([b.tokens for b in batches]),
                   answer_mask=torch.cat([b.answer_mask for b in batches]),
                   features={k: torch.cat([b.features[k] for b in batches]) for k in first.features},
                   meta={k: (torch.cat([b.meta[k] for b in batches]) if isinstance(v, Tensor) else v)
                         for k, v in first.meta.items()})


def corrupt(task: Task, batch: Batch, kind: str, *, seed: int = 0, invalid: str = "resample", **opts) -> CorruptedPair:
    """Corrupt ``batch`` (sampled from ``task``) with the task's rule ``kind``; rules are documented in each task's module."""
    if batch.task != task.name:
        raise ProbekitError(f"batch is from task {batch.task!r} but the task is {task.name!r}")
    rule = _rule(task, batch, kind, opts)
    if invalid not in ("resample", "drop"):
        raise ProbekitError(f"invalid must be 'resample' or 'drop', got {invalid!r}")
    rng = np.random.default_rng(seed)
    edit = _apply(rule, batch, rng, opts)
    valid = np.asarray(edit.valid, dtype=bool)
    n_invalid = int((~valid).sum())
    keep = torch.from_numpy(np.flatnonzero(valid))
    cleans, corrs = [batch.select(keep)], [edit.corrupted.select(keep)]
    recs = [{k: v[valid] for k, v in edit.record.items()}]
    have = len(keep)
    if invalid == "resample" and n_invalid:
        t = task.with_objective(batch.objective)
        for _ in range(50):
            need = batch.n - have
            if need <= 0:
                break
            fresh = t.sample(max(2 * need, 16), length=batch.length, seed=int(rng.integers(2**31)))
            e2 = _apply(rule, fresh, rng, opts)
            idx = torch.from_numpy(np.flatnonzero(e2.valid)[:need])
            if len(idx):
                cleans.append(fresh.select(idx))
                corrs.append(e2.corrupted.select(idx))
                recs.append({k: v[idx.numpy()] for k, v in e2.record.items()})
                have += len(idx)
        if have < batch.n:
            raise ProbekitError(f"corruption {kind!r} found a valid corruption for only {have} of {batch.n} rows "
                                f"after resampling; expected a setting where it exists (options {edit.options})")
    if have == 0:
        raise ProbekitError(f"corruption {kind!r} is impossible for every row of this batch (options {edit.options})")
    clean_b, corr_b = _concat(cleans), _concat(corrs)
    record = {k: torch.from_numpy(np.concatenate([r[k] for r in recs])) for k in recs[0]}
    steps = (int(edit.answer_step),) if edit.answer_step is not None else None
    policy = "replaced by fresh examples" if invalid == "resample" else "dropped"
    desc = edit.description + f"; {n_invalid} of {batch.n} rows had no valid corruption and were {policy}"
    return CorruptedPair(clean_b, corr_b, kind=kind, description=desc, changed=record, kept=tuple(edit.kept),
                         answer_steps=steps, n_invalid=n_invalid, invalid_policy=invalid,
                         options=dict(edit.options) | {"seed": seed})


__all__ = ["CORRUPTIONS", "CorruptedPair", "corrupt", "corruption_kinds", "make_pair"]
