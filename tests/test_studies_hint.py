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


def test_necessity_is_the_ablation_instrument_and_finds_the_planted_head(planted):
    """Each list's drop equals probekit.attribution.ablate_heads (mean ablation, the same reference lists) on that
    list; the control is the mean over its random sets; the planted head is necessary beyond random heads."""
    from probekit.attribution import ablate_heads

    sz = _sz(n=12, n_patch=16)
    samples, st = H._Samples(0, sz), Study("hint", "t")
    H._choose_heads(st, planted, samples, sz, 0, "cmd")
    assert planted.chosen == [(1, 2)]
    (r,) = H._necessity(planted, samples, sz, 0, 8, [[(1, 2)]])
    batch, ref = samples.get(planted.task, "batch", 8), samples.get(planted.task, "reference", 8)
    assert r["n_control"] == len(r["sets"]) == sz["n_random"] and all((1, 2) not in s for s in r["sets"])

    def drops(heads):
        return np.array([-float(ablate_heads(planted.model, batch.select([i]), heads, "mean", reference=ref,
                                             metric="acc", exact_match=False).values[2]) for i in range(batch.n)])

    np.testing.assert_allclose(r["drop"][:, 0], drops([(1, 2)]), atol=1e-6)
    np.testing.assert_allclose(r["control"][:, 0], np.mean([drops(s) for s in r["sets"]], 0), atol=1e-6)
    n = len(st.verdicts)
    H._necessity_stage(st, [planted], samples, sz, 0, "cmd")
    (v,) = st.verdicts[n:]
    assert "mean-ablating L1H2 lowers sort-step accuracy" in v.hypothesis.statement and v.verdict == "supported"
    assert v.baseline["clean accuracy"] == 1.0 and v.effect > 0.5 and v.baseline["random sets' drop"] < 0.05


def test_random_sets_are_the_unchosen_heads_of_the_same_count():
    heads = [(L, h) for L in range(2) for h in range(4)]
    chosen = [(0, 0), (0, 1), (1, 3)]
    every, pool = H._random_sets(heads, chosen, chosen, 50, 0)  # C(5, 3) = 10 <= 50: all of them
    assert pool == "unchosen heads" and len(every) == 10 and len({tuple(s) for s in every}) == 10
    assert all(len(s) == 3 and not set(s) & set(chosen) for s in every)
    some, _ = H._random_sets(heads, chosen, chosen, 4, 1)
    assert len(some) == 4 and all(s in every for s in some) and some == H._random_sets(heads, chosen, chosen, 4, 1)[0]
    five = heads[:5]  # three other heads cannot stand in for five: any five heads but these
    many, pool = H._random_sets(heads, five, five, 100, 0)
    assert pool == "heads drawn from all heads" and len(many) == 55 and five not in many


# ---------------------------------------------------------------------------- seeds from a sweep


BASE = {"name": "tiny", "model": {"n_layers": 1, "d_model": 16, "n_heads": 2, "n_ctx": 24, "positional": "none"},
        "task": {"name": "sorting", "n_values": 8, "default_length": 4},
        "train": {"steps": 10, "batch_size": 8, "lengths": [1, 4], "warmup_steps": 2}}
PLANTED = {  # exact match per seed at lengths 4 and 8
    "control": {4: [0.98, 0.97, 0.99], 8: [0.20, 0.25, 0.30]},
    "matched": {4: [0.95, 0.96, 0.94], 8: [0.40, 0.10, 0.55]},
    "hinted": {4: [0.99, 0.98, 0.99], 8: [0.80, 0.85, 0.90]},
}


def _finished_sweep(folder, planted: dict, missing: tuple[str, ...] = (), base: dict = BASE, lengths=(4, 8),
                    build=None):
    """A sweep folder whose jobs are finished: each job's model saved (probekit.model.save_model, as training
    would; untrained, or ``build(job, model_config)``), its metrics.json with the planted exact match (evaluate's
    EvalResult, as run_job writes it); then probekit.grid.run_sweep finds those jobs done and writes sweep.json
    and the summary itself."""
    from probekit.evaluate import EvalResult, wilson
    from probekit.grid import grid_from_dict, parse_run, run_sweep
    from probekit.io import write_json
    from probekit.model import build_model, save_model

    grid = grid_from_dict({"name": "hint-controls", "base": base, "seeds": [0, 1, 2],
                           "eval": {"lengths": list(lengths), "n": 100, "seed": 0},
                           "configs": [{"name": "control"}, {"name": "matched", "train": {"steps": 5}},
                                       {"name": "hinted", "train": {"objectives": {"sort": 1.0, "successor": 1.0}}}]})
    out = folder / "out"
    done = [job for job in grid.jobs(out) if job.id not in missing]
    for job in done:
        mcfg, task, tcfg = parse_run(job.run)
        model = build_model(mcfg) if build is None else build(job, mcfg)
        save_model(model, job.dir, task, train_config=tcfg.to_dict() | {"extra": {"train_seconds": 1.0}},
                   name=job.run["name"])
        recs = [{"length": L, "objective": "sort", "n": 100, "exact_match": em,
                 "exact_match_ci95": list(wilson(round(100 * em), 100))}
                for L, em in ((L, planted[job.config][L][job.seed]) for L in lengths)]
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

    assert r["control_budget"] == "equal steps" and rows["matched", 8]["control_budget"] == "equal sort batches"
    gaps = [v for v in st.verdicts if " points of exact match " in v.hypothesis.statement]

    def verdict(control, L):
        return next(v.verdict for v in gaps if f"beats {control} by" in v.hypothesis.statement
                    and f"at length {L}," in v.hypothesis.statement)

    assert verdict("control", 8) == "supported"  # gap 0.6, Welch interval well above 0.3
    assert verdict("control", 4) == "not supported"  # gap ~0.01
    assert verdict("matched", 8) == "inconclusive"  # gap 0.5, but the matched seeds spread widely
    assert len(gaps) == 4 and all(v.hypothesis.statement.startswith("the successor hint (hinted)") for v in gaps)
    assert "(matched: equal sort batches)" in next(v.hypothesis.statement for v in gaps if "matched" in v.hypothesis.statement)
    assert "not met" in st.headline[-1]  # against every control: the matched control leaves it open
    said = st.headline[0]  # the gap first, with its numbers at the lengths beyond training
    assert f"hinted minus control (equal steps, seeds 3/3) 8: {100 * r['gap']:+.1f} [{100 * r['lo']:+.1f}, " in said
    assert [f.key for f in st.figures] == ["hint_gap"]  # the gap over seeds, drawn even without shipped models
    ax = st.figures[0].make().axes[0]
    assert len(ax.get_lines()) >= 2 and "gap" in ax.get_ylabel()
    assert all(c["command"] for c in st.claims) and st.notes  # no shipped model asked for: said so


def test_seed_gap_from_the_sweeps_archive(tmp_path):
    """An archive of the sweep (records, no weights) gives the same exact-match gaps; nothing to measure a
    mechanism on, so no seed_mechanism rows."""
    from probekit.grid import archive

    out = _finished_sweep(tmp_path, PLANTED)
    assert len(archive(out, tmp_path / "arch")) == 9 and not list((tmp_path / "arch").rglob("*.safetensors"))
    full = H.hint_study(models=(), size="quick", sweep=out)
    kept = H.hint_study(models=(), size="quick", sweep=tmp_path / "arch")
    assert kept.tables["hint_gap"] == full.tables["hint_gap"] and len(full.tables["hint_gap"]) == 4
    assert "seed_mechanism" in full.tables and "seed_mechanism" not in kept.tables


def test_seed_gap_met_and_unfinished_jobs(tmp_path):
    planted = {**PLANTED, "matched": {4: [0.95, 0.96, 0.94], 8: [0.30, 0.35, 0.25]}}
    out = _finished_sweep(tmp_path, planted, missing=("hinted/seed2",))
    st = H.hint_study(models=(), size="quick", sweep=out)
    assert {r["seeds"] for r in st.tables["hint_gap"]} == {"2/3"}  # the unfinished seed is left out
    assert len(st.tables["seed_mechanism"]) == 8 and "hinted/seed2" not in {r["model"] for r in st.tables["seed_mechanism"]}
    assert "is met" in st.headline[-1]
    from probekit.tasks import ProbekitError

    with pytest.raises(ProbekitError, match="sweep.json"):
        H.hint_study(models=(), size="quick", sweep=tmp_path)


PLANTED_HEADS = {0: (1, 2), 1: (1, 0), 2: (0, 3)}  # the hinted seeds' lookup heads


@pytest.fixture(scope="module")
def lookup_sweep(tmp_path_factory):
    """A sweep whose hinted seeds are hand-built sorters with a known lookup head (a different one per seed) and
    whose controls are untrained models of the same architecture; hinted/seed2 is not finished."""
    from probekit.groundtruth import build_sort_lookup_model
    from probekit.model import model_config_of

    model, task = build_sort_lookup_model(n_values=16)
    base = {"name": "lookup", "model": {k: v for k, v in model_config_of(model).to_dict().items() if k != "seed"},
            "task": task.spec(), "train": {"steps": 10, "batch_size": 8, "lengths": [1, 8], "warmup_steps": 2}}
    ems = {c: {8: [0.9, 0.8, 0.85], 12: [0.5, 0.4, 0.6]} for c in ("control", "matched", "hinted")}

    def build(job, mcfg):
        if job.config != "hinted":
            return None
        return build_sort_lookup_model(n_values=16, head=PLANTED_HEADS[job.seed], seed=job.seed)[0]

    from probekit.model import build_model

    out = _finished_sweep(tmp_path_factory.mktemp("lookup"), ems, missing=("matched/seed2",), base=base,
                          lengths=(8, 12), build=lambda job, mcfg: build(job, mcfg) or build_model(mcfg))
    return out, H.hint_study(models=(), size="quick", sweep=out)


def test_seed_mechanisms_find_each_seeds_planted_head(lookup_sweep):
    """Every finished seed model is measured; patching chooses each hinted seed's own planted head, which is
    necessary (ablating it costs ~all accuracy, random heads ~none), copies (OV) and orders keys (QK)."""
    _, st = lookup_sweep
    rows = {r["model"]: r for r in st.tables["seed_mechanism"]}
    assert set(rows) == {f"{c}/seed{k}" for c in ("control", "hinted") for k in range(3)} | {"matched/seed0", "matched/seed1"}
    for k, head in PLANTED_HEADS.items():
        r = rows[f"hinted/seed{k}"]
        assert r["chosen"] == H._label(head) and r["top_share"] > 0.9 and r["concentration"] == 1.0
        assert r["excess_drop"] > 0.6 and r["ov_copy_top"] == 1.0 and r["qk_succ_above"] == 1.0
    assert all(rows[f"control/seed{k}"]["ov_copy_top"] < 0.5 for k in range(3))


@pytest.mark.filterwarnings("ignore:Precision loss")  # scipy, on groups of identical values (all seeds copy: 1.0)
def test_seed_mechanism_gaps_are_welch_intervals_over_seeds(lookup_sweep):
    """Hinted against each control, per measure: the Welch t interval of the seeds' values (scipy), verdicts as
    planted: the planted lookup is necessary, copies and orders keys far beyond untrained controls."""
    from scipy.stats import ttest_ind

    _, st = lookup_sweep
    rows = st.tables["seed_mechanism"]
    seeds = [v for v in st.verdicts if v.hypothesis.statement.startswith("over seeds, the successor hint (hinted)")]
    assert len(seeds) == 2 * (len(H.SEED_MEASURES) - 1)  # untrained controls lose no accuracy: no concentration
    assert sum("concentration is undefined" in n for n in st.notes) == 2
    for v in seeds:
        key = v.hypothesis.statistic.split(" difference")[0]
        control = v.hypothesis.statement.split(" against ")[-1].split(" (")[0]
        a = [r[key] for r in rows if r["config"] == "hinted"]
        b = [r[key] for r in rows if r["config"] == control]
        assert (len(a), len(b)) == (3, 3 if control == "control" else 2)
        assert v.effect == pytest.approx(np.mean(a) - np.mean(b))
        if np.std(a) + np.std(b) > 0:
            ci = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
            assert v.interval == pytest.approx((ci.low, ci.high))
        if key in ("excess_drop", "qk_succ_above", "ov_copy_top"):
            assert v.verdict == "supported", v.hypothesis.statement
    budgets = {v.hypothesis.statement.split(" against ")[-1] for v in seeds}
    assert budgets == {"control (equal steps)", "matched (equal sort batches)"}
    assert "mechanism measures" in st.headline[-1]


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
