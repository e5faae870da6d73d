"""`make bench`: run every benchmark module in this folder and write one JSON file.

Each `bench_*.py` exposes ``run(quick: bool = False) -> dict``. ``--scaling`` runs `scaling.py` instead
(time and memory curves -> docs/performance.md). The JSON records the machine (CPU, cores, threads, BLAS,
load average at the start) so that two runs can be compared.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/bench.json")
    ap.add_argument("--only", default=None, help="run only bench_<name>")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--scaling", action="store_true", help="run the scaling curves (benchmarks/scaling.py) instead")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    if args.scaling:
        import scaling

        return scaling.main(["--quick"] if args.quick else [])
    from scaling import machine_info

    results = {"machine": {**machine_info(torch.get_num_threads()), "processor": platform.processor()}}
    for mod_path in sorted(HERE.glob("bench_*.py")):
        name = mod_path.stem[len("bench_"):]
        if args.only and name != args.only:
            continue
        t0 = time.time()
        mod = importlib.import_module(mod_path.stem)
        results[name] = mod.run(quick=args.quick)
        results[name]["bench_seconds"] = round(time.time() - t0, 1)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
