"""What the rest of tuneforge knows about a training method, as data: one row per method, no torch.

data/, plan/, fast/, track/, eval/ and the loop read a method's row instead of its name, so adding
a method is its module, its config spec and one row here. `method_facts` is the one place outside
the schema that reads `cfg.method` and `cfg.task`: a task other than causal_lm (classification,
embeddings, ...) is a row of its own, named for the task.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Any, Callable


@dataclass(frozen=True)
class MethodFacts:
    name: str
    objective: str  # "module:Class" of its Objective (methods/objective.py), built by methods/build.py
    records: tuple[str, ...]  # record kinds it trains on (data/formats.py)
    parts: int = 1  # sequences one record encodes to: a preference pair's chosen and rejected answers
    rows: int = 1  # sequences the model runs per example (plan's memory and time)
    # The transformers head loaded (models/load.py HEADS): causal_lm (next token) | score (one number) |
    # classifier (one logit per class of the data's labels) | image_classifier (the same for images) |
    # encoder (the bare encoder; methods/embedding.py pools its token vectors).
    model_head: str = "causal_lm"
    lr_family: str = "preference"  # which usual learning-rate range applies (methods/learning_rates.py)
    chunked_loss: bool = False  # its loss can read the output layer in chunks (fast/chunked_loss.py)
    padding_free: bool = False  # its batches may be padding-free rows (fast/padding_free.py)
    example_rows: bool = False  # a batch is its examples, one row each: their lengths are the batch's
    label_checks: bool = False  # its labels mark chat answers: masking and end-of-turn are checked
    online: bool = False  # samples answers while training, scored from the records' other fields
    # The reference it compares against: "" none, "model" (adapter off or a frozen copy),
    # "uniform" (log-probs of 0), "precomputed" (a table computed before training).
    reference: str = ""
    spec: Callable[[Any], dict] | None = None  # the facts its config section changes (rows, reference)
    # "module:function" of how its inputs are read (folder, chat_template, trust_remote_code) -> tokenizer or
    # image processor, and of how its data is prepared (cfg, processor) -> PreparedData-like (data/dataset.py):
    # a task reads its own kind of data without a branch in the loop.
    processor: str = "tuneforge.models.load:load_tokenizer"
    prepare: str = "tuneforge.data.dataset:prepare_data"
    # "module:function" (cfg, report) adding the task's own findings to `tuneforge data check` (data/check.py).
    checks: str = ""
    # "module:function" writing final/ (model, tokenizer, folder, stop_ids, initial_adapter, state_dict): a task
    # whose clients need more than the weights and tokenizer (a sentence-transformers folder) writes its own.
    final: str = "tuneforge.train.outputs:write_final"
    # "module:function" (run, export path, weights) -> report: how `tuneforge export` checks an export in a fresh
    # process against the tuned model (held-out perplexity; an embedding run's sentence vectors).
    verify: str = "tuneforge.export.verify:verify_export"
    # "module:name" of the RandomInit (models/init.py) that builds its model for init: random: the checks
    # `tuneforge validate` runs, and the cache folder (config.json, the inputs' processor, the recipe) loaded.
    random_init: str = "tuneforge.models.init:CAUSAL_LM"

    @property
    def peft_task(self) -> str:
        """PEFT's task type: SEQ_CLS also trains and saves a score head."""
        return {"causal_lm": "CAUSAL_LM", "score": "SEQ_CLS", "classifier": "SEQ_CLS", "image_classifier": None,
                "encoder": "FEATURE_EXTRACTION"}[self.model_head]

    @property
    def saved_modules(self) -> list[str] | None:
        """Modules a LoRA run trains and saves whole beside the adapter: a new classification head. (PEFT's
        SEQ_CLS adds its own; an image classifier has no PEFT task type, so it is named here.)"""
        return {"image_classifier": ["classifier"]}.get(self.model_head)


def _dpo(spec) -> dict:
    return {"reference": "uniform" if spec.reference_free else "precomputed" if spec.precompute_reference else "model"}


def _grpo(spec) -> dict:
    return {"rows": spec.generations, "reference": "model" if spec.beta > 0 else ""}


_PAIRS = {"records": ("preference",), "parts": 2, "rows": 2}
METHODS = {m.name: m for m in (
    MethodFacts("sft", "tuneforge.methods.sft:SFT", ("chat", "completion", "text"), lr_family="sft",
                chunked_loss=True, padding_free=True, example_rows=True, label_checks=True),
    MethodFacts("dpo", "tuneforge.methods.dpo:DPO", **_PAIRS, chunked_loss=True, spec=_dpo),
    MethodFacts("orpo", "tuneforge.methods.orpo:ORPO", **_PAIRS),  # its NLL may cover the prompt: whole logits
    MethodFacts("simpo", "tuneforge.methods.simpo:SimPO", **_PAIRS, chunked_loss=True),
    MethodFacts("reward", "tuneforge.methods.reward:Reward", **_PAIRS, model_head="score"),
    MethodFacts("kto", "tuneforge.methods.kto:KTO", ("kto",), chunked_loss=True, reference="model"),
    MethodFacts("grpo", "tuneforge.methods.grpo:GRPO", ("prompt",), lr_family="grpo", chunked_loss=True,
                online=True, spec=_grpo),
    MethodFacts("classification", "tuneforge.methods.classification:Classification", ("labelled",),
                model_head="classifier", lr_family="classifier", example_rows=True,
                prepare="tuneforge.data.labels:prepare_labelled", checks="tuneforge.data.labels:check_labelled"),
    MethodFacts("image_classification", "tuneforge.methods.image_classification:ImageClassification", ("image",),
                model_head="image_classifier", lr_family="classifier",
                processor="tuneforge.data.images:load_image_processor", prepare="tuneforge.data.images:prepare_images",
                random_init="tuneforge.models.init_vit:VIT"),
    # Raw text (data/shards.py): fixed-length blocks of token shards, every token trained.
    MethodFacts("pretrain", "tuneforge.methods.pretrain:Pretrain", ("raw",), lr_family="pretrain", chunked_loss=True,
                prepare="tuneforge.data.dataset:prepare_raw", checks="tuneforge.data.raw_check:check_raw"),
    MethodFacts("embedding", "tuneforge.methods.embedding:Embedding", ("pair", "scored"), rows=2, model_head="encoder",
                lr_family="sft", prepare="tuneforge.data.pairs_text:prepare_pairs", checks="tuneforge.data.check:check_pairs",
                final="tuneforge.methods.embedding:write_final", verify="tuneforge.export.verify:verify_sentence_vectors"),
)}


def function_at(path: str):
    """The function or class a row names as "module:name", imported when first needed."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def row_name(cfg) -> str:
    """The row a config trains: its method for causal_lm, otherwise the task itself."""
    return cfg.method if cfg.task == "causal_lm" else cfg.task


def row_key(cfg) -> str:
    """The config's row as a message quotes it: `method: dpo`, or `task: classification`."""
    return f"method: {cfg.method}" if cfg.task == "causal_lm" else f"task: {cfg.task}"


def method_facts(cfg) -> MethodFacts:
    """The row of `cfg.method` (or of `cfg.task`), with what its config section changes."""
    name = row_name(cfg)
    if name not in METHODS:
        raise ValueError(f"task: {name} is not available in this version of tuneforge")
    facts = METHODS[name]
    return replace(facts, **facts.spec(getattr(cfg, name))) if facts.spec else facts
