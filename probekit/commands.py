"""What each ``probekit`` command does, as plain functions: validate, compute, write, summarise.

Each ``run_<command>`` checks every argument before anything runs (seeds, counts, batch sizes,
devices, the output folder), then works inside `probekit.io.output_dir`: the ``--out`` folder is
checked, created and locked for the whole command, and the files appear only if it succeeds.
Each returns an `Outcome` (the lines to print, the files written, and the JSON for ``--json``).

Output naming, the same in every command: a command's main result is ``<command>.json`` (the result,
strict JSON), ``<command>.csv`` (long form, one row per cell) and ``<command>.png`` (its figure);
further results of the same command are ``<command>_<part>.json|csv|png``. ``train`` writes a model
folder (``model.safetensors``, ``config.json``, ``train_log.jsonl``); ``report`` writes
``report.html`` + ``report_<study>.json``.

    probekit eval      eval.json, eval.csv, eval.png
    probekit patch     patch.json, patch.csv, patch.png
    probekit probe     probe.json, probe.csv, probe_heatmap_<hook>.png, probe_<metric>_vs_length.png,
                       probes/<hook>/ (--save-probes)
    probekit attribute attribute.json|csv|png (dla: heads x positions; ablate: the head sweep;
                       attrib-patch: attribution to heads) + attribute_<part>.*, attribute_<plot>.png,
                       attribute_attention.html (--html)
    probekit circuits  circuits.json (QK/OV circuits, scores, composition), circuits.csv (scores),
                       circuits_composition.csv, circuits.png
    probekit das       das.json, das.csv, das.png (IIA, random-subspace control, full-vector ceiling)
    probekit edges     edges.json (EAP / EAP-IG scores, exact effects, faithfulness curve), edges.csv (one row
                       per edge), edges.png
    probekit compare   compare.json (settings), compare_<part>.json|csv|png for accuracy, probe, patch and
                       attribution: each a result with a leading model axis (A, B, B - A)
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from probekit.tasks import ProbekitError

N_MAX = 100_000  # examples per length / batch: more would not fit in memory on the machines we target
SEED_MAX = 2**31 - 1


@dataclass
class Outcome:
    """What a command did: ``lines`` to print, ``files`` written under ``out``, ``json`` for ``--json``."""

    lines: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    out: Path | None = None
    json: str | None = None

    def wrote(self) -> str | None:
        """``"wrote a.json, b.csv to OUT"`` (top-level names under ``out``), or None when nothing was written."""
        if self.out is None or not self.files:
            return None
        names = sorted({str(p.relative_to(self.out)).split("/")[0] for p in self.files})
        return f"wrote {', '.join(names)} to {self.out}"


# ---------------------------------------------------------------------------- validation


def check_int(value, name: str, lo: int = 1, hi: int | None = None) -> int | None:
    """``value`` (or None) as an int in ``[lo, hi]``; refuses with the bound in the message."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProbekitError(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise ProbekitError(f"{name} must be {'positive' if lo == 1 else f'>= {lo}'}, got {value}")
    if hi is not None and value > hi:
        raise ProbekitError(f"{name} must be <= {hi:_}, got {value:_}")
    return value


def check_n(value, name: str = "--n") -> int | None:
    """A number of examples: 1 to `N_MAX` (None passes)."""
    return check_int(value, name, 1, N_MAX)


def check_seed(seed, name: str = "--seed") -> int:
    """A seed: 0 to `SEED_MAX`."""
    return check_int(seed, name, 0, SEED_MAX)


def check_device(device: str) -> str:
    """A torch device that exists here: ``cpu``; ``cuda``/``cuda:N`` and ``mps`` only when available."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        d = None
    avail = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + \
        (["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else [])
    if d is None or d.type not in avail:
        raise ProbekitError(f"--device {device!r} is not available; expected one of {avail}")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ProbekitError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def parse_ints(text: str | None, what: str, lo: int = 1) -> list[int] | None:
    """``"10,20,50"`` -> ``[10, 20, 50]``, each ``>= lo``."""
    if text is None:
        return None
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ProbekitError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise ProbekitError(f"{what} is empty; expected e.g. 10,20,50")
    for v in vals:
        if v < lo:
            raise ProbekitError(f"{what} must hold integers >= {lo}, got {v}")
    return vals


def _out(out: Path | None, overwrite: bool, stage: bool = True):
    from probekit.io import output_dir

    return output_dir(out, overwrite=overwrite, stage=stage) if out is not None else contextlib.nullcontext()


def _write_result(res, out: Path, stem: str, figure=None) -> list[Path]:
    """``<stem>.json`` + ``<stem>.csv`` (+ ``<stem>.png`` drawn by ``figure(res, path)``)."""
    from probekit.io import write_csv, write_text

    paths = [write_text(out / f"{stem}.json", res.to_json()), write_csv(out / f"{stem}.csv", res.to_frame())]
    if figure is not None:
        figure(res, out / f"{stem}.png")
        paths.append(out / f"{stem}.png")
    return paths


# ---------------------------------------------------------------------------- train


def config_path(config: str | Path) -> Path:
    """``config`` itself, or ``models/<name>/config.json`` when ``config`` is not a path but a shipped model's name
    (``probekit train --config sort-baseline`` retrains the shipped sort-baseline)."""
    from probekit.model import MODELS_DIR, shipped_models

    p = Path(config)
    if not p.exists():
        names = shipped_models()
        if str(config) in names:
            return MODELS_DIR / str(config) / "config.json"
        if p.suffix != ".json" and len(p.parts) == 1:
            raise ProbekitError(f"--config {str(config)!r} is neither a file nor a shipped model; "
                                f"expected a JSON config or one of {names}")
    return p


def run_train(config: Path, out: Path, overwrite: bool = False, device: str = "cpu", progress: bool = True) -> Outcome:
    """Train from a config file into ``out`` (a folder holding a checkpoint is resumed)."""
    from probekit.train import load_run_config, train

    check_device(device)
    mcfg, task, tcfg, conf = load_run_config(config_path(config))
    from probekit.train import CHECKPOINT, RUN_FILE

    resumable = Path(out).is_dir() and any((Path(out) / f).exists() for f in (CHECKPOINT, RUN_FILE))
    with _out(out, overwrite or resumable, stage=False):
        train(mcfg, task, tcfg, out=out, name=conf.get("name") or Path(out).name, overwrite=overwrite,
              device=device, progress=progress)
    return Outcome(lines=[f"saved {out}"])


# ---------------------------------------------------------------------------- eval


def _metrics_folder(model: str, overwrite: bool) -> Path:
    import os

    from probekit.model import MODELS_DIR, resolve_model_dir

    folder = resolve_model_dir(model)
    if folder.resolve().is_relative_to(MODELS_DIR.resolve()) and not overwrite:
        raise ProbekitError(f"--save-metrics would replace {folder / 'metrics.json'} of a shipped model; "
                            "pass --overwrite to do so")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ProbekitError(f"--save-metrics: {folder} is not writable")
    return folder


def run_eval(model: str, lengths: str = "10,20,50", n: int = 500, seed: int = 0, max_batch: int = 512,
             errors: bool = False, save_metrics: bool = False, out: Path | None = None, overwrite: bool = False,
             device: str = "cpu", progress: bool = True, place_offsets: str | None = None) -> Outcome:
    """Greedy-decoding accuracy by length (+ the sorting error split); ``eval.json|csv|png`` in ``out``.

    ``place_offsets``: ``"train"`` or comma-separated offsets, for a place model's offset ensemble
    (`probekit.evaluate.greedy_decode`)."""
    from probekit.evaluate import evaluate, sort_error_kinds
    from probekit.io import dumps_json, write_json

    check_n(n), check_seed(seed), check_int(max_batch, "--max-batch"), check_device(device)
    lens = parse_ints(lengths, "--lengths")
    offsets = place_offsets
    if place_offsets not in (None, "train"):
        try:
            offsets = parse_ints(place_offsets, "--place-offsets", lo=0)
        except ProbekitError:
            raise ProbekitError(f"--place-offsets must be 'train' or comma-separated integers >= 0, "
                                f"got {place_offsets!r}") from None
    folder = _metrics_folder(model, overwrite) if save_metrics else None
    with _out(out, overwrite):
        m, task = _load(model, device)
        if errors and task.objective != "sort":
            raise ProbekitError(f"--errors needs a sorting model with the 'sort' objective, got task {task.name!r} "
                                f"({task.objective!r})")
        res = evaluate(m, task, lens, n=n, seed=seed, max_batch=max_batch, progress=progress, place_offsets=offsets)
        for rec in res.records if errors else []:  # evaluate samples length L with seed * 1000 + L: the same lists
            rec["errors"] = sort_error_kinds(m, task.sample(n, length=rec["length"], seed=seed * 1000 + rec["length"]),
                                             max_batch=min(max_batch, 256))
        files = _write_eval(res, out) if out is not None else []
    if folder is not None:
        cmd = f"probekit eval --model {model} --lengths {lengths} --n {n} --seed {seed} --save-metrics" + \
            (f" --place-offsets {place_offsets}" if place_offsets is not None else "") + \
            (" --overwrite" if overwrite else "")
        saved = write_json(folder / "metrics.json", json.loads(res.to_json()) | {"command": cmd})
    lines = _eval_lines(res, errors) + ([f"wrote {saved}"] if folder is not None else [])
    return Outcome(lines=lines, files=files, out=out, json=dumps_json(res.records, indent=None))


def _write_eval(res, out: Path) -> list[Path]:
    from probekit import viz
    from probekit.io import write_csv, write_json

    fig = viz.accuracy_vs_length(res, title=f"{res.model}: exact match vs length (greedy)")
    return [write_json(out / "eval.json", json.loads(res.to_json())), write_csv(out / "eval.csv", res.to_frame()),
            *viz.save_figure(fig, out / "eval.png")]


def _eval_lines(res, errors: bool) -> list[str]:
    df = res.to_frame()[["length", "n", "exact_match", "ci_low", "ci_high", "token_acc"]]
    lines = [df.to_string(index=False, float_format=lambda v: f"{v:.3f}")]
    if res.place_offsets is not None:
        lines.append("next-token probabilities averaged over place offsets: "
                     + "; ".join(f"length {r['length']}: {r['place_offsets']}" for r in res.records))
    for rec in res.records if errors else []:
        e = rec["errors"]
        fe = e["first_error"]
        lines.append(f"length {rec['length']}: {100 * e['repeat_share']:.1f} % of steps repeat the previous output; "
                     f"step errors {100 * e['error_rate']['repeat']:.1f} % on repeats, "
                     f"{100 * e['error_rate']['new']:.1f} % on new values; first error: extra copy "
                     f"{fe['extra_copy']}, dropped copy {fe['dropped_copy']}, wrong value {fe['wrong_value']}, "
                     f"none {fe['none']}")
    return lines


def _load(model: str, device: str):
    from probekit.model import load_model

    m, task, _ = load_model(model, device=device)
    return m, task


# ---------------------------------------------------------------------------- patch


def _corruption_options(task, corruption: str, digit: int | None, operand: str | None, place: int | None) -> dict:
    """The keyword arguments of `probekit.corruptions.corrupt` that the CLI options map to."""
    from probekit.corruptions import corruption_kinds

    if corruption not in corruption_kinds(task):
        raise ProbekitError(f"corruption {corruption!r} is not defined for task {task.name!r}; "
                            f"expected one of {list(corruption_kinds(task))}")
    allowed = {"carry-flip": ("operand",), "column-digit": ("operand",), "operand-digit": ("operand", "place")}.get(corruption, ())
    opts: dict = {}
    for k, v in {"operand": operand, "place": place}.items():
        if v is not None:
            if k not in allowed:
                raise ProbekitError(f"--{k} does not apply to corruption {corruption!r}")
            opts[k] = v
    if corruption in ("carry-flip", "column-digit") and digit is not None:
        opts["digit"] = digit
    if corruption == "successor-change" and digit is not None:
        opts["step"] = digit
    return opts


def _patch_figure(res, corruption: str, metric: str, raw: bool):
    def draw(r, path):
        from probekit import viz

        if r.values.ndim == 3:  # (layer, pos, head): one row per head, labelled L<l>H<h>
            fig = viz.layer_pos_heatmap(r)
        else:
            fig = viz.heatmap(r, rows="layer", cols=r.axes[1] if r.values.ndim >= 2 else None)
        viz.save_figure(fig, path)

    return draw


def run_patch(model: str, corruption: str, site: str = "head", by_pos: bool = True, metric: str = "logit-diff",
              n: int = 256, seed: int = 0, length: int | None = None, digit: int | None = None,
              operand: str | None = None, place: int | None = None, direction: str = "denoise", raw: bool = False,
              layers: str | None = None, heads: str | None = None, positions: str | None = None,
              max_batch: int = 1024, top: int = 10, out: Path | None = None, as_json: bool = False,
              overwrite: bool = False, device: str = "cpu", progress: bool = True) -> Outcome:
    """Activation patching sweep over ``site``; ``patch.json|csv|png`` in ``out``."""
    from probekit import patching as P
    from probekit.corruptions import corrupt
    from probekit.evaluate import check_fits

    site_c = P.canonical_site(site)
    from probekit.metrics import check_metric

    check_metric(metric)
    if direction not in ("denoise", "noise"):
        raise ProbekitError(f"unknown direction {direction!r}; expected 'denoise' or 'noise'")
    check_n(n), check_seed(seed), check_int(max_batch, "--max-batch"), check_int(top, "--top"), check_device(device)
    check_int(length, "--length"), check_int(digit, "--digit", 0), check_int(place, "--place", 0)
    if out is None and not as_json:
        raise ProbekitError("nothing to write: pass --out DIR and/or --json")
    sel = {k: parse_ints(v, f"--{k}", lo=0) for k, v in (("layers", layers), ("heads", heads), ("positions", positions))}
    with _out(out, overwrite):
        m, task = _load(model, device)
        opts = _corruption_options(task, corruption, digit, operand, place)
        check_fits(m, task, length)
        pair = corrupt(task, task.sample(n, length=length, seed=seed), corruption, seed=seed, **opts)
        steps = (P.digit_step(pair.clean, digit),) if digit is not None else None
        res = P.sweep(m, pair, site_c, by_pos=by_pos, metric=P.Metric(metric, steps), direction=direction,
                      normalize=not raw, max_batch=max_batch, progress=progress and not as_json, **sel)
        res.settings["command"] = {"model": model, "corruption": corruption, "site": site, "by_pos": by_pos,
                                   "metric": metric, "n": n, "seed": seed, "length": length, "digit": digit,
                                   "operand": operand, "place": place, "direction": direction, "raw": raw, **sel}
        files = _write_result(res, out, "patch", _patch_figure(res, corruption, metric, raw)) if out is not None else []
    s = res.settings
    lines = [f"{pair.kind}: {s['n']} pairs ({pair.n_invalid} had no valid corruption, {pair.invalid_policy}d); "
             f"metric {metric} clean {s['clean_metric']:.4f}, corrupted {s['corrupted_metric']:.4f}; "
             f"values {'raw' if raw else 'normalised (0 = corrupted, 1 = clean)'}"]
    rows = [(coords, v) for coords, v in res.top(top) if abs(v) >= 5e-5]  # rows that print as 0.0000 say nothing
    lines += ["  " + "  ".join(f"{k} {c:>4}" for k, c in coords.items()) + f"  {v:+.4f}" for coords, v in rows]
    if len(rows) < min(top, res.values.numel()):
        lines.append(f"  (every other component: 0.0000; {len(rows)} non-zero shown)")
    return Outcome(lines=lines, files=files, out=out, json=res.to_json())


# ---------------------------------------------------------------------------- probe


def run_probe(model: str, feature: str, hooks: str, train_length: int, test_lengths: str, n: int = 2000,
              n_test: int | None = None, seed: int = 0, positions: str = "feature", by_position: bool = False,
              kind: str = "auto", controls: bool = True, save_probes: bool = False, out: Path | None = None,
              overwrite: bool = False, device: str = "cpu", progress: bool = True) -> Outcome:
    """Linear probes by layer, scored on longer inputs; ``probe.json|csv`` + ``probe_*.png`` in ``out``."""
    from probekit.probes import probe_lengths, write_sweep

    if out is None:
        raise ProbekitError("--out is required; expected a folder for probe.json, probe.csv and the heatmaps")
    check_n(n), check_n(n_test, "--n-test"), check_seed(seed), check_int(train_length, "--train-length")
    check_device(device)
    lengths = parse_ints(test_lengths, "--test-lengths")
    with _out(out, overwrite):
        m, task = _load(model, device)
        sweep = probe_lengths(m, task, feature, hooks, train_length, lengths, n=n, n_test=n_test, seed=seed,
                              positions=positions, by_position=by_position, kind=kind, controls=controls,
                              progress=progress)
        sweep.settings["command"] = {"model": model, "feature": feature, "hooks": hooks, "train_length": train_length,
                                     "test_lengths": lengths, "n": n, "n_test": n_test, "seed": seed,
                                     "positions": positions, "by_position": by_position, "kind": kind,
                                     "controls": controls}
        files = write_sweep(sweep, out, save_probes=save_probes, stem="probe", prefix="probe_")
    return Outcome(lines=[sweep.summary()], files=files, out=out, json=sweep.to_json())


# ---------------------------------------------------------------------------- attribute

ATTRIBUTE_METHODS = ("dla", "ablate", "attrib-patch")
_ATTRIBUTE_AXES = {"dla": ("dla_head", ("layer", "pos", "head")), "ablate": ("head_ablation_sweep", ("layer", "head")),
                   "attrib-patch": ("attrib_patch_heads", ("layer", "pos", "head"))}


def attribute_metric(method: str, metric: str | None) -> str:
    """The metric for ``method`` (its default when None), refused when the method does not define it."""
    from probekit import attribution as A
    from probekit.metrics import check_metric

    allowed = {"dla": A.DLA_METRICS, "ablate": A.ABLATION_METRICS, "attrib-patch": A.GRADIENT_METRICS}[method]
    return check_metric(metric or {"dla": "logit", "ablate": "logprob", "attrib-patch": "logit-diff"}[method],
                        allowed, f"{method} metric")


def _attr_dla(m, task, batch, metric, out, **_) -> tuple:
    from probekit import attribution as A
    from probekit import viz

    res = A.direct_logit_attribution(m, batch, unit="head", metric=metric, vocab=task.vocab)
    layers = A.direct_logit_attribution(m, batch, unit="layer", metric=metric, vocab=task.vocab)
    src = A.direct_logit_attribution(m, batch, unit="source", metric=metric, vocab=task.vocab)
    files = (_write_result(res, out, "attribute", viz.layer_pos_heatmap)
             + _write_result(layers, out, "attribute_layers", viz.layer_pos_heatmap)
             + _write_result(src, out, "attribute_source"))
    top = A.head_scores(res).flatten()
    order = sorted(range(top.numel()), key=lambda i: -float(top[i]))[:5]
    line = (f"DLA ({metric}) completeness error {layers.settings['completeness_max_abs_error']:.2e}; "
            "top heads by |DLA| summed over positions: "
            + ", ".join(A.head_label(i // m.cfg.n_heads, i % m.cfg.n_heads) for i in order))
    return res, files, [line]


def _attr_ablate(m, task, batch, metric, out, ablation, reference, head_set, k, n_random, seed, **_) -> tuple:
    from probekit import attribution as A
    from probekit import viz

    res = A.head_ablation_sweep(m, batch, method=ablation, reference=reference, metric=metric, seed=seed)
    tvr = A.topk_vs_random(m, batch, res, k=k, n_random=n_random, method=ablation, reference=reference,
                           metric=metric, seed=seed)
    files = _write_result(res, out, "attribute", viz.layer_head_heatmap) + _write_result(tvr, out,
                                                                                         "attribute_topk_vs_random")
    if head_set is not None:
        files += _write_result(A.ablate_heads(m, batch, head_set, method=ablation, reference=reference, metric=metric,
                                              seed=seed), out, "attribute_head_set")
    s = tvr.settings
    line = (f"{ablation} ablation: clean exact match {float(tvr.values[0, 1]):.3f}; top-{k} heads "
            f"{', '.join(s['top_heads'])} -> {float(tvr.values[1, 1]):.3f}; {n_random} random sets "
            f"-> mean {s['random_mean'][1]:.3f} (min {s['random_min'][1]:.3f}, max {s['random_max'][1]:.3f})")
    return res, files, [line]


def _attr_patch(m, task, batch, metric, out, corruption, exact, ig_steps, seed, **_) -> tuple:
    from probekit import attribution as A
    from probekit import viz
    from probekit.corruptions import corrupt, corruption_kinds
    from probekit.io import write_json

    pair = corrupt(task, batch, corruption or corruption_kinds(task)[0], seed=seed)
    ap = A.attribution_patching(m, pair.clean, pair.corrupted, metric=metric, exact=exact, ig_steps=ig_steps,
                                vocab=task.vocab, steps=pair.answer_steps)
    files = _write_result(ap.heads, out, "attribute", viz.layer_pos_heatmap)
    for name, r in (("mlp", ap.mlp), ("exact_heads", ap.exact_heads), ("exact_mlp", ap.exact_mlp)):
        if r is not None:
            files += _write_result(r, out, f"attribute_{name}", viz.layer_pos_heatmap)
    files += [write_json(out / "attribute_agreement.json", ap.agreement),
              write_json(out / "attribute_all.json", json.loads(ap.to_json()), indent=None)]
    lines = []
    for name, ag in ap.agreement.items():
        sp = "n/a" if ag["spearman"] is None else f"{ag['spearman']:.3f}"
        lines.append(f"{name}: attribution vs exact patching Spearman {sp}, top-{ag['k']} overlap {ag['topk_overlap']:.2f}")
    return ap.heads, files, lines


_ATTRIBUTE_RUN = {"dla": _attr_dla, "ablate": _attr_ablate, "attrib-patch": _attr_patch}


def _check_attribute(method, ablation, metric, plot, n, seed, length, k, n_random, ig_steps, reference_length, device):
    from probekit import attribution as A
    from probekit import viz

    if method not in ATTRIBUTE_METHODS:
        raise ProbekitError(f"unknown method {method!r}; expected one of {list(ATTRIBUTE_METHODS)}")
    if ablation not in A.ABLATIONS:
        raise ProbekitError(f"unknown ablation {ablation!r}; expected one of {list(A.ABLATIONS)}")
    check_n(n), check_seed(seed), check_int(length, "--length"), check_int(k, "--k")
    check_int(n_random, "--n-random", 1, 10_000), check_int(ig_steps, "--ig-steps", 1, 1000)
    check_int(reference_length, "--reference-length"), check_device(device)
    if plot is not None:
        viz.check_plot(plot, *_ATTRIBUTE_AXES[method])
    return attribute_metric(method, metric)


def _reference(m, task, batch, method, ablation, n, seed, reference_length, reference_objective):
    from probekit import attribution as A
    from probekit.evaluate import check_fits

    if method != "ablate" or ablation == "zero":
        return None
    ref_task = task.with_objective(reference_objective) if reference_objective else task
    check_fits(m, ref_task, reference_length or batch.length)
    reference = ref_task.sample(n, length=reference_length or batch.length, seed=seed + 1)
    A._check_reference(batch, reference)
    return reference


def run_attribute(model: str, method: str, out: Path, n: int = 256, seed: int = 0, length: int | None = None,
                  metric: str | None = None, ablation: str = "zero", heads: str | None = None, k: int = 3,
                  n_random: int = 10, reference_length: int | None = None, reference_objective: str | None = None,
                  corruption: str | None = None, exact: bool = True, ig_steps: int = 1, plot: str | None = None,
                  html: bool = False, overwrite: bool = False, device: str = "cpu") -> Outcome:
    """Direct logit attribution, head ablation or attribution patching; ``attribute*.json|csv|png`` in ``out``."""
    from probekit import attribution as A
    from probekit import viz
    from probekit.evaluate import check_fits

    metric = _check_attribute(method, ablation, metric, plot, n, seed, length, k, n_random, ig_steps,
                              reference_length, device)
    with _out(out, overwrite):
        m, task = _load(model, device)
        check_fits(m, task, length)
        head_set = A.parse_heads(heads, m) if heads is not None else None
        if method == "ablate" and k > m.cfg.n_layers * m.cfg.n_heads:
            raise ProbekitError(f"--k {k} is more than the model's {m.cfg.n_layers * m.cfg.n_heads} heads")
        batch = task.sample(n, length=length, seed=seed)
        reference = _reference(m, task, batch, method, ablation, n, seed, reference_length, reference_objective)
        res, files, lines = _ATTRIBUTE_RUN[method](
            m, task, batch, metric, out, ablation=ablation, reference=reference, head_set=head_set, k=k,
            n_random=n_random, seed=seed, corruption=corruption, exact=exact, ig_steps=ig_steps)
        if plot is not None:
            files += viz.save_figure(viz.plot(res, plot), out / f"attribute_{plot}.png")
        if html:
            viz.attention_html(m, batch, task=task, path=out / "attribute_attention.html")
            files.append(out / "attribute_attention.html")
    return Outcome(lines=lines, files=files, out=out)


# ---------------------------------------------------------------------------- circuits


def _parse_head_spec(heads: str | None, m) -> list | None:
    """``--heads``: ``all`` (or unset) -> None (every head); ``L1H0,L1H2`` -> checked (layer, head) pairs."""
    from probekit.attribution import parse_heads

    if heads is None or heads.strip().lower() == "all":
        return None
    return parse_heads(heads, m)


def _circuits_figure(report, path: Path) -> list[Path]:
    """One figure: a row per head (QK | OV circuit, each column on a shared colour scale), then the Q-, K-
    and V-composition scores minus their random baseline (writer head x reader head)."""
    import math

    import matplotlib.pyplot as plt
    import torch

    from probekit.attribution import head_label
    from probekit.circuits import robust_limit
    from probekit.viz import save_figure

    qk, ov, comp = report.qk, report.ov, list(report.composition.values())
    heads, n_tok = qk.labels["head"], qk.values.shape[-1]
    per_row = 1 if len(heads) <= 4 else 2  # heads side by side past four, so that the figure stays readable
    n_rows = math.ceil(len(heads) / per_row)
    fig = plt.figure(figsize=(11 * per_row, 2.6 * n_rows + 3.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.6 * n_rows, 3.4])
    axs = top.subplots(n_rows, 2 * per_row, squeeze=False)
    for ax in axs.flat[2 * len(heads):]:
        ax.axis("off")
    ticks = list(range(0, n_tok, max(1, n_tok // 10)))
    for j, (res, what) in enumerate(((qk, "QK: query token x key token"), (ov, "OV: source token x output logit"))):
        lim = robust_limit(res.values)
        for i, head in enumerate(heads):
            r, ax = i // per_row, axs[i // per_row, 2 * (i % per_row) + j]
            im = ax.imshow(res.values[i].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
            ax.set_title(f"{head} {what}", fontsize=8)
            ax.set_yticks(ticks, [res.label(res.axes[1], t) for t in ticks], fontsize=6)
            ax.set_xticks(ticks, [res.label(res.axes[2], t) for t in ticks], fontsize=6)
            ax.set_ylabel(res.axes[1].replace("_", " "), fontsize=7)
            ax.set_xlabel(res.axes[2].replace("_", " ") if r == n_rows - 1 else "", fontsize=7)
        top.colorbar(im, ax=axs[:, j::2], shrink=0.8, location="left" if j == 0 else "right").set_label(
            res.settings["units"], fontsize=8)
    nL, nH = comp[0].values.shape[:2]
    names = [head_label(L, h) for L in range(nL) for h in range(nH)]
    diffs = [(r.values - r.settings["baseline_mean"]).reshape(nL * nH, nL * nH) for r in comp]
    lim = robust_limit(torch.stack(diffs))
    cax = bottom.subplots(1, len(comp), squeeze=False)[0]
    for ax, r, d in zip(cax, comp, diffs, strict=True):
        ax.set_facecolor("0.85")  # undefined: the writer is not in an earlier layer
        im = ax.imshow(d.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_title(f"{r.settings['mode']}-composition (baseline {r.settings['baseline_mean']:.3f} "
                     f"+/- {r.settings['baseline_std']:.3f})", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set_xlabel("reader head", fontsize=8)
    cax[0].set_ylabel("writer head", fontsize=8)
    bottom.colorbar(im, ax=cax, shrink=0.8).set_label("score minus random baseline", fontsize=8)
    fig.suptitle(f"{qk.settings.get('model') or 'model'}: weight-based circuits (LN: {qk.settings['ln']}); "
                 "grey: undefined (same or later layer)")
    return save_figure(fig, path)


def _circuits_lines(report) -> list[str]:
    from probekit.attribution import head_label

    lines = [f"{name}: " + ", ".join(f"{h} {v:.2f}" for h, v in report.top(name, 3))
             for name in ("qk_succ_top", "qk_copy_top", "ov_copy_top")]
    for r in report.composition.values():
        z = r.extra["z"].nan_to_num(float("-inf"))
        i = int(z.argmax())
        wL, wh, rL, rh = (i // z[0].numel(), i // z[0, 0].numel() % z.shape[1], i // z.shape[3] % z.shape[2],
                          i % z.shape[3])
        best = "undefined (one layer)" if r.extra["z"].isnan().all() else \
            f"highest {head_label(wL, wh)} -> {head_label(rL, rh)}, z = {float(z.max()):.1f}"
        lines.append(f"{r.settings['mode']}-composition vs random baseline "
                     f"{r.settings['baseline_mean']:.3f} +/- {r.settings['baseline_std']:.3f}: {best}")
    return lines


def run_circuits(model: str, heads: str | None = None, ln: str = "embed", n_random: int = 20, seed: int = 0,
                 out: Path | None = None, overwrite: bool = False, device: str = "cpu") -> Outcome:
    """QK/OV circuits of the chosen heads, their scores and the composition scores (weights only, no data);
    ``circuits.json`` (every result), ``circuits.csv`` (scores, long form), ``circuits_composition.csv``,
    ``circuits.png`` in ``out``."""
    import pandas as pd

    from probekit.circuits import LN_MODES, circuit_report
    from probekit.io import write_csv, write_json

    if out is None:
        raise ProbekitError("--out is required; expected a folder for circuits.json, circuits.csv and circuits.png")
    if ln not in LN_MODES:
        raise ProbekitError(f"unknown --ln {ln!r}; expected one of {list(LN_MODES)}")
    check_int(n_random, "--n-random", 2, 10_000), check_seed(seed), check_device(device)
    with _out(out, overwrite):
        m, task = _load(model, device)
        rep = circuit_report(m, task=task, heads=_parse_head_spec(heads, m), ln=ln, n_random=n_random, seed=seed)
        command = {"model": model, "heads": heads or "all", "ln": ln, "n_random": n_random, "seed": seed}
        comp = pd.concat([r.to_frame().assign(mode=r.settings["mode"]) for r in rep.composition.values()])
        files = [write_json(out / "circuits.json", {**json.loads(rep.to_json()), "command": command}, indent=None),
                 write_csv(out / "circuits.csv", rep.scores.to_frame()),
                 write_csv(out / "circuits_composition.csv", comp), *_circuits_figure(rep, out / "circuits.png")]
    return Outcome(lines=_circuits_lines(rep), files=files, out=out)


# ---------------------------------------------------------------------------- das


def _check_das_features(m, task, vary: str, hold: list[str], at, target: str, k: int, sites, length) -> None:
    """Refuse, before any fitting, a feature the task does not have, a site the model lacks, ``k > d_model``."""
    from probekit.evaluate import check_fits
    from probekit.interventions import BLOCK_SITES, Location, Where

    check_fits(m, task, length)
    batch = task.sample(2, length=length, seed=0)
    named = [vary, *hold] + ([n for n, _ in at.values] if isinstance(at, Where) else [])
    named += [target[len("source:"):]] if target.startswith("source:") else ["column_sum", "carry_in"]
    for name in named:
        batch.feature(name)
    for site in sites or ["resid_pre"]:
        Location(site, 0, at).check(m)
        if site in BLOCK_SITES and k > m.cfg.d_model:
            raise ProbekitError(f"--k {k} is more than d_model = {m.cfg.d_model} (the size of {site})")


def run_das(model: str, vary: str, at: str, target: str, k: int = 4, hold: str | None = None,
            sites: str | None = None, n: int = 2000, length: int | None = None, steps: int = 300, seed: int = 0,
            out: Path | None = None, overwrite: bool = False, device: str = "cpu", progress: bool = True) -> Outcome:
    """DAS at every (site, layer): held-out IIA with its interval, the random-subspace control and the
    full-vector ceiling; ``das.json|csv|png`` in ``out``."""
    from probekit.interventions import das_sweep, parse_positions, plot_iia

    if out is None:
        raise ProbekitError("--out is required; expected a folder for das.json, das.csv and das.png")
    if not (target == "carry" or (target.startswith("source:") and len(target) > len("source:"))):
        raise ProbekitError(f"unknown --target {target!r}; expected 'carry' or 'source:FEATURE' (e.g. source:target)")
    check_int(k, "--k"), check_int(n, "--n", 8, N_MAX), check_int(steps, "--steps", 1, 100_000), check_seed(seed)
    check_int(length, "--length"), check_device(device)
    pos, held = parse_positions(at), [h.strip() for h in (hold or "").split(",") if h.strip()]
    site_list = None if sites is None else [s.strip() for s in sites.split(",") if s.strip()]
    if site_list == []:
        raise ProbekitError("--sites is empty; expected e.g. resid_pre,resid_mid,resid_post")
    with _out(out, overwrite):
        m, task = _load(model, device)
        _check_das_features(m, task, vary, held, pos, target, k, site_list, length)
        res = das_sweep(m, task, vary=vary, at=pos, target=target, k=k, hold=held, n=n, length=length, seed=seed,
                        sites=site_list, steps=steps, progress=progress)
        res.settings["command"] = {"model": model, "vary": vary, "hold": held, "at": at, "target": target, "k": k,
                                   "sites": site_list, "n": n, "length": length, "steps": steps, "seed": seed}
        files = _write_result(res, out, "das", plot_iia)
    lines = [f"{s['location']}: IIA {s['iia']:.3f} [{s['iia_lo']:.3f}, {s['iia_hi']:.3f}], random subspace "
             f"{s['control_mean']:.3f}, full vector {s['ceiling']:.3f}, base run {s['floor']:.3f}"
             for s in res.settings["fits"]]
    return Outcome(lines=lines, files=files, out=out, json=res.to_json())


# ---------------------------------------------------------------------------- edges

EDGE_STEPS_MAX = 1000  # EAP-IG interpolation steps: each is one forward and one backward pass


def _edges_lines(rep) -> list[str]:
    f = rep.faithfulness
    keeps = (f"smallest circuit keeping {f.threshold:.0%} ({f.ablation} ablation): "
             + (f"{f.smallest} of {len(rep.edges)} edges" if f.smallest is not None else "none of those evaluated"))
    rho = "not computed" if rep.spearman is None else f"{rep.spearman:.3f} (|score| vs |exact|: {rep.spearman_abs:.3f})"
    return [f"{len(rep.edges)} edges; {rep.settings['method']} scores vs exact effects: Spearman {rho}", keeps,
            "top 5 edges by |score|: " + ", ".join(f"{e} {v:+.4f}" for e, v in rep.top(5))]


def run_edges(model: str, corruption: str, metric: str = "logit-diff", method: str = "eap", steps: int = 10,
              ablation: str = "mean", direction: str = "noise", n: int = 64, length: int | None = None, seed: int = 0,
              max_batch: int = 512, out: Path | None = None, overwrite: bool = False, device: str = "cpu",
              norm: str = "exact") -> Outcome:
    """EAP / EAP-IG scores of every edge, their exact effects and the faithfulness curve of the top-n circuits
    (`probekit.edges.edge_report`); ``edges.json`` (the report), ``edges.csv`` (one row per edge),
    ``edges.png`` in ``out``."""
    from probekit.corruptions import corrupt
    from probekit.edges import ABLATIONS, METHODS, NORMS, edge_report, plot_edges
    from probekit.evaluate import check_fits
    from probekit.io import write_csv, write_json
    from probekit.metrics import GRADIENT_METRICS, check_metric

    if out is None:
        raise ProbekitError("--out is required; expected a folder for edges.json, edges.csv and edges.png")
    check_metric(metric, GRADIENT_METRICS, "gradient metric")
    if method not in METHODS:
        raise ProbekitError(f"unknown --method {method!r}; expected one of {list(METHODS)}")
    if ablation not in ABLATIONS:
        raise ProbekitError(f"unknown --ablation {ablation!r}; expected one of {list(ABLATIONS)}")
    if direction not in ("denoise", "noise"):
        raise ProbekitError(f"unknown --direction {direction!r}; expected 'denoise' or 'noise'")
    if norm not in NORMS:
        raise ProbekitError(f"unknown --norm {norm!r}; expected one of {list(NORMS)}")
    check_int(steps, "--steps", 1, EDGE_STEPS_MAX), check_n(n), check_seed(seed), check_int(length, "--length")
    check_int(max_batch, "--max-batch"), check_device(device)
    with _out(out, overwrite):
        m, task = _load(model, device)
        _corruption_options(task, corruption, None, None, None)
        check_fits(m, task, length)
        pair = corrupt(task, task.sample(n, length=length, seed=seed), corruption, seed=seed)
        rep = edge_report(m, pair, metric=metric, method=method, steps=steps, exact=True, ablation=ablation,
                          direction=direction, max_batch=max_batch, norm=norm)
        rep.settings["command"] = {"model": model, "corruption": corruption, "metric": metric, "method": method,
                                   "steps": steps, "norm": norm, "ablation": ablation, "direction": direction,
                                   "n": n, "length": length, "seed": seed}
        files = [write_json(out / "edges.json", rep.to_dict(), indent=None),
                 write_csv(out / "edges.csv", rep.to_frame()[["sender", "receiver", "score", "exact", "rank"]])]
        plot_edges(rep, out / "edges.png")
        files.append(out / "edges.png")
    return Outcome(lines=_edges_lines(rep), files=files, out=out, json=rep.to_json())


# ---------------------------------------------------------------------------- compare

_COMPARE_FIGURES = {"accuracy": "compare_accuracy", "probe": "compare_probe", "patch": "compare_heatmap",
                    "attribution": "compare_heatmap"}


def _compare_lines(cmp) -> list[str]:
    from probekit.compare import entry

    a, b = cmp.names
    acc = cmp.parts["accuracy"]
    lines = [f"exact match by length: {a} (A) vs {b} (B), B - A with its 95 % interval"]
    for i, L in enumerate(acc.labels["length"]):
        lo, hi = float(acc.extra["ci_low"][2, i]), float(acc.extra["ci_high"][2, i])
        lines.append(f"  length {L:>4}  A {float(acc.values[0, i]):.3f}  B {float(acc.values[1, i]):.3f}  "
                     f"B - A {float(acc.values[2, i]):+.3f} [{lo:+.3f}, {hi:+.3f}]")
    for part in ("patch", "attribution"):
        r = cmp.parts[part]
        diff = entry(r, 2)
        top = [(c, v) for c, v in diff.top(3) if abs(v) >= 5e-5]
        lines.append(f"largest {part} differences (B - A): " + ("; ".join(
            " ".join(f"{k} {c}" for k, c in coords.items()) + f" {v:+.3f}" for coords, v in top) or "none"))
    return lines


def run_compare(models: list[str], lengths: str, n: int = 200, seed: int = 0, feature: str | None = None,
                hook: str = "resid_post", train_length: int | None = None, corruption: str | None = None,
                site: str = "head", metric: str = "logit-diff", attribution: str = "dla", length: int | None = None,
                max_batch: int = 512, out: Path | None = None, overwrite: bool = False,
                device: str = "cpu") -> Outcome:
    """Two models on one task: ``compare.json`` + ``compare_<part>.json|csv|png`` (A, B, B - A) in ``out``."""
    from probekit import patching as P
    from probekit import viz
    from probekit.compare import ATTRIBUTIONS, compare_models
    from probekit.io import write_json
    from probekit.metrics import check_metric

    if len(models) != 2:
        raise ProbekitError(f"--model must be given exactly twice (A, then B), got {len(models)}")
    if out is None:
        raise ProbekitError("--out is required; expected a folder for compare.json and compare_<part>.*")
    if attribution not in ATTRIBUTIONS:
        raise ProbekitError(f"unknown --attribution {attribution!r}; expected one of {list(ATTRIBUTIONS)}")
    check_n(n), check_seed(seed), check_int(train_length, "--train-length"), check_int(length, "--length")
    check_int(max_batch, "--max-batch"), check_device(device), check_metric(metric), P.canonical_site(site)
    lens = parse_ints(lengths, "--lengths")
    with _out(out, overwrite):
        (ma, ta), (mb, tb) = _load(models[0], device), _load(models[1], device)
        ma.probekit_name, mb.probekit_name = (Path(m).name for m in models)
        cmp = compare_models(ma, ta, mb, tb, lens, n=n, seed=seed, feature=feature, hook=hook,
                             train_length=train_length, corruption=corruption, site=site, metric=metric,
                             attribution=attribution, length=length, max_batch=max_batch)
        cmp.settings["command"] = {"models": models, "lengths": lens, "n": n, "seed": seed}
        files = [write_json(out / "compare.json", cmp.settings)]
        for part, r in cmp.parts.items():
            draw = getattr(viz, _COMPARE_FIGURES[part])
            files += _write_result(r, out, f"compare_{part}", lambda res, p, d=draw: viz.save_figure(d(res), p))
    return Outcome(lines=_compare_lines(cmp), files=files, out=out)
