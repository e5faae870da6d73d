"""The notebooks: jupytext percent-format sources (``notebooks/*.py``), each paired with the ``.ipynb`` that
jupytext writes from it, committed without outputs; and every one runs.

After editing a source, regenerate its notebook (``--update`` keeps the cell ids):

    .venv/bin/jupytext --update --to ipynb notebooks/01_quickstart.py

Each notebook is executed with nbclient at toy scale (``PROBEKIT_NB_SMALL=1``, one thread) in a kernel
that runs this interpreter; any cell error fails the test. A notebook is skipped only when a shipped
model it needs is absent from the models folder (``models/``, or ``PROBEKIT_MODELS``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

from probekit.model import MODELS_DIR, shipped_models

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NEEDS = {  # notebook -> shipped models it cannot run without
    "01_quickstart": ("sort-baseline",),
    "02_carry_mechanism": ("mult-5x1",),
    "03_hint_mechanism": ("sort-baseline", "sort-successor"),
    "04_bring_your_own_model": (),
    "05_sorting_failure": ("sort-baseline", "sort-baseline-temp", "sort-extrap"),
}
KERNEL = "probekit-test"


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)


def _paired(name: str, source: str) -> str:
    """The .ipynb text jupytext writes from ``source`` (a percent-format script), with the committed notebook's
    cell ids (jupytext gives a new cell a random id; ``--update`` keeps the existing ones)."""
    import jupytext

    nb = jupytext.reads(source, fmt="py:percent")
    ids = [c.id for c in _read(name).cells]
    assert len(ids) == len(nb.cells), f"{name}.ipynb has {len(ids)} cells, its source {len(nb.cells)}; {_HINT}"
    for cell, cell_id in zip(nb.cells, ids, strict=True):
        cell.id = cell_id
    return jupytext.writes(nb, fmt="ipynb").rstrip("\n")


_HINT = "regenerate it: .venv/bin/jupytext --update --to ipynb notebooks/NAME.py"


def test_every_notebook_is_listed():
    assert sorted(p.stem for p in NB_DIR.glob("*.ipynb")) == sorted(NEEDS)
    assert sorted(p.stem for p in NB_DIR.glob("*.py")) == sorted(NEEDS)


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_committed_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for c in code:
        assert c.outputs == [], f"{name}: cell {c.id} was committed with outputs"
        assert c.execution_count is None, f"{name}: cell {c.id} was committed with an execution count"
    assert "PROBEKIT_NB_SMALL" in code[0].source, f"{name}: the first code cell must read the size knob"


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_ipynb_is_what_jupytext_writes_from_its_source(name):
    source = (NB_DIR / f"{name}.py").read_text()
    committed = (NB_DIR / f"{name}.ipynb").read_text().rstrip("\n")
    assert _paired(name, source) == committed, f"{name}.ipynb differs from {name}.py; {_HINT}"


def test_pairing_check_catches_an_edited_source():
    source = (NB_DIR / "01_quickstart.py").read_text()
    edited = source.replace("N_EVAL = 32 if SMALL", "N_EVAL = 33 if SMALL", 1)
    assert edited != source
    assert _paired("01_quickstart", edited) != (NB_DIR / "01_quickstart.ipynb").read_text().rstrip("\n")


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> str:
    """A kernelspec that runs this interpreter (so the kernel sees this environment's probekit)."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("kernel")
    install(kernel_name=KERNEL, prefix=str(prefix))
    spec = prefix / "share" / "jupyter" / "kernels" / KERNEL / "kernel.json"
    assert sys.executable in spec.read_text()
    return str(prefix / "share" / "jupyter")


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_notebook_runs(name, kernel_path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    missing = [m for m in NEEDS[name] if m not in shipped_models()]
    if missing:
        pytest.skip(f"{name} needs shipped model(s) {missing}, not found in {MODELS_DIR}")
    for k, v in {"PROBEKIT_NB_SMALL": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                 "PROBEKIT_NB_OUT": str(tmp_path), "JUPYTER_PATH": kernel_path}.items():
        monkeypatch.setenv(k, v)
    nb = _read(name)
    client = NotebookClient(nb, timeout=600, kernel_name=KERNEL, allow_errors=False,
                            resources={"metadata": {"path": str(NB_DIR)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert figures, f"{name} displayed no figure"
    assert (tmp_path / name).is_dir(), f"{name} did not write under PROBEKIT_NB_OUT"
