"""What every study shares: the `Study` record, sample sizes, model loading and small helpers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from probekit.results import Result
from probekit.tasks import Batch, ProbekitError

SIZES = {"quick": {"n": 48, "n_probe": 256, "n_patch": 32}, "default": {"n": 200, "n_probe": 1000, "n_patch": 128},
         "full": {"n": 500, "n_probe": 4000, "n_patch": 256}}


@dataclass
class Study:
    """Claims (each ``{"text", "command"}``) and the results they were computed from."""

    name: str
    title: str
    claims: list[dict] = field(default_factory=list)
    results: dict[str, Result] = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def claim(self, text: str, command: str) -> None:
        self.claims.append({"text": text, "command": command})

    def summary(self) -> str:
        """The claims as text, one ``- claim`` line each with its command below it, then the notes."""
        return "\n".join([f"- {c['text']}\n    [{c['command']}]" for c in self.claims]
                         + [f"note: {n}" for n in self.notes])

    def to_json(self) -> str:
        from probekit.io import dumps_json

        return dumps_json({"name": self.name, "title": self.title, "claims": self.claims, "tables": self.tables,
                           "notes": self.notes, "results": {k: r.to_dict() for k, r in self.results.items()}}, indent=None)


def _size(size: str) -> dict:
    if size not in SIZES:
        raise ProbekitError(f"unknown size {size!r}; expected one of {list(SIZES)}")
    return SIZES[size]


def _metrics(name: str) -> dict | None:
    from probekit.model import MODELS_DIR

    p = MODELS_DIR / name / "metrics.json"
    return json.loads(p.read_text()) if p.exists() else None


def _load(name: str):
    from probekit.model import load_model

    model, task, conf = load_model(name)
    model.probekit_name = name
    return model, task, conf


def value_mask(batch: Batch) -> torch.Tensor:
    """[batch, pos, src]: at a predicting position, the input positions that hold the target *value*
    (any copy): the keys a successor lookup may attend to."""
    tgt = batch.features["target"]  # batch pos
    inp = batch.features["value"] >= 0  # batch src: input positions
    return (batch.tokens[:, None, :] == tgt[:, :, None]) & (tgt[:, :, None] >= 0) & inp[:, None, :]


def _begin(name: str, title: str, models: tuple[str, ...], size: str) -> tuple[Study, list[str], str]:
    """A new study, the requested models that are shipped, and the command that reruns the study."""
    from probekit.model import shipped_models

    st = Study(name, title)
    have = [m for m in models if m in shipped_models()]
    if not have:
        st.notes.append(f"none of {list(models)} is shipped")
    return st, have, f"probekit report --study {name} --size {size}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"
