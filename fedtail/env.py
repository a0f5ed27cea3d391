"""Process-wide defaults so fedtail runs offline on a small machine with no setup by hand.

Applied on ``import fedtail``; a value the user already exported always wins.
"""

from __future__ import annotations

import os

DEFAULTS: dict[str, str] = {
    # Prefect: no telemetry offline, and a fresh PREFECT_HOME's temporary server needs > 20 s here.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # DVC and Flower phone home unless told not to.
    "DVC_NO_ANALYTICS": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    # Ray: no dashboard or usage stats on a 2-core laptop-class machine.
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
