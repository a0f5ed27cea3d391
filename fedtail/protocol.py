"""What travels in Flower messages between the ServerApp and the ClientApps.

The server sends the whole `Job` (resolved config + where the staged data and partitions lie) in every
message's ConfigRecord, so a ClientApp needs nothing from its node's run-config: the same apps run
unchanged in-process, on Ray, and under ``flwr run``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtail.config import FedtailConfig, build_config

# Record keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
INFO = "info"

# ConfigRecord / MetricRecord entries
JOB = "job"
PARTITION_ID = "partition-id"
CLASS_PRIOR = "class-prior"
CLASS_COUNTS = "class-counts"  # per class, summed over every client: the global counts the prior comes from
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TASK = "task"
MEMORY_SAMPLES = "memory-samples"  # what the client keeps for its continual method (`memory_footprint`)
MEMORY_BYTES = "memory-bytes"
PREVIOUS_ARRAYS = "previous-arrays"  # the end-of-previous-task global model (`uses_previous_model`)
HEAD = "head"  # a continual method's server-side state (`ContinualMethod.head_from_statistics`)
PREVIOUS_HEAD = "previous-head"  # the head as of the end of the previous task, beside PREVIOUS_ARRAYS
STATISTICS = "statistics"  # a client's reply to an end-of-task exchange (`task_statistics`)
EXCHANGE = "exchange"  # which end-of-task exchange a statistics message belongs to (0-based)
STAGE = "stage"  # "fl" (a task's federated rounds) or "crt" (classifier re-training, features frozen)
GLOBAL_ROUND = "global-round"
ATTACKER = "attacker"  # in a train reply's info, when attack.name is set: whether this client attacks
SERVER_ROUND = "server-round"

# Node config key Flower's simulation engine sets (we set the same in the in-process engine).
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"


@dataclass(frozen=True)
class Job:
    """Everything a ClientApp needs to train: config plus absolute data locations."""

    config: FedtailConfig
    staged_dir: Path
    partition_dir: Path

    def to_json(self) -> str:
        return json.dumps(
            {
                "config": self.config.model_dump(mode="json"),
                "staged_dir": str(self.staged_dir.resolve()),
                "partition_dir": str(self.partition_dir.resolve()),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Job:
        data: dict[str, Any] = json.loads(text)
        config = build_config(data["config"], schedule=False)  # checked by the driver; never schedules
        return cls(config, Path(data["staged_dir"]), Path(data["partition_dir"]))


@functools.lru_cache(maxsize=8)
def parse_job(text: str) -> Job:
    """`Job.from_json`, cached per process: every message of a run carries the same JSON, and
    validating the whole config again for each one cost more than a small client's training. The
    cached Job is shared: callers must treat it (and its config) as read-only."""
    return Job.from_json(text)
