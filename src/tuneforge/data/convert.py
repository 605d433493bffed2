"""Convert a data file to the common output shapes, so data in any format reaches any method as messages.

Chat formats (messages, sharegpt, alpaca) and completion become {"messages": [...]}; preference and
kto become their conversational shapes, the prompt as messages and each response as assistant
messages. triplet and text are written as they are: they have no turns to turn into messages.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from tuneforge.data.formats import BadRecord, Record, as_messages, read_records
from tuneforge.errors import DataError


def convert_record(record: Record) -> dict:
    """One record in its output shape; BadRecord when it has none (a completion with an empty prompt)."""
    if record.kind == "chat":
        return {"messages": record.messages}
    if record.kind == "completion":
        if not record.prompt.strip():
            # A user turn may not be empty, so this record would be rejected when read back as messages.
            raise BadRecord("an empty prompt cannot become a user turn; keep this data in completion format")
        return {"messages": [{"role": "user", "content": record.prompt},
                             {"role": "assistant", "content": record.completion}]}
    if record.kind == "preference":
        return {"prompt": as_messages(record.prompt, "user"), "chosen": as_messages(record.chosen, "assistant"),
                "rejected": as_messages(record.rejected, "assistant")}
    if record.kind == "kto":
        return {"prompt": as_messages(record.prompt, "user"), "completion": as_messages(record.completion, "assistant"),
                "label": record.label}
    if record.kind == "triplet":
        return {"query": record.query, "positive": record.positive, "negative": record.negative}
    if record.kind == "text":
        return {"text": record.text}
    raise ValueError(f"{record.where}: no output shape for records of kind {record.kind!r}")


@contextmanager
def _atomic_text(path: Path):
    """Write beside `path` and rename over it at the end, so a failed run never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def convert_file(src: str | Path, dst: str | Path, fmt: str = "auto") -> dict:
    """Write every usable record of `src` to `dst` (JSONL), and every bad one to <dst stem>.rejected.jsonl.

    The rejected file is always written, empty when nothing was rejected, so no earlier one is left
    behind to mislead. Returns the counts {"read", "written", "rejected"}.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix.lower() in (".json", ".csv", ".tsv", ".parquet"):
        raise DataError(f"{dst}: converted data is written as JSONL, one record a line; name the output .jsonl")
    rejected_path = dst.with_name(f"{dst.stem}.rejected.jsonl")
    dst.parent.mkdir(parents=True, exist_ok=True)
    counts = {"read": 0, "written": 0, "rejected": 0}
    with _atomic_text(dst) as out, _atomic_text(rejected_path) as rejected:
        for item in read_records(src, fmt):
            counts["read"] += 1
            if isinstance(item, Record):
                try:
                    out.write(json.dumps(convert_record(item), ensure_ascii=False) + "\n")
                    counts["written"] += 1
                    continue
                except BadRecord as bad:
                    item = (item.source, item.line, item.raw, bad)
            source, line, raw, reason = item
            # default=str: a Parquet row may hold dates or bytes, which JSON cannot; the reader still sees them.
            rejected.write(json.dumps({"file": source, "line": line, "reason": str(reason), "record": raw},
                                      ensure_ascii=False, default=str) + "\n")
            counts["rejected"] += 1
    return counts
