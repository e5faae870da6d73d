"""The `probekit` command line: parse, validate, call one function of `probekit.commands`, print.

Every command exits 0 on success and 2 on bad input with exactly one ``error: ...`` line on stderr
(usage errors too: a missing option, an unknown option, a value of the wrong type). ``--out DIR`` is
checked before anything runs, refused when non-empty unless ``--overwrite``, and locked while the
command runs. Output files follow one naming scheme, ``<command>.json|csv|png`` (+
``<command>_<part>.*``); see `probekit.commands`. A new command is one small function here that
calls one ``run_<command>`` there and hands its `Outcome` to `_emit`.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"max_content_width": 100}, rich_markup_mode=None,
                  help="Train small transformers on sorting and multiplication, then probe, patch and attribute them.")

MODEL = typer.Option(..., help="Shipped model name or model folder.")
SEED = typer.Option(0, help="Random seed (>= 0).")
DEVICE = typer.Option("cpu", help="torch device: cpu, or cuda / mps where available.")
OVERWRITE = typer.Option(False, help="Write into a non-empty --out (replacing files of the same name).")


def _emit(outcome, as_json: bool = False) -> None:
    """Print a command's `probekit.commands.Outcome`: its JSON, or its lines and the files written."""
    if as_json:
        typer.echo(outcome.json)
        return
    for line in outcome.lines:
        typer.echo(line)
    if outcome.wrote():
        typer.echo(outcome.wrote())


@app.command()
def train(
    config: Path = typer.Option(..., help="JSON with 'model', 'task' and 'train' (a model's config.json works), "
                                          "or a shipped model's name (its config.json)."),
    out: Path = typer.Option(..., help="Output folder (resumed if it holds a checkpoint)."),
    overwrite: bool = typer.Option(False, help="Retrain into a non-empty --out instead of refusing."),
    device: str = DEVICE,
):
    """Train a model from a config file.

    Example: probekit train --config sort-baseline --out runs/sort-baseline
    """
    from probekit.commands import run_train

    _emit(run_train(config, out, overwrite=overwrite, device=device))


@app.command("eval")
def eval_(
    model: str = MODEL,
    lengths: str = typer.Option("10,20,50", help="Comma-separated lengths."),
    n: int = typer.Option(500, help="Examples per length (1 to 100000)."),
    seed: int = SEED,
    max_batch: int = typer.Option(512, help="Rows per forward pass (>= 1)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one record per length) to stdout."),
    save_metrics: bool = typer.Option(False, help="Write metrics.json into the model folder (a shipped model's "
                                                  "needs --overwrite)."),
    errors: bool = typer.Option(False, "--errors", help="Sorting: also split the errors by step kind: extra copy, "
                                "dropped copy, wrong new value (teacher forced, same samples)."),
    out: Path | None = typer.Option(None, help="Output folder: eval.json, eval.csv, eval.png."),
    place_offsets: str | None = typer.Option(None, help="Place models: average the next-token probabilities over "
                                             "these place offsets, 'train' (0..place_offset_max, those that fit "
                                             "n_ctx) or e.g. 0,2,4."),
    overwrite: bool = OVERWRITE,
    device: str = DEVICE,
):
    """Greedy-decoding accuracy by length.

    Example: probekit eval --model sort-successor --lengths 10,20,50,100 --n 500 --seed 0 --out runs/eval
    """
    from probekit.commands import run_eval

    _emit(run_eval(model, lengths, n=n, seed=seed, max_batch=max_batch, errors=errors, save_metrics=save_metrics,
                   out=out, overwrite=overwrite, device=device, progress=not as_json, place_offsets=place_offsets),
          as_json)


@app.command()
def report(
    out: Path = typer.Option(Path("reports/latest"), help="Folder for report.html and report_<study>.json."),
    study: list[str] = typer.Option(["overview", "failure", "hint", "carry"], help="Studies to run (repeat the option)."),
    size: str = typer.Option("default", help="quick | default | full (sample sizes)."),
    quick: bool = typer.Option(False, "--quick", help="Same as --size quick (small samples, a smoke test)."),
    seed: int = SEED,
    overwrite: bool = typer.Option(False, help="Replace an earlier report in a non-empty --out."),
):
    """The main job: every study, as one self-contained HTML page.

    The studies (overview; failure: why the unhinted sorter fails with length; hint; carry) on the
    shipped models: a table of contents, what was learned, then per study its tested hypotheses,
    figures with captions, tables and attention views, inlined; every claim names the command that
    regenerates its numbers. A progress bar over the studies goes to stderr.

    Example: probekit report --out reports/latest --overwrite
    """
    from probekit.report import run_report

    run_report(out, studies=tuple(study), size="quick" if quick else size, overwrite=overwrite, seed=seed)


@app.command()
def attribute(
    model: str = MODEL,
    method: str = typer.Option(..., help="dla | ablate | attrib-patch"),
    out: Path = typer.Option(..., help="Output folder: attribute.json|csv|png and attribute_<part>.*"),
    n: int = typer.Option(256, help="Examples (1 to 100000)."),
    seed: int = SEED,
    length: int | None = typer.Option(None, help="Input length (default: the task's default)."),
    metric: str | None = typer.Option(None, help="dla: logit|margin (logit); ablate: logit|logprob|prob|margin|acc|"
                                                    "exact-match (logprob); attrib-patch: logit-diff|logit|logprob|prob|"
                                                    "margin (logit-diff)."),
    ablation: str = typer.Option("zero", help="ablate: zero | mean | resample."),
    heads: str | None = typer.Option(None, help="ablate: also ablate this set together, e.g. L1H2,L0H3."),
    k: int = typer.Option(3, help="ablate: top-k heads (by single-head effect) vs k random heads (>= 1)."),
    n_random: int = typer.Option(10, help="ablate: random head sets to compare with the top k (1 to 10000)."),
    reference_length: int | None = typer.Option(None, help="ablate mean/resample: reference batch length (default --length)."),
    reference_objective: str | None = typer.Option(None, help="ablate mean/resample: reference objective (default the model's)."),
    corruption: str | None = typer.Option(None, help="attrib-patch: a corruption of the task (default its first), "
                                                        "e.g. successor-change | replace, carry-flip | random-digit."),
    exact: bool = typer.Option(True, help="attrib-patch: also run exact patching and report the agreement."),
    ig_steps: int = typer.Option(1, help="attrib-patch: integrated-gradient steps (1: plain gradient)."),
    plot: str | None = typer.Option(None, help="Extra figure of the main result: layer-head | layer-pos."),
    html: bool = typer.Option(False, help="Also write attribute_attention.html (example 0; works offline)."),
    overwrite: bool = OVERWRITE,
    device: str = DEVICE,
):
    """Which heads carry the answer: DLA, ablation, attrib-patch.

    Direct logit attribution (--method dla), head ablation (ablate) or attribution patching
    checked against exact patching (attrib-patch).

    Example: probekit attribute --model sort-successor --method ablate --ablation mean --n 256 --out runs/ablate
    """
    from probekit.commands import run_attribute

    _emit(run_attribute(model, method, out, n=n, seed=seed, length=length, metric=metric, ablation=ablation,
                        heads=heads, k=k, n_random=n_random, reference_length=reference_length,
                        reference_objective=reference_objective, corruption=corruption, exact=exact,
                        ig_steps=ig_steps, plot=plot, html=html, overwrite=overwrite, device=device))


@app.command("patch")
def patch_cmd(
    model: str = MODEL,
    corruption: str = typer.Option(..., help="multiplication: carry-flip | column-digit | operand-digit | "
                                                "random-digit | resample; sorting: successor-change | swap | replace | resample."),
    site: str = typer.Option("head", help="head (hook_z) | q | k | v | pattern | resid_pre | resid_mid | resid_post | "
                                          "attn_out | mlp_out."),
    by_pos: bool = typer.Option(True, "--by-pos/--all-pos", help="One patch per position, or across all positions."),
    metric: str = typer.Option("logit-diff", help="logit-diff | logit | logprob | prob | margin | acc | exact-match "
                                                 "(teacher forced)."),
    n: int = typer.Option(256, help="Examples, 1 to 100000 (split into passes of at most --max-batch rows)."),
    seed: int = SEED,
    length: int | None = typer.Option(None, help="Input length (default: the task's default)."),
    digit: int | None = typer.Option(None, help="Answer digit k read by the metric (multiplication: product digit, "
                                                     "units = 0; sorting: answer step); carry-flip flips the carry into "
                                                     "it, column-digit changes it and keeps its carry, successor-change changes "
                                                     "its target."),
    operand: str | None = typer.Option(None, help="carry-flip / column-digit / operand-digit: edit operand a or b."),
    place: int | None = typer.Option(None, help="operand-digit: which digit (units = 0)."),
    direction: str = typer.Option("denoise", help="denoise (clean into corrupted) | noise (corrupted into clean)."),
    raw: bool = typer.Option(False, "--raw", help="Report the raw metric instead of normalised (0 corrupted, 1 clean)."),
    layers: str | None = typer.Option(None, help="Only these layers, e.g. 0,1."),
    heads: str | None = typer.Option(None, help="Only these heads, e.g. 0,3."),
    positions: str | None = typer.Option(None, help="Only these token positions, e.g. 5,6,7."),
    max_batch: int = typer.Option(1024, help="Rows per forward pass (patches x examples, >= 1)."),
    top: int = typer.Option(10, help="Rows in the printed table of top components."),
    out: Path | None = typer.Option(None, help="Output folder: patch.json, patch.csv, patch.png."),
    as_json: bool = typer.Option(False, "--json", help="Print the result JSON to stdout."),
    overwrite: bool = OVERWRITE,
    device: str = DEVICE,
):
    """Activation patching sweep: which activations carry the answer.

    Example: probekit patch --model mult-5x1 --corruption carry-flip --site head --n 256 --out runs/patch-carry
    """
    from probekit.commands import run_patch

    _emit(run_patch(model, corruption, site=site, by_pos=by_pos, metric=metric, n=n, seed=seed, length=length,
                    digit=digit, operand=operand, place=place, direction=direction, raw=raw, layers=layers,
                    heads=heads, positions=positions, max_batch=max_batch, top=top, out=out, as_json=as_json,
                    overwrite=overwrite, device=device), as_json)


@app.command("probe")
def probe_cmd(
    model: str = MODEL,
    feature: str = typer.Option(..., help="Task feature, e.g. carry_out, digit, column_sum (multiplication); "
                                          "rank, target, copies_left (sorting)."),
    hooks: str = typer.Option("resid_pre,resid_mid,resid_post", help="Short names (every layer) or full hook names."),
    train_length: int = typer.Option(..., help="Length of the training batch."),
    test_lengths: str = typer.Option(..., help="Comma-separated test lengths (each a fresh sample)."),
    n: int = typer.Option(2000, help="Training examples (1 to 100000)."),
    n_test: int | None = typer.Option(None, help="Examples per test length (default n // 2; at most 100000)."),
    seed: int = SEED,
    positions: str = typer.Option("feature", help="feature | pred | answer | all"),
    by_position: bool = typer.Option(False, "--by-position/--pooled", help="Also fit one probe per position."),
    kind: str = typer.Option("auto", help="auto | logistic | ridge"),
    controls: bool = typer.Option(True, "--controls/--no-controls", help="Shuffled, control-task, random-model."),
    save_probes: bool = typer.Option(False, help="Also save each pooled probe under DIR/probes/<hook>/."),
    out: Path = typer.Option(..., help="Output folder: probe.json, probe.csv, probe_*.png."),
    overwrite: bool = OVERWRITE,
    device: str = DEVICE,
):
    """Linear probes by layer, scored on longer inputs.

    One probe for the feature at every layer of the given hooks, fitted at --train-length and scored
    on each of --test-lengths, with controls (shuffled labels, control task, random model).

    Example: probekit probe --model mult-5x1 --feature carry_out --hooks resid_pre,resid_post --train-length 5
    --test-lengths 5,6,7 --n 2000 --out runs/probe-carry
    """
    from probekit.commands import run_probe

    _emit(run_probe(model, feature, hooks, train_length, test_lengths, n=n, n_test=n_test, seed=seed,
                    positions=positions, by_position=by_position, kind=kind, controls=controls,
                    save_probes=save_probes, out=out, overwrite=overwrite, device=device))


@app.command("circuits")
def circuits_cmd(
    model: str = MODEL,
    heads: str = typer.Option("all", help="Heads to draw, e.g. L1H0,L1H2, or all."),
    ln: str = typer.Option("embed", help="LayerNorm in the circuits: embed | fixed | none."),
    n_random: int = typer.Option(20, help="Random matrix pairs for the composition baseline (2 to 10000)."),
    seed: int = SEED,
    out: Path = typer.Option(..., help="Output folder: circuits.json, circuits.csv, circuits.png."),
    overwrite: bool = OVERWRITE,
    device: str = DEVICE,
):
    """Weight-based circuits: QK and OV of each head, composition vs random.

    The QK and OV circuits of the chosen heads read through the embeddings, their copying and
    successor scores, and the Q-, K-, V-composition scores of every head pair against the same
    score for random matrices. Weights only: no data is sampled.

    Example: probekit circuits --model sort-successor --heads L1H0,L1H2 --out runs/circuits
    """
    from probekit.commands import run_circuits

    _emit(run_circuits(model, heads=heads, ln=ln, n_random=n_random, seed=seed, out=out, overwrite=overwrite,
                       device=device))


@app.command("das")
def das_cmd(
    model: str = MODEL,
    vary: str = typer.Option(..., help="Feature that differs between base and source, e.g. carry_in."),
    at: str = typer.Option(..., help="Answer step as FEATURE=INT, e.g. digit_index=2 (sorting: step=3)."),
    target: str = typer.Option(..., help="Counterfactual answer: carry | source:FEATURE (e.g. source:target)."),
    hold: str | None = typer.Option(None, help="Features held equal at the step, e.g. column_sum."),
    k: int = typer.Option(4, help="Subspace dimensions (1 to d_model)."),
    sites: str | None = typer.Option(None, help="Sites, e.g. resid_pre,resid_post (default: resid_pre, "
                                                "resid_mid, resid_post of every layer)."),
    n: int = typer.Option(2000, help="Counterfactual pairs (8 to 100000; split fit/validation/test)."),
    length: int | None = typer.Option(None, help="Input length (default: the task's default)."),
    steps: int = typer.Option(300, help="Most optimiser steps per fit (early stopping on validation)."),
    seed: int = SEED,
    out: Path = typer.Option(..., help="Output folder: das.json, das.csv, das.png."),
    overwrite: bool = OVERWRITE,
    device: str = DEVICE,
):
    """Where a causal variable lives: DAS subspaces and their IIA.

    At every (site, layer), learn a k-dimensional subspace whose interchange from a source input
    makes the model give the counterfactual answer; report held-out IIA with its interval, random
    subspaces of the same k (control) and the full-vector interchange (ceiling).

    Example: probekit das --model mult-5x1 --vary carry_in --hold column_sum --at digit_index=2
    --target carry --k 4 --n 2000 --out runs/das-carry
    """
    from probekit.commands import run_das

    _emit(run_das(model, vary, at, target, k=k, hold=hold, sites=sites, n=n, length=length, steps=steps,
                  seed=seed, out=out, overwrite=overwrite, device=device))


@app.command("edges")
def edges_cmd(
    model: str = MODEL,
    corruption: str = typer.Option(..., help="Corruption of the model's task: for multiplication e.g. "
                                             "operand-digit, for sorting e.g. successor-change."),
    metric: str = typer.Option("logit-diff", help="Gradient metric: logit-diff | logit | logprob | prob | margin."),
    method: str = typer.Option("eap", help="eap | eap-ig (gradients averaged over --steps interpolations)."),
    steps: int = typer.Option(10, help="EAP-IG interpolation steps (1 to 1000; eap ignores it)."),
    norm: str = typer.Option("exact", help="exact: each receiver's own norm applied to the sender's delta, "
                                           "the gradient taken after it; linear: the gradient before it."),
    ablation: str = typer.Option("mean", help="How edges outside a circuit are ablated: mean | resample."),
    direction: str = typer.Option("noise", help="noise: clean run, corrupted values in; denoise: the reverse."),
    n: int = typer.Option(64, help="Clean/corrupted pairs (1 to 100000)."),
    length: int | None = typer.Option(None, help="Input length (default: the task's default)."),
    seed: int = SEED,
    max_batch: int = typer.Option(512, help="Most rows per forward pass of the exact and circuit runs."),
    out: Path = typer.Option(..., help="Output folder: edges.json, edges.csv, edges.png."),
    overwrite: bool = OVERWRITE,
    device: str = DEVICE,
):
    """Circuit discovery on edges: EAP / EAP-IG scores, exact effects, faithfulness.

    Scores every edge (sender -> head q/k/v, MLP or logits) by attribution patching, checks the
    scores against each edge's exact patching effect (Spearman), and finds the fewest top-scored
    edges that keep 90 % of the clean metric when every other edge is ablated.

    Example: probekit edges --model mult-5x1 --corruption operand-digit --method eap-ig --steps 10
    --n 64 --out runs/edges
    """
    from probekit.commands import run_edges

    _emit(run_edges(model, corruption, metric=metric, method=method, steps=steps, ablation=ablation,
                    direction=direction, n=n, length=length, seed=seed, max_batch=max_batch, out=out,
                    overwrite=overwrite, device=device, norm=norm))


def _error(message: str, code: int = 2) -> int:
    typer.echo("error: " + " ".join(str(message).split()), err=True)
    return code


def _parser_error(e: Exception) -> int | None:
    """Exit code for a click/typer exception (typer may vendor its own click: matched by shape), else None."""
    name = type(e).__name__
    if name == "NoArgsIsHelpError":
        ctx = getattr(e, "ctx", None)
        typer.echo(ctx.get_help() if ctx is not None else e.format_message())
        return 0
    if name == "Exit":
        return int(getattr(e, "exit_code", 0) or 0)
    if name == "Abort":
        return _error("interrupted", 130)
    if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # usage errors: missing / unknown option, bad type
        ctx = getattr(e, "ctx", None)
        where = f"probekit {ctx.info_name}: " if ctx is not None and ctx.parent is not None else ""
        return _error(where + e.format_message())
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app; bad input of any kind becomes one ``error: ...`` line and exit code 2."""
    from probekit.tasks import ProbekitError

    try:
        app(args=argv, standalone_mode=False, prog_name="probekit")
    except ProbekitError as e:
        return _error(str(e))
    except KeyboardInterrupt:
        return _error("interrupted", 130)
    except MemoryError:
        return _error("out of memory; use a smaller --n or --max-batch")
    except OSError as e:  # a path the user gave that cannot be read or written
        return _error(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except Exception as e:
        code = _parser_error(e)
        if code is None:
            raise
        return code
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
    threads: int | None = typer.Option(None, help="Torch threads per job (default: the CPUs a job reserves); 1 "
                                                  "suits a machine busy with other work."),
    cpus: int | None = typer.Option(None, help="CPUs each job reserves on Ray (default: the grid's num_cpus, else "
                                               "every core); 1 on a 2-core machine runs two jobs at once."),
    archive: Path | None = typer.Option(None, help="Copy the finished jobs' records (config, metrics, training log; "
                                                    "no weights) into this folder, e.g. analyses/zoo/results/GRID; "
                                                    "run nothing."),
):
    """Train and evaluate every (configuration, seed) job of a grid as Ray tasks; finished jobs are skipped.

    Example: probekit sweep analyses/zoo/sort-extrap.json --out runs/sweeps/sort-extrap --dry-run
    """
    from probekit.grid import archive as archive_jobs
    from probekit.grid import load_grid, run_sweep, write_tables
    from probekit.tasks import ProbekitError

    selected = None if jobs is None else [s.strip() for s in jobs.split(",") if s.strip()]
    if selected == []:
        raise ProbekitError("--jobs is empty; expected configuration names or job ids, e.g. nope,learned-pos/seed0")
    if tables is not None or archive is not None:
        if dry_run or selected is not None or (tables is not None and archive is not None):
            raise ProbekitError("--tables and --archive each only read the finished jobs; give one of them, "
                                "without --dry-run or --jobs")
        if archive is not None:
            copied = archive_jobs(out, archive)
            typer.echo(f"archived {len(copied)} finished job(s) of {out} in {archive}")
            return
        typer.echo(f"wrote {write_tables(out, tables, grid=load_grid(grid))}")
        return
    run = run_sweep(grid, out, address=address, jobs=selected, dry_run=dry_run, progress=True, threads=threads,
                    cpus=cpus)
    typer.echo(run.describe())
    if run.failed:
        raise SystemExit(1)


@app.command("compare")
def compare_cmd(
    model: list[str] = typer.Option(..., metavar="NAME", help="Model A, then model B (give --model twice); one "
                                                               "shared task."),
    lengths: str = typer.Option(..., help="Comma-separated lengths: accuracy by length and probe test lengths."),
    out: Path = typer.Option(..., help="Output folder: compare.json, compare_<part>.json|csv|png "
                                       "(accuracy, probe, patch, attribution)."),
    n: int = typer.Option(200, help="Examples per length, probe batch, patching pairs (1 to 100000)."),
    seed: int = SEED,
    feature: str | None = typer.Option(None, help="Probe feature (default: the task's probe_feature: target for sorting, carry_out for "
                                                  "multiplication)."),
    hook: str = typer.Option("resid_post", help="Probe hook kind (every layer), e.g. resid_pre | resid_post."),
    train_length: int | None = typer.Option(None, help="Probe training length (default --length)."),
    corruption: str | None = typer.Option(None, help="Patching corruption (default: the task's first)."),
    site: str = typer.Option("head", help="Patching site, as in probekit patch."),
    metric: str = typer.Option("logit-diff", help="Patching metric, as in probekit patch (normalised)."),
    attribution: str = typer.Option("dla", help="dla (by head and position) | ablate (zero-ablate each head)."),
    length: int | None = typer.Option(None, help="Input length of probe fit, patching and attribution "
                                                 "(default: the task's default)."),
    max_batch: int = typer.Option(512, help="Rows per forward pass (>= 1)."),
    overwrite: bool = OVERWRITE,
    device: str = DEVICE,
):
    """Two models on one task, side by side and as differences (B - A).

    Example: probekit compare --model sort-baseline --model sort-successor --lengths 10,20,30 --n 200 --out runs/cmp
    """
    from probekit.commands import run_compare

    _emit(run_compare(model, lengths, n=n, seed=seed, feature=feature, hook=hook, train_length=train_length,
                      corruption=corruption, site=site, metric=metric, attribution=attribution, length=length,
                      max_batch=max_batch, out=out, overwrite=overwrite, device=device))
