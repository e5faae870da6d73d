"""docs/performance.md and its log-log figures, drawn from the JSON that `scaling.py` writes (and nothing else).

    python benchmarks/scaling_report.py bench/scaling.json   # redraw the page from a saved run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scaling import INSTRUMENTS, LABELS, X_NAMES

TITLES = {"patching": "Activation patching sweep (every head at the patched positions)",
          "path_patching": "Path patching (every head's direct path to the logits)",
          "probes": "Linear probes at every layer", "attribution": "Attribution patching",
          "decode": "Greedy decoding", "train_step": "One training step"}
FULL_COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scaling.py   # or: make bench-scaling"


def _fmt(v, nd=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def plot_instrument(res: dict, instrument: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [c for c in res["curves"] if c["instrument"] == instrument]
    impls = INSTRUMENTS[instrument][0]
    from matplotlib.ticker import NullFormatter

    fig, axs = plt.subplots(2, len(curves), figsize=(3.6 * len(curves), 6.6), squeeze=False)
    per = "step" if instrument == "train_step" else "call"
    for j, c in enumerate(curves):
        xs = [p["x"] for p in c["points"]]
        for impl, style in zip(impls, ("o-", "s--"), strict=False):
            fit = c["fit"][impl]
            for row, key, exp in ((0, "seconds_median", "time_exponent"), (1, "peak_rss_mib", "memory_exponent")):
                pts = [(x, p["arms"][impl].get(key)) for x, p in zip(xs, c["points"], strict=True)]
                pts = [(x, v) for x, v in pts if v is not None]
                axs[row, j].plot([x for x, _ in pts], [v for _, v in pts], style,
                                 label=f"{LABELS[impl]} (slope {_fmt(fit[exp])})")
        for i, ylab in enumerate((f"time per {per} (s, median)", "peak memory of one run (MiB)" if per == "step" else "peak memory of one call (MiB)")):
            ax = axs[i, j]
            ax.set_xscale("log")
            if any(len(ln.get_ydata()) for ln in ax.lines):
                ax.set_yscale("log")
            else:
                ax.text(0.5, 0.62, "every peak below the\n1 MiB resolution:\nnot reported", ha="center",
                        va="center", transform=ax.transAxes)
                ax.set_yticks([])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(xs, [_fmt(float(x), 2) if x >= 1000 else str(x) for x in xs], fontsize=7)
            ax.set_xlim(min(xs) / 1.25, max(xs) * 1.25)
            ax.set_xlabel(X_NAMES[c["axis"]])
            ax.set_ylabel(ylab)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6.5, loc="best", framealpha=0.8)
        axs[0, j].set_title(f"time vs {X_NAMES[c['axis']]}", fontsize=9)
        axs[1, j].set_title(f"memory vs {X_NAMES[c['axis']]}", fontsize=9)
    fig.suptitle(f"{TITLES[instrument]}:\nhow time and peak memory grow with each axis (log-log, the others "
                 "held at the base size)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _machine_lines(res: dict) -> list[str]:
    m = res["machine"]
    return [f"- CPU: {m['cpu_model']}; {m['cores_usable']} usable cores of {m['cores_os']}; torch threads "
            f"{m['torch_threads']}; load average at start {m['load_average_at_start']}",
            f"- Python {m['python']}, torch {m['torch']}; {'; '.join(m['torch_blas'])}",
            f"- float32 matmul ({res['matmul']['size']}x{res['matmul']['size']}, same threads): "
            f"**{res['matmul']['gflops']} GFLOP/s**; repeats per size: {res['repeats']}; "
            f"whole run {res['total_seconds']} s"]


def _curve_rows(res: dict, instrument: str) -> list[str]:
    impls = INSTRUMENTS[instrument][0]
    head = ["axis (range)"] + [f"time exp. {LABELS[i]}" for i in impls] + [f"memory exp. {LABELS[i]}" for i in impls]
    head += [f"time at largest, {LABELS[i]} (s)" for i in impls] + [f"peak at largest, {LABELS[i]} (MiB)" for i in impls]
    if len(impls) > 1:
        head += ["peer / probekit time at largest"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in res["curves"]:
        if c["instrument"] != instrument:
            continue
        f, last = c["fit"], c["points"][-1]
        cells = [f"{f['x']} ({_fmt(f['x_range'][0])}–{_fmt(f['x_range'][1])}, {f['points']} sizes)"]
        cells += [_fmt(f[i]["time_exponent"]) for i in impls] + [_fmt(f[i]["memory_exponent"]) for i in impls]
        cells += [_fmt(last["arms"][i]["seconds_median"]) for i in impls]
        cells += [_fmt(last["arms"][i].get("peak_rss_mib")) for i in impls]
        if len(impls) > 1:
            cells.append(_fmt(last.get("ratio_peer_over_probekit")))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _limit_rows(res: dict) -> list[str]:
    rows = ["| instrument | axis | size | required GFLOP | implementation | achieved GFLOP/s | fraction of matmul |",
            "|---|---|---|---|---|---|---|"]
    for c in res["curves"]:
        if c["instrument"] not in ("patching", "train_step"):
            continue
        for p in (c["points"][0], c["points"][-1]):
            for impl in INSTRUMENTS[c["instrument"]][0]:
                a = p["arms"][impl]
                rows.append(f"| {c['instrument']} | {X_NAMES[c['axis']]} | {_fmt(p['x'])} | "
                            f"{_fmt(p['info']['flops_required'] / 1e9)} | {LABELS[impl]} | "
                            f"{_fmt(a.get('gflops_achieved'))} | {_fmt(a.get('fraction_of_matmul'))} |")
    return rows


METHOD = """\
Every curve varies one axis of a base setting and keeps the others there: {base_words}. Models are randomly
initialised (`probekit.model.build_model`, learned positions, 4 heads); inputs are `SortingTask(n_values=16)`
batches and their `successor-change` corrupted pairs. Each instrument's curves run in one fresh process.
Each implementation is warmed up once at the first size of a curve, then called {repeats} time(s) per size,
interleaved with its peer; the time is the median. **Memory** is the peak resident set of one call above the resident set right before it: freed memory
is handed back (`malloc_trim`), the kernel's high-water mark is reset (`/proc/self/clear_refs`) and read
after the call (`benchmarks/measure.py`); a peak under 1 MiB is not reported (–). **Exponent**: the
least-squares slope of log(time) or log(memory) on log(size), over the sizes of the column "axis".
"Model" grows layers and width together: (layers, d_model) = {model_sizes}; its x is the non-embedding
parameter count. Training time per step is (median time of 1+k steps - median time of 1 step) / k, so model
building and set-up are not in it; its memory is the peak of the 1+k-step run.

**Distance to the limit.** For the patching sweep, the required work counts only the multiply-adds that
must be redone: the clean and corrupted forwards, and for each patched head (layer, position) the head's
W_O term and the MLP at that position, then in every later layer the keys/values of the changed positions
up to the last read position and the queries, attention, W_O and MLP still needed (in the last layer only
at the read positions), and the unembedding of the read positions (layer norms left out;
`scaling.z_patch_macs`). For a training step: 6 x non-embedding parameters x tokens for the matrix
products, plus attention (3 x its forward), logits only at answer tokens. Required FLOP / median time is
set against the machine's own float32 `torch.matmul` throughput measured in the same run.
"""


def write_report(res: dict, md_path: Path, fig_dir: Path) -> None:
    md_path, fig_dir = Path(md_path), Path(fig_dir)
    base = res["base"]
    pos = "all positions" if base["positions"] is None else f"{base['positions']} positions spread over the sequence"
    base_words = (f"{base['n']} examples, lists of length {base['length']} ({2 * base['length'] + 2} tokens), "
                  f"layers: {base['n_layers']}, d_model {base['d_model']}, {pos} patched (the patching sweep)")
    lines = ["# Performance: how the cost of each instrument grows", ""]
    if res["mode"] == "quick":
        lines += ["**Quick mode (tiny sizes, one repeat): a check that the benchmark runs, not a measurement.**", ""]
    lines += ["Regenerate (about 10 minutes on 2 cores; run it on a quiet machine):", "",
              f"    {FULL_COMMAND}", "", "## Machine", ""] + _machine_lines(res)
    lines += ["", "## Method", "", METHOD.format(base_words=base_words, repeats=res["repeats"],
                                                 model_sizes=res["model_sizes"])]
    for ins in dict.fromkeys(c["instrument"] for c in res["curves"]):
        png = plot_instrument(res, ins, fig_dir / f"{ins}.png")
        rel = Path(png).resolve().relative_to(md_path.parent.resolve()) if fig_dir.resolve().is_relative_to(
            md_path.parent.resolve()) else png
        lines += ["", f"## {TITLES[ins]}", "", res["instruments"][ins] + ".", ""] + _curve_rows(res, ins)
        diffs = [p["info"].get("max_abs_diff_probekit_vs_peer") for c in res["curves"] if c["instrument"] == ins
                 for p in c["points"]]
        if any(d is not None for d in diffs):
            what = {"patching": "patching metric", "probes": "test accuracy", "decode": "decoded token ids"}[ins]
            lines += ["", f"Largest |probekit - peer| over all sizes ({what}): "
                          f"{_fmt(max(d for d in diffs if d is not None))}."]
        lines += ["", f"![{TITLES[ins]}]({rel})"]
    lines += ["", "## Distance to the limit", "", "Smallest and largest size of each curve.", ""] + _limit_rows(res)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/scaling.json")
    root = Path(__file__).resolve().parent.parent
    write_report(json.loads(src.read_text()), root / "docs/performance.md", root / "docs/figures/performance")
