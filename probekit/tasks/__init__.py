"""Tasks with ground truth: `SortingTask`, `MultiplicationTask`, and `Mixture` for multi-task training.

Every module of this package (other than ``base``) that defines a task dataclass -- one with a ``name``
field and a ``corruptions()`` registry -- is registered in ``TASKS`` under that name, so a new task is
one new file here.
"""

import dataclasses
import importlib
import pkgutil

from probekit.tasks.base import Batch, Edit, Mixture, ProbekitError, Task, resample_rule
from probekit.tasks.multiplication import MultiplicationTask
from probekit.tasks.sorting import SortingTask


def _discover() -> dict[str, type]:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, type) and obj.__module__ == mod.__name__ and dataclasses.is_dataclass(obj) \
                    and callable(getattr(obj, "corruptions", None)) and "name" in obj.__dataclass_fields__:
                found[obj.__dataclass_fields__["name"].default] = obj
    return found


TASKS = _discover()


def task_from_spec(spec: dict) -> Task:
    """Rebuild a task from its ``spec()`` dict (as saved in a model's config.json).

    Unknown fields are refused here; the task's constructor checks each field's type and range."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ProbekitError(f"task spec must be a dict with a 'name', got {spec!r}")
    name = spec["name"]
    if name not in TASKS:
        raise ProbekitError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    cls = TASKS[name]
    params = {k: v for k, v in spec.items() if k != "name"}
    allowed = set(cls.__dataclass_fields__) - {"name", "objectives", "vocab"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ProbekitError(f"unknown field(s) {unknown} in task spec for {name!r}; expected a subset of {sorted(allowed)}")
    return cls(**params)


__all__ = ["Batch", "Edit", "Mixture", "MultiplicationTask", "ProbekitError", "SortingTask", "Task", "TASKS",
           "resample_rule", "task_from_spec"]
