"""analyses/run_study.py: the one study runner (a script, run as a user would run it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from probekit.model import shipped_models
from probekit.report import run_study

SCRIPT = Path(__file__).resolve().parent.parent / "analyses" / "run_study.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_run_study_writes_what_the_library_computes(tmp_path):
    if not shipped_models():
        pytest.skip("no shipped models in models/")
    p = _run("overview", "--size", "quick", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr
    study = run_study("overview")
    assert json.loads((tmp_path / "overview.json").read_text())["claims"] == study.claims
    assert study.summary() in p.stdout
    written = sorted(f.name for f in tmp_path.iterdir())
    assert {"overview.json", "overview_claims.md"} <= set(written) and any(f.endswith(".png") for f in written)
    assert all(f"wrote {tmp_path / f}" in p.stdout for f in written)


def test_run_study_refuses_an_unknown_study_or_size(tmp_path):
    for args in (["nope"], ["carry", "--size", "huge"]):
        p = _run(*args, "--out", str(tmp_path))
        assert p.returncode == 2 and "invalid choice" in p.stderr, args
    assert not list(tmp_path.iterdir())
