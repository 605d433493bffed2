"""`tuneforge data check` for raw text (the pretrain row's `checks`): each document as the token shards read it.

Raw text has no chat template to render and no turns to mask, so what can go wrong is the text itself:
documents the shards would refuse (invalid UTF-8, empty, a JSONL line without its text field; errors,
with file, line and byte), repeated or near-repeated documents, validation documents that are also
training documents, invisible control characters, and text that looks like a control token (the
tokenizer reads `<|endoftext|>` in a document as the end of it).
"""

from __future__ import annotations

import re
from itertools import islice

from tuneforge.config import Config
from tuneforge.data.check import ERROR, WARNING, CheckReport, _near_duplicates, control_characters
from tuneforge.data.dedupe import LSHIndex, MinHasher, exact_key
from tuneforge.data.formats import Record
from tuneforge.data.progress import by_position, files_progress, size_of
from tuneforge.data.shards import BadDocument, located_documents

CHUNK = 1024  # documents hashed together
CONTROL_TOKEN = re.compile(r"<\|[^|<>\s]{1,40}\|>")


def _bad(report: CheckReport):
    def on_bad(bad: BadDocument) -> None:
        report.records[bad.source] += 1
        where = f"byte {bad.offset}: " if bad.offset >= 0 else ""
        report.add(ERROR, "bad-record", bad.source, bad.line, where + bad.reason)
    return on_bad


def _text_findings(report: CheckReport, rec: Record) -> None:
    found = sorted(set(CONTROL_TOKEN.findall(rec.text)))
    if found:
        report.add(WARNING, "special-token-in-text", rec.source, rec.line,
                   f"the text contains {', '.join(found[:3])}, which a tokenizer may read as a control token "
                   "(<|endoftext|> ends the document there)")
    bad = control_characters(rec.text)
    if bad:
        report.add(WARNING, "control-characters", rec.source, rec.line, f"control characters {', '.join(bad[:5])}")


def check_raw(cfg: Config, report: CheckReport) -> None:
    """Every training and validation document, streamed: memory holds a key and a signature per document."""
    threshold = report.settings.get("near_threshold", 0.85)
    hasher = MinHasher()
    train_seen: dict = {}
    train_lsh = LSHIndex(threshold)
    files = [(ds.path, False) for ds in cfg.datasets]
    if cfg.validation and cfg.validation.path:
        files.append((cfg.validation.path, True))
    with files_progress("Checking", [path for path, _ in files]) as advance:
        for path, held_out in files:
            seen, lsh = ({}, LSHIndex(threshold)) if held_out else (train_seen, train_lsh)
            docs = located_documents(path, _bad(report), cfg.pretrain.text_field)
            # A document's text bytes stand for its place in the file; JSON syntax and escapes are told at the end.
            at, done = by_position(advance, size_of(path)), 0
            while chunk := [Record(str(path), line, "raw", text=text) for line, text in islice(docs, CHUNK)]:
                report.records[str(path)] += len(chunk)
                texts = [rec.text for rec in chunk]
                done += sum(len(text.encode("utf-8")) for text in texts)
                at(done)
                for rec, sig in zip(chunk, hasher.signatures(texts)):
                    _near_duplicates(report, seen, lsh, rec, exact_key(rec.text), sig,
                                     (train_seen, train_lsh) if held_out else None)
                    _text_findings(report, rec)
            at(None)
