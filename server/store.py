"""The prompt queue and its history, persisted in SQLite under the user folder.

One table holds every prompt the server accepted. Its status moves
``pending -> running -> success | error | interrupted``; the queue is the pending and running rows,
the history the finished ones. A restart keeps pending prompts and marks the one that was running
as interrupted. Every method takes the store's lock, so the event loop and the worker thread may
share one store.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..graph_runtime.errors import LoomError

PENDING, RUNNING = "pending", "running"
SUCCESS, ERROR, INTERRUPTED = "success", "error", "interrupted"
FINISHED = (SUCCESS, ERROR, INTERRUPTED)
_FINISHED_SQL = "('success', 'error', 'interrupted')"
MAX_HISTORY = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    number INTEGER NOT NULL,
    status TEXT NOT NULL,
    prompt TEXT NOT NULL,
    extra TEXT NOT NULL,
    outputs TEXT NOT NULL,
    result TEXT,
    messages TEXT,
    created REAL NOT NULL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS prompts_status ON prompts (status, number, seq);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass
class QueueItem:
    """One accepted prompt: ComfyUI's queue tuple ``[number, prompt_id, prompt, extra_data, outputs]``
    plus what the run left (``result``: node id -> UI output; ``messages``: ``[[event, data], ...]``)."""

    number: int
    prompt_id: str
    prompt: dict
    extra_data: dict
    outputs: list
    status: str
    result: dict | None = None
    messages: list | None = None

    def as_tuple(self) -> list:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class DuplicateId(LoomError, ValueError):
    """A prompt id that the store already holds."""


class StoreError(LoomError):
    """The queue database cannot be opened or written (not a database, damaged, read-only)."""

    kind = "queue_unusable"


class PromptStore:
    """The persistent queue and history (``sqlite3`` in WAL mode, one connection behind a lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"SELECT {_COLUMNS} FROM prompts LIMIT 0")  # a foreign table of that name
        except (sqlite3.Error, OSError) as exc:
            if self._db is not None:
                self._db.close()
            raise self._unusable(exc) from None

    def _unusable(self, exc: Exception) -> StoreError:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return StoreError(f"the queue database cannot be used: {reason}", file=self.path,
                          fix="if it is read-only, make it and its folder writable; if it is not a queue "
                              "database (or damaged), move it aside (its queue and history are then lost) "
                              "and a new one is created; or start with another --user-dir")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self):
        """``with self._tx() as db:`` one IMMEDIATE transaction under the lock."""
        return _Transaction(self._lock, self._db)

    def recover(self) -> list[str]:
        """After a restart: the prompt that was running is finished as interrupted. Returns its ids."""
        now = time.time()
        try:
            return self._recover(now)
        except sqlite3.Error as exc:
            raise self._unusable(exc) from None

    def _recover(self, now: float) -> list[str]:
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM prompts WHERE status = ?", (RUNNING,))]
            message = ["execution_interrupted", {"prompt_id": None, "node_id": None, "node_type": None,
                                                 "executed": [], "timestamp": int(now * 1000),
                                                 "reason": "the server stopped while this prompt ran"}]
            for prompt_id in ids:
                message[1]["prompt_id"] = prompt_id
                db.execute("UPDATE prompts SET status = ?, finished = ?, result = ?, messages = ? WHERE id = ?",
                           (INTERRUPTED, now, "{}", json.dumps([message]), prompt_id))
        return ids

    def add(self, prompt_id: str, prompt: dict, extra_data: dict, outputs: list, front: bool = False) -> int:
        """Queue a prompt; returns its number (``front``: ahead of the pending ones, as ComfyUI's
        negative numbers). Raises :class:`DuplicateId` for an id the store already holds."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM counters WHERE name = 'number'").fetchone()
            number = row[0] if row else 0
            db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES ('number', ?)", (number + 1,))
            try:
                db.execute("INSERT INTO prompts (id, number, status, prompt, extra, outputs, created) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (prompt_id, -number if front else number, PENDING, json.dumps(prompt),
                            json.dumps(extra_data), json.dumps(outputs), time.time()))
            except sqlite3.IntegrityError:
                raise DuplicateId(f"prompt id {prompt_id!r} is already in the queue or history", value=prompt_id,
                                  kind="duplicate_id") from None
        return -number if front else number

    def claim_next(self) -> QueueItem | None:
        """Mark the first pending prompt running and return it (None when nothing is pending)."""
        with self._tx() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM prompts WHERE status = ? ORDER BY number, seq LIMIT 1",
                             (PENDING,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE prompts SET status = ? WHERE id = ?", (RUNNING, row[1]))
        item = _item(row)
        item.status = RUNNING
        return item

    def finish(self, prompt_id: str, status: str, result: dict, messages: list) -> None:
        """Record how a running prompt ended; keeps at most ``MAX_HISTORY`` finished prompts."""
        if status not in FINISHED:
            raise ValueError(f"status {status!r} is not one of {FINISHED}")
        with self._tx() as db:
            db.execute("UPDATE prompts SET status = ?, result = ?, messages = ?, finished = ? WHERE id = ?",
                       (status, json.dumps(result, default=str), json.dumps(messages, default=str), time.time(),
                        prompt_id))
            db.execute(f"DELETE FROM prompts WHERE seq IN (SELECT seq FROM prompts WHERE status IN {_FINISHED_SQL} "
                       f"ORDER BY finished DESC, seq DESC LIMIT -1 OFFSET ?)", (MAX_HISTORY,))

    def get(self, prompt_id: str) -> QueueItem | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM prompts WHERE id = ?", (prompt_id,)).fetchone()
        return _item(row) if row else None

    def queue(self) -> tuple[list[QueueItem], list[QueueItem]]:
        """(running, pending), pending in the order they will run."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM prompts WHERE status IN (?, ?) ORDER BY number, seq",
                                    (RUNNING, PENDING)).fetchall()
        items = [_item(r) for r in rows]
        return [i for i in items if i.status == RUNNING], [i for i in items if i.status == PENDING]

    def remaining(self) -> int:
        """Prompts not finished yet (ComfyUI's ``queue_remaining``)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM prompts WHERE status IN (?, ?)",
                                    (RUNNING, PENDING)).fetchone()[0]

    def history(self, max_items: int | None = None, offset: int = 0) -> list[QueueItem]:
        """Finished prompts, oldest first; ``max_items``: the newest that many (after skipping ``offset``
        newest)."""
        limit = -1 if max_items is None else max_items
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM prompts WHERE status IN {_FINISHED_SQL} "
                                    "ORDER BY finished DESC, seq DESC LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        return [_item(r) for r in reversed(rows)]

    def jobs(self, statuses: list[str], workflow_id: str | None, newest_first: bool, limit: int,
             offset: int) -> tuple[list[JobRow], int]:
        """One page of prompts for the jobs list, and how many match in all. Only what the list shows is
        read: never the prompt or the workflow (SQLite picks the two fields it needs out of ``extra``)."""
        where = f"status IN ({', '.join('?' * len(statuses))})"
        args: list = list(statuses)
        if workflow_id is not None:
            where += " AND json_extract(extra, '$.extra_pnginfo.workflow.id') = ?"
            args.append(workflow_id)
        order = "DESC" if newest_first else "ASC"
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM prompts WHERE {where}", args).fetchone()[0]
            rows = self._db.execute(
                "SELECT number, id, status, result, messages, json_extract(extra, '$.create_time'), "
                "json_extract(extra, '$.extra_pnginfo.workflow.id') "
                f"FROM prompts WHERE {where} ORDER BY json_extract(extra, '$.create_time') {order}, seq {order} "
                "LIMIT ? OFFSET ?", [*args, limit, offset]).fetchall()
        return [JobRow(number, prompt_id, status, json.loads(result) if result else None,
                       json.loads(messages) if messages else None, created or 0,
                       workflow if isinstance(workflow, str) else None)
                for number, prompt_id, status, result, messages, created, workflow in rows], total

    def delete_pending(self, ids: list[str] | None = None) -> list[str]:
        """Remove pending prompts (all of them when ``ids`` is None); returns the ids removed."""
        with self._tx() as db:
            if ids is None:
                rows = db.execute("SELECT id FROM prompts WHERE status = ?", (PENDING,)).fetchall()
            else:
                rows = [(i,) for i in ids
                        if db.execute("SELECT 1 FROM prompts WHERE id = ? AND status = ?", (i, PENDING)).fetchone()]
            db.executemany("DELETE FROM prompts WHERE id = ?", rows)
        return [r[0] for r in rows]

    def delete_history(self, ids: list[str] | None = None) -> list[str]:
        """Remove finished prompts (all of them when ``ids`` is None); returns the ids removed."""
        with self._tx() as db:
            if ids is None:
                rows = db.execute(f"SELECT id FROM prompts WHERE status IN {_FINISHED_SQL}").fetchall()
            else:
                rows = [(i,) for i in ids
                        if db.execute(f"SELECT 1 FROM prompts WHERE id = ? AND status IN {_FINISHED_SQL}",
                                      (i,)).fetchone()]
            db.executemany("DELETE FROM prompts WHERE id = ?", rows)
        return [r[0] for r in rows]


@dataclass
class JobRow:
    """What the jobs list shows of one prompt (:meth:`PromptStore.jobs`)."""

    number: int
    prompt_id: str
    status: str
    result: dict | None
    messages: list | None
    create_time: int
    workflow_id: str | None


_COLUMNS = "number, id, prompt, extra, outputs, status, result, messages"


def _item(row) -> QueueItem:
    number, prompt_id, prompt, extra, outputs, status, result, messages = row
    return QueueItem(number, prompt_id, json.loads(prompt), json.loads(extra), json.loads(outputs), status,
                     json.loads(result) if result else None, json.loads(messages) if messages else None)


class _Transaction:
    def __init__(self, lock: threading.Lock, db: sqlite3.Connection):
        self._lock = lock
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()
