"""Measuring one call: wall time, peak resident memory and peak Python-heap memory, in a fresh process.

Why not ``ru_maxrss`` growth after a warm-up: the warm-up already reached the peak, so the growth is 0.
torch 2.13 on CPU keeps no allocator statistics (there is no ``torch.cpu.memory_stats``), so the peak is
read from the kernel instead:

1. ``gc.collect()`` and glibc ``malloc_trim(0)`` hand freed memory back to the system, so the resident set
   right before the call is what is live (memory freed earlier cannot be silently reused by the call);
2. writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's high-water mark (``VmHWM``) to the current
   resident set; the baseline is ``VmRSS`` at that moment;
3. after the call, ``VmHWM - baseline`` is the call's peak, exact to the page: every page the call touched
   (torch and numpy buffers, Python objects, library workspaces) counts, however briefly it lived.

Where ``clear_refs`` is not writable, a thread samples ``/proc/self/statm`` every 0.5 ms instead (it can miss
a spike shorter than that; the method is named in the result). ``tracemalloc`` gives the Python heap's peak
(Python objects and numpy arrays; torch tensors are not traced) in a separate call, since tracing slows
Python code down.

Resolution: the interpreter itself moves the resident set by a few hundred KiB between two reads, so a peak
below ``RESOLUTION_MIB`` is reported as ``None`` with a note, never as a number.

    from measure import measure_fresh
    measure_fresh("bench_patching:prepare", {"case": "sort-20", "n": 64})  # -> dict

``prepare(**kwargs)`` runs in the child and returns the zero-argument callable to measure (or
``(callable, info_dict)``); the callable's return value comes back if it is JSON-able (tensors as lists).
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESOLUTION_MIB = 1.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    def __init__(self, interval: float = 5e-4):
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop = interval, _rss_bytes(), threading.Event()

    def run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self.join()
        return max(self.peak, _rss_bytes())


def mib_or_none(nbytes: float | None) -> tuple[float | None, str | None]:
    """A peak in MiB, or None with a note where it is below the method's resolution."""
    if nbytes is None:
        return None, "not measured"
    mib = nbytes / 2**20
    if mib < RESOLUTION_MIB:
        return None, f"below the {RESOLUTION_MIB:g} MiB resolution of the resident-set method"
    return round(mib, 2), None


def peak_rss(fn):
    """Run ``fn()`` once; return ``(result, seconds, peak bytes above the baseline, method)``."""
    _trim()
    exact = _reset_hwm()
    base = _rss_bytes()
    sampler = None if exact else _Sampler()
    if sampler is not None:
        sampler.start()
    t0 = time.perf_counter()
    out = fn()
    secs = time.perf_counter() - t0
    top = _status_kib("VmHWM") * 1024 if exact else sampler.stop()
    return out, secs, max(top - base, 0), ("VmHWM after clear_refs" if exact else "statm sampled every 0.5 ms")


def peak_python_heap(fn) -> int:
    """Peak bytes traced by tracemalloc during ``fn()`` (Python objects and numpy buffers)."""
    _trim()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def measure_call(fn, *, warmup: bool = True, python_heap: bool = True) -> dict:
    """Time and peak memory of one call of ``fn`` in this process (after one warm-up call)."""
    if warmup:
        fn()
    out, secs, rss, method = peak_rss(fn)
    res: dict = {"seconds": secs, "method": method, "resolution_mib": RESOLUTION_MIB}
    res["peak_rss_mib"], note = mib_or_none(rss)
    if note:
        res["peak_rss_note"] = note
    if python_heap:
        res["python_heap_peak_mib"], note = mib_or_none(peak_python_heap(fn))
        if note:
            res["python_heap_note"] = note.replace("resident-set method", "tracemalloc report")
    res["value"] = _jsonable(out)
    return res


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    try:
        json.dumps(x)
        return x
    except (TypeError, ValueError):
        return None


def _resolve(target: str):
    mod, _, name = target.partition(":")
    return getattr(importlib.import_module(mod), name)


def run_fresh(target: str, kwargs: dict | None = None, timeout: float | None = None) -> dict:
    """Call ``module:function(**kwargs)`` in a fresh Python process; return its (JSON) result."""
    return _child(["run", target], kwargs or {}, timeout)


def measure_fresh(target: str, kwargs: dict | None = None, *, warmup: bool = True, python_heap: bool = True,
                  timeout: float | None = None) -> dict:
    """`measure_call` on the callable that ``module:prepare(**kwargs)`` returns, in a fresh process."""
    opts = {"warmup": warmup, "python_heap": python_heap}
    return _child(["measure", target, json.dumps(opts)], kwargs or {}, timeout)


def _child(args: list[str], kwargs: dict, timeout: float | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with tempfile.TemporaryDirectory() as tmp:
        inp, outp = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps(kwargs))
        proc = subprocess.run([sys.executable, str(HERE / "measure.py"), *args, str(inp), str(outp)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not outp.exists():
            raise RuntimeError(f"benchmark child {args[1]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(outp.read_text())


def prepare_alloc(kind: str = "none", mib: float = 0.0):
    """A calibration call: allocate and fill ``mib`` MiB (torch float32 or numpy float64), free it, return None."""

    def torch_alloc():
        import torch

        t = torch.ones(int(mib * 2**20) // 4, dtype=torch.float32)
        del t

    def numpy_alloc():
        import numpy as np

        a = np.ones(int(mib * 2**20) // 8)
        del a

    return {"none": lambda: None, "torch": torch_alloc, "numpy": numpy_alloc}[kind]


def _main(argv: list[str]) -> int:
    mode, target = argv[0], argv[1]
    inp, outp = Path(argv[-2]), Path(argv[-1])
    kwargs = json.loads(inp.read_text())
    if mode == "run":
        res = _resolve(target)(**kwargs)
    else:
        opts = json.loads(argv[2])
        made = _resolve(target)(**kwargs)
        fn, info = made if isinstance(made, tuple) else (made, {})
        res = {**info, **measure_call(fn, **opts)}
    outp.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
