"""The overview: accuracy vs length of every shipped model, and the published accuracy results checked on them.

Each check in `CHECKS` is a published claim turned into a hypothesis about one of our models: greedy exact
match at one length (from the model's ``metrics.json``, written by `probekit eval`) against a threshold,
judged from the 95 % Wilson interval (`probekit.stats.judge`). The thresholds follow one rule, taken from the
papers and not from our numbers: a paper's "X %" (a success) becomes "exact match >= X - 5 points"; its
"< X %" (a failure) stays "< X"; a claim without a number becomes ">= 90 %" for a success and "< 5 %" for a
failure. `DIFFERENCES` compares two models (B - A, Newcombe's interval from the two Wilson intervals).
"""

from __future__ import annotations

from probekit.studies.common import Study, _metrics

# (model, length, op, threshold, paper's number or None, short label, statement)
CHECKS = (
    ("sort-baseline", 100, "<", 0.01, 0.01, "unhinted sorting fails at length 100",
     "Sorting trained on lengths <= 20 fails at length 100 without a hint (Awasthi & Gupta 2023: < 1 %)"),
    ("sort-successor", 100, ">=", 0.876, 0.926, "the successor hint makes sorting work at length 100",
     "With the successor hint, sorting trained on lengths <= 20 works at length 100 (Awasthi & Gupta 2023: 92.6 %)"),
    ("sort-extrap", 100, ">=", 0.90, None, "a NoPE sorter with the length temperature extrapolates to 100",
     "A NoPE sorter with the length-dependent temperature, trained on lengths <= 20, works at length 100 "
     "(Awasthi & Gupta 2023: the temperature helps even without hints)"),
    ("sort-extrap-learned-pos", 100, "<", 0.05, None, "learned positions do not extrapolate (distinct values)",
     "The same sorter with learned absolute positions fails at length 100 (Lee et al. 2023)"),
    ("sort-learned-pos", 30, "<", 0.05, None, "learned positions fail past the trained length",
     "A sorter with learned absolute positions, trained on lengths <= 20, fails at length 30 (Lee et al. 2023)"),
    ("mult-5x1", 5, ">=", 0.943, 0.993, "5 x 1 multiplication with 1 layer and 3 heads",
     "5 x 1 multiplication, reversed product, 1 layer and 3 heads (Qiu et al. 2024: 99.3 %)"),
    ("mult-3x3", 3, ">=", 0.924, 0.974, "N x N multiplication with 4 layers",
     "N x N multiplication, reversed product, 4 layers (Qiu et al. 2024, 5 x 5: 97.4 %)"),
    ("mult-extrap", 3, "<", 0.05, None, "multiplication does not extrapolate to more digits",
     "Multiplication trained on 1-2 digit operands fails on 3 digits (Lee et al. 2023, Shen et al. 2023)"),
)
# (model A, model B, length, op on B - A, threshold, short label, statement)
DIFFERENCES = (
    ("mult-3x3", "mult-3x3-forward", 3, "<", 0.0, "the forward product is harder than the reversed one",
     "Trained with the same recipe, the forward product is learned less well than the reversed one "
     "(Qiu et al. 2024: 89.8 % vs 99.3 % for 5 x 1)"),
)


def overview() -> Study:
    """Accuracy vs length of every shipped model (its metrics.json), the `CHECKS` and `DIFFERENCES` judged from
    their intervals, one table per task and one figure with a panel per task."""
    from probekit.model import shipped_models

    st = Study("overview", "Extrapolation overview")
    evals = {}
    for name in shipped_models():
        m = _metrics(name)
        if m is not None:
            evals[name] = m
            recs = sorted(m["records"], key=lambda r: r["length"])
            st.claim(f"{name}: greedy exact match by length, with 95 % Wilson intervals (n = "
                     f"{'/'.join(sorted({str(r['n']) for r in recs}))}): "
                     + ", ".join(f"{r['length']}: {_pct_ci(r)}" for r in recs) + ".",
                     m.get("command", f"probekit eval --model {name}"))
    _checks(st, evals)
    _tables_and_figure(st, evals)
    held = [v for v in st.verdicts if v.verdict == "supported"]
    st.headline.append(f"{len(held)} of {len(st.verdicts)} published accuracy results checked on the shipped models "
                       f"hold: {'; '.join(_LABELS[v.hypothesis.statement] for v in held) or 'none'}.")
    for verdict in ("not supported", "inconclusive"):
        miss = [_LABELS[v.hypothesis.statement] for v in st.verdicts if v.verdict == verdict]
        if miss:
            st.headline.append(f"{verdict.capitalize()}: {'; '.join(miss)}.")
    return st


_LABELS = {c[-1]: c[-2] for c in CHECKS + DIFFERENCES}


def _pct_ci(r: dict) -> str:
    lo, hi = r["exact_match_ci95"]
    return f"{100 * r['exact_match']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def _record(m: dict | None, length: int) -> dict | None:
    return next((r for r in (m or {}).get("records", []) if r["length"] == length), None)


def _checks(st: Study, evals: dict) -> None:
    """Judge each check whose model and length were evaluated; say which could not be checked."""
    from probekit.compare import newcombe
    from probekit.stats import Hypothesis

    for name, length, op, thr, paper, _, text in CHECKS:
        r = _record(evals.get(name), length)
        if r is None:
            st.notes.append(f"not checked (no exact match of {name} at length {length}): {text}")
            continue
        st.test(Hypothesis(text, f"exact match of {name} at length {length}", op, thr), r["exact_match"],
                r["exact_match_ci95"], evals[name].get("command", f"probekit eval --model {name}"),
                baseline={"paper": paper} if paper is not None else {}, n=r["n"])
    for a, b, length, op, thr, _, text in DIFFERENCES:
        ra, rb = _record(evals.get(a), length), _record(evals.get(b), length)
        if ra is None or rb is None:
            st.notes.append(f"not checked (no exact match of {a} and {b} at length {length}): {text}")
            continue
        iv = newcombe(ra["exact_match"], *ra["exact_match_ci95"], rb["exact_match"], *rb["exact_match_ci95"])
        st.test(Hypothesis(text, f"exact match of {b} - {a} at length {length}", op, thr),
                rb["exact_match"] - ra["exact_match"], iv,
                f"{evals[a].get('command', '')}; {evals[b].get('command', '')}", baseline={a: ra["exact_match"]},
                n=min(ra["n"], rb["n"]))


def _tables_and_figure(st: Study, evals: dict) -> None:
    """One table per task (rows: models, columns: lengths) and one figure with a panel per task."""
    from probekit.evaluate import EvalResult
    from probekit.viz import accuracy_grid

    groups: dict[str, dict] = {}
    for name, m in evals.items():
        groups.setdefault(m["task"].get("name", "task"), {})[name] = m
    for task, ms in groups.items():
        lengths = sorted({r["length"] for m in ms.values() for r in m["records"]})
        st.tables[f"exact match by length ({task} models)"] = [
            {"model": name, **{f"length {L}": _pct_ci(r) if (r := _record(m, L)) else None for L in lengths}}
            for name, m in ms.items()]
    if not groups:
        return
    res = {f"{task} models": {n: EvalResult(**{k: m[k] for k in ("model", "task", "seed", "records")})
                              for n, m in ms.items()} for task, ms in groups.items()}
    st.figure("accuracy-vs-length", lambda: accuracy_grid(res),
              "Greedy exact match against input length (list length, or operand digits) for every shipped model, "
              "one panel per task on one shared accuracy axis; bands are 95 % Wilson intervals. Each model's "
              "trained lengths are in its card (models/<name>/); the tables give the numbers.", "Line plots of exact match against input length: " + "; ".join(
                  f"{t}: {', '.join(ms)}" for t, ms in groups.items()) + ".")
