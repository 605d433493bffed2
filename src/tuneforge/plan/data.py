"""The training data as plan needs it: how many examples an epoch draws and how long they are.

Exact when `tuneforge train` or `data prepare` left a prepared-data cache for these very
settings; otherwise the first records of each file are encoded exactly as prepare encodes them
and the counts are extrapolated to the whole file, because tokenizing a large dataset takes
minutes and plan answers in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from importlib import metadata
from itertools import islice
from pathlib import Path

import numpy as np

from tuneforge.config import Config
from tuneforge.data.formats import Record
from tuneforge.methods.facts import function_at, method_facts
from tuneforge.models.resolve import cache_root
from tuneforge.plan.gguf_tokenizer import byte_level_tokenizer
from tuneforge.plan.tokenizer import file_tokenizer

PREPARE_DATA = "tuneforge.data.dataset:prepare_data"  # the chat/text preparation that the sampling below mirrors
GGUF_TOKENIZER_CLASS = "TokenizersBackend"  # what transformers names the tokenizer it builds from a byte-level GGUF
SAMPLE_RECORDS = 1000  # records encoded per dataset when there is no cache, at most
# Encoding costs ~0.6 ms a record on a small CPU: a first MIN_SAMPLE records are encoded, the rest
# only when the token count's stated error is still above TARGET_ERROR (the stand-in tokenizer of a
# model not on this machine is 10-20% off anyway).
MIN_SAMPLE = 300
TARGET_ERROR = 0.05
HASH_LIMIT = 256 * 1024**2  # hashing more data than this (to find the cache) costs more than sampling


@dataclass
class DataEstimate:
    train_examples: float  # kept training examples, before weights and ratios
    examples_per_epoch: float
    lengths: np.ndarray  # token lengths of the kept training examples read (all of them, or the sample's)
    tokens_per_epoch: float  # tokens (not padding) one epoch trains on
    trained_tokens_per_epoch: float  # of which carry a loss
    over_max_seq_len: float  # share of the records read that were longer than max_seq_len
    how: str  # what was read, in words
    exact: bool
    relative_error: float = 0.0  # of tokens_per_epoch, 95%, when counted from a sample
    classes: int = 0  # a classifier's classes in the data (its head's outputs); 0 when not known


def examples_per_epoch(sizes: list[float], weights: list[float]) -> float:
    """Examples one epoch draws, as data.batching.epoch_order draws them: whole repeats of each
    dataset and a rounded share for the fraction of its weight."""
    total = 0.0
    for size, weight in zip(sizes, weights):
        whole, frac = divmod(weight, 1.0)
        total += whole * size + round(frac * size)
    return total


def sample_error(lengths: np.ndarray) -> float:
    """95% relative error of a token total extrapolated from these sampled lengths (1.96 standard
    errors of their mean), as if the records read were a random sample of the file."""
    if lengths.size < 2 or not lengths.mean():
        return 0.0
    return float(1.96 * lengths.std(ddof=1) / (lengths.mean() * np.sqrt(lengths.size)))


def _estimate(cfg: Config, sizes: list[float], lengths_by_set: list[np.ndarray], trained: float,
              over: float, how: str, exact: bool, error: float = 0.0) -> DataEstimate:
    """Epoch totals from per-dataset sizes and (sampled) lengths, with the config's weights and ratios."""
    from tuneforge.data.dataset import effective_weights

    weights = effective_weights([int(round(n)) for n in sizes], [ds.weight for ds in cfg.datasets],
                                [ds.ratio for ds in cfg.datasets])
    means = [float(x.mean()) if x.size else 0.0 for x in lengths_by_set]
    tokens = sum(w * n * m for w, n, m in zip(weights, sizes, means))
    all_tokens = sum(n * m for n, m in zip(sizes, means))
    lengths = np.concatenate(lengths_by_set) if lengths_by_set else np.zeros(0, np.int64)
    return DataEstimate(sum(sizes), examples_per_epoch(sizes, weights), lengths, tokens,
                        trained * tokens / all_tokens if all_tokens else 0.0, over, how, exact, error)


def image_estimate(cfg: Config, positions: int) -> DataEstimate:
    """Image data: the images each dataset lists (none opened), each `positions` long (its patches and the
    class token), one trained label each."""
    from tuneforge.data.images import read_image_records

    records = [[r for r in read_image_records(ds.path, ds.columns) if hasattr(r, "image")] for ds in cfg.datasets]
    split = cfg.validation.split if cfg.validation and cfg.validation.split else 0.0
    sizes = [len(group) * (1 - split) for group in records]
    lengths = [np.full(int(n), positions, np.int64) for n in sizes]
    classes = cfg.image_classification.labels or {name for group in records for r in group for name in r.labels}
    return replace(_estimate(cfg, sizes, lengths, sum(sizes), 0.0, f"{sum(sizes):.0f} images listed", True),
                   classes=len(classes))


def _data_paths(cfg: Config) -> list[str]:
    """The training and validation files as the config names them (the prepared-data cache's keys)."""
    return [ds.path for ds in cfg.datasets] + ([cfg.validation.path] if cfg.validation and cfg.validation.path else [])


def _data_files(cfg: Config) -> list[Path]:
    return [Path(name) for name in _data_paths(cfg)]


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _file_hashes(cfg: Config) -> dict[str, str]:
    """data.dataset.file_hashes, with a file's hash remembered by its path, size and modification time
    (hashing a 130 MB file takes 0.2 s, a tenth of a cold plan); a saved folder is hashed each time."""
    from tuneforge.data.dataset import sha256_file

    table = cache_root() / "plan" / "file_hashes.json"
    try:
        known = json.loads(table.read_text())
    except (OSError, ValueError):
        known = {}
    hashes, new = {}, {}
    for name in _data_paths(cfg):
        path = Path(name)
        if not path.exists():
            continue
        if path.is_dir():
            hashes[name] = sha256_file(path)
            continue
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        hashes[name] = known.get(key) or new.setdefault(key, sha256_file(path))
    if new:
        _remember(table, new)
    return hashes


def from_cache(cfg: Config, tokenizer) -> DataEstimate | None:
    """The prepared data of exactly these settings, if a run or `data prepare` cached it."""
    from tuneforge.data.dataset import _cache_dir, _load_cache, cache_key

    if not cfg.prepare.cache or sum(_size(p) for p in _data_files(cfg)) > HASH_LIMIT:
        return None
    folder = _cache_dir(cache_key(cfg, tokenizer, _file_hashes(cfg)))
    if not (folder / "meta.json").is_file():
        return None
    data = _load_cache(folder)
    lengths = data.train.lengths
    bounds = np.cumsum([0, *data.dataset_sizes])
    per_set = [lengths[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    records = sum(c["records"] for c in data.summary.per_file.values())
    over = sum(c["over_max_seq_len"] for c in data.summary.per_file.values()) / max(records, 1)
    return _estimate(cfg, [float(n) for n in data.dataset_sizes], per_set, data.train.trained_tokens(), over,
                     f"the prepared-data cache ({len(data.train)} training examples, exact)", True)


def _records_in(path: Path, read: int, last_line: int) -> float:
    """Records in a file of which the first `read` (up to line `last_line`) were read: from the
    file's size for line-based files, from the row count of Parquet metadata, else counted."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return float(pq.ParquetFile(path).metadata.num_rows)
    if path.is_file() and suffix != ".json":
        with open(path, "rb") as f:
            consumed = sum(len(line) for line in islice(f, last_line))
        return read * path.stat().st_size / max(consumed, 1)
    from tuneforge.data.readers import iter_rows

    return float(sum(1 for _ in iter_rows(path)))


def _head(spec, limit: int) -> tuple[list[Record], int, int, bool]:
    """(usable records, records read, last line read, whether that was the whole file) of the first `limit`."""
    from tuneforge.data.dataset import read_spec

    records, read, last, whole = [], 0, 0, True
    for item in read_spec(spec):
        if read == limit:
            whole = False
            break
        read += 1
        last = item.line if isinstance(item, Record) else item[1]
        if isinstance(item, Record):
            records.append(item)
    return records, read, last, whole


def _encode_until_sure(encoder, records: list[Record], sides: list) -> int:
    """Records encoded: the first MIN_SAMPLE, then the rest only if their lengths leave the error above TARGET_ERROR."""
    first = records[:MIN_SAMPLE]
    encoder.encode(first, sides)
    if len(records) > len(first) and sample_error(sides[0].build().lengths) > TARGET_ERROR:
        encoder.encode(records[len(first):], sides)
        return len(records)
    return len(first)


def from_sample(cfg: Config, tokenizer, limit: int = SAMPLE_RECORDS) -> DataEstimate:
    """Encode the first `limit` records of each dataset as prepare does and scale to the whole file."""
    from tuneforge.data.dataset import DataSummary, _Encoder
    from tuneforge.data.tokenized import TokenizedBuilder

    summary = DataSummary()
    encoder = _Encoder(tokenizer, cfg, summary)
    split = cfg.validation.split if cfg.validation and cfg.validation.split else 0.0
    sizes, per_set, trained, read_total, partial, errors = [], [], 0.0, 0, [], []
    for ds in cfg.datasets:
        records, read, last, whole = _head(ds, limit)
        sides = [TokenizedBuilder() for _ in range(method_facts(cfg).parts)]
        if whole:
            encoder.encode(records, sides)
        else:
            used = _encode_until_sure(encoder, records, sides)
            if used < len(records):
                read, last = used, records[used - 1].line
        part = sides[0].build()  # a pair's rejected side is about as long; rows per example are in the settings
        scale = 1.0 if whole or not read else _records_in(Path(ds.path), read, last) / read
        if not whole:
            partial.append(f"{Path(ds.path).name}: first {read} of about {read * scale:,.0f} records")
            errors.append(sample_error(part.lengths))
        sizes.append(len(part) * scale * (1 - split))
        per_set.append(part.lengths)
        trained += part.trained_tokens() * scale * (1 - split)
        read_total += read
    over = sum(c["over_max_seq_len"] for c in summary.per_file.values()) / max(read_total, 1)
    error = max(errors, default=0.0)
    if partial:
        how = ("a sample, extrapolated by file size (" + "; ".join(partial) + f"): tokens +-{error:.1%} "
               "(95%, if the first records are typical of the rest)")
    else:
        how = f"all {read_total} records, tokenized now (no prepared-data cache for these settings)"
    if split:
        how += f"; validation.split {split:g} taken out by share"
    return _estimate(cfg, sizes, per_set, trained, over, how, not partial and not split, error)


def from_prepared(cfg: Config, tokenizer) -> DataEstimate:
    """A task that reads its own kind of data (its row's `prepare`, e.g. embedding pairs): prepared whole."""
    data = function_at(method_facts(cfg).prepare)(cfg, tokenizer)
    bounds = np.cumsum([0, *data.dataset_sizes])
    per_set = [data.train.lengths[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    estimate = _estimate(cfg, [float(n) for n in data.dataset_sizes], per_set, float(data.train.trained_tokens()),
                         0.0, f"all {len(data.train)} training records, prepared now", True)
    return replace(estimate, classes=len(data.labels or []))


def data_estimate(cfg: Config, tokenizer, limit: int = SAMPLE_RECORDS) -> DataEstimate:
    """From the cache when there is one for these settings, else from a sample (or, for a task with its
    own data preparation, from that preparation)."""
    if method_facts(cfg).prepare != PREPARE_DATA:
        return from_prepared(cfg, tokenizer)
    return from_cache(cfg, tokenizer) or from_sample(cfg, tokenizer, limit)


def _transformers_version() -> str:
    """Read from the package's metadata: importing transformers for it is a second of a cold plan."""
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "none"


def _tokenizer_key(folder: Path) -> str:
    """The folder's tokenizer files as they are now, and the transformers version that reads them."""
    parts = [str(folder.resolve()), _transformers_version()]
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "chat_template.jinja"):
        path = folder / name
        if path.is_file():
            st = path.stat()
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _classes_file() -> Path:
    return cache_root() / "plan" / "tokenizer_classes.json"


def _remember(path: Path, entries: dict[str, str]) -> None:
    """Add entries to a JSON table in the tuneforge cache (written whole, atomically)."""
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
        known.update(entries)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    except (OSError, ValueError):
        pass  # only speed is lost


def _remember_class(key: str, name: str) -> None:
    _remember(_classes_file(), {key: name})


def load_tokenizer_quickly(folder: Path, chat_template: str = "auto", trust_remote_code: bool = False):
    """models.load.load_tokenizer, the second time much faster. AutoTokenizer picks the tokenizer
    class from the model's configuration, which imports torch: 1.2 of plan's 2 seconds. The class
    it picked for this folder is remembered (in the tuneforge cache, keyed by the tokenizer files
    and the transformers version), and later loads name that class directly."""
    import transformers

    from tuneforge.data.template import resolve_chat_template

    key = _tokenizer_key(folder)
    try:
        name = json.loads(_classes_file().read_text()).get(key)
    except (OSError, ValueError):
        name = None
    cls = getattr(transformers, name, None) if isinstance(name, str) and not trust_remote_code else None
    if cls is not None:
        try:
            tokenizer = cls.from_pretrained(str(folder))
        except Exception:  # the ordinary loader below says what is wrong
            tokenizer = None
        if tokenizer is not None and getattr(tokenizer, "is_fast", False):
            if chat_template != "auto" or tokenizer.chat_template:
                tokenizer.chat_template = resolve_chat_template(tokenizer, chat_template)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            return tokenizer
    from tuneforge.models.load import load_tokenizer

    tokenizer = load_tokenizer(folder, chat_template, trust_remote_code)
    name = type(tokenizer).__name__
    if not trust_remote_code and getattr(transformers, name, None) is type(tokenizer):
        _remember_class(key, name)
    return tokenizer


def counting_tokenizer(folder: Path, cfg: Config):
    """The tokenizer plan counts with. For chat and text records (data.dataset's preparation, sampled
    above) it is read from tokenizer.json without transformers where the folder has one (importing
    transformers is over a second of a cold plan); a task's own preparation gets load_tokenizer_quickly's."""
    if method_facts(cfg).prepare == PREPARE_DATA and not cfg.trust_remote_code:
        tokenizer = file_tokenizer(folder, cfg.chat_template)
        if tokenizer is not None:
            return tokenizer
    return load_tokenizer_quickly(folder, cfg.chat_template, cfg.trust_remote_code)


def _tokenizer_from_gguf(gguf: Path):
    """The tokenizer AutoTokenizer builds from a .gguf, built from its tokenizer metadata alone: 3 s
    instead of 12 on a 2-core machine, because AutoTokenizer also reads every tensor's header and the
    model's configuration. Transformers without that metadata reader take the AutoTokenizer path."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    from transformers import PreTrainedTokenizerFast

    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(gguf))
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def _write_tokenizer_folder(folder: Path, tokenizer, config: dict, chat_template: str | None) -> None:
    """A tokenizer folder as transformers saves one (tokenizer.json, tokenizer_config.json, the template)."""
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"backend": "tokenizers", "tokenizer_class": GGUF_TOKENIZER_CLASS, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template)


def gguf_tokenizer_folder(gguf: Path) -> Path:
    """A folder holding the tokenizer of a .gguf file, written the first time (by plan.gguf_tokenizer for
    a byte-level BPE like the built-in model's, in a fraction of a second; by transformers otherwise),
    then read like any other. Keyed by the file's path, size and time and the transformers version."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_transformers_version()}".encode())
    folder = cache_root() / "plan" / "gguf-tokenizers" / key.hexdigest()[:24]
    if not (folder / "tokenizer.json").is_file():
        tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        built = byte_level_tokenizer(gguf)
        if built is not None:
            _write_tokenizer_folder(tmp, *built)
            name = GGUF_TOKENIZER_CLASS
        else:
            tokenizer = _tokenizer_from_gguf(gguf)
            tokenizer.save_pretrained(tmp)
            name = type(tokenizer).__name__
        try:
            os.replace(tmp, folder)
        except OSError:  # written meanwhile by another process
            pass
        # The folder's tokenizer_config.json names this class, so AutoTokenizer would pick it: the
        # first load from the folder can skip AutoTokenizer's lookup (and its torch import) too.
        _remember_class(_tokenizer_key(folder), name)
    return folder
