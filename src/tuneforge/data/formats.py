"""Read training files and turn each record into a common form, with its file and line.

Formats: messages (OpenAI chat fine-tuning), sharegpt, alpaca, completion, text. A record
that cannot be used raises `BadRecord` with the reason; the caller decides whether that stops
the run or goes to rejected.jsonl.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tuneforge.errors import DataError

FORMATS = ("messages", "sharegpt", "alpaca", "completion", "text")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "tool": "tool", "observation": "tool", "function_response": "tool",
}


class BadRecord(ValueError):
    """A record that cannot be trained on; the message is the reason."""


@dataclass
class Record:
    """One example in common form. `kind` is chat, completion or text."""

    source: str
    line: int
    kind: str
    messages: list[dict] = field(default_factory=list)
    prompt: str = ""
    completion: str = ""
    text: str = ""
    raw: object = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def iter_raw(path: str | Path) -> Iterator[tuple[int, object | BadRecord]]:
    """(line, parsed object) for a .jsonl file or a JSON list; a line that is not JSON yields BadRecord."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    text = path.read_bytes().decode("utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of records (use .jsonl for one per line)")
        # A JSON list has no per-record lines; number records from 1 instead.
        for i, obj in enumerate(data, 1):
            yield i, obj
        return
    # Split on "\n" only: str.splitlines() also breaks at U+2028, U+0085 and others, which JSON
    # writers leave raw inside strings, and would turn one record into several broken ones.
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            yield lineno, BadRecord(f"not valid JSON ({err.msg} at column {err.colno})")


def detect_format(obj: object) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "prompt" in obj and "completion" in obj:
        return "completion"
    if "text" in obj:
        return "text"
    return None


def _string(obj: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in obj:
        raise BadRecord(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRecord(f"field {key!r} is empty")
    return value


def _prepend_system(rec: Record, obj: dict) -> None:
    """sharegpt and alpaca may carry the system prompt as a top-level field."""
    system = obj.get("system")
    if system is None or system == "":
        return
    if not isinstance(system, str):
        raise BadRecord(f"field 'system' must be a string, got {type(system).__name__}")
    if system.strip():
        rec.messages.insert(0, {"role": "system", "content": system})


def check_turns(messages: list[dict]) -> None:
    """Roles known, contents non-empty strings, turns in a trainable order."""
    if not messages:
        raise BadRecord("no messages")
    for i, msg in enumerate(messages, 1):
        if not isinstance(msg, dict):
            raise BadRecord(f"message {i} is not an object")
        role = msg.get("role")
        if role not in ROLES:
            raise BadRecord(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = msg.get("content")
        if role == "assistant" and msg.get("tool_calls") and content in (None, ""):
            continue
        if not isinstance(content, str):
            raise BadRecord(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise BadRecord(f"message {i} ({role}): empty content")
        if role == "system" and i != 1:
            raise BadRecord(f"message {i}: a system message may only come first")
    chat = [m["role"] for m in messages if m["role"] != "system"]
    if "assistant" not in chat:
        raise BadRecord("no assistant turn to train on")
    if chat[0] != "user":
        raise BadRecord(f"the first turn after the system prompt must be user, got {chat[0]}")
    for prev, cur in zip(chat, chat[1:]):
        if prev == cur and cur != "tool":
            raise BadRecord(f"two {cur} turns in a row: turns must alternate user/assistant")


def to_record(obj: object, fmt: str, source: str, line: int) -> Record:
    """Convert one parsed object of format `fmt`; raises BadRecord with the reason."""
    if isinstance(obj, BadRecord):
        raise obj
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    rec = Record(source=source, line=line, kind="chat", raw=obj)
    if fmt == "messages":
        msgs = obj.get("messages")
        if not isinstance(msgs, list):
            raise BadRecord("field 'messages' must be a list")
        rec.messages = [
            {k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "name", "tool_call_id")}
            if isinstance(m, dict) else m
            for m in msgs
        ]
    elif fmt == "sharegpt":
        conv = obj.get("conversations")
        if not isinstance(conv, list):
            raise BadRecord("field 'conversations' must be a list")
        for i, turn in enumerate(conv, 1):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise BadRecord(f"conversation turn {i} needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(turn["from"])
            if role is None:
                raise BadRecord(f"turn {i}: unknown speaker {turn['from']!r} (expected one of {', '.join(SHAREGPT_ROLES)})")
            rec.messages.append({"role": role, "content": turn["value"]})
        _prepend_system(rec, obj)
    elif fmt == "alpaca":
        instruction = _string(obj, "instruction")
        extra = obj.get("input") or ""
        if not isinstance(extra, str):
            raise BadRecord(f"field 'input' must be a string, got {type(extra).__name__}")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        rec.messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _string(obj, "output")}]
        _prepend_system(rec, obj)
    elif fmt == "completion":
        rec.kind = "completion"
        rec.prompt = _string(obj, "prompt", allow_empty=True)
        rec.completion = _string(obj, "completion")
        return rec
    elif fmt == "text":
        rec.kind = "text"
        rec.text = _string(obj, "text")
        return rec
    else:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    check_turns(rec.messages)
    return rec


def read_records(path: str | Path, fmt: str = "auto") -> Iterator[Record | tuple[str, int, object, BadRecord]]:
    """Every record of a file: a Record, or (file, line, raw, BadRecord) for one that cannot be used."""
    source = str(path)
    for line, obj in iter_raw(path):
        if fmt == "auto":
            detected = detect_format(obj)
            if detected is None:
                if isinstance(obj, BadRecord):
                    yield source, line, None, obj
                    continue
                keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(
                    f"{source}:{line}: cannot tell the data format from this record (keys: {keys}); "
                    f"set `format:` for this dataset to one of {', '.join(FORMATS)}"
                )
            fmt = detected
        try:
            yield to_record(obj, fmt, source, line)
        except BadRecord as bad:
            yield source, line, None if isinstance(obj, BadRecord) else obj, bad
