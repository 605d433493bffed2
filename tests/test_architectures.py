"""Every supported architecture takes a LoRA on all linear layers, trains, and reloads in PEFT."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from test_train import QUIET, make_cfg

from tuneforge.train.loop import train


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma"])
def test_lora_trains_and_reloads(tmp_path, tokenizers, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model(tmp_path / arch, arch, tokenizers["smol"])
    cfg = make_cfg(tmp_path, model_dir, max_steps=3, learning_rate=2e-2,
                   **{"lora.dropout": 0.0, "evaluation.before_after": False})
    train(cfg, reporter=QUIET)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(tmp_path / "run" / "final")).eval()
        after = tuned(input_ids=ids).logits
    targeted = {n.split(".")[-1] for n, _ in tuned.named_modules() if n.endswith(("_proj",)) and hasattr(_, "lora_A")}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (after - before).abs().max() > 1e-4
