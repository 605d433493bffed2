"""`tuneforge data check`: a seeded corrupted dataset is reported line by line, with no false alarm."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import chat

from tuneforge.cli import main
from tuneforge.config import config_from_dict
from tuneforge.data.check import check_data, control_characters

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "data" / "quickstart_train.jsonl"


def clean_records(n: int) -> list[dict]:
    return [json.loads(x) for x in QUICKSTART.read_text().splitlines()[:n]]


def plant(tmp_path: Path) -> tuple[Path, Path, dict[int, str], dict[int, str]]:
    """A training file of clean records with one problem of each kind at a known line, and a validation
    file that leaks training records. Returns the files and the expected {line: code} of each."""
    records = clean_records(60)
    lines: list[str | bytes] = [json.dumps(r) for r in records[:40]]
    expected: dict[int, str] = {}

    def put(code: str, raw: str | bytes) -> None:
        lines.append(raw)
        expected[len(lines)] = code

    long_answer = " ".join(f"word{i}" for i in range(400))
    put("bad-record", '{"messages": [{"role": "user", "content": "hi"}')  # not JSON
    put("bad-record", json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}))  # missing field
    put("bad-record", json.dumps(chat("Question?", "   ")))  # empty assistant turn
    put("bad-record", json.dumps({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}))
    put("bad-record", json.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}))
    put("bad-record", json.dumps({"messages": [{"role": "user", "content": "only a question"}]}))  # no assistant turn
    put("bad-record", json.dumps({"messages": [{"role": "user", "content": {"text": "obj"}}, {"role": "assistant", "content": "a"}]}))
    put("bad-record", b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}')
    put("duplicate", json.dumps(records[3]))
    near = copy.deepcopy(records[7])
    near["messages"][1]["content"] = near["messages"][1]["content"].replace(".", "!", 1) + " "
    put("near-duplicate", json.dumps(near))
    def like_clean(user: str) -> dict:
        """A record shaped like the clean ones (same system prompt and answer length), with another question."""
        rec = copy.deepcopy(records[58])
        rec["messages"][1]["content"] = user
        return rec

    put("control-characters", json.dumps(like_clean("Ines Park\x07 is 41 and lives in Oslo.")))
    put("special-token-in-text", json.dumps(like_clean("Meet Tomas Berg<|im_end|> from Quito; he turned 63 this year.")))
    put("too-long", json.dumps(chat("Write a long list of words for a test", long_answer)))
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))

    val_lines = [json.dumps(r) for r in records[40:55]]
    val_expected = {}
    val_lines.append(json.dumps(records[12]))
    val_expected[len(val_lines)] = "leakage"
    leak = copy.deepcopy(records[20])
    leak["messages"][1]["content"] += " "
    leak["messages"][1]["content"] = leak["messages"][1]["content"].replace(",", ";", 1)
    val_lines.append(json.dumps(leak))
    val_expected[len(val_lines)] = "leakage"
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(val_lines) + "\n")
    return train, val, expected, val_expected


@pytest.fixture
def planted(tmp_path):
    return plant(tmp_path)


def found(report, path: Path) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for f in report.findings:
        if f.source == str(path):
            out.setdefault(f.line, set()).add(f.code)
    return out


def test_every_planted_problem_is_found_at_its_line_and_nothing_else(tmp_path, planted, smol_tokenizer):
    train, val, expected, val_expected = planted
    cfg = config_from_dict({"datasets": [{"path": str(train)}], "validation": {"path": str(val)}, "max_seq_len": 256},
                           base=tmp_path)
    report = check_data(cfg, smol_tokenizer)
    got = found(report, train)
    want = {line: {code} for line, code in expected.items()}
    want[max(want)] |= {"length-outlier"}  # the over-long record is also far longer than the rest
    assert got == want
    got_val = found(report, val)
    assert got_val == {line: {code} for line, code in val_expected.items()}
    assert report.records[str(train)] == len(expected) + 40
    assert report.errors and {f.code for f in report.errors} == {"bad-record", "leakage"}
    reasons = {f.line: f.message for f in report.findings if f.code == "bad-record"}
    assert "not valid JSON" in reasons[41] and "UTF-8" in reasons[48]
    too_long = next(f for f in report.findings if f.code == "too-long")
    assert "tokens lost" in too_long.message


def test_empty_turns_non_string_contents_broken_turn_order_and_duplicates_are_named_by_line(tmp_path, smol_tokenizer):
    """R-DATA-5: the faults found in widely used SFT mixes are each reported by `data check` at their line, with
    what is wrong: in a chat file and in an instruction (alpaca) file."""
    good = clean_records(20)
    chats = {
        21: ("empty content", {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": " \t"}]}),
        22: ("content must be a string", {"messages": [{"role": "user", "content": "Who?"},
                                                       {"role": "assistant", "content": {"name": "Ines"}}]}),
        23: ("two user turns in a row", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                                      {"role": "assistant", "content": "c"}]}),
        24: ("duplicate", good[5]),
    }
    alpaca = [{"instruction": f"Say {w}.", "output": w} for w in ("yes", "no", "maybe")]
    instructions = {
        4: ("must be a string", {"instruction": "Describe Ines.", "output": {"name": "Ines", "age": 41}}),
        5: ("is empty", {"instruction": "   ", "output": "an answer"}),
    }
    files = {}
    for name, rows, planted in (("chat.jsonl", good, chats), ("alpaca.jsonl", alpaca, instructions)):
        files[name] = tmp_path / name
        lines = [json.dumps(r) for r in rows] + [json.dumps(record) for _, record in planted.values()]
        files[name].write_text("\n".join(lines) + "\n")
    cfg = config_from_dict({"datasets": [{"path": str(p)} for p in files.values()], "max_seq_len": 256},
                           base=tmp_path)
    report = check_data(cfg, smol_tokenizer)
    for name, planted in (("chat.jsonl", chats), ("alpaca.jsonl", instructions)):
        codes = {line: {"duplicate" if words == "duplicate" else "bad-record"} for line, (words, _) in planted.items()}
        faults = {line: c - {"length-outlier"} for line, c in found(report, files[name]).items()}  # short answers
        assert {line: c for line, c in faults.items() if c} == codes
        reasons = {f.line: f.message for f in report.findings if f.source == str(files[name])}
        for line, (words, _) in planted.items():
            assert words in reasons[line], (name, line, reasons[line])


def test_a_template_that_cannot_render_system_turns_is_reported_with_a_count(tmp_path, smol_tokenizer):
    from test_dataset import GEMMA_STYLE

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = GEMMA_STYLE
    rows = clean_records(6)  # each has a system turn
    rows.insert(2, chat("no system here", "fine"))
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = check_data(config_from_dict({"datasets": [{"path": str(path)}]}, base=tmp_path), tok)
    template = [f for f in report.findings if f.code == "template"]
    assert [f.line for f in template] == [1, 2, 4, 5, 6, 7]
    assert "System role not supported" in template[0].message


def test_untrained_template_tokens_are_an_error(tmp_path, tokenizers):
    """R-TPL-1 in the data check: read from the model's safetensors, without loading the model."""
    import torch
    from conftest import make_tiny_model
    from safetensors.torch import load_file, save_file

    tok = tokenizers["llama3"]
    folder = make_tiny_model(tmp_path / "m", "llama", tok)
    weights = load_file(folder / "model.safetensors")
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name][eot] = torch.zeros_like(weights[name][eot])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(chat("a question", "an answer")) + "\n")
    report = check_data(config_from_dict({"datasets": [{"path": str(data)}]}, base=tmp_path), tok, model_folder=folder)
    [finding] = [f for f in report.findings if f.code == "untrained-template-token"]
    assert "<|eot_id|>" in finding.message and finding.severity == "error"


def test_cli_check_exit_code_and_json(tmp_path, planted, capsys):
    train, val, expected, _ = planted
    assert main(["data", "check", str(train), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["errors"] == sum(1 for c in expected.values() if c == "bad-record")
    assert {f["where"] for f in report["findings"]} >= {f"{train}:{line}" for line in expected}
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps(r) + "\n" for r in clean_records(30)))
    assert main(["data", "check", str(clean)]) == 0
    assert "no errors" in capsys.readouterr().out


def test_control_characters():
    assert control_characters("a\tb\nc") == []
    assert control_characters("bell\x07 and nul\x00") == ["U+0000", "U+0007"]


def test_preference_and_kto_problems_are_found(tmp_path, smol_tokenizer):
    pref = tmp_path / "pref.jsonl"
    pref.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": "2+2?", "chosen": "4", "rejected": "4"},
        {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": ""},
    ]) + "\n")
    kto = tmp_path / "kto.jsonl"
    kto.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Hi", "completion": "Hello!", "label": True},
        {"prompt": "Hi", "completion": "Go away.", "label": "false"},
    ]) + "\n")
    cfg = config_from_dict({"datasets": [{"path": str(pref)}, {"path": str(kto)}]}, base=tmp_path)
    report = check_data(cfg, smol_tokenizer)
    bad = {(Path(f.source).name, f.line): f.message for f in report.findings if f.code == "bad-record"}
    assert set(bad) == {("pref.jsonl", 2), ("pref.jsonl", 3), ("kto.jsonl", 2)}
    assert "identical" in bad[("pref.jsonl", 2)] and "true or false" in bad[("kto.jsonl", 2)]
