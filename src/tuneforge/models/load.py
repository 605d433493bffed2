"""Load a tokenizer and model from a resolved folder, and attach the adapter."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import torch

from tuneforge.config import Config, QuantizationConfig
from tuneforge.data.template import resolve_chat_template
from tuneforge.errors import ConfigError, ModelError
from tuneforge.methods.facts import method_facts
from tuneforge.models.adapters import (
    adapted_modules,
    apply_freeze,
    check_layers,
    initial_adapter_dir,
    linear_module_names,
    peft_init,
    train_in_fp32,
)
from tuneforge.models.init import INIT_FILE, random_model
from tuneforge.models.init_vit import random_image_classifier


def load_tokenizer(folder: Path, chat_template: str = "auto", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ModelError(f"base_model: could not load the tokenizer from {folder}: {err}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"base_model: {folder} has no fast (tokenizer.json) tokenizer, which tuneforge needs")
    if chat_template != "auto" or tokenizer.chat_template:
        tokenizer.chat_template = resolve_chat_template(tokenizer, chat_template)
    if tokenizer.pad_token is None:
        # Padding is masked by position in the collator, so reusing EOS here never hides a trained EOS.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA GPU is visible")
    return torch.device(name)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Parameters' dtype for autocast: weights stay fp32 and matmuls run in the low precision."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision: bf16 is not supported by this GPU; use fp16 or fp32")
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision: fp16 is not supported on CPU; use fp32 or bf16")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def weights_dtype(adapter: str, compute: torch.dtype) -> torch.dtype:
    """Frozen base weights under LoRA/QLoRA are stored in the compute dtype (half the memory of fp32);
    trained weights stay fp32 and autocast runs the matmuls in the compute dtype."""
    return compute if adapter in ("lora", "qlora") and compute != torch.float16 else torch.float32


def _causal_lm(folder: Path, pad_token_id: int | None, head_config: dict, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), **kw)


def _named(head_config: dict) -> dict:
    """from_pretrained's keywords for a new head of the data's classes; run.json gives id2label's keys as strings."""
    if not head_config:
        return {}
    named = {**head_config, "ignore_mismatched_sizes": True}  # a head of another size is replaced by a new one
    if "id2label" in named:
        named["id2label"] = {int(i): name for i, name in named["id2label"].items()}
    return named


def _sequence_head(folder: Path, pad_token_id: int | None, head_config: dict, **kw):
    """A sequence-classification head on the base: `head_config` gives num_labels (and id2label, label2id,
    problem_type). A decoder's head reads each row's last real token, found by the pad id, so a config
    without one takes the tokenizer's."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(folder), **_named(head_config), **kw)
    if model.config.pad_token_id is None:
        if pad_token_id is None:
            raise ModelError(f"base_model: {folder} has no pad token (nor an end-of-sequence token to pad with), "
                             "which a classification head needs to find each row's last token; add a pad_token "
                             "to its tokenizer_config.json")
        model.config.pad_token_id = pad_token_id
    return model


def _image_classifier(folder: Path, pad_token_id: int | None, head_config: dict, **kw):
    """A ViT-family classifier with one output per class."""
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(str(folder), **_named(head_config), **kw)


def _encoder(folder: Path, pad_token_id: int | None, head_config: dict, **kw):
    """The bare encoder: methods/embedding.py pools its token vectors."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder), **kw)


# How each row's `model_head` is loaded: (folder, the tokenizer's pad id, the head built from the data
# (num_labels, id2label, ...), from_pretrained's keywords) -> model.
HEADS = {
    "causal_lm": _causal_lm,
    "score": lambda folder, pad_id, _, **kw: _sequence_head(folder, pad_id, {"num_labels": 1}, **kw),
    "classifier": _sequence_head,
    "image_classifier": _image_classifier,
    "encoder": _encoder,
}
# What loads a merged folder of each head in plain transformers (said after a merge or an export).
LOADED_BY = {
    "causal_lm": "transformers.AutoModelForCausalLM.from_pretrained",
    "score": "transformers.AutoModelForSequenceClassification.from_pretrained",
    "classifier": "transformers.AutoModelForSequenceClassification.from_pretrained",
    "image_classifier": "transformers.AutoModelForImageClassification.from_pretrained",
    "encoder": "sentence_transformers.SentenceTransformer",
}
# How an init: random folder (models/init.py) of each head is built, no weights read: (folder, dtype, the head
# built from the data) -> model.
FROM_RECIPE = {
    "causal_lm": lambda folder, dtype, _: random_model(folder, dtype),
    "image_classifier": random_image_classifier,
}
# The modules of a head that a quantized base (QLoRA) keeps unquantized: a new head trains whole.
UNQUANTIZED = {"classifier": ["classifier", "score"], "score": ["classifier", "score"]}


def load_model(folder: Path, device: torch.device, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
               quantization: QuantizationConfig | None = None, head: str = "causal_lm", pad_token_id: int | None = None,
               head_config: dict | None = None):
    """The base in `dtype` (its linear layers quantized for QLoRA), with the head its row names (HEADS):
    a language-model head, a reward model's one-output score head, or a classifier built from `head_config`
    (the data's labels); `pad_token_id` (the tokenizer's) fills a config without one, since a sequence
    head's own forward refuses batches of several rows otherwise."""
    if quantization is not None:
        from tuneforge.models.quantize import load_quantized

        build = partial(HEADS[head], folder, pad_token_id, head_config or {})
        return load_quantized(folder, device, quantization, dtype, trust_remote_code, build, UNQUANTIZED.get(head))
    if (folder / INIT_FILE).is_file():  # init: random: built from config.json by its recipe, no weights read
        return FROM_RECIPE[head](folder, dtype, head_config or {}).to(device)
    try:
        model = HEADS[head](folder, pad_token_id, head_config or {}, dtype=dtype, trust_remote_code=trust_remote_code,
                            use_safetensors=True)
    except ModelError:
        raise
    except Exception as err:
        raise ModelError(f"base_model: could not load the model from {folder}: {err}") from None
    return model.to(device)


def template_special_ids(tokenizer) -> dict[str, int]:
    """Special tokens the chat template writes into a conversation."""
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
        tokenize=False,
    )
    specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    found = {}
    for tok in sorted(specials, key=len, reverse=True):
        if tok and re.search(re.escape(tok), text):
            found[tok] = tokenizer.convert_tokens_to_ids(tok)
    return found


def untrained_rows(weights: list[torch.Tensor], token_ids: dict[str, int], rel_tol: float = 1e-3) -> list[str]:
    """Tokens whose row in any of these embedding matrices looks never trained: near zero, or the mean row."""
    bad = []
    for weight in weights:
        w = weight.detach().float()
        norms = w.norm(dim=1)
        scale = norms.median().item()
        mean = w.mean(dim=0)
        for tok, idx in token_ids.items():
            if idx is None or idx >= w.shape[0] or tok in bad:
                continue
            if norms[idx] <= rel_tol * scale or (w[idx] - mean).norm() <= rel_tol * scale:
                bad.append(tok)
    return bad


def untrained_token_rows(model, token_ids: dict[str, int], rel_tol: float = 1e-3) -> list[str]:
    """untrained_rows on a loaded model's input and output embeddings (once each when tied)."""
    layers = (model.get_input_embeddings(), model.get_output_embeddings())
    weights = {id(m.weight): m.weight for m in layers if m is not None}
    return untrained_rows(list(weights.values()), token_ids, rel_tol)


def embedding_weights(folder: Path) -> list[torch.Tensor]:
    """The input/output embedding matrices of a safetensors folder, read without loading the rest."""
    from safetensors import safe_open

    out = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight")):
                    out.append(f.get_tensor(name))
    return out


def check_template_tokens(model, tokenizer, cfg: Config) -> None:
    """Refuse to train a chat template whose special tokens the base model never learned (unless embeddings train)."""
    if not tokenizer.chat_template:
        return
    bad = untrained_token_rows(model, template_special_ids(tokenizer))
    if bad and cfg.adapter != "full":
        raise ModelError(
            f"chat_template: the template uses {', '.join(bad)}, whose embeddings are untrained in this base model; "
            "a LoRA adapter cannot learn them and the model would never emit them. Use `adapter: full`, "
            "or a chat_template whose tokens the model knows (an instruct model's own template)."
        )


def build_lora_config(cfg: Config, model=None):
    """PEFT's LoraConfig for our lora section; `model` resolves all-linear when only some layers are adapted."""
    from peft import LoraConfig

    lora = cfg.lora
    targets = lora.target_modules
    if lora.layers is not None and targets == "all-linear" and model is not None:
        # PEFT takes layers_to_transform only with an explicit list of module names.
        targets = linear_module_names(model, lora.layers)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights=peft_init(lora.init),
        layers_to_transform=lora.layers,
        task_type=method_facts(cfg).peft_task,
        modules_to_save=method_facts(cfg).saved_modules,
    )


def attach_adapter(model, cfg: Config, save_initial: bool = True):
    """(model, report): LoRA through PEFT (its format is what other tools load), or the weights `freeze`
    leaves trainable; the report lists which linear-like weights train and which were skipped (R-FEAT-4).

    `save_initial`: write a PiSSA/OLoRA run's initial adapter (rank 0 alone, on several processes: DDP then
    broadcasts rank 0's initialisation, base and adapter, so every process trains from what was written)."""
    if cfg.adapter == "full":
        apply_freeze(model, cfg.freeze)
        return model, adapted_modules(model, full=True)
    from peft import get_peft_model

    check_layers(model, cfg.lora.layers)
    try:
        model = get_peft_model(model, build_lora_config(cfg, model))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"lora ({cfg.lora.init} init, target_modules {cfg.lora.target_modules}): {err}") from None
    train_in_fp32(model)
    initial = initial_adapter_dir(cfg)
    if initial is not None and save_initial:
        save_initial_adapter(model, initial)
    return model, adapted_modules(model)


def save_initial_adapter(model, folder: Path) -> None:
    """The PiSSA/OLoRA adapter as initialised; marked plain-LoRA so loading it never re-runs the SVD.

    The final save subtracts it (PEFT's path_initial_model_for_weight_conversion), so the saved
    adapter applies to the original base weights.
    """
    config = model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        config.init_lora_weights = init
