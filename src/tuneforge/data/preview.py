"""Show an example exactly as the model receives it, trained tokens set apart from masked ones."""

from __future__ import annotations

from rich.text import Text

from tuneforge.data.template import IGNORE_INDEX

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


def _runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
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
    return "".join(f"{TRAINED_OPEN}{t}{TRAINED_CLOSE}" if trained else t for t, trained in _runs(tokenizer, input_ids, labels))


def preview_rich(tokenizer, input_ids: list[int], labels: list[int]) -> Text:
    """Trained text in bold green, masked text dimmed, for a terminal."""
    out = Text()
    for t, trained in _runs(tokenizer, input_ids, labels):
        out.append(t, style="bold green" if trained else "dim")
    return out
