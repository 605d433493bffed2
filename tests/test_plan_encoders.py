"""plan sizes encoders (BERT, RoBERTa, ModernBERT, ViT) and classifier heads as transformers builds them:
parameter counts equal the models' own, LoRA counts what PEFT trains, and memory has its parts."""

from __future__ import annotations

import json
import math

import pytest
from conftest import write_jsonl

from tuneforge.config import config_from_dict
from tuneforge.plan.model import model_info, shape_from_hf_config

IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "cls_token_id": 2, "sep_token_id": 1}


def tiny(kind: str, **over):
    from transformers import BertConfig, LlamaConfig, ModernBertConfig, RobertaConfig, ViTConfig

    sizes = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 2, **over}
    if kind == "vit":
        return ViTConfig(**{"image_size": 32, "patch_size": 8, "num_labels": 5, **sizes})
    if kind == "modernbert":
        return ModernBertConfig(**{"vocab_size": 100, **IDS, **sizes})
    if kind == "llama":
        return LlamaConfig(**{"vocab_size": 100, "num_key_value_heads": 1, "pad_token_id": 0, **sizes})
    config = {"bert": BertConfig, "roberta": RobertaConfig}[kind]
    return config(**{"vocab_size": 100, "num_labels": 3, "max_position_embeddings": 64, **sizes})


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


CASES = [("bert", {}), ("roberta", {}), ("modernbert", {}),
         ("modernbert", {"norm_bias": True, "attention_bias": True, "mlp_bias": True, "classifier_bias": True}),
         ("vit", {})]


@pytest.mark.parametrize("kind,over", CASES)
def test_encoder_parameters_equal_the_transformers_model_for_each_head(kind, over):
    from transformers import AutoModel, AutoModelForImageClassification, AutoModelForSequenceClassification

    config = tiny(kind, **over)
    raw = json.loads(config.to_json_string())
    classifier = AutoModelForImageClassification if kind == "vit" else AutoModelForSequenceClassification
    for head, build in (("encoder", AutoModel), ("image_classifier" if kind == "vit" else "classifier", classifier)):
        shape, note = shape_from_hf_config(raw, head=head)
        assert shape.params() == count(build.from_config(config)), (kind, head)
        assert note == "" and shape.bidirectional and shape.logit_count(4, 10) == (0 if head == "encoder" else 4 * shape.labels)


@pytest.mark.parametrize("kind,targets", [("bert", "all-linear"), ("bert", ["query", "value"]),
                                          ("modernbert", "all-linear"), ("modernbert", ["Wqkv"]),
                                          ("llama", "all-linear")])
def test_lora_parameters_of_a_classifier_equal_what_peft_trains(kind, targets):
    """Adapters in and outside the blocks (the pooler's, a head's dense layer) and the head PEFT saves whole."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    config = tiny(kind)
    shape, _ = shape_from_hf_config(json.loads(config.to_json_string()), head="classifier")
    model = get_peft_model(AutoModelForSequenceClassification.from_config(config),
                           LoraConfig(r=4, target_modules=targets, task_type="SEQ_CLS"))
    assert shape.lora_params(4, targets) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if kind == "llama":  # a score head in place of the language-model head
        assert shape.params() == count(AutoModelForSequenceClassification.from_config(config))


def test_builtin_minilm_is_sized_exactly_from_its_config():
    from safetensors import safe_open

    from tuneforge.models.resolve import resolve_base_model

    info = model_info("minilm-l6", head="encoder")
    with safe_open(str(resolve_base_model("minilm-l6")[0] / "model.safetensors"), framework="pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith("position_ids"))
    assert info.shape.params() == stored == 22_713_216 and info.note == ""
    # a classifier of three classes: BertPooler and a 384 x 3 output layer
    assert model_info("minilm-l6", head="classifier").shape.params() == 22_713_216 + 384 * 2 + 2


def test_plan_of_a_classifier_has_encoder_parts_and_no_language_model_head(tmp_path):
    from transformers import BertForSequenceClassification

    from tuneforge.models.load import load_tokenizer
    from tuneforge.models.resolve import resolve_base_model
    from tuneforge.plan import plan_config

    folder = tmp_path / "bert"
    tokenizer = load_tokenizer(resolve_base_model("minilm-l6")[0])
    config = tiny("bert", vocab_size=tokenizer.vocab_size, num_labels=5)  # a head of another size than the data's
    BertForSequenceClassification(config).save_pretrained(folder)
    config.num_labels = 2
    tokenizer.save_pretrained(folder)
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"item {i} is {'good' if i % 2 else 'bad'}",
                                            "label": "pos" if i % 2 else "neg"} for i in range(40)])
    raw = {"task": "classification", "base_model": str(folder), "datasets": [{"path": str(tmp_path / "train.jsonl")}],
           "adapter": "full", "micro_batch_size": 8, "max_seq_len": 32, "output_dir": str(tmp_path / "run")}
    report = plan_config(config_from_dict(raw, base=tmp_path), gpus=["A100-80GB"])
    assert report.params == count(BertForSequenceClassification(config)) and not report.model.note
    parts = report.rows[0].memory.as_dict()
    assert parts["weights"] == report.params * 4 and parts["optimizer"] == report.params * 8
    assert 0 < parts["activations"] and parts["logits"] == 8 * 2 * 12  # eight rows of two class logits, no vocabulary
    assert report.as_json()["model"]["shape"]["bidirectional"] is True
    # attention over the whole window: twice a causal decoder's attention FLOPs for the same widths
    from tuneforge.plan.throughput import forward_flops

    shape = report.model.shape
    assert forward_flops(shape, 64) - forward_flops(shape, 32) == 2 * 2 * shape.layers * shape.hidden * 32


def saved_bytes(model, inputs: dict) -> int:
    """Bytes autograd keeps for the backward pass of one forward (weights aside), each storage once."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(seen.values())


@pytest.mark.parametrize("kind,tolerance", [("bert", 0), ("vit", 0), ("modernbert", 0.03)])
def test_activation_bytes_per_block_equal_what_autograd_keeps(kind, tolerance):
    """One more block adds what plan says it keeps per token (ModernBERT: within its attention masks, which
    plan counts with the padding mask)."""
    import torch
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    from tuneforge.plan.memory import Settings, encoder_layer_token_bytes

    b, s = 4, 64
    over = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "layer_types": None}  # layer_types: ModernBERT's, for the depth
    if kind == "vit":
        inputs, tokens, build = {"pixel_values": torch.randn(b, 3, 64, 64)}, b * 65, AutoModelForImageClassification
        over.update(image_size=64)
    else:
        inputs, tokens, build = {"input_ids": torch.randint(3, 100, (b, s))}, b * s, AutoModelForSequenceClassification
    measured = []
    for layers in (2, 4):
        torch.manual_seed(0)
        config = tiny(kind, **{**over, "num_hidden_layers": layers})
        measured.append(saved_bytes(build.from_config(config).train(), inputs))
    per_token = (measured[1] - measured[0]) / 2 / tokens
    shape, _ = shape_from_hf_config(json.loads(config.to_json_string()), head="classifier")
    predicted = encoder_layer_token_bytes(shape, Settings(adapter="full"), "fp32")
    assert predicted == pytest.approx(per_token, rel=tolerance), (predicted, per_token)


@pytest.mark.parametrize("head,labels,outputs", [("score", 0, 1), ("classifier", 3, 3), ("causal_lm", 0, 0)])
def test_a_decoder_from_a_gguf_or_the_table_has_the_runs_head(builtin_folder, head, labels, outputs):
    """A reward model's score head (or a classifier's) replaces the language-model head whatever plan reads the
    shape from: the built-in GGUF's header sizes it as its converted config.json does, with no vocabulary logits."""
    gguf = model_info("smollm2-135m-instruct", head, labels).shape
    folder, _ = shape_from_hf_config(json.loads((builtin_folder / "config.json").read_text()), head=head, labels=labels)
    assert gguf.score_outputs == folder.score_outputs == outputs
    assert gguf.params() == folder.params() and gguf.lora_params(8, "all-linear") == folder.lora_params(8, "all-linear")
    assert gguf.logit_count(2, 8) == 2 * 8 * (outputs or 49152)
    assert model_info("smollm2-135m", head, labels).shape.logit_count(2, 8) == 2 * 8 * (outputs or 49152)  # the table's
