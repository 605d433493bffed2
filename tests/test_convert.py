"""Convert: every format to its common output shape, read back with the same content; bad records set aside."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import chat, write_jsonl
from tuneforge.data import convert
from tuneforge.data.convert import convert_file
from tuneforge.data.formats import Record, read_records
from tuneforge.errors import DataError

# Strings a careless writer would change: line separators, trailing spaces, non-ASCII, quotes.
TRICKY = "first\u2028line  \n\u00e9t\u00e9 \"quoted\"\x85 "


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def round_trip(tmp_path, src, fmt="auto"):
    """Convert `src`, read the output back and return (originals, converted-back records)."""
    originals = [r for r in read_records(src, fmt) if isinstance(r, Record)]
    counts = convert_file(src, tmp_path / "out.jsonl", fmt)
    back = list(read_records(tmp_path / "out.jsonl"))
    assert all(isinstance(r, Record) for r in back)
    assert counts == {"read": len(originals), "written": len(back), "rejected": 0}
    return originals, back


def test_chat_formats_become_messages_with_the_content_unchanged(tmp_path):
    sources = {
        "messages": [chat(TRICKY, TRICKY + "!", system="Be brief."),
                     {"messages": [{"role": "user", "content": "weather?"},
                                   {"role": "assistant", "content": "", "tool_calls": [
                                       {"type": "function", "function": {"name": "w", "arguments": "{}"}}]},
                                   {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
                                   {"role": "assistant", "content": "Sunny."}]}],
        "sharegpt": [{"system": "S", "conversations": [{"from": "human", "value": TRICKY},
                                                       {"from": "gpt", "value": "a"}]}],
        "alpaca": [{"instruction": TRICKY, "input": "in", "output": "out"}],
    }
    for fmt, rows in sources.items():
        originals, back = round_trip(tmp_path, write_jsonl(tmp_path / f"{fmt}.jsonl", rows))
        assert [r.kind for r in back] == ["chat"] * len(rows)
        assert [r.messages for r in back] == [r.messages for r in originals], fmt
    assert back[0].messages[0]["content"] == TRICKY + "\n\nin"


def test_completion_becomes_a_user_and_an_assistant_turn(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"prompt": TRICKY, "completion": " 4"}])
    _, [rec] = round_trip(tmp_path, src)
    assert rec.messages == [{"role": "user", "content": TRICKY}, {"role": "assistant", "content": " 4"}]


def test_csv_source_converts_to_messages(tmp_path):
    msgs = chat(TRICKY, "a,b\n\"c\"")["messages"]
    src = tmp_path / "d.csv"
    with open(src, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerow([json.dumps(msgs, ensure_ascii=False)])
    _, [rec] = round_trip(tmp_path, src)
    assert rec.messages == msgs


def test_parquet_source_converts_to_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": [TRICKY], "output": ["o"]}), src)
    _, [rec] = round_trip(tmp_path, src)
    assert rec.messages == [{"role": "user", "content": TRICKY}, {"role": "assistant", "content": "o"}]


def test_preference_becomes_messages(tmp_path):
    shared = [{"role": "user", "content": TRICKY}]
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"chosen": shared + [{"role": "assistant", "content": "g"}],
         "rejected": shared + [{"role": "assistant", "content": "b"}]},
    ])
    originals, back = round_trip(tmp_path, src)
    assert read_jsonl(tmp_path / "out.jsonl")[0] == {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    assert (back[1].prompt, back[1].chosen, back[1].rejected) == (originals[1].prompt, originals[1].chosen,
                                                                 originals[1].rejected)
    assert [r.kind for r in back] == ["preference", "preference"]


def test_kto_becomes_messages_and_keeps_its_label(tmp_path):
    src = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": TRICKY, "label": False}])
    _, [rec] = round_trip(tmp_path, src)
    assert (rec.kind, rec.prompt, rec.completion, rec.label) == (
        "kto", [{"role": "user", "content": "q"}], [{"role": "assistant", "content": TRICKY}], False)


@pytest.mark.parametrize("row", [
    {"query": "q", "positive": TRICKY, "negative": ["n1", "n2"]},
    {"text": TRICKY},
])
def test_triplet_and_text_are_written_as_they_are(tmp_path, row):
    src = write_jsonl(tmp_path / "d.jsonl", [dict(row, id=3)])
    round_trip(tmp_path, src)
    assert read_jsonl(tmp_path / "out.jsonl") == [row]  # the extra key is dropped, nothing else changes


def test_bad_records_go_to_the_rejected_file(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "p", "completion": "c"},
        "{broken",
        {"prompt": "p", "completion": ""},
        {"prompt": " ", "completion": "c"},  # fine as completion data, but cannot be a user turn
    ])
    dst = tmp_path / "out" / "conv.jsonl"
    assert convert_file(src, dst) == {"read": 4, "written": 1, "rejected": 3}
    assert len(read_jsonl(dst)) == 1
    rejected = read_jsonl(tmp_path / "out" / "conv.rejected.jsonl")
    assert [(r["file"], r["line"]) for r in rejected] == [(str(src), 2), (str(src), 3), (str(src), 4)]
    assert "not valid JSON" in rejected[0]["reason"] and rejected[0]["record"] is None
    assert rejected[1] == {"file": str(src), "line": 3, "reason": "field 'completion' is empty",
                           "record": {"prompt": "p", "completion": ""}}
    assert rejected[2]["reason"].startswith("an empty prompt cannot become a user turn")


def test_an_earlier_rejected_file_is_replaced(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a")])
    (tmp_path / "out.rejected.jsonl").write_text('{"old": 1}\n')
    convert_file(src, tmp_path / "out.jsonl")
    assert (tmp_path / "out.rejected.jsonl").read_text() == ""


def test_a_failed_conversion_leaves_the_old_output_and_no_temp_files(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a")])
    dst = tmp_path / "out.jsonl"
    dst.write_text("old\n")

    def broken(path, fmt):
        yield from read_records(path, fmt)
        raise DataError("disk gone")

    monkeypatch.setattr(convert, "read_records", broken)
    with pytest.raises(DataError, match="disk gone"):
        convert_file(src, dst)
    assert dst.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out.jsonl"]


def test_output_must_be_jsonl(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a")])
    with pytest.raises(DataError, match=r"out\.json: converted data is written as JSONL"):
        convert_file(src, tmp_path / "out.json")
