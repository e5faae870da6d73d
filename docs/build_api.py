"""Build docs/api.md, the API reference, from the docstrings of probekit's public modules.

    .venv/bin/python docs/build_api.py            # write docs/api.md
    .venv/bin/python docs/build_api.py --check    # exit 1 if docs/api.md is stale or a public name lacks a docstring
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

MODULES = [
    "probekit",
    "probekit.tasks.base",
    "probekit.tasks.sorting",
    "probekit.tasks.multiplication",
    "probekit.model",
    "probekit.train",
    "probekit.forward",
    "probekit.evaluate",
    "probekit.results",
    "probekit.io",
    "probekit.activations",
    "probekit.probes",
    "probekit.metrics",
    "probekit.corruptions",
    "probekit.patching",
    "probekit.attribution",
    "probekit.circuits",
    "probekit.edges",
    "probekit.interventions",
    "probekit.groundtruth",
    "probekit.viz",
    "probekit.stats",
    "probekit.studies",
    "probekit.studies.sorting",
    "probekit.compare",
    "probekit.grid",
    "probekit.checks",
    "probekit.report",
    "probekit.commands",
]
OUT = Path(__file__).resolve().parent / "api.md"


def _public(mod) -> list[tuple[str, object]]:
    names = getattr(mod, "__all__", None)
    items = []
    for name, obj in vars(mod).items():
        if name.startswith("_") or (names is not None and name not in names):
            continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        home = getattr(obj, "__module__", None) or ""
        in_package = names is not None and hasattr(mod, "__path__") and home.startswith(mod.__name__ + ".")
        if home != mod.__name__ and not in_package:  # a package documents what its __all__ re-exports
            continue
        items.append((name, obj))
    return items


def _sig(obj) -> str:
    try:
        return re.sub(r" at 0x[0-9a-f]+>", ">", str(inspect.signature(obj)))  # default functions: no addresses
    except (TypeError, ValueError):
        return "(...)"


def build() -> tuple[str, list[str]]:
    """The markdown text, and the public names that have no docstring."""
    lines = ["# API reference", "", "Generated from the docstrings by `.venv/bin/python docs/build_api.py`; "
             "do not edit by hand.", ""]
    undocumented = []
    for modname in MODULES:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError:
            continue
        lines += [f"## `{modname}`", "", inspect.cleandoc(mod.__doc__ or ""), ""]
        for name, obj in _public(mod):
            doc = inspect.getdoc(obj)
            if not doc:
                undocumented.append(f"{modname}.{name}")
                doc = ""
            kind = "class" if inspect.isclass(obj) else "def"
            lines += [f"### `{kind} {name}{_sig(obj)}`", "", doc, ""]
            if inspect.isclass(obj):
                for mname, meth in vars(obj).items():
                    if mname.startswith("_") or not (inspect.isfunction(meth) or isinstance(meth, classmethod | property)):
                        continue
                    f = meth.__func__ if isinstance(meth, classmethod) else meth.fget if isinstance(meth, property) else meth
                    mdoc = inspect.getdoc(f)
                    if mdoc:
                        sig = "" if isinstance(meth, property) else _sig(f)
                        lines += [f"- `{name}.{mname}{sig}`: {mdoc.splitlines()[0]}"]
                lines.append("")
    return "\n".join(lines).rstrip() + "\n", undocumented


def main(argv: list[str]) -> int:
    text, undocumented = build()
    if "--check" in argv:
        stale = not OUT.exists() or OUT.read_text() != text
        if stale:
            print("docs/api.md is stale: run .venv/bin/python docs/build_api.py")
        if undocumented:
            print("public names without a docstring: " + ", ".join(undocumented))
        return int(stale or bool(undocumented))
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines; {len(undocumented)} undocumented)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
