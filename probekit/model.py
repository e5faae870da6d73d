"""`ModelConfig` -> a TransformerLens 4 `TransformerBridge`; save and load model folders.

A model folder holds ``model.safetensors`` (the bridge's state dict, TransformerLens names) and
``config.json`` (model, task and training configs, probekit version). No pickles: loading never
runs code from the folder. The weights' metadata holds ``config_hash``, the hash of the model config
they were saved for: loading refuses a config.json whose model config hashes otherwise (two heads of
48 dimensions fit the shapes of three of 32, but are another model), a tensor that is not floating
point or not finite, and a missing, extra or wrongly shaped tensor.

`ModelConfig` checks every field's type and range when it is made (`probekit.checks`), and refuses a
config whose parameters and attention masks (`model_bytes`) would take more than `MAX_MODEL_BYTES`
(4 GiB), before anything is allocated.

Positional options: ``learned`` (absolute, trained), ``rotary``, ``none`` (NoPE: the native model's
learned table, zeroed and frozen), ``place`` (per-digit place indices, below). ``length_temperature="log"``
multiplies the attention scores of the query at position t by ln(t + 2), a fixed function of the
number of visible keys, so attention can stay sharp as the context grows.

``positional="place"`` ("abacus" embeddings, McLeish et al. 2024): each digit token gets a learned
embedding indexed by its place within its number, so that digits of equal significance share an
embedding whatever the numbers' lengths (with operands and answers written least significant digit
first, place i is the power 10**i). Details:

- Token ids ``0..place_tokens-1`` are digits (``place_tokens=10`` for multiplication's ``0..9 * =``).
- The place table is the native model's positional table (``n_ctx`` rows, ``hook_pos_embed``, ``W_pos``).
  Row 0 is reserved for every token that is not a digit; the i-th digit (from 0) of a run of
  consecutive digit tokens gets row ``1 + i``. The ids are a causal function of the token ids alone
  (`probekit.forward.place_ids`, the one function computing them), so a key/value-cached decode
  continues them incrementally.
- Training adds a random offset in ``[0, place_offset_max]`` to every digit's row, one per sequence,
  drawn from the step's batch seed (a resumed run equals an unbroken one), so rows beyond the trained
  lengths are trained too; evaluation and every instrument use offset 0, except greedy decoding asked to
  average over offsets (``place_offsets="train"`` of `probekit.evaluate.greedy_decode`, ``probekit eval
  --place-offsets train``). Training refuses lengths whose longest digit run plus ``place_offset_max``
  would pass row ``n_ctx - 1``.
- ``build_model`` installs `probekit.forward.place_model_forward` on the native model, so the bridge's
  own forward (``model(tokens)``, ``run_with_cache``, hook-based instruments) embeds places as
  `probekit.forward` does. Attention sees sequence positions only (causal mask, length temperature).

``place_tokens`` and ``place_offset_max`` belong to ``place`` models only: other configs refuse them
and leave them out of `ModelConfig.to_dict` (so their hashes, and saved models, are unchanged).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from probekit.checks import bounds, check_fields
from probekit.io import atomic_write, ensure_empty_dir, write_json
from probekit.tasks import ProbekitError, Task, task_from_spec

__version__ = "0.1.0"
POSITIONAL = ("learned", "rotary", "none", "place")
NORMALIZATION = ("LN", "LNPre", "RMS", "RMSPre", None)
ACT_FNS = ("relu", "gelu", "gelu_new", "silu", "swish", "solu", "solu_ln")  # TransformerLens's native MLP
MAX_MODEL_BYTES = 4 * 2**30  # a config may not ask for more memory than this (see `model_bytes`)


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int = field(default=2, metadata=bounds(lo=1))
    d_model: int = field(default=128, metadata=bounds(lo=1))
    n_heads: int = field(default=4, metadata=bounds(lo=1))
    d_head: int | None = field(default=None, metadata=bounds(lo=1))  # None: d_model // n_heads
    d_mlp: int | None = field(default=None, metadata=bounds(lo=1))  # None: 4 * d_model
    n_ctx: int = field(default=320, metadata=bounds(lo=1))
    d_vocab: int = field(default=69, metadata=bounds(lo=1))
    attn_only: bool = False
    act_fn: str = field(default="relu", metadata=bounds(choices=ACT_FNS))
    normalization: str | None = field(default="LN", metadata=bounds(choices=NORMALIZATION))
    positional: str = field(default="none", metadata=bounds(choices=POSITIONAL))
    length_temperature: str | None = field(default=None, metadata=bounds(choices=("log",)))  # None or "log"
    seed: int = field(default=0, metadata=bounds(lo=0, hi=2**63 - 1))
    place_tokens: int | None = field(default=None, metadata=bounds(lo=1))  # place: ids 0..place_tokens-1 are digits
    place_offset_max: int = field(default=0, metadata=bounds(lo=0))  # place: training offsets in [0, this]

    def __post_init__(self):
        check_fields(self, "ModelConfig")
        self._check_place()
        if self.d_head is None and self.d_model % self.n_heads:
            raise ProbekitError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set d_head")
        if self.positional == "rotary" and self.head_dim % 2:
            raise ProbekitError(f"ModelConfig.d_head = {self.head_dim} with positional='rotary'; expected an even d_head")
        need = model_bytes(self)
        if need > MAX_MODEL_BYTES:
            raise ProbekitError(f"ModelConfig asks for about {need / 2**30:.1f} GiB (parameters + attention masks, "
                                f"n_layers={self.n_layers}, d_model={self.d_model}, n_ctx={self.n_ctx}); "
                                f"expected at most {MAX_MODEL_BYTES / 2**30:.0f} GiB")

    def _check_place(self) -> None:
        if self.positional != "place":
            if self.place_tokens is not None or self.place_offset_max:
                raise ProbekitError(f"ModelConfig.place_tokens = {self.place_tokens!r}, place_offset_max = "
                                    f"{self.place_offset_max} with positional={self.positional!r}; expected them "
                                    "unset (null, 0) unless positional='place'")
            return
        if self.place_tokens is None or self.place_tokens > self.d_vocab:
            raise ProbekitError(f"ModelConfig.place_tokens = {self.place_tokens!r} with positional='place'; expected "
                                f"the number of digit tokens (ids 0..place_tokens-1), 1..d_vocab={self.d_vocab}")
        if self.place_offset_max + 2 > self.n_ctx:
            raise ProbekitError(f"ModelConfig.place_offset_max = {self.place_offset_max} with n_ctx = {self.n_ctx}; "
                                f"expected at most n_ctx - 2 = {self.n_ctx - 2} (the place table has n_ctx rows)")

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
        d = asdict(self)
        if self.positional != "place":  # configs without place fields hash as they did before them
            del d["place_tokens"], d["place_offset_max"]
        return d

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def model_bytes(cfg: ModelConfig) -> int:
    """Bytes a model of ``cfg`` holds: float32 parameters, plus per layer the ``n_ctx x n_ctx`` causal
    mask (bool) and, for rotary, the cos/sin tables. Training adds activations that grow with the batch."""
    d, h, dh, L = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.n_layers
    norm = {"LN": 2 * d, "RMS": d}.get(cfg.normalization, 0)  # the Pre variants have no parameters
    attn = 4 * d * h * dh + 3 * h * dh + d
    mlp = 0 if cfg.attn_only else 2 * d * cfg.mlp_dim + cfg.mlp_dim + d + norm
    pos = 0 if cfg.positional == "rotary" else cfg.n_ctx * d
    params = 2 * cfg.d_vocab * d + cfg.d_vocab + pos + L * (attn + norm + mlp) + norm
    rotary = 2 * cfg.n_ctx * dh * 4 if cfg.positional == "rotary" else 0
    return 4 * params + L * cfg.n_ctx * cfg.n_ctx + rotary


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
    if cfg.positional == "place":  # the bridge's own forward indexes the positional table by place ids
        from probekit.forward import place_model_forward

        native.place_tokens = cfg.place_tokens
        native.forward = place_model_forward.__get__(native)
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
    ensure_empty_dir(folder, overwrite=overwrite)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(
        state, str(tmp), metadata={"probekit_version": __version__, "config_hash": cfg.hash()}))
    conf = {"probekit_version": __version__, "name": name or folder.name, "model": cfg.to_dict(),
            "task": task.spec(), "train": train_config, "seed": cfg.seed, "metrics": metrics}
    write_json(folder / "config.json", conf)
    return folder


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


def read_weights(path: Path, cfg: ModelConfig, what: str = "config.json") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file saved for ``cfg``: refuses a file that is not safetensors, whose
    ``config_hash`` metadata is not ``cfg``'s, or that holds a non-float or non-finite tensor."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ProbekitError(f"{path} is truncated or corrupted ({str(e).splitlines()[0]}); expected a safetensors file") from None
    found = meta.get("config_hash")
    if found != cfg.hash():
        raise ProbekitError(f"{path} was saved for the model config with hash {found!r} but {what} describes hash "
                            f"{cfg.hash()!r}; expected the config the weights were trained with")
    for k, v in state.items():
        if not v.is_floating_point():
            raise ProbekitError(f"{path}: tensor {k} has dtype {v.dtype}; expected floating-point weights")
        if not torch.isfinite(v).all():
            raise ProbekitError(f"{path}: tensor {k} holds {int((~torch.isfinite(v)).sum())} NaN/inf value(s); "
                                "expected finite weights")
    return state


def load_state_checked(model, state: dict[str, torch.Tensor], path: Path) -> None:
    """``model.load_state_dict(state)`` after refusing missing, unexpected or wrongly shaped tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ProbekitError(f"{path} does not match config.json: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ProbekitError(f"{path}: {k} has shape {tuple(state[k].shape)}, config.json implies {tuple(v.shape)}")
    model.load_state_dict(state, strict=True)


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu"):
    """Load a model folder (or a shipped model by name). Returns ``(model, task, config_dict)``."""
    folder = resolve_model_dir(name_or_path)
    conf = read_config(folder)
    cfg = ModelConfig.from_dict(conf["model"])
    task = task_from_spec(conf["task"])
    if task.d_vocab != cfg.d_vocab:
        raise ProbekitError(f"task {task.name!r} has {task.d_vocab} tokens but the model's d_vocab is {cfg.d_vocab}; vocabularies must match")
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ProbekitError(f"{weights} not found; expected the model's weights next to config.json")
    state = read_weights(weights, cfg)
    model = build_model(cfg, device="cpu")
    load_state_checked(model, state, weights)
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

