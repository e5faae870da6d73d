"""The `probekit` command line: thin wrappers over library functions.

Every command exits 0 on success and 2 on bad input with a one-line ``error: ...`` message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

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
    device: str = typer.Option("cpu"),
):
    """Greedy-decoding accuracy by length.

    Example: probekit eval --model sort-successor --lengths 10,20,50,100 --n 500 --seed 0 --json
    """
    from probekit.evaluate import evaluate
    from probekit.model import _write_json, load_model, resolve_model_dir

    from probekit.tasks import ProbekitError

    if n <= 0:
        raise ProbekitError(f"--n must be positive, got {n}")
    m, task, _ = load_model(model, device=device)
    res = evaluate(m, task, parse_ints(lengths, "--lengths"), n=n, seed=seed, max_batch=max_batch,
                   progress=not as_json)
    if save_metrics:
        folder = resolve_model_dir(model)
        _write_json(folder / "metrics.json", json.loads(res.to_json()) | {
            "command": f"probekit eval --model {model} --lengths {lengths} --n {n} --seed {seed} --save-metrics"})
    if as_json:
        typer.echo(json.dumps(res.records))
    else:
        df = res.to_frame()[["length", "n", "exact_match", "ci_low", "ci_high", "token_acc"]]
        typer.echo(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


@app.command()
def demo(out: Path = typer.Option(Path("reports/demo"), help="Where results go."),
         overwrite: bool = typer.Option(True, help="Replace an earlier demo's output.")):
    """The main job on the shipped models (`make demo`)."""
    from probekit.report import run_demo

    run_demo(out, overwrite=overwrite)


def main(argv: Optional[list[str]] = None) -> int:
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
