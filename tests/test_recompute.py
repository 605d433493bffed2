"""Activation checkpointing and regional compile: every level trains the same numbers, selective
recomputes only its layers, offload moves only the layer inputs, auto chooses by the GPU's memory,
and plan predicts the levels in the order they save memory."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_train import CPU, QUIET, make_cfg

from tuneforge.config import config_from_dict
from tuneforge.data.dataset import prepare_data
from tuneforge.errors import ConfigError
from tuneforge.fast import FastPath
from tuneforge.fast.recompute import apply_activation_checkpointing
from tuneforge.fast.switches import choose_level, resolve
from tuneforge.fast.compile import apply_compile
from tuneforge.methods.sft import SFT
from tuneforge.models.load import attach_adapter, load_tokenizer
from tuneforge.plan.architectures import ARCHITECTURES
from tuneforge.plan.recompute import describe, for_device, level, with_level
from tuneforge.plan.memory import Settings, memory, offloaded_bytes
from tuneforge.plan.throughput import flops_per_token
from tuneforge.train.loop import accumulate_gradients, train

LAYERS = 4
LLAMA_8B = ARCHITECTURES["llama-3.1-8b"]
GB = 1e9


def _model(tmp_path, tiny_models, adapter: str):
    """A 4-layer tiny Llama (LoRA with dropout, or full), and six examples of different lengths."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_models["llama"])
    config = tiny_config("llama", len(tokenizer))
    config.num_hidden_layers = LAYERS
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    cfg = make_cfg(tmp_path, tiny_models["llama"], adapter=adapter, **{"lora.dropout": 0.1})
    if adapter != "full":
        model, _ = attach_adapter(model, cfg)
    examples = prepare_data(cfg, tokenizer).train[:6]
    data = type("Data", (), {"train": examples})
    return model.train(), SFT(data, tokenizer.pad_token_id), len(examples)


def _steps(model, objective, n: int, steps: int = 3, size: int = 3) -> list[tuple[float, dict]]:
    """Per step: the loss and the gradients of micro-batches of `size` examples, then an SGD step."""
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=0.5)
    out = []
    for step in range(steps):
        torch.manual_seed(100 + step)  # the same dropout masks for every level
        batches = [objective.collate(list(range(i, min(i + size, n)))) for i in range(0, n, size)]
        loss, _, _ = accumulate_gradients(objective, model, batches, CPU, torch.float32)
        out.append((loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_every_level_trains_the_same_losses_and_gradients(tmp_path, tiny_models, adapter):
    """none, selective, full and offload (its CPU-memory hooks run here too: without CUDA they copy to
    plain CPU tensors) give the plain path's per-step losses and gradients."""
    model, objective, n = _model(tmp_path, tiny_models, adapter)
    runs = {}
    for name, every in (("none", 1), ("selective", 2), ("full", 1), ("offload", 1)):
        copy_ = copy.deepcopy(model)
        apply_activation_checkpointing(copy_, name, every, device_type="cuda")
        runs[name] = _steps(copy_, objective, n, steps=2)
    for name, steps in runs.items():
        for (loss, grads), (plain_loss, plain_grads) in zip(steps, runs["none"]):
            assert loss == pytest.approx(plain_loss, abs=1e-6), name
            for key, g in plain_grads.items():
                torch.testing.assert_close(grads[key], g, atol=1e-6, rtol=1e-5, msg=f"{name}: {key}")


def _forward_counts(model) -> list[int]:
    """Per decoder layer, how often its MLP started during one training step (2: recomputed). A pre-hook:
    the recompute stops once the last tensor backward needs is back, which may be before the MLP returns."""
    from tuneforge.models.layers import decoder_layers

    counts = [0] * LAYERS
    for i, layer in enumerate(decoder_layers(model)):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("name, every, recomputed", [
    ("none", 1, []), ("selective", 2, [0, 2]), ("selective", 3, [0, 3]), ("full", 1, [0, 1, 2, 3]),
])
def test_only_the_chosen_layers_run_again_in_the_backward(tmp_path, tiny_models, name, every, recomputed):
    model, objective, n = _model(tmp_path, tiny_models, "lora")
    assert apply_activation_checkpointing(model, name, every) == recomputed
    counts = _forward_counts(model)
    batch = objective.collate(list(range(n)))
    accumulate_gradients(objective, model, [batch], CPU, torch.float32)
    assert counts == [2 if i in recomputed else 1 for i in range(LAYERS)]


def test_offload_moves_the_layer_inputs_and_nothing_else(tmp_path, tiny_models, monkeypatch):
    """What the offload hooks pack is one (batch, length, hidden) input per layer; all else stays."""
    model, objective, n = _model(tmp_path, tiny_models, "lora")
    packed = []
    real = torch.autograd.graph.save_on_cpu

    class Counting(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory=False, device_type="cuda"):
            inner = real(pin_memory, device_type)
            super().__init__(lambda t: (packed.append(tuple(t.shape)), inner.pack_hook(t))[1], inner.unpack_hook)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    apply_activation_checkpointing(model, "offload", device_type="cuda")
    batch = objective.collate(list(range(n)))
    accumulate_gradients(objective, model, [batch], CPU, torch.float32)
    width = batch["input_ids"].shape
    assert [s for s in packed if s != (0,)] == [(*width, model.config.hidden_size)] * LAYERS


def test_on_a_cpu_offload_is_full_and_auto_checkpoints_nothing(tmp_path):
    base = {"datasets": [{"path": "x.jsonl"}]}

    def on_cpu(**perf):
        return choose_level(config_from_dict({**base, **perf}, base=tmp_path), "cpu")

    assert on_cpu() == ("none", 1)
    assert on_cpu(performance="min_memory") == ("full", 1)
    assert on_cpu(performance={"activation_checkpointing": "offload"}) == ("full", 1)
    assert on_cpu(performance={"activation_checkpointing": "selective"}) == ("selective", 2)
    assert on_cpu(performance={"activation_checkpointing": "selective", "checkpoint_every": 3}) == ("selective", 3)
    assert on_cpu(gradient_checkpointing=True) == ("full", 1)  # the key users bring from other tools
    assert on_cpu(gradient_checkpointing=True, performance={"activation_checkpointing": "none"}) == ("none", 1)
    assert on_cpu(performance="off") == ("none", 1)
    with pytest.raises(ConfigError, match="checkpoint_every applies to activation_checkpointing: selective"):
        config_from_dict({**base, "performance": {"checkpoint_every": 2}}, base=tmp_path)


class _Stand:
    """A loaded model as choose_level reads it: its config (an 8B Llama's, without weights)."""

    def __init__(self, shape):
        from transformers import LlamaConfig

        from tuneforge.plan.model import hf_config_for

        self.config = LlamaConfig(**hf_config_for(shape))


@pytest.mark.parametrize("perf, gpu_gb, expected", [
    ({}, 80, ("none", 1)),  # the chunked loss, and the fused kernels (on by default on a GPU): all fits
    ({"kernels": False}, 80, ("selective", 32)),  # without the kernels, one layer of 32 checkpointed
    ({}, 24, ("full", 1)),
    ({"chunked_loss": False}, 80, ("selective", 32)),
    ({"chunked_loss": False, "kernels": False}, 80, ("selective", 4)),  # full logits, no kernels: 8 of 32 layers
    ({"chunked_loss": False}, 24, ("offload", 1)),  # full does not fit 0.9 x 24 GB; offload does
    ({"mode": "min_memory"}, 80, ("full", 1)),
    ({"mode": "min_memory", "chunked_loss": False}, 24, ("offload", 1)),
    ({"activation_checkpointing": "selective"}, 80, ("selective", 32)),  # the largest k: one layer
    ({"activation_checkpointing": "full"}, 80, ("full", 1)),
])
def test_auto_chooses_the_least_checkpointing_that_fits_the_gpu(tmp_path, perf, gpu_gb, expected):
    """Llama-3.1-8B LoRA, micro-batch 4 x 2048 tokens, bf16, by plan's memory model against 0.9 of the GPU."""
    cfg = config_from_dict({"datasets": [{"path": "x.jsonl"}], "max_seq_len": 2048, "micro_batch_size": 4,
                            "performance": perf}, base=tmp_path)
    assert choose_level(cfg, "cuda", _Stand(LLAMA_8B), device_memory=gpu_gb * GB) == expected


def test_plan_activations_drop_none_selective_full_offload():
    s = Settings(micro_batch=4, seq_len=2048)
    levels = [with_level(s, "none"), with_level(s, "selective", 2), with_level(s, "full"), with_level(s, "offload")]
    activations = [memory(LLAMA_8B, o, "bf16").activations for o in levels]
    assert activations == sorted(activations, reverse=True) and len(set(activations)) == 4
    # selective every 2nd layer keeps about half the blocks' activations; offload leaves one layer input
    assert activations[1] == pytest.approx(activations[0] / 2, rel=0.1)
    assert offloaded_bytes(LLAMA_8B, levels[3], "bf16") == 4 * 2048 * 32 * 4096 * 2
    flops = [flops_per_token(LLAMA_8B, o, 2048) for o in levels]
    assert flops[0] < flops[1] < flops[2] == flops[3]  # recomputes 16 of 32 layers, then all of them


def test_plan_shows_the_level_auto_picks_on_each_gpu(tmp_path, capsys):
    """8B LoRA with 64-example micro-batches of the quickstart data: the H100 keeps every activation, a
    24 GB card checkpoints; the tables and the recommendation name the level."""
    from test_plan import _quickstart

    from tuneforge.plan import plan_config
    from tuneforge.plan.render import print_plan

    cfg = _quickstart(base_model="meta-llama/Llama-3.1-8B-Instruct", micro_batch_size=64)
    report = plan_config(cfg, gpus=["h100", "4090"])
    rows = {r.device.name: r for r in report.rows}
    assert level(rows["H100-80GB"].settings) == "none"
    small = rows["RTX-4090"].settings
    assert level(small) != "none" and rows["RTX-4090"].fits
    shape = report.model.shape
    for r in report.rows:  # exactly what the loop would choose on that GPU
        assert r.settings == for_device(shape, report.settings, r.device.memory_gib * 2**30, False, "bf16")
    from rich.console import Console

    print_plan(report, Console(width=200))
    out = capsys.readouterr().out
    assert "activation checkpointing auto (least that fits, chosen per device)" in out  # the config's setting
    [line] = [ln for ln in out.splitlines() if ln.startswith("RTX-4090") and "bf16" in ln]
    assert describe(shape, small) in line  # the speed table's checkpointing column
    assert report.recommendation.device.name == "H100-80GB" and "activation checkpointing none, bf16" in out


def test_the_loop_records_the_level_and_trains_the_same(tmp_path, tiny_models):
    from tuneforge.track.metrics import read_metrics

    losses = {}
    for name, perf in (("none", {"activation_checkpointing": "none"}),
                       ("selective", {"activation_checkpointing": "selective", "checkpoint_every": 2})):
        cfg = make_cfg(tmp_path, tiny_models["llama"], out=name, max_steps=2, performance=perf,
                       **{"lora.dropout": 0.0, "evaluation.before_after": False})
        run = train(cfg, reporter=QUIET)
        assert run["performance"]["activation_checkpointing"] == name
        assert run["performance"]["gradient_checkpointing"] == (name != "none")
        assert json.loads((Path(cfg.output_dir) / "run.json").read_text())["performance"]["checkpoint_every"] == \
            (2 if name == "selective" else 1)
        losses[name] = [m["loss"] for m in read_metrics(Path(cfg.output_dir) / "metrics.jsonl")]
    assert losses["selective"] == pytest.approx(losses["none"], abs=1e-6)


def test_describe_names_the_level_and_compile():
    assert FastPath(activation_checkpointing="selective", checkpoint_every=4, compile=True).describe() == \
        "Performance: activation checkpointing selective (1 layer in 4), regional compile"
    assert resolve(config_from_dict({"datasets": [{"path": "x.jsonl"}], "performance": {"compile": True}})).compile
    assert not resolve(config_from_dict({"datasets": [{"path": "x.jsonl"}]})).compile  # off until measured


def test_regional_compile_gives_the_same_losses(tmp_path, tiny_models):
    """Each decoder layer compiled (aot_eager: dynamo and AOT autograd trace and partition the graphs as
    for inductor, without generating C++, which takes over a minute on this CPU), with LoRA, under
    selective checkpointing (layers 0 and 2 compiled inside their checkpoint, 1 and 3 as modules): the
    eager losses and gradients, and graphs really were captured. One micro-batch shape: one compilation."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, objective, n = _model(tmp_path, tiny_models, "lora")
    eager = copy.deepcopy(model)
    apply_activation_checkpointing(model, "selective", 2)
    assert apply_compile(model, backend="aot_eager") == LAYERS
    compiled, plain = _steps(model, objective, n, steps=2, size=n), _steps(eager, objective, n, steps=2, size=n)
    for (loss, grads), (plain_loss, plain_grads) in zip(compiled, plain):
        assert loss == pytest.approx(plain_loss, abs=1e-4)
        for key, g in plain_grads.items():
            torch.testing.assert_close(grads[key], g, atol=1e-4, rtol=1e-3, msg=key)
    assert counters["stats"]["unique_graphs"] >= 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert [k for k, _ in model.named_parameters()] == [k for k, _ in eager.named_parameters()]
