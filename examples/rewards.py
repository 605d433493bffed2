"""A reward function for examples/grpo.yaml, to show the signature tuneforge calls."""

import re


def last_number(prompts: list[str], completions: list[str], answer: list[str], **fields) -> list[float]:
    """1.0 when the last whole number in the reply is the right answer ("3 + 4 = 7" counts)."""
    out = []
    for completion, expected in zip(completions, answer):
        numbers = re.findall(r"-?\d+", completion)
        out.append(float(bool(numbers) and numbers[-1] == expected))
    return out
