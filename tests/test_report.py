"""The report (HTML) and the findings page (markdown + PNGs), rendered from `Study` records: a synthetic study
with known verdicts, figures and a wide table, then the real studies of `probekit report --quick`."""

from __future__ import annotations

import importlib.util
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from probekit.cli import main
from probekit.model import shipped_models
from probekit.report import MAX_COLS, STUDIES, render_html, run_study, slug, study_markdown, tally
from probekit.stats import Hypothesis
from probekit.studies import Study

ROOT = Path(__file__).resolve().parent.parent


def _line_figure(y):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 3))  # wider than the findings page allows: it is scaled down
    ax.plot(y)
    return fig


def synthetic(name: str = "toy", n_figures: int = 2) -> Study:
    """A study whose verdicts, figures and tables are known: one verdict of each kind."""
    st = Study(name, f"Toy study {name}")
    st.test(Hypothesis("the effect is positive", "effect", ">", 0.0), 0.4, (0.1, 0.7), f"toy --{name} a")
    st.test(Hypothesis("the effect is large", "effect", ">=", 0.5), 0.2, (0.1, 0.3), f"toy --{name} b",
            baseline={"chance": 0.05}, n=40)
    st.test(Hypothesis("the gap is below 0.1", "gap", "<", 0.1), 0.12, (0.05, 0.2), f"toy --{name} c")
    st.claim("a descriptive number: 3.0 [2.5, 3.5]", f"toy --{name} d")
    # a measurement worded like the first verdict's claim, with its command: descriptive all the same
    st.claim("the effect is positive (effect > 0): 0.4 on the second sample", f"toy --{name} a")
    for i in range(n_figures):
        st.figure(f"line {i}", lambda i=i: _line_figure([0, i, 2 * i]), f"Caption {i} of {name}.",
                  f"Alt text {i} of {name}.")
    st.tables["wide"] = [{"model": m, "length": L, **{f"col{j}": j / 7 + L for j in range(12)}}
                         for m in ("a", "b") for L in (10, 20)]
    st.notes.append(f"a note of {name}")
    st.headline.append(f"Headline of {name}: the effect is positive but not large.")
    return st


class _Page(HTMLParser):
    """The parts of the page the tests read: ids, links, figures, verdict cells, tables."""

    def __init__(self):
        super().__init__()
        self.ids, self.toc, self.figures, self.verdicts, self.tables = set(), [], [], [], []
        self._stack, self._fig, self._text, self._in = [], None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        self._stack.append((tag, a))
        if tag == "a" and any(t == "nav" for t, _ in self._stack):
            self.toc.append(a["href"])
        if tag == "figure":
            self._fig = {"alt": None, "caption": ""}
        if tag == "img" and self._fig is not None:
            self._fig["alt"] = a.get("alt")
        if tag == "figcaption":
            self._in = "caption"
        if tag == "td" and "verdict" in (a.get("class") or "").split():
            self._in, self._text = "verdict", ""
        if tag == "table":
            self.tables.append([])
        if tag == "th":
            self.tables[-1].append("")
            self._in = "th"

    def handle_endtag(self, tag):
        self._stack.pop()
        if tag == "figure":
            self.figures.append(self._fig)
            self._fig = None
        if tag in ("figcaption", "th") or (tag == "td" and self._in == "verdict"):
            if self._in == "verdict":
                self.verdicts.append(self._text)
            self._in = None

    def handle_data(self, data):
        if self._in == "caption":
            self._fig["caption"] += data
        elif self._in == "verdict":
            self._text += data
        elif self._in == "th":
            self.tables[-1][-1] += data


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    return p


def test_the_page_has_a_toc_a_summary_captions_and_verdicts_from_the_records():
    studies = [synthetic("one"), synthetic("two", n_figures=1)]
    page = render_html(studies, "quick", 0, {"one": (2.0, 1.0)})
    p = _parse(page)
    assert p.toc == ["#summary", "#study-one", "#study-two"]
    assert {h[1:] for h in p.toc} <= p.ids  # every link lands on a section
    assert page.index("id='summary'") < page.index("id='study-one'") < page.index("id='study-two'")
    summary = page[page.index("id='summary'"):page.index("id='study-one'")]
    assert all(h in summary for st in studies for h in st.headline)
    # every figure: an alt text and a caption, from its StudyFigure; in a grid
    assert [f["alt"] for f in p.figures] == [f.alt for st in studies for f in st.figures]
    assert [f["caption"] for f in p.figures] == [f.caption for st in studies for f in st.figures]
    assert page.count("<div class='figs'>") == 2
    # every verdict cell is a Verdict's own word, in order; no verdict sentence is repeated as a claim
    assert p.verdicts == [v.verdict for st in studies for v in st.verdicts]
    assert p.verdicts[:3] == ["supported", "not supported", "inconclusive"]
    assert "Verdict:" not in page and "a descriptive number: 3.0 [2.5, 3.5]" in page
    assert "0.4 on the second sample" in page  # only the claims Study.test marked are left out
    assert "[0.1, 0.3]" in page and "chance 0.05" in page and "toy --one b" in page
    assert "Ran in 2 s (1 s of CPU time)." in page
    # the 14-column table is split into groups of at most MAX_COLS, each led by the columns naming a row
    wide = [t for t in p.tables if t[:2] == ["model", "length"]]
    assert len(wide) == 2 * 2 and all(len(t) <= MAX_COLS for t in wide)
    assert [c for t in wide[:2] for c in t[2:]] == [f"col{j}" for j in range(12)]
    assert "<td>10.1</td>" in page  # numbers formatted to 3 significant digits (10 + 1/7)
    assert not re.search(r"""(src|href)=["']https?://""", page)


def test_study_markdown_has_the_verdict_table_figures_and_commands():
    st = synthetic("md", n_figures=3)
    md = study_markdown(st, {"line 0": "figures/a.png", "line 2": "figures/c.png"}, level=2, max_figures=4)
    assert md.startswith("## Toy study md\n\nHeadline of md")
    rows = [ln for ln in md.splitlines() if ln.startswith("| the ")]
    assert [r.split(" | ")[5].strip("*") for r in rows] == ["supported", "not supported", "inconclusive"]
    assert "![Alt text 0 of md.](figures/a.png)" in md and "*Figure 2. Caption 2 of md.*" in md
    assert "figures/b.png" not in md and "Caption 1" not in md  # only the figures given a path
    assert "- a descriptive number: 3.0 [2.5, 3.5]  \n  `toy --md d`" in md and "_a note of md_" in md
    assert "0.4 on the second sample  \n  `toy --md a`" in md and "Verdict:" not in md


def _findings():
    spec = importlib.util.spec_from_file_location("findings", ROOT / "analyses" / "findings.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_findings_writes_the_sections_and_figures_it_says(tmp_path):
    from PIL import Image

    f = _findings()
    docs = tmp_path / "docs"
    (docs / "figures").mkdir(parents=True)
    (docs / "figures" / f"{f.PREFIX}old-gone.png").write_bytes(b"x")  # from an earlier run: removed
    (docs / "figures" / "other.png").write_bytes(b"x")  # not the page's: kept
    studies = [synthetic("one", n_figures=5), synthetic("two", n_figures=1)]
    studies[0].headline.append("A second sentence, kept for the study's own section.")
    paths = f.write_findings(studies, docs / "findings.md", docs / "figures", "make findings")
    md = (docs / "findings.md").read_text()
    heads = [ln for ln in md.splitlines() if ln.startswith("## ")]
    assert heads == ["## What we learned", "## 1. Toy study one", "## 2. Toy study two", "## Claims that did not hold"]
    assert "`make findings`" in md.split("## What we learned")[0]
    learned = md.split("## What we learned")[1].split("## 1.")[0]
    for st in studies:  # the lead sentence and the tally up front, the whole headline in the study's section
        assert f"{st.headline[0]} (Tested hypotheses: {tally(st)}.)" in learned
    second = md.split("## 1. Toy study one")[1].split("## 2.")[0]
    assert studies[0].headline[1] in second and studies[0].headline[1] not in learned
    assert "Of 6 tested hypotheses, 2 are supported, 2 not supported and 2 inconclusive" in learned
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 4 + 1  # at most four figures per section
    pngs = sorted(p.name for p in (docs / "figures").glob(f"{f.PREFIX}*.png"))
    assert pngs == sorted(Path(x).name for x in links) and (docs / "figures" / "other.png").exists()
    assert {docs / x for x in links} == {p for p in paths if p.suffix == ".png"}
    for x in links:
        with Image.open(docs / x) as im:
            assert im.format == "PNG" and im.size[0] <= f.MAX_WIDTH_PX
    held_not = md.split("## Claims that did not hold")[1]
    assert held_not.count("- **not supported**") == 2 and held_not.count("- **inconclusive**") == 2
    assert "the effect is positive" not in held_not and "`toy --two b`" in held_not


def test_findings_runs_the_hint_study_on_the_kept_controls_sweep(monkeypatch):
    import probekit.report
    import probekit.studies

    f = _findings()
    calls = []
    monkeypatch.setattr(probekit.studies, "hint_study", lambda **kw: calls.append(("hint", kw)) or "hint")
    monkeypatch.setattr(probekit.report, "run_study", lambda name, **kw: calls.append((name, kw)) or name)
    assert f.run_studies("quick", 3) == [name for name, _, _ in f.QUESTIONS]
    hint = dict(calls)["hint"]
    assert hint == {"size": "quick", "seed": 3, "sweep": f.HINT_SWEEP}
    assert (ROOT / f.HINT_SWEEP / "sweep.json").exists()  # the archive is kept in the repository
    f.run_studies("quick", 3, hint_sweep="")
    assert calls[-len(f.QUESTIONS):] == [(n, {"size": "quick", "seed": 3}) for n, _, _ in f.QUESTIONS]


@pytest.mark.skipif(not shipped_models(), reason="no shipped models")
def test_findings_on_the_overview_study(tmp_path):
    f = _findings()
    st = run_study("overview")
    f.write_findings([st], tmp_path / "findings.md", tmp_path / "figures", "cmd")
    md = (tmp_path / "findings.md").read_text()
    assert "## 1. Which models extrapolate" in md
    assert (tmp_path / "figures" / f"{f.PREFIX}overview-accuracy-vs-length.png").exists()
    miss = md.split("## Claims that did not hold")[1]
    for v in st.verdicts:
        assert (v.hypothesis.statement in miss) == (v.verdict != "supported")
        assert v.hypothesis.statement in md and v.command in md


@pytest.mark.skipif(not shipped_models(), reason="no shipped models")
def test_overview_report_from_the_cli(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", "--out", str(out), "--quick", "--study", "overview"]) == 0
    page = (out / "report.html").read_text()
    captured = capsys.readouterr()
    assert re.search(r"report: 100%.*1/1", captured.err)  # the progress bar over studies, on stderr
    assert "report:" not in captured.out
    study = json.loads((out / "report_overview.json").read_text())
    p = _parse(page)
    assert p.verdicts == [v["verdict"] for v in study["verdicts"]] and len(p.verdicts) >= 5
    assert [f["caption"] for f in p.figures] == [f["caption"] for f in study["figures"]]
    assert all(f["alt"] for f in p.figures) and p.toc == ["#summary", "#study-overview", "#attention"]
    # a second report into the same folder is refused before any study runs, and the first one stays
    assert main(["report", "--out", str(out), "--quick", "--study", "overview"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "report.html").read_text() == page


@pytest.mark.slow
@pytest.mark.skipif(not shipped_models(), reason="no shipped models")
def test_quick_report_is_self_contained(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", "--out", str(out), "--quick"]) == 0
    page = (out / "report.html").read_text()
    p = _parse(page)
    assert p.toc == ["#summary"] + [f"#study-{slug(s)}" for s in STUDIES] + ["#attention"]
    assert {h[1:] for h in p.toc} <= p.ids
    # nothing is fetched: no external script, stylesheet or image
    assert not re.search(r"""(src|href)=["']https?://""", page)
    assert page.count("data:image/png;base64,") == len(p.figures) >= 4
    assert all(f["alt"] and f["caption"] for f in p.figures)
    verdicts = []
    for name in STUDIES:
        study = json.loads((out / f"report_{name}.json").read_text())
        assert all(c["command"] for c in study["claims"])
        verdicts += [v["verdict"] for v in study["verdicts"]]
    assert p.verdicts == verdicts
    assert sorted(x.name for x in out.iterdir()) == ["report.html"] + sorted(f"report_{s}.json" for s in STUDIES)
    err = capsys.readouterr().err
    assert all(f"[report] {s}: " in err for s in STUDIES) and f"{len(STUDIES)}/{len(STUDIES)}" in err


def test_report_bad_study(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path / "r"), "--study", "colour", "--quick"]) == 2
    assert "unknown study 'colour'" in capsys.readouterr().err
