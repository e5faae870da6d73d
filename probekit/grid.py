"""Sweeps: grids of (configuration, seed) jobs, each trained and evaluated as one Ray task.

A grid file (JSON, one per study; the zoo's are in ``analyses/zoo/``)::

    {"name": "sort-extrap",
     "notes": "what the grid is for, what was decided before training",    (optional)
     "base": "base/sort-extrap.json",      a run config file {"name", "model", "task", "train"}
                                           (relative to the grid file), or such an object inline
     "configs": [{"name": "nope"},
                 {"name": "learned-pos", "model": {"positional": "learned"}, "notes": "..."}],
     "seeds": [0, 1, 2],                   each sets model.seed and train.seed
     "eval": {"lengths": [20, 50, 100], "n": 200, "seed": 0},   (+ "place_offsets": "train" or [0, 2, 4],
                                           optional: place models only, see `probekit.evaluate.greedy_decode`)
     "num_cpus": 2}                        CPUs per job (optional; default every core of this machine)

A configuration's ``model`` / ``task`` / ``train`` objects merge into the base's, field by field
(nested objects key by key; ``null`` or a non-object value replaces the base's value, so
``"objectives": null`` drops the hint). ``d_vocab`` follows the task unless a configuration sets it.

Folder layout of ``out``::

    sweep.json               the grid as run: eval settings and every job's resolved run config
    <config>/seed<k>/        a model folder (`probekit.train.train`) + metrics.json (`probekit.evaluate.evaluate`)
    summary.csv, summary.md  exact match per (configuration, length) over the finished seeds

Each job trains into its folder, resuming from the checkpoint a killed job left, then evaluates
at the grid's lengths. A job whose model and metrics (at the grid's lengths, n, seed and place offsets)
exist is skipped; one with a model but other metrics is only evaluated again. A job whose run config differs
from the one recorded in sweep.json, or from its model's config.json, is refused rather than resumed
into a mixture. A folder holding only this grid's configuration folders is adopted (model folders
trained elsewhere, e.g. ``mv runs/zoo/sort-baseline runs/sweeps/sort-zoo/sort-baseline/seed0``).

Jobs run as Ray tasks: without an address a local Ray instance is started for the call (every core,
no dashboard, a 100 MB object store, logs in a temporary folder, usage statistics off) and shut down
afterwards; with an address (``"auto"`` or ``host:port``) the jobs go to that cluster, whose
workers need probekit installed and ``out`` on a shared filesystem.

Intervals in the summary: with k >= 2 seeds, a 95 % t-interval over seeds (each seed's exact match
is one observation: mean +- t_{0.975, k-1} s / sqrt(k), clipped to [0, 1]); it measures how much
training outcomes vary, not test-sample noise. With one seed, the 95 % Wilson interval of that
seed's test sample, labelled ``Wilson, 1 seed``.

Shipping a job: ``ship(out / "sort-baseline" / "seed0", "sort-baseline")`` copies it into
``models/sort-baseline`` (then ``analyses/make_cards.py sort-baseline`` writes its card).
`write_tables` puts a sweep's summary table into a Markdown file such as ``docs/model_sweep.md``
(``probekit sweep GRID --out DIR --tables docs/model_sweep.md``); a configuration with no finished job in
DIR keeps its row of the earlier table, with a note saying so. `archive` copies the finished jobs'
records (config, metrics, training log; no weights) into a folder that can be kept with the project
(the zoo's: ``analyses/zoo/results/GRID``) and read by `write_tables` like the sweep folder itself.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from probekit.io import folder_entries
from probekit.tasks import ProbekitError, task_from_spec

GRID_KEYS = {"name", "notes", "base", "configs", "seeds", "eval", "num_cpus"}
CONFIG_KEYS = {"name", "notes", "model", "task", "train"}
EVAL_KEYS = {"lengths", "n", "seed", "place_offsets"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
OBJECT_STORE_BYTES = 100 * 2**20


# ---------------------------------------------------------------------------- writing


def _write(path: Path, write) -> Path:
    """The sweep's calls into the one writer, `probekit.io`."""
    from probekit.io import atomic_write

    return atomic_write(path, write)


def _write_text(path: Path, text: str) -> Path:
    from probekit.io import write_text

    return write_text(path, text)


def _write_json(path: Path, obj) -> Path:
    from probekit.io import write_json

    return write_json(path, obj)


# ---------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class Job:
    """One (configuration, seed) pair: its resolved run config, its folder and the evaluation settings."""

    config: str
    seed: int
    run: dict  # {"name", "model", "task", "train"}, seeds set
    dir: str
    lengths: tuple[int, ...]
    n: int
    eval_seed: int
    num_cpus: int
    threads: int | None = None  # torch threads (default num_cpus); fewer suit a machine shared with other work
    place_offsets: list[int] | str | None = None  # eval: the offset ensemble of a place model (None: offset 0)

    @property
    def id(self) -> str:
        return f"{self.config}/seed{self.seed}"


@dataclass(frozen=True)
class Grid:
    """A validated grid file (see the module docstring); ``base`` is the run config, inline."""

    name: str
    base: dict
    configs: dict[str, dict]  # configuration name -> its entry (overrides + notes)
    seeds: tuple[int, ...]
    lengths: tuple[int, ...]
    n: int
    eval_seed: int = 0
    num_cpus: int | None = None
    notes: str = ""
    place_offsets: list[int] | str | None = None

    def run_config(self, config: str, seed: int) -> dict:
        """The run config of job (config, seed): the base merged with the configuration's overrides."""
        entry = self.configs[config]
        conf = {"name": f"{config}-seed{seed}"}
        for part in ("model", "task", "train"):
            conf[part] = merge(self.base.get(part) or {}, entry.get(part) or {})
        if "d_vocab" not in (entry.get("model") or {}):
            conf["model"]["d_vocab"] = task_from_spec(conf["task"]).d_vocab
        conf["model"]["seed"] = seed
        conf["train"]["seed"] = seed
        return conf

    def jobs(self, out: str | Path, select: list[str] | None = None) -> list[Job]:
        """Every job of the grid in order (configurations, then seeds), or those ``select`` names:
        configuration names (all their seeds) or job ids ``config/seedK``."""
        every = [(c, s) for c in self.configs for s in self.seeds]
        if select is not None:
            ids = {f"{c}/seed{s}" for c, s in every}
            unknown = [x for x in select if x not in self.configs and x not in ids]
            if unknown:
                raise ProbekitError(f"unknown job(s) {unknown} in grid {self.name!r}; expected configuration names "
                                    f"{list(self.configs)} or ids like {next(iter(sorted(ids)))!r}")
            every = [(c, s) for c, s in every if c in select or f"{c}/seed{s}" in select]
        cpus = self.num_cpus or os.cpu_count() or 1
        out = Path(out).resolve()  # workers may run elsewhere (another cwd, another node)
        return [Job(c, s, self.run_config(c, s), str(out / c / f"seed{s}"), self.lengths, self.n,
                    self.eval_seed, cpus, place_offsets=self.place_offsets) for c, s in every]

    def to_dict(self) -> dict:
        ev = {"lengths": list(self.lengths), "n": self.n, "seed": self.eval_seed}
        ev |= {"place_offsets": self.place_offsets} if self.place_offsets is not None else {}
        return {"name": self.name, "notes": self.notes, "base": self.base, "configs": list(self.configs.values()),
                "seeds": list(self.seeds), "eval": ev, "num_cpus": self.num_cpus}


def merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in: objects key by key, anything else (``null`` too) replaces."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise ProbekitError(f"{path} {'is a directory' if path.is_dir() else 'not found'}; expected {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ProbekitError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def _check_keys(obj, allowed: set[str], required: set[str], what: str) -> None:
    if not isinstance(obj, dict):
        raise ProbekitError(f"{what} must be a JSON object, got {type(obj).__name__}")
    missing, unknown = sorted(required - set(obj)), sorted(set(obj) - allowed)
    if missing:
        raise ProbekitError(f"{what} is missing field(s) {missing}; expected {sorted(required)}")
    if unknown:
        raise ProbekitError(f"{what} has unknown field(s) {unknown}; expected a subset of {sorted(allowed)}")


def _int_list(v, what: str, minimum: int) -> tuple[int, ...]:
    ok = isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum for x in v)
    if not ok or len(set(v)) != len(v):
        raise ProbekitError(f"{what} must be a non-empty list of distinct integers >= {minimum}, got {v!r}")
    return tuple(v)


def _positive_int(v, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ProbekitError(f"{what} must be a positive integer, got {v!r}")
    return v


def _seed(v, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ProbekitError(f"{what} must be an integer >= 0, got {v!r}")
    return v


def _name(v, what: str) -> str:
    if not isinstance(v, str) or not NAME_RE.match(v):
        raise ProbekitError(f"{what} must be a name of letters, digits, '.', '_' or '-' (it names a folder), got {v!r}")
    return v


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file: every field, every configuration's run config, every length."""
    from probekit.train import load_run_config

    path = Path(path)
    d = _read_json(path, "a grid file (JSON with 'name', 'base', 'configs', 'seeds' and 'eval')")
    _check_keys(d, GRID_KEYS, GRID_KEYS - {"notes", "num_cpus"}, f"grid {path}")
    where = f"grid {path}"
    if isinstance(d["base"], str):
        conf = load_run_config(path.parent / d["base"])[3]  # a model's config.json works too
        base = {k: conf[k] for k in ("name", "model", "task", "train") if k in conf}
    elif isinstance(d["base"], dict):
        base = d["base"]
    else:
        raise ProbekitError(f"{where}: base must be a run config file name or a run config object, got {d['base']!r}")
    return grid_from_dict({**d, "base": base}, where)


def grid_from_dict(d: dict, where: str = "grid") -> Grid:
    """A `Grid` from a grid object whose ``base`` is inline (the form sweep.json records)."""
    _check_keys(d, GRID_KEYS, GRID_KEYS - {"notes", "num_cpus"}, where)
    _check_keys(d["base"], {"name", "model", "task", "train"}, {"model", "task", "train"}, f"{where}: base")
    if not isinstance(d["configs"], list) or not d["configs"]:
        raise ProbekitError(f"{where}: configs must be a non-empty list of objects with a 'name', got {d['configs']!r}")
    configs: dict[str, dict] = {}
    for i, entry in enumerate(d["configs"]):
        _check_keys(entry, CONFIG_KEYS, {"name"}, f"{where}: configs[{i}]")
        name = _name(entry["name"], f"{where}: configs[{i}].name")
        if name in configs:
            raise ProbekitError(f"{where}: configuration name {name!r} appears twice; names must be unique")
        for part in ("model", "train"):
            if "seed" in (entry.get(part) or {}):
                raise ProbekitError(f"{where}: configuration {name!r} sets {part}.seed; seeds come from the grid's 'seeds'")
        configs[name] = entry
    ev = d["eval"]
    _check_keys(ev, EVAL_KEYS, {"lengths", "n"}, f"{where}: eval")
    num_cpus = d.get("num_cpus")
    grid = Grid(name=_name(d["name"], f"{where}: name"), base=d["base"], configs=configs,
                seeds=_int_list(d["seeds"], f"{where}: seeds", 0),
                lengths=_int_list(ev["lengths"], f"{where}: eval.lengths", 1),
                n=_positive_int(ev["n"], f"{where}: eval.n"), eval_seed=_seed(ev.get("seed", 0), f"{where}: eval.seed"),
                num_cpus=None if num_cpus is None else _positive_int(num_cpus, f"{where}: num_cpus"),
                notes=str(d.get("notes") or ""), place_offsets=_place_offsets(ev.get("place_offsets"), where))
    for name in configs:
        _check_run(grid.run_config(name, grid.seeds[0]), grid.lengths, f"{where}: configuration {name!r}",
                   grid.place_offsets)
    return grid


def parse_run(conf: dict):
    """``(ModelConfig, Task, TrainConfig)`` of a resolved run config."""
    from probekit.model import ModelConfig
    from probekit.train import TrainConfig

    task = task_from_spec(conf["task"])
    mcfg = ModelConfig.from_dict(conf["model"])
    if mcfg.d_vocab != task.d_vocab:
        raise ProbekitError(f"model d_vocab={mcfg.d_vocab} but task {task.name!r} has {task.d_vocab} tokens; they must match")
    return mcfg, task, TrainConfig.from_dict(conf["train"] or {})


def _place_offsets(v, where: str) -> list[int] | str | None:
    """The eval block's ``place_offsets``: absent (None), ``"train"``, or a list of distinct integers >= 0."""
    if v is None or v == "train":
        return v
    return list(_int_list(v, f"{where}: eval.place_offsets ('train' or a list)", 0))


def place_offsets_flag(offsets) -> str:
    """The ``probekit eval`` option that repeats a ``place_offsets`` setting ("" for None)."""
    if offsets is None:
        return ""
    return f" --place-offsets {offsets if isinstance(offsets, str) else ','.join(map(str, offsets))}"


def _check_run(conf: dict, lengths: tuple[int, ...], where: str, place_offsets=None) -> None:
    """The run config parses, its training and evaluation lengths fit the model's context, and the
    evaluation's place offsets (if any) suit the model (a place model, rows within the place table)."""
    from probekit.evaluate import place_offsets_of

    try:
        mcfg, task, tcfg = parse_run(conf)
        for obj in tcfg.objectives or {task.objective: 1.0}:
            if obj not in task.objectives:
                raise ProbekitError(f"unknown objective {obj!r}; expected one of {list(task.objectives)}")
            T = task.with_objective(obj).seq_len(tcfg.lengths[1])
            if T > mcfg.n_ctx:
                raise ProbekitError(f"training length {tcfg.lengths[1]} ({obj}) makes {T} tokens but n_ctx is {mcfg.n_ctx}")
        for L in lengths:
            if task.seq_len(L) > mcfg.n_ctx:
                raise ProbekitError(f"eval length {L} makes {task.seq_len(L)} tokens but n_ctx is {mcfg.n_ctx}")
            if place_offsets is not None:
                place_offsets_of(mcfg, task.sample(1, length=L, seed=0), place_offsets)
    except ProbekitError as e:
        raise ProbekitError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------- one job


def job_state(job: Job) -> str:
    """``done`` (model and matching metrics), ``evaluate`` (model only), ``resume at step K`` or ``new``."""
    folder = Path(job.dir)
    if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
        return "done" if read_metrics(job) is not None else "evaluate"
    from probekit.train import CHECKPOINT, checkpoint_meta

    ckpt = folder / CHECKPOINT
    if ckpt.exists():
        try:
            return f"resume at step {checkpoint_meta(ckpt)['step']}"
        except ProbekitError:
            return "resume (checkpoint unreadable)"  # the job then fails with train's own one-line error
    return "new"


def read_metrics(job: Job) -> dict | None:
    """The job's metrics.json if it holds the grid's evaluation (lengths, n, seed, place offsets), else None."""
    path = Path(job.dir) / "metrics.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    recs = m.get("records", [])
    same = ([r["length"] for r in recs] == list(job.lengths) and all(r["n"] == job.n for r in recs)
            and m.get("seed") == job.eval_seed and m.get("place_offsets") == job.place_offsets)
    return m if same else None


def run_job(job: Job) -> dict:
    """Train (or resume) the job's model in its folder, then evaluate it and write metrics.json."""
    import torch

    from probekit.evaluate import evaluate
    from probekit.model import load_model
    from probekit.train import train

    torch.set_num_threads(job.threads or job.num_cpus)
    folder = Path(job.dir)
    state = job_state(job)
    t0 = time.time()
    if state == "evaluate":
        model, task, _ = load_model(folder)
    else:
        mcfg, task, tcfg = parse_run(job.run)
        # a folder with neither model nor checkpoint holds at most a killed run's log: start afresh
        model = train(mcfg, task, tcfg, out=folder, name=job.run["name"], overwrite=state == "new", progress=False)
    t1 = time.time()
    res = evaluate(model, task, list(job.lengths), n=job.n, seed=job.eval_seed, name=job.run["name"],
                   place_offsets=job.place_offsets)
    lengths = ",".join(map(str, job.lengths))
    metrics = json.loads(res.to_json()) | {
        "eval_seconds": round(time.time() - t1, 3),
        "command": f"probekit eval --model {folder} --lengths {lengths} --n {job.n} --seed {job.eval_seed} "
                   f"--save-metrics{place_offsets_flag(job.place_offsets)}"}
    _write_json(folder / "metrics.json", metrics)
    return {"job": job.id, "state": state, "seconds": round(time.time() - t0, 3)}


# ---------------------------------------------------------------------------- Ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """A Ray instance for the ``with`` block: the one already initialised, the cluster at ``address``,
    or a quiet local one (``num_cpus`` default: every core), shut down at the end if started here."""
    import logging

    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts its workers at niceness 15; the jobs are the sweep's whole work, so they run at the
    # driver's priority instead of starving behind anything else on the machine
    os.environ.setdefault("RAY_worker_niceness", "0")
    tmp = None
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            tmp = tempfile.mkdtemp(prefix="probekit-ray-")
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     object_store_memory=OBJECT_STORE_BYTES, _temp_dir=tmp, **quiet)
    except ConnectionError as e:
        raise ProbekitError(f"cannot reach a Ray cluster at {address!r} ({e}); expected 'auto' or host:port") from None
    try:
        yield
    finally:
        ray.shutdown()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _run_on_ray(jobs: list[Job], progress: bool) -> tuple[list[dict], list[tuple[str, str]]]:
    """Submit every job as a Ray task; collect results as they finish (a failed job does not stop the rest)."""
    import ray
    from tqdm.auto import tqdm

    cpus = ray.cluster_resources().get("CPU", 0)
    need = max(j.num_cpus for j in jobs)
    if need > cpus:
        raise ProbekitError(f"a job asks for {need} CPUs but the Ray cluster has {cpus:g}; lower the grid's num_cpus")
    remote = ray.remote(run_job)
    pending = {remote.options(num_cpus=j.num_cpus).remote(j): j for j in jobs}
    done, failed = [], []
    bar = tqdm(total=len(jobs), desc="sweep", unit="job", disable=not progress)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    done.append(ray.get(ref))
                except ray.exceptions.RayError as e:
                    cause = getattr(e, "cause", None) or e
                    failed.append((job.id, f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1]}"))
                bar.update(1)
                bar.set_postfix_str(job.id)
    finally:
        bar.close()
        for ref in pending:  # interrupted: the killed jobs resume from their checkpoints next time
            ray.cancel(ref, force=True)
    return done, failed


# ---------------------------------------------------------------------------- the sweep


@dataclass
class SweepRun:
    """What `run_sweep` found and did: each job's state before the call, results and failures."""

    grid: Grid
    out: Path
    states: dict[str, str]  # job id -> state before the call
    dry_run: bool = False
    ran: list[dict] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"grid {self.grid.name}: {len(self.states)} job(s) in {self.out}"]
        width = max(len(j) for j in self.states)
        for job_id, state in self.states.items():
            note = "skip (done)" if state == "done" else (state if self.dry_run else f"ran ({state})")
            lines.append(f"  {job_id:<{width}}  {note}")
        for job_id, err in self.failed:
            lines.append(f"failed {job_id}: {err}")
        if not self.dry_run:
            lines.append(f"wrote {self.out / 'summary.csv'} and {self.out / 'summary.md'}")
        return "\n".join(lines)


def _prepare_out(grid: Grid, out: Path, jobs: list[Job], write: bool) -> None:
    """Refuse an ``out`` that is not this grid's sweep or whose jobs were started from other run configs;
    with ``write``, record the grid and its jobs in sweep.json."""
    record = out / "sweep.json"
    recorded = {}
    if record.exists():
        old = json.loads(record.read_text())
        if old["grid"]["name"] != grid.name:
            raise ProbekitError(f"{out} holds sweep {old['grid']['name']!r}, not {grid.name!r}; choose another --out")
        recorded = old["jobs"]
    elif out.exists():
        foreign = [n for n in folder_entries(out) if not ((out / n).is_dir() and n in grid.configs)]
        if foreign:
            raise ProbekitError(f"{out} holds {foreign[:3]} and no sweep.json; expected a new folder, an earlier "
                                "sweep's, or one holding only this grid's configuration folders")
    for job in jobs:
        started = job.id in recorded and recorded[job.id] != job.run and Path(job.dir).exists()
        if started or not trained_as(job):
            raise ProbekitError(f"job {job.id} in {out} was {'started' if started else 'trained'} from another run "
                                f"config; delete {job.dir} to retrain it or use another --out")
    if write:
        _write_json(record, {"grid": grid.to_dict(), "jobs": recorded | {j.id: j.run for j in jobs}})


def trained_as(job: Job) -> bool:
    """False when the job's folder holds a model trained from another run config than the job's
    (a model folder moved in from elsewhere is adopted only if it was trained as this job)."""
    path = Path(job.dir) / "config.json"
    if not path.exists():
        return True
    conf = json.loads(path.read_text())
    try:
        saved = parse_run({"model": conf["model"], "task": conf["task"], "train": {**(conf["train"] or {}), "extra": {}}})
    except (KeyError, TypeError, ProbekitError):
        return False
    mcfg, task, tcfg = parse_run(job.run)
    return saved == (mcfg, task, replace(tcfg, extra={}))


@contextlib.contextmanager
def _locked(out: Path):
    from probekit.io import lock_dir

    out.mkdir(parents=True, exist_ok=True)
    with lock_dir(out, what="sweep --out"):
        yield


def run_sweep(grid: str | Path | Grid, out: str | Path, *, address: str | None = None, jobs: list[str] | None = None,
              dry_run: bool = False, progress: bool = True, threads: int | None = None,
              cpus: int | None = None) -> SweepRun:
    """Run every unfinished job of ``grid`` (or those named in ``jobs``) on Ray, then write the summary.

    ``dry_run`` lists the jobs and their states and touches nothing. ``threads`` sets each job's torch
    threads (default: the CPUs it reserves); on a machine busy with other work one thread per job keeps
    a job from stalling on threads that wait for each other. Results do not depend on it beyond float
    rounding. ``cpus`` sets the CPUs each job reserves on Ray, in place of the grid's ``num_cpus``
    (default every core): ``cpus=1`` on a 2-core machine runs two jobs at once. Returns a `SweepRun`.
    """
    grid = grid if isinstance(grid, Grid) else load_grid(grid)
    out = Path(out)
    if threads is not None:
        threads = _positive_int(threads, "threads")
    if cpus is not None:
        cpus = _positive_int(cpus, "cpus")
    plan = [replace(j, threads=threads, num_cpus=cpus or j.num_cpus) for j in grid.jobs(out, select=jobs)]
    _prepare_out(grid, out, plan, write=False)
    result = SweepRun(grid, out, {j.id: job_state(j) for j in plan}, dry_run=dry_run)
    if dry_run:
        return result
    with _locked(out):
        _prepare_out(grid, out, plan, write=True)
        todo = [j for j in plan if result.states[j.id] != "done"]
        if todo:
            with ray_session(address):
                result.ran, result.failed = _run_on_ray(todo, progress)
        write_summary(grid, out)
    return result


# ---------------------------------------------------------------------------- summary


def seed_interval(values: list[float], single: tuple[float, float] | None = None) -> tuple[float, float, float, str]:
    """``(mean, low, high, method)``: the 95 % t-interval over seeds, or for one seed its ``single``
    (Wilson) interval."""
    k = len(values)
    mean = sum(values) / k
    if k == 1:
        if single is None:
            raise ProbekitError("one seed needs its own interval (the Wilson interval of its test sample)")
        return mean, single[0], single[1], "Wilson, 1 seed"
    from scipy.stats import t

    h = float(t.ppf(0.975, k - 1)) * statistics.stdev(values) / math.sqrt(k)
    return mean, max(0.0, mean - h), min(1.0, mean + h), f"t over {k} seeds"


def finished_record(job: Job) -> dict | None:
    """The job's metrics if its folder holds a finished job's record: config.json and the grid's
    metrics.json (a sweep folder, or an archive of one written by `archive`)."""
    return read_metrics(job) if (Path(job.dir) / "config.json").exists() else None


def summarize(grid: Grid, out: str | Path) -> list[dict]:
    """One row per (configuration, length) with finished seeds: mean exact match over seeds, its 95 %
    interval, each seed's value and the mean training seconds."""
    rows = []
    for config in grid.configs:
        found = [(j, m) for j in grid.jobs(out, select=[config]) if (m := finished_record(j))]
        if not found:
            continue
        secs = [json.loads((Path(j.dir) / "config.json").read_text())["train"]["extra"].get("train_seconds", float("nan"))
                for j, _ in found]
        for L in grid.lengths:
            recs = [next(r for r in m["records"] if r["length"] == L) for _, m in found]
            vals = [r["exact_match"] for r in recs]
            mean, lo, hi, method = seed_interval(vals, tuple(recs[0]["exact_match_ci95"]))
            rows.append({"config": config, "length": L, "seeds": len(found), "exact_match_mean": mean,
                         "ci_low": lo, "ci_high": hi, "interval": method,
                         "exact_match_by_seed": " ".join(f"{j.seed}:{v:.4f}" for (j, _), v in zip(found, vals, strict=True)),
                         "train_seconds_mean": sum(secs) / len(secs), "n": grid.n})
    return rows


def _changes(entry: dict) -> str:
    """A configuration's overrides as ``model.positional=learned, train.steps=2000``."""
    def flat(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from flat(f"{prefix}{k}.", v)
            else:
                yield f"{prefix}{k}={json.dumps(v)}"
    parts = [p for part in ("model", "task", "train") for p in flat(f"{part}.", entry.get(part) or {})]
    return ", ".join(parts) or "(base)"


def summary_markdown(grid: Grid, rows: list[dict], level: int = 1) -> str:
    """The summary as Markdown: a heading, the grid's notes, one table row per configuration."""
    h = "#" * level
    lines = [f"{h} Sweep `{grid.name}`", ""]
    if grid.notes:
        lines += [grid.notes, ""]
    ens = "" if grid.place_offsets is None else f", next-token probabilities averaged over place offsets {grid.place_offsets}"
    lines += [f"Exact match of greedy decoding{ens}, n = {grid.n} per length, eval seed {grid.eval_seed}; mean over seeds "
              "[95 % interval: t over seeds, or the Wilson interval of the test sample when one seed is done]. "
              "Training minutes: mean wall clock per seed.", ""]
    lines += ["| configuration | changes from the base | seeds | train min | "
              + " | ".join(f"length {L}" for L in grid.lengths) + " |",
              "|" + "---|" * (4 + len(grid.lengths))]
    for config, entry in grid.configs.items():
        mine = {r["length"]: r for r in rows if r["config"] == config}
        if not mine:
            cells, seeds, mins = ["not run"] * len(grid.lengths), f"0/{len(grid.seeds)}", ""
        else:
            cells = [f"{100 * r['exact_match_mean']:.1f} % [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
                     for r in (mine[L] for L in grid.lengths)]
            first = mine[grid.lengths[0]]
            seeds, mins = f"{first['seeds']}/{len(grid.seeds)}", f"{first['train_seconds_mean'] / 60:.1f}"
        lines.append(f"| {config} | {_changes(entry)} | {seeds} | {mins} | " + " | ".join(cells) + " |")
    notes = [f"- `{c}`: {e['notes']}" for c, e in grid.configs.items() if e.get("notes")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_summary(grid: Grid, out: str | Path) -> list[Path]:
    """``summary.csv`` (one row per configuration and length) and ``summary.md`` in ``out``."""
    out = Path(out)
    rows = summarize(grid, out)
    cols = ["config", "length", "seeds", "n", "exact_match_mean", "ci_low", "ci_high", "interval",
            "exact_match_by_seed", "train_seconds_mean"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return [_write_text(out / "summary.csv", buf.getvalue()),
            _write_text(out / "summary.md", summary_markdown(grid, rows))]


def write_tables(out: str | Path, doc: str | Path, grid: Grid | None = None) -> Path:
    """Put the summary table of the sweep in ``out`` into the Markdown file ``doc``, between the
    markers ``<!-- sweep NAME -->`` and ``<!-- end sweep NAME -->`` (replaced, or appended).
    The grid is the one recorded in ``out/sweep.json``; a ``grid`` given must have its name."""
    out, doc = Path(out), Path(doc)
    record = out / "sweep.json"
    if not record.exists():
        raise ProbekitError(f"{out} holds no sweep.json; expected the --out folder of a sweep")
    recorded = grid_from_dict(json.loads(record.read_text())["grid"], str(record))
    if grid is not None and grid.name != recorded.name:
        raise ProbekitError(f"{out} holds sweep {recorded.name!r}, not {grid.name!r}")
    grid = recorded
    begin, end = f"<!-- sweep {grid.name} -->", f"<!-- end sweep {grid.name} -->"
    text = doc.read_text() if doc.exists() else ""
    earlier = text.split(begin, 1)[1].split(end, 1)[0] if begin in text and end in text else ""
    block = f"{begin}\n{_keep_earlier_rows(summary_markdown(grid, summarize(grid, out), level=2), earlier, out)}{end}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block
    return _write_text(doc, text)


def _row_config(line: str) -> str | None:
    """The configuration a line of a summary table is the row of (its first cell), or None."""
    cells = line.split(" | ")
    if line.startswith("| ") and len(cells) > 4 and cells[0] != "| configuration":
        return cells[0][2:]
    return None


def _keep_earlier_rows(section: str, earlier: str, out: Path) -> str:
    """``section`` with each "not run" row replaced by the same configuration's row of the ``earlier``
    section, when that row had results (their job records are not in ``out``), and a note naming them."""
    old = {c: line for line in earlier.splitlines() if (c := _row_config(line))}
    lines, kept = section.splitlines(), []
    for i, line in enumerate(lines):
        config = _row_config(line)
        if config in old and "not run" in line and "not run" not in old[config]:
            lines[i] = old[config]
            kept.append(config)
    if kept:
        lines += ["", f"Rows kept from the earlier table (their job records are not in `{out}`): "
                  + ", ".join(f"`{c}`" for c in kept) + "."]
    return "\n".join(lines) + "\n"


def archive(out: str | Path, dest: str | Path) -> list[str]:
    """Copy the records of the finished jobs of the sweep in ``out`` (each job's config.json, metrics.json
    and training log; no weights) into ``dest``, merged with the jobs already archived there, so that
    `summarize` and `write_tables` can read ``dest`` as a sweep folder. Returns the job ids copied."""
    out, dest = Path(out), Path(dest)
    record = out / "sweep.json"
    if not record.exists():
        raise ProbekitError(f"{out} holds no sweep.json; expected the --out folder of a sweep")
    rec = json.loads(record.read_text())
    grid = grid_from_dict(rec["grid"], str(record))
    jobs = {}
    if (dest / "sweep.json").exists():
        old = json.loads((dest / "sweep.json").read_text())
        if old["grid"]["name"] != grid.name:
            raise ProbekitError(f"{dest} archives sweep {old['grid']['name']!r}, not {grid.name!r}")
        jobs = old["jobs"]
    copied = []
    for job in grid.jobs(out):
        if finished_record(job) is None:
            continue
        target = dest / job.config / f"seed{job.seed}"
        for f in ("config.json", "metrics.json", "train_log.jsonl"):
            if (Path(job.dir) / f).exists():
                _write(target / f, lambda p, f=f, job=job: shutil.copyfile(Path(job.dir) / f, p))
        jobs[job.id] = rec["jobs"].get(job.id, job.run)
        copied.append(job.id)
    _write_json(dest / "sweep.json", {"grid": rec["grid"], "jobs": jobs})
    return copied


# ---------------------------------------------------------------------------- shipping


def ship(job_dir: str | Path, name: str, models_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Copy a finished job into ``models/<name>``: weights, training log, config.json and metrics.json
    renamed to ``name`` (other files there, such as notes.md, are kept)."""
    from probekit.model import MODELS_DIR

    src = Path(job_dir)
    _name(name, "model name")
    missing = [f for f in ("model.safetensors", "config.json", "metrics.json") if not (src / f).exists()]
    if missing:
        raise ProbekitError(f"{src} is not a finished job (missing {missing}); run the sweep first")
    dst = Path(models_dir or MODELS_DIR) / name
    if (dst / "model.safetensors").exists() and not overwrite:
        raise ProbekitError(f"{dst} already holds a model; pass overwrite=True to replace it")
    for f in ("model.safetensors", "train_log.jsonl"):
        if (src / f).exists():
            _write(dst / f, lambda p, f=f: shutil.copyfile(src / f, p))
    conf = json.loads((src / "config.json").read_text()) | {"name": name}
    _write_json(dst / "config.json", conf)
    metrics = json.loads((src / "metrics.json").read_text())
    lengths = ",".join(str(r["length"]) for r in metrics["records"])
    metrics |= {"model": name, "command": f"probekit eval --model {name} --lengths {lengths} "
                f"--n {metrics['records'][0]['n']} --seed {metrics['seed']} --save-metrics --overwrite"
                f"{place_offsets_flag(metrics.get('place_offsets'))}"}
    _write_json(dst / "metrics.json", metrics)
    return dst
