"""What every study shares: the `Study` record, sample sizes, model loading and small helpers."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from probekit.results import Result
from probekit.stats import Hypothesis, Verdict, judge
from probekit.tasks import Batch, ProbekitError

SIZES = {"quick": {"n": 32, "n_probe": 128, "n_patch": 32}, "default": {"n": 200, "n_probe": 1000, "n_patch": 128},
         "full": {"n": 500, "n_probe": 4000, "n_patch": 256}}


@dataclass(frozen=True)
class StudyFigure:
    """A figure a study asks for: ``make()`` draws it (a matplotlib Figure) from the study's results;
    ``caption`` says what it shows and how to read it; ``alt`` is its text alternative."""

    key: str
    make: Callable[[], object]
    caption: str
    alt: str


@dataclass
class Study:
    """What a study found: tested hypotheses (`verdicts`), claims (each ``{"text", "command"}``; the claim that
    `test` writes for a tested hypothesis also holds ``"verdict"``, its verdict word, and every claim without that
    key is descriptive), the figures and tables that show them, and the `Result` objects behind them.

    ``headline`` holds the few sentences a reader should take away, written from the verdicts."""

    name: str
    title: str
    claims: list[dict] = field(default_factory=list)
    results: dict[str, Result] = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    figures: list[StudyFigure] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)

    def claim(self, text: str, command: str) -> None:
        self.claims.append({"text": text, "command": command})

    def test(self, hypothesis: Hypothesis, effect: float, interval, command: str, baseline: dict | None = None,
             n: int | None = None) -> Verdict:
        """Judge ``hypothesis`` from ``interval`` (`probekit.stats.judge`), keep the verdict and state it as a
        claim marked with ``"verdict"``: the statement, the effect with its interval, the baseline, the verdict."""
        v = judge(hypothesis, effect, interval, command, baseline, n)
        base = "; " + ", ".join(f"{k} {_num(x)}" for k, x in v.baseline.items()) if v.baseline else ""
        self.verdicts.append(v)
        self.claims.append({"text": f"{hypothesis.statement} ({hypothesis.text()}): {_num(v.effect)} "
                                    f"[{_num(v.interval[0])}, {_num(v.interval[1])}]{base}. Verdict: {v.verdict}.",
                            "command": command, "verdict": v.verdict})
        return v

    def figure(self, key: str, make: Callable[[], object], caption: str, alt: str) -> None:
        """Ask for a figure; the report and the findings page draw it with its caption and alt text."""
        if not caption or not alt:
            raise ProbekitError(f"figure {key!r} needs a caption and an alt text")
        self.figures.append(StudyFigure(key, make, caption, alt))

    def summary(self) -> str:
        """The claims as text, one ``- claim`` line each with its command below it, then the notes."""
        return "\n".join([f"- {c['text']}\n    [{c['command']}]" for c in self.claims]
                         + [f"note: {n}" for n in self.notes])

    def to_json(self) -> str:
        from probekit.io import dumps_json

        return dumps_json({"name": self.name, "title": self.title, "headline": self.headline,
                           "verdicts": [v.to_dict() for v in self.verdicts], "claims": self.claims,
                           "figures": [{"key": f.key, "caption": f.caption, "alt": f.alt} for f in self.figures],
                           "tables": self.tables, "notes": self.notes, "results": {k: r.to_dict() for k, r in self.results.items()}}, indent=None)


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


def _num(x) -> str:
    """A number as a claim prints it: 3 significant digits, NaN as "n/a"."""
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"
