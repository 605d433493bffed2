"""Talk to a tuned model: one prompt, or an interactive chat."""

from __future__ import annotations

import torch

from tuneforge.data.template import generation_prompt
from tuneforge.models.decode import greedy_generate


def answer(model, tokenizer, messages: list[dict], stop_ids: list[int], max_new_tokens: int = 256,
           device: torch.device = torch.device("cpu")) -> tuple[str, bool]:
    """The model's greedy reply to a conversation, and whether it ended with a stop token."""
    prompt = generation_prompt(tokenizer, messages)
    [(ids, stopped)] = greedy_generate(model, [prompt], stop_ids, tokenizer.pad_token_id, max_new_tokens, device)
    return tokenizer.decode(ids, skip_special_tokens=True).strip(), stopped
