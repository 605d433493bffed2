"""One decoding module for eval, serve and GRPO: the same answers as transformers' generate(), serving and
GRPO drawing alike (tests/test_imports.py keeps the server out of training's imports)."""

from __future__ import annotations

import pytest
import torch

from tuneforge.models.decode import Sampling, decode, generate_ids, greedy_generate
from tuneforge.models.load import load_model, load_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_and_prompts(request, tiny_models, one_thread):
    folder = tiny_models[request.param]
    tok = load_tokenizer(folder)
    texts = ["Say hello", "A much longer prompt about the weather in the mountains today", "Hi"]
    return load_model(folder, CPU).eval(), tok, [tok(t).input_ids for t in texts]


def test_greedy_answers_equal_transformers_generate(model_and_prompts):
    """Eval's exact match keeps its answers: left-padded batches give what generate() gave, row by row."""
    model, tok, prompts = model_and_prompts
    ours = greedy_generate(model, prompts, [tok.eos_token_id], tok.pad_token_id, 10, CPU, batch_size=2)
    for p, (ids, stopped) in zip(prompts, ours):
        ref = model.generate(input_ids=torch.tensor([p]), max_new_tokens=10, do_sample=False,
                             eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        cut = ref.index(tok.eos_token_id) if tok.eos_token_id in ref else None
        assert (ids, stopped) == ((ref, False) if cut is None else (ref[:cut], True))


def test_served_tokens_equal_the_batched_decoder(model_and_prompts):
    """Serving and GRPO pick tokens alike: greedy streams equal eval's, seeded streams equal GRPO's draws."""
    model, tok, prompts = model_and_prompts
    greedy = greedy_generate(model, prompts, [], tok.pad_token_id, 8, CPU)
    for p, (ids, _) in zip(prompts, greedy):
        assert list(generate_ids(model, p, 8, Sampling(temperature=0), CPU)) == ids
    gens = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    sampled = decode(model, prompts, [], tok.pad_token_id, 8, CPU, {"temperature": 0.9, "top_p": 0.8, "generators": gens})
    for seed, p, (ids, _) in zip((11, 12, 13), prompts, sampled):
        assert list(generate_ids(model, p, 8, Sampling(temperature=0.9, top_p=0.8, seed=seed), CPU)) == ids
