"""The hint study at full size: JSON, claims (markdown) and figures in reports/analyses/.

    .venv/bin/python analyses/hint_mechanism.py [--size full|default|quick] [--seed 0]
"""

import argparse

from probekit.report import run_study, write_study

ap = argparse.ArgumentParser()
ap.add_argument("--size", default="full")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", default="reports/analyses")
args = ap.parse_args()
study = run_study("hint", size=args.size, seed=args.seed)
for path in write_study(study, args.out):
    print(f"wrote {path}")
for claim in study.claims:
    print("-", claim["text"])
