"""`tuneforge data stats` and `tuneforge data prepare`: what the prepared data looks like, and the data itself."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tuneforge.config import Config
from tuneforge.data import stats
from tuneforge.data.dataset import PreparedData, prepare_data, write_rejected
from tuneforge.output_folders import check_out, output_folder


def turns_per_conversation(data: PreparedData) -> dict[int, int]:
    """How many kept conversations have 1, 2, ... assistant turns (counted while preparing)."""
    counts: Counter = Counter()
    for c in data.summary.per_file.values():
        for key, n in c.items():
            if key.startswith("assistant_turns_"):
                counts[int(key.removeprefix("assistant_turns_"))] += n
    return dict(sorted(counts.items()))


def describe(cfg: Config, tokenizer, png: Path | None = None, data: PreparedData | None = None) -> dict:
    """Counts, length distribution, truncation, padding waste with and without packing, tokens per epoch."""
    data = data or prepare_data(cfg, tokenizer)
    lengths = data.train.lengths
    records = sum(c["records"] for c in data.summary.per_file.values())
    over = sum(c["over_max_seq_len"] for c in data.summary.per_file.values())
    out = {
        "records": records,
        "train_examples": len(data.train),
        "validation_examples": len(data.validation),
        "left_out": len(data.rejected),
        "per_file": data.summary.as_json(),
        "lengths": stats.length_summary(lengths),
        # bins over the data's own range; lengths over max_seq_len, if any, in a bin of their own
        "histogram": stats.histogram(lengths, bins=16, max_len=min(cfg.max_seq_len, int(max(lengths, default=0)))),
        "trained_tokens": data.train.trained_tokens(),
        "turns_per_conversation": turns_per_conversation(data),
        "over_max_seq_len": {"count": over, "share": over / max(records, 1), "policy": cfg.truncation,
                             "tokens_cut": sum(c["tokens_cut"] for c in data.summary.per_file.values())},
        "padding_waste": stats.padding_waste(lengths, cfg.micro_batch_size, cfg.seed),
        "packing_waste": stats.packing_waste(lengths, cfg.max_seq_len),
        "tokens_per_epoch": int(sum(w * n for w, n in zip(data.dataset_weights, _tokens_per_dataset(data)))),
        "max_seq_len": cfg.max_seq_len,
        "micro_batch_size": cfg.micro_batch_size,
    }
    if png is not None:
        stats.save_histogram_png(lengths, png, cfg.max_seq_len, title="Training example lengths (tokens)")
        out["png"] = str(png)
    return out


def _tokens_per_dataset(data: PreparedData) -> list[float]:
    """Tokens per dataset (its examples are contiguous in the training set)."""
    lengths, out, start = data.train.lengths, [], 0
    for size in data.dataset_sizes:
        out.append(float(lengths[start : start + size].sum()))
        start += size
    return out


def prepare_to_folder(cfg: Config, tokenizer, folder: Path, overwrite: bool = False) -> dict:
    """Prepare (or take from the cache) and write the result with a report of what was left out and why.

    `folder` must be new or empty; `overwrite` replaces earlier prepared data there (never another folder)."""
    check_out(folder, "data", overwrite)
    data = prepare_data(cfg, tokenizer)
    reasons = Counter(r.reason.split(":")[0] for r in data.rejected)
    report = {
        "folder": str(folder),
        "train_examples": len(data.train),
        "validation_examples": len(data.validation),
        "rejected": len(data.rejected),
        "rejected_by_reason": dict(reasons.most_common()),
        "per_file": data.summary.as_json(),
        "dataset_sizes": data.dataset_sizes,
        "dataset_weights": data.dataset_weights,
        "file_sha256": data.file_hashes,
        "end_of_turn": data.end_of_turn,
        "from_cache": data.from_cache,
    }
    with output_folder(folder, "data", overwrite) as tmp:
        data.train.save(tmp, "train")
        data.validation.save(tmp, "validation")
        write_rejected(tmp / "rejected.jsonl", data.rejected)
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
