"""The successor hint's gap over seeds, from the archived sweep records (no weights needed).

    PYTHONPATH=. .venv/bin/python analyses/hint_gap.py [--length 50]

For each hinted configuration of `sort-hint-grid` with three finished seeds and each sort-only control of
`sort-hint-controls`: the difference of mean exact match (hinted - control, points) with its 95 % Welch
interval over seeds (`probekit.stats.welch_interval`), each group's mean with its t-interval over seeds
(`probekit.grid.seed_interval`), whether the two groups' intervals overlap, and whether the grid's
criterion holds (difference >= 30 points and non-overlapping intervals).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from probekit.grid import finished_record, load_grid, seed_interval
from probekit.stats import welch_interval

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "analyses" / "zoo"
CONTROLS = ("sort-only", "sort-only-matched")


def seed_values(grid_name: str, config: str, length: int) -> list[float]:
    grid = load_grid(ZOO / f"{grid_name}.json")
    out = ZOO / "results" / grid_name
    values = []
    for job in grid.jobs(out, select=[config]):
        if (m := finished_record(job)) is not None:
            values.append(next(r["exact_match"] for r in m["records"] if r["length"] == length))
    return values


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=50)
    args = ap.parse_args(argv)
    grid = load_grid(ZOO / "sort-hint-grid.json")
    common = sorted(set(grid.lengths) & set(load_grid(ZOO / "sort-hint-controls.json").lengths))
    if args.length not in common:
        ap.error(f"--length {args.length} is not evaluated by both grids; expected one of {common}")
    hinted = {c: v for c in grid.configs if len(v := seed_values("sort-hint-grid", c, args.length)) >= 3}
    controls = {c: seed_values("sort-hint-controls", c, args.length) for c in CONTROLS}
    print(f"length {args.length}: exact match, mean over seeds [95 % t-interval]; difference [95 % Welch interval], points")
    print("| hinted | control | hinted mean | control mean | difference | intervals overlap | gap >= 30, apart |")
    print("|---|---|---|---|---|---|---|")
    for h, hv in hinted.items():
        hm, hlo, hhi, _ = seed_interval(hv)
        for c, cv in controls.items():
            cm, clo, chi, _ = seed_interval(cv)
            d, lo, hi, _ = welch_interval(hv, cv)
            overlap = hlo <= chi and clo <= hhi
            print(f"| {h} | {c} | {100 * hm:.1f} % [{100 * hlo:.1f}, {100 * hhi:.1f}] | "
                  f"{100 * cm:.1f} % [{100 * clo:.1f}, {100 * chi:.1f}] | {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | "
                  f"{'yes' if overlap else 'no'} | {'yes' if d >= 0.30 and not overlap else 'no'} |")


if __name__ == "__main__":
    main()
