"""optimenv: the distributed-training environment of an Axolotl-style config, planned ahead of time."""

from optimenv.config import TrainingConfig, load_config, parse_config
from optimenv.errors import ConfigError, OptimEnvError
from optimenv.plan import Deferred, EnvVar, Hardware, Plan, plan

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
