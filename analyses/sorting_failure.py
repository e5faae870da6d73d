"""The predictive account of the sorting failure: the numbers and figures of docs/sorting_failure.md.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python analyses/sorting_failure.py \
        [--models sort-baseline,sort-baseline-temp] [--variants main,first,long,all,steptype] [--size default] \
        [--seed 0] [--figures docs/figures]

Variants: ``main`` (4 heads chosen by patching, target and confusor quantities, step-type interactions,
checkerboard split), ``first`` (the first version: 2 heads, target quantities only, no interactions),
``long`` (``main`` with the two longest lengths held out), ``all`` (``main`` with all 8 heads),
``steptype`` (the control: no head quantity, only the step type and the copies left). Writes
``<model>-<variant>.json`` / ``.csv`` / ``.png`` and ``-verdict.json`` to ``--out`` and prints a markdown
summary per run.
"""

import argparse
import time
from pathlib import Path

import torch

import probekit
from probekit.io import write_text
from probekit.studies.sorting import plot_sorting_failure, sorting_failure

VARIANTS = {"main": {}, "first": {"n_heads": 2, "confusor": False, "by_step_type": False}, "long": {"split": "long"},
            "all": {"n_heads": 8}, "steptype": {"heads": []}}

ap = argparse.ArgumentParser()
ap.add_argument("--models", default="sort-baseline,sort-baseline-temp")
ap.add_argument("--variants", default="main,first,long,all,steptype")
ap.add_argument("--size", default="default")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", default="runs/sorting-failure")
ap.add_argument("--figures", default=None, help="also save the main variant's figure here")
args = ap.parse_args()
torch.set_num_threads(1)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

for name in args.models.split(","):
    model, task = probekit.load(name)
    model.probekit_name = name
    for variant in args.variants.split(","):
        t0 = time.time()
        res = sorting_failure(model, task, size=args.size, seed=args.seed, **VARIANTS[variant])
        stem = f"{name}-{variant}"
        res.to_json(out / f"{stem}.json")
        res.to_frame().to_csv(out / f"{stem}.csv", index=False)
        plot_sorting_failure(res, out / f"{stem}.png")
        if args.figures and variant == "main":
            plot_sorting_failure(res, Path(args.figures) / f"sorting_failure_{name}.png")
        lo, hi = res.r2_ci95
        cmd = f"analyses/sorting_failure.py --models {name} --variants {variant} --size {args.size} --seed {args.seed}"
        v = res.verdict(cmd)
        write_text(out / f"{stem}-verdict.json", v.to_json())
        print(f"\n### {name}, variant {variant} ({time.time() - t0:.0f} s)\n")
        print(f"held-out R^2 = {res.r2:.3f} [{lo:.3f}, {hi:.3f}]; fit-cell R^2 = {res.r2_fit:.3f}; "
              f"'{v.hypothesis.text()}': {v.verdict}")
        print("heads by patching effect: " + ", ".join(
            f"{h['label']} {h['effect']:.3f}{'*' if h['chosen'] else ''}" for h in res.heads))
        print("coefficients (standardised): " + ", ".join(f"{k} {v:+.2f}" for k, v in res.coefficients.items())
              + f"; intercept {res.intercept:+.2f}")
        print("\n| composition | length | split | observed | predicted | new-value steps | repeat steps | "
              "greedy exact match |\n|---|---|---|---|---|---|---|---|")
        for c in res.cells:
            print(f"| {c['composition']} | {c['length']} | {c['split']} | {c['observed']:.4f} | {c['predicted']:.4f} | "
                  f"{c['observed_new']:.4f} | {c['observed_repeat']:.4f} | {100 * c['exact_match']:.1f} % |")
