"""The batch journal: an SQLite file that is the single source of truth for what is done.

Why this makes a batch resumable exactly once, by construction:
- There is one row per custom_id (PRIMARY KEY), created with the journal, in one transaction.
- A request's answer (the full output line) is committed to its row the moment it arrives; a
  row that is `ok` is never overwritten and never sent again.
- The output file is never appended to: it is regenerated from the journal (rows in input
  order) and swapped in with an atomic rename. A kill at any moment leaves the previous output
  or the complete new one; the next run rewrites it from the journal anyway.
So killing the process (even SIGKILL, mid-request or mid-write) can only lose answers that were
not yet committed; those rows are still pending and are asked again on the next run, and each
custom_id still gets exactly one line.

WAL mode with synchronous=NORMAL: a committed row survives the process being killed; a power
cut may lose the last few commits, which are then simply asked again.

The journal remembers the sha256 of the input it was made from (and the default model): a
different input is refused rather than mixed in, unless --restart discards the journal.
One batch at a time per journal: an flock on the file, released by the kernel if we die.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from pathlib import Path
from typing import Iterator, Optional

from launcher.batch import results
from launcher.batch.inputfile import BatchInput
from launcher.errors import ConfigError, LaunchError

SCHEMA = 1
STATES = ("pending", "ok", "failed", "malformed")

_DDL = ("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)", """
CREATE TABLE requests (
    custom_id TEXT PRIMARY KEY,
    line INTEGER NOT NULL,              -- line in the input file, the order of the output
    state TEXT NOT NULL CHECK (state IN ('pending', 'ok', 'failed', 'malformed')),
    result TEXT,                        -- the output line (JSON) once there is an answer
    attempts INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    updated REAL
)""")


def default_path(output: Path) -> Path:
    return Path(f"{output}.journal")


class Journal:
    def __init__(self, path: Path, db: sqlite3.Connection, lock_fd: int, already_ok: int, discarded: bool):
        self.path = path
        self.db = db
        self._lock_fd = lock_fd
        self.already_ok = already_ok  # requests answered by an earlier run
        self.discarded = discarded    # --restart threw an earlier journal away

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, inp: BatchInput, model: str, *, restart: bool = False) -> "Journal":
        path = Path(path)
        # Held for the journal's lifetime and closed only after sqlite: closing any descriptor of
        # the file would drop sqlite's own POSIX locks on it.
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"--journal {path}: cannot create or open it ({e.strerror}).") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"journal {path} is in use by another exolaunch batch. Fix: wait for it to "
                              "finish, or give this run its own --output / --journal.") from None
        try:
            db = sqlite3.connect(path, isolation_level=None, timeout=30)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                meta = cls._meta(db)
            except sqlite3.DatabaseError as e:
                db.close()
                raise ConfigError(f"--journal {path}: not an exolaunch batch journal ({e}). Fix: choose another "
                                  "--journal path (or remove that file if it is an old, broken journal).") from None
            discarded = False
            if meta is None:
                cls._create(db, inp, model)
            elif restart or meta.get("input_sha256") != inp.sha256 or meta.get("model") != model:
                if not restart:
                    db.close()
                    raise ConfigError(cls._mismatch(path, meta, inp, model))
                db.execute("BEGIN IMMEDIATE")
                db.execute("DROP TABLE IF EXISTS requests")
                db.execute("DROP TABLE IF EXISTS meta")
                cls._create(db, inp, model, begun=True)
                discarded = True
            already = db.execute("SELECT count(*) FROM requests WHERE state = 'ok'").fetchone()[0]
        except BaseException:
            os.close(fd)
            raise
        return cls(path, db, fd, already, discarded)

    @staticmethod
    def _meta(db: sqlite3.Connection) -> Optional[dict]:
        """The meta table as a dict, or None for a new (or never completed) journal."""
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
            return None
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema") != str(SCHEMA):
            raise sqlite3.DatabaseError(f"journal schema {meta.get('schema')!r}, this exolaunch writes {SCHEMA}")
        return meta

    @staticmethod
    def _create(db: sqlite3.Connection, inp: BatchInput, model: str, begun: bool = False) -> None:
        """Tables, meta and one row per custom_id, all in one transaction: a journal is either
        complete or absent (a kill during creation leaves no meta, so the next run starts over)."""
        if not begun:
            db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _DDL:
                db.execute(stmt)
            db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("schema", str(SCHEMA)), ("input", str(inp.path)), ("input_sha256", inp.sha256),
                ("model", model), ("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))])
            now = time.time()
            db.executemany("INSERT INTO requests (custom_id, line, state, updated) VALUES (?, ?, 'pending', ?)",
                           [(r.custom_id, r.line, now) for r in inp.requests])
            db.executemany(
                "INSERT INTO requests (custom_id, line, state, result, updated) VALUES (?, ?, 'malformed', ?, ?)",
                [(m.custom_id, m.line, results.dumps(results.error_line(m.custom_id, "invalid_request", m.message)),
                  now) for m in inp.malformed if m.custom_id is not None])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @staticmethod
    def _mismatch(path: Path, meta: dict, inp: BatchInput, model: str) -> str:
        was, sha = meta.get("input", "?"), meta.get("input_sha256", "?")
        if sha != inp.sha256:
            if was == str(inp.path):
                what = (f"was made from {was} (sha256 {sha[:12]}…), which has changed since "
                        f"(now sha256 {inp.sha256[:12]}…)")
            else:
                what = f"was made from {was} (sha256 {sha[:12]}…), not from {inp.path} (sha256 {inp.sha256[:12]}…)"
        else:
            what = f"was made for model {meta.get('model')!r}, not {model!r}"
        return (f"journal {path} {what}. Fix: rerun with the same input and model to resume, pass --restart to "
                f"discard the journal and start over, or give a new --journal (or --output) to keep it.")

    # -- use ------------------------------------------------------------------------------------
    def states(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT custom_id, state FROM requests").fetchall())

    def record(self, custom_id: str, ok: bool, line: dict, attempts: int,
               prompt_tokens: Optional[int] = None, completion_tokens: Optional[int] = None) -> None:
        """Commit one answer. An `ok` row is final: nothing overwrites it."""
        try:
            self.db.execute(
                "UPDATE requests SET state = ?, result = ?, attempts = attempts + ?, prompt_tokens = ?, "
                "completion_tokens = ?, updated = ? WHERE custom_id = ? AND state != 'ok'",
                ("ok" if ok else "failed", results.dumps(line), attempts, prompt_tokens, completion_tokens,
                 time.time(), custom_id))
        except sqlite3.Error as e:
            raise LaunchError(f"journal {self.path}: cannot record the answer to {custom_id!r} ({e}); "
                              "what was recorded before is kept, rerun to continue.", 1) from None

    def answered_lines(self) -> Iterator[str]:
        """Every answered row's output line, in input order (pending rows have none yet)."""
        for (text,) in self.db.execute("SELECT result FROM requests WHERE result IS NOT NULL ORDER BY line"):
            yield text

    def counts(self) -> dict[str, int]:
        got = dict(self.db.execute("SELECT state, count(*) FROM requests GROUP BY state").fetchall())
        return {s: got.get(s, 0) for s in STATES}

    def close(self) -> None:
        try:
            self.db.close()
        finally:
            os.close(self._lock_fd)


def export(journal: Journal, output: Path) -> int:
    """(Re)write the output file from the journal, atomically. Returns the number of lines."""
    try:
        return results.write_atomically(output, journal.answered_lines())
    except OSError as e:
        raise LaunchError(f"--output {output}: cannot write it ({e.strerror}); the answers are safe in the journal "
                          f"{journal.path}: rerun the same command to write the output again.", 1) from None

