"""Ship one job of a finished sweep as a model folder, with every seed's numbers, and write its card.

    .venv/bin/python analyses/ship.py GRID OUT CONFIG NAME [--seed 0] [--overwrite] [--records-only]
    e.g. .venv/bin/python analyses/ship.py analyses/zoo/sort-extrap.json runs/sweeps/sort-extrap nope sort-extrap

Copies ``OUT/CONFIG/seed<k>`` into ``models/NAME`` (`probekit.grid.ship`), writes ``models/NAME/seeds.json``
(the sweep's summary rows of CONFIG: mean over seeds with its interval, each seed's value) and the card.
``OUT`` may be a sweep's archive (``probekit sweep --archive``). With ``--records-only`` the folder's weights stay
as they are: only seeds.json and the card are written, for a shipped model whose recipe is CONFIG's (refused when
the model, task or training settings differ); seeds.json says whether its metrics are those of the sweep's seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from make_cards import MODELS, card

from probekit.grid import load_grid, ship, summarize
from probekit.io import write_json, write_text
from probekit.tasks import ProbekitError


def _recipe(path: Path) -> dict:
    conf = json.loads((path / "config.json").read_text())
    return {k: {x: y for x, y in conf[k].items() if x != "extra" and y is not None} for k in ("model", "task", "train")}


def _same_run(shipped: Path, job: Path) -> bool:
    """Whether the shipped folder holds the job's recipe (refused if not) and the job's own evaluation."""
    if _recipe(shipped) != _recipe(job):
        raise ProbekitError(f"{shipped} was trained with another recipe than {job}; expected the same model, task "
                            "and training settings")
    records = [json.loads((p / "metrics.json").read_text())["records"] for p in (shipped, job)]
    return [(r["length"], r["exact_match"]) for r in records[0]] == [(r["length"], r["exact_match"]) for r in records[1]]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid")
    ap.add_argument("out")
    ap.add_argument("config")
    ap.add_argument("name")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--records-only", action="store_true")
    args = ap.parse_args(argv)
    try:
        return _ship(args, ap)
    except ProbekitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _command(args, job: Path) -> str:
    """The command that regenerates the seeds' records: train into a run folder, then archive if OUT is an archive."""
    if (job / "model.safetensors").exists():
        return f"probekit sweep {args.grid} --out {args.out} --jobs {args.config}"
    runs = f"runs/sweeps/{Path(args.out).name}"
    return (f"probekit sweep {args.grid} --out {runs} --jobs {args.config}\n"
            f"probekit sweep {args.grid} --out {runs} --archive {args.out}")


def _ship(args, ap) -> int:
    grid = load_grid(args.grid)
    rows = [r for r in summarize(grid, args.out) if r["config"] == args.config]
    if not rows:
        ap.error(f"no finished job of configuration {args.config!r} in {args.out}")
    job = Path(args.out) / args.config / f"seed{args.seed}"
    same = _same_run(MODELS / args.name, job) if args.records_only else True
    if not args.records_only:
        ship(job, args.name, overwrite=args.overwrite)
    write_json(MODELS / args.name / "seeds.json", {
        "grid": grid.name, "config": args.config, "shipped_seed": args.seed, "shipped_is_sweep_job": same,
        "grid_seeds": list(grid.seeds), "rows": rows,
        "command": _command(args, job)})
    write_text(MODELS / args.name / "card.md", card(args.name))
    print(f"shipped models/{args.name} (seed {args.seed}; {rows[0]['seeds']} seed(s) in seeds.json) and its card")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
