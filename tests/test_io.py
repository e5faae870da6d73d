"""probekit.io: atomic writes, strict JSON, the --out lock and staged output folders."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from probekit import io
from probekit.results import Result
from probekit.tasks import ProbekitError


def test_atomic_write_leaves_no_temp_file(tmp_path):
    p = io.write_text(tmp_path / "a.txt", "hello")
    assert p.read_text() == "hello" and os.listdir(tmp_path) == ["a.txt"]
    io.write_text(p, "again")
    assert p.read_text() == "again" and os.listdir(tmp_path) == ["a.txt"]


def test_a_writer_that_raises_leaves_the_old_file_and_no_temp(tmp_path):
    p = io.write_text(tmp_path / "a.txt", "complete")

    def half(tmp):
        tmp.write_text("half of a fi")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        io.atomic_write(p, half)
    assert p.read_text() == "complete" and os.listdir(tmp_path) == ["a.txt"]
    with pytest.raises(RuntimeError):
        io.atomic_write(tmp_path / "new.txt", half)
    assert os.listdir(tmp_path) == ["a.txt"]  # never a partial new file


def test_json_nan_becomes_null_with_a_reason(tmp_path):
    obj = {"values": [[1.0, float("nan")], [float("inf"), 2.0]], "clean": float("-inf"), "ok": 3}
    p = io.write_json(tmp_path / "r.json", obj)
    text = p.read_text()
    assert "NaN" not in text.replace("NaN written", "") and "Infinity" not in text.replace("Infinity written", "")
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    assert back["values"] == [[1.0, None], [None, 2.0]] and back["clean"] is None and back["ok"] == 3
    assert back["nan_reason"] == {"values[*][*]": "NaN written as null (1 entry); Infinity written as null (1 entry)",
                                  "clean": "-Infinity written as null (1 entry)"}
    assert "nan_reason" not in json.loads(io.dumps_json({"a": 1.0}))


def test_result_json_round_trips_nan(tmp_path):
    r = Result("k", torch.tensor([[1.0, float("nan")], [0.5, 2.0]]), ("layer", "head"),
               extra={"stderr": torch.tensor([[float("nan"), 0.1], [0.2, 0.3]])})
    s = r.to_json(tmp_path / "r.json")
    json.loads(s, parse_constant=lambda c: pytest.fail(c))
    back = Result.from_json((tmp_path / "r.json").read_text())
    assert back == r and math.isnan(back.extra["stderr"][0, 0])


def test_prepare_out_refuses_before_writing(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for bad, msg in ((f, "is a file"), (f / "sub", "under the file")):
        with pytest.raises(ProbekitError, match=msg):
            io.prepare_out(bad)
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("mine")
    with pytest.raises(ProbekitError, match="not empty"):
        io.prepare_out(full)
    assert io.prepare_out(full, overwrite=True) == full
    assert sorted(os.listdir(tmp_path)) == ["file.txt", "full"]


def test_prepare_out_refuses_an_unwritable_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("chmod does not stop this user from writing (root)")
        with pytest.raises(ProbekitError, match="not writable"):
            io.prepare_out(ro / "out")
    finally:
        ro.chmod(0o700)


def test_output_dir_commits_together_or_not_at_all(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError), io.output_dir(out):
        io.write_json(out / "a.json", {"x": 1})
        io.write_json(out / "probes" / "h" / "p.json", {"x": 1})
        assert not (out / "a.json").exists()  # staged, not yet visible
        raise RuntimeError("the command failed")
    assert not (tmp_path / "new").exists()  # created folders are removed again
    with io.output_dir(out):
        io.write_json(out / "a.json", {"x": 1})
        io.write_json(out / "a.json", {"x": 2})
    assert os.listdir(out) == ["a.json"] and json.loads((out / "a.json").read_text()) == {"x": 2}
    with pytest.raises(ProbekitError, match="not empty"), io.output_dir(out):
        pass
    with pytest.raises(RuntimeError), io.output_dir(out, overwrite=True):
        io.write_json(out / "a.json", {"x": 3})
        raise RuntimeError
    assert json.loads((out / "a.json").read_text()) == {"x": 2} and os.listdir(out) == ["a.json"]


def test_lock_is_exclusive_across_processes_and_released(tmp_path):
    out = tmp_path / "out"
    code = ("import sys; from probekit import io\n"
            "try:\n    with io.output_dir(sys.argv[1]): pass\n"
            "except io.ProbekitError as e:\n    print(e); sys.exit(2)\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    with io.output_dir(out):
        assert (out / io.LOCK_NAME).exists()
        with pytest.raises(ProbekitError, match="in use by another probekit command"), io.lock_dir(out):
            pass  # a second lock in this process (another file description) is refused too
        r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and "in use by another probekit command" in r.stdout, r
    assert os.listdir(out) == []  # the lock file is gone with the lock
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r


def test_a_stale_lock_file_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / io.LOCK_NAME).write_text("")  # what a killed command leaves: the file, not the lock
    with io.output_dir(out):
        io.write_text(out / "a.txt", "a")
    assert os.listdir(out) == ["a.txt"]


def test_numpy_scalars_are_written_as_numbers():
    """A study's numbers are often numpy scalars: they are written as JSON numbers (NaN as null, noted)."""
    import numpy as np

    from probekit.io import dumps_json

    d = json.loads(dumps_json({"n": np.int64(3), "x": np.float32(0.5), "bad": np.float64("nan"), "ok": [np.bool_(True)]}))
    assert d["n"] == 3 and d["x"] == 0.5 and d["bad"] is None and d["ok"] == [True] and "bad" in d["nan_reason"]
