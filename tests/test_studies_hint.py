"""The hint study: its stages on a model with a planted lookup head (they must find it), the seed gap on a
synthetic sweep folder (Welch intervals against scipy, verdicts as planted), and the quick study on the
shipped sorters (verdicts follow from their intervals, chosen heads follow the stated rule)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from probekit.model import shipped_models
from probekit.stats import decide
from probekit.studies import Study
from probekit.studies import hint as H


def _sz(**over) -> dict:
    return H._size("quick") | H.EXTRA["quick"] | over


@pytest.fixture(scope="module")
def planted():
    """The hand-built sorter whose lookup is head L1H2 alone (probekit.groundtruth), as the study's model record."""
    from probekit.groundtruth import build_sort_lookup_model

    model, task = build_sort_lookup_model(n_values=16, head=(1, 2))
    return H._Model("planted", model, task, train_len=8, lengths=[8], hints=[])


def test_stages_find_the_planted_lookup_head(planted):
    """Patching, the QK circuit, the head interchange and the attention all single out the planted head."""
    st, sz, samples = Study("hint", "t"), _sz(n_patch=24, n_das=64), H._Samples(0, _sz(n_patch=24, n_das=64))
    H._choose_heads(st, planted, samples, sz, 0, "cmd")
    assert planted.chosen == [(1, 2)]
    single, joint = st.verdicts
    assert single.verdict == "supported" and single.effect > 0.9  # L1H2 restores all, the runner-up ~0
    assert joint.verdict == "supported" and joint.effect == pytest.approx(1.0, abs=0.02)
    H._circuit_stage(st, [planted], sz, 0, "cmd")
    qk = st.verdicts[-1]
    assert "L1H2" in qk.hypothesis.statement and qk.verdict == "supported" and qk.effect > 0.95
    H._das_stage(st, [planted], samples, sz, 0, "cmd")
    head = next(v for v in st.verdicts if "output carries the next value" in v.hypothesis.statement)
    assert head.verdict == "supported" and head.baseline["IIA"] > 0.9
    H._attention_stage(st, [planted], samples, sz, 0, "cmd")
    rows = [r for r in st.tables["attention"] if r["head"] == "L1H2"]
    assert {r["step"] for r in rows} == {"new"}  # distinct values: no repeat steps
    assert rows[0]["mass"] > 0.9 and rows[0]["chance"] == pytest.approx(1 / 8)


def test_patching_shares_are_the_patching_instruments(planted):
    """The study's per-head shares (ratio of per-example means) equal probekit.patching.sweep on the same pairs."""
    from probekit.patching import sweep

    sz = _sz(n_patch=16)
    samples = H._Samples(3, sz)
    st = Study("hint", "t")
    H._choose_heads(st, planted, samples, sz, 3, "cmd")
    ref = sweep(planted.model, samples.get(planted.task, "test", 8), "z", by_pos=False, metric="logit-diff")
    torch.testing.assert_close(st.results["planted/patch_z_len8"].values, ref.values, atol=1e-4, rtol=1e-4)
    for r in st.tables["lookup_patching"]:
        assert r["lo"] <= r["restored"] <= r["hi"] or abs(r["hi"] - r["lo"]) < 1e-6


def test_quick_size_keeps_the_baseline_and_the_first_hinted_model():
    ms = [H._Model(n, None, None, 20, [20], h) for n, h in (("hint-a", ["successor"]), ("base", []),
                                                             ("hint-b", ["predecessor"]))]
    st = Study("hint", "t")
    assert [m.name for m in H._keep(st, ms, 2, "quick")] == ["hint-a", "base"]  # in the order given
    assert st.notes == ["quick size: only hint-a, base (the other models at --size default)"]
    assert H._keep(st, ms, None, "default") == ms and H._keep(st, ms[:2], 2, "quick") == ms[:2]
    assert len(st.notes) == 1


# ---------------------------------------------------------------------------- seeds from a sweep


BASE = {"name": "tiny", "model": {"n_layers": 1, "d_model": 16, "n_heads": 2, "n_ctx": 24, "positional": "none"},
        "task": {"name": "sorting", "n_values": 8, "default_length": 4},
        "train": {"steps": 10, "batch_size": 8, "lengths": [1, 4], "warmup_steps": 2}}
PLANTED = {  # exact match per seed at lengths 4 and 8
    "control": {4: [0.98, 0.97, 0.99], 8: [0.20, 0.25, 0.30]},
    "matched": {4: [0.95, 0.96, 0.94], 8: [0.40, 0.10, 0.55]},
    "hinted": {4: [0.99, 0.98, 0.99], 8: [0.80, 0.85, 0.90]},
}


def _finished_sweep(folder, planted: dict, missing: tuple[str, ...] = ()):
    """A sweep folder whose jobs are finished: each job's model saved untrained (probekit.model.save_model, as
    training would), its metrics.json with the planted exact match (evaluate's EvalResult, as run_job writes
    it); then probekit.grid.run_sweep finds those jobs done and writes sweep.json and the summary itself."""
    from probekit.evaluate import EvalResult, wilson
    from probekit.grid import grid_from_dict, parse_run, run_sweep
    from probekit.io import write_json
    from probekit.model import build_model, save_model

    grid = grid_from_dict({"name": "hint-controls", "base": BASE, "seeds": [0, 1, 2],
                           "eval": {"lengths": [4, 8], "n": 100, "seed": 0},
                           "configs": [{"name": "control"}, {"name": "matched", "train": {"steps": 5}},
                                       {"name": "hinted", "train": {"objectives": {"sort": 1.0, "successor": 1.0}}}]})
    out = folder / "out"
    done = [job for job in grid.jobs(out) if job.id not in missing]
    for job in done:
        mcfg, task, tcfg = parse_run(job.run)
        save_model(build_model(mcfg), job.dir, task, train_config=tcfg.to_dict() | {"extra": {"train_seconds": 1.0}},
                   name=job.run["name"])
        recs = [{"length": L, "objective": "sort", "n": 100, "exact_match": em,
                 "exact_match_ci95": list(wilson(round(100 * em), 100))}
                for L, em in ((L, planted[job.config][L][job.seed]) for L in (4, 8))]
        write_json(f"{job.dir}/metrics.json", json.loads(EvalResult(job.run["name"], task.spec(), 0, recs).to_json())
                   | {"command": "probekit eval"})
    run = run_sweep(grid, out, jobs=[job.id for job in done], progress=False)  # the missing jobs stay unstarted
    assert not run.ran and (out / "summary.csv").exists() and (out / "sweep.json").exists()
    return out


def test_seed_gap_from_a_synthetic_sweep(tmp_path):
    from scipy.stats import ttest_ind

    out = _finished_sweep(tmp_path, PLANTED)
    st = H.hint_study(models=(), size="quick", sweep=out)
    rows = {(r["control"], r["length"]): r for r in st.tables["hint_gap"]}
    assert set(rows) == {("control", 4), ("control", 8), ("matched", 4), ("matched", 8)}
    r = rows["control", 8]
    ci = ttest_ind(PLANTED["hinted"][8], PLANTED["control"][8], equal_var=False).confidence_interval(0.95)
    assert r["gap"] == pytest.approx(np.mean(PLANTED["hinted"][8]) - np.mean(PLANTED["control"][8]))
    assert (r["lo"], r["hi"]) == pytest.approx((ci.low, ci.high)) and r["intervals_apart"]

    def verdict(control, L):
        return next(v.verdict for v in st.verdicts if f"beats {control} by" in v.hypothesis.statement
                    and f"at length {L}," in v.hypothesis.statement)

    assert verdict("control", 8) == "supported"  # gap 0.6, Welch interval well above 0.3
    assert verdict("control", 4) == "not supported"  # gap ~0.01
    assert verdict("matched", 8) == "inconclusive"  # gap 0.5, but the matched seeds spread widely
    assert all(v.hypothesis.statement.startswith("the successor hint (hinted)") for v in st.verdicts)
    assert "not met" in st.headline[-1]  # against every control: the matched control leaves it open
    assert all(c["command"] for c in st.claims) and st.notes  # no shipped model asked for: said so


def test_seed_gap_met_and_unfinished_jobs(tmp_path):
    planted = {**PLANTED, "matched": {4: [0.95, 0.96, 0.94], 8: [0.30, 0.35, 0.25]}}
    out = _finished_sweep(tmp_path, planted, missing=("hinted/seed2",))
    st = H.hint_study(models=(), size="quick", sweep=out)
    assert {r["seeds"] for r in st.tables["hint_gap"]} == {"2/3"}  # the unfinished seed is left out
    assert "is met" in st.headline[-1]
    from probekit.tasks import ProbekitError

    with pytest.raises(ProbekitError, match="sweep.json"):
        H.hint_study(models=(), size="quick", sweep=tmp_path)


# ---------------------------------------------------------------------------- the shipped sorters


@pytest.mark.skipif(not {"sort-baseline", "sort-successor"} <= set(shipped_models()), reason="sorters not shipped")
def test_quick_study_on_the_shipped_sorters():
    import matplotlib.pyplot as plt

    st = H.hint_study(models=("sort-baseline", "sort-successor"), lengths=(10, 20, 50), size="quick")
    assert st.verdicts and 2 <= len(st.headline) <= 4
    for v in st.verdicts:  # every verdict follows from its own interval
        assert v.verdict == decide(v.hypothesis, v.interval) and v.command
    chosen = {}
    for r in st.tables["lookup_patching"]:
        if r["selection_lo"] is not None:
            chosen.setdefault(r["model"], []).append((r["selection_lo"] > H.LOOKUP_SHARE, r["chosen"], r["head"]))
    for name, rows in chosen.items():  # chosen = the heads whose selection interval clears the threshold
        assert all(ok == c for ok, c, _ in rows) or sum(c for _, c, _ in rows) == 1, name
    hint = [v for v in st.verdicts if v.hypothesis.statement.startswith("the hint makes")]
    assert hint and all("sort-successor" in v.hypothesis.statistic for v in hint)
    assert {r["length"] for r in st.tables["probes"]} == {10, 20, 50}  # held out at the training length too
    assert all(r["token_only"] > r["majority"] for r in st.tables["probes"] if r["length"] == 50)
    assert {r["step"] for r in st.tables["attention"]} == {"new", "repeat"}
    assert len(st.figures) <= 4
    for f in st.figures:
        fig = f.make()
        assert fig.axes and f.caption and f.alt
        plt.close(fig)
    json.loads(st.to_json())
