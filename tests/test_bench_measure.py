"""The benchmark memory harness sees what a call allocates, and reports nothing it cannot measure."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import measure  # noqa: E402


@pytest.mark.parametrize("kind,mib", [("torch", 200), ("numpy", 50)])
def test_large_allocation_is_measured_in_a_fresh_process(kind, mib):
    res = measure.measure_fresh("measure:prepare_alloc", {"kind": kind, "mib": mib}, timeout=120)
    assert res["peak_rss_mib"] == pytest.approx(mib, rel=0.10)
    if kind == "numpy":  # numpy buffers are traced by tracemalloc, torch's are not
        assert res["python_heap_peak_mib"] == pytest.approx(mib, rel=0.10)
    else:
        assert res["python_heap_peak_mib"] is None and "resolution" in res["python_heap_note"]
    assert res["seconds"] > 0


def test_noop_reports_no_figure():
    res = measure.measure_fresh("measure:prepare_alloc", {"kind": "none"}, timeout=120)
    assert res["peak_rss_mib"] is None and "below" in res["peak_rss_note"]
    assert res["python_heap_peak_mib"] is None


def test_peak_is_reset_between_calls_in_one_process():
    # the second call reuses nothing the first freed: both are seen in full (the warm-up trap)
    fn = measure.prepare_alloc("torch", 100)
    peaks = [measure.peak_rss(fn)[2] / 2**20 for _ in range(2)]
    assert peaks == [pytest.approx(100, rel=0.10)] * 2


def test_resolution_rule():
    assert measure.mib_or_none(0.5 * 2**20) == (None, f"below the {measure.RESOLUTION_MIB:g} MiB resolution of "
                                                      "the resident-set method")
    assert measure.mib_or_none(3 * 2**20) == (3.0, None)
