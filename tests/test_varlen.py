"""Per-example attention (fast/varlen.py): a padding-free row computes what its examples compute alone,
what the padded plain path computes, and nothing else changes (padded batches, generation, saved config)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from test_fast import _step, assert_same_step
from test_train import CPU, QUIET, make_cfg

from tuneforge.data.batching import collate
from tuneforge.data.dataset import prepare_data
from tuneforge.fast import FastPath
from tuneforge.fast.padding_free import collate_flat, flat_pays, model_inputs
from tuneforge.fast.switches import resolve
from tuneforge.fast.varlen import NAMES, apply_varlen_attention, example_lengths
from tuneforge.methods.sft import SFT
from tuneforge.models.load import attach_adapter, load_model, load_tokenizer
from tuneforge.track.metrics import read_metrics
from tuneforge.train.loop import train


def _tiny(tmp_path, arch: str, tokenizer, **overrides):
    """A random tiny model (4 query heads over 2 key-value heads: grouped-query attention) saved as a folder."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = tiny_config("gemma" if arch == "gemma2" else arch, len(tokenizer))
    if arch == "gemma2":
        common = config.to_dict()
        config = Gemma2Config(**{k: common[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                        "num_hidden_layers", "num_attention_heads",
                                                        "num_key_value_heads", "head_dim", "initializer_range")})
    for key, value in overrides.items():
        setattr(config, key, value)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    folder = tmp_path / arch
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _examples(tmp_path, folder, n: int):
    return prepare_data(make_cfg(tmp_path, folder), load_tokenizer(folder)).train[:n]


def test_a_packed_example_computes_what_it_computes_alone(tmp_path, tiny_models):
    """R-PACK-1 on per-example attention: positions restart at 0, an example's logits are its logits
    alone, and changing one example never moves another's."""
    model = load_model(tiny_models["llama"], CPU).eval()
    assert apply_varlen_attention(model) == "sdpa" and model.config._attn_implementation == NAMES["sdpa"]
    examples = _examples(tmp_path, tiny_models["llama"], 3)
    lengths = [len(e.input_ids) for e in examples]
    row = collate_flat(examples)
    starts = [sum(lengths[:i]) for i in range(3)]
    assert [row["position_ids"][0, s].item() for s in starts] == [0, 0, 0]
    assert example_lengths(row["position_ids"], 1, sum(lengths)) == lengths
    changed = {k: v.clone() for k, v in row.items()}
    changed["input_ids"][0, :lengths[0]] = (changed["input_ids"][0, :lengths[0]] + 7) % model.config.vocab_size
    with torch.no_grad():
        a = model(**model_inputs(row)).logits[0]
        b = model(**model_inputs(changed)).logits[0]
        for start, n in zip(starts, lengths):
            alone = model(input_ids=row["input_ids"][:, start:start + n], use_cache=False).logits[0]
            torch.testing.assert_close(a[start:start + n], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(a[:lengths[0]], b[:lengths[0]])  # the changed example did change
    torch.testing.assert_close(a[lengths[0]:], b[lengths[0]:], atol=1e-6, rtol=0)


GROUPS = [  # (arch, tokenizer style, adapter, config overrides)
    ("llama", "smol", "lora", {}),
    ("qwen2", "qwen", "full", {}),
    ("mistral", "smol", "lora", {"sliding_window": 24}),  # shorter than every example, longer than half a prompt
    ("gemma2", "llama3", "full", {"sliding_window": 12, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0}),
]


@pytest.mark.parametrize("arch, style, adapter, overrides", GROUPS, ids=[g[0] for g in GROUPS])
def test_per_example_attention_gives_the_padded_plain_paths_loss_and_gradients(tmp_path, tokenizers, arch, style,
                                                                               adapter, overrides):
    folder = _tiny(tmp_path, arch, tokenizers[style], **overrides)
    examples = _examples(tmp_path, folder, 6)
    assert min(len(e.input_ids) for e in examples) > overrides.get("sliding_window", 0)
    assert len({len(e.input_ids) for e in examples}) > 2, "the test needs examples of different lengths"
    model = load_model(folder, CPU)
    if adapter == "lora":
        model, _ = attach_adapter(model, make_cfg(tmp_path, folder, **{"lora.dropout": 0.0}))
    data = type("Data", (), {"train": examples})
    pad = load_tokenizer(folder).pad_token_id
    plain = _step(model, SFT(data, pad), examples, 6)  # padded batches, the model's own attention
    base = apply_varlen_attention(model)
    assert base == ("eager" if arch == "gemma2" else "sdpa")
    fast = FastPath(padding_free=True, varlen_attention=True)
    for size in (6, 3):
        batch = SFT(data, pad, fast).collate(list(range(size)))
        assert "position_ids" in batch  # padding-free rows, through per-example attention
        assert_same_step(_step(model, SFT(data, pad, fast), examples, size), plain)


def test_padded_batches_and_generation_run_exactly_as_before(tmp_path, tiny_models):
    """Anything but a padding-free row goes to the model's own attention: the same numbers, bit for bit."""
    folder = tiny_models["llama"]
    examples = _examples(tmp_path, folder, 3)
    batch = collate(examples, load_tokenizer(folder).pad_token_id)
    assert not bool(batch["attention_mask"].all())  # a batch with padding
    prompts = batch["input_ids"][:, :5].clone()
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])

    def run(model):
        with torch.no_grad():
            logits = model(**model_inputs(batch)).logits
            out = model.generate(input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=4, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        return logits, out.sequences, torch.stack(out.scores)

    model = load_model(folder, CPU).eval()
    before = run(model)
    apply_varlen_attention(model)
    after = run(model)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_the_saved_model_keeps_its_own_attention(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    model = load_model(tiny_models["llama"], CPU)
    apply_varlen_attention(model)
    model.save_pretrained(tmp_path / "saved")
    text = (tmp_path / "saved" / "config.json").read_text()
    assert "tuneforge" not in text and "attn_implementation" not in json.loads(text)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"


def test_the_loop_trains_the_same_with_per_example_attention_on_and_off(tmp_path, tiny_models):
    from transformers import AutoConfig

    logged, runs = {}, {}
    for varlen in (False, None):
        out = f"varlen-{varlen}"
        cfg = make_cfg(tmp_path, tiny_models["llama"], out=out, max_steps=3, adapter="full", learning_rate=1e-3,
                       **{"performance.varlen_attention": varlen, "evaluation.before_after": False})
        runs[varlen] = train(cfg, reporter=QUIET)
        logged[varlen] = read_metrics(tmp_path / out / "metrics.jsonl")
    assert runs[None]["performance"]["varlen_attention"] and not runs[False]["performance"]["varlen_attention"]
    for off, on in zip(logged[False], logged[None]):
        assert off["examples"] == on["examples"] and off["trained_tokens"] == on["trained_tokens"]
        assert on["loss"] == pytest.approx(off["loss"], abs=1e-5)
        assert on["padding_share"] <= off["padding_share"]
    final = tmp_path / "varlen-None" / "final"
    assert "tuneforge" not in (final / "config.json").read_text()
    assert (final / "config.json").read_text() == (tmp_path / "varlen-False" / "final" / "config.json").read_text()
    assert AutoConfig.from_pretrained(final)._attn_implementation is None  # chosen afresh on load, as before


def test_flat_pays_prices_the_pairs_that_run():
    lengths, cost = [64, 96, 80], 1.0
    assert not flat_pays(lengths, cost)  # T^2 pairs of the whole row: dearer than the padded batch
    assert flat_pays(lengths, cost, varlen=True)  # sum of L_i^2: never dearer, and padding saved pays
    assert not flat_pays([128] * 4, cost, varlen=True)  # nothing to save


def test_varlen_setting(tiny_models):
    from tuneforge.config import config_from_dict

    base = {"datasets": [{"path": "x.jsonl"}]}
    model = load_model(tiny_models["llama"], CPU)
    assert resolve(config_from_dict(base), model=model).varlen_attention
    assert "per-example attention" in resolve(config_from_dict(base), model=model).describe()
    assert not resolve(config_from_dict({**base, "performance": {"varlen_attention": False}}), model=model).varlen_attention
    assert not resolve(config_from_dict({**base, "performance": {"padding_free": False}}), model=model).varlen_attention
    assert not resolve(config_from_dict({**base, "method": "dpo"}), model=model).varlen_attention


def test_example_lengths_are_read_once_per_positions_tensor():
    """Every layer of a forward reads the same position_ids: the lengths are computed once, and a new or
    changed tensor is read anew."""
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    first = example_lengths(positions, 1, 9)
    assert first == [3, 2, 4] and example_lengths(positions, 1, 9) is first
    positions[0, 3:5] = torch.tensor([3, 4])  # written in place: examples 1 and 2 merge
    assert example_lengths(positions, 1, 9) == [5, 4]
    assert example_lengths(torch.tensor([[0, 1, 0, 1, 2, 3, 4, 5, 6]]), 1, 9) == [2, 7]


def test_per_example_attention_costs_one_row_sized_gradient_not_one_per_example():
    """The CPU path's backward: gradients of the examples' q, k, v are joined once (split), not each
    written into zeros the size of the whole row (slicing: n examples x T positions of memory traffic,
    8% of a CPU step on variable-length data, bench/RESULTS.md). And the values stay those of sdpa alone."""
    from tuneforge.fast.varlen import varlen_attention

    torch.manual_seed(0)
    lengths = [5, 9, 3, 7]
    q, k, v = (torch.randn(sum(lengths), heads, 8, dtype=torch.float64, requires_grad=True) for heads in (4, 2, 2))
    out = varlen_attention(q, k, v, lengths, 0.3)
    nodes, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            todo += [n for n, _ in node.next_functions]
    names = {type(n).__name__ for n in nodes}
    assert not names & {"SliceBackward0", "SelectBackward0"}, names
    at = 0
    for n in lengths:
        alone = torch.nn.functional.scaled_dot_product_attention(
            *(t[at:at + n].transpose(0, 1) for t in (q, k, v)), is_causal=True, scale=0.3, enable_gqa=True)
        torch.testing.assert_close(out[at:at + n], alone.transpose(0, 1), rtol=0, atol=1e-12)
        at += n
