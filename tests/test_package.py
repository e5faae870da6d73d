"""Packaging: cheap import, the curated API resolves, the API reference is current, lint-level promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_is_cheap_and_has_no_side_effects():
    code = "import sys, probekit; print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_public_api_resolves():
    import probekit

    for name in probekit.__all__:
        assert getattr(probekit, name) is not None


def test_api_reference_is_current_and_complete():
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "build_api.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_pickles_in_the_tree():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert not [f for f in files if f.endswith((".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin"))]


def test_distribution_name_is_not_probekit():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'name = "probekit-interp"' in text and 'probekit = "probekit.cli:main"' in text


MAX_FUNCTION_LINES = 60


def test_no_long_functions():
    """No function or method in probekit/ is over 60 lines (decorators excluded, docstring included)."""
    import ast

    long = []
    for path in sorted((ROOT / "probekit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(long)
