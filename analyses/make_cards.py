"""Write models/<name>/card.md from the folder's config.json, metrics.json and train_log.jsonl.

    .venv/bin/python analyses/make_cards.py            # every shipped model
    .venv/bin/python analyses/make_cards.py mult-5x1   # one

Every number in a card comes from those files; regenerate them with the commands the card prints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from probekit.io import write_text

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"

PURPOSE = {
    "sort-baseline": "Sorting, sort objective only, NoPE. The unhinted baseline of the Task Hinting setting.",
    "sort-successor": "Sorting trained on sort + the successor hint (same architecture and step budget as "
                      "sort-baseline). The hinted model of the Task Hinting setting.",
    "sort-predecessor": "Sorting trained on sort + the predecessor hint, a hint the paper found much weaker, for contrast.",
    "sort-learned-pos": "Like sort-baseline with learned absolute positional embeddings: the expected failure past length 20.",
    "sort-baseline-temp": "sort-baseline with the length-dependent attention temperature (scores x ln(t + 2)).",
    "sort-successor-temp": "sort-successor with the length-dependent attention temperature (scores x ln(t + 2)).",
    "mult-5x1": "5-digit x 1-digit multiplication, reversed product, 1 layer, 3 heads: Qiu et al.'s smallest carry circuit.",
    "mult-3x3": "3 x 3-digit multiplication, reversed product, 4 layers, with 20 % simple samples in training.",
    "mult-3x3-forward": "3 x 3-digit multiplication with the product written most significant digit first, for contrast.",
    "sort-extrap": "Sorting 256 distinct values with NoPE and the log length temperature, trained on lengths <= 20 with "
                   "half the training lists drawn from narrow value windows: the sorter that extrapolates to length 100.",
    "sort-extrap-learned-pos": "sort-extrap's recipe with learned absolute positions: its failing twin past length 20.",
    "sort-extrap-repeats": "sort-extrap's recipe trained and tested on lists with repeated values.",
    "mult-nx1-place": "N x 1-digit multiplication (a of 1..5 digits in training, b one digit, operands and product units "
                      "first) with per-digit place indices: of the N x 1 variants the one that extrapolates "
                      "furthest past 5 digits, though not to 90 % at 8 digits (see Every seed).",
    "mult-nx1-learned-pos-rev": "mult-nx1-place's format (operands units first) with learned absolute positions: its "
                                "failing twin past 5 digits.",
    "mult-extrap": "Multiplication trained on operands of 1..2 digits (NoPE), evaluated on 3, 4 and 5 digits: where the "
                   "carry mechanism works and where it breaks.",
}

PAPER = {
    "sort-baseline": "Awasthi & Gupta 2023: < 1 % exact match at length 100 without hints (trained on <= 20).",
    "sort-successor": "Awasthi & Gupta 2023: > 92 % (92.6 % with repeated values) at length 100 with the successor hint.",
    "sort-predecessor": "Awasthi & Gupta 2023: predecessor, parity and fill hints helped much less than successor.",
    "sort-learned-pos": "Small NoPE sorters extrapolate; learned absolute positions do not (see docs/findings.md).",
    "sort-extrap": "Awasthi & Gupta 2023: > 92 % at length 100 with the successor hint (trained on <= 20); without "
                   "hints < 1 %. Here without any hint, on distinct values.",
    "mult-5x1": "Qiu et al. 2024: 99.3 % (reversed) vs 89.8 % (forward), 1 layer, 3 heads.",
    "mult-3x3": "Qiu et al. 2024 (5x5): 4 layers 97.4 %, 8 layers 99.6 %, + simple samples 99.9 % (reversed).",
    "mult-3x3-forward": "Qiu et al. 2024: the forward product is harder than the reversed one at equal size.",
    "mult-nx1-place": "McLeish et al. 2024 (abacus embeddings, per-digit place indices with random offsets): addition "
                      "trained on 20 digits generalises to 100; Lee et al. 2023: reversed output helps arithmetic.",
    "mult-nx1-learned-pos-rev": "Lee et al. 2023: no length generalisation beyond trained digit counts with learned "
                                "absolute positions.",
    "mult-extrap": "Lee et al. 2023: no length generalisation beyond trained digit counts with learned absolute positions.",
}


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def card(name: str) -> str:
    folder = MODELS / name
    conf = json.loads((folder / "config.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    train = conf["train"]
    extra = train.get("extra", {})
    m = conf["model"]
    lines = [f"# {name}", "", PURPOSE.get(name, ""), ""]
    lines += ["## Model", "",
              f"{m['n_layers']} layers, d_model {m['d_model']}, {m['n_heads']} heads, d_mlp "
              f"{m.get('d_mlp') or 4 * m['d_model']}, positional `{m['positional']}`, length temperature "
              f"`{m['length_temperature']}`, n_ctx {m['n_ctx']}, seed {m['seed']}. Task: `{json.dumps(conf['task'])}`.", ""]
    lines += ["## Training", "",
              f"{train['steps']} steps, batch {train['batch_size']}, AdamW lr {train['lr']} (warmup {train['warmup_steps']}, "
              f"cosine to {train['min_lr_ratio']}x), lengths {train['lengths'][0]}..{train['lengths'][1]}, objectives "
              f"`{json.dumps(train['objectives'] or {conf['task'].get('objective', 'product'): 1.0})}`."
              + (f" Training data only (evaluation samples the plain task): `{json.dumps(train['task_overrides'])}`."
                 if train.get("task_overrides") else ""), "",
              f"Wall-clock training time: {extra.get('train_seconds', float('nan')) / 60:.1f} min on 2 CPU cores "
              f"(torch threads: {extra.get('torch_threads', '?')}; other work shared the machine, so this is an upper bound).", "",
              "Retrain (same seed, same machine -> same weights):", "", "```",
              f"probekit train --config models/{name}/config.json --out runs/{name}", "```", ""]
    lines += ["## Accuracy (greedy decoding, no teacher forcing)", "", "```", metrics["command"], "```", "",
              "| length | n | exact match | 95 % interval | token accuracy |", "|---|---|---|---|---|"]
    for r in metrics["records"]:
        lo, hi = r["exact_match_ci95"]
        lines.append(f"| {r['length']} | {r['n']} | {pct(r['exact_match'])} | {pct(lo)} - {pct(hi)} | {pct(r['token_acc'])} |")
    lines.append("")
    if conf["task"]["name"] == "multiplication":
        for r in metrics["records"]:
            lines += [f"Length {r['length']}: per product digit (k = 0 is the units) "
                      + ", ".join(f"d{k} {pct(v)}" for k, v in r["per_digit"].items()) + ".", "",
                      "By number of carries: " + ", ".join(f"{k}: {pct(g['exact_match'])} (n={g['n']})"
                                                          for k, g in r["by_carries"].items()) + ".", "",
                      "By longest carry cascade: " + ", ".join(f"{k}: {pct(g['exact_match'])} (n={g['n']})"
                                                              for k, g in r["by_cascade"].items()) + ".", ""]
    seeds = folder / "seeds.json"
    if seeds.exists():
        lines += seed_section(json.loads(seeds.read_text()))
    if name in PAPER:
        lines += ["## Next to the literature", "", PAPER[name], ""]
    notes = folder / "notes.md"
    if notes.exists():
        lines += ["## Notes", "", notes.read_text().strip(), ""]
    lines += ["Card written by `.venv/bin/python analyses/make_cards.py " + name + "` from config.json and metrics.json.", ""]
    return "\n".join(lines)


def seed_section(rec: dict) -> list[str]:
    """Every seed of the model's sweep configuration (``seeds.json``, written by analyses/ship.py)."""
    rows = rec["rows"]
    done, planned = rows[0]["seeds"], len(rec.get("grid_seeds") or []) or rows[0]["seeds"]
    others = ("; the other seeds back the numbers" if done > 1 else "") + (
        f"; {planned - done} of the grid's {planned} seeds {'is' if planned - done == 1 else 'are'} not trained yet"
        if planned > done else "")
    held = (f"This folder holds seed {rec['shipped_seed']}" if rec.get("shipped_is_sweep_job", True) else
            f"This folder holds an earlier run of the same recipe with seed {rec['shipped_seed']} (its own numbers are "
            f"above; the sweep's seed {rec['shipped_seed']} was trained again and evaluates differently, as the table shows)")
    lines = ["## Every seed", "",
             f"{held}{others}. Sweep `{rec['grid']}`, "
             f"configuration `{rec['config']}`, regenerated by", "", "```", rec["command"], "```", "",
             "| length | seeds | mean exact match | 95 % interval | interval | by seed |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['length']} | {r['seeds']} | {pct(r['exact_match_mean'])} | {pct(r['ci_low'])} - "
                     f"{pct(r['ci_high'])} | {r['interval']} | {r['exact_match_by_seed']} |")
    return lines + [""]


def main(argv: list[str]) -> int:
    names = argv or sorted(d.name for d in MODELS.iterdir() if (d / "metrics.json").exists())
    for name in names:
        write_text(MODELS / name / "card.md", card(name))
        print(f"wrote models/{name}/card.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
