"""Embedding data: (query, positive[, negative]) records, or text pairs with a similarity score.

Accepted shapes (any file kind data/readers.py reads; `columns:` renames the file's fields to these):
  {"query": ..., "positive": ..., "negative": ... or [...]}   contrastive, the negative optional
  {"query"|"sentence1": ..., "positive"|"sentence2": ..., "score": 0.8}   scored pairs (cosine loss)
A run trains one of the two: a file mixing them is an error naming the first record of the other kind.

Texts are kept as text and tokenized per batch, truncated as sentence-transformers truncates (to
max_seq_len and the model's own max_seq_length), so no record is dropped for its length. The queries
are also tokenized here, for the data summary and the step counts every run prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tuneforge.config import Config
from tuneforge.data.dataset import (
    DataSummary,
    PreparedData,
    Rejected,
    _check_bad,
    _split_chunk,
    chunks,
    data_paths,
    effective_weights,
    file_hashes,
    sha256_file,
)
from tuneforge.data.formats import Record, apply_mapping
from tuneforge.data.progress import files_progress
from tuneforge.data.readers import BadRecord, iter_rows
from tuneforge.data.tokenized import TokenizedBuilder
from tuneforge.errors import DataError

CHUNK = 2048


@dataclass
class PairData(PreparedData):
    """PreparedData whose `train`/`validation` hold the queries (records kept: their positives, negatives and
    scores), plus the extra retrieval corpus; `scored` says which loss the records call for."""

    scored: bool = False
    corpus: list[str] = field(default_factory=list)

    def arrange(self, order: list[int], micro_batch_size: int) -> list[int]:
        if self.scored:  # scored pairs have no in-batch negatives
            return order
        records = self.train.records
        return spread_duplicates(order, lambda i: [records[i].positive, *records[i].negative], micro_batch_size)


LOOK_BACK = 8  # earlier micro-batches searched for a swap when only repeats are left


def spread_duplicates(order: list[int], texts, size: int) -> list[int]:
    """The order rearranged so that no run of `size` (a micro-batch) holds a text twice: an example whose
    positive or negative is already in the batch being filled waits for the next batch, ahead of the rest.

    When only repeats are left (the end of an epoch), each is swapped into one of the last LOOK_BACK batches
    for an example that fits here; failing that the batch takes the repeat (collate then drops it).
    A pure function of the order, which is one of (seed, epoch): a resumed run rearranges it identically.
    """
    pending, batches = list(order), []
    while pending:
        batch, seen, waiting = [], set(), []
        for pos, i in enumerate(pending):
            if len(batch) == size:
                waiting += pending[pos:]
                break
            if seen.isdisjoint(texts(i)):
                batch.append(i)
                seen.update(texts(i))
            else:
                waiting.append(i)
        while len(batch) < size and waiting:  # only repeats of this batch's texts are left
            x = waiting.pop(0)
            y = _swap_into(x, batches[-LOOK_BACK:], seen, texts)
            batch.append(x if y is None else y)
            seen.update(texts(batch[-1]))
        batches.append(batch)
        pending = waiting
    return [i for batch in batches for i in batch]


def _swap_into(x: int, earlier: list[list[int]], seen: set[str], texts) -> int | None:
    """Put x into an earlier batch in place of an example that fits the current one (`seen`); returns that example."""
    for batch in reversed(earlier):
        for k, y in enumerate(batch):
            others = {t for j in batch if j != y for t in texts(j)}
            if seen.isdisjoint(texts(y)) and others.isdisjoint(texts(x)):
                batch[k] = x
                return y
    return None


def _text(obj: dict, *names: str) -> str:
    for name in names:
        if name in obj:
            value = obj[name]
            if not isinstance(value, str):
                raise BadRecord(f"field '{name}' must be a string, got {type(value).__name__}")
            if not value.strip():
                raise BadRecord(f"field '{name}' is empty")
            return value
    raise BadRecord(f"missing field '{names[0]}'" + (f" (or '{names[1]}')" if len(names) > 1 else ""))


def pair_record(obj: object, source: str, line: int) -> Record:
    """One embedding record; a BadRecord says why the object cannot be one."""
    if isinstance(obj, BadRecord):
        raise obj
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    rec = Record(source=source, line=line, kind="pair", raw=obj)
    rec.query, rec.positive = _text(obj, "query", "sentence1"), _text(obj, "positive", "sentence2")
    if "score" in obj:
        score = obj["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise BadRecord(f"field 'score' must be a finite number, got {score!r}")
        rec.kind, rec.fields = "scored", {"score": float(score)}
        return rec
    negative = obj.get("negative")
    negatives = [] if negative is None else negative if isinstance(negative, list) else [negative]
    for text in negatives:
        if not isinstance(text, str) or not text.strip():
            raise BadRecord(f"field 'negative' must be a non-empty string or a list of them, got {text!r}")
    if rec.positive in negatives:
        raise BadRecord("the positive is also a negative")
    rec.negative = negatives
    return rec


def read_pairs(path: str, columns: dict[str, str], bad: list[Rejected], summary: DataSummary,
               advance: Callable[[int], None] = lambda n: None):
    """Good records of a file in chunks; each bad one is filed with its line and reason."""
    def records():
        for line, obj in iter_rows(path, advance):
            try:
                yield pair_record(apply_mapping(obj, columns, {}), str(path), line)
            except BadRecord as err:
                bad.append(Rejected(str(path), line, str(err), None if isinstance(obj, BadRecord) else obj))
                summary.count(str(path), "bad_record")
            summary.count(str(path), "records")

    yield from chunks(records(), CHUNK)


def read_corpus(path: str) -> list[str]:
    """Extra documents for the retrieval evaluation: records with a "text" field (or plain strings)."""
    texts = []
    for line, obj in iter_rows(path):
        text = obj.get("text") if isinstance(obj, dict) else obj
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{line}: a corpus record needs a non-empty \"text\" field; fix embedding.corpus")
        texts.append(text)
    return texts


def prepare_pairs(cfg: Config, tokenizer) -> PairData:
    """Read, check and split the embedding data of a config; queries tokenized for the summary."""
    hashes = file_hashes(cfg)
    corpus_path = cfg.embedding.corpus
    if corpus_path:
        if not Path(corpus_path).is_file():
            raise DataError(f"embedding.corpus: {corpus_path} not found")
        hashes[corpus_path] = sha256_file(corpus_path)
    bad: list[Rejected] = []
    summary = DataSummary()
    train, validation = TokenizedBuilder(keep_records=True), TokenizedBuilder(keep_records=True)
    split = cfg.validation.split if cfg.validation else None
    kinds: dict[str, Record] = {}

    def add(records: list[Record], out: TokenizedBuilder) -> None:
        if not records:
            return
        ids = tokenizer([r.query for r in records], truncation=True, max_length=cfg.max_seq_len)["input_ids"]
        for rec, row in zip(records, ids):
            kinds.setdefault(rec.kind, rec)
            if len(kinds) > 1:
                other = next(r for k, r in kinds.items() if k != rec.kind)
                raise DataError(f"{rec.where}: a {rec.kind} record, but {other.where} is a {other.kind} record; "
                                "train contrastive (query, positive[, negative]) or scored pairs, not both")
            out.add(row, row, rec)
            summary.count(rec.source, "kept")
            summary.lengths.append(len(row))

    sizes = []
    with files_progress("Preparing", data_paths(cfg)) as advance:
        for k, ds in enumerate(cfg.datasets):
            before = len(train)
            for c, chunk in enumerate(read_pairs(ds.path, ds.columns, bad, summary, advance)):
                if split:
                    chunk, held = _split_chunk(chunk, split, cfg.seed, k, c)
                    add(held, validation)
                add(chunk, train)
            sizes.append(len(train) - before)
        if cfg.validation and cfg.validation.path:
            for chunk in read_pairs(cfg.validation.path, cfg.validation.columns, bad, summary, advance):
                add(chunk, validation)
    total = sum(c["records"] for c in summary.per_file.values())
    _check_bad(bad, total, cfg)
    if not len(train):
        raise DataError("no training example is left after the checks; see <output_dir>/rejected.jsonl")
    weights = effective_weights(sizes, [ds.weight for ds in cfg.datasets], [ds.ratio for ds in cfg.datasets])
    return PairData(train.build(), validation.build(), sizes, weights, bad, summary, None, hashes,
                    scored="scored" in kinds, corpus=read_corpus(corpus_path) if corpus_path else [])
