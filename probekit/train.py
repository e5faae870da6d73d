"""Training: next-token loss on answer tokens only, AdamW with warmup + cosine decay.

Each step draws one length uniformly from ``lengths`` and one objective from ``objectives``
(a `Mixture`), then a batch seeded by ``(seed, step)``: the data stream is a pure function of the
config, so a run killed and resumed from its checkpoint gives the same weights as an unbroken one.

``task_overrides`` changes task fields for training only, e.g. ``{"simple_fraction": 0.2}`` (extra
easy multiplication samples) or ``{"value_subsets": 0.5}`` (sorting lists rich in repeats). The task
saved with the model, which `evaluate` and ``probekit eval`` sample from, keeps its own values, so a
training-data device never changes the test distribution.

Output folder: ``train_log.jsonl`` (one record per ``log_every`` steps), ``checkpoint.safetensors``
+ ``checkpoint.json`` while running (removed at the end), then ``model.safetensors`` + ``config.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from probekit.io import atomic_write, ensure_empty_dir, open_append, write_json
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
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    lengths: tuple[int, int] = (1, 20)  # inclusive range of lengths sampled during training
    objectives: dict[str, float] | None = None  # None: the task's own objective
    task_overrides: dict | None = None  # task fields changed for training data only (see module doc)
    grad_clip: float | None = 1.0
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    extra: dict = field(default_factory=dict)  # free-form notes saved with the model

    def __post_init__(self):
        if self.steps <= 0 or self.batch_size <= 0:
            raise ProbekitError(f"steps and batch_size must be positive, got {self.steps} and {self.batch_size}")
        lo, hi = self.lengths
        if not (1 <= lo <= hi):
            raise ProbekitError(f"lengths must be a range [lo, hi] with 1 <= lo <= hi, got {list(self.lengths)}")
        object.__setattr__(self, "lengths", (int(lo), int(hi)))

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = _checked_fields(cls, d, "train config")
        if "lengths" in d:
            d["lengths"] = tuple(d["lengths"])
        return cls(**d)

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
    names = list(tcfg.objectives or {task.objective: 1.0})
    for name in names:
        if name not in task.objectives:
            raise ProbekitError(f"unknown objective {name!r} for task {task.name!r}; expected one of {list(task.objectives)}")
        T = task.with_objective(name).seq_len(tcfg.lengths[1])
        if T > mcfg.n_ctx:
            raise ProbekitError(f"length {tcfg.lengths[1]} ({name}) makes sequences of {T} tokens but n_ctx is {mcfg.n_ctx}")


def _save_checkpoint(out: Path, model, opt, step: int, elapsed_s: float) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for i, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().clone().contiguous()
    atomic_write(out / "checkpoint.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    write_json(out / "checkpoint.json", {"step": step, "elapsed_s": round(elapsed_s, 3)})


def _load_checkpoint(out: Path, model, opt) -> tuple[int, float]:
    from safetensors.torch import load_file

    tensors = load_file(str(out / "checkpoint.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state = opt.state_dict()
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(state)
    meta = json.loads((out / "checkpoint.json").read_text())
    return int(meta["step"]), float(meta.get("elapsed_s", 0.0))


def train(model_cfg: ModelConfig, task: Task, cfg: TrainConfig, out: str | Path | None = None,
          *, name: str | None = None, overwrite: bool = False, progress: bool = True,
          device: str | torch.device = "cpu", stop_after: int | None = None):
    """Train a model; with ``out`` write logs, checkpoints (resumed if present) and the final folder.

    ``stop_after`` ends the run after that many steps without finishing (as a kill would); a later
    call with the same ``out`` resumes from the last checkpoint. Returns the trained model (eval mode).
    """
    _check_fits(model_cfg, task, cfg)
    if model_cfg.d_vocab != task.d_vocab:
        raise ProbekitError(f"model d_vocab={model_cfg.d_vocab} but task {task.name!r} has {task.d_vocab} tokens")
    mixture = Mixture(training_task(task, cfg), cfg.objectives or {task.objective: 1.0})
    model = build_model(model_cfg, device=device)
    native = model.original_model  # the plain torch module the bridge wraps: same parameters, no hooks
    params = [p for p in native.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    start, prev_elapsed = 0, 0.0
    log_f = None
    if out is not None:
        out = Path(out)
        resuming = (out / "checkpoint.json").exists() and not overwrite
        if not resuming:
            ensure_empty_dir(out, overwrite=overwrite)
            for stale in ("train_log.jsonl", "checkpoint.json", "checkpoint.safetensors"):
                (out / stale).unlink(missing_ok=True)
        else:
            start, prev_elapsed = _load_checkpoint(out, model, opt)
        log_f = open_append(out / "train_log.jsonl")
    native.train()
    t0 = time.time()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step")
    step = start
    try:
        for step in range(start, cfg.steps):
            if stop_after is not None and step - start >= stop_after:
                break
            batch = mixture.sample(cfg.batch_size, length=step_length(cfg, step), seed=batch_seed(cfg.seed, step)).to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            logits = native(batch.tokens)
            loss, acc = answer_loss(logits, batch.tokens, batch.answer_mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
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
                _save_checkpoint(out, model, opt, step + 1, prev_elapsed + time.time() - t0)
        else:
            step = cfg.steps
    finally:
        if bar is not None:
            bar.close()
        if log_f is not None:
            log_f.close()
    native.eval()
    model.eval()
    finished = step >= cfg.steps
    if out is not None and finished:
        tdict = cfg.to_dict()
        tdict["extra"] = {**cfg.extra, "train_seconds": round(prev_elapsed + time.time() - t0, 3),
                          "torch_threads": torch.get_num_threads()}
        save_model(model, out, task, train_config=tdict, name=name, overwrite=True)
        for f in ("checkpoint.safetensors", "checkpoint.json"):
            (out / f).unlink(missing_ok=True)
    elif out is not None:
        _save_checkpoint(out, model, opt, step, prev_elapsed + time.time() - t0)
    return model
