"""Tokenized examples stored back to back in flat arrays.

A Python list per example costs ~30 bytes a token; flat int32 arrays cost 4, which is what lets
100,000 examples of 300 tokens fit in a few hundred MB and load from the cache in a second.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from tuneforge.data.formats import Record
from tuneforge.data.template import IGNORE_INDEX


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    record: Record
    tag: int = 0

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
class TokenizedSet:
    """Examples as flat arrays; `records` is kept only where the prompts are needed again (validation)."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    source_idx: np.ndarray
    lines: np.ndarray
    sources: list[str]
    records: list[Record] | None = None
    tags: np.ndarray | None = None  # one small int per example: a kto example's label (1 desirable, 0 not)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int | slice) -> Example | list[Example]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        if self.records is not None:
            record = self.records[i]
        else:
            record = Record(source=self.sources[self.source_idx[i]], line=int(self.lines[i]), kind="")
        tag = int(self.tags[i]) if self.tags is not None else 0
        return Example(self.ids[a:b].tolist(), self.labels[a:b].tolist(), record, tag)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def trained_tokens(self) -> int:
        """Trained positions over all examples, excluding each example's first token (see Example.n_trained)."""
        if not len(self):
            return 0
        firsts = self.labels[self.offsets[:-1]]
        return int((self.labels != IGNORE_INDEX).sum() - (firsts != IGNORE_INDEX).sum())

    def save(self, folder: Path, name: str) -> None:
        save_file(
            {"ids": self.ids, "labels": self.labels, "offsets": self.offsets, "source_idx": self.source_idx,
             "lines": self.lines, **({"tags": self.tags} if self.tags is not None else {})},
            folder / f"{name}.safetensors",
        )
        meta = {"sources": self.sources}
        if self.records is not None:
            meta["records"] = [{k: v for k, v in asdict(r).items() if k != "raw"} for r in self.records]
        (folder / f"{name}.json").write_text(json.dumps(meta, ensure_ascii=False))

    @classmethod
    def load(cls, folder: Path, name: str) -> "TokenizedSet":
        arrays = load_file(folder / f"{name}.safetensors")
        meta = json.loads((folder / f"{name}.json").read_text())
        records = [Record(**r) for r in meta["records"]] if "records" in meta else None
        return cls(arrays["ids"], arrays["labels"], arrays["offsets"], arrays["source_idx"], arrays["lines"],
                   meta["sources"], records, arrays.get("tags"))


class TokenizedBuilder:
    """Collects encoded examples, then joins them into one TokenizedSet.

    Examples are joined into one array per few thousand as they arrive, so a million small
    examples cost a few hundred arrays, not a million.
    """

    FLUSH = 4096

    def __init__(self, keep_records: bool = False):
        self.keep_records = keep_records
        self._pending_ids: list[np.ndarray] = []
        self._pending_labels: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._lengths: list[int] = []
        self._source_idx: list[int] = []
        self._lines: list[int] = []
        self._records: list[Record] = []
        self._tags: list[int] = []
        self._sources: dict[str, int] = {}

    def add(self, ids: np.ndarray, labels: np.ndarray, record: Record, tag: int = 0) -> None:
        self._pending_ids.append(np.asarray(ids, dtype=np.int32))
        self._pending_labels.append(np.asarray(labels, dtype=np.int32))
        self._lengths.append(len(ids))
        self._source_idx.append(self._sources.setdefault(record.source, len(self._sources)))
        self._lines.append(record.line)
        self._tags.append(tag)
        if self.keep_records:
            self._records.append(record)
        if len(self._pending_ids) >= self.FLUSH:
            self._flush()

    def _flush(self) -> None:
        if self._pending_ids:
            self._ids.append(np.concatenate(self._pending_ids))
            self._labels.append(np.concatenate(self._pending_labels))
            self._pending_ids, self._pending_labels = [], []

    def __len__(self) -> int:
        return len(self._lengths)

    def build(self) -> TokenizedSet:
        self._flush()
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=offsets[1:])
        empty = np.zeros(0, dtype=np.int32)
        return TokenizedSet(
            np.concatenate(self._ids) if self._ids else empty,
            np.concatenate(self._labels) if self._labels else empty,
            offsets,
            np.asarray(self._source_idx, dtype=np.int32),
            np.asarray(self._lines, dtype=np.int64),
            list(self._sources),
            list(self._records) if self.keep_records else None,
            np.asarray(self._tags, dtype=np.int8) if any(self._tags) else None,
        )
