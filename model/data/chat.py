"""Chat rows as messages: OpenAI-style `messages` ([{"role", "content"}]) or ShareGPT `conversations`
([{"from", "value"}]) become a list of {"role", "content"} messages with the roles system, user and assistant.

One parser for every reader of chat rows (data preparation in model/data/prepare.py, curation in
model/data/curate.py), so a row that one accepts the other accepts too.
"""

from __future__ import annotations

from typing import Optional

from model.data.records import Record, RecordError
from model.prompts import Message

# the field that holds the turns -> the keys of a turn's speaker and text
CHAT_FIELDS = {"messages": ("role", "content"), "conversations": ("from", "value")}

# Speaker names, matched whatever their case ("User", "GPT"): the OpenAI roles and the names found in the common
# ShareGPT releases.
ROLES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "model": "assistant",
}


def chat_field(row: dict) -> Optional[str]:
    """The field of `row` that holds its turns ("messages" or "conversations"), or None for a row without one."""
    return next((key for key in CHAT_FIELDS if key in row), None)


def chat_messages(record: Record, key: Optional[str] = None) -> list[Message]:
    """The turns of a chat row (in its field `key`; by default whichever of CHAT_FIELDS it has) as messages. A row
    that does not fit is a RecordError naming the row, the turn and what is wrong; an empty list is no error."""
    row, where = record.row, record.where
    key = key or chat_field(row)
    if key not in row:
        expected = f"{key!r}" if key else " or ".join(map(repr, CHAT_FIELDS))
        raise RecordError(f"{where}: missing field {expected} (it has {sorted(row)})")
    turns = row[key]
    if not isinstance(turns, list):
        raise RecordError(f"{where}: field {key!r} should be a list of turns, got {turns!r:.80}")
    role_key, content_key = CHAT_FIELDS[key]
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise RecordError(f"{where}: {key} turn {index} should be an object with {role_key!r} and"
                              f" {content_key!r}, got {turn!r:.80}")
        role = ROLES.get(str(turn[role_key]).lower())
        if role is None:
            raise RecordError(f"{where}: {key} turn {index} has the unknown {role_key} {turn[role_key]!r};"
                              f" expected one of {', '.join(ROLES)} (any case)")
        if not isinstance(turn[content_key], str):
            raise RecordError(f"{where}: {key} turn {index}: {content_key!r} should be text, got"
                              f" {type(turn[content_key]).__name__}")
        messages.append({"role": role, "content": turn[content_key]})
    return messages
