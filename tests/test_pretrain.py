"""method: pretrain and init: random: seeded init, token shards, exact resume, bad documents, plain-transformers final/."""

from __future__ import annotations

import io

import json
import random

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from tuneforge.config import ArchitectureSpec, config_from_dict
from tuneforge.data.dataset import prepare_data
from tuneforge.data.progress import SHOWN_FROM, byte_progress
from tuneforge.data.shards import build_shards, write_shards
from tuneforge.errors import DataError
from tuneforge.models.init import derived_sizes, model_folder, random_model, run_tokenizer
from tuneforge.track.console import Reporter
from tuneforge.track.metrics import read_metrics
from tuneforge.train.checkpoints import list_checkpoints
from tuneforge.train.loop import train

QUIET = Reporter(quiet=True)
NAMES = ["Tom", "Anna", "Ben", "Lily", "Max", "Sue"]
THINGS = ["ball", "kite", "cake", "dog", "book", "hat"]


def stories(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        who, what = r.choice(NAMES), r.choice(THINGS)
        out.append(f"{who} had a {what}. One day the {what} was lost; {who} was sad.\n"
                   f"Then {who} found the {what} under the bed. Ünïcode ok.")
    return out


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    docs = stories(120)
    (tmp_path / "a.txt").write_text("\n\n\n".join(docs[:80]) + "\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        for d in docs[80:]:
            f.write(json.dumps({"text": d}) + "\n")
    return docs


def make_cfg(tmp_path, out="run", **over):
    raw = {
        "base_model": "llama", "init": "random", "adapter": "full", "method": "pretrain",
        "architecture": {"depth": 1}, "tokenizer": {"train": {"vocab_size": 320}},
        "datasets": [{"path": str(tmp_path / "a.txt")}, {"path": str(tmp_path / "b.jsonl")}],
        "max_seq_len": 32, "micro_batch_size": 2, "grad_accum": 2, "max_steps": 6, "learning_rate": 3e-3,
        "warmup_steps": 1, "output_dir": str(tmp_path / out), "device": "cpu", "precision": "fp32",
        "pretrain": {"shard_tokens": 1024, "prompts": ["Tom had"], "sample_tokens": 4},
        "evaluation": {"before_after": False},
    }
    raw.update(over)
    return config_from_dict(raw, base=tmp_path)


def test_size_dial_derives_the_rest():
    assert derived_sizes(ArchitectureSpec(depth=4)) == {"n_layer": 4, "d_model": 256, "n_head": 2, "n_kv_head": 2,
                                                        "d_ff": 1024}
    assert derived_sizes(ArchitectureSpec(depth=4, n_head=4))["n_head"] == 4


def test_random_init_is_deterministic_by_seed(tmp_path, corpus):
    folder, _ = model_folder(make_cfg(tmp_path))
    assert not list(folder.glob("*.safetensors"))  # no weights are read: only the architecture and the recipe
    a, b = random_model(folder).state_dict(), random_model(folder).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other, _ = model_folder(make_cfg(tmp_path, seed=7))
    c = random_model(other).state_dict()
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])
    std = a["model.layers.0.self_attn.q_proj.weight"].std().item()
    residual = a["model.layers.0.self_attn.o_proj.weight"].std().item()
    assert 0.018 < std < 0.022 and abs(residual / std - 2 ** -0.5) < 0.05  # 1 layer: std / sqrt(2)


def test_shards_round_trip_to_the_original_text(tmp_path, corpus):
    cfg = make_cfg(tmp_path)
    tokenizer = run_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    blocks = data.train
    assert len(blocks.maps) > 1  # several shards, blocks crossing their boundaries
    stream = blocks.tokens_between(0, blocks.tokens)
    texts = tokenizer.decode(stream.tolist()).split(tokenizer.eos_token)
    assert texts == corpus + [""]  # every document, in order, byte for byte, each followed by EOS
    starts = np.asarray(blocks.doc_starts)
    assert len(starts) == len(corpus) and all(stream[s - 1] == tokenizer.eos_token_id for s in starts[1:])
    # Blocks of max_seq_len + 1 overlap by one token: every token after the first is predicted exactly once.
    joined = np.concatenate([blocks.block(0)] + [blocks.block(i)[1:] for i in range(1, len(blocks))])
    assert np.array_equal(joined, stream[: len(joined)]) and blocks.tokens - len(joined) < cfg.max_seq_len


def test_bad_documents_are_reported_with_file_and_byte_offset(tmp_path, corpus, smol_tokenizer):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "fine"}).encode() + b"\n"
    bad.write_bytes(good + b'{"text": "caf\xe9"}\n' + json.dumps({"text": " "}).encode() + b"\n" + good)
    settings = {"split": None, "seed": 0, "field": "text", "shard_tokens": 1024}
    with pytest.raises(DataError) as err:
        build_shards(tmp_path / "s1", [(str(bad), False)], smol_tokenizer, {}, settings, "error")
    assert f"{bad}:2 (byte {len(good) + 13}): invalid UTF-8" in str(err.value)
    assert f"{bad}:3 (byte {2 * len(good)}): empty document" in str(err.value)
    manifest = build_shards(tmp_path / "s2", [(str(bad), False)], smol_tokenizer, {}, settings, "skip")
    assert manifest["train"]["documents"] == 2 and len(manifest["rejected"]) == 2  # counted, none lost silently
    text = tmp_path / "bad.txt"
    text.write_bytes(b"first doc\n\nsecond \xff doc\n")
    with pytest.raises(DataError, match=r"bad.txt:3 \(byte 18\): invalid UTF-8"):
        build_shards(tmp_path / "s3", [(str(text), False)], smol_tokenizer, {}, settings, "error")


def test_kill_and_resume_continue_at_the_exact_block_bit_equal(tmp_path, corpus):
    over = {"save_every": 2, "keep_last": 5}
    train(make_cfg(tmp_path, out="full", **over), reporter=QUIET)
    cut = make_cfg(tmp_path, out="cut", **over)
    assert train(cut, reporter=QUIET, stop_after=3) == {"stopped_at": 3}  # as kill -9 after step 3
    train(cut, resume=True, reporter=QUIET)
    full, resumed = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, 7))
    assert [m["examples"] for m in resumed] == [m["examples"] for m in full]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]
    blocks = [b for m in full for b in m["examples"]]
    assert len(blocks) == len(set(blocks)) == 24  # within the epoch: no block repeated or skipped
    a = load_file(list_checkpoints(tmp_path / "full")[-1] / "trainable.safetensors")
    b = load_file(list_checkpoints(tmp_path / "cut")[-1] / "trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_from_scratch_final_loads_in_plain_transformers(tmp_path, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = make_cfg(tmp_path, max_steps=2, grad_accum=1, validation={"split": 0.1}, eval_every=2,
                   evaluation={"before_after": True})
    console = Console(file=io.StringIO(), width=120)  # the console's data summary and tables, as a user sees them
    manifest = train(cfg, reporter=Reporter(console))
    assert "bits per byte" in console.file.getvalue()
    assert manifest["eval_after"]["val_bpb"] < manifest["eval_before"]["val_bpb"]
    assert [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_samples" in m]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "final"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "final"))
    assert len(tokenizer) == 320 and model.config.vocab_size == 320
    ids = tokenizer("Tom had", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 or tokenizer.eos_token_id in out[0].tolist()


def test_token_bytes_add_up_to_the_text_so_bits_per_byte_compare(tmp_path, corpus, smol_tokenizer):
    from tuneforge.data.bpe import token_byte_lengths

    text = "Héllo wörld, naïve café 日本語!\n  two spaces"
    for tokenizer in (smol_tokenizer, run_tokenizer(make_cfg(tmp_path))):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert token_byte_lengths(tokenizer)[ids].sum() == len(text.encode("utf-8"))


def test_tokenizing_reports_every_byte_of_the_files_once(tmp_path, corpus, smol_tokenizer):
    """The progress of tokenizing a corpus ends at exactly its files' size (the bar reaches 100%, never beyond),
    and a log shows a line every tenth of the way."""
    sources = [(str(tmp_path / "a.txt"), False), (str(tmp_path / "b.jsonl"), True)]
    heard = []
    (tmp_path / "s").mkdir()
    write_shards(tmp_path / "s", sources, smol_tokenizer, None, 0, "text", 1024, lambda bad: None,
                 advance=heard.append)
    assert min(heard) >= 0 and sum(heard) == sum((tmp_path / n).stat().st_size for n in ("a.txt", "b.jsonl"))

    log = io.StringIO()
    with byte_progress("Tokenizing", 100 * SHOWN_FROM, Console(file=log, width=100)) as advance:
        for _ in range(400):
            advance(SHOWN_FROM // 4)
    lines = log.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == [f"{10 * k}%" for k in range(1, 11)]
    assert lines[-1] == "Tokenizing: 100% (6.25 GB of 6.25 GB)"


@pytest.mark.parametrize("over, message", [
    ({"adapter": "lora"}, "init: random trains every weight from scratch, but adapter is lora"),
    ({"init": "pretrained", "base_model": "smollm2-135m-instruct"}, "architecture and tokenizer: only used with init: random"),
])
def test_init_settings_that_cannot_work_are_refused(tmp_path, over, message):
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        make_cfg(tmp_path, **over)


def test_no_token_attends_across_a_document_boundary(tmp_path, corpus):
    from tuneforge.methods.pretrain import block_batch
    from tuneforge.fast.padding_free import model_inputs

    cfg = make_cfg(tmp_path)
    folder, _ = model_folder(cfg)
    blocks = prepare_data(cfg, run_tokenizer(cfg)).train
    model = random_model(folder).eval()
    batch = block_batch(blocks, [1])
    start = int(np.flatnonzero(batch["position_ids"][0] == 0)[1])  # a document starting inside the block
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][0, :start] = (changed["input_ids"][0, :start] + 7) % 320  # another previous document
    with torch.no_grad():
        a, b = model(**model_inputs(batch)).logits, model(**model_inputs(changed)).logits
    assert not torch.allclose(a[0, :start], b[0, :start])
    assert torch.allclose(a[0, start:], b[0, start:], atol=1e-5)


def test_a_later_stage_continues_from_the_trained_model_not_a_new_random_one(tmp_path, corpus):
    from tuneforge.train.stages import stage_configs

    cfg = make_cfg(tmp_path, stages=[{"method": "pretrain"}, {"method": "pretrain", "learning_rate": 1e-4}])
    first, second = stage_configs(cfg, tmp_path)
    assert (first.init, second.init) == ("random", "pretrained")
    assert second.architecture is None and second.tokenizer is None
