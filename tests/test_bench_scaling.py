"""The scaling benchmark: quick mode covers every instrument with a fitted exponent per curve; the work counts."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scaling  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    assert scaling.main(["--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "scaling.json").read_text()), (out / "performance.md").read_text()


def test_quick_run_has_every_instrument_and_an_exponent_per_curve(quick_run):
    out, res, md = quick_run
    assert {c["instrument"] for c in res["curves"]} == set(scaling.INSTRUMENTS)
    for c in res["curves"]:
        impls = scaling.INSTRUMENTS[c["instrument"]][0]
        assert len(c["points"]) >= 2 and c["fit"]["x_range"][0] < c["fit"]["x_range"][1]
        for impl in impls:
            assert isinstance(c["fit"][impl]["time_exponent"], float), (c["instrument"], c["axis"], impl)
            for p in c["points"]:
                a = p["arms"][impl]
                assert a["seconds_median"] > 0
                assert a["peak_rss_mib"] is None or a["peak_rss_mib"] >= 1.0  # never a figure under the resolution
        if len(impls) > 1:
            assert all(p["ratio_peer_over_probekit"] > 0 for p in c["points"])
    for ins in scaling.INSTRUMENTS:
        assert (out / "figures" / f"{ins}.png").stat().st_size > 10_000
        assert f"figures/{ins}.png" in md
    assert res["machine"]["cores_usable"] >= 1 and res["matmul"]["gflops"] > 0


def test_peers_agree_and_work_is_measured_against_the_machine(quick_run):
    _, res, md = quick_run
    for c in res["curves"]:
        if c["instrument"] == "patching":  # same sweep, same numbers as transformer_lens.patching
            assert max(p["info"]["max_abs_diff_probekit_vs_peer"] for p in c["points"]) < 1e-4
        if c["instrument"] == "decode":  # the cached decode writes the same tokens
            assert all(p["info"]["max_abs_diff_probekit_vs_peer"] == 0 for p in c["points"])
        if c["instrument"] in ("patching", "train_step"):
            for p in c["points"]:
                for a in p["arms"].values():
                    assert 0 < a["fraction_of_matmul"] == pytest.approx(a["gflops_achieved"] / res["matmul"]["gflops"],
                                                                        rel=0.01, abs=1e-4)
    assert "Distance to the limit" in md and "fraction of matmul" in md


def test_slope_recovers_a_power_law_and_refuses_missing_points():
    xs = [1, 2, 4, 8]
    assert scaling.slope(xs, [3 * x**1.5 for x in xs]) == pytest.approx(1.5)
    assert scaling.slope(xs, [1.0, None, 2.0, 3.0]) is None


def _cfg(**kw):
    from probekit.model import ModelConfig

    return ModelConfig(**{"n_layers": 2, "d_model": 8, "n_heads": 2, "d_vocab": 5, "n_ctx": 16, **kw})


def test_patch_work_by_hand():
    cfg = _cfg()  # d 8, 2 heads of 4, d_mlp 32, vocab 5
    o_head, mlp, unembed = 4 * 8, 2 * 8 * 32, 8 * 5
    # last layer, at the read position: the head's W_O term, the MLP, the logits there
    assert scaling.z_patch_macs(cfg, T=6, read=[4], layer=1, pos=4) == o_head + mlp + unembed
    # last layer elsewhere, or any layer after the last read position: nothing to recompute
    assert scaling.z_patch_macs(cfg, T=6, read=[4], layer=1, pos=2) == 0
    assert scaling.z_patch_macs(cfg, T=6, read=[4], layer=0, pos=5) == 0
    # first layer at pos 3, read at 4: k/v at 3..4 in layer 1, then the query at 4 (attends to 5 keys)
    later = 2 * (2 * 8 * 8) + (8 * 8 + 2 * 8 * 5 + 8 * 8 + mlp)
    assert scaling.z_patch_macs(cfg, T=6, read=[4], layer=0, pos=3) == o_head + mlp + later + unembed


def test_train_work_is_six_times_params_times_tokens_plus_attention():
    cfg = _cfg(attn_only=True)
    n, T, n_answer = 3, 6, 2
    body = 2 * 4 * 8 * 8  # per token, two layers of W_Q, W_K, W_V, W_O
    attn = 2 * (2 * 8) * T * (T + 1) // 2  # scores and weighted sum over the causal keys
    assert scaling.train_step_flops(cfg, n, T, n_answer) == 6 * n * (T * body + attn + n_answer * 8 * 5)
