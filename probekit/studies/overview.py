"""The overview: accuracy vs length of every shipped model."""

from __future__ import annotations

from probekit.studies.common import Study, _metrics, _pct


def overview() -> Study:
    """Accuracy vs length of every shipped model (from its metrics.json, written by `probekit eval`)."""
    from probekit.evaluate import EvalResult
    from probekit.model import shipped_models

    st = Study("overview", "Extrapolation overview")
    rows = []
    for name in shipped_models():
        m = _metrics(name)
        if m is None:
            continue
        res = EvalResult(**{k: m[k] for k in ("model", "task", "seed", "records")})
        for r in res.records:
            rows.append({"model": name, "length": r["length"], "exact_match": r["exact_match"],
                         "ci_low": r["exact_match_ci95"][0], "ci_high": r["exact_match_ci95"][1]})
        st.claim(f"{name}: " + ", ".join(f"{r['length']}: {_pct(r['exact_match'])}" for r in res.records) + ".",
                 m.get("command", f"probekit eval --model {name}"))
    st.tables["accuracy"] = rows
    return st
