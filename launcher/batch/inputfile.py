"""The batch input file: OpenAI's Batch API request format (what `vllm run-batch` also reads).

One JSON object per line:

    {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

A bad line does not stop the batch: it becomes a `Malformed` entry that names the file and the
line (`requests.jsonl:7: custom_id: missing. Fix: …`), and the good lines still run. custom_ids
are claimed first come, first served: a later line reusing one is malformed, so every custom_id
has exactly one line in the output. Blank lines are skipped.

The file's sha256 is taken over the exact bytes parsed, so a journal can tell whether it was made
from this very input.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from launcher.errors import ConfigError

URLS = ("/v1/chat/completions", "/v1/completions")


@dataclass
class BatchRequest:
    line: int
    custom_id: str
    url: str            # one of URLS
    body: dict          # "model" filled in with the command's MODEL when the line has none


@dataclass
class Malformed:
    line: int
    message: str                     # "requests.jsonl:7: custom_id: missing. Fix: …"
    custom_id: Optional[str] = None  # set when readable and not claimed by an earlier line


@dataclass
class BatchInput:
    path: Path
    sha256: str
    requests: list[BatchRequest] = field(default_factory=list)
    malformed: list[Malformed] = field(default_factory=list)


class _Bad(Exception):
    pass


def _kind(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _check(obj: Any, default_model: str) -> tuple[str, str, dict]:
    """(custom_id, url, body) of one decoded line, or _Bad("field: problem. Fix: …")."""
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object, got {_kind(obj)}. Fix: write each request as "
                   '{"custom_id": …, "method": "POST", "url": …, "body": {…}}.')
    cid = obj.get("custom_id")
    if "custom_id" not in obj:
        raise _Bad('custom_id: missing. Fix: give every request a unique, non-empty "custom_id" string.')
    if not isinstance(cid, str):
        raise _Bad(f'custom_id: expected a string, got {_kind(cid)}. Fix: quote it, e.g. "custom_id": "{cid}".')
    if not cid.strip():
        raise _Bad('custom_id: empty. Fix: give every request a unique, non-empty "custom_id" string.')
    method = obj.get("method")
    if method != "POST":
        got = "missing" if "method" not in obj else json.dumps(method)
        raise _Bad(f'method: {got}: expected "POST". Fix: set "method": "POST".')
    url = obj.get("url")
    if url not in URLS:
        got = "missing" if "url" not in obj else json.dumps(url)
        raise _Bad(f"url: {got}: expected {' or '.join(URLS)}. "
                   "Fix: exolaunch batch serves chat completions and completions only.")
    body = obj.get("body")
    if not isinstance(body, dict):
        got = "missing" if "body" not in obj else f"expected a JSON object, got {_kind(body)}"
        raise _Bad(f"body: {got}. Fix: put the request's parameters in a \"body\" object.")
    if body.get("stream"):
        raise _Bad('body.stream: true is not supported in a batch. Fix: remove "stream" (results are '
                   "collected whole).")
    if url == "/v1/chat/completions":
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise _Bad('body.messages: expected a non-empty array of messages for /v1/chat/completions. '
                       'Fix: e.g. "messages": [{"role": "user", "content": "Hello"}].')
    elif "prompt" not in body:
        raise _Bad('body.prompt: missing for /v1/completions. Fix: add "prompt": "…" (or use '
                   "/v1/chat/completions with messages).")
    if not body.get("model"):
        body = {**body, "model": default_model}
    return cid, url, body


def parse_input(path: Path, default_model: str) -> BatchInput:
    """Read and validate the whole file. Only an unreadable file raises (ConfigError)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"--input {path}: no such file. Fix: check the path.") from None
    except IsADirectoryError:
        raise ConfigError(f"--input {path}: is a directory, expected a JSONL file of requests.") from None
    except OSError as e:
        raise ConfigError(f"--input {path}: cannot read it ({e.strerror}).") from None
    out = BatchInput(path=path, sha256=hashlib.sha256(data).hexdigest())
    seen: dict[str, int] = {}  # custom_id -> the line that claimed it
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        cid: Optional[str] = None
        try:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _Bad(f"not UTF-8 text (byte {e.start + 1}). Fix: save the file as UTF-8.") from None
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise _Bad(f"not valid JSON ({e.msg} at column {e.colno}). Fix: one complete JSON object "
                           "per line.") from None
            if isinstance(obj, dict) and isinstance(obj.get("custom_id"), str) and obj["custom_id"].strip():
                cid = obj["custom_id"]
                if cid in seen:
                    first, cid = seen[cid], None  # the first line owns the output line for this id
                    raise _Bad(f"custom_id: {json.dumps(obj['custom_id'])} is also used on line {first}. "
                               "Fix: make every custom_id unique.")
                seen[cid] = n
            custom_id, url, body = _check(obj, default_model)
        except _Bad as e:
            out.malformed.append(Malformed(n, f"{path}:{n}: {e}", cid))
            continue
        out.requests.append(BatchRequest(n, custom_id, url, body))
    return out
