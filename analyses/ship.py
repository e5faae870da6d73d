"""Ship one job of a finished sweep as a model folder, with every seed's numbers, and write its card.

    .venv/bin/python analyses/ship.py GRID OUT CONFIG NAME [--seed 0] [--overwrite]
    e.g. .venv/bin/python analyses/ship.py analyses/zoo/sort-extrap.json runs/sweeps/sort-extrap nope sort-extrap

Copies ``OUT/CONFIG/seed<k>`` into ``models/NAME`` (`probekit.grid.ship`), writes ``models/NAME/seeds.json``
(the sweep's summary rows of CONFIG: mean over seeds with its interval, each seed's value) and the card.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from make_cards import MODELS, card

from probekit.grid import load_grid, ship, summarize
from probekit.io import write_json, write_text


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid")
    ap.add_argument("out")
    ap.add_argument("config")
    ap.add_argument("name")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    grid = load_grid(args.grid)
    rows = [r for r in summarize(grid, args.out) if r["config"] == args.config]
    if not rows:
        ap.error(f"no finished job of configuration {args.config!r} in {args.out}")
    ship(Path(args.out) / args.config / f"seed{args.seed}", args.name, overwrite=args.overwrite)
    write_json(MODELS / args.name / "seeds.json", {
        "grid": grid.name, "config": args.config, "shipped_seed": args.seed, "grid_seeds": list(grid.seeds), "rows": rows,
        "command": f"probekit sweep {args.grid} --out {args.out} --jobs {args.config}"})
    write_text(MODELS / args.name / "card.md", card(args.name))
    print(f"shipped models/{args.name} (seed {args.seed}; {rows[0]['seeds']} seed(s) in seeds.json) and its card")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
