"""The main job: evaluate the shipped models by length (`probekit demo`, `make demo`)."""

from __future__ import annotations

from pathlib import Path

from probekit.model import ensure_empty_dir, load_model, shipped_models


def run_demo(out: str | Path, overwrite: bool = True, n: int = 200, seed: int = 0) -> Path:
    """Evaluate every shipped model on its lengths; write ``eval_<name>.json`` and print a table.

    With no shipped model, trains a tiny sorting model first (about a minute on 2 cores).
    """
    from probekit.evaluate import evaluate

    out = Path(out)
    ensure_empty_dir(out, overwrite=overwrite)
    names = shipped_models()
    if not names:
        from probekit.model import ModelConfig
        from probekit.tasks import SortingTask
        from probekit.train import TrainConfig, train

        task = SortingTask(n_values=32)
        model = train(ModelConfig(d_model=64, n_ctx=128, d_vocab=task.d_vocab), task,
                      TrainConfig(steps=600, batch_size=64, lengths=(1, 10), lr=3e-3), out / "tiny-sort",
                      name="tiny-sort", overwrite=True)
        runs = [("tiny-sort", model, task, [5, 10, 20, 30])]
    else:
        runs = []
        for name in names:
            model, task, conf = load_model(name)
            runs.append((name, model, task, _demo_lengths(task, conf)))
    for name, model, task, lengths in runs:
        res = evaluate(model, task, lengths, n=n, seed=seed, progress=True, name=name)
        (out / f"eval_{name}.json").write_text(res.to_json())
        print(f"\n{name}: exact match by length (greedy, n={n}, seed={seed})")
        print(res.to_frame()[["length", "exact_match", "ci_low", "ci_high"]].to_string(index=False))
    print(f"\nresults in {out}")
    return out


def _demo_lengths(task, conf) -> list[int]:
    if task.name == "sorting":
        return [10, 20, 30, 50, 100]
    lo, hi = (conf.get("train") or {}).get("lengths", [task.digits, task.digits])
    return sorted({hi, hi + 1, hi + 2}) if lo != hi else [hi]
