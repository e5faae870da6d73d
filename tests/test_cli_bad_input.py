"""Every command refuses bad input the same way: exit 2, one ``error:`` line, no traceback, nothing written.

Each case runs `probekit.cli.main` in-process on the shipped models (or a tiny config for ``train``)
and checks that the files of the work folder and of the shipped models are byte for byte as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from probekit import io
from probekit.cli import main
from probekit.model import MODELS_DIR, shipped_models

pytestmark = pytest.mark.skipif(not {"sort-baseline", "mult-5x1"} <= set(shipped_models()),
                                reason="needs the shipped models sort-baseline and mult-5x1")

GRID = str(Path(__file__).resolve().parent.parent / "analyses" / "zoo" / "sort-extrap.json")
TINY = {"name": "tiny", "model": {"n_layers": 1, "d_model": 16, "n_heads": 2, "n_ctx": 40},
        "task": {"name": "sorting", "n_values": 10}, "train": {"steps": 4, "batch_size": 4, "lengths": [2, 4]}}


@pytest.fixture
def ws(tmp_path):
    """A work folder: a config, a file, a non-empty folder of the user's, an empty folder."""
    (tmp_path / "cfg.json").write_text(json.dumps(TINY))
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    return tmp_path


def _hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix != ".safetensors":
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


def refuses(argv: list[str], ws: Path, capsys, expect: str) -> str:
    before = _hashes(ws, MODELS_DIR)
    capsys.readouterr()
    code = main([a.replace("{ws}", str(ws)) for a in argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.out + cap.err
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert code == 2, (argv, code, cap.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    assert expect in lines[0], lines[0]
    assert _hashes(ws, MODELS_DIR) == before  # the user's files and the output folder untouched
    return lines[0]


SORT = ["--model", "sort-baseline"]
MULT = ["--model", "mult-5x1"]
TRAIN = ["train", "--config", "{ws}/cfg.json"]
EVAL = ["eval", *SORT, "--lengths", "5", "--n", "4"]
PROBE = ["probe", *MULT, "--feature", "carry_out", "--hooks", "resid_pre", "--train-length", "5",
         "--test-lengths", "5", "--n", "20"]
PATCH = ["patch", *MULT, "--corruption", "carry-flip", "--n", "8"]
ATTR = ["attribute", *SORT, "--method", "ablate", "--n", "8", "--length", "5"]
REPORT = ["report", "--quick", "--study", "overview"]
CIRC = ["circuits", *SORT]
DAS = ["das", *MULT, "--vary", "carry_in", "--hold", "column_sum", "--at", "digit_index=2", "--target", "carry",
       "--n", "40", "--steps", "2", "--sites", "resid_post"]
EDGES = ["edges", *MULT, "--corruption", "operand-digit", "--n", "8"]
COMPARE = ["compare", *SORT, "--model", "sort-successor", "--lengths", "5", "--n", "4"]

CASES = {
    # usage errors from the parser: one line too
    "train missing --out": (TRAIN, "Missing option '--out'"),
    "eval unknown option": ([*EVAL, "--colour", "red"], "No such option: --colour"),
    "eval n not an integer": (["eval", *SORT, "--n", "many"], "Invalid value for '--n'"),
    "probe missing --feature": (["probe", *MULT, "--train-length", "5", "--test-lengths", "5", "--out", "{ws}/o"],
                                "Missing option '--feature'"),
    "patch missing --corruption": (["patch", *MULT, "--out", "{ws}/o"], "Missing option '--corruption'"),
    "attribute n-random not an integer": ([*ATTR, "--n-random", "1.5", "--out", "{ws}/o"], "Invalid value for '--n-random'"),
    "report seed not an integer": ([*REPORT, "--seed", "x", "--out", "{ws}/o"], "Invalid value for '--seed'"),
    # --max-batch, --seed, --device, --n
    "eval max-batch -1": ([*EVAL, "--max-batch", "-1"], "--max-batch must be positive, got -1"),
    "eval max-batch 0": ([*EVAL, "--max-batch", "0", "--out", "{ws}/o"], "--max-batch must be positive, got 0"),
    "patch max-batch 0": ([*PATCH, "--max-batch", "0", "--out", "{ws}/o"], "--max-batch must be positive"),
    "eval seed -1": ([*EVAL, "--seed", "-1"], "--seed must be >= 0, got -1"),
    "probe seed -1": ([*PROBE, "--seed", "-1", "--out", "{ws}/o"], "--seed must be >= 0"),
    "patch seed -1": ([*PATCH, "--seed", "-1", "--out", "{ws}/o"], "--seed must be >= 0"),
    "attribute seed -1": ([*ATTR, "--seed", "-1", "--out", "{ws}/o"], "--seed must be >= 0"),
    "report seed -1": ([*REPORT, "--seed", "-1", "--out", "{ws}/o"], "seed must be a non-negative integer"),
    "train device bogus": ([*TRAIN, "--out", "{ws}/o", "--device", "bogus"], "--device 'bogus' is not available"),
    "eval device bogus": ([*EVAL, "--device", "bogus"], "--device 'bogus' is not available"),
    "patch device cuda:9": ([*PATCH, "--device", "cuda:9", "--out", "{ws}/o"], "--device 'cuda:9'"),
    "eval n huge": (["eval", *SORT, "--lengths", "5", "--n", "10000000"], "--n must be <= 100_000, got 10_000_000"),
    "probe n huge": ([*PROBE, "--n", "10000000", "--out", "{ws}/o"], "--n must be <= 100_000"),
    "probe n-test 0": ([*PROBE, "--n-test", "0", "--out", "{ws}/o"], "--n-test must be positive"),
    "patch n huge": ([*PATCH, "--n", "10000000", "--out", "{ws}/o"], "--n must be <= 100_000"),
    "attribute n huge": ([*ATTR, "--n", "10000000", "--out", "{ws}/o"], "--n must be <= 100_000"),
    "attribute k 0": ([*ATTR, "--k", "0", "--out", "{ws}/o"], "--k must be positive, got 0"),
    "attribute k over the heads": ([*ATTR, "--k", "1000", "--out", "{ws}/o"], "is more than the model's"),
    "attribute n-random 0": ([*ATTR, "--n-random", "0", "--out", "{ws}/o"], "--n-random must be positive"),
    "eval lengths 0": (["eval", *SORT, "--lengths", "5,0", "--n", "4"], "--lengths must hold integers >= 1, got 0"),
    "probe train-length 0": ([*PROBE, "--train-length", "0", "--out", "{ws}/o"], "--train-length must be positive"),
    "probe test-lengths -5": ([*PROBE, "--test-lengths", "5,-5", "--out", "{ws}/o"], "--test-lengths must hold"),
    "patch length 0": ([*PATCH, "--length", "0", "--out", "{ws}/o"], "--length must be positive"),
    "patch layers -1": ([*PATCH, "--layers", "-1", "--out", "{ws}/o"], "--layers must hold integers >= 0"),
    "patch top 0": ([*PATCH, "--top", "0", "--json"], "--top must be positive"),
    # circuits: heads, LN mode, the random baseline
    "circuits missing --out": (CIRC, "Missing option '--out'"),
    "circuits unknown head": ([*CIRC, "--heads", "L1H9", "--out", "{ws}/o"], "head 9 is out of range"),
    "circuits head not LxHy": ([*CIRC, "--heads", "L1,H2", "--out", "{ws}/o"], "is not of the form L<layer>H<head>"),
    "circuits layer past the model": ([*CIRC, "--heads", "L5H0", "--out", "{ws}/o"], "layer 5 is out of range"),
    "circuits bad ln": ([*CIRC, "--ln", "rms", "--out", "{ws}/o"], "unknown --ln 'rms'"),
    "circuits n-random 1": ([*CIRC, "--n-random", "1", "--out", "{ws}/o"], "--n-random must be >= 2"),
    "circuits seed -1": ([*CIRC, "--seed", "-1", "--out", "{ws}/o"], "--seed must be >= 0"),
    # das: features, positions, targets, k, sites
    "das missing --vary": (["das", *MULT, "--at", "digit_index=2", "--target", "carry", "--out", "{ws}/o"],
                           "Missing option '--vary'"),
    "das k 0": ([*DAS, "--k", "0", "--out", "{ws}/o"], "--k must be positive, got 0"),
    "das k over d_model": ([*DAS, "--k", "97", "--out", "{ws}/o"], "--k 97 is more than d_model = 96"),
    "das unknown vary feature": ([*DAS, "--vary", "carry", "--out", "{ws}/o"], "feature 'carry' is not defined"),
    "das unknown hold feature": ([*DAS, "--hold", "colsum", "--out", "{ws}/o"], "feature 'colsum' is not defined"),
    "das at unknown feature": ([*DAS, "--at", "nope=2", "--out", "{ws}/o"], "feature 'nope' is not defined"),
    "das at no such step": ([*DAS, "--at", "digit_index=9", "--out", "{ws}/o"], "matches 0 positions"),
    "das at not FEATURE=INT": ([*DAS, "--at", "digit_index:2", "--out", "{ws}/o"], "is not FEATURE=INT"),
    "das unknown target": ([*DAS, "--target", "source-value", "--out", "{ws}/o"], "unknown --target 'source-value'"),
    "das target of another task": (["das", *SORT, "--vary", "target", "--at", "step=2", "--target", "carry", "--n",
                                    "40", "--out", "{ws}/o"], "feature 'column_sum' is not defined"),
    "das source feature unknown": ([*DAS, "--target", "source:nope", "--out", "{ws}/o"], "feature 'nope'"),
    "das unknown site": ([*DAS, "--sites", "resid_pre,embed", "--out", "{ws}/o"], "unknown site 'embed'"),
    "das empty sites": ([*DAS, "--sites", ",", "--out", "{ws}/o"], "--sites is empty"),
    "das n 2": ([*DAS, "--n", "2", "--out", "{ws}/o"], "--n must be >= 8"),
    "das steps 0": ([*DAS, "--steps", "0", "--out", "{ws}/o"], "--steps must be positive"),
    "das vary also held": ([*DAS, "--hold", "carry_in", "--out", "{ws}/o"], "both varied and held"),
    # edges: corruption, gradient metric, method, steps, norm, ablation, direction, n, seed
    "edges missing --corruption": (["edges", *MULT, "--out", "{ws}/o"], "Missing option '--corruption'"),
    "edges corruption of another task": ([*EDGES, "--corruption", "swap", "--out", "{ws}/o"], "not defined for task"),
    "edges non-gradient metric": ([*EDGES, "--metric", "acc", "--out", "{ws}/o"], "unknown gradient metric 'acc'"),
    "edges unknown method": ([*EDGES, "--method", "ig", "--out", "{ws}/o"], "unknown --method 'ig'"),
    "edges steps 0": ([*EDGES, "--method", "eap-ig", "--steps", "0", "--out", "{ws}/o"], "--steps must be positive"),
    "edges steps huge": ([*EDGES, "--steps", "100000", "--out", "{ws}/o"], "--steps must be <= 1_000"),
    "edges unknown ablation": ([*EDGES, "--ablation", "zero", "--out", "{ws}/o"], "unknown --ablation 'zero'"),
    "edges unknown direction": ([*EDGES, "--direction", "both", "--out", "{ws}/o"], "unknown --direction 'both'"),
    "edges unknown norm": ([*EDGES, "--norm", "frozen", "--out", "{ws}/o"], "unknown --norm 'frozen'"),
    "edges n huge": ([*EDGES, "--n", "10000000", "--out", "{ws}/o"], "--n must be <= 100_000"),
    "edges seed -1": ([*EDGES, "--seed", "-1", "--out", "{ws}/o"], "--seed must be >= 0"),
    "edges length past the task's range": ([*EDGES, "--length", "50", "--out", "{ws}/o"], "expected an integer in 1..12"),
    "sweep empty --jobs": (["sweep", "{ws}/cfg.json", "--out", "{ws}/o", "--jobs", ","], "--jobs is empty"),
    # --out: a file, under a file, the user's non-empty folder
    "train out is a file": ([*TRAIN, "--out", "{ws}/afile"], "is a file"),
    "eval out under a file": ([*EVAL, "--out", "{ws}/afile/sub"], "is under the file"),
    "probe out under a file": ([*PROBE, "--out", "{ws}/afile/sub"], "is under the file"),
    "patch out under a file": ([*PATCH, "--out", "{ws}/afile/x/y"], "is under the file"),
    "attribute out is a file": ([*ATTR, "--out", "{ws}/afile"], "is a file"),
    "report out under a file": ([*REPORT, "--out", "{ws}/afile/r"], "is under the file"),
    "train out non-empty": ([*TRAIN, "--out", "{ws}/keep"], "is not empty"),
    "eval out non-empty": ([*EVAL, "--out", "{ws}/keep"], "is not empty"),
    "probe out non-empty": ([*PROBE, "--out", "{ws}/keep"], "is not empty"),
    "patch out non-empty": ([*PATCH, "--out", "{ws}/keep"], "is not empty"),
    "attribute out non-empty": ([*ATTR, "--out", "{ws}/keep"], "is not empty"),
    "report out non-empty": ([*REPORT, "--out", "{ws}/keep"], "is not empty"),
    "circuits out non-empty": ([*CIRC, "--out", "{ws}/keep"], "is not empty"),
    "das out is a file": ([*DAS, "--out", "{ws}/afile"], "is a file"),
    "edges out non-empty": ([*EDGES, "--out", "{ws}/keep"], "is not empty"),
    # failures found only after the model is loaded: still nothing written
    "patch corruption of another task": (["patch", *MULT, "--corruption", "swap", "--n", "8", "--out", "{ws}/o"],
                                         "not defined for task"),
    "eval length past n_ctx": (["eval", *SORT, "--lengths", "200", "--n", "4", "--out", "{ws}/o"], "n_ctx"),
    "eval length past the task's range": (["eval", *MULT, "--lengths", "50", "--n", "4", "--out", "{ws}/o"],
                                          "expected an integer in 1..12"),
    "eval place-offsets not integers": ([*EVAL, "--place-offsets", "some"],
                                        "--place-offsets must be 'train' or comma-separated integers >= 0, got 'some'"),
    "eval place-offsets -1": ([*EVAL, "--place-offsets", "0,-1"], "--place-offsets must be 'train' or comma-separated"),
    "eval place-offsets without places": ([*EVAL, "--place-offsets", "train", "--out", "{ws}/o"],
                                          "place_offsets needs a positional='place' model, got positional='none'"),
    "eval place-offsets past the table": (["eval", "--model", "mult-nx1-place", "--lengths", "8", "--n", "4",
                                           "--place-offsets", "0,30", "--out", "{ws}/o"],
                                          "place offset 30 puts digit rows up to 39, past the place table of 32 rows"),
    # sweep: the grid and --jobs are checked before Ray starts or a folder is made
    "sweep grid missing": (["sweep", "{ws}/nogrid.json", "--out", "{ws}/o"], "not found"),
    "sweep grid not a grid": (["sweep", "{ws}/cfg.json", "--out", "{ws}/o"], "grid"),
    "sweep unknown job": (["sweep", GRID, "--out", "{ws}/o", "--jobs", "nosuch"], "nosuch"),
    # a shipped model's metrics.json is replaced only with --overwrite
    "eval save-metrics into models/": ([*EVAL, "--save-metrics"], "pass --overwrite"),
    # compare: two models of one task
    "compare missing --lengths": (["compare", *SORT, "--model", "sort-successor", "--out", "{ws}/o"],
                                  "Missing option '--lengths'"),
    "compare one model": ([*COMPARE[:3], *COMPARE[5:], "--out", "{ws}/o"], "--model must be given exactly twice"),
    "compare models of two tasks": (["compare", *SORT, *MULT, "--lengths", "5", "--n", "4", "--out", "{ws}/o"],
                                    "must share a task"),
    "compare n huge": ([*COMPARE, "--n", "10000000", "--out", "{ws}/o"], "--n must be <= 100_000"),
    "compare lengths 0": ([*COMPARE[:5], "--lengths", "5,0", "--out", "{ws}/o"], "--lengths must hold integers >= 1"),
    "compare attribution bogus": ([*COMPARE, "--attribution", "eap", "--out", "{ws}/o"], "unknown --attribution 'eap'"),
    "compare corruption of another task": ([*COMPARE, "--corruption", "carry-flip", "--out", "{ws}/o"],
                                           "not defined for task"),
    "compare feature unknown": ([*COMPARE, "--feature", "carry_out", "--out", "{ws}/o"], "feature 'carry_out'"),
    "compare seed -1": ([*COMPARE, "--seed", "-1", "--out", "{ws}/o"], "--seed must be >= 0"),
    "compare out non-empty": ([*COMPARE, "--out", "{ws}/keep"], "is not empty"),
    "compare out under a file": ([*COMPARE, "--out", "{ws}/afile/sub"], "is under the file"),
    # train --config: a path or a shipped model's name
    "train config neither file nor model": (["train", "--config", "sort-nonexistent", "--out", "{ws}/o"],
                                            "neither a file nor a shipped model"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_cleanly(name, ws, capsys):
    argv, expect = CASES[name]
    refuses(argv, ws, capsys, expect)
    assert not (ws / "o").exists()


def test_every_command_is_covered():
    from probekit.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    covered = {argv[0] for argv, _ in CASES.values()}
    assert commands <= covered, commands - covered


def test_unwritable_out(ws, capsys):
    ro = ws / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("chmod does not stop this user from writing (root)")
        for argv in (EVAL, PATCH, ATTR, PROBE, REPORT):
            refuses([*argv, "--out", "{ws}/ro/out"], ws, capsys, "is not writable")
    finally:
        ro.chmod(0o700)


def test_a_locked_out_is_refused_at_once(ws, capsys):
    """A second command on a folder another command holds: refused, and the holder's files survive."""
    with io.output_dir(ws / "busy"):
        io.write_json(ws / "busy" / "patch.json", {"first": True})
        for argv in (EVAL, PATCH, ATTR, PROBE, REPORT, TRAIN, CIRC, DAS):
            refuses([*argv, "--out", "{ws}/busy"], ws, capsys, "in use by another probekit command")
    assert json.loads((ws / "busy" / "patch.json").read_text()) == {"first": True}
    assert sorted(os.listdir(ws / "busy")) == ["patch.json"]


def test_attribute_k0_then_the_corrected_rerun_runs(ws, capsys):
    refuses([*ATTR, "--k", "0", "--out", "{ws}/ab"], ws, capsys, "--k must be positive")
    assert not (ws / "ab").exists()
    assert main([*ATTR, "--k", "1", "--n-random", "1", "--out", str(ws / "ab")]) == 0
    assert {"attribute.json", "attribute.csv", "attribute.png", "attribute_topk_vs_random.json"} <= \
        set(os.listdir(ws / "ab"))


def test_eval_out_writes_strict_json_csv_png(ws, capsys):
    assert main([*EVAL, "--out", str(ws / "ev")]) == 0
    assert sorted(os.listdir(ws / "ev")) == ["eval.csv", "eval.json", "eval.png"]
    rec = json.loads((ws / "ev" / "eval.json").read_text())["records"][0]
    assert rec["length"] == 5 and rec["n"] == 4
    assert "wrote eval.csv, eval.json, eval.png" in capsys.readouterr().out


def test_probe_json_has_null_not_nan(ws, capsys):
    """Cells a probe sweep does not fill are NaN in memory: on disk they are null, with the reason."""
    assert main([*PROBE, "--no-controls", "--out", str(ws / "pr")]) == 0

    def no_constants(c):
        raise AssertionError(f"{c} in probe.json")

    d = json.loads((ws / "pr" / "probe.json").read_text(), parse_constant=no_constants)
    assert d["nan_reason"]["extra/shuffled[*][*][*][*]"].startswith("NaN written as null")  # --no-controls
    assert "null" in json.dumps(d["extra"]["shuffled"])
    from probekit.probes import ProbeSweep

    sw = ProbeSweep.from_json((ws / "pr" / "probe.json").read_text())
    assert sw.extra["shuffled"].isnan().all() and not sw.values.isnan().all()
