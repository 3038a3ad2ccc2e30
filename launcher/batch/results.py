"""Output lines in OpenAI's batch output shape, and the output file written from the journal.

    {"id": "batch_req_…", "custom_id": "req-1",
     "response": {"status_code": 200, "request_id": "…", "body": {…the server's response…}},
     "error": null}

A failure has "error": {"code": …, "message": …}, and "response" is the server's non-2xx answer
(status and body) or null when there was none (connection refused, timeout, malformed line).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional


def _id(prefix: str = "batch_req_") -> str:
    return prefix + uuid.uuid4().hex


def ok_line(custom_id: str, status: int, body: Any) -> dict:
    request_id = body.get("id") if isinstance(body, dict) else None
    return {"id": _id(), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id or _id("req_"), "body": body},
            "error": None}


def error_line(custom_id: str, code: str, message: str, status: Optional[int] = None, body: Any = None) -> dict:
    response = None
    if status is not None:
        request_id = body.get("id") if isinstance(body, dict) else None
        response = {"status_code": status, "request_id": request_id or _id("req_"), "body": body}
    return {"id": _id(), "custom_id": custom_id, "response": response,
            "error": {"code": code, "message": message}}


def write_atomically(path: Path, lines: Iterable[str]) -> int:
    """Write `lines` (JSON texts, no newline) to path via a temp file + rename, so a reader (or a
    kill at any moment) sees the old file or the whole new one, never a torn one. Returns the count."""
    path = Path(path)
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
                f.write("\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return n


def _remove_stale_temps(path: Path) -> None:
    """Temp files left by a run that was killed while writing (its pid is gone)."""
    for old in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(old.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            old.unlink(missing_ok=True)
        except (ValueError, OSError):
            pass


def dumps(line: dict) -> str:
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"))
