"""kvtier: tiered KV-cache offloading for LLM serving, and the engine on top of it.

    from kvtier import LLM, SamplingParams

The four parts install beneath this name: kvtier.policies (eviction and
request policies) <- kvtier.kvstore (block format, tiers, the store daemon)
<- kvtier.connectors (the KV connector framework) <- kvtier.engine (the
serving engine). The engine is imported on first use of LLM or SamplingParams,
so `import kvtier.kvstore` alone stays light.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kvtier")
except PackageNotFoundError:  # not installed: imported from a bare checkout
    __version__ = "0+unknown"

_PUBLIC = {
    "LLM": "kvtier.engine.entrypoints.llm",
    "SamplingParams": "kvtier.engine.core.sampling_params",
    "RequestOutput": "kvtier.engine.core.outputs",
    "CompletionOutput": "kvtier.engine.core.outputs",
    "EngineConfig": "kvtier.engine.config",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
