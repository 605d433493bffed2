"""The fast path computes what the plain path computes: chunked loss, padding-free rows, through the loop."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model, tiny_config
from test_train import CPU, QUIET, make_cfg

from tuneforge.config import config_from_dict
from tuneforge.data.batching import collate
from tuneforge.data.dataset import prepare_data
from tuneforge.data.template import IGNORE_INDEX
from tuneforge.fast import FastPath
from tuneforge.fast.apply import apply_fast_path
from tuneforge.fast.causal_lm import output_layer
from tuneforge.fast.chunked_logps import label_logps
from tuneforge.fast.chunked_loss import linear_cross_entropy_sum
from tuneforge.fast.padding_free import collate_flat, flat_pays, model_inputs
from tuneforge.fast.switches import pair_cost, resolve
from tuneforge.methods.sft import SFT
from tuneforge.models.load import attach_adapter, load_model, load_tokenizer
from tuneforge.track.metrics import read_metrics
from tuneforge.train.loop import accumulate_gradients, train

FAST = FastPath(padding_free=True, chunked_loss=True, loss_chunk_tokens=16)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_loss_equals_the_full_logits_loss_and_gradients(softcap):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(101, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 101, (37,))
    labels[::3] = IGNORE_INDEX
    logits = hidden @ weight.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    full = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    chunked = linear_cross_entropy_sum(hidden, weight, labels, chunk=7, softcap=softcap)
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(2.5 * full, (hidden, weight)), torch.autograd.grad(2.5 * chunked, (hidden, weight))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # gradcheck perturbs every input one at a time: a small shape of its own keeps that to ~100 forwards
    h, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(13, 4, dtype=torch.float64)
    y = torch.tensor([1, IGNORE_INDEX, 12, 0, 7, 5])
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy_sum(h, w, y, 4, softcap),
                                    (h.requires_grad_(), w.requires_grad_()))


def test_padding_free_rows_restart_positions_and_never_train_across_examples(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path, tiny_models["llama"])
    examples = prepare_data(cfg, load_tokenizer(tiny_models["llama"])).train[:3]
    row = collate_flat(examples)
    lengths = [len(e.input_ids) for e in examples]
    assert row["input_ids"].shape == (1, sum(lengths)) and int(row["attention_mask"].sum()) == sum(lengths)
    starts = [sum(lengths[:i]) for i in range(3)]
    assert [row["position_ids"][0, s].item() for s in starts] == [0, 0, 0]
    assert all(row["labels"][0, s].item() == IGNORE_INDEX for s in starts)
    padded = collate(examples, 0)
    assert SFT(None, 0).units(padded) == SFT(None, 0).units(row)  # the same trained tokens


def _model(tmp_path, arch, tokenizer, adapter):
    folder = make_tiny_model(tmp_path / arch, arch, tokenizer)
    model = load_model(folder, CPU)
    if adapter != "full":
        cfg = make_cfg(tmp_path, folder, adapter=adapter, **{"lora.dropout": 0.0})
        model, _ = attach_adapter(model, cfg)
    return folder, model


def _step(model, objective, examples, size):
    model.zero_grad(set_to_none=True)
    batches = [objective.collate(list(range(i, min(i + size, len(examples))))) for i in range(0, len(examples), size)]
    loss, totals, _ = accumulate_gradients(objective, model, batches, CPU, torch.float32)
    return loss, totals["tokens"], {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch, style, adapter", [("llama", "smol", "lora"), ("qwen2", "qwen", "lora"),
                                                   ("mistral", "smol", "full"), ("gemma", "llama3", "lora")])
def test_fast_path_gives_the_plain_paths_loss_and_gradients(tmp_path, tokenizers, arch, style, adapter):
    """Padding-free rows and the chunked loss, against padded batches and full logits; with accumulation
    (R-GA-1 with packing on): 6 examples as 2 x 3 and 3 x 2 micro-batches give the one-batch numbers."""
    folder, model = _model(tmp_path, arch, tokenizers[style], adapter)
    examples = prepare_data(make_cfg(tmp_path, folder), load_tokenizer(folder)).train[:6]
    assert len({len(e.input_ids) for e in examples}) > 2, "the test needs examples of different lengths"
    data = type("Data", (), {"train": examples})
    pad = load_tokenizer(folder).pad_token_id
    plain = _step(model, SFT(data, pad), examples, 6)
    for size in (6, 3, 2):
        assert_same_step(_step(model, SFT(data, pad, FAST), examples, size), plain)


def test_apply_fast_path_applies_every_switch_and_the_step_is_unchanged(tmp_path, tokenizers):
    """One call applies fused LoRA, the kernels (whose MLP calls the fused projections) and selective
    checkpointing to a LoRA model, says what it changed, and the step computes what the plain one does."""
    folder, plain = _model(tmp_path, "llama", tokenizers["smol"], "lora")
    fast = copy.deepcopy(plain)
    switches = FastPath(fused_lora=True, kernels=True, activation_checkpointing="selective", checkpoint_every=2)
    applied = apply_fast_path(fast, switches, CPU)
    lora = [n for n, m in plain.named_modules() if hasattr(m, "lora_A") and n.endswith("proj")]
    assert len(applied.fused_lora) == len(lora) > 0
    layers = plain.config.num_hidden_layers
    assert {n.rsplit(".", 1)[-1] for n in applied.kernels} == {"input_layernorm", "post_attention_layernorm", "mlp",
                                                               "norm"}
    assert applied.checkpointed == tuple(range(0, layers, 2)) and applied.compiled == 0
    assert [line.split(":")[0] for line in applied.notes()] == ["Fused LoRA", "Kernels"]
    examples = prepare_data(make_cfg(tmp_path, folder), load_tokenizer(folder)).train[:4]
    data, pad = type("Data", (), {"train": examples}), load_tokenizer(folder).pad_token_id
    fast.train(), plain.train()
    assert_same_step(_step(fast, SFT(data, pad), examples, 2), _step(plain, SFT(data, pad), examples, 2))


def test_the_switches_a_run_uses_are_chosen_without_importing_torch():
    """plan reads the same switches the loop runs, and never imports torch (fast/__init__, fast/switches)."""
    code = "import sys, tuneforge.fast.switches; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]


def assert_same_step(step, plain) -> None:
    """(loss, tokens, gradients) of one step equal the plain path's, to fp32 rounding."""
    loss, tokens, grads = step
    assert tokens == plain[1]
    assert loss == pytest.approx(plain[0], abs=1e-5)
    for name, g in plain[2].items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_gemma2_soft_capped_logits_through_the_chunked_loss(tmp_path, tokenizers):
    from transformers import AutoModelForCausalLM, Gemma2Config

    tok = tokenizers["llama3"]
    common = tiny_config("gemma", len(tok)).to_dict()
    cfg = Gemma2Config(**{k: common[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_key_value_heads", "head_dim")},
                       final_logit_softcapping=3.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    out = output_layer(model)
    assert out is not None and out.softcap == 3.0
    ids = torch.randint(0, len(tok), (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    from tuneforge.methods.sft import sft_loss_sum

    torch.testing.assert_close(sft_loss_sum(model, batch, chunked=True, chunk=5), sft_loss_sum(model, batch),
                               atol=1e-6, rtol=1e-6)


def test_packed_examples_never_see_each_other(tmp_path, tiny_models):
    """R-PACK-1: change every token of one example in a padding-free row; the other examples' logits do not move."""
    model = load_model(tiny_models["llama"], CPU).eval()
    examples = prepare_data(make_cfg(tmp_path, tiny_models["llama"]), load_tokenizer(tiny_models["llama"])).train[:3]
    row = collate_flat(examples)
    n0 = len(examples[0].input_ids)
    changed = {k: v.clone() for k, v in row.items()}
    changed["input_ids"][0, :n0] = (changed["input_ids"][0, :n0] + 7) % model.config.vocab_size
    with torch.no_grad():
        a = model(**model_inputs(row)).logits
        b = model(**model_inputs(changed)).logits
        alone = model(input_ids=row["input_ids"][:, n0:n0 + len(examples[1].input_ids)]).logits
    assert not torch.allclose(a[0, :n0], b[0, :n0])  # the changed example did change
    torch.testing.assert_close(a[0, n0:], b[0, n0:], atol=1e-6, rtol=0)
    torch.testing.assert_close(a[0, n0:n0 + alone.size(1)], alone[0], atol=1e-5, rtol=1e-5)  # as if alone


def test_the_loop_trains_the_same_with_the_fast_path_on_and_off(tmp_path, tiny_models):
    logged = {}
    for mode in ("off", "auto"):
        cfg = make_cfg(tmp_path, tiny_models["llama"], out=mode, max_steps=3, performance=mode,
                       **{"lora.dropout": 0.0, "evaluation.before_after": False})
        run = train(cfg, reporter=QUIET)
        assert run["performance"]["padding_free"] == run["performance"]["chunked_loss"] == (mode == "auto")
        logged[mode] = read_metrics(tmp_path / mode / "metrics.jsonl")
    for off, on in zip(logged["off"], logged["auto"]):
        assert off["examples"] == on["examples"] and off["trained_tokens"] == on["trained_tokens"]
        assert on["loss"] == pytest.approx(off["loss"], abs=1e-5)
        assert on["padding_share"] <= off["padding_share"]


def test_a_padding_free_row_is_used_where_it_costs_less():
    assert not flat_pays([2048] * 4, 6.5e-5)  # no padding to save: the padded batch is as good
    assert flat_pays([250, 200, 300, 1500], 6.5e-5)  # one long example and short ones: the row pays
    assert flat_pays([64, 96, 80], 0.0)  # attention free: any padding saved pays
    assert not flat_pays([64, 96, 80], 1.0)  # attention dear: the row's T^2 pairs do not


def test_pair_cost_weighs_attention_against_the_weights(tiny_models):
    model = load_model(tiny_models["llama"], CPU)
    c = model.config
    body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    assert pair_cost(model) == pytest.approx(4 * c.num_hidden_layers * c.hidden_size / (2 * body))


def test_performance_settings():
    base = {"datasets": [{"path": "x.jsonl"}]}
    auto = resolve(config_from_dict(base))
    assert auto.padding_free and auto.chunked_loss and not auto.gradient_checkpointing and not auto.fused_optimizer
    assert resolve(config_from_dict(base), "cuda").fused_optimizer
    lean = resolve(config_from_dict({**base, "performance": "min_memory"}))
    assert lean.gradient_checkpointing and lean.chunked_loss
    assert resolve(config_from_dict({**base, "performance": {"mode": "off", "chunked_loss": True}})) == \
        FastPath(chunked_loss=True)
    dpo = resolve(config_from_dict({**base, "method": "dpo"}))
    assert not dpo.padding_free and dpo.chunked_loss  # pairs stay padded; their log-probs go through chunks
    assert not resolve(config_from_dict({**base, "method": "orpo"})).chunked_loss  # its NLL reads whole logits
    assert not resolve(config_from_dict(base), model=None, sharded=True).chunked_loss  # FSDP


@pytest.mark.parametrize("softcap, temperature", [(None, 1.0), (3.0, 0.7)])
def test_chunked_label_logps_equal_log_softmax_and_its_gradients(softcap, temperature):
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(29, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 29, (13,))
    logits = hidden @ weight.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    full = torch.log_softmax(logits / temperature, -1).gather(1, labels[:, None]).squeeze(1)
    chunked = label_logps(hidden, weight, labels, 4, softcap, temperature)
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-12)
    g = torch.randn(13, dtype=torch.float64)  # each position's gradient differs, as in DPO or GRPO
    for a, b in zip(torch.autograd.grad((g * full).sum(), (hidden, weight)),
                    torch.autograd.grad((g * chunked).sum(), (hidden, weight))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h, w: label_logps(h, w, labels[:6], 4, softcap, temperature),
                                    (hidden[:6].detach().requires_grad_(), weight.detach().requires_grad_()))


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_preference_runs_give_the_same_losses_with_chunked_log_probs(tmp_path, tiny_models, method):
    from conftest import write_jsonl
    from test_preference import preference_records

    records = preference_records(16)
    if method == "kto":  # each answer alone, labelled desirable or not
        records = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2)}
                   for i, r in enumerate(records)]
    data_file = write_jsonl(tmp_path / "pref.jsonl", records)
    logged = {}
    for mode in ("off", "auto"):
        cfg = make_cfg(tmp_path, tiny_models["llama"], out=mode, method=method, datasets=[{"path": str(data_file)}],
                       validation=None, max_steps=3, performance=mode, learning_rate=1e-3,
                       **{"lora.dropout": 0.0, "evaluation.before_after": False})
        assert train(cfg, reporter=QUIET)["performance"]["chunked_loss"] == (mode == "auto")
        logged[mode] = read_metrics(tmp_path / mode / "metrics.jsonl")
    for off, on in zip(logged["off"], logged["auto"]):
        assert on["loss"] == pytest.approx(off["loss"], abs=1e-5)
        assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-4)


def test_performance_off_as_yaml_writes_it(tmp_path):
    """YAML 1.1 reads a bare `off` as false: `performance: off` and `mode: off` still mean the plain path."""
    import yaml

    from tuneforge.config import config_from_dict

    base = {"datasets": [{"path": "x.jsonl"}]}
    for text in ("performance: off", "performance: {mode: off}", "performance: {mode: off, chunked_loss: on}"):
        cfg = config_from_dict({**base, **yaml.safe_load(text)})
        assert cfg.performance.mode == "off", text
    assert config_from_dict({**base, **yaml.safe_load("performance: on")}).performance.mode == "auto"
