"""Write docs/findings.md and its figures (docs/figures/findings-<study>-<figure>.png) from the studies.

    PYTHONPATH=. .venv/bin/python analyses/findings.py [--size default] [--seed 0] [--hint-sweep FOLDER]

The page opens with what we learned (per question, the first sentence of its study's headline and the study's
verdict tally; `lead`), then one section per question (`QUESTIONS`), headed by the study's whole headline,
each with at most `MAX_FIGURES` of the study's figures, its tested hypotheses (effect, 95 % interval,
baseline, verdict, command) and its measurements with their commands, and ends with the claims that did
not hold (every verdict "not supported" or "inconclusive"). It is generic over `probekit.studies.Study`
records: `write_findings` takes any list of studies. Figures written by an earlier run that this run does
not write are removed, so the folder holds exactly the page's figures.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FIGURES = 4
MAX_WIDTH_PX = 900
PREFIX = "findings-"
HINT_SWEEP = "analyses/zoo/results/sort-hint-controls"  # the sweep archive of the hint's controls (3 seeds each)

# (study, the question its section answers, where to read more or None), in the page's order
QUESTIONS = (
    ("failure", "Why does the unhinted sorter fail as lists get longer, and can the failure be predicted?",
     "[The sorting-failure page](sorting_failure.md) has every variant, a second seed and how the design was "
     "reached."),
    ("hint", "Which components select the next value, and what does the successor hint change?",
     "The gap over seeds comes from the kept records of the `sort-hint-controls` sweep "
     "([model sweep](model_sweep.md)); the mechanism measures are on the shipped models."),
    ("carry", "Where is the carry computed, which heads move the digits it needs, and does it survive longer "
     "operands?", None),
    ("overview", "Which models extrapolate, and do the published accuracy results hold on ours?", None),
)


def write_figures(study, fig_dir: Path, page_dir: Path, max_figures: int = MAX_FIGURES) -> dict[str, str]:
    """The first ``max_figures`` figures of ``study`` as small PNGs (at most `MAX_WIDTH_PX` wide, 100 dpi) in
    ``fig_dir``; returns figure key -> path relative to ``page_dir``."""
    import matplotlib.pyplot as plt

    from probekit.io import save_figure
    from probekit.report import figures_of, slug

    out = {}
    for f in figures_of(study)[:max_figures]:
        fig = f.make()
        dpi = min(100, int(MAX_WIDTH_PX / fig.get_size_inches()[0]))
        path = save_figure(fig, fig_dir / f"{PREFIX}{slug(study.name)}-{slug(f.key)}.png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        out[f.key] = Path(os.path.relpath(Path(path).resolve(), page_dir.resolve())).as_posix()
    return out


def did_not_hold(studies) -> list[str]:
    """One markdown line per verdict "not supported" or "inconclusive", with its numbers and command."""
    from probekit.report import fmt

    lines = []
    for st in studies:
        for v in st.verdicts:
            if v.verdict in ("not supported", "inconclusive"):
                base = f"; baseline {fmt(v.baseline)}" if v.baseline else ""
                lines.append(f"- **{v.verdict}** ({st.title}): {v.hypothesis.statement} ({v.hypothesis.text()}): "
                             f"{fmt(v.effect)} {fmt(list(v.interval))}{base}.  \n  `{v.command}`")
    return lines


def lead(study) -> str:
    """The study's first headline sentence (or, without a headline, its first verdict) and its verdict tally."""
    from probekit.report import tally

    first = (study.headline or [f"{v.hypothesis.statement}: {v.verdict}." for v in study.verdicts] or
             ["No headline and no tested hypothesis."])[0]
    return first + (f" (Tested hypotheses: {tally(study)}.)" if study.verdicts else "")


def page(studies, figures: dict[str, dict[str, str]], command: str) -> str:
    """The markdown page (module docstring); ``figures``: study name -> (figure key -> image path)."""
    from probekit.report import study_markdown

    asked = {name: (q, more) for name, q, more in QUESTIONS}
    out = ["# Findings", "", f"Regenerate this page and its figures with one command: `{command}`.", "",
           "Every number below is measured on the shipped models (CPU scale, one training seed each), except the hint "
           "gap over seeds, read from a sweep's kept records. A tested hypothesis has its threshold fixed in the "
           "study's code before the run that judges it (where a design was chosen on the same seed, its section says "
           "so); its verdict follows from the 95 % interval (`probekit.stats.judge`): supported when the whole "
           "interval satisfies it, not supported when none of it does, inconclusive otherwise.", "",
           "## What we learned", ""]
    for st in studies:
        out += [f"**{asked.get(st.name, (st.title, None))[0]}** {lead(st)}", ""]
    total = [v.verdict for st in studies for v in st.verdicts]
    out += [f"Of {len(total)} tested hypotheses, {total.count('supported')} are supported, "
            f"{total.count('not supported')} not supported and {total.count('inconclusive')} inconclusive; the last "
            "two kinds are listed at the end. Each section below has its study's whole headline, its verdict table, "
            "figures and measurements.", ""]
    for i, st in enumerate(studies, 1):
        q, more = asked.get(st.name, (st.title, None))
        out += [f"## {i}. {q}", ""] + ([f"{more}", ""] if more else [])
        out.append(study_markdown(st, figures.get(st.name, {}), level=3, max_figures=MAX_FIGURES))
    miss = did_not_hold(studies)
    out += ["## Claims that did not hold", ""] + (miss or ["Every tested hypothesis was supported."]) + [""]
    return "\n".join(out)


def write_findings(studies, md_path: Path, fig_dir: Path, command: str) -> list[Path]:
    """Write the page and its figures; remove the `PREFIX` figures in ``fig_dir`` that this run did not write."""
    from probekit.io import write_text

    md_path, fig_dir = Path(md_path), Path(fig_dir)
    figures = {st.name: write_figures(st, fig_dir, md_path.parent) for st in studies}
    written = {(md_path.parent / p).resolve() for f in figures.values() for p in f.values()}
    for old in fig_dir.glob(f"{PREFIX}*.png"):
        if old.resolve() not in written:
            old.unlink()
    return [write_text(md_path, page(studies, figures, command)), *sorted(written)]


def run_studies(size: str, seed: int, hint_sweep: str | None = HINT_SWEEP) -> list:
    """The studies of `QUESTIONS`, in order; the hint study reads its gap over seeds from ``hint_sweep``."""
    from probekit.report import run_study
    from probekit.studies import hint_study

    return [hint_study(size=size, seed=seed, sweep=hint_sweep) if name == "hint" and hint_sweep
            else run_study(name, size=size, seed=seed) for name, _, _ in QUESTIONS]


def main(argv: list[str] | None = None) -> int:
    from probekit.studies import SIZES
    from probekit.tasks import ProbekitError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="default", choices=list(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hint-sweep", default=HINT_SWEEP,
                    help="sweep archive whose seeds give the hint gap against its controls ('' for none)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "findings.md"), help="the page (figures go to figures/ beside it)")
    args = ap.parse_args(argv)
    md = Path(args.out)
    try:
        studies = run_studies(args.size, args.seed, args.hint_sweep)
        paths = write_findings(studies, md, md.parent / "figures",
                               f"PYTHONPATH=. .venv/bin/python analyses/findings.py --size {args.size} --seed {args.seed}")
    except ProbekitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
