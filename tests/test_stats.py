"""probekit.stats: interval coverage, paired bootstrap, verdict truth table, baselines by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from probekit import evaluate, stats
from probekit.stats import Hypothesis, judge
from probekit.tasks import ProbekitError


def test_bootstrap_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(0)
    n_sets, true_mean = 200, 1.0  # exponential(1): skewed, so coverage is a real test
    hits = 0
    for i in range(n_sets):
        x = rng.exponential(true_mean, size=80)
        _, lo, hi = stats.bootstrap_ci(x, n_boot=500, seed=i)
        hits += lo <= true_mean <= hi
    # percentile intervals undercover slightly on skewed data; binomial sd at 0.95 and 200 sets is 1.5 %
    sd = math.sqrt(0.95 * 0.05 / n_sets)
    assert 0.95 - 3.5 * sd - 0.02 <= hits / n_sets <= 0.95 + 3.5 * sd


def test_bootstrap_is_deterministic_given_seed_and_checks_input():
    x = np.arange(20.0)
    assert stats.bootstrap_ci(x, seed=3) == stats.bootstrap_ci(x, seed=3)
    assert stats.bootstrap_ci(x, seed=3) != stats.bootstrap_ci(x, seed=4)
    est, lo, hi = stats.bootstrap_ci(x, statistic=np.median)
    assert est == 9.5 and lo < est < hi
    with pytest.raises(ProbekitError):
        stats.bootstrap_ci([1.0])
    with pytest.raises(ProbekitError):
        stats.bootstrap_ci(x, level=95)


def test_cluster_bootstrap_widens_for_correlated_rows():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(40), 25)  # 40 clusters of 25 rows sharing a cluster effect
    x = rng.normal(size=40)[groups] + rng.normal(scale=0.1, size=groups.size)
    _, lo, hi = stats.bootstrap_ci(x, n_boot=500)
    _, glo, ghi = stats.bootstrap_ci(x, n_boot=500, groups=groups)
    # the naive interval treats 1000 rows as independent; the cluster one sees about 40 (5x wider)
    assert (ghi - glo) > 3 * (hi - lo)
    with pytest.raises(ProbekitError):
        stats.bootstrap_ci(x, groups=groups[:10])
    with pytest.raises(ProbekitError):
        stats.bootstrap_ci(x, groups=np.zeros(x.size))


def test_paired_bootstrap_identical_samples_gives_zero_and_shift_is_found():
    rng = np.random.default_rng(1)
    a = rng.normal(size=100)
    d, lo, hi = stats.paired_bootstrap(a, a.copy())
    assert d == 0.0 and lo == 0.0 and hi == 0.0
    b = a - 0.5 + rng.normal(scale=0.1, size=100)  # same examples, shifted
    d, lo, hi = stats.paired_bootstrap(a, b)
    assert lo < 0.5 < hi and hi - lo < 0.1  # pairing removes the between-example spread (sd 1)
    _, ulo, uhi = stats.bootstrap_ci(a)
    assert hi - lo < (uhi - ulo) / 3
    with pytest.raises(ProbekitError):
        stats.paired_bootstrap(a, a[:50])


def test_two_sample_bootstrap_covers_a_known_difference_and_respects_groups():
    rng = np.random.default_rng(3)
    hits = 0
    for i in range(100):
        a, b = rng.normal(1.0, 1.0, size=60), rng.normal(0.0, 2.0, size=90)
        d, lo, hi = stats.two_sample_bootstrap(a, b, n_boot=400, seed=i)
        assert d == pytest.approx(a.mean() - b.mean())
        hits += lo <= 1.0 <= hi
    assert hits >= 88  # about 95 of 100; binomial sd 2.2
    groups = np.repeat(np.arange(20), 10)
    a = rng.normal(size=20)[groups] + rng.normal(scale=0.1, size=200)
    _, lo, hi = stats.two_sample_bootstrap(a, a[::-1].copy(), n_boot=300)
    _, glo, ghi = stats.two_sample_bootstrap(a, a[::-1].copy(), n_boot=300, groups_a=groups, groups_b=groups[::-1])
    assert (ghi - glo) > 2 * (hi - lo)


def test_welch_interval_equals_scipy():
    from scipy.stats import ttest_ind

    a, b = [0.62, 0.70, 0.55], [0.20, 0.31, 0.24, 0.18]
    d, lo, hi, df = stats.welch_interval(a, b)
    ci = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert d == pytest.approx(np.mean(a) - np.mean(b))
    assert (lo, hi) == pytest.approx((ci.low, ci.high))
    assert df == pytest.approx(ttest_ind(a, b, equal_var=False).df)
    assert stats.welch_interval([0.0, 0.0], [0.0, 0.0, 0.0])[:3] == (0.0, 0.0, 0.0)
    with pytest.raises(ProbekitError, match="at least 2"):
        stats.welch_interval([0.5], [0.1, 0.2])


def test_two_sample_bootstrap_width_is_the_standard_error_of_the_difference():
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 1.0, size=200), rng.normal(0.0, 1.0, size=50)  # different sizes: not paired
    d, lo, hi = stats.two_sample_bootstrap(a, b, n_boot=1000)
    assert d == pytest.approx(a.mean() - b.mean())
    se = math.sqrt(1 / 200 + 1 / 50)  # the difference's standard error
    assert lo < 1.0 < hi and (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.25)
    assert stats.two_sample_bootstrap(a, b, seed=1) == stats.two_sample_bootstrap(a, b, seed=1)
    with pytest.raises(ProbekitError):
        stats.two_sample_bootstrap(a, b[:1])


def test_ratio_of_means_is_the_share_of_the_gap():
    rows = np.array([[2.0, 4.0, 0.0], [1.0, 2.0, 1.0]])  # x, hi, lo: means 1.5, 3, 0.5
    assert stats.ratio_of_means(rows) == pytest.approx((1.5 - 0.5) / (3 - 0.5))
    assert math.isnan(stats.ratio_of_means(np.array([[1.0, 2.0, 2.0]])))  # no gap
    # bootstrapped over rows it behaves as a statistic of whole examples
    rng = np.random.default_rng(0)
    hi_, lo_ = rng.normal(5, 1, 300), rng.normal(0, 1, 300)
    x = lo_ + 0.3 * (hi_ - lo_)
    est, lo, hi = stats.bootstrap_ci(np.stack([x, hi_, lo_], 1), stats.ratio_of_means, n_boot=500)
    assert est == pytest.approx(0.3) and lo < 0.3 < hi


def test_auc_equals_scikit_learn_with_ties_and_weights():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    s = rng.integers(0, 6, size=300).astype(float)  # few distinct scores: many ties
    y = rng.random(300) < 0.2 + 0.1 * s
    w = rng.integers(0, 4, size=300)  # a bootstrap resample's multiplicities, zeros included
    assert stats.auc(s, y) == pytest.approx(roc_auc_score(y, s))
    assert stats.auc(s, y, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w))
    rows = rng.integers(0, 3, size=(5, 300))  # one AUC per resample, as from separate calls
    assert stats.auc(s, y, rows) == pytest.approx([roc_auc_score(y, s, sample_weight=r) for r in rows])
    assert stats.auc([0.1, 0.9, 0.5], [0, 1, 0]) == 1.0 and stats.auc([0.9, 0.1], [0, 1]) == 0.0
    assert math.isnan(stats.auc([0.1, 0.2], [1, 1]))
    with pytest.raises(ProbekitError):
        stats.auc([0.1, 0.2], [1, 0, 1])
    with pytest.raises(ProbekitError):
        stats.auc([0.1, 0.2], [1, 0], np.ones((2, 3)))


@pytest.mark.parametrize("op,threshold,interval,expected", [
    (">", 0.0, (0.1, 0.4), "supported"),
    (">", 0.0, (-0.2, -0.1), "not supported"),
    (">", 0.0, (-0.1, 0.2), "inconclusive"),
    (">", 0.0, (0.0, 0.2), "inconclusive"),  # 0 does not satisfy "> 0"
    (">=", 0.3, (0.3, 0.5), "supported"),
    (">=", 0.3, (0.1, 0.29), "not supported"),
    (">=", 0.3, (0.2, 0.4), "inconclusive"),
    ("<", 0.05, (0.01, 0.04), "supported"),
    ("<", 0.05, (0.05, 0.2), "not supported"),
    ("<=", 0.05, (0.0, 0.05), "supported"),
    ("<=", 0.05, (0.04, 0.06), "inconclusive"),
    (">", 0.0, (float("nan"), 1.0), "inconclusive"),
])
def test_verdict_truth_table(op, threshold, interval, expected):
    h = stats.Hypothesis("the head carries the lookup", "effect", op, threshold)
    v = stats.judge(h, effect=float(np.nanmean(interval)), interval=interval, command="probekit x", n=10)
    assert v.verdict == expected
    back = stats.Verdict.from_json(v.to_json())
    assert back.verdict == expected and back.hypothesis == h and back.command == "probekit x"


def test_hypothesis_and_verdict_refuse_bad_input():
    with pytest.raises(ProbekitError):
        stats.Hypothesis("s", "effect", "=>", 0.0)
    h = stats.Hypothesis("s", "effect", ">", 0.0)
    with pytest.raises(ProbekitError):
        stats.judge(h, 0.1, (0.0, 0.2), command="")


def test_token_baseline_against_hand_computation():
    tok_tr = [1, 1, 1, 2, 2, 3]
    y_tr = ["a", "a", "b", "b", "b", "c"]
    # table: 1->a, 2->b, 3->c; unseen 4 -> train majority (b: 3 of 6)
    tok_te = [1, 2, 3, 4, 1]
    y_te = ["a", "a", "c", "b", "b"]
    res = stats.token_baseline(tok_tr, y_tr, tok_te, y_te)
    assert res["accuracy"] == pytest.approx(3 / 5)  # right: 1->a, 3->c, 4->b
    assert res["n_unseen"] == 1 and res["table"] == {1: "a", 2: "b", 3: "c"}
    assert res["ci95"] == list(evaluate.wilson(3, 5))
    maj = stats.majority_baseline(y_tr, y_te)
    assert maj["label"] == "b" and maj["accuracy"] == pytest.approx(2 / 5)


def test_wilson_is_the_evaluate_one():
    assert stats.wilson is evaluate.wilson


def test_chance_normalised_attention_by_hand():
    # two queries of type "new": 4 visible keys, one target; one "repeat" query: 2 visible keys, 2 targets
    A = np.array([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    tgt = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]], dtype=bool)
    res = stats.chance_normalised_attention(A, tgt, ["new", "new", "repeat"], n_boot=50)
    assert res["new"]["chance"] == pytest.approx(0.25)
    assert res["new"]["ratio"] == pytest.approx((0.7 / 0.25 + 1.0) / 2)
    rep = res["repeat"]  # one query: no interval
    assert (rep["n"], rep["mass"], rep["chance"], rep["ratio"]) == (1, 1.0, 1.0, 1.0)
    assert all(np.isnan(v) for v in rep["ratio_ci95"])
    # by groups: the two "new" queries are one example, so no interval can be drawn from one group ...
    one = stats.chance_normalised_attention(A, tgt, ["new", "new", "repeat"], n_boot=50, groups=[0, 0, 1])
    assert one["new"]["ratio"] == res["new"]["ratio"] and all(np.isnan(v) for v in one["new"]["ratio_ci95"])
    # ... and resampling whole examples widens the interval when the queries of an example agree
    rng = np.random.default_rng(0)
    ex = np.repeat(np.arange(30), 8)
    mass = np.clip(rng.uniform(0.1, 0.9, 30)[ex] + rng.normal(scale=0.01, size=ex.size), 0, 1)
    A2 = np.stack([mass, 1 - mass], 1)
    T2 = np.stack([np.ones_like(ex), np.zeros_like(ex)], 1).astype(bool)
    flat = stats.chance_normalised_attention(A2, T2, ["new"] * ex.size, n_boot=300)["new"]["ratio_ci95"]
    grp = stats.chance_normalised_attention(A2, T2, ["new"] * ex.size, n_boot=300, groups=ex)["new"]["ratio_ci95"]
    assert grp[1] - grp[0] > 2 * (flat[1] - flat[0])
    with pytest.raises(ProbekitError, match="groups"):
        stats.chance_normalised_attention(A, tgt, ["new", "new", "repeat"], groups=[0, 1])


def test_study_records_a_tested_hypothesis_and_a_captioned_figure():
    """Study.test keeps the verdict judge() gives and states it with its interval; figures need captions."""
    from probekit.studies import Study

    st = Study("s", "S")
    h = Hypothesis("the head restores the carry", "restoration", ">", 0.3)
    v = st.test(h, 0.71, (0.6, 0.8), "probekit report --study s", {"random head": 0.02}, n=100)
    assert v == judge(h, 0.71, (0.6, 0.8), "probekit report --study s", {"random head": 0.02}, 100)
    assert st.verdicts == [v] and v.verdict == "supported"
    assert st.claims[0]["text"].endswith("[0.6, 0.8]; random head 0.02. Verdict: supported.")
    assert st.claims[0]["verdict"] == "supported"  # the mark the report reads, not the text
    st.claim("a measurement", "c")
    assert "verdict" not in st.claims[-1]
    assert st.test(h, 0.35, (0.2, 0.5), "c").verdict == "inconclusive"
    with pytest.raises(ProbekitError, match="caption"):
        st.figure("f", lambda: None, "", "alt")
    st.figure("f", lambda: None, "What it shows.", "A line plot.")
    assert json.loads(st.to_json())["figures"] == [{"key": "f", "caption": "What it shows.", "alt": "A line plot."}]
