"""CLI: train and eval end to end; every bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import json

import pytest

from probekit.cli import main
from probekit.model import shipped_models

TINY = {
    "name": "cli-tiny",
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "n_ctx": 40, "positional": "none"},
    "task": {"name": "sorting", "n_values": 10},
    "train": {"steps": 20, "batch_size": 16, "lengths": [2, 6], "warmup_steps": 4},
}


def write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cfg = write(d / "cfg.json", TINY)
    assert main(["train", "--config", cfg, "--out", str(d / "run")]) == 0
    return d


def test_train_then_eval_json(trained, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(trained / "run"), "--lengths", "3,5", "--n", "8", "--seed", "1", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["length"] for r in records] == [3, 5] and all(r["n"] == 8 for r in records)
    # a model's own config.json retrains it
    assert main(["train", "--config", str(trained / "run" / "config.json"), "--out", str(trained / "again")]) == 0
    assert (trained / "again" / "model.safetensors").exists()


def test_eval_errors_agree_with_the_library(trained, capsys):
    from probekit.evaluate import sort_error_kinds
    from probekit.model import load_model

    capsys.readouterr()
    assert main(["eval", "--model", str(trained / "run"), "--lengths", "6", "--n", "16", "--seed", "2", "--json",
                 "--errors"]) == 0
    rec = json.loads(capsys.readouterr().out)[0]
    model, task, _ = load_model(trained / "run")
    assert rec["errors"] == sort_error_kinds(model, task.sample(16, length=6, seed=2 * 1000 + 6))
    assert sum(rec["errors"]["first_error"].values()) == 16
    assert main(["eval", "--model", str(trained / "run"), "--lengths", "6", "--n", "16", "--errors"]) == 0
    assert "first error: extra copy" in capsys.readouterr().out


@pytest.mark.skipif("mult-nx1-place" not in shipped_models(), reason="needs the shipped model mult-nx1-place")
def test_eval_place_offsets_agree_with_the_library(capsys):
    from probekit.evaluate import evaluate
    from probekit.model import load_model

    capsys.readouterr()
    assert main(["eval", "--model", "mult-nx1-place", "--lengths", "7", "--n", "16", "--json",
                 "--place-offsets", "train"]) == 0
    records = json.loads(capsys.readouterr().out)
    model, task, _ = load_model("mult-nx1-place")
    assert records == evaluate(model, task, [7], n=16, place_offsets=list(range(11))).records
    assert records[0]["place_offsets"] == list(range(11))  # 0..place_offset_max: all fit n_ctx 32 at 7 digits
    assert main(["eval", "--model", "mult-nx1-place", "--lengths", "7", "--n", "16", "--place-offsets", "0,4"]) == 0
    assert "averaged over place offsets: length 7: [0, 4]" in capsys.readouterr().out


def test_save_metrics(trained):
    assert main(["eval", "--model", str(trained / "run"), "--lengths", "3", "--n", "4", "--save-metrics"]) == 0
    metrics = json.loads((trained / "run" / "metrics.json").read_text())
    assert metrics["records"][0]["length"] == 3 and "probekit eval" in metrics["command"]


def _bad(argv, capsys, expect):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert expect in err, err


def test_bad_inputs(trained, tmp_path, capsys):
    run = str(trained / "run")
    _bad(["eval", "--model", run, "--n", "0"], capsys, "--n must be positive")
    _bad(["eval", "--model", "mult-5x1", "--n", "2", "--lengths", "5", "--errors"], capsys,
         "--errors needs a sorting model with the 'sort' objective, got task 'multiplication'")
    _bad(["eval", "--model", run, "--lengths", "100", "--n", "2"], capsys, "n_ctx is 40")
    _bad(["eval", "--model", run, "--lengths", "ten", "--n", "2"], capsys, "comma-separated integers")
    _bad(["eval", "--model", str(tmp_path / "missing"), "--n", "2"], capsys, "no model folder")
    bad_task = write(tmp_path / "t.json", {**TINY, "task": {"name": "addition"}})
    _bad(["train", "--config", bad_task, "--out", str(tmp_path / "o1")], capsys, "unknown task 'addition'")
    bad_obj = write(tmp_path / "o.json", {**TINY, "train": {**TINY["train"], "objectives": {"reverse": 1}}})
    _bad(["train", "--config", bad_obj, "--out", str(tmp_path / "o2")], capsys, "unknown objective 'reverse'")
    missing = write(tmp_path / "m.json", {"model": TINY["model"], "task": TINY["task"]})
    _bad(["train", "--config", missing, "--out", str(tmp_path / "o3")], capsys, "missing field(s) ['train']")
    unknown = write(tmp_path / "u.json", {**TINY, "optimizer": "sgd"})
    _bad(["train", "--config", unknown, "--out", str(tmp_path / "o4")], capsys, "unknown field(s) ['optimizer']")
    vocab = write(tmp_path / "v.json", {**TINY, "model": {**TINY["model"], "d_vocab": 7}})
    _bad(["train", "--config", vocab, "--out", str(tmp_path / "o5")], capsys, "must match")
    long = write(tmp_path / "l.json", {**TINY, "train": {**TINY["train"], "lengths": [1, 50]}})
    _bad(["train", "--config", long, "--out", str(tmp_path / "o6")], capsys, "n_ctx is 40")
    # a non-empty --out is refused and left as it was
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    cfg = write(tmp_path / "ok.json", TINY)
    _bad(["train", "--config", cfg, "--out", str(keep)], capsys, "is not empty")
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]


def test_corrupted_weights_via_cli(trained, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained / "run", broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    _bad(["eval", "--model", str(broken), "--n", "2", "--lengths", "3"], capsys, "truncated or corrupted")


def test_help_has_examples(capsys):
    assert main(["eval", "--help"]) == 0
    assert "Example: probekit eval" in capsys.readouterr().out


def test_config_that_is_a_directory(tmp_path, capsys):
    _bad(["train", "--config", str(tmp_path), "--out", str(tmp_path / "o")], capsys, "is a directory")


@pytest.mark.parametrize("command", ["train", "eval", "probe", "patch", "attribute", "report", "circuits", "das",
                                     "edges"])
def test_help_fits_80_columns_with_an_example(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert f"Example: probekit {command}" in text
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text  # nothing cut off
    if command == "probe":
        assert "resid_pre,resid_mid,resid_post" in text  # a long default shown whole


def test_eval_out_and_save_metrics_into_a_model_folder(trained, capsys):
    out = trained / "eval-out"
    assert main(["eval", "--model", str(trained / "run"), "--lengths", "3,4", "--n", "4", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["eval.csv", "eval.json", "eval.png"]
    from probekit.evaluate import EvalResult

    res = EvalResult.from_json((out / "eval.json").read_text())
    assert [r["length"] for r in res.records] == [3, 4]
    assert (out / "eval.csv").read_text().count("\n") == 3
    assert main(["eval", "--model", str(trained / "run"), "--lengths", "3", "--n", "4", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


needs_shipped = pytest.mark.skipif(
    not {"sort-successor", "mult-5x1"} <= set(shipped_models()), reason="needs the shipped models sort-successor and mult-5x1")


@needs_shipped
def test_circuits_writes_what_the_library_computes(tmp_path, capsys):
    import torch

    from probekit.circuits import circuit_report
    from probekit.model import load_model

    out = tmp_path / "circ"
    assert main(["circuits", "--model", "sort-successor", "--heads", "L1H0,L1H2", "--ln", "fixed", "--n-random", "5",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["circuits.csv", "circuits.json", "circuits.png",
                                                    "circuits_composition.csv"]
    assert "V-composition vs random baseline" in capsys.readouterr().out
    d = json.loads((out / "circuits.json").read_text())
    assert d["command"]["heads"] == "L1H0,L1H2" and d["qk_circuit"]["labels"]["head"] == ["L1H0", "L1H2"]
    m, task, _ = load_model("sort-successor")
    rep = circuit_report(m, task=task, heads=[(1, 0), (1, 2)], ln="fixed", n_random=5)
    assert torch.allclose(torch.tensor(d["ov_circuit"]["values"]), rep.ov.values, atol=1e-5)
    comp = torch.tensor([[[[float("nan") if v is None else v for v in r] for r in h] for h in L]
                         for L in d["composition_v"]["values"]])
    assert torch.allclose(comp, rep.composition["V"].values, equal_nan=True, atol=1e-6)
    # the scores table: one row per (head, score)
    assert (out / "circuits.csv").read_text().count("\n") == 1 + 2 * len(rep.scores.labels["score"])


@needs_shipped
def test_das_writes_what_the_library_computes(tmp_path, capsys):
    from probekit.interventions import das_sweep
    from probekit.model import load_model

    out = tmp_path / "das"
    argv = ["das", "--model", "mult-5x1", "--vary", "carry_in", "--hold", "column_sum", "--at", "digit_index=2",
            "--target", "carry", "--k", "2", "--n", "120", "--steps", "20", "--sites", "resid_pre,resid_post",
            "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["das.csv", "das.json", "das.png"]
    printed = capsys.readouterr().out
    assert "resid_post.L0@digit_index=2: IIA" in printed and "full vector" in printed
    d = json.loads((out / "das.json").read_text())
    assert d["labels"]["layer"] == ["L0 resid_pre", "L0 resid_post"]
    m, task, _ = load_model("mult-5x1")
    res = das_sweep(m, task, vary="carry_in", hold=["column_sum"], at="digit_index=2", target="carry", k=2, n=120,
                    sites=["resid_pre", "resid_post"], steps=20)
    assert d["values"] == res.values.tolist()
    for key in ("control_mean", "ceiling", "floor"):
        assert d["extra"][key] == res.extra[key].tolist()



@needs_shipped
def test_edges_writes_what_the_library_computes(tmp_path, capsys):
    import pandas as pd

    from probekit.corruptions import corrupt
    from probekit.edges import edge_report
    from probekit.model import load_model

    out = tmp_path / "edges"
    assert main(["edges", "--model", "mult-5x1", "--corruption", "operand-digit", "--n", "16", "--method", "eap-ig",
                 "--steps", "3", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["edges.csv", "edges.json", "edges.png"]
    d = json.loads((out / "edges.json").read_text())
    m, task, _ = load_model("mult-5x1")
    pair = corrupt(task, task.sample(16, seed=0), "operand-digit", seed=0)
    rep = edge_report(m, pair, metric="logit-diff", method="eap-ig", steps=3)
    assert d["scores"] == rep.scores.tolist() and d["exact"] == rep.exact.tolist()
    assert d["settings"]["command"] == {"model": "mult-5x1", "corruption": "operand-digit", "metric": "logit-diff",
                                        "method": "eap-ig", "steps": 3, "norm": "exact", "ablation": "mean",
                                        "direction": "noise", "n": 16, "length": None, "seed": 0}
    assert d["faithfulness"]["smallest"] == rep.faithfulness.smallest
    printed = capsys.readouterr().out
    assert f"{len(rep.edges)} edges; eap-ig scores vs exact effects: Spearman {rep.spearman:.3f}" in printed
    assert f"smallest circuit keeping 90% (mean ablation): {rep.faithfulness.smallest} of" in printed
    label, score = rep.top(1)[0]
    assert f"top 5 edges by |score|: {label} {score:+.4f}" in printed
    frame = pd.read_csv(out / "edges.csv")
    assert list(frame.columns) == ["sender", "receiver", "score", "exact", "rank"] and len(frame) == len(rep.edges)
    assert sorted(frame["rank"]) == list(range(1, len(rep.edges) + 1))
    assert frame.loc[frame["rank"] == 1, "sender"].item() + "->" + frame.loc[frame["rank"] == 1, "receiver"].item() \
        == label
