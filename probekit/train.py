"""Training: next-token loss on answer tokens only, AdamW with warmup + cosine decay.

The optimizer is torch's fused AdamW where torch has one (CPU, CUDA), and gradient clipping hands its
factor to the optimizer's kernel (`clip_gradients`): the weights are those of torch's loop AdamW after
``clip_grad_norm_`` to float rounding (tested).

Each step draws one length uniformly from ``lengths`` and one objective from ``objectives``
(a `Mixture`), then a batch seeded by ``(seed, step)``: the data stream is a pure function of the
config, so a run killed and resumed from its checkpoint gives the same weights as an unbroken one.

``task_overrides`` changes task fields for training only, e.g. ``{"simple_fraction": 0.2}`` (extra
easy multiplication samples) or ``{"value_subsets": 0.5}`` (sorting lists rich in repeats). The task
saved with the model, which `evaluate` and ``probekit eval`` sample from, keeps its own values, so a
training-data device never changes the test distribution.

Output folder: ``run.json`` (the run's model, task and train configs) and ``train_log.jsonl`` (one
record per ``log_every`` steps); while running, ``checkpoint.safetensors``: weights, optimizer state, and
in its metadata the step, the elapsed time and the run's configs, written whole to a temporary name
and renamed, so a kill at any moment leaves the previous checkpoint or the new one. At the end:
``model.safetensors`` + ``config.json`` (``run.json`` and the checkpoint are removed) and ``train_log.png``
(`probekit.viz.plot_training_log`).

Resuming: the same call on the same folder continues from the checkpoint, after refusing a run whose
configs differ (the differing fields are named; ``train.extra`` is notes and may differ) and dropping
the log records past the checkpoint's step. A folder with this run's ``run.json`` and log but no
checkpoint yet (killed early) is started again from step 0.

Place models (``ModelConfig(positional="place")``): each training sequence's digit place ids get a
random offset in ``[0, place_offset_max]`` (`place_offsets`, drawn from ``(seed, step)`` like the
batch), passed to the native model as explicit ``position_ids``; nothing else sees them.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from probekit.checks import bounds, check_fields
from probekit.forward import place_ids
from probekit.io import atomic_write, ensure_empty_dir, open_append, write_json, write_text
from probekit.model import (
    ModelConfig,
    _checked_fields,
    build_model,
    read_json_config,
    save_model,
)
from probekit.tasks import Mixture, ProbekitError, Task, task_from_spec


@dataclass(frozen=True)
class TrainConfig:
    steps: int = field(default=2000, metadata=bounds(lo=1))
    batch_size: int = field(default=128, metadata=bounds(lo=1))
    lr: float = field(default=1e-3, metadata=bounds(gt=0))
    weight_decay: float = field(default=0.01, metadata=bounds(lo=0))
    warmup_steps: int = field(default=100, metadata=bounds(lo=0))
    min_lr_ratio: float = field(default=0.1, metadata=bounds(lo=0, hi=1))
    # inclusive range [lo, hi] of lengths sampled during training
    lengths: tuple[int, int] = field(default=(1, 20), metadata=bounds(lo=1))
    # objective weights (>= 0, positive sum); None: the task's own objective
    objectives: dict[str, float] | None = field(default=None, metadata=bounds(lo=0))
    task_overrides: dict | None = None  # task fields changed for training data only (see module doc)
    grad_clip: float | None = field(default=1.0, metadata=bounds(gt=0))  # None: no clipping
    seed: int = field(default=0, metadata=bounds(lo=0))
    log_every: int = field(default=50, metadata=bounds(lo=1))
    checkpoint_every: int = field(default=500, metadata=bounds(lo=1))
    extra: dict = field(default_factory=dict)  # free-form notes saved with the model

    def __post_init__(self):
        check_fields(self, "TrainConfig")
        lo, hi = self.lengths
        if lo > hi:
            raise ProbekitError(f"TrainConfig.lengths = {list(self.lengths)}; expected a range [lo, hi] with lo <= hi")
        if self.objectives is not None and not sum(self.objectives.values()) > 0:
            raise ProbekitError(f"TrainConfig.objectives = {self.objectives!r}; expected weights with a positive sum, "
                                "e.g. {'sort': 1.0}")
        object.__setattr__(self, "lengths", (int(lo), int(hi)))

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**_checked_fields(cls, d, "train config"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lengths"] = list(self.lengths)
        return d


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step``: linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def answer_loss(logits: torch.Tensor, tokens: torch.Tensor, answer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over answer tokens, and token accuracy (teacher-forced)."""
    mask = answer_mask[:, 1:]
    pred = logits[:, :-1][mask]  # n_answer d_vocab
    tgt = tokens[:, 1:][mask]
    loss = F.cross_entropy(pred, tgt)
    acc = (pred.argmax(-1) == tgt).float().mean()
    return loss, acc


def batch_seed(seed: int, step: int) -> int:
    """The seed of the batch drawn at ``step`` (independent streams per step, so resuming is exact)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def step_length(cfg: TrainConfig, step: int) -> int:
    """The length drawn for ``step``, uniform over ``cfg.lengths``."""
    lo, hi = cfg.lengths
    return int(np.random.default_rng([cfg.seed, step, 7]).integers(lo, hi + 1))


def load_run_config(path: str | Path) -> tuple[ModelConfig, Task, TrainConfig, dict]:
    """Read a training config file: a JSON object with ``model``, ``task`` and ``train`` (a shipped
    model's config.json is one, so ``probekit train --config models/NAME/config.json`` retrains it)."""
    conf = read_json_config(path, {"model", "task", "train"}, "a JSON config with 'model', 'task' and 'train'")
    task = task_from_spec(conf["task"])
    mdict = dict(conf["model"]) if isinstance(conf["model"], dict) else conf["model"]
    if isinstance(mdict, dict):
        mdict.setdefault("d_vocab", task.d_vocab)
    mcfg = ModelConfig.from_dict(mdict)
    if mcfg.d_vocab != task.d_vocab:
        raise ProbekitError(f"model d_vocab={mcfg.d_vocab} but task {task.name!r} has {task.d_vocab} tokens; they must match")
    tcfg = TrainConfig.from_dict(conf["train"] or {})
    return mcfg, task, tcfg, conf


def training_task(task: Task, cfg: TrainConfig) -> Task:
    """The task training batches are drawn from: ``task`` with ``cfg.task_overrides`` applied."""
    if not cfg.task_overrides:
        return task
    if not isinstance(cfg.task_overrides, dict):
        raise ProbekitError(f"task_overrides must be a JSON object of task fields, got {cfg.task_overrides!r}")
    if "name" in cfg.task_overrides:
        raise ProbekitError("task_overrides cannot change the task's name")
    return task_from_spec({**task.spec(), **cfg.task_overrides})


def _check_fits(mcfg: ModelConfig, task: Task, tcfg: TrainConfig) -> None:
    """Refuse objectives the task lacks, lengths outside the task's range, or sequences longer than n_ctx."""
    if mcfg.d_vocab != task.d_vocab:
        raise ProbekitError(f"model d_vocab={mcfg.d_vocab} but task {task.name!r} has {task.d_vocab} tokens")
    for name in list(tcfg.objectives or {task.objective: 1.0}):
        if name not in task.objectives:
            raise ProbekitError(f"unknown objective {name!r} for task {task.name!r}; expected one of {list(task.objectives)}")
        t = task.with_objective(name)
        for L in tcfg.lengths:
            t.sample(1, length=L, seed=0)  # the task refuses a length outside its range
        T = t.seq_len(tcfg.lengths[1])
        if T > mcfg.n_ctx:
            raise ProbekitError(f"length {tcfg.lengths[1]} ({name}) makes sequences of {T} tokens but n_ctx is {mcfg.n_ctx}")
        if mcfg.positional == "place":
            top = int(place_ids(t.sample(8, length=tcfg.lengths[1], seed=0).tokens, mcfg.place_tokens)[0].max())
            if top + mcfg.place_offset_max >= mcfg.n_ctx:
                raise ProbekitError(f"length {tcfg.lengths[1]} ({name}) makes digit runs with place ids up to {top}; "
                                    f"with place_offset_max = {mcfg.place_offset_max} they pass the place table of "
                                    f"n_ctx = {mcfg.n_ctx} rows; expected a smaller offset or a larger n_ctx")


def place_offsets(mcfg: ModelConfig, cfg: TrainConfig, step: int, n: int) -> torch.Tensor | None:
    """The per-sequence place offsets of the batch at ``step`` (a pure function of the seed and step);
    None for a model that is not ``positional="place"``."""
    if mcfg.positional != "place":
        return None
    return torch.from_numpy(np.random.default_rng([cfg.seed, step, 11]).integers(0, mcfg.place_offset_max + 1, n))


def train_logits(native, mcfg: ModelConfig, tokens: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """The native model's logits on a training batch; a place model's place ids shifted by ``offsets``."""
    if mcfg.positional != "place":
        return native(tokens)
    ids, _ = place_ids(tokens, mcfg.place_tokens, offset=offsets.to(tokens.device))
    return native(tokens, position_ids=ids)


# ---------------------------------------------------------------------------- the output folder

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "probekit-train-checkpoint-2"
RUN_FILE, LOG_FILE = "run.json", "train_log.jsonl"
LOG_PLOT = "train_log.png"  # loss and token accuracy against step, drawn from LOG_FILE at the end of a run


def run_spec(model_cfg: ModelConfig, task: Task, cfg: TrainConfig) -> dict:
    """The configs a checkpoint must agree with to be resumed (as JSON would give them back)."""
    train_cfg = {k: v for k, v in cfg.to_dict().items() if k != "extra"}  # notes: free to differ
    return json.loads(json.dumps({"model": model_cfg.to_dict(), "task": task.spec(), "train": train_cfg}))


def config_diff(old: dict, new: dict) -> list[str]:
    """``section.field (old -> new)`` for each field that differs between two `run_spec` dicts."""
    diff = []
    for section in ("model", "task", "train"):
        a, b = old.get(section) or {}, new.get(section) or {}
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b or a[k] != b[k]:
                diff.append(f"{section}.{k} ({a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r})")
    return diff


def _refuse_other_run(out: Path, old: dict, new: dict) -> None:
    diff = config_diff(old, new)
    if diff:
        raise ProbekitError(f"{out} holds a run with other configs: {', '.join(diff)}; "
                            "expected the same configs to resume (or pass --overwrite to start again)")


def _own_partial_files(out: Path) -> bool:
    """True when ``out`` holds nothing but a run's own early files (no checkpoint yet)."""
    names = {p.name for p in out.iterdir()}
    partial = {n for n in names if n.startswith(f".{CHECKPOINT}.")}  # temporary files of a killed write
    return RUN_FILE in names and names - partial <= {RUN_FILE, LOG_FILE}


def _clear_run_files(out: Path) -> None:
    for p in out.iterdir():
        if p.name in (RUN_FILE, LOG_FILE, CHECKPOINT, "checkpoint.json") or p.name.startswith(f".{CHECKPOINT}."):
            p.unlink()


def _prepare_out(out: Path, run: dict, overwrite: bool) -> bool:
    """Make ``out`` ready for ``run``; True when it holds a checkpoint to resume from."""
    if out.is_dir() and not overwrite:
        if (out / "checkpoint.json").exists():
            raise ProbekitError(f"{out} holds a checkpoint in the old format (checkpoint.safetensors + checkpoint.json) "
                                "that cannot be resumed; expected a checkpoint.safetensors with its step in its metadata "
                                "(pass --overwrite to start again)")
        if (out / CHECKPOINT).exists():
            return True
        if any(out.iterdir()) and _own_partial_files(out):
            _refuse_other_run(out, json.loads((out / RUN_FILE).read_text()), run)
            _clear_run_files(out)  # killed before its first checkpoint: start again from step 0
    ensure_empty_dir(out, overwrite=overwrite)
    _clear_run_files(out)
    write_json(out / RUN_FILE, run)
    return False


def checkpoint_meta(path: str | Path) -> dict:
    """A training checkpoint's metadata: ``step``, ``elapsed_s`` and ``run`` (the `run_spec`)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ProbekitError(f"{path} is truncated or corrupted ({str(e).splitlines()[0]}); expected a training checkpoint") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ProbekitError(f"{path} has format {meta.get('format')!r}; expected a training checkpoint of format "
                            f"{CHECKPOINT_FORMAT!r} (pass --overwrite to start again)")
    return {"step": int(meta["step"]), "elapsed_s": float(meta["elapsed_s"]), "run": json.loads(meta["run"])}


def _save_checkpoint(out: Path, model, opt, step: int, elapsed_s: float, run: dict) -> None:
    """Weights, optimizer state, step, time and configs in one file, renamed into place whole."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().cpu().clone().contiguous()
    run_json = json.dumps(run, sort_keys=True)
    meta = {"format": CHECKPOINT_FORMAT, "step": str(step), "elapsed_s": repr(round(elapsed_s, 3)), "run": run_json,
            "config_hash": hashlib.sha256(run_json.encode()).hexdigest()[:16]}
    atomic_write(out / CHECKPOINT, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _load_checkpoint(out: Path, model, opt, run: dict) -> tuple[int, float]:
    """Restore weights and optimizer state from ``out``'s checkpoint (refusing another run's); the step and time."""
    from safetensors.torch import load_file

    meta = checkpoint_meta(out / CHECKPOINT)
    _refuse_other_run(out, meta["run"], run)
    tensors = load_file(str(out / CHECKPOINT))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state = opt.state_dict()
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(state)
    _trim_log(out / LOG_FILE, meta["step"])
    for p in out.glob(f".{CHECKPOINT}.*"):  # temporary files of a write cut short by a kill
        p.unlink()
    return meta["step"], meta["elapsed_s"]


def _trim_log(path: Path, step: int) -> None:
    """Drop the log records past ``step`` (written after the checkpoint, before a kill) and any torn line."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(line + "\n")
    _write_json_lines(path, keep)


def _write_json_lines(path: Path, lines: list[str]) -> None:
    write_text(path, "".join(lines))


# ---------------------------------------------------------------------------- the loop


def _optimizer(native, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, list]:
    """AdamW over the trainable parameters (no weight decay on biases and norms); the fused kernel (one pass
    over each parameter, the same update as torch's loop to float rounding) where torch has one."""
    params = [p for p in native.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    fused = params[0].device.type in FUSED_DEVICES or None
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), fused=fused)
    return opt, params


FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW runs


def clip_gradients(opt: torch.optim.Optimizer, params: list, max_norm: float) -> torch.Tensor:
    """Scale the gradients to a total 2-norm of at most ``max_norm``, as ``torch.nn.utils.clip_grad_norm_``
    (factor ``min(1, max_norm / (norm + 1e-6))``); the total norm before clipping.

    With a fused AdamW the factor is handed to the optimizer's own kernel (its ``grad_scale``, the
    divisor torch's gradient scaler uses), which applies it while it reads each gradient, instead of
    a pass of its own over every gradient.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    divisor = torch.clamp((norm + 1e-6) / max_norm, min=1.0)
    if all(g.get("fused") for g in opt.param_groups):
        opt.grad_scale = divisor
    else:
        torch._foreach_div_(grads, divisor)
    return norm


def train(model_cfg: ModelConfig, task: Task, cfg: TrainConfig, out: str | Path | None = None,
          *, name: str | None = None, overwrite: bool = False, progress: bool = True,
          device: str | torch.device = "cpu", stop_after: int | None = None):
    """Train a model; with ``out`` write logs, checkpoints (resumed if present) and the final folder.

    Every config is checked before a file is written. ``stop_after`` ends the run after that many steps
    without finishing (as a kill would, but with a checkpoint); a later call with the same ``out``
    resumes from the last checkpoint. Returns the trained model (eval mode).
    """
    train_task = training_task(task, cfg)
    _check_fits(model_cfg, train_task, cfg)
    mixture = Mixture(train_task, cfg.objectives or {task.objective: 1.0})
    if cfg.warmup_steps >= cfg.steps:
        warnings.warn(f"TrainConfig.warmup_steps = {cfg.warmup_steps} >= steps = {cfg.steps}: the learning rate "
                      "never reaches lr", stacklevel=2)
    model = build_model(model_cfg, device=device)
    native = model.original_model  # the plain torch module the bridge wraps: same parameters, no hooks
    opt, params = _optimizer(native, cfg)
    run = run_spec(model_cfg, task, cfg)
    start, prev_elapsed = 0, 0.0
    if out is not None:
        out = Path(out)
        if _prepare_out(out, run, overwrite):
            start, prev_elapsed = _load_checkpoint(out, model, opt, run)
    t0 = time.time()
    step = _steps(native, model_cfg, opt, params, mixture, cfg, start, out, stop_after, progress, device,
                  save=lambda s: _save_checkpoint(out, model, opt, s, prev_elapsed + time.time() - t0, run))
    native.eval()
    model.eval()
    if out is not None and step >= cfg.steps:
        tdict = cfg.to_dict()
        tdict["extra"] = {**cfg.extra, "train_seconds": round(prev_elapsed + time.time() - t0, 3),
                          "torch_threads": torch.get_num_threads()}
        save_model(model, out, task, train_config=tdict, name=name, overwrite=True)
        for f in (CHECKPOINT, RUN_FILE):
            (out / f).unlink(missing_ok=True)
        if (out / LOG_FILE).is_file() and (out / LOG_FILE).stat().st_size:
            from probekit.viz import plot_training_log

            plot_training_log(out / LOG_FILE, out / LOG_PLOT)
    elif out is not None:
        _save_checkpoint(out, model, opt, step, prev_elapsed + time.time() - t0, run)
    return model


def _steps(native, mcfg: ModelConfig, opt, params, mixture: Mixture, cfg: TrainConfig, start: int, out: Path | None,
           stop_after: int | None, progress: bool, device, save) -> int:
    """Run steps ``start..cfg.steps - 1`` (or ``stop_after`` of them); log and checkpoint. The next step."""
    log_f = open_append(out / LOG_FILE) if out is not None else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step")
    native.train()
    t0 = time.time()
    step = start
    try:
        for step in range(start, cfg.steps):
            if stop_after is not None and step - start >= stop_after:
                return step
            batch = mixture.sample(cfg.batch_size, length=step_length(cfg, step), seed=batch_seed(cfg.seed, step)).to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            logits = train_logits(native, mcfg, batch.tokens, place_offsets(mcfg, cfg, step, len(batch.tokens)))
            loss, acc = answer_loss(logits, batch.tokens, batch.answer_mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                clip_gradients(opt, params, cfg.grad_clip)
            opt.step()
            if bar is not None:
                bar.update(1)
            if (step + 1) % cfg.log_every == 0 and log_f is not None:
                rec = {"step": step + 1, "loss": round(loss.item(), 5), "token_acc": round(acc.item(), 4),
                       "lr": lr_at(step, cfg), "objective": batch.objective, "length": batch.length,
                       "elapsed_s": round(time.time() - t0, 1)}
                log_f.write(json.dumps(rec) + "\n")
                log_f.flush()
                if bar is not None:
                    bar.set_postfix(loss=rec["loss"], acc=rec["token_acc"])
            if out is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save(step + 1)
        return cfg.steps
    finally:
        if bar is not None:
            bar.close()
        if log_f is not None:
            log_f.close()
