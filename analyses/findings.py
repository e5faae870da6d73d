"""Write docs/findings.md: our numbers next to the papers', each with the command that regenerates it.

    .venv/bin/python analyses/findings.py [--size default]

Accuracy comes from each shipped model's metrics.json (written by `probekit eval`); the mechanism
claims come from the studies (`probekit.studies`) run here at ``--size``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from probekit.io import write_text
from probekit.model import MODELS_DIR, shipped_models
from probekit.report import run_study

ROOT = Path(__file__).resolve().parent.parent

PAPERS = [
    ("Sorting, trained on lengths <= 20, exact match at length 100",
     "Awasthi & Gupta 2023: < 1 % without hints; 92.6 % with the successor hint (repeated values)",
     ["sort-baseline", "sort-successor", "sort-predecessor", "sort-learned-pos", "sort-baseline-temp", "sort-successor-temp"], 100),
    ("Sorting distinct values from 256, trained on lengths <= 20, exact match at length 100",
     "Awasthi & Gupta 2023: small NoPE sorters with a length-dependent temperature extrapolate; learned absolute "
     "positions do not", ["sort-extrap", "sort-extrap-learned-pos"], 100),
    ("5 x 1 multiplication, 1 layer, 3 heads, reversed product",
     "Qiu et al. 2024: 99.3 % (reversed), 89.8 % (forward)", ["mult-5x1"], None),
    ("N x N multiplication, reversed product, with depth and simple samples",
     "Qiu et al. 2024 (5 x 5): 4 layers 97.4 %, 8 layers 99.6 %, + simple samples 99.9 %", ["mult-3x3"], None),
    ("N x N multiplication, forward product", "Qiu et al. 2024: forward is harder than reversed. mult-3x3-forward is "
     "trained with mult-3x3's recipe (same architecture, steps, learning rate and seed)",
     ["mult-3x3", "mult-3x3-forward"], None),
    ("Multiplication on longer operands than trained",
     "Lee et al. 2023 / Shen et al. 2023: no length generalisation beyond trained digit counts without positional care",
     ["mult-extrap"], None),
]


def _records(name: str) -> dict:
    m = json.loads((MODELS_DIR / name / "metrics.json").read_text())
    return {r["length"]: r for r in m["records"]} | {"command": m.get("command", "")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="default")
    args = ap.parse_args()
    have = set(shipped_models())
    lines = ["# Findings", "", "Our numbers (CPU-scale models, 2 cores) next to the papers' (`../shared/SCIENCE.md`).",
             f"Regenerate this page with `.venv/bin/python analyses/findings.py --size {args.size}`.", "",
             "## Accuracy next to the literature", ""]
    for what, paper, names, length in PAPERS:
        lines += [f"### {what}", "", f"Paper: {paper}.", ""]
        for name in names:
            if name not in have:
                continue
            recs = _records(name)
            cmd = recs.pop("command")
            shown = [recs[length]] if length in recs else list(recs.values())
            lines.append(f"- `{name}`: " + ", ".join(f"length {r['length']}: {100 * r['exact_match']:.1f} % "
                                                     f"(95 % CI {100 * r['exact_match_ci95'][0]:.1f}-"
                                                     f"{100 * r['exact_match_ci95'][1]:.1f}, n={r['n']})" for r in shown)
                         + f"  \n  `{cmd}`")
        lines.append("")
    for name in ("hint", "carry"):
        st = run_study(name, size=args.size)
        lines += [f"## {st.title}", ""]
        lines += [f"- {c['text']}  \n  `{c['command']}`" for c in st.claims]
        lines += [f"- _{n}_" for n in st.notes] + [""]
    write_text(ROOT / "docs" / "findings.md", "\n".join(lines) + "\n")
    print("wrote docs/findings.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
