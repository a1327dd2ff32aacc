"""optimenv: the distributed-training environment of an Axolotl-style config, planned ahead of time."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optimenv.config import TrainingConfig, load_config, parse_config
    from optimenv.errors import ConfigError, OptimEnvError
    from optimenv.plan import Deferred, EnvVar, Hardware, Plan, plan

# Lazy exports: the worker bootstrap imports optimenv.* on every pod start and must not pay for
# pydantic and yaml, which only the planner needs.
_EXPORTS = {
    "TrainingConfig": "optimenv.config",
    "load_config": "optimenv.config",
    "parse_config": "optimenv.config",
    "ConfigError": "optimenv.errors",
    "OptimEnvError": "optimenv.errors",
    "Deferred": "optimenv.plan",
    "EnvVar": "optimenv.plan",
    "Hardware": "optimenv.plan",
    "Plan": "optimenv.plan",
    "plan": "optimenv.plan",
}
__all__ = [
    "ConfigError",
    "Deferred",
    "EnvVar",
    "Hardware",
    "OptimEnvError",
    "Plan",
    "TrainingConfig",
    "load_config",
    "parse_config",
    "plan",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'optimenv' has no attribute {name!r}")
    loaded = importlib.import_module(module)
    # Importing optimenv.plan binds the submodule to the name "plan": bind every export of that
    # module now, so the function wins over the submodule whichever name is asked for first.
    for export, home in _EXPORTS.items():
        if home == module:
            globals()[export] = getattr(loaded, export)
    return globals()[name]
