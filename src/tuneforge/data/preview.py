"""Show an example exactly as the model receives it, trained tokens set apart from masked ones."""

from __future__ import annotations

from rich.text import Text

from tuneforge.data.template import IGNORE_INDEX

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


def token_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """Consecutive tokens grouped by trained/masked, decoded with special tokens kept."""
    runs: list[tuple[list[int], bool]] = []
    for tok, lab in zip(input_ids, labels):
        trained = lab != IGNORE_INDEX
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(tok)
        else:
            runs.append(([tok], trained))
    return [(tokenizer.decode(ids, skip_special_tokens=False), trained) for ids, trained in runs]


def preview_plain(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Trained text inside [[ ]]; everything else is context the loss ignores."""
    return "".join(f"{TRAINED_OPEN}{t}{TRAINED_CLOSE}" if trained else t for t, trained in token_runs(tokenizer, input_ids, labels))


def preview_rich(tokenizer, input_ids: list[int], labels: list[int]) -> Text:
    """Trained text in bold green, masked text dimmed, for a terminal."""
    out = Text()
    for t, trained in token_runs(tokenizer, input_ids, labels):
        out.append(t, style="bold green" if trained else "dim")
    return out


def first_examples(cfg, tokenizer, n: int) -> list[dict]:
    """The first n good records of the training files, encoded as training encodes them (before the length policy)."""
    from itertools import islice

    from tuneforge.data.dataset import good_records, record_segments
    from tuneforge.data.template import encode_segment_lists

    records = []
    for ds in cfg.datasets:
        records += islice(good_records(ds), n - len(records))
    segment_lists = [record_segments(tokenizer, r, cfg.train_on_inputs) for r in records]
    return [{"record": r, "ids": ids.tolist(), "labels": labels.tolist()}
            for r, (ids, labels) in zip(records, encode_segment_lists(tokenizer, segment_lists))]


def render_preview(tokenizer, example: dict, color: bool, max_len: int, policy: str):
    """One example for the terminal (rich Text) or as plain text, with its counts and truncation point."""
    ids, labels = example["ids"], example["labels"]
    n = len(ids)
    n_trained = sum(1 for x in labels[1:] if x != IGNORE_INDEX)
    head = f"{example['record'].where}: {n} tokens, {n_trained} trained"
    pieces, marker = [(ids, labels)], None
    if n > max_len:
        if policy in ("drop", "error"):
            head += f"; longer than max_seq_len {max_len}: the example is {'dropped' if policy == 'drop' else 'an error'}"
        elif policy == "truncate_right":
            pieces = [(ids[:max_len], labels[:max_len]), (ids[max_len:], labels[max_len:])]
            marker = f"\n----- cut at max_seq_len {max_len}: the model never sees what follows -----\n"
        else:
            pieces = [(ids[: n - max_len], labels[: n - max_len]), (ids[n - max_len :], labels[n - max_len :])]
            marker = f"\n----- cut at max_seq_len {max_len}: the model never sees what comes before -----\n"
    if not color:
        return f"{head}\n" + (marker or "").join(preview_plain(tokenizer, i, lab) for i, lab in pieces)
    text = Text(head + "\n", style="bold")
    for k, (i, lab) in enumerate(pieces):
        if k:
            text.append(marker, style="bold red")
        text.append_text(preview_rich(tokenizer, i, lab))
    return text
