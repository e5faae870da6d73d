"""`probekit report`: run the studies on the shipped models and write one self-contained HTML page.

Figures are inlined as PNG (base64), the attention views as circuitsvis HTML with the JavaScript bundle
inlined (each in an ``<iframe srcdoc>``), so the page needs no network. Each study's results are also
written as JSON next to the page: ``report.html`` + ``report_<study>.json``. Every file goes through
`probekit.io` (the folder is checked and locked first; nothing appears unless the whole report succeeds).
"""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path

from probekit.io import output_dir, save_figure, write_text
from probekit.model import shipped_models
from probekit.tasks import ProbekitError

STUDIES = ("overview", "hint", "carry")


def _fig_html(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table_html(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3f}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _overview_figures(st):
    from probekit.evaluate import EvalResult
    from probekit.studies.common import _metrics
    from probekit.viz import accuracy_vs_length

    for prefix in ("sort", "mult"):
        res = {}
        for name in shipped_models():
            m = _metrics(name)
            if name.startswith(prefix) and m:
                res[name] = EvalResult(**{k: m[k] for k in ("model", "task", "seed", "records")})
        if res:
            task = next(iter(res.values())).task
            yield accuracy_vs_length(res, title=f"Shipped {task} models: exact match vs length (greedy decoding)")


def _hint_figures(st):
    from probekit.viz import layer_head_heatmap, mechanism_vs_length

    rows = st.tables.get("hint_by_length", [])
    if rows:
        yield mechanism_vs_length(
            rows, "lookup_top1", title="Lookup head: top-1 attention on the next value (solid) vs exact match (dashed)")
    for key, r in st.results.items():
        if "/patch_z" in key:
            yield layer_head_heatmap(r, title=f"{key.split('/')[0]}, length {r.settings.get('length')}: head-output "
                                               "patching, share of the logit difference restored (1 = clean)")


def _carry_figures(st):
    from probekit.viz import heatmap

    for key, r in st.results.items():
        if "/probe_" in key:
            p_all = r.labels["position"].index("all")
            sub = r.values[:, :, p_all, :]
            from probekit.results import Result

            flat = Result(kind=r.kind, values=sub.reshape(-1, sub.shape[-1]), axes=("hook/layer", "split"),
                          labels={"hook/layer": [f"{h} L{L}" for h in r.labels["hook"] for L in r.labels["layer"]],
                                  "split": r.labels["split"]})
            feature = str(r.settings.get("feature", "")).replace("_", " ")
            yield heatmap(flat, title=f"{key.split('/')[0]}: probe {r.settings.get('metric', '')} for {feature} by "
                                      "layer and length", cmap="viridis", symmetric=False)
        elif "/patch_z_digit" in key:
            digit = (r.settings.get("corruption") or {}).get("options", {}).get("digit")
            yield heatmap(r, title=f"{key.split('/')[0]}: head-output patching, carry flipped into answer digit "
                                   f"{digit}: share of the logit difference restored (1 = clean)")


FIGURES = {"overview": _overview_figures, "hint": _hint_figures, "carry": _carry_figures}


def run_study(name: str, size: str = "default", seed: int = 0):
    """Run one study by name (``overview``, ``hint`` or ``carry``); returns a `probekit.studies.Study`."""
    from probekit import studies as S

    if name not in STUDIES:
        raise ProbekitError(f"unknown study {name!r}; expected one of {list(STUDIES)}")
    return S.overview() if name == "overview" else getattr(S, f"{name}_study")(size=size, seed=seed)


def write_study(study, out: str | Path) -> list[Path]:
    """Write ``<name>.json``, ``<name>_claims.md`` and one PNG per figure of ``study`` to ``out``."""
    import matplotlib.pyplot as plt

    out = Path(out)
    paths = [write_text(out / f"{study.name}.json", study.to_json()),
             write_text(out / f"{study.name}_claims.md", f"# {study.title}\n\n" + "".join(
                 f"- {c['text']}\n  `{c['command']}`\n" for c in study.claims) + "".join(f"\n_{n}_\n" for n in study.notes))]
    for i, fig in enumerate(FIGURES[study.name](study)):
        paths.append(save_figure(fig, out / f"{study.name}_fig{i}.png", dpi=120, bbox_inches="tight"))
        plt.close(fig)
    return paths


def _attention_views(names: list[str]) -> list[str]:
    from probekit.studies.common import _load
    from probekit.viz import attention_html

    views = []
    for name in names:
        model, task, _ = _load(name)
        batch = task.sample(1, length=getattr(task, "display_length", None), seed=0)
        page = attention_html(model, batch, task=task, title=f"{name}: attention patterns")
        views.append(f"<h3>{html.escape(name)}</h3><iframe class='attn' srcdoc=\"{html.escape(page, quote=True)}\"></iframe>")
    return views


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:.85em;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px}
img{max-width:100%}code{background:#f4f4f4;padding:1px 4px}li{margin:.4em 0}
iframe.attn{width:100%;height:560px;border:1px solid #ddd}.cmd{color:#555;font-size:.85em}"""


def run_report(out: str | Path = "reports/latest", studies: tuple[str, ...] = STUDIES, size: str = "default",
               overwrite: bool = False, seed: int = 0, attention: bool = True) -> Path:
    """Run ``studies`` and write ``report.html`` + ``report_<study>.json`` to ``out`` (refused when non-empty
    unless ``overwrite``). Returns the HTML path."""
    from probekit.studies import SIZES

    bad = [s for s in studies if s not in STUDIES]
    if bad:
        raise ProbekitError(f"unknown study {bad[0]!r}; expected one of {list(STUDIES)}")
    if size not in SIZES:
        raise ProbekitError(f"unknown size {size!r}; expected one of {list(SIZES)}")
    if not isinstance(seed, int) or seed < 0:
        raise ProbekitError(f"seed must be a non-negative integer, got {seed!r}")
    if not shipped_models():
        raise ProbekitError("no shipped models found in models/; expected the model zoo (see docs/model_sweep.md)")
    with output_dir(out, overwrite=overwrite) as folder:
        return _write_report(folder, studies, size, seed, attention)


def _write_report(out: Path, studies: tuple[str, ...], size: str, seed: int, attention: bool) -> Path:
    sections = []
    for name in studies:
        t0 = time.time()
        print(f"[report] {name} study ...", flush=True)
        st = run_study(name, size=size, seed=seed)
        write_text(out / f"report_{name}.json", st.to_json())
        claims = "".join(f"<li>{html.escape(c['text'])}<br><span class='cmd'>regenerate: <code>{html.escape(c['command'])}"
                         f"</code></span></li>" for c in st.claims)
        tables = "".join(f"<h3>{html.escape(k)}</h3>{_table_html(v)}" for k, v in st.tables.items())
        notes = "".join(f"<p><em>{html.escape(n)}</em></p>" for n in st.notes)
        figures = "".join(_fig_html(f) for f in FIGURES[name](st))
        sections.append(f"<h2>{html.escape(st.title)}</h2><ul>{claims}</ul>{notes}{figures}{tables}")
        print(f"[report] {name} done in {time.time() - t0:.0f} s", flush=True)
    if attention:
        names = [n for n in ("sort-successor", "sort-baseline", "mult-5x1") if n in shipped_models()]
        sections.append("<h2>Attention patterns (one example each)</h2>" + "".join(_attention_views(names)))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>probekit report</title><style>{STYLE}</style>"
            f"</head><body><h1>probekit report</h1><p>Studies on the shipped models (size <code>{size}</code>, "
            f"seed {seed}). Every claim lists the command that regenerates its numbers.</p>{''.join(sections)}"
            "</body></html>")
    path = write_text(out / "report.html", page)
    print(f"[report] wrote {path} (and report_<study>.json)")
    return path
