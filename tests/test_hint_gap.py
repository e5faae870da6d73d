import json
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "analyses" / "zoo" / "results"


def _seed_mean(grid, config, length):
    vals = [next(r["exact_match"] for r in json.loads(p.read_text())["records"] if r["length"] == length)
            for p in sorted((RESULTS / grid / config).glob("seed*/metrics.json"))]
    return sum(vals) / len(vals), len(vals)


def test_hint_gap_differences_are_the_archived_seed_means(capsys):
    main = runpy.run_path(str(ROOT / "analyses" / "hint_gap.py"))["main"]
    main(["--length", "50"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| w")]
    assert rows, "no hinted configuration with three seeds"
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        hinted, k = _seed_mean("sort-hint-grid", cells[0], 50)
        control, kc = _seed_mean("sort-hint-controls", cells[1], 50)
        assert k >= 3 and kc >= 3
        assert float(cells[4].split()[0]) == pytest.approx(100 * (hinted - control), abs=0.051)


def test_hint_gap_refuses_a_length_neither_grid_evaluates(capsys):
    main = runpy.run_path(str(ROOT / "analyses" / "hint_gap.py"))["main"]
    with pytest.raises(SystemExit) as e:
        main(["--length", "30"])
    assert e.value.code == 2 and "expected one of [20, 50, 100]" in capsys.readouterr().err
