"""init: random: a model built from an architecture with a stated, seeded initialisation; no weights read.

`model_folder(cfg)` is the folder a run loads. For init: random it is a folder in the cache holding
config.json, the tokenizer and `tuneforge_init.json` (the initialisation recipe) but no weights;
load_model sees the recipe and builds the model from it (`random_model` here). Everything that reads a
model folder (the plan, the micro-batch fit check, the fast path) therefore works unchanged. Which
RandomInit builds the folder is named by the task's row (methods/facts.py): CAUSAL_LM below for every
method of task: causal_lm, models/init_vit.py's VIT for image classifiers.

The size dial (as nanochat's depth): n_layer = depth, d_model = 64 x depth, heads of 128
(n_head = max(1, d_model // 128)), d_ff = 4 x d_model. The initialisation (GPT-2's): every matrix
and embedding normal(0, init_std), the residual output projections (o_proj, down_proj) normal(0,
init_std / sqrt(2 x n_layer)) so the residual stream's variance does not grow with depth, norms 1,
biases 0; drawn in parameter-name order from one generator seeded by `seed`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tuneforge.config import Config
from tuneforge.data.bpe import CHAT_TEMPLATE, END_OF_TEXT, TURN_TOKENS, first_bytes, train_bpe
from tuneforge.data.dataset import sha256_file
from tuneforge.data.shards import iter_documents
from tuneforge.errors import ConfigError
from tuneforge.methods.facts import function_at, method_facts, row_key
from tuneforge.models.resolve import cache_root, locate_base_model, resolve_base_model

if TYPE_CHECKING:
    import torch

FAMILIES = ("llama", "qwen2")
INIT_FILE = "tuneforge_init.json"
RESIDUAL_OUTPUTS = ("o_proj.weight", "down_proj.weight")


def derived_sizes(spec) -> dict[str, int]:
    """n_layer, d_model, n_head, n_kv_head, d_ff of an `architecture:` section (depth's rule, then overrides)."""
    d_model = spec.d_model or (64 * spec.depth if spec.depth else None)
    n_layer = spec.n_layer or spec.depth
    if d_model is None or n_layer is None:
        raise ConfigError("architecture: give depth (e.g. depth: 4), or n_layer and d_model")
    n_head = spec.n_head or max(1, d_model // 128)
    n_kv_head = spec.n_kv_head or n_head
    if d_model % n_head or n_head % n_kv_head:
        raise ConfigError(f"architecture: d_model {d_model} must be a multiple of n_head {n_head}, and n_head a "
                          f"multiple of n_kv_head {n_kv_head}; change n_head / n_kv_head")
    return {"n_layer": n_layer, "d_model": d_model, "n_head": n_head, "n_kv_head": n_kv_head,
            "d_ff": spec.d_ff or 4 * d_model}


def _base_config(name: str):
    from transformers import AutoConfig

    if name.lower() in FAMILIES:
        return AutoConfig.for_model(name.lower(), tie_word_embeddings=True)
    path = Path(name).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file() or file.suffix != ".json":
        raise ConfigError(f"base_model: with init: random, {name!r} must be an architecture family "
                          f"({', '.join(FAMILIES)}), a config.json file or a folder holding one")
    data = json.loads(file.read_text())
    if data.get("auto_map"):
        raise ConfigError(f"base_model: {file} needs model code shipped with it (auto_map); tuneforge builds only "
                          "architectures transformers knows")
    return AutoConfig.for_model(data.pop("model_type"), **data)


@dataclass(frozen=True)
class RandomInit:
    """How init: random builds a task's model: `check(cfg)` raises what `tuneforge validate` can find without
    writing anything; `folder(cfg)` writes (once) and returns the cache folder load_model builds from, and a
    description of it."""

    check: Callable[[Config], None]
    folder: Callable[[Config], "tuple[Path, str]"]


def locate_model(cfg: Config) -> None:
    """What `tuneforge validate` can check of the model without loading one: base_model's weights
    (init: pretrained) or its architecture and size (init: random)."""
    if cfg.init == "pretrained":
        locate_base_model(cfg.base_model)
        return
    function_at(method_facts(cfg).random_init).check(cfg)


def _check_causal_lm(cfg: Config) -> None:
    head = method_facts(cfg).model_head
    if head != "causal_lm":
        raise ConfigError(f"init: random builds language models and image classifiers; {row_key(cfg)} needs a {head} "
                          "model, which it cannot build from random weights yet; use init: pretrained")
    _base_config(cfg.base_model)
    if cfg.architecture is not None:
        derived_sizes(cfg.architecture)
    elif cfg.base_model.lower() in FAMILIES:
        raise ConfigError(f"architecture: base_model {cfg.base_model} is a family; give its size, e.g. "
                          "architecture: {depth: 4} (docs/pretrain.md)")


def sized_config(cfg: Config, vocab_size: int):
    """base_model's architecture at `architecture`'s size with this vocabulary: what plan sizes before a
    tokenizer is trained (the vocabulary asked for is an upper bound)."""
    _check_causal_lm(cfg)
    config = _base_config(cfg.base_model)
    if cfg.architecture is not None:
        s = derived_sizes(cfg.architecture)
        config.update({"num_hidden_layers": s["n_layer"], "hidden_size": s["d_model"],
                       "num_attention_heads": s["n_head"], "num_key_value_heads": s["n_kv_head"],
                       "intermediate_size": s["d_ff"], "head_dim": s["d_model"] // s["n_head"]})
    # pad_token_id stays unset: the embedding of a padding_idx never trains, and here pad is EOS.
    # A family's default context (e.g. llama's 2048) gives way to the blocks trained: max_seq_len + 1 tokens.
    context = cfg.max_seq_len + 1 if cfg.base_model.lower() in FAMILIES else \
        max(cfg.max_seq_len + 1, config.max_position_embeddings)
    config.update({"vocab_size": vocab_size, "pad_token_id": None, "max_position_embeddings": context})
    return config


def architecture_config(cfg: Config, tokenizer):
    """The transformers config of the model to build: base_model's architecture at `architecture`'s size,
    with the tokenizer's vocabulary and special tokens."""
    config = sized_config(cfg, len(tokenizer))
    config.update({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id})
    return config


def init_weights(model, std: float, seed: int) -> None:
    """The stated initialisation (module docstring), identical for the same seed on any device."""
    import torch  # here, not at the top: plan reads this module's shapes without torch

    n_layer = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                scale = std / math.sqrt(2 * n_layer) if name.endswith(RESIDUAL_OUTPUTS) else std
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def random_model(folder: Path, dtype: torch.dtype | None = None):
    """The model of a folder `model_folder` wrote, initialised by its recipe (fp32 unless `dtype`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = dtype or torch.float32
    recipe = json.loads((folder / INIT_FILE).read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)), dtype=dtype)
    init_weights(model, recipe["std"], recipe["seed"])
    return model


def _files_key(paths: list[str], settings: dict) -> str:
    payload = {"files": [sha256_file(p) for p in paths], **settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def write_once(folder: Path, write) -> Path:
    """Fill `folder` by `write(tmp)` beside it and rename it into place, unless another run already did."""
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    write(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def run_tokenizer(cfg: Config):
    """The tokenizer of an init: random run: reused from a model or folder, trained on the corpus (cached,
    keyed by the files' bytes and the settings), or base_model's folder's own."""
    from transformers import AutoTokenizer

    spec = cfg.tokenizer
    if spec is None:
        path = Path(cfg.base_model).expanduser()
        if not (path.is_dir() and (path / "tokenizer.json").is_file()):
            raise ConfigError(f"tokenizer: init: random with base_model {cfg.base_model} needs a tokenizer: "
                              "tokenizer: {reuse: smollm2-135m-instruct} or tokenizer: {train: {vocab_size: 8192}}")
        return AutoTokenizer.from_pretrained(str(path))
    if spec.reuse is not None:
        path = Path(spec.reuse).expanduser()
        folder = path if path.is_dir() else resolve_base_model(spec.reuse)[0]
        return AutoTokenizer.from_pretrained(str(folder))
    paths = [ds.path for ds in cfg.datasets]
    settings = {"vocab_size": spec.train.vocab_size, "sample_bytes": spec.train.sample_bytes,
                "field": cfg.pretrain.text_field, "special": [END_OF_TEXT, *TURN_TOKENS], "template": CHAT_TEMPLATE}
    folder = cache_root() / "tokenizers" / _files_key(paths, settings)

    def write(tmp: Path) -> None:
        # Bad documents are left out here; the token shards report each one (data/shards.py).
        docs = chain.from_iterable(iter_documents(p, lambda bad: None, cfg.pretrain.text_field) for p in paths)
        train_bpe(first_bytes(docs, spec.train.sample_bytes), spec.train.vocab_size).save_pretrained(str(tmp))

    return AutoTokenizer.from_pretrained(str(write_once(folder, write)))


def describe_size(config) -> str:
    c = config
    return (f"{c.model_type} n_layer={c.num_hidden_layers} d_model={c.hidden_size} n_head={c.num_attention_heads} "
            f"n_kv_head={c.num_key_value_heads} d_ff={c.intermediate_size} vocab={c.vocab_size}")


def model_folder(cfg: Config) -> tuple[Path, str]:
    """(folder to load, description of the source): base_model's for init: pretrained, else a random-init
    folder written by the task's RandomInit."""
    if cfg.init == "pretrained":
        return resolve_base_model(cfg.base_model)
    return function_at(method_facts(cfg).random_init).folder(cfg)


def _causal_lm_folder(cfg: Config) -> tuple[Path, str]:
    tokenizer = run_tokenizer(cfg)
    config = architecture_config(cfg, tokenizer)
    std = cfg.architecture.init_std if cfg.architecture else 0.02
    recipe = {"init": "normal", "std": std, "residual_std": std / math.sqrt(2 * config.num_hidden_layers),
              "seed": cfg.seed}
    key = hashlib.sha256(json.dumps([config.to_json_string(), recipe, tokenizer.backend_tokenizer.to_str()],
                                    sort_keys=True).encode()).hexdigest()[:24]

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / INIT_FILE).write_text(json.dumps(recipe, indent=1) + "\n")

    folder = write_once(cache_root() / "models" / f"random-{key}", write)
    return folder, f"random init {describe_size(config)}, normal std {std:g} (seed {cfg.seed})"


CAUSAL_LM = RandomInit(_check_causal_lm, _causal_lm_folder)
