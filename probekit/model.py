"""`ModelConfig` -> a TransformerLens 4 `TransformerBridge`; save and load model folders.

A model folder holds ``model.safetensors`` (the bridge's state dict, TransformerLens names) and
``config.json`` (model, task and training configs, probekit version). No pickles: loading never
runs code from the folder.

Positional options: ``learned`` (absolute, trained), ``rotary``, ``none`` (NoPE: the native model's
learned table, zeroed and frozen). ``length_temperature="log"`` multiplies the attention scores of
the query at position t by ln(t + 2), a fixed function of the number of visible keys, so attention
can stay sharp as the context grows.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from probekit.tasks import ProbekitError, Task, task_from_spec

__version__ = "0.1.0"
POSITIONAL = ("learned", "rotary", "none")
NORMALIZATION = ("LN", "LNPre", "RMS", "RMSPre", None)


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_head: int | None = None  # None: d_model // n_heads
    d_mlp: int | None = None  # None: 4 * d_model
    n_ctx: int = 320
    d_vocab: int = 69
    attn_only: bool = False
    act_fn: str = "relu"
    normalization: str | None = "LN"
    positional: str = "none"
    length_temperature: str | None = None  # None or "log"
    seed: int = 0

    def __post_init__(self):
        for f in ("n_layers", "d_model", "n_heads", "n_ctx", "d_vocab"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ProbekitError(f"ModelConfig.{f} must be a positive integer, got {v!r}")
        if self.positional not in POSITIONAL:
            raise ProbekitError(f"ModelConfig.positional must be one of {list(POSITIONAL)}, got {self.positional!r}")
        if self.normalization not in NORMALIZATION:
            raise ProbekitError(f"ModelConfig.normalization must be one of {list(NORMALIZATION)}, got {self.normalization!r}")
        if self.length_temperature not in (None, "log"):
            raise ProbekitError(f"ModelConfig.length_temperature must be None or 'log', got {self.length_temperature!r}")
        if self.d_head is None and self.d_model % self.n_heads:
            raise ProbekitError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set d_head")

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def mlp_dim(self) -> int:
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**_checked_fields(cls, d, "model config"))

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _checked_fields(cls, d: Any, what: str) -> dict:
    if not isinstance(d, dict):
        raise ProbekitError(f"{what} must be a JSON object, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ProbekitError(f"unknown field(s) {unknown} in {what}; expected a subset of {sorted(names)}")
    return dict(d)


# ---------------------------------------------------------------------------- building


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu"):
    """A fresh TransformerBridge for ``cfg`` (deterministic given ``cfg.seed``), in eval mode."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources.native import NativeAttention  # noqa: F401  registers boot_native

    tl_cfg = TransformerBridgeConfig(
        d_model=cfg.d_model, d_head=cfg.head_dim, n_layers=cfg.n_layers, n_ctx=cfg.n_ctx, n_heads=cfg.n_heads,
        d_vocab=cfg.d_vocab, d_mlp=cfg.mlp_dim, act_fn=cfg.act_fn, normalization_type=cfg.normalization,
        attn_only=cfg.attn_only, seed=cfg.seed,
        positional_embedding_type="rotary" if cfg.positional == "rotary" else "standard",
    )
    model = to_device(TransformerBridge.boot_native(tl_cfg), device)
    native = model.original_model
    if cfg.positional == "none":
        with torch.no_grad():
            native.pos.weight.zero_()
        native.pos.weight.requires_grad_(False)
    if cfg.length_temperature == "log":  # the bridge's own forward runs probekit's tempered attention
        from probekit.forward import attention_forward

        for block in model.blocks:
            attn = block.attn.original_component
            attn.forward = attention_forward.__get__(attn)
    model.probekit_config = cfg
    model.eval()
    return model


def to_device(model, device: str | torch.device):
    """``model.to(device)`` without TransformerLens's print."""
    with contextlib.redirect_stdout(io.StringIO()):
        return model.to(torch.device(device))


def model_config_of(model) -> ModelConfig:
    """The `ModelConfig` a probekit model was built from (refuses models built elsewhere)."""
    cfg = getattr(model, "probekit_config", None)
    if cfg is None:
        raise ProbekitError("this model was not built by probekit (no probekit_config); expected probekit.build_model/load")
    return cfg


# ---------------------------------------------------------------------------- save / load

MODELS_DIR = Path(os.environ.get("PROBEKIT_MODELS", Path(__file__).resolve().parent.parent / "models"))
CONFIG_KEYS = {"probekit_version", "model", "task", "train", "seed", "metrics", "name"}


def save_model(model, folder: str | Path, task: Task, train_config: dict | None = None,
               metrics: dict | None = None, name: str | None = None, overwrite: bool = False) -> Path:
    """Write ``model.safetensors`` + ``config.json`` to ``folder`` (refuses a non-empty folder unless ``overwrite``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    cfg = model_config_of(model)
    ensure_empty_dir(folder, overwrite=overwrite, allow={"model.safetensors", "config.json", "metrics.json", "card.md"})
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"probekit_version": __version__, "config_hash": cfg.hash()})
    os.replace(tmp, folder / "model.safetensors")
    conf = {"probekit_version": __version__, "name": name or folder.name, "model": cfg.to_dict(),
            "task": task.spec(), "train": train_config, "seed": cfg.seed, "metrics": metrics}
    _write_json(folder / "config.json", conf)
    return folder


def ensure_empty_dir(folder: Path, overwrite: bool = False, allow: set[str] | None = None) -> None:
    """Create ``folder``; refuse one that holds files unless ``overwrite`` (then only ``allow`` files are replaced)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ProbekitError(f"--out {folder} is a file; expected a directory")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise ProbekitError(f"output directory {folder} is not empty; choose another or pass --overwrite")
    folder.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, obj) -> None:
    from probekit.results import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A model folder: the path itself, or ``models/<name>`` for a shipped model."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    shipped = MODELS_DIR / str(name_or_path)
    if shipped.is_dir():
        return shipped
    names = sorted(d.name for d in MODELS_DIR.iterdir() if (d / "config.json").exists()) if MODELS_DIR.is_dir() else []
    raise ProbekitError(f"no model folder or shipped model named {str(name_or_path)!r}; shipped models: {names}")


def read_json_config(path: str | Path, required: set[str], what: str) -> dict:
    """A JSON object from ``path`` with the ``required`` keys and no keys outside `CONFIG_KEYS`."""
    path = Path(path)
    if not path.is_file():
        raise ProbekitError(f"{path} {'is a directory' if path.is_dir() else 'not found'}; expected {what}")
    try:
        conf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ProbekitError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(conf, dict):
        raise ProbekitError(f"{path} must hold a JSON object, got {type(conf).__name__}")
    missing = sorted(required - set(conf))
    unknown = sorted(set(conf) - CONFIG_KEYS)
    if missing:
        raise ProbekitError(f"{path} is missing field(s) {missing}; expected {sorted(required)}")
    if unknown:
        raise ProbekitError(f"{path} has unknown field(s) {unknown}; expected a subset of {sorted(CONFIG_KEYS)}")
    return conf


def read_config(folder: str | Path) -> dict:
    """A model folder's config.json, checked for missing/unknown fields and a compatible version."""
    path = Path(folder) / "config.json"
    conf = read_json_config(path, {"model", "task", "probekit_version"},
                            "a model folder with config.json and model.safetensors")
    major = str(conf["probekit_version"]).split(".")[0]
    if major != __version__.split(".")[0]:
        raise ProbekitError(f"{path} was written by probekit {conf['probekit_version']}; this is {__version__} (major versions differ)")
    return conf


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu"):
    """Load a model folder (or a shipped model by name). Returns ``(model, task, config_dict)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = resolve_model_dir(name_or_path)
    conf = read_config(folder)
    cfg = ModelConfig.from_dict(conf["model"])
    task = task_from_spec(conf["task"])
    if task.d_vocab != cfg.d_vocab:
        raise ProbekitError(f"task {task.name!r} has {task.d_vocab} tokens but the model's d_vocab is {cfg.d_vocab}; vocabularies must match")
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ProbekitError(f"{weights} not found; expected the model's weights next to config.json")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ProbekitError(f"{weights} is truncated or corrupted ({str(e).splitlines()[0]}); expected a safetensors file") from None
    model = build_model(cfg, device="cpu")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ProbekitError(f"{weights} does not match config.json: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ProbekitError(f"{weights}: {k} has shape {tuple(state[k].shape)}, config.json implies {tuple(v.shape)}")
    model.load_state_dict(state, strict=True)
    model.probekit_name = conf.get("name") or folder.name
    to_device(model, device)
    model.eval()
    return model, task, conf


def load(name_or_path: str | Path, device: str | torch.device = "cpu"):
    """``model, task = probekit.load("sort-successor")``: a shipped model by name, or a model folder."""
    model, task, _ = load_model(name_or_path, device=device)
    return model, task


def shipped_models() -> list[str]:
    """Names of the models shipped in ``models/``."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(d.name for d in MODELS_DIR.iterdir() if (d / "config.json").exists())

