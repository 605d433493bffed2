"""Pre-training from scratch, then SFT in the same config: the trained tokenizer carries a chat template and its
turn tokens from the start, so the SFT stage trains the same embedding matrix and final/ chats in plain transformers."""

from __future__ import annotations

import json

import torch

from tuneforge.config import config_from_dict
from tuneforge.data.bpe import END_OF_TEXT, TURN_TOKENS
from tuneforge.track.console import Reporter
from tuneforge.train.stages import train_chain

CHATS = [("Who had the kite?", "Tom had the kite."), ("Who lost the ball?", "Anna lost the ball.")]


def test_pretrain_then_sft_chats_in_plain_transformers(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    stories = [f"{who} had a {what}. One day the {what} was lost; {who} was sad. Then {who} found the {what}."
               for who in ("Tom", "Anna", "Ben") for what in ("ball", "kite", "cake")]
    (tmp_path / "corpus.txt").write_text("\n\n".join(stories * 3) + "\n")
    with open(tmp_path / "chat.jsonl", "w") as f:
        for q, a in CHATS:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    cfg = config_from_dict({
        "base_model": "llama", "init": "random", "adapter": "full", "method": "pretrain",
        "architecture": {"depth": 1}, "tokenizer": {"train": {"vocab_size": 320}},
        "datasets": [{"path": "corpus.txt"}], "max_seq_len": 32, "micro_batch_size": 4, "max_steps": 8,
        "learning_rate": 3e-3, "warmup_steps": 1, "output_dir": "chain", "device": "cpu", "precision": "fp32",
        "evaluation": {"before_after": False},
        "stages": [{"method": "pretrain"},
                   {"method": "sft", "datasets": [{"path": "chat.jsonl"}], "max_steps": 40, "micro_batch_size": 2}],
    }, base=tmp_path)
    chain = train_chain(cfg, tmp_path, reporter=Reporter(quiet=True))
    assert [s["method"] for s in chain["stages"]] == ["pretrain", "sft"]

    first, final = tmp_path / "chain" / "1-pretrain" / "final", tmp_path / "chain" / "2-sft" / "final"
    tok = AutoTokenizer.from_pretrained(str(final))
    assert tok.convert_tokens_to_ids([END_OF_TEXT, *TURN_TOKENS]) == [0, 1, 2]  # born with the tokenizer
    model = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    pretrained = AutoModelForCausalLM.from_pretrained(str(first))
    assert model.get_input_embeddings().weight.shape == pretrained.get_input_embeddings().weight.shape  # no resize
    stop = model.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in (stop if isinstance(stop, list) else [stop])
    for q, a in CHATS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
        assert tok.decode(out) == a + "<|im_end|>"  # the trained answer, closed by the template's end of turn
