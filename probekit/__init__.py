"""probekit: linear probes, activation patching, head attribution, weight-based circuits, circuit
discovery on edges (EAP, EAP-IG) and interchange interventions (DAS) for small transformers.

    model, task = probekit.load("sort-successor")
    batch = task.sample(256, length=20, seed=0)

Import is cheap: torch and transformer-lens are loaded only when a function needs them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load": "probekit.model",
    "load_model": "probekit.model",
    "save_model": "probekit.model",
    "build_model": "probekit.model",
    "ModelConfig": "probekit.model",
    "shipped_models": "probekit.model",
    "train": "probekit.train",
    "TrainConfig": "probekit.train",
    "evaluate": "probekit.evaluate",
    "greedy_decode": "probekit.evaluate",
    "EvalResult": "probekit.evaluate",
    "Batch": "probekit.tasks",
    "Task": "probekit.tasks",
    "Mixture": "probekit.tasks",
    "SortingTask": "probekit.tasks",
    "MultiplicationTask": "probekit.tasks",
    "ProbekitError": "probekit.tasks",
    "task_from_spec": "probekit.tasks",
    "Result": "probekit.results",
    "collect": "probekit.activations",
    "Probe": "probekit.probes",
    "fit_probe": "probekit.probes",
    "probe_sweep": "probekit.probes",
    "corrupt": "probekit.corruptions",
    "make_pair": "probekit.corruptions",
    "sweep": "probekit.patching",
    "patch": "probekit.patching",
    "path_patch": "probekit.patching",
    "direct_logit_attribution": "probekit.attribution",
    "ablate_heads": "probekit.attribution",
    "attribution_patching": "probekit.attribution",
    "head_attention_to": "probekit.attribution",
    "circuit_report": "probekit.circuits",
    "qk_circuit": "probekit.circuits",
    "ov_circuit": "probekit.circuits",
    "composition_scores": "probekit.circuits",
    "edge_report": "probekit.edges",
    "EdgeReport": "probekit.edges",
    "circuit_faithfulness": "probekit.edges",
    "plot_edges": "probekit.edges",
    "Location": "probekit.interventions",
    "Where": "probekit.interventions",
    "counterfactual_pairs": "probekit.interventions",
    "fit_das": "probekit.interventions",
    "das_sweep": "probekit.interventions",
    "run_report": "probekit.report",
    "compare_models": "probekit.compare",
    "run_sweep": "probekit.grid",
    "Hypothesis": "probekit.stats",
    "judge": "probekit.stats",
    "bootstrap_ci": "probekit.stats",
    "sorting_failure": "probekit.studies.sorting",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'probekit' has no attribute {name!r}")


def __dir__():
    return __all__
