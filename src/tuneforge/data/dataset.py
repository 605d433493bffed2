"""From config to tokenized examples: read, check, split, filter, encode, apply the length policy.

Everything here runs before a model is loaded, so bad data costs seconds, not GPU time.
Files are streamed in chunks and encoded examples go into flat arrays, so memory stays bounded
by the tokens kept, not by the records read. No record is dropped without being counted and
written to rejected.jsonl with its file, line and reason. The result is cached on disk, keyed by
everything that could change it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

from jinja2 import TemplateError

from tuneforge.config import Config, DatasetSpec
from tuneforge.data.formats import Record, read_records
from tuneforge.data.progress import files_progress
from tuneforge.data.shards import BlockSet, MixedBlocks, build_shards, shards_key
from tuneforge.data.template import (
    IGNORE_INDEX,
    Encoded,
    completion_segments,
    conversation_segments,
    prompt_segments,
    response_segments,
    encode_segment_lists,
    find_end_of_turn,
    text_segments,
)
from tuneforge.data.tokenized import TokenizedBuilder, TokenizedSet
from tuneforge.errors import DataError
from tuneforge.methods.facts import function_at, method_facts

MAX_LISTED = 20
CHUNK = 2048  # records read, split and encoded together
PREPARE = "tuneforge.data.dataset:prepare_data"  # the rows whose data this module prepares and caches
RAW = "tuneforge.data.dataset:prepare_raw"  # raw text: token shards
CACHE_VERSION = 4  # 2: turns per conversation in the summary; 3: preference pairs, kto labels; 4: prompt fields

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
    train: TokenizedSet
    validation: TokenizedSet
    dataset_sizes: list[int]  # training examples per dataset, in config order (train is concatenated)
    dataset_weights: list[float]  # examples drawn per epoch / size, ratios already turned into weights
    rejected: list[Rejected]
    summary: DataSummary
    end_of_turn: str | None
    file_hashes: dict[str, str]
    from_cache: bool = False
    # Preference pairs: the rejected side, aligned with train / validation (which hold the chosen side).
    train_rejected: TokenizedSet | None = None
    validation_rejected: TokenizedSet | None = None
    # What the model's head is built with from the data (a classifier's num_labels, id2label, ...): see load_model.
    head_config: dict = field(default_factory=dict)
    labels: list[str] | None = None  # a classifier's class names, in the order of its outputs

    def arrange(self, order: list[int], micro_batch_size: int) -> list[int]:
        """An epoch's order as its micro-batches will take it; data whose batches have rules (embedding
        pairs: no text twice in a micro-batch) rearranges it, as a pure function of the order."""
        return order


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, or of every file in a folder (a saved `datasets` folder), names included."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


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


def effective_weights(sizes: list[int], weights: list[float], ratios: list[float | None]) -> list[float]:
    """Turn `ratio` (a share of each epoch) into the weight that draws that many examples."""
    free = sum(w * n for n, w, r in zip(sizes, weights, ratios) if r is None)
    total = free / (1 - sum(r for r in ratios if r is not None))
    return [w if r is None else (r * total / n if n else 0.0) for n, w, r in zip(sizes, weights, ratios)]


class _Encoder:
    """Encodes records in chunks and files each result: kept, rejected, too long or unrenderable."""

    def __init__(self, tokenizer, cfg: Config, summary: DataSummary):
        self.tokenizer, self.cfg, self.summary = tokenizer, cfg, summary
        self.facts = method_facts(cfg)
        self.left_out: list[Rejected] = []  # by policy: duplicates, too long, too short, nothing to train
        self.too_long: list[Rejected] = []
        self.unrenderable: list[Rejected] = []
        self.end_of_turn: str | None = None
        self.seen: set[bytes] = set()
        self.lsh = None

    def _parts(self, rec: Record) -> list[list[tuple[str, bool]]]:
        """The sequences a record becomes: one, or chosen and rejected for a preference pair."""
        if rec.kind not in self.facts.records:
            raise DataError(f"a {rec.kind} record, but method {self.facts.name} trains on "
                            f"{' / '.join(self.facts.records)} records; give a file of that format "
                            "or choose the method that fits the data")
        if self.end_of_turn is None and self.tokenizer.chat_template and rec.kind in ("chat", "preference", "kto", "prompt"):
            self.end_of_turn = find_end_of_turn(self.tokenizer)
        if rec.kind == "preference":
            return [response_segments(self.tokenizer, rec.prompt, rec.chosen, self.end_of_turn),
                    response_segments(self.tokenizer, rec.prompt, rec.rejected, self.end_of_turn)]
        if rec.kind == "kto":
            return [response_segments(self.tokenizer, rec.prompt, rec.completion, self.end_of_turn)]
        if rec.kind == "prompt":
            return [prompt_segments(self.tokenizer, rec.prompt, self.end_of_turn)]
        return [record_segments(self.tokenizer, rec, self.cfg.train_on_inputs, self.end_of_turn)]

    def _duplicate(self, rec: Record, text: str) -> str | None:
        """Reason to leave a record out as a repeat, under `prepare.dedupe`."""
        mode = self.cfg.prepare.dedupe
        if mode == "none":
            return None
        from tuneforge.data.dedupe import exact_key

        key = exact_key(text)
        if key in self.seen:
            return "exact duplicate of an earlier record"
        self.seen.add(key)
        if mode == "near":
            from tuneforge.data.dedupe import LSHIndex, MinHasher

            if self.lsh is None:
                self.hasher, self.lsh = MinHasher(), LSHIndex(self.cfg.prepare.near_threshold)
            sig = self.hasher.signature(text)
            match = self.lsh.query(sig)
            self.lsh.add(rec.where, sig)
            if match:
                return f"near duplicate of {match[0]}"
        return None

    def encode(self, records: list[Record], outs: list[TokenizedBuilder]) -> None:
        """Encode records into `outs`: one builder per part (a pair's chosen and rejected sides)."""
        kept, part_lists = [], []
        for rec in records:
            reason = self._duplicate(rec, record_text(rec))
            if reason:
                self.left_out.append(Rejected(rec.source, rec.line, reason, rec.raw))
                self.summary.count(rec.source, "duplicate")
                continue
            try:
                part_lists.append(self._parts(rec))
            except (TemplateError, DataError) as err:
                # e.g. a template that refuses system turns: a bad record, not a crash mid-way.
                reason = f"the chat template cannot render this record: {err}" if isinstance(err, TemplateError) else str(err)
                self.unrenderable.append(Rejected(rec.source, rec.line, reason, rec.raw))
                self.summary.count(rec.source, "bad_record")
                continue
            kept.append(rec)
        flat = encode_segment_lists(self.tokenizer, [seg for parts in part_lists for seg in parts])
        at = 0
        for rec, parts in zip(kept, part_lists):
            encoded = flat[at : at + len(parts)]
            at += len(parts)
            fitted = [self._fit(rec, ids, labels) for ids, labels in encoded]
            if any(f is None for f in fitted):
                continue
            self.summary.lengths.append(sum(len(ids) for ids, _ in fitted))
            self.summary.count(rec.source, "kept")
            if rec.kind == "chat":
                self.summary.count(rec.source, f"assistant_turns_{sum(m['role'] == 'assistant' for m in rec.messages)}")
            for out, (ids, labels) in zip(outs, fitted):
                out.add(ids, labels, rec, tag=int(bool(rec.label)))

    def _fit(self, rec: Record, ids, labels):
        """Apply the length policy and the minimum-length and something-to-train checks; None: left out."""
        cfg, summary = self.cfg, self.summary
        n = len(ids)
        if n > cfg.max_seq_len:
            summary.count(rec.source, "over_max_seq_len")
            if cfg.truncation == "error":
                self.too_long.append(Rejected(rec.source, rec.line, f"{n} tokens > max_seq_len {cfg.max_seq_len}"))
                return None
            cut = apply_length_policy(Encoded(ids, labels), cfg.max_seq_len, cfg.truncation)
            if cut is None:
                self.left_out.append(
                    Rejected(rec.source, rec.line, f"dropped: {n} tokens > max_seq_len {cfg.max_seq_len}", rec.raw))
                summary.count(rec.source, "dropped_too_long")
                return None
            summary.count(rec.source, "truncated")
            summary.count(rec.source, "tokens_cut", n - cfg.max_seq_len)
            ids, labels = cut.input_ids, cut.labels
        if cfg.prepare.min_tokens and len(ids) < cfg.prepare.min_tokens:
            self.left_out.append(Rejected(rec.source, rec.line,
                                          f"shorter than prepare.min_tokens ({len(ids)} tokens)", rec.raw))
            summary.count(rec.source, "too_short")
            return None
        # Checked after the final truncation: an example with nothing to learn is never a step.
        # A prompt for an online method has no labels by design: the model writes its answer.
        if rec.kind != "prompt" and not (labels[1:] != IGNORE_INDEX).any():
            self.left_out.append(Rejected(rec.source, rec.line, "no trained tokens left after the length policy", rec.raw))
            summary.count(rec.source, "no_trained_tokens")
            return None
        return ids, labels


def record_segments(tokenizer, rec: Record, train_on_inputs: bool = False,
                    end_of_turn: str | None = None) -> list[tuple[str, bool]]:
    """The (text, trained) pieces of a supervised record, as the model will see them."""
    if rec.kind == "chat":
        eot = end_of_turn or find_end_of_turn(tokenizer)
        return conversation_segments(tokenizer, rec.messages, eot, train_on_inputs)
    if rec.kind == "completion":
        return completion_segments(tokenizer, rec.prompt, rec.completion, train_on_inputs)
    if rec.kind == "text":
        return text_segments(tokenizer, rec.text)
    raise DataError(f"{rec.where}: {rec.kind} records are not supervised fine-tuning data; "
                    "convert them (`tuneforge data convert`) or train them with their own method")


def record_text(rec: Record) -> str:
    """The text that makes two records the same, for duplicate detection."""
    if rec.kind == "chat":
        return _flat(rec.messages)
    if rec.kind in ("completion", "kto"):
        return f"{_flat(rec.prompt)}\n{_flat(rec.completion)}"
    if rec.kind == "preference":
        return f"{_flat(rec.prompt)}\n{_flat(rec.chosen)}\n{_flat(rec.rejected)}"
    if rec.kind == "prompt":
        return _flat(rec.prompt)
    return rec.text


def _flat(value: str | list[dict]) -> str:
    return value if isinstance(value, str) else "\n".join(f"{m.get('role')}: {m.get('content') or ''}" for m in value)


def chunks(items, size: int):
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _split_chunk(records: list[Record], share: float, seed: int, dataset: int, chunk: int) -> tuple[list, list]:
    """Hold out round(share x n) records of each chunk of each file: seeded, stratified by file, streaming."""
    if len(records) < 2:
        return records, []
    rng = random.Random(f"{seed}:{dataset}:{chunk}")
    n_val = min(max(1, round(len(records) * share)), len(records) - 1)
    held = set(rng.sample(range(len(records)), n_val))
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def read_spec(spec, advance: Callable[[int], None] = lambda n: None):
    """The records of a dataset (or validation) entry of the config, with its column and role mappings."""
    return read_records(spec.path, spec.format, spec.columns, spec.roles, advance)


def good_records(spec, on_bad=None, advance: Callable[[int], None] = lambda n: None) -> Iterator[Record]:
    """The usable records of a dataset entry; each unusable one goes to on_bad(file, line, raw, reason)."""
    for item in read_spec(spec, advance):
        if isinstance(item, Record):
            yield item
        elif on_bad is not None:
            source, line, raw, reason = item
            on_bad(source, line, raw, str(reason))


def _read_chunks(spec, bad: list[Rejected], summary: DataSummary, advance: Callable[[int], None]
                 ) -> Iterator[list[Record]]:
    """Good records of a file in chunks; bad ones are filed as they are met."""
    def on_bad(source: str, line: int, raw, reason: str) -> None:
        bad.append(Rejected(source, line, reason, raw))
        summary.count(source, "records")
        summary.count(source, "bad_record")

    for chunk in chunks(good_records(spec, on_bad, advance), CHUNK):
        summary.count(spec.path, "records", len(chunk))
        yield chunk


def _check_bad(bad: list[Rejected], total: int, cfg: Config) -> None:
    """Bad records stop the run, unless on_bad_record: skip and they are few enough."""
    if not bad:
        return
    if cfg.on_bad_record == "error":
        _raise_bad(bad, total, "Fix these records, or set `on_bad_record: skip` to leave them out "
                   "(each is then written to <output_dir>/rejected.jsonl).")
    if len(bad) > cfg.max_bad_fraction * total:
        _raise_bad(bad, total, f"That is more than max_bad_fraction={cfg.max_bad_fraction} of the data: "
                   "the file is probably in another format or broken.")


def _raise_bad(rejected: list[Rejected], total: int, hint: str) -> None:
    rejected = sorted(rejected, key=lambda r: (r.source, r.line))
    shown = "\n".join(f"  {r.source}:{r.line}: {r.reason}" for r in rejected[:MAX_LISTED])
    more = f"\n  ... and {len(rejected) - MAX_LISTED} more" if len(rejected) > MAX_LISTED else ""
    raise DataError(f"{len(rejected)} of {total} records cannot be used:\n{shown}{more}\n{hint}")


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.chat_template]).encode())
    return h.hexdigest()


def cache_key(cfg: Config, tokenizer, file_hashes: dict[str, str]) -> str:
    """Everything that changes the prepared data, and nothing else."""
    settings = cfg.model_dump(mode="json", include={
        "datasets", "validation", "max_seq_len", "truncation", "train_on_inputs", "on_bad_record",
        "max_bad_fraction", "seed", "prepare", "method",
    })
    settings["prepare"].pop("cache")
    payload = {"v": CACHE_VERSION, "files": file_hashes, "tokenizer": _tokenizer_fingerprint(tokenizer),
               "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _cache_dir(key: str) -> Path:
    from tuneforge.models.resolve import cache_root

    return cache_root() / "data" / key


def _save_cache(folder: Path, data: PreparedData) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    data.train.save(tmp, "train")
    data.validation.save(tmp, "validation")
    if data.train_rejected is not None:
        data.train_rejected.save(tmp, "train_rejected")
        data.validation_rejected.save(tmp, "validation_rejected")
    write_rejected(tmp / "rejected.jsonl", data.rejected)
    meta = {"dataset_sizes": data.dataset_sizes, "dataset_weights": data.dataset_weights,
            "summary": data.summary.as_json(), "end_of_turn": data.end_of_turn, "file_hashes": data.file_hashes}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached the same data first
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cache(folder: Path) -> PreparedData:
    meta = json.loads((folder / "meta.json").read_text())
    rejected = []
    for line in (folder / "rejected.jsonl").read_text().splitlines():
        r = json.loads(line)
        rejected.append(Rejected(r["file"], r["line"], r["reason"], r["record"]))
    summary = DataSummary({k: Counter(v) for k, v in meta["summary"].items()})
    train, validation = TokenizedSet.load(folder, "train"), TokenizedSet.load(folder, "validation")
    sets = [train, validation]
    rejected_sides = None
    if (folder / "train_rejected.json").is_file():
        rejected_sides = TokenizedSet.load(folder, "train_rejected"), TokenizedSet.load(folder, "validation_rejected")
    summary.lengths = [int(n) for s in sets for n in s.lengths]
    if rejected_sides:  # a pair's length is that of both sides, as when it was prepared
        summary.lengths = [a + int(b) for a, b in zip(summary.lengths, (n for s in rejected_sides for n in s.lengths))]
    return PreparedData(train, validation, meta["dataset_sizes"], meta["dataset_weights"], rejected, summary,
                        meta["end_of_turn"], meta["file_hashes"], from_cache=True,
                        train_rejected=rejected_sides[0] if rejected_sides else None,
                        validation_rejected=rejected_sides[1] if rejected_sides else None)


def data_paths(cfg: Config) -> list[str]:
    """The training files of a config, then its validation file: what preparing or checking it reads."""
    return [ds.path for ds in cfg.datasets] + ([cfg.validation.path] if cfg.validation and cfg.validation.path else [])


def file_hashes(cfg: Config) -> dict[str, str]:
    """SHA-256 of each training and validation file of a config that exists: part of the cache key."""
    hashes = {ds.path: sha256_file(ds.path) for ds in cfg.datasets if Path(ds.path).exists()}
    if cfg.validation and cfg.validation.path and Path(cfg.validation.path).exists():
        hashes[cfg.validation.path] = sha256_file(cfg.validation.path)
    return hashes


def _streams(cfg: Config) -> tuple[list[int], list[DatasetSpec]]:
    """(training stream of each dataset entry, the entry that sets each stream's weight or ratio): entries
    without either share one stream; an entry with one (a replay share of general text) is a stream alone."""
    keys = [None if ds.weight == 1 and ds.ratio is None else k for k, ds in enumerate(cfg.datasets)]
    order = list(dict.fromkeys(keys))
    return [order.index(key) for key in keys], [cfg.datasets[keys.index(key)] for key in order]


def _shard_settings(cfg: Config) -> dict:
    held = [0] if cfg.validation and cfg.validation.path else []  # a validation file's stream is not read
    return {"split": cfg.validation.split if cfg.validation else None, "seed": cfg.seed,
            "field": cfg.pretrain.text_field, "shard_tokens": cfg.pretrain.shard_tokens,
            "validation": cfg.validation.path if cfg.validation else None, "on_bad_record": cfg.on_bad_record,
            "streams": _streams(cfg)[0] + held}


def _shards_folder(cfg: Config, tokenizer, hashes: dict[str, str]) -> Path:
    return _cache_dir("shards") / shards_key(hashes, tokenizer, _shard_settings(cfg))


def _raw_sources(cfg: Config) -> list[tuple[str, bool]]:
    held = [(cfg.validation.path, True)] if cfg.validation and cfg.validation.path else []
    return [(ds.path, False) for ds in cfg.datasets] + held


def prepare_raw(cfg: Config, tokenizer) -> PreparedData:
    """Raw text (a row whose records are "raw"): token shards in the cache, read back as fixed-length blocks."""
    hashes = file_hashes(cfg)
    folder = _shards_folder(cfg, tokenizer, hashes)
    cached = (folder / "manifest.json").is_file()
    manifest = build_shards(folder, _raw_sources(cfg), tokenizer, hashes, _shard_settings(cfg), cfg.on_bad_record)
    rejected = [Rejected(b["source"], b["line"], f"byte {b['offset']}: {b['reason']}") for b in manifest["rejected"]]
    total = sum(part["documents"] for part in manifest["streams"]) + manifest["validation"]["documents"] + len(rejected)
    if len(rejected) > cfg.max_bad_fraction * total:
        _raise_bad(rejected, total, f"more than max_bad_fraction ({cfg.max_bad_fraction}) of the documents are bad")
    streams = [BlockSet(folder, part, manifest["dtype"], cfg.max_seq_len, name=part["name"])
               for part in manifest["streams"]]
    validation = BlockSet(folder, manifest["validation"], manifest["dtype"], cfg.max_seq_len, tail=True,
                          name="validation")
    stream_of, leaders = _streams(cfg)
    for k, (stream, part) in enumerate(zip(streams, manifest["streams"])):
        if not len(stream):
            files = ", ".join(ds.path for ds, s in zip(cfg.datasets, stream_of) if s == k)
            raise DataError(f"{files}: the training text holds {part['tokens']} tokens, fewer than one block of "
                            f"max_seq_len + 1 = {cfg.max_seq_len + 1}; lower max_seq_len or add text")
    sizes = [len(s) for s in streams]
    weights = effective_weights(sizes, [ds.weight for ds in leaders], [ds.ratio for ds in leaders])
    summary = DataSummary()
    for path, count in manifest["files"].items():
        summary.count(path, "records", count["documents"])
        summary.count(path, "kept", count["documents"])
        summary.count(path, "tokens", count["tokens"])
    for r in rejected:
        summary.count(r.source, "records")
        summary.count(r.source, "bad_record")
    train = streams[0] if len(streams) == 1 else MixedBlocks(streams)
    return PreparedData(train, validation, sizes, weights, rejected, summary, None, hashes, from_cache=cached)


def prepared_marker(cfg: Config, tokenizer):
    """A check that this config's prepared data is in the cache (its content-hashed folder is complete),
    or None when caching is off or the row prepares its data another way (images are not cached): what other
    processes wait on while rank 0 prepares. Raw text always goes through its token shards."""
    prepare = method_facts(cfg).prepare
    if prepare == RAW:
        return (_shards_folder(cfg, tokenizer, file_hashes(cfg)) / "manifest.json").is_file
    if not cfg.prepare.cache or prepare != PREPARE:
        return None
    meta = _cache_dir(cache_key(cfg, tokenizer, file_hashes(cfg))) / "meta.json"
    return meta.is_file


def prepare_data(cfg: Config, tokenizer) -> PreparedData:
    """Read, check and encode the training and validation data of a config (or load it from the cache).
    A row that prepares its data another way (labels, images, raw text) names its function: it is called instead."""
    prepare = method_facts(cfg).prepare
    if prepare != PREPARE:
        return function_at(prepare)(cfg, tokenizer)
    hashes = file_hashes(cfg)
    folder = _cache_dir(cache_key(cfg, tokenizer, hashes)) if cfg.prepare.cache else None
    if folder is not None and (folder / "meta.json").is_file():
        return _load_cache(folder)

    bad: list[Rejected] = []
    summary = DataSummary()
    encoder = _Encoder(tokenizer, cfg, summary)
    split = cfg.validation.split if cfg.validation else None
    facts = method_facts(cfg)
    # An online method's rewards read the records' other fields.
    train = [TokenizedBuilder(keep_records=facts.online) for _ in range(facts.parts)]
    validation = [TokenizedBuilder(keep_records=True) for _ in range(facts.parts)]
    sizes = []
    with files_progress("Preparing", data_paths(cfg)) as advance:
        for k, ds in enumerate(cfg.datasets):
            before = len(train[0])
            for c, chunk in enumerate(_read_chunks(ds, bad, summary, advance)):
                if split:
                    chunk, held = _split_chunk(chunk, split, cfg.seed, k, c)
                    encoder.encode(held, validation)
                encoder.encode(chunk, train)
            sizes.append(len(train[0]) - before)
        if cfg.validation and cfg.validation.path:
            for chunk in _read_chunks(cfg.validation, bad, summary, advance):
                encoder.encode(chunk, validation)

    total = sum(c["records"] for c in summary.per_file.values())
    _check_bad(bad + encoder.unrenderable, total, cfg)
    rejected = bad + encoder.unrenderable + encoder.left_out
    if encoder.too_long:
        _raise_bad(encoder.too_long, total, "`truncation: error` is set; raise max_seq_len or choose "
                   "truncation: drop | truncate_right | truncate_left.")
    if not len(train[0]):
        raise DataError("no training example is left after checks and the length policy; see the counts above "
                        "and <output_dir>/rejected.jsonl")
    weights = effective_weights(sizes, [ds.weight for ds in cfg.datasets], [ds.ratio for ds in cfg.datasets])
    train_sets, validation_sets = [b.build() for b in train], [b.build() for b in validation]
    data = PreparedData(train_sets[0], validation_sets[0], sizes, weights, rejected, summary, encoder.end_of_turn,
                        hashes, train_rejected=train_sets[1] if facts.parts == 2 else None,
                        validation_rejected=validation_sets[1] if facts.parts == 2 else None)
    if folder is not None:
        _save_cache(folder, data)
    return data


def write_rejected(path: Path, rejected: list[Rejected]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rejected:
            f.write(json.dumps(r.as_json(), ensure_ascii=False, default=str) + "\n")

