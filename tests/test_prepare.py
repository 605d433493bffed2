"""Preparation: cache, dedupe and filters from the config, mixing ratios; preview, stats and prepare commands."""

from __future__ import annotations

import json

import pytest
from conftest import chat, write_jsonl

from tuneforge.cli import main
from tuneforge.config import config_from_dict
from tuneforge.data.batching import epoch_order
from tuneforge.data.dataset import prepare_data, read_spec


@pytest.fixture
def cache(tmp_path, monkeypatch, builtin_folder):
    """A fresh data cache; the converted built-in model is shared, not converted again."""
    from tuneforge.models.resolve import cache_root

    root = tmp_path / "cache"
    root.mkdir()
    (root / "models").symlink_to(cache_root() / "models")
    monkeypatch.setenv("TUNEFORGE_CACHE", str(root))
    return root


WORDS = ("river stone cloud engine garden violin copper harbor lantern meadow puzzle rocket saddle tunnel "
         "velvet walnut anchor bishop candle dragon falcon glacier hammer island jungle kettle").split()


def rows(n: int, offset: int = 0) -> list[dict]:
    """Chats that share no long runs of text, so none is a near-duplicate of another."""
    import random

    out = []
    for i in range(offset, offset + n):
        rng = random.Random(i)
        question = " ".join(rng.choice(WORDS) for _ in range(12))
        answer = " ".join(rng.choice(WORDS) for _ in range(12))
        out.append(chat(f"{question}?", f"{answer}."))
    return out


def cfg_for(tmp_path, **raw):
    return config_from_dict({"datasets": [{"path": "d.jsonl"}], "max_seq_len": 128, **raw}, base=tmp_path)


def test_second_prepare_comes_from_the_cache_with_the_same_tokens(tmp_path, cache, smol_tokenizer):
    write_jsonl(tmp_path / "d.jsonl", rows(30))
    cfg = cfg_for(tmp_path, validation={"split": 0.2})
    first = prepare_data(cfg, smol_tokenizer)
    second = prepare_data(cfg, smol_tokenizer)
    assert not first.from_cache and second.from_cache
    assert (first.train.ids == second.train.ids).all() and (first.train.labels == second.train.labels).all()
    assert [e.record.messages for e in first.validation] == [e.record.messages for e in second.validation]
    # Any change to the data or to a setting that changes the tokens misses the cache.
    assert not prepare_data(cfg_for(tmp_path, validation={"split": 0.2}, max_seq_len=64), smol_tokenizer).from_cache
    write_jsonl(tmp_path / "d.jsonl", rows(31))
    assert not prepare_data(cfg, smol_tokenizer).from_cache
    off = prepare_data(cfg_for(tmp_path, validation={"split": 0.2}, prepare={"cache": False}), smol_tokenizer)
    assert not off.from_cache


def test_exact_and_near_dedupe_leave_out_repeats_with_reasons(tmp_path, cache, smol_tokenizer):
    data = rows(10)
    data.append(data[2])
    near = json.loads(json.dumps(data[4]))
    near["messages"][0]["content"] = near["messages"][0]["content"].replace("?", "!")
    data.append(near)
    write_jsonl(tmp_path / "d.jsonl", data)
    assert len(prepare_data(cfg_for(tmp_path), smol_tokenizer).train) == 12  # off by default
    exact = prepare_data(cfg_for(tmp_path, prepare={"dedupe": "exact"}), smol_tokenizer)
    assert len(exact.train) == 11
    assert [(r.line, r.reason) for r in exact.rejected] == [(11, "exact duplicate of an earlier record")]
    nearly = prepare_data(cfg_for(tmp_path, prepare={"dedupe": "near", "near_threshold": 0.7}), smol_tokenizer)
    assert len(nearly.train) == 10
    assert [r.line for r in nearly.rejected] == [11, 12]
    assert nearly.rejected[1].reason.startswith("near duplicate of") and ":5" in nearly.rejected[1].reason


def test_min_tokens_filter(tmp_path, cache, smol_tokenizer):
    write_jsonl(tmp_path / "d.jsonl", rows(4) + [chat("Hi", "Yo")])
    lengths = prepare_data(cfg_for(tmp_path), smol_tokenizer).train.lengths
    data = prepare_data(cfg_for(tmp_path, prepare={"min_tokens": int(lengths[:4].min())}), smol_tokenizer)
    assert [r.line for r in data.rejected] == [5] and "min_tokens" in data.rejected[0].reason


def test_ratio_gives_a_fixed_share_of_each_epoch(tmp_path, cache, smol_tokenizer):
    write_jsonl(tmp_path / "task.jsonl", rows(90))
    write_jsonl(tmp_path / "general.jsonl", rows(40, offset=100))
    cfg = config_from_dict({"datasets": [{"path": "task.jsonl"}, {"path": "general.jsonl", "ratio": 0.1}]},
                           base=tmp_path)
    data = prepare_data(cfg, smol_tokenizer)
    order = epoch_order(data.dataset_sizes, data.dataset_weights, cfg.seed, 0)
    general = sum(1 for i in order if i >= 90)
    assert len(order) == 100 and general == 10


def test_ratios_must_leave_room():
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match="ratio"):
        config_from_dict({"datasets": [{"path": "a.jsonl", "ratio": 0.5}, {"path": "b.jsonl", "ratio": 0.6}]})


def test_preview_marks_trained_text_and_the_cut(tmp_path, cache, capsys):
    folder = tmp_path / ("a-folder-with-a-long-name-" * 4)  # a file:line wider than the 80 columns of a pipe
    data = write_jsonl(folder / "d.jsonl", [chat("Short question?", "Short answer."), chat("Long one", "word " * 200)])
    cfg = folder / "c.yaml"
    cfg.write_text("datasets: [{path: d.jsonl}]\nmax_seq_len: 64\ntruncation: truncate_right\n")
    assert main(["data", "preview", str(cfg), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "[[Short answer.<|im_end|>]]" in out
    assert f"{data}:1: " in out and "tokens" in out and "trained" in out
    assert "cut at max_seq_len 64: the model never sees what follows" in out
    assert "Short question?" in out and "[[Short question?" not in out


def test_stats_command_reports_and_draws(tmp_path, cache, capsys):
    write_jsonl(tmp_path / "d.jsonl", rows(20) + [chat("Long one", "word " * 200)])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("datasets: [{path: d.jsonl}]\nmax_seq_len: 64\ntruncation: truncate_right\nmicro_batch_size: 4\n")
    png = tmp_path / "h.png"
    assert main(["data", "stats", str(cfg), "--png", str(png), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 21 and stats["train_examples"] == 21
    assert stats["over_max_seq_len"]["count"] == 1 and stats["over_max_seq_len"]["tokens_cut"] > 100
    assert stats["lengths"]["max"] == 64
    assert stats["turns_per_conversation"] == {"1": 21} or stats["turns_per_conversation"] == {1: 21}
    assert 0 < stats["padding_waste"] < 1 and 0 <= stats["packing_waste"] < 1
    assert stats["tokens_per_epoch"] == stats["lengths"]["total_tokens"]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_prepare_command_writes_the_data_and_a_report(tmp_path, cache, capsys):
    write_jsonl(tmp_path / "d.jsonl", rows(10) + ["not json"] + [rows(1)[0]])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("datasets: [{path: d.jsonl}]\non_bad_record: skip\nprepare: {dedupe: exact}\n")
    assert main(["data", "prepare", str(cfg), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["train_examples"] == 10 and report["rejected"] == 2
    rejected = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in rejected) == [11, 12]
    assert (tmp_path / "out" / "train.safetensors").is_file()


def test_column_and_role_mappings_merge_over_the_format(tmp_path, cache, smol_tokenizer):
    """R-DATA-2: a partial mapping keeps the format's defaults; a mapped column the file lacks is an error."""
    write_jsonl(tmp_path / "d.jsonl", [
        {"dialog": [{"role": "human", "content": "hello"}, {"role": "bot", "content": "hi there"}], "id": 1},
    ])
    cfg = config_from_dict({"datasets": [{"path": "d.jsonl", "format": "messages", "columns": {"messages": "dialog"},
                                          "roles": {"human": "user", "bot": "assistant"}}]}, base=tmp_path)
    [rec] = list(read_spec(cfg.datasets[0]))
    assert [m["role"] for m in rec.messages] == ["user", "assistant"]
    assert len(prepare_data(cfg, smol_tokenizer).train) == 1
    bad = config_from_dict({"datasets": [{"path": "d.jsonl", "format": "messages", "columns": {"messages": "turns"}}]},
                           base=tmp_path)
    from tuneforge.errors import DataError

    with pytest.raises(DataError, match=r"d.jsonl:1: mapped column turns \(for messages\) is not in the file"):
        prepare_data(bad, smol_tokenizer)
    # sharegpt: a user mapping adds to the built-in speaker names instead of replacing them
    write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "q"}, {"from": "model", "value": "a"}]}])
    cfg = config_from_dict({"datasets": [{"path": "s.jsonl", "roles": {"model": "gpt"}}]}, base=tmp_path)
    [rec] = list(read_spec(cfg.datasets[0]))
    assert [m["role"] for m in rec.messages] == ["user", "assistant"]
