"""A ClientApp that misbehaves on request, for tests/test_engines.py (engines load it by import path,
``tests.engine_apps:app``). Each train message names an ``action``; every call first counts itself in
``context.state`` (in place), so a test can see whether an abandoned call's Context was applied."""

from __future__ import annotations

import os
import sys
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

HANG_SECONDS = 600.0

app = ClientApp()


def calls(context: Context) -> int:
    return int(context.state["calls"]["n"]) if "calls" in context.state else 0


@app.train()
def train(msg: Message, context: Context):
    context.state["calls"] = ConfigRecord({"n": calls(context) + 1})
    action = str(msg.content["cfg"]["action"])
    if action == "hang":
        time.sleep(HANG_SECONDS)
    elif action == "raise":
        raise ValueError("client bug")
    elif action == "sys_exit":
        sys.exit(3)
    elif action == "os_exit":
        os._exit(3)
    elif action == "interrupt":
        raise KeyboardInterrupt
    elif action == "garbage":
        return {"not": "a message"}
    elif action == "none":
        return None
    return Message(RecordDict({"metrics": MetricRecord({"pid": os.getpid()})}), reply_to=msg)
