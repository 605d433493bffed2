"""Fused LoRA layers compute what PEFT's LoRA Linear computes, and the adapter stays a PEFT adapter.

The autograd function against PEFT's forward (output and gradients; gradcheck in fp64), tiny Llama and
Gemma models with the layers swapped in (alone and under the fused kernels) against the same models
without, the adapter's save and merge unchanged, and the cases that must keep PEFT's own forward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from test_fast import assert_same_step

from tuneforge.config import config_from_dict
from tuneforge.fast import FastPath
from tuneforge.fast import fused_lora
from tuneforge.fast.fused_lora import FusedLoraLinear, apply_fused_lora, fused_lora_linear
from tuneforge.fast.kernels import apply_kernels
from tuneforge.fast.switches import resolve

VOCAB = 97
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, one thread


@pytest.fixture
def fused_calls(monkeypatch):
    """How many calls took the fused path."""
    calls = []

    def counting(*args):
        calls.append(1)
        return fused_lora_linear(*args)

    monkeypatch.setattr(fused_lora, "fused_lora_linear", counting)
    return calls


def _layer(bias=True, rslora=False, dropout=0.0, dora=False, dtype=torch.float32, adapter_dtype=None):
    """PEFT's LoRA over one Linear(12 -> 10), r = 4, B random (so the adapter changes the output), and a fused copy.
    The adapter's weights in `adapter_dtype`: PEFT's default turns them to fp32 over a bf16 base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 10, bias=bias)).to(dtype)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0"],
                                           use_rslora=rslora, use_dora=dora, init_lora_weights=False),
                          autocast_adapter_dtype=adapter_dtype is None)
    if adapter_dtype is not None:
        peft.to(adapter_dtype)
    fused = copy.deepcopy(peft)
    swapped = apply_fused_lora(fused)
    assert swapped == ["base_model.model.0"] and isinstance(fused.base_model.model[0], FusedLoraLinear)
    return peft, fused


def _run(model, x, seed=3):
    """Output, and the gradients of x and of the parameters that train, for a random output gradient."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    torch.manual_seed(seed)
    out.backward(torch.randn_like(out))
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias, shape, rslora, frozen", [
    (True, (5, 12), False, None), (False, (2, 3, 12), False, None), (True, (2, 3, 12), True, None),
    (True, (7, 12), False, "lora_A"), (False, (7, 12), True, "lora_B")])
def test_the_fused_layer_gives_pefts_output_and_gradients(fused_calls, bias, shape, rslora, frozen):
    """With and without bias, 2-D and 3-D input, rsLoRA's alpha / sqrt(r), A or B frozen."""
    peft, fused = _layer(bias, rslora)
    if rslora:
        assert fused.base_model.model[0].scaling["default"] == 4.0  # 8 / sqrt(4), not 8 / 4
    for model in (peft, fused):
        for name, p in model.named_parameters():
            if frozen and frozen in name:
                p.requires_grad_(False)
    x = torch.randn(shape)
    out, dx, grads = _run(peft, x)
    fused_out, fused_dx, fused_grads = _run(fused, x)
    assert fused_calls == [1]
    assert fused_out.shape == out.shape
    torch.testing.assert_close(fused_out, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_dx, dx, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == grads.keys() and len(grads) == (1 if frozen else 2)
    for name, g in grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("bias", [True, False])
def test_the_backward_passes_gradcheck(bias):
    """fp64, every input requiring grad (the base weight and bias too), a 3-D input flattened inside."""
    torch.manual_seed(0)

    def make(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, w, a, b = make(2, 3, 5), make(4, 5), make(2, 5), make(4, 2)
    bias_t = make(4) if bias else None
    inputs = (x, w, a, b) + ((bias_t,) if bias else ())

    def fn(x, w, a, b, *bias_t):
        return fused_lora_linear(x, w, bias_t[0] if bias_t else None, a, b, 1.7, torch.float64)

    assert torch.autograd.gradcheck(fn, inputs)


def test_bf16_and_autocast_compute_in_pefts_dtype(fused_calls):
    """A bf16 layer runs in bf16; under CPU autocast the fused path computes in its dtype, as autocast would
    (gradients reach the fp32 adapter weights in fp32). Equal to bf16 rounding. Without autocast, an fp32
    adapter over a bf16 base (PEFT's default) keeps PEFT's forward, whose casts decide."""
    peft, fused = _layer(dtype=torch.bfloat16)
    x = torch.randn(6, 12, dtype=torch.bfloat16)
    torch.testing.assert_close(fused(x), peft(x), rtol=0, atol=0)
    assert fused_calls == []
    peft, fused = _layer(dtype=torch.bfloat16, adapter_dtype=torch.bfloat16)
    x = torch.randn(6, 12, dtype=torch.bfloat16)
    (out, dx, grads), (f_out, f_dx, f_grads) = _run(peft, x), _run(fused, x)
    assert f_out.dtype == out.dtype == torch.bfloat16 and f_dx.dtype == torch.bfloat16
    torch.testing.assert_close(f_out, out, rtol=2e-2, atol=2e-2)
    for name, g in grads.items():
        assert f_grads[name].dtype == g.dtype
        torch.testing.assert_close(f_grads[name], g, rtol=2e-2, atol=2e-2)
    peft, fused = _layer()  # fp32 weights, bf16 autocast
    x = torch.randn(6, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out, dx, grads), (f_out, f_dx, f_grads) = _run(peft, x), _run(fused, x)
    assert f_out.dtype == out.dtype == torch.bfloat16 and f_dx.dtype == dx.dtype == torch.float32
    torch.testing.assert_close(f_out, out, rtol=2e-2, atol=2e-2)
    for name, g in grads.items():
        assert f_grads[name].dtype == g.dtype == torch.float32
        torch.testing.assert_close(f_grads[name], g, rtol=2e-2, atol=5e-2)
    assert len(fused_calls) == 2


def test_other_cases_run_pefts_forward(fused_calls):
    """Dropout in training, DoRA, merged or disabled adapters, two active adapters, an extra argument and a hook
    on the base layer take PEFT's forward: the same output, and the fused path is never called."""
    x = torch.randn(5, 12)
    peft, fused = _layer(dropout=0.5)
    torch.manual_seed(7)
    expected = peft(x)
    torch.manual_seed(7)
    torch.testing.assert_close(fused(x), expected, rtol=0, atol=0)  # the same dropout draws: PEFT's forward ran
    peft.eval(), fused.eval()
    torch.testing.assert_close(fused(x), peft(x), rtol=1e-5, atol=1e-5)  # evaluation: dropout is off, fused
    assert fused_calls == [1]
    fused_calls.clear()

    peft, fused = _layer(dora=True)
    torch.testing.assert_close(fused(x), peft(x), rtol=0, atol=0)
    peft, fused = _layer()
    layer = fused.base_model.model[0]
    with fused.disable_adapter():
        torch.testing.assert_close(fused(x), layer.base_layer(x), rtol=0, atol=0)
    layer.merge()
    torch.testing.assert_close(fused(x), peft(x), rtol=1e-5, atol=1e-5)
    layer.unmerge()
    handle = layer.base_layer.register_forward_hook(lambda m, i, o: o + 1)
    torch.testing.assert_close(fused(x), peft(x) + 1, rtol=1e-5, atol=1e-5)
    handle.remove()
    assert fused_calls == []
    fused(x)
    assert fused_calls == [1]


# --- whole models ----------------------------------------------------------------------------------


def _tiny_lora(arch: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, VOCAB))
    torch.manual_seed(1)  # init_lora_weights=False: B is random too, so the adapter changes the output
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                            init_lora_weights=False))


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), int(batch["attention_mask"].sum()), {n: p.grad.clone() for n, p in model.named_parameters()
                                                             if p.requires_grad}


def _batch():
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 11))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("arch, also", [("llama", None), ("gemma", None), ("llama", "kernels"), ("gemma", "kernels"),
                                        ("llama", "checkpointing")])
def test_a_lora_model_with_fused_layers_gives_the_same_step(fused_calls, arch, also):
    """Every adapted linear of a tiny Llama and Gemma fused, alone, under the fused RMSNorm and gated-MLP
    kernels (whose MLP calls the fused gate and up projections) and under activation checkpointing (each
    layer run again in the backward): the plain model's loss and gradients."""
    from tuneforge.fast.recompute import apply_activation_checkpointing

    plain = _tiny_lora(arch)
    fused = copy.deepcopy(plain)
    assert len(apply_fused_lora(fused)) == 2 * len(TARGETS)
    if also == "kernels":
        assert len(apply_kernels(fused)) == 7
    elif also == "checkpointing":
        apply_activation_checkpointing(fused, "full", 1, "cpu")
    batch = _batch()
    assert_same_step(_step(fused.train(), batch), _step(plain.train(), batch))
    assert len(fused_calls) == 2 * len(TARGETS) * (2 if also == "checkpointing" else 1)


def test_save_merge_and_reference_are_those_of_the_plain_adapter(tmp_path):
    """save_pretrained writes the same keys and values, merge_and_unload the same merged model (with plain
    Linear layers), and disable_adapter (a DPO reference) gives the base model's logits."""
    plain = _tiny_lora("llama")
    fused = copy.deepcopy(plain)
    apply_fused_lora(fused)
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch).logits, plain(**batch).logits, rtol=1e-5, atol=1e-5)
        with fused.disable_adapter(), plain.disable_adapter():
            torch.testing.assert_close(fused(**batch).logits, plain(**batch).logits, rtol=0, atol=0)
    saved = []
    for model, folder in ((plain, tmp_path / "plain"), (fused, tmp_path / "fused")):
        model.save_pretrained(str(folder))
        saved.append(load_file(str(folder / "adapter_model.safetensors")))
    assert saved[0].keys() == saved[1].keys() and len(saved[0]) == 4 * len(TARGETS)
    for key, tensor in saved[0].items():
        assert torch.equal(saved[1][key], tensor), key
    merged_plain, merged_fused = plain.merge_and_unload(), fused.merge_and_unload()
    assert not any(isinstance(m, FusedLoraLinear) for m in merged_fused.modules())
    fused_state = merged_fused.state_dict()
    for key, tensor in merged_plain.state_dict().items():
        assert torch.equal(fused_state[key], tensor), key


def test_fused_lora_is_on_by_default_where_it_applies():
    base = {"datasets": [{"path": "x.jsonl"}], "lora": {"dropout": 0.0}}
    assert resolve(config_from_dict(base)).fused_lora and resolve(config_from_dict(base), "cuda").fused_lora
    assert resolve(config_from_dict({**base, "performance": "min_memory"})).fused_lora
    assert resolve(config_from_dict({**base, "performance": {"mode": "off", "fused_lora": True}})).fused_lora
    assert not resolve(config_from_dict({**base, "performance": "off"})).fused_lora
    assert not resolve(config_from_dict({**base, "performance": {"fused_lora": False}})).fused_lora
    assert not resolve(config_from_dict(base), sharded=True).fused_lora  # FSDP: not tested
    for other in ({"lora": {"dropout": 0.1}}, {"lora": {"dropout": 0.0, "use_dora": True}}, {"adapter": "full"},
                  {"adapter": "qlora"}):
        assert not resolve(config_from_dict({**base, **other}), "cuda").fused_lora, other
    assert "fused LoRA" in FastPath(fused_lora=True).describe()


def test_the_loop_trains_the_same_with_fused_lora_on(tmp_path, tiny_models, fused_calls):
    """Through the loop (then the after-training evaluation and generation, and the final save, on the
    fused model): the same losses and gradient norms as PEFT's forward, and the same saved adapter."""
    from test_train import QUIET, make_cfg

    from tuneforge.track.metrics import read_metrics
    from tuneforge.train.loop import train

    logged, adapters = {}, {}
    for on in (False, True):
        out = f"fused-{on}"
        cfg = make_cfg(tmp_path, tiny_models["llama"], out=out, max_steps=2, performance={"fused_lora": on},
                       **{"lora.dropout": 0.0, "evaluation.before_after": on, "evaluation.max_examples": 2,
                          "evaluation.max_new_tokens": 4})
        assert train(cfg, reporter=QUIET)["performance"]["fused_lora"] == on
        assert bool(fused_calls) == on
        logged[on] = read_metrics(tmp_path / out / "metrics.jsonl")
        adapters[on] = load_file(str(tmp_path / out / "final" / "adapter_model.safetensors"))
    assert len(logged[True]) == len(logged[False]) == 2
    for off, on in zip(logged[False], logged[True]):
        assert on["loss"] == pytest.approx(off["loss"], abs=1e-5)
        assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-4)
    assert adapters[True].keys() == adapters[False].keys()
    for key, tensor in adapters[False].items():
        torch.testing.assert_close(adapters[True][key], tensor, rtol=1e-4, atol=1e-6, msg=key)
