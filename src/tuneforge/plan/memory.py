"""Peak training memory from the model's shape and the run's settings, as tuneforge trains.

What is counted is what the loop keeps alive: the base weights in the dtype tuneforge loads them
in (models.load.weights_dtype), the adapter, AdamW's two moments, fp32 gradients of what trains,
the tensors autograd saves for the backward pass, and the logits with their fp32 loss copies.
The saved-tensor counts follow the Hugging Face Llama-style block with SDPA attention (no s x s
score matrix); docs/plan.md walks through them. Calibration (bench/PLAN_CALIBRATION.md) checks
the sum against measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.fast import default_chunk
from tuneforge.plan.encoders import EncoderShape
from tuneforge.plan.shapes import ModelShape

HALF = ("bf16", "fp16")
# Logits: the loss reads them as fp32. At the peak (log-softmax's backward) its saved output, the
# incoming gradient and the outgoing gradient are alive: three fp32 tensors of positions x vocab.
LOGIT_BYTES = 12
NF4_BLOCK = 64  # weights per absmax constant in bitsandbytes' 4-bit formats
DOUBLE_QUANT_BLOCK = 256  # absmax constants per fp32 constant when they are themselves quantised
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw_8bit": 2 + 2 * 4 / 256, "paged_adamw_8bit": 2 + 2 * 4 / 256}
# Where tuneforge chooses by a predicted peak (distributed.strategy auto, activation checkpointing auto), the
# peak may take this share of a GPU's total memory; the rest is the plan's margin for what it does not model.
FIT_SHARE = 0.9


@dataclass(frozen=True)
class Settings:
    """The choices of a run that change its memory and speed, and what kind of training it is."""

    adapter: str = "lora"  # lora | qlora | full
    bits: int = 4  # qlora: 4 (NF4) or 8 (LLM.int8)
    double_quant: bool = True
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit
    lora_r: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    lora_dropout: float = 0.0
    micro_batch: int = 4
    rows: int = 1  # sequences per example: 2 for a preference pair, the group size for GRPO
    grad_accum: int = 1
    seq_len: int = 2048  # width of the longest micro-batch, in tokens
    checkpointing: bool = False  # activation checkpointing of decoder layers (full, unless the two below)
    checkpoint_every: int = 1  # with checkpointing: layers 0, k, 2k, ... (1: every layer; more: selective)
    offload: bool = False  # with checkpointing: the checkpointed layers' inputs wait in pinned CPU memory
    # "given": the three above are the run's; "budget" (auto) and "lean" (min_memory): each device chooses
    # them (plan.recompute.for_device), as the loop does on the GPU it runs on.
    checkpoint_choice: str = "given"
    precision: str = "auto"  # the config's: auto | bf16 | fp16 | fp32
    padded: bool = True  # batches carry a padding mask (examples differ in length)
    chunked_loss: bool = False  # performance.chunked_loss: the output layer a chunk of positions at a time
    # performance.kernels: the fused RMSNorm and gated MLP keep less for the backward (fast/kernels);
    # None: the default, on for a GPU (Triton compiles them there), off for a CPU (plan.recompute.for_device).
    kernels: bool | None = False
    # What plan's words and learning-rate advice need beyond memory and speed (methods/learning_rates.py):
    # init: random builds the model from random weights; family is the method's lr_family (methods/facts.py).
    init: str = "pretrained"
    family: str = "sft"


@dataclass(frozen=True)
class Memory:
    """Bytes by kind, and the peak they add up to."""

    weights: float
    adapter: float
    optimizer: float
    gradients: float
    activations: float
    logits: float
    peak: float

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("weights", "adapter", "optimizer", "gradients", "activations", "logits", "peak")}


def compute_dtype(precision: str, is_cpu: bool) -> str:
    """The matmul dtype tuneforge's pick_dtype chooses: auto is bf16 on a GPU, fp32 on a CPU."""
    if precision == "auto":
        return "fp32" if is_cpu else "bf16"
    return precision


def compute_bytes(compute: str) -> int:
    """Bytes of an activation: the matmuls' dtype."""
    return 2 if compute in HALF else 4


def weight_bytes(adapter: str, compute: str) -> int:
    """Bytes of a stored base weight, as models.load.weights_dtype: a frozen base is kept in the
    compute dtype (fp32 under fp16, which cannot hold it safely); trained weights stay fp32."""
    return 2 if adapter != "full" and compute == "bf16" else 4


def trainable_params(shape: ModelShape, s: Settings) -> int:
    return shape.params() if s.adapter == "full" else shape.lora_params(s.lora_r, s.lora_targets)


def quantized_bytes(shape: ModelShape, bits: int, double_quant: bool) -> float:
    """The blocks' linear weights under bitsandbytes: NF4 packs two weights a byte plus an fp32
    absmax per 64 (with double quantisation an 8-bit absmax and an fp32 constant per 256 of those);
    LLM.int8 stores a byte a weight and an fp32 scale per output row."""
    n = shape.layer_linear_params()
    if bits == 8:
        rows = shape.layers * sum(out for _, out in shape.projections().values())
        return n + 4 * rows
    constants = (1 / NF4_BLOCK + 4 / (NF4_BLOCK * DOUBLE_QUANT_BLOCK)) if double_quant else 4 / NF4_BLOCK
    return n * (0.5 + constants)


def weights_memory(shape: ModelShape, s: Settings, compute: str) -> float:
    """The base model as stored: quantised blocks under QLoRA, else every weight at weight_bytes."""
    wb = weight_bytes(s.adapter, compute)
    if s.adapter == "qlora":
        return quantized_bytes(shape, s.bits, s.double_quant) + (shape.params() - shape.layer_linear_params()) * wb
    return shape.params() * wb


def _norm_bytes(h: int, cb: int, full: bool) -> int:
    """An RMS norm keeps its input upcast to fp32 and, when its weight trains, the normalised
    input for that weight's gradient; the next linear layer keeps the output in the compute dtype."""
    return 4 * h + (4 * h if full else 0) + cb * h


def _fused_norm_bytes(h: int, rb: int) -> int:
    """The fused RMSNorm keeps its input (in the residual stream's dtype) and one fp32 number a token;
    its weight's gradient is recomputed from them."""
    return rb * h + 4


def layer_token_bytes(shape: ModelShape, s: Settings, compute: str) -> float:
    """Bytes one block saves for backward, per token, without checkpointing."""
    if shape.bidirectional:
        return encoder_layer_token_bytes(shape, s, compute)
    cb = compute_bytes(compute)
    full = s.adapter == "full"
    h, q = shape.hidden, shape.heads * shape.dim
    # With a padding mask, transformers repeats k and v to every head before SDPA (repeat_kv).
    kv = (shape.heads if s.padded else shape.kv_heads) * shape.dim
    if s.kernels:  # the two norms before a linear layer: that layer keeps their output (cb * h) too
        rb = residual_bytes(s, compute)
        norms = 2 * (_fused_norm_bytes(h, rb) + cb * h) + (shape.norms_per_layer - 2) * _fused_norm_bytes(h, rb)
    else:
        norms = 2 * _norm_bytes(h, cb, full) + (shape.norms_per_layer - 2) * (4 * h + (4 * h if full else 0))
    attention = cb * (3 * q + 2 * kv)  # rotated q, k, v for SDPA, its output, and o_proj's contiguous input
    if shape.qk_norm:
        attention += 4 * (q + shape.kv_heads * shape.dim) * (2 if full else 1)
    # gate, act(gate), up, act(gate) * up; the fused activation recomputes act(gate) in its backward
    mlp = (3 if s.kernels else 4) * cb * shape.intermediate
    return norms + attention + mlp + lora_token_bytes(shape, s, cb)


def lora_token_bytes(shape: ModelShape, s: Settings, cb: int) -> float:
    """What the adapters of one block keep: A's output, and with dropout its mask and dropped input."""
    if s.adapter == "full":
        return 0.0
    return sum(cb * s.lora_r + ((cb + 1) * in_features if s.lora_dropout > 0 else 0)
               for in_features, _ in shape.lora_modules(s.lora_targets).values())


def encoder_layer_token_bytes(shape: EncoderShape, s: Settings, compute: str) -> float:
    """Bytes one encoder block saves for backward, per token, as measured with autograd's saved-tensor hooks
    (tests/test_plan_encoders.py). Attention is bidirectional through SDPA, which keeps q, k, v, its output
    (also o's input) and a logsumexp per head, never the scores; rotary positions keep the rotated q and k too.
    Each LayerNorm keeps its fp32 input, mean and rstd; the MLP's first layer keeps a norm's output; a GELU MLP
    keeps the activation's input and output, a gated one (ModernBERT) the first layer's output, the activation
    and the product. With dropout (BERT's hidden_dropout_prob), a one-byte mask after attention and after the
    MLP (CUDA's; a CPU keeps them in the compute dtype)."""
    cb = compute_bytes(compute)
    h, i = shape.hidden, shape.intermediate
    attention = cb * (7 if shape.rotary else 5) * h + 4 * shape.heads
    norms = 2 * (4 * h + 8) + cb * h
    mlp = cb * i * (4 if shape.glu else 2)
    dropout = 2 * h if shape.dropout else 0
    return attention + norms + mlp + dropout + lora_token_bytes(shape, s, cb)


def residual_bytes(s: Settings, compute: str) -> int:
    """The residual stream's dtype follows the embedding weights (fp32 when they train)."""
    return weight_bytes(s.adapter, compute)


def working_copies(shape: ModelShape, s: Settings, compute: str) -> float:
    """Weights in the compute dtype that live through forward and backward: autocast's casts of
    fp32 weights (kept for the backward pass; one block's worth under checkpointing), or the one
    matrix bitsandbytes dequantises at a time under QLoRA."""
    cb = compute_bytes(compute)
    largest = max(i * o for i, o in shape.projections().values())
    if s.adapter == "qlora":
        return largest * cb
    if weight_bytes(s.adapter, compute) == 4 and compute in HALF:
        blocks = shape.layer_linear_params() * live_layers(shape, s) // shape.layers
        return cb * (blocks + shape.output_head_params())
    return 0.0


def checkpointed_layers(shape: ModelShape, s: Settings) -> int:
    """Decoder layers that keep only their input: layers 0, k, 2k, ... (fast/recompute.py picks the same)."""
    return -(-shape.layers // s.checkpoint_every) if s.checkpointing else 0


def live_layers(shape: ModelShape, s: Settings) -> int:
    """Layers whose activations are alive at the start of the backward pass: those not checkpointed, and the
    last layer when it is checkpointed (recomputed first, while the others still hold theirs)."""
    every = s.checkpoint_every
    recomputed = 1 if s.checkpointing and (shape.layers - 1) % every == 0 else 0
    return shape.layers - checkpointed_layers(shape, s) + recomputed


def offloaded_bytes(shape: ModelShape, s: Settings, compute: str) -> float:
    """Pinned CPU memory that offload fills: every checkpointed layer's input, in the residual dtype."""
    if not (s.checkpointing and s.offload):
        return 0.0
    tokens = s.micro_batch * s.rows * s.seq_len
    return tokens * checkpointed_layers(shape, s) * residual_bytes(s, compute) * shape.hidden


def activation_memory(shape: ModelShape, s: Settings, compute: str) -> float:
    """Everything autograd keeps for the backward pass of one micro-batch, logits aside."""
    cb = compute_bytes(compute)
    tokens = s.micro_batch * s.rows * s.seq_len
    per_layer = layer_token_bytes(shape, s, compute)
    final_norm = _norm_bytes(shape.hidden, cb, s.adapter == "full")
    # A checkpointed block keeps only its input, one block is recomputed at a time; offload moves the inputs
    # to CPU memory and brings back one at a time.
    inputs = min(1, checkpointed_layers(shape, s)) if s.offload else checkpointed_layers(shape, s)
    masked_layers = live_layers(shape, s)
    per_token = masked_layers * per_layer + inputs * residual_bytes(s, compute) * shape.hidden + final_norm
    # A padding mask is one bool (b, 1, s, s) tensor, which SDPA turns into an additive mask in the
    # compute dtype and keeps for backward in every block.
    mask = s.micro_batch * s.rows * s.seq_len**2 * (1 + cb * masked_layers) if s.padded else 0
    return tokens * per_token + mask + working_copies(shape, s, compute)


def logits_memory(shape: ModelShape, s: Settings) -> float:
    """The logits and their fp32 loss copies; with the chunked loss, one chunk's fp32 logits and
    softmax, and the gradient of every position's hidden state, which the chunks leave behind."""
    positions = s.micro_batch * s.rows * s.seq_len
    if not s.chunked_loss:
        return shape.logit_count(s.micro_batch * s.rows, s.seq_len) * LOGIT_BYTES
    return min(positions, default_chunk(shape.vocab)) * shape.vocab * 8.0 + positions * shape.hidden * 4.0


def memory(shape: ModelShape, s: Settings, compute: str) -> Memory:
    """The peak. Weights, adapter and optimizer state stay. Gradients appear as backward frees the
    activations, so with one micro-batch a step the larger of the two ends of backward counts:
    its start, where every activation and the logits are alive and the output head's weight
    gradient is allocated; or its end, where all gradients are, and a tied embedding receives its
    second, dense gradient before it is added to the first. With accumulation, the gradients of
    earlier micro-batches sit beside the next one's activations."""
    trainable = trainable_params(shape, s)
    weights = weights_memory(shape, s, compute)
    adapter = 0.0 if s.adapter == "full" else trainable * 4.0  # PEFT keeps adapters in fp32
    optimizer = trainable * OPTIMIZER_BYTES[s.optimizer]
    gradients = trainable * 4.0
    activations = activation_memory(shape, s, compute)
    logits = logits_memory(shape, s)
    head_grad = shape.output_head_params() * 4.0 if s.adapter == "full" else 0.0
    start = activations + logits + head_grad + (gradients if s.grad_accum > 1 else 0.0)
    end = gradients + (head_grad if shape.tied else 0.0)
    return Memory(weights, adapter, optimizer, gradients, activations, logits,
                  weights + adapter + optimizer + max(start, end))
