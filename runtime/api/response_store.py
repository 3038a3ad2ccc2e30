"""Stored Responses (OpenAI Responses API): what `previous_response_id`, `GET` and `DELETE
/v1/responses/{id}` read.

In memory on rank 0, least recently used first out, bounded both in count (MAX_RESPONSES) and
in the characters of their conversations (MAX_CHARS): a conversation is re-sent whole on every
turn, so a store that kept everything would grow with each turn of every agent. A response
that falls out (or a restart) makes its id a 404 / a 400 naming previous_response_id, as the
real API does for an expired id. `store: false` responses are never kept.

Each entry keeps the Response object and the conversation that led to it as input items
(previous conversation + this request's input, instructions excluded: the real API does not
carry them over), so a follow-up request's conversation is that plus the response's output.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .prompt import text_chars

MAX_RESPONSES = 1024
MAX_CHARS = 64_000_000  # ~ the text of 8 full 8 MB request bodies


@dataclass
class Stored:
    response: dict[str, Any]
    items: list[dict[str, Any]]  # the conversation's input items, before this response's output
    chars: int

    def conversation(self) -> list[dict[str, Any]]:
        """Input items for a follow-up: the conversation, then this response's output."""
        return self.items + [_as_input(o) for o in self.response.get("output", [])]


def _as_input(item: dict[str, Any]) -> dict[str, Any]:
    if item.get("type") == "function_call":
        return {"type": "function_call", "call_id": item["call_id"], "name": item["name"],
                "arguments": item["arguments"]}
    return {"type": "message", "role": item.get("role", "assistant"),
            "content": item.get("content", [])}


class ResponseStore:
    def __init__(self, max_responses: int = MAX_RESPONSES, max_chars: int = MAX_CHARS):
        self.max_responses = max_responses
        self.max_chars = max_chars
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def put(self, response: dict[str, Any], items: list[dict[str, Any]]) -> None:
        entry = Stored(response, items, text_chars(items) + text_chars(response.get("output")))
        with self._lock:
            old = self._items.pop(response["id"], None)
            if old is not None:
                self._chars -= old.chars
            self._items[response["id"]] = entry
            self._chars += entry.chars
            while self._items and (len(self._items) > self.max_responses
                                   or self._chars > self.max_chars):
                _, dropped = self._items.popitem(last=False)
                self._chars -= dropped.chars

    def get(self, rid: str) -> Stored | None:
        with self._lock:
            entry = self._items.get(rid)
            if entry is not None:
                self._items.move_to_end(rid)
            return entry

    def delete(self, rid: str) -> bool:
        with self._lock:
            entry = self._items.pop(rid, None)
            if entry is not None:
                self._chars -= entry.chars
            return entry is not None

    def __len__(self) -> int:
        return len(self._items)


def store_of(app: Any) -> ResponseStore:
    """The app's store (one per app, made on first use)."""
    store = getattr(app.state, "responses", None)
    if store is None:
        store = app.state.responses = ResponseStore()
    return store
