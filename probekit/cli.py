"""The `probekit` command line: thin wrappers over library functions.

Every command exits 0 on success and 2 on bad input with a one-line ``error: ...`` message.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train small transformers on sorting and multiplication, then probe, patch and attribute them.")


def parse_ints(text: str, what: str) -> list[int]:
    from probekit.tasks import ProbekitError

    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ProbekitError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise ProbekitError(f"{what} is empty; expected e.g. 10,20,50")
    return vals


@app.command()
def train(
    config: Path = typer.Option(..., help="JSON with 'model', 'task' and 'train' (a model's config.json works)."),
    out: Path = typer.Option(..., help="Output folder (resumed if it holds a checkpoint)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out instead of refusing."),
    device: str = typer.Option("cpu", help="torch device"),
):
    """Train a model from a config file.

    Example: probekit train --config models/sort-baseline/config.json --out runs/sort-baseline
    """
    from probekit.train import load_run_config
    from probekit.train import train as run

    mcfg, task, tcfg, conf = load_run_config(config)
    run(mcfg, task, tcfg, out=out, name=conf.get("name") or out.name, overwrite=overwrite, device=device)
    typer.echo(f"saved {out}")


@app.command("eval")
def eval_(
    model: str = typer.Option(..., help="Shipped model name or model folder."),
    lengths: str = typer.Option("10,20,50", help="Comma-separated lengths."),
    n: int = typer.Option(500, help="Examples per length."),
    seed: int = typer.Option(0),
    max_batch: int = typer.Option(512, help="Rows per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one record per length) to stdout."),
    save_metrics: bool = typer.Option(False, help="Write metrics.json into the model folder."),
    errors: bool = typer.Option(False, "--errors", help="Sorting: also split the errors into counting copies "
                                "vs the lookup (teacher forced, same samples)."),
    device: str = typer.Option("cpu"),
):
    """Greedy-decoding accuracy by length.

    Example: probekit eval --model sort-successor --lengths 10,20,50,100 --n 500 --seed 0 --json
    """
    from probekit.evaluate import evaluate, sort_error_kinds
    from probekit.model import _write_json, load_model, resolve_model_dir
    from probekit.tasks import ProbekitError

    if n <= 0:
        raise ProbekitError(f"--n must be positive, got {n}")
    m, task, _ = load_model(model, device=device)
    if errors and task.objective != "sort":
        raise ProbekitError(f"--errors needs a sorting model with the 'sort' objective, got task {task.name!r} "
                            f"({task.objective!r})")
    res = evaluate(m, task, parse_ints(lengths, "--lengths"), n=n, seed=seed, max_batch=max_batch,
                   progress=not as_json)
    if errors:
        for rec in res.records:  # evaluate samples length L with seed * 1000 + L: the same lists
            rec["errors"] = sort_error_kinds(m, task.sample(n, length=rec["length"], seed=seed * 1000 + rec["length"]),
                                             max_batch=min(max_batch, 256))
    if save_metrics:
        folder = resolve_model_dir(model)
        _write_json(folder / "metrics.json", json.loads(res.to_json()) | {
            "command": f"probekit eval --model {model} --lengths {lengths} --n {n} --seed {seed} --save-metrics"})
    if as_json:
        typer.echo(json.dumps(res.records))
    else:
        df = res.to_frame()[["length", "n", "exact_match", "ci_low", "ci_high", "token_acc"]]
        typer.echo(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        for rec in res.records if errors else []:
            e = rec["errors"]
            fe = e["first_error"]
            typer.echo(f"length {rec['length']}: {100 * e['repeat_share']:.1f} % of steps repeat the previous output; "
                       f"step errors {100 * e['error_rate']['repeat']:.1f} % on repeats, "
                       f"{100 * e['error_rate']['new']:.1f} % on new values; first error: extra copy "
                       f"{fe['extra_copy']}, dropped copy {fe['dropped_copy']}, wrong value {fe['wrong_value']}, "
                       f"none {fe['none']}")


@app.command()
def report(
    out: Path = typer.Option(Path("reports/latest"), help="Folder for report.html and the studies' JSON."),
    study: list[str] = typer.Option(["overview", "hint", "carry"], help="Studies to run (repeat the option)."),
    size: str = typer.Option("default", help="quick | default | full (sample sizes)."),
    quick: bool = typer.Option(False, "--quick", help="Same as --size quick (about a minute)."),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(True, help="Replace an earlier report in --out."),
):
    """The main job: the mechanism studies on the shipped models, as one self-contained HTML page.

    Example: probekit report --out reports/latest
    """
    from probekit.report import run_report

    run_report(out, studies=tuple(study), size="quick" if quick else size, overwrite=overwrite, seed=seed)


ATTRIBUTE_METHODS = ("dla", "ablate", "attrib-patch")
_ATTRIBUTE_AXES = {"dla": ("dla_head", ("pos", "layer", "head")), "ablate": ("head_ablation_sweep", ("layer", "head")),
                   "attrib-patch": ("attrib_patch_heads", ("layer", "pos", "head"))}


def _save_result(res, out: Path, stem: str, figure=None) -> list[str]:
    """``<stem>.json`` + ``<stem>.csv`` (+ ``<stem>.png`` drawn by ``figure``), each written atomically."""
    from probekit.results import atomic_write

    atomic_write(out / f"{stem}.json", lambda p: p.write_text(res.to_json()))
    atomic_write(out / f"{stem}.csv", lambda p: res.to_frame().to_csv(p, index=False))
    names = [f"{stem}.json", f"{stem}.csv"]
    if figure is not None:
        figure(res, out / f"{stem}.png")
        names.append(f"{stem}.png")
    return names


@app.command()
def attribute(
    model: str = typer.Option(..., help="Shipped model name or model folder."),
    method: str = typer.Option(..., help="dla | ablate | attrib-patch"),
    out: Path = typer.Option(..., help="Output folder for JSON, CSV and PNG files."),
    n: int = typer.Option(256, help="Examples."),
    seed: int = typer.Option(0),
    length: int | None = typer.Option(None, help="Input length (default: the task's default)."),
    metric: str | None = typer.Option(None, help="dla: logit|margin (logit); ablate: logit|logprob|prob|margin|acc|"
                                                    "exact-match (logprob); attrib-patch: logit-diff|logit|logprob|prob|"
                                                    "margin (logit-diff)."),
    ablation: str = typer.Option("zero", help="ablate: zero | mean | resample."),
    heads: str | None = typer.Option(None, help="ablate: also ablate this set together, e.g. L1H2,L0H3."),
    k: int = typer.Option(3, help="ablate: top-k heads (by single-head effect) vs k random heads."),
    n_random: int = typer.Option(10, help="ablate: random head sets to compare with the top k."),
    reference_length: int | None = typer.Option(None, help="ablate mean/resample: reference batch length (default --length)."),
    reference_objective: str | None = typer.Option(None, help="ablate mean/resample: reference objective (default the model's)."),
    corruption: str | None = typer.Option(None, help="attrib-patch: a corruption of the task (default its first), "
                                                        "e.g. successor-change | replace, carry-flip | random-digit."),
    exact: bool = typer.Option(True, help="attrib-patch: also run exact patching and report the agreement."),
    ig_steps: int = typer.Option(1, help="attrib-patch: integrated-gradient steps (1: plain gradient)."),
    plot: str | None = typer.Option(None, help="Extra figure of the main result: layer-head | layer-pos."),
    html: bool = typer.Option(False, help="Also write attention.html (example 0; works offline)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out instead of refusing."),
    device: str = typer.Option("cpu"),
):
    """Which heads carry the answer: direct logit attribution, head ablation or attribution patching.

    Example: probekit attribute --model sort-successor --method ablate --ablation mean --n 256 --seed 0 --out runs/ablate
    """
    from probekit import attribution as A
    from probekit import viz
    from probekit.corruptions import corrupt, corruption_kinds
    from probekit.evaluate import check_fits
    from probekit.metrics import check_metric
    from probekit.model import ensure_empty_dir, load_model
    from probekit.results import atomic_write
    from probekit.tasks import ProbekitError

    if method not in ATTRIBUTE_METHODS:
        raise ProbekitError(f"unknown method {method!r}; expected one of {list(ATTRIBUTE_METHODS)}")
    if ablation not in A.ABLATIONS:
        raise ProbekitError(f"unknown ablation {ablation!r}; expected one of {list(A.ABLATIONS)}")
    if n <= 0:
        raise ProbekitError(f"--n must be positive, got {n}")
    allowed = {"dla": A.DLA_METRICS, "ablate": A.ABLATION_METRICS, "attrib-patch": A.GRADIENT_METRICS}[method]
    metric = check_metric(metric or {"dla": "logit", "ablate": "logprob", "attrib-patch": "logit-diff"}[method],
                          allowed, f"{method} metric")
    if plot is not None:
        viz.check_plot(plot, *_ATTRIBUTE_AXES[method])
    m, task, _ = load_model(model, device=device)
    check_fits(m, task, length)
    head_set = A.parse_heads(heads, m) if heads is not None else None
    batch = task.sample(n, length=length, seed=seed)
    reference = None
    if method == "ablate" and ablation != "zero":
        ref_task = task.with_objective(reference_objective) if reference_objective else task
        check_fits(m, ref_task, reference_length or batch.length)
        reference = ref_task.sample(n, length=reference_length or batch.length, seed=seed + 1)
        A._check_reference(batch, reference)
    ensure_empty_dir(out, overwrite=overwrite)
    written: list[str] = []
    if method == "dla":
        res = A.direct_logit_attribution(m, batch, unit="head", metric=metric, vocab=task.vocab)
        written += _save_result(res, out, "dla_heads", viz.layer_pos_heatmap)
        layers = A.direct_logit_attribution(m, batch, unit="layer", metric=metric, vocab=task.vocab)
        written += _save_result(layers, out, "dla_layers", viz.layer_pos_heatmap)
        src = A.direct_logit_attribution(m, batch, unit="source", metric=metric, vocab=task.vocab)
        written += _save_result(src, out, "dla_source")
        top = A.head_scores(res)
        typer.echo(f"DLA ({metric}) completeness error {layers.settings['completeness_max_abs_error']:.2e}; "
                   f"top heads by |DLA| summed over positions: " + ", ".join(
                       f"{A.head_label(int(i) // m.cfg.n_heads, int(i) % m.cfg.n_heads)}"
                       for i in _argsort_desc(top)[:5]))
    elif method == "ablate":
        res = A.head_ablation_sweep(m, batch, method=ablation, reference=reference, metric=metric, seed=seed)
        written += _save_result(res, out, "ablation_sweep", viz.layer_head_heatmap)
        tvr = A.topk_vs_random(m, batch, res, k=k, n_random=n_random, method=ablation, reference=reference,
                               metric=metric, seed=seed)
        written += _save_result(tvr, out, "topk_vs_random")
        if head_set is not None:
            written += _save_result(A.ablate_heads(m, batch, head_set, method=ablation, reference=reference,
                                                   metric=metric, seed=seed), out, "ablation_heads")
        s = tvr.settings
        typer.echo(f"{ablation} ablation: clean exact match {float(tvr.values[0, 1]):.3f}; top-{k} heads "
                   f"{', '.join(s['top_heads'])} -> {float(tvr.values[1, 1]):.3f}; {n_random} random sets "
                   f"-> mean {s['random_mean'][1]:.3f} (min {s['random_min'][1]:.3f}, max {s['random_max'][1]:.3f})")
    else:
        pair = corrupt(task, batch, corruption or corruption_kinds(task)[0], seed=seed)
        ap = A.attribution_patching(m, pair.clean, pair.corrupted, metric=metric, exact=exact, ig_steps=ig_steps,
                                    vocab=task.vocab, steps=pair.answer_steps)
        res = ap.heads
        written += _save_result(ap.heads, out, "attrib_heads", viz.layer_pos_heatmap)
        for name, r in (("attrib_mlp", ap.mlp), ("exact_heads", ap.exact_heads), ("exact_mlp", ap.exact_mlp)):
            if r is not None:
                written += _save_result(r, out, name, viz.layer_pos_heatmap)
        atomic_write(out / "agreement.json", lambda p: p.write_text(json.dumps(ap.agreement, indent=2) + "\n"))
        atomic_write(out / "attribution_patching.json", lambda p: p.write_text(ap.to_json()))
        written += ["agreement.json", "attribution_patching.json"]
        for name, ag in ap.agreement.items():
            sp = "n/a" if ag["spearman"] is None else f"{ag['spearman']:.3f}"
            typer.echo(f"{name}: attribution vs exact patching Spearman {sp}, top-{ag['k']} overlap {ag['topk_overlap']:.2f}")
    if plot is not None:
        viz.plot(res, plot, out / f"plot_{plot}.png")
        written.append(f"plot_{plot}.png")
    if html:
        viz.attention_html(m, batch, task=task, path=out / "attention.html")
        written.append("attention.html")
    typer.echo(f"wrote {', '.join(written)} to {out}")


def _argsort_desc(table) -> list[int]:
    import torch

    return torch.argsort(table.flatten(), descending=True, stable=True).tolist()


@app.command("patch")
def patch_cmd(
    model: str = typer.Option(..., help="Shipped model name or model folder."),
    corruption: str = typer.Option(..., help="multiplication: carry-flip | operand-digit | random-digit | resample; "
                                                "sorting: successor-change | swap | replace | resample."),
    site: str = typer.Option("head", help="head (hook_z) | q | k | v | pattern | resid_pre | resid_mid | resid_post | "
                                          "attn_out | mlp_out."),
    by_pos: bool = typer.Option(True, "--by-pos/--all-pos", help="One patch per position, or across all positions."),
    metric: str = typer.Option("logit-diff", help="logit-diff | logit | logprob | prob | margin | acc | exact-match "
                                                  "(teacher forced)."),
    n: int = typer.Option(256, help="Examples (split into passes of at most --max-batch rows)."),
    seed: int = typer.Option(0, help="Seeds the sample and the corruption."),
    length: int | None = typer.Option(None, help="Input length (default: the task's default)."),
    digit: int | None = typer.Option(None, help="Answer digit k read by the metric (multiplication: product digit, "
                                                     "units = 0; sorting: answer step); carry-flip flips the carry into "
                                                     "it, successor-change changes its target."),
    operand: str | None = typer.Option(None, help="carry-flip / operand-digit: edit operand a or b."),
    place: int | None = typer.Option(None, help="operand-digit: which digit (units = 0)."),
    direction: str = typer.Option("denoise", help="denoise (clean into corrupted) | noise (corrupted into clean)."),
    raw: bool = typer.Option(False, "--raw", help="Report the raw metric instead of normalised (0 corrupted, 1 clean)."),
    layers: str | None = typer.Option(None, help="Only these layers, e.g. 0,1."),
    heads: str | None = typer.Option(None, help="Only these heads, e.g. 0,3."),
    positions: str | None = typer.Option(None, help="Only these token positions, e.g. 5,6,7."),
    max_batch: int = typer.Option(1024, help="Rows per forward pass (patches x examples)."),
    top: int = typer.Option(10, help="Rows in the printed table of top components."),
    out: Path | None = typer.Option(None, help="Output folder: result.json, result.csv, heatmap.png."),
    as_json: bool = typer.Option(False, "--json", help="Print the result JSON to stdout."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out instead of refusing."),
    device: str = typer.Option("cpu"),
):
    """Activation patching sweep: which activations carry the answer.

    Example: probekit patch --model mult-5x1 --corruption carry-flip --site head --by-pos --metric logit-diff
    --n 256 --seed 0 --out runs/patch-carry
    """
    import os

    from probekit import patching as P
    from probekit.corruptions import corrupt, corruption_kinds
    from probekit.evaluate import check_fits
    from probekit.metrics import check_metric
    from probekit.model import ensure_empty_dir, load_model
    from probekit.tasks import ProbekitError

    site_c = P.canonical_site(site)
    check_metric(metric)
    if direction not in ("denoise", "noise"):
        raise ProbekitError(f"unknown direction {direction!r}; expected 'denoise' or 'noise'")
    if n <= 0:
        raise ProbekitError(f"--n must be positive, got {n}")
    if max_batch <= 0:
        raise ProbekitError(f"--max-batch must be positive, got {max_batch}")
    if out is None and not as_json:
        raise ProbekitError("nothing to write: pass --out DIR and/or --json")
    sel = {k: parse_ints(v, f"--{k}") if v is not None else None
           for k, v in (("layers", layers), ("heads", heads), ("positions", positions))}
    m, task, _ = load_model(model, device=device)
    if corruption not in corruption_kinds(task):
        raise ProbekitError(f"corruption {corruption!r} is not defined for task {task.name!r}; "
                            f"expected one of {list(corruption_kinds(task))}")
    opts: dict = {}
    given = {"operand": operand, "place": place}
    allowed = {"carry-flip": ("operand",), "operand-digit": ("operand", "place")}.get(corruption, ())
    for k, v in given.items():
        if v is not None:
            if k not in allowed:
                raise ProbekitError(f"--{k} does not apply to corruption {corruption!r}")
            opts[k] = v
    if corruption == "carry-flip" and digit is not None:
        opts["digit"] = digit
    if corruption == "successor-change" and digit is not None:
        opts["step"] = digit
    check_fits(m, task, length)
    if out is not None:
        ensure_empty_dir(out, overwrite=overwrite)
    batch = task.sample(n, length=length, seed=seed)
    pair = corrupt(task, batch, corruption, seed=seed, **opts)
    steps = (P.digit_step(pair.clean, digit),) if digit is not None else None
    res = P.sweep(m, pair, site_c, by_pos=by_pos, metric=P.Metric(metric, steps), direction=direction,
                  normalize=not raw, max_batch=max_batch, progress=not as_json, **sel)
    res.settings["command"] = {"model": model, "corruption": corruption, "site": site, "by_pos": by_pos,
                               "metric": metric, "n": n, "seed": seed, "length": length, "digit": digit,
                               "operand": operand, "place": place, "direction": direction, "raw": raw,
                               **{k: v for k, v in sel.items()}}
    if out is not None:
        from probekit import viz

        def fig(tmp):
            import matplotlib.pyplot as plt

            kw = {"rows": "layer"}
            if res.values.ndim >= 2:
                kw["cols"] = res.axes[1]
            if res.values.ndim == 3:
                kw["facet"] = "head"
            f = viz.heatmap(res, None, title=f"{res.kind}: {corruption}, {metric}"
                            + ("" if raw else " (normalised)"), **kw)
            f.savefig(tmp, format="png", dpi=120)
            plt.close(f)

        files = {"result.json": lambda p: p.write_text(res.to_json()),
                 "result.csv": lambda p: res.to_frame().to_csv(p, index=False), "heatmap.png": fig}
        tmps = {name: out / f".{name}.tmp" for name in files}
        try:
            for name, write in files.items():  # write everything first, then rename: no half-written set
                write(tmps[name])
            for name in files:
                os.replace(tmps[name], out / name)
        finally:
            for t in tmps.values():
                if t.exists():
                    t.unlink()
    if as_json:
        typer.echo(res.to_json())
        return
    s = res.settings
    typer.echo(f"{pair.kind}: {s['n']} pairs ({pair.n_invalid} had no valid corruption, {pair.invalid_policy}d); "
               f"metric {metric} clean {s['clean_metric']:.4f}, corrupted {s['corrupted_metric']:.4f}; "
               f"values {'raw' if raw else 'normalised (0 = corrupted, 1 = clean)'}")
    for coords, v in res.top(top):
        typer.echo("  " + "  ".join(f"{k} {c:>4}" for k, c in coords.items()) + f"  {v:+.4f}")
    if out is not None:
        typer.echo(f"wrote result.json, result.csv, heatmap.png to {out}")


@app.command("probe")
def probe_cmd(
    model: str = typer.Option(..., help="Shipped model name or model folder."),
    feature: str = typer.Option(..., help="Task feature, e.g. carry_out, digit, column_sum (multiplication); "
                                          "rank, target, copies_left (sorting)."),
    hooks: str = typer.Option("resid_pre,resid_mid,resid_post", help="Short names (every layer) or full hook names."),
    train_length: int = typer.Option(..., help="Length of the training batch."),
    test_lengths: str = typer.Option(..., help="Comma-separated test lengths (each a fresh sample)."),
    n: int = typer.Option(2000, help="Training examples."),
    n_test: int | None = typer.Option(None, help="Examples per test length (default n // 2)."),
    seed: int = typer.Option(0),
    positions: str = typer.Option("feature", help="feature | pred | answer | all"),
    by_position: bool = typer.Option(False, "--by-position/--pooled", help="Also fit one probe per position."),
    kind: str = typer.Option("auto", help="auto | logistic | ridge"),
    controls: bool = typer.Option(True, "--controls/--no-controls", help="Shuffled, control-task, random-model."),
    save_probes: bool = typer.Option(False, help="Also save each pooled probe under DIR/probes/<hook>/."),
    out: Path = typer.Option(..., help="Output folder: sweep.json, sweep.csv, heatmap PNGs."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out instead of refusing."),
    device: str = typer.Option("cpu"),
):
    """Linear probes for a feature at every layer of the given hooks; accuracy on longer inputs, with controls.

    Example: probekit probe --model mult-5x1 --feature carry_out --hooks resid_pre,resid_post --train-length 5
    --test-lengths 5,6,7 --n 2000 --seed 0 --out runs/probe-carry
    """
    from probekit.model import ensure_empty_dir, load_model
    from probekit.probes import probe_lengths, write_sweep
    from probekit.tasks import ProbekitError

    if n <= 0:
        raise ProbekitError(f"--n must be positive, got {n}")
    if n_test is not None and n_test <= 0:
        raise ProbekitError(f"--n-test must be positive, got {n_test}")
    lengths = parse_ints(test_lengths, "--test-lengths")
    m, task, _ = load_model(model, device=device)
    ensure_empty_dir(out, overwrite=overwrite)
    sweep = probe_lengths(m, task, feature, hooks, train_length, lengths, n=n, n_test=n_test, seed=seed,
                          positions=positions, by_position=by_position, kind=kind, controls=controls, progress=True)
    sweep.settings["command"] = {"model": model, "feature": feature, "hooks": hooks, "train_length": train_length,
                                 "test_lengths": lengths, "n": n, "n_test": n_test, "seed": seed,
                                 "positions": positions, "by_position": by_position, "kind": kind,
                                 "controls": controls}
    paths = write_sweep(sweep, out, save_probes=save_probes)
    typer.echo(sweep.summary())
    typer.echo(f"wrote {', '.join(sorted({p.name for p in paths}))} to {out}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app, turning bad input into a one-line error and exit code 2."""
    from probekit.tasks import ProbekitError

    try:
        app(args=argv, standalone_mode=False)
    except ProbekitError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except Exception as e:
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # click usage errors: unknown option, bad type
            e.show()
            return 2
        if type(e).__name__ == "Abort":
            return 1
        raise
    return 0


@app.command("sweep")
def sweep_cmd(
    grid: Path = typer.Argument(..., help="Grid file (JSON), e.g. analyses/zoo/sort-extrap.json."),
    out: Path = typer.Option(..., help="Sweep folder: <config>/seed<k>/ per job, summary.csv, summary.md (resumed)."),
    address: str | None = typer.Option(None, help="Ray cluster address ('auto' or host:port); default: a local Ray."),
    jobs: str | None = typer.Option(None, help="Comma-separated configurations or job ids (config/seedK) to run."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the jobs and their state; run nothing."),
    tables: Path | None = typer.Option(None, help="Write the finished jobs' summary table into this Markdown file "
                                                   "(e.g. docs/model_sweep.md); run nothing."),
):
    """Train and evaluate every (configuration, seed) job of a grid as Ray tasks; finished jobs are skipped.

    Example: probekit sweep analyses/zoo/sort-extrap.json --out runs/sweeps/sort-extrap --dry-run
    """
    from probekit.sweep import load_grid, run_sweep, write_tables
    from probekit.tasks import ProbekitError

    selected = None if jobs is None else [s.strip() for s in jobs.split(",") if s.strip()]
    if selected == []:
        raise ProbekitError("--jobs is empty; expected configuration names or job ids, e.g. nope,learned-pos/seed0")
    if tables is not None:
        if dry_run or selected is not None:
            raise ProbekitError("--tables only writes tables from the finished jobs; it takes no --dry-run or --jobs")
        typer.echo(f"wrote {write_tables(out, tables, grid=load_grid(grid))}")
        return
    run = run_sweep(grid, out, address=address, jobs=selected, dry_run=dry_run, progress=True)
    typer.echo(run.describe())
    if run.failed:
        raise SystemExit(1)
