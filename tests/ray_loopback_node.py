"""``ray start`` for a node joining a cluster on this machine's loopback, for tests/test_ray_cluster.py.

With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` every Ray server binds 127.0.0.1 only (as fedtail's private
local Ray does); in that mode ``ray start --address`` refuses to add a node, and in Ray's cluster mode
the node's servers listen on all interfaces. This runs Ray's own ``ray start`` with only that refusal
lifted, so a test can have a two-node cluster that nothing outside the machine can reach.

``python -m tests.ray_loopback_node start --address=127.0.0.1:PORT ...`` (the ``ray`` CLI's arguments).
"""

from __future__ import annotations

import sys
import types

from ray._private import ray_constants
from ray.scripts import scripts

if __name__ == "__main__":
    constants = types.SimpleNamespace(**{k: getattr(ray_constants, k) for k in dir(ray_constants)})
    constants.ENABLE_RAY_CLUSTER = True  # read by `ray start` only; Ray's servers still see the env's 0
    scripts.ray_constants = constants
    sys.argv[0] = "ray"
    scripts.main()
