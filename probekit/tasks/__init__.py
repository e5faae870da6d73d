"""Tasks with ground truth: `SortingTask`, `MultiplicationTask`, and `Mixture` for multi-task training."""

from probekit.tasks.base import Batch, Mixture, ProbekitError, Task
from probekit.tasks.multiplication import MultiplicationTask
from probekit.tasks.sorting import SortingTask

TASKS = {"sorting": SortingTask, "multiplication": MultiplicationTask}


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


__all__ = ["Batch", "Mixture", "MultiplicationTask", "ProbekitError", "SortingTask", "Task", "TASKS", "task_from_spec"]
