"""Raw text into token shards, and fixed-length blocks read back from them (method: pretrain).

Documents are streamed from `.txt` (separated by blank lines), JSONL (a `text` field a line) and
Parquet (a `text` column), tokenized once and appended, each followed by EOS, to flat uint16/uint32
files of `shard_tokens` tokens. A manifest records the shards, the documents, the dtype and the data
hash. Memory stays flat in corpus size: nothing holds more than one batch of documents or one shard.

Blocks are `max_seq_len + 1` tokens starting every `max_seq_len` tokens, so every token after the
first is predicted exactly once per epoch; block i is a pure function of i, which is what lets the
loop's cursor (epoch, micro-batch) resume at the exact block on any number of processes.

A file given a `weight` or a `ratio` (a replay share of general text) is tokenized into a stream of
its own; `MixedBlocks` numbers the streams' blocks one after another, and the epoch order
(data/batching.epoch_order, a function of the seed and the epoch) draws each stream's share of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from tuneforge.data.formats import Record
from tuneforge.data.progress import files_progress
from tuneforge.data.tokenized import Example
from tuneforge.errors import DataError

SHARDS_VERSION = 3
ENCODE_BATCH = 256  # documents tokenized together


@dataclass(frozen=True)
class BadDocument:
    """A document that cannot be trained: where it starts (line and byte offset) and why."""

    source: str
    line: int
    offset: int
    reason: str

    def __str__(self) -> str:  # a Parquet row has no byte offset (-1): its row number is the line
        where = f" (byte {self.offset})" if self.offset >= 0 else ""
        return f"{self.source}:{self.line}{where}: {self.reason}"


OnBad = Callable[[BadDocument], None]


def _decoded(raw: bytes, source: str, line: int, offset: int, on_bad: OnBad) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        on_bad(BadDocument(source, line, offset + err.start, f"invalid UTF-8 (byte 0x{raw[err.start]:02x}); "
                           "re-encode the file as UTF-8 or remove the bytes"))
        return None


def _txt(path: Path, on_bad: OnBad) -> Iterator[tuple[int, str]]:
    """Documents of a text file: runs of lines separated by one or more blank lines."""
    lines: list[bytes] = []
    start = (1, 0)
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                if not lines:
                    start = (n, offset)
                lines.append(raw)
            elif lines:
                text = _decoded(b"".join(lines).rstrip(b"\r\n"), str(path), *start, on_bad)
                if text is not None:
                    yield start[0], text
                lines = []
            offset += len(raw)
    if lines:
        text = _decoded(b"".join(lines).rstrip(b"\r\n"), str(path), *start, on_bad)
        if text is not None:
            yield start[0], text


def _jsonl(path: Path, field: str, on_bad: OnBad) -> Iterator[tuple[int, str]]:
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            here, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            line = _decoded(raw, str(path), n, here, on_bad)
            if line is None:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                on_bad(BadDocument(str(path), n, here, f"not JSON: {err.msg}"))
                continue
            text = obj.get(field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                on_bad(BadDocument(str(path), n, here, f"no string field {field!r} (set pretrain.text_field)"))
            elif not text.strip():
                on_bad(BadDocument(str(path), n, here, "empty document"))
            else:
                yield n, text


def _parquet(path: Path, field: str, on_bad: OnBad) -> Iterator[tuple[int, str]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                        "set pretrain.text_field")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str) or not text.strip():
                on_bad(BadDocument(str(path), row, -1, "empty document"))
            else:
                yield row, text


def iter_documents(path: str | Path, on_bad: OnBad, field: str = "text") -> Iterator[str]:
    """The documents of one raw-text file, streamed; each bad one goes to `on_bad` with its file, line and byte."""
    return (text for _, text in located_documents(path, on_bad, field))


def located_documents(path: str | Path, on_bad: OnBad, field: str = "text") -> Iterator[tuple[int, str]]:
    """(line where it starts, document) of one raw-text file (a Parquet row's number is its line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (raw text: .txt, .jsonl or .parquet)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _txt(path, on_bad)
    if suffix == ".parquet":
        return _parquet(path, field, on_bad)
    return _jsonl(path, field, on_bad)


class _ShardWriter:
    """Appends token ids to fixed-size shard files and document starts to one index file."""

    def __init__(self, folder: Path, prefix: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.prefix, self.dtype, self.shard_tokens = folder, prefix, dtype, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.tokens = 0
        self.documents = 0
        self.bytes = 0
        self.starts = open(folder / f"{prefix}.docs.bin", "wb")

    def add(self, ids: list[int], n_bytes: int) -> None:
        np.asarray([self.tokens], dtype=np.uint64).tofile(self.starts)
        arr = np.asarray(ids, dtype=self.dtype)
        self.buffer.append(arr)
        self.buffered += len(arr)
        self.tokens += len(arr)
        self.documents += 1
        self.bytes += n_bytes
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        flat = np.concatenate(self.buffer)
        name = f"{self.prefix}.{len(self.shards):05d}.bin"
        flat[:n].tofile(self.folder / name)
        self.shards.append({"file": name, "tokens": int(n)})
        rest = flat[n:]
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)

    def close(self) -> dict:
        if self.buffered:
            self._flush(self.buffered)
        self.starts.close()
        return {"name": self.prefix, "shards": self.shards, "tokens": self.tokens, "documents": self.documents,
                "text_bytes": self.bytes}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def stream_name(stream: int) -> str:
    """The file prefix of training stream `stream`: train, train1, train2, ..."""
    return f"train{stream or ''}"


def write_shards(folder: Path, sources: list[tuple[str, bool]], tokenizer, split: float | None, seed: int,
                 field: str, shard_tokens: int, on_bad: OnBad, streams: list[int] | None = None,
                 advance: Callable[[int], None] = lambda n: None) -> dict:
    """Tokenize every document of `sources` ((path, is validation file)) into train / validation shards;
    `streams` (one per source, default all 0) puts a training file's documents into a stream of its own.
    `advance(n)` hears of each n bytes of the files done (text bytes as they go, the rest at each file's end).

    With `split`, each training document goes to validation with that probability, drawn from a
    generator seeded by `seed`, so the split is a pure function of the corpus and the seed."""
    dtype = token_dtype(len(tokenizer))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, which separates documents in the token stream")
    streams = streams or [0] * len(sources)
    names = ["validation", *(stream_name(k) for k in range(max(streams) + 1))]
    writers = {name: _ShardWriter(folder, name, dtype, shard_tokens) for name in names}
    rng = random.Random(seed)
    files = {}
    for (path, held), stream in zip(sources, streams):
        docs = iter_documents(path, on_bad, field)
        count = files.setdefault(path, {"documents": 0, "tokens": 0})
        size, done = Path(path).stat().st_size, 0
        while batch := [d for _, d in zip(range(ENCODE_BATCH), docs)]:
            encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
            for text, ids in zip(batch, encoded):
                to_validation = held or (split is not None and rng.random() < split)
                n_bytes = len(text.encode("utf-8"))
                writers["validation" if to_validation else stream_name(stream)].add(ids + [eos], n_bytes)
                count["documents"] += 1
                count["tokens"] += len(ids) + 1
                step = min(n_bytes, size - done)
                done += step
                advance(step)
        advance(size - done)
    parts = {name: w.close() for name, w in writers.items()}  # "train" is the first of "streams"
    return {"version": SHARDS_VERSION, "dtype": dtype.name, "eos": eos, "files": files, "train": parts["train"],
            "validation": parts["validation"], "streams": [parts[name] for name in names[1:]]}


def _tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def shards_key(file_hashes: dict[str, str], tokenizer, settings: dict) -> str:
    """Everything that changes the shards: the files' bytes, the tokenizer and the split settings."""
    payload = {"v": SHARDS_VERSION, "files": file_hashes, "tokenizer": _tokenizer_hash(tokenizer), **settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def build_shards(folder: Path, sources: list[tuple[str, bool]], tokenizer, file_hashes: dict[str, str],
                 settings: dict, on_bad_record: str) -> dict:
    """The manifest of `folder`'s shards, tokenizing the corpus into it first unless it is there.

    Bad documents are all collected: with on_bad_record: error the run stops listing them (file, line,
    byte offset); with skip they are counted in the manifest and handed back under `rejected`."""
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        return json.loads(manifest_path.read_text())
    bad: list[BadDocument] = []
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        with files_progress("Tokenizing", [path for path, _ in sources]) as advance:
            manifest = write_shards(tmp, sources, tokenizer, settings.get("split"), settings["seed"],
                                    settings["field"], settings["shard_tokens"], bad.append, settings.get("streams"),
                                    advance)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if bad and on_bad_record == "error":
        shutil.rmtree(tmp, ignore_errors=True)
        shown = "\n".join(f"  {b}" for b in bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(f"{len(bad)} documents cannot be used:\n{shown}\nFix them, or set on_bad_record: skip to "
                        "leave them out (each is listed in <output_dir>/rejected.jsonl).")
    manifest.update(data_sha256=file_hashes, tokenizer_sha256=_tokenizer_hash(tokenizer),
                    rejected=[b.__dict__ for b in bad])
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process wrote the same shards first
        shutil.rmtree(tmp, ignore_errors=True)
    return json.loads(manifest_path.read_text())


class BlockSet:
    """Fixed-length blocks over memory-mapped shards: block i is tokens [i x seq, i x seq + seq + 1).

    `tail`: keep the last, shorter block (validation, where every token counts); training drops it."""

    def __init__(self, folder: Path, part: dict, dtype: str, max_seq_len: int, tail: bool = False,
                 name: str = "train"):
        self.name, self.seq = name, max_seq_len
        self.maps = [np.memmap(folder / s["file"], dtype=np.dtype(dtype), mode="r") for s in part["shards"]]
        self.bounds = np.cumsum([0] + [s["tokens"] for s in part["shards"]])
        self.tokens = int(part["tokens"])
        self.text_bytes = int(part["text_bytes"])
        predicted = max(0, self.tokens - 1)
        self.n = -(-predicted // max_seq_len) if tail else predicted // max_seq_len
        self.doc_starts = np.memmap(folder / f"{name}.docs.bin", dtype=np.uint64, mode="r") \
            if part["documents"] else np.zeros(0, dtype=np.uint64)

    def __len__(self) -> int:
        return self.n

    def tokens_between(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the stream, across shard boundaries."""
        first = int(np.searchsorted(self.bounds, a, side="right")) - 1
        parts = []
        while a < b:
            lo = a - int(self.bounds[first])
            take = min(b, int(self.bounds[first + 1])) - a
            parts.append(self.maps[first][lo : lo + take])
            a += take
            first += 1
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def block(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(i)
        a = i * self.seq
        return self.tokens_between(a, min(a + self.seq + 1, self.tokens))

    def positions(self, i: int) -> np.ndarray:
        """Position ids of block i, restarting at 0 where a document starts inside it: transformers then keeps
        each document's attention to itself (a packed row), and FlashAttention runs them as varlen sequences."""
        a, n = i * self.seq, len(self.block(i))
        lo, hi = np.searchsorted(self.doc_starts, [a + 1, a + n])
        marks = np.zeros(n, dtype=np.int64)
        starts = np.asarray(self.doc_starts[lo:hi], dtype=np.int64) - a
        marks[starts] = starts
        return np.arange(n) - np.maximum.accumulate(marks)

    def __getitem__(self, i: int | slice) -> Example | list[Example]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        ids = self.block(i).tolist()
        return Example(ids, ids, Record(source=f"{self.name} block", line=i, kind="raw"))

    def __iter__(self):
        return (self[i] for i in range(self.n))

    @property
    def lengths(self) -> np.ndarray:
        out = np.full(self.n, self.seq + 1, dtype=np.int64)
        if self.n:
            out[-1] = len(self.block(self.n - 1))
        return out

    def trained_tokens(self) -> int:
        return int((self.lengths - 1).sum())


class MixedBlocks:
    """Several training streams as one index space: block i of the first stream, then of the next, ...
    Which blocks an epoch takes, and how many of each stream, is the epoch order's (dataset sizes and weights)."""

    def __init__(self, streams: list[BlockSet]):
        self.streams = streams
        self.offsets = np.cumsum([0] + [len(s) for s in streams])
        self.maps = [m for s in streams for m in s.maps]  # every training token, for the unigram baseline
        self.seq = streams[0].seq

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _at(self, i: int) -> tuple[BlockSet, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.streams[k], i - int(self.offsets[k])

    def block(self, i: int) -> np.ndarray:
        stream, j = self._at(i)
        return stream.block(j)

    def positions(self, i: int) -> np.ndarray:
        stream, j = self._at(i)
        return stream.positions(j)

    def __getitem__(self, i: int | slice) -> Example | list[Example]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        stream, j = self._at(i)
        return stream[j]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate([s.lengths for s in self.streams])

    def trained_tokens(self) -> int:
        return sum(s.trained_tokens() for s in self.streams)
