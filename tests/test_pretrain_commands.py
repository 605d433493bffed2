"""`tuneforge data check|preview|stats` and `tuneforge plan` on an init: random config: the tokenizer trained, the
model sized from the architecture dial, nothing pretrained looked for."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import AutoTokenizer

from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.data.dataset import prepare_data
from tuneforge.models.init import model_folder, random_model

STORY = "{who} had a {what}. One day the {what} was lost; {who} was sad. Then {who} found the {what}."


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    docs = [STORY.format(who=w, what=t) for w in ("Tom", "Anna", "Ben", "Lily") for t in ("ball", "kite", "cake", "dog")]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    raw = {"base_model": "llama", "init": "random", "adapter": "full", "method": "pretrain",
           "architecture": {"depth": 1}, "tokenizer": {"train": {"vocab_size": 300}},
           "datasets": [{"path": "corpus.txt"}], "max_seq_len": 32, "micro_batch_size": 2, "grad_accum": 2,
           "max_steps": 5, "learning_rate": 3e-3, "output_dir": "run", "precision": "fp32"}
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path, docs


def test_data_check_reports_raw_documents_by_file_line_and_byte(project, capsys):
    root, docs = project
    assert main(["data", "check", str(root / "pretrain.yaml")]) == 0  # a clean corpus: no finding, no model needed
    (root / "corpus.txt").write_bytes(("\n\n".join(docs[:3] + [docs[0], "ends <|endoftext|> early"]) + "\n\n").encode()
                                      + b"caf\xe9 bad\n")
    capsys.readouterr()
    assert main(["data", "check", str(root / "pretrain.yaml"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    found = {(f["code"], f["line"]): f["message"] for f in report["findings"]}
    start = sum(len(d) + 2 for d in docs[:3] + [docs[0], "ends <|endoftext|> early"])
    assert found[("bad-record", 11)] == f"byte {start + 3}: invalid UTF-8 (byte 0xe9); re-encode the file as UTF-8 " \
                                        "or remove the bytes"
    assert "exact duplicate of" in found[("duplicate", 7)] and found[("duplicate", 7)].endswith("corpus.txt:1")
    assert "<|endoftext|>" in found[("special-token-in-text", 9)]
    assert report["records"] == {str(root / "corpus.txt"): 6}


def test_data_preview_shows_the_first_blocks_as_trained(project, capsys):
    root, docs = project
    assert main(["data", "preview", str(root / "pretrain.yaml"), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "train block:0: 33 tokens, 32 trained" in out and "train block:1: 33 tokens" in out
    assert "max_seq_len" not in out  # a block of max_seq_len + 1 tokens is never cut or dropped
    cfg = load_config(root / "pretrain.yaml")
    tok = AutoTokenizer.from_pretrained(str(model_folder(cfg)[0]))
    blocks = prepare_data(cfg, tok).train
    for i in range(2):  # each block whole, every token trained (inside [[ ]]), documents joined by EOS
        assert f"\n[[{tok.decode(blocks.block(i))}]]\n" in out
    assert out.count("\n[[") == 2 and out.startswith("First 2") and f"[[{docs[0][:30]}" in out
    assert "<|endoftext|>" in out


def test_data_stats_counts_blocks(project, capsys):
    root, _ = project
    assert main(["data", "stats", str(root / "pretrain.yaml"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    folder, _ = model_folder(load_config(root / "pretrain.yaml"))
    tok = AutoTokenizer.from_pretrained(str(folder))
    text = (root / "corpus.txt").read_text().strip().split("\n\n")
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in text)
    assert stats["train_examples"] == (tokens - 1) // 32  # full blocks of 33 tokens, starting every 32


def test_plan_sizes_the_random_model_and_the_token_budget(project, capsys):
    root, _ = project
    assert main(["plan", str(root / "pretrain.yaml"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    folder, _ = model_folder(load_config(root / "pretrain.yaml"))
    params = sum(p.numel() for p in random_model(folder).parameters())
    assert plan["model"]["params"] == params
    budget = plan["token_budget"]
    assert budget["compute_optimal_tokens"] == 20 * params
    assert budget["run_tokens"] == 5 * 2 * 2 * 32  # max_steps x micro_batch_size x grad_accum x max_seq_len
    cpu = next(d for d in plan["devices"] if d["device"] == "CPU")
    assert budget["devices"][-1]["hours"] == pytest.approx(20 * params / cpu["tokens_per_second"] / 3600)
    # Before the corpus exists: sized from the flags, the vocabulary asked of the tokenizer (nothing trained).
    raw = yaml.safe_load((root / "pretrain.yaml").read_text())
    del raw["datasets"]
    (root / "nodata.yaml").write_text(yaml.safe_dump(raw))
    assert main(["plan", str(root / "nodata.yaml"), "--tokens", "1000000", "--json"]) == 0
    shape = json.loads(capsys.readouterr().out)["model"]["shape"]
    assert (shape["vocab"], shape["layers"], shape["hidden"], shape["intermediate"]) == (300, 1, 64, 256)
