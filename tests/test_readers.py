"""Readers: every kind of data file gives its records with the line or row a user can find them by."""

from __future__ import annotations

import json
import sys
import tracemalloc

import pytest

from conftest import chat, write_jsonl
from tuneforge.data.formats import Record, read_records
from tuneforge.data.readers import BadRecord, iter_rows
from tuneforge.errors import DataError



@pytest.fixture
def pa():
    """pyarrow, for the tests of the kinds that need it (the `data` extra, part of `test`)."""
    import pyarrow
    import pyarrow.ipc
    import pyarrow.parquet

    return pyarrow


def rows(path):
    return [(n, str(obj) if isinstance(obj, BadRecord) else obj) for n, obj in iter_rows(path)]


def bad_lines(path):
    return {n: str(obj) for n, obj in iter_rows(path) if isinstance(obj, BadRecord)}


# --- JSONL -------------------------------------------------------------------------------------


def test_jsonl_lines_blank_lines_and_crlf(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\r\n\r\n   \n{"text": "b"}\n{"text": "c"}')  # no final newline
    assert rows(path) == [(1, {"text": "a"}), (4, {"text": "b"}), (5, {"text": "c"})]


def test_jsonl_is_split_on_newline_only(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a",\r"id": 1}\n{"text": "b"}\n')  # a bare CR is JSON whitespace
    assert rows(path) == [(1, {"text": "a", "id": 1}), (2, {"text": "b"})]


def test_non_utf8_line_is_a_bad_record_at_its_line_and_the_next_lines_keep_their_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n{"text": "\xc3\xa9t\xc3\xa9"}\n\n{"text": "end"}\n')
    assert rows(path) == [
        (1, {"text": "ok"}),
        (3, "not valid UTF-8 at byte 14 of the line"),  # the byte after {"text": "caf
        (4, {"text": "\u00e9t\u00e9"}),
        (6, {"text": "end"}),
    ]
    items = list(read_records(path))
    assert [r.line for r in items if isinstance(r, Record)] == [1, 4, 6]
    [(source, line, raw, reason)] = [r for r in items if not isinstance(r, Record)]
    assert (source, line, raw, str(reason)) == (str(path), 3, None, "not valid UTF-8 at byte 14 of the line")


def test_byte_order_mark_on_the_first_line_is_ignored(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(chat("q", "a")).encode() + b"\n")
    [rec] = read_records(path)
    assert isinstance(rec, Record) and rec.messages[1]["content"] == "a"


def test_any_other_extension_is_read_as_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.txt", [{"text": "a"}, "nope"])
    assert rows(path)[0] == (1, {"text": "a"})
    assert "not valid JSON" in bad_lines(path)[2]


def test_large_jsonl_is_streamed_with_bounded_memory(tmp_path):
    # 200,000 lines of ~300 bytes: ~60 MB on disk. Reading it whole would trace far more than 50 MB.
    path = tmp_path / "big.jsonl"
    line = (json.dumps({"text": "x" * 290}) + "\n").encode()
    with open(path, "wb") as f:
        for _ in range(200):
            f.write(line * 1000)
    assert path.stat().st_size > 55_000_000
    tracemalloc.start()
    try:
        n = last = 0
        for last, obj in iter_rows(path):
            n += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (n, last) == (200_000, 200_000)
    assert peak < 50_000_000, f"peak traced memory {peak / 1e6:.0f} MB"


# --- JSON --------------------------------------------------------------------------------------


def test_json_list_is_numbered_by_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    assert rows(path) == [(1, {"text": "a"}), (2, {"text": "b"})]


@pytest.mark.parametrize("doc", [
    {"data": [{"text": "a"}, {"text": "b"}]},
    {"version": "1.0", "rows": [{"text": "a"}, {"text": "b"}]},
])
def test_json_object_with_one_list_of_records(tmp_path, doc):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(doc))
    assert rows(path) == [(1, {"text": "a"}), (2, {"text": "b"})]


@pytest.mark.parametrize("doc", [
    chat("a", "b"),  # one record, not a file of them
    {"train": [{"text": "a"}], "test": [{"text": "b"}]},
    {"text": "a"},
])
def test_json_object_that_is_not_a_list_of_records(tmp_path, doc):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r'must hold a list of records, or one object with a single list'):
        list(iter_rows(path))


def test_json_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n  {"text": "a"},\n  {"text": "caf\xe9"}\n]\n')
    with pytest.raises(DataError, match=rf"{path}:3: not valid UTF-8"):
        list(iter_rows(path))


# --- CSV and TSV -------------------------------------------------------------------------------


def test_csv_rows_are_numbered_by_the_line_they_start_on(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        "prompt,completion\n"            # 1
        "p1,c1\n"                        # 2
        '"p2 line one\n'                 # 3
        'p2 line two",c2\n'              # 4
        "\n"                             # 5 blank
        'p3,"c3 ""quoted""\n'            # 6
        "\n"                             # 7 (inside the quoted cell)
        'end of c3"\n'                   # 8
        "p4,c4\n",                       # 9
        encoding="utf-8",
    )
    assert rows(path) == [
        (2, {"prompt": "p1", "completion": "c1"}),
        (3, {"prompt": "p2 line one\np2 line two", "completion": "c2"}),
        (6, {"prompt": "p3", "completion": 'c3 "quoted"\n\nend of c3'}),
        (9, {"prompt": "p4", "completion": "c4"}),
    ]
    assert [r.line for r in read_records(path)] == [2, 3, 6, 9]


def test_csv_crlf_and_byte_order_mark(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'\xef\xbb\xbftext\r\n"a\r\nb"\r\nc\r\n')
    assert rows(path) == [(2, {"text": "a\r\nb"}), (4, {"text": "c"})]


def test_tsv_uses_tabs(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("instruction\toutput\nSay, hi\tHi, you\n")
    assert rows(path) == [(2, {"instruction": "Say, hi", "output": "Hi, you"})]


def test_csv_cells_with_structured_data_are_parsed(tmp_path):
    msgs = chat("q, with comma", 'a "quoted"')["messages"]
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        import csv

        w = csv.writer(f)
        w.writerow(["messages", "id"])
        w.writerow([json.dumps(msgs), "7"])
        w.writerow(['[{"role": "user", "content": "q"}', "8"])  # broken JSON
    assert rows(path) == [
        (2, {"messages": msgs, "id": "7"}),
        (3, "column 'messages': not valid JSON (Expecting ',' delimiter at column 34 of the cell)"),
    ]
    [rec, _] = read_records(path)
    assert rec.messages == msgs


def test_csv_prompt_chosen_rejected_cells_are_messages_only_when_they_parse_as_messages(tmp_path):
    prompt = [{"role": "user", "content": "q"}]
    chosen = [{"role": "assistant", "content": "good"}]
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        import csv

        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        w.writerow([json.dumps(prompt), json.dumps(chosen), "bad"])
        w.writerow(["[INST] q [/INST]", "[1] a citation", "{not json"])
    assert rows(path) == [
        (2, {"prompt": prompt, "chosen": chosen, "rejected": "bad"}),
        (3, {"prompt": "[INST] q [/INST]", "chosen": "[1] a citation", "rejected": "{not json"}),
    ]


def test_csv_label_text_becomes_a_bool(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,label\np,c,true\np,c,FALSE\np,c,1\np,c,0\np,c,yes\n")
    assert [r["label"] for _, r in rows(path)] == [True, False, True, False, "yes"]


def test_csv_triplet_negative_list(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('query,positive,negative\nq,p,"[""n1"", ""n2""]"\nq,p,[not a list\n')
    assert [r["negative"] for _, r in rows(path)] == [["n1", "n2"], "[not a list"]


def test_csv_broken_rows_are_bad_records_and_later_rows_keep_their_lines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'text,id\n"a",1\nb,2,extra\ncaf\xe9,3\n"x"y,4\nd,5\n"never closed,6\ne,7\n')
    assert rows(path) == [
        (2, {"text": "a", "id": "1"}),
        (3, "this row has 3 cells but the header has 2 columns (an unquoted delimiter or a broken quote?)"),
        (4, "not valid UTF-8 at byte 4 of the line"),
        (5, "not valid CSV: ',' expected after '\"'"),
        (6, {"text": "d", "id": "5"}),
        (7, "not valid CSV: unexpected end of data (a quote opened in this row is never closed)"),
    ]


def test_csv_non_utf8_inside_a_multi_line_cell_names_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'text\n"one\ntw\xff"\nok\n')
    assert rows(path) == [(2, "not valid UTF-8 at byte 3 of the line (line 3 of this row)"), (4, {"text": "ok"})]


def test_csv_header_with_a_repeated_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,prompt\na,b\n")
    with pytest.raises(DataError, match=rf"{path}:1: column 'prompt' appears twice"):
        list(iter_rows(path))


# --- Parquet -----------------------------------------------------------------------------------


def test_parquet_rows_are_numbered_across_batches(tmp_path, pa):
    path = tmp_path / "d.parquet"
    pa.parquet.write_table(pa.table({"text": [f"row {i}" for i in range(1, 2501)]}), path, row_group_size=700)
    got = rows(path)
    assert len(got) == 2500
    assert all(obj == {"text": f"row {n}"} for n, obj in got)


def test_parquet_messages_with_nulls_read_as_records(tmp_path, pa):
    path = tmp_path / "d.parquet"
    call = {"type": "function", "function": {"name": "w", "arguments": "{}"}}
    msgs = [
        [{"role": "user", "content": "q", "tool_calls": None}, {"role": "assistant", "content": "a", "tool_calls": None}],
        [{"role": "user", "content": "w?", "tool_calls": None},
         {"role": "assistant", "content": None, "tool_calls": [call]},
         {"role": "tool", "content": "sun", "tool_calls": None},
         {"role": "assistant", "content": "Sunny.", "tool_calls": None}],
    ]
    pa.parquet.write_table(pa.table({"messages": msgs}), path)
    first, second = read_records(path)
    assert first.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert second.messages[1] == {"role": "assistant", "tool_calls": [call]}  # the null content is left out
    assert (first.line, second.line) == (1, 2)


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match=r"pip install pyarrow .*tuneforge\[data\]"):
        list(iter_rows(path))


def test_broken_parquet_file(tmp_path, pa):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=rf"{path}: not a readable Parquet file"):
        list(iter_rows(path))


# --- Hugging Face save_to_disk folders ---------------------------------------------------------


def write_arrow_stream(pa, path, table):
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)


def hf_folder(pa, tmp_path, shards: list[list[str]], listed: list[int] | None = None):
    """A folder as save_to_disk writes it; `listed` is the order state.json names the shards in."""
    folder = tmp_path / "ds"
    folder.mkdir()
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, texts in zip(names, shards):
        write_arrow_stream(pa, folder / name, pa.table({"text": texts}))
    order = listed if listed is not None else range(len(shards))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": names[i]} for i in order],
                                                   "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    return folder


def test_hf_folder_reads_shards_in_state_json_order(tmp_path, pa):
    folder = hf_folder(pa, tmp_path, [["c", "d", "e"], ["a", "b"]], listed=[1, 0])
    assert rows(folder) == [(1, {"text": "a"}), (2, {"text": "b"}), (3, {"text": "c"}),
                            (4, {"text": "d"}), (5, {"text": "e"})]
    assert [(r.kind, r.text, r.where) for r in read_records(folder)][0] == ("text", "a", f"{folder}:1")


def test_hf_folder_with_dataset_info_only(tmp_path, pa):
    folder = hf_folder(pa, tmp_path, [["a"], ["b"]])
    (folder / "state.json").unlink()
    assert rows(folder) == [(1, {"text": "a"}), (2, {"text": "b"})]


def test_hf_dataset_dict_folder_asks_for_one_split(tmp_path):
    folder = tmp_path / "dd"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError, match=r"several splits \(train, test\); point at one split's folder, e\.g\. .*train"):
        list(iter_rows(folder))


def test_hf_folder_missing_a_listed_shard(tmp_path, pa):
    folder = hf_folder(pa, tmp_path, [["a"], ["b"]])
    (folder / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(DataError, match="data files are missing: .*data-00001-of-00002.arrow"):
        list(iter_rows(folder))


def test_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match=r"saved by Hugging Face datasets"):
        list(iter_rows(tmp_path))


# --- paths that cannot be read -----------------------------------------------------------------


def test_missing_path_names_it_and_the_supported_kinds(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path / 'nope.csv'}: data file not found \(supported: .*\.parquet"):
        list(iter_rows(tmp_path / "nope.csv"))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match=r"cannot read \.gz files; supported: .*\.jsonl.*\.csv"):
        list(iter_rows(path))
