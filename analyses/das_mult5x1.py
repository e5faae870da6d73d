"""DAS for the carry into one product digit of mult-5x1: the numbers and figure of docs/guide.md (DAS).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python analyses/das_mult5x1.py [--digit 2] [--k 8] [--out runs/das-mult5x1] [--k-scan]

Writes ``fit.json`` (one DAS fit at resid_post), ``sweep.json``/``sweep.csv``/``sweep.png`` (sites x positions,
column sum held) and ``free.json``/``free.csv`` (column sum free), and prints the tables of the doc.
"""

import argparse
from pathlib import Path

import torch

import probekit
from probekit.interventions import (
    Location,
    Where,
    carry_counterfactual,
    counterfactual_pairs,
    fit_das,
    plot_iia,
    sweep_pairs,
)

ap = argparse.ArgumentParser()
ap.add_argument("--digit", type=int, default=2)
ap.add_argument("--k", type=int, default=8)
ap.add_argument("--n", type=int, default=2000)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", default="runs/das-mult5x1")
ap.add_argument("--k-scan", action="store_true", help="also fit k = 1, 2, 4, 8, 16 at resid_mid and resid_post")
args = ap.parse_args()
torch.set_num_threads(1)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

model, task = probekit.load("mult-5x1")
at = Where(digit_index=args.digit)
target = carry_counterfactual(at)
held = counterfactual_pairs(task, args.n, 5, vary="carry_in", hold=["column_sum"], at=at, target=target, seed=args.seed)
free = counterfactual_pairs(task, args.n, 5, vary="carry_in", hold=[], at=at, target=target, seed=args.seed)

fit = fit_das(model, held, Location("resid_post", 0, at), k=args.k, seed=args.seed)
fit.to_json(out / "fit.json")
s = fit.summary()
print(f"one fit, {fit.location}, k={fit.k}: IIA {s['iia']:.3f} [{s['iia_lo']:.3f}, {s['iia_hi']:.3f}], control "
      f"{s['control_mean']:.3f} +- {s['control_std']:.3f}, ceiling {s['ceiling']:.3f}, floor {s['floor']:.3f}; "
      f"{fit.steps} steps, {fit.seconds:.1f} s wall, {fit.cpu_seconds:.1f} s CPU")


def table(res, name):
    res.to_json(out / f"{name}.json")
    frame = res.to_frame()
    frame.to_csv(out / f"{name}.csv", index=False)
    print(f"\n{name}: | row | position | IIA | 95 % CI | random control (mean +- sd) | full vector | base run |")
    for r in frame.itertuples():
        print(f"| {r.layer_label} | {r.pos_label} | {r.value:.3f} | {r.iia_lo:.3f}-{r.iia_hi:.3f} | "
              f"{r.control_mean:.3f} +- {r.control_std:.3f} | {r.ceiling:.3f} | {r.floor:.3f} |")


positions = [at, Where(operand=0, place=args.digit - 1), Where(operand=1, place=0)]
sweep = sweep_pairs(model, held, k=args.k, positions=positions, seed=args.seed, progress=True)
table(sweep, "sweep")
plot_iia(sweep, out / "sweep.png", title=f"mult-5x1: DAS for the carry into digit {args.digit} (k = {args.k}, "
                                         "column sum held)")
table(sweep_pairs(model, free, k=args.k, sites=["resid_mid", "resid_post"], seed=args.seed, progress=True), "free")

if args.k_scan:  # IIA against the subspace size at the answer step (column sum held)
    print("\nk scan: | site | k | IIA | 95 % CI | random control | steps | s wall |")
    for site in ("resid_mid", "resid_post"):
        for k in (1, 2, 4, 8, 16):
            f = fit_das(model, held, Location(site, 0, at), k=k, seed=args.seed)
            s = f.summary()
            print(f"| {site} | {k} | {s['iia']:.3f} | {s['iia_lo']:.3f}-{s['iia_hi']:.3f} | "
                  f"{s['control_mean']:.3f} +- {s['control_std']:.3f} | {f.steps} | {f.seconds:.1f} |", flush=True)
