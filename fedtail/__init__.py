"""fedtail: federated and continual learning on imbalanced data."""

from fedtail.env import apply_defaults as _apply_env_defaults

_apply_env_defaults()

__version__ = "0.1.0"
