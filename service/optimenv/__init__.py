"""optimenv: the distributed-training environment of an Axolotl-style config, planned ahead of time."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optimenv.compiler import Job, compile
    from optimenv.config import TrainingConfig, load_config, parse_config
    from optimenv.errors import ConfigError, OptimEnvError
    from optimenv.plan import EnvVar, Hardware, Plan, plan
    from optimenv.steps import Deferred
    from optimenv.workload import JobSpec, Topology

# Lazy exports: the worker bootstrap imports optimenv.* on every pod start and must not pay for
# pydantic and yaml, which only the planner needs.
_EXPORTS = {
    "Job": "optimenv.compiler",
    "compile": "optimenv.compiler",
    "JobSpec": "optimenv.workload",
    "Topology": "optimenv.workload",
    "TrainingConfig": "optimenv.config",
    "load_config": "optimenv.config",
    "parse_config": "optimenv.config",
    "ConfigError": "optimenv.errors",
    "OptimEnvError": "optimenv.errors",
    "Deferred": "optimenv.steps",
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
    "Job",
    "JobSpec",
    "OptimEnvError",
    "Plan",
    "Topology",
    "TrainingConfig",
    "compile",
    "load_config",
    "parse_config",
    "plan",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    home = _EXPORTS.get(name)
    if home is None:
        raise AttributeError(f"module 'optimenv' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


class _Package(types.ModuleType):
    """The package object: an export wins over a submodule of the same name (``optimenv.plan``).

    Importing a submodule binds it on its package (``import optimenv.render`` imports
    ``optimenv.plan`` and sets ``optimenv.plan`` to that module), after which ``from optimenv import
    plan`` would find the module, never asking :func:`__getattr__`. Binding the export instead keeps
    the function whichever is imported first; the module stays in ``sys.modules``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
