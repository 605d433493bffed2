"""The sizes of an encoder (BERT, MiniLM, RoBERTa, ModernBERT, ViT), read from its config.json: what plan
needs to count its parameters and its memory. No weights are read.

An encoder differs from the decoders of plan/shapes.py where the count and the memory change: learned
position (and token type) embeddings or a patch projection in place of a vocabulary, biases and
LayerNorms, a plain or gated MLP, a pooler and a classification head instead of a language-model
head, and attention over the whole sequence rather than half of it. The head follows the task:
the bare encoder (`encoder`, what embeddings train, with the pooler AutoModel builds), a sequence
classifier (`classifier`) or an image classifier (`image_classifier`), each with `labels` outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.errors import ModelError

BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "deberta", "deberta-v2", "mpnet", "ernie"}
VISION = {"vit", "deit", "dinov2"}
ENCODER_TYPES = BERT_LIKE | VISION | {"modernbert"}
# Model types whose sequence classifier puts a dense layer before its output layer instead of BertPooler.
DENSE_HEADS = {"roberta", "xlm-roberta", "camembert", "electra", "modernbert"}
# Counted exactly as transformers builds them (tests/test_plan_encoders.py; XLM-R is RoBERTa's code); the rest of
# ENCODER_TYPES are read as BERT, with a note.
EXACT = {"bert", "roberta", "xlm-roberta", "vit", "modernbert"}


@dataclass(frozen=True)
class EncoderShape:
    """An encoder's sizes and parameter counts by part; `glu` and `pre_norm` say how its blocks compute."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int  # rows of the token embedding (0 for a vision encoder)
    embedding: int  # parameters of the embedding layer: tokens, positions, token types or patches, and its norm
    small: int  # biases and norm weights of the blocks, and a final norm after them
    pooler: int  # BertPooler-style dense layer (tanh of the first token), when the head has one
    classifier: int  # the classification head: its optional dense and norm, and the output layer
    labels: int = 0  # outputs of the head (0: the bare encoder, whose token vectors are pooled outside)
    names: dict[str, tuple[int, int]] = field(default_factory=dict)  # one block's linear layers: (in, out)
    # Linear layers outside the blocks that LoRA can adapt (the pooler's, a head's dense layer), by name.
    outside: dict[str, tuple[int, int]] = field(default_factory=dict)
    saved: int = 0  # parameters of the head module PEFT trains and saves whole (`classifier`)
    glu: bool = False  # a gated MLP (ModernBERT): its first layer is twice as wide
    rotary: bool = False  # rotary positions (ModernBERT): q and k are rotated copies
    pre_norm: bool = False  # norms before attention and MLP (ViT, ModernBERT), not after (BERT)
    patch_inputs: int = 0  # a vision encoder's patch projection: channels x patch_size^2 inputs per position
    dropout: bool = False  # dropout after attention and MLP while training (BERT's hidden_dropout_prob): a mask each
    name: str = ""
    bidirectional: bool = True  # every position attends to every other (plan.memory and plan.throughput)
    tied: bool = False  # no output matrix shares the token embedding

    @property
    def dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one block, by the module names PEFT matches."""
        return dict(self.names)

    def layer_linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.names.values())

    def embedding_params(self) -> int:
        return self.embedding

    def small_params(self) -> int:
        return self.small

    def output_head_params(self) -> int:
        """The pooler and the head: what replaces a decoder's language-model head."""
        return self.pooler + self.classifier

    def params(self) -> int:
        """All parameters, as `sum(p.numel() for p in model.parameters())` counts them for this head."""
        return self.embedding + self.layer_linear_params() + self.small_params() + self.output_head_params()

    def matmul_params(self) -> int:
        """Weights multiplied for every position: the blocks, the patch projection; the pooler and head run
        once a sequence, so they are left out (as the embedding lookup, which costs no FLOPs)."""
        return self.layer_linear_params() + self.patch_inputs * self.hidden

    def logit_count(self, sequences: int, seq_len: int) -> int:
        """Logits of a micro-batch: one row of `labels` per sequence (none for the bare encoder)."""
        return sequences * self.labels

    def lora_modules(self, targets: str | tuple[str, ...] | list[str]) -> dict[str, tuple[int, int]]:
        """The block's linear layers a LoRA config adapts (see `_matching`)."""
        return _matching(self.names, targets)

    def lora_params(self, r: int, targets: str | tuple[str, ...] | list[str]) -> int:
        """What a LoRA run trains: r x (in + out) per adapted linear layer, in every block and outside them,
        and the output layer, which PEFT trains and saves whole (modules_to_save)."""
        blocks = self.layers * sum(r * (i + o) for i, o in self.lora_modules(targets).values())
        return blocks + sum(r * (i + o) for i, o in _matching(self.outside, targets).values()) + self.saved


def _matching(names: dict[str, tuple[int, int]], targets: str | tuple[str, ...] | list[str]) -> dict:
    """The layers of `names` a LoRA config adapts: "all-linear" (every one), or names matched as PEFT matches
    them: a module's full name or its last parts ("dense" is every dense layer of a BERT block)."""
    if targets == "all-linear":
        return dict(names)
    targets = [targets] if isinstance(targets, str) else targets
    return {n: s for n, s in names.items() if any(n == t or n.endswith("." + t) for t in targets)}


def is_encoder(config: dict) -> bool:
    """Whether config.json describes an encoder plan sizes with EncoderShape."""
    return config.get("model_type") in ENCODER_TYPES or ("patch_size" in config and "vocab_size" not in config)


def head_of(config: dict) -> str:
    """The head a saved folder carries (its `architectures`), for callers that do not know the task."""
    names = " ".join(config.get("architectures") or [])
    return ("image_classifier" if "ImageClassification" in names else
            "classifier" if "SequenceClassification" in names else "encoder")


def _need(config: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if not isinstance(config.get(k), int)]
    if missing:
        raise ModelError(f"base_model: {where} has no {', '.join(missing)}; plan needs them to size the encoder")


def encoder_shape(config: dict, head: str = "", labels: int = 0, name: str = "",
                  where: str = "config.json") -> tuple[EncoderShape, str]:
    """(shape, note) of an encoder config.json with the task's head (default: the head the folder was saved
    with) of `labels` outputs (default: the config's num_labels or id2label, as transformers reads it)."""
    model_type = config.get("model_type") or ("vit" if "patch_size" in config else "")
    _need(config, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"), where)
    h, i = config["hidden_size"], config["intermediate_size"]
    head = head or head_of(config)
    n = labels or config.get("num_labels") or len(config.get("id2label") or {}) or 2
    n = n if head != "encoder" else 0
    common = dict(hidden=h, layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
                  intermediate=i, labels=n, name=name, dropout=bool(config.get("hidden_dropout_prob")))
    note = "" if model_type in EXACT else (
        f"{where}: model_type {model_type or '(none)'} is read as a BERT-style encoder; expect small errors")
    if model_type == "modernbert":
        return _modernbert(config, common), note
    if model_type in VISION or "patch_size" in config:
        _need(config, ("image_size", "patch_size"), where)
        patches = (config["image_size"] // config["patch_size"]) ** 2
        inputs = config.get("num_channels", 3) * config["patch_size"] ** 2
        block = 4 * h + i + h + 2 * 2 * h  # biases of q, k, v, o, fc1, fc2; two LayerNorms
        return EncoderShape(
            **common, vocab=0, embedding=h + (patches + 1) * h + inputs * h + h, small=common["layers"] * block + 2 * h,
            pooler=h * h + h if head == "encoder" else 0, classifier=h * n + n if n else 0, saved=h * n + n if n else 0,
            outside={"pooler.dense": (h, h)} if head == "encoder" else {},
            names={"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h), "fc1": (h, i),
                   "fc2": (i, h)}, pre_norm=True, patch_inputs=inputs), note
    _need(config, ("vocab_size",), where)
    vocab = config["vocab_size"]
    positions = config.get("max_position_embeddings", 512) if config.get("position_biased_input", True) else 0
    embedding = vocab * h + positions * h + config.get("type_vocab_size", 2) * h + 2 * h
    dense_head = model_type in DENSE_HEADS
    pooler = h * h + h if head == "encoder" or not dense_head else 0
    head_size = ((h * h + h if dense_head else 0) + h * n + n) if n else 0  # PEFT saves the whole `classifier`
    return EncoderShape(
        **common, vocab=vocab, embedding=embedding, small=common["layers"] * (4 * h + i + h + 2 * 2 * h),
        pooler=pooler, classifier=head_size, saved=head_size, outside={"pooler.dense": (h, h)} if pooler else {},
        names={"query": (h, h), "key": (h, h), "value": (h, h), "attention.output.dense": (h, h),
               "intermediate.dense": (h, i), "output.dense": (i, h)}), note


def _modernbert(config: dict, common: dict) -> EncoderShape:
    """ModernBERT: rotary positions, a gated MLP, pre-norm blocks whose first attention norm is an identity, and
    biases only where the config turns them on."""
    h, i, n, layers = common["hidden"], common["intermediate"], common["labels"], common["layers"]
    norm = h * (2 if config.get("norm_bias") else 1)
    biases = (4 * h if config.get("attention_bias") else 0) + (2 * i + h if config.get("mlp_bias") else 0)
    head_params = (h * h + (h if config.get("classifier_bias") else 0) + norm + h * n + n) if n else 0
    return EncoderShape(
        **common, vocab=config["vocab_size"], embedding=config["vocab_size"] * h + norm,
        small=(2 * layers - 1) * norm + layers * biases + norm, pooler=0, classifier=head_params,
        saved=h * n + n if n else 0, outside={"head.dense": (h, h)} if n else {},
        names={"attn.Wqkv": (h, 3 * h), "attn.Wo": (h, h), "mlp.Wi": (h, 2 * i), "mlp.Wo": (i, h)},
        glu=True, rotary=True, pre_norm=True)
