"""From config to tokenized examples: read, check, split, encode, apply the length policy.

Everything here runs before a model is loaded, so bad data costs seconds, not GPU time.
No record is dropped without being counted and, when it is dropped, written to rejected.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import TemplateError

from tuneforge.config import Config
from tuneforge.data.formats import Record, read_records
from tuneforge.data.template import (
    IGNORE_INDEX,
    Encoded,
    encode_completion,
    encode_conversation,
    encode_text,
    find_end_of_turn,
)
from tuneforge.errors import DataError

MAX_LISTED = 20


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    record: Record

    @property
    def source(self) -> str:
        return self.record.source

    @property
    def line(self) -> int:
        return self.record.line

    @property
    def n_trained(self) -> int:
        """Trained positions after the one-token shift (a label on the first token teaches nothing)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


@dataclass
class Rejected:
    source: str
    line: int
    reason: str
    record: object = None

    def as_json(self) -> dict:
        return {"file": self.source, "line": self.line, "reason": self.reason, "record": self.record}


@dataclass
class DataSummary:
    """Counts a user needs to trust the data: kept, rejected and why, truncated, lengths."""

    per_file: dict[str, Counter] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)

    def count(self, source: str, what: str, n: int = 1) -> None:
        self.per_file.setdefault(source, Counter())[what] += n

    def histogram(self, max_len: int, bins: int = 8) -> list[tuple[int, int, int]]:
        width = max(1, -(-max_len // bins))
        counts = Counter(min(n // width, bins - 1) for n in self.lengths)
        return [(b * width, (b + 1) * width, counts.get(b, 0)) for b in range(bins)]

    def as_json(self) -> dict:
        return {src: dict(c) for src, c in self.per_file.items()}


@dataclass
class PreparedData:
    train: list[Example]
    validation: list[Example]
    dataset_sizes: list[int]  # training examples per dataset, in config order (train is concatenated)
    dataset_weights: list[float]
    rejected: list[Rejected]
    summary: DataSummary
    end_of_turn: str | None
    file_hashes: dict[str, str]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode_record(tokenizer, rec: Record, end_of_turn: str | None, train_on_inputs: bool) -> Encoded:
    if rec.kind == "chat":
        if end_of_turn is None:
            raise DataError(f"{rec.where}: chat data needs a chat template")
        return encode_conversation(tokenizer, rec.messages, end_of_turn, train_on_inputs)
    if rec.kind == "completion":
        return encode_completion(tokenizer, rec.prompt, rec.completion, train_on_inputs)
    return encode_text(tokenizer, rec.text)


def apply_length_policy(enc: Encoded, max_len: int, policy: str) -> Encoded | None:
    """The one place over-long examples are handled; None means dropped."""
    if len(enc.input_ids) <= max_len:
        return enc
    if policy == "drop":
        return None
    if policy == "truncate_right":
        return Encoded(enc.input_ids[:max_len], enc.labels[:max_len])
    if policy == "truncate_left":
        return Encoded(enc.input_ids[-max_len:], enc.labels[-max_len:])
    raise AssertionError(policy)  # "error" is handled by the caller, which knows the file and line


def _read_file(path: str, fmt: str, rejected: list[Rejected], summary: DataSummary) -> list[Record]:
    records = []
    for item in read_records(path, fmt):
        if isinstance(item, Record):
            records.append(item)
        else:
            source, line, raw, bad = item
            rejected.append(Rejected(source, line, str(bad), raw))
            summary.count(source, "bad_record")
    summary.count(path, "records", len(records) + summary.per_file.get(path, Counter())["bad_record"])
    return records


def _check_bad(bad: list[Rejected], total: int, cfg: Config, first: list[Rejected] | None = None) -> None:
    """Bad records stop the run, unless on_bad_record: skip and they are few enough."""
    if not bad:
        return
    if cfg.on_bad_record == "error":
        _raise_bad(first or bad, total, "Fix these records, or set `on_bad_record: skip` to leave them out "
                   "(each is then written to <output_dir>/rejected.jsonl).")
    if len(bad) > cfg.max_bad_fraction * total:
        _raise_bad(bad, total, f"That is more than max_bad_fraction={cfg.max_bad_fraction} of the data: "
                   "the file is probably in another format or broken.")


def _raise_bad(rejected: list[Rejected], total: int, hint: str) -> None:
    shown = "\n".join(f"  {r.source}:{r.line}: {r.reason}" for r in rejected[:MAX_LISTED])
    more = f"\n  ... and {len(rejected) - MAX_LISTED} more" if len(rejected) > MAX_LISTED else ""
    raise DataError(f"{len(rejected)} of {total} records cannot be used:\n{shown}{more}\n{hint}")


def _encode_all(tokenizer, records: list[Record], cfg: Config, eot: str | None, summary: DataSummary,
                rejected: list[Rejected], too_long: list[Rejected], unrenderable: list[Rejected]) -> list[Example]:
    out = []
    for rec in records:
        try:
            enc = encode_record(tokenizer, rec, eot, cfg.train_on_inputs)
        except (TemplateError, DataError) as err:
            # e.g. a template that refuses system turns: a bad record, not a crash mid-way.
            unrenderable.append(Rejected(rec.source, rec.line, f"the chat template cannot render this record: {err}", rec.raw))
            summary.count(rec.source, "bad_record")
            continue
        n = len(enc.input_ids)
        if n > cfg.max_seq_len:
            summary.count(rec.source, "over_max_seq_len")
            lost = n - cfg.max_seq_len
            if cfg.truncation == "error":
                too_long.append(Rejected(rec.source, rec.line, f"{n} tokens > max_seq_len {cfg.max_seq_len}"))
                continue
            kept = apply_length_policy(enc, cfg.max_seq_len, cfg.truncation)
            if kept is None:
                rejected.append(Rejected(rec.source, rec.line, f"dropped: {n} tokens > max_seq_len {cfg.max_seq_len}", rec.raw))
                summary.count(rec.source, "dropped_too_long")
                continue
            summary.count(rec.source, "truncated")
            summary.count(rec.source, "tokens_cut", lost)
            enc = kept
        # Checked after the final truncation: an example with nothing to learn is never a step.
        if not any(x != IGNORE_INDEX for x in enc.labels[1:]):
            rejected.append(Rejected(rec.source, rec.line, "no trained tokens left after the length policy", rec.raw))
            summary.count(rec.source, "no_trained_tokens")
            continue
        summary.lengths.append(len(enc.input_ids))
        summary.count(rec.source, "kept")
        out.append(Example(enc.input_ids, enc.labels, rec))
    return out


def prepare_data(cfg: Config, tokenizer) -> PreparedData:
    """Read, check and encode the training and validation data of a config."""
    rejected: list[Rejected] = []
    summary = DataSummary()
    per_dataset = [_read_file(ds.path, ds.format, rejected, summary) for ds in cfg.datasets]
    val_records: list[Record] = []
    if cfg.validation and cfg.validation.path:
        val_records = _read_file(cfg.validation.path, cfg.validation.format, rejected, summary)

    total = sum(summary.per_file[p]["records"] for p in summary.per_file)
    _check_bad(rejected, total, cfg)
    read_bad = list(rejected)

    if cfg.validation and cfg.validation.split:
        # Hold out the same share of every dataset, chosen by the seed.
        rng = random.Random(cfg.seed)
        kept = []
        for recs in per_dataset:
            order = list(range(len(recs)))
            rng.shuffle(order)
            # At least one held out, at least one left to train on.
            n_val = min(max(1, round(len(recs) * cfg.validation.split)), len(recs) - 1) if len(recs) > 1 else 0
            held = set(order[:n_val])
            val_records += [r for i, r in enumerate(recs) if i in held]
            kept.append([r for i, r in enumerate(recs) if i not in held])
        per_dataset = kept

    kinds = {r.kind for recs in per_dataset for r in recs} | {r.kind for r in val_records}
    eot = find_end_of_turn(tokenizer) if "chat" in kinds else None

    too_long: list[Rejected] = []
    unrenderable: list[Rejected] = []
    train, sizes = [], []
    for recs in per_dataset:
        encoded = _encode_all(tokenizer, recs, cfg, eot, summary, rejected, too_long, unrenderable)
        sizes.append(len(encoded))
        train += encoded
    validation = _encode_all(tokenizer, val_records, cfg, eot, summary, rejected, too_long, unrenderable)
    if unrenderable:
        _check_bad(read_bad + unrenderable, total, cfg, first=unrenderable)
        rejected += unrenderable
    if too_long:
        _raise_bad(too_long, total, f"`truncation: error` is set; raise max_seq_len or choose "
                   "truncation: drop | truncate_right | truncate_left.")
    if not train:
        raise DataError("no training example is left after checks and the length policy; see the counts above "
                        "and <output_dir>/rejected.jsonl")

    hashes = {ds.path: sha256_file(ds.path) for ds in cfg.datasets}
    if cfg.validation and cfg.validation.path:
        hashes[cfg.validation.path] = sha256_file(cfg.validation.path)
    return PreparedData(train, validation, sizes, [ds.weight for ds in cfg.datasets], rejected, summary, eot, hashes)


def write_rejected(path: Path, rejected: list[Rejected]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rejected:
            f.write(json.dumps(r.as_json(), ensure_ascii=False) + "\n")
