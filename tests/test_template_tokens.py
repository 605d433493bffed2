"""R-TPL-1: a chat template whose special tokens the base model never learned is caught before training."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from tuneforge.config import config_from_dict
from tuneforge.errors import ModelError
from tuneforge.models.load import check_template_tokens, template_special_ids, untrained_token_rows

LLAMA3_TEMPLATE_TOKENS = {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory, tokenizers):
    return make_tiny_model(tmp_path_factory.mktemp("tpl") / "llama", "llama", tokenizers["llama3"])


@pytest.fixture
def model(llama3_folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(llama3_folder))


def cfg(adapter: str):
    return config_from_dict({"datasets": [{"path": "x.jsonl"}], "adapter": adapter})


def test_template_special_ids_are_the_tokens_the_template_writes(tokenizers):
    tok = tokenizers["llama3"]
    found = template_special_ids(tok)
    assert set(found) == LLAMA3_TEMPLATE_TOKENS  # not <|end_of_text|> or <|im_start|>: the template never writes them
    assert found == {t: tok.convert_tokens_to_ids(t) for t in LLAMA3_TEMPLATE_TOKENS}
    assert set(template_special_ids(tokenizers["smol"])) == {"<|im_start|>", "<|im_end|>"}


def test_a_trained_model_has_no_untrained_template_rows(model, tokenizers):
    tok = tokenizers["llama3"]
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    assert untrained_token_rows(model, template_special_ids(tok)) == []
    check_template_tokens(model, tok, cfg("lora"))  # nothing to refuse


def _spoil(model, tok_id: int, how: str, which: tuple[str, ...]) -> None:
    with torch.no_grad():
        for name in which:
            w = (model.get_input_embeddings() if name == "input" else model.get_output_embeddings()).weight
            w[tok_id] = 0.0 if how == "zero" else w.mean(dim=0)


@pytest.mark.parametrize("how", ["zero", "mean"])
@pytest.mark.parametrize("which", [("input", "output"), ("output",)], ids=["both", "lm_head"])
def test_an_untrained_end_of_turn_row_is_named(model, tokenizers, how, which):
    tok = tokenizers["llama3"]
    _spoil(model, tok.convert_tokens_to_ids("<|eot_id|>"), how, which)
    assert untrained_token_rows(model, template_special_ids(tok)) == ["<|eot_id|>"]


@pytest.mark.parametrize("how", ["zero", "mean"])
def test_lora_is_refused_and_full_fine_tuning_allowed_with_untrained_template_tokens(model, tokenizers, how):
    tok = tokenizers["llama3"]
    _spoil(model, tok.convert_tokens_to_ids("<|eot_id|>"), how, ("input", "output"))
    with pytest.raises(ModelError) as err:
        check_template_tokens(model, tok, cfg("lora"))
    assert "<|eot_id|>" in str(err.value) and "adapter: full" in str(err.value)
    check_template_tokens(model, tok, cfg("full"))  # embeddings train, so the tokens can be learned
