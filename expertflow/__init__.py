"""ExpertFlow: MoE inference with expert offloading, and the built-in scheduler it tunes.

Public API (imported lazily, so `import expertflow` stays cheap and pulls in no torch):

    expertflow.RuntimeConfig            the deployable config (pydantic model)
    expertflow.load_config(path)        strict YAML loader (raises ConfigError)
    expertflow.resolve_model(name)      registry alias or checkpoint dir -> ModelSpec
    expertflow.default_config(model, budget="24GB")  an untuned config for a model you built
    expertflow.offload(model, config)   attach the scheduler -> handle (.stats, .detach(), `with`)
    expertflow.load_model(name, config) build/load a model straight into offloaded form, with the
                                        executor runtime.engine names (graph engine on CUDA)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["RuntimeConfig", "default_config", "load_config", "save_config", "resolve_model", "offload", "load_model",
           "ConfigError", "ModelError", "BudgetError", "DataError", "DeviceError", "StorageError",
           "ExpertFlowError", "plan_memory", "parse_size"]

_LAZY = {
    "RuntimeConfig": "expertflow.config",
    "default_config": "expertflow.api",
    "load_config": "expertflow.config",
    "save_config": "expertflow.config",
    "resolve_model": "expertflow.registry",
    "offload": "expertflow.runtime.offload",
    "load_model": "expertflow.runtime.loading",
    "plan_memory": "expertflow.budget",
    "parse_size": "expertflow.budget",
    "ConfigError": "expertflow.errors",
    "ModelError": "expertflow.errors",
    "BudgetError": "expertflow.errors",
    "DataError": "expertflow.errors",
    "DeviceError": "expertflow.errors",
    "StorageError": "expertflow.errors",
    "ExpertFlowError": "expertflow.errors",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'expertflow' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
