"""The sizes of a decoder-only transformer, and what follows from them alone: parameter counts
per kind of weight and the shapes LoRA adapts. No weights are read, ever.

Every architecture plan knows is a Llama-style decoder: token embeddings, `layers` blocks of
grouped-query attention (q, k, v, o projections) and a gated MLP (gate, up, down), RMS norms, and
an output head that may share the embedding matrix. The variants that change the count are
fields: biases on q/k/v (Qwen2), four norms a block (Gemma 2/3), norms on q and k (Qwen3, Gemma 3).
"""

from __future__ import annotations

from dataclasses import dataclass

# The projections of one block, in the order PEFT's "all-linear" finds them.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What plan needs to know of a model: its sizes (from config.json, a GGUF header or the table)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int = 0  # 0: hidden // heads
    qkv_bias: bool = False
    norms_per_layer: int = 2
    qk_norm: bool = False
    name: str = ""
    # A score head of this many outputs (a classifier or reward model) in place of the language-model head.
    score_outputs: int = 0
    bidirectional: bool = False  # attention over the whole sequence (plan/encoders.py); a decoder's is causal

    def __post_init__(self) -> None:
        if not self.head_dim:  # most configs leave it out: hidden_size / num_attention_heads
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def dim(self) -> int:
        """Width of one attention head."""
        return self.head_dim

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one block."""
        h, q, kv, i = self.hidden, self.heads * self.dim, self.kv_heads * self.dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        """Weights of the linear layers of all blocks: what QLoRA quantises."""
        return self.layers * sum(i * o for i, o in self.projections().values())

    def embedding_params(self) -> int:
        """The token embedding, plus the output head when it is a separate matrix."""
        if self.score_outputs:
            return self.vocab * self.hidden + self.output_head_params()
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def output_head_params(self) -> int:
        """The output layer's weight: the language-model head (tied or not), or a score head."""
        return self.hidden * (self.score_outputs or self.vocab)

    def logit_count(self, sequences: int, seq_len: int) -> int:
        """Logits of a micro-batch: every position gets one per output (a score head, too, before one is read)."""
        return sequences * seq_len * (self.score_outputs or self.vocab)

    def small_params(self) -> int:
        """Norm weights and biases: too small to quantise, counted so the total is exact."""
        per_layer = self.norms_per_layer * self.hidden
        if self.qk_norm:
            per_layer += 2 * self.dim
        if self.qkv_bias:
            per_layer += (self.heads + 2 * self.kv_heads) * self.dim
        return self.layers * per_layer + self.hidden  # + the final norm

    def params(self) -> int:
        """All parameters, as `sum(p.numel() for p in model.parameters())` counts them."""
        return self.layer_linear_params() + self.embedding_params() + self.small_params()

    def matmul_params(self) -> int:
        """Weights that take part in a matrix multiply for every token: the blocks' linear layers
        and the output head (an embedding lookup costs no FLOPs; a tied head still multiplies)."""
        return self.layer_linear_params() + self.output_head_params()

    def lora_modules(self, targets: str | tuple[str, ...] | list[str]) -> dict[str, tuple[int, int]]:
        """The projections a LoRA config adapts: "all-linear" (every linear layer but the output
        head, as PEFT does) or a list of names; names no block has are left out."""
        shapes = self.projections()
        if isinstance(targets, str):
            if targets == "all-linear":
                return shapes
            targets = [targets]
        return {name: shapes[name] for name in targets if name in shapes}

    def lora_params(self, r: int, targets: str | tuple[str, ...] | list[str]) -> int:
        """Adapter parameters: r x (in + out) for A and B of every adapted projection of every block, and a
        score head, which PEFT trains and saves whole."""
        adapters = self.layers * sum(r * (i + o) for i, o in self.lora_modules(targets).values())
        return adapters + (self.output_head_params() if self.score_outputs else 0)
