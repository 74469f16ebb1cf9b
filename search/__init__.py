"""hwcompress: a hardware-aware compression search for JAX/Flax models.

The user-facing names, imported on first use (so `hwcompress --help` does not load JAX):

    from search import compress, make_spec, search, StudySpec, FinetuneConfig, Plan
    front = compress(module, params, data, loss, metric, "mobile-cpu", {"latency_ms": 1.0})

Subpackages, one concept each (imports go one way, left to right may not import):
compression < engine, cost < study < report, export < api < cli. See ARCHITECTURE.md.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "compress": "search.api",
    "search": "search.api",
    "make_spec": "search.api",
    "default_study_name": "search.api",
    "StudySpec": "search.study.spec",
    "WeightsSource": "search.study.spec",
    "load_context": "search.study.context",
    "FinetuneConfig": "search.engine.config",
    "Engine": "search.engine.finetune",
    "Plan": "search.compression.plan",
    "make_plan": "search.compression.plan",
    "discover_layers": "search.compression.layers",
    "price": "search.cost.roofline",
    "read_study": "search.report.view",
    "pareto_frame": "search.report.view",
    "write_report": "search.report.files",
    "export_plan": "search.export.exporter",
    "export_trial": "search.export.exporter",
    "open_storage": "search.study.storage",
    "load_study": "search.study.storage",
    "UserError": "search.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'search' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
