"""DAS for the successor (the next sorted element) in a sorting model: the sorting numbers of docs/guide.md (DAS).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python analyses/das_sorting.py [--model sort-successor] [--step 5] [--k 16]

Pairs hold the previous output and vary the target at answer step ``--step`` of length-``--length`` lists; the
counterfactual answer is the source's target. Writes ``sweep.json``/``sweep.csv``/``sweep.png`` to ``--out`` and
prints the table.
"""

import argparse
from pathlib import Path

import torch

import probekit
from probekit.interventions import das_sweep, plot_iia

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="sort-successor")
ap.add_argument("--step", type=int, default=5)
ap.add_argument("--length", type=int, default=20)
ap.add_argument("--k", type=int, default=16)
ap.add_argument("--n", type=int, default=2000)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", default="runs/das-sorting")
args = ap.parse_args()
torch.set_num_threads(1)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

model, task = probekit.load(args.model)
res = das_sweep(model, task, vary="target", hold=["prev_output"], at=f"step={args.step}", target="source:target",
                k=args.k, n=args.n, length=args.length, seed=args.seed, progress=True)
res.to_json(out / "sweep.json")
frame = res.to_frame()
frame.to_csv(out / "sweep.csv", index=False)
plot_iia(res, out / "sweep.png", title=f"{args.model}: DAS for the successor at step {args.step} (k = {args.k})")
print("| row | position | IIA | 95 % CI | random control (mean +- sd) | full vector | base run | s wall |")
for r in frame.itertuples():
    print(f"| {r.layer_label} | {r.pos_label} | {r.value:.3f} | {r.iia_lo:.3f}-{r.iia_hi:.3f} | "
          f"{r.control_mean:.3f} +- {r.control_std:.3f} | {r.ceiling:.3f} | {r.floor:.3f} | {r.seconds:.1f} |")
