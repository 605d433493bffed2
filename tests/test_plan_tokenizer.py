"""plan counts tokens without transformers (plan.tokenizer): the counts must be those training gets from
transformers' tokenizer, on chat data through each family's template, on text data, and the cache key too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import chat, make_tokenizer, write_jsonl
from tuneforge.config import config_from_dict
from tuneforge.data.dataset import _tokenizer_fingerprint
from tuneforge.models.load import load_tokenizer
from tuneforge.plan.data import data_estimate
from tuneforge.plan.tokenizer import file_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def _chats() -> list[dict]:
    return [
        chat("Who lives in Lisbon?", "Mei Haddad, 18, lives in Lisbon."),
        chat("  Spaces around  ", "\n\nan answer ünïcödé 日本語 <|im_end|> inside\n", system="Answer briefly."),
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6 ."}]},
    ]


@pytest.mark.parametrize("style", ["smol", "qwen", "llama3"])
def test_plan_counts_the_tokens_transformers_counts(builtin_folder, style, tmp_path):
    folder = tmp_path / style
    make_tokenizer(builtin_folder, style).save_pretrained(folder)
    ordinary, light = load_tokenizer(folder), file_tokenizer(folder)
    assert light is not None
    chats = write_jsonl(tmp_path / "chats.jsonl", _chats())
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "A plain document.\nSecond line ünïcödé."}] * 3)
    for path in (chats, text, ROOT / "examples/data/quickstart_train.jsonl"):
        cfg = config_from_dict({"base_model": str(folder), "datasets": [{"path": str(path)}], "max_seq_len": 256})
        want, got = data_estimate(cfg, ordinary), data_estimate(cfg, light)
        assert np.array_equal(got.lengths, want.lengths) and want.lengths.size
        assert got.trained_tokens_per_epoch == want.trained_tokens_per_epoch
    # The same fingerprint: a prepared-data cache that `tuneforge train` left is found by plan.
    assert _tokenizer_fingerprint(light) == _tokenizer_fingerprint(ordinary)


def test_plan_never_imports_transformers_even_on_a_fresh_machine(tmp_path):
    """Importing transformers is over a second of a cold plan on a small machine. With an empty tuneforge
    cache (a fresh machine), the built-in model's tokenizer is built from its GGUF without it too."""
    import os

    code = ("import sys; from tuneforge.cli import main; main(['plan', 'examples/quickstart.yaml']); "
            "print('transformers imported' if 'transformers' in sys.modules else 'no transformers')")
    env = {**os.environ, "TUNEFORGE_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "no transformers"
    # the quickstart's counts, as transformers' tokenizer gives them (docs/plan.md)
    assert "27,869 tokens per epoch (9,627 trained)" in " ".join(done.stdout.split())


def test_the_built_in_gguf_tokenizer_is_built_as_transformers_builds_it():
    """On a fresh machine plan builds the stand-in tokenizer from the built-in GGUF without transformers."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    from tuneforge.models.resolve import builtin_gguf
    from tuneforge.plan.gguf_tokenizer import byte_level_tokenizer

    gguf = builtin_gguf("smollm2-135m-instruct")
    tokenizer, config, template = byte_level_tokenizer(gguf)
    architecture, tokenizer_dict, want_config = get_gguf_tokenizer(str(gguf))
    want, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    assert tokenizer.to_str() == want.to_str()
    assert config == {k: want_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    assert template == want_config["chat_template"]


def test_plan_remembers_a_files_hash_until_the_file_changes(tmp_path, monkeypatch):
    """plan finds the prepared-data cache by the files' hashes: remembered, they must still change with the file."""
    from tuneforge.data.dataset import file_hashes
    from tuneforge.plan.data import _file_hashes

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", _chats())
    cfg = config_from_dict({"datasets": [{"path": str(data)}], "validation": {"path": str(data)}})
    assert _file_hashes(cfg) == _file_hashes(cfg) == file_hashes(cfg)
    write_jsonl(data, _chats()[:1])
    assert _file_hashes(cfg) == file_hashes(cfg)
