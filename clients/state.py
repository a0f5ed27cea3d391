"""Client state that survives a crash, on every engine: a Flower mod plus its server-side helpers.

A client's persistent state is Flower's ``context.state``. The engines keep it in memory only (Ray's in
its actors, ``flwr run``'s in its SuperNodes), so the server keeps the copy that goes into a checkpoint:

* after every ``train`` message, `persist_state` appends the node's ``context.state`` records to the reply
  (keys prefixed ``state:``); the strategy takes them out before aggregating (`split_state`) and keeps
  them, serialised, next to the model in the same atomic checkpoint;
* on resume the server sends each node one ``query`` message flagged ``restore-state`` carrying that
  copy; `persist_state` replaces ``context.state`` with it and answers without calling the app.

So a resumed run's clients start from exactly the state they had at the checkpoint, on every engine,
and any ClientApp gets this by listing the mod: ``ClientApp(mods=[persist_state])``.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedtail import protocol as P

STATE_PREFIX = "state:"
RESTORE = "restore-state"


def persist_state(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: restore ``context.state`` on request; attach it to every successful train reply."""
    config = msg.content.config_records.get(P.CONFIG)
    if msg.metadata.message_type == MessageType.QUERY and config is not None and config.get(RESTORE):
        for key in list(context.state.keys()):
            del context.state[key]
        for key, record in split_state(msg.content).items():
            context.state[key] = record
        return Message(RecordDict({}), reply_to=msg)
    reply = call_next(msg, context)
    if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
        for key, record in context.state.items():
            reply.content[STATE_PREFIX + key] = record
    return reply


def split_state(content: RecordDict) -> RecordDict:
    """Remove the ``state:`` records from ``content`` and return them as a state RecordDict."""
    state = RecordDict()
    for key in [k for k in content if k.startswith(STATE_PREFIX)]:
        state[key.removeprefix(STATE_PREFIX)] = content.pop(key)
    return state


def restore_content(state: RecordDict) -> RecordDict:
    """The content of a restore message carrying ``state``."""
    content = RecordDict({P.CONFIG: ConfigRecord({RESTORE: True})})
    for key, record in state.items():
        content[STATE_PREFIX + key] = record
    return content


def to_bytes(state: RecordDict) -> bytes:
    """Flower's own wire format, so any record type a client keeps round-trips exactly."""
    return recorddict_to_proto(state).SerializeToString(deterministic=True)


def from_bytes(blob: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(blob)
    return recorddict_from_proto(proto)
