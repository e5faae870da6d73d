"""Small CLI behaviours: ``--config`` takes a shipped model's name; ``patch`` prints only rows that say something;
`Result.to_xarray`."""

from __future__ import annotations

import json

import pytest
import torch

import probekit.model as pm
from probekit.cli import main
from probekit.commands import config_path
from probekit.results import Result
from probekit.tasks import ProbekitError

TINY = {"name": "tiny", "model": {"n_layers": 1, "d_model": 16, "n_heads": 2, "n_ctx": 40},
        "task": {"name": "sorting", "n_values": 10}, "train": {"steps": 4, "batch_size": 4, "lengths": [2, 4],
                                                              "log_every": 1}}


def test_config_is_a_path_or_a_shipped_models_name(tmp_path, monkeypatch):
    shelf = tmp_path / "models"
    (shelf / "tiny").mkdir(parents=True)
    (shelf / "tiny" / "config.json").write_text(json.dumps(TINY))
    monkeypatch.setattr(pm, "MODELS_DIR", shelf)
    assert config_path("tiny") == shelf / "tiny" / "config.json"
    own = tmp_path / "own.json"
    own.write_text(json.dumps(TINY))
    assert config_path(own) == own
    with pytest.raises(ProbekitError, match=r"neither a file nor a shipped model; expected a JSON config or one of \['tiny'\]"):
        config_path("tinyy")
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["d_model"] == 16
    assert (tmp_path / "run" / "train_log.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif("mult-5x1" not in pm.shipped_models(), reason="needs the shipped model mult-5x1")
def test_patch_table_leaves_out_rows_that_print_as_zero(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["patch", "--model", "mult-5x1", "--corruption", "carry-flip", "--n", "16", "--top", "10",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    res = Result.from_json((out / "patch.json").read_text())
    shown = [v for _, v in res.top(10) if abs(v) >= 5e-5]
    rows = [ln for ln in printed if ln.startswith("  layer")]
    assert len(rows) == len(shown) and 0 < len(rows) < 10
    assert not any(ln.rstrip().endswith(("+0.0000", "-0.0000")) for ln in rows)
    assert f"(every other component: 0.0000; {len(rows)} non-zero shown)" in printed[len(rows) + 1]


def test_to_xarray_keeps_axes_labels_and_extra():
    xr = pytest.importorskip("xarray")
    r = Result("patch_z", torch.arange(6.0).reshape(2, 3), ("layer", "head"), {"head": ["a", "b", "c"]},
               {"metric": "logit-diff"}, {"raw": torch.ones(2, 3), "other": torch.zeros(4)})
    ds = r.to_xarray()
    assert isinstance(ds, xr.Dataset) and set(ds.data_vars) == {"value", "raw"}
    da = ds["value"]
    assert da.dims == ("layer", "head") and list(da["head_label"].values) == ["a", "b", "c"]
    assert float(da.sel(layer=1, head=2)) == 5.0 and ds.attrs["settings"] == {"metric": "logit-diff"}
    plain = Result("x", torch.ones(3), ("pos",)).to_xarray()
    assert isinstance(plain, xr.DataArray) and plain.name == "value"
    frame = r.to_frame()  # the same cells as the long frame
    assert sorted(frame["value"].tolist()) == sorted(da.values.reshape(-1).tolist())


def test_to_xarray_without_xarray_says_so(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_xarray(name, *a, **k):
        if name == "xarray":
            raise ImportError("no xarray")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_xarray)
    with pytest.raises(ProbekitError, match="needs xarray; install it with: pip install xarray"):
        Result("x", torch.ones(2), ("a",)).to_xarray()
