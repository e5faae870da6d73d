"""`probekit report`: run the studies on the shipped models and write one self-contained HTML page.

The page: a table of contents, "What we learned" (each study's headline), then one section per study:
its headline, its tested hypotheses as a table (hypothesis, effect, 95 % interval, baseline, verdict,
command; every verdict is a `probekit.stats.Verdict`), its descriptive claims, its figures in a grid
(each a ``<figure>`` with a caption and alt text), its tables (numbers formatted; a wide table is split
into column groups that repeat the columns naming a row, and scrolls inside its box), its notes. Last,
one attention view per model (circuitsvis, JavaScript inlined, in an ``<iframe srcdoc>``).

Figures are inlined as PNG (base64), so the page needs no network. Each study's results are written as
JSON next to the page: ``report.html`` + ``report_<study>.json``. Every file goes through `probekit.io`
(the folder is checked and locked first; nothing appears unless the whole report succeeds). A progress
bar over the studies goes to stderr.

`study_markdown` writes the same parts of a study as markdown (for ``analyses/run_study.py`` and
``docs/findings.md``).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import sys
import time
from pathlib import Path

from probekit.io import output_dir, save_figure, write_text
from probekit.model import shipped_models
from probekit.tasks import ProbekitError

STUDIES = ("overview", "failure", "hint", "carry")
MAX_COLS = 8  # a table with more columns is split into column groups
VERDICT_COLUMNS = ("hypothesis", "effect", "95 % interval", "baseline", "n", "verdict", "command")


def run_study(name: str, size: str = "default", seed: int = 0):
    """Run one study by name (one of `STUDIES`); returns a `probekit.studies.Study`."""
    from probekit import studies as S

    if name not in STUDIES:
        raise ProbekitError(f"unknown study {name!r}; expected one of {list(STUDIES)}")
    return S.overview() if name == "overview" else getattr(S, f"{name}_study")(size=size, seed=seed)


# ---------------------------------------------------------------------------- the parts of a study


def figures_of(study) -> list:
    """The study's `probekit.studies.StudyFigure`\\ s, in the order the study registered them (`Study.figure`)."""
    return list(study.figures)


def _descriptive_claims(study) -> list[dict]:
    """The claims that `Study.test` did not write for a tested hypothesis (those have a ``"verdict"`` and are
    shown in the verdict table instead)."""
    return [c for c in study.claims if "verdict" not in c]


def fmt(v) -> str:
    """A table cell as text: 3 significant digits, an interval as ``[lo, hi]``, NaN and None as "–"."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "; ".join(f"{k} {fmt(x)}" for k, x in v.items())
    return str(v)


def _verdict_rows(study) -> list[dict]:
    """One row per tested hypothesis, in `VERDICT_COLUMNS`, every cell read from its `Verdict`."""
    return [dict(zip(VERDICT_COLUMNS, (f"{v.hypothesis.statement} ({v.hypothesis.text()})", fmt(v.effect),
                                       fmt(list(v.interval)), fmt(v.baseline) if v.baseline else "–", fmt(v.n),
                                       v.verdict, v.command), strict=True)) for v in study.verdicts]


def _key_columns(rows: list[dict], cols: list[str]) -> list[str]:
    """The fewest leading columns (at most 3) whose values tell every row apart."""
    for k in range(1, min(3, len(cols)) + 1):
        if len({tuple(str(r.get(c)) for c in cols[:k]) for r in rows}) == len(rows):
            return cols[:k]
    return cols[:min(3, len(cols))]


def _column_groups(rows: list[dict]) -> list[list[str]]:
    """The table's columns in groups of at most `MAX_COLS`, each group led by the `_key_columns`."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    if len(cols) <= MAX_COLS:
        return [cols]
    keys = _key_columns(rows, cols)
    rest = [c for c in cols if c not in keys]
    step = max(1, MAX_COLS - len(keys))
    return [keys + rest[i:i + step] for i in range(0, len(rest), step)]


# ---------------------------------------------------------------------------- HTML


def _esc(x) -> str:
    return html.escape(str(x))


def slug(text: str) -> str:
    """An HTML id from ``text``: lower case, runs of other characters as one hyphen."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _png(fig, dpi: int = 100) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figure_html(sf, study_name: str) -> str:
    """One `StudyFigure` as ``<figure>``: the PNG inlined, its alt text, its caption."""
    return (f"<figure id='fig-{slug(study_name)}-{slug(sf.key)}'><img alt=\"{html.escape(sf.alt, quote=True)}\" "
            f"src=\"data:image/png;base64,{_png(sf.make())}\"><figcaption>{_esc(sf.caption)}</figcaption></figure>")


def _table_html(name: str, rows: list[dict]) -> str:
    """A study table: its column groups (`_column_groups`), formatted cells, inside a scrolling box."""
    if not rows:
        return ""
    parts = []
    for cols in _column_groups(rows):
        head = "".join(f"<th>{_esc(c.replace('_', ' '))}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{_esc(fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
        parts.append(f"<div class='tbl'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")
    opened = " open" if len(rows) <= 15 else ""
    return (f"<details{opened}><summary>Table: {_esc(name)} ({len(rows)} rows)</summary>{''.join(parts)}</details>")


def _verdict_table_html(study) -> str:
    if not study.verdicts:
        return ""
    head = "".join(f"<th>{_esc(c)}</th>" for c in VERDICT_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td class='verdict {slug(r[c])}'>{_esc(r[c])}</td>" if c == "verdict" else
                         f"<td class='cmd'><code>{_esc(r[c])}</code></td>" if c == "command" else
                         f"<td>{_esc(r[c])}</td>" for c in VERDICT_COLUMNS) + "</tr>" for r in _verdict_rows(study))
    return (f"<h3>Tested hypotheses</h3><div class='tbl'><table class='verdicts'><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def _study_html(study, seconds: tuple[float, float] | None = None) -> str:
    """One study's section (module docstring); ``seconds``: (wall-clock, CPU) time the study took."""
    sid = f"study-{slug(study.name)}"
    took = f" Ran in {seconds[0]:.0f} s ({seconds[1]:.0f} s of CPU time)." if seconds is not None else ""
    claims = _descriptive_claims(study)
    parts = [f"<section id='{sid}'><h2>{_esc(study.title)}</h2>",
             "".join(f"<p class='headline'>{_esc(h)}</p>" for h in study.headline),
             _verdict_table_html(study)]
    if claims:
        parts.append("<h3>Measurements</h3><ul>" + "".join(
            f"<li>{_esc(c['text'])}<br><span class='cmd'>regenerate: <code>{_esc(c['command'])}</code></span></li>"
            for c in claims) + "</ul>")
    figs = figures_of(study)
    if figs:
        parts.append("<h3>Figures</h3><div class='figs'>" + "".join(_figure_html(f, study.name) for f in figs) + "</div>")
    if study.tables:
        parts.append("<h3>Tables</h3>" + "".join(_table_html(k, v) for k, v in study.tables.items()))
    parts += [f"<p class='note'>{_esc(n)}</p>" for n in study.notes]
    parts.append(f"<p class='meta'>Study <code>{_esc(study.name)}</code>.{took}</p></section>")
    return "".join(parts)


def tally(study) -> str:
    """The study's verdicts counted by kind, e.g. "3 supported, 1 not supported"."""
    counts = {}
    for v in study.verdicts:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in counts.items())


def _summary_html(studies) -> str:
    """"What we learned": each study's headline (or, without one, its verdicts), with a link to its section."""
    items = []
    for st in studies:
        lines = list(st.headline) or [f"{v.hypothesis.statement}: {v.verdict}." for v in st.verdicts]
        counted = f" <span class='meta'>(tested hypotheses: {_esc(tally(st))})</span>" if st.verdicts else ""
        body = "".join(f"<p>{_esc(t)}</p>" for t in lines) or "<p class='meta'>No headline and no tested hypothesis.</p>"
        items.append(f"<h3><a href='#study-{slug(st.name)}'>{_esc(st.title)}</a>{counted}</h3>{body}")
    return f"<section id='summary'><h2>What we learned</h2>{''.join(items)}</section>"


def _toc_html(studies, extra: tuple[tuple[str, str], ...] = ()) -> str:
    links = [("summary", "What we learned")] + [(f"study-{slug(s.name)}", s.title) for s in studies] + list(extra)
    return "<nav id='toc'><h2>Contents</h2><ol>" + "".join(
        f"<li><a href='#{i}'>{_esc(t)}</a></li>" for i, t in links) + "</ol></nav>"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}
.tbl{overflow-x:auto;max-width:100%;margin:.6em 0}table{border-collapse:collapse;font-size:.82em}
td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}th{background:#f3f3f3;text-align:left}
td{font-variant-numeric:tabular-nums}table.verdicts td:first-child{min-width:18em}
td.cmd code,span.cmd code{word-break:break-all;font-size:.9em}code{background:#f4f4f4;padding:1px 4px}
td.verdict{font-weight:600;white-space:nowrap}td.supported{background:#e3f4e3}td.not-supported{background:#fbe3e3}
td.inconclusive{background:#fdf3d8}.figs{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:1em}
figure{margin:0;border:1px solid #e3e3e3;padding:.5em}figure img{max-width:100%;height:auto;display:block;margin:auto}
figcaption{font-size:.85em;color:#444;margin-top:.4em}p.headline{font-size:1.05em}.meta,.note{color:#555;font-size:.85em}
nav#toc{background:#fafafa;border:1px solid #e3e3e3;padding:.3em 1em}li{margin:.3em 0}details{margin:.4em 0}
iframe.attn{width:100%;height:560px;border:1px solid #ddd}.cmd{color:#555;font-size:.85em}"""


def render_html(studies, size: str, seed: int, seconds: dict | None = None, attention: str = "") -> str:
    """The whole page (module docstring) for ``studies`` (`probekit.studies.Study` records); ``seconds``: study
    name -> (wall-clock, CPU) seconds it took; ``attention``: the attention views' HTML."""
    seconds = seconds or {}
    extra = (("attention", "Attention patterns"),) if attention else ()
    body = (f"<h1>probekit report</h1><p>Studies on the shipped models (size <code>{_esc(size)}</code>, seed {seed}). "
            "Every verdict follows from its 95 % interval; every claim names the command that regenerates it.</p>"
            + _toc_html(studies, extra) + _summary_html(studies)
            + "".join(_study_html(s, seconds.get(s.name)) for s in studies)
            + (f"<section id='attention'><h2>Attention patterns (one example each)</h2>{attention}</section>"
               if attention else ""))
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>probekit report</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def _attention_views(names: list[str]) -> str:
    from probekit.studies.common import _load
    from probekit.viz import attention_html

    views = []
    for name in names:
        model, task, _ = _load(name)
        batch = task.sample(1, length=getattr(task, "display_length", None), seed=0)
        page = attention_html(model, batch, task=task, title=f"{name}: attention patterns")
        views.append(f"<h3>{_esc(name)}</h3><iframe class='attn' title='{_esc(name)}: attention patterns' "
                     f"srcdoc=\"{html.escape(page, quote=True)}\"></iframe>")
    return "".join(views)


# ---------------------------------------------------------------------------- markdown


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def study_markdown(study, figure_paths: dict[str, str] | None = None, level: int = 2, max_figures: int = 4) -> str:
    """A study as markdown: heading, headline, the verdict table, the first ``max_figures`` figures whose key
    is in ``figure_paths`` (key -> image path as the page links it) with captions, the claims with their
    commands, the notes."""
    figure_paths = figure_paths or {}
    h = "#" * level
    out = [f"{h} {study.title}", ""] + [x for t in study.headline for x in (t, "")]  # a paragraph a sentence
    if study.verdicts:
        out += [f"{h}# Tested hypotheses", "", "| " + " | ".join(VERDICT_COLUMNS) + " |",
                "|" + "---|" * len(VERDICT_COLUMNS)]
        out += ["| " + " | ".join(_md(f"`{r[c]}`" if c == "command" else f"**{r[c]}**" if c == "verdict" else r[c])
                                  for c in VERDICT_COLUMNS) + " |" for r in _verdict_rows(study)]
        out.append("")
    shown = [f for f in figures_of(study) if f.key in figure_paths][:max_figures]
    for i, f in enumerate(shown, 1):
        out += [f"![{_md(f.alt)}]({figure_paths[f.key]})", "", f"*Figure {i}. {f.caption}*", ""]
    claims = _descriptive_claims(study)
    if claims:
        out += [f"{h}# Measurements", ""] + [f"- {c['text']}  \n  `{c['command']}`" for c in claims] + [""]
    out += [f"_{n}_\n" for n in study.notes]
    return "\n".join(out).rstrip() + "\n"


def write_study(study, out: str | Path, dpi: int = 120) -> list[Path]:
    """Write ``<name>.json``, ``<name>_claims.md`` and one PNG per figure of ``study`` to ``out``."""
    import matplotlib.pyplot as plt

    out = Path(out)
    paths = [write_text(out / f"{study.name}.json", study.to_json())]
    names = {}
    for f in figures_of(study):
        fig = f.make()
        paths.append(save_figure(fig, out / f"{study.name}_{slug(f.key)}.png", dpi=dpi, bbox_inches="tight"))
        plt.close(fig)
        names[f.key] = paths[-1].name
    paths.insert(1, write_text(out / f"{study.name}_claims.md", study_markdown(study, names, level=1,
                                                                                max_figures=len(names))))
    return paths


# ---------------------------------------------------------------------------- running the report


def run_report(out: str | Path = "reports/latest", studies: tuple[str, ...] = STUDIES, size: str = "default",
               overwrite: bool = False, seed: int = 0, attention: bool = True, progress: bool = True) -> Path:
    """Run ``studies`` and write ``report.html`` + ``report_<study>.json`` to ``out`` (refused when non-empty
    unless ``overwrite``). ``progress``: a bar over the studies on stderr. Returns the HTML path."""
    from probekit.studies import SIZES

    bad = [s for s in studies if s not in STUDIES]
    if bad:
        raise ProbekitError(f"unknown study {bad[0]!r}; expected one of {list(STUDIES)}")
    if size not in SIZES:
        raise ProbekitError(f"unknown size {size!r}; expected one of {list(SIZES)}")
    if not isinstance(seed, int) or seed < 0:
        raise ProbekitError(f"seed must be a non-negative integer, got {seed!r}")
    if not shipped_models():
        raise ProbekitError("no shipped models found in models/; expected the model zoo (see docs/model_sweep.md)")
    with output_dir(out, overwrite=overwrite) as folder:
        return _write_report(folder, tuple(dict.fromkeys(studies)), size, seed, attention, progress)


def _write_report(out: Path, names: tuple[str, ...], size: str, seed: int, attention: bool, progress: bool) -> Path:
    from tqdm.auto import tqdm

    done, seconds = [], {}
    bar = tqdm(names, desc="report", unit="study", file=sys.stderr, disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        t0, c0 = time.perf_counter(), time.process_time()
        st = run_study(name, size=size, seed=seed)
        seconds[name] = (time.perf_counter() - t0, time.process_time() - c0)
        write_text(out / f"report_{name}.json", st.to_json())
        done.append(st)
        if progress:
            bar.write(f"[report] {name}: {seconds[name][0]:.0f} s ({seconds[name][1]:.0f} s CPU)", file=sys.stderr)
    bar.close()
    views = ""
    if attention:
        views = _attention_views([n for n in ("sort-successor", "sort-baseline", "mult-5x1") if n in shipped_models()])
    path = write_text(out / "report.html", render_html(done, size, seed, seconds, views))
    print(f"[report] wrote {path} (and report_<study>.json)")
    return path

