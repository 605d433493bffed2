"""What the studio keeps under its home folder: uploaded files, and one SQLite database of files, jobs,
events, checkpoints and exports (the standard library's sqlite3, WAL mode, so status polls never wait on the
worker).

Files are stored under their id (`files/file-...`), never under the name a client sent; a job's run lives in
`jobs/<job id>/`; a job made from a file that grows (the reviews file) reads a snapshot of it (`snapshots/`).
Every write is one short transaction, so a kill -9 at any moment leaves a consistent database.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT NOT NULL, created_at INTEGER NOT NULL,
    status TEXT NOT NULL, model TEXT NOT NULL, request TEXT NOT NULL, config TEXT NOT NULL,
    fine_tuned_model TEXT, error TEXT, finished_at INTEGER, trained_tokens INTEGER,
    requested TEXT, step INTEGER, total_steps INTEGER, estimated_finish INTEGER);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL, data TEXT, step INTEGER);
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, created_at INTEGER NOT NULL, step INTEGER NOT NULL,
    metrics TEXT NOT NULL, UNIQUE(job_id, step));
CREATE TABLE IF NOT EXISTS exports (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, status TEXT NOT NULL, target TEXT NOT NULL, quant TEXT, estimated_bytes INTEGER,
    bytes INTEGER, path TEXT, error TEXT, finished_at INTEGER);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, seq);
"""
# Columns later versions added to a table: a home made by an earlier studio gains them when opened.
ADDED_COLUMNS = {"jobs": ("step INTEGER", "total_steps INTEGER", "estimated_finish INTEGER"),
                 "files": ("grows INTEGER NOT NULL DEFAULT 0",)}  # 1: appended to (the reviews file)
ACTIVE = ("validating_files", "queued", "running", "paused")  # statuses a job can still leave
JSON_COLUMNS = ("request", "config", "error", "data", "metrics")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def default_home() -> Path:
    """$TUNEFORGE_HOME, else ~/.tuneforge."""
    return Path(os.environ.get("TUNEFORGE_HOME") or Path.home() / ".tuneforge")


def _row(cursor: sqlite3.Cursor, values: tuple) -> dict:
    row = {col[0]: value for col, value in zip(cursor.description, values)}
    for key in JSON_COLUMNS:
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key])
    return row


class Store:
    """The database and the files folder; safe to share between the server's threads (one lock per write)."""

    def __init__(self, home: str | Path):
        self.home = Path(home).expanduser().resolve()
        self.files_dir = self.home / "files"
        self.jobs_dir = self.home / "jobs"
        for folder in (self.files_dir, self.jobs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.home / "studio.db", check_same_thread=False, isolation_level=None, timeout=30)
        self.db.row_factory = _row
        self.lock = threading.Lock()
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            for table, columns in ADDED_COLUMNS.items():
                have = {row["name"] for row in self.db.execute(f"PRAGMA table_info({table})").fetchall()}
                for column in columns:
                    if column.split()[0] not in have:
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def query(self, sql: str, args: tuple = ()) -> list[dict]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def execute(self, sql: str, args: tuple = ()) -> int:
        """One write; returns the number of rows it changed (0: a conditional update lost its race)."""
        with self.lock:
            return self.db.execute(sql, args).rowcount

    # --- files -----------------------------------------------------------------------------------------

    def add_file(self, owner: str, filename: str, purpose: str, content: bytes, grows: bool = False) -> dict:
        """`grows`: the file will be appended to (append_file), so a job trains on a snapshot of it."""
        file_id = new_id("file")
        tmp = self.files_dir / f".{file_id}.tmp"
        tmp.write_bytes(content)
        os.replace(tmp, self.files_dir / file_id)
        self.execute("INSERT INTO files (id, owner, filename, purpose, bytes, created_at, grows) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (file_id, owner, filename, purpose, len(content), int(time.time()), int(grows)))
        return self.file(owner, file_id)

    def append_file(self, file_id: str, content: bytes) -> None:
        """Add bytes to the end of a stored file (the web UI's reviews file grows one pair at a time)."""
        with self.lock:
            with open(self.file_path(file_id), "ab") as f:
                f.write(content)
            self.db.execute("UPDATE files SET bytes = bytes + ?, grows = 1 WHERE id = ?", (len(content), file_id))

    def job_data_path(self, file_id: str) -> Path:
        """Where a job reads a file: the file itself, or, for one that can still grow, a frozen copy named by the
        SHA-256 of its content (<home>/snapshots/), so nothing appended later changes the job's data or its hash."""
        rows = self.query("SELECT grows FROM files WHERE id = ?", (file_id,))
        if not rows or not rows[0]["grows"]:
            return self.file_path(file_id)
        with self.lock:  # append_file writes under it: the copy never holds half an append
            content = self.file_path(file_id).read_bytes()
        path = self.home / "snapshots" / f"{hashlib.sha256(content).hexdigest()}.jsonl"
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(content)
            os.replace(tmp, path)
        return path

    def file(self, owner: str, file_id: str) -> dict | None:
        rows = self.query("SELECT * FROM files WHERE id = ? AND owner = ? AND deleted = 0", (file_id, owner))
        return rows[0] if rows else None

    def files(self, owner: str) -> list[dict]:
        return self.query("SELECT * FROM files WHERE owner = ? AND deleted = 0 ORDER BY created_at DESC, id", (owner,))

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def delete_file(self, owner: str, file_id: str) -> bool:
        if not self.execute("UPDATE files SET deleted = 1 WHERE id = ? AND owner = ? AND deleted = 0", (file_id, owner)):
            return False
        if not self.query("SELECT id FROM jobs WHERE status IN (?, ?, ?, ?) AND request LIKE ?",
                          (*ACTIVE, f'%"{file_id}"%')):
            self.file_path(file_id).unlink(missing_ok=True)  # a job still waiting for it keeps reading it
        return True

    # --- jobs ------------------------------------------------------------------------------------------

    def add_job(self, owner: str, model: str, request: dict, config: dict) -> dict:
        job_id = new_id("ftjob")
        self.execute("INSERT INTO jobs (id, owner, created_at, status, model, request, config) "
                     "VALUES (?, ?, ?, 'validating_files', ?, ?, ?)",
                     (job_id, owner, int(time.time()), model, json.dumps(request), json.dumps(config)))
        return self.job(job_id)

    def _row(self, table: str, row_id: str, owner: str | None) -> dict | None:
        """Row `row_id` of `table` (jobs, exports); None if absent or, with `owner`, another key's."""
        rows = self.query(f"SELECT * FROM {table} WHERE id = ?", (row_id,))
        return rows[0] if rows and owner in (None, rows[0]["owner"]) else None

    def job(self, job_id: str, owner: str | None = None) -> dict | None:
        return self._row("jobs", job_id, owner)

    def jobs(self, owner: str, after: str | None, limit: int) -> list[dict]:
        """Newest first, starting after the job `after` (OpenAI's cursor)."""
        start = self.job(after, owner) if after else None
        seq = start["seq"] if start else 1 << 62
        return self.query("SELECT * FROM jobs WHERE owner = ? AND seq < ? ORDER BY seq DESC LIMIT ?", (owner, seq, limit))

    def next_job(self, status: str) -> dict | None:
        """The oldest job in this status: the queue's order is the order jobs were created."""
        rows = self.query("SELECT * FROM jobs WHERE status = ? ORDER BY seq LIMIT 1", (status,))
        return rows[0] if rows else None

    def move(self, job_id: str, to: str, frm: tuple[str, ...], **fields) -> bool:
        """Change a job's status only if it is in one of `frm`; False when another thread moved it first."""
        return self._move("jobs", job_id, to, frm, fields)

    def _move(self, table: str, row_id: str, to: str, frm: tuple[str, ...], fields: dict) -> bool:
        sets = ", ".join(["status = ?", *(f"{k} = ?" for k in fields)])
        values = [json.dumps(v) if k == "error" and v is not None else v for k, v in fields.items()]
        marks = ", ".join("?" * len(frm))
        return bool(self.execute(f"UPDATE {table} SET {sets} WHERE id = ? AND status IN ({marks})",
                                 (to, *values, row_id, *frm)))

    def progress(self, job_id: str, step: int, total_steps: int | None, estimated_finish: int | None) -> None:
        """The running job's newest step, of how many, and when it should end (the job object shows them)."""
        self.execute("UPDATE jobs SET step = ?, total_steps = ?, estimated_finish = ? WHERE id = ?",
                     (step, total_steps, estimated_finish, job_id))

    def request(self, job_id: str, what: str | None) -> None:
        """Ask the worker to stop a running job's process (cancel or pause); None clears the request."""
        self.execute("UPDATE jobs SET requested = ? WHERE id = ?", (what, job_id))

    # --- events and checkpoints ------------------------------------------------------------------------

    def add_event(self, job_id: str, message: str, level: str = "info", kind: str = "message",
                  data: dict | None = None, step: int | None = None) -> None:
        self.execute("INSERT INTO events (id, job_id, created_at, level, message, type, data, step) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (new_id("ftevent"), job_id, int(time.time()), level, message, kind,
                      json.dumps(data) if data is not None else None, step))

    def events(self, job_id: str, after: str | None, limit: int) -> list[dict]:
        """Newest first, as OpenAI lists them; `after` is an event id."""
        rows = self.query("SELECT seq FROM events WHERE id = ? AND job_id = ?", (after, job_id)) if after else []
        seq = rows[0]["seq"] if rows else 1 << 62
        return self.query("SELECT * FROM events WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                          (job_id, seq, limit))

    def last_logged_step(self, job_id: str) -> int:
        rows = self.query("SELECT MAX(step) AS step FROM events WHERE job_id = ? AND type = 'metrics'", (job_id,))
        return rows[0]["step"] or 0

    def add_checkpoint(self, job_id: str, step: int, metrics: dict) -> bool:
        return bool(self.execute("INSERT OR IGNORE INTO checkpoints (id, job_id, created_at, step, metrics) "
                                 "VALUES (?, ?, ?, ?, ?)",
                                 (new_id("ftckpt"), job_id, int(time.time()), step, json.dumps(metrics))))

    def checkpoints(self, job_id: str, after: str | None, limit: int) -> list[dict]:
        rows = self.query("SELECT step FROM checkpoints WHERE id = ? AND job_id = ?", (after, job_id)) if after else []
        step = rows[0]["step"] if rows else 1 << 62
        return self.query("SELECT * FROM checkpoints WHERE job_id = ? AND step < ? ORDER BY step DESC LIMIT ?",
                          (job_id, step, limit))

    def succeeded(self, owner: str | None = None) -> list[dict]:
        """Jobs whose fine-tuned model can be served (every owner's when `owner` is None)."""
        if owner is None:
            return self.query("SELECT * FROM jobs WHERE status = 'succeeded' ORDER BY seq")
        return self.query("SELECT * FROM jobs WHERE status = 'succeeded' AND owner = ? ORDER BY seq", (owner,))

    def run_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id / "run"

    # --- exports (studio/exports.py) ----------------------------------------------------------------------

    def add_export(self, owner: str, job_id: str, target: str, quant: str | None, estimated_bytes: int) -> dict:
        export_id = new_id("export")
        self.execute("INSERT INTO exports (id, owner, job_id, created_at, status, target, quant, estimated_bytes) "
                     "VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                     (export_id, owner, job_id, int(time.time()), target, quant, estimated_bytes))
        return self.export(export_id)

    def export(self, export_id: str, owner: str | None = None) -> dict | None:
        return self._row("exports", export_id, owner)

    def exports(self, owner: str, job_id: str | None = None) -> list[dict]:
        """Newest first; one job's when `job_id` is given."""
        if job_id is None:
            return self.query("SELECT * FROM exports WHERE owner = ? ORDER BY seq DESC", (owner,))
        return self.query("SELECT * FROM exports WHERE owner = ? AND job_id = ? ORDER BY seq DESC", (owner, job_id))

    def move_export(self, export_id: str, to: str, frm: tuple[str, ...], **fields) -> bool:
        """Change an export's status only if it is in one of `frm` (False: deleted or moved by another thread)."""
        return self._move("exports", export_id, to, frm, fields)

    def delete_export(self, export_id: str, unless: tuple[str, ...]) -> bool:
        """Remove an export's record unless its status is one of `unless` (False: it was, or it is gone)."""
        marks = ", ".join("?" * len(unless))
        return bool(self.execute(f"DELETE FROM exports WHERE id = ? AND status NOT IN ({marks})",
                                 (export_id, *unless)))
