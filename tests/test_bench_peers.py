"""`benchmarks/bench_peers.py --quick`: probekit, TransformerLens, nnsight and pyvene give the same patching sweep."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_quick_run_agrees_across_the_four_libraries():
    pytest.importorskip("nnsight")
    pytest.importorskip("pyvene")
    import bench_peers

    res = bench_peers.run(quick=True)
    for site, patches in (("z", 2 * 13 * 4), ("attn_out", 2 * 13)):
        row = res[site]
        assert row["patches"] == patches
        assert row["metric_max"] - row["metric_min"] > 0.1  # the patches move the metric: agreement is not vacuous
        for peer in bench_peers.PEERS:
            assert row[f"max_abs_diff_{peer}"] <= 1e-5, (site, peer, row)
            assert row[f"{peer}_s"] > 0 and row[f"ratio_vs_{peer}"] > 0
        assert row["agree"]
    native = res["native_vs_transformer_lens"]
    assert native["max_abs_diff"] <= 1e-4 and native["ratio"] > 0
