"""Linear probes: scikit-learn oracles, a planted feature, controls, interventions, save/load, the CLI."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest
import torch

from probekit.activations import collect
from probekit.model import ModelConfig, build_model, save_model
from probekit.probes import Probe, ProbeSweep, fit_logistic, fit_probe, probe_sweep
from probekit.tasks import MultiplicationTask, ProbekitError, SortingTask

TASK = MultiplicationTask(digits=3, b_digits=3)


def _model(d_model=32, n_layers=2, n_heads=4, seed=0):
    return build_model(ModelConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_vocab=TASK.d_vocab,
                                   n_ctx=32, positional="learned", seed=seed))


@pytest.fixture(scope="module")
def model():
    m = _model()
    m.probekit_name = "rand-mult-3x3"
    return m


# ---------------------------------------------------------------------------- oracles


def test_logistic_matches_sklearn_on_identical_splits():
    """Same activations, same splits, same objective (C=1): test accuracy within 1 point of scikit-learn."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    task = SortingTask(n_values=16)
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, d_vocab=task.d_vocab, n_ctx=32, seed=0))
    hooks = ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_post"]
    for feature in ("rank", "target"):  # 8 and 16 classes
        tr = collect(model, task.sample(250, length=8, seed=0), hooks, feature=feature)  # 2000 rows
        te = collect(model, task.sample(125, length=8, seed=1), hooks, feature=feature)
        X, Xt = tr.stacked(), te.stacked()
        classes = torch.unique(tr.labels)
        y = torch.searchsorted(classes, tr.labels)
        W, b, _ = fit_logistic(X, y[None, None].expand(2, 1, -1), torch.ones(X.shape[:2]), len(classes))
        majority = float((te.labels == torch.mode(tr.labels).values).float().mean())
        for g in range(2):
            ours = float((classes[(Xt[g] @ W[g, 0] + b[g, 0]).argmax(-1)] == te.labels).float().mean())
            with threadpool_limits(1), warnings.catch_warnings():  # one BLAS thread: 2 busy cores
                warnings.simplefilter("ignore")
                clf = LogisticRegression(C=1.0, max_iter=5000).fit(X[g].numpy(), tr.labels.numpy())
            assert clf.n_iter_[0] < 5000  # scikit-learn converged: both sides solve the same problem
            theirs = clf.score(Xt[g].numpy(), te.labels.numpy())
            assert abs(ours - theirs) <= 0.01, (feature, hooks[g], ours, theirs)
            assert ours > majority + 0.1  # above chance: not a comparison of two constant predictors


def test_logistic_loss_gradient_equals_autograd_of_the_objective():
    """The written-out loss and gradient equal autograd's on the objective as stated in the original space:
    weighted cross-entropy of (X - mean) P Wz + b, plus lam/2 ||P Wz||^2 (P from `_preconditioner`)."""
    from probekit.probes import _logistic_loss, _preconditioner

    g = torch.Generator().manual_seed(0)
    G, V, N, d, K = 2, 3, 40, 5, 4
    X = torch.randn(G, N, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    w = (torch.rand(G, N, generator=g) > 0.1).double()
    y = torch.randint(0, K, (G, V, N), generator=g)
    lam = torch.rand(G, V, generator=g, dtype=torch.float64) * 0.1
    wn = torch.rand(G, V, N, generator=g, dtype=torch.float64)
    mean, P, diag = _preconditioner(X, w, lam.mean(1))
    Z = torch.cat([(X - mean[:, None]) @ P, torch.ones(G, N, 1, dtype=X.dtype)], 2)
    Wz = torch.randn(G, V, K, d + 1, generator=g, dtype=torch.float64, requires_grad=True)
    logp = torch.einsum("gne,gvke->gvnk", Z, Wz).log_softmax(-1)
    Wo = torch.einsum("gde,gvke->gvdk", P, Wz[..., :d])
    ref = -(logp.gather(-1, y[..., None])[..., 0] * wn).sum() + 0.5 * (lam[..., None, None] * Wo ** 2).sum()
    ref.backward()
    pen = lam[:, :, None, None] * torch.cat([diag, diag.new_zeros(G, 1)], 1)[:, None, None, :]
    loss, grad = _logistic_loss(Z, Z.transpose(1, 2).contiguous(), Wz.detach(), y[:, :, None], wn[:, :, None], pen)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, Wz.grad, rtol=1e-10, atol=1e-10)


def test_ridge_matches_sklearn(model):
    from sklearn.linear_model import Ridge

    train, test = TASK.sample(120, seed=0), TASK.sample(80, seed=1)
    probe = fit_probe(model, train, "column_sum", "blocks.1.hook_resid_mid")
    assert probe.kind == "ridge"
    tr = collect(model, train, probe.hook, feature="column_sum")
    te = collect(model, test, probe.hook, feature="column_sum")
    ref = Ridge(alpha=1.0).fit(tr.acts[probe.hook].numpy(), tr.labels.numpy())
    ours = probe.score(model, test)
    assert ours.metric == "r2"
    assert ours.value == pytest.approx(ref.score(te.acts[probe.hook].numpy(), te.labels.numpy()), abs=1e-4)
    torch.testing.assert_close(probe.predict(te), torch.tensor(ref.predict(te.acts[probe.hook].numpy())).float(),
                               atol=1e-2, rtol=1e-4)


def test_score_confusion_and_calibration(model):
    probe = fit_probe(model, TASK.sample(200, seed=0), "carry_out", "blocks.1.hook_resid_post")
    held = TASK.sample(100, seed=3)
    s = probe.score(model, held)
    conf = torch.tensor(s.confusion)
    assert conf.shape == (len(probe.classes),) * 2
    assert int(conf.sum()) == s.n - s.n_unseen
    assert int(conf.diag().sum()) / s.n == pytest.approx(s.value)
    acts = probe.collect(model, held)
    p = probe.predict_proba(acts)
    torch.testing.assert_close(p.sum(-1), torch.ones(len(p)))
    cal = probe.calibrate(model, held)
    assert cal.temperature != 1.0
    assert cal.score(model, held).nll <= s.nll + 1e-6  # fitted to minimise it on this batch
    assert cal.score(model, held).value == pytest.approx(s.value)  # temperature never changes the argmax


# ---------------------------------------------------------------------------- a planted feature


def _planted(batch, seed):
    g = torch.Generator().manual_seed(seed)
    lab = torch.where(batch.pred_mask, torch.randint(0, 2, batch.tokens.shape, generator=g),
                      torch.full_like(batch.tokens, -1))
    return replace(batch, features={**batch.features, "planted": lab})


@pytest.fixture(scope="module")
def planted(model):
    """A random binary label at every predicting position, added along a known direction v at blocks.0.hook_resid_pre.

    Only v carries the label: it is independent of the tokens, so nothing else in the model can encode it.
    """
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    v = v / v.norm()
    train, test = _planted(TASK.sample(300, seed=0), 1), _planted(TASK.sample(200, seed=2), 3)
    labels = {train.n: train.features["planted"], test.n: test.features["planted"]}

    def plant(x, hook):
        lab = labels[x.shape[0]]  # one chunk per batch (chunk_size >= n)
        return x + 2.0 * torch.where(lab >= 0, 2.0 * lab - 1, 0.0)[..., None] * v

    return v, train, test, [("blocks.0.hook_resid_pre", plant)]


def test_planted_feature_recovered_with_controls(model, planted):
    v, train, test, plant = planted
    with model.hooks(fwd_hooks=plant):
        sw = probe_sweep(model, train, "planted", "resid_pre,resid_post", evals={"test": test}, chunk_size=512)
    assert sw.axes == ("hook", "layer", "position", "split")
    assert sw.labels["split"] == ["train", "test"]
    acc = sw.values[:, :, 0, 1]
    assert (acc > 0.97).all()
    # the probe's direction is the planted one
    assert float((sw.probe("blocks.0.hook_resid_pre").basis()[:, 0] @ v).abs()) > 0.95
    # controls: shuffled labels and the unplanted random model sit at chance; selectivity is reported
    assert ((sw.extra["shuffled"][:, :, 0, 1] - 0.5).abs() < 0.08).all()
    assert ((sw.extra["random_model"][:, :, 0, 1] - 0.5).abs() < 0.08).all()
    assert ((sw.extra["majority"][:, :, 0, 1] - 0.5).abs() < 0.05).all()
    sel = sw.extra["selectivity"][:, :, 0, 1]
    torch.testing.assert_close(sel, acc - sw.extra["control"][:, :, 0, 1])
    assert (sel > 0.1).all()
    assert "random_model" in sw.settings["controls"] and sw.settings["random_model"].startswith("build_model")


def test_token_baseline_is_the_stats_oracle_per_split_and_slot(model):
    """The ``token`` extra of a sweep is `probekit.stats.token_baseline` fitted on the train rows, scored on
    each split (pooled and per slot); for a ridge feature the per-token mean train value (R^2 by hand)."""
    import numpy as np

    from probekit import stats

    train, test = TASK.sample(120, seed=3), TASK.sample(80, seed=4)
    sw = probe_sweep(model, train, "carry_in", "resid_post", evals={"test": test}, controls=False)
    tr, te = (collect(model, b, ["blocks.0.hook_resid_post"], feature="carry_in") for b in (train, test))
    for s, a in (("train", tr), ("test", te)):
        j = sw.labels["split"].index(s)
        ref = stats.token_baseline(tr.token, tr.labels, a.token, a.labels)["accuracy"]
        assert float(sw.extra["token"][0, 0, 0, j]) == pytest.approx(ref, abs=1e-6)
        rows = a.slot == 2
        ref2 = stats.token_baseline(tr.token, tr.labels, a.token[rows], a.labels[rows])["accuracy"]
        assert float(sw.extra["token"][0, 0, 3, j]) == pytest.approx(ref2, abs=1e-6)
    assert sw.extra["token"][0, 0, 0, 1] >= sw.extra["majority"][0, 0, 0, 1] - 1e-6  # a table beats a constant
    rg = probe_sweep(model, train, "column_sum", "resid_post", evals={"test": test}, controls=False)
    tr_s, te_s = (collect(model, b, ["blocks.0.hook_resid_post"], feature="column_sum") for b in (train, test))
    means = {t: float(tr_s.labels[tr_s.token == t].double().mean()) for t in tr_s.token.unique().tolist()}
    fallback = float(tr_s.labels.double().mean())
    pred = np.array([means.get(t, fallback) for t in te_s.token.tolist()])
    y = te_s.labels.double().numpy()
    r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert float(rg.extra["token"][0, 0, 0, 1]) == pytest.approx(r2, abs=1e-5)


def test_project_out_destroys_downstream_readout(model, planted):
    v, train, test, plant = planted
    with model.hooks(fwd_hooks=plant):
        early = fit_probe(model, train, "planted", "blocks.0.hook_resid_pre", chunk_size=512)
        readout = fit_probe(model, train, "planted", "blocks.1.hook_resid_post", chunk_size=512)
        assert readout.score(model, test, chunk_size=512).value > 0.97
        with early.intervene(model, mode="project_out"):
            assert abs(readout.score(model, test, chunk_size=512).value - 0.5) < 0.08
        # removing a random direction instead leaves the readout intact
        other = replace(early, weight=torch.randn(early.d, 2, generator=torch.Generator().manual_seed(5)))
        with other.intervene(model, mode="project_out"):
            assert readout.score(model, test, chunk_size=512).value > 0.95
        for cls in (0, 1):
            with early.intervene(model, mode="steer", value=cls):
                acts = readout.collect(model, test, chunk_size=512)
                assert float((readout.predict(acts) == cls).float().mean()) > 0.95
        # only at the chosen positions: steering at position 0 alone changes nothing that is read
        with early.intervene(model, mode="steer", value=1, positions=[0]):
            assert readout.score(model, test, chunk_size=512).value > 0.95
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())


# ---------------------------------------------------------------------------- sweeps


def test_sweep_by_position_and_lengths(model):
    evals = {"3": TASK.sample(60, seed=1), "4": TASK.sample(60, length=4, seed=2)}
    sw = probe_sweep(model, TASK.sample(150, seed=0), "carry_out", ["resid_post", "hook_embed"], evals=evals,
                     by_position=True, controls=("shuffle",))
    assert sw.labels["layer"] == ["0", "1", "-"]  # hook_embed is outside the blocks
    assert sw.labels["position"] == ["all"] + [str(k) for k in range(7)]  # 4x3 digits: 7 answer steps
    h = sw.labels["hook"].index("hook_resid_post")
    assert torch.isnan(sw.values[h, 2]).all() and not torch.isnan(sw.values[h, 0, 0]).any()
    assert torch.isnan(sw.values[h, 0, 7, 2])  # no per-position probe for step 6, never seen in training
    assert not torch.isnan(sw.values[h, 0, 6, 1])  # step 5 exists at length 3
    assert torch.isnan(sw.extra["random_model"]).all()  # not requested
    # a per-position probe is trained only on its slot's rows
    p = sw.probe("resid_post", 1, position=2)
    assert p.slot == 2 and p.meta["train"]["rows"] == 900
    frame = sw.to_frame()
    assert {"value", "shuffled", "control", "selectivity", "random_model", "majority", "token", "n"} <= set(frame.columns)
    assert len(frame) == sw.values.numel()
    back = ProbeSweep.from_json(sw.to_json())
    assert isinstance(back, ProbeSweep) and back == sw
    assert "hook_resid_post" in sw.summary()
    where, best = sw.best(split="3")
    assert best == pytest.approx(float(torch.nan_to_num(sw.values[:, :, 0, 1], nan=-1).max()))
    assert sw.values[sw.labels["hook"].index(where["hook"]), sw.labels["layer"].index(where["layer"]), 0, 1] == best


def test_sweep_probe_equals_single_fit(model):
    train = TASK.sample(100, seed=0)
    sw = probe_sweep(model, train, "carry_out", "resid_mid", controls=False)
    for L in range(2):
        single = fit_probe(model, train, "carry_out", f"blocks.{L}.hook_resid_mid")
        batched = sw.probe("resid_mid", L)
        test = TASK.sample(60, seed=9)
        assert abs(single.score(model, test).value - batched.score(model, test).value) <= 0.01


def test_bad_inputs(model):
    train = TASK.sample(40, seed=0)
    with pytest.raises(ProbekitError, match="unknown hook 'resid'.*hook_resid_pre"):
        probe_sweep(model, train, "carry_out", "resid")
    with pytest.raises(ProbekitError, match="feature 'rank' is not defined"):
        probe_sweep(model, train, "rank", "resid_pre")
    with pytest.raises(ProbekitError, match="empty position mask"):
        fit_probe(model, train, "operand_digit", "blocks.0.hook_resid_pre", positions="pred")
    one = replace(train, features={**train.features, "one": torch.where(train.pred_mask, 3, -1)})
    with pytest.raises(ProbekitError, match="single class \\(3\\)"):
        fit_probe(model, one, "one", "blocks.0.hook_resid_pre")
    with pytest.raises(ProbekitError, match="names 2 hooks"):
        fit_probe(model, train, "carry_out", "resid_pre")
    with pytest.raises(ProbekitError, match="unknown control"):
        probe_sweep(model, train, "carry_out", "resid_pre", controls=("shuffle", "permute"))
    with pytest.raises(ProbekitError, match="unknown probe kind"):
        fit_probe(model, train, "carry_out", "blocks.0.hook_resid_pre", kind="svm")


# ---------------------------------------------------------------------------- save / load


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    probe = fit_probe(model, TASK.sample(150, seed=0), "carry_out", "blocks.1.hook_resid_post")
    folder = probe.save(tmp_path_factory.mktemp("probe") / "carry")
    return probe, folder


def test_save_load_roundtrip_and_metadata(model, saved):
    probe, folder = saved
    back = Probe.load(folder, model=model)
    acts = collect(model, TASK.sample(30, seed=4), probe.hook, feature="carry_out")
    torch.testing.assert_close(back.logits(acts), probe.logits(acts))
    meta = json.loads((folder / "probe.json").read_text())
    assert meta["hook"] == "blocks.1.hook_resid_post" and meta["feature"] == "carry_out"
    assert meta["position_rule"] == "feature" and meta["classes"] == probe.classes
    assert meta["meta"]["model"] == "rand-mult-3x3"
    assert meta["meta"]["config_hash"] == model.probekit_config.hash()
    assert meta["meta"]["train"] == {"task": "multiplication", "objective": "product", "length": 3, "n": 150,
                                     "rows": 900, "seed": None}
    assert 0 < meta["meta"]["scores"]["train"] <= 1


def test_saved_probe_works_on_a_bridge_built_elsewhere(model, saved):
    """A plain TransformerLens bridge (no probekit) with the same weights gives the same predictions."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    probe, folder = saved
    c = model.cfg
    cfg = TransformerBridgeConfig(d_model=c.d_model, d_head=c.d_head, n_layers=c.n_layers, n_ctx=c.n_ctx,
                                  n_heads=c.n_heads, d_vocab=c.d_vocab, d_mlp=c.d_mlp, act_fn="relu",
                                  normalization_type="LN", positional_embedding_type="standard", seed=123)
    other = TransformerBridge.boot_native(cfg)
    other.load_state_dict(model.state_dict())
    other.eval()
    assert getattr(other, "probekit_config", None) is None
    loaded = Probe.load(folder, model=other)
    batch = TASK.sample(50, seed=7)
    assert loaded.score(other, batch).value == pytest.approx(probe.score(model, batch).value)


def test_load_refuses_mismatched_models(saved):
    _, folder = saved
    with pytest.raises(ProbekitError, match="d_model=32; this model has d_model=48"):
        Probe.load(folder, model=_model(d_model=48))
    with pytest.raises(ProbekitError, match="does not exist in this model \\(1 layers\\)"):
        Probe.load(folder, model=_model(n_layers=1))


def test_hook_layout_mismatch(model, tmp_path):
    z = fit_probe(model, TASK.sample(60, seed=0), "carry_out", "blocks.0.attn.hook_z")
    assert z.act_shape == (4, 8)
    z.save(tmp_path / "z")
    with pytest.raises(ProbekitError, match=r"hook layout differs.*\[4, 8\].*\[8, 4\]"):
        Probe.load(tmp_path / "z", model=_model(n_heads=8))


def test_corrupted_probe_files(saved, tmp_path):
    import shutil

    _, folder = saved

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(folder, dst)
        return dst

    bad = copy("truncated")
    raw = (bad / "probe.safetensors").read_bytes()
    (bad / "probe.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ProbekitError, match="corrupted") as e:
        Probe.load(bad)
    assert "\n" not in str(e.value)
    bad = copy("badjson")
    (bad / "probe.json").write_text("{not json")
    with pytest.raises(ProbekitError, match="not valid JSON"):
        Probe.load(bad)
    bad = copy("missing")
    (bad / "probe.safetensors").unlink()
    with pytest.raises(ProbekitError, match="not found"):
        Probe.load(bad)
    bad = copy("shape")  # consistent sha but weights of another size
    meta = json.loads((bad / "probe.json").read_text())
    meta["d"] = 16
    (bad / "probe.json").write_text(json.dumps(meta))
    with pytest.raises(ProbekitError, match="tensor 'W'"):
        Probe.load(bad)
    with pytest.raises(ProbekitError, match="not empty"):
        Probe.save(Probe.load(folder), folder)


# ---------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    return save_model(model, tmp_path_factory.mktemp("m") / "rand-mult", TASK, name="rand-mult")


def test_cli_probe_writes_json_csv_png(model, model_dir, tmp_path, capsys):
    from probekit.cli import main

    out = tmp_path / "out"
    args = ["probe", "--model", str(model_dir), "--feature", "carry_out", "--hooks", "resid_pre,resid_post",
            "--train-length", "3", "--test-lengths", "3,4", "--n", "80", "--seed", "0", "--out", str(out),
            "--save-probes"]
    assert main(args) == 0
    names = {p.name for p in out.iterdir()}
    assert {"probe.json", "probe.csv", "probe_heatmap_hook_resid_pre.png", "probe_heatmap_hook_resid_post.png",
            "probe_accuracy_vs_length.png"} <= names
    assert not any(n.endswith(".tmp") or ".tmp." in n for n in names)
    sw = ProbeSweep.from_json((out / "probe.json").read_text())
    assert sw.labels["split"] == ["train", "3", "4"]
    assert sw.settings["splits"]["4"]["length"] == 4 and sw.settings["command"]["n"] == 80
    assert (out / "probe.csv").read_text().count("\n") == sw.values.numel() + 1
    saved = Probe.load(out / "probes" / "blocks.1.hook_resid_post", model=model)
    assert saved.meta["train"]["seed"] == 3 and saved.meta["scores"]["4"] == pytest.approx(sw.values[1, 1, 0, 2].item())
    assert main(args) == 2  # non-empty --out without --overwrite
    assert "not empty" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("change, message", [
    (("--hooks", "resid_typo"), "unknown hook 'resid_typo'"),
    (("--feature", "rank"), "feature 'rank' is not defined"),
    (("--feature", "operand_digit", "--positions", "pred"), "empty position mask"),
    (("--test-lengths", "3,x"), "comma-separated integers"),
    (("--test-lengths", "20"), "length (digits of a) = 20; expected an integer in 1..12"),
    (("--n", "0"), "--n must be positive"),
])
def test_cli_bad_input_exits_2(model_dir, tmp_path, capsys, change, message):
    from probekit.cli import main

    args = {"--model": str(model_dir), "--feature": "carry_out", "--hooks": "resid_pre", "--train-length": "3",
            "--test-lengths": "3", "--n": "20", "--out": str(tmp_path / "o")}
    for k, v in zip(change[::2], change[1::2], strict=True):
        args[k] = v
    assert main(["probe", *[x for kv in args.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


# ---------------------------------------------------------------------------- fingerprints, modules, custom data


def _native_twin(model, seed=123, same_weights=True):
    """A TransformerLens bridge built without probekit, of the same shapes (and, optionally, weights)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    c = model.cfg
    cfg = TransformerBridgeConfig(d_model=c.d_model, d_head=c.d_head, n_layers=c.n_layers, n_ctx=c.n_ctx,
                                  n_heads=c.n_heads, d_vocab=c.d_vocab, d_mlp=c.d_mlp, act_fn="relu",
                                  normalization_type="LN", positional_embedding_type="standard", seed=seed)
    other = TransformerBridge.boot_native(cfg)
    if same_weights:
        other.load_state_dict(model.state_dict())
    return other.eval()


def test_fingerprint_recorded_and_checked(model, saved):
    from probekit.probes import ProbeModelWarning, model_fingerprint

    probe, folder = saved
    fp = json.loads((folder / "probe.json").read_text())["fingerprint"]
    assert fp == model_fingerprint(model, probe.hook) and fp["config_hash"] == model.probekit_config.hash()
    assert fp["weights_scope"] == "embeddings + blocks 0..1"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProbeModelWarning)
        Probe.load(folder, model=_native_twin(model))  # same weights, no probekit config: silent
    with pytest.warns(ProbeModelWarning, match="fitted on other weights"):
        Probe.load(folder, model=_native_twin(model, same_weights=False))
    with pytest.warns(ProbeModelWarning, match=f"config {fp['config_hash']}"):
        probe.score(_model(seed=1), TASK.sample(20, seed=2))
    wide_ctx = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, d_vocab=TASK.d_vocab, n_ctx=48,
                                       positional="learned"))
    other_fp = model_fingerprint(wide_ctx, probe.hook)
    with pytest.raises(ProbekitError, match=f"another architecture: probe arch={fp['arch']}.*this model "
                                            f"arch={other_fp['arch']}") as e:
        Probe.load(folder, model=wide_ctx)
    assert "\n" not in str(e.value)


def test_fingerprint_covers_only_upstream_weights(model):
    """Editing block 1 changes the fingerprint of a probe reading block 1, not of one reading resid_pre 1."""
    from probekit.probes import model_fingerprint

    edited = _model()
    edited.load_state_dict(model.state_dict())
    base = {h: model_fingerprint(model, h)["weights"] for h in
            ("blocks.1.hook_resid_pre", "blocks.1.hook_resid_post", "hook_embed", "blocks.0.hook_resid_post")}
    block1 = [p for n, p in edited.named_parameters() if "layers.1." in n]
    assert block1
    with torch.no_grad():
        block1[0].add_(0.01)
    now = {h: model_fingerprint(edited, h)["weights"] for h in base}
    assert now["blocks.1.hook_resid_pre"] == base["blocks.1.hook_resid_pre"]
    assert now["blocks.0.hook_resid_post"] == base["blocks.0.hook_resid_post"]
    assert now["hook_embed"] == base["hook_embed"]
    assert now["blocks.1.hook_resid_post"] != base["blocks.1.hook_resid_post"]


def test_as_module_equals_logits_and_predict(model):
    batch = TASK.sample(60, seed=0)
    for hook in ("blocks.1.hook_resid_post", "blocks.0.attn.hook_z"):
        probe = fit_probe(model, batch, "carry_out", hook)
        _, cache = model.run_with_cache(batch.tokens, names_filter=[hook])
        x = cache[hook]  # batch pos *act_shape
        mod = probe.as_module()
        assert all(type(m).__module__.startswith("torch.nn") for m in mod.modules())  # plain torch modules
        out = mod(x)
        flat = x.reshape(*x.shape[:2], -1)
        torch.testing.assert_close(out, probe.logits(flat), atol=1e-5, rtol=1e-5)
        pred = torch.tensor(probe.classes)[out.argmax(-1)]
        assert torch.equal(pred, probe.predict(flat))
    # a probe with a normalisation (as imported from elsewhere): folded into the Linear
    g = torch.Generator().manual_seed(0)
    d = probe.d
    normed = replace(probe, norm_mean=torch.randn(d, generator=g), norm_std=torch.rand(d, generator=g) + 0.5)
    manual = ((flat - normed.norm_mean) / normed.norm_std) @ normed.weight + normed.bias
    torch.testing.assert_close(normed.as_module()(x), manual, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(normed.logits(flat), manual, atol=1e-4, rtol=1e-4)


def test_probe_with_normalisation_round_trips(model, tmp_path):
    probe = fit_probe(model, TASK.sample(40, seed=0), "carry_out", "blocks.1.hook_resid_post")
    g = torch.Generator().manual_seed(1)
    normed = replace(probe, norm_mean=torch.randn(probe.d, generator=g), norm_std=torch.rand(probe.d, generator=g) + 0.5)
    normed.save(tmp_path / "n")
    meta = json.loads((tmp_path / "n" / "probe.json").read_text())
    assert meta["normalisation"] == {"mean": "norm_mean", "std": "norm_std"} and meta["format_version"] == 2
    back = Probe.load(tmp_path / "n")
    x = torch.randn(7, probe.d, generator=g)
    torch.testing.assert_close(back.logits(x), normed.logits(x))
    with pytest.raises(ProbekitError, match="both norm_mean and norm_std"):
        replace(probe, norm_mean=torch.zeros(probe.d))


def test_format_1_probe_folders_still_load(model, saved, tmp_path):
    """A folder in the first format (weight [d, k], bias, mean; no fingerprint) loads and predicts the same."""
    import hashlib

    from safetensors.torch import save_file

    probe, _ = saved
    old = tmp_path / "v1"
    old.mkdir()
    save_file({"weight": probe.weight.contiguous(), "bias": probe.bias, "mean": probe.mean,
               "class_means": probe.class_means.contiguous()}, str(old / "probe.safetensors"))
    meta = {"format": "probekit-probe", "format_version": 1, "hook": probe.hook, "feature": probe.feature,
            "kind": probe.kind, "classes": probe.classes, "act_shape": list(probe.act_shape),
            "position_rule": "feature", "slot": None, "temperature": 1.0, "d": probe.d, "n_out": len(probe.classes),
            "meta": {"d_model": 32, "n_layers": 2}, "weights_sha256":
            hashlib.sha256((old / "probe.safetensors").read_bytes()).hexdigest()}
    (old / "probe.json").write_text(json.dumps(meta))
    back = Probe.load(old, model=_model(seed=5))  # no fingerprint: other weights are not detected, no warning
    x = torch.randn(5, probe.d)
    torch.testing.assert_close(back.logits(x), probe.logits(x))
    meta["format_version"] = 3
    (old / "probe.json").write_text(json.dumps(meta))
    with pytest.raises(ProbekitError, match="format_version 3; this probekit reads <= 2"):
        Probe.load(old)


_T = torch.tensor([[1, 2, 3, 4], [2, 3, 4, 1]])
_M = torch.tensor([[False, False, True, True]] * 2)


@pytest.mark.parametrize("tokens,mask,features,message", [
    (_T[0], _M[0], None, r"tokens have shape \(4,\); expected a non-empty 2-D"),
    (_T.float(), _M, None, "tokens have dtype torch.float32; expected integer"),
    (_T - 2, _M, None, r"negative id \(-1\)"),
    (_T, _M.long(), None, "answer_mask has dtype torch.int64; expected torch.bool"),
    (_T, _M[:, :3], None, r"answer_mask has shape \(2, 3\); expected the tokens' \(2, 4\)"),
    (_T, torch.ones(2, 4, dtype=torch.bool), None, "True at position 0"),
    (_T, _M, [1, 2], "features is a list; expected a dict"),
    (_T, _M, {"f": torch.zeros(2, 3)}, r"feature 'f' has shape \(2, 3\)"),
    (_T, _M, {"f": _T - 3}, "integer feature 'f' holds -2; expected values >= 0, or -1"),
    (_T, _M, {"f": torch.full((2, 4), float("inf"))}, "feature 'f' holds inf"),
    (_T, _M, {"f": torch.zeros(2, 4, dtype=torch.complex64)}, "feature 'f' has dtype torch.complex64"),
    (_T, _M, {3: _T}, "feature name 3"),
    ("abc", _M, None, "tokens is a str; expected a tensor or array"),
])
def test_batch_from_tokens_refuses_bad_input(tokens, mask, features, message):
    from probekit.tasks import Batch

    with pytest.raises(ProbekitError, match=message) as e:
        Batch.from_tokens(tokens, mask, features)
    assert "\n" not in str(e.value)


def test_batch_from_tokens_defaults():

    from probekit.tasks import Batch

    b = Batch.from_tokens(_T.numpy(), _M, {"flag": _M, "x": _T.double()})
    assert (b.task, b.objective, b.length, b.prompt_len, b.n, b.seq_len) == ("custom", "custom", 4, 2, 2, 4)
    assert b.tokens.dtype == torch.long and b.features["flag"].dtype == torch.long
    assert b.features["x"].dtype == torch.float32 and torch.equal(b.pred_mask[0], torch.tensor([False, True, True, False]))
    assert Batch.from_tokens(_T, torch.zeros(2, 4, dtype=torch.bool), name="mine").prompt_len == 4
    assert torch.equal(b.select([1]).tokens, _T[1:])


def test_float_feature_ridge_probe_matches_sklearn(model):
    """A float feature (NaN = undefined, -1.0 a real value) fits a ridge probe equal to scikit-learn's Ridge."""
    from sklearn.linear_model import Ridge

    from probekit.probes import probe_kind
    from probekit.tasks import Batch

    src = TASK.sample(120, seed=0)
    g = torch.Generator().manual_seed(0)
    value = 0.1 * torch.randn(src.tokens.shape, generator=g) + src.tokens.float() / 4  # readable from the residual
    value[:, 0] = -1.0
    value[:, 1] = float("nan")
    batch = Batch.from_tokens(src.tokens, src.answer_mask, {"value": value})
    assert probe_kind("value", values=batch.features["value"]) == "ridge"
    with pytest.raises(ProbekitError, match="holds float values; a logistic probe needs integer classes"):
        fit_probe(model, batch, "value", "blocks.1.hook_resid_post", kind="logistic")
    probe = fit_probe(model, batch, "value", "blocks.1.hook_resid_post")
    acts = collect(model, batch, probe.hook, feature="value")
    assert acts.n_rows == batch.n * (batch.seq_len - 1)  # every position but the NaN one, -1.0 included
    assert not torch.isnan(acts.labels).any() and (acts.labels == -1.0).sum() == batch.n
    ref = Ridge(alpha=1.0).fit(acts.acts[probe.hook].double().numpy(), acts.labels.double().numpy())
    torch.testing.assert_close(probe.predict(acts), torch.tensor(ref.predict(acts.acts[probe.hook].double().numpy())).float(),
                               atol=1e-3, rtol=1e-4)
    assert probe.score_acts(acts, acts.labels).value > 0.5
    sweep = probe_sweep(model, batch, "value", "resid_post", controls=("shuffle",))
    assert sweep.settings["kind"] == "ridge"
    assert float(sweep.values[0, 1, 0, 0]) == pytest.approx(probe.score_acts(acts, acts.labels).value, abs=1e-4)
