"""Sweeps: grid validation, jobs on a local Ray, the summary against a hand computation from the job
metrics, skipping finished jobs, resuming a killed one, tables and shipping."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from probekit.cli import main
from probekit.grid import grid_from_dict, load_grid, run_sweep, seed_interval, ship, write_tables
from probekit.tasks import ProbekitError

BASE = {
    "name": "tiny",
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "n_ctx": 24, "positional": "none"},
    "task": {"name": "sorting", "n_values": 8, "default_length": 4},
    "train": {"steps": 30, "batch_size": 16, "lengths": [1, 4], "warmup_steps": 4, "lr": 3e-3,
              "log_every": 10, "checkpoint_every": 10},
}
GRID = {
    "name": "tiny-grid",
    "notes": "two tiny configurations",
    "base": "base.json",
    "configs": [{"name": "a"}, {"name": "b", "model": {"positional": "learned"}, "train": {"steps": 24}}],
    "seeds": [0, 1],
    "eval": {"lengths": [2, 4], "n": 40, "seed": 3},
    "num_cpus": 1,
}
ROOT = Path(__file__).resolve().parent.parent


def write_grid(folder: Path, **changes) -> Path:
    (folder / "base.json").write_text(json.dumps(BASE))
    path = folder / "grid.json"
    path.write_text(json.dumps({**GRID, **changes}))
    return path


@pytest.fixture(scope="module")
def ray_local():
    from probekit.grid import ray_session

    with ray_session(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory):
    """The two jobs of configuration ``a`` run on Ray (module scope: the tests below read them)."""
    d = tmp_path_factory.mktemp("sweep")
    grid = write_grid(d)
    run = run_sweep(grid, d / "out", jobs=["a"], progress=False)
    return grid, d / "out", run


def test_grid_merges_overrides_and_sets_seeds(tmp_path):
    g = load_grid(write_grid(tmp_path))
    conf = g.run_config("b", 1)
    assert conf["model"]["positional"] == "learned" and conf["model"]["n_layers"] == 1
    assert conf["train"]["steps"] == 24 and conf["train"]["lengths"] == [1, 4]
    assert conf["model"]["seed"] == conf["train"]["seed"] == 1 and conf["model"]["d_vocab"] == 13
    assert [j.id for j in g.jobs(tmp_path)] == ["a/seed0", "a/seed1", "b/seed0", "b/seed1"]
    assert [j.id for j in g.jobs(tmp_path, select=["b/seed1", "a"])] == ["a/seed0", "a/seed1", "b/seed1"]
    # an inline hint is dropped by null; objects merge key by key
    hinted = {**BASE, "train": {**BASE["train"], "objectives": {"sort": 1.0, "successor": 1.0}}}
    g2 = grid_from_dict({**GRID, "base": hinted, "configs": [
        {"name": "plain", "train": {"objectives": None}}, {"name": "half", "train": {"objectives": {"successor": 0.5}}}]})
    assert g2.run_config("plain", 0)["train"]["objectives"] is None
    assert g2.run_config("half", 0)["train"]["objectives"] == {"sort": 1.0, "successor": 0.5}


@pytest.mark.parametrize("changes, message", [
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"seeds": [0, 0]}, "distinct integers"),
    ({"seeds": [-1]}, "integers >= 0"),
    ({"seeds": "0,1"}, "seeds must be"),
    ({"configs": [{"name": "a"}, {"name": "a"}]}, "appears twice"),
    ({"configs": [{"name": "a/b"}]}, "names a folder"),
    ({"configs": [{"name": "a", "modle": {}}]}, r"unknown field\(s\) \['modle'\]"),
    ({"configs": [{"name": "a", "model": {"colour": 1}}]}, r"configuration 'a': unknown field\(s\) \['colour'\]"),
    ({"configs": [{"name": "a", "train": {"seed": 4}}]}, "seeds come from the grid"),
    ({"configs": [{"name": "a", "train": {"lengths": [1, 40]}}]}, "training length 40 .* n_ctx is 24"),
    ({"eval": {"lengths": [2, 30], "n": 40}}, "eval length 30 makes 62 tokens"),
    ({"eval": {"lengths": [2], "n": 0}}, "eval.n must be a positive integer"),
    ({"base": "nowhere.json"}, "nowhere.json not found"),
    ({"eval": {"lengths": [2], "n": 4, "place_offsets": "all"}},
     r"eval.place_offsets \('train' or a list\) must be a non-empty list of distinct integers >= 0, got 'all'"),
    ({"eval": {"lengths": [2], "n": 4, "place_offsets": [0, 0]}}, "must be a non-empty list of distinct integers"),
    ({"eval": {"lengths": [2], "n": 4, "place_offsets": "train"}},
     "configuration 'a': place_offsets needs a positional='place' model, got positional='none'"),
    ({"configs": [{"name": "p", "model": {"positional": "place", "place_tokens": 8}}],
      "eval": {"lengths": [2, 4], "n": 4, "place_offsets": [0, 30]}},
     "configuration 'p': place offset 30 puts digit rows up to 32, past the place table of 24 rows .*at length 2"),
    ({"num_cpus": 0}, "num_cpus must be a positive integer"),
])
def test_bad_grids_are_refused(tmp_path, changes, message):
    with pytest.raises(ProbekitError, match=message):
        load_grid(write_grid(tmp_path, **changes))


def test_missing_fields_and_unknown_jobs(tmp_path):
    path = write_grid(tmp_path)
    d = json.loads(path.read_text())
    del d["seeds"]
    (tmp_path / "g2.json").write_text(json.dumps(d))
    with pytest.raises(ProbekitError, match=r"missing field\(s\) \['seeds'\]"):
        load_grid(tmp_path / "g2.json")
    with pytest.raises(ProbekitError, match=r"unknown job\(s\) \['c'\]"):
        run_sweep(path, tmp_path / "out", jobs=["c"], dry_run=True)


def test_cli_bad_grid_is_one_error_line(tmp_path, capsys):
    path = write_grid(tmp_path, configs=[{"name": "a"}, {"name": "a"}])
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "appears twice" in err[0]
    assert main(["sweep", str(write_grid(tmp_path)), "--out", str(tmp_path / "out"), "--jobs", "zz"]) == 2
    assert "unknown job(s) ['zz']" in capsys.readouterr().err


def test_dry_run_lists_jobs_and_writes_nothing(tmp_path, capsys):
    path = write_grid(tmp_path)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 job(s)" in out and all(f"{c}/seed{s}" in out for c in "ab" for s in (0, 1)) and "new" in out
    assert not (tmp_path / "out").exists()


def test_every_zoo_grid_validates(capsys):
    grids = sorted((ROOT / "analyses" / "zoo").glob("*.json"))
    assert {"sort-extrap.json", "sort-hint-controls.json", "sort-hint-grid.json", "mult-nx1.json"} <= {p.name for p in grids}
    for path in grids:
        g = load_grid(path)
        assert run_sweep(path, ROOT / "runs" / "never" / g.name, dry_run=True).states
    assert len(load_grid(ROOT / "analyses" / "zoo" / "sort-hint-grid.json").configs) <= 8


SHIPPED_FROM = {("sort-zoo", c): c for c in ("sort-baseline", "sort-baseline-temp", "sort-learned-pos",
                                              "sort-predecessor", "sort-successor")} | {
    ("mult-3x3", "mult-3x3-v4"): "mult-3x3", ("mult-3x3", "mult-3x3-forward-v2"): "mult-3x3-forward",
    ("mult-extrap", "mult-extrap-v3"): "mult-extrap", ("mult-5x1", "mult-5x1"): "mult-5x1",
    ("sort-extrap", "nope"): "sort-extrap", ("sort-extrap", "learned-pos"): "sort-extrap-learned-pos"}


@pytest.mark.parametrize("grid, config", sorted(SHIPPED_FROM))
def test_zoo_grids_hold_the_shipped_recipes(grid, config):
    """Seed 0 of the job a shipped model came from is that model's own run config (so a sweep
    adopts the model folder as the finished job), and another configuration's is not."""
    from dataclasses import replace

    from probekit.grid import trained_as
    from probekit.model import MODELS_DIR

    g = load_grid(ROOT / "analyses" / "zoo" / f"{grid}.json")
    folder = MODELS_DIR / SHIPPED_FROM[grid, config]
    if not folder.is_dir():
        pytest.skip(f"{folder.name} is not shipped")
    jobs = {j.config: j for j in g.jobs(ROOT / "runs", select=None) if j.seed == 0}
    assert trained_as(replace(jobs[config], dir=str(folder)))
    others = [c for c in jobs if c != config]
    assert not any(trained_as(replace(jobs[c], dir=str(folder))) for c in others)


def test_seed_interval_one_and_many():
    assert seed_interval([0.5], (0.3, 0.7)) == (0.5, 0.3, 0.7, "Wilson, 1 seed")
    mean, lo, hi, method = seed_interval([0.2, 0.4, 0.9])
    sd = math.sqrt(((0.2 - 0.5) ** 2 + (0.4 - 0.5) ** 2 + (0.9 - 0.5) ** 2) / 2)
    assert mean == pytest.approx(0.5) and method == "t over 3 seeds"
    assert hi == pytest.approx(min(1.0, 0.5 + 4.302652729911275 * sd / math.sqrt(3)))  # t_{0.975, 2}
    assert lo == 0.0  # clipped


def test_both_jobs_finish_and_summary_matches_the_metrics(swept):
    _, out, run = swept
    assert not run.failed and sorted(r["job"] for r in run.ran) == ["a/seed0", "a/seed1"]
    metrics = [json.loads((out / "a" / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert all(m["seed"] == 3 and [r["length"] for r in m["records"]] == [2, 4] for m in metrics)
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["config", "length", "seeds"] and len(rows) == 3  # b was not run
    import csv

    table = list(csv.DictReader((out / "summary.csv").open()))
    t975 = math.tan(math.pi * 0.475)  # t quantile with one degree of freedom (Cauchy)
    for row, L in zip(table, (2, 4), strict=True):
        a, b = (next(r["exact_match"] for r in m["records"] if r["length"] == L) for m in metrics)
        h = t975 * abs(a - b) / math.sqrt(2) / math.sqrt(2)
        assert row["config"] == "a" and int(row["length"]) == L and row["seeds"] == "2"
        assert float(row["exact_match_mean"]) == pytest.approx((a + b) / 2)
        assert float(row["ci_low"]) == pytest.approx(max(0.0, (a + b) / 2 - h))
        assert float(row["ci_high"]) == pytest.approx(min(1.0, (a + b) / 2 + h))
        assert row["interval"] == "t over 2 seeds"
    secs = [json.loads((out / "a" / f"seed{s}" / "config.json").read_text())["train"]["extra"]["train_seconds"]
            for s in (0, 1)]
    assert float(table[0]["train_seconds_mean"]) == pytest.approx(sum(secs) / 2)
    md = (out / "summary.md").read_text()
    assert "| a | (base) | 2/2 |" in md and "| b | model.positional=\"learned\", train.steps=24 | 0/2 |" in md


def test_rerun_skips_finished_jobs(swept):
    grid, out, _ = swept
    files = [out / "a" / f"seed{s}" / f for s in (0, 1) for f in ("model.safetensors", "metrics.json")]
    before = [p.stat().st_mtime_ns for p in files]
    run = run_sweep(grid, out, jobs=["a"], progress=False)
    assert run.ran == [] and set(run.states.values()) == {"done"}
    assert [p.stat().st_mtime_ns for p in files] == before


def test_a_killed_job_resumes_from_its_checkpoint(swept, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from probekit.grid import parse_run
    from probekit.model import load_model
    from probekit.train import CHECKPOINT, checkpoint_meta, train

    grid, out, _ = swept
    job = load_grid(grid).jobs(out, select=["b/seed0"])[0]
    mcfg, task, tcfg = parse_run(job.run)
    train(mcfg, task, tcfg, out=job.dir, progress=False, stop_after=10)  # as a kill after 10 steps would leave it
    ckpt = Path(job.dir) / CHECKPOINT
    with safe_open(str(ckpt), framework="pt") as f:  # mark the first part: its recorded time is 1000 s
        meta = f.metadata()
    save_file(load_file(str(ckpt)), str(ckpt), metadata=meta | {"elapsed_s": "1000.0"})
    assert checkpoint_meta(ckpt)["elapsed_s"] == 1000.0
    assert run_sweep(grid, out, jobs=["b/seed0"], dry_run=True).states == {"b/seed0": "resume at step 10"}
    run = run_sweep(grid, out, jobs=["b/seed0"], progress=False)
    assert run.ran[0]["state"] == "resume at step 10" and not ckpt.exists()
    conf = json.loads((Path(job.dir) / "config.json").read_text())
    assert conf["train"]["extra"]["train_seconds"] >= 1000.0  # the time of the first part counts: it resumed
    resumed = load_model(job.dir)[0].state_dict()
    unbroken = train(mcfg, task, tcfg, progress=False).state_dict()
    assert all(torch.allclose(resumed[k], v, atol=1e-6) for k, v in unbroken.items())
    assert "| b |" in (out / "summary.md").read_text() and "1/2" in (out / "summary.md").read_text()


def test_other_run_configs_and_foreign_folders_are_refused(swept, tmp_path):
    grid, out, _ = swept
    changed = write_grid(tmp_path, configs=[{"name": "a", "train": {"steps": 31}}, GRID["configs"][1]])
    with pytest.raises(ProbekitError, match="job a/seed0 .* was started from another run config"):
        run_sweep(changed, out, dry_run=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ProbekitError, match=r"holds \[.notes.txt.\] and no sweep.json"):
        run_sweep(grid, tmp_path / "mine", dry_run=True)


def test_tables_and_ship(swept, tmp_path, capsys):
    grid, out, _ = swept
    doc = tmp_path / "doc.md"
    doc.write_text("# The model sweep\n\nintro\n")
    assert main(["sweep", str(grid), "--out", str(out), "--tables", str(doc)]) == 0
    write_tables(out, doc)  # a second time replaces the section
    text = doc.read_text()
    assert text.startswith("# The model sweep\n\nintro\n") and text.count("<!-- sweep tiny-grid -->") == 1
    assert "## Sweep `tiny-grid`" in text and "| a | (base) | 2/2 |" in text
    dst = ship(out / "a" / "seed1", "tiny-shipped", models_dir=tmp_path / "models")
    conf = json.loads((dst / "config.json").read_text())
    metrics = json.loads((dst / "metrics.json").read_text())
    assert conf["name"] == "tiny-shipped" and metrics["command"].startswith("probekit eval --model tiny-shipped ")
    assert (dst / "model.safetensors").read_bytes() == (out / "a" / "seed1" / "model.safetensors").read_bytes()
    with pytest.raises(ProbekitError, match="already holds a model"):
        ship(out / "a" / "seed1", "tiny-shipped", models_dir=tmp_path / "models")


def test_a_folder_of_model_folders_is_adopted_iftrained_as_the_job(swept, tmp_path):
    import shutil

    grid, out, _ = swept
    adopt = tmp_path / "adopt"
    shutil.copytree(out / "a" / "seed0", adopt / "a" / "seed0")
    run = run_sweep(grid, adopt, jobs=["a/seed0"], progress=False)
    assert run.states == {"a/seed0": "done"} and run.ran == [] and (adopt / "sweep.json").exists()
    assert "| a | (base) | 1/2 |" in (adopt / "summary.md").read_text()
    shutil.copytree(out / "a" / "seed0", tmp_path / "other" / "a" / "seed0")
    changed = write_grid(tmp_path, configs=[{"name": "a", "model": {"positional": "learned"}}])
    with pytest.raises(ProbekitError, match="job a/seed0 .* was trained from another run config"):
        run_sweep(changed, tmp_path / "other", dry_run=True)


def test_new_eval_settings_reevaluate_and_a_failed_job_does_not_stop_the_rest(swept, tmp_path, capsys):
    grid, out, _ = swept
    model = out / "a" / "seed0" / "model.safetensors"
    before = model.stat().st_mtime_ns
    broken = out / "b" / "seed1"
    broken.mkdir(parents=True)
    (broken / "checkpoint.safetensors").write_bytes(b"not a safetensors file")
    d = json.loads(Path(grid).read_text())
    changed = write_grid(tmp_path, eval={**d["eval"], "n": 20})
    assert main(["sweep", str(changed), "--out", str(out), "--jobs", "a,b/seed1"]) == 1
    text = capsys.readouterr().out
    assert "a/seed0  ran (evaluate)" in text and "failed b/seed1: " in text
    assert model.stat().st_mtime_ns == before  # evaluated again, not retrained
    metrics = json.loads((out / "a" / "seed0" / "metrics.json").read_text())
    assert all(r["n"] == 20 for r in metrics["records"])
    assert "| a | (base) | 2/2 |" in (out / "summary.md").read_text()


def test_threads_sets_the_jobs_torch_threads_and_is_checked(swept, tmp_path):
    """--threads reaches the job: run_job sets torch's threads from it, and the job finishes."""
    from dataclasses import replace

    from probekit.grid import run_job

    grid, out, _ = swept
    with pytest.raises(ProbekitError, match="threads must be a positive integer, got 0"):
        run_sweep(grid, tmp_path / "t", threads=0, dry_run=True)
    job = load_grid(grid).jobs(tmp_path / "t", select=["a/seed0"])[0]
    before = torch.get_num_threads()
    try:
        run_job(replace(job, threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert [r["length"] for r in json.loads((Path(job.dir) / "metrics.json").read_text())["records"]] == list(job.lengths)


def test_archive_holds_the_records_and_tables_keep_earlier_rows(swept, tmp_path, capsys):
    """An archive (no weights) gives the same table as the sweep folder; a configuration missing from
    it keeps its earlier row, with a note, and a second archive merges."""
    grid, out, _ = swept
    arch = tmp_path / "arch"
    assert main(["sweep", str(grid), "--out", str(out), "--archive", str(arch)]) == 0
    assert "archived 2 finished job(s)" in capsys.readouterr().out
    assert not list(arch.rglob("*.safetensors")) and (arch / "a" / "seed1" / "metrics.json").exists()
    from_out, from_arch = tmp_path / "out.md", tmp_path / "arch.md"
    write_tables(out, from_out)
    write_tables(arch, from_arch)
    assert from_arch.read_text() == from_out.read_text() and "| a | (base) | 2/2 |" in from_arch.read_text()
    # a sweep folder without configuration a: its row is kept from the earlier table, and said so
    (tmp_path / "empty").mkdir()
    import shutil

    shutil.copyfile(out / "sweep.json", tmp_path / "empty" / "sweep.json")
    write_tables(tmp_path / "empty", from_arch)
    text = from_arch.read_text()
    assert "| a | (base) | 2/2 |" in text and "| b | " in text and "not run" in text
    assert "Rows kept from the earlier table" in text and "`a`" in text.split("Rows kept")[1]
    # archiving again merges; a foreign archive is refused; --archive with --jobs is one error line
    from probekit.grid import archive

    assert archive(out, arch) == ["a/seed0", "a/seed1"]
    assert sorted(json.loads((arch / "sweep.json").read_text())["jobs"]) == ["a/seed0", "a/seed1"]
    other = json.loads((arch / "sweep.json").read_text())
    other["grid"]["name"] = "other"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "sweep.json").write_text(json.dumps(other))
    with pytest.raises(ProbekitError, match="archives sweep 'other', not 'tiny-grid'"):
        archive(out, tmp_path / "foreign")
    assert main(["sweep", str(grid), "--out", str(out), "--archive", str(arch), "--jobs", "a"]) == 2


def test_ship_records_only_checks_the_recipe_and_says_whether_the_run_is_the_jobs(swept, tmp_path):
    """analyses/ship.py --records-only: a shipped folder of another recipe is refused; an equal recipe with other
    metrics (an earlier run) is told apart from the job itself; an archive's regenerating command trains first."""
    import shutil
    from argparse import Namespace

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "analyses"))
    import ship

    grid, out, _ = swept
    arch = tmp_path / "arch"
    assert main(["sweep", str(grid), "--out", str(out), "--archive", str(arch)]) == 0
    assert ship._same_run(out / "a" / "seed0", arch / "a" / "seed0")
    with pytest.raises(ProbekitError, match="another recipe"):
        ship._same_run(out / "a" / "seed0", arch / "a" / "seed1")
    earlier = tmp_path / "earlier"
    shutil.copytree(arch / "a" / "seed0", earlier)
    metrics = json.loads((earlier / "metrics.json").read_text())
    metrics["records"][0]["exact_match"] = 1.0 - metrics["records"][0]["exact_match"]
    (earlier / "metrics.json").write_text(json.dumps(metrics))
    assert not ship._same_run(earlier, arch / "a" / "seed0")
    args = Namespace(grid=str(grid), out=str(arch), config="a")
    assert ship._command(args, arch / "a" / "seed0").splitlines()[1].endswith(f"--archive {arch}")
    assert "--archive" not in ship._command(Namespace(grid=str(grid), out=str(out), config="a"), out / "a" / "seed0")


def test_cpus_replaces_the_grids_num_cpus_on_ray(swept, tmp_path):
    """--cpus reaches Ray's reservation: the grid asks for 1 CPU per job, cpus=3 asks a 2-CPU cluster for
    more than it has (refused before any job starts), and cpus=0 is refused as a count."""
    grid, _, _ = swept
    with pytest.raises(ProbekitError, match="cpus must be a positive integer, got 0"):
        run_sweep(grid, tmp_path / "c", cpus=0, dry_run=True)
    with pytest.raises(ProbekitError, match="a job asks for 3 CPUs but the Ray cluster has 2"):
        run_sweep(grid, tmp_path / "c", jobs=["a/seed0"], cpus=3, progress=False)
    assert not (tmp_path / "c" / "a" / "seed0" / "metrics.json").exists()


PLACE_CONFIG = {"name": "p", "model": {"positional": "place", "place_tokens": 8, "place_offset_max": 3}}


def test_place_offsets_in_the_eval_block_reevaluate_a_finished_job(tmp_path):
    from probekit.evaluate import evaluate
    from probekit.grid import job_state, run_job
    from probekit.model import load_model

    ev = {"lengths": [2, 4], "n": 8, "seed": 3}
    job = load_grid(write_grid(tmp_path, configs=[PLACE_CONFIG], seeds=[0], eval=ev)).jobs(tmp_path / "out")[0]
    assert run_job(job)["state"] == "new" and job_state(job) == "done"
    folder = Path(job.dir)
    before = (folder / "model.safetensors").stat().st_mtime_ns
    grid = load_grid(write_grid(tmp_path, configs=[PLACE_CONFIG], seeds=[0], eval=ev | {"place_offsets": "train"}))
    assert grid_from_dict(grid.to_dict()).place_offsets == "train"  # sweep.json keeps the setting
    ens = grid.jobs(tmp_path / "out")[0]
    assert job_state(ens) == "evaluate"
    assert run_job(ens)["state"] == "evaluate" and job_state(ens) == "done" and job_state(job) == "evaluate"
    assert (folder / "model.safetensors").stat().st_mtime_ns == before  # evaluated again, not retrained
    m = json.loads((folder / "metrics.json").read_text())
    assert m["place_offsets"] == "train" and [r["place_offsets"] for r in m["records"]] == [[0, 1, 2, 3]] * 2
    assert m["command"].endswith("--save-metrics --place-offsets train")
    model, task, _ = load_model(folder)
    want = evaluate(model, task, [2, 4], n=8, seed=3, place_offsets=[0, 1, 2, 3])
    assert [r["exact_match"] for r in m["records"]] == [r["exact_match"] for r in want.records]
