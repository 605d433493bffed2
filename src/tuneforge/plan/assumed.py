"""What plan assumes where nothing is on disk yet: data described by flags instead of files
(`tuneforge plan --seq-len L --examples N` or `--tokens N`), and a model not yet built (init: random).

"Will an 8B LoRA fit a 24 GB card, and what will 50M tokens cost?" is asked before the data
exists, so a config without `datasets:` is planned from the size the user gives. Nothing is read
or tokenized, which also makes this the fastest plan. A from-scratch model is sized from its
`architecture:` section; no weight exists to read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tuneforge.config import Config, apply_overrides, config_from_dict, read_yaml
from tuneforge.errors import ConfigError
from tuneforge.methods.facts import method_facts
from tuneforge.models.init import model_folder, sized_config
from tuneforge.plan.data import SAMPLE_RECORDS, DataEstimate
from tuneforge.plan.model import ModelInfo, model_info, shape_from_hf_config

FLAGS = "--seq-len L --examples N (or --tokens N)"
# Stands in for the missing `datasets:` so the rest of the config is validated as usual; plan never reads it.
PLACEHOLDER = "(no data: sized by --seq-len/--examples/--tokens)"


@dataclass(frozen=True)
class DataSize:
    """What the flags say of the data; any two of the three fix the third."""

    tokens: int | None = None
    seq_len: int | None = None
    examples: int | None = None

    def given(self) -> bool:
        return any(v is not None for v in (self.tokens, self.seq_len, self.examples))


def load_plan_config(path: str | Path, overrides: list[str] | None, size: DataSize) -> Config:
    """The config as `load_config` reads it, except that `datasets:` may be missing when the flags size the data."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides)
    if isinstance(raw, dict) and "datasets" not in raw:
        if not size.given():
            raise ConfigError(f"{path}: invalid config\n  datasets: required key is missing; to plan before the "
                              f"data exists, pass {FLAGS}")
        raw = {**raw, "datasets": [{"path": PLACEHOLDER}]}
    return config_from_dict(raw, str(path), path.resolve().parent)


def assumed_data(size: DataSize, max_seq_len: int) -> DataEstimate:
    """Examples all `seq_len` long (cut to max_seq_len, as the run would), every token trained on.
    `--tokens N` alone assumes packed, max_seq_len-long examples."""
    tokens, seq_len, examples = size.tokens, size.seq_len, size.examples
    for name, value in (("--tokens", tokens), ("--seq-len", seq_len), ("--examples", examples)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} {value}: give a positive whole number")
    if seq_len is None and examples is not None:
        if tokens is None:
            raise ConfigError(f"--examples {examples} needs --seq-len L (tokens per example) or --tokens N")
        seq_len = math.ceil(tokens / examples)
    if seq_len is None:
        seq_len = max_seq_len
    if examples is None:
        if tokens is None:
            raise ConfigError(f"--seq-len {seq_len} needs --examples N (or --tokens N)")
        examples = math.ceil(tokens / seq_len)
    kept = min(seq_len, max_seq_len)
    lengths = np.full(min(examples, SAMPLE_RECORDS), kept, np.int64)
    total = float(examples * kept)
    how = f"the flags: {examples:,} examples of {seq_len:,} tokens, every token trained on (no data read)"
    if seq_len > max_seq_len:
        how += f"; cut to max_seq_len {max_seq_len}"
    return DataEstimate(float(examples), float(examples), lengths, total, total,
                        1.0 if seq_len > max_seq_len else 0.0, how, False)


def planned_model(cfg: Config, read_data: bool, labels: int = 0) -> ModelInfo:
    """The shape plan sizes, with the task's head of `labels` outputs (default: the config's): base_model's,
    or for init: random the architecture at its size (models/init.py). The tokenizer is trained (and cached
    for the run) when plan reads the data; planned from flags, a tokenizer still to train counts its
    `vocab_size`, an upper bound."""
    head = method_facts(cfg).model_head
    if cfg.init == "pretrained":
        return model_info(cfg.base_model, head, labels)
    train = cfg.tokenizer.train if cfg.tokenizer else None
    if train is not None and not read_data:
        shape, _ = shape_from_hf_config(sized_config(cfg, train.vocab_size).to_dict(), cfg.base_model)
        return ModelInfo(shape, f"init: random, {cfg.base_model} at the architecture: size, the vocabulary "
                                f"tokenizer.train.vocab_size {train.vocab_size} (trained, it may stop short)")
    folder, source = model_folder(cfg)
    info = model_info(str(folder), head, labels)
    return ModelInfo(replace(info.shape, name=cfg.base_model), source, info.tokenizer_folder, folder=folder)
