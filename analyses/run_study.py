"""Run studies (`probekit.studies`) on the shipped models; write each one's JSON, claims (markdown) and figures.

    .venv/bin/python analyses/run_study.py NAME ... [--size full|default|quick] [--seed 0] [--out reports/analyses]

NAME is one of `probekit.report.STUDIES`: ``overview`` (accuracy vs length of every shipped model), ``hint``
(the successor lookup in the sorting models, by length) or ``carry`` (the carry, causally: the staircase heads,
where the carry is computed, what an ablation breaks, mult-3x3's circuit, transfer to unseen lengths).
``--size full`` is the research size; ``probekit report`` runs the same studies at ``default`` size as one
HTML page.
"""

from __future__ import annotations

import argparse
import sys

from probekit.report import STUDIES, run_study, write_study
from probekit.studies import SIZES
from probekit.tasks import ProbekitError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: analyses/run_study.py carry hint --size default")
    ap.add_argument("names", nargs="+", choices=STUDIES, metavar="NAME", help=f"one or more of {', '.join(STUDIES)}")
    ap.add_argument("--size", default="full", choices=list(SIZES), help="sample sizes (default: full)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="reports/analyses", help="folder for the files (default: reports/analyses)")
    args = ap.parse_args(argv)
    try:
        for name in dict.fromkeys(args.names):
            study = run_study(name, size=args.size, seed=args.seed)
            for path in write_study(study, args.out):
                print(f"wrote {path}")
            print(study.summary())
    except ProbekitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
