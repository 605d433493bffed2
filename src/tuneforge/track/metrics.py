"""metrics.jsonl: one JSON line per optimizer step or evaluation, flushed as it is written.

An append-only log can end in a torn line (power loss or a full disk mid-append): readers drop that
last line (a resume says so), since the step it belonged to is replayed from the checkpoint anyway.
A bad line before the end is damage of another kind, and an error naming the line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from tuneforge.errors import TuneforgeError


def _record(raw: bytes) -> dict | None:
    try:
        value = json.loads(raw.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included: a write cut inside a character
        return None
    return value if isinstance(value, dict) else None


def complete_lines(path: Path, warn: Callable[[str], None] | None = None) -> list[tuple[str, dict]]:
    """(line, record) of each complete line of a JSON-lines log; a torn last line is dropped, with a
    note to `warn` when given."""
    lines = [ln for ln in Path(path).read_bytes().split(b"\n") if ln.strip()]
    out = []
    for number, raw in enumerate(lines, 1):
        record = _record(raw)
        if record is not None:
            out.append((raw.decode("utf-8"), record))
        elif number == len(lines):
            if warn is not None:
                warn(f"{path}: dropped a torn last line ({len(raw)} bytes, cut off by a crash or a full disk "
                     "mid-write); the steps after the checkpoint are replayed and logged again")
        else:
            raise TuneforgeError(f"{path}:{number}: not a JSON record ({raw[:60]!r}); the log is damaged before "
                                 "its last line, so fix or remove that line by hand")
    return out


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log a run appends to (metrics.jsonl, diagnosis.jsonl)."""
    return [record for _, record in complete_lines(path)]


class MetricsLog:
    def __init__(self, path: Path, resume_from_step: int | None = None, warn: Callable[[str], None] | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is None:
            path.write_text("")
        elif path.exists():
            # Lines written after the checkpoint we resume from belong to the lost part of the run.
            kept = [ln for ln, record in complete_lines(path, warn) if record.get("step", 0) <= resume_from_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        self._file = open(path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict]:
    return read_jsonl(path)
