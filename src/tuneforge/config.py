"""The run configuration: every key declared once, with its default, range and meaning.

A config is read from YAML, merged with `--set key=value` overrides, validated by pydantic
and has its relative paths resolved against the config file's folder, all before any model
or data is loaded.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tuneforge.errors import ConfigError, read_utf8
from tuneforge.methods.facts import method_facts

DataFormat = Literal[
    "auto", "messages", "sharegpt", "alpaca", "completion", "text", "preference", "kto", "triplet", "prompt"
]


class _Strict(BaseModel):
    # allow_inf_nan: `.inf` or `.nan` is never a meaningful rate, weight or threshold (and passes `gt=0`).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Upper bounds of the integers that size memory: far above any real run, far below what exhausts a machine
# (a micro-batch's fit is checked against the data and the device before training: train/fits.py).
MAX_MICRO_BATCH = 4096
MAX_SEQ_LEN = 1 << 20
MAX_TOKENS_GENERATED = 1 << 17
MAX_SEED = 2**32 - 1  # the data order seeds torch with seed x 1,000,003 + epoch, which must stay in 64 bits


# LoRA initialisations PEFT 0.21 offers without extra data or configs (eva, corda and loftq need them).
LORA_INITS = ("default", "gaussian", "pissa", "pissa_niter_<n>", "olora", "orthogonal")
# Inits that rewrite the base weights (W - B0 A0); the saved adapter is converted back to plain LoRA.
BASE_CHANGING_INITS = ("pissa", "olora")


def parse_layer_range(value: str) -> list[int]:
    """'3' -> [3], '0-7' -> [0, ..., 7]; decoder layers are counted from 0."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)
    if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
        raise ValueError("expected a layer index or a range such as 0-7 (first <= last)")
    lo = int(m.group(1))
    return list(range(lo, int(m.group(2) or lo) + 1))


class LoraConfig(_Strict):
    r: int = Field(16, ge=1, le=4096, description="Rank of the low-rank update.")
    alpha: float = Field(32, gt=0, description="Scale numerator: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: str | list[str] = Field(
        "all-linear", description='"all-linear" or a list of module names, e.g. [q_proj, v_proj].'
    )
    use_rslora: bool = Field(
        False, description="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r, so high ranks keep learning."
    )
    use_dora: bool = Field(
        False, description="DoRA: learn a magnitude per output feature beside the LoRA direction (slower per step)."
    )
    init: str = Field(
        "default",
        description="How A and B start: default (B = 0), gaussian, pissa (principal singular vectors; "
        "pissa_niter_<n> for a fast n-iteration SVD), olora (QR), orthogonal (even r). pissa and olora "
        "move the principal part of W into the adapter; the saved adapter is converted back to plain LoRA "
        "against the original base, so other tools load it unchanged.",
    )
    plus_ratio: float | None = Field(
        None, ge=1,
        description="LoRA+: B (and 1-D adapter weights) learn at plus_ratio x learning_rate; A at learning_rate. "
        "The paper uses 16; null turns it off.",
    )
    layers: list[int] | None = Field(
        None,
        description='Decoder layers to adapt (PEFT layers_to_transform): a list [0, 1], or a range "0-7"; '
        "null adapts every layer.",
    )

    @field_validator("init")
    @classmethod
    def _known_init(cls, value: str, info: ValidationInfo) -> str:
        if value not in LORA_INITS and not re.fullmatch(r"pissa_niter_\d+", value):
            raise ValueError(f"unknown LoRA init; expected one of {', '.join(LORA_INITS)}")
        if value == "orthogonal" and info.data.get("r", 2) % 2:
            raise ValueError(f"orthogonal init needs an even lora.r (r is {info.data['r']})")
        return value

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_layer_range(value)
        return [value] if isinstance(value, int) else value

    @field_validator("layers")
    @classmethod
    def _layer_indices(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 0):
            raise ValueError('give decoder layer indices counted from 0, e.g. [0, 1] or "0-7"')
        return value

    @property
    def changes_base(self) -> bool:
        """True for inits (PiSSA, OLoRA) that subtract the initial adapter from the base weights."""
        return self.init.startswith(BASE_CHANGING_INITS)


class QuantizationConfig(_Strict):
    bits: Literal[4, 8] = Field(
        4, description="4: NF4/FP4 weights (QLoRA, ~0.5 byte per weight); 8: LLM.int8 (~1 byte per weight)."
    )
    double_quant: bool = Field(
        True, description="4-bit: quantize the per-block scales too (saves ~0.4 bit per weight)."
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type: nf4 (NormalFloat, for normally distributed weights) or fp4."
    )
    storage: Literal["auto", "uint8", "compute"] = Field(
        "auto",
        description="How the packed 4-bit weights are stored: uint8 (bitsandbytes' default) or compute (in the "
        "compute dtype, e.g. bf16, which FSDP needs to shard them alongside the other weights). auto: compute "
        "under distributed.strategy: fsdp, uint8 otherwise.",
    )


class DatasetSpec(_Strict):
    path: str = Field(
        description="A .jsonl, .json, .csv, .tsv or .parquet file, or a `datasets` save_to_disk folder; "
        "relative to the config file."
    )
    format: DataFormat = Field("auto", description="Record format; auto detects it from the first record.")
    weight: float = Field(1.0, gt=0, le=1000,
                          description="Examples drawn per epoch = weight x size (2 repeats, 0.5 halves).")
    columns: dict[str, str] = Field(
        default_factory=dict, description='Our field name -> the file\'s column, e.g. {messages: dialog, instruction: question}.'
    )
    roles: dict[str, str] = Field(
        default_factory=dict, description="The file's role names -> ours, e.g. {bot: assistant}; merged over the format's own."
    )
    ratio: float | None = Field(
        None, gt=0, lt=1,
        description="Or a fixed share of every epoch, e.g. 0.1 of general data against forgetting; overrides weight.",
    )


class ValidationSpec(_Strict):
    split: float | None = Field(None, gt=0, lt=1, description="Hold out this share of the training data.")
    path: str | None = Field(None, description="Or read validation data from this file.")
    format: DataFormat = "auto"
    columns: dict[str, str] = Field(default_factory=dict, description="As for datasets.")
    roles: dict[str, str] = Field(default_factory=dict, description="As for datasets.")

    @model_validator(mode="after")
    def _one_source(self) -> "ValidationSpec":
        if (self.split is None) == (self.path is None):
            raise ValueError("give exactly one of validation.split (e.g. 0.1) or validation.path (a file)")
        return self


class MetricEntry(_Strict):
    metric: str = Field(description="exact_match, normalized_match, rouge_l, bleu, chrf, json_valid, json_fields, "
                        "bertscore, or module:function / file.py:function with GRPO's reward signature.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments bound to the function "
                                 "(json_fields: {fields: [...]}; bertscore: {model: minilm-l6, num_layers: 6}).")


class JudgeSpec(_Strict):
    base_url: str = Field(description="An OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(description="The judge model's name at that endpoint.")
    api_key_env: str | None = Field(None, description="Environment variable holding the key (never the key itself).")
    mode: Literal["pairwise", "single"] = Field(
        "pairwise", description="pairwise: base vs tuned, judged in both orders; single: each answer graded 1-10.")
    prompt: str | None = Field(None, description="A file with the judge's prompt and rubric (its placeholders: "
                               "{question}, {reference}, and {answer_a} {answer_b} or {answer}); default built in.")
    max_examples: int = Field(100, ge=1, description="Held-out prompts judged.")
    concurrency: int = Field(4, ge=1, le=64, description="Requests in flight at once.")
    retries: int = Field(2, ge=0, le=10, description="Retries of a failed request (with a pause) before it counts as failed.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds one request may take.")
    max_tokens: int = Field(256, ge=1, description="The judge's reply budget.")


class ForgettingSpec(_Strict):
    path: str = Field(description="General text (plain .txt, or .jsonl with a text field) the tuning should not hurt.")
    max_tokens: int = Field(20000, ge=16, description="Tokens of it scored.")
    threshold: float = Field(0.05, gt=0, description="Warn when perplexity rises by more than this share (0.05: 5%).")


class LmEvalSpec(_Strict):
    tasks: list[str] = Field(min_length=1, description="lm-eval task names (yours via include_path).")
    include_path: str | None = Field(None, description="A folder of task YAMLs over local files (dataset_path: json).")
    limit: int | None = Field(None, ge=1, description="At most this many documents per task.")


# Held-out numbers evaluation.select_best may name besides the suite's entries (lower is better for the first three).
LOWER_IS_BETTER = ("val_loss", "perplexity", "general_perplexity")
HELD_OUT_METRICS = (*LOWER_IS_BETTER, "exact_match", "stopped", "accuracy", "macro_f1", "weighted_f1",
                    "preference_accuracy", "likelihood_accuracy", "mean_reward", "recall@1", "recall@5", "recall@10",
                    "mrr@10", "ndcg@10")


class SelectBestSpec(_Strict):
    metric: str = Field("val_loss", description="A suite entry's name (e.g. rouge_l, or the function's name of "
                        "module:function) or a held-out number (val_loss, perplexity, exact_match, accuracy, ...).")
    mode: Literal["max", "min"] | None = Field(
        None, description="max: larger is better; default min for val_loss and the perplexities, max otherwise.")

    @property
    def lower_is_better(self) -> bool:
        return self.mode == "min" if self.mode else self.metric in LOWER_IS_BETTER


class EvaluationSpec(_Strict):
    before_after: bool = Field(True, description="Evaluate the base model before and the tuned model after training.")
    max_examples: int = Field(200, ge=1, description="At most this many validation examples are generated for exact match.")
    max_new_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS_GENERATED,
        description="Generation budget; default twice the longest reference answer in tokens."
    )
    batch_size: int = Field(16, ge=1, le=MAX_MICRO_BATCH, description="Prompts generated together.")
    suite: list[MetricEntry] = Field(
        default_factory=list, description="Reference metrics on the greedy answers, each with its 95% interval and "
        "the before/after difference (docs/evaluation.md); a bare name is short for {metric: name}.")
    judge: JudgeSpec | None = Field(None, description="An LLM judge comparing base and tuned answers (tuneforge eval).")
    forgetting: ForgettingSpec | None = Field(
        None, description="Perplexity on general text before and after, warning when it rises past a threshold.")
    lm_eval: LmEvalSpec | None = Field(
        None, description="lm-evaluation-harness tasks run on base and tuned through tuneforge serve (tuneforge eval).")
    select_best: SelectBestSpec | None = Field(
        None, description="After training, evaluate every kept checkpoint on the validation split and make the "
        "best one by this metric final/ (docs/evaluation.md).")

    @field_validator("suite", mode="before")
    @classmethod
    def _bare_metric(cls, value):
        return [{"metric": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _selectable(self) -> "EvaluationSpec":
        names = [e.metric.rpartition(":")[2] for e in self.suite]  # as eval/suite.py's entry_name reports them
        if self.select_best and self.select_best.metric not in (*names, *HELD_OUT_METRICS):
            raise ValueError(f"select_best.metric: {self.select_best.metric!r} is neither a suite entry "
                             f"({', '.join(names) or 'none'}) nor a held-out number ({', '.join(HELD_OUT_METRICS)})")
        return self


class PerformanceSpec(_Strict):
    """The fast path (src/tuneforge/fast): how a step runs, never what it computes."""

    mode: Literal["auto", "min_memory", "off"] = Field(
        "auto", description="auto: every switch below that helps; min_memory: also activation checkpointing; "
        "off: the plain path. `performance: min_memory` is short for {mode: min_memory}.")
    padding_free: bool | None = Field(
        None, description="SFT: a micro-batch's examples back to back in one row, no padding, attention kept "
        "within each example. null: on unless mode is off.")
    chunked_loss: bool | None = Field(
        None, description="SFT: the output layer and cross-entropy on trained positions only, in chunks, so the "
        "full logits never exist. null: on unless mode is off.")
    loss_chunk_tokens: int | None = Field(
        None, ge=16, le=MAX_SEQ_LEN, description="Positions per chunk of the chunked loss; default: 256 MiB of fp32 logits.")
    varlen_attention: bool | None = Field(
        None, description="SFT padding-free rows: attention within each example alone, so a row costs the sum of "
        "its examples' squared lengths, not the square of its length (CUDA: a variable-length kernel; elsewhere "
        "sdpa per example). null: on whenever padding_free is on.")
    kernels: bool | None = Field(
        None, description="Fused RMSNorm and gated-MLP (SwiGLU/GeGLU) kernels swapped into the model, and a "
        "cross-entropy kernel for each chunk of the chunked loss and log-probs: Triton on CUDA, the same arithmetic "
        "in PyTorch elsewhere. null: on when the device is CUDA and Triton imports, "
        "unless mode is off.")
    fused_lora: bool | None = Field(
        None, description="LoRA: each adapted linear layer as one autograd function of matmuls (the adapter's "
        "product accumulated into the base product's output, forward and backward) instead of PEFT's separate "
        "scale and add passes; the adapter stays a PEFT adapter. Applies with lora.dropout 0, without DoRA, over "
        "unquantized bases, not under FSDP. null: on where it applies, unless mode is off.")
    activation_checkpointing: Literal["auto", "none", "selective", "full", "offload"] = Field(
        "auto", description="Recompute decoder layers in the backward pass instead of keeping their activations: "
        "selective (every checkpoint_every-th layer), full (every layer), offload (every layer, their inputs kept in "
        "pinned CPU memory; on a CPU the same as full). auto: on a GPU the least of these whose predicted peak fits "
        "0.9 of its memory (mode auto), full or else offload (min_memory), none (off); none on a CPU unless "
        "min_memory. The top-level gradient_checkpointing: true means full.")
    checkpoint_every: int | None = Field(
        None, ge=1, description="selective: checkpoint every k-th decoder layer (layers 0, k, 2k, ...). null: on a "
        "GPU the largest k that fits the memory budget, 2 on a CPU.")
    compile: bool | None = Field(
        None, description="Regional torch.compile: each decoder layer compiled on its own (one compilation serves "
        "them all). null: off until the GPU benchmark has measured it.")

    @field_validator("mode", mode="before")
    @classmethod
    def _bare_off(cls, value):
        return "off" if value is False else value  # YAML reads `mode: off` as false

    @model_validator(mode="after")
    def _checkpoint_every(self) -> "PerformanceSpec":
        if self.checkpoint_every is not None and self.activation_checkpointing != "selective":
            raise ValueError(f"checkpoint_every applies to activation_checkpointing: selective (it is "
                             f"{self.activation_checkpointing}); set activation_checkpointing: selective too, or "
                             "remove checkpoint_every")
        return self


class PrepareSpec(_Strict):
    dedupe: Literal["none", "exact", "near"] = Field(
        "none", description="Leave out repeated examples: exact (same normalised text) or near (MinHash similarity)."
    )
    near_threshold: float = Field(0.85, gt=0, le=1, description="Estimated Jaccard similarity that counts as near-duplicate.")
    min_tokens: int | None = Field(None, ge=1, description="Leave out examples shorter than this many tokens.")
    cache: bool = Field(True, description="Keep the tokenized data on disk, keyed by data, tokenizer, template and settings.")


class DPOSpec(_Strict):
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model (higher: stay closer).")
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="sigmoid (DPO paper), ipo (squared, per-token normalised), hinge (SLiC), robust (noisy labels)."
    )
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="robust only: assumed share of flipped preference labels.")
    reference_free: bool = Field(False, description="Compare against a uniform reference instead of the base model.")
    precompute_reference: bool = Field(
        False, description="Compute the reference log-probs in one pass before training (cached by model and data hash)."
    )


class ORPOSpec(_Strict):
    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term next to the chosen answer's NLL (lambda).")
    nll_on_prompt: bool = Field(
        False, description="Also count prompt tokens in the NLL term, as TRL does; off: only the chosen answer."
    )


class SimPOSpec(_Strict):
    beta: float = Field(2.0, gt=0, description="Scale of the length-normalised reward.")
    gamma: float = Field(0.5, ge=0, description="Target reward margin between chosen and rejected (TRL's simpo_gamma).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    sft_weight: float = Field(0.0, ge=0, description="Add this times the chosen answer's NLL (CPO-SimPO); 0: pure SimPO.")


class KTOSpec(_Strict):
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0, description="Loss weight of examples labelled true.")
    undesirable_weight: float = Field(1.0, gt=0, description="Loss weight of examples labelled false.")


class RewardSpec(_Strict):
    center_coefficient: float | None = Field(
        None, ge=0, description="Pull the rewards' mean towards 0: adds this times mean(r_chosen + r_rejected)^2."
    )


class ClassificationSpec(_Strict):
    threshold: float = Field(
        0.5, gt=0, lt=1, description="Multi-label data: a class is predicted when its sigmoid probability is at "
        "least this (single-label data takes the most probable class).")
    wrong_examples: int = Field(
        10, ge=0, le=1000, description="The most confidently wrong validation examples listed in eval_after.json.")


class ImageClassificationSpec(_Strict):
    """task: image_classification: an image folder (root/<label>/*.png) or JSONL {"image": path, "label": ...}."""

    labels: list[str] | None = Field(
        None, min_length=2, description="The class names in the order of the model's outputs; default: the labels "
        "found in the training data, sorted. A record with a label outside this list is a bad record.")
    augment: bool = Field(
        True, description="Training images only: a random horizontal flip, seeded by the step so a resumed run "
        "sees the same images. Turn off for classes a mirror image changes (digits, text, left/right).")
    wrong_examples: int = Field(
        5, ge=0, le=1000, description="The most confidently wrong validation images listed in eval_after.json.")
    threshold: float = Field(
        0.5, gt=0, lt=1, description="Multi-label data (list labels): a class is predicted when its sigmoid "
        "probability is at least this (single-label data takes the most probable class).")


class EmbeddingSpec(_Strict):
    """task: embedding (methods/embedding.py): the loss follows the data, pooling follows the model folder."""

    loss: Literal["auto", "contrastive", "cosine"] = Field(
        "auto", description="contrastive: in-batch negatives (sentence-transformers' MultipleNegativesRankingLoss), "
        "for query/positive[/negative] records; cosine: mean squared error of the cosine against `score`, for "
        "scored pairs; auto: the one the data calls for.")
    scale: float = Field(20.0, gt=0, le=1000, description="Contrastive: cosine similarities are multiplied by this "
                         "before the softmax (1 / temperature).")
    corpus: str | None = Field(
        None, description="Extra documents for the held-out retrieval evaluation (records with a \"text\" field), "
        "searched together with the validation positives; relative to the config file.")
    parity_tolerance: float = Field(
        0.999, gt=0, le=1, description="Before training, tuneforge's vectors of the base model must have at least "
        "this cosine with sentence-transformers' own on fixed strings, or the run stops.")


class RewardFunctionSpec(_Strict):
    function: str = Field(description="A built-in (exact_match, regex, json_valid, length_penalty), module:function, "
                          "or file.py:function with the file relative to the config.")
    weight: float = Field(1.0, description="The rewards are summed with these weights.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments bound to the function.")


class GRPOSpec(_Strict):
    generations: int = Field(4, ge=2, le=1024, description="Completions sampled per prompt (the group).")
    max_completion_tokens: int = Field(128, ge=1, le=MAX_TOKENS_GENERATED, description="Longest completion sampled.")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.0, ge=0, description="Weight of the KL penalty to the reference model; 0: no reference pass.")
    epsilon: float = Field(0.2, gt=0, description="Clip range of the probability ratio (lower side).")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clip range; defaults to epsilon.")
    loss: Literal["grpo", "dapo", "dr_grpo"] = Field(
        "dapo", description="grpo: mean per sequence; dapo: mean per token of the batch; dr_grpo: sum / (batch x max length)."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the group's reward std (group), the batch's (batch), or not (none)."
    )
    rewards: list[RewardFunctionSpec] = Field(min_length=1, description="Reward functions scoring each completion.")
    environment: str | None = Field(
        None, description="module:function for multi-turn rollouts: given the conversation so far, "
        "returns the next user/tool turn or None to end; its tokens are never trained."
    )
    max_turns: int = Field(1, ge=1, le=1024, description="Model turns per rollout when an environment is given.")
    zero_std_warn_steps: int = Field(10, ge=1, description="Warn after this many steps in a row where every group's rewards were equal.")


Tracker = Literal["jsonl", "tensorboard", "mlflow", "wandb"]


class TrackSpec(_Strict):
    to: list[Tracker] = Field(
        default_factory=lambda: ["jsonl"],
        description="Where metrics go: jsonl (always on: <output_dir>/metrics.jsonl), tensorboard "
        "(<output_dir>/tensorboard), mlflow, wandb. Each needs its extra: pip install tuneforge[tensorboard].",
    )
    run_name: str | None = Field(None, description="The run's name in MLflow and W&B; default the output_dir's folder name.")
    project: str = Field("tuneforge", description="MLflow experiment and W&B project the run is filed under.")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (a server, file: or sqlite:); default sqlite:///<output_dir's parent>/mlflow.db."
    )
    wandb_mode: Literal["auto", "online", "offline"] = Field(
        "auto", description="auto: online when a W&B key is set (WANDB_API_KEY or ~/.netrc), else offline in <output_dir>/wandb."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, value: Any) -> Any:
        """`track: [tensorboard, mlflow]` is short for `track: {to: [...]}`."""
        if isinstance(value, (list, str)):
            return {"to": [value] if isinstance(value, str) else value}
        return value


class DiagnoseSpec(_Strict):
    enabled: bool = Field(True, description="Run the live checks: masking, template, learning rate, flat or exploding "
                          "loss, overfitting, throughput, zero-spread reward groups.")
    flat_after: float = Field(0.3, gt=0, lt=1, description="Share of the steps after which a loss that has not dropped is flagged.")
    flat_min_drop: float = Field(0.05, ge=0, lt=1, description="Smallest relative drop of the training loss that is not flat.")
    explode_factor: float = Field(3.0, gt=1, description="A loss this many times the recent median (and 1 nat above it) has exploded.")
    explode_rise: float = Field(2.0, gt=1, description="A loss whose last steps are this many times the first steps' has diverged.")
    spike_factor: float = Field(5.0, gt=1, description="A gradient norm this many times the recent median logs the top layers.")
    top_layers: int = Field(5, ge=1, description="Layers listed when the gradient norm spikes.")
    overfit_evals: int = Field(3, ge=2, description="Evaluations of rising validation loss (training loss falling) that flag overfitting.")
    hardest_examples: int = Field(5, ge=0, description="Hardest validation examples (highest loss) logged at each evaluation.")
    loader_share: float = Field(0.2, gt=0, lt=1, description="Data-loader wait above this share of step time is flagged.")
    gpu_util_min: float = Field(0.5, gt=0, lt=1, description="Mean GPU utilisation below this is flagged.")
    zero_std_steps: int = Field(
        10, ge=1, description="Steps in a row with frac_zero_std at 1.0 (no reward spread) before a warning; grpo.zero_std_warn_steps wins."
    )
    max_rollbacks: int = Field(3, ge=1, description="With on_divergence: rollback, stop after this many roll-backs.")


class EarlyStoppingSpec(_Strict):
    patience: int = Field(3, ge=1, description="Evaluations without improvement before training stops.")
    metric: str = Field("val_loss", description="A validation key of metrics.jsonl, e.g. val_loss or val_rewards/accuracies.")
    mode: Literal["auto", "min", "max"] = Field("auto", description="auto: max for accuracies and margins, min otherwise.")
    min_delta: float = Field(0.0, ge=0, description="A change smaller than this is no improvement.")


class FSDPSpec(_Strict):
    param_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="dtype the sharded weights are gathered and computed in; auto: the run's precision."
    )
    reduce_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="dtype gradients are reduced across processes in; fp32 keeps the sum exact enough."
    )
    cpu_offload: bool = Field(
        False, description="Keep the sharded weights, gradients and optimizer state in CPU memory between uses "
        "(slower; for models that do not fit otherwise)."
    )
    reshard_after_forward: bool = Field(
        True, description="Free each layer's gathered weights after its forward and gather them again for "
        "backward: less memory, one more all-gather per layer."
    )


class DistributedSpec(_Strict):
    strategy: Literal["auto", "none", "ddp", "fsdp"] = Field(
        "auto",
        description="How several processes share the work (launched with --nproc or torchrun): ddp (every process "
        "holds the whole model, gradients are averaged), fsdp (FSDP2: weights, gradients and optimizer state "
        "sharded per decoder layer), auto (ddp when the model and optimizer fit one device, else fsdp; ddp on CPU), "
        "none (one process only).",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="Collective library: auto is nccl on CUDA (gloo for CPU tensors), gloo on CPU."
    )
    timeout_minutes: float = Field(
        30, gt=0, description="A collective (all-reduce, barrier) waiting longer than this fails the run."
    )
    watchdog_seconds: float | None = Field(
        600, gt=0,
        description="With several processes: if no optimizer step, evaluation or checkpoint finishes for this long, "
        "every process prints its Python stack and the run exits with an error; null turns it off.",
    )
    fsdp: FSDPSpec = Field(default_factory=FSDPSpec, description="Options of strategy: fsdp.")


class ArchitectureSpec(_Strict):
    """The size of a model built with init: random (docs/pretrain.md; an image classifier's: docs/tasks.md).
    Give `depth` alone, or the sizes."""

    depth: int | None = Field(
        None, ge=1, le=256,
        description="One size dial: n_layer = depth, d_model = 64 x depth, n_head = max(1, d_model / 128) "
        "(heads of 128), d_ff = 4 x d_model; any size also given here overrides the derived one.",
    )
    n_layer: int | None = Field(None, ge=1, le=1024, description="Decoder layers.")
    d_model: int | None = Field(None, ge=8, le=1 << 16, description="Hidden width; a multiple of n_head.")
    n_head: int | None = Field(None, ge=1, le=1024, description="Attention heads.")
    n_kv_head: int | None = Field(None, ge=1, le=1024, description="Key/value heads (grouped-query); default n_head.")
    d_ff: int | None = Field(None, ge=8, le=1 << 18, description="Width of the gated MLP; default 4 x d_model.")
    init_std: float = Field(
        0.02, gt=0, le=1, description="Standard deviation of the normal initialisation; residual output projections "
        "(o_proj, down_proj) use init_std / sqrt(2 x n_layer). An image classifier's initializer_range.",
    )
    image_size: int | None = Field(
        None, ge=1, le=1 << 14, description="task: image_classification only: the side of the square image, in "
        "pixels, the ViT reads (images are resized to it); a multiple of patch_size.")
    patch_size: int | None = Field(
        None, ge=1, le=1 << 12, description="task: image_classification only: the side of one patch, in pixels.")


class TokenizerTrainSpec(_Strict):
    vocab_size: int = Field(8192, ge=300, le=1 << 20, description="Tokens of the byte-level BPE, special tokens included.")
    sample_bytes: int = Field(
        100_000_000, ge=1, description="Train on the first this many bytes of the training text (documents in order).")


class TokenizerSpec(_Strict):
    """The tokenizer of a model built with init: random: reuse one, or train a byte-level BPE on the corpus."""

    reuse: str | None = Field(None, description="A built-in model name or a folder whose tokenizer is used as is.")
    train: TokenizerTrainSpec | None = Field(None, description="Train a byte-level BPE on the training text.")

    @model_validator(mode="after")
    def _one(self) -> "TokenizerSpec":
        if (self.reuse is None) == (self.train is None):
            raise ValueError("tokenizer: give exactly one of reuse (a model name or folder) or train ({vocab_size: ...})")
        return self


class PretrainSpec(_Strict):
    text_field: str = Field("text", description="The field holding a document in JSONL and Parquet files.")
    shard_tokens: int = Field(1 << 24, ge=1024, description="Tokens per shard file of the tokenized corpus.")
    prompts: list[str] = Field(
        default_factory=lambda: ["The"], description="Fixed prompts continued greedily at each evaluation (samples).")
    sample_tokens: int = Field(48, ge=1, le=MAX_TOKENS_GENERATED, description="Tokens generated per sample.")


Method = Literal["sft", "dpo", "orpo", "simpo", "kto", "reward", "grpo", "pretrain"]
Task = Literal["causal_lm", "classification", "embedding", "image_classification"]


class Config(_Strict):
    base_model: str = Field(
        "smollm2-135m-instruct",
        description="Built-in name, a local Hugging Face folder, or a local .gguf file.",
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with the weights. Off unless you trust it.")
    chat_template: str = Field(
        "auto",
        description='"auto" (the model\'s own), a built-in name (chatml, llama3), a .jinja file, or inline Jinja.',
    )
    task: Task = Field(
        "causal_lm",
        description="What the model learns to do: causal_lm (chat and text, trained by `method`), classification "
        "(text labels), embedding (sentence vectors) or image_classification. Each task is a row of "
        "methods/facts.py; `method` applies to causal_lm only.",
    )
    method: Method = Field("sft", description="Training objective: sft, dpo, orpo, simpo, kto, reward, grpo or pretrain.")
    dpo: DPOSpec = Field(default_factory=DPOSpec)
    orpo: ORPOSpec = Field(default_factory=ORPOSpec)
    simpo: SimPOSpec = Field(default_factory=SimPOSpec)
    kto: KTOSpec = Field(default_factory=KTOSpec)
    reward: RewardSpec = Field(default_factory=RewardSpec)
    classification: ClassificationSpec = Field(
        default_factory=ClassificationSpec, description="task: classification: how predictions are made and reported.")
    image_classification: ImageClassificationSpec = Field(
        default_factory=ImageClassificationSpec, description="Options of task: image_classification.")
    grpo: GRPOSpec | None = Field(None, description="Required with method: grpo.")
    pretrain: PretrainSpec = Field(
        default_factory=PretrainSpec, description="method: pretrain: raw text, loss on every token (docs/pretrain.md)."
    )
    init: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="pretrained: start from base_model's weights; random: build base_model's architecture (llama, "
        "qwen2, or a folder / config.json) at the size of `architecture`, with a seeded normal initialisation; "
        "for task: image_classification, vit or a ViT-family config.json, with transformers' own seeded "
        "initialisation.",
    )
    architecture: ArchitectureSpec | None = Field(None, description="init: random only: the model's size.")
    tokenizer: TokenizerSpec | None = Field(
        None, description="init: random only: the tokenizer (reuse or train); default the folder's own.")
    embedding: EmbeddingSpec = Field(default_factory=EmbeddingSpec, description="task: embedding settings.")
    stages: list[dict[str, Any]] | None = Field(
        None, description="Run several methods in a chain, e.g. [{method: sft, ...}, {method: dpo, ...}]; each "
        "stage overrides keys of this config and starts from the previous stage's result.",
    )
    adapter: Literal["lora", "qlora", "full"] = Field(
        "lora",
        description="lora: a LoRA adapter on the frozen base; qlora: the same on a base quantized to 4 or 8 bits "
        "(bitsandbytes; see quantization); full: every weight trains (see freeze).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The adapter (adapter: lora or qlora).")
    quantization: QuantizationConfig | None = Field(
        None, description="How the frozen base is quantized; only with adapter: qlora (defaults to 4-bit NF4, double quant)."
    )
    freeze: list[str] = Field(
        default_factory=list,
        description='adapter: full only: weights kept frozen, by module name (embed_tokens, lm_head), glob over '
        'parameter names ("*.self_attn.*") or decoder-layer range ("layers.0-11"). Each must match something.',
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw",
        description="adamw (torch); adamw_8bit keeps the moments in 8 bits (bitsandbytes); paged_adamw_8bit also "
        "pages them to CPU memory under GPU memory pressure (CUDA only; plain 8-bit elsewhere).",
    )
    datasets: list[DatasetSpec] = Field(min_length=1, description="Training files.")
    validation: ValidationSpec | None = Field(None, description="Held-out data for val loss and before/after eval.")
    max_seq_len: int = Field(2048, ge=8, le=MAX_SEQ_LEN, description="Longest tokenized example.")
    truncation: Literal["drop", "truncate_right", "truncate_left", "error"] = Field(
        "drop", description="What happens to an example longer than max_seq_len; every case is counted."
    )
    train_on_inputs: bool = Field(False, description="Also train on system/user tokens, not only assistant turns.")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="error: stop before training; skip: write each to <output_dir>/rejected.jsonl."
    )
    max_bad_fraction: float = Field(
        0.1, ge=0, le=1, description="With on_bad_record: skip, stop if more than this share of records is bad."
    )
    micro_batch_size: int = Field(4, ge=1, le=MAX_MICRO_BATCH, description="Examples run through the model together.")
    grad_accum: int = Field(1, ge=1, le=1 << 16, description="Micro-batches per optimizer step, in each process.")
    global_batch_size: int | None = Field(
        None, ge=1, le=1 << 24,
        description="Examples per optimizer step over all processes; grad_accum is then derived as global_batch_size "
        "/ (micro_batch_size x processes), so the same steps are taken on any number of processes (and a run "
        "can resume on another number). Give this or grad_accum, not both.",
    )
    epochs: float | None = Field(None, gt=0, description="Passes over the data (give this or max_steps).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    learning_rate: float = Field(
        2e-4, gt=0, description="Peak learning rate. One far outside the usual range for the method and adapter "
        "is flagged before step 1 (see diagnose); the run still starts, since the check is advice, not a rule.")
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Used when warmup_steps is not given.")
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp32."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: true means "
                                         "performance.activation_checkpointing: full (a level set there wins).")
    performance: PerformanceSpec = Field(default_factory=PerformanceSpec)
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seeds the data order, the split and the adapter's init.")
    output_dir: str = Field("runs/run", description="Relative to the config file.")
    eval_every: int | None = Field(None, ge=1, description="Steps between validation-loss evaluations.")
    save_every: int | None = Field(None, ge=1, description="Steps between checkpoints (one is always written at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="`auto`: the task's default.")
    prepare: PrepareSpec = Field(default_factory=PrepareSpec)
    # Tracking and live diagnosis (docs/tracking.md).
    track: TrackSpec = Field(default_factory=TrackSpec, description="Metric back-ends; a list is short for {to: [...]}.")
    diagnose: DiagnoseSpec = Field(default_factory=DiagnoseSpec)
    on_divergence: Literal["stop", "rollback"] = Field(
        "stop", description="When the loss explodes or is NaN/inf: stop cleanly, or reload the last checkpoint with half the learning rate."
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        None, description="Stop when the validation metric has not improved for `patience` evaluations; final/ is the best one."
    )
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Training on several processes (docs/distributed.md)."
    )

    @field_validator("evaluation", mode="before")
    @classmethod
    def _evaluation_auto(cls, value):
        return {} if value == "auto" else value

    @field_validator("performance", mode="before")
    @classmethod
    def _performance_mode(cls, value):
        if isinstance(value, bool):  # YAML reads a bare off/on as a boolean
            value = "auto" if value else "off"
        return {"mode": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_choice_of_final(self) -> "Config":
        if self.early_stopping is not None and self.evaluation.select_best is not None:
            raise ValueError("early_stopping and evaluation.select_best both choose final/; keep one of them")
        if self.evaluation.select_best is not None and self.validation is None:
            raise ValueError("evaluation.select_best scores the checkpoints on held-out data; add `validation: "
                             "{split: 0.1}` or `{path: FILE}`")
        return self

    @model_validator(mode="after")
    def _length(self) -> "Config":
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1.0
        return self

    @model_validator(mode="after")
    def _method(self) -> "Config":
        if self.task != "causal_lm" and "method" in self.model_fields_set and self.method != "sft":
            raise ValueError(f"method: {self.method} trains a causal language model, but task is {self.task}; "
                             "remove `method` (the task has its own objective) or set task: causal_lm")
        if self.method == "grpo" and self.grpo is None:
            raise ValueError("method: grpo needs a `grpo:` section with at least `rewards:` "
                             "(e.g. grpo: {rewards: [{function: exact_match}]})")
        if self.method == "kto" and self.micro_batch_size < 2:
            raise ValueError("method: kto estimates its KL term from mismatched pairs inside each micro-batch; "
                             "set micro_batch_size: 2 or more")
        return self

    @model_validator(mode="after")
    def _adapter_keys(self) -> "Config":
        if self.adapter == "qlora" and self.quantization is None:
            self.quantization = QuantizationConfig()
        if self.adapter != "qlora" and self.quantization is not None:
            raise ValueError(f"quantization: only used with adapter: qlora (a LoRA adapter on a quantized base), "
                             f"but adapter is {self.adapter}; remove the quantization section or set adapter: qlora")
        if self.adapter == "qlora" and self.lora.changes_base:
            raise ValueError(f"lora.init: {self.lora.init} rewrites the base weights, which a quantized base cannot "
                             "hold exactly; use adapter: lora with it, or another lora.init with qlora")
        if self.freeze and self.adapter != "full":
            raise ValueError(f"freeze: only used with adapter: full (under {self.adapter} the base is frozen and only "
                             "the adapter trains); remove freeze, or use lora.layers / lora.target_modules")
        if self.adapter == "full" and self.lora.plus_ratio is not None:
            raise ValueError("lora.plus_ratio: LoRA+ sets the learning rate of LoRA's B matrices, and adapter: full "
                             "has none; remove it or use adapter: lora / qlora")
        return self

    @model_validator(mode="after")
    def _ratios(self) -> "Config":
        ratios = [d.ratio for d in self.datasets if d.ratio is not None]
        if sum(ratios) >= 1:
            raise ValueError(f"datasets: the ratios add up to {sum(ratios):g}; they must leave room for the other data (< 1)")
        if ratios and len(ratios) == len(self.datasets):
            raise ValueError("datasets: give at least one dataset without `ratio`; ratios are shares next to it")
        return self

    @model_validator(mode="after")
    def _batch(self) -> "Config":
        if self.global_batch_size is None:
            return self
        if self.grad_accum != 1:  # 1 is the default, and what a saved run.json config holds
            raise ValueError("give global_batch_size or grad_accum, not both: grad_accum is derived from "
                             "global_batch_size / (micro_batch_size x processes)")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size: {self.global_batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}; use a multiple such as {2 * self.micro_batch_size}")
        return self

    @model_validator(mode="after")
    def _distributed(self) -> "Config":
        strategy = self.distributed.strategy
        if strategy in ("ddp", "fsdp"):
            check_distributable(self, f"distributed.strategy: {strategy}", strategy)
        if strategy == "fsdp" and self.adapter == "qlora":
            # R-DIST-3: FSDP shards every weight of a layer as one dtype, so the packed 4-bit weights are
            # stored in the compute dtype instead of uint8, set here rather than failing while loading.
            if self.quantization.storage == "uint8":
                raise ValueError("quantization.storage: uint8 cannot be sharded by distributed.strategy: fsdp; "
                                 "remove it (auto stores the 4-bit weights in the compute dtype) or use ddp")
            self.quantization.storage = "compute"
        return self

    @model_validator(mode="after")
    def _init(self) -> "Config":
        if self.init == "pretrained" and (self.architecture is not None or self.tokenizer is not None):
            raise ValueError("architecture and tokenizer: only used with init: random (a pretrained model keeps its "
                             "own size and tokenizer); remove them, or set init: random")
        arch = self.architecture
        if arch is not None and self.task != "image_classification" and (arch.image_size or arch.patch_size):
            raise ValueError(f"architecture.image_size and patch_size: only for task: image_classification (a ViT), "
                             f"but task is {self.task}; remove them")
        if self.init == "random" and self.adapter != "full":
            raise ValueError(f"init: random trains every weight from scratch, but adapter is {self.adapter} (which "
                             "freezes the random base); set adapter: full")
        return self

    @model_validator(mode="after")
    def _early_stopping(self) -> "Config":
        if self.early_stopping and (self.validation is None or self.eval_every is None):
            raise ValueError("early_stopping watches validation metrics: give `validation:` and `eval_every:` too")
        return self


def frozen_reference(cfg: Config) -> bool:
    """Whether the method compares against a second, frozen copy of the base model: full fine-tuning
    of KTO, or of DPO without precomputed or uniform reference log-probs (LoRA switches its adapter off)."""
    return cfg.adapter == "full" and method_facts(cfg).reference == "model"


def check_distributable(cfg: Config, why: str, strategy: str = "auto") -> None:
    """What several processes cannot train yet; `why` names what asked for them (a key or the launch),
    `strategy` the distributed.strategy chosen (auto: not known yet)."""
    if cfg.task == "embedding":
        raise ValueError(f"task: embedding trains in one process for now ({why}): its prepared pairs are not cached "
                         "for other processes to read, and in-batch negatives would stay within each process; "
                         "run it without torchrun / distributed settings")
    if strategy == "fsdp" and frozen_reference(cfg):
        if cfg.method == "dpo":
            fix = "set dpo.precompute_reference: true (the reference log-probs are computed once before training), "
        elif cfg.method == "grpo":
            fix = "set grpo.beta: 0 (no KL term, no reference), "
        else:
            fix = ""
        raise ValueError(f"method: {cfg.method} with adapter: full compares against a frozen copy of the base model, "
                         f"which distributed.strategy: fsdp does not shard ({why}); {fix}use adapter: lora (the "
                         "reference is the adapter-disabled model), or distributed.strategy: ddp")
    if strategy == "fsdp" and cfg.lora.changes_base and cfg.adapter != "full":
        # final/ is converted back to plain LoRA (PEFT subtracts the initial adapter) inside one PEFT model
        # holding both adapters whole; a sharded model holds neither.
        raise ValueError(f"lora.init: {cfg.lora.init} is not supported with distributed.strategy: fsdp yet ({why}): "
                         "the saved adapter is converted back to plain LoRA, which needs the whole adapter in one "
                         "process; use distributed.strategy: ddp, or lora.init: default or gaussian")


# Keys users bring from other tools, mapped to ours.
ALIASES = {
    "lora_r": "lora.r", "lora_rank": "lora.r", "rank": "lora.r", "r": "lora.r",
    "lora_alpha": "lora.alpha", "alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "target_modules": "lora.target_modules", "lora_target_modules": "lora.target_modules",
    "lr": "learning_rate", "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "model": "base_model", "model_name_or_path": "base_model", "template": "chat_template",
    "sequence_len": "max_seq_len", "max_length": "max_seq_len", "lr_scheduler": "scheduler",
    "lr_scheduler_type": "scheduler", "dataset": "datasets", "val_set_size": "validation.split",
    "warmup": "warmup_steps", "save_steps": "save_every", "eval_steps": "eval_every",
    "save_total_limit": "keep_last", "output": "output_dir", "dtype": "precision",
    "load_in_4bit": "quantization.bits", "load_in_8bit": "quantization.bits", "bits": "quantization.bits",
    "bnb_4bit_quant_type": "quantization.quant_type", "bnb_4bit_use_double_quant": "quantization.double_quant",
    "use_rslora": "lora.use_rslora", "use_dora": "lora.use_dora", "init_lora_weights": "lora.init",
    "loraplus_lr_ratio": "lora.plus_ratio", "layers_to_transform": "lora.layers", "optim": "optimizer",
    "bnb_4bit_quant_storage": "quantization.storage", "fsdp": "distributed.strategy", "ddp": "distributed.strategy",
    "ddp_timeout": "distributed.timeout_minutes", "ddp_backend": "distributed.backend",
}


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        for sub in getattr(ann, "__args__", ()) + (ann,):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                keys += _all_keys(sub, prefix + name + ".")
    return keys


def suggest_key(bad: str, where: str = "") -> str | None:
    """The closest valid key for a misspelt or foreign one."""
    leaf = bad.lower()
    if leaf in ALIASES:
        return ALIASES[leaf]
    keys = _all_keys(Config)
    scope = [k[len(where) + 1 :] for k in keys if where and k.startswith(where + ".")] if where else keys
    candidates = scope + list(ALIASES)
    match = difflib.get_close_matches(leaf, candidates, n=1, cutoff=0.6)
    if not match:
        return None
    best = match[0]
    if best in ALIASES:
        return ALIASES[best]
    return f"{where}.{best}" if where else best


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_errors(err: ValidationError) -> list[tuple[str, str]]:
    """(dotted key, what is wrong with it) for each problem, a misspelt key with the closest valid one."""
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = _loc(loc)
        if e["type"] == "extra_forbidden":
            parent = _loc(tuple(p for p in loc[:-1] if not isinstance(p, int)))
            hint = suggest_key(str(loc[-1]), parent)
            tip = f" did you mean {hint}?" if hint else " it is not a tuneforge key (see `tuneforge validate --help`)."
            out.append((key, f"unknown key;{tip}"))
        elif e["type"] == "missing":
            out.append((key, "required key is missing"))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            out.append((key, f"{msg} (got {e.get('input')!r})" if key else msg))
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    lines += [f"  {key}: {message}" if key else f"  {message}" for key, message in validation_errors(err)]
    return "\n".join(lines)


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` inside a raw config dict, making sections on the way (--set, sweeps, the studio)."""
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`--set lora.r=32` pairs; values are read as YAML scalars (32 -> int, true -> bool)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lora.r=32")
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = yaml.load(value, Loader=_UniqueKeyLoader) if value.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {getattr(err, 'problem', err)}; "
                              "quote it, e.g. --set 'lora.target_modules=[q_proj, v_proj]'") from None
    return out


def looks_like_path(value: str) -> bool:
    """Whether a config value names a file or folder rather than a built-in name (paths, model files)."""
    return value.startswith((".", "/", "~")) or value.endswith((".gguf", ".jinja", ".jsonl", ".json")) or "/" in value


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def resolve_paths(cfg: Config, base: Path) -> Config:
    """Paths in the config are relative to the config file, not to the shell's folder."""
    for ds in cfg.datasets:
        ds.path = _resolve(ds.path, base)
    if cfg.validation and cfg.validation.path:
        cfg.validation.path = _resolve(cfg.validation.path, base)
    cfg.output_dir = _resolve(cfg.output_dir, base)
    if cfg.embedding.corpus:
        cfg.embedding.corpus = _resolve(cfg.embedding.corpus, base)
    if looks_like_path(cfg.base_model) and not Path(cfg.base_model).is_absolute():
        candidate = base / cfg.base_model
        if candidate.exists() or cfg.base_model.startswith("."):
            cfg.base_model = str(candidate.resolve())
    if cfg.chat_template.endswith(".jinja"):
        cfg.chat_template = _resolve(cfg.chat_template, base)
    resolve_evaluation_paths(cfg.evaluation, base)
    if cfg.grpo is not None:  # file.py:function names a file beside the config
        for reward in cfg.grpo.rewards:
            reward.function = _resolve_function(reward.function, base)
        if cfg.grpo.environment:
            cfg.grpo.environment = _resolve_function(cfg.grpo.environment, base)
    return cfg


def resolve_evaluation_paths(spec: EvaluationSpec, base: Path) -> EvaluationSpec:
    """The suite's files (user metrics, judge prompt, general text, task folder) are relative to its own file."""
    for entry in spec.suite:
        entry.metric = _resolve_function(entry.metric, base)
    if spec.judge and spec.judge.prompt:
        spec.judge.prompt = _resolve(spec.judge.prompt, base)
    if spec.forgetting:
        spec.forgetting.path = _resolve(spec.forgetting.path, base)
    if spec.lm_eval and spec.lm_eval.include_path:
        spec.lm_eval.include_path = _resolve(spec.lm_eval.include_path, base)
    return spec


def _resolve_function(name: str, base: Path) -> str:
    path, sep, attr = name.rpartition(":")
    return f"{_resolve(path, base)}:{attr}" if sep and path.endswith(".py") else name


def config_from_dict(raw: dict, source: str = "<config>", base: Path | None = None) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    return resolve_paths(cfg, base or Path.cwd())


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a config that sets a key twice is refused instead."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                earlier = first.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if earlier is not None:
                lines = f"lines {earlier} and {line}" if earlier != line else f"line {line}"
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is set twice ({lines}); keep one", key_node.start_mark)
            first[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, what: str = "config file") -> object:
    """A YAML file's contents; a missing file, a file that is not UTF-8 text, a key set twice or a syntax
    error is a ConfigError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    text = read_utf8(path, ConfigError, f"give a YAML {what} saved as UTF-8")
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise ConfigError(f"{path}:{line}: not a text file (it holds NUL bytes); give a YAML {what}")
    return parse_yaml(text, str(path))


def parse_yaml(text: str, where: str) -> object:
    """YAML text (a file's, or one pasted into the studio's page); a key set twice or a syntax error is a
    ConfigError naming `where` and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        place = f"{where}:{mark.line + 1}" if mark else where
        raise ConfigError(f"{place}: not valid YAML: {getattr(err, 'problem', err)}") from None


def apply_overrides(raw: object, overrides: list[str] | None) -> object:
    """`--set KEY=VALUE` pairs laid over a raw config, before it is validated like the rest."""
    if isinstance(raw, dict):
        for key, value in parse_overrides(overrides).items():
            set_dotted(raw, key, value)
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides)
    return config_from_dict(raw, str(path), path.resolve().parent)


def config_to_dict(cfg: Config) -> dict:
    return cfg.model_dump(mode="json")
