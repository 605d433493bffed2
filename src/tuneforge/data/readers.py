"""Read a data file as (number, object) pairs: the one place training files are opened.

JSONL, CSV, Parquet and Arrow are read a line or a batch at a time, so a large file costs bounded
memory; a .json document is parsed whole, as JSON cannot be split without a streaming parser.
Every object keeps the number a user can find it by: the line in a text file, the record or row
(from 1) otherwise. A row that cannot be parsed is a BadRecord in its place, so the rows after it
keep their numbers. A reader tells how far into the file it is, for the progress of long runs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

from tuneforge.data.progress import by_position, size_of
from tuneforge.errors import DataError, read_utf8

KINDS = (".jsonl (one JSON object a line; also any extension not listed here), .json, .csv, .tsv, .parquet, "
         "or a folder saved by Hugging Face datasets (save_to_disk)")
# Extensions that are certainly not JSONL: read as lines, they would be a wall of confusing bad records.
NOT_JSONL = (".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".7z", ".xlsx", ".xls", ".arrow", ".feather",
             ".pkl", ".pickle", ".npy", ".npz", ".h5", ".db", ".sqlite")
# CSV columns that hold messages: a cell there is always JSON.
JSON_COLUMNS = ("messages", "conversations")
# CSV columns that hold text or a list of messages: a cell is taken as JSON only when it parses to a
# list of messages, so a prompt like "[INST] ..." stays text.
MESSAGE_OR_TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion")
# Fields whose value is a list inside one record: {"messages": [...]} in a .json file is a record.
RECORD_LIST_FIELDS = JSON_COLUMNS + MESSAGE_OR_TEXT_COLUMNS + ("negative",)
BATCH_ROWS = 1024


class BadRecord(ValueError):
    """A record that cannot be trained on; the message is the reason."""


def iter_rows(path: str | Path, advance: Callable[[int], None] = lambda n: None
              ) -> Iterator[tuple[int, object | BadRecord]]:
    """(line or row number, parsed object) for every record of a data file or dataset folder.

    A file or folder with no record at all is a DataError once it has been read: an empty training
    file is a mistake, not a run on nothing. `advance(n)` hears of the file's bytes as they are
    consumed (a line, a CSV row, a batch of rows), all of them once the last row is read.
    """
    path = Path(path)
    at = by_position(advance, size_of(path))
    if path.is_dir():
        return _checked(path, _hf_folder(path, at), at)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (supported: {KINDS})")
    suffix = path.suffix.lower()
    if suffix in NOT_JSONL:
        raise DataError(f"{path}: cannot read {suffix} files; supported: {KINDS}")
    if suffix == ".json":
        rows = _json(path)  # parsed whole: its bytes are told at its end
    elif suffix in (".csv", ".tsv"):
        rows = _csv(path, "\t" if suffix == ".tsv" else ",", at)
    elif suffix == ".parquet":
        rows = _parquet(path, at)
    else:
        rows = _jsonl(path, at)
    return _checked(path, rows, at)


def _checked(path: Path, rows: Iterator[tuple[int, object]], at: Callable[[int | None], None]
             ) -> Iterator[tuple[int, object | BadRecord]]:
    """The rows, with a string that is not text (a lone surrogate) made a BadRecord; none at all is an error.
    At the end every byte of the file is told as read (`at(None)`)."""
    empty = True
    for n, obj in rows:
        empty = False
        where = None if isinstance(obj, BadRecord) else lone_surrogate(obj)
        if where is not None:
            obj = BadRecord(f"{where or 'the record'} holds a lone UTF-16 surrogate (an escape such as \\ud800 "
                            "without its pair), which is not text; remove it, or fix the program that wrote the file")
        yield n, obj
    at(None)
    if empty:
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines); "
                        "point the config at the file with the data")


def lone_surrogate(value: object, where: str = "") -> str | None:
    """Where in a parsed record (e.g. messages[0].content) a string holds half a surrogate pair, or None:
    valid JSON, never valid Unicode, and a TypeError in the tokenizer."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        items = [(f"a key of {where or 'the record'}", k) for k in value]
        items += [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    return next((found for place, v in items if (found := lone_surrogate(v, place)) is not None), None)


def _jsonl(path: Path, at: Callable[[int], None]) -> Iterator[tuple[int, object | BadRecord]]:
    # Binary lines split on b"\n" only: str.splitlines() also breaks at U+2028, U+0085 and others,
    # which JSON writers leave raw inside strings. Each line is decoded alone, so one bad byte
    # costs one record, not the file.
    done = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            done += len(raw)
            at(done)
            raw = raw.removesuffix(b"\n").removesuffix(b"\r")
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a BOM, as some Windows editors write
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield lineno, BadRecord(f"not valid UTF-8 at byte {err.start + 1} of the line")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                yield lineno, BadRecord(f"not valid JSON ({err.msg} at column {err.colno})")


def _json(path: Path) -> Iterator[tuple[int, object]]:
    """A list of records, or one object whose only list is the records ({"data": [...]}).

    A JSON document has no per-record lines, so records are numbered from 1 instead. The object
    form is refused when its list is a record field: {"messages": [...]} is one record, not a file.
    """
    text = read_utf8(path, DataError, "save it as UTF-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) == 1 and lists[0] not in RECORD_LIST_FIELDS:
            data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of records, or one object with a single "
                        'list of records such as {"data": [...]} (use .jsonl for one record a line)')
    yield from enumerate(data, 1)


def _decoded_lines(f: Iterable[bytes], bad_lines: dict[int, int], at: Callable[[int], None]) -> Iterator[str]:
    """Lines for the csv module, split on b"\\n" only; undecodable ones are noted by line and byte."""
    done = 0
    for lineno, raw in enumerate(f, 1):
        done += len(raw)
        at(done)
        if lineno == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad_lines[lineno] = err.start + 1
            yield raw.decode("utf-8", errors="replace")


def _csv(path: Path, delimiter: str, at: Callable[[int], None]) -> Iterator[tuple[int, object | BadRecord]]:
    # csv.reader, not DictReader: DictReader skips blank lines out of sight, and the number reported
    # is the physical line where a row starts (header = line 1), which a quoted multi-line cell
    # would otherwise shift.
    bad_lines: dict[int, int] = {}
    with open(path, "rb") as f:
        reader = csv.reader(_decoded_lines(f, bad_lines, at), delimiter=delimiter, strict=True)
        header = None
        while True:
            start = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                if reader.line_num < start:  # nothing consumed: the reader cannot go on
                    raise DataError(f"{path}:{start}: not valid CSV: {err}") from None
                hint = ""
                if "end of data" in str(err):
                    hint = " (a quote opened in this row is never closed)"
                elif "field limit" in str(err):
                    hint = " (Python's csv module refuses longer cells; use JSONL or Parquet for long records)"
                yield start, BadRecord(f"not valid CSV: {err}{hint}")
                continue
            if not any(c.strip() for c in cells):
                continue
            undecodable = [n for n in range(start, reader.line_num + 1) if n in bad_lines]
            if header is None:
                if undecodable:
                    raise DataError(f"{path}:{start}: the header is not valid UTF-8; save the file as UTF-8")
                header = [c.strip() for c in cells]
                twice = sorted({c for c in header if header.count(c) > 1})
                if twice:
                    raise DataError(f"{path}:{start}: column {twice[0]!r} appears twice in the header")
                continue
            if undecodable:
                n = undecodable[0]
                where = "" if n == start else f" (line {n} of this row)"
                yield start, BadRecord(f"not valid UTF-8 at byte {bad_lines[n]} of the line{where}")
            elif len(cells) != len(header):
                yield start, BadRecord(f"this row has {len(cells)} cells but the header has {len(header)} columns "
                                       "(an unquoted delimiter or a broken quote?)")
            else:
                yield start, _csv_row(dict(zip(header, cells)))


def _csv_row(row: dict[str, str]) -> dict | BadRecord:
    """Turn the text cells that hold structured data back into it."""
    out: dict = dict(row)
    for col, cell in row.items():
        text = cell.strip()
        if col in JSON_COLUMNS and text[:1] in ("[", "{"):
            try:
                out[col] = json.loads(text)
            except json.JSONDecodeError as err:
                return BadRecord(f"column {col!r}: not valid JSON ({err.msg} at column {err.colno} of the cell)")
        elif col in MESSAGE_OR_TEXT_COLUMNS and text.startswith("["):
            out[col] = _json_list(text, lambda m: isinstance(m, dict) and "role" in m) or cell
        elif col == "negative" and text.startswith("["):
            out[col] = _json_list(text, lambda s: isinstance(s, str)) or cell
        elif col == "label" and text.lower() in ("true", "false", "1", "0"):
            out[col] = text.lower() in ("true", "1")
    return out


def _json_list(text: str, item_ok) -> list | None:
    """The list a cell holds, or None when the cell is text that only starts like JSON."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and value and all(item_ok(v) for v in value) else None


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401  (submodules are not imported with the package)
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError(f"{path}: reading this needs pyarrow: "
                        "pip install pyarrow (or pip install tuneforge[data])") from None
    return pyarrow


def _drop_nulls(value):
    """Arrow gives every struct every field of the column's schema; a null one was absent in the source."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _batches_as_rows(batches, told: Callable[[int], None] = lambda rows: None) -> Iterator[tuple[int, dict]]:
    """Rows numbered from 1; `told(rows)` hears how many rows are done as each batch starts."""
    n = 0
    for batch in batches:
        told(n)
        for row in batch.to_pylist():
            n += 1
            yield n, _drop_nulls(row)


def _parquet(path: Path, at: Callable[[int], None]) -> Iterator[tuple[int, dict]]:
    pa = _pyarrow(path)
    try:
        pf = pa.parquet.ParquetFile(path)
    except pa.ArrowException as err:
        raise DataError(f"{path}: not a readable Parquet file: {err}") from None
    # Compressed columns have no byte offset per row: the share of rows read stands for the share of bytes.
    size, rows = path.stat().st_size, max(1, pf.metadata.num_rows)
    yield from _batches_as_rows(pf.iter_batches(batch_size=BATCH_ROWS), lambda n: at(size * n // rows))


def _hf_folder(path: Path, at: Callable[[int], None]) -> Iterator[tuple[int, dict]]:
    """A folder from `datasets`' save_to_disk: *.arrow files (IPC stream), in the order state.json lists them."""
    if (path / "dataset_dict.json").is_file():
        try:
            splits = list(json.loads((path / "dataset_dict.json").read_text())["splits"])
        except (json.JSONDecodeError, KeyError, TypeError):
            splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        example = f", e.g. {path / splits[0]}" if splits else ""
        raise DataError(f"{path}: this folder holds several splits ({', '.join(splits)}); "
                        f"point at one split's folder{example}")
    state = path / "state.json"
    if state.is_file():
        try:
            names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{state}: cannot read the list of data files (_data_files): {err}") from None
        files = [path / name for name in names]
    elif (path / "dataset_info.json").is_file():
        files = sorted(path.glob("*.arrow"))
    else:
        raise DataError(f"{path}: a folder must be one saved by Hugging Face datasets (save_to_disk: state.json, "
                        f"dataset_info.json, *.arrow); supported: {KINDS}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise DataError(f"{path}: the dataset's data files are missing: {', '.join(missing) or '*.arrow'}")
    pa = _pyarrow(path)
    yield from _batches_as_rows(_stream_batches(pa, files, at))


def _stream_batches(pa, files: list[Path], at: Callable[[int], None]):
    """The record batches of each file in turn; `at` hears of a file's bytes once it is read."""
    done = 0
    for file in files:
        with pa.memory_map(str(file)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid as err:
                raise DataError(f"{file}: not an Arrow stream file as save_to_disk writes: {err}") from None
            yield from reader
        done += file.stat().st_size
        at(done)
