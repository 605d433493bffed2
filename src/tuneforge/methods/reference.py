"""The reference model of DPO, KTO and GRPO, without a second copy of the weights where possible.

With LoRA the reference is the same weights with the adapter switched off; with full
fine-tuning it is a frozen copy, unless the reference log-probs were computed before training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel

from tuneforge.methods.facts import MethodFacts
from tuneforge.methods.logps import sequence_logps
from tuneforge.methods.pairs import PairObjective
from tuneforge.methods.run import on_validation
from tuneforge.models.layers import unwrap
from tuneforge.parallel.world import SINGLE, World


class Reference:
    """Reference log-probs for a batch: from the adapter-disabled policy, a frozen model, or precomputed."""

    def __init__(self, frozen=None, free: bool = False, tables: dict[str, np.ndarray] | None = None):
        self.frozen = frozen  # a separate model (full fine-tuning, or the base itself before training)
        self.free = free  # reference_free: log-probs of a uniform reference, i.e. 0
        self.tables = tables or {}  # precomputed: summed log-probs per (example, side), by split
        self.split = "train"

    @contextlib.contextmanager
    def model(self, policy):
        """The model that gives reference log-probs, under no_grad. The adapter is switched off on the
        PEFT model inside a DDP wrapper, but the forward still goes through the policy as given: under
        FSDP that is the sharded root, whose hooks gather each layer's weights."""
        with torch.no_grad():
            if self.frozen is not None:
                yield self.frozen
            elif isinstance(unwrap(policy), PeftModel):
                with unwrap(policy).disable_adapter():
                    yield policy
            else:
                raise RuntimeError("no reference model: full fine-tuning needs a frozen copy or precomputed log-probs")

    def logps(self, policy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed reference log-prob per row of the batch."""
        rows = batch["input_ids"].size(0)
        if self.free:
            return torch.zeros(rows, device=batch["input_ids"].device)
        if self.split in self.tables and "table_rows" in batch:
            rows = batch["table_rows"].cpu().numpy()
            return torch.as_tensor(self.tables[self.split][rows], dtype=torch.float32, device=batch["input_ids"].device)
        with self.model(policy) as ref:
            was_training = ref.training
            ref.eval()  # no dropout in the reference
            try:
                return sequence_logps(ref, batch)[0]
            finally:
                ref.train(was_training)


def weights_fingerprint(folder: str | Path) -> str:
    """SHA-256 over a model folder's weight files: the model half of the precomputed-logps cache key."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def precompute_cache_path(cache_root: Path, model_hash: str, data_key: str) -> Path:
    key = hashlib.sha256(json.dumps([model_hash, data_key]).encode()).hexdigest()[:24]
    return cache_root / "reference_logps" / f"{key}.npz"


def make_reference(cfg, facts: MethodFacts, model, folder: Path, data, tokenizer, device, dtype, rep,
                   world: World = SINGLE) -> Reference | None:
    """The reference for this run (None if its method has none). Called before the adapter is attached,
    while `model` is still the base."""
    from tuneforge.models.load import load_model, weights_dtype

    if not facts.reference:
        return None
    free, precompute = facts.reference == "uniform", facts.reference == "precomputed"
    frozen = None
    if cfg.adapter == "full" and not precompute and not free:
        frozen = load_model(folder, device, cfg.trust_remote_code, weights_dtype(cfg.adapter, dtype)).eval()
        frozen.requires_grad_(False)
    reference = Reference(frozen, free=free)
    if precompute:
        objective = PairObjective(None, data, tokenizer.pad_token_id)  # precomputed tables hold pairs
        reference.tables = precomputed_reference(model, objective, folder, data, cfg, tokenizer, device, dtype, rep,
                                                 world)
    return reference


@torch.no_grad()
def precomputed_reference(model, objective, folder: Path, data, cfg, tokenizer, device, dtype, rep,
                          world: World = SINGLE) -> dict[str, np.ndarray]:
    """Reference log-probs of every training and validation pair, computed once with the base model (R-PREF-1).

    Cached on disk by (weights hash, prepared-data key, precision), so a second run of the same
    data on the same model skips the pass. On several processes rank 0 computes them and the others
    wait for its file, then read it, as they do for the prepared data (R-DIST-4): every process
    trains against the same numbers.
    """
    from tuneforge.data.dataset import cache_key
    from tuneforge.models.resolve import cache_root

    path = precompute_cache_path(cache_root(), weights_fingerprint(folder),
                                 f"{cache_key(cfg, tokenizer, data.file_hashes)}:{dtype}")
    with world.main_first(ready=path.is_file):
        if path.is_file():
            with np.load(path, allow_pickle=False) as saved:
                rep.note(f"Reference log-probs: precomputed, read from {path}")
                return dict(saved)
        return _compute_tables(model, objective, data, cfg, device, dtype, rep, path)


def _compute_tables(model, objective, data, cfg, device, dtype, rep, path: Path) -> dict[str, np.ndarray]:
    rep.note(f"Reference log-probs: computing them for {len(data.train)} pairs before training...")
    tables = {"train": _logps_table(model, objective, len(data.train), cfg.micro_batch_size, device, dtype)}
    if len(data.validation):
        tables["validation"] = _logps_table(model, on_validation(objective, data), len(data.validation),
                                            cfg.micro_batch_size, device, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **tables)
    tmp.replace(path)
    return tables


def _logps_table(model, objective, n: int, batch_size: int, device, dtype) -> np.ndarray:
    from tuneforge.models.precision import autocast_for

    table = np.zeros(2 * n, dtype=np.float64)
    was_training = model.training
    model.eval()
    for start in range(0, n, batch_size):
        batch = objective.collate(list(range(start, min(n, start + batch_size))))
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_for(device, dtype):
            table[batch["table_rows"].cpu().numpy()] = sequence_logps(model, batch)[0].double().cpu().numpy()
    model.train(was_training)
    return table
