"""`probekit report --quick` on the shipped models: a self-contained HTML page with every study."""

from __future__ import annotations

import json
import re

import pytest

from probekit.cli import main
from probekit.model import shipped_models


@pytest.mark.skipif(not shipped_models(), reason="no shipped models")
def test_quick_report_is_self_contained(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", "--out", str(out), "--quick"]) == 0
    page = (out / "report.html").read_text()
    assert "<h2>Extrapolation overview</h2>" in page and "Hint mechanism" in page and "Carry mechanism" in page
    # nothing is fetched: no external script, stylesheet or image
    assert not re.search(r"""(src|href)=["']https?://""", page)
    assert page.count("data:image/png;base64,") >= 2
    for name in ("overview", "hint", "carry"):
        study = json.loads((out / f"report_{name}.json").read_text())
        assert all(c["command"] for c in study["claims"])
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report_carry.json", "report_hint.json",
                                                     "report_overview.json"]
    printed = capsys.readouterr().out
    assert "[report] hint study" in printed
    # a second report into the same folder is refused before any study runs, and the first one stays
    assert main(["report", "--out", str(out), "--quick"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "report.html").read_text() == page


def test_report_bad_study(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path / "r"), "--study", "colour", "--quick"]) == 2
    assert "unknown study 'colour'" in capsys.readouterr().err
